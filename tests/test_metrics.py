"""Distances and divergences against closed forms and slow exact references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsm import metrics, quadrature

from conftest import FLOAT, tol


@pytest.mark.numerics
def test_sliced_wasserstein_of_a_shift_is_its_closed_form():
    """For ys = xs + μ every projection is shifted by θ·μ, so SW1 = |μ| E|θ_1| = 2|μ|/π in d = 2."""
    key = jax.random.key(0)
    xs = jax.random.normal(key, (500, 2))
    mu = jnp.array([0.6, -0.8])  # |μ| = 1
    draws = jax.jit(jax.vmap(lambda k: metrics.sliced_wasserstein(xs, xs + mu, k, 64)))(jax.random.split(key, 200))
    draws = np.asarray(draws)
    assert abs(draws.mean() - 2 / np.pi) < 5 * draws.std() / np.sqrt(draws.size)


class Wasserstein1dTest(chex.TestCase):
    pytestmark = pytest.mark.numerics

    @chex.variants(with_jit=True, without_jit=True)
    def test_wasserstein_1d_matches_scipy(self):
        from scipy.stats import wasserstein_distance

        rng = np.random.default_rng(0)
        a, b = rng.normal(size=300), rng.gamma(2.0, size=300)
        got = self.variant(metrics.wasserstein_1d)(jnp.asarray(a, FLOAT), jnp.asarray(b, FLOAT))
        chex.assert_shape(got, ())
        chex.assert_type(got, FLOAT)
        np.testing.assert_allclose(got, wasserstein_distance(a, b), rtol=tol(1e-5, 1e-12))


def test_mismatched_samples_raise():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"xs and ys must have the same shape \(n, d\), got \(3, 2\) and \(3, 4\)"):
        metrics.sliced_wasserstein(jnp.zeros((3, 2)), jnp.zeros((3, 4)), key)
    with pytest.raises(ValueError, match="ys must hold at least one example"):
        metrics.sliced_wasserstein(jnp.zeros((1, 2)), jnp.zeros((0, 2)), key)


@pytest.fixture(scope="module")
def two_gaussians():
    from jsm import targets

    p = targets.Gaussian(jnp.zeros(2), jnp.eye(2))
    q = targets.Gaussian(jnp.array([1.0, 0.0]), jnp.array([[2.0, 0.3], [0.3, 1.0]]))
    return p, q


def gaussian_kl(p, q):
    """KL(N(m0, S0) || N(m1, S1)) in closed form."""
    s1_inv = jnp.linalg.inv(q.cov)
    dm = q.mean - p.mean
    d = p.mean.shape[0]
    return 0.5 * (jnp.trace(s1_inv @ p.cov) + dm @ s1_inv @ dm - d + jnp.linalg.slogdet(q.cov)[1] - jnp.linalg.slogdet(p.cov)[1])


BOX = (jnp.array([-9.0, -9.0]), jnp.array([10.0, 9.0]))


@pytest.mark.numerics
def test_kl_grid_matches_closed_form_and_ignores_constants(two_gaussians):
    p, q = two_gaussians
    np.testing.assert_allclose(metrics.kl_grid(p.log_prob, q.log_prob, *BOX, 300), gaussian_kl(p, q), rtol=1e-4)
    # Log-densities known up to constants: energies give the same answer.
    np.testing.assert_allclose(metrics.kl_grid(lambda x: -p.energy(x), lambda x: 3.0 - q.energy(x), *BOX, 300),
                               gaussian_kl(p, q), rtol=1e-4)


@pytest.mark.numerics
def test_js_grid_is_symmetric_bounded_and_matches_1d_quadrature():
    from scipy import integrate, stats

    from jsm import targets

    p, q = targets.Gaussian(jnp.array([0.0]), jnp.eye(1)), targets.Gaussian(jnp.array([1.5]), jnp.array([[0.5]]))
    lo, hi = jnp.array([-9.0]), jnp.array([9.0])
    js = float(metrics.js_grid(p.log_prob, q.log_prob, lo, hi, 4000))
    pp, qq = stats.norm(0, 1).pdf, stats.norm(1.5, np.sqrt(0.5)).pdf
    m = lambda x: 0.5 * (pp(x) + qq(x))
    ref = 0.5 * integrate.quad(lambda x: pp(x) * np.log(pp(x) / m(x)), -9, 9)[0] + \
        0.5 * integrate.quad(lambda x: qq(x) * np.log(qq(x) / m(x)), -9, 9)[0]
    np.testing.assert_allclose(js, ref, rtol=1e-4)
    np.testing.assert_allclose(metrics.js_grid(q.log_prob, p.log_prob, lo, hi, 4000), js, rtol=1e-5)
    far = targets.Gaussian(jnp.array([6.0]), jnp.eye(1) * 0.1)
    assert np.log(2) - 1e-3 < float(metrics.js_grid(p.log_prob, far.log_prob, lo, hi, 4000)) <= np.log(2) + 1e-6


def test_kl_knn_converges_to_closed_form(two_gaussians):
    p, q = two_gaussians
    xs, ys = p.sample(jax.random.key(0), 4000), q.sample(jax.random.key(1), 4000)
    # The estimator's bias at n = 4000 in d = 2 is a few hundredths (tested at 0.1).
    assert abs(float(metrics.kl_knn(xs, ys, k=5)) - float(gaussian_kl(p, q))) < 0.1
    assert abs(float(metrics.kl_knn(xs, p.sample(jax.random.key(2), 4000), k=5))) < 0.05


@pytest.mark.numerics
def test_exact_wasserstein_of_a_shift_and_against_1d():
    from scipy.stats import wasserstein_distance

    xs = jax.random.normal(jax.random.key(0), (300, 2))
    np.testing.assert_allclose(metrics.wasserstein(xs, xs + jnp.array([0.6, 0.8])), 1.0, rtol=tol(1e-5, 1e-12))
    a, b = jax.random.normal(jax.random.key(1), (200, 1)), 2 + jax.random.gamma(jax.random.key(2), 2.0, (200, 1))
    np.testing.assert_allclose(metrics.wasserstein(a, b), wasserstein_distance(a[:, 0], b[:, 0]), rtol=tol(1e-5, 1e-12))


@pytest.mark.numerics
def test_mmd_matches_slow_reference_and_is_unbiased(two_gaussians):
    p, q = two_gaussians
    xs, ys = np.asarray(p.sample(jax.random.key(0), 60), np.float64), np.asarray(q.sample(jax.random.key(1), 50), np.float64)
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * 0.8**2))
    kxx = sum(k(xs[i], xs[j]) for i in range(60) for j in range(60) if i != j) / (60 * 59)
    kyy = sum(k(ys[i], ys[j]) for i in range(50) for j in range(50) if i != j) / (50 * 49)
    kxy = sum(k(x, y) for x in xs for y in ys) / (60 * 50)
    np.testing.assert_allclose(metrics.mmd(jnp.asarray(xs), jnp.asarray(ys), 0.8), kxx + kyy - 2 * kxy, rtol=tol(1e-4, 1e-11))
    same = jax.vmap(lambda k: metrics.mmd(p.sample(k, 200), p.sample(jax.random.fold_in(k, 1), 200), 1.0))(
        jax.random.split(jax.random.key(3), 200))
    assert abs(float(same.mean())) < 5 * float(same.std()) / np.sqrt(200)


@pytest.mark.numerics
def test_kl_knn_matches_the_estimator_written_with_a_kd_tree():
    """D̂ = d/n Σ_i log(ν_k(i) / ρ_k(i)) + log(m / (n - 1)) (Wang, Kulkarni & Verdú 2009, eq. 5)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(40, 3)), 0.5 + 1.5 * rng.normal(size=(25, 3))
    for k in (1, 3):
        rho = cKDTree(xs).query(xs, k + 1)[0][:, k]  # the nearest of xs to x_i is x_i itself
        nu = cKDTree(ys).query(xs, [k])[0][:, 0]
        ref = 3 * np.mean(np.log(nu / rho)) + np.log(25 / 39)
        np.testing.assert_allclose(metrics.kl_knn(jnp.asarray(xs, FLOAT), jnp.asarray(ys, FLOAT), k), ref,
                                   rtol=tol(1e-4, 1e-10))


@pytest.mark.numerics
def test_trapezoid_grid_is_exact_on_its_error_formula():
    """Σ w g = ∫ g for g linear; for g = x² on [a, b], Σ w g = ∫ g + (b - a) h² / 6, h = (b - a)/(n - 1)."""
    points, log_w = quadrature.grid(jnp.array([0.0, -1.0]), jnp.array([2.0, 1.0]), 11)
    chex.assert_shape([points, log_w], [(121, 2), (121,)])
    w = np.exp(np.asarray(log_w, np.float64))
    x, y = np.asarray(points, np.float64).T
    np.testing.assert_allclose(np.sum(w * (1 + x + 2 * y)), 8.0, rtol=tol(1e-5, 1e-12))
    h = 2.0 / 10
    np.testing.assert_allclose(np.sum(w * x**2), 2 * (8 / 3 + 2 * h**2 / 6), rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(np.sum(w * y**2), 2 * (2 / 3 + 2 * h**2 / 6), rtol=tol(1e-5, 1e-12))


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="xs and ys must have the same dimension d, got 2 and 3"):
        metrics.mmd(jnp.zeros((4, 2)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="xs must hold at least one example"):
        metrics.kl_knn(jnp.zeros((0, 2)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="lo must be < hi"):
        metrics.kl_grid(lambda x: -x @ x, lambda x: -x @ x, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
