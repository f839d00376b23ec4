"""The partition function Z = ∫ exp(-f(x)) dx: by quadrature in 1-2 D, by AIS in any d.

Quadrature on n points per axis costs n^d energy evaluations: 200 points per axis
is 4·10^4 evaluations in 2-D but 10^23 in d = 10. That is why the likelihood of
an energy-based model is out of reach beyond a few dimensions, and why score
matching, which never needs Z, exists. Annealed importance sampling (Neal 2001)
trades the grid for Monte Carlo with an error bar.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from jsm import _validate, samplers
from jsm.quadrature import grid

__all__ = [
    "log_likelihood_grid", "log_z_ais", "log_z_grid",
]

Array = jax.Array
EnergyFn = Callable[[Array], Array]


def log_z_grid(energy: EnergyFn, lo, hi, n: int) -> Array:
    """log Z = log ∫_[lo, hi] exp(-f(x)) dx by the trapezoid rule, computed in log space.

    Args:
      energy: f, (d,) -> (), d = 1 or 2.
      lo, hi: (d,) corners of the box; the box must hold the mass of exp(-f).
      n: points per axis (>= 2).
    """
    points, log_w = grid(lo, hi, n)
    return logsumexp(log_w - jax.vmap(energy)(points))


def log_likelihood_grid(energy: EnergyFn, xs, lo, hi, n: int) -> Array:
    """The exact mean log-likelihood of xs (n_data, d) under exp(-f) / Z, Z by `log_z_grid`."""
    xs = _validate.batch("xs", xs)
    return -jnp.mean(jax.vmap(energy)(xs)) - log_z_grid(energy, lo, hi, n)


def _base_energy(x: Array, base_scale) -> Array:
    """f_0(x) = |x|² / (2 base_scale²), the energy of the base N(0, base_scale² I)."""
    return 0.5 * jnp.dot(x, x) / base_scale**2


def _annealed_log_prob(energy: EnergyFn):
    """log p_β(x) = -((1 - β) f_0(x) + β f(x)) + const, a function of (x, β, base_scale)."""
    def log_prob(x: Array, beta, base_scale) -> Array:
        return -((1.0 - beta) * _base_energy(x, base_scale) + beta * energy(x))
    return log_prob


@functools.partial(jax.jit, static_argnames=("energy", "dim", "n_chains", "n_temperatures", "n_steps"))
def _ais_log_weights(energy: EnergyFn, key: Array, dim: int, n_chains: int, n_temperatures: int, n_steps: int,
                     step_size, base_scale) -> Array:
    """(n_chains,) AIS log-weights log w = Σ_k (β_{k-1} - β_k) (f(x_{k-1}) - f_0(x_{k-1}))."""
    # β_0 = 0, then geometric up to exactly 1 (with 2 temperatures: [0, 1], plain importance sampling)
    betas = jnp.concatenate([jnp.zeros(1), jnp.geomspace(1e-4, 1.0, n_temperatures - 1).at[-1].set(1.0)])
    # One kernel for all temperatures: β (and the base's scale) are its log-density's
    # arguments, the step size its data; nothing is rebuilt per temperature.
    kernel = samplers.mala(_annealed_log_prob(energy), step_size)

    def chain(key: Array) -> Array:
        k_init, k_run = jax.random.split(key)
        x = base_scale * jax.random.normal(k_init, (dim,))

        def temperature(carry, inputs):
            x, log_w = carry
            beta_prev, beta, k = inputs
            # The weight first, at x_{k-1} ~ (approximately) p_{β_{k-1}}; then move x under p_{β_k}.
            log_w = log_w - (beta - beta_prev) * (energy(x) - _base_energy(x, base_scale))
            state = kernel.init(x, beta, base_scale)
            for i in range(n_steps):
                state, _ = kernel.step(jax.random.fold_in(k, i), state, beta, base_scale)
            return (state.position, log_w), None

        keys = jax.random.split(k_run, n_temperatures - 1)
        (_, log_w), _ = jax.lax.scan(temperature, (x, jnp.zeros(())), (betas[:-1], betas[1:], keys))
        return log_w

    return jax.vmap(chain)(jax.random.split(key, n_chains))


def log_z_ais(
    energy: EnergyFn,
    key: Array,
    dim: int,
    *,
    n_chains: int = 1000,
    n_temperatures: int = 200,
    n_steps: int = 2,
    step_size: float = 0.1,
    base_scale: float = 1.0,
) -> tuple[Array, Array]:
    """log Z by annealed importance sampling (Neal 2001), and its standard error.

    Anneals from the base q_0 = N(0, base_scale² I), f_0(x) = |x|² / (2 base_scale²), to
    the target through f_β = (1 - β) f_0 + β f on a geometric β grid (0, 10⁻⁴, ..., 1),
    with `n_steps` MALA steps (`jsm.samplers.mala`) at each β. Each chain's log-weight is
    Σ_k (β_{k-1} - β_k) (f(x_{k-1}) - f_0(x_{k-1})), taken BEFORE the moves at β_k, and

        Z = Z_0 E[w],   Z_0 = (2π base_scale²)^{d/2}.

    Compiled once per energy function and sizes (step_size and base_scale are data);
    traceable, so `jax.vmap` over keys runs independent estimates in one call.

    Args:
      energy: f, (d,) -> ().
      key: PRNG key.
      dim: d.
      n_chains, n_temperatures, n_steps: chains (>= 2), β grid points (>= 2), MALA steps per β.
      step_size: the MALA step a > 0.
      base_scale: the base's standard deviation, > 0.

    Returns:
      (log Ẑ, standard error of log Ẑ by the delta method: std(w) / (sqrt(N) mean(w))).
    """
    _validate.key("key", key)
    dim = _validate.positive_int("dim", dim)
    n_chains = _validate.positive_int("n_chains", n_chains, minimum=2)
    n_temperatures = _validate.positive_int("n_temperatures", n_temperatures, minimum=2)
    n_steps = _validate.positive_int("n_steps", n_steps)
    _validate.positive("step_size", step_size)
    _validate.positive("base_scale", base_scale)

    log_w = _ais_log_weights(energy, key, dim, n_chains, n_temperatures, n_steps, step_size, base_scale)
    log_z0 = 0.5 * dim * math.log(2 * math.pi) + dim * jnp.log(base_scale)
    log_mean_w = logsumexp(log_w) - math.log(n_chains)
    w = jnp.exp(log_w - jnp.max(log_w))
    stderr = jnp.std(w, ddof=1) / (math.sqrt(n_chains) * jnp.mean(w))
    return log_z0 + log_mean_w, stderr
