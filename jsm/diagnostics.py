"""Convergence diagnostics of MCMC traces: effective sample size and split R-hat.

A trace has shape (n_draws, n_chains, d): `run_chains(..., thin=k)` returns one.
Both diagnostics are per coordinate and follow Stan (Gelman et al., BDA3, §11.4-11.5;
Geyer 1992): with n draws in each of m chains, W the mean within-chain variance and
B/n the variance of the chain means,

    var⁺ = (n - 1)/n · W + B/n,     R̂ = sqrt(var⁺ / W),
    ρ_t = 1 - (W - mean_chains acov_t) / var⁺,     ESS = n m / (-1 + 2 Σ_{pairs} (ρ_{2k} + ρ_{2k+1})),

the pair sums truncated at the first non-positive one and made monotone (Geyer's
initial monotone sequence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsm import _validate

__all__ = [
    "effective_sample_size", "split_rhat",
]

Array = jax.Array


def _check_trace(trace) -> Array:
    trace = _validate.float_array("trace", trace, ndim=3)
    if trace.shape[0] < 4 or trace.shape[1] < 1:
        raise ValueError(f"trace must have shape (n_draws >= 4, n_chains, d), got {tuple(trace.shape)}")
    return trace


def _split_chains(trace: Array) -> Array:
    """(n, m, d) -> (n // 2, 2m, d): each chain's first and last halves as two chains."""
    n = trace.shape[0] // 2
    return jnp.concatenate([trace[:n], trace[trace.shape[0] - n :]], axis=1)


def _between_within(trace: Array) -> tuple[Array, Array]:
    """(var⁺, W): the pooled variance estimate and the mean within-chain variance, (d,)."""
    n, m = trace.shape[:2]
    w = jnp.mean(jnp.var(trace, axis=0, ddof=1), axis=0)
    b_over_n = jnp.var(jnp.mean(trace, axis=0), axis=0, ddof=1) if m > 1 else 0.0
    return (n - 1) / n * w + b_over_n, w


def split_rhat(trace) -> Array:
    """Split R-hat (Gelman et al., BDA3) per coordinate, (d,); near 1 when chains agree.

    R̂ = sqrt(var⁺ / W) on the chains cut in halves, so a chain that drifts disagrees
    with itself.

    Args:
      trace: (n_draws >= 4, n_chains, d), n_chains >= 1 (each chain is split in two).

    Returns:
      (d,) R̂ per coordinate.
    """
    trace = _split_chains(_check_trace(trace))
    var_plus, w = _between_within(trace)
    return jnp.sqrt(var_plus / w)


def effective_sample_size(trace) -> Array:
    """Multi-chain ESS per coordinate (Geyer's initial monotone sequence, as in Stan), (d,).

    ESS = n m / τ, τ = -1 + 2 Σ_k (ρ_{2k} + ρ_{2k+1}) over the initial positive, monotone
    pair sums of the multi-chain autocorrelation ρ_t (autocovariances by FFT). An AR(1)
    chain with coefficient φ has ESS → n m (1 - φ)/(1 + φ).

    Args:
      trace: (n_draws >= 4, n_chains, d).

    Returns:
      (d,) ESS per coordinate; at most n m log10(n m) (τ is floored at 1/log10(n m), as Stan).
    """
    trace = _check_trace(trace)
    n, m, _ = trace.shape
    centred = trace - jnp.mean(trace, axis=0)
    size = 2 * n
    f = jnp.fft.rfft(centred, n=size, axis=0)
    acov = jnp.fft.irfft(f * jnp.conj(f), n=size, axis=0)[:n] / n  # (n, m, d), biased
    var_plus, w = _between_within(trace)
    rho = 1.0 - (w - jnp.mean(acov, axis=1)) / var_plus  # (n, d)
    rho = rho.at[0].set(1.0)
    n_pairs = n // 2
    pairs = rho[: 2 * n_pairs].reshape(n_pairs, 2, -1).sum(axis=1)  # (n_pairs, d)
    # Initial positive sequence, then made monotone decreasing.
    positive = jnp.cumprod(pairs > 0, axis=0).astype(bool)
    pairs = jnp.where(positive, pairs, 0.0)
    pairs = jax.lax.cummin(pairs, axis=0)
    tau = -1.0 + 2.0 * jnp.sum(pairs, axis=0)
    return n * m / jnp.maximum(tau, 1.0 / jnp.log10(n * m))
