"""The diffusion half is open: parameters and guidance weights are data (new values compile
nothing), a failed solve is NaN inside jit or out, the solver's statistics are there to ask for,
and a sharded batch stays sharded.

The score is the exact score of N(m, c² I) noised by the VP SDE, with (m, c) as its
parameters: s(x, t, params) = -(x - α_t m) / (α_t² c² + σ_t²), so every answer is known.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsm import diffusion as D, likelihood as L, objectives as O, sde as S

SDE = S.VPSDE()


def score(x, t, params):
    alpha, sigma = SDE.marginal(t)
    return -(x - alpha * params["m"]) / (alpha**2 * params["c"] ** 2 + sigma**2)


def labelled_score(x, t, y, params):
    """Class y's mean is params["m"] + y (NULL_LABEL: the mean m - 1 of 'no class')."""
    alpha, sigma = SDE.marginal(t)
    return -(x - alpha * (params["m"] + y)) / (alpha**2 * params["c"] ** 2 + sigma**2)


P1 = {"m": jnp.array([0.5, -1.0]), "c": jnp.asarray(0.7)}
P2 = {"m": jnp.array([-2.0, 0.3]), "c": jnp.asarray(1.3)}
X = jax.random.normal(jax.random.key(0), (6, 2))
KEY = jax.random.key(1)
Y = jnp.array([0, 1, 2, 0, 1, 2])
# One set of static options for every solve below, so the tests share their compilations
# (max_steps is static; tolerances are data, so tiny ones make a solve run out of steps).
ODE = dict(rtol=1e-3, atol=1e-3, max_steps=64)

# Each public entry point, called with parameters (and, for the conditional ones, a guidance w).
CALLS = {
    "reverse_sde": lambda p, w: D.reverse_sde(score, SDE, KEY, X, 5, corrector_steps=1, args=(p,)),
    "probability_flow": lambda p, w: D.probability_flow(score, SDE, X, **ODE, args=(p,)),
    "encode": lambda p, w: D.encode(score, SDE, X, **ODE, args=(p,)),
    "log_prob": lambda p, w: L.log_prob(score, SDE, X, **ODE, args=(p,)),
    "log_prob_hutchinson": lambda p, w: L.log_prob(score, SDE, X, trace="hutchinson", key=KEY, **ODE, args=(p,)),
    "flow_to_prior": lambda p, w: L.flow_to_prior(score, SDE, X, **ODE, args=(p,))[1],
    "guided_reverse_sde": lambda p, w: D.reverse_sde(labelled_score, SDE, KEY, X, 5, y=Y, guidance=w, args=(p,)),
    "guided_probability_flow": lambda p, w: D.probability_flow(labelled_score, SDE, X, **ODE, y=Y, guidance=w,
                                                               args=(p,)),
    "guided_log_prob": lambda p, w: L.log_prob(labelled_score, SDE, X, **ODE, y=Y, guidance=w, args=(p,)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_new_parameters_and_guidance_weights_compile_nothing(name, compilations):
    call = CALLS[name]
    first = np.asarray(call(P1, 1.0))
    warm = len(compilations)  # (the listener works: the closure test sees compilations)
    second = np.asarray(call(P2, 3.0))
    assert len(compilations) == warm, f"{name} compiled again for new args / guidance"
    assert np.all(np.isfinite(second)) and not np.allclose(first, second)  # the new values were used


def test_a_new_closure_per_call_compiles_again(compilations):
    """What the docs warn about: parameters in a closure make a new static function each call."""
    run = lambda p: D.probability_flow(lambda x, t: score(x, t, p), SDE, X, **ODE)
    run(P1)
    warm = len(compilations)
    run(P2)
    assert len(compilations) > warm


def test_args_give_the_closure_s_answers():
    closed = lambda x, t: score(x, t, P2)
    np.testing.assert_allclose(D.reverse_sde(score, SDE, KEY, X, 5, corrector_steps=1, args=(P2,)),
                               D.reverse_sde(closed, SDE, KEY, X, 5, corrector_steps=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(L.log_prob(score, SDE, X, **ODE, args=(P2,)), L.log_prob(closed, SDE, X, **ODE), rtol=1e-6)
    np.testing.assert_allclose(O.dsm_sde(score, SDE, KEY, X, args=(P2,)), O.dsm_sde(closed, SDE, KEY, X), rtol=1e-6)


def test_guidance_as_data_is_guided():
    """guidance=w is (1 + w) s(x, t, y) - w s(x, t, NULL_LABEL): the same samples as `guided(score, w)`."""
    w = 2.5
    by_data = D.reverse_sde(labelled_score, SDE, KEY, X, 5, y=Y, guidance=w, args=(P1,))
    by_closure = D.reverse_sde(D.guided(labelled_score, w), SDE, KEY, X, 5, y=Y, args=(P1,))
    np.testing.assert_allclose(by_data, by_closure, rtol=1e-6, atol=1e-6)
    # The guided score is that of N(α_t μ, α_t² c² + σ_t²) with μ = m + y + w (y - NULL_LABEL): the
    # flow carries x_T to α μ + r (x_T - α_T μ) at t_min, r = sqrt(α² c² + σ²) / sqrt(α_T² c² + σ_T²).
    x = D.probability_flow(labelled_score, SDE, jnp.zeros((6, 2)), **ODE, y=Y, guidance=w, args=(P1,))
    mu = P1["m"] + (Y + w * (Y + 1))[:, None]
    (a, s), (a_T, s_T) = SDE.marginal(D.SAMPLING_T_MIN), SDE.marginal(1.0)
    r = jnp.sqrt(a**2 * P1["c"] ** 2 + s**2) / jnp.sqrt(a_T**2 * P1["c"] ** 2 + s_T**2)
    np.testing.assert_allclose(x, a * mu - r * a_T * mu, atol=0.02)


# --- a failed solve is NaN, never a plausible number ---------------------------------------


def _fails_on_row_0(x, t, params):
    """The exact score, but infinite for an example whose first entry is above 3: its ODE cannot be solved
    (the step-size controller rejects every step with a non-finite error until max_steps runs out)."""
    return jnp.where(x[0] > 3.0, jnp.inf, 1.0) * score(x, t, params)


X_BAD = X.at[0, 0].set(4.0)


TIGHT = dict(ODE, rtol=1e-9, atol=1e-9)  # unreachable in 64 steps


def test_a_solve_that_runs_out_of_steps_is_nan_inside_jit():
    flow = jax.jit(lambda p: D.probability_flow(score, SDE, X, **TIGHT, args=(p,)))
    assert np.all(np.isnan(np.asarray(flow(P1))))
    lp = jax.jit(lambda p: L.log_prob(score, SDE, X, **TIGHT, args=(p,)))(P1)
    assert np.all(np.isnan(np.asarray(lp)))


def test_a_non_finite_state_is_nan_for_that_example_only_inside_jit():
    log_p, info = jax.jit(lambda p: L.log_prob(_fails_on_row_0, SDE, X_BAD, **ODE, args=(p,), info=True))(P1)
    log_p, ok = np.asarray(log_p), np.asarray(info.success)
    assert np.isnan(log_p[0]) and not ok[0]
    assert np.all(np.isfinite(log_p[1:])) and ok[1:].all()
    x = jax.jit(lambda p: D.encode(_fails_on_row_0, SDE, X_BAD, **ODE, args=(p,)))(P1)
    assert np.all(np.isnan(np.asarray(x[0]))) and np.all(np.isfinite(np.asarray(x[1:])))


def test_eager_failures_raise_with_the_remedy_unless_info_is_asked():
    with pytest.raises(RuntimeError, match=r"log_prob: 1 of 6 ODE solves failed .*1 used all max_steps=64 steps"):
        L.log_prob(_fails_on_row_0, SDE, X_BAD, **ODE, args=(P1,))
    with pytest.raises(RuntimeError, match=r"6 used all max_steps=64 steps .*raise max_steps"):
        D.probability_flow(score, SDE, X, **TIGHT, args=(P1,))
    x, info = D.probability_flow(score, SDE, X, **TIGHT, args=(P1,), info=True)
    assert np.all(np.isnan(np.asarray(x))) and not np.asarray(info.success).any()
    np.testing.assert_array_equal(info.num_steps, 64)


def test_solver_statistics_count_steps_and_score_evaluations():
    """num_fevals is the number of times the score was called: counted by a callback, one example."""
    calls = []

    def counted(x, t, params):
        jax.debug.callback(lambda: calls.append(1))
        return score(x, t, params)

    x, info = D.probability_flow(counted, SDE, X[:1], **ODE, args=(P1,), info=True)
    jax.block_until_ready(x)
    assert bool(info.success[0]) and 0 < int(info.num_accepted_steps[0]) <= int(info.num_steps[0])
    assert int(info.num_fevals[0]) == len(calls)
    assert info.num_fevals.shape == info.num_steps.shape == info.success.shape == (1,)


# --- the boundary: the score's shape, guidance without labels ---------------------------------


def test_a_score_of_the_wrong_shape_is_refused_by_name():
    scalar = lambda x, t, p: jnp.sum(score(x, t, p))
    for call in (lambda: L.log_prob(scalar, SDE, X, args=(P1,)),
                 lambda: D.probability_flow(scalar, SDE, X, args=(P1,)),
                 lambda: D.reverse_sde(scalar, SDE, KEY, X, 3, args=(P1,))):
        with pytest.raises(ValueError, match=r"score_fn must map one example of shape \(2,\) .* got \(\)"):
            call()
    with pytest.raises(ValueError, match="guidance needs class labels y"):
        D.reverse_sde(score, SDE, KEY, X, 3, guidance=1.0, args=(P1,))
    with pytest.raises(ValueError, match="guidance must be a finite weight"):
        D.reverse_sde(labelled_score, SDE, KEY, X, 3, y=Y, guidance=float("nan"), args=(P1,))


# --- a batch sharded over devices stays sharded --------------------------------------------

_SHARDED = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jsm import diffusion as D, sde as S

sde = S.VPSDE()
def score(x, t, m):
    alpha, sigma = sde.marginal(t)
    return -(x - alpha * m) / (alpha**2 * 0.25 + sigma**2)

n = len(jax.devices())
x_T = sde.prior_sample(jax.random.key(0), (8, 2))
x_T = jax.device_put(x_T, NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), PartitionSpec("batch")))
m = jnp.array([1.0, -1.0])
pc = D.reverse_sde(score, sde, jax.random.key(1), x_T, 20, corrector_steps=1, args=(m,))
ode = D.probability_flow(score, sde, x_T, args=(m,))
print(n, len(pc.sharding.device_set), len(ode.sharding.device_set))
np.save(sys.argv[1], np.concatenate([np.asarray(pc).ravel(), np.asarray(ode).ravel()]))
"""


@pytest.mark.slow
def test_sharded_batches_stay_sharded_and_give_the_one_device_samples(tmp_path):
    outputs = {}
    for n_devices in (1, 4):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
        out = tmp_path / f"{n_devices}.npy"
        res = subprocess.run([sys.executable, "-c", _SHARDED, str(out)], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split() == [str(n_devices)] * 3  # devices seen, devices holding each output
        outputs[n_devices] = np.load(out)
    np.testing.assert_allclose(outputs[1], outputs[4], rtol=1e-5, atol=1e-6)
