"""Targets: closed forms against autodiff, quadrature and their own exact samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from jsm import targets
from conftest import all_targets, grid_2d, tol

TARGETS = all_targets()


@pytest.mark.numerics
@pytest.mark.parametrize("name", TARGETS)
def test_score_is_minus_grad_energy(name, key):
    t = TARGETS[name]
    xs = t.sample(key, 64)
    both = jax.jit(jax.vmap(lambda x: (t.score(x), -jax.grad(t.energy)(x))))
    analytic, autodiff = both(xs)
    np.testing.assert_allclose(analytic, autodiff, rtol=tol(1e-4, 1e-10), atol=tol(1e-4, 1e-10))


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["mixture", "ring", "banana"])
def test_log_z_matches_quadrature_2d(name):
    t = TARGETS[name]
    pts, area, _ = grid_2d((-8.0, -8.0), (8.0, 12.0), 400)
    f = np.asarray(jax.jit(jax.vmap(t.energy))(jnp.asarray(pts, jnp.float32)), np.float64)
    log_z = special.logsumexp(-f) + np.log(area)
    np.testing.assert_allclose(float(t.log_z()), log_z, atol=2e-4)


@pytest.mark.numerics
def test_gaussian_log_prob_matches_scipy():
    t = TARGETS["gaussian3"]
    xs = np.random.default_rng(0).normal(size=(10, 3))
    ref = stats.multivariate_normal(np.asarray(t.mean), np.asarray(t.cov)).logpdf(xs)
    np.testing.assert_allclose(jax.vmap(t.log_prob)(jnp.asarray(xs, jnp.float32)), ref, rtol=1e-5)


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
@pytest.mark.parametrize("name", ["mixture", "gaussian3"])
def test_noised_is_convolution_with_gaussian(name, key):
    """p_σ(x) = E_ε p(x - ε), ε ~ N(0, σ² I), checked by Monte Carlo at a few points."""
    t, sigma = TARGETS[name], 0.7
    k1, k2 = jax.random.split(key)
    xs = t.sample(k1, 5)
    eps = sigma * jax.random.normal(k2, (200_000, t.dim))
    density = jax.jit(lambda x: jnp.exp(jax.vmap(t.log_prob)(x - eps)))
    for x in xs:
        p = np.asarray(density(x), np.float64)
        se = p.std() / np.sqrt(p.size)
        assert abs(p.mean() - float(jnp.exp(t.noised(sigma).log_prob(x)))) < 5 * se


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
        (lambda: targets.Banana(scale=-1.0), "scale must be positive"),
        (lambda: targets.Funnel(dim=1), "dim must be an int >= 2"),
    ],
)
def test_bad_parameters_raise(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()
