"""Scores and exact traces against closed forms, and the Hutchinson estimator's statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsm
from jsm import nets, scores

from conftest import tol


def mixture_divergence(t, x):
    """tr ∂s/∂x for s the score of an isotropic mixture, by hand.

    With r_k the responsibilities and a_k = (m_k - x)/s_k²:
    tr ∂s/∂x = -d Σ_k r_k/s_k² + Σ_k r_k |a_k|² - |Σ_k r_k a_k|².
    """
    r = jax.nn.softmax(t._log_components(x))
    a = (t.means - x) / t.scales[:, None] ** 2
    mean_a = r @ a
    return -t.dim * jnp.sum(r / t.scales**2) + jnp.sum(r * jnp.sum(a * a, -1)) - mean_a @ mean_a


@pytest.mark.numerics
@pytest.mark.parametrize("method", scores.EXACT_METHODS)
def test_gaussian_divergence_and_laplacian(gaussian2, method, key):
    xs = gaussian2.sample(key, 8)
    trace_precision = jnp.trace(jnp.linalg.inv(gaussian2.cov))
    div = jax.jit(jax.vmap(jsm.divergence(gaussian2.score, method)))(xs)
    lap = jax.jit(jax.vmap(jsm.laplacian(gaussian2.energy, method)))(xs)
    np.testing.assert_allclose(div, -trace_precision * np.ones(8), rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(lap, trace_precision * np.ones(8), rtol=tol(1e-5, 1e-12))


@pytest.mark.numerics
@pytest.mark.parametrize("method", scores.EXACT_METHODS)
def test_mixture_divergence_closed_form(mixture2, method, key):
    xs = mixture2.sample(key, 32)
    got = jax.jit(jax.vmap(jsm.divergence(mixture2.score, method)))(xs)
    want = jax.jit(jax.vmap(lambda x: mixture_divergence(mixture2, x)))(xs)
    np.testing.assert_allclose(got, want, rtol=tol(2e-4, 1e-10), atol=tol(2e-4, 1e-10))


@pytest.mark.numerics
def test_score_of_energy_is_analytic_score(mixture2, key):
    xs = mixture2.sample(key, 16)
    both = jax.jit(jax.vmap(lambda x: (jsm.score_of(mixture2.energy)(x), mixture2.score(x))))
    np.testing.assert_allclose(*both(xs), rtol=tol(1e-4, 1e-11), atol=tol(1e-5, 1e-12))


@pytest.mark.numerics
def test_exact_methods_agree_on_a_network(key):
    apply, params = nets.pure(nets.MLPEnergy(5, (16, 16), rngs=nnx.Rngs(1)))
    energy = lambda x: apply(params, x)
    xs = jax.random.normal(key, (8, 5))
    lap = {m: jax.jit(jax.vmap(jsm.laplacian(energy, m)))(xs) for m in scores.EXACT_METHODS}
    # The slow obvious reference: the Hessian's diagonal, one second derivative at a time.
    hessians = np.asarray(jax.jit(jax.vmap(jax.hessian(energy)))(xs))
    ref = [sum(h[i, i] for i in range(5)) for h in hessians]
    for m in scores.EXACT_METHODS:
        np.testing.assert_allclose(lap[m], ref, rtol=tol(1e-5, 1e-11), atol=tol(1e-6, 1e-12))


@pytest.mark.numerics
@pytest.mark.parametrize("probe", scores.PROBES)
def test_hutchinson_is_unbiased_with_the_stated_variance(gaussian2, probe, key):
    """E[u^T J u] = tr J; Var = 2 Σ_{i≠j} J_ij² (Rademacher) or 2 Σ_ij J_ij² (Gaussian), J symmetric."""
    x = jnp.array([0.3, -0.2])
    est = jsm.hutchinson_divergence(gaussian2.score, n_probes=1, probe=probe)
    draws = np.asarray(jax.jit(jax.vmap(est, in_axes=(None, 0)))(x, jax.random.split(key, 20_000)))
    jac = np.asarray(jnp.linalg.inv(gaussian2.cov))
    off = jac - np.diag(np.diag(jac))
    var = 2 * np.sum(off**2) if probe == "rademacher" else 2 * np.sum(jac**2)
    assert abs(draws.mean() - (-np.trace(jac))) < 5 * np.sqrt(var / draws.size)
    # Relative standard error of a sample variance is about sqrt((kurtosis - 1) / n) < 0.05 here.
    np.testing.assert_allclose(draws.var(), var, rtol=0.1)


def test_unknown_method_raises_before_compiling(gaussian2):
    with pytest.raises(ValueError, match=r"method must be one of \('forward', 'jacfwd', 'jacrev', 'auto'\), got 'hutchinson'"):
        jsm.divergence(gaussian2.score, "hutchinson")
    with pytest.raises(ValueError, match="probe must be one of"):
        jsm.hutchinson_divergence(gaussian2.score, probe="sphere")
    with pytest.raises(ValueError, match="n_probes must be an int >= 1"):
        jsm.hutchinson_divergence(gaussian2.score, n_probes=0)


def test_batch_instead_of_example_raises(gaussian2):
    with pytest.raises(ValueError, match=r"x must be ONE example of shape \(d,\), got shape \(4, 2\)"):
        jsm.divergence(gaussian2.score)(jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="ONE example"):
        jsm.score_of(gaussian2.energy)(jnp.zeros((4, 2)))
