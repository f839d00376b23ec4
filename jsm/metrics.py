"""Distances between distributions, from samples.

`sliced_wasserstein` averages the 1-D Wasserstein-1 distance between random
projections of two samples; in 1-D, W1 between equal-size samples is the mean
gap between their sorted values, so the cost is a sort, O(n log n), per projection.
It is a metric on distributions, zero iff all projections agree, and its
sampling floor (the value between two samples of the SAME law) shrinks like n^{-1/2}:
report that floor next to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsm import _validate

Array = jax.Array


def _same_size(xs, ys) -> tuple[Array, Array]:
    xs, ys = _validate.batch("xs", xs), _validate.batch("ys", ys)
    if xs.shape != ys.shape:
        raise ValueError(f"xs and ys must have the same shape (n, d), got {xs.shape} and {ys.shape}")
    return xs, ys


def wasserstein_1d(a: Array, b: Array) -> Array:
    """W1 between two equal-size 1-D samples: mean |sort(a) - sort(b)|."""
    return jnp.mean(jnp.abs(jnp.sort(a) - jnp.sort(b)))


def sliced_wasserstein(xs: Array, ys: Array, key: Array, n_projections: int = 128) -> Array:
    """SW1(xs, ys) = E_θ W1(θ·x, θ·y), θ uniform on the unit sphere, by Monte Carlo.

    Args:
      xs, ys: (n, d) samples, same n (subsample the larger one first).
      key: PRNG key for the directions.
      n_projections: number of random directions.
    """
    xs, ys = _same_size(xs, ys)
    _validate.key("key", key)
    n_projections = _validate.positive_int("n_projections", n_projections)
    theta = jax.random.normal(key, (n_projections, xs.shape[1]), xs.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=-1, keepdims=True)
    return jnp.mean(jax.vmap(lambda t: wasserstein_1d(xs @ t, ys @ t))(theta))
