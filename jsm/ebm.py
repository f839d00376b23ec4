"""Maximum likelihood for energy-based models: the surrogate loss, CD, persistent CD.

Maximum likelihood for an energy-based model q_θ = exp(-f_θ) / Z_θ needs no score
matching but samples of q_θ: the gradient of the mean negative log-likelihood is

    ∇_θ E_data[-log q_θ(x)] = E_data[∇_θ f_θ(x)] - E_{q_θ}[∇_θ f_θ(x)],

the second term from Langevin chains: short runs started at the data (contrastive
divergence) or persistent chains kept in a replay buffer between steps. Models
enter as an energy f(x) -> () of ONE example x of shape (d,), closed over its
parameters; data and chains are batches (n, d).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jsm import _validate, samplers
from jsm.scores import score_of

__all__ = [
    "contrastive_divergence", "ebm_surrogate", "init_replay_buffer", "langevin_samples", "persistent_cd",
]

Array = jax.Array
EnergyFn = Callable[[Array], Array]


def ebm_surrogate(energy_fn: EnergyFn, data: Array, samples: Array, energy_penalty: float = 0.0):
    """A loss whose θ-gradient is the negative log-likelihood gradient of q_θ = exp(-f_θ)/Z_θ.

        L(θ) = E_data f_θ(x) - E_model f_θ(x̃) + α (E_data f_θ(x)² + E_model f_θ(x̃)²),

    with x̃ = stop_gradient(samples) ~ q_θ, so ∇_θ L = E_data ∇_θ f - E_model ∇_θ f (+ the
    penalty's gradient). L's VALUE is not the likelihood (Z_θ is unknown); the penalty α keeps
    the energies near zero so that they cannot drift to ±∞ (Du & Mordatch 2019).

    Args:
      energy_fn: f_θ, (d,) -> ().
      data: (n, d) samples of the data distribution.
      samples: (m, d) samples of q_θ (no gradient flows through them).
      energy_penalty: α >= 0.

    Returns:
      (loss, aux) with aux the mean energies of data and samples, their gap and the penalty.
    """
    samples = jax.lax.stop_gradient(samples)
    f_data, f_model = jax.vmap(energy_fn)(data), jax.vmap(energy_fn)(samples)
    penalty = energy_penalty * (jnp.mean(f_data**2) + jnp.mean(f_model**2))
    gap = jnp.mean(f_data) - jnp.mean(f_model)
    aux = {"energy_data": jnp.mean(f_data), "energy_model": jnp.mean(f_model), "energy_gap": gap, "penalty": penalty}
    return gap + penalty, aux


def langevin_samples(energy_fn: EnergyFn, key: Array, x0: Array, n_steps: int, step_size: float) -> Array:
    """x0 (n, d) moved by `n_steps` ULA steps on q ∝ exp(-f), stopped from the gradient.

    The chains follow s = -∇_x f; only their result is cut from the parameter gradient (a
    stop_gradient on f's VALUE, as this once had, zeroes ∇_x f too and leaves a random walk).
    """
    score = score_of(energy_fn)
    final, _, _ = samplers.run_chains(samplers.ula(score, step_size), key, jax.lax.stop_gradient(x0), n_steps)
    return jax.lax.stop_gradient(final.position)


def contrastive_divergence(
    energy_fn: EnergyFn, key: Array, data: Array, n_steps: int = 20, step_size: float = 1e-2,
    energy_penalty: float = 0.0,
):
    """Short-run contrastive divergence (Hinton 2002): model samples from `n_steps` ULA steps
    started AT the data. Cheap, but the chains never leave the data's neighbourhood, so
    low-energy regions far from the data are never seen and never corrected.

    Returns:
      (loss, aux) of `ebm_surrogate`.
    """
    data = _validate.batch("data", data)
    samples = langevin_samples(energy_fn, key, data, n_steps, step_size)
    return ebm_surrogate(energy_fn, data, samples, energy_penalty)


def init_replay_buffer(key: Array, size: int, dim: int, lo: float = -4.0, hi: float = 4.0) -> Array:
    """A replay buffer of `size` persistent chains, (size, dim), uniform on the box [lo, hi]^dim."""
    size, dim = _validate.positive_int("size", size), _validate.positive_int("dim", dim)
    return jax.random.uniform(key, (size, dim), minval=lo, maxval=hi)


def persistent_cd(
    energy_fn: EnergyFn, key: Array, data: Array, buffer: Array, n_steps: int = 20, step_size: float = 1e-2,
    reinit_fraction: float = 0.05, energy_penalty: float = 0.0, lo: float = -4.0, hi: float = 4.0,
):
    """Persistent contrastive divergence with a replay buffer (Tieleman 2008; Du & Mordatch 2019).

    Draws n = len(data) chains from the buffer without replacement, restarts each one
    independently with probability `reinit_fraction` from uniform noise on [lo, hi]^d (so
    the number restarted is Binomial(n, reinit_fraction)), runs `n_steps` ULA steps and
    writes them back. The chains keep exploring across steps, so spurious low-energy
    regions get sampled and pushed up.

    Args:
      energy_fn: f_θ, (d,) -> ().
      key: PRNG key for the draw, the restarts and the chains.
      data: (n, d) a batch of data.
      buffer: (size, d) persistent chains, size >= n.

    Returns:
      (loss, aux, new_buffer): a stateful objective for `jsm.fit(..., objective_state=buffer)`.
    """
    data = _validate.batch("data", data)
    buffer = _validate.float_array("buffer", buffer, ndim=2)
    if buffer.shape[1] != data.shape[1] or buffer.shape[0] < data.shape[0]:
        raise ValueError(f"buffer must have shape (>= {data.shape[0]}, {data.shape[1]}), got {buffer.shape}")
    if _validate.is_concrete(reinit_fraction) and not 0.0 <= reinit_fraction <= 1.0:
        raise ValueError(f"reinit_fraction must be in [0, 1], got {reinit_fraction}")
    k_idx, k_reinit, k_noise, k_chain = jax.random.split(key, 4)
    n = data.shape[0]
    idx = jax.random.choice(k_idx, buffer.shape[0], (n,), replace=False)
    restart = jax.random.uniform(k_reinit, (n, 1)) < reinit_fraction
    noise = jax.random.uniform(k_noise, (n, data.shape[1]), minval=lo, maxval=hi, dtype=buffer.dtype)
    x0 = jnp.where(restart, noise, buffer[idx])
    samples = langevin_samples(energy_fn, k_chain, x0, n_steps, step_size)
    loss, aux = ebm_surrogate(energy_fn, data, samples, energy_penalty)
    return loss, aux, buffer.at[idx].set(samples)
