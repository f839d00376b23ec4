"""Score-matching objectives: explicit, implicit, denoising, noise-conditional, sliced.

Each objective has a per-example form, a function of ONE example x, and a batch
form over xs of shape (n, *shape) that returns the batch mean of the per-example
terms. Models enter as a score function s(x) -> x.shape (close over the parameters;
`jax.grad` with respect to them is then plain `jax.grad`). An example is a vector
(d,) or any array, an image (h, w, c) say: every objective takes xs of shape
(n, *shape) with s acting on one example of that shape, and its squared norms and
inner products sum over all d = prod(shape) entries. The exact trace of `ism`,
`ism_energy` and `score_matching_identities` does too: tr ∂s/∂x = Σ_k ∂s_k/∂x_k over
all d entries, computed on the flattened s (`jsm.forward.flattened`), so nothing needs
flattening by hand.

The identities behind them (Hyvärinen 2005; Vincent 2011), with C independent of s:

    J_ESM(s)      = 1/2 E_p |s(x) - ∇log p(x)|²
                  = J_ISM(s) + C,        J_ISM(s) = E_p [1/2 |s(x)|² + tr ∂s/∂x],
    J_ESM(s; p_σ) = J_DSM(s) + C',       J_DSM(s) = 1/2 E |s(x + ε) + ε/σ²|²,  ε ~ N(0, σ² I),

where C = 1/2 E_p |∇log p|² and C' = 1/2 E_{p_σ} |∇log p_σ|² - d / (2σ²).
J_ISM needs no knowledge of p but an exact trace, which costs d Jacobian-vector
products; J_DSM needs neither, but learns the score of the noised p_σ = p * N(0, σ² I).

Convention: DSM's target is -ε/σ² with ε = σ u, u ~ N(0, I). Its variance grows
like 1/σ² as σ -> 0 (the cross term u·s(x)/σ has mean zero but does not vanish).

ISM has two forms: `ism(s, xs)` for a score network, and `ism_energy(f, xs)` for an
energy model q ∝ exp(-f), s = -∇f, whose exact trace is cheap: one second-order
forward jet of f gives s and tr ∂s/∂x = -Δf together (3-7x faster than "jacfwd").
`score_matching_identities` measures both identities above on a model, with standard
errors. EBM maximum likelihood (contrastive divergence) lives in `jsm.ebm`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jsm import _validate
from jsm.scores import (batch_gradient_and_hessian_diagonal, batch_score_and_divergence_of_energy,
                        batch_value_and_divergence, batch_value_and_jacobian_diagonal)
from jsm.sde import SDE, check_sde, check_t_min

__all__ = [
    "Identities", "VARIANCE_REDUCTIONS", "WEIGHTINGS", "dsm", "dsm_per_example", "dsm_sde", "dsm_sde_per_example",
    "esm", "esm_per_example", "ism", "ism_energy", "ism_energy_per_example", "ism_per_example", "ncsn",
    "ncsn_per_example", "score_matching_identities", "ssm", "ssm_per_example", "training_times",
]

Array = jax.Array
ScoreFn = Callable[[Array], Array]
NoiseScoreFn = Callable[[Array, Array], Array]
EnergyFn = Callable[[Array], Array]


def _batch_mean(per_example: Callable[..., Array], *batched: Array) -> Array:
    return jnp.mean(jax.vmap(per_example)(*batched))


def _dot(a: Array, b: Array) -> Array:
    """<a, b> summed over every entry: jnp.dot of the flattened arrays (unchanged for vectors)."""
    return jnp.dot(jnp.ravel(a), jnp.ravel(b))


def _per_example_sum(a: Array) -> Array:
    """Σ over all entries of each example of a batch (n, *shape): (n,)."""
    return jnp.sum(a, axis=tuple(range(1, a.ndim)))


def _sq_norms(s: Array) -> Array:
    """|s_i|² for every example of a batch (n, *shape), summed over all its entries."""
    return _per_example_sum(s * s)


def _score_at(score_fn: Callable[..., Array], x: Array, *args) -> Array:
    """s(x, *args), checked (at trace time) to have the example's shape."""
    return _validate.same_shape("score_fn", score_fn)(x, *args)


# --- explicit score matching: the true score is known -------------------------


def esm_per_example(score_fn: ScoreFn, true_score_fn: ScoreFn, x: Array) -> Array:
    """1/2 |s(x) - ∇log p(x)|² for one x of any shape (the norm over all its entries)."""
    diff = _score_at(score_fn, x) - true_score_fn(x)
    return 0.5 * _dot(diff, diff)


def esm(score_fn: ScoreFn, true_score_fn: ScoreFn, xs: Array) -> Array:
    """Explicit score matching, the Fisher divergence: 1/2 E_p |s(x) - ∇log p(x)|².

    Args:
      score_fn: s, shape -> shape, for one example of shape `shape` ((d,), (h, w, c), ...).
      true_score_fn: ∇log p, shape -> shape.
      xs: (n, *shape) samples of p.
    """
    xs = _validate.examples("xs", xs)
    return _batch_mean(lambda x: esm_per_example(score_fn, true_score_fn, x), xs)


# --- implicit score matching: an exact trace instead of the true score ---------


def _penalised(hessian_penalty) -> bool:
    """Whether the curvature penalty is on: a traced λ always is; a concrete λ must be >= 0, and 0 is off."""
    if not _validate.is_concrete(hessian_penalty):
        return True
    lam = float(hessian_penalty)
    if not lam >= 0.0:
        raise ValueError(f"hessian_penalty must be a number >= 0 (λ of the curvature penalty), got {hessian_penalty!r}")
    return lam > 0.0


def _ism_terms(score_fn, xs, method, chunk_size, hessian_penalty) -> Array:
    """(n,) 1/2 |s|² + tr ∂s/∂x [+ λ Σ_k (∂s_k/∂x_k)²] for a score network, from one jet."""
    score_fn = _validate.same_shape("score_fn", score_fn)
    if not _penalised(hessian_penalty):
        s, div = batch_value_and_divergence(score_fn, method, chunk_size=chunk_size)(xs)
        return 0.5 * _sq_norms(s) + div
    s, diagonal = batch_value_and_jacobian_diagonal(score_fn, method, chunk_size=chunk_size)(xs)
    return 0.5 * _sq_norms(s) + _per_example_sum(diagonal) + hessian_penalty * _sq_norms(diagonal)


def _ism_energy_terms(energy_fn, xs, method, chunk_size, hessian_penalty) -> Array:
    """(n,) 1/2 |∇f|² - Δf [+ λ Σ_k (∂²f/∂x_k²)²] for an energy, from one jet."""
    if not _penalised(hessian_penalty):
        s, div = batch_score_and_divergence_of_energy(energy_fn, method, chunk_size=chunk_size)(xs)
        return 0.5 * _sq_norms(s) + div
    grad, diagonal = batch_gradient_and_hessian_diagonal(energy_fn, method, chunk_size=chunk_size)(xs)
    return 0.5 * _sq_norms(grad) - _per_example_sum(diagonal) + hessian_penalty * _sq_norms(diagonal)


def ism_per_example(score_fn: ScoreFn, x: Array, method: str = "auto", *, chunk_size: int | None = None,
                    hessian_penalty: float = 0.0) -> Array:
    """1/2 |s(x)|² + tr(∂s/∂x) [+ λ Σ_k (∂s_k/∂x_k)²] for one x of any shape, exact (see `ism`)."""
    _validate.example("x", x)
    if _penalised(hessian_penalty):
        return _ism_terms(score_fn, x[None], method, chunk_size, hessian_penalty)[0]
    score_fn = _validate.same_shape("score_fn", score_fn)
    s, div = batch_value_and_divergence(score_fn, method, chunk_size=chunk_size)(x[None])
    return 0.5 * _dot(s[0], s[0]) + div[0]


def ism(score_fn: ScoreFn, xs: Array, method: str = "auto", *, chunk_size: int | None = None,
        hessian_penalty: float = 0.0) -> Array:
    """Implicit score matching (Hyvärinen 2005) of a score network: E_p [1/2 |s(x)|² + tr(∂s/∂x)].

    The trace is exact (`method` in `jsm.scores.METHODS`), never estimated; "auto" takes
    a first-order forward jet of s with the batch folded into its matrix products. For
    an energy model q ∝ exp(-f) call `ism_energy(f, xs)` instead: the same loss, several
    times cheaper (passing `score_of(f)` here differentiates -∇f's graph). On a finite data
    set a flexible s can drive this to -∞ by spiking the divergence at the data points:
    penalise the curvature (`hessian_penalty`), or prefer `dsm`.

    Regularised score matching (Kingma & LeCun 2010, "Regularized estimation of image statistics
    by score matching"): with λ = `hessian_penalty` > 0 the loss is

        E_p [1/2 |s(x)|² + tr(∂s/∂x) + λ Σ_k (∂s_k/∂x_k)²],

    the squared diagonal of ∂s/∂x (for s = -∇f, of the Hessian of f), which they approximated
    and which is exact here, from the same jet as the trace (`jsm.jacobian_diagonal`). λ = 0 is
    the plain loss, computed as before, bit for bit.

    Examples may have any shape: |s|² and tr ∂s/∂x = Σ_k ∂s_k/∂x_k run over all d = prod(shape)
    entries.

    Args:
      score_fn: s, shape -> shape, for one example of shape `shape` ((d,), (h, w, c), ...).
      xs: (n, *shape) samples of p.
      method: how the exact trace is computed.
      chunk_size: "forward" / "auto" only: push the d Jacobian columns through in blocks of this
        many, memory n·chunk_size·width per layer instead of n·d·width (as in `jsm.divergence`);
        None: all at once.
      hessian_penalty: λ >= 0, the weight of the curvature penalty (data: may be traced).
    """
    xs = _validate.examples("xs", xs)
    return jnp.mean(_ism_terms(score_fn, xs, method, chunk_size, hessian_penalty))


def ism_energy_per_example(energy_fn: EnergyFn, x: Array, method: str = "auto", *,
                           chunk_size: int | None = None, hessian_penalty: float = 0.0) -> Array:
    """1/2 |∇f(x)|² - Δf(x) [+ λ Σ_k (∂²f/∂x_k²)²] for one x of any shape: ISM's term for s = -∇f, exact."""
    _validate.example("x", x)
    if _penalised(hessian_penalty):
        return _ism_energy_terms(energy_fn, x[None], method, chunk_size, hessian_penalty)[0]
    s, div = batch_score_and_divergence_of_energy(energy_fn, method, chunk_size=chunk_size)(x[None])
    return 0.5 * _dot(s[0], s[0]) + div[0]


def ism_energy(energy_fn: EnergyFn, xs: Array, method: str = "auto", *, chunk_size: int | None = None,
               hessian_penalty: float = 0.0) -> Array:
    """Implicit score matching of an energy model q ∝ exp(-f): E_p [1/2 |∇f(x)|² - Δf(x)].

    J_ISM for the score s = -∇f, whose divergence is tr ∂s/∂x = -Δf. With "auto" ONE
    second-order forward jet of f gives ∇f and Δf together, never building the
    gradient's graph: 3-7x faster than "jacfwd", while `ism(score_of(f), xs)` (a first-order
    jet of -∇f's graph) costs about as much as "jacfwd" (experiments/bench/trace_cost.py,
    rows "forward", "jacfwd", "score_of"). "jacfwd" and "jacrev" are the references.
    Examples may have any shape: Δf = Σ_k ∂²f/∂x_k² over all d = prod(shape) entries.

    With λ = `hessian_penalty` > 0, Kingma & LeCun (2010)'s regularised score matching:

        E_p [1/2 |∇f(x)|² - Δf(x) + λ Σ_k (∂²f/∂x_k²)²],

    the exact Hessian diagonal (`jsm.hessian_diagonal`) from ONE jet that also gives ∇f and
    Δf = Σ_k ∂²f/∂x_k² (about twice the plain step's cost). It keeps ISM's second term from
    running to -∞ on finite data by spiking the curvature at the training points
    (experiments/ism_overfitting.py). λ = 0 is the plain loss, bit for bit.

    Args:
      energy_fn: f, shape -> (), for one example of shape `shape` ((d,), (h, w, c), ...).
      xs: (n, *shape) samples of p.
      method: how the exact Laplacian is computed (`jsm.scores.METHODS`).
      chunk_size: "forward" / "auto" only: Jacobian columns per block, as in `ism`; None: all.
      hessian_penalty: λ >= 0, the weight of the curvature penalty (data: may be traced).
    """
    xs = _validate.examples("xs", xs)
    return jnp.mean(_ism_energy_terms(energy_fn, xs, method, chunk_size, hessian_penalty))


# --- denoising score matching: learn the score of p_σ = p * N(0, σ² I) ---------


VARIANCE_REDUCTIONS = (None, "antithetic", "control_variate")


def _denoising_term(score_at, x: Array, eps: Array, sigma, variance_reduction) -> Array:
    """1/2 |s(x + ε) + ε/σ²|², or its variance-reduced estimator (see `dsm`); norms over all entries of x."""
    loss = lambda e: 0.5 * jnp.sum((_score_at(score_at, x + e) + e / sigma**2) ** 2)
    if variance_reduction == "antithetic":
        return 0.5 * (loss(eps) + loss(-eps))
    if variance_reduction == "control_variate":
        return loss(eps) - _dot(eps, _score_at(score_at, x)) / sigma**2
    return loss(eps)


def dsm_per_example(score_fn: ScoreFn, x: Array, eps: Array, sigma: float, variance_reduction=None) -> Array:
    """1/2 |s(x + ε) + ε/σ²|² for one clean x and its noise ε, both of the example's shape (see `dsm`)."""
    return _denoising_term(score_fn, x, eps, sigma, variance_reduction)


def dsm(score_fn: ScoreFn, key: Array, xs: Array, sigma: float, variance_reduction: str | None = None) -> Array:
    """Denoising score matching (Vincent 2011): 1/2 E |s(x + ε) + ε/σ²|², ε ~ N(0, σ² I).

    Minimised by the score of p_σ = p * N(0, σ² I), not of p. The noise is
    ε = σ · jax.random.normal(key, xs.shape). Examples may have any shape (vectors,
    images): |·|² sums over all their d = prod(shape) entries.

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
      score_fn: s, shape -> shape, for one example of shape `shape` ((d,), (h, w, c), ...).
      key: PRNG key for the noise.
      xs: (n, *shape) clean samples of p.
      sigma: the noise scale σ > 0.
      variance_reduction: one of `VARIANCE_REDUCTIONS`.
    """
    xs = _validate.examples("xs", xs)
    _validate.key("key", key)
    _validate.positive("sigma", sigma)
    _validate.choice("variance_reduction", variance_reduction, VARIANCE_REDUCTIONS)
    eps = sigma * jax.random.normal(key, xs.shape, xs.dtype)
    return _batch_mean(lambda x, e: dsm_per_example(score_fn, x, e, sigma, variance_reduction), xs, eps)


def ncsn_per_example(score_fn: NoiseScoreFn, x: Array, eps: Array, sigma: Array, variance_reduction=None) -> Array:
    """σ² · 1/2 |s(x + ε, σ) + ε/σ²|² for one x and its noise ε (the example's shape) and its σ ()."""
    return sigma**2 * _denoising_term(lambda y: score_fn(y, sigma), x, eps, sigma, variance_reduction)


def ncsn(score_fn: NoiseScoreFn, key: Array, xs: Array, sigmas: Array, variance_reduction: str | None = None) -> Array:
    """Noise-conditional DSM (Song & Ermon 2019) over a schedule of noise scales.

    1/L Σ_i λ(σ_i) J_DSM(s(·, σ_i); σ_i) with λ(σ) = σ², estimated by drawing one
    σ uniformly from `sigmas` per example. The weight σ² makes every level's term
    O(1), since |ε/σ²|² ~ d/σ². `variance_reduction` as in `dsm`, level by level.
    Examples may have any shape; `nets.UNet` is s(x, σ) for images (h, w, c).

    Args:
      score_fn: s(x, σ), (shape, ()) -> shape, for one example of shape `shape`.
      key: PRNG key for the levels and the noise.
      xs: (n, *shape) clean samples of p, e.g. (n, d) or (n, h, w, c).
      sigmas: (L,) positive noise scales, conventionally decreasing.
      variance_reduction: one of `VARIANCE_REDUCTIONS`.
    """
    xs = _validate.examples("xs", xs)
    _validate.key("key", key)
    sigmas = _validate.float_array("sigmas", sigmas, ndim=1)
    if sigmas.shape[0] == 0:
        raise ValueError("sigmas must hold at least one noise scale, got an empty array")
    _validate.positive("sigmas", sigmas)
    _validate.choice("variance_reduction", variance_reduction, VARIANCE_REDUCTIONS)
    k_level, k_noise = jax.random.split(key)
    level = jax.random.randint(k_level, (xs.shape[0],), 0, sigmas.shape[0])
    sigma = sigmas.astype(xs.dtype)[level]
    eps = sigma.reshape((-1,) + (1,) * (xs.ndim - 1)) * jax.random.normal(k_noise, xs.shape, xs.dtype)
    per_example = lambda x, e, s: ncsn_per_example(score_fn, x, e, s, variance_reduction)
    return _batch_mean(per_example, xs, eps, sigma)


# --- continuous-time DSM: the score of p_t for every t of an SDE (`jsm.diffusion` samples with it) ----


WEIGHTINGS = ("sigma2", "likelihood")


def training_times(sde: SDE, key: Array, n: int, *, t_min: float = 1e-5, weighting: str = "sigma2"):
    """Times t (n,) and their weights w (n,), so that mean_i w_i ℓ(t_i) estimates E_{t~U(t_min,1)} λ(t) ℓ(t).

    "sigma2":      λ(t) = σ_t² (Song & Ermon; every t's term O(1)), t ~ U(t_min, 1), w = σ_t².
    "likelihood":  λ(t) = g(t)² (Song, Durkan, Murray & Ermon 2021: then (1 - t_min) J is the
                   score-matching part of a bound on -E log p_0). Drawn uniformly, g(t)² ℓ(t)
                   ~ (g²/σ²) · O(1) blows up as t -> 0 (like 1/t for the VP SDE, so its variance
                   like 1/t_min), so t is importance-sampled from q(t) ∝ g(t)²/σ_t² = -dλ_snr/dt,
                   λ_snr(t) = log(α_t²/σ_t²): uniform in log-SNR, t = λ_snr⁻¹(u), u ~ U(λ_snr(1),
                   λ_snr(t_min)), and w = g²/((1 - t_min) q) = Z σ_t² / (1 - t_min), Z = λ_snr(t_min) -
                   λ_snr(1). Unbiased, and w ℓ = Z/(1 - t_min) · 1/2 |σ_t s + z|² is O(1) at every t:
                   finite variance however small t_min.
    """
    check_sde(sde)
    _validate.key("key", key)
    _validate.choice("weighting", weighting, WEIGHTINGS)
    check_t_min(t_min, sde.T)
    u = jax.random.uniform(key, (n,))
    if weighting == "sigma2":
        t = t_min + (sde.T - t_min) * u
        return t, sde.marginal(t)[1] ** 2
    hi, lo = sde.log_snr(t_min), sde.log_snr(sde.T)
    t = jnp.clip(sde.t_of_log_snr(lo + u * (hi - lo)), t_min, sde.T)
    return t, (hi - lo) / (sde.T - t_min) * sde.marginal(t)[1] ** 2


def dsm_sde_per_example(score_fn, sde: SDE, x: Array, t, z: Array, weight, variance_reduction=None, *,
                        args: tuple = ()) -> Array:
    """w · 1/2 |s(α_t x + σ_t z, t, *args) + z/σ_t|² for ONE clean x and its noise z (any shape, the same), t and w ().

    This is `dsm`'s term at the clean point α_t x with noise ε = σ_t z, so `variance_reduction`
    acts as there, at the fixed t: "antithetic" averages the terms of z and -z; "control_variate"
    subtracts z·s(α_t x, t)/σ_t, the cross term at the clean point, whose mean over z is zero.
    """
    alpha, sigma = sde.marginal(t)
    return weight * _denoising_term(lambda v: score_fn(v, t, *args), alpha * x, sigma * z, sigma, variance_reduction)


def dsm_sde(
    score_fn, sde: SDE, key: Array, xs: Array, *, t_min: float = 1e-5, weighting: str = "sigma2",
    variance_reduction: str | None = None, args: tuple = (),
) -> Array:
    """Denoising score matching over the SDE's times (Song et al. 2021), a batch mean.

        J(θ) = E_{t ~ U(t_min, 1)} λ(t) E 1/2 |s(α_t x_0 + σ_t z, t) + z/σ_t|²,   z ~ N(0, I),

    minimised by s(·, t) = ∇log p_t. Each example gets its own t (`training_times`, which
    documents the weightings and the importance sampling of "likelihood") and noise z:
    k_t, k_z = jax.random.split(key).

    Args:
      score_fn: s(x, t, *args), one example x (any shape) and a scalar t -> x.shape.
      sde: a `jsm.sde` SDE.
      key: PRNG key.
      xs: (n, *shape) clean data.
      t_min: the smallest time, in (0, 1).
      weighting: "sigma2" (λ = σ_t²) or "likelihood" (λ = g(t)², importance-sampled).
      variance_reduction: None, "antithetic" or "control_variate" (see `jsm.objectives.dsm`).
        Both remove the cross term z·s/σ_t, whose variance grows like 1/σ_t², so they pay off
        where σ_t is small: for the exact score of a 2-D mixture under the VP SDE, they cut the
        per-example θ-gradient's variance 400x at t = 1e-3 and 24x at t = 0.01. At large σ_t
        the clean point's score s(α_t x, t) no longer predicts s(α_t x + σ_t z, t), and the
        control variate ADDS variance (3.7x at t = 0.5; ~1.7x averaged over t ~ U(t_min, 1)),
        while antithetic sampling still helps (0.4x at t = 0.5; ~0.85x over t).
      args: passed on to score_fn (network parameters): data, as in `jsm.diffusion`.

    Returns:
      () the batch mean of the per-example terms.
    """
    check_sde(sde)
    xs = _validate.examples("xs", xs)
    _validate.key("key", key)
    _validate.choice("variance_reduction", variance_reduction, VARIANCE_REDUCTIONS)
    k_t, k_z = jax.random.split(key)
    t, w = training_times(sde, k_t, xs.shape[0], t_min=t_min, weighting=weighting)
    z = jax.random.normal(k_z, xs.shape, xs.dtype)
    per_example = lambda x, ti, zi, wi: dsm_sde_per_example(score_fn, sde, x, ti, zi, wi, variance_reduction,
                                                             args=args)
    return jnp.mean(jax.vmap(per_example)(xs, t.astype(xs.dtype), z, w.astype(xs.dtype)))


# --- sliced score matching: random projections of the trace -------------------


def ssm_per_example(score_fn: ScoreFn, x: Array, v: Array) -> Array:
    """1/2 |s(x)|² + mean_j v_j^T (∂s/∂x) v_j for one x of any shape and projections v (m, *x.shape)."""
    s, jvp = jax.linearize(lambda y: _score_at(score_fn, y), x)
    m = v.shape[0]
    vjv = jnp.sum(v.reshape(m, -1) * jax.vmap(jvp)(v).reshape(m, -1), axis=-1)
    return 0.5 * _dot(s, s) + jnp.mean(vjv)


def ssm(score_fn: ScoreFn, key: Array, xs: Array, n_projections: int = 1) -> Array:
    """Sliced score matching (Song et al. 2019), the variance-reduced form.

    E_p [1/2 |s(x)|² + E_v v^T (∂s/∂x) v], v ~ N(0, I): an unbiased estimate of
    J_ISM at the cost of `n_projections` JVPs per example instead of d. Examples may
    have any shape; v then has the example's shape and v^T (∂s/∂x) v sums over all entries.

    Args:
      score_fn: s, shape -> shape, for one example of shape `shape`.
      key: PRNG key for the projections v, normal(key, (n, n_projections, *shape)).
      xs: (n, *shape) samples of p.
      n_projections: projections per example.
    """
    xs = _validate.examples("xs", xs)
    _validate.key("key", key)
    n_projections = _validate.positive_int("n_projections", n_projections)
    v = jax.random.normal(key, (xs.shape[0], n_projections, *xs.shape[1:]), xs.dtype)
    return _batch_mean(lambda x, vi: ssm_per_example(score_fn, x, vi), xs, v)


# --- the identities, measured on a model ------------------------------------------


class Identities(NamedTuple):
    """The score-matching identities measured on one model s, paired Monte Carlo.

    Every field is a scalar. Per example x_i ~ p and ε_i ~ N(0, σ² I), the terms of
    each identity are evaluated at the same points, so their gaps have small errors:

      esm, ism, c          J_ESM(s), J_ISM(s), C = 1/2 E_p |∇log p|²
      se                   standard error of gap = esm - (ism + c), from the per-example
                           differences (mean 0 when the identity holds)
      esm_noised, dsm, c_noised
                           J_ESM(s; p_σ) (at y = x + ε ~ p_σ), J_DSM(s),
                           C' = 1/2 E_{p_σ} |∇log p_σ|² - d/(2σ²)
      se_noised            standard error of gap_noised = esm_noised - (dsm + c_noised)
    """

    esm: Array
    ism: Array
    c: Array
    se: Array
    esm_noised: Array
    dsm: Array
    c_noised: Array
    se_noised: Array

    @property
    def ism_plus_c(self) -> Array:
        return self.ism + self.c

    @property
    def dsm_plus_c(self) -> Array:
        return self.dsm + self.c_noised

    @property
    def gap(self) -> Array:
        """J_ESM - (J_ISM + C): zero up to Monte Carlo error, `se`."""
        return self.esm - self.ism_plus_c

    @property
    def gap_noised(self) -> Array:
        """J_ESM(p_σ) - (J_DSM + C'): zero up to Monte Carlo error, `se_noised`."""
        return self.esm_noised - self.dsm_plus_c


def _mean_and_se(terms: Array) -> tuple[Array, Array]:
    n = terms.shape[0]
    return jnp.mean(terms), jnp.std(terms, ddof=1) / jnp.sqrt(n)


def score_matching_identities(
    score_fn: ScoreFn, true_score_fn: ScoreFn, noised_score_fn: ScoreFn, key: Array, xs: Array,
    sigma: float, method: str = "auto",
) -> Identities:
    """Measure J_ESM = J_ISM + C and J_ESM(s; p_σ) = J_DSM + C' on a model s.

        J_ESM(s) = 1/2 E_p |s - ∇log p|²,       J_ISM(s) = E_p [1/2 |s|² + tr ∂s/∂x],
        C = 1/2 E_p |∇log p|²,
        J_ESM(s; p_σ) = 1/2 E_{p_σ} |s - ∇log p_σ|²,   J_DSM(s) = 1/2 E |s(x + ε) + ε/σ²|²,
        C' = 1/2 E_{p_σ} |∇log p_σ|² - d/(2σ²),        p_σ = p * N(0, σ² I),

    all estimated on the same samples: x_i the rows of xs, ε_i = σ · normal(key, xs.shape)
    (the draw `dsm(score_fn, key, xs, sigma)` makes), y_i = x_i + ε_i. The standard errors
    are those of the paired per-example differences, so a wrong constant, a wrong trace
    or a wrong DSM target shows as a gap of many standard errors.

    Examples may have any shape, d = prod(shape): norms and traces run over all entries.

    Args:
      score_fn: s, shape -> shape, the model.
      true_score_fn: ∇log p, shape -> shape (e.g. `target.score`).
      noised_score_fn: ∇log p_σ, shape -> shape (e.g. `target.noised(sigma).score`).
      key: PRNG key for the noise ε.
      xs: (n, *shape) samples of p, n >= 2.
      sigma: the noise scale σ > 0.
      method: how ISM's exact trace is computed (`jsm.scores.METHODS`).

    Returns:
      `Identities`: the measured terms, `.gap` / `.gap_noised` and their errors `.se` / `.se_noised`.
    """
    xs = _validate.examples("xs", xs)
    if xs.shape[0] < 2:
        raise ValueError(f"xs must hold at least 2 examples for a standard error, got shape {tuple(xs.shape)}")
    _validate.key("key", key)
    _validate.positive("sigma", sigma)
    score_fn = _validate.same_shape("score_fn", score_fn)
    true_score_fn = _validate.same_shape("true_score_fn", true_score_fn)
    noised_score_fn = _validate.same_shape("noised_score_fn", noised_score_fn)
    d = math.prod(xs.shape[1:])
    eps = sigma * jax.random.normal(key, xs.shape, xs.dtype)
    s, div = batch_value_and_divergence(score_fn, method)(xs)
    true_s = jax.vmap(true_score_fn)(xs)
    esm_i = 0.5 * _per_example_sum((s - true_s) ** 2)
    ism_i = 0.5 * _sq_norms(s) + div
    c_i = 0.5 * _sq_norms(true_s)
    ys = xs + eps
    noised_s = jax.vmap(noised_score_fn)(ys)
    esm_noised_i = 0.5 * _per_example_sum((jax.vmap(score_fn)(ys) - noised_s) ** 2)
    dsm_i = jax.vmap(lambda x, e: dsm_per_example(score_fn, x, e, sigma))(xs, eps)
    c_noised_i = 0.5 * _sq_norms(noised_s) - d / (2 * sigma**2)
    _, se = _mean_and_se(esm_i - ism_i - c_i)
    _, se_noised = _mean_and_se(esm_noised_i - dsm_i - c_noised_i)
    mean = jnp.mean
    return Identities(mean(esm_i), mean(ism_i), mean(c_i), se,
                      mean(esm_noised_i), mean(dsm_i), mean(c_noised_i), se_noised)
