"""The partition function Z = ∫ exp(-f(x)) dx: by quadrature in 1-2 D, by AIS in any d.

Quadrature on n points per axis costs n^d energy evaluations: 200 points per axis
is 4·10^4 evaluations in 2-D but 10^23 in d = 10. That is why the likelihood of
an energy-based model is out of reach beyond a few dimensions, and why score
matching, which never needs Z, exists. Annealed importance sampling (Neal 2001)
trades the grid for Monte Carlo with an error bar.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from jsm import _validate, samplers
from jsm.quadrature import grid

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
    the target through f_β = (1 - β) f_0 + β f on a geometric-then-linear β grid, with
    `n_steps` MALA steps (`jsm.samplers.mala`) at each β. Each chain's log-weight is
    Σ_k (β_{k-1} - β_k) (f(x_k) - f_0(x_k)), and Z = Z_0 E[w].

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

    base = lambda x: 0.5 * jnp.dot(x, x) / base_scale**2
    log_z0 = 0.5 * dim * math.log(2 * math.pi) + dim * math.log(base_scale)
    betas = jnp.concatenate([jnp.zeros(1), jnp.geomspace(1e-4, 1.0, n_temperatures - 1)])

    def chain(key: Array) -> Array:
        k_init, k_run = jax.random.split(key)
        x = base_scale * jax.random.normal(k_init, (dim,))

        def temperature(carry, inputs):
            x, log_w = carry
            beta_prev, beta, k = inputs
            log_w = log_w - (beta - beta_prev) * (energy(x) - base(x))
            kernel = samplers.mala(lambda y: -((1 - beta) * base(y) + beta * energy(y)), step_size)
            state = kernel.init(x)
            for i in range(n_steps):
                state, _ = kernel.step(jax.random.fold_in(k, i), state)
            return (state.position, log_w), None

        keys = jax.random.split(k_run, n_temperatures - 1)
        (_, log_w), _ = jax.lax.scan(temperature, (x, jnp.zeros(())), (betas[:-1], betas[1:], keys))
        return log_w

    log_w = jax.jit(jax.vmap(chain))(jax.random.split(key, n_chains))
    log_mean_w = logsumexp(log_w) - math.log(n_chains)
    w = jnp.exp(log_w - jnp.max(log_w))
    stderr = jnp.std(w, ddof=1) / (math.sqrt(n_chains) * jnp.mean(w))
    return log_z0 + log_mean_w, stderr
