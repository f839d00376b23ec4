"""Trapezoid-rule grids on boxes in 1-2 D, shared by `jsm.partition` and `jsm.metrics`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsm import _validate

__all__ = [
    "grid",
]

Array = jax.Array


def _box(lo, hi, n) -> tuple[Array, Array, int]:
    lo = _validate.float_array("lo", lo, ndim=1)
    hi = _validate.float_array("hi", hi, ndim=1)
    if lo.shape != hi.shape or lo.shape[0] not in (1, 2):
        raise ValueError(f"lo and hi must both have shape (d,) with d = 1 or 2, got {lo.shape} and {hi.shape}")
    if _validate.is_concrete(lo) and _validate.is_concrete(hi) and not np.all(np.asarray(lo) < np.asarray(hi)):
        # compared in NumPy: inside a jit, jnp would stage even a comparison of constants
        raise ValueError(f"lo must be < hi in every coordinate, got lo={lo.tolist()} and hi={hi.tolist()}")
    n = _validate.positive_int("n", n, minimum=2)
    return lo, hi, n


def grid(lo, hi, n: int) -> tuple[Array, Array]:
    """Trapezoid-rule nodes and log-weights on the box [lo, hi], n points per axis.

    Returns:
      points (n^d, d) and log_weights (n^d,), with Σ exp(log_weights) g(points) ≈ ∫ g.
    """
    lo, hi, n = _box(lo, hi, n)
    axes = [jnp.linspace(a, b, n) for a, b in zip(lo, hi)]
    h = (hi - lo) / (n - 1)
    w1 = [jnp.full(n, hi_).at[0].set(hi_ / 2).at[-1].set(hi_ / 2) for hi_ in h]
    mesh = jnp.meshgrid(*axes, indexing="ij")
    wmesh = jnp.meshgrid(*w1, indexing="ij")
    points = jnp.stack([m.ravel() for m in mesh], axis=-1)
    log_weights = sum(jnp.log(w.ravel()) for w in wmesh)
    return points, log_weights
