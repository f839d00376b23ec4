"""Every formula of the diffusion side against a hand-written float64 reference.

The references below are written out again, the slow obvious way, in NumPy float64 (or in
jax.numpy from the closed forms, where a function must be traced): the SDEs' coefficients,
marginals, log-SNR and prior; the reverse-time and probability-flow drifts; Tweedie's
denoiser; classifier-free guidance; the training times and weights of `dsm_sde` (an
importance-sampling identity against quadrature) and its per-example terms; bits/dim; and
`log_prob` on a Gaussian, whose log p_{t_min} is known. Each one was checked to fail under a
planted bug in the formula it covers (a sign, a factor 2, a swapped argument, a missing square).

The SDEs use parameters other than the defaults, so that a default standing in for a
parameter, or two parameters swapped, shows. Closed-form comparisons are `numerics` tests:
`tol(float32, float64)` is round-off; Monte Carlo comparisons allow 5 standard errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from jsm import diffusion as D, likelihood as L, objectives as O, sde as S
from conftest import FLOAT, tol

BETAS = {"vp": (0.3, 12.0), "subvp": (0.2, 15.0)}
SIGMAS = (0.05, 20.0)
SDES = {"vp": S.VPSDE(*BETAS["vp"]), "subvp": S.SubVPSDE(*BETAS["subvp"]), "ve": S.VESDE(*SIGMAS)}
NAMES = list(SDES)
TIMES = np.array([1e-3, 0.05, 0.3, 0.55, 0.8, 1.0])
RTOL = tol(2e-5, 1e-11)


def reference(name, t):
    """(a(t), g(t)², α_t, σ_t, prior std) of dx = a(t) x dt + g(t) dW, by hand, in float64.

    VP/sub-VP: β(t) = β_min + t (β_max - β_min), B(t) = ∫_0^t β = β_min t + (β_max - β_min) t²/2,
    a = -β/2, α = exp(-B/2); VP: g² = β, σ² = 1 - exp(-B); sub-VP: g² = β (1 - exp(-2B)),
    σ = 1 - exp(-B). VE: σ(t) = σ_min (σ_max/σ_min)^t, g² = σ(t)² 2 log(σ_max/σ_min), a = 0, α = 1,
    σ_t² = σ(t)² - σ_min² (started from the data itself at t = 0).
    """
    t = np.asarray(t, np.float64)
    if name == "ve":
        lo, hi = SIGMAS
        s = lo * (hi / lo) ** t
        return 0.0 * t, s**2 * 2.0 * np.log(hi / lo), np.ones_like(t), np.sqrt(s**2 - lo**2), hi
    b_min, b_max = BETAS[name]
    beta = b_min + t * (b_max - b_min)
    big_b = b_min * t + 0.5 * (b_max - b_min) * t**2
    alpha = np.exp(-big_b / 2)
    if name == "vp":
        return -beta / 2, beta, alpha, np.sqrt(-np.expm1(-big_b)), 1.0
    return -beta / 2, beta * -np.expm1(-2 * big_b), alpha, -np.expm1(-big_b), 1.0


def as_float(x):
    """x as an array of the default float (float32, or float64 under JAX_ENABLE_X64)."""
    return jnp.asarray(x, FLOAT)


# --- sde.py: coefficients, marginals, log-SNR, prior ---------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("name", NAMES)
def test_coefficients_marginal_log_snr_and_prior_are_the_closed_forms(name):
    sde = SDES[name]
    a, g2, alpha, sigma, prior_std = reference(name, TIMES)
    t = as_float(TIMES)
    x = np.array([[0.7, -1.3, 2.0], [0.1, -0.4, 1.1]])  # ONE example, an image-like (2, 3)
    for i in range(len(TIMES)):
        np.testing.assert_allclose(sde.drift(as_float(x), t[i]), a[i] * x, rtol=RTOL, atol=tol(1e-6, 1e-13))
    np.testing.assert_allclose(sde.diffusion(t), np.sqrt(g2), rtol=RTOL)
    got_alpha, got_sigma = sde.marginal(t)
    np.testing.assert_allclose(got_alpha, alpha, rtol=RTOL)
    np.testing.assert_allclose(got_sigma, sigma, rtol=RTOL)
    lam = np.log(alpha**2 / sigma**2)
    np.testing.assert_allclose(sde.log_snr(t), lam, rtol=RTOL, atol=tol(2e-5, 1e-11))
    np.testing.assert_allclose(sde.t_of_log_snr(as_float(lam)), TIMES, rtol=tol(1e-4, 1e-10))
    np.testing.assert_allclose(sde.prior_std(), prior_std, rtol=tol(1e-7, 1e-15))
    np.testing.assert_allclose(sde.prior_log_prob(as_float(x)), stats.norm(0.0, prior_std).logpdf(x).sum(), rtol=RTOL)


@pytest.mark.numerics
@pytest.mark.parametrize("name", NAMES)
def test_marginal_solves_the_moment_odes_of_the_drift_and_diffusion(name):
    """For f = a(t) x: the mean m = E x_t and variance v of x_t from x_0 = 1 solve
    dm/dt = a m, dv/dt = 2 a v + g² with m(0) = 1, v(0) = 0. Integrated by classical RK4 in
    float64 (4000 steps: error ~1e-12) with a(t) = f(1, t) and g(t) from the library, evaluated
    once on the half-step grid, they are (α_t, σ_t²) of `marginal`."""
    sde, n = SDES[name], 4000
    h = 1.0 / n
    grid = as_float(np.linspace(0.0, 1.0, 2 * n + 1))
    a = np.asarray(sde.drift(jnp.ones(2 * n + 1, FLOAT), grid), np.float64)  # f(1, t) = a(t), elementwise
    g2 = np.asarray(sde.diffusion(grid), np.float64) ** 2
    rhs = lambda j, y: np.array([a[j] * y[0], 2 * a[j] * y[1] + g2[j]])
    y, path = np.array([1.0, 0.0]), [np.array([1.0, 0.0])]
    for i in range(n):  # RK4 from t = i h, the grid's point 2i, through 2i + 1 to 2i + 2
        k1 = rhs(2 * i, y)
        k2 = rhs(2 * i + 1, y + h / 2 * k1)
        k3 = rhs(2 * i + 1, y + h / 2 * k2)
        k4 = rhs(2 * i + 2, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        path.append(y)
    m, v = np.array(path)[np.round(TIMES * n).astype(int)].T
    alpha, sigma = sde.marginal(as_float(TIMES))
    np.testing.assert_allclose(m, alpha, rtol=tol(1e-5, 1e-9))
    np.testing.assert_allclose(v, np.asarray(sigma, np.float64) ** 2, rtol=tol(1e-5, 1e-9))


# --- diffusion.py: drifts, Tweedie, guidance -------------------------------------------------


def _score(x, t):
    """An arbitrary smooth s(x, t): the drift formulas hold for any score."""
    return jnp.sin(x) * (1.0 + t) - x


def _score_np(x, t):
    return np.sin(x) * (1.0 + t) - x


@pytest.mark.numerics
@pytest.mark.parametrize("name", NAMES)
def test_reverse_and_ode_drifts_are_f_minus_g2_s_and_half_of_it(name):
    sde = SDES[name]
    rng = np.random.default_rng(1)
    for t in (0.02, 0.4, 0.9):
        x = rng.normal(size=(2, 3))
        a, g2, *_ = reference(name, t)
        s = _score_np(x, t)
        np.testing.assert_allclose(D.reverse_drift(_score, sde, as_float(x), as_float(t)), a * x - g2 * s, rtol=RTOL,
                                   atol=tol(1e-5, 1e-12) * g2)
        np.testing.assert_allclose(D.ode_drift(_score, sde, as_float(x), as_float(t)), a * x - 0.5 * g2 * s, rtol=RTOL,
                                   atol=tol(1e-5, 1e-12) * g2)


MEAN = np.array([0.5, -1.0])
COV = np.array([[1.0, 0.4], [0.4, 0.6]])


def _noised_gaussian(alpha, sigma):
    """N(α m, α² Σ + σ² I): the law of x_t for x_0 ~ N(m, Σ), in float64."""
    return alpha * MEAN, alpha**2 * COV + sigma**2 * np.eye(2)


@pytest.mark.numerics
@pytest.mark.parametrize("name", NAMES)
def test_tweedie_is_the_posterior_mean_of_a_gaussian(name):
    """x_0 ~ N(m, Σ), x_t = α x_0 + σ z: E[x_0 | x_t] = m + α Σ (α² Σ + σ² I)⁻¹ (x_t - α m), the
    Gaussian conditional, against (x + σ² s) / α with the exact score s = -(α² Σ + σ² I)⁻¹ (x - α m)."""
    sde = SDES[name]
    xs = np.random.default_rng(2).normal(size=(4, 2)) * 2.0
    for t in (0.05, 0.5):
        _, _, alpha, sigma, _ = reference(name, t)
        mean_t, cov_t = _noised_gaussian(alpha, sigma)
        prec = as_float(np.linalg.inv(cov_t))
        score = lambda x, s: -prec @ (x - as_float(mean_t))
        for x in xs:
            want = MEAN + alpha * COV @ np.linalg.solve(cov_t, x - mean_t)
            got = D.tweedie_denoise(score, sde, as_float(x), as_float(t))
            np.testing.assert_allclose(got, want, rtol=tol(1e-4, 1e-10), atol=tol(1e-4, 1e-10))


def _conditional(x, t, y):
    """An arbitrary s(x, t, y), different for every label and for NULL_LABEL."""
    return jnp.tanh(x) * (y + 2.0) + t * x - 0.3 * y


def _conditional_np(x, t, y):
    return np.tanh(x) * (y + 2.0) + t * x - 0.3 * y


@pytest.mark.numerics
def test_guidance_is_one_plus_w_conditional_minus_w_unconditional():
    """s_w(x, t, y, *args) = (1 + w) s(x, t, y, *args) - w s(x, t, -1, *args): any w (also traced),
    w = 0 is s(·|y), w = -1 the unconditional score s(·, -1)."""
    x, t = np.array([0.3, -1.2, 2.0]), 0.35
    traced = jax.jit(lambda w, x, y: D.guided(_conditional, w)(x, t, y))
    for y in (0, 2):
        s_y, s_null = _conditional_np(x, t, y), _conditional_np(x, t, -1)
        for w in (2.5, -0.3):
            want = (1 + w) * s_y - w * s_null
            np.testing.assert_allclose(D.guided(_conditional, w)(as_float(x), t, y), want, rtol=RTOL)
            np.testing.assert_allclose(traced(as_float(w), as_float(x), y), want, rtol=RTOL)
        np.testing.assert_allclose(D.guided(_conditional, 0.0)(as_float(x), t, y), s_y, rtol=RTOL)
        np.testing.assert_allclose(D.guided(_conditional, -1.0)(as_float(x), t, y), s_null, rtol=RTOL)
        # further arguments (network parameters) reach both evaluations
        scaled = lambda x, t, y, c: c * _conditional(x, t, y) + (y == -1) * c
        np.testing.assert_allclose(D.guided(scaled, 2.5)(as_float(x), t, y, as_float(3.0)),
                                   3.0 * (3.5 * s_y - 2.5 * s_null) - 2.5 * 3.0, rtol=RTOL)


# --- objectives.py: the training times of an SDE, their weights, the DSM terms ----------------------------


def _lam(name, weighting, t):
    """The time weighting λ(t) of the objective: σ_t² ("sigma2") or g(t)² ("likelihood")."""
    _, g2, _, sigma, _ = reference(name, t)
    return sigma**2 if weighting == "sigma2" else g2


@pytest.mark.numerics
@pytest.mark.parametrize("weighting", O.WEIGHTINGS)
@pytest.mark.parametrize("name", NAMES)
def test_training_times_and_weights_estimate_the_time_integral(name, weighting, key):
    """mean_i w_i ℓ(t_i) is unbiased for ∫_{t_min}^1 λ(t) ℓ(t) dt / (1 - t_min), for a smooth ℓ:
    the importance-sampling identity, against scipy's quadrature, within 5 standard errors
    (t_min = 0.1 makes the 1/(1 - t_min) visible: 11%, against 5 SE of about 1%). The weights
    themselves are σ_t² ("sigma2") and (λ_snr(t_min) - λ_snr(1)) σ_t² / (1 - t_min)
    ("likelihood"), λ_snr = log(α²/σ²), at the drawn times, and the times follow their law
    (Kolmogorov-Smirnov): the identity alone misses t ~ U(t_min, 1) for "likelihood" under the
    VP SDE (0.7% off)."""
    sde, t_min, n = SDES[name], 0.1, 40_000
    ell = lambda t: 1.0 + t + 0.5 * np.cos(5 * t)
    t, w = O.training_times(sde, key, n, t_min=t_min, weighting=weighting)
    t, w = np.asarray(t, np.float64), np.asarray(w, np.float64)
    assert t.min() >= t_min and t.max() <= 1.0
    values = w * ell(t)
    mean, se = values.mean(), values.std(ddof=1) / np.sqrt(n)
    want = integrate.quad(lambda s: _lam(name, weighting, s) * ell(s), t_min, 1.0, epsabs=1e-12, epsrel=1e-12)[0]
    want /= 1 - t_min
    assert abs(mean - want) < 5 * se, (mean, want, se)
    _, _, alpha, sigma, _ = reference(name, t)
    if weighting == "sigma2":
        np.testing.assert_allclose(w, sigma**2, rtol=tol(1e-4, 1e-9))
        u = (t - t_min) / (1 - t_min)
    else:
        lam = lambda s: np.log(reference(name, s)[2] ** 2 / reference(name, s)[3] ** 2)
        z = lam(t_min) - lam(1.0)
        np.testing.assert_allclose(w, z * sigma**2 / (1 - t_min), rtol=tol(1e-4, 1e-9))
        u = (lam(t_min) - lam(t)) / z
    # the times' own law: U(t_min, 1), or uniform in log-SNR (the CDF of q ∝ g²/σ² = -dλ_snr/dt)
    assert stats.kstest(u, "uniform").pvalue > 1e-4


A = np.array([[-1.0, 0.3, 0.0], [0.2, -0.8, 0.1], [0.0, -0.4, -1.5]])
B = np.array([0.5, -0.2, 1.0])


def _linear(x, t):
    """s(x, t) = A x + t b, not the true score of anything here: the DSM terms hold for any s."""
    return as_float(A) @ x + t * as_float(B)


def _dsm_terms_np(name, x, t, z, w):
    """The per-example terms, by hand: ℓ(z) = 1/2 |s(α x + σ z, t) + z/σ|², then w ℓ(z) (plain),
    w (ℓ(z) + ℓ(-z))/2 (antithetic) and w (ℓ(z) - z·s(α x, t)/σ) (control variate)."""
    _, _, alpha, sigma, _ = reference(name, t)
    s = lambda y: A @ y + t * B
    ell = lambda e: 0.5 * np.sum((s(alpha * x + sigma * e) + e / sigma) ** 2)
    return {None: w * ell(z), "antithetic": w * 0.5 * (ell(z) + ell(-z)),
            "control_variate": w * (ell(z) - z @ s(alpha * x) / sigma)}


@pytest.mark.numerics
@pytest.mark.parametrize("name, weighting", [("vp", "sigma2"), ("subvp", "likelihood"), ("ve", "likelihood")])
def test_dsm_sde_is_the_hand_computed_batch_mean(name, weighting, key):
    """dsm_sde = mean_i w_i ℓ_i over its documented draws (k_t, k_z = split(key); t, w from
    `training_times(k_t)`, z ~ N(0, I) from k_z), each term written out in NumPy, with the weights
    by hand; and dsm_sde_per_example on its own at a given (x, t, z, w)."""
    sde, t_min = SDES[name], 0.01
    xs = np.random.default_rng(3).normal(size=(5, 3))
    k_t, k_z = jax.random.split(key)
    t = np.asarray(O.training_times(sde, k_t, 5, t_min=t_min, weighting=weighting)[0], np.float64)
    z = np.asarray(jax.random.normal(k_z, xs.shape, FLOAT), np.float64)
    _, _, alpha, sigma, _ = reference(name, t)
    if weighting == "sigma2":
        w = sigma**2
    else:
        lam = lambda s: np.log(reference(name, s)[2] ** 2 / reference(name, s)[3] ** 2)
        w = (lam(t_min) - lam(1.0)) * sigma**2 / (1 - t_min)
    for vr in O.VARIANCE_REDUCTIONS:
        want = np.mean([_dsm_terms_np(name, xs[i], t[i], z[i], w[i])[vr] for i in range(5)])
        got = O.dsm_sde(_linear, sde, key, as_float(xs), t_min=t_min, weighting=weighting, variance_reduction=vr)
        np.testing.assert_allclose(got, want, rtol=tol(1e-4, 1e-10))
        one = O.dsm_sde_per_example(_linear, sde, as_float(xs[0]), as_float(t[0]), as_float(z[0]), 2.5, vr)
        np.testing.assert_allclose(one, _dsm_terms_np(name, xs[0], t[0], z[0], 2.5)[vr], rtol=tol(1e-4, 1e-10))


def test_variance_reductions_keep_the_mean(key):
    """At a fixed (x, t), E_z 1/2 |A (α x + σ z) + t b + z/σ|² = 1/2 |α A x + t b|² + 1/2 ||σ A + I/σ||_F²
    (z ~ N(0, I)); the antithetic and control-variate terms have the same mean. 20000 draws of z,
    5 standard errors."""
    sde, t, x = SDES["vp"], 0.3, np.array([0.4, -1.0, 0.8])
    _, _, alpha, sigma, _ = reference("vp", t)
    want = 0.5 * np.sum((alpha * A @ x + t * B) ** 2) + 0.5 * np.sum((sigma * A + np.eye(3) / sigma) ** 2)
    zs = jax.random.normal(key, (20_000, 3), FLOAT)
    for vr in O.VARIANCE_REDUCTIONS:
        terms = jax.vmap(lambda z: O.dsm_sde_per_example(_linear, sde, as_float(x), as_float(t), z, 1.0, vr))(zs)
        terms = np.asarray(terms, np.float64)
        mean, se = terms.mean(), terms.std(ddof=1) / np.sqrt(terms.size)
        assert abs(mean - want) < 5 * se, (vr, mean, want, se)


# --- likelihood.py: bits/dim and log p of a Gaussian ------------------------------------------


@pytest.mark.numerics
def test_bits_per_dim_is_the_negative_log2_density_per_dimension_plus_the_bin_offset():
    """bpd = -(log p + d log Δ) / (d log 2) = -log p / (d log 2) - log2 Δ, for any log p and Δ."""
    log_p = np.array([[-3.7, 12.0], [-250.0, 0.4]])
    d = 5
    np.testing.assert_allclose(L.bits_per_dim(as_float(log_p), d), -log_p / (d * np.log(2)), rtol=tol(1e-6, 1e-13))
    for delta in (1 / 256, 2 / 256, 3.0):
        got = L.bits_per_dim(as_float(log_p), d, bin_width=delta)
        assert got.shape == log_p.shape
        np.testing.assert_allclose(got, -(log_p + d * np.log(delta)) / (d * np.log(2)), rtol=tol(1e-5, 1e-12))
        np.testing.assert_allclose(got, -log_p / (d * np.log(2)) - np.log2(delta), rtol=tol(1e-5, 1e-12))


def _vp_marginal(t):
    """(α_t, σ_t) of the VP SDE written out again in jax.numpy, for the traced exact score."""
    b_min, b_max = BETAS["vp"]
    big_b = b_min * t + 0.5 * (b_max - b_min) * t**2
    return jnp.exp(-big_b / 2), jnp.sqrt(-jnp.expm1(-big_b))


def _ve_marginal(t):
    lo, hi = SIGMAS
    return jnp.ones_like(t), lo * jnp.sqrt(jnp.expm1(2 * t * np.log(hi / lo)))


def _gaussian_score(marginal):
    def score(x, t):
        alpha, sigma = marginal(t)
        cov = alpha**2 * as_float(COV) + sigma**2 * jnp.eye(2, dtype=x.dtype)
        return -jnp.linalg.solve(cov, x - alpha * as_float(MEAN))
    return score


def _gaussian_log_p(marginal, t):
    """log p_t for x_0 ~ N(m, Σ), in jax.numpy: the exact p_T, standing in for the prior."""
    def log_p(x):
        alpha, sigma = marginal(as_float(t))
        cov = alpha**2 * as_float(COV) + sigma**2 * jnp.eye(2, dtype=x.dtype)
        r = x - alpha * as_float(MEAN)
        return -0.5 * r @ jnp.linalg.solve(cov, r) - 0.5 * jnp.linalg.slogdet(cov)[1] - np.log(2 * np.pi)
    return log_p


GAUSSIAN_SCORES = {"vp": _gaussian_score(_vp_marginal), "ve": _gaussian_score(_ve_marginal)}
MARGINALS = {"vp": _vp_marginal, "ve": _ve_marginal}


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_log_prob_of_a_gaussian_is_its_noised_log_density(name):
    """x_0 ~ N(m, Σ) in d = 2, the exact score of p_t, and the exact p_T as the prior: log_prob is
    log p_{t_min} = log N(x; α m, α² Σ + σ² I) at t_min (scipy), to the solver's error (measured:
    2.5e-5 nats at rtol = atol = 1e-5 in float32, 1.6e-9 at 1e-9 in float64). With the SDE's own
    prior instead of p_T the answer is 0.03 nats off: the test sees `prior_log_prob` used."""
    sde, t_min = SDES[name], 1e-3
    xs = np.array([[0.5, -1.0], [2.0, 0.3], [-1.5, -2.2]])
    _, _, alpha, sigma, _ = reference(name, t_min)
    want = stats.multivariate_normal(*_noised_gaussian(alpha, sigma)).logpdf(xs)
    solver = tol(1e-5, 1e-9)
    got = L.log_prob(GAUSSIAN_SCORES[name], sde, as_float(xs), t_min=t_min, rtol=solver, atol=solver,
                     prior_log_prob=_gaussian_log_p(MARGINALS[name], 1.0))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol(2e-4, 1e-7))
