"""Langevin samplers as (init, step) kernels, one chain loop, and step-size tuning.

The step-size convention, everywhere in jsm:

    x' = x + a s(x) + sqrt(2a) u,     u ~ N(0, I),  s = ∇ log p,

the Euler-Maruyama step of dx = ∇log p(x) dt + sqrt(2) dW over time a. Its
stationary law tends to p as a -> 0 (ULA's bias is O(a)); MALA removes the bias
with a Metropolis-Hastings correction. Papers that write x + (ε/2) s + sqrt(ε) u
use ε = 2a; "tempered" variants with a different noise scale do not target p.

A kernel is a pair `init(position, *args) -> State` and `step(key, state, *args) -> (State, Info)`
acting on ONE chain, a position of any shape: a vector (d,), an image (h, w, c), ...; norms and
inner products run over all its entries, as if it were flattened to d = prod(shape) numbers. `args` (network parameters, a temperature, a
σ: any pytrees) are passed on to the user's function, `log_prob_fn(x, *args)` or
`score_fn(x, *args)`. `run_chains` is the only loop: it vmaps the kernel over chains and
scans over steps, jitted.

Kernels are data. A `Kernel` is a pytree whose leaves are its numbers (the step size,
a σ schedule) and whose static part is the user's function, compared as Python compares
functions (by identity; bound methods by their object). So calling `run_chains` again
with a new step size, new `args` of the same shapes, or a kernel rebuilt from the SAME
function compiles nothing:

    kernel = mala(log_prob_fn, 0.1)                      # log_prob_fn(x, params)
    run_chains(kernel, key, x0, 1000, args=(params,))
    run_chains(mala(log_prob_fn, 0.05), key, x0, 1000, args=(new_params,))   # no compilation

A lambda written in a loop or a training step is a NEW function each time it is built,
and compiles anew: `mala(lambda x: log_prob(params, x), a)` recompiles for every params;
pass them through `args` instead. `from_blackjax` runs blackjax's kernels (NUTS, HMC,
...) under the same loop. ESS and R-hat live in `jsm.diagnostics`; the diffusion samplers
(reverse-time SDE, probability flow) in `jsm.diffusion`, which takes its Langevin corrector from here.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jsm import _compat, _jax_internals, _validate

__all__ = [
    "CHAINS", "AnnealedState", "Info", "Kernel", "LangevinState", "MALAState", "annealed_langevin",
    "from_blackjax", "langevin_move", "mala", "run_chains", "shard_chains", "snr_langevin_move", "tune_step_size",
    "ula", "ChainInfo", "SANE_STEP_MAX", "SANE_STEP_RATIO",
]

Array = jax.Array


class Info(NamedTuple):
    acceptance_prob: Array  # () min(1, MH ratio); 1 for unadjusted kernels
    is_accepted: Array  # () bool
    is_finite: Array  # () bool: the proposal (and its log-density) was finite


class LangevinState(NamedTuple):
    position: Array  # (*shape): one chain's position, (d,) or (h, w, c), ...


class MALAState(NamedTuple):
    position: Array  # (*shape)
    log_prob: Array  # () log p(position), cached
    grad: Array  # (*shape) ∇log p(position), cached


class AnnealedState(NamedTuple):
    position: Array  # (*shape)
    t: Array  # () int32, steps taken; the level is t // n_steps_each


class _ByIdentity:
    """An unhashable static object (a dataclass, a callable module) compared by identity."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)

    def __call__(self, *args, **kwargs):
        return self.obj(*args, **kwargs)


def _static(obj):
    """`obj` as a jit cache key: itself when hashable (functions, bound methods), else by identity."""
    try:
        hash(obj)
    except TypeError:
        return _ByIdentity(obj)
    return obj


def _unwrap(obj):
    return obj.obj if isinstance(obj, _ByIdentity) else obj


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["init_fn", "step_fn", "fn", "options"])
@dataclasses.dataclass(frozen=True, eq=False)
class Kernel:
    """A Markov kernel on one chain: `init(position, *args)` and `step(key, state, *args)`.

    A pytree: `params` (a dict of arrays: step_size, sigmas, ...) are its leaves, traced
    by `jit`; `fn` (the user's log-density or score), `options` and the implementation
    `init_fn` / `step_fn` are static, so two kernels built from the same function share
    one compiled loop. Build kernels with `ula`, `mala`, `annealed_langevin` or
    `from_blackjax`; change a number with `kernel.replace(step_size=...)`.
    """

    init_fn: Callable  # (kernel, position, *args) -> State
    step_fn: Callable  # (kernel, key, state, *args) -> (State, Info)
    fn: Any  # the user's function (static; see `_static`)
    params: dict  # str -> Array: the kernel's numbers
    options: tuple = ()  # static, hashable settings

    def init(self, position: Array, *args) -> Any:
        return self.init_fn(self, position, *args)

    def step(self, key: Array, state: Any, *args) -> tuple[Any, Info]:
        return self.step_fn(self, key, state, *args)

    def replace(self, **params) -> "Kernel":
        """The same kernel with some numbers changed, e.g. `kernel.replace(step_size=0.05)`."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"replace got unknown parameter(s) {unknown}; this kernel has {sorted(self.params)}")
        new = {k: jnp.asarray(v, jnp.result_type(self.params[k])) for k, v in params.items()}
        return dataclasses.replace(self, params={**self.params, **new})


def _float(x) -> Array:
    """A kernel number as an array of the default float dtype (one cache key for 0.1 and jnp.float32(0.1))."""
    return jnp.asarray(x, jnp.result_type(float))


def _step_size(step_size) -> Array:
    _validate.positive("step_size", step_size)
    if jnp.ndim(step_size) != 0:
        raise ValueError(f"step_size must be a scalar, got shape {jnp.shape(step_size)}")
    return _float(step_size)


# The axis `run_chains` and `tune_step_size` vmap a kernel's step over: a kernel may average a
# number over the chains with it (`_mean_over_chains`); the chains stay otherwise independent.
CHAINS = "chains"


def _mean_over_chains(v: Array) -> Array:
    """v averaged over the chains when stepped by `run_chains` / `tune_step_size` (their vmap axis
    `CHAINS`, across devices too); v itself for a kernel stepped on one chain alone."""
    try:
        return jax.lax.pmean(v, CHAINS)
    except NameError:  # no enclosing vmap names the axis
        return v


def langevin_move(x: Array, s: Array, a, u: Array) -> Array:
    """The convention, in one place: x' = x + a s + sqrt(2a) u, for a score s at x and noise u ~ N(0, I)."""
    return x + a * s + jnp.sqrt(2.0 * a) * u


def snr_langevin_move(x: Array, s: Array, u: Array, snr) -> Array:
    """The Langevin corrector of Song et al. (2021): `langevin_move` with a = 2 (snr ⟨|u|⟩ / ⟨|s|⟩)².

    |·| is the norm over all of one chain's entries and ⟨·⟩ the mean over the chains of
    `run_chains` (their vmap axis `CHAINS`, across devices too), so the drift a|s| is `snr` times
    the noise sqrt(2a)|u| on average, with one a for all chains. Per chain, a ∝ 1/|s|² would blow
    up at a mode's centre (|s| -> 0). Used by `annealed_langevin(snr=)` and by
    `jsm.diffusion.reverse_sde`'s corrector.
    """
    noise_norm, score_norm = _mean_over_chains(jnp.stack([_norm(u), _norm(s)]))
    a = 2.0 * (jnp.asarray(snr, x.dtype) * noise_norm / score_norm) ** 2
    return langevin_move(x, s, a, u)


def _langevin_proposal(key: Array, x: Array, s: Array, a) -> Array:
    return langevin_move(x, s, a, jax.random.normal(key, x.shape, x.dtype))


def _finite(x: Array) -> Array:
    return jnp.all(jnp.isfinite(x))


def _norm(v: Array) -> Array:
    """|v| = sqrt(Σ_i v_i²) over all entries, whatever v's shape."""
    return jnp.linalg.norm(jnp.ravel(v))


# --- ULA ---------------------------------------------------------------------------


def _ula_init(kernel: Kernel, position: Array, *args) -> LangevinState:
    return LangevinState(position)


def _ula_step(kernel: Kernel, key: Array, state: LangevinState, *args) -> tuple[LangevinState, Info]:
    x = state.position
    a = kernel.params["step_size"].astype(x.dtype)
    x = _langevin_proposal(key, x, kernel.fn(x, *args), a)
    one = jnp.ones((), x.dtype)
    return LangevinState(x), Info(one, jnp.bool_(True), _finite(x))


def ula(score_fn: Callable[..., Array], step_size: float) -> Kernel:
    """Unadjusted Langevin: x' = x + a s(x) + sqrt(2a) u. Biased by O(a); no rejection.

    Args:
      score_fn: s(x, *args) -> x.shape, the score ∇log p; `args` come from `run_chains(..., args=)`.
      step_size: a > 0, a scalar (data: a new value does not recompile).
    """
    return Kernel(_ula_init, _ula_step, _static(score_fn), {"step_size": _step_size(step_size)})


# --- MALA --------------------------------------------------------------------------


def _mala_value_and_grad(kernel: Kernel) -> Callable:
    """(x, *args) -> (log p(x), ∇log p(x)): the user's pair when given (`value_and_grad=`), else autodiff."""
    if kernel.options:
        return _unwrap(kernel.options[0])
    return jax.value_and_grad(kernel.fn)


def _mala_init(kernel: Kernel, position: Array, *args) -> MALAState:
    return MALAState(position, *_mala_value_and_grad(kernel)(position, *args))


def _mala_step(kernel: Kernel, key: Array, state: MALAState, *args) -> tuple[MALAState, Info]:
    x = state.position
    a = kernel.params["step_size"].astype(x.dtype)
    # One draw of d + 1 uniforms on (-1, 1), d = x.size: z = sqrt(2) erf⁻¹(u) is exactly what
    # jax.random.normal(key, (d + 1,)) returns, so the d proposal normals (reshaped to x's shape: a
    # (2, 3) chain draws what its flattened (6,) twin draws) are those of one normal draw; the last
    # uniform gives U = (1 + u_d) / 2 = Φ(z_d) ~ U(0, 1), which decides acceptance (U < α) without
    # computing log Φ. A third of the random bits of a split and two draws.
    lo = np.nextafter(np.array(-1.0, x.dtype), np.array(0.0, x.dtype))
    u = jax.random.uniform(key, (x.size + 1,), x.dtype, lo, 1.0)
    z = (np.sqrt(2.0).astype(x.dtype) * jax.lax.erf_inv(u[:-1])).reshape(x.shape)
    y = langevin_move(x, state.grad, a, z)
    log_p, grad = _mala_value_and_grad(kernel)(y, *args)
    # log q(x | y) - log q(y | x) with y = x + a g_x + sqrt(2a) z: the |z|²/2 of both terms cancels,
    # leaving -G·(sqrt(a/2) z + a G / 4), G = g_x + g_y (no difference of two nearly equal positions).
    g = state.grad + grad
    log_ratio = log_p - state.log_prob - jnp.sum(g * (jnp.sqrt(0.5 * a) * z + 0.25 * a * g))
    finite = _finite(y) & jnp.isfinite(log_p) & _finite(grad)
    log_ratio = jnp.where(finite & ~jnp.isnan(log_ratio), log_ratio, -jnp.inf)
    accept_prob = jnp.minimum(1.0, jnp.exp(log_ratio))
    accepted = 0.5 * (1.0 + u[-1]) < accept_prob
    new = jax.tree.map(lambda p, s: jnp.where(accepted, p, s), MALAState(y, log_p, grad), state)
    return new, Info(accept_prob, accepted, finite)


def mala(log_prob_fn: Callable[..., Array], step_size: float, *,
         value_and_grad: Callable[..., tuple[Array, Array]] | None = None) -> Kernel:
    """Metropolis-adjusted Langevin: propose x' = x + a ∇log p(x) + sqrt(2a) u, then accept with

        α = min(1, p(x') q(x | x') / (p(x) q(x' | x))),  q(y | x) ∝ exp(-|y - x - a ∇log p(x)|² / (4a)).

    `log_prob_fn` may be unnormalised. A proposal whose log-density or gradient is
    not finite is rejected (its ratio counts as -inf), never accepted.

    The kernel needs log p and ∇log p at every proposal; by default it takes both from
    `jax.value_and_grad(log_prob_fn)`. A target that has them in closed form, sharing work
    between the two, can give that pair instead:

        mala(mix.log_prob, 0.1, value_and_grad=mix.log_prob_and_score)   # one softmax, not two passes

    Args:
      log_prob_fn: log p(x, *args) -> (); `args` come from `run_chains(..., args=)`; the
        gradient is taken in x only.
      step_size: a > 0, a scalar (data: a new value does not recompile).
      value_and_grad: optional (x, *args) -> (log p(x), ∇log p(x)), the same log p as
        `log_prob_fn` (up to a constant) and its gradient in x, computed together (e.g.
        `jsm.targets.GaussianMixture.log_prob_and_score`). When given, the kernel calls it in
        place of autodiff and never calls `log_prob_fn`. Static, like `log_prob_fn`: the
        same function does not recompile.
    """
    if value_and_grad is not None and not callable(value_and_grad):
        raise TypeError("value_and_grad must be a function (x, *args) -> (log p(x), ∇log p(x)), got "
                        f"{type(value_and_grad).__name__}")
    options = () if value_and_grad is None else (_static(value_and_grad),)
    return Kernel(_mala_init, _mala_step, _static(log_prob_fn), {"step_size": _step_size(step_size)}, options)


# --- annealed Langevin ------------------------------------------------------------


def _annealed_init(kernel: Kernel, position: Array, *args) -> AnnealedState:
    return AnnealedState(position, jnp.zeros((), jnp.int32))


def _annealed_step(kernel: Kernel, key: Array, state: AnnealedState, *args) -> tuple[AnnealedState, Info]:
    sigmas, p = kernel.params["sigmas"], kernel.params
    level = jnp.minimum(state.t // p["n_steps_each"], sigmas.shape[0] - 1)
    x = state.position
    sigma = sigmas[level].astype(x.dtype)
    s = kernel.fn(x, sigma, *args)
    u = jax.random.normal(key, x.shape, x.dtype)
    if "snr" in p:
        x = snr_langevin_move(x, s, u, p["snr"])
    else:
        x = langevin_move(x, s, (p["step_size"] * (sigma / sigmas[-1]) ** 2).astype(x.dtype), u)
    one = jnp.ones((), x.dtype)
    return AnnealedState(x, state.t + 1), Info(one, jnp.bool_(True), _finite(x))


def annealed_langevin(
    score_fn: Callable[..., Array], sigmas, n_steps_each: int, step_size: float | None = None,
    *, snr: float | None = None,
) -> Kernel:
    """Annealed Langevin dynamics (Song & Ermon 2019).

    Level i = 0..L-1 (sigmas decreasing) runs `n_steps_each` Langevin steps
    x' = x + a_i s(x, σ_i) + sqrt(2 a_i) u on the noise-conditional score, so a chain
    walks all levels in order over L · n_steps_each steps; later steps stay at the
    last level. The noised densities p_σ of the early levels connect the modes that
    plain Langevin cannot cross, and get the mixture weights right.

    Two rules for a_i; give exactly one of `step_size` and `snr`:
      geometric (Song & Ermon 2019):  a_i = step_size · σ_i² / σ_L²  (a fixed schedule);
      signal-to-noise (Song et al. 2021, the corrector of predictor-corrector sampling):
          a_i = 2 (snr · mean|u| / mean|s(x, σ_i)|)² at every step, the norms (over all entries of a
          chain) averaged over the chains of `run_chains`, so that the drift is `snr` times the noise
          on average. Their step x + ε s + sqrt(2ε) z is this library's with a = ε. Typical snr:
          0.05-0.2. A kernel stepped on ONE chain alone (outside `run_chains`) uses that chain's
          norms, |a s| = snr · sqrt(2a) |u| exactly; per chain the rule blows up where |s| ≈ 0 (a
          mode's centre), which the average over chains avoids. The chains then share one step
          size per step (the only thing they share).

    Args:
      score_fn: s(x, σ, *args) -> x.shape; `args` come from `run_chains(..., args=)`.
      sigmas: (L,) strictly decreasing noise levels (data: new values of the same L do not recompile).
      n_steps_each: Langevin steps per level, >= 1.
      step_size, snr: the rule, as above (data).
    """
    sigmas = _validate.decreasing("sigmas", sigmas)
    n_steps_each = _validate.positive_int("n_steps_each", n_steps_each)
    if (step_size is None) == (snr is None):
        raise ValueError(f"give exactly one of step_size and snr, got step_size={step_size!r} and snr={snr!r}")
    params = {"sigmas": _float(sigmas), "n_steps_each": jnp.asarray(n_steps_each, jnp.int32)}
    if snr is not None:
        _validate.positive("snr", snr)
        params["snr"] = _float(snr)
    else:
        params["step_size"] = _step_size(step_size)
    return Kernel(_annealed_init, _annealed_step, _static(score_fn), params)


# --- blackjax ----------------------------------------------------------------------


def _blackjax_algorithm(kernel: Kernel, args: tuple):
    """The blackjax SamplingAlgorithm: given, or built from the factory with the kernel's numbers."""
    factory, static_kw = kernel.options
    if factory is None:
        if args:
            raise TypeError("a blackjax SamplingAlgorithm closes over its log-density, so it takes no args; "
                            "to pass args, build the kernel as "
                            "from_blackjax(blackjax.nuts, log_prob_fn, step_size=..., ...)")
        return _unwrap(kernel.fn)
    log_prob_fn = _unwrap(kernel.fn)
    return _unwrap(factory)(lambda x: log_prob_fn(x, *args), **kernel.params, **dict(static_kw))


def _blackjax_init(kernel: Kernel, position: Array, *args):
    return _blackjax_algorithm(kernel, args).init(position)


def _blackjax_step(kernel: Kernel, key: Array, state, *args):
    new, info = _blackjax_algorithm(kernel, args).step(key, state)
    x = new.position
    is_accepted = getattr(info, "is_accepted", None)
    if is_accepted is None:  # NUTS samples from its trajectory; it "accepted" when it moved
        is_accepted = jnp.any(x != state.position)
    finite = _finite(x) & jnp.isfinite(getattr(new, "logdensity", jnp.zeros(())))
    if hasattr(info, "is_divergent"):
        finite = finite & ~info.is_divergent
    return new, Info(jnp.asarray(info.acceptance_rate, x.dtype), jnp.asarray(is_accepted, bool), finite)


def from_blackjax(algorithm, log_prob_fn: Callable[..., Array] | None = None, /, **params) -> Kernel:
    """A blackjax kernel (NUTS, HMC, MALA, ...) as a jsm `Kernel`, for `run_chains`.

    Two forms:

        from_blackjax(blackjax.nuts(logdensity, step_size, inverse_mass_matrix))   # a SamplingAlgorithm
        from_blackjax(blackjax.nuts, log_prob_fn, step_size=0.1, inverse_mass_matrix=m)

    The first closes over its numbers: a rebuilt algorithm is a new kernel and compiles
    anew, and `args` cannot be passed. The second builds the algorithm inside the
    compiled loop: float and array keywords (step_size, inverse_mass_matrix) are data,
    so new values do not recompile and `tune_step_size` can adapt `step_size`; other
    keywords (ints such as num_integration_steps, functions) are static; `log_prob_fn(x, *args)`
    receives `run_chains`' args.

    Info: acceptance_prob is blackjax's acceptance_rate; is_accepted is its is_accepted
    (NUTS, which has none: the position moved); is_finite is False for a divergent
    transition or a non-finite position or log-density, so `ChainInfo.n_nonfinite`
    counts divergences. blackjax is optional (`pip install jsm[samplers]`); this
    function never imports it.

    Args:
      algorithm: a blackjax SamplingAlgorithm (with .init and .step), or a factory
        such as `blackjax.nuts` when `log_prob_fn` is given.
      log_prob_fn: log p(x, *args) -> (), for the factory form.
      **params: the factory's other arguments.
    """
    if log_prob_fn is None:
        if params:
            raise TypeError(f"from_blackjax got keyword arguments {sorted(params)} without a log_prob_fn; "
                            "give from_blackjax(factory, log_prob_fn, **params) or a built algorithm alone")
        if not (callable(getattr(algorithm, "init", None)) and callable(getattr(algorithm, "step", None))):
            raise TypeError("algorithm must be a blackjax SamplingAlgorithm with .init and .step (e.g. blackjax."
                            f"nuts(logdensity, step_size, inverse_mass_matrix)), got {type(algorithm).__name__}")
        return Kernel(_blackjax_init, _blackjax_step, _static(algorithm), {}, (None, ()))
    if not callable(algorithm):
        raise TypeError(f"algorithm must be a blackjax factory such as blackjax.nuts, got {type(algorithm).__name__}")
    if not callable(log_prob_fn):
        raise TypeError(f"log_prob_fn must be a function x, *args -> (), got {type(log_prob_fn).__name__}")
    data, static = {}, []
    for name, value in sorted(params.items()):
        if isinstance(value, (float, np.ndarray, np.floating, jax.Array)) and not isinstance(value, bool):
            data[name] = value if isinstance(value, jax.Array) else _float(value)
        else:
            try:
                hash(value)
            except TypeError as e:
                raise TypeError(f"{name} must be a float, an array or a hashable setting, got "
                                f"{type(value).__name__}") from e
            static.append((name, value))
    if "step_size" in data:
        _validate.positive("step_size", data["step_size"])
    return Kernel(_blackjax_init, _blackjax_step, _static(log_prob_fn), data, (_static(algorithm), tuple(static)))


# --- the one loop --------------------------------------------------------------


class ChainInfo(NamedTuple):
    acceptance_rate: Array  # (n_chains,) mean acceptance probability over the steps
    n_nonfinite: Array  # (n_chains,) int32 steps whose proposal was not finite


# The chain loops are compiled with one experimental XLA:CPU option, `_jax_internals.CPU_LOOP_OPTIONS`:
# it keeps XLA:CPU's YNNPACK off the many tiny per-chain reductions of a vmapped step (MALA 1.7x, ULA
# 1.3x faster on the 8-mode mixture at 16k chains; the module says more). An XLA that no longer knows
# the option, or a call inside the caller's transformation, gets the loop compiled plainly.
def _loop(fn: Callable, static_argnames: tuple) -> tuple[Callable, Callable]:
    """fn jitted with the loop options, and plainly (see `_pick`)."""
    return (jax.jit(fn, static_argnames=static_argnames, compiler_options=_jax_internals.CPU_LOOP_OPTIONS),
            jax.jit(fn, static_argnames=static_argnames))


def _pick(with_options: Callable, plain: Callable) -> Callable:
    """The loop with the loop options when called at the top level, the plain one inside a transformation.

    Only a top-level jit takes compiler options: run_chains inside the caller's jit, grad or
    vmap is compiled with the caller's program, by its options.
    """
    use = _jax_internals.at_top_level() and _jax_internals.loop_options_known()
    return with_options if use else plain


def _run_impl(kernel: Kernel, key: Array, x0: Array, args: tuple, n_steps: int, thin: int | None):
    n_chains = x0.shape[0]
    state = jax.vmap(kernel.init, in_axes=(0,) + (None,) * len(args), axis_name=CHAINS)(x0, *args)
    step = jax.vmap(kernel.step, in_axes=(0, 0) + (None,) * len(args), axis_name=CHAINS)

    def one_step(carry, t):
        state, acc, bad = carry
        keys = jax.random.split(jax.random.fold_in(key, t), n_chains)
        state, info = step(keys, state, *args)
        acc = acc + info.acceptance_prob.astype(acc.dtype)
        return (state, acc, bad + (~info.is_finite).astype(jnp.int32)), None

    carry = (state, jnp.zeros(n_chains, x0.dtype), jnp.zeros(n_chains, jnp.int32))
    if thin is None:
        carry, _ = jax.lax.scan(one_step, carry, jnp.arange(n_steps))
        trace = None
    else:
        # Steps t = 0..n_steps-1 in blocks of `thin`; the position after each block is kept.
        def block(carry, ts):
            carry, _ = jax.lax.scan(one_step, carry, ts)
            return carry, carry[0].position

        carry, trace = jax.lax.scan(block, carry, jnp.arange(n_steps).reshape(-1, thin))
    state, acc, bad = carry
    return state, trace, ChainInfo(acc / n_steps, bad)


_run, _run_plain = _loop(_run_impl, ("n_steps", "thin"))


def shard_chains(x0: Array) -> Array:
    """Place x0 (n_chains, *shape) with its chain axis (the first; the others stay whole) split across all devices.

    With one device, or n_chains not a multiple of the device count, x0 is
    returned as it is. An x0 that already carries a sharding over several
    devices (e.g. a global array built on several hosts) is left alone.
    """
    if isinstance(x0, jax.core.Tracer):  # inside a jit: the caller's sharding propagates
        return x0
    devices = jax.devices()
    already = getattr(x0, "sharding", None)
    if len(devices) == 1 or x0.shape[0] % len(devices) or (already is not None and len(already.device_set) > 1):
        return x0
    mesh = Mesh(np.asarray(devices), ("chains",))
    return jax.device_put(x0, NamedSharding(mesh, PartitionSpec("chains")))


def _replicate_like(tree, x0: Array):
    """Every concrete array of `tree` replicated on x0's mesh, when x0 is split over several devices.

    Arrays committed to one device (e.g. parameters placed by the user) would otherwise
    clash with the chains' devices under jit.
    """
    sharding = getattr(x0, "sharding", None)
    if isinstance(x0, jax.core.Tracer) or not isinstance(sharding, NamedSharding) or len(sharding.device_set) == 1:
        return tree
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    put = lambda a: a if isinstance(a, jax.core.Tracer) else jax.device_put(a, replicated)
    return jax.tree.map(put, tree)


def _check_args(args) -> tuple:
    if not isinstance(args, (tuple, list)):
        raise TypeError("args must be a tuple of pytrees, the extra arguments of log_prob_fn(x, *args) or "
                        f"score_fn(x, *args) (e.g. args=(params,)), got {type(args).__name__}")
    return tuple(args)


def _check_kernel(kernel) -> Kernel:
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a jsm.samplers.Kernel (e.g. mala(...), or from_blackjax(...) for a blackjax "
                        f"kernel), got {type(kernel).__name__}")
    return kernel


def _check_output(kernel: Kernel, x0: Array, args: tuple) -> None:
    """The user's function, traced once on one chain's position, returns what its kernel needs:
    a score of x's shape (ula, annealed_langevin), a scalar log-density (mala). Before compiling."""
    one = jax.ShapeDtypeStruct(x0.shape[1:], x0.dtype)
    if kernel.step_fn is _ula_step:
        name, want, out = "ula's score_fn", one.shape, jax.eval_shape(kernel.fn, one, *args)
    elif kernel.step_fn is _annealed_step:
        sigma = jax.ShapeDtypeStruct((), x0.dtype)
        name, want, out = "annealed_langevin's score_fn", one.shape, jax.eval_shape(kernel.fn, one, sigma, *args)
    elif kernel.step_fn is _mala_step and kernel.options:  # the closed-form pair stands in for log_prob_fn
        name, want, out = "mala's value_and_grad", (), jax.eval_shape(_mala_value_and_grad(kernel), one, *args)
        if isinstance(out, tuple) and len(out) == 2 and getattr(out[1], "shape", None) == one.shape:
            out = out[0]
    elif kernel.step_fn is _mala_step:
        name, want, out = "mala's log_prob_fn", (), jax.eval_shape(kernel.fn, one, *args)
    else:
        return
    got = getattr(out, "shape", None)
    if got != want:
        hint = {(): " (a log-density is a scalar; a score belongs to ula or annealed_langevin)"}.get(
            want, "" if got != () else " (a scalar: a log-density? ula and annealed_langevin take the score "
            "∇log p, e.g. jax.grad(log_prob_fn), and mala the log-density)")
        raise ValueError(f"{name} must map one chain's position of shape {one.shape} (and *args) to shape {want}, "
                         f"got {got if got is not None else type(out).__name__}{hint}")


def _warn_nonfinite_chains(info: ChainInfo) -> None:
    if _validate.is_concrete(info.n_nonfinite):
        bad = int(np.sum(np.asarray(info.n_nonfinite) > 0))
        if bad:
            warnings.warn(f"run_chains: {bad} of {info.n_nonfinite.shape[0]} chains had non-finite proposals "
                          "(ChainInfo.n_nonfinite counts their steps); unadjusted kernels keep them: lower the step "
                          "size, or look at the score where those chains went", RuntimeWarning, stacklevel=3)


def run_chains(kernel: Kernel, key: Array, x0: Array, n_steps: int, thin: int | None = None, *, args: tuple = ()):
    """Run `n_chains` independent chains of `kernel` for `n_steps` steps.

    Chain c at step t uses the key split(fold_in(key, t), n_chains)[c]; the same
    key and x0 give the same chains, on one device or many. Without `thin`
    nothing is stored per step, so memory does not grow with n_steps. Compiled once
    per kernel function, shapes, key implementation and `thin`: new step sizes and new
    `args` values reuse it.

    Keys of any JAX implementation work (`jax.random.key(seed, impl=...)`); what repeats:
      "threefry2x32" (the default): the same random numbers on any number of devices and
        on CPU, GPU or TPU (so the same chains, up to each backend's rounding), for a given
        JAX version and its settings (`jax_threefry_partitionable` changed them in JAX 0.5).
      "rbg", "unsafe_rbg" (XLA's RngBitGenerator): the same chains on one device or many
        (tested with 4 CPU devices), but not across backends or XLA versions. Under the
        chains' vmap JAX draws every chain's numbers from the FIRST chain's key, so chain
        c's numbers depend on n_chains and differ from `kernel.step(key_c, ...)` called
        alone; the law sampled is the same. "unsafe_rbg" also derives keys (split,
        fold_in) with RBG, of untested statistical quality. Meant for TPUs, where RBG is
        the fast generator; on a CPU neither is reliably faster than threefry
        (experiments/bench/chain_throughput.py: MALA with unsafe_rbg 1.5x faster at 1k
        chains, 0.9x at 16k; rbg 0.8-0.9x).

    Several devices: the chains are split across all of them (`shard_chains`),
    with no change to the call; the compiler partitions the vmapped kernel along
    the chain axis, `args` are replicated, and chains never communicate
    (an annealed kernel's snr rule alone averages two norms over them, across devices too). Several hosts:
    call `jax.distributed.initialize()` on each, build x0 as one global array with
    `jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("chains")), local_x0)`,
    and call `run_chains` on every host with the same key.

    Args:
      kernel: a `Kernel` (e.g. `mala(log_prob_fn, step_size)`, `from_blackjax(...)`).
      key: PRNG key, of any implementation (above).
      x0: (n_chains, *shape) initial positions: (n_chains, d), (n_chains, h, w, c), ...
      n_steps: number of steps, >= 1.
      thin: keep the positions every `thin` steps (n_steps must be a multiple).
      args: a tuple of pytrees shared by all chains, passed on as `log_prob_fn(x, *args)`
        / `score_fn(x, *args)` (e.g. `(params,)` of a network).

    Returns:
      (final_state, trace, info): the kernel's state with position (n_chains, *shape);
      trace (n_steps // thin, n_chains, *shape) or None; a `ChainInfo`.
    """
    kernel = _check_kernel(kernel)
    _validate.key("key", key)
    x0 = _validate.chains("x0", x0)
    n_steps = _validate.positive_int("n_steps", n_steps)
    args = _check_args(args)
    if thin is not None:
        thin = _validate.positive_int("thin", thin)
        if n_steps % thin:
            raise ValueError(f"n_steps must be a multiple of thin={thin}, got n_steps={n_steps}")
    _check_output(kernel, x0, args)
    x0 = shard_chains(x0)
    kernel, args = _replicate_like((kernel, args), x0)
    out = _pick(_run, _run_plain)(kernel, key, x0, args, n_steps, thin)
    _warn_nonfinite_chains(out[2])
    return out


# --- step-size tuning ------------------------------------------------------------


def tune_step_size(
    kernel: Kernel, key: Array, x0: Array, n_steps: int,
    target_acceptance: float = 0.574, initial_step_size: float | None = None, *, args: tuple = (),
) -> tuple[Array, Any]:
    """Tune a Metropolis-adjusted kernel's step size by dual averaging over all chains at once.

    Nesterov's dual averaging as in Hoffman & Gelman (2014, Algorithm 5), driven by
    the acceptance probability averaged over the chains at each step:

        H_t = (1 - 1/(t + t0)) H_{t-1} + (δ - ᾱ_t) / (t + t0),
        log a_t = μ - sqrt(t) / γ · H_t,   log ā_t = t^{-κ} log a_t + (1 - t^{-κ}) log ā_{t-1},

    with μ = log(10 a_0), γ = 0.05, t0 = 10, κ = 0.75, δ = `target_acceptance`
    (0.574 is optimal for MALA in high dimension, Roberts & Rosenthal 1998; about 0.8
    for NUTS). The chains move while tuning, so the returned state is also warmed up.
    Jitted as one scan; the step size is the kernel's data, so nothing is rebuilt per step
    and a second tuning of the same kernel function compiles nothing.

    Args:
      kernel: a `Kernel` with a `step_size` parameter (`mala(...)`, or
        `from_blackjax(blackjax.nuts, log_prob_fn, step_size=..., ...)`). A function
        step_size -> Kernel (the old form) is still accepted: it is called once.
      key: PRNG key.
      x0: (n_chains, *shape) initial positions.
      n_steps: adaptation steps, >= 1.
      target_acceptance: δ in (0, 1).
      initial_step_size: a_0 > 0; default the kernel's own step size (0.1 for the old
        form). A poor guess (100x off) still converges.
      args: passed on to the kernel, as in `run_chains`.

    Returns:
      (step_size, state): the averaged step ā and the chains' state after adaptation;
      `kernel.replace(step_size=step_size)` is the tuned kernel.
      Proposals with a non-finite log-density are rejected; their count is reported
      in a warning, and a non-finite tuned step raises `FloatingPointError`.
    """
    if initial_step_size is not None:
        _validate.positive("initial_step_size", initial_step_size)
    if not isinstance(kernel, Kernel) and callable(kernel):
        kernel = kernel(0.1 if initial_step_size is None else initial_step_size)
    kernel = _check_kernel(kernel)
    if "step_size" not in kernel.params:
        raise TypeError(f"kernel must have a step_size parameter to tune, got one with {sorted(kernel.params)}")
    _validate.key("key", key)
    x0 = _validate.chains("x0", x0)
    n_steps = _validate.positive_int("n_steps", n_steps)
    args = _check_args(args)
    if not (isinstance(target_acceptance, (int, float)) and 0.0 < target_acceptance < 1.0):
        raise ValueError(f"target_acceptance must be in (0, 1), got {target_acceptance!r}")
    if initial_step_size is None:
        initial_step_size = kernel.params["step_size"]
    _check_output(kernel, x0, args)
    x0 = shard_chains(x0)
    kernel, args = _replicate_like((kernel, args), x0)
    log_a_bar, state, n_bad = _pick(_dual_averaging, _dual_averaging_plain)(
        kernel, key, x0, args, n_steps, _float(target_acceptance), _float(initial_step_size))
    n_bad = int(n_bad)
    if n_bad:
        warnings.warn(f"tune_step_size: {n_bad} proposals had a non-finite log-density or gradient and were "
                      "rejected; check log_prob_fn where the chains went", RuntimeWarning, stacklevel=2)
    step = jnp.exp(log_a_bar)
    if not bool(jnp.isfinite(step)):
        raise FloatingPointError(f"tune_step_size: the tuned step size is {float(step)}; the acceptance "
                                 "probabilities were not finite")
    _warn_implausible_step(float(step), _float(initial_step_size), x0)
    return step, state


# A tuned step outside [a_0 / SANE_STEP_RATIO, a_0 SANE_STEP_RATIO] or above SANE_STEP_MAX x0's spread² is
# reported: dual averaging then usually ran too few steps, or the acceptance barely depends on a (a
# flat or non-finite log-density), and the chains did not mix at that step.
SANE_STEP_RATIO = 1e4
SANE_STEP_MAX = 1e2


def _warn_implausible_step(step: float, initial, x0: Array) -> None:
    spread = float(jnp.mean(jnp.var(x0.reshape(x0.shape[0], -1), axis=0))) if x0.shape[0] > 1 else 0.0
    scale = max(spread, 1.0)
    a0 = float(initial)
    if step > SANE_STEP_MAX * scale or not a0 / SANE_STEP_RATIO <= step <= a0 * SANE_STEP_RATIO:
        warnings.warn(f"tune_step_size ended at step_size={step:.4g} (started at {a0:.4g}; the chains' variance per "
                      f"entry is {spread:.3g}): an implausible step. Tune longer (n_steps), check that log_prob_fn "
                      "is a log-density (not flat, finite), or set the step size by hand", RuntimeWarning,
                      stacklevel=3)


def _dual_averaging_impl(kernel: Kernel, key, x0, args: tuple, n_steps: int, delta, a0):
    gamma, t0, kappa = 0.05, 10.0, 0.75
    mu = jnp.log(10.0 * a0)
    n_chains = x0.shape[0]
    kernel = kernel.replace(step_size=a0)
    state = jax.vmap(kernel.init, in_axes=(0,) + (None,) * len(args), axis_name=CHAINS)(x0, *args)
    step = lambda kern, keys, state: jax.vmap(kern.step, in_axes=(0, 0) + (None,) * len(args),
                                              axis_name=CHAINS)(keys, state, *args)

    def one_step(carry, t):
        state, h, log_a, log_a_bar, bad = carry
        keys = jax.random.split(jax.random.fold_in(key, t), n_chains)
        state, info = step(kernel.replace(step_size=jnp.exp(log_a)), keys, state)
        alpha = jnp.mean(info.acceptance_prob)
        i = t + 1.0
        h = (1 - 1 / (i + t0)) * h + (delta - alpha) / (i + t0)
        log_a = mu - jnp.sqrt(i) / gamma * h
        w = i ** (-kappa)
        log_a_bar = w * log_a + (1 - w) * log_a_bar
        bad = bad + jnp.sum(~info.is_finite, dtype=jnp.int32)
        return (state, h, log_a, log_a_bar, bad), None

    zero = jnp.zeros((), a0.dtype)
    init = (state, zero, jnp.log(a0), zero, jnp.zeros((), jnp.int32))
    (state, _, _, log_a_bar, bad), _ = jax.lax.scan(one_step, init, jnp.arange(n_steps))
    return log_a_bar, state, bad


_dual_averaging, _dual_averaging_plain = _loop(_dual_averaging_impl, ("n_steps",))


__getattr__ = _compat.moved(__name__, {
    "effective_sample_size": "jsm.diagnostics.effective_sample_size",
    "split_rhat": "jsm.diagnostics.split_rhat",
    "reverse_sde": "jsm.diffusion.reverse_sde",
    "probability_flow": "jsm.diffusion.probability_flow",
    "encode": "jsm.diffusion.encode",
    "guided": "jsm.diffusion.guided",
})
