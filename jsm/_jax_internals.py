"""The one home of private JAX names and experimental XLA options, each with a public-API fallback.

Everything else in jsm uses JAX's public API (jax, jax.numpy, jax.lax, jax.extend, jax.custom_batching,
jax.sharding). Three questions have no public answer; each is asked here, inside a `try`, and each has a
fallback that is always correct and costs only speed. The private answer is also checked once per
process on a case whose answer is known (`_verified`), so a JAX whose internals keep their names but
change their meaning gets the fallback too, not a wrong answer.

in_reverse_mode()
    Reads `jax._src.core.trace_ctx.trace`: is the innermost transformation reverse-mode AD (the
    `LinearizeTrace` that jax.grad / jax.vjp / jax.linearize run under)? `jsm.forward.folded` asks it:
    `jax.custom_batching.custom_vmap`, which folds a vmapped jet into one batched product, has no
    reverse-mode rule, so there the per-example route must be taken. No public API names the current
    trace (`jax.extend.core.take_current_trace` hands it over, but its class is still private).
    Fallback: True, the per-example route, which works under every transformation. Cost: under
    `jax.vmap` each example's jet is pushed through by vmap's own batching rules instead of the batch
    being folded into ONE (n·d, h) matrix product per layer; the same numbers, slower on big batches.

at_top_level()
    Reads `jax._src.core.trace_state_clean()`: is the caller under no transformation at all (no jit,
    grad or vmap tracing it, no axis name bound)? `jsm.samplers` asks it: only a top-level `jax.jit`
    takes `compiler_options`; inside the caller's jit, grad or vmap the chain loop is compiled with the
    caller's program, by its options. The public `jax.core.Tracer` check sees only traced arguments, not
    a loop called with constants inside a jit. Fallback: False, the loops are compiled with XLA's
    default options (below). Cost: that of running without CPU_LOOP_OPTIONS.

CPU_LOOP_OPTIONS, loop_options_known()
    An experimental XLA:CPU option, `xla_cpu_experimental_ynn_fusion_type`. XLA:CPU (jaxlib 0.10)
    hands every f32 sum / max over >= 4096 elements to YNNPACK, whose reductions are slow on the many
    tiny per-chain reductions of a vmapped step (over d = 2 entries, over 8 mixture components): on the
    8-mode mixture at 16k chains, MALA runs 1.7x and ULA 1.3x faster without them (blackjax's MALA on
    the same target, compiled with this option, 2.9x). The option keeps YNNPACK's dots: an MLP energy's
    matmuls are unchanged. Other backends ignore xla_cpu_* options. No public JAX setting reaches it;
    XLA may rename or drop it in any release. `loop_options_known()` compiles a one-op program with it
    once per process. Fallback: False, the loops compile with XLA's defaults; the same chains (up to
    float rounding), at the speeds above.

FORCE_FALLBACKS
    The one switch: True makes every function here return its fallback without touching JAX's
    internals. Set from the environment variable JSM_NO_JAX_INTERNALS (any value but "" or "0") at
    import; tests set the attribute (`monkeypatch.setattr(_jax_internals, "FORCE_FALLBACKS", True)`).
    It is read when a function is traced: a function already compiled keeps the route it was traced with.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

__all__ = ["CPU_LOOP_OPTIONS", "FORCE_FALLBACKS", "at_top_level", "in_reverse_mode", "loop_options_known"]

FORCE_FALLBACKS: bool = os.environ.get("JSM_NO_JAX_INTERNALS", "") not in ("", "0")

CPU_LOOP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def in_reverse_mode() -> bool:
    """Is the innermost transformation reverse-mode AD (linearize)? Fallback: True (see the module doc)."""
    if FORCE_FALLBACKS or not _verified("in_reverse_mode"):
        return True
    try:
        return _private_in_reverse_mode()
    except Exception:  # noqa: BLE001 - unknown JAX internals: take the route that always works
        return True


def at_top_level() -> bool:
    """Is the caller under no JAX transformation? Fallback: False (see the module doc)."""
    if FORCE_FALLBACKS or not _verified("at_top_level"):
        return False
    try:
        return _private_at_top_level()
    except Exception:  # noqa: BLE001 - unknown JAX internals: compile as if inside a transformation
        return False


def loop_options_known() -> bool:
    """Does this XLA accept CPU_LOOP_OPTIONS? Fallback: False (see the module doc)."""
    return not FORCE_FALLBACKS and _compiles_with_loop_options()


def _private_in_reverse_mode() -> bool:
    from jax._src import core  # no public API names the current trace

    return type(core.trace_ctx.trace).__name__ == "LinearizeTrace"


def _private_at_top_level() -> bool:
    from jax._src import core  # no public API says whether a transformation is tracing us

    return bool(core.trace_state_clean())


@functools.cache
def _verified(name: str) -> bool:
    """Does the private reading give the known answer on a known case? Checked once per process.

    Each probe records the reading while JAX traces it, inside a transformation this function builds,
    so it is valid wherever it is first called (at the top level or inside the caller's trace).
    """
    seen = []
    try:
        if name == "in_reverse_mode":
            def probe(x):
                seen.append(_private_in_reverse_mode())
                return x * x

            jax.grad(probe)(1.0)  # reverse mode: True
            jax.jvp(probe, (1.0,), (1.0,))  # forward mode: False
            return seen == [True, False]
        if name == "at_top_level":
            def probe(x):
                seen.append(_private_at_top_level())
                return x

            jax.make_jaxpr(probe)(1.0)  # traced: False
            return seen == [False]
    except Exception:  # noqa: BLE001 - unknown JAX internals
        return False
    raise ValueError(f"no probe for {name!r}")


@functools.cache
def _compiles_with_loop_options() -> bool:
    try:
        one_op = jax.jit(lambda x: x + 1, compiler_options=CPU_LOOP_OPTIONS)
        one_op.lower(jax.ShapeDtypeStruct((), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 - XLA's error for an unknown option has no dedicated type
        return False
    return True
