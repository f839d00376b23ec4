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

from conftest import tol

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


@given(n=st.integers(1, 3), d=st.integers(1, 3))
def test_shape_and_dtype_contracts(n, d):
    g = targets.Gaussian(jnp.zeros(d), jnp.eye(d))
    xs = g.sample(jax.random.key(0), n)
    assert xs.shape == (n, d) and xs.dtype == jnp.float32
    assert g.energy(xs[0]).shape == () and g.score(xs[0]).shape == (d,) and g.log_z().shape == ()
    assert jsm.divergence(g.score)(xs[0]).shape == ()
    for loss in (O.esm(g.score, g.score, xs), O.ism(g.score, xs), O.dsm(g.score, jax.random.key(1), xs, 0.5)):
        assert loss.shape == () and loss.dtype == jnp.float32


@given(shape=st.sampled_from([(3,), (2, 3, 2), ()]))
def test_wrong_ranks_are_refused(shape):
    with pytest.raises(ValueError, match="xs must have shape"):
        O.ism(lambda x: -x, jnp.zeros(shape))
