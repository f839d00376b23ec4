"""The forward Laplacian: value, Jacobian and Laplacian of any JAX function in one forward pass.

For a function y = F(x) of one example x of shape (d,), every intermediate value
v of F's computation is carried as a jet

    (v,  J = ∂v/∂x_k stacked on a leading axis of size d,  L = Σ_k ∂²v/∂x_k²)

and pushed forward one primitive at a time (Li et al. 2023, "A computational
framework for neural network-based variational Monte Carlo with Forward
Laplacian"). For y = φ(v) the chain rule gives

    J_y = φ'(v) J_v,     L_y = φ'(v) L_v + φ''(v) Σ_k J_v,k²,

an affine op pushes J and L through itself, and a product y = a·b adds the
cross term 2 Σ_k J_a,k J_b,k. For an energy f this yields ∇f (the Jacobian of a
scalar) and Δf together, without ever building the gradient's own graph: one
pass costs about d + 1 forward passes, where jacfwd-over-grad costs d passes of
the forward AND backward graph.

An example of any other shape, an image (h, w, c) say, is its d = prod(shape) entries in
row-major order: fn is run on x.reshape(shape) from a flat x (`flattened`), the Laplacian
sums ∂²v/∂x_k² over all d entries, and Jacobians come back with x's shape on their leading
axes. For x of shape (d,) nothing is reshaped.

`forward_jet(fn)` works on any function JAX can trace (not only `jsm`'s networks):
it reads fn's jaxpr and interprets it. Four rules cover every primitive:

  affine       (add, reshape, dot_general or mul with one x-dependent operand, ...)
               J and L are pushed through the op's own tangent map; under `jax.vmap`
               the d columns of J and the batch fold into ONE matrix product.
  elementwise  (tanh, exp, softplus's custom_jvp, ...) φ' and φ'' from nested JVPs
               along a vector of ones: O(size) work, not O(d · size).
  product      mul of two x-dependent operands, with its cross term.
  any other    (scans, loops, sorts, ...) exact by nested JVPs per column, summed.

Calls (jit, checkpoint, custom_vjp) are interpreted through their inner jaxpr.
The result is differentiable in anything fn closes over (parameters): the jet is
ordinary JAX code.

The seed's Jacobian ∂x/∂x = I is never built per example: it is kept symbolic (a
batch-shared matrix) until the first affine op, which turns it into that op's own
Jacobian, computed once and shared by the batch (for x @ W: W). `chunk_size` pushes the
Jacobian's columns through in blocks (a seed of c rows of I per block, the Laplacian
summed over blocks), bounding memory by n·c·width instead of n·d·width.

The first-layer seed. Where x enters fn only through z = y W, y = x (reshaped at most, or
concatenated with values that do not depend on x: an MLP on [x, t]), with the (d, h) block W of
the weights that multiplies x narrower than x (h < d), every jet needs h Jacobian rows, not d.
fn depends on x only through z, so by the chain rule, for v = fn and w_j the columns of W,

    ∂v/∂x = Σ_j w_j ∂v/∂z_j,    tr ∂v/∂x = Σ_j w_j · ∂v/∂z_j    (v: (d,) -> (d,)):

a first-order jet (`divergence_batch`, `forward_jet_batch(second_order=False)`) starts at z with
the seed Jacobian I_h and Laplacian 0 and is mapped back by W. The Laplacian needs the metric:
Δ_x f = tr(W H_z Wᵀ) = tr(H_z WᵀW). With W = QR (reduced QR, Q: (d, h) orthonormal columns q_j,
R: (h, h)) and u = Qᵀx, z = u R, so a second-order jet starts at z with the seed Jacobian R (the
h rows ∂z/∂u_j) and

    ∇_x f = Q ∇_u f,    Δ_x f = tr(Q H_u Qᵀ) = tr(H_u) = Δ_u f:

`forward_jet_batch` back-projects its Jacobian by Q (an (n, d, ...) result as before) and
`laplacian_batch` keeps Δ_u f. Either way h/d of the Jacobian work, `chunk_size` blocking the h
rows. `divergence_batch` also moves the contraction before v's trailing affine ops (the last
layer, v = a W_L + b): Σ_j w_j · (∂a/∂z_j) W_L = Σ_j (w_j W_Lᵀ) · ∂a/∂z_j, so the (n, h, d)
Jacobian of v is never built (for the d rows of I too: Σ_k e_k W_Lᵀ · ∂a/∂x_k).

The results are differentiable in W, at any rank of W (a zero-initialised first layer, a dead
unit): the QR is a value only, never differentiated (its derivative solves with R), and the seed
rows are S = QᵀW, equal to R; as Q Qᵀ W = W at any rank, d(SᵀS) = d(WᵀW), so Δf and its
derivative are exact. The Jacobian Q ∂f/∂u needs one more term of the derivative, dW ∂f/∂z
outside the span of Q, added with value zero; ∂f/∂z is a value solved from R ∂f/∂z = ∂f/∂u, or,
where R's smallest diagonal entry is under `RANK_TOLERANCE` times its largest, taken from a
first-order jet at z (a `lax.cond` on constants, which keeps no residuals under `jax.grad`).
The d rows of I run instead (the same answer) when x is used anywhere else (a skip connection,
x entering twice), when it passes through anything but reshapes and one concatenate before the
product (a scaling c_in(t) x, a convolution), or when h >= d. The Hessian and Jacobian
diagonals never seed: the directions mix the coordinates whose own entries are wanted.

`forward_jet` (one example) folds too: under `jax.vmap` it calls `forward_jet_batch` on
the whole batch (`jax.custom_batching.custom_vmap`), so `jax.vmap(forward_jet(f))` and
`jax.grad` of a loss built from it take the folded path.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jsm import _jax_internals, _validate

__all__ = [
    "DIAGONAL", "DiagonalJet", "Jet", "RANK_TOLERANCE", "divergence_batch", "flattened", "folded", "forward_jet",
    "forward_jet_batch", "hessian_diagonal_batch", "jacobian_diagonal_batch", "laplacian_batch",
]

Array = jax.Array


class _Seed(NamedTuple):
    """A Jacobian the same for every example, rows (c, ...) without a batch axis: the seed's
    ∂x/∂x (all d columns of I, or one block of them with `chunk_size`), and what affine ops with
    constant operands make of it (x @ W: the rows of W)."""

    rows: Array


class Jet(NamedTuple):
    """A value with its Jacobian (leading axis d: ∂value/∂x_k) and its Laplacian Σ_k ∂²value/∂x_k²."""

    value: Array
    # Inside the interpreter, None marks a value that depends on x but carries no derivative
    # (an index, a mask, a stop_gradient), and a `_Seed` a Jacobian shared by the batch (x's own).
    jacobian: Array | _Seed | None
    laplacian: Array | None  # None when only first order is propagated


# Affine in all their float operands jointly (integer operands, e.g. indices, are constants).
_AFFINE = frozenset({
    "add", "add_any", "sub", "neg", "reduce_sum", "reshape", "broadcast_in_dim", "transpose",
    "squeeze", "expand_dims", "concatenate", "slice", "dynamic_slice", "dynamic_update_slice",
    "gather", "scatter-add", "scatter_add", "pad", "convert_element_type", "copy", "copy_p", "rev",
    "cumsum", "select_n", "reduce_precision", "real", "imag", "conj", "split",
})
# Bilinear: affine when only one operand depends on x.
_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})
# Elementwise in every operand (operands of the output's shape or scalars).
_ELEMENTWISE = frozenset({
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos",
    "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "integer_pow", "square",
    "abs", "erf", "erfc", "erf_inv", "lgamma", "digamma", "pow", "max", "min", "div", "atan2", "rem",
    "add", "add_any", "sub", "neg", "mul", "select_n", "convert_element_type", "copy", "clamp",
    "sign", "floor", "ceil", "round", "is_finite", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not",
})
# Piecewise constant or cut off from differentiation: their outputs carry no derivative.
_CONSTANT = frozenset({"stop_gradient", "sign", "floor", "ceil", "round", "is_finite"})
# Calls whose inner jaxpr is interpreted in place: primitive name -> parameter holding it.
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat2": "jaxpr", "checkpoint": "jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}


def forward_jet(
    fn: Callable[[Array], Array], second_order: bool = True, *, chunk_size: int | None = None
) -> Callable[[Array], Jet]:
    """x -> Jet(fn(x), ∂fn/∂x, Δfn(x)) for ONE example x of any shape, in one forward pass.

    The Jacobian has shape x.shape + fn(x).shape (∂fn/∂x_k for every entry k of x): for a scalar
    energy it is ∇f, of x's shape. The Laplacian sums over all d = prod(x.shape) entries. With
    `second_order=False` only (value, Jacobian) are propagated (the Laplacian is None).
    Under `jax.vmap` it runs `forward_jet_batch` on the whole batch (see `folded`).
    `chunk_size` as in `forward_jet_batch`.
    """
    one = folded(lambda f: forward_jet_batch(f, second_order, chunk_size=chunk_size), fn)

    def jet(x: Array) -> Jet:
        _validate.example("x", x)
        return one(x)

    return jet


def forward_jet_batch(
    fn: Callable[[Array], Array], second_order: bool = True, *, chunk_size: int | None = None,
    _reduce: bool = True,
) -> Callable[[Array], Jet]:
    """xs (n, *shape) -> the jets of fn at every example: value (n, ...), Jacobian (n, *shape, ...), Laplacian (n, ...).

    fn acts on ONE example; the batch is carried explicitly, so that a Jacobian
    pushed through a matrix product with constant weights is ONE product of shape
    (n·d, in) x (in, out), and so is its transpose in the parameter gradient.
    Where x enters fn only through a first dense layer narrower than x, the jet is pushed
    along h directions and back-projected: ∇_x = Q ∇_u (W = QR), or with `second_order=False`
    ∂/∂x = W ∂/∂z (the first-layer seed, see the module docstring); `_reduce=False` keeps the
    d rows of I (tests, benchmarks).

    Args:
      fn: a function of ONE example, of shape (d,) or any other (`shape`), returning one array.
      second_order: propagate the Laplacian too (else it is None).
      chunk_size: push the d Jacobian columns through in blocks of this many (a `lax.map`
        over blocks, each rematerialised in the backward pass), so that the intermediate
        Jacobians hold n·chunk_size rows instead of n·d: memory bounded at large d, for the
        cost of one extra forward pass of fn per block (and the recomputed forward in a
        parameter gradient). None: all d at once.
    """
    _chunk_size(chunk_size)

    def block(out: Jet, rows: Array, _):  # the Jacobian's rows in order (`_by_blocks` maps them to x)
        return out.value, out.laplacian, out.jacobian

    def jets(xs: Array) -> Jet:
        shape = _validate.example_shape("xs", xs)
        value, laplacian, jacobian = _by_blocks(flattened(fn, shape), _rows(xs), second_order, chunk_size, block,
                                                reduce=_reduce)
        return Jet(value, jacobian.reshape(xs.shape + jacobian.shape[2:]) if len(shape) != 1 else jacobian, laplacian)

    return jets


def _back_project(directions: Array, jacobian: Array) -> Array:
    """∂v/∂x = Σ_j q_j ∂v/∂u_j: the rows (n, c, ...) along the directions q_j (rows of `directions`
    (c, d)) mapped to the d coordinates of x, (n, d, ...). Exact when v depends on x only through
    Qᵀx: its derivative along anything orthogonal to the q_j is zero."""
    return jnp.einsum("cd,nc...->nd...", directions.astype(jacobian.dtype), jacobian)


def laplacian_batch(fn: Callable[[Array], Array], *, chunk_size: int | None = None,
                    _reduce: bool = True) -> Callable[[Array], Array]:
    """xs (n, *shape) -> Δfn(x_i) (n, ...): `forward_jet_batch(fn)(xs).laplacian`, the Jacobian not kept.

    Where x enters fn only through a first dense layer z = y W narrower than x (the module
    docstring's first-layer seed), the jet starts at z with the h rows of R, W = Q R, instead of
    the d rows of I (Δf = tr(H_u) for u = Qᵀx): h/d of the Jacobian work, and `chunk_size` blocks
    R's h rows. Exact, with its derivative in W, at any rank of W (the seed rows are S = QᵀW, the
    QR a value only). `_reduce=False` keeps the d rows of I (for tests and benchmarks).
    """
    _chunk_size(chunk_size)

    def lap(xs: Array) -> Array:
        flat = flattened(fn, _validate.example_shape("xs", xs))
        return _by_blocks(flat, _rows(xs), True, chunk_size, lambda out, rows, _: (out.value, out.laplacian, None),
                          reduce=_reduce)[1]

    return lap


# `second_order=DIAGONAL`: each direction k keeps its own ∂²v/∂x_k² instead of their sum.
DIAGONAL = "diagonal"


class DiagonalJet(NamedTuple):
    """A value with its Jacobian and its Hessian's diagonal, both with x's shape on their leading axes."""

    value: Array  # (n, ...)
    jacobian: Array  # (n, *shape, ...): ∂value/∂x_k
    diagonal: Array  # (n, *shape, ...): ∂²value/∂x_k²


def hessian_diagonal_batch(fn: Callable[[Array], Array], *, chunk_size: int | None = None
                           ) -> Callable[[Array], DiagonalJet]:
    """xs (n, *shape) -> DiagonalJet(fn(x_i), ∂fn/∂x_k, ∂²fn/∂x_k²) at every example, in one forward pass.

    The jet of the Laplacian with the sum over k left out: every intermediate v carries, beside
    its Jacobian J_k = ∂v/∂x_k, its d second derivatives D_k = ∂²v/∂x_k², pushed by

        y = φ(v):  D_y,k = φ'(v) D_v,k + φ''(v) J_v,k²,    y = a·b:  D_y,k = a D_b,k + b D_a,k + 2 J_a,k J_b,k,

    affine ops acting on D as on J (so D costs what J costs, past the first nonlinearity: about
    twice the Laplacian's work on an MLP), and Δfn = Σ_k D_k. No first-layer seed: it mixes the
    coordinates, whose own second derivatives are wanted. `chunk_size` as in `forward_jet_batch`.
    """
    _chunk_size(chunk_size)

    def jets(xs: Array) -> DiagonalJet:
        def block(out: Jet, rows: Array, _):
            return out.value, None, jnp.stack([out.jacobian, out.laplacian], axis=2)  # (n, c, 2, ...)

        shape = _validate.example_shape("xs", xs)
        value, _, both = _by_blocks(flattened(fn, shape), _rows(xs), DIAGONAL, chunk_size, block)
        jacobian, diagonal = both[:, :, 0], both[:, :, 1]
        if len(shape) != 1:
            jacobian, diagonal = (a.reshape(xs.shape + a.shape[2:]) for a in (jacobian, diagonal))
        return DiagonalJet(value, jacobian, diagonal)

    return jets


def jacobian_diagonal_batch(fn: Callable[[Array], Array], *, chunk_size: int | None = None
                            ) -> Callable[[Array], tuple[Array, Array]]:
    """xs (n, *shape) -> (v(x_i) (n, *shape), ∂v_k/∂x_k (n, *shape)) for v = fn: shape -> shape, by a first-order jet.

    The diagonal of the (d, d) Jacobian, entry k over all d = prod(shape) entries; its sum is
    `divergence_batch`'s trace. With `chunk_size`, each block of c columns keeps its c diagonal
    entries, so the Jacobian is never held whole.
    """
    _chunk_size(chunk_size)

    def both(xs: Array) -> tuple[Array, Array]:
        def block(out: Jet, rows: Array, _):
            return out.value, None, jnp.einsum("ncd,cd->nc", out.jacobian, rows)

        flat = flattened(fn, _validate.example_shape("xs", xs), vector="fn")
        value, _, diagonal = _by_blocks(flat, _rows(xs), False, chunk_size, block)
        return value.reshape(xs.shape), diagonal.reshape(xs.shape)

    return both


def divergence_batch(fn: Callable[[Array], Array], *, chunk_size: int | None = None,
                     _reduce: bool = True) -> Callable[[Array], tuple[Array, Array]]:
    """xs (n, *shape) -> (v(x_i) (n, *shape), tr ∂v/∂x (x_i) (n,)) for v = fn: shape -> shape, by a first-order jet.

    tr ∂v/∂x = Σ_k ∂v_k/∂x_k over all d = prod(shape) entries. Each block of c Jacobian rows
    contributes Σ_j w_j · ∂v/∂(row j): the rows e_k of I at x, or, where x enters v only through a
    first dense layer z = x W narrower than x, the rows of I_h at z with w_j the columns of W (the
    first-layer seed: h rows, no QR, any rank). With `chunk_size` the (n, d, d) Jacobian is never
    held whole: memory n·c·width per layer. Where v ends in affine ops (v = a W_L + b), the
    contraction with q_j is moved before them (Σ_j (W_L q_j) · ∂a/∂q_j): the output's Jacobian
    is never built. `_reduce=False` keeps the d rows of I (tests, benchmarks).
    """
    _chunk_size(chunk_size)

    def both(xs: Array) -> tuple[Array, Array]:
        flat = flattened(fn, _validate.example_shape("xs", xs), vector="fn")
        value, div, _ = _by_blocks(flat, _rows(xs), False, chunk_size, _TRACE, reduce=_reduce)
        return value.reshape(xs.shape), div

    return both


# `block=_TRACE`: keep v and Σ_j w_j · ∂v/∂(row j) (a trace), contracted before v's trailing affine ops.
_TRACE = "trace"


def _chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")


def flattened(fn: Callable[[Array], Array], shape: tuple[int, ...], *, vector: str | None = None
              ) -> Callable[[Array], Array]:
    """fn of ONE example of `shape`, seen as a function of its d = prod(shape) entries in row-major
    order: z (d,) -> fn(z.reshape(shape)). Its Laplacian, and (with `vector`) its divergence, at
    x.reshape(-1) are fn's at x: Σ_k over all entries either way.

    `vector`: fn is a vector field, shape -> shape (a ValueError naming `vector`, the shape it got and
    the shape it wants otherwise, raised at trace time), and its output is flattened to (d,) too.
    When shape is (d,) already nothing is reshaped: the function traces to the same jaxpr as fn.
    """
    if vector is not None:
        fn = _validate.same_shape(vector, fn)
    if len(shape) == 1:
        return fn

    def on_vector(z: Array) -> Array:
        out = fn(z.reshape(shape))
        return out.reshape(-1) if vector is not None else out

    return on_vector


def _rows(xs: Array) -> Array:
    """A batch (n, *shape) as (n, d) rows, d = prod(shape); an (n, d) batch as it is."""
    return xs if xs.ndim == 2 else xs.reshape(xs.shape[0], -1)


def _by_blocks(fn, xs: Array, second_order: bool, chunk_size: int | None, block, *, reduce: bool = False):
    """Push the jet of fn at xs (n, d) along the d columns of I, all at once or `chunk_size` at a time.

    block(out, rows, directions) -> (value, summed, stacked): what one pass along the rows (c, d)
    of I keeps, with `summed` (n, ...) added over blocks (Laplacians, traces) and `stacked`
    (n, c, ...) joined along its axis 1 (Jacobians); either may be None. `directions` is None on
    this path (the Jacobian's rows are ∂/∂x_k along `rows`). `block=_TRACE` keeps
    (v, Σ_j w_j · ∂_j v, None).

    `reduce`: where x enters fn only through z = x W with fewer columns h than d
    (`_input_product`), the jet starts at z along h rows instead. First order: the rows of I_h
    (∂/∂z_j), block's `directions` the columns w_j of W (∂v/∂x = Σ_j w_j ∂v/∂z_j). Second order:
    the rows of S = QᵀW (= R, W = QR), block's `directions` the columns q_j of Q, and a `stacked`
    Jacobian (along S's rows, ∂/∂u_j for u = Qᵀx) is returned in x's coordinates (`_to_x`).
    """
    n, d = xs.shape
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((d,), xs.dtype))
    if len(closed.jaxpr.outvars) != 1:
        raise ValueError(f"fn must return one array, got {len(closed.jaxpr.outvars)} outputs")
    product = _input_product(closed.jaxpr, d) if reduce else None
    if product is None:
        return _push_rows(closed, xs, second_order, chunk_size, block, None, jnp.eye(d, dtype=xs.dtype), None)
    w = _product_matrix(closed, *product, d)
    eye_h = jnp.eye(w.shape[1], dtype=w.dtype)
    if not second_order:  # the chain rule alone, ∂/∂x = W ∂/∂z: the jet starts at z along I_h, no QR
        return _push_rows(closed, xs, second_order, chunk_size, block, product, eye_h, w.T)
    # The QR is a value only, never differentiated (its derivative solves with R: not finite at a
    # rank-deficient W). S = QᵀW equals R, and as Q Qᵀ W = W at any rank, d(SᵀS) = d(WᵀW): the
    # Laplacian tr(H_z SᵀS) and its derivative in W are exact whatever W's rank.
    q, r = _householder_qr(jax.lax.stop_gradient(w))
    value, summed, jacobian = _push_rows(closed, xs, second_order, chunk_size, block, product, q.T @ w, q.T)
    if jacobian is None:
        return value, summed, None

    def z_gradient():  # ∂v/∂z (n, h, ...) as a value: from R ∂v/∂z = ∂v/∂u, or at a (nearly)
        # rank-deficient W by a first-order jet from z along I_h. Its operands are constants, so the
        # cond is never differentiated and keeps no residuals of its branches.
        consts, points, along_u = jax.lax.stop_gradient((closed.consts, xs, jacobian))
        by_jet = lambda: _push_rows(jcore.ClosedJaxpr(closed.jaxpr, consts), points, False, chunk_size,
                                    lambda out, rows, _: (out.value, None, out.jacobian), product, eye_h, None)[2]
        return jax.lax.cond(_independent(r), lambda: _solve_rows(r, along_u), by_jet)

    return value, summed, _to_x(jacobian, w, q, z_gradient())


# The seed's QR and solve are written in XLA's own ops, never LAPACK's: on CPU those are custom calls
# into a BLAS whose worker threads keep spinning after the call and fight XLA's for the cores (the
# ISM step at d = 512 ran 5x slower, 2 cores). h steps of O(d h) each: cheap beside the jet.


def _householder_qr(w: Array) -> tuple[Array, Array]:
    """(Q (d, h), R (h, h)) with W = QR, Q's columns orthonormal, R upper triangular, for W (d, h),
    d >= h, by h Householder reflections; a zero column of W gives a zero diagonal entry of R."""
    d, h = w.shape
    rows = jnp.arange(d)

    def reflect(j, carry):  # the reflector I - 2 v vᵀ that zeroes column j of a below its diagonal
        a, vs = carry
        x = jnp.where(rows >= j, a[:, j], 0)
        alpha = -jnp.where(x[j] < 0, -1, 1) * jnp.sqrt(x @ x)
        v = x.at[j].add(-alpha)
        norm = jnp.sqrt(v @ v)
        v = jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1), 0)
        return a - 2 * jnp.outer(v, v @ a), vs.at[j].set(v)

    a, vs = jax.lax.fori_loop(0, h, reflect, (w, jnp.zeros((h, d), w.dtype)))

    def apply(i, q):  # Q = H_0 ... H_{h-1} [I_h; 0], the reflectors applied last to first
        v = vs[h - 1 - i]
        return q - 2 * jnp.outer(v, v @ q)

    return jax.lax.fori_loop(0, h, apply, jnp.eye(d, h, dtype=w.dtype)), jnp.triu(a[:h])


def _solve_rows(r: Array, jacobian: Array) -> Array:
    """g (n, h, ...) with R g = J along axis 1, R (h, h) upper triangular, by back substitution."""
    n, h = jacobian.shape[:2]
    b = jnp.moveaxis(jacobian.reshape(n, h, -1), 1, 0).reshape(h, -1)
    r = r.astype(b.dtype)

    def substitute(i, g):  # row k = h - 1 - i, the rows below it known
        k = h - 1 - i
        return g.at[k].set((b[k] - r[k] @ g) / r[k, k])

    g = jax.lax.fori_loop(0, h, substitute, jnp.zeros_like(b))
    return jnp.moveaxis(g.reshape(h, n, -1), 0, 1).reshape(jacobian.shape)


def _to_x(jacobian: Array, w: Array, q: Array, z_gradient: Array) -> Array:
    """∂v/∂x (n, d, ...) from J = ∂v/∂u (n, h, ...), the jet along the rows of S = QᵀW: Q J in value.

    Its derivative in W must be dW ∂v/∂z + W d(∂v/∂z). Q J = Q S ∂v/∂z carries Q Qᵀ dW ∂v/∂z +
    W d(∂v/∂z) (Q a constant); the rest, (I - Q Qᵀ) dW ∂v/∂z, W's columns turning out of their
    span, comes with a term whose value is zero, ∂v/∂z (`z_gradient`) a constant."""
    dw = w - jax.lax.stop_gradient(w)  # zero, with W's derivative
    turn = dw - q @ (q.T @ dw)
    return _back_project(q.T, jacobian) + _back_project(turn.T, z_gradient.astype(jacobian.dtype))


# ∂v/∂z comes from ∂v/∂u by a solve with R when R's smallest diagonal entry exceeds this fraction of
# its largest; otherwise from a first-order jet at z (`forward_jet_batch`'s derivative in W only).
RANK_TOLERANCE = 1e-3


def _independent(r: Array) -> Array:
    """Whether R's (h, h) diagonal entries all exceed RANK_TOLERANCE times the largest; no derivative."""
    diag = jnp.abs(jnp.diagonal(jax.lax.stop_gradient(r)))
    return jnp.min(diag) > RANK_TOLERANCE * jnp.max(diag)


def _full_rank(w: Array) -> Array:
    """Whether W (d, h) has h independent columns to RANK_TOLERANCE (its R's diagonal); no derivative."""
    return _independent(_householder_qr(jax.lax.stop_gradient(w))[1])


def _push_rows(closed, xs: Array, second_order: bool, chunk_size: int | None, block, product, basis: Array,
               directions: Array | None):
    """The jet of the closed jaxpr at xs (n, d) along the rows of `basis` (m, d) — or, with `product`,
    seeded at z = x W along the rows of `basis` (m, h), the directions in x of its rows being those
    of `directions` (m, d) — all at once or `chunk_size` rows at a time."""
    n = xs.shape[0]

    def columns(rows: Array, dirs: Array | None):
        if product is None:
            curvature = _Seed(jnp.zeros_like(rows)) if second_order == DIAGONAL else jnp.zeros_like(xs)
            seed = Jet(xs, _Seed(rows), curvature if second_order else None)
            seed_at = None
        else:  # x's own Jacobian is never used: the jet is seeded at z = x W with `rows`
            seed, seed_at = Jet(xs, None, None), (*product[:2], rows)
        if block is _TRACE:
            return (*_traced(closed, seed, seed_at, rows if dirs is None else dirs, n), None)
        (out,) = _interpret(closed.jaxpr, closed.consts, [seed], second_order, seed_at)
        return block(_output(out, n, rows.shape[0], second_order), rows, dirs)

    m = basis.shape[0]
    c = m if chunk_size is None else min(chunk_size, m)
    if c == m:
        return columns(basis, directions)
    blocks = -(-m // c)  # the last block padded with zero rows: zero columns, nothing summed
    pad = lambda a: None if a is None else jnp.pad(a, ((0, blocks * c - m), (0, 0))).reshape(blocks, c, -1)
    value, summed, stacked = jax.lax.map(lambda b: jax.checkpoint(columns)(*b), (pad(basis), pad(directions)))
    if stacked is not None:
        stacked = jnp.moveaxis(stacked, 0, 1)  # (n, blocks, c, ...)
        stacked = stacked.reshape((n, blocks * c) + stacked.shape[3:])[:, :m]
    return value[0], None if summed is None else jnp.sum(summed, axis=0), stacked


def _traced(closed, seed: Jet, seed_at, directions: Array, n: int) -> tuple[Array, Array]:
    """(v (n, d), Σ_j w_j · ∂_j v (n,)) by a first-order jet, ∂_j the seed's Jacobian row j and w_j
    its direction in x, the rows of `directions` (c, d).

    When v ends in a chain of ops affine in one x-dependent operand y (v = L(y) + b: the last
    layer, its bias, reshapes), Σ_j w_j · L(∂_j y) = Σ_j Lᵀ(w_j) · ∂_j y: Lᵀ(w_j) is formed once
    for the batch (c transposed passes of L), and the (n, c, d) Jacobian of v never is."""
    jaxpr = closed.jaxpr
    tail = _linear_tail(jaxpr, None if seed_at is None else seed_at[0])
    read = _evaluate(jaxpr, closed.consts, [seed], False, seed_at, skip={i for i, _ in tail})
    if tail:
        y = read(jaxpr.eqns[tail[0][0]].invars[tail[0][1]])
        operands = [(i, [None if j == k else read(v) for j, v in enumerate(jaxpr.eqns[i].invars)]) for i, k in tail]
        if isinstance(y, Jet) and not any(isinstance(a, Jet) for _, ops in operands for a in ops):
            return _traced_tail(jaxpr, tail, operands, y, directions, n)
        for (i, _), (_, ops) in zip(tail, operands):  # an operand depends on x after all: push it through
            (out,) = _push_batch(jaxpr.eqns[i], [read(v) for v in jaxpr.eqns[i].invars], False)
            read.env[jaxpr.eqns[i].outvars[0]] = out
    out = _output(read(jaxpr.outvars[0]), n, directions.shape[0], False)
    return out.value, jnp.einsum("ncd,cd->n", out.jacobian, directions.astype(out.jacobian.dtype))


def _traced_tail(jaxpr, tail, operands, y: Jet, directions: Array, n: int) -> tuple[Array, Array]:
    """`_traced` through the affine chain `tail` from y to v: v by the chain, the trace by Lᵀ(q_j)."""
    def chain(a: Array) -> Array:  # ONE example's y -> v; the chain's other operands are constants
        for (i, k), (_, ops) in zip(tail, operands):
            (a,) = _bind(jaxpr.eqns[i], _substitute(ops, [k], [a]))
        return a

    value = jax.vmap(chain)(y.value)
    zero = jnp.zeros(y.value.shape[1:], y.value.dtype)
    linear = lambda t: jax.jvp(chain, (zero,), (t,))[1]  # L, the chain's linear part
    pulled = jax.vmap(lambda q: jax.linear_transpose(linear, zero)(q)[0])(directions.astype(value.dtype))  # (c, *y)
    if y.jacobian is None:
        return value, jnp.zeros((n,), value.dtype)
    if isinstance(y.jacobian, _Seed):  # shared by the batch: one contraction
        return value, jnp.broadcast_to(jnp.sum(y.jacobian.rows * pulled), (n,))
    return value, y.jacobian.reshape(n, -1) @ pulled.reshape(-1)


def _linear_tail(jaxpr, stop: int | None) -> list[tuple[int, int]]:
    """[(i, k), ...], in order: the equations that end the jaxpr in a chain y -> ... -> output, each
    affine in its operand k (the one that depends on x, a float used by it alone), with one output;
    [] if the output is not made so. Equation `stop` (the seeded product) never belongs to it."""
    dependent, uses, producer = set(jaxpr.invars), {}, {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                uses[v] = uses.get(v, 0) + 1
        if any(not isinstance(v, jcore.Literal) and v in dependent for v in eqn.invars):
            dependent.update(eqn.outvars)
        producer.update((o, i) for o in eqn.outvars)
    var, tail = jaxpr.outvars[0], []
    if isinstance(var, jcore.Var) and uses.get(var, 0):  # v also feeds other equations: they need it whole
        return []
    while isinstance(var, jcore.Var) and var in producer and producer[var] != stop:
        i = producer[var]
        eqn = jaxpr.eqns[i]
        ks = [k for k, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal) and v in dependent]
        if len(eqn.outvars) != 1 or len(ks) != 1 or not _affine_in(eqn, ks) or not _differentiable(eqn):
            break
        operand = eqn.invars[ks[0]]
        if uses.get(operand, 0) != 1 or operand in jaxpr.outvars or not jnp.issubdtype(operand.aval.dtype, jnp.inexact):
            break
        tail.insert(0, (i, ks[0]))
        var = operand
    return tail


def _input_product(jaxpr, d: int) -> tuple[int, int, tuple | None] | None:
    """(i, k, part) when x, the jaxpr's one input (d,), enters it only through eqns[i], a dot_general
    that contracts all the entries of its operand k, y, with an operand that does not depend on x,
    into h < d outputs; else None. y is x reshaped at most, part None; or x (reshaped at most)
    concatenated with operands that do not depend on x (an MLP on [x, t]), part = (axis, start,
    stop), x's slice of y. A Python walk over the jaxpr: it binds nothing.

    Each of x's uses must be its only one: x, then any reshapes of it, [a concatenate,] then the
    product. So every other equation before eqns[i] is independent of x, and so are the product's
    other operand and the concatenate's."""
    var, eqns, part = jaxpr.invars[0], jaxpr.eqns, None
    while not any(v is var for v in jaxpr.outvars):
        uses = [(i, k) for i, eqn in enumerate(eqns) for k, v in enumerate(eqn.invars) if v is var]
        if len(uses) != 1:
            return None
        i, k = uses[0]
        eqn = eqns[i]
        if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is None and part is None:
            var = eqn.outvars[0]
            continue
        if eqn.primitive.name == "concatenate" and part is None:
            axis = eqn.params["dimension"]
            start = sum(v.aval.shape[axis] for v in eqn.invars[:k])
            var, part = eqn.outvars[0], (axis, start, start + var.aval.shape[axis])
            continue
        if eqn.primitive.name != "dot_general":
            return None
        (contract, other_contract), (batch, _) = eqn.params["dimension_numbers"]
        if k == 1:
            contract = other_contract
        h = math.prod(eqn.outvars[0].aval.shape)
        full = sorted(contract) == list(range(len(var.aval.shape))) and not batch
        return (i, k, part) if full and h < d and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.inexact) else None
    return None


def _product_matrix(closed, i: int, k: int, part: tuple | None, d: int) -> Array:
    """W (d, h) of the product z = y W at eqns[i] (`_input_product`) as a map of x: its rows indexed by
    x's d entries in row-major order (x's `part` of y's rows), its columns by z's entries in row-major
    order. The equations before eqns[i] that do not depend on x are evaluated (under jit they are the
    same values the interpreter computes)."""
    jaxpr, eqn = closed.jaxpr, closed.jaxpr.eqns[i]
    env = dict(zip(jaxpr.constvars, closed.consts))
    known = lambda v: isinstance(v, jcore.Literal) or v in env
    for e in jaxpr.eqns[:i]:
        if all(known(v) for v in e.invars):
            env.update(zip(e.outvars, _bind(e, [v.val if isinstance(v, jcore.Literal) else env[v] for v in e.invars])))
    w_var = eqn.invars[1 - k]
    w = w_var.val if isinstance(w_var, jcore.Literal) else env[w_var]
    (lhs, rhs), _ = eqn.params["dimension_numbers"]
    y_axes, w_axes = (lhs, rhs) if k == 0 else (rhs, lhs)
    paired = dict(zip(y_axes, w_axes))
    # dot_general's output: the free axes of the lhs, then of the rhs; y has none, so W's in order.
    order = [paired[a] for a in range(len(y_axes))] + [a for a in range(jnp.ndim(w)) if a not in w_axes]
    w = jnp.transpose(w, order)  # y's axes, then z's
    if part is not None:  # the rows that multiply x's entries of y = [..., x, ...]
        w = jax.lax.slice_in_dim(w, part[1], part[2], axis=part[0])
    return w.reshape(d, -1)


def folded(make: Callable[[Callable], Callable], fn: Callable[[Array], Array]) -> Callable[[Array], object]:
    """x -> make(fn)(x[None]) at its one row, for a `make(fn)` that maps a batch xs (n, *shape) of fn's
    inputs to a pytree of (n, ...) results and commutes with vmap. Under `jax.vmap` the whole batch
    goes through make(fn) at once, the batch folded into its matrix products
    (`jax.custom_batching.custom_vmap`), also inside a `jax.grad` that is OUTSIDE the vmap.

    Parameters fn closes over that are batched too (`jax.vmap` over an ensemble's parameters) take
    the per-example route: correct, not folded. custom_vmap has no reverse mode, so where the
    innermost transformation is reverse-mode AD (`jax.grad` of ONE example's value, or
    `jax.vmap(jax.grad(...))`) the per-example route is taken too, as it is for a `jax.jit`-ed
    function of one example that is later differentiated by reverse mode inside a vmap. Telling
    reverse mode apart needs a private JAX name (`jsm._jax_internals.in_reverse_mode`); where it
    is unavailable the per-example route is taken everywhere: the same values, never folded.
    """

    def plain(x: Array, f: Callable) -> object:
        return jax.tree.map(lambda a: a[0], make(f)(x[None]))

    def one(x: Array) -> object:
        if _jax_internals.in_reverse_mode():  # custom_vmap has no reverse mode
            return plain(x, fn)
        fn_c, consts = jax.closure_convert(fn, x)  # parameters as explicit inputs, to see if they are batched

        @jax.custom_batching.custom_vmap
        def per_example(x, consts):
            return plain(x, lambda z: fn_c(z, *consts))

        @per_example.def_vmap
        def batched(axis_size, in_batched, xs, consts):
            x_batched, consts_batched = in_batched
            if x_batched and not any(consts_batched):
                out = make(lambda z: fn_c(z, *consts))(xs)
            else:
                axes = (0 if x_batched else None, [0 if b else None for b in consts_batched])
                out = jax.vmap(lambda x, c: plain(x, lambda z: fn_c(z, *c)), in_axes=axes)(xs, consts)
            return out, jax.tree.map(lambda _: True, out)

        return per_example(x, list(consts))

    return one


def _output(out, n: int, c: int, second_order) -> Jet:
    if isinstance(out, Jet) and out.jacobian is not None:
        return Jet(out.value, _materialize(out, n, c), _shared(out.laplacian, n))
    # No derivative: fn depends on x only through stop_gradient or integers (a batched value),
    # or not at all (a constant, broadcast over the batch).
    value = out.value if isinstance(out, Jet) else jnp.broadcast_to(out, (n,) + jnp.shape(out))
    zeros = jnp.zeros((n, c) + value.shape[1:], value.dtype)
    return Jet(value, zeros, (zeros if second_order == DIAGONAL else zeros[:, 0]) if second_order else None)


def _materialize(jet: Jet, n: int, c: int) -> Array:
    return _shared(jet.jacobian, n)


def _shared(a, n: int):
    """A `_Seed` (rows shared by the batch) broadcast to the batch's n examples; anything else as it is."""
    return jnp.broadcast_to(a.rows, (n,) + a.rows.shape) if isinstance(a, _Seed) else a


def _interpret(jaxpr, consts, args, second_order: bool, seed_at: tuple | None = None) -> list:
    """Evaluate a jaxpr of ONE example on batched jets. A value that depends on x is a Jet with a
    leading batch axis (jacobian None if it carries no derivative: indices, masks, stop_gradient);
    constants (parameters, literals) are plain, unbatched arrays.

    seed_at (i, k, rows): eqns[i] is the product z = x W of `_input_product`, its operand k
    x-dependent: z's jet is seeded there with the Jacobian `rows` (c, h), shared by the batch,
    and Laplacian 0 (z is linear in x)."""
    read = _evaluate(jaxpr, consts, args, second_order, seed_at)
    return [read(v) for v in jaxpr.outvars]


class _Reader:
    """The values of a jaxpr's variables after `_evaluate`: read(v), literals included."""

    def __init__(self, env: dict):
        self.env = env

    def __call__(self, v):
        return v.val if isinstance(v, jcore.Literal) else self.env[v]


def _evaluate(jaxpr, consts, args, second_order: bool, seed_at: tuple | None = None, skip=frozenset()) -> _Reader:
    """`_interpret`'s loop, the equations in `skip` left out (`_traced` finishes them its own way)."""
    read = _Reader({})

    def write(v, value):
        if not isinstance(v, jcore.DropVar):
            read.env[v] = value

    for v, value in zip(jaxpr.constvars, consts):
        write(v, value)
    for v, value in zip(jaxpr.invars, args):
        write(v, value)
    for i, eqn in enumerate(jaxpr.eqns):
        if i in skip:
            continue
        if seed_at is not None and i == seed_at[0]:
            outs = _seeded_product(eqn, [read(v) for v in eqn.invars], *seed_at[1:], second_order)
        else:
            outs = _push_batch(eqn, [read(v) for v in eqn.invars], second_order)
        for v, value in zip(eqn.outvars, outs):
            write(v, value)
    return read


def _seeded_product(eqn, inputs: list, k: int, rows: Array, second_order: bool) -> list[Jet]:
    """z = x W for the batch, with the seed Jacobian `rows` (c, h) as (c, *z.shape) and Laplacian 0."""
    z = jax.vmap(lambda v: _bind(eqn, _substitute(inputs, [k], [v]))[0])(inputs[k].value)
    seed = _Seed(rows.reshape(rows.shape[:1] + z.shape[1:]).astype(z.dtype))
    return [Jet(z, seed, jnp.zeros_like(z) if second_order else None)]


def _push_batch(eqn, inputs: list, second_order: bool) -> list:
    batched = [i for i, a in enumerate(inputs) if isinstance(a, Jet)]
    if not batched:
        return list(_bind(eqn, inputs))
    name = eqn.primitive.name
    if name in _CALLS:
        inner = eqn.params[_CALLS[name]]
        closed = isinstance(inner, jcore.ClosedJaxpr)
        return _interpret(inner.jaxpr if closed else inner, inner.consts if closed else [], inputs, second_order)
    n = inputs[batched[0]].value.shape[0]
    varying = [i for i in batched if inputs[i].jacobian is not None]
    if varying and len(varying) == len(batched) and _affine_in(eqn, varying) and _differentiable(eqn):
        return _affine_folded(eqn, inputs, varying, n, second_order)
    d = next((_width(inputs[i]) for i in varying), None)
    per_example = [
        (Jet(a.value, _materialize(a, n, d), _shared(a.laplacian, n)) if a.jacobian is not None else a.value)
        if isinstance(a, Jet) else a for a in inputs]
    one = lambda *ms: _push(eqn, _substitute(per_example, batched, ms), second_order)
    outs = jax.vmap(one)(*(per_example[i] for i in batched))
    return [o if isinstance(o, Jet) else Jet(o, None, None) for o in outs]


def _substitute(values: list, positions: list[int], new) -> list:
    """`values` with the entries at `positions` replaced by `new`, in order."""
    full = list(values)
    for i, v in zip(positions, new):
        full[i] = v
    return full


def _width(jet: Jet) -> int:
    return jet.jacobian.rows.shape[0] if isinstance(jet.jacobian, _Seed) else jet.jacobian.shape[1]


def _affine_in(eqn, varying: list[int]) -> bool:
    name = eqn.primitive.name
    return name in _AFFINE or (name in _BILINEAR and len(varying) == 1) or (name == "div" and varying == [0])


def _differentiable(eqn) -> bool:
    return eqn.primitive.name not in _CONSTANT and any(
        jnp.issubdtype(o.aval.dtype, jnp.inexact) for o in eqn.outvars)


def _affine_folded(eqn, inputs, varying, n, second_order) -> list[Jet]:
    """An op affine in its x-dependent operands, all others constant: its linear part is the same
    for every example, so the batch and the d Jacobian columns fold into one leading axis."""
    jets = [inputs[i] for i in varying]
    op = lambda *vs: _bind(eqn, _substitute(inputs, varying, vs))  # the others are constants
    zeros = tuple(jnp.zeros(j.value.shape[1:], j.value.dtype) for j in jets)
    linear = lambda *ts: jax.jvp(op, zeros, ts)[1]
    values = jax.vmap(op)(*(j.value for j in jets))
    jacobians = _along_directions(linear, [j.jacobian for j in jets], n, _width(jets[0]), jets)
    if second_order == DIAGONAL:  # one curvature per direction: pushed as the Jacobian is
        laplacians = _along_directions(linear, [j.laplacian for j in jets], n, _width(jets[0]), jets)
    elif second_order:
        laplacians = jax.vmap(linear)(*(j.laplacian for j in jets))
    else:
        laplacians = (None,) * len(values)
    return [Jet(v, jac, lap) if _is_float(v) else Jet(v, None, None)
            for v, jac, lap in zip(values, jacobians, laplacians)]


def _along_directions(linear, stacks: list, n: int, d: int, jets) -> list:
    """`linear` applied along every direction of the stacks (Jacobians, or per-direction curvatures):
    once for a stack shared by the batch (a `_Seed`: for x @ W + b it is W, still shared; the
    first non-affine op broadcasts it), else to the batch and its d directions folded into one axis."""
    if len(stacks) == 1 and isinstance(stacks[0], _Seed):
        return [_Seed(c) for c in jax.vmap(linear)(stacks[0].rows)]
    flat = [_shared(a, n).reshape((n * d,) + j.value.shape[1:]) for a, j in zip(stacks, jets)]
    return [c.reshape((n, d) + c.shape[1:]) for c in jax.vmap(linear)(*flat)]


def _bind(eqn, values) -> tuple:
    bound = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) in older JAX
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    out = eqn.primitive.bind(*subfuns, *values, **params)
    return tuple(out) if eqn.primitive.multiple_results else (out,)


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _push(eqn, inputs: list, second_order: bool) -> list:
    """ONE example: the jets of an equation's outputs from the jets (or plain values) of its inputs."""
    name = eqn.primitive.name
    varying = [i for i, a in enumerate(inputs) if isinstance(a, Jet)]
    values = [a.value if isinstance(a, Jet) else a for a in inputs]
    if not varying or not _differentiable(eqn):  # comparisons, indices, stop_gradient: no derivative
        return list(_bind(eqn, values))
    op = lambda *vs: _bind(eqn, _substitute(values, varying, vs))  # of its x-dependent operands
    jets = [inputs[i] for i in varying]
    primals = tuple(j.value for j in jets)
    if _affine_in(eqn, varying):
        outs = _affine(op, primals, jets, second_order)
    elif len(varying) == 1 and _elementwise(eqn, varying[0]):
        outs = _elementwise_rule(op, primals[0], jets[0], second_order)
    elif name == "mul" and jets[0].value.shape == jets[1].value.shape:
        outs = _product_rule(jets[0], jets[1], second_order)
    else:
        outs = _generic(op, primals, jets, second_order)
    return outs


def _affine(op, primals, jets, second_order) -> list[Jet]:
    values = op(*primals)
    tangent = lambda *ts: jax.jvp(op, primals, ts)[1]
    jacobians = jax.vmap(tangent)(*(j.jacobian for j in jets))
    if second_order == DIAGONAL:
        laplacians = jax.vmap(tangent)(*(j.laplacian for j in jets))
    else:
        laplacians = tangent(*(j.laplacian for j in jets)) if second_order else (None,) * len(values)
    return _jets(values, jacobians, laplacians)


def _elementwise_rule(op, v, jet, second_order) -> list[Jet]:
    phi = lambda u: op(u)[0]
    ones = jnp.ones_like(v)
    first = lambda u: jax.jvp(phi, (u,), (ones,))
    if not second_order:
        y, d1 = first(v)
        return [Jet(y, d1 * jet.jacobian, None)]
    (y, d1), (_, d2) = jax.jvp(first, (v,), (ones,))
    squares = jet.jacobian**2 if second_order == DIAGONAL else jnp.sum(jet.jacobian**2, axis=0)
    return [Jet(y, d1 * jet.jacobian, d1 * jet.laplacian + d2 * squares)]


def _product_rule(a: Jet, b: Jet, second_order) -> list[Jet]:
    jacobian = a.jacobian * b.value + a.value * b.jacobian
    if not second_order:
        return [Jet(a.value * b.value, jacobian, None)]
    cross = a.jacobian * b.jacobian if second_order == DIAGONAL else jnp.sum(a.jacobian * b.jacobian, axis=0)
    return [Jet(a.value * b.value, jacobian, a.laplacian * b.value + a.value * b.laplacian + 2 * cross)]


def _generic(op, primals, jets, second_order) -> list[Jet]:
    """Exact for any differentiable op: d JVPs for J, d second-order JVPs for L."""
    values = op(*primals)
    tangent = lambda *ts: jax.jvp(op, primals, ts)[1]
    jacobians = jax.vmap(tangent)(*(j.jacobian for j in jets))
    if not second_order:
        return _jets(values, jacobians, (None,) * len(values))
    curvature = lambda *ts: jax.jvp(lambda *p: jax.jvp(op, p, ts)[1], primals, ts)[1]
    along_columns = jax.vmap(curvature)(*(j.jacobian for j in jets))
    if second_order == DIAGONAL:
        through = jax.vmap(tangent)(*(j.laplacian for j in jets))
        laplacians = [lap + c if _is_float(v) else None for v, lap, c in zip(values, through, along_columns)]
        return _jets(values, jacobians, laplacians)
    through = tangent(*(j.laplacian for j in jets))
    laplacians = [lap + jnp.sum(c, axis=0) if _is_float(v) else None
                  for v, lap, c in zip(values, through, along_columns)]
    return _jets(values, jacobians, laplacians)


def _jets(values, jacobians, laplacians) -> list:
    """Jets of the float outputs; integer outputs (loop counters, indices) stay plain values."""
    return [Jet(v, jac, lap) if _is_float(v) else v for v, jac, lap in zip(values, jacobians, laplacians)]


def _elementwise(eqn, index: int) -> bool:
    """Is the equation elementwise in operand `index`, with the output of that operand's shape?"""
    out_shapes = {o.aval.shape for o in eqn.outvars}
    if len(eqn.outvars) != 1 or out_shapes != {eqn.invars[index].aval.shape}:
        return False
    if eqn.primitive.name in _ELEMENTWISE:
        return True
    if eqn.primitive.name == "custom_jvp_call":  # e.g. softplus, relu: elementwise inside
        return _elementwise_jaxpr(eqn.params["call_jaxpr"].jaxpr, index)
    return False


def _elementwise_jaxpr(jaxpr, index: int) -> bool:
    varying = {jaxpr.invars[index]}
    for eqn in jaxpr.eqns:
        touched = [v for v in eqn.invars if not isinstance(v, jcore.Literal) and v in varying]
        if not touched:
            continue
        if eqn.primitive.name not in _ELEMENTWISE:
            return False
        if any(v.aval.shape != o.aval.shape for v in touched for o in eqn.outvars):
            return False
        varying.update(eqn.outvars)
    return True
