"""Langevin kernels and the chain loop, checked by statistics with bounds from the ESS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsm import diagnostics as D, samplers as S, targets

from conftest import tol


@pytest.fixture(scope="module")
def gauss():
    return targets.Gaussian(jnp.array([1.0, -1.0]), jnp.array([[1.0, 0.6], [0.6, 2.0]]))


@pytest.fixture(scope="module")
def mala_kernel(gauss):
    return S.mala(gauss.log_prob, 0.6)  # built once: every seed reuses one compiled loop


@pytest.mark.numerics
@pytest.mark.parametrize("seed, impl", [(0, "threefry2x32"), (1, "threefry2x32"), (2, "threefry2x32"),
                                        (0, "rbg"), (0, "unsafe_rbg")])
def test_mala_moments_within_ess_bounds(gauss, mala_kernel, seed, impl):
    """Keys of any implementation: rbg and unsafe_rbg keys draw other numbers, from the same law."""
    key = jax.random.key(seed, impl=impl)
    x0 = gauss.sample(jax.random.fold_in(key, 1), 16)  # 16 chains started in the stationary law
    _, trace, info = S.run_chains(mala_kernel, key, x0, 2000, thin=1)
    assert 0.4 < float(info.acceptance_rate.mean()) < 0.95 and int(info.n_nonfinite.sum()) == 0
    trace = np.asarray(trace[200:])
    m, var = np.asarray(gauss.mean), np.diag(np.asarray(gauss.cov))
    ess = np.asarray(D.effective_sample_size(trace))
    assert np.all(ess > 1000)
    np.testing.assert_array_less(np.abs(trace.mean((0, 1)) - m), 5 * np.sqrt(var / ess))
    # Second moments: z-test on (x - m)^2, with its own ESS and spread.
    sq = (trace - m) ** 2
    ess_sq = np.asarray(D.effective_sample_size(sq))
    np.testing.assert_array_less(np.abs(sq.mean((0, 1)) - var), 5 * sq.std((0, 1)) / np.sqrt(ess_sq))
    assert np.all(np.asarray(D.split_rhat(trace)) < 1.02)


@pytest.mark.numerics
def test_ula_bias_shrinks_with_step_size_as_the_closed_form_says():
    """ULA on N(0, I): x' = (1 - a) x + sqrt(2a) u has stationary variance 1 / (1 - a/2).

    The bias a / (2 - a) = O(a) vanishes as a -> 0 (and steps -> ∞), measured at four steps.
    """
    std_normal = targets.Gaussian(jnp.zeros(2), jnp.eye(2))
    key = jax.random.key(0)
    x0 = jax.random.normal(key, (4096, 2))
    biases = []
    for a in (0.4, 0.2, 0.1, 0.05):
        final, _, _ = S.run_chains(S.ula(std_normal.score, a), key, x0, int(10 / a))
        xs = np.asarray(final.position, np.float64)
        var, se = xs.var(), xs.var() * np.sqrt(2 / xs.size)  # the SE of a Gaussian sample variance
        assert abs(var - 1 / (1 - a / 2)) < 5 * se, (a, var)
        biases.append(var - 1)
    assert biases[0] > 0.15 and all(b1 > b2 for b1, b2 in zip(biases, biases[1:]))


@pytest.mark.numerics
def test_annealed_langevin_recovers_mixture_weights_plain_langevin_misses():
    mix = targets.GaussianMixture(jnp.array([[-4.0, 0.0], [4.0, 0.0]]), jnp.array([0.5, 0.5]), jnp.array([0.8, 0.2]))
    key = jax.random.key(1)
    x0 = jax.random.uniform(key, (2000, 2), minval=-8, maxval=8)  # half the chains start near each mode
    left = lambda xs: float(jnp.mean(xs[:, 0] < 0))

    plain, _, _ = S.run_chains(S.ula(mix.score, 0.05), key, x0, 1000)
    sigmas = jnp.geomspace(10.0, 0.1, 10)
    noised_score = lambda x, sigma: mix.noised(sigma).score(x)
    annealed, _, _ = S.run_chains(S.annealed_langevin(noised_score, sigmas, 100, 2e-3), key, x0, 1000)

    se = np.sqrt(0.8 * 0.2 / 2000)
    assert abs(left(plain.position) - 0.8) > 20 * se  # stuck where the chains started: about 1/2
    assert abs(left(annealed.position) - 0.8) < 5 * se + 0.02  # + the schedule's finite-step bias
    assert int(annealed.t[0]) == 1000


def test_mala_rejects_non_finite_proposals_and_counts_them():
    log_prob = lambda x: jnp.where(x[0] > 0.0, jnp.nan, -0.5 * jnp.dot(x, x))
    final, trace, info = S.run_chains(S.mala(log_prob, 0.5), jax.random.key(0), -jnp.ones((8, 2)), 200, thin=1)
    assert np.all(np.asarray(trace)[..., 0] <= 0.0) and np.all(np.isfinite(trace))
    assert np.all(np.asarray(info.n_nonfinite) > 0)


def test_ula_reports_chains_that_blow_up():
    explode = lambda x: 10.0 * x  # the score of exp(+5|x|²): no stationary law
    final, _, info = S.run_chains(S.ula(explode, 0.5), jax.random.key(0), jnp.ones((4, 2)), 400)
    assert np.all(np.asarray(info.n_nonfinite) > 0)


def test_run_chains_trace_thinning_and_determinism(gauss, mala_kernel):
    key, x0 = jax.random.key(5), jnp.zeros((3, 2))
    final, trace, info = S.run_chains(mala_kernel, key, x0, 40, thin=10)
    assert trace.shape == (4, 3, 2) and final.position.shape == (3, 2) and info.acceptance_rate.shape == (3,)
    np.testing.assert_array_equal(trace[-1], final.position)
    again, no_trace, _ = S.run_chains(mala_kernel, key, x0, 40)
    assert no_trace is None
    np.testing.assert_array_equal(again.position, final.position)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: S.ula(lambda x: -x, 0.0), ValueError, "step_size must be positive"),
        (lambda: S.mala(lambda x: -x @ x, -0.1), ValueError, "step_size must be positive"),
        (lambda: S.annealed_langevin(lambda x, s: -x, jnp.array([1.0, 2.0]), 5, 0.1), ValueError, "sigmas must be strictly decreasing"),
        (lambda: S.annealed_langevin(lambda x, s: -x, jnp.array([1.0, 0.5]), 0, 0.1), ValueError, "n_steps_each must be an int >= 1"),
        (lambda: S.run_chains(S.ula(lambda x: -x, 0.1), jax.random.key(0), jnp.zeros(2), 10), ValueError, r"x0 must have shape \(n_chains, \*shape\) with n_chains >= 1.*got shape \(2,\)"),
        (lambda: S.run_chains(S.ula(lambda x: -x, 0.1), jax.random.key(0), jnp.zeros((2, 2)), 0), ValueError, "n_steps must be an int >= 1"),
        (lambda: S.run_chains(S.ula(lambda x: -x, 0.1), jax.random.key(0), jnp.zeros((2, 2)), 10, thin=3), ValueError, "multiple of thin=3"),
        (lambda: S.run_chains(lambda k, s: s, jax.random.key(0), jnp.zeros((2, 2)), 10), TypeError, "kernel must be a jsm.samplers.Kernel"),
        (lambda: S.run_chains(S.ula(lambda x, p: -x, 0.1), jax.random.key(0), jnp.zeros((2, 2)), 10, args={"p": 1.0}), TypeError, "args must be a tuple of pytrees.*got dict"),
        (lambda: S.mala(lambda x: -x @ x, 0.1).replace(step=0.2), ValueError, r"unknown parameter\(s\) \['step'\]; this kernel has \['step_size'\]"),
        (lambda: S.mala(lambda x: -x @ x, jnp.ones(2)), ValueError, r"step_size must be a scalar, got shape \(2,\)"),
        (lambda: S.mala(lambda x: -x @ x, 0.1, value_and_grad=1.0), TypeError, r"value_and_grad must be a function .* got float"),
        (lambda: S.from_blackjax(lambda x: x), TypeError, "algorithm must be a blackjax SamplingAlgorithm"),
        (lambda: S.from_blackjax(object(), lambda x: x), TypeError, "algorithm must be a blackjax factory"),
        (lambda: S.from_blackjax(lambda f, **kw: None, lambda x: x, metric={"a": 1}), TypeError, "metric must be a float, an array or a hashable setting, got dict"),
        (lambda: S.tune_step_size(S.annealed_langevin(lambda x, s: -x, jnp.array([1.0]), 5, snr=0.1), jax.random.key(0), jnp.zeros((2, 2)), 10), TypeError, "kernel must have a step_size parameter"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np, sys
from jsm import samplers as S, targets
t = targets.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]), jnp.array([0.3, 0.7]))
x0 = jax.random.normal(jax.random.key(0), (8, 2))
shift = jax.device_put(jnp.array([0.5, 0.0]), jax.devices()[0])  # an arg committed to one device
final, trace, info = S.run_chains(S.mala(lambda x, m: t.log_prob(x - m), 0.3), jax.random.key(1), x0, 50, thin=25,
                                  args=(shift,))
print(len(jax.devices()), len(final.position.sharding.device_set))
# Matrix-shaped positions (n_chains, 2, 3): the chain axis is split, each (2, 3) position stays whole.
m0 = jax.random.normal(jax.random.key(2), (8, 2, 3))
_, m_trace, _ = S.run_chains(S.mala(lambda x: -0.5 * jnp.sum(x**2), 0.3), jax.random.key(3), m0, 20, thin=10)
# Keys of XLA's RngBitGenerator, with the mixture's closed-form pair.
rbg = [S.run_chains(S.mala(t.log_prob, 0.3, value_and_grad=t.log_prob_and_score), jax.random.key(1, impl=impl), x0, 50,
                    thin=25)[1] for impl in ("rbg", "unsafe_rbg")]
np.save(sys.argv[1], np.concatenate([np.asarray(trace).ravel(), np.asarray(info.acceptance_rate),
                                     np.asarray(m_trace).ravel(), *(np.asarray(r).ravel() for r in rbg)]))
"""


@pytest.mark.slow
def test_chains_sharded_over_four_devices_equal_one_device(tmp_path):
    import os
    import subprocess
    import sys

    outputs = {}
    for n_devices in (1, 4):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
        out = tmp_path / f"{n_devices}.npy"
        res = subprocess.run([sys.executable, "-c", _SHARDED, str(out)], env=env, capture_output=True, text=True, check=True)
        assert res.stdout.split() == [str(n_devices), str(n_devices)]  # devices seen, devices holding chains
        outputs[n_devices] = np.load(out)
    np.testing.assert_array_equal(outputs[1], outputs[4])


# --- step-size tuning and the snr rule -------------------------------------------------


@pytest.fixture(scope="module")
def anisotropic():
    scales = jnp.geomspace(0.1, 3.0, 10)
    return targets.Gaussian(jnp.zeros(10), jnp.diag(scales**2))


@pytest.mark.numerics
@pytest.mark.parametrize("initial", [0.1, 10.0, 1e-3])  # a good guess, and hopeless starts 100x too large / small
def test_tuned_mala_accepts_at_the_target_rate(anisotropic, initial):
    kernel = S.mala(anisotropic.log_prob, initial)
    x0 = anisotropic.sample(jax.random.key(0), 64)
    step, state = S.tune_step_size(kernel, jax.random.key(1), x0, 1000)
    _, _, info = S.run_chains(kernel.replace(step_size=step), jax.random.key(2), state.position, 1000)
    assert abs(float(info.acceptance_rate.mean()) - 0.574) < 0.05


def test_tuning_reports_non_finite_log_densities():
    log_prob = lambda x: jnp.where(x[0] > 1.0, jnp.nan, -0.5 * jnp.dot(x, x))
    with pytest.warns(RuntimeWarning, match=r"\d+ proposals had a non-finite log-density"):
        step, state = S.tune_step_size(S.mala(log_prob, 0.1), jax.random.key(0), jnp.zeros((16, 2)), 200)
    assert np.all(np.asarray(state.position[:, 0]) <= 1.0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(target_acceptance=1.0), r"target_acceptance must be in \(0, 1\), got 1.0"),
        (dict(target_acceptance=0.0), r"target_acceptance must be in \(0, 1\)"),
        (dict(n_steps=0), "n_steps must be an int >= 1, got 0"),
        (dict(initial_step_size=-1.0), "initial_step_size must be positive"),
    ],
)
def test_tuning_bad_input(kw, match):
    args = dict(kernel=S.mala(lambda x: -x @ x, 0.1), key=jax.random.key(0), x0=jnp.zeros((4, 2)), n_steps=10)
    with pytest.raises(ValueError, match=match):
        S.tune_step_size(**(args | kw))


@pytest.mark.numerics
def test_snr_rule_sets_drift_to_snr_times_noise():
    """With a = 2 (r |u| / |s|)², |a s| = r sqrt(2a) |u| at every step, whatever the score's size."""
    score = lambda x, sigma: -x / sigma**2
    kernel = S.annealed_langevin(score, jnp.array([1.0, 0.1]), 5, snr=0.16)
    x = jnp.array([3.0, -4.0])
    state = kernel.init(x)
    new, _ = kernel.step(jax.random.key(0), state)
    u = jax.random.normal(jax.random.key(0), (2,))
    s = score(x, 1.0)
    a = 2 * (0.16 * jnp.linalg.norm(u) / jnp.linalg.norm(s)) ** 2
    np.testing.assert_allclose(new.position, x + a * s + jnp.sqrt(2 * a) * u, rtol=tol(1e-5, 1e-12))
    # The kernel's own coefficients: solve x' - x = c1 s + c2 u; the rule says c2 = sqrt(2 c1), |c1 s| = r c2 |u|.
    c1, c2 = np.linalg.solve(np.stack([s, u], axis=1), np.asarray(new.position - x))
    np.testing.assert_allclose(c2, np.sqrt(2 * c1), rtol=tol(1e-4, 1e-10))
    np.testing.assert_allclose(c1 * np.linalg.norm(s), 0.16 * c2 * np.linalg.norm(u), rtol=tol(1e-4, 1e-10))
    with pytest.raises(ValueError, match="give exactly one of step_size and snr"):
        S.annealed_langevin(score, jnp.array([1.0]), 5, 0.1, snr=0.1)


# --- kernels are data: new numbers and new args compile nothing --------------------


def _shifted_log_prob(x, m):
    return -0.5 * jnp.sum((x - m) ** 2)


def _shifted_value_and_grad(x, m):
    return _shifted_log_prob(x, m), -(x - m)


def _shifted_score(x, sigma, m):
    return -(x - m) / (1.0 + sigma**2)


def test_new_step_sizes_args_and_rebuilt_kernels_compile_nothing(compilations):
    key, x0 = jax.random.key(0), jnp.zeros((4, 3))
    m1, m2 = jnp.zeros(3), jnp.array([1.0, -2.0, 0.5])
    sigmas1, sigmas2 = jnp.array([2.0, 1.0, 0.5]), jnp.array([3.0, 0.3, 0.1])
    first = S.run_chains(S.mala(_shifted_log_prob, 0.1), key, x0, 20, args=(m1,))[0].position
    S.run_chains(S.annealed_langevin(_shifted_score, sigmas1, 5, 0.01), key, x0, 20, args=(m1,))
    S.tune_step_size(S.mala(_shifted_log_prob, 0.1), key, x0, 20, args=(m1,))
    warm = len(compilations)
    assert warm >= 3  # the listener sees compilations at all

    S.run_chains(S.mala(_shifted_log_prob, 0.1, value_and_grad=_shifted_value_and_grad), key, x0, 20, args=(m1,))
    warm_pair = len(compilations)
    S.run_chains(S.mala(_shifted_log_prob, 0.7, value_and_grad=_shifted_value_and_grad), key, x0, 20, args=(m2,))
    assert len(compilations) == warm_pair  # the pair is static like log_prob_fn: rebuilt kernels reuse the loop
    warm = len(compilations)

    kernel = S.mala(_shifted_log_prob, 0.3)  # rebuilt from the same function, a new step size
    again = S.run_chains(kernel, key, x0, 20, args=(m1,))[0].position
    S.run_chains(kernel.replace(step_size=0.05), key, x0, 20, args=(m2,))
    S.run_chains(S.annealed_langevin(_shifted_score, sigmas2, 7, 0.5), key, x0, 20, args=(m2,))
    S.run_chains(S.annealed_langevin(_shifted_score, sigmas2, 7, 0.5), key, x0, 20, args=(m2,))
    S.tune_step_size(kernel, key, x0, 20, args=(m2,), initial_step_size=1.0)
    assert len(compilations) == warm

    # The new numbers were used, not a constant baked in at the first compilation: a
    # kernel of a NEW function (which compiles) with the same numbers gives the same chains.
    fresh = S.run_chains(S.mala(lambda x, m: _shifted_log_prob(x, m), 0.3), key, x0, 20, args=(m1,))[0].position
    assert len(compilations) > warm
    np.testing.assert_allclose(again, fresh, rtol=tol(1e-6, 1e-12), atol=tol(1e-6, 1e-12))
    assert not np.allclose(again, first)


@pytest.mark.numerics
def test_args_reach_the_log_density_and_the_score():
    """mala(f, a) with args=(m,) runs the same chains as mala(x -> f(x, m), a); ula and annealed too."""
    key, x0, m = jax.random.key(3), jnp.ones((6, 3)), jnp.array([2.0, -1.0, 0.0])
    sigmas = jnp.array([1.0, 0.5])
    pairs = [
        (S.mala(_shifted_log_prob, 0.2), S.mala(lambda x: _shifted_log_prob(x, m), 0.2)),
        (S.ula(jax.grad(_shifted_log_prob), 0.2), S.ula(lambda x: jax.grad(_shifted_log_prob)(x, m), 0.2)),
        (S.annealed_langevin(_shifted_score, sigmas, 5, 0.1),
         S.annealed_langevin(lambda x, sigma: _shifted_score(x, sigma, m), sigmas, 5, 0.1)),
    ]
    for with_args, closed in pairs:
        a = S.run_chains(with_args, key, x0, 30, args=(m,))[0].position
        b = S.run_chains(closed, key, x0, 30)[0].position
        np.testing.assert_allclose(a, b, rtol=tol(1e-6, 1e-12), atol=tol(1e-6, 1e-12))
        assert not np.allclose(a, x0)
    # By hand, as partition.py does: kernel.init / kernel.step take the args too.
    kernel = S.mala(_shifted_log_prob, 0.2)
    state = kernel.init(x0[0], m)
    np.testing.assert_allclose(state.grad, -(x0[0] - m), rtol=tol(1e-6, 1e-12))
    new, info = kernel.step(key, state, m)
    assert new.position.shape == (3,) and bool(info.is_finite)


# --- blackjax kernels under run_chains ---------------------------------------------


@pytest.fixture(scope="module")
def gauss10():
    a = jax.random.normal(jax.random.key(7), (10, 10)) * 0.3
    return targets.Gaussian(jnp.linspace(-1.0, 1.0, 10), a @ a.T + 0.5 * jnp.eye(10))


def test_blackjax_nuts_through_run_chains_matches_the_moments_within_ess_bounds(gauss10):
    blackjax = pytest.importorskip("blackjax")
    kernel = S.from_blackjax(blackjax.nuts, gauss10.log_prob, step_size=0.4, inverse_mass_matrix=jnp.ones(10))
    key = jax.random.key(0)
    x0 = gauss10.sample(jax.random.fold_in(key, 1), 8)
    _, trace, info = S.run_chains(kernel, key, x0, 600, thin=1)
    assert int(info.n_nonfinite.sum()) == 0  # no divergent transitions at this step size
    assert 0.6 < float(info.acceptance_rate.mean()) < 0.99
    trace = np.asarray(trace[100:], np.float64)
    m, cov = np.asarray(gauss10.mean), np.asarray(gauss10.cov)
    var = np.diag(cov)
    ess = np.asarray(D.effective_sample_size(trace))
    assert np.all(ess > 1000)
    np.testing.assert_array_less(np.abs(trace.mean((0, 1)) - m), 5 * np.sqrt(var / ess))
    sq = (trace - m) ** 2
    ess_sq = np.asarray(D.effective_sample_size(sq))
    np.testing.assert_array_less(np.abs(sq.mean((0, 1)) - var), 5 * sq.std((0, 1)) / np.sqrt(ess_sq))
    # The full covariance: the off-diagonal products (x_i - m_i)(x_j - m_j), z-tested the same way.
    i, j = np.triu_indices(10, 1)
    prod = (trace[..., i] - m[i]) * (trace[..., j] - m[j])
    ess_prod = np.asarray(D.effective_sample_size(prod))
    np.testing.assert_array_less(np.abs(prod.mean((0, 1)) - cov[i, j]), 5 * prod.std((0, 1)) / np.sqrt(ess_prod))
    assert np.all(np.asarray(D.split_rhat(trace)) < 1.02)


def test_blackjax_kernels_take_args_new_numbers_and_report_divergences(compilations):
    """The factory form: step size and mass matrix are data, the log-density takes args;
    a step size far past the stability limit diverges, and the divergences are counted."""
    blackjax = pytest.importorskip("blackjax")
    key, x0, m = jax.random.key(1), jnp.zeros((4, 3)), jnp.array([5.0, -5.0, 5.0])
    kernel = S.from_blackjax(blackjax.hmc, _shifted_log_prob, step_size=0.3, inverse_mass_matrix=jnp.ones(3),
                             num_integration_steps=5)
    final, _, info = S.run_chains(kernel, key, x0, 200, args=(m,))
    warm = len(compilations)
    _, _, bad = S.run_chains(kernel.replace(step_size=5.0), key, x0, 200, args=(m,))
    assert len(compilations) == warm
    assert np.asarray(info.acceptance_rate).mean() > 0.8 and np.asarray(info.n_nonfinite).sum() == 0
    # The mean of 4 chains of N(m, I) after 200 steps from 0: within 5 sd = 5/sqrt(4) of m.
    np.testing.assert_array_less(np.abs(np.asarray(final.position).mean(0) - np.asarray(m)), 2.5)
    assert np.all(np.asarray(bad.n_nonfinite) > 100)  # nearly every step diverges

    # A built SamplingAlgorithm closes over its log-density: it runs, and refuses args.
    built = S.from_blackjax(blackjax.mala(lambda x: _shifted_log_prob(x, m), 0.3))
    final, _, info = S.run_chains(built, key, x0, 300)
    assert 0.3 < float(info.acceptance_rate.mean()) < 1.0
    np.testing.assert_array_less(np.abs(np.asarray(final.position).mean(0) - np.asarray(m)), 2.5)
    with pytest.raises(TypeError, match="takes no args"):
        S.run_chains(built, key, x0, 10, args=(m,))


@pytest.mark.numerics
def test_tuning_a_blackjax_kernel_hits_its_target(anisotropic):
    blackjax = pytest.importorskip("blackjax")
    kernel = S.from_blackjax(blackjax.mala, anisotropic.log_prob, step_size=1.0)
    x0 = anisotropic.sample(jax.random.key(0), 64)
    step, state = S.tune_step_size(kernel, jax.random.key(1), x0, 1000)
    _, _, info = S.run_chains(kernel.replace(step_size=step), jax.random.key(2), state.position, 1000)
    assert abs(float(info.acceptance_rate.mean()) - 0.574) < 0.05


# --- positions of any shape --------------------------------------------------------------


_MEAN = jnp.array([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]])
_SCALE = jnp.array([[1.0, 0.5, 2.0], [0.7, 1.5, 0.3]])


def _matrix_log_prob(x):
    """log N(X; M, diag(S²)) + const, written on the (2, 3) matrix: rows coupled by a shared term."""
    z = (x - _MEAN) / _SCALE
    return -0.5 * jnp.sum(z**2) - 0.1 * jnp.sum(z[0] * z[1])


def _flat_log_prob(x):
    return _matrix_log_prob(x.reshape(2, 3))


def _matrix_score(x, sigma):
    return -(x - _MEAN) / (_SCALE**2 + sigma**2)


def _flat_score(x, sigma):
    return _matrix_score(x.reshape(2, 3), sigma).ravel()


@pytest.mark.numerics
def test_matrix_shaped_chains_equal_their_flattened_twins():
    """MALA, ULA, annealed Langevin (the snr rule) and tuning on a (2, 3) target run the chains of the (6,) target."""
    key, x0 = jax.random.key(11), jax.random.normal(jax.random.key(12), (5, 2, 3))
    flat0 = x0.reshape(5, 6)
    sigmas = jnp.array([1.0, 0.3])
    pairs = [
        (S.mala(_matrix_log_prob, 0.05), S.mala(_flat_log_prob, 0.05)),
        (S.ula(jax.grad(_matrix_log_prob), 0.1), S.ula(jax.grad(_flat_log_prob), 0.1)),
        (S.annealed_langevin(_matrix_score, sigmas, 10, snr=0.15), S.annealed_langevin(_flat_score, sigmas, 10, snr=0.15)),
    ]
    rates = []
    for matrix, flat in pairs:
        final, trace, info = S.run_chains(matrix, key, x0, 40, thin=4)
        rates.append(float(info.acceptance_rate.mean()))
        flat_final, flat_trace, flat_info = S.run_chains(flat, key, flat0, 40, thin=4)
        assert trace.shape == (10, 5, 2, 3) and final.position.shape == (5, 2, 3)
        np.testing.assert_allclose(trace.reshape(10, 5, 6), flat_trace, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-12))
        np.testing.assert_allclose(info.acceptance_rate, flat_info.acceptance_rate, rtol=tol(1e-5, 1e-12))
        assert not np.allclose(trace[-1], x0)
    assert 0.3 < rates[0] < 1.0 and rates[1:] == [1.0, 1.0]  # MALA both accepts and rejects
    step, state = S.tune_step_size(pairs[0][0], key, x0, 50)
    flat_step, flat_state = S.tune_step_size(pairs[0][1], key, flat0, 50)
    np.testing.assert_allclose(step, flat_step, rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(state.position.reshape(5, 6), flat_state.position, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-12))
    assert state.grad.shape == (5, 2, 3)


def _never_called(x):
    raise AssertionError("mala(log_prob_fn, a, value_and_grad=pair) must not call log_prob_fn")


@pytest.mark.numerics
def test_mala_given_the_closed_form_pair_runs_the_chains_of_autodiff():
    """mala(f, a, value_and_grad=t.log_prob_and_score) runs mala(t.log_prob, a)'s chains, up to rounding, and
    never calls f; on a mixture with unequal weights and scales in d = 3."""
    t = targets.GaussianMixture(jnp.array([[-1.5, 0.0, 0.5], [1.5, 0.5, 0.0], [0.0, 1.5, -1.0]]),
                                jnp.array([0.4, 0.8, 0.6]), jnp.array([1.0, 2.5, 0.5]))
    key = jax.random.key(4)
    x0 = t.sample(jax.random.fold_in(key, 1), 8)
    plain = S.run_chains(S.mala(t.log_prob, 0.1), key, x0, 60, thin=6)
    pair = S.run_chains(S.mala(_never_called, 0.1, value_and_grad=t.log_prob_and_score), key, x0, 60, thin=6)
    np.testing.assert_allclose(pair[1], plain[1], rtol=tol(1e-5, 1e-12), atol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(pair[2].acceptance_rate, plain[2].acceptance_rate, rtol=tol(1e-5, 1e-12))
    for got, want in ((pair[0].log_prob, plain[0].log_prob), (pair[0].grad, plain[0].grad)):
        np.testing.assert_allclose(got, want, rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))
    assert 0.3 < float(plain[2].acceptance_rate.mean()) < 0.95 and not np.allclose(plain[1][-1], x0)


def _minus(x):
    return -x


def test_run_chains_inside_jit_and_grad():
    """Inside the caller's jit the loop is compiled with the caller's program; through ULA on N(0, I),
    x' = (1 - a) x + sqrt(2a) u, so d x_n / d x_0 = (1 - a)^n."""
    key, x0, kernel = jax.random.key(7), jnp.ones((4, 2)), S.ula(_minus, 0.1)
    top = S.run_chains(kernel, key, x0, 5)[0].position
    inside = jax.jit(lambda k, x: S.run_chains(kernel, k, x, 5)[0].position)(key, x0)
    np.testing.assert_allclose(inside, top, rtol=tol(1e-6, 1e-12), atol=tol(1e-6, 1e-12))
    grad = jax.grad(lambda x: jnp.sum(S.run_chains(kernel, key, x, 5)[0].position))(x0)
    np.testing.assert_allclose(grad, np.full((4, 2), 0.9**5), rtol=tol(1e-5, 1e-12))


def test_shard_chains_splits_the_first_axis_only():
    x0 = jnp.zeros((4, 2, 3))
    assert S.shard_chains(x0).shape == (4, 2, 3)


@pytest.mark.numerics
def test_mala_step_equals_the_obvious_reference_on_a_matrix():
    """One MALA step by hand: z = normal(key, (d + 1,)), d = 6; x' = x + a ∇log p + sqrt(2a) z[:6] as a (2, 3)
    matrix; accept iff log Φ(z[6]) < log p(x') - log p(x) + log q(x | x') - log q(x' | x), both log q written out.

    The kernel draws the uniforms behind z and accepts iff (1 + u_6) / 2 = Φ(z[6]) < α, with the log q terms
    simplified: the same step, up to rounding."""
    from jax.scipy.special import log_ndtr

    x, grad = _MEAN + 0.3, jax.grad(_matrix_log_prob)
    log_q = lambda to, frm, a: -jnp.sum((to - frm - a * grad(frm)) ** 2) / (4 * a)
    n_accepted = 0
    for seed in range(24):  # a large step (α mostly small) and a small one (α near 1)
        a = 0.3 if seed < 12 else 0.03
        kernel = S.mala(_matrix_log_prob, a)
        key = jax.random.key(seed)
        z = jax.random.normal(key, (7,))
        proposal = x + a * grad(x) + jnp.sqrt(2 * a) * z[:6].reshape(2, 3)
        log_ratio = (_matrix_log_prob(proposal) - _matrix_log_prob(x) + log_q(x, proposal, a) - log_q(proposal, x, a))
        accept = bool(log_ndtr(z[6]) < log_ratio)
        new, info = kernel.step(key, kernel.init(x))
        assert bool(info.is_accepted) == accept
        np.testing.assert_allclose(new.position, proposal if accept else x, rtol=tol(1e-6, 1e-12))
        np.testing.assert_allclose(info.acceptance_prob, min(1.0, float(jnp.exp(log_ratio))), rtol=tol(1e-4, 1e-10),
                                   atol=tol(1e-5, 1e-12))
        n_accepted += accept
    assert 4 < n_accepted < 20  # both branches seen, often


def test_snr_rule_averages_the_norms_over_the_chains():
    """Under run_chains a = 2 (r mean|u| / mean|s|)² (Song et al.'s corrector): chains at a mode's centre,
    where |s| ≈ 0, take the common step instead of an unbounded one, and annealing N(0, 9 I) down to
    σ = 0.01 on N(0, I)'s exact noised score ends at covariance (1 + σ²) I, up to ULA's O(a) bias."""
    score = lambda x, sigma: -x / (1.0 + sigma**2)
    sigmas = jnp.geomspace(3.0, 0.01, 8)
    kernel = S.annealed_langevin(score, sigmas, 25, snr=0.16)
    x0 = 3.0 * jax.random.normal(jax.random.key(0), (4000, 2))
    x0 = x0.at[:100].set(0.0)  # |s| = 0 exactly: the per-chain rule's a is infinite there
    final, _, info = S.run_chains(kernel, jax.random.key(1), x0, 8 * 25)
    xs = np.asarray(final.position, np.float64)
    assert int(info.n_nonfinite.sum()) == 0
    # a ≈ 2 r² (1 + σ²) at the last level: ULA's stationary variance is v / (1 - a / (2v)) ≈ 1.03.
    np.testing.assert_allclose(np.cov(xs.T), np.eye(2), atol=0.1)
    np.testing.assert_allclose(xs.mean(0), 0.0, atol=0.08)
