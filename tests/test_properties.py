"""Property-based tests (hypothesis, derandomized so CI is deterministic): symmetries and contracts."""

import jax
import jax.numpy as jnp
import chex
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jsm
from jsm import objectives as O
from jsm import targets

from conftest import FLOAT, all_targets, tol

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


@jax.jit
def _esm_of_shifted_score(xs, c):
    return O.esm(lambda x: MIX.score(x) + c, MIX.score, xs)


@pytest.mark.numerics
@given(shift=vec2, seed=st.integers(0, 2**16))
def test_esm_of_the_true_score_plus_a_constant_is_half_its_square(shift, seed):
    """J_ESM(s_p + c) = 1/2 E |c|² = |c|² / 2 on any sample."""
    c = np.asarray(shift, np.float64)
    got = _esm_of_shifted_score(MIX.sample(jax.random.key(seed), 8), jnp.asarray(c, FLOAT))
    np.testing.assert_allclose(got, 0.5 * c @ c, rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))


@jax.jit
def _ism_and_dsm_of_linear_score(a, b, xs, eps):
    s = lambda x: a @ x + b
    ism = [O.ism(s, xs, method=method) for method in jsm.scores.METHODS]
    return jnp.stack(ism), jax.vmap(lambda x, e: O.dsm_per_example(s, x, e, 0.3))(xs, eps)


@pytest.mark.numerics
@given(seed=st.integers(0, 2**16))
def test_ism_and_dsm_of_a_linear_score_match_their_formulas(seed):
    """s(x) = A x + b: J_ISM = mean 1/2 |A x + b|² + tr A; DSM's term is 1/2 |A (x + ε) + b + ε/σ²|²."""
    rng = np.random.default_rng(seed)
    a, b, xs, eps = rng.normal(size=(3, 3)), rng.normal(size=3), rng.normal(size=(6, 3)), 0.3 * rng.normal(size=(6, 3))
    ism, dsm = _ism_and_dsm_of_linear_score(*(jnp.asarray(v, FLOAT) for v in (a, b, xs, eps)))
    want_ism = np.mean(0.5 * np.sum((xs @ a.T + b) ** 2, -1)) + np.trace(a)
    np.testing.assert_allclose(ism, np.full(len(jsm.scores.METHODS), want_ism), rtol=tol(1e-4, 1e-10))
    want_dsm = 0.5 * np.sum(((xs + eps) @ a.T + b + eps / 0.3**2) ** 2, -1)
    np.testing.assert_allclose(dsm, want_dsm, rtol=tol(1e-4, 1e-10))


@given(shape=st.sampled_from([(3,), ()]))
def test_wrong_ranks_are_refused(shape):
    """A batch needs an axis of examples besides the example's own: (n, d), (n, h, w, c), ..."""
    with pytest.raises(ValueError, match=r"xs must be a batch of shape \(n, \*example_shape\)"):
        O.ism(lambda x: -x, jnp.zeros(shape))


# --- the contract of every public function on one example or one batch -------------

FAMILIES = all_targets()


def _scalars(values):
    """Each value is a 0-d array of the default float."""
    chex.assert_shape(values, ())
    chex.assert_type(values, FLOAT)


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
    chex.assert_shape(xs, (n, d))
    chex.assert_type(xs, FLOAT)
    out = target_outputs(t, xs)
    _scalars([out[k] for k in ["energy", "log_prob", "log_z"] + [k for k in out if k.startswith(("laplacian", "divergence"))]])
    chex.assert_shape([out["score"], out["score_of"]], (d,))
    chex.assert_type([out["score"], out["score_of"]], FLOAT)
    values, divs = out["batch"]
    jet = out["jet"]
    chex.assert_shape([values, divs, jet.value, jet.jacobian, jet.laplacian], [(n, d), (n,), (n,), (n, d), (n,)])


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
    _scalars(losses)
    _scalars([jsm.metrics.mmd(xs, ys), jsm.metrics.kl_knn(xs, ys), jsm.metrics.wasserstein(xs, ys),
              jsm.metrics.sliced_wasserstein(xs, ys, key, 4)])
    for kernel in (jsm.samplers.ula(g.score, 0.1), jsm.samplers.mala(g.log_prob, 0.1)):
        final, trace, info = jsm.samplers.run_chains(kernel, key, xs, 4, thin=2)
        chex.assert_shape([final.position, trace, info.acceptance_rate], [(n, d), (2, n, d), (n,)])
        chex.assert_type(final.position, FLOAT)


def test_targets_built_from_python_numbers_inside_jit():
    """Inside a trace jnp.asarray(0.5) is a tracer: validation reads Python numbers themselves."""
    build = lambda: targets.GaussianMixture([[0.0, 0.0], [1.0, 1.0]], [0.5, 0.7], [1.0, 3.0])
    x = jnp.array([0.3, -0.2])
    np.testing.assert_allclose(jax.jit(lambda x: build().log_prob(x))(x), build().log_prob(x), rtol=1e-6)
    with pytest.raises(ValueError, match="scales must be finite, got 1 non-finite"):
        jax.jit(lambda x: targets.GaussianMixture([[0.0, 0.0]], [float("nan")], [1.0]).log_prob(x))(x)
