"""Langevin samplers as (init, step) kernels, one chain loop, and diagnostics.

The step-size convention, everywhere in jsm:

    x' = x + a s(x) + sqrt(2a) u,     u ~ N(0, I),  s = ∇ log p,

the Euler-Maruyama step of dx = ∇log p(x) dt + sqrt(2) dW over time a. Its
stationary law tends to p as a -> 0 (ULA's bias is O(a)); MALA removes the bias
with a Metropolis-Hastings correction. Papers that write x + (ε/2) s + sqrt(ε) u
use ε = 2a; "tempered" variants with a different noise scale do not target p.

A kernel is a pair `init(position) -> State` and `step(key, state) -> (State, Info)`
acting on ONE chain, position of shape (d,). `run_chains` is the only loop: it
vmaps the kernel over chains and scans over steps, jitted.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jsm import _validate

Array = jax.Array


class Kernel(NamedTuple):
    init: Callable[[Array], Any]
    step: Callable[[Array, Any], tuple[Any, "Info"]]


class Info(NamedTuple):
    acceptance_prob: Array  # () min(1, MH ratio); 1 for unadjusted kernels
    is_accepted: Array  # () bool
    is_finite: Array  # () bool: the proposal (and its log-density) was finite


class LangevinState(NamedTuple):
    position: Array  # (d,)


class MALAState(NamedTuple):
    position: Array  # (d,)
    log_prob: Array  # () log p(position), cached
    grad: Array  # (d,) ∇log p(position), cached


class AnnealedState(NamedTuple):
    position: Array  # (d,)
    t: Array  # () int32, steps taken; the level is t // n_steps_each


def _step_size(step_size) -> None:
    _validate.positive("step_size", step_size)


def _langevin_move(x: Array, s: Array, a, u: Array) -> Array:
    """The convention, in one place: x + a s + sqrt(2a) u."""
    return x + a * s + jnp.sqrt(2.0 * a) * u


def _langevin_proposal(key: Array, x: Array, s: Array, a) -> Array:
    return _langevin_move(x, s, a, jax.random.normal(key, x.shape, x.dtype))


def _finite(x: Array) -> Array:
    return jnp.all(jnp.isfinite(x))


def ula(score_fn: Callable[[Array], Array], step_size: float) -> Kernel:
    """Unadjusted Langevin: x' = x + a s(x) + sqrt(2a) u. Biased by O(a); no rejection."""
    _step_size(step_size)

    def init(position: Array) -> LangevinState:
        return LangevinState(position)

    def step(key: Array, state: LangevinState) -> tuple[LangevinState, Info]:
        x = _langevin_proposal(key, state.position, score_fn(state.position), step_size)
        one = jnp.ones((), x.dtype)
        return LangevinState(x), Info(one, jnp.bool_(True), _finite(x))

    return Kernel(init, step)


def mala(log_prob_fn: Callable[[Array], Array], step_size: float) -> Kernel:
    """Metropolis-adjusted Langevin: propose x' = x + a ∇log p(x) + sqrt(2a) u, then accept with

        α = min(1, p(x') q(x | x') / (p(x) q(x' | x))),  q(y | x) ∝ exp(-|y - x - a ∇log p(x)|² / (4a)).

    `log_prob_fn` may be unnormalised. A proposal whose log-density or gradient is
    not finite is rejected (its ratio counts as -inf), never accepted.
    """
    _step_size(step_size)
    value_and_grad = jax.value_and_grad(log_prob_fn)

    def init(position: Array) -> MALAState:
        return MALAState(position, *value_and_grad(position))

    def log_q(to: Array, frm: MALAState) -> Array:
        r = to - frm.position - step_size * frm.grad
        return -jnp.dot(r, r) / (4.0 * step_size)

    def step(key: Array, state: MALAState) -> tuple[MALAState, Info]:
        # One draw of d + 1 normals: d for the proposal, and one whose Φ(z) ~ U(0, 1) decides
        # acceptance (log U = log Φ(z)): a third of the random bits of a split and two draws.
        z = jax.random.normal(key, (state.position.shape[0] + 1,), state.position.dtype)
        x = _langevin_move(state.position, state.grad, step_size, z[:-1])
        proposal = MALAState(x, *value_and_grad(x))
        log_ratio = proposal.log_prob - state.log_prob + log_q(state.position, proposal) - log_q(x, state)
        finite = _finite(x) & jnp.isfinite(proposal.log_prob) & _finite(proposal.grad)
        log_ratio = jnp.where(finite & ~jnp.isnan(log_ratio), log_ratio, -jnp.inf)
        accept_prob = jnp.minimum(1.0, jnp.exp(log_ratio))
        accepted = log_ndtr(z[-1]) < log_ratio
        new = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), proposal, state)
        return new, Info(accept_prob, accepted, finite)

    return Kernel(init, step)


def annealed_langevin(
    score_fn: Callable[[Array, Array], Array], sigmas, n_steps_each: int, step_size: float | None = None,
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
          a_i = 2 (snr · |u| / |s(x, σ_i)|)², per chain and step, which makes the drift
          exactly `snr` times the noise: |a s| = snr · sqrt(2a) |u|. Their step
          x + ε s + sqrt(2ε) z is this library's with a = ε. Typical snr: 0.05-0.2.
    """
    sigmas = _validate.decreasing("sigmas", sigmas)
    n_steps_each = _validate.positive_int("n_steps_each", n_steps_each)
    if (step_size is None) == (snr is None):
        raise ValueError(f"give exactly one of step_size and snr, got step_size={step_size!r} and snr={snr!r}")
    if snr is not None:
        _validate.positive("snr", snr)
    else:
        _step_size(step_size)
    steps = None if step_size is None else step_size * sigmas**2 / sigmas[-1] ** 2

    def init(position: Array) -> AnnealedState:
        return AnnealedState(position, jnp.zeros((), jnp.int32))

    def step(key: Array, state: AnnealedState) -> tuple[AnnealedState, Info]:
        level = jnp.minimum(state.t // n_steps_each, sigmas.shape[0] - 1)
        x = state.position
        sigma = sigmas[level].astype(x.dtype)
        s = score_fn(x, sigma)
        u = jax.random.normal(key, x.shape, x.dtype)
        if snr is None:
            a = steps[level].astype(x.dtype)
        else:
            a = 2.0 * (snr * jnp.linalg.norm(u) / jnp.linalg.norm(s)) ** 2
        x = _langevin_move(x, s, a, u)
        one = jnp.ones((), x.dtype)
        return AnnealedState(x, state.t + 1), Info(one, jnp.bool_(True), _finite(x))

    return Kernel(init, step)


# --- the one loop --------------------------------------------------------------


class ChainInfo(NamedTuple):
    acceptance_rate: Array  # (n_chains,) mean acceptance probability over the steps
    n_nonfinite: Array  # (n_chains,) int32 steps whose proposal was not finite


@functools.partial(jax.jit, static_argnames=("kernel", "n_steps", "thin"))
def _run(kernel: Kernel, key: Array, x0: Array, n_steps: int, thin: int | None):
    n_chains = x0.shape[0]
    state = jax.vmap(kernel.init)(x0)

    def one_step(carry, t):
        state, acc, bad = carry
        keys = jax.random.split(jax.random.fold_in(key, t), n_chains)
        state, info = jax.vmap(kernel.step)(keys, state)
        return (state, acc + info.acceptance_prob, bad + (~info.is_finite).astype(jnp.int32)), None

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


def shard_chains(x0: Array) -> Array:
    """Place x0 (n_chains, d) with its chain axis split across all devices.

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
    return jax.device_put(x0, NamedSharding(mesh, PartitionSpec("chains", None)))


def run_chains(kernel: Kernel, key: Array, x0: Array, n_steps: int, thin: int | None = None):
    """Run `n_chains` independent chains of `kernel` for `n_steps` steps.

    Chain c at step t uses the key split(fold_in(key, t), n_chains)[c]; the same
    key and x0 give the same chains, on one device or many. Without `thin`
    nothing is stored per step, so memory does not grow with n_steps.

    Several devices: the chains are split across all of them (`shard_chains`),
    with no change to the call; the compiler partitions the vmapped kernel along
    the chain axis, and chains never communicate. Several hosts: call
    `jax.distributed.initialize()` on each, build x0 as one global array with
    `jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("chains")), local_x0)`,
    and call `run_chains` on every host with the same key.

    Args:
      kernel: a `Kernel` (e.g. `mala(log_prob_fn, step_size)`).
      key: PRNG key.
      x0: (n_chains, d) initial positions.
      n_steps: number of steps, >= 1.
      thin: keep the positions every `thin` steps (n_steps must be a multiple).

    Returns:
      (final_state, trace, info): the kernel's state with position (n_chains, d);
      trace (n_steps // thin, n_chains, d) or None; a `ChainInfo`.
    """
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a jsm.samplers.Kernel (e.g. mala(...)), got {type(kernel).__name__}")
    _validate.key("key", key)
    x0 = _validate.batch("x0", x0)
    n_steps = _validate.positive_int("n_steps", n_steps)
    if thin is not None:
        thin = _validate.positive_int("thin", thin)
        if n_steps % thin:
            raise ValueError(f"n_steps must be a multiple of thin={thin}, got n_steps={n_steps}")
    return _run(kernel, key, shard_chains(x0), n_steps, thin)


# --- step-size tuning ------------------------------------------------------------


def tune_step_size(
    make_kernel: Callable[[Array], Kernel], key: Array, x0: Array, n_steps: int,
    target_acceptance: float = 0.574, initial_step_size: float = 0.1,
) -> tuple[Array, Any]:
    """Tune a Metropolis-adjusted kernel's step size by dual averaging over all chains at once.

    Nesterov's dual averaging as in Hoffman & Gelman (2014, Algorithm 5), driven by
    the acceptance probability averaged over the chains at each step:

        H_t = (1 - 1/(t + t0)) H_{t-1} + (δ - ᾱ_t) / (t + t0),
        log a_t = μ - sqrt(t) / γ · H_t,   log ā_t = t^{-κ} log a_t + (1 - t^{-κ}) log ā_{t-1},

    with μ = log(10 a_0), γ = 0.05, t0 = 10, κ = 0.75, δ = `target_acceptance`
    (0.574 is optimal for MALA in high dimension, Roberts & Rosenthal 1998). The chains
    move while tuning, so the returned state is also warmed up. Jitted as one scan.

    Args:
      make_kernel: step_size -> Kernel, e.g. `lambda a: mala(log_prob_fn, a)`.
      key: PRNG key.
      x0: (n_chains, d) initial positions.
      n_steps: adaptation steps, >= 1.
      target_acceptance: δ in (0, 1).
      initial_step_size: a_0 > 0; a poor guess (100x off) still converges.

    Returns:
      (step_size, state): the averaged step ā and the chains' state after adaptation.
      Proposals with a non-finite log-density are rejected; their count is reported
      in a warning, and a non-finite tuned step raises `FloatingPointError`.
    """
    _validate.key("key", key)
    x0 = _validate.batch("x0", x0)
    n_steps = _validate.positive_int("n_steps", n_steps)
    if not (isinstance(target_acceptance, (int, float)) and 0.0 < target_acceptance < 1.0):
        raise ValueError(f"target_acceptance must be in (0, 1), got {target_acceptance!r}")
    _validate.positive("initial_step_size", initial_step_size)
    log_a_bar, state, n_bad = _dual_averaging(
        make_kernel, key, shard_chains(x0), n_steps, float(target_acceptance), float(initial_step_size))
    n_bad = int(n_bad)
    if n_bad:
        import warnings

        warnings.warn(f"tune_step_size: {n_bad} proposals had a non-finite log-density or gradient and were "
                      "rejected; check log_prob_fn where the chains went", RuntimeWarning, stacklevel=2)
    step = jnp.exp(log_a_bar)
    if not bool(jnp.isfinite(step)):
        raise FloatingPointError(f"tune_step_size: the tuned step size is {float(step)}; the acceptance "
                                 "probabilities were not finite")
    return step, state


@functools.partial(jax.jit, static_argnames=("make_kernel", "n_steps", "delta", "a0"))
def _dual_averaging(make_kernel, key, x0, n_steps: int, delta: float, a0: float):
    gamma, t0, kappa = 0.05, 10.0, 0.75
    mu = jnp.log(10.0 * a0)
    n_chains = x0.shape[0]
    state = jax.vmap(make_kernel(jnp.asarray(a0, x0.dtype)).init)(x0)

    def one_step(carry, t):
        state, h, log_a, log_a_bar, bad = carry
        kernel = make_kernel(jnp.exp(log_a).astype(x0.dtype))
        keys = jax.random.split(jax.random.fold_in(key, t), n_chains)
        state, info = jax.vmap(kernel.step)(keys, state)
        alpha = jnp.mean(info.acceptance_prob)
        i = t + 1.0
        h = (1 - 1 / (i + t0)) * h + (delta - alpha) / (i + t0)
        log_a = mu - jnp.sqrt(i) / gamma * h
        w = i ** (-kappa)
        log_a_bar = w * log_a + (1 - w) * log_a_bar
        bad = bad + jnp.sum(~info.is_finite, dtype=jnp.int32)
        return (state, h, log_a, log_a_bar, bad), None

    init = (state, jnp.zeros(()), jnp.log(jnp.asarray(a0)), jnp.zeros(()), jnp.zeros((), jnp.int32))
    (state, _, _, log_a_bar, bad), _ = jax.lax.scan(one_step, init, jnp.arange(n_steps, dtype=jnp.float32))
    return log_a_bar, state, bad


# --- diagnostics ---------------------------------------------------------------


def _check_trace(trace) -> Array:
    trace = _validate.float_array("trace", trace, ndim=3)
    if trace.shape[0] < 4 or trace.shape[1] < 1:
        raise ValueError(f"trace must have shape (n_draws >= 4, n_chains, d), got {trace.shape}")
    return trace


def _split_chains(trace: Array) -> Array:
    n = trace.shape[0] // 2
    return jnp.concatenate([trace[:n], trace[trace.shape[0] - n :]], axis=1)


def _between_within(trace: Array) -> tuple[Array, Array]:
    """(var+, W): the pooled variance estimate and the mean within-chain variance, (d,)."""
    n, m = trace.shape[:2]
    w = jnp.mean(jnp.var(trace, axis=0, ddof=1), axis=0)
    b_over_n = jnp.var(jnp.mean(trace, axis=0), axis=0, ddof=1) if m > 1 else 0.0
    return (n - 1) / n * w + b_over_n, w


def split_rhat(trace) -> Array:
    """Split R-hat (Gelman et al., BDA3) per coordinate, (d,); near 1 when chains agree.

    Args:
      trace: (n_draws, n_chains, d), n_chains >= 1 (each chain is split in two).
    """
    trace = _split_chains(_check_trace(trace))
    var_plus, w = _between_within(trace)
    return jnp.sqrt(var_plus / w)


def effective_sample_size(trace) -> Array:
    """Multi-chain ESS per coordinate (Geyer's initial monotone sequence, as in Stan), (d,).

    Args:
      trace: (n_draws, n_chains, d).
    """
    trace = _check_trace(trace)
    n, m, _ = trace.shape
    centred = trace - jnp.mean(trace, axis=0)
    size = 2 * n
    f = jnp.fft.rfft(centred, n=size, axis=0)
    acov = jnp.fft.irfft(f * jnp.conj(f), n=size, axis=0)[:n] / n  # (n, m, d), biased
    var_plus, w = _between_within(trace)
    rho = 1.0 - (w - jnp.mean(acov, axis=1)) / var_plus  # (n, d)
    rho = rho.at[0].set(1.0)
    n_pairs = n // 2
    pairs = rho[: 2 * n_pairs].reshape(n_pairs, 2, -1).sum(axis=1)  # (n_pairs, d)
    # Initial positive sequence, then made monotone decreasing.
    positive = jnp.cumprod(pairs > 0, axis=0).astype(bool)
    pairs = jnp.where(positive, pairs, 0.0)
    pairs = jax.lax.cummin(pairs, axis=0)
    tau = -1.0 + 2.0 * jnp.sum(pairs, axis=0)
    return n * m / jnp.maximum(tau, 1.0 / jnp.log10(n * m))
