"""Scores and their exact traces.

The score of q(x) = exp(-f(x)) / Z is s(x) = ∇ log q(x) = -∇f(x): the
intractable Z drops out. Implicit score matching needs the divergence
tr(∂s/∂x) of a vector field, or the Laplacian Δf = tr(∇²f) of an energy,
exactly. Every function here acts on ONE example x, of shape (d,) or any other
((h, w, c) for an image); batch with `jax.vmap`, or pass a batch xs (n, *shape) to the
`batch_*` functions. An exact trace treats x as its d = prod(x.shape) entries:

    Δf = Σ_k ∂²f/∂x_k²,    tr ∂v/∂x = Σ_k ∂v_k/∂x_k    (k over all entries of x),

for an energy f: shape -> () and a vector field v: shape -> shape (any other output shape
is refused with an error naming the function). It runs on the flattened function
(`jsm.forward.flattened`), so a vector x costs no reshape at all.

Exact methods (`EXACT_METHODS`); every exact function takes `method="auto"` by default:
  "forward" the forward Laplacian (`jsm.forward`): value, Jacobian and Laplacian pushed
            through the function in one pass. For a Laplacian (`laplacian`, and
            `batch_score_and_divergence_of_energy`) it never builds the gradient's graph:
            about half the work of "jacfwd". Works on any JAX function.
  "jacfwd"  the reference: the full d x d Jacobian by forward mode, then its trace.
  "jacrev"  the same Jacobian by reverse mode (d VJPs); cheaper when a pass is
            dominated by a wide first layer.
  "auto"    the fastest, as measured by experiments/bench/trace_cost.py (batch 256,
            3 x 128 MLPs, d = 2 to 512): "forward". For Laplacians of an energy it is
            3-7x faster than "jacfwd"; for the divergence of a vector field all three
            cost d JVPs and stay within about 25% of each other, in no stable order —
            except where the network's first layer is dense and narrower than x (h < d):
            "forward" then pushes h directions instead of d (the first-layer seed,
            `jsm.forward`) and never builds the last layer's Jacobian.

An energy model and a score network are two different calls, because only the energy
gives the cheap route: for s = -∇f, one second-order forward jet of f yields s and
tr ∂s/∂x = -Δf together. `batch_score_and_divergence_of_energy(f)` takes that route;
`batch_value_and_divergence(v)` treats v as an opaque vector field (a first-order jet),
and so does it for `score_of(f)`, which is a plain function of x and nothing more.
Batched work should go through these two, which also fold the batch into the forward
Laplacian's matrix products (one (n·d, in) x (in, out) product per layer instead of n).
Estimators are kept apart, under their own names, and are never a default:
`hutchinson_divergence` is unbiased but noisy, with variance that grows with d.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jsm import _validate
from jsm.forward import (divergence_batch, flattened, folded, forward_jet_batch, hessian_diagonal_batch,
                         jacobian_diagonal_batch, laplacian_batch)

__all__ = [
    "EXACT_METHODS", "METHODS", "PROBES", "batch_gradient_and_hessian_diagonal", "batch_score_and_divergence_of_energy",
    "batch_value_and_divergence", "batch_value_and_jacobian_diagonal",
    "divergence", "hessian_diagonal", "hutchinson_divergence", "jacobian_diagonal", "laplacian", "resolve_method",
    "score_of", "value_and_hutchinson",
]

Array = jax.Array
EnergyFn = Callable[[Array], Array]
VectorFn = Callable[[Array], Array]

EXACT_METHODS = ("forward", "jacfwd", "jacrev")
METHODS = (*EXACT_METHODS, "auto")
PROBES = ("rademacher", "gaussian")


def score_of(energy: EnergyFn) -> VectorFn:
    """s(x, *args) = -∇_x f(x, *args), the score of exp(-f(x)) / Z, for ONE example x of any shape
    (s has x's shape); further arguments (network parameters) are passed on, so `score_of(f)` serves
    a kernel whose parameters arrive through `run_chains(..., args=...)`.

    A plain function of x: an exact trace of it differentiates -∇f's own graph. For
    s and tr ∂s/∂x = -Δf from one forward pass of f, call
    `batch_score_and_divergence_of_energy(f)` (or `jsm.objectives.ism_energy(f, xs)`).
    """
    grad_f = jax.grad(_validate.scalar_valued("energy", energy))

    def score(x: Array, *args) -> Array:
        _validate.example("x", x)
        return -grad_f(x, *args)

    return score


def resolve_method(method: str) -> str:
    """The exact method that `method` names ("auto": see the module docstring)."""
    _validate.choice("method", method, METHODS)
    return "forward" if method == "auto" else method


def _chunk_for(method: str, chunk_size: int | None) -> None:
    if chunk_size is not None and method != "forward":
        raise ValueError(f'chunk_size applies to method="forward" (or "auto") only, got method={method!r}')


def batch_value_and_divergence(
    vector_fn: VectorFn, method: str = "auto", *, chunk_size: int | None = None
) -> Callable[[Array], tuple[Array, Array]]:
    """xs (n, *shape) -> (v(x_i) stacked (n, *shape), tr ∂v/∂x at every x_i (n,)), the trace exact.

    v: shape -> shape is a function of ONE example, treated as an opaque vector field: with
    "forward", one first-order forward jet (value and Jacobian). The trace runs over all
    d = prod(shape) entries. For the score of an energy use `batch_score_and_divergence_of_energy`,
    several times cheaper. `chunk_size` ("forward" only): push the Jacobian's columns in blocks
    of this many, bounding memory at large d (`jsm.forward.divergence_batch`). Where x enters v
    only through a dense first layer z = x W of width h < d, "forward" pushes h directions
    (tr ∂v/∂x = Σ_j w_j · ∂v/∂z_j, w_j the columns of W), the first-layer seed of `jsm.forward`.
    """
    exact = resolve_method(method)
    _chunk_for(exact, chunk_size)
    vector_fn = _validate.same_shape("vector_fn", vector_fn)
    forward = divergence_batch(vector_fn, chunk_size=chunk_size) if exact == "forward" else None

    def both(xs: Array) -> tuple[Array, Array]:
        _validate.example_shape("xs", xs)
        if forward is not None:
            return forward(xs)
        return jax.vmap(vector_fn)(xs), jax.vmap(_jacobian_trace(vector_fn, exact))(xs)

    return both


def batch_score_and_divergence_of_energy(
    energy_fn: EnergyFn, method: str = "auto", *, chunk_size: int | None = None
) -> Callable[[Array], tuple[Array, Array]]:
    """xs (n, *shape) -> (s(x_i) = -∇f(x_i) stacked (n, *shape), tr ∂s/∂x = -Δf(x_i) (n,)), the trace exact.

    The score of q ∝ exp(-f) and its divergence, for an energy f: shape -> (), the Laplacian
    summed over all d = prod(shape) entries of x. With "forward" ("auto"), ONE second-order
    forward jet of f gives ∇f and Δf together, without building the gradient's graph. Equal to
    `batch_value_and_divergence(score_of(f), method)`, which differentiates -∇f instead.
    `chunk_size` as in `batch_value_and_divergence`. Where x enters f only through a dense first
    layer of width h < d, the jet runs along the h columns of Q (W = QR) and comes back as
    ∇_x f = Q ∇_u f, Δ_x f = Δ_u f (the first-layer seed of `jsm.forward`).
    """
    exact = resolve_method(method)
    _chunk_for(exact, chunk_size)
    energy_fn = _validate.scalar_valued("energy_fn", energy_fn)
    grad_f = jax.grad(energy_fn)
    lap = None if exact == "forward" else laplacian(energy_fn, exact)

    def both(xs: Array) -> tuple[Array, Array]:
        _validate.example_shape("xs", xs)
        if exact == "forward":
            jet = forward_jet_batch(energy_fn, chunk_size=chunk_size)(xs)
            return -jet.jacobian, -jet.laplacian
        return -jax.vmap(grad_f)(xs), -jax.vmap(lap)(xs)

    return both


def batch_gradient_and_hessian_diagonal(
    energy_fn: EnergyFn, method: str = "auto", *, chunk_size: int | None = None
) -> Callable[[Array], tuple[Array, Array]]:
    """xs (n, *shape) -> (∇f(x_i) (n, *shape), ∂²f/∂x_k² at every x_i (n, *shape)), both exact.

    "forward": ONE forward jet carrying each direction's second derivative
    (`jsm.forward.hessian_diagonal_batch`), the batch folded into its matrix products; the
    Laplacian is the diagonal's sum. "jacfwd" / "jacrev": the full Hessian per example.
    """
    exact = resolve_method(method)
    _chunk_for(exact, chunk_size)
    energy_fn = _validate.scalar_valued("energy", energy_fn)
    forward = hessian_diagonal_batch(energy_fn, chunk_size=chunk_size) if exact == "forward" else None

    def both(xs: Array) -> tuple[Array, Array]:
        _validate.example_shape("xs", xs)
        if forward is not None:
            out = forward(xs)
            return out.jacobian, out.diagonal
        return jax.vmap(jax.grad(energy_fn))(xs), jax.vmap(_diagonal_reference(energy_fn, exact, second=True))(xs)

    return both


def batch_value_and_jacobian_diagonal(
    vector_fn: VectorFn, method: str = "auto", *, chunk_size: int | None = None
) -> Callable[[Array], tuple[Array, Array]]:
    """xs (n, *shape) -> (v(x_i) (n, *shape), ∂v_k/∂x_k at every x_i (n, *shape)), exact: one first-order
    jet with "forward" (the cost of `batch_value_and_divergence`), the full Jacobian otherwise."""
    exact = resolve_method(method)
    _chunk_for(exact, chunk_size)
    vector_fn = _validate.same_shape("vector_fn", vector_fn)
    forward = jacobian_diagonal_batch(vector_fn, chunk_size=chunk_size) if exact == "forward" else None

    def both(xs: Array) -> tuple[Array, Array]:
        _validate.example_shape("xs", xs)
        if forward is not None:
            return forward(xs)
        return jax.vmap(vector_fn)(xs), jax.vmap(_diagonal_reference(vector_fn, exact, second=False))(xs)

    return both


def _jacobian_trace(vector_fn: VectorFn, method: str) -> Callable[[Array], Array]:
    """The reference: the full d x d Jacobian of ONE example (flattened) by jacfwd or jacrev, then its trace."""
    jacobian = jax.jacfwd if method == "jacfwd" else jax.jacrev

    def trace(x: Array) -> Array:
        flat = flattened(vector_fn, x.shape, vector="vector_fn")
        return jnp.trace(jacobian(flat)(x.reshape(-1)))

    return trace


def divergence(vector_fn: VectorFn, method: str = "auto", *, chunk_size: int | None = None) -> Callable[[Array], Array]:
    """x -> tr(∂v/∂x) = Σ_i ∂v_i/∂x_i, exactly, i over all d = prod(x.shape) entries of x.

    With "forward", `jax.vmap` of it folds the batch into the jet's matrix products
    (`jsm.forward.folded`): as fast as `batch_value_and_divergence`, also under a `jax.grad`
    taken outside the vmap. Where the network allows it (x enters v only through a dense first
    layer z = x W of width h < d), "forward" pushes h directions instead of d, the jet starting at
    z, and tr ∂v/∂x = Σ_j w_j · ∂v/∂z_j, w_j the columns of W (`jsm.forward`'s first-layer seed);
    otherwise the d columns of I, the same answer.

    Args:
      vector_fn: v, a map shape -> shape for ONE example ((d,), (h, w, c), ...).
      method: one of `EXACT_METHODS` or "auto".
      chunk_size: "forward" only: Jacobian columns per block (memory bound at large d); None: all.

    Returns:
      A function of x with shape `shape` returning a scalar.
    """
    exact = resolve_method(method)
    _chunk_for(exact, chunk_size)
    vector_fn = _validate.same_shape("vector_fn", vector_fn)
    if exact == "forward":
        one = folded(lambda v: (lambda xs: divergence_batch(v, chunk_size=chunk_size)(xs)[1]), vector_fn)
    else:
        one = _jacobian_trace(vector_fn, exact)

    def div(x: Array) -> Array:
        _validate.example("x", x)
        return one(x)

    return div


def laplacian(energy: EnergyFn, method: str = "auto", *, chunk_size: int | None = None) -> Callable[[Array], Array]:
    """x -> Δf(x) = Σ_i ∂²f/∂x_i², exactly, i over all d = prod(x.shape) entries: the divergence of ∇f.

    Note tr(∂s/∂x) = -Δf for the score s = -∇f. With "forward", `jax.vmap` of it folds the
    batch into the jet's matrix products (`jsm.forward.folded`), also under a `jax.grad`
    taken outside the vmap.

    Args:
      energy: f, a map shape -> () for ONE example ((d,), (h, w, c), ...).
      method: one of `EXACT_METHODS` or "auto" (the forward Laplacian).
      chunk_size: "forward" only: Jacobian columns per block (memory bound at large d); None: all.

    Returns:
      A function of x with shape `shape` returning a scalar.
    """
    exact = resolve_method(method)
    _chunk_for(exact, chunk_size)
    energy = _validate.scalar_valued("energy", energy)
    if exact != "forward":
        return divergence(jax.grad(energy), exact)
    one = folded(lambda f: laplacian_batch(f, chunk_size=chunk_size), energy)

    def lap(x: Array) -> Array:
        _validate.example("x", x)
        return one(x)

    return lap


def _diagonal_reference(fn, method: str, second: bool) -> Callable[[Array], Array]:
    """The reference: the diagonal of the full (d, d) Hessian (of fn) or Jacobian by jacfwd or jacrev."""
    jacobian = jax.jacfwd if method == "jacfwd" else jax.jacrev

    def diagonal(x: Array) -> Array:
        flat = flattened(fn, x.shape, vector=None if second else "vector_fn")
        return jnp.diagonal(jacobian(jax.grad(flat) if second else flat)(x.reshape(-1))).reshape(x.shape)

    return diagonal


def hessian_diagonal(energy: EnergyFn, method: str = "auto", *, chunk_size: int | None = None
                     ) -> Callable[[Array], Array]:
    """x -> ∂²f/∂x_i² for every entry i of x (x's shape), exactly: the diagonal of the Hessian ∇²f.

    Its sum is the Laplacian. "forward" pushes, beside each of the d Jacobian columns, that
    direction's own second derivative through f (`jsm.forward.hessian_diagonal_batch`), at about
    twice the Laplacian's cost; Kingma & LeCun (2010) approximated this diagonal (curvature
    backpropagation) because it was too costly to compute exactly. The first-layer seed of
    `laplacian` does not apply: it mixes the coordinates. `jax.vmap` of it folds the batch.
    For s = -∇f, ∂s_i/∂x_i = -∂²f/∂x_i² (`jacobian_diagonal` of a score network).

    Args:
      energy: f, a map shape -> () for ONE example ((d,), (h, w, c), ...).
      method: one of `EXACT_METHODS` or "auto" (= "forward"); "jacfwd"/"jacrev" build the full Hessian.
      chunk_size: "forward" only: Jacobian columns per block (memory bound at large d); None: all.
    """
    exact = resolve_method(method)
    _chunk_for(exact, chunk_size)
    energy = _validate.scalar_valued("energy", energy)
    if exact == "forward":
        one = folded(lambda f: (lambda xs: hessian_diagonal_batch(f, chunk_size=chunk_size)(xs).diagonal), energy)
    else:
        one = _diagonal_reference(energy, exact, second=True)

    def diagonal(x: Array) -> Array:
        _validate.example("x", x)
        return one(x)

    return diagonal


def jacobian_diagonal(vector_fn: VectorFn, method: str = "auto", *, chunk_size: int | None = None
                      ) -> Callable[[Array], Array]:
    """x -> ∂v_i/∂x_i for every entry i of x (x's shape), exactly: the diagonal of ∂v/∂x, whose sum is the divergence.

    For a score network s, the quantity `jsm.objectives.ism(..., hessian_penalty=)` penalises.
    "forward": one first-order jet (`jsm.forward.jacobian_diagonal_batch`), the cost of the
    divergence. Arguments as in `divergence`.
    """
    exact = resolve_method(method)
    _chunk_for(exact, chunk_size)
    vector_fn = _validate.same_shape("vector_fn", vector_fn)
    if exact == "forward":
        one = folded(lambda v: (lambda xs: jacobian_diagonal_batch(v, chunk_size=chunk_size)(xs)[1]), vector_fn)
    else:
        one = _diagonal_reference(vector_fn, exact, second=False)

    def diagonal(x: Array) -> Array:
        _validate.example("x", x)
        return one(x)

    return diagonal


def hutchinson_divergence(
    vector_fn: VectorFn, n_probes: int = 1, probe: str = "rademacher"
) -> Callable[[Array, Array], Array]:
    """An ESTIMATOR of tr(∂v/∂x): (x, key) -> mean_j u_j^T J u_j, J = ∂v/∂x, E[u u^T] = I.

    Unbiased. Per probe, u^T J u = Σ_i J_ii u_i² + Σ_{i<j} (J_ij + J_ji) u_i u_j, and the
    products u_i u_j (i < j) are uncorrelated with unit variance, so

      Rademacher (u_i² = 1):  Var = 1/2 Σ_{i≠j} (J_ij + J_ji)²,
      Gaussian:               Var = 1/2 Σ_{i≠j} (J_ij + J_ji)² + 2 Σ_i J_ii²   (= 2 |sym J|_F²),

    divided by `n_probes` for the mean. J need not be symmetric (a score network's is
    not); for a symmetric J (the score of an energy) the first reads 2 Σ_{i≠j} J_ij².
    Each probe costs one JVP. For comparison with the exact methods only. x may have any
    shape; the probes u then have x's shape and u^T J u sums over all its entries.
    """
    n_probes = _validate.positive_int("n_probes", n_probes)
    _validate.choice("probe", probe, PROBES)
    field = _validate.same_shape("vector_fn", vector_fn)

    def estimate(x: Array, key: Array) -> Array:
        _validate.example("x", x)
        shape = (n_probes, *x.shape)
        if probe == "rademacher":
            u = jax.random.rademacher(key, shape, x.dtype)
        else:
            u = jax.random.normal(key, shape, x.dtype)
        return value_and_hutchinson(field, x, u)[1]

    return estimate


def value_and_hutchinson(vector_fn: VectorFn, x: Array, probes: Array) -> tuple[Array, Array]:
    """(v(x), mean_j u_j^T (∂v/∂x) u_j) for ONE example x and given probes u (m, *x.shape).

    One linearisation of v at x, then one JVP per probe: the estimator of `hutchinson_divergence`
    with the probes chosen by the caller (`jsm.likelihood` fixes them along an ODE path).
    """
    v, jvp = jax.linearize(vector_fn, x)
    return v, jnp.mean(jnp.sum(probes * jax.vmap(jvp)(probes), axis=tuple(range(1, probes.ndim))))
