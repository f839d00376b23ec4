"""Analytic targets: densities p(x) = exp(-f(x)) / Z known in closed form.

Every target is an immutable pytree (it crosses `jit` and `vmap` boundaries
like an array) with

    energy(x)       f(x), the unnormalised negative log-density      ()
    log_z()         log Z = log ∫ exp(-f(x)) dx, in closed form       ()
    log_prob(x)     log p(x) = -f(x) - log Z                          ()
    score(x)        s(x) = ∇ log p(x) = -∇f(x), written out by hand   (d,)
    log_prob_and_score(x)  (log p(x), s(x)) together; a mixture shares
                    one softmax between them (for `samplers.mala`'s
                    value_and_grad)                                   ((), (d,))
    sample(key, n)  n exact, independent samples                      (n, d)
    noised(sigma)   p_σ = p * N(0, σ² I) as a Gaussian or a GaussianMixture
                    (Gaussian, GaussianMixture, Ring; Banana and Funnel have no
                    closed form and raise NotImplementedError)

Functions of x take ONE example of shape (d,); batch them with `jax.vmap`.
The energies are written so that a batch of them is a few dense matrix
products (a mixture's |x - m_k|^2 as |x|^2 - 2 x·m_k + |m_k|^2); a mixture's
log_prob_and_score, made for chain loops, sums the differences instead.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular
from jax.scipy.special import logsumexp

from jsm import _validate

__all__ = [
    "Banana", "Funnel", "Gaussian", "GaussianMixture", "LOG_2PI", "Ring", "Target",
]

Array = jax.Array
LOG_2PI = math.log(2 * math.pi)


def _pytree(cls):
    """A frozen dataclass whose fields are pytree leaves."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls)


def _field(obj, name: str, x, ndim: int) -> None:
    """Convert a user-given field to a float array and check its rank.

    Pytree unflattening calls __init__ again with whatever leaves a transform
    holds (tracers, shape structs, None): those pass through untouched.
    """
    if _validate.is_concrete(x):
        object.__setattr__(obj, name, _validate.float_array(name, x, ndim=ndim))


class Target:
    """Shared behaviour: the normalised log-density from f and log Z."""

    def log_prob(self, x: Array) -> Array:
        """log p(x) = -f(x) - log Z."""
        return -self.energy(x) - self.log_z()

    def log_prob_and_score(self, x: Array) -> tuple[Array, Array]:
        """(log p(x), s(x)), the two closed forms; GaussianMixture computes them in one pass."""
        return self.log_prob(x), self.score(x)

    def noised(self, sigma: float) -> Target:
        """p_σ = p * N(0, σ² I), where the convolution has a closed form (Gaussian, GaussianMixture, Ring)."""
        name = type(self).__name__
        raise NotImplementedError(
            f"{name}.noised(sigma={sigma!r}): p_σ = p * N(0, σ² I) has no closed form for a {name} "
            "(its density is not a Gaussian or a mixture of Gaussians, so the convolution integral does not "
            "reduce); noised(σ) exists for Gaussian, GaussianMixture and Ring. Estimate p_σ(x) = E_ε p(x - ε), "
            "ε ~ N(0, σ² I), by Monte Carlo, or train a noise-conditional score with jsm.objectives.dsm"
        )


@_pytree
class Gaussian(Target):
    """N(mean, cov) with a full covariance.

    f(x) = 1/2 (x - m)^T Σ^{-1} (x - m),  log Z = d/2 log 2π + 1/2 log|Σ|,
    s(x) = -Σ^{-1} (x - m).

    Args:
      mean: (d,).
      cov: (d, d), symmetric positive definite.
    """

    mean: Array
    cov: Array

    def __post_init__(self):
        _field(self, "mean", self.mean, 1)
        _field(self, "cov", self.cov, 2)
        if _validate.is_concrete(self.cov):
            d = self.mean.shape[0]
            if self.cov.shape != (d, d):
                raise ValueError(f"cov must have shape ({d}, {d}) to match mean, got {self.cov.shape}")
            try:
                np.linalg.cholesky(np.asarray(self.cov))
            except np.linalg.LinAlgError:
                raise ValueError("cov must be symmetric positive definite, its Cholesky factor failed") from None

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    def _chol(self) -> Array:
        return jnp.linalg.cholesky(self.cov)

    def energy(self, x: Array) -> Array:
        z = solve_triangular(self._chol(), x - self.mean, lower=True)
        return 0.5 * jnp.dot(z, z)

    def log_z(self) -> Array:
        return 0.5 * self.dim * LOG_2PI + jnp.sum(jnp.log(jnp.diag(self._chol())))

    def score(self, x: Array) -> Array:
        return -cho_solve((self._chol(), True), x - self.mean)

    def sample(self, key: Array, n: int) -> Array:
        z = jax.random.normal(key, (n, self.dim), self.mean.dtype)
        return self.mean + z @ self._chol().T

    def noised(self, sigma: float) -> Gaussian:
        """p_σ = p * N(0, σ² I): N(mean, cov + σ² I)."""
        return Gaussian(self.mean, self.cov + sigma**2 * jnp.eye(self.dim, dtype=self.cov.dtype))


@_pytree
class GaussianMixture(Target):
    """Σ_k w_k N(m_k, s_k² I), isotropic components.

    f(x) = -log Σ_k w_k s_k^{-d} exp(-|x - m_k|² / (2 s_k²)),  log Z = d/2 log 2π,
    s(x) = Σ_k r_k(x) (m_k - x) / s_k²,  r(x) the posterior responsibilities.

    Args:
      means: (k, d).
      scales: (k,), the standard deviation of each component.
      weights: (k,), positive; normalised to sum to one.
    """

    means: Array
    scales: Array
    weights: Array

    def __post_init__(self):
        _field(self, "means", self.means, 2)
        _field(self, "scales", self.scales, 1)
        _field(self, "weights", self.weights, 1)
        if _validate.is_concrete(self.weights):
            k = self.means.shape[0]
            for name in ("scales", "weights"):
                got = getattr(self, name).shape
                if got != (k,):
                    raise ValueError(f"{name} must have shape ({k},) to match means, got {got}")
                _validate.positive(name, getattr(self, name))

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def _log_components(self, x: Array) -> Array:
        """a_k(x) = log w_k - d log s_k - |x - m_k|² / (2 s_k²), shape (k,)."""
        sq = jnp.dot(x, x) - 2.0 * (self.means @ x) + jnp.sum(self.means**2, axis=-1)
        sq = jnp.maximum(sq, 0.0)  # the expanded square can round below zero
        log_w = jnp.log(self.weights) - jnp.log(jnp.sum(self.weights))
        return log_w - self.dim * jnp.log(self.scales) - 0.5 * sq / self.scales**2

    def energy(self, x: Array) -> Array:
        return -logsumexp(self._log_components(x))

    def log_z(self) -> Array:
        return jnp.asarray(0.5 * self.dim * LOG_2PI, self.means.dtype)

    def score(self, x: Array) -> Array:
        r = jax.nn.softmax(self._log_components(x))
        precision = r / self.scales**2
        return precision @ self.means - jnp.sum(precision) * x

    def log_prob_and_score(self, x: Array) -> tuple[Array, Array]:
        """(log p(x), s(x)) in one pass: one set of exponentials serves both.

        With a_k = log w_k - d log s_k - |x - m_k|² / (2 s_k²), c = max_k a_k and e_k = exp(a_k - c):
            log p(x) = c + log Σ_k e_k - log Z,   s(x) = Σ_k e_k (m_k - x) / s_k² / Σ_k e_k.
        Written with the differences m_k - x, not the matrix products of `energy`: in a vmapped chain
        loop (`samplers.run_chains`), sums over the few k and d entries of one example run faster
        than a batch of tiny (k, d) matmuls. (Under XLA:CPU's default options, which hand such sums
        to YNNPACK, they do not: run_chains compiles its loop without that, see
        `jsm._jax_internals.CPU_LOOP_OPTIONS`.)
        """
        diff = self.means - x  # (k, d)
        log_w = jnp.log(self.weights) - jnp.log(jnp.sum(self.weights))
        a = log_w - self.dim * jnp.log(self.scales) - 0.5 * jnp.sum(diff**2, axis=-1) / self.scales**2
        c = jnp.max(a)
        c = jnp.where(jnp.isfinite(c), c, 0.0)  # as logsumexp does: every a_k = -inf gives log p = -inf
        e = jnp.exp(a - c)
        total = jnp.sum(e)
        precision = e / (total * self.scales**2)  # r_k / s_k²
        return c + jnp.log(total) - self.log_z(), jnp.sum(precision[:, None] * diff, axis=0)

    def sample(self, key: Array, n: int) -> Array:
        k_comp, k_noise = jax.random.split(key)
        comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(k_noise, (n, self.dim), self.means.dtype)
        return self.means[comp] + self.scales[comp, None] * z

    def noised(self, sigma: float) -> GaussianMixture:
        """p_σ = p * N(0, σ² I): each scale becomes sqrt(s_k² + σ²)."""
        return GaussianMixture(self.means, jnp.sqrt(self.scales**2 + sigma**2), self.weights)


class Ring(GaussianMixture):
    """Equal-weight mixture of `n_modes` Gaussians of std `scale` on a circle of radius `radius`.

    Mode k sits at m_k = radius · (cos 2πk/n, sin 2πk/n), k < n; every s_k = scale, w_k = 1/n.
    The 8-mode ring is the classic test of mode collapse and of Langevin's mixing between modes.

    A Ring IS a GaussianMixture (d = 2): the same three leaves (means (n, 2), scales (n,),
    weights (n,)), so it crosses `jit` and `vmap` like one and `noised(σ)` is a mixture too.

    Args:
      n_modes: n, an int >= 1.
      radius: the radius of the circle of means, > 0.
      scale: the standard deviation of every component, > 0.
    """

    def __init__(self, n_modes: int = 8, radius: float = 2.0, scale: float = 0.2):
        n_modes = _validate.positive_int("n_modes", n_modes)
        _validate.positive("radius", radius)
        _validate.positive("scale", scale)
        angles = 2 * jnp.pi * jnp.arange(n_modes) / n_modes
        means = radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
        super().__init__(means, jnp.full((n_modes,), scale), jnp.ones(n_modes))

    @property
    def n_modes(self) -> int:
        return self.means.shape[0]

    @property
    def radius(self) -> Array:
        return jnp.linalg.norm(self.means[0])

    @property
    def scale(self) -> Array:
        return self.scales[0]

    def __repr__(self) -> str:
        r, s = self.radius, self.scale
        if _validate.is_concrete(r):
            r, s = f"{float(r):.6g}", f"{float(s):.6g}"
        return f"Ring(n_modes={self.n_modes}, radius={r}, scale={s})"


def _ring_flatten(ring: Ring):
    return ((jax.tree_util.GetAttrKey(f), getattr(ring, f)) for f in ("means", "scales", "weights")), None


def _ring_unflatten(_, leaves) -> Ring:
    # A transform's leaves (tracers, shape structs, None) go in as they are, unchecked:
    # the means of a traced Ring are not recomputed from n_modes, radius and scale.
    ring = object.__new__(Ring)
    for f, leaf in zip(("means", "scales", "weights"), leaves):
        object.__setattr__(ring, f, leaf)
    return ring


jax.tree_util.register_pytree_with_keys(Ring, _ring_flatten, _ring_unflatten)


@_pytree
class Banana(Target):
    """A 2-D Gaussian bent into a banana (Haario et al.).

    x1 ~ N(0, a²),  x2 | x1 ~ N(b (x1² - a²), c²). The map is volume-preserving, so
    f(x) = x1² / (2a²) + u² / 2 with u = (x2 - b(x1² - a²)) / c,  log Z = log 2π + log a + log c.
    Mean (0, 0); Var x1 = a², Var x2 = 2 a⁴ b² + c².
    """

    scale: Array = 1.0
    curvature: Array = 0.5
    width: Array = 0.5

    def __post_init__(self):
        for name in ("scale", "curvature", "width"):
            _field(self, name, getattr(self, name), 0)
        _validate.positive("scale", self.scale)
        _validate.positive("width", self.width)

    dim = 2

    def _u(self, x: Array) -> Array:
        a, b, c = self.scale, self.curvature, self.width
        return (x[1] - b * (x[0] ** 2 - a**2)) / c

    def energy(self, x: Array) -> Array:
        return 0.5 * (x[0] / self.scale) ** 2 + 0.5 * self._u(x) ** 2

    def log_z(self) -> Array:
        return LOG_2PI + jnp.log(self.scale) + jnp.log(self.width)

    def score(self, x: Array) -> Array:
        a, b, c = self.scale, self.curvature, self.width
        u = self._u(x)
        return jnp.stack([-x[0] / a**2 + 2 * b * x[0] * u / c, -u / c])

    def sample(self, key: Array, n: int) -> Array:
        a, b, c = self.scale, self.curvature, self.width
        z = jax.random.normal(key, (n, 2))
        x1 = a * z[:, 0]
        return jnp.stack([x1, b * (x1**2 - a**2) + c * z[:, 1]], axis=-1)


@_pytree
class Funnel(Target):
    """Neal's funnel in d dimensions: v ~ N(0, scale²), z_i | v ~ N(0, e^v), i < d.

    x = (v, z_1, ..., z_{d-1}),
    f(x) = v² / (2 scale²) + (d-1) v / 2 + |z|² e^{-v} / 2,  log Z = d/2 log 2π + log scale.
    The neck (v << 0) is the standard trap for fixed-step samplers.
    """

    dim: int = dataclasses.field(default=10, metadata=dict(static=True))
    scale: Array = 3.0

    def __post_init__(self):
        if not isinstance(self.dim, int) or self.dim < 2:
            raise ValueError(f"dim must be an int >= 2, got {self.dim!r}")
        _field(self, "scale", self.scale, 0)
        _validate.positive("scale", self.scale)

    def energy(self, x: Array) -> Array:
        v, z = x[0], x[1:]
        return 0.5 * (v / self.scale) ** 2 + 0.5 * (self.dim - 1) * v + 0.5 * jnp.dot(z, z) * jnp.exp(-v)

    def log_z(self) -> Array:
        return 0.5 * self.dim * LOG_2PI + jnp.log(self.scale)

    def score(self, x: Array) -> Array:
        v, z = x[0], x[1:]
        dv = -v / self.scale**2 - 0.5 * (self.dim - 1) + 0.5 * jnp.dot(z, z) * jnp.exp(-v)
        return jnp.concatenate([dv[None], -z * jnp.exp(-v)])

    def sample(self, key: Array, n: int) -> Array:
        k_v, k_z = jax.random.split(key)
        v = self.scale * jax.random.normal(k_v, (n, 1))
        z = jnp.exp(0.5 * v) * jax.random.normal(k_z, (n, self.dim - 1))
        return jnp.concatenate([v, z], axis=-1)
