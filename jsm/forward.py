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

The Laplacian alone (`laplacian_batch`) needs fewer Jacobian rows when x enters fn only
through z = x W (W: (d, h), not depending on x) and d > h: then f(x) = g(z) and

    Δ_x f = Σ_k e_kᵀ W H_g Wᵀ e_k = tr(H_g WᵀW) = Σ_j r_jᵀ H_g r_j

for the rows r_j of any R with RᵀR = WᵀW, here W = Q R (reduced QR, R: (h, h)). So the jet
starts at z with the seed Jacobian R, h rows instead of d: h/d of the Jacobian work. The
Jacobian is then not ∂/∂x (it is ∂/∂u for z = u R), so only the Laplacian is returned this way.

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
    fn: Callable[[Array], Array], second_order: bool = True, *, chunk_size: int | None = None
) -> Callable[[Array], Jet]:
    """xs (n, *shape) -> the jets of fn at every example: value (n, ...), Jacobian (n, *shape, ...), Laplacian (n, ...).

    fn acts on ONE example; the batch is carried explicitly, so that a Jacobian
    pushed through a matrix product with constant weights is ONE product of shape
    (n·d, in) x (in, out), and so is its transpose in the parameter gradient.

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

    def jets(xs: Array) -> Jet:
        def block(out: Jet, rows: Array):
            return out.value, out.laplacian, out.jacobian

        shape = _validate.example_shape("xs", xs)
        value, laplacian, jacobian = _by_blocks(flattened(fn, shape), _rows(xs), second_order, chunk_size, block)
        return Jet(value, jacobian.reshape(xs.shape + jacobian.shape[2:]) if len(shape) != 1 else jacobian, laplacian)

    return jets


def laplacian_batch(fn: Callable[[Array], Array], *, chunk_size: int | None = None,
                    _reduce: bool = True) -> Callable[[Array], Array]:
    """xs (n, *shape) -> Δfn(x_i) (n, ...): `forward_jet_batch(fn)(xs).laplacian`, the Jacobian not kept.

    When x enters fn only through one product z = x W with W (d, h) not depending on x (an MLP's
    first layer, after reshapes of x at most) and h < d, the jet starts at z with the h rows of
    R, W = Q R, instead of the d rows of I (Δf = tr(H_g WᵀW) = tr(H_g RᵀR)): h/d of the Jacobian
    work, and `chunk_size` blocks R's h rows. The result is differentiable in W through the QR,
    whose derivative solves with R; a W that is rank-deficient or nearly so (R's smallest
    diagonal entry under `RANK_TOLERANCE` times its largest: a zero-initialised first layer, say)
    takes the d rows of I instead, at run time (`lax.cond`; both paths are compiled).
    `_reduce=False` keeps the d rows of I (for tests and benchmarks).
    """
    _chunk_size(chunk_size)

    def lap(xs: Array) -> Array:
        flat = flattened(fn, _validate.example_shape("xs", xs))
        return _by_blocks(flat, _rows(xs), True, chunk_size, lambda out, rows: (out.value, out.laplacian, None),
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
        def block(out: Jet, rows: Array):
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
        def block(out: Jet, rows: Array):
            return out.value, None, jnp.einsum("ncd,cd->nc", out.jacobian, rows)

        flat = flattened(fn, _validate.example_shape("xs", xs), vector="fn")
        value, _, diagonal = _by_blocks(flat, _rows(xs), False, chunk_size, block)
        return value.reshape(xs.shape), diagonal.reshape(xs.shape)

    return both


def divergence_batch(fn: Callable[[Array], Array], *, chunk_size: int | None = None) -> Callable[[Array], tuple[Array, Array]]:
    """xs (n, *shape) -> (v(x_i) (n, *shape), tr ∂v/∂x (x_i) (n,)) for v = fn: shape -> shape, by a first-order jet.

    tr ∂v/∂x = Σ_k ∂v_k/∂x_k over all d = prod(shape) entries. Each block of c Jacobian columns
    (rows e_k of I) contributes Σ_k e_k · ∂v/∂x_k, so with `chunk_size` the (n, d, d) Jacobian is
    never held whole: memory n·c·width per layer.
    """
    _chunk_size(chunk_size)

    def both(xs: Array) -> tuple[Array, Array]:
        def block(out: Jet, rows: Array):
            return out.value, jnp.einsum("ncd,cd->n", out.jacobian, rows), None

        flat = flattened(fn, _validate.example_shape("xs", xs), vector="fn")
        value, div, _ = _by_blocks(flat, _rows(xs), False, chunk_size, block)
        return value.reshape(xs.shape), div

    return both


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

    block(out, rows) -> (value, summed, stacked): what one pass along the rows (c, d) of I keeps,
    with `summed` (n, ...) added over blocks (Laplacians, traces) and `stacked` (n, c, ...)
    joined along its axis 1 (Jacobians); either may be None.

    `reduce` (the Laplacian only: `summed` must not depend on the basis): where x enters fn only
    through z = x W with fewer columns h than d (`_input_product`), the jet starts at z along the
    h rows of R, W = Q R, instead; `rows` are then rows of R, and Jacobians are along them. A W
    whose R has a diagonal entry under RANK_TOLERANCE of its largest keeps the d rows of I.
    """
    n, d = xs.shape
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((d,), xs.dtype))
    if len(closed.jaxpr.outvars) != 1:
        raise ValueError(f"fn must return one array, got {len(closed.jaxpr.outvars)} outputs")
    product = _input_product(closed.jaxpr, d) if reduce else None
    if product is None:
        return _push_rows(closed, xs, second_order, chunk_size, block, None, jnp.eye(d, dtype=xs.dtype))
    w = _product_matrix(closed, *product, d)
    # QR's derivative solves with R: at a (nearly) rank-deficient W it is not finite, or not accurate.
    # Such a W takes the d rows of I, whose derivative solves nothing. lax.cond runs one branch, and
    # the differentiated QR lives inside its branch, so the other's derivative is never formed.
    return jax.lax.cond(
        _full_rank(w),
        lambda: _push_rows(closed, xs, second_order, chunk_size, block, product,
                           jnp.linalg.qr(w, mode="r")),  # (h, h), RᵀR = WᵀW
        lambda: _push_rows(closed, xs, second_order, chunk_size, block, None, jnp.eye(d, dtype=xs.dtype)))


# The first-layer seed is used when R's smallest diagonal entry exceeds this fraction of its largest.
RANK_TOLERANCE = 1e-3


def _full_rank(w: Array) -> Array:
    """Whether W (d, h) has h independent columns to RANK_TOLERANCE (its R's diagonal); no derivative."""
    diag = jnp.abs(jnp.diagonal(jnp.linalg.qr(jax.lax.stop_gradient(w), mode="r")))
    return jnp.min(diag) > RANK_TOLERANCE * jnp.max(diag)


def _push_rows(closed, xs: Array, second_order: bool, chunk_size: int | None, block, product, basis: Array):
    """The jet of the closed jaxpr at xs (n, d) along the rows of `basis` (m, d) — or, with `product`,
    seeded at z = x W along the rows of `basis` (m, h) — all at once or `chunk_size` rows at a time."""
    n = xs.shape[0]

    def columns(rows: Array):
        if product is None:
            curvature = _Seed(jnp.zeros_like(rows)) if second_order == DIAGONAL else jnp.zeros_like(xs)
            seed = Jet(xs, _Seed(rows), curvature if second_order else None)
            (out,) = _interpret(closed.jaxpr, closed.consts, [seed], second_order)
        else:  # x's own Jacobian is never used: the jet is seeded at z = x W with `rows`
            seed = Jet(xs, None, None)
            (out,) = _interpret(closed.jaxpr, closed.consts, [seed], second_order, seed_at=(*product, rows))
        return block(_output(out, n, rows.shape[0], second_order), rows)

    m = basis.shape[0]
    c = m if chunk_size is None else min(chunk_size, m)
    if c == m:
        return columns(basis)
    blocks = -(-m // c)  # the last block padded with zero rows: zero columns, nothing summed
    padded = jnp.pad(basis, ((0, blocks * c - m), (0, 0)))
    value, summed, stacked = jax.lax.map(jax.checkpoint(columns), padded.reshape(blocks, c, -1))
    if stacked is not None:
        stacked = jnp.moveaxis(stacked, 0, 1)  # (n, blocks, c, ...)
        stacked = stacked.reshape((n, blocks * c) + stacked.shape[3:])[:, :m]
    return value[0], None if summed is None else jnp.sum(summed, axis=0), stacked


def _input_product(jaxpr, d: int) -> tuple[int, int] | None:
    """(i, k) when x, the jaxpr's one input (d,), enters it only through eqns[i], a dot_general that
    contracts all of x's entries (x reshaped at most, its operand k) with an operand that does not
    depend on x, into h < d outputs; else None. A Python walk over the jaxpr: it binds nothing.

    Each of x's uses must be its only one: x, then any reshapes of it, then the product. So every
    other equation before eqns[i] is independent of x, and so is the product's other operand."""
    var, eqns = jaxpr.invars[0], jaxpr.eqns
    while not any(v is var for v in jaxpr.outvars):
        uses = [(i, k) for i, eqn in enumerate(eqns) for k, v in enumerate(eqn.invars) if v is var]
        if len(uses) != 1:
            return None
        i, k = uses[0]
        eqn = eqns[i]
        if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is None:
            var = eqn.outvars[0]
            continue
        if eqn.primitive.name != "dot_general":
            return None
        (contract, other_contract), (batch, _) = eqn.params["dimension_numbers"]
        if k == 1:
            contract = other_contract
        h = math.prod(eqn.outvars[0].aval.shape)
        full = sorted(contract) == list(range(len(var.aval.shape))) and not batch
        return (i, k) if full and h < d and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.inexact) else None
    return None


def _product_matrix(closed, i: int, k: int, d: int) -> Array:
    """W (d, h) of the product z = x W at eqns[i] (`_input_product`): its rows indexed by x's d
    entries in row-major order, its columns by z's entries in row-major order. The equations
    before eqns[i] that do not depend on x are evaluated (under jit they are the same values the
    interpreter computes)."""
    jaxpr, eqn = closed.jaxpr, closed.jaxpr.eqns[i]
    env = dict(zip(jaxpr.constvars, closed.consts))
    known = lambda v: isinstance(v, jcore.Literal) or v in env
    for e in jaxpr.eqns[:i]:
        if all(known(v) for v in e.invars):
            env.update(zip(e.outvars, _bind(e, [v.val if isinstance(v, jcore.Literal) else env[v] for v in e.invars])))
    w_var = eqn.invars[1 - k]
    w = w_var.val if isinstance(w_var, jcore.Literal) else env[w_var]
    (lhs, rhs), _ = eqn.params["dimension_numbers"]
    x_axes, w_axes = (lhs, rhs) if k == 0 else (rhs, lhs)
    paired = dict(zip(x_axes, w_axes))
    # dot_general's output: the free axes of the lhs, then of the rhs; x has none, so W's in order.
    order = [paired[a] for a in range(len(x_axes))] + [a for a in range(jnp.ndim(w)) if a not in w_axes]
    return jnp.transpose(w, order).reshape(d, -1)


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
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def write(v, value):
        if not isinstance(v, jcore.DropVar):
            env[v] = value

    for v, value in zip(jaxpr.constvars, consts):
        write(v, value)
    for v, value in zip(jaxpr.invars, args):
        write(v, value)
    for i, eqn in enumerate(jaxpr.eqns):
        if seed_at is not None and i == seed_at[0]:
            outs = _seeded_product(eqn, [read(v) for v in eqn.invars], *seed_at[1:], second_order)
        else:
            outs = _push_batch(eqn, [read(v) for v in eqn.invars], second_order)
        for v, value in zip(eqn.outvars, outs):
            write(v, value)
    return [read(v) for v in jaxpr.outvars]


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
