"""Score-matching objectives: explicit, implicit, denoising, noise-conditional, sliced.

Each objective has a per-example form, a function of ONE example x of shape
(d,), and a batch form over xs of shape (n, d) that returns the batch mean of
the per-example terms. Models enter as a score function s(x) -> (d,) (close
over the parameters; `jax.grad` with respect to them is then plain `jax.grad`).

The identities behind them (Hyvärinen 2005; Vincent 2011), with C independent of s:

    J_ESM(s)      = 1/2 E_p |s(x) - ∇log p(x)|²
                  = J_ISM(s) + C,        J_ISM(s) = E_p [1/2 |s(x)|² + tr ∂s/∂x],
    J_ESM(s; p_σ) = J_DSM(s) + C',       J_DSM(s) = 1/2 E |s(x + ε) + ε/σ²|²,  ε ~ N(0, σ² I),

where C = 1/2 E_p |∇log p|² and C' = 1/2 E_{p_σ} |∇log p_σ|² - d / (2σ²).
J_ISM needs no knowledge of p but an exact trace, which costs d Jacobian-vector
products; J_DSM needs neither, but learns the score of the noised p_σ = p * N(0, σ² I).

Convention: DSM's target is -ε/σ² with ε = σ u, u ~ N(0, I). Its variance grows
like 1/σ² as σ -> 0 (the cross term u·s(x)/σ has mean zero but does not vanish).

Maximum likelihood for an energy-based model q_θ = exp(-f_θ) / Z_θ needs no score
matching but samples of q_θ: the gradient of the mean negative log-likelihood is

    ∇_θ E_data[-log q_θ(x)] = E_data[∇_θ f_θ(x)] - E_{q_θ}[∇_θ f_θ(x)],

the second term from Langevin chains: short runs started at the data (contrastive
divergence) or persistent chains kept in a replay buffer between steps.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jsm import _validate, samplers
from jsm.scores import batch_value_and_divergence, score_of

Array = jax.Array
ScoreFn = Callable[[Array], Array]
NoiseScoreFn = Callable[[Array, Array], Array]
EnergyFn = Callable[[Array], Array]


def _batch_mean(per_example: Callable[..., Array], *batched: Array) -> Array:
    return jnp.mean(jax.vmap(per_example)(*batched))


# --- explicit score matching: the true score is known -------------------------


def esm_per_example(score_fn: ScoreFn, true_score_fn: ScoreFn, x: Array) -> Array:
    """1/2 |s(x) - ∇log p(x)|² for one x of shape (d,)."""
    diff = score_fn(x) - true_score_fn(x)
    return 0.5 * jnp.dot(diff, diff)


def esm(score_fn: ScoreFn, true_score_fn: ScoreFn, xs: Array) -> Array:
    """Explicit score matching, the Fisher divergence: 1/2 E_p |s(x) - ∇log p(x)|².

    Args:
      score_fn: s, (d,) -> (d,).
      true_score_fn: ∇log p, (d,) -> (d,).
      xs: (n, d) samples of p.
    """
    xs = _validate.batch("xs", xs)
    return _batch_mean(lambda x: esm_per_example(score_fn, true_score_fn, x), xs)


# --- implicit score matching: an exact trace instead of the true score ---------


def ism_per_example(score_fn: ScoreFn, x: Array, method: str = "auto") -> Array:
    """1/2 |s(x)|² + tr(∂s/∂x) for one x of shape (d,), the trace exact."""
    s, div = batch_value_and_divergence(score_fn, method)(x[None])
    return 0.5 * jnp.dot(s[0], s[0]) + div[0]


def ism(score_fn: ScoreFn, xs: Array, method: str = "auto") -> Array:
    """Implicit score matching (Hyvärinen 2005): E_p [1/2 |s(x)|² + tr(∂s/∂x)].

    The trace is exact (`method` in `jsm.scores.METHODS`), never estimated. "auto"
    takes the forward Laplacian with the batch folded into its matrix products; pass
    `score_of(f)` for an energy model, so that s and tr ∂s/∂x = -Δf come from one
    forward pass of f. On a finite data set a flexible s can drive this to -∞ by
    spiking the divergence at the data points: regularise, or prefer `dsm`.

    Args:
      score_fn: s, (d,) -> (d,).
      xs: (n, d) samples of p.
      method: how the exact trace is computed.
    """
    xs = _validate.batch("xs", xs)
    s, div = batch_value_and_divergence(score_fn, method)(xs)
    return jnp.mean(0.5 * jnp.sum(s * s, axis=-1) + div)


# --- denoising score matching: learn the score of p_σ = p * N(0, σ² I) ---------


VARIANCE_REDUCTIONS = (None, "antithetic", "control_variate")


def _denoising_term(score_at, x: Array, eps: Array, sigma, variance_reduction) -> Array:
    """1/2 |s(x + ε) + ε/σ²|², or its variance-reduced estimator (see `dsm`)."""
    loss = lambda e: 0.5 * jnp.sum((score_at(x + e) + e / sigma**2) ** 2)
    if variance_reduction == "antithetic":
        return 0.5 * (loss(eps) + loss(-eps))
    if variance_reduction == "control_variate":
        return loss(eps) - jnp.dot(eps, score_at(x)) / sigma**2
    return loss(eps)


def dsm_per_example(score_fn: ScoreFn, x: Array, eps: Array, sigma: float, variance_reduction=None) -> Array:
    """1/2 |s(x + ε) + ε/σ²|² for one clean x and its noise ε, both (d,) (see `dsm` for the estimators)."""
    return _denoising_term(score_fn, x, eps, sigma, variance_reduction)


def dsm(score_fn: ScoreFn, key: Array, xs: Array, sigma: float, variance_reduction: str | None = None) -> Array:
    """Denoising score matching (Vincent 2011): 1/2 E |s(x + ε) + ε/σ²|², ε ~ N(0, σ² I).

    Minimised by the score of p_σ = p * N(0, σ² I), not of p. The noise is
    ε = σ · jax.random.normal(key, xs.shape).

    With ε = σu the per-example term is 1/2|s(x+σu)|² + u·s(x+σu)/σ + |u|²/(2σ²): its
    cross term u·s(x)/σ has mean zero but variance |s(x)|²/σ², so the parameter
    gradient's variance grows like 1/σ². `variance_reduction` removes that term
    without changing the expectation (the loss and its gradient stay unbiased):

      None               the plain estimator above.
      "antithetic"       1/2 [ℓ(ε) + ℓ(-ε)]: -ε has the law of ε, so the mean is
                         unchanged, and every term odd in u cancels, the cross term
                         among them. Two evaluations of s per example.
      "control_variate"  ℓ(ε) - ε·s(x)/σ²: the subtracted term, the first-order part
                         evaluated at the CLEAN x, has mean zero over ε for every x and
                         θ (and so has its θ-gradient). One extra evaluation, s(x).

    For a linear score s(x) = Ax + b, the b-gradient's variance per example falls from
    tr(A Σ Aᵀ) + |σA + I/σ|_F² to tr(A Σ Aᵀ) + σ²|A|_F² (control variate) or tr(A Σ Aᵀ)
    (antithetic), Σ the data covariance: a factor of order d / (σ² tr(AΣAᵀ)).

    Args:
      score_fn: s, (d,) -> (d,).
      key: PRNG key for the noise.
      xs: (n, d) clean samples of p.
      sigma: the noise scale σ > 0.
      variance_reduction: one of `VARIANCE_REDUCTIONS`.
    """
    xs = _validate.batch("xs", xs)
    _validate.key("key", key)
    _validate.positive("sigma", sigma)
    _validate.choice("variance_reduction", variance_reduction, VARIANCE_REDUCTIONS)
    eps = sigma * jax.random.normal(key, xs.shape, xs.dtype)
    return _batch_mean(lambda x, e: dsm_per_example(score_fn, x, e, sigma, variance_reduction), xs, eps)


def ncsn_per_example(score_fn: NoiseScoreFn, x: Array, eps: Array, sigma: Array, variance_reduction=None) -> Array:
    """σ² · 1/2 |s(x + ε, σ) + ε/σ²|² for one x, its noise ε (d,) and its σ ()."""
    return sigma**2 * _denoising_term(lambda y: score_fn(y, sigma), x, eps, sigma, variance_reduction)


def ncsn(score_fn: NoiseScoreFn, key: Array, xs: Array, sigmas: Array, variance_reduction: str | None = None) -> Array:
    """Noise-conditional DSM (Song & Ermon 2019) over a schedule of noise scales.

    1/L Σ_i λ(σ_i) J_DSM(s(·, σ_i); σ_i) with λ(σ) = σ², estimated by drawing one
    σ uniformly from `sigmas` per example. The weight σ² makes every level's term
    O(1), since |ε/σ²|² ~ d/σ². `variance_reduction` as in `dsm`, level by level.

    Args:
      score_fn: s(x, σ), ((d,), ()) -> (d,).
      key: PRNG key for the levels and the noise.
      xs: (n, d) clean samples of p.
      sigmas: (L,) positive noise scales, conventionally decreasing.
      variance_reduction: one of `VARIANCE_REDUCTIONS`.
    """
    xs = _validate.batch("xs", xs)
    _validate.key("key", key)
    sigmas = _validate.float_array("sigmas", sigmas, ndim=1)
    if sigmas.shape[0] == 0:
        raise ValueError("sigmas must hold at least one noise scale, got an empty array")
    _validate.positive("sigmas", sigmas)
    _validate.choice("variance_reduction", variance_reduction, VARIANCE_REDUCTIONS)
    k_level, k_noise = jax.random.split(key)
    level = jax.random.randint(k_level, (xs.shape[0],), 0, sigmas.shape[0])
    sigma = sigmas.astype(xs.dtype)[level]
    eps = sigma[:, None] * jax.random.normal(k_noise, xs.shape, xs.dtype)
    per_example = lambda x, e, s: ncsn_per_example(score_fn, x, e, s, variance_reduction)
    return _batch_mean(per_example, xs, eps, sigma)


# --- sliced score matching: random projections of the trace -------------------


def ssm_per_example(score_fn: ScoreFn, x: Array, v: Array) -> Array:
    """1/2 |s(x)|² + mean_j v_j^T (∂s/∂x) v_j for one x (d,) and projections v (m, d)."""
    s, jvp = jax.linearize(score_fn, x)
    vjv = jnp.sum(v * jax.vmap(jvp)(v), axis=-1)
    return 0.5 * jnp.dot(s, s) + jnp.mean(vjv)


def ssm(score_fn: ScoreFn, key: Array, xs: Array, n_projections: int = 1) -> Array:
    """Sliced score matching (Song et al. 2019), the variance-reduced form.

    E_p [1/2 |s(x)|² + E_v v^T (∂s/∂x) v], v ~ N(0, I): an unbiased estimate of
    J_ISM at the cost of `n_projections` JVPs per example instead of d.
    """
    xs = _validate.batch("xs", xs)
    _validate.key("key", key)
    n_projections = _validate.positive_int("n_projections", n_projections)
    v = jax.random.normal(key, (xs.shape[0], n_projections, xs.shape[1]), xs.dtype)
    return _batch_mean(lambda x, vi: ssm_per_example(score_fn, x, vi), xs, v)


# --- maximum likelihood for energy-based models --------------------------------


def ebm_surrogate(energy_fn: EnergyFn, data: Array, samples: Array, energy_penalty: float = 0.0):
    """A loss whose θ-gradient is the negative log-likelihood gradient of q_θ = exp(-f_θ)/Z_θ.

        L(θ) = E_data f_θ(x) - E_model f_θ(x̃) + α (E_data f_θ(x)² + E_model f_θ(x̃)²),

    with x̃ = stop_gradient(samples) ~ q_θ, so ∇_θ L = E_data ∇_θ f - E_model ∇_θ f (+ the
    penalty's gradient). L's VALUE is not the likelihood (Z_θ is unknown); the penalty α keeps
    the energies near zero so that they cannot drift to ±∞ (Du & Mordatch 2019).

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
    """x0 (n, d) moved by `n_steps` ULA steps on q ∝ exp(-f), stopped from the gradient."""
    score = score_of(lambda x: jax.lax.stop_gradient(energy_fn(x)))
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
    """A replay buffer of `size` persistent chains, uniform on the box [lo, hi]^dim."""
    size, dim = _validate.positive_int("size", size), _validate.positive_int("dim", dim)
    return jax.random.uniform(key, (size, dim), minval=lo, maxval=hi)


def persistent_cd(
    energy_fn: EnergyFn, key: Array, data: Array, buffer: Array, n_steps: int = 20, step_size: float = 1e-2,
    reinit_fraction: float = 0.05, energy_penalty: float = 0.0, lo: float = -4.0, hi: float = 4.0,
):
    """Persistent contrastive divergence with a replay buffer (Tieleman 2008; Du & Mordatch 2019).

    Draws len(data) chains from the buffer, restarts a `reinit_fraction` of them from
    uniform noise on [lo, hi]^d, runs `n_steps` ULA steps and writes them back. The
    chains keep exploring across steps, so spurious low-energy regions get sampled and
    pushed up.

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
