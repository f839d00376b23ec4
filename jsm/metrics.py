"""Divergences and distances between distributions: on a grid, and from samples.

On a grid (1-2 D), for log-densities known up to constants, normalised on the grid:
  kl_grid   KL(p || q) = ∫ p log(p / q)       (forward KL: what maximum likelihood minimises)
  js_grid   JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q)/2, in [0, log 2]
From samples:
  kl_knn              KL by k-nearest-neighbour distances (Wang, Kulkarni & Verdú 2009)
  wasserstein         W1 exactly, by optimal assignment (equal sizes, n up to a few thousand)
  sliced_wasserstein  W1 averaged over random 1-D projections, for large samples
  mmd                 the unbiased squared MMD with a Gaussian kernel

`sliced_wasserstein` averages the 1-D Wasserstein-1 distance between random
projections of two samples; in 1-D, W1 between equal-size samples is the mean
gap between their sorted values, so the cost is a sort, O(n log n), per projection.
It is a metric on distributions, zero iff all projections agree, and its
sampling floor (the value between two samples of the SAME law) shrinks like n^{-1/2}:
report that floor next to it.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from jsm import _validate
from jsm.quadrature import grid

__all__ = [
    "js_grid", "kl_grid", "kl_knn", "mmd", "sliced_wasserstein", "wasserstein", "wasserstein_1d",
]

Array = jax.Array
LogDensity = Callable[[Array], Array]


def _normalised_on_grid(log_p: LogDensity, lo, hi, n: int) -> tuple[Array, Array]:
    """(log p̂ at the nodes, log-weights), with Σ exp(log_w + log p̂) = 1."""
    points, log_w = grid(lo, hi, n)
    logp = jax.vmap(log_p)(points)
    return logp - logsumexp(log_w + logp), log_w


def kl_grid(log_p: LogDensity, log_q: LogDensity, lo, hi, n: int = 200) -> Array:
    """KL(p || q) = ∫ p log(p/q) on the box [lo, hi] (d = 1, 2), both normalised on the grid."""
    lp, log_w = _normalised_on_grid(log_p, lo, hi, n)
    lq, _ = _normalised_on_grid(log_q, lo, hi, n)
    return jnp.sum(jnp.exp(log_w + lp) * (lp - lq))


def js_grid(log_p: LogDensity, log_q: LogDensity, lo, hi, n: int = 200) -> Array:
    """Jensen-Shannon divergence on the box [lo, hi], in nats (at most log 2)."""
    lp, log_w = _normalised_on_grid(log_p, lo, hi, n)
    lq, _ = _normalised_on_grid(log_q, lo, hi, n)
    lm = jnp.logaddexp(lp, lq) - math.log(2.0)
    kl = lambda a: jnp.sum(jnp.exp(log_w + a) * (a - lm))
    return 0.5 * kl(lp) + 0.5 * kl(lq)


def _sq_dists(a: Array, b: Array) -> Array:
    sq = jnp.sum(a**2, -1)[:, None] - 2.0 * a @ b.T + jnp.sum(b**2, -1)[None, :]
    return jnp.maximum(sq, 0.0)


def _dims_agree(xs, ys) -> tuple[Array, Array]:
    xs, ys = _validate.batch("xs", xs), _validate.batch("ys", ys)
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"xs and ys must have the same dimension d, got {xs.shape[1]} and {ys.shape[1]}")
    return xs, ys


def kl_knn(xs, ys, k: int = 1) -> Array:
    """KL(p || q) from xs ~ p (n, d) and ys ~ q (m, d), by k-NN distances.

    D̂ = d/n Σ_i log(ν_k(i) / ρ_k(i)) + log(m / (n - 1)), with ρ_k(i) the distance from
    x_i to its k-th neighbour among the other xs and ν_k(i) to its k-th neighbour in ys.
    Consistent as n, m -> ∞; memory O(n (n + m)).
    """
    xs, ys = _dims_agree(xs, ys)
    k = _validate.positive_int("k", k)
    n, m, d = xs.shape[0], ys.shape[0], xs.shape[1]
    if n <= k or m < k:
        raise ValueError(f"kl_knn needs more than k={k} samples in xs and at least k in ys, got {n} and {m}")
    return d * _mean_log_knn_ratio(xs, ys, k) + math.log(m / (n - 1))


@jax.jit(static_argnames="k")
def _mean_log_knn_ratio(xs: Array, ys: Array, k: int) -> Array:
    """mean_i log(ν_k(i) / ρ_k(i)); the k-th smallest distance by top_k, not a full sort."""
    kth = lambda sq: -jax.lax.top_k(-sq, k)[0][:, k - 1]
    rho_sq = kth(_sq_dists(xs, xs) + jnp.diag(jnp.full(xs.shape[0], jnp.inf)))
    return 0.5 * jnp.mean(jnp.log(kth(_sq_dists(xs, ys))) - jnp.log(rho_sq))


def wasserstein(xs, ys) -> Array:
    """W1 between two equal-size samples, exactly: min over assignments π of mean |x_i - y_π(i)|.

    Solved on the host by scipy's linear_sum_assignment (O(n³)); use `sliced_wasserstein`
    for large n.
    """
    from scipy.optimize import linear_sum_assignment

    xs, ys = _same_size(xs, ys)
    cost = np.sqrt(np.asarray(_sq_dists(xs, ys), np.float64))
    rows, cols = linear_sum_assignment(cost)
    return jnp.asarray(cost[rows, cols].mean(), xs.dtype)


def mmd(xs, ys, bandwidth: float | None = None) -> Array:
    """Unbiased MMD² with the kernel k(x, y) = exp(-|x - y|² / (2 h²)).

    `bandwidth` h defaults to the median distance between the pooled samples.
    """
    xs, ys = _dims_agree(xs, ys)
    n, m = xs.shape[0], ys.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples in each of xs and ys, got {n} and {m}")
    if bandwidth is None:
        pooled = jnp.concatenate([xs, ys])
        bandwidth = jnp.sqrt(jnp.median(_sq_dists(pooled, pooled)))
    else:
        _validate.positive("bandwidth", bandwidth)
    kern = lambda a, b: jnp.exp(-_sq_dists(a, b) / (2.0 * bandwidth**2))
    off_diag = lambda kk, size: (jnp.sum(kk) - jnp.trace(kk)) / (size * (size - 1))
    return off_diag(kern(xs, xs), n) + off_diag(kern(ys, ys), m) - 2.0 * jnp.mean(kern(xs, ys))


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
