"""Scores and their exact traces.

The score of q(x) = exp(-f(x)) / Z is s(x) = ∇ log q(x) = -∇f(x): the
intractable Z drops out. Implicit score matching needs the divergence
tr(∂s/∂x) of a vector field, or the Laplacian Δf = tr(∇²f) of an energy,
exactly. Every function here acts on ONE example x of shape (d,); batch with
`jax.vmap`.

Exact methods (`EXACT_METHODS`):
  "forward" the forward Laplacian (`jsm.forward`): value, Jacobian and Laplacian pushed
            through the function in one pass. For a Laplacian (or the divergence of a
            score made by `score_of`) it never builds the gradient's graph: about half
            the work of "jacfwd". Works on any JAX function.
  "jacfwd"  the reference: the full d x d Jacobian by forward mode, then its trace.
  "jacrev"  the same Jacobian by reverse mode (d VJPs); cheaper when a pass is
            dominated by a wide first layer.
  "auto"    the fastest, as measured by experiments/bench/trace_cost.py (batch 256,
            3 x 128 MLPs, d = 2 to 512): "forward". For Laplacians and scores made by
            `score_of` it is 3-7x faster than "jacfwd"; for other vector fields all three
            cost d JVPs and stay within about 25% of each other, in no stable order.
Batched work should go through `batch_value_and_divergence`, which also folds the
batch into the forward Laplacian's matrix products (one (n·d, in) x (in, out) product
per layer instead of n products).
Estimators are kept apart, under their own names, and are never a default:
`hutchinson_divergence` is unbiased but noisy, with variance that grows with d.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jsm import _validate
from jsm.forward import forward_jet, forward_jet_batch

Array = jax.Array
EnergyFn = Callable[[Array], Array]
VectorFn = Callable[[Array], Array]

EXACT_METHODS = ("forward", "jacfwd", "jacrev")
METHODS = (*EXACT_METHODS, "auto")
PROBES = ("rademacher", "gaussian")


def _example(x: Array) -> None:
    if jnp.ndim(x) != 1:
        raise ValueError(
            f"x must be ONE example of shape (d,), got shape {jnp.shape(x)}; batch with jax.vmap"
        )


def score_of(energy: EnergyFn) -> VectorFn:
    """s(x) = -∇f(x), the score of exp(-f(x)) / Z, for x of shape (d,).

    The returned function remembers its energy (`s.energy`), so that exact traces of
    it take the forward Laplacian of f instead of differentiating -∇f's own graph.
    """
    grad_f = jax.grad(energy)

    def score(x: Array) -> Array:
        _example(x)
        return -grad_f(x)

    score.energy = energy
    return score


def resolve_method(method: str) -> str:
    """The exact method that `method` names ("auto": see the module docstring)."""
    _validate.choice("method", method, METHODS)
    return "forward" if method == "auto" else method


def batch_value_and_divergence(vector_fn: VectorFn, method: str = "auto") -> Callable[[Array], tuple[Array, Array]]:
    """xs (n, d) -> (v(x_i) stacked (n, d), tr ∂v/∂x at every x_i (n,)), the trace exact.

    v is a function of ONE example. With "forward", a score made by `score_of(f)` is
    handled as -∇f: one second-order forward jet of f gives both s = -∇f and
    tr ∂s/∂x = -Δf. Any other v gets a first-order forward jet (value and Jacobian).
    """
    exact = resolve_method(method)
    energy = getattr(vector_fn, "energy", None)

    def both(xs: Array) -> tuple[Array, Array]:
        if jnp.ndim(xs) != 2:
            raise ValueError(f"xs must be a batch of shape (n, d), got shape {jnp.shape(xs)}")
        if exact == "forward" and energy is not None:
            jet = forward_jet_batch(energy)(xs)
            return -jet.jacobian, -jet.laplacian
        if exact == "forward":
            jet = forward_jet_batch(vector_fn, second_order=False)(xs)
            return jet.value, jnp.trace(jet.jacobian, axis1=1, axis2=2)
        return jax.vmap(vector_fn)(xs), jax.vmap(_jacobian_trace(vector_fn, exact))(xs)

    return both


def _jacobian_trace(vector_fn: VectorFn, method: str) -> Callable[[Array], Array]:
    """The reference: the full d x d Jacobian of ONE example by jacfwd or jacrev, then its trace."""
    jacobian = jax.jacfwd(vector_fn) if method == "jacfwd" else jax.jacrev(vector_fn)
    return lambda x: jnp.trace(jacobian(x))


def divergence(vector_fn: VectorFn, method: str = "jacfwd") -> Callable[[Array], Array]:
    """x -> tr(∂v/∂x) = Σ_i ∂v_i/∂x_i, exactly.

    Args:
      vector_fn: v, a map (d,) -> (d,).
      method: one of `EXACT_METHODS` or "auto".

    Returns:
      A function of x with shape (d,) returning a scalar.
    """
    both = batch_value_and_divergence(vector_fn, method)  # validates `method`
    reference = _jacobian_trace(vector_fn, method) if method in ("jacfwd", "jacrev") else None

    def div(x: Array) -> Array:
        _example(x)
        return reference(x) if reference is not None else both(x[None])[1][0]

    return div


def laplacian(energy: EnergyFn, method: str = "jacfwd") -> Callable[[Array], Array]:
    """x -> Δf(x) = Σ_i ∂²f/∂x_i², exactly: the divergence of ∇f.

    Note tr(∂s/∂x) = -Δf for the score s = -∇f.
    """
    if resolve_method(method) == "forward":
        jet = forward_jet(energy)

        def lap(x: Array) -> Array:
            _example(x)
            return jet(x).laplacian

        return lap
    return divergence(jax.grad(energy), method)


def hutchinson_divergence(
    vector_fn: VectorFn, n_probes: int = 1, probe: str = "rademacher"
) -> Callable[[Array, Array], Array]:
    """An ESTIMATOR of tr(∂v/∂x): (x, key) -> mean_j u_j^T (∂v/∂x) u_j, E[u u^T] = I.

    Unbiased; its variance is 2 Σ_{i≠j} J_ij² / n_probes for Rademacher probes
    (plus 2 Σ_i J_ii² for Gaussian ones). Each probe costs one JVP. For comparison
    with the exact methods only.
    """
    n_probes = _validate.positive_int("n_probes", n_probes)
    _validate.choice("probe", probe, PROBES)

    def estimate(x: Array, key: Array) -> Array:
        _example(x)
        shape = (n_probes, x.shape[0])
        if probe == "rademacher":
            u = jax.random.rademacher(key, shape, x.dtype)
        else:
            u = jax.random.normal(key, shape, x.dtype)
        jvp = lambda ui: jax.jvp(vector_fn, (x,), (ui,))[1]
        return jnp.mean(jnp.sum(u * jax.vmap(jvp)(u), axis=-1))

    return estimate
