"""The few-step probability-flow solvers against the closed-form flow of Gaussian data.

For x_0 ~ N(m, c² I) the score of p_t is -(x - α_t m) / (α_t² c² + σ_t²), and the
probability-flow ODE carries x_T to x_t = α_t m + r_t (x_T - α_T m), r_t = sqrt(α_t² c² + σ_t²) /
sqrt(α_T² c² + σ_T²): every solver's error is measured against that, and halving the step must
divide it by 2^order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tol
from jsm import diffusion as D, sde as S

M, C = jnp.array([1.0, -2.0]), 0.5
SDES = {"vp": S.VPSDE(), "ve": S.VESDE(), "subvp": S.SubVPSDE()}
ORDERS = {"heun": 2, "ddim": 1, "dpmpp_2m": 2}
EVALUATIONS_PER_STEP = {"heun": 2, "ddim": 1, "dpmpp_2m": 1}


def gaussian_score(sde):
    def score(x, t):
        alpha, sigma = sde.marginal(t)
        return -(x - alpha * M) / (alpha**2 * C**2 + sigma**2)

    return score


def exact_flow(sde, x_T, t):
    (a, s), (a_T, s_T) = sde.marginal(t), sde.marginal(sde.T)
    return a * M + jnp.sqrt(a**2 * C**2 + s**2) / jnp.sqrt(a_T**2 * C**2 + s_T**2) * (x_T - a_T * M)


@pytest.fixture(scope="module")
def scores():
    return {name: gaussian_score(sde) for name, sde in SDES.items()}  # one function per SDE: one compilation


@pytest.mark.numerics
@pytest.mark.parametrize("method", list(ORDERS))
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_each_solver_converges_at_its_order(name, method, scores):
    sde = SDES[name]
    x_T = sde.prior_sample(jax.random.key(0), (4, 2))
    errors = []
    for n in (16, 32, 64):
        x = D.probability_flow(scores[name], sde, x_T, method=method, n_steps=n)
        errors.append(float(jnp.max(jnp.abs(x - exact_flow(sde, x_T, D.SAMPLING_T_MIN)))))
    observed = np.log2(errors[1] / errors[2])
    assert abs(observed - ORDERS[method]) < 0.25, (errors, observed)
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("name", list(SDES))
def test_ddim_and_dpm_solver_are_exact_when_the_denoiser_is_constant(name, method):
    """Data at one point m: E[x_0 | x_t] = m at every t, so the exponential integrator is exact in 3 steps."""
    sde = SDES[name]

    def point_mass_score(x, t):
        alpha, sigma = sde.marginal(t)
        return -(x - alpha * M) / sigma**2

    x_T = sde.prior_sample(jax.random.key(2), (3, 2))
    x = D.probability_flow(point_mass_score, sde, x_T, method=method, n_steps=3)
    (a, s), (a_T, s_T) = sde.marginal(D.SAMPLING_T_MIN), sde.marginal(sde.T)
    np.testing.assert_allclose(x, a * M + s / s_T * (x_T - a_T * M), rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-10))


def test_the_adaptive_solver_is_the_reference(scores):
    sde = SDES["subvp"]
    x_T = sde.prior_sample(jax.random.key(1), (4, 2))
    x = D.probability_flow(scores["subvp"], sde, x_T)
    np.testing.assert_allclose(x, exact_flow(sde, x_T, D.SAMPLING_T_MIN), atol=5e-4)


@pytest.mark.parametrize("method", list(ORDERS))
def test_score_evaluations_are_counted(method):
    """SolveInfo.num_fevals is the number of times the score ran: 2 a step for Heun, 1 for the others."""
    sde, calls = SDES["vp"], []
    base = gaussian_score(sde)

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return base(x, t)

    x, info = D.probability_flow(counted, sde, jnp.zeros((1, 2)), method=method, n_steps=5, info=True)
    jax.block_until_ready(x)
    assert int(info.num_fevals[0]) == len(calls) == 5 * EVALUATIONS_PER_STEP[method]
    assert bool(info.success[0]) and int(info.num_steps[0]) == 5


@pytest.mark.numerics
@pytest.mark.parametrize("name", list(SDES))
def test_time_grids(name):
    sde, n, t_min = SDES[name], 6, 1e-3
    for spacing in ("log_snr", "karras"):
        ts = np.asarray(D.time_grid(sde, n, t_min, spacing=spacing), np.float64)
        assert ts.shape == (n + 1,) and ts[0] == sde.T and ts[-1] == pytest.approx(t_min, rel=1e-6)
        assert np.all(np.diff(ts) < 0)
    lam = np.asarray(sde.log_snr(D.time_grid(sde, n, t_min, spacing="log_snr")[1:-1]), np.float64)
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-3)  # uniform in log-SNR
    # Karras: ς = σ/α = exp(-λ/2), uniform in ς^(1/7) between its values at T and t_min
    nsr = np.exp(-0.5 * np.asarray(sde.log_snr(D.time_grid(sde, n, t_min, spacing="karras")), np.float64))
    lo, hi = nsr[-1] ** (1 / 7), nsr[0] ** (1 / 7)
    np.testing.assert_allclose(nsr, (hi + np.linspace(0, 1, n + 1) * (lo - hi)) ** 7, rtol=1e-3)


def test_a_fixed_step_solve_that_goes_non_finite_is_nan():
    sde = SDES["vp"]
    bad = lambda x, t: jnp.where(x[0] > 3.0, jnp.inf, 1.0) * gaussian_score(sde)(x, t)
    x_T = jnp.array([[4.0, 0.0], [0.5, 0.5]])
    x, info = jax.jit(lambda z: D.probability_flow(bad, sde, z, method="dpmpp_2m", n_steps=4, info=True))(x_T)
    assert np.all(np.isnan(np.asarray(x[0]))) and np.all(np.isfinite(np.asarray(x[1])))
    np.testing.assert_array_equal(info.success, [False, True])


def test_bad_method_and_step_counts_are_refused():
    sde, x = SDES["vp"], jnp.zeros((2, 2))
    score = gaussian_score(sde)
    with pytest.raises(ValueError, match="method must be one of"):
        D.probability_flow(score, sde, x, method="euler", n_steps=4)
    with pytest.raises(ValueError, match=r"method='heun' needs n_steps"):
        D.probability_flow(score, sde, x, method="heun")
    with pytest.raises(ValueError, match='method="adaptive" chooses its own steps'):
        D.probability_flow(score, sde, x, n_steps=10)
    with pytest.raises(ValueError, match="n_steps must be an int >= 1"):
        D.probability_flow(score, sde, x, method="ddim", n_steps=0)
