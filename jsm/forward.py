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
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

Array = jax.Array


class Jet(NamedTuple):
    """A value with its Jacobian (leading axis d: ∂value/∂x_k) and its Laplacian Σ_k ∂²value/∂x_k²."""

    value: Array
    # Inside the interpreter, None marks a value that depends on x but carries no derivative
    # (an index, a mask, a stop_gradient), and "identity" the seed's ∂x/∂x = I, kept symbolic.
    jacobian: Array | str | None
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


def forward_jet(fn: Callable[[Array], Array], second_order: bool = True) -> Callable[[Array], Jet]:
    """x -> Jet(fn(x), ∂fn/∂x, Δfn(x)) for x of shape (d,), in one forward pass.

    The Jacobian has shape (d,) + fn(x).shape: for a scalar energy it is ∇f. With
    `second_order=False` only (value, Jacobian) are propagated (the Laplacian is None).
    Under `jax.vmap` prefer `forward_jet_batch`, which folds the batch into the
    Jacobian's matrix products itself.
    """
    batch = forward_jet_batch(fn, second_order)

    def jet(x: Array) -> Jet:
        if jnp.ndim(x) != 1:
            raise ValueError(f"x must be ONE example of shape (d,), got shape {jnp.shape(x)}; batch with jax.vmap")
        return jax.tree.map(lambda a: a[0], batch(x[None]))

    return jet


def forward_jet_batch(fn: Callable[[Array], Array], second_order: bool = True) -> Callable[[Array], Jet]:
    """xs -> the jets of fn at every row of xs (n, d): value (n, ...), Jacobian (n, d, ...), Laplacian (n, ...).

    fn acts on ONE example; the batch is carried explicitly, so that a Jacobian
    pushed through a matrix product with constant weights is ONE product of shape
    (n·d, in) x (in, out), and so is its transpose in the parameter gradient.
    """

    def jets(xs: Array) -> Jet:
        if jnp.ndim(xs) != 2:
            raise ValueError(f"xs must be a batch of shape (n, d), got shape {jnp.shape(xs)}")
        n, d = xs.shape
        closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((d,), xs.dtype))
        if len(closed.jaxpr.outvars) != 1:
            raise ValueError(f"fn must return one array, got {len(closed.jaxpr.outvars)} outputs")
        seed = Jet(xs, _IDENTITY, jnp.zeros_like(xs) if second_order else None)
        (out,) = _interpret(closed.jaxpr, closed.consts, [seed], second_order)
        if isinstance(out, Jet) and out.jacobian is not None:
            return Jet(out.value, _materialize(out, n, d), out.laplacian)
        # No derivative: fn depends on x only through stop_gradient or integers (a batched value),
        # or not at all (a constant, broadcast over the batch).
        value = out.value if isinstance(out, Jet) else jnp.broadcast_to(out, (n,) + jnp.shape(out))
        zeros = jnp.zeros_like(value)
        return Jet(value, jnp.zeros((n, d) + value.shape[1:], value.dtype), zeros if second_order else None)

    return jets


# The seed's Jacobian, ∂x/∂x = I, kept symbolic: the first product x @ W then costs d x in x out once,
# not once per example.
_IDENTITY = "identity"


def _materialize(jet: Jet, n: int, d: int) -> Array:
    if isinstance(jet.jacobian, str):
        return jnp.broadcast_to(jnp.eye(d, dtype=jet.value.dtype), (n, d, d))
    return jet.jacobian


def _interpret(jaxpr, consts, args, second_order: bool) -> list:
    """Evaluate a jaxpr of ONE example on batched jets. A value that depends on x is a Jet with a
    leading batch axis (jacobian None if it carries no derivative: indices, masks, stop_gradient);
    constants (parameters, literals) are plain, unbatched arrays."""
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
    for eqn in jaxpr.eqns:
        outs = _push_batch(eqn, [read(v) for v in eqn.invars], second_order)
        for v, value in zip(eqn.outvars, outs):
            write(v, value)
    return [read(v) for v in jaxpr.outvars]


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
        (Jet(a.value, _materialize(a, n, d), a.laplacian) if a.jacobian is not None else a.value)
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
    return jet.value.shape[-1] if isinstance(jet.jacobian, str) else jet.jacobian.shape[1]


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
    if len(jets) == 1 and isinstance(jets[0].jacobian, str):  # x itself: the product with I, once
        d = jets[0].value.shape[-1]
        columns = jax.vmap(linear)(jnp.eye(d, dtype=jets[0].value.dtype))
        jacobians = [jnp.broadcast_to(c, (n,) + c.shape) for c in columns]
    else:
        d = next(_width(j) for j in jets if not isinstance(j.jacobian, str))
        folded = [_materialize(j, n, d).reshape((n * d,) + j.value.shape[1:]) for j in jets]
        jacobians = [c.reshape((n, d) + c.shape[1:]) for c in jax.vmap(linear)(*folded)]
    laplacians = jax.vmap(linear)(*(j.laplacian for j in jets)) if second_order else (None,) * len(values)
    return [Jet(v, jac, lap) if _is_float(v) else Jet(v, None, None)
            for v, jac, lap in zip(values, jacobians, laplacians)]


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
    return [Jet(y, d1 * jet.jacobian, d1 * jet.laplacian + d2 * jnp.sum(jet.jacobian**2, axis=0))]


def _product_rule(a: Jet, b: Jet, second_order) -> list[Jet]:
    jacobian = a.jacobian * b.value + a.value * b.jacobian
    if not second_order:
        return [Jet(a.value * b.value, jacobian, None)]
    cross = jnp.sum(a.jacobian * b.jacobian, axis=0)
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
