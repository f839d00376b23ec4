"""Property-based tests (hypothesis, derandomized so CI is deterministic): symmetries and contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jsm
from jsm import objectives as O
from jsm import targets

from conftest import all_targets, tol

settings.register_profile("ci", derandomize=True, max_examples=15, deadline=None)
settings.load_profile("ci")

floats = st.floats(-3.0, 3.0, allow_nan=False, width=32)
vec2 = st.tuples(floats, floats).map(lambda t: jnp.array(t, jnp.float32))
angle = st.floats(0.0, 6.25, width=32)

MIX = targets.GaussianMixture(jnp.array([[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]]), jnp.array([0.6, 0.9, 0.5]),
                              jnp.array([0.3, 0.5, 0.2]))
score_and_lap = jax.jit(lambda t, x: (t.score(x), jsm.laplacian(t.energy)(x)))


def rotation(theta):
    c, s = jnp.cos(theta), jnp.sin(theta)
    return jnp.array([[c, -s], [s, c]])


@given(x=vec2, shift=vec2)
def test_translating_a_target_translates_its_score_and_laplacian(x, shift):
    moved = targets.GaussianMixture(MIX.means + shift, MIX.scales, MIX.weights)
    s0, l0 = score_and_lap(MIX, x)
    s1, l1 = score_and_lap(moved, x + shift)
    np.testing.assert_allclose(s1, s0, rtol=tol(1e-3, 1e-9), atol=tol(1e-3, 1e-9))
    np.testing.assert_allclose(l1, l0, rtol=tol(1e-3, 1e-9), atol=tol(1e-3, 1e-9))


@given(x=vec2, theta=angle)
def test_rotating_a_target_rotates_its_score_and_keeps_its_laplacian(x, theta):
    r = rotation(theta)
    turned = targets.GaussianMixture(MIX.means @ r.T, MIX.scales, MIX.weights)
    s0, l0 = score_and_lap(MIX, x)
    s1, l1 = score_and_lap(turned, r @ x)
    np.testing.assert_allclose(s1, r @ s0, rtol=tol(1e-3, 1e-9), atol=tol(1e-3, 1e-9))
    np.testing.assert_allclose(l1, l0, rtol=tol(1e-3, 1e-9), atol=tol(1e-3, 1e-9))


@given(seed=st.integers(0, 2**16))
def test_objectives_do_not_depend_on_the_order_of_the_batch(seed):
    key = jax.random.key(seed)
    xs = MIX.sample(key, 16)
    perm = jax.random.permutation(jax.random.fold_in(key, 1), 16)
    s = lambda x: jnp.tanh(x) - 0.5 * x
    np.testing.assert_allclose(O.esm(s, MIX.score, xs[perm]), O.esm(s, MIX.score, xs), rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(O.ism(s, xs[perm]), O.ism(s, xs), rtol=tol(1e-5, 1e-12))
    # DSM pairs noise with positions: permuting the data and its noise together leaves the loss unchanged.
    eps = 0.3 * jax.random.normal(key, xs.shape)
    per = lambda xs, eps: jnp.mean(jax.vmap(lambda x, e: O.dsm_per_example(s, x, e, 0.3))(xs, eps))
    np.testing.assert_allclose(per(xs[perm], eps[perm]), per(xs, eps), rtol=tol(1e-5, 1e-12))


@given(shape=st.sampled_from([(3,), (2, 3, 2), ()]))
def test_wrong_ranks_are_refused(shape):
    with pytest.raises(ValueError, match="xs must have shape"):
        O.ism(lambda x: -x, jnp.zeros(shape))


# --- the contract of every public function on one example or one batch -------------

FAMILIES = all_targets()
FLOAT = jnp.zeros(()).dtype  # the default float: float32, or float64 under JAX_ENABLE_X64


def _scalar(a):
    return jnp.shape(a) == () and jnp.result_type(a) == FLOAT


def _target_outputs(t, xs):
    """Everything public that acts on a target, on one example x = xs[0] or the batch xs."""
    x = xs[0]
    out = {"energy": t.energy(x), "log_prob": t.log_prob(x), "log_z": t.log_z(), "score": t.score(x),
           "score_of": jsm.score_of(t.energy)(x), "batch": jsm.scores.batch_value_and_divergence(t.score)(xs),
           "jet": jsm.forward.forward_jet_batch(t.energy)(xs)}
    for method in jsm.scores.METHODS:
        out[f"laplacian_{method}"] = jsm.laplacian(t.energy, method)(x)
        out[f"divergence_{method}"] = jsm.divergence(t.score, method)(x)
    return out


target_outputs = jax.jit(_target_outputs)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@settings(max_examples=2)
@given(n=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_every_target_keeps_shapes_and_the_default_float(name, n, seed):
    t = FAMILIES[name]
    xs = t.sample(jax.random.key(seed), n)
    d = xs.shape[1]
    assert xs.shape == (n, d) and xs.dtype == FLOAT
    out = target_outputs(t, xs)
    scalars = ["energy", "log_prob", "log_z"] + [k for k in out if k.startswith(("laplacian", "divergence"))]
    assert all(_scalar(out[k]) for k in scalars), {k: (out[k].shape, out[k].dtype) for k in scalars}
    assert out["score"].shape == out["score_of"].shape == (d,) and out["score"].dtype == FLOAT
    values, divs = out["batch"]
    assert values.shape == (n, d) and divs.shape == (n,)
    jet = out["jet"]
    assert jet.value.shape == (n,) and jet.jacobian.shape == (n, d) and jet.laplacian.shape == (n,)


@settings(max_examples=2)
@given(n=st.integers(2, 6), d=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_every_objective_metric_and_sampler_returns_the_documented_shapes(n, d, seed):
    key = jax.random.key(seed)
    g = targets.Gaussian(jnp.zeros(d), jnp.eye(d))
    xs, ys = g.sample(key, n), g.sample(jax.random.fold_in(key, 1), n)
    s = lambda x: -x
    losses = [O.esm(s, g.score, xs), O.ssm(s, key, xs), O.ncsn(lambda x, sigma: s(x), key, xs, jnp.array([1.0, 0.5]))]
    losses += [O.ism(s, xs, method=m) for m in jsm.scores.METHODS]
    losses += [O.dsm(s, key, xs, 0.5, variance_reduction=v) for v in O.VARIANCE_REDUCTIONS]
    assert all(_scalar(loss) for loss in losses)
    assert all(_scalar(v) for v in (jsm.metrics.mmd(xs, ys), jsm.metrics.kl_knn(xs, ys), jsm.metrics.wasserstein(xs, ys),
                                     jsm.metrics.sliced_wasserstein(xs, ys, key, 4)))
    for kernel in (jsm.samplers.ula(g.score, 0.1), jsm.samplers.mala(g.log_prob, 0.1)):
        final, trace, info = jsm.samplers.run_chains(kernel, key, xs, 4, thin=2)
        assert final.position.shape == (n, d) and final.position.dtype == FLOAT
        assert trace.shape == (2, n, d) and info.acceptance_rate.shape == (n,)
