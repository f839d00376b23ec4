"""The score-matching identities, through the public API, against closed forms and quadrature.

Tolerances are 5 standard errors of the Monte Carlo estimate (from the sample
variance of the per-example terms) or the quadrature error of the grid.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jsm
from jsm import nets, objectives as O
from conftest import grid_2d, tol


def linear_score(A, b):
    return lambda x: A @ x + b


def mean_and_se(values):
    values = np.asarray(values, np.float64)
    return values.mean(), values.std() / np.sqrt(values.size)


@pytest.fixture(scope="module")
def mlp_scores():
    """Two different random score networks on R^2, as pure functions of x."""
    fns = []
    for seed in (0, 1):
        apply, params = nets.pure(nets.MLPScore(2, (32, 32), rngs=nnx.Rngs(seed)))
        fns.append(lambda x, apply=apply, params=params: 3.0 * apply(params, x))
    return fns


# --- closed forms for a linear score under a Gaussian ------------------------------


@pytest.mark.numerics
def test_esm_and_ism_of_a_linear_score_match_closed_forms(gaussian2, key):
    """p = N(m, Σ), s(x) = A x + b, P = Σ^{-1}:
    J_ESM = 1/2 [tr(B Σ B^T) + |B m + c|²] with B = A + P, c = b - P m,
    J_ISM = 1/2 [tr(A Σ A^T) + |A m + b|²] + tr A,  and  J_ESM - J_ISM = 1/2 tr P.
    """
    A, b = jnp.array([[-0.5, 0.2], [0.1, -1.5]]), jnp.array([0.3, -0.4])
    m, S = gaussian2.mean, gaussian2.cov
    P = jnp.linalg.inv(S)
    B, c = A + P, b - P @ m
    esm_exact = 0.5 * (jnp.trace(B @ S @ B.T) + jnp.sum((B @ m + c) ** 2))
    ism_exact = 0.5 * (jnp.trace(A @ S @ A.T) + jnp.sum((A @ m + b) ** 2)) + jnp.trace(A)
    np.testing.assert_allclose(esm_exact - ism_exact, 0.5 * jnp.trace(P), rtol=tol(1e-5, 1e-12))

    xs = gaussian2.sample(key, 50_000)
    s = linear_score(A, b)
    esm_i = jax.vmap(lambda x: O.esm_per_example(s, gaussian2.score, x))(xs)
    ism_i = jax.vmap(lambda x: O.ism_per_example(s, x))(xs)
    for per_example, exact in ((esm_i, esm_exact), (ism_i, ism_exact)):
        mean, se = mean_and_se(per_example)
        assert abs(mean - float(exact)) < 5 * se
    # The batch forms are the means of the per-example forms.
    np.testing.assert_allclose(O.esm(s, gaussian2.score, xs), esm_i.mean(), rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(O.ism(s, xs), ism_i.mean(), rtol=tol(1e-5, 1e-12))


@pytest.mark.numerics
def test_esm_equals_ism_plus_constant_by_quadrature(mixture2, mlp_scores):
    """J_ESM(s) - J_ISM(s) = 1/2 ∫ p |∇log p|² for nonlinear s, on a grid (error < 1e-3)."""
    pts, area, _ = grid_2d((-6.0, -5.0), (6.0, 7.0), 300)
    pts = jnp.asarray(pts, jnp.float32)
    w = np.exp(np.asarray(jax.jit(jax.vmap(mixture2.log_prob))(pts), np.float64)) * area
    assert abs(w.sum() - 1) < 1e-4  # the grid holds the mass
    true_s = np.asarray(jax.vmap(mixture2.score)(pts), np.float64)
    constant = 0.5 * np.sum(w * np.sum(true_s**2, -1))
    gaps = []
    for s in mlp_scores:
        terms = jax.jit(
            jax.vmap(lambda x: (O.esm_per_example(s, mixture2.score, x), O.ism_per_example(s, x)))
        )
        esm_i, ism_i = (np.asarray(v, np.float64) for v in terms(pts))
        j_esm, j_ism = np.sum(w * esm_i), np.sum(w * ism_i)
        gaps.append(j_esm - j_ism)
        assert j_esm > 1.0  # far from the true score: the identity is not 0 = 0
    np.testing.assert_allclose(gaps, [constant] * 2, rtol=1e-3)


@pytest.mark.numerics
def test_esm_of_noised_target_equals_dsm_plus_constant(mixture2, mlp_scores, key):
    """J_ESM(s; p_σ) - J_DSM(s) = C' = 1/2 E_{p_σ}|∇log p_σ|² - d/(2σ²), for any s.

    Paired Monte Carlo: the same (x, ε) feed both per-example terms; C' by quadrature.
    """
    sigma, n = 0.5, 200_000
    p_sigma = mixture2.noised(sigma)
    pts, area, _ = grid_2d((-7.0, -6.0), (7.0, 8.0), 300)
    pts = jnp.asarray(pts, jnp.float32)
    w = np.exp(np.asarray(jax.jit(jax.vmap(p_sigma.log_prob))(pts), np.float64)) * area
    true_s = np.asarray(jax.vmap(p_sigma.score)(pts), np.float64)
    constant = 0.5 * np.sum(w * np.sum(true_s**2, -1)) - 2 / (2 * sigma**2)

    k_x, k_eps = jax.random.split(key)
    xs = mixture2.sample(k_x, n)
    eps = sigma * jax.random.normal(k_eps, xs.shape)
    esm_values = []
    for s in mlp_scores:
        diff = jax.jit(
            jax.vmap(
                lambda x, e: O.esm_per_example(s, p_sigma.score, x + e) - O.dsm_per_example(s, x, e, sigma)
            )
        )(xs, eps)
        mean, se = mean_and_se(diff)
        assert abs(mean - constant) < 5 * se, (mean, constant, se)
        esm_values.append(float(O.esm(s, p_sigma.score, xs + eps)))
    assert abs(esm_values[0] - esm_values[1]) > 1.0  # two genuinely different models


def test_dsm_draws_its_noise_as_documented(mlp_scores, mixture2, key):
    s, sigma = mlp_scores[0], 0.3
    xs = mixture2.sample(key, 64)
    eps = sigma * jax.random.normal(key, xs.shape)
    manual = jnp.mean(jax.vmap(lambda x, e: O.dsm_per_example(s, x, e, sigma))(xs, eps))
    np.testing.assert_allclose(O.dsm(s, key, xs, sigma), manual, rtol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_dsm_is_minimised_by_the_noised_score(gaussian2, key):
    """For Gaussian data the noised score -(Σ + σ²I)^{-1}(x - m) is linear, and DSM's minimiser."""
    sigma = 0.5
    xs = gaussian2.sample(key, 20_000)
    noised = gaussian2.noised(sigma).score
    eps = sigma * jax.random.normal(key, xs.shape)
    base = jax.vmap(lambda x, e: O.dsm_per_example(noised, x, e, sigma))(xs, eps)
    for delta in (0.2, -0.2):
        perturbed = lambda x: noised(x) + delta
        excess = jax.vmap(lambda x, e: O.dsm_per_example(perturbed, x, e, sigma))(xs, eps) - base
        # Its expectation is the Fisher divergence to p_σ, |δ 1|² / 2 = δ² in d = 2.
        mean, se = mean_and_se(excess)
        assert abs(mean - delta**2) < 5 * se and se < 0.2 * delta**2


@pytest.mark.numerics
def test_ssm_is_an_unbiased_estimate_of_ism(mixture2, mlp_scores, key):
    s = mlp_scores[0]
    xs = mixture2.sample(key, 16)
    exact = float(O.ism(s, xs))
    draws = jax.jit(jax.vmap(lambda k: O.ssm(s, k, xs, n_projections=1)))(jax.random.split(key, 4000))
    mean, se = mean_and_se(draws)
    assert abs(mean - exact) < 5 * se


def test_ncsn_weights_each_level_by_sigma_squared(mixture2, key):
    apply, params = nets.pure(nets.NoiseConditionalScore(2, (16,), rngs=nnx.Rngs(0)))
    s = lambda x, sigma: apply(params, x, sigma)
    x, eps, sigma = jnp.array([0.1, 0.2]), jnp.array([0.3, -0.1]), jnp.float32(0.4)
    np.testing.assert_allclose(
        O.ncsn_per_example(s, x, eps, sigma),
        sigma**2 * O.dsm_per_example(lambda y: s(y, sigma), x, eps, sigma),
        rtol=tol(1e-6, 1e-12),
    )
    # With a single level, the batch loss is σ² times DSM at that level, draw for draw.
    xs = mixture2.sample(key, 32)
    one = float(O.ncsn(s, key, xs, jnp.array([0.4])))
    _, k_noise = jax.random.split(key)
    np.testing.assert_allclose(one, 0.16 * float(O.dsm(lambda y: s(y, 0.4), k_noise, xs, 0.4)), rtol=tol(1e-5, 1e-12))


@pytest.mark.slow
def test_ism_overfits_a_small_data_set_and_dsm_cannot(key):
    """A flexible score (a bump at each data point) drives J_ISM to -∞ on 8 points:
    at an isolated x_i, s(x_i) = 0 and tr ∂s/∂x = -a d for amplitude a. Trained the same
    way, J_DSM stays above its floor J_DSM(s*), s* the score of the noised empirical law.
    """
    d, sigma = 2, 0.3
    data = 3.0 * jax.random.normal(key, (8, d))

    def bumps(params, x):
        a, h = jnp.exp(params["log_a"]), jnp.exp(params["log_h"])
        diff = x - data
        k = jnp.exp(-0.5 * jnp.sum(diff**2, -1) / h**2)
        return -a * (k @ diff)

    def train(loss):
        params = {"log_a": jnp.float32(0.0), "log_h": jnp.float32(-1.0)}
        result = jsm.fit(loss, params, data, optimizer=optax.adam(0.05), key=key, steps=300,
                         batch_size=8, log_every=50, progress=False)
        return result

    ism = train(lambda p, k, xs: O.ism(lambda x: bumps(p, x), xs))
    ism_losses = [row["loss"] for row in ism.history]
    assert ism_losses[-1] < -1e3 and ism_losses[-1] < 2 * ism_losses[-2] < 0  # still falling fast

    dsm = train(lambda p, k, xs: O.dsm(lambda x: bumps(p, x), k, xs, sigma))
    empirical = jsm.targets.GaussianMixture(data, jnp.full(8, sigma), jnp.ones(8))
    xs = jnp.tile(data, (4000, 1))
    eps = sigma * jax.random.normal(jax.random.fold_in(key, 1), xs.shape)
    excess = jax.vmap(
        lambda x, e: O.dsm_per_example(lambda y: bumps(dsm.params, y), x, e, sigma)
        - O.dsm_per_example(empirical.score, x, e, sigma)
    )(xs, eps)
    mean, se = mean_and_se(excess)
    assert mean > -5 * se  # J_DSM(s) - J_DSM(s*) = J_ESM(s; p̂_σ) >= 0
    assert dsm.history[-1]["loss"] > 0


# --- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, k: O.esm(s, s, jnp.zeros(2)), ValueError, r"xs must have shape \(n, d\), got shape \(2,\)"),
        (lambda s, k: O.ism(s, jnp.zeros((0, 2))), ValueError, "xs must hold at least one example"),
        (lambda s, k: O.ism(s, jnp.array([[0.0, jnp.nan]])), ValueError, "xs must be finite, got 1 non-finite"),
        (lambda s, k: O.ism(s, jnp.zeros((3, 2)), method="hutch"), ValueError, "method must be one of"),
        (lambda s, k: O.dsm(s, k, jnp.zeros((3, 2)), 0.0), ValueError, "sigma must be positive"),
        (lambda s, k: O.dsm(s, k, jnp.zeros((3, 2)), -1.0), ValueError, "sigma must be positive"),
        (lambda s, k: O.dsm(s, 0, jnp.zeros((3, 2)), 1.0), TypeError, "key must be a PRNG key"),
        (lambda s, k: O.dsm(s, k, np.array([["a", "b"]]), 1.0), TypeError, "xs must be an array of floats"),
        (lambda s, k: O.ncsn(s, k, jnp.zeros((3, 2)), jnp.array([])), ValueError, "sigmas must hold at least one"),
        (lambda s, k: O.ncsn(s, k, jnp.zeros((3, 2)), jnp.array([1.0, -0.1])), ValueError, "sigmas must be positive"),
        (lambda s, k: O.ssm(s, k, jnp.zeros((3, 2)), n_projections=0), ValueError, "n_projections must be an int >= 1"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, match, key):
    with pytest.raises(error, match=match):
        call(lambda x: -x, key)


# --- low-variance DSM ----------------------------------------------------------------


@pytest.mark.numerics
def test_variance_reduced_dsm_is_unbiased_and_matches_the_theorys_variance(gaussian2, key):
    """Linear score s(x) = A x + b on a 2-D Gaussian at σ = 0.01; per-example b-gradients.

    Theory (see `dsm`): Var_plain = tr(AΣAᵀ) + |σA + I/σ|², Var_cv = tr(AΣAᵀ) + σ²|A|², Var_anti = tr(AΣAᵀ),
    with the data covariance Σ = Cov(x). Sample variances of 20k draws are within 10% (their relative
    standard error is about sqrt(2/20000) times a kurtosis factor).
    """
    sigma, n = 0.01, 20_000
    A, b = jnp.array([[-0.8, 0.3], [0.1, -0.6]]), jnp.array([0.2, -0.1])
    S = gaussian2.cov
    k_x, k_eps = jax.random.split(key)
    xs = gaussian2.sample(k_x, n)[:, None, :]  # n batches of one example
    keys = jax.random.split(k_eps, n)

    def grads(vr):
        g = lambda b, k, x: jax.grad(lambda b: O.dsm(lambda y: A @ y + b, k, x, sigma, variance_reduction=vr))(b)
        return np.asarray(jax.jit(jax.vmap(g, in_axes=(None, 0, 0)))(b, keys, xs), np.float64)

    base = float(jnp.trace(A @ S @ A.T))
    theory = {
        None: base + float(jnp.sum((sigma * A + jnp.eye(2) / sigma) ** 2)),
        "control_variate": base + sigma**2 * float(jnp.sum(A**2)),
        "antithetic": base,
    }
    draws = {vr: grads(vr) for vr in theory}
    for vr, g in draws.items():
        np.testing.assert_allclose(g.var(0).sum(), theory[vr], rtol=0.1)
    ratio = draws[None].var(0).sum() / draws["control_variate"].var(0).sum()
    assert ratio > 100 * 100  # the issue asks for >= 100x; at σ = 0.01 the theory gives ~10^4
    # Unbiased: all three mean gradients agree with the exact one, E[Ax + b] = A m + b, within 5 SE.
    exact = np.asarray(A @ gaussian2.mean + b)
    for vr, g in draws.items():
        se = g.std(0) / np.sqrt(n)
        np.testing.assert_array_less(np.abs(g.mean(0) - exact), 5 * se)


def test_ncsn_variance_reduction_keeps_the_value_in_expectation(mixture2, key):
    apply, params = nets.pure(nets.NoiseConditionalScore(2, (16,), rngs=nnx.Rngs(0)))
    s = lambda x, sigma: apply(params, x, sigma)
    xs = mixture2.sample(key, 256)
    sigmas = jnp.array([1.0, 0.1, 0.01])
    draws = {vr: np.asarray(jax.jit(jax.vmap(lambda k: O.ncsn(s, k, xs, sigmas, variance_reduction=vr)))(
        jax.random.split(key, 300))) for vr in O.VARIANCE_REDUCTIONS}
    plain = draws[None]
    for vr in ("antithetic", "control_variate"):
        d = draws[vr]
        se = np.sqrt(plain.var() / plain.size + d.var() / d.size)
        assert abs(d.mean() - plain.mean()) < 5 * se
        assert d.var() < plain.var()


def test_unknown_variance_reduction_raises(key):
    with pytest.raises(ValueError, match=r"variance_reduction must be one of \(None, 'antithetic', 'control_variate'\), got 'anti'"):
        O.dsm(lambda x: -x, key, jnp.zeros((3, 2)), 0.1, variance_reduction="anti")
    with pytest.raises(ValueError, match="variance_reduction must be one of"):
        O.ncsn(lambda x, s: -x, key, jnp.zeros((3, 2)), jnp.array([1.0]), variance_reduction="cv")
