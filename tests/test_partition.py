"""log Z by quadrature and by annealed importance sampling, against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsm import partition, targets

from conftest import tol


@pytest.mark.numerics
def test_log_z_grid_1d_and_2d_match_closed_forms(mixture2):
    g1 = targets.Gaussian(jnp.array([0.5]), jnp.array([[0.7]]))
    np.testing.assert_allclose(partition.log_z_grid(g1.energy, jnp.array([-8.0]), jnp.array([9.0]), 2000), g1.log_z(), atol=1e-5)
    lo, hi = jnp.array([-8.0, -8.0]), jnp.array([8.0, 9.0])
    np.testing.assert_allclose(partition.log_z_grid(mixture2.energy, lo, hi, 400), mixture2.log_z(), atol=1e-5)
    banana = targets.Banana()
    np.testing.assert_allclose(partition.log_z_grid(banana.energy, jnp.array([-7.0, -6.0]), jnp.array([7.0, 14.0]), 600),
                               banana.log_z(), atol=1e-4)


@pytest.mark.numerics
def test_grid_log_likelihood_is_the_exact_log_prob(mixture2, key):
    xs = mixture2.sample(key, 100)
    got = partition.log_likelihood_grid(mixture2.energy, xs, jnp.array([-8.0, -8.0]), jnp.array([8.0, 9.0]), 400)
    np.testing.assert_allclose(got, jnp.mean(jax.vmap(mixture2.log_prob)(xs)), atol=1e-5)


@pytest.mark.slow
def test_ais_agrees_with_known_log_z_in_d10_within_its_error():
    a = jax.random.normal(jax.random.key(0), (10, 10)) * 0.3
    t = targets.Gaussian(jnp.ones(10), a @ a.T + 0.5 * jnp.eye(10))
    est, se = partition.log_z_ais(t.energy, jax.random.key(1), 10, n_chains=1000, n_temperatures=500, step_size=0.2)
    assert float(se) < 0.05
    assert abs(float(est) - float(t.log_z())) < 4 * float(se)


@pytest.fixture(scope="module")
def ais_over_seeds():
    """40 independent AIS estimates of log Z of a correlated 3-D Gaussian from a base N(0, 2² I),
    vmapped over seeds in one compiled call (64 chains, 50 temperatures each)."""
    t = targets.Gaussian(jnp.array([1.0, -0.5, 0.5]), jnp.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.3]]))
    run = lambda k: partition.log_z_ais(t.energy, k, 3, n_chains=64, n_temperatures=50, step_size=0.1, base_scale=2.0)
    est, se = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), 40))
    return np.asarray(est, np.float64), np.asarray(se, np.float64), float(t.log_z())


@pytest.mark.numerics
def test_ais_with_a_wide_base_is_unbiased_for_the_closed_form_log_z(ais_over_seeds):
    """The mean of 40 estimates is within 4 of its standard errors of log Z = d/2 log 2π + 1/2 log det Σ.

    (log Ẑ is biased low by about se²/2 ≈ 0.02 by Jensen's inequality, a fifth of the bound.)
    """
    est, _, log_z = ais_over_seeds
    assert abs(est.mean() - log_z) < 4 * est.std(ddof=1) / np.sqrt(est.size)


@pytest.mark.numerics
def test_ais_standard_error_is_calibrated_over_40_seeds(ais_over_seeds):
    """z = (log Ẑ - log Z) / se: |z| < 2 for about 95% of seeds, and E z² ≈ 1.

    With 40 seeds and coverage 0.95, P(at most 32 inside) = 7e-4: fewer means the se is too
    small. If the se were right, Σ z² ~ χ²_40 and P(mean z² < 0.4) = 5e-4: less means it
    is too large (twice too large gives mean z² ≈ 0.25).
    """
    est, se, log_z = ais_over_seeds
    z = (est - log_z) / se
    assert np.sum(np.abs(z) < 2) >= 33, np.round(z, 2)
    assert np.mean(z**2) > 0.4, np.round(z, 2)


@pytest.mark.numerics
def test_ais_of_the_base_itself_gives_log_z0_exactly():
    """f = f_0: every incremental weight is 0, so log Ẑ = log Z_0 = d/2 log 2π + d log base_scale, se = 0."""
    scale = 0.5
    est, se = partition.log_z_ais(lambda x: 0.5 * jnp.dot(x, x) / scale**2, jax.random.key(0), 4, n_chains=8,
                                  n_temperatures=5, base_scale=scale)
    np.testing.assert_allclose(est, 2 * np.log(2 * np.pi) + 4 * np.log(scale), rtol=tol(1e-6, 1e-12))
    assert float(se) == 0.0


def test_grid_cost_is_n_to_the_d():
    """The grid has n^d nodes: why quadrature stops at d = 2 (d = 10 at n = 100 would be 10^20)."""
    for d, n in ((1, 50), (2, 50)):
        points, log_w = partition.grid(jnp.zeros(d), jnp.ones(d), n)
        assert points.shape == (n**d, d) and log_w.shape == (n**d,)
        np.testing.assert_allclose(jnp.sum(jnp.exp(log_w)), 1.0, rtol=tol(1e-5, 1e-12))  # the box's volume
    with pytest.raises(ValueError, match="d = 1 or 2"):
        partition.grid(jnp.zeros(3), jnp.ones(3), 10)


@pytest.mark.parametrize(
    "lo, hi, n, match",
    [
        ([0.0, 1.0], [1.0, 1.0], 10, "lo must be < hi in every coordinate"),
        ([0.0], [1.0], 1, "n must be an int >= 2, got 1"),
        ([0.0, 0.0], [1.0], 10, "lo and hi must both have shape"),
    ],
)
def test_bad_boxes_raise(lo, hi, n, match):
    with pytest.raises(ValueError, match=match):
        partition.log_z_grid(lambda x: jnp.sum(x**2), jnp.array(lo), jnp.array(hi), n)


def test_a_grid_on_a_box_closed_over_inside_jit_is_the_same_grid():
    """A box held as jax arrays by the jitted function (constants of its trace) was compared with jnp,
    which stages the comparison: a TracerBoolConversionError."""
    lo, hi = jnp.array([-3.0, -3.0]), jnp.array([3.0, 3.0])
    f = lambda x: 0.5 * jnp.dot(x, x)
    np.testing.assert_allclose(jax.jit(lambda: partition.log_z_grid(f, lo, hi, 32))(), partition.log_z_grid(f, lo, hi, 32),
                               rtol=tol(1e-6, 1e-12))


def test_ais_with_two_temperatures_is_importance_sampling_of_the_target():
    """β = (0, 1): one importance-sampling step from the base N(0, 1) to f = x²/(2·0.5²), whose log Z is
    log(0.5 √(2π)); the β grid used to stop at 1e-4 and return log Z_0 (off by log 2)."""
    est, se = partition.log_z_ais(lambda x: 0.5 * jnp.dot(x, x) / 0.25, jax.random.key(0), 1, n_chains=4000,
                                  n_temperatures=2)
    assert abs(float(est) - np.log(0.5 * np.sqrt(2 * np.pi))) < 4 * float(se) and float(se) < 0.05
