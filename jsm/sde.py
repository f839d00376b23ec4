"""Forward SDEs: data to noise in continuous time (Song et al. 2021, "Score-based generative
modeling through stochastic differential equations").

On t in [0, T], T = 1, data x_0 ~ p_0 is noised by

    dx = f(x, t) dt + g(t) dW,

with a linear drift f(x, t) = a(t) x, so that the transition from x_0 is Gaussian,

    x_t = α_t x_0 + σ_t z,   z ~ N(0, I),   a(t) = d log α_t / dt,   dσ_t²/dt = 2 a(t) σ_t² + g(t)²,

(`marginal(t) -> (α_t, σ_t)`) and p_t = p_0 scaled by α_t, convolved with N(0, σ_t² I). At T, p_T is
close to the prior π (`prior_sample`, `prior_log_prob`), which is where sampling starts.

Three SDEs, each a frozen pytree whose parameters are leaves (a new value never recompiles):

    VESDE     f = 0,  g = σ(t) sqrt(2 log(σ_max/σ_min)),  σ(t) = σ_min (σ_max/σ_min)^t.
    VPSDE     f = -β(t) x / 2,  g = sqrt(β(t)),  β(t) = β_min + t (β_max - β_min).
    SubVPSDE  f = -β(t) x / 2,  g = sqrt(β(t) (1 - exp(-2 B(t)))),  B(t) = ∫_0^t β.

The link to the tutorial: under the VE SDE, x_t = x_0 + σ_t z is exactly denoising score
matching's corruption at noise level σ_t, so learning s(x, t) for all t is DSM at every
level at once; NCSN's geometric ladder σ_1 > ... > σ_L with annealed Langevin is this
SDE seen at L times, its reverse-time sampler a Langevin corrector at each (see
`jsm.diffusion.reverse_sde`).

Every function of x takes ONE example of any shape; functions of t accept a scalar or an
array of times (elementwise).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jsm import _validate, targets

__all__ = ["SDE", "SDES", "SubVPSDE", "VESDE", "VPSDE", "check_sde", "check_t_min", "check_time"]

Array = jax.Array


def _pytree(cls):
    """A frozen dataclass whose fields are pytree leaves."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def _scalar(obj, name: str) -> None:
    """A concrete parameter, checked on the host (positive, finite, a scalar), stored as a float array.

    Tracers and abstract values (pytree unflattening under a transform) pass through untouched.
    """
    x = getattr(obj, name)
    if _validate.is_concrete(x):
        host = np.asarray(x)
        if host.ndim != 0 or not np.issubdtype(host.dtype, np.number):
            raise ValueError(f"{name} must be a real scalar, got {x!r}")
        _validate.positive(name, host)
        object.__setattr__(obj, name, jnp.asarray(x, dtype=jnp.result_type(float)))


def check_time(t, name: str = "t", T: float = 1.0) -> Array:
    """t as a float array, in [0, T] wherever it is concrete (checked on the host, before any tracing)."""
    if _validate.is_concrete(t):
        host = np.asarray(t, dtype=np.float64)
        if not np.all(np.isfinite(host)) or np.any(host < 0) or np.any(host > T):
            got = f"{host.item()!r}" if host.size == 1 else f"values in [{host.min()!r}, {host.max()!r}]"
            raise ValueError(f"{name} must be in [0, {T}], got {got}")
    return jnp.asarray(t, dtype=jnp.result_type(t, float))


def check_sde(sde, name: str = "sde") -> None:
    """A TypeError naming `name` unless sde is one of this module's SDEs."""
    if not isinstance(sde, SDE):
        raise TypeError(f"{name} must be a jsm.sde SDE (VESDE, VPSDE, SubVPSDE), got {type(sde).__name__}")


def check_t_min(t_min, T: float = 1.0, name: str = "t_min") -> None:
    """A ValueError naming `name` unless t_min (where concrete) is in (0, T): where a solve or a loss stops."""
    if _validate.is_concrete(t_min) and not 0.0 < float(t_min) < T:
        raise ValueError(f"{name} must be in (0, {T}), got {t_min!r}")


class SDE:
    """Shared behaviour: the prior, the reverse drift and the noised closed-form targets.

    A subclass defines `drift`, `diffusion`, `marginal`, `prior_std`, `log_snr` and `t_of_log_snr`.
    """

    T: ClassVar[float] = 1.0

    def drift(self, x: Array, t) -> Array:
        raise NotImplementedError

    def diffusion(self, t) -> Array:
        raise NotImplementedError

    def marginal(self, t) -> tuple[Array, Array]:
        raise NotImplementedError

    def prior_std(self) -> Array:
        raise NotImplementedError

    def log_snr(self, t) -> Array:
        """λ(t) = log(α_t² / σ_t²), decreasing; -dλ/dt = g(t)² / σ_t² (the likelihood weighting's density)."""
        raise NotImplementedError

    def t_of_log_snr(self, log_snr) -> Array:
        """The inverse of `log_snr`: the time at which log(α_t²/σ_t²) = `log_snr`."""
        raise NotImplementedError

    def prior_sample(self, key: Array, shape) -> Array:
        """x_T ~ π = N(0, prior_std² I), an array of `shape` (e.g. (n, d) for n examples)."""
        _validate.key("key", key)
        return self.prior_std() * jax.random.normal(key, tuple(shape))

    def prior_log_prob(self, x: Array) -> Array:
        """log π(x) for ONE example of any shape, summed over all its entries: ()."""
        s = self.prior_std()
        return -0.5 * jnp.sum((x / s) ** 2) - x.size * (jnp.log(s) + 0.5 * targets.LOG_2PI)

    def noised(self, target, t) -> targets.Target:
        """p_t, the law of x_t = α_t x_0 + σ_t z for x_0 ~ `target`, in closed form.

        Gaussian N(m, Σ) -> N(α_t m, α_t² Σ + σ_t² I);
        GaussianMixture Σ_k w_k N(m_k, s_k² I) -> Σ_k w_k N(α_t m_k, (α_t² s_k² + σ_t²) I).
        Its `score` is the exact ∇log p_t, its `log_prob` the exact log p_t.

        Args:
          target: a `jsm.targets.Gaussian` or `GaussianMixture`.
          t: a scalar time in [0, T].
        """
        t = check_time(t, T=self.T)
        if jnp.ndim(t) != 0:
            raise ValueError(f"t must be a scalar time, got shape {jnp.shape(t)}")
        alpha, sigma = self.marginal(t)
        if isinstance(target, targets.Gaussian):
            return targets.Gaussian(alpha * target.mean, alpha**2 * target.cov).noised(sigma)
        if isinstance(target, targets.GaussianMixture):
            return targets.GaussianMixture(alpha * target.means, alpha * target.scales, target.weights).noised(sigma)
        raise TypeError(f"target must be a jsm.targets.Gaussian or GaussianMixture, got {type(target).__name__}")


@_pytree
class VESDE(SDE):
    """Variance exploding: dx = g(t) dW, no drift.

        σ(t) = σ_min (σ_max/σ_min)^t,   g(t) = σ(t) sqrt(2 log(σ_max/σ_min)),   so dσ(t)²/dt = g(t)².

    Marginal: α_t = 1, σ_t = sqrt(σ(t)² - σ_min²), the exact law of the SDE started from
    the clean data at t = 0 (σ_0 = 0). score_sde instead perturbs with σ(t) itself,
    which is this SDE started from data already noised at σ_min; the two differ by σ_min²
    in variance, which matters only near t = 0, where it is all of the noise. Here the
    marginal, the drift and the diffusion agree exactly (tested), and σ_t -> 0 as t -> 0.
    Prior: π = N(0, σ_max² I) (p_T's own variance is σ_max² - σ_min² plus the data's).

    Args:
      sigma_min: σ_min > 0.
      sigma_max: σ_max > σ_min, larger than the data's diameter so that p_T ≈ π.
    """

    sigma_min: Array = 0.01
    sigma_max: Array = 50.0

    def __post_init__(self):
        _scalar(self, "sigma_min")
        _scalar(self, "sigma_max")
        if _validate.is_concrete(self.sigma_min) and _validate.is_concrete(self.sigma_max):
            if not float(self.sigma_min) < float(self.sigma_max):
                raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={float(self.sigma_min)} "
                                 f"and sigma_max={float(self.sigma_max)}")

    def _log_ratio(self) -> Array:
        return jnp.log(self.sigma_max) - jnp.log(self.sigma_min)

    def drift(self, x: Array, t) -> Array:
        """f(x, t) = 0."""
        check_time(t, T=self.T)
        return jnp.zeros_like(x)

    def diffusion(self, t) -> Array:
        """g(t) = σ_min (σ_max/σ_min)^t sqrt(2 log(σ_max/σ_min))."""
        t = check_time(t, T=self.T)
        return self.sigma_min * jnp.exp(t * self._log_ratio()) * jnp.sqrt(2.0 * self._log_ratio())

    def marginal(self, t) -> tuple[Array, Array]:
        """(α_t, σ_t) = (1, σ_min sqrt((σ_max/σ_min)^{2t} - 1))."""
        t = check_time(t, T=self.T)
        sigma = self.sigma_min * jnp.sqrt(jnp.expm1(2.0 * t * self._log_ratio()))
        return jnp.ones_like(sigma), sigma

    def prior_std(self) -> Array:
        return self.sigma_max

    def log_snr(self, t) -> Array:
        """λ(t) = -log σ_t² = -2 log σ_min - log((σ_max/σ_min)^{2t} - 1)."""
        t = check_time(t, T=self.T)
        return -2.0 * jnp.log(self.sigma_min) - jnp.log(jnp.expm1(2.0 * t * self._log_ratio()))

    def t_of_log_snr(self, log_snr) -> Array:
        """t = log(1 + e^{-λ} / σ_min²) / (2 log(σ_max/σ_min))."""
        return jax.nn.softplus(-log_snr - 2.0 * jnp.log(self.sigma_min)) / (2.0 * self._log_ratio())


class _BetaSDE(SDE):
    """The linear schedule β(t) = β_min + t (β_max - β_min) shared by VP and sub-VP."""

    def __post_init__(self):
        _scalar(self, "beta_min")
        _scalar(self, "beta_max")
        if _validate.is_concrete(self.beta_min) and _validate.is_concrete(self.beta_max):
            if float(self.beta_min) > float(self.beta_max):
                raise ValueError(f"beta_min must be <= beta_max, got beta_min={float(self.beta_min)} "
                                 f"and beta_max={float(self.beta_max)}")

    def beta(self, t) -> Array:
        """β(t) = β_min + t (β_max - β_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t) -> Array:
        """B(t) = ∫_0^t β = β_min t + (β_max - β_min) t² / 2."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def _t_of_integrated_beta(self, b) -> Array:
        """The root t >= 0 of B(t) = b, written without cancellation (and valid for β_max = β_min)."""
        return 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * (self.beta_max - self.beta_min) * b))

    def drift(self, x: Array, t) -> Array:
        """f(x, t) = -β(t) x / 2."""
        t = check_time(t, T=self.T)
        return -0.5 * self.beta(t) * x

    def prior_std(self) -> Array:
        return jnp.ones_like(self.beta_min)


@_pytree
class VPSDE(_BetaSDE):
    """Variance preserving (the continuous DDPM): dx = -β(t) x / 2 dt + sqrt(β(t)) dW.

        α_t = exp(-B(t) / 2),   σ_t² = 1 - exp(-B(t)),   B(t) = β_min t + (β_max - β_min) t² / 2.

    A unit-variance p_0 keeps unit variance for all t. Prior: π = N(0, I), the SDE's
    stationary law (at T, α_T = exp(-B(1)/2) ≈ 0.0066 with the defaults).

    Args:
      beta_min: β(0) > 0.
      beta_max: β(1) >= β_min.
    """

    beta_min: Array = 0.1
    beta_max: Array = 20.0

    def diffusion(self, t) -> Array:
        """g(t) = sqrt(β(t))."""
        t = check_time(t, T=self.T)
        return jnp.sqrt(self.beta(t))

    def marginal(self, t) -> tuple[Array, Array]:
        """(α_t, σ_t) = (exp(-B(t)/2), sqrt(1 - exp(-B(t))))."""
        t = check_time(t, T=self.T)
        b = self.integrated_beta(t)
        return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))

    def log_snr(self, t) -> Array:
        """λ(t) = -log(exp(B(t)) - 1)."""
        t = check_time(t, T=self.T)
        return -jnp.log(jnp.expm1(self.integrated_beta(t)))

    def t_of_log_snr(self, log_snr) -> Array:
        """B = log(1 + e^{-λ}), then t = B⁻¹."""
        return self._t_of_integrated_beta(jax.nn.softplus(-log_snr))


@_pytree
class SubVPSDE(_BetaSDE):
    """Sub-variance-preserving: dx = -β(t) x / 2 dt + sqrt(β(t) (1 - exp(-2 B(t)))) dW.

        α_t = exp(-B(t) / 2),   σ_t = 1 - exp(-B(t))   (σ_t itself, not its square),

    a variance bounded by the VP SDE's at every t (Song et al. 2021), which gave them
    better likelihoods. Prior: π = N(0, I).

    Args:
      beta_min: β(0) > 0.
      beta_max: β(1) >= β_min.
    """

    beta_min: Array = 0.1
    beta_max: Array = 20.0

    def diffusion(self, t) -> Array:
        """g(t) = sqrt(β(t) (1 - exp(-2 B(t))))."""
        t = check_time(t, T=self.T)
        return jnp.sqrt(-self.beta(t) * jnp.expm1(-2.0 * self.integrated_beta(t)))

    def marginal(self, t) -> tuple[Array, Array]:
        """(α_t, σ_t) = (exp(-B(t)/2), 1 - exp(-B(t)))."""
        t = check_time(t, T=self.T)
        b = self.integrated_beta(t)
        return jnp.exp(-0.5 * b), -jnp.expm1(-b)

    def log_snr(self, t) -> Array:
        """λ(t) = -2 log(2 sinh(B(t)/2))   (σ_t/α_t = e^{B/2} - e^{-B/2})."""
        t = check_time(t, T=self.T)
        return -2.0 * jnp.log(2.0 * jnp.sinh(0.5 * self.integrated_beta(t)))

    def t_of_log_snr(self, log_snr) -> Array:
        """B = 2 asinh(e^{-λ/2} / 2), then t = B⁻¹."""
        return self._t_of_integrated_beta(2.0 * jnp.arcsinh(0.5 * jnp.exp(-0.5 * log_snr)))


SDES = (VESDE, VPSDE, SubVPSDE)
