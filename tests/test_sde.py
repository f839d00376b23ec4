"""The forward SDEs: marginals against the SDE itself (simulated, and through the variance ODE),
the log-SNR used by the likelihood weighting, the prior, closed-form noised targets, bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jsm import sde as S, targets
from conftest import tol

SDES = {"ve": S.VESDE(), "vp": S.VPSDE(), "subvp": S.SubVPSDE()}
TIMES = jnp.array([0.0, 1e-3, 0.05, 0.3, 0.7, 1.0])


@pytest.fixture(scope="module", params=list(SDES))
def sde(request):
    return SDES[request.param]


@pytest.mark.numerics
def test_drift_diffusion_and_marginal_obey_the_variance_ode(sde):
    """For f = a(t) x: a = d log α_t/dt, and dσ_t²/dt = 2 a(t) σ_t² + g(t)² (the Fokker-Planck
    equation's second moment). Derivatives by jax.grad."""
    for t in (0.01, 0.2, 0.5, 0.9, 1.0):
        t = jnp.asarray(t)
        a = jax.grad(lambda s: jnp.log(sde.marginal(s)[0]))(t)
        x = jnp.array([1.5, -0.5, 2.0])
        np.testing.assert_allclose(sde.drift(x, t), a * x, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-12))
        dvar = jax.grad(lambda s: sde.marginal(s)[1] ** 2)(t)
        _, sigma = sde.marginal(t)
        terms = (2 * a * sigma**2, sde.diffusion(t) ** 2)
        # the two terms nearly cancel at large t (VP: σ_t² -> 1): round-off relative to their size
        np.testing.assert_allclose(dvar, sum(terms), atol=tol(2e-6, 1e-13) * sum(abs(v) for v in terms))


@pytest.mark.numerics
def test_marginal_at_zero_is_the_data(sde):
    alpha, sigma = sde.marginal(0.0)
    assert float(alpha) == 1.0 and float(sigma) == 0.0


def test_marginal_matches_an_euler_maruyama_simulation(sde, key):
    """x_0 a point mass; 2000 Euler-Maruyama steps of dx = f dt + g dW for 20000 paths. At
    t = 0.1, 0.5, 1: mean α_t x_0 and variance σ_t² within 5 standard errors (the scheme's
    O(Δt) bias, about β Δt / 4 = 0.25% of the variance, is below one SE of 0.7%).
    A point mass makes the VE offset visible: σ(0.1)² = 5.5e-4 against σ_t² = 4.5e-4."""
    n, n_steps, x0, times = 20_000, 2000, jnp.array([1.0, -2.0]), (0.1, 0.5, 1.0)
    dt = 1.0 / n_steps
    stops = [int(round(t * n_steps)) for t in times]

    @jax.jit
    def simulate(key):
        def step(x, i):
            t = i * dt
            u = jax.random.normal(jax.random.fold_in(key, i), x.shape)
            return x + sde.drift(x, t) * dt + sde.diffusion(t) * jnp.sqrt(dt) * u, None

        x, out = jnp.broadcast_to(x0, (n, 2)), []
        for start, stop in zip([0] + stops[:-1], stops):  # only the states at `times` are kept
            x, _ = jax.lax.scan(step, x, jnp.arange(start, stop))
            out.append(x)
        return out

    for t, x in zip(times, simulate(key)):
        x = np.asarray(x, np.float64)
        alpha, sigma = (float(v) for v in sde.marginal(t))
        mean_se = sigma / np.sqrt(n)
        np.testing.assert_allclose(x.mean(0), alpha * np.asarray(x0), atol=5 * mean_se)
        np.testing.assert_allclose(x.var(0), sigma**2, rtol=5 * np.sqrt(2 / n))


@pytest.mark.numerics
def test_log_snr_derivative_is_the_likelihood_weighting_and_inverts(sde):
    """λ(t) = log(α_t²/σ_t²) has -dλ/dt = g(t)²/σ_t², and t_of_log_snr inverts it."""
    for t in (1e-5, 1e-3, 0.1, 0.5, 1.0):
        t = jnp.asarray(t)
        _, sigma = sde.marginal(t)
        dlam = jax.grad(sde.log_snr)(t)
        np.testing.assert_allclose(-dlam, sde.diffusion(t) ** 2 / sigma**2, rtol=tol(2e-4, 1e-9))
        np.testing.assert_allclose(sde.t_of_log_snr(sde.log_snr(t)), t, rtol=tol(2e-4, 1e-9))


@pytest.mark.numerics
def test_prior_log_prob_and_sample(sde, key):
    x = jnp.array([[0.3, -1.2], [2.0, 0.1]])
    s = float(sde.prior_std())
    np.testing.assert_allclose(sde.prior_log_prob(x), stats.norm(0, s).logpdf(np.asarray(x)).sum(),
                               rtol=tol(1e-5, 1e-12))
    draws = sde.prior_sample(key, (4000, 3))
    assert draws.shape == (4000, 3)
    np.testing.assert_allclose(np.std(np.asarray(draws)), s, rtol=5 * np.sqrt(1 / (2 * draws.size)))


@pytest.mark.numerics
def test_noised_targets_are_the_marginals_in_closed_form(sde, gaussian2, mixture2, key):
    """x_t = α x_0 + σ z: p_t of N(m, Σ) is N(α m, α² Σ + σ² I), and p_t of a mixture is the
    mixture of its components' p_t, written out here as full-covariance Gaussians."""
    t = 0.4
    alpha, sigma = sde.marginal(t)
    g = sde.noised(gaussian2, t)
    np.testing.assert_allclose(g.mean, alpha * gaussian2.mean, rtol=tol(1e-6, 1e-12))
    np.testing.assert_allclose(g.cov, alpha**2 * gaussian2.cov + sigma**2 * jnp.eye(2), rtol=tol(1e-6, 1e-12))
    m = sde.noised(mixture2, t)
    x = jnp.array([0.4, -0.7])
    comps = [targets.Gaussian(alpha * mk, (alpha**2 * sk**2 + sigma**2) * jnp.eye(2))
             for mk, sk in zip(mixture2.means, mixture2.scales)]
    w = mixture2.weights / jnp.sum(mixture2.weights)
    expected = jnp.log(sum(wk * jnp.exp(c.log_prob(x)) for wk, c in zip(w, comps)))
    np.testing.assert_allclose(m.log_prob(x), expected, rtol=tol(1e-5, 1e-12))
    # t = 0 is the target itself
    np.testing.assert_allclose(sde.noised(mixture2, 0.0).log_prob(x), mixture2.log_prob(x), rtol=tol(1e-6, 1e-12))
    with pytest.raises(TypeError, match="Gaussian or GaussianMixture"):
        sde.noised(targets.Banana(), t)


def test_parameters_are_leaves_so_new_values_do_not_recompile():
    traces = []

    @jax.jit
    def sigma_at_half(sde):
        traces.append(1)
        return sde.marginal(0.5)[1]

    a, b = sigma_at_half(S.VPSDE(0.1, 20.0)), sigma_at_half(S.VPSDE(0.2, 10.0))
    assert len(traces) == 1 and float(a) != float(b)


@pytest.mark.parametrize("make, match", [
    (lambda: S.VESDE(sigma_min=0.0), "sigma_min must be positive"),
    (lambda: S.VESDE(sigma_min=-1.0), "sigma_min must be positive"),
    (lambda: S.VESDE(sigma_min=5.0, sigma_max=1.0), "sigma_min must be < sigma_max"),
    (lambda: S.VESDE(sigma_max=float("inf")), "sigma_max must be positive and finite"),
    (lambda: S.VPSDE(beta_min=30.0), "beta_min must be <= beta_max"),
    (lambda: S.SubVPSDE(beta_min=0.0), "beta_min must be positive"),
    (lambda: S.VPSDE(beta_max=jnp.ones(2)), "beta_max must be a real scalar"),
    (lambda: S.VPSDE().marginal(1.5), r"t must be in \[0, 1.0\], got 1.5"),
    (lambda: S.VESDE().diffusion(jnp.array([0.5, -0.1])), r"t must be in \[0, 1.0\]"),
    (lambda: S.SubVPSDE().drift(jnp.ones(2), float("nan")), "t must be in"),
])
def test_bad_input_is_rejected_before_compiling(make, match):
    with pytest.raises(ValueError, match=match):
        make()
