"""Scores and exact traces against closed forms, and the Hutchinson estimator's statistics."""

import inspect

import chex
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
    # Further arguments are passed on (parameters as data): the score of f(x, m) = |x - m|²/2 is m - x.
    m = jnp.array([0.5, -1.0])
    np.testing.assert_allclose(jsm.score_of(lambda x, m: 0.5 * jnp.sum((x - m) ** 2))(xs[0], m), m - xs[0],
                               rtol=tol(1e-6, 1e-12))


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
@pytest.mark.parametrize("method", scores.METHODS)
def test_score_and_divergence_of_an_energy(mixture2, method, key):
    """(s, tr ∂s/∂x) of an energy = (-∇f, -Δf): the mixture's closed-form score and divergence."""
    xs = mixture2.sample(key, 16)
    s, div = jax.jit(scores.batch_score_and_divergence_of_energy(mixture2.energy, method))(xs)
    chex.assert_shape((s, div), [(16, 2), (16,)])
    want_div = jax.jit(jax.vmap(lambda x: mixture_divergence(mixture2, x)))(xs)
    np.testing.assert_allclose(s, jax.vmap(mixture2.score)(xs), rtol=tol(1e-4, 1e-11), atol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(div, want_div, rtol=tol(2e-4, 1e-10), atol=tol(2e-4, 1e-10))


@pytest.mark.numerics
def test_chunked_traces_equal_unchunked(mixture2, key):
    """chunk_size (Jacobian columns per block) changes memory, not the answer: d = 5 in blocks of 2."""
    apply, params = nets.pure(nets.MLPEnergy(5, (16, 16), rngs=nnx.Rngs(1)))
    energy = lambda x: apply(params, x)
    xs = jax.random.normal(key, (8, 5))
    for chunked, whole in [
        (jax.vmap(jsm.laplacian(energy, chunk_size=2)), jax.vmap(jsm.laplacian(energy))),
        (jax.vmap(jsm.divergence(jsm.score_of(energy), chunk_size=2)), jax.vmap(jsm.divergence(jsm.score_of(energy)))),
        (scores.batch_score_and_divergence_of_energy(energy, chunk_size=2), scores.batch_score_and_divergence_of_energy(energy)),
        (scores.batch_value_and_divergence(jsm.score_of(energy), chunk_size=3), scores.batch_value_and_divergence(jsm.score_of(energy))),
    ]:
        for a, b in zip(jax.tree.leaves(jax.jit(chunked)(xs)), jax.tree.leaves(jax.jit(whole)(xs))):
            np.testing.assert_allclose(a, b, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-12))


def test_every_exact_trace_defaults_to_auto():
    """One default for every exact-trace entry point."""
    for fn in (jsm.divergence, jsm.laplacian, scores.batch_value_and_divergence,
               scores.batch_score_and_divergence_of_energy, jsm.objectives.ism, jsm.objectives.ism_energy):
        assert inspect.signature(fn).parameters["method"].default == "auto", fn.__name__
        chunk = inspect.signature(fn).parameters["chunk_size"]
        assert chunk.default is None and chunk.kind is inspect.Parameter.KEYWORD_ONLY, fn.__name__
    assert scores.resolve_method("auto") == "forward"


def hutchinson_variance(jac: np.ndarray, probe: str) -> float:
    """Var u^T J u per probe: 1/2 Σ_{i≠j} (J_ij + J_ji)², plus 2 Σ_i J_ii² for Gaussian u."""
    sym = jac + jac.T
    off = 0.5 * (np.sum(sym**2) - np.sum(np.diag(sym) ** 2))
    return off + (2 * np.sum(np.diag(jac) ** 2) if probe == "gaussian" else 0.0)


@pytest.fixture(scope="module")
def score_network():
    """A score network on R^3: its Jacobian is NOT symmetric."""
    apply, params = nets.pure(nets.MLPScore(3, (16, 16), rngs=nnx.Rngs(3)))
    return lambda x: 2.0 * apply(params, x)


@pytest.mark.numerics
@pytest.mark.parametrize("probe", scores.PROBES)
def test_hutchinson_is_unbiased_with_the_stated_variance(score_network, probe, key):
    """On a non-symmetric Jacobian: E[u^T J u] = tr J and the general variance formula.

    The sample variance v of n draws has standard error sqrt((m4 - v²) / n), m4 the fourth
    central moment; the formula for a SYMMETRIC J (2 Σ_{i≠j} J_ij², or 2 |J|_F² for Gaussian
    probes) is rejected by the same test, so this one can tell them apart.
    """
    x = jnp.array([0.3, -0.2, 0.5])
    jac = np.asarray(jax.jacfwd(score_network)(x), np.float64)
    asym = jac - jac.T
    assert np.sum(asym**2) > 0.1 * np.sum(jac**2)  # genuinely non-symmetric
    n = 40_000
    est = jsm.hutchinson_divergence(score_network, n_probes=1, probe=probe)
    draws = np.asarray(jax.jit(jax.vmap(est, in_axes=(None, 0)))(x, jax.random.split(key, n)), np.float64)
    var = hutchinson_variance(jac, probe)
    assert abs(draws.mean() - np.trace(jac)) < 5 * np.sqrt(var / n)
    centred = draws - draws.mean()
    v, m4 = np.mean(centred**2), np.mean(centred**4)
    se_v = np.sqrt((m4 - v**2) / n)
    assert abs(v - var) < 5 * se_v, (v, var, se_v)
    off = jac - np.diag(np.diag(jac))
    symmetric_only = 2 * np.sum(off**2) if probe == "rademacher" else 2 * np.sum(jac**2)
    assert abs(v - symmetric_only) > 5 * se_v, (v, symmetric_only, se_v)
    # n_probes averages independent probes: the variance falls by n_probes.
    four = jsm.hutchinson_divergence(score_network, n_probes=4, probe=probe)
    draws4 = np.asarray(jax.jit(jax.vmap(four, in_axes=(None, 0)))(x, jax.random.split(key, n // 4)), np.float64)
    c4 = draws4 - draws4.mean()
    v4, se_v4 = np.mean(c4**2), np.sqrt((np.mean(c4**4) - np.mean(c4**2) ** 2) / c4.size)
    assert abs(v4 - var / 4) < 5 * se_v4, (v4, var / 4, se_v4)


def test_unknown_method_raises_before_compiling(gaussian2):
    with pytest.raises(ValueError, match=r"method must be one of \('forward', 'jacfwd', 'jacrev', 'auto'\), got 'hutchinson'"):
        jsm.divergence(gaussian2.score, "hutchinson")
    with pytest.raises(ValueError, match="probe must be one of"):
        jsm.hutchinson_divergence(gaussian2.score, probe="sphere")
    with pytest.raises(ValueError, match="n_probes must be an int >= 1"):
        jsm.hutchinson_divergence(gaussian2.score, n_probes=0)


# --- examples of any shape: images (h, w, c) ------------------------------------------

SHAPE = (2, 3, 2)  # d = 12
_W = jax.random.normal(jax.random.key(11), (12, 12)) / 3  # not symmetric: ∂v/∂x is not either


def image_field(x):
    """v: (2, 3, 2) -> (2, 3, 2) with a non-symmetric Jacobian that mixes rows, columns and channels,
    so a divergence whose output is flattened in another order than its input (a transposed
    image) or that sums over one axis only comes out wrong."""
    return jnp.tanh(_W @ x.reshape(-1)).reshape(x.shape) + jnp.cumsum(x, axis=1) ** 2 * x[::-1, :, ::-1]


def image_energy(x):
    """f: (2, 3, 2) -> () whose Hessian couples entries along every axis."""
    return jnp.sum(jnp.log1p(jnp.exp(_W @ x.reshape(-1)))) + jnp.sum(jnp.cumsum(x, axis=1) ** 3 * x[:, :, ::-1])


def on_vectors(fn, vector):
    """The same function of the 12 entries, flattened by hand (row-major)."""
    return (lambda z: fn(z.reshape(SHAPE)).reshape(-1)) if vector else (lambda z: fn(z.reshape(SHAPE)))


@pytest.mark.numerics
@pytest.mark.parametrize("method, chunk_size", [("forward", None), ("forward", 5), ("jacfwd", None), ("jacrev", None)])
def test_exact_traces_of_image_shaped_examples(method, chunk_size, key):
    """On (2, 3, 2) examples every exact trace (per example, vmapped, and batched) equals the same
    function on the flattened (12,) vectors AND the brute-force reference: the trace of jax.jacfwd /
    jax.hessian of the hand-flattened function. Scores come back with the image's shape."""
    xs = jax.random.normal(key, (3, *SHAPE))
    flat_xs = xs.reshape(3, -1)
    v, f = on_vectors(image_field, True), on_vectors(image_energy, False)
    div_ref = jax.vmap(lambda z: jnp.trace(jax.jacfwd(v)(z)))(flat_xs)
    lap_ref = jax.vmap(lambda z: jnp.trace(jax.hessian(f)(z)))(flat_xs)
    assert np.min(np.abs(div_ref)) > 0.1 and np.min(np.abs(lap_ref)) > 0.1

    @jax.jit
    def traces(xs, flat_xs):
        div, lap = jsm.divergence(image_field, method, chunk_size=chunk_size), jsm.laplacian(image_energy, method, chunk_size=chunk_size)
        return {"div one": div(xs[0]), "lap one": lap(xs[0]),
                "div": jax.vmap(div)(xs), "lap": jax.vmap(lap)(xs),
                "div flat": jax.vmap(jsm.divergence(v, method, chunk_size=chunk_size))(flat_xs),
                "lap flat": jax.vmap(jsm.laplacian(f, method, chunk_size=chunk_size))(flat_xs),
                "value, div": scores.batch_value_and_divergence(image_field, method, chunk_size=chunk_size)(xs),
                "score, div": scores.batch_score_and_divergence_of_energy(image_energy, method, chunk_size=chunk_size)(xs)}

    got = traces(xs, flat_xs)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=tol(1e-5, 1e-11), atol=tol(1e-5, 1e-11))
    close(got["div one"], div_ref[0])
    close(got["lap one"], lap_ref[0])
    for name in ("div", "div flat"):
        close(got[name], div_ref)
    for name in ("lap", "lap flat"):
        close(got[name], lap_ref)
    (value, div), (s, div_s) = got["value, div"], got["score, div"]
    chex.assert_shape((value, div, s, div_s), [xs.shape, (3,), xs.shape, (3,)])
    close(value, jax.vmap(image_field)(xs))
    close(div, div_ref)
    close(s, -jax.vmap(jax.grad(image_energy))(xs))
    close(div_s, -lap_ref)


def test_hutchinson_on_an_image_is_hutchinson_on_its_flattening(key):
    """The probes of a (2, 3, 2) example are the flat probes reshaped, so the estimates agree draw for draw."""
    x = jax.random.normal(key, SHAPE)
    for probe in scores.PROBES:
        est = lambda fn, y: jsm.hutchinson_divergence(fn, n_probes=3, probe=probe)(y, key)
        np.testing.assert_allclose(est(image_field, x), est(on_vectors(image_field, True), x.reshape(-1)),
                                   rtol=tol(1e-5, 1e-12))


def test_outputs_of_the_wrong_shape_are_refused(key):
    """A vector field must return its example's shape, an energy a scalar: the error names the
    function, the shape it got and the one it wants, for every method (and for a batch given as
    one example to an energy that maps a batch to (n,) energies)."""
    x = jnp.zeros((2, 3))
    flat_field = lambda y: jnp.tanh(y).reshape(-1)  # (2, 3) -> (6,)
    want_same = r"vector_fn must map one example of shape \(2, 3\) to the same shape, got shape \(6,\)"
    want_scalar = r"energy must map one example of shape \(2, 3\) to a scalar, got shape \(2,\)"
    per_row = lambda y: jnp.sum(y**2, axis=-1)  # an energy written for ONE vector, given a batch
    for method in scores.METHODS:
        with pytest.raises(ValueError, match=want_same):
            jsm.divergence(flat_field, method)(x)
        with pytest.raises(ValueError, match=want_same):
            scores.batch_value_and_divergence(flat_field, method)(x[None])
        with pytest.raises(ValueError, match=want_scalar):
            jsm.laplacian(per_row, method)(x)
        with pytest.raises(ValueError, match=want_scalar.replace("energy", "energy_fn")):
            scores.batch_score_and_divergence_of_energy(per_row, method)(x[None])
    with pytest.raises(ValueError, match=want_same):
        jsm.hutchinson_divergence(flat_field)(x, key)
    with pytest.raises(ValueError, match=want_scalar):
        jsm.score_of(per_row)(x)


def test_a_scalar_is_not_an_example(gaussian2):
    with pytest.raises(ValueError, match=r"x must be ONE example of shape \(d,\), \(h, w, c\) .*got a scalar"):
        jsm.divergence(gaussian2.score)(jnp.zeros(()))
    with pytest.raises(ValueError, match="ONE example"):
        jsm.score_of(gaussian2.energy)(jnp.zeros(()))
    with pytest.raises(ValueError, match=r"xs must be a batch of shape \(n, \*shape\).*got shape \(2,\)"):
        scores.batch_value_and_divergence(gaussian2.score)(jnp.zeros(2))
