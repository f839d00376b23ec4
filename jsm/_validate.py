"""Boundary checks shared by the public functions.

Every check runs in Python before anything is compiled and raises a
`ValueError` or `TypeError` that names the argument, what it got and what it
wants. Checks that need values (finiteness, positivity) run only when the value
is concrete; under `jit` they are skipped, since the caller was checked already.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when `x` holds values now (not a tracer, not an abstract shape)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (np.ndarray, np.generic, jax.Array, float, int, list, tuple))


def float_array(name: str, x, *, ndim: int | None = None) -> jax.Array:
    """`x` as a floating-point array of rank `ndim`, finite where concrete."""
    if isinstance(x, jax.core.Tracer):
        arr = x
    else:
        try:
            arr = jnp.asarray(x)
        except TypeError as e:
            raise TypeError(f"{name} must be an array of floats, got {type(x).__name__}") from e
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        if jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == bool:
            arr = arr.astype(jnp.result_type(float))
        else:
            raise TypeError(f"{name} must be an array of floats, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        want = {0: "a scalar", 1: "shape (d,)", 2: "shape (n, d)"}.get(ndim, f"rank {ndim}")
        raise ValueError(f"{name} must have {want}, got shape {tuple(arr.shape)}")
    # Concrete values are checked with NumPy, on x itself: inside a trace jnp.asarray(0.5) is a tracer.
    host = _host(x) if is_concrete(x) else None
    if host is not None and not np.all(np.isfinite(host)):
        n_bad = int(host.size - np.sum(np.isfinite(host)))
        raise ValueError(f"{name} must be finite, got {n_bad} non-finite value(s)")
    return arr


def _host(x) -> np.ndarray | None:
    """x as a NumPy array of numbers, or None when it holds traced values (a list of tracers, say)."""
    try:
        host = np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    return host if host.dtype.kind in "biuf" else None


def batch(name: str, xs, *, dim: int | None = None) -> jax.Array:
    """A non-empty batch of examples, shape (n, d), with d == dim if given."""
    arr = float_array(name, xs, ndim=2)
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one example, got shape {tuple(arr.shape)}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got shape {tuple(arr.shape)}")
    return arr


def _leading_batch(name: str, x, want: str) -> jax.Array:
    arr = float_array(name, x)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must {want}, got shape {tuple(arr.shape)}")
    return arr


def examples(name: str, xs) -> jax.Array:
    """A non-empty batch of examples of any shape: (n, d), (n, h, w, c), ..."""
    return _leading_batch(name, xs, "be a batch of shape (n, *example_shape) with n >= 1 (e.g. (n, d) or "
                                    "(n, h, w, c))")


def chains(name: str, x0) -> jax.Array:
    """Initial positions of n_chains >= 1 chains, shape (n_chains, *shape): (n_chains, d), (n_chains, h, w, c), ..."""
    return _leading_batch(name, x0, "have shape (n_chains, *shape) with n_chains >= 1, one chain's position per row "
                                    "(e.g. (n_chains, d) or (n_chains, h, w, c))")


def positive(name: str, value) -> None:
    """`value` (a scalar or array) is > 0 wherever it is concrete."""
    if is_concrete(value):
        arr = np.asarray(value)
        if arr.size == 0 or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
            raise ValueError(f"{name} must be positive and finite, got {value!r}")


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def decreasing(name: str, values) -> jax.Array:
    """A 1-D array of positive, strictly decreasing values (a noise schedule)."""
    arr = float_array(name, values, ndim=1)
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one value, got an empty array")
    positive(name, values)
    if is_concrete(values) and arr.shape[0] > 1 and not np.all(np.diff(np.asarray(arr)) < 0):
        raise ValueError(f"{name} must be strictly decreasing, got {np.asarray(arr).tolist()}")
    return arr


def key(name: str, k) -> None:
    """A PRNG key: a typed key, or a raw uint32 key of shape (2,)."""
    if isinstance(k, jax.Array) and jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
        if k.shape != ():
            raise ValueError(f"{name} must be a single PRNG key, got a key array of shape {k.shape}")
        return
    shape = getattr(k, "shape", None)
    dtype = getattr(k, "dtype", None)
    if shape != (2,) or dtype != jnp.uint32:
        raise TypeError(
            f"{name} must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got {type(k).__name__} with shape {shape} and dtype {dtype}"
        )


# --- functions of ONE example: x of shape (d,), (h, w, c), ... ----------------------


def example(name: str, x) -> None:
    """ONE example: an array of rank >= 1, (d,) or (h, w, c) or any other shape."""
    if jnp.ndim(x) < 1:
        raise ValueError(f"{name} must be ONE example of shape (d,), (h, w, c) or any other of rank >= 1 "
                         f"(for d = 1, shape (1,)), got a scalar; batch with jax.vmap")


def example_shape(name: str, xs) -> tuple[int, ...]:
    """The shape of one example of a batch xs (n, *shape) of rank >= 2; a rank check only, so it
    runs on tracers too (inside jit, vmap, grad)."""
    if jnp.ndim(xs) < 2:
        raise ValueError(f"{name} must be a batch of shape (n, *shape), (n, d) or (n, h, w, c) say, got shape "
                         f"{tuple(jnp.shape(xs))}")
    return tuple(jnp.shape(xs)[1:])


def _output_shape(name: str, out, x) -> tuple:
    if isinstance(out, (tuple, list, dict)):
        raise ValueError(f"{name} must return one array for one example of shape {tuple(jnp.shape(x))}, "
                         f"got a {type(out).__name__}")
    return tuple(jnp.shape(out))


def same_shape(name: str, fn):
    """fn, checked (at trace time, no cost after) to map ONE example x, and any further arguments, to
    an array of x's shape: a vector field or score, shape -> shape."""
    return _output_checked(name, fn, lambda x: tuple(jnp.shape(x)), "the same shape")


def scalar_valued(name: str, fn):
    """fn, checked (at trace time, no cost after) to map ONE example x, and any further arguments, to
    a scalar: an energy, shape -> ()."""
    return _output_checked(name, fn, lambda x: (), "a scalar")


def _output_checked(name: str, fn, want: Callable, what: str):
    """fn, whose output for one example x must have the shape want(x) (`what`, in the error)."""

    def checked(x, *args):
        out = fn(x, *args)
        if _output_shape(name, out, x) != want(x):
            raise ValueError(f"{name} must map one example of shape {tuple(jnp.shape(x))} to {what}, "
                             f"got shape {tuple(jnp.shape(out))}")
        return out

    return checked
