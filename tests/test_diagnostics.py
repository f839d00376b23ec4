"""ESS and split R-hat against processes whose answers are known in closed form."""

import numpy as np
import pytest

from jsm import diagnostics as D, samplers


def _ar1(rng, n, m, rho):
    """x_t = ρ x_{t-1} + sqrt(1-ρ²) u_t, started stationary: N(0, 1) marginals, ESS = N (1-ρ)/(1+ρ)."""
    u = rng.normal(size=(n, m, 1))
    x = np.zeros_like(u)
    x[0] = rng.normal(size=(m, 1))
    for t in range(1, n):
        x[t] = rho * x[t - 1] + np.sqrt(1 - rho**2) * u[t]
    return x, u


@pytest.mark.numerics
def test_ess_and_rhat_on_processes_with_known_answers():
    rng = np.random.default_rng(0)
    n, m, rho = 4000, 8, 0.8
    x, u = _ar1(rng, n, m, rho)
    np.testing.assert_allclose(float(D.effective_sample_size(x)[0]), n * m * (1 - rho) / (1 + rho), rtol=0.15)
    np.testing.assert_allclose(float(D.effective_sample_size(u)[0]), n * m, rtol=0.1)
    assert float(D.split_rhat(x)[0]) < 1.01
    shifted = x + np.arange(m)[None, :, None]  # chains that disagree
    assert float(D.split_rhat(shifted)[0]) > 1.5


@pytest.mark.numerics
def test_antithetic_chain_has_ess_above_n_and_a_drifting_chain_fails_rhat():
    """AR(1) with ρ = -0.5: ESS = N (1 - ρ)/(1 + ρ) = 3N (super-efficient, as NUTS often is).

    A single chain that drifts linearly agrees with no one once split in halves: R̂ >> 1.
    """
    rng = np.random.default_rng(1)
    n, m, rho = 4000, 4, -0.5
    x, _ = _ar1(rng, n, m, rho)
    np.testing.assert_allclose(float(D.effective_sample_size(x)[0]), 3 * n * m, rtol=0.15)
    drift = np.linspace(0.0, 10.0, n)[:, None, None] + rng.normal(size=(n, 1, 1))
    assert float(D.split_rhat(drift)[0]) > 2.0


def test_rhat_by_hand_on_two_short_chains():
    """R̂ = sqrt(((n-1)/n W + B/n) / W) on the four half-chains, written out in NumPy."""
    rng = np.random.default_rng(2)
    trace = rng.normal(size=(10, 2, 3)) + np.array([0.0, 0.7])[None, :, None]
    halves = np.concatenate([trace[:5], trace[5:]], axis=1)  # (5, 4, 3)
    w = halves.var(axis=0, ddof=1).mean(axis=0)
    b_over_n = halves.mean(axis=0).var(axis=0, ddof=1)
    want = np.sqrt((4 / 5 * w + b_over_n) / w)
    np.testing.assert_allclose(np.asarray(D.split_rhat(trace)), want, rtol=1e-5)


def test_names_that_moved_out_of_samplers_still_work_and_warn():
    from jsm import diffusion

    for old, new in [("effective_sample_size", D.effective_sample_size), ("split_rhat", D.split_rhat),
                     ("reverse_sde", diffusion.reverse_sde), ("probability_flow", diffusion.probability_flow),
                     ("encode", diffusion.encode), ("guided", diffusion.guided)]:
        with pytest.warns(DeprecationWarning, match=rf"jsm.samplers.{old} moved to jsm\.\w+\.{old}"):
            assert getattr(samplers, old) is new
    with pytest.raises(AttributeError, match="no_such_name"):
        samplers.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    "trace, match",
    [
        (np.zeros((3, 2, 1)), r"trace must have shape \(n_draws >= 4, n_chains, d\), got \(3, 2, 1\)"),
        (np.zeros((10, 2)), r"trace must have rank 3, got shape \(10, 2\)"),
    ],
)
def test_bad_traces_raise(trace, match):
    with pytest.raises(ValueError, match=match):
        D.effective_sample_size(trace)
