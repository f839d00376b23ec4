"""Targets: closed forms against autodiff, quadrature, scipy and their own exact samplers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from jsm import targets
from conftest import FLOAT, all_targets, grid_2d, tol

TARGETS = all_targets()
NOISED = ["gaussian3", "mixture", "ring"]  # the targets whose p * N(0, σ² I) has a closed form


def mixture_reference(means, scales, weights, x):
    """log p(x) and s(x) of Σ_k w_k N(m_k, s_k² I) the slow obvious way, in float64.

    p(x) = Σ_k w_k N(x; m_k, s_k² I) / Σ_k w_k,  s(x) = Σ_k r_k (m_k - x) / s_k²,  r_k ∝ w_k N(x; m_k, s_k² I).
    """
    means, scales, weights, x = (np.asarray(a, np.float64) for a in (means, scales, weights, x))
    dens = np.array([w * stats.multivariate_normal(m, s**2 * np.eye(x.size)).pdf(x)
                     for m, s, w in zip(means, scales, weights)])
    r = dens / dens.sum()
    score = sum(rk * (m - x) / s**2 for rk, m, s in zip(r, means, scales))
    return np.log(dens.sum() / weights.sum()), score


class ExactReferenceTest(chex.TestCase):
    """log p and s, jitted and not, against scipy and the slow mixture formula."""

    pytestmark = pytest.mark.numerics

    @chex.variants(with_jit=True, without_jit=True)
    def test_gaussian_log_prob_and_score_match_scipy(self):
        t = TARGETS["gaussian3"]
        xs = np.random.default_rng(0).normal(size=(4, 3))
        fn = self.variant(lambda t, x: (t.log_prob(x), t.score(x)))
        mean, cov = np.asarray(t.mean, np.float64), np.asarray(t.cov, np.float64)
        for x in xs:
            log_p, score = fn(t, jnp.asarray(x, FLOAT))
            chex.assert_shape([log_p, score], [(), (3,)])
            chex.assert_type([log_p, score], FLOAT)
            np.testing.assert_allclose(log_p, stats.multivariate_normal(mean, cov).logpdf(x), rtol=tol(1e-5, 1e-12))
            np.testing.assert_allclose(score, -np.linalg.solve(cov, x - mean), rtol=tol(1e-5, 1e-12), atol=tol(1e-5, 1e-12))

    @chex.variants(with_jit=True, without_jit=True)
    def test_mixture_log_prob_and_score_match_the_slow_formula(self):
        # Unnormalised weights (sum 3.5): log p must divide by Σ w_k.
        t = targets.GaussianMixture(jnp.array([[-1.0, 0.0], [1.5, 0.5], [0.0, 1.0]]),
                                    jnp.array([0.5, 0.8, 0.4]), jnp.array([1.0, 2.0, 0.5]))
        xs = np.random.default_rng(1).normal(size=(4, 2))
        fn = self.variant(lambda t, x: (t.log_prob(x), t.score(x)))
        for x in xs:
            log_p, score = fn(t, jnp.asarray(x, FLOAT))
            chex.assert_shape([log_p, score], [(), (2,)])
            chex.assert_type([log_p, score], FLOAT)
            ref_log_p, ref_score = mixture_reference(t.means, t.scales, t.weights, x)
            np.testing.assert_allclose(log_p, ref_log_p, rtol=tol(1e-5, 1e-12))
            np.testing.assert_allclose(score, ref_score, rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))


@pytest.mark.numerics
@pytest.mark.parametrize("name", TARGETS)
def test_score_is_minus_grad_energy(name, key):
    t = TARGETS[name]
    xs = t.sample(key, 64)
    both = jax.jit(jax.vmap(lambda x: (t.score(x), -jax.grad(t.energy)(x))))
    analytic, autodiff = both(xs)
    np.testing.assert_allclose(analytic, autodiff, rtol=tol(1e-4, 1e-10), atol=tol(1e-4, 1e-10))


# Unequal weights (unnormalised, sum 6.5) and scales in d = 5: the mixture pair's harder case.
MIXTURE5 = targets.GaussianMixture(
    jnp.array([[-2.0, 0.0, 1.0, 0.5, 0.0], [2.0, 0.5, -1.0, 0.0, 1.0],
               [0.0, 2.0, 0.0, -1.5, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]]),
    jnp.array([0.5, 1.0, 2.0, 0.7]),
    jnp.array([1.0, 3.0, 0.5, 2.0]),
)


@pytest.mark.numerics
@pytest.mark.parametrize("name", [*TARGETS, "mixture5"])
def test_log_prob_and_score_equal_value_and_grad_of_log_prob(name, key):
    """The pair (log p, s) of one pass equals jax.value_and_grad(log_prob), at samples and far out in the tails."""
    t = MIXTURE5 if name == "mixture5" else TARGETS[name]
    xs = t.sample(key, 32)
    xs = jnp.concatenate([xs, 3.0 * xs[:8]])  # where one component takes nearly all the responsibility
    pair = jax.jit(jax.vmap(t.log_prob_and_score))
    autodiff = jax.jit(jax.vmap(jax.value_and_grad(t.log_prob)))
    (log_p, score), (ref_log_p, ref_score) = pair(xs), autodiff(xs)
    chex.assert_shape([log_p, score], [(40,), (40, t.dim)])
    np.testing.assert_allclose(log_p, ref_log_p, rtol=tol(1e-5, 1e-12), atol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(score, ref_score, rtol=tol(1e-4, 1e-10), atol=tol(1e-4, 1e-10))


@pytest.mark.parametrize("name", ["mixture", "mixture5"])
def test_mixture_pair_is_minus_infinity_where_every_component_underflows(name):
    """So far out that every |x - m_k|² overflows: log p = -inf, as logsumexp gives, not NaN.

    (log_prob's expanded square |x|² - 2 x·m_k + |m_k|² can be inf - inf = NaN there.)"""
    t = MIXTURE5 if name == "mixture5" else TARGETS[name]
    log_p, _ = t.log_prob_and_score(jnp.full(t.dim, jnp.finfo(FLOAT).max / 4))
    assert float(log_p) == -np.inf


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["mixture", "ring", "banana"])
def test_log_z_matches_quadrature_2d(name):
    t = TARGETS[name]
    pts, area, _ = grid_2d((-8.0, -8.0), (8.0, 12.0), 400)
    f = np.asarray(jax.jit(jax.vmap(t.energy))(jnp.asarray(pts, jnp.float32)), np.float64)
    log_z = special.logsumexp(-f) + np.log(area)
    np.testing.assert_allclose(float(t.log_z()), log_z, atol=2e-4)


@pytest.mark.numerics
def test_funnel_log_z_by_nested_quadrature():
    # Substitute z = e^{v/2} u so the neck is resolved: Z = ∫∫ e^{v/2} exp(-f(v, e^{v/2} u)) du dv.
    t = targets.Funnel(dim=2, scale=1.0)
    v = np.linspace(-9.0, 9.0, 1201)
    u = np.linspace(-12.0, 12.0, 1201)
    vv, uu = np.meshgrid(v, u, indexing="ij")
    pts = jnp.asarray(np.stack([vv.ravel(), np.exp(vv / 2).ravel() * uu.ravel()], -1), jnp.float32)
    f = np.asarray(jax.jit(jax.vmap(t.energy))(pts), np.float64).reshape(vv.shape)
    integrand = np.exp(vv / 2 - f)
    z = integrate.trapezoid(integrate.trapezoid(integrand, u, axis=1), v)
    np.testing.assert_allclose(float(t.log_z()), np.log(z), atol=1e-4)


@pytest.mark.numerics
def test_gaussian_samples_mahalanobis_is_chi2(key):
    t = TARGETS["gaussian3"]
    xs = t.sample(key, 20_000)
    chex.assert_shape(xs, (20_000, 3))
    chex.assert_type(xs, FLOAT)
    m2 = 2 * np.asarray(jax.jit(jax.vmap(t.energy))(xs))  # (x - m)^T Σ^-1 (x - m) ~ χ²(d)
    assert stats.kstest(m2, stats.chi2(3).cdf).pvalue > 1e-3
    # Moments within 5 standard errors.
    se = np.sqrt(np.diag(t.cov) / xs.shape[0])
    assert np.all(np.abs(np.mean(xs, 0) - t.mean) < 5 * se)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["mixture", "ring", "banana"])
def test_samples_fit_density_chi_square(name, key):
    """Pearson χ² of a 2-D histogram of exact samples against exp(log_prob) integrated per bin."""
    t = TARGETS[name]
    n = 20_000
    xs = np.asarray(t.sample(key, n))
    lo, hi, bins, sub = (-5.0, -4.0), (5.0, 6.0), 20, 8
    pts, area, edges = grid_2d(lo, hi, bins * sub)
    dens = np.exp(np.asarray(jax.jit(jax.vmap(t.log_prob))(jnp.asarray(pts, jnp.float32)), np.float64))
    p_bin = dens.reshape(bins, sub, bins, sub).sum(axis=(1, 3)) * area
    counts, _, _ = np.histogram2d(xs[:, 0], xs[:, 1], bins=[e[::sub] for e in edges])
    expected = n * p_bin
    big = expected >= 5
    observed = np.append(counts[big], n - counts[big].sum())
    expected = np.append(expected[big], n - expected[big].sum())
    chi2 = np.sum((observed - expected) ** 2 / expected)
    assert chi2 < stats.chi2(len(observed) - 1).ppf(1 - 1e-3), chi2


@pytest.mark.numerics
def test_funnel_samples_marginals(key):
    t = TARGETS["funnel"]
    xs = np.asarray(t.sample(key, 20_000))
    v, z = xs[:, 0], xs[:, 1:]
    assert stats.kstest(v, stats.norm(0, float(t.scale)).cdf).pvalue > 1e-3
    # z_i e^{-v/2} ~ N(0, 1), independent of v.
    assert stats.kstest((z * np.exp(-v / 2)[:, None]).ravel(), stats.norm().cdf).pvalue > 1e-3


@pytest.mark.numerics
def test_banana_moments(key):
    t = TARGETS["banana"]
    xs = np.asarray(t.sample(key, 50_000))
    a, b, c = 1.0, 0.5, 0.5
    var = np.array([a**2, 2 * a**4 * b**2 + c**2])
    se = np.sqrt(var / xs.shape[0])
    assert np.all(np.abs(xs.mean(0)) < 5 * se)
    np.testing.assert_allclose(xs.var(0), var, rtol=0.05)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["gaussian2", "mixture", "ring"])
def test_noised_is_the_convolution_with_a_gaussian(name, gaussian2, key):
    """p_σ(x) = ∫ p(x - ε) N(ε; 0, σ² I) dε by a 2-D trapezoid rule on |ε_i| < 6σ (exact to ~1e-8)."""
    t, sigma = (gaussian2 if name == "gaussian2" else TARGETS[name]), 0.5
    e = np.linspace(-6 * sigma, 6 * sigma, 241)
    ee = np.stack(np.meshgrid(e, e, indexing="ij"), -1).reshape(-1, 2)
    w = stats.norm(0, sigma).pdf(ee).prod(-1) * (e[1] - e[0]) ** 2
    shifted = jax.jit(lambda x: jax.vmap(t.log_prob)(x - jnp.asarray(ee, FLOAT)))
    noised = jax.jit(lambda t, x: t.noised(sigma).log_prob(x))
    for x in t.sample(key, 3):
        ref = np.sum(w * np.exp(np.asarray(shifted(x), np.float64)))
        np.testing.assert_allclose(np.exp(float(noised(t, x))), ref, rtol=tol(1e-5, 1e-7))


@pytest.mark.parametrize("name", ["banana", "funnel"])
def test_noised_without_a_closed_form_says_so(name):
    with pytest.raises(NotImplementedError, match=rf"{name.capitalize()}.noised\(sigma=0.5\): .* has no closed form"):
        TARGETS[name].noised(0.5)


def test_ring_is_a_gaussian_mixture_on_a_circle():
    r = targets.Ring(6, radius=1.5, scale=0.25)
    assert isinstance(r, targets.GaussianMixture)
    angles = 2 * np.pi * np.arange(6) / 6
    np.testing.assert_allclose(r.means, 1.5 * np.stack([np.cos(angles), np.sin(angles)], -1), atol=tol(1e-6, 1e-12))
    np.testing.assert_allclose(r.scales, np.full(6, 0.25))
    np.testing.assert_allclose(r.weights, np.ones(6))
    assert (r.n_modes, float(r.radius), float(r.scale)) == (6, pytest.approx(1.5), pytest.approx(0.25))
    assert repr(r) == "Ring(n_modes=6, radius=1.5, scale=0.25)"
    assert type(r.noised(0.3)) is targets.GaussianMixture
    np.testing.assert_allclose(r.noised(0.3).scales, np.full(6, np.hypot(0.25, 0.3)), rtol=tol(1e-6, 1e-12))


def test_ring_crosses_jit_and_vmap_as_a_pytree():
    traces = []

    @jax.jit
    def log_prob(t, x):
        traces.append(type(t))
        return t.log_prob(x)

    a, b = targets.Ring(8, radius=2.0, scale=0.3), targets.Ring(8, radius=1.0, scale=0.5)
    x = jnp.array([1.0, 0.5])
    for r in (a, b):  # same n_modes: one trace, the parameters are data
        np.testing.assert_allclose(log_prob(r, x), r.log_prob(x), rtol=tol(1e-6, 1e-12))
    assert traces == [targets.Ring]
    assert [p[0].name for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]] == ["means", "scales", "weights"]
    both = jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b)
    np.testing.assert_allclose(jax.vmap(lambda t: t.log_prob(x))(both), [a.log_prob(x), b.log_prob(x)], rtol=tol(1e-6, 1e-12))


def test_targets_are_pytrees_through_jit(key):
    t = TARGETS["mixture"]
    f = jax.jit(lambda t, x: t.log_prob(x))
    np.testing.assert_allclose(f(t, jnp.zeros(2)), t.log_prob(jnp.zeros(2)), rtol=tol(1e-6, 1e-12))
    leaves = jax.tree.leaves(t)
    assert len(leaves) == 3


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: targets.Gaussian(jnp.zeros(2), jnp.eye(3)), "cov must have shape"),
        (lambda: targets.Gaussian(jnp.zeros((2, 2)), jnp.eye(2)), "mean must have shape"),
        (lambda: targets.Gaussian(jnp.zeros(2), -jnp.eye(2)), "positive definite"),
        (lambda: targets.GaussianMixture(jnp.zeros((2, 2)), jnp.ones(3), jnp.ones(2)), "scales must have shape"),
        (lambda: targets.GaussianMixture(jnp.zeros((2, 2)), jnp.ones(2), -jnp.ones(2)), "weights must be positive"),
        (lambda: targets.GaussianMixture(jnp.zeros((2, 2)), jnp.array([1.0, jnp.nan]), jnp.ones(2)), "scales must be finite"),
        (lambda: targets.Ring(0), "n_modes must be an int >= 1"),
        (lambda: targets.Ring(8, radius=0.0), "radius must be positive"),
        (lambda: targets.Ring(8, scale=-0.1), "scale must be positive"),
        (lambda: targets.Banana(scale=-1.0), "scale must be positive"),
        (lambda: targets.Funnel(dim=1), "dim must be an int >= 2"),
    ],
)
def test_bad_parameters_raise(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()
