"""Sample-based distances against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsm import metrics


@pytest.mark.numerics
def test_sliced_wasserstein_of_a_shift_is_its_closed_form():
    """For ys = xs + μ every projection is shifted by θ·μ, so SW1 = |μ| E|θ_1| = 2|μ|/π in d = 2."""
    key = jax.random.key(0)
    xs = jax.random.normal(key, (500, 2))
    mu = jnp.array([0.6, -0.8])  # |μ| = 1
    draws = jax.jit(jax.vmap(lambda k: metrics.sliced_wasserstein(xs, xs + mu, k, 64)))(jax.random.split(key, 200))
    draws = np.asarray(draws)
    assert abs(draws.mean() - 2 / np.pi) < 5 * draws.std() / np.sqrt(draws.size)


def test_wasserstein_1d_matches_scipy():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.gamma(2.0, size=300)
    np.testing.assert_allclose(metrics.wasserstein_1d(jnp.asarray(a), jnp.asarray(b)), wasserstein_distance(a, b), rtol=1e-5)


def test_mismatched_samples_raise():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"xs and ys must have the same shape \(n, d\), got \(3, 2\) and \(3, 4\)"):
        metrics.sliced_wasserstein(jnp.zeros((3, 2)), jnp.zeros((3, 4)), key)
    with pytest.raises(ValueError, match="ys must hold at least one example"):
        metrics.sliced_wasserstein(jnp.zeros((1, 2)), jnp.zeros((0, 2)), key)
