"""jsm._jax_internals: each private reading against its known answer, and every fallback forced
(FORCE_FALLBACKS, as JSM_NO_JAX_INTERNALS=1 does) giving the same numbers as the normal route."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsm
from jsm import _jax_internals as JI
from jsm import nets, samplers

from conftest import tol


@pytest.fixture(autouse=True)
def internals_on(monkeypatch):
    """Each test here starts on the private route (even under JSM_NO_JAX_INTERNALS=1) and forces the fallbacks itself."""
    monkeypatch.setattr(JI, "FORCE_FALLBACKS", False)


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(JI, "FORCE_FALLBACKS", True)


@pytest.fixture
def fresh_caches():
    """Clears the once-per-process checks before and after, so a patched reading does not leak."""
    for cached in (JI._verified, JI._compiles_with_loop_options):
        cached.cache_clear()
    yield
    for cached in (JI._verified, JI._compiles_with_loop_options):
        cached.cache_clear()


seen = []


def readings(x):
    """(in_reverse_mode, at_top_level) as JAX traces x; recorded while tracing."""
    seen.append((JI.in_reverse_mode(), JI.at_top_level()))
    return x * x


def read_under(transform):
    seen.clear()
    transform(lambda x: readings(x))  # a new function: jit traces it anew
    return seen[-1]


TRANSFORMS = {
    "grad": lambda f: jax.grad(f)(1.0),
    "vmap(grad)": lambda f: jax.vmap(jax.grad(f))(jnp.ones(2)),
    "grad(jit)": lambda f: jax.grad(jax.jit(f))(1.0),
    "jvp": lambda f: jax.jvp(f, (1.0,), (1.0,)),
    "jit": lambda f: jax.jit(f)(1.0),
    "vmap": lambda f: jax.vmap(f)(jnp.ones(2)),
}
REVERSE = {"grad": True, "vmap(grad)": True, "grad(jit)": False, "jvp": False, "jit": False, "vmap": False}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_the_private_readings_know_where_they_are(name):
    """in_reverse_mode is True exactly where the innermost transformation is reverse mode (grad(jit(f))
    traces f under jit); at_top_level is False under every transformation."""
    assert read_under(TRANSFORMS[name]) == (REVERSE[name], False)
    assert not JI.in_reverse_mode() and JI.at_top_level() and JI.loop_options_known()


@pytest.mark.parametrize("name", TRANSFORMS)
def test_forced_fallbacks_take_the_safe_route_everywhere(name, forced):
    assert read_under(TRANSFORMS[name]) == (True, False)
    assert JI.in_reverse_mode() and not JI.at_top_level() and not JI.loop_options_known()


def test_a_failing_or_changed_private_reading_gets_the_fallback(monkeypatch, fresh_caches):
    def gone():
        raise AttributeError("module 'jax._src.core' has no attribute 'trace_ctx'")

    monkeypatch.setattr(JI, "_private_in_reverse_mode", gone)
    monkeypatch.setattr(JI, "_private_at_top_level", gone)
    assert JI.in_reverse_mode() and not JI.at_top_level()
    assert not JI._verified("in_reverse_mode") and not JI._verified("at_top_level")
    # Names that still exist but mean something else: the once-per-process check catches them.
    JI._verified.cache_clear()
    monkeypatch.setattr(JI, "_private_in_reverse_mode", lambda: False)
    monkeypatch.setattr(JI, "_private_at_top_level", lambda: True)
    assert JI.in_reverse_mode() and not JI.at_top_level()


def test_the_environment_variable_forces_the_fallbacks(monkeypatch):
    spec = importlib.util.spec_from_file_location("_jax_internals_copy", JI.__file__)
    for value, force in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("JSM_NO_JAX_INTERNALS", value)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.FORCE_FALLBACKS is force


def _both_routes(monkeypatch, run):
    """run() as usual, then with the fallbacks forced (a fresh trace: run builds its own functions)."""
    normal = run()
    monkeypatch.setattr(JI, "FORCE_FALLBACKS", True)
    return normal, run()


def _dots(fn, *args) -> set:
    return {tuple(e.invars[0].aval.shape) for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns
            if e.primitive.name == "dot_general"}


@pytest.mark.numerics
def test_forward_jets_are_the_same_on_the_fallback_route(monkeypatch, key):
    """jsm.laplacian / divergence ("forward") under jax.vmap, inside jax.grad (reverse mode, per example and
    through a batch loss) and in the parameters: the per-example fallback gives the folded route's numbers,
    and both give jax.hessian's trace."""
    apply, params = nets.pure(nets.MLPEnergy(5, (16,), rngs=nnx.Rngs(1)))
    s_apply, s_params = nets.pure(nets.MLPScore(5, (16,), rngs=nnx.Rngs(2)))
    params, s_params = (jax.tree.map(lambda a: a.astype(jnp.zeros(()).dtype), p) for p in (params, s_params))
    xs = jax.random.normal(key, (6, 5))

    def run():
        lap = lambda p: jsm.laplacian(lambda x: apply(p, x), "forward")
        div = lambda p: jsm.divergence(lambda x: s_apply(p, x), "forward")
        loss = lambda p: jnp.sum(jax.vmap(lap(p))(xs) ** 2)
        return (_dots(jax.vmap(lap(params)), xs),
                jax.jit(jax.vmap(lap(params)))(xs),
                jax.jit(jax.vmap(div(s_params)))(xs),
                jax.jit(jax.vmap(jax.grad(lap(params))))(xs),  # reverse mode innermost
                jax.jit(jax.grad(loss))(params))  # reverse mode outside the vmap

    (folded_dots, *normal), (plain_dots, *fallback) = _both_routes(monkeypatch, run)
    assert (6 * 5, 16) in folded_dots and (6 * 5, 16) not in plain_dots  # the fallback really ran
    for a, b in zip(jax.tree.leaves(normal), jax.tree.leaves(fallback), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol(1e-5, 1e-12), atol=tol(1e-5, 1e-12))
    hessian_trace = jax.jit(jax.vmap(lambda x: jnp.trace(jax.hessian(lambda z: apply(params, z))(x))))(xs)
    np.testing.assert_allclose(normal[0], hessian_trace, rtol=tol(1e-5, 1e-11), atol=tol(1e-5, 1e-11))
    jacobian_trace = jax.jit(jax.vmap(lambda x: jnp.trace(jax.jacfwd(lambda z: s_apply(s_params, z))(x))))(xs)
    np.testing.assert_allclose(normal[1], jacobian_trace, rtol=tol(1e-5, 1e-11), atol=tol(1e-5, 1e-11))


def _shifted_log_prob(x, m):
    return -0.5 * jnp.sum((x - m) ** 2)


@pytest.mark.numerics
def test_chains_are_the_same_without_the_loop_options(monkeypatch):
    """run_chains and tune_step_size with CPU_LOOP_OPTIONS and on the fallback (plain jit): the same chains
    up to float rounding, the fallback compiled by the plain loop."""
    kernel, key, x0, args = samplers.mala(_shifted_log_prob, 0.2), jax.random.key(6), jnp.ones((4, 3)), (jnp.zeros(3),)
    assert samplers._pick(samplers._run, samplers._run_plain) is samplers._run

    def run():
        before = samplers._run_plain._cache_size(), samplers._dual_averaging_plain._cache_size()
        chains = samplers.run_chains(kernel, key, x0, 30, thin=10, args=args)
        tuned = samplers.tune_step_size(kernel, key, x0, 30, args=args)
        after = samplers._run_plain._cache_size(), samplers._dual_averaging_plain._cache_size()
        return chains, tuned, after > before

    (chains, tuned, plain_used), (chains_fb, tuned_fb, plain_used_fb) = _both_routes(monkeypatch, run)
    assert not plain_used and plain_used_fb
    for a, b in zip(jax.tree.leaves((chains, tuned)), jax.tree.leaves((chains_fb, tuned_fb)), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-12))
    assert not np.allclose(chains[1][-1], x0)


def test_an_xla_without_the_loop_options_compiles_the_loops_as_usual(monkeypatch, fresh_caches):
    """An XLA that rejects the experimental option gets the plain loop: loop_options_known() is False."""
    assert JI.loop_options_known()  # this jaxlib knows the option
    monkeypatch.setattr(JI, "CPU_LOOP_OPTIONS", {"xla_cpu_experimental_no_such_option": "true"})
    JI._compiles_with_loop_options.cache_clear()
    assert not JI.loop_options_known()
    assert samplers._pick(samplers._run, samplers._run_plain) is samplers._run_plain


def test_no_other_module_touches_private_jax_names():
    private = ("jax._src", "jax.interpreters", "xla_cpu_", "xla_gpu_", "trace_state_clean", "trace_ctx")
    for path in pathlib.Path(jsm.__file__).parent.glob("*.py"):
        if path.name != "_jax_internals.py":
            text = path.read_text()
            assert not [p for p in private if p in text], path.name
