"""Exact log-likelihoods of a score-based model, through the probability-flow ODE.

The ODE dx/dt = v(x, t) = f(x, t) - g(t)² s(x, t) / 2 (`jsm.diffusion.ode_drift`) moves
p_t into p_T, so along its solutions the instantaneous change of variables
(Chen et al. 2018) d log p_t(x_t)/dt = -div v(x_t, t) gives

    log p_{t_min}(x) = log π(x_T) + ∫_{t_min}^{T} div v(x_t, t) dt,    x_{t_min} = x,

with π the SDE's prior standing in for p_T (`prior_log_prob`: the prior mismatch
log π(x_T) - log p_T(x_T) is the only error besides the solver's). x and the integral are
solved jointly by diffrax's adaptive Tsit5.

The divergence is EXACT by default: forward jets (`jsm.forward`, value and Jacobian in one pass
for d = prod(x.shape)), so the answer is deterministic and needs no key. v is split as
div v = div f - g² div s / 2, so that the score network is seen alone: where x enters s only
through a dense first layer z = y W of width h < d (y = x, or [x, features of t]), the jet
starts at z and pushes h directions instead of the d columns of I (the first-layer seed), and the last
layer's (d x d) Jacobian is never built. A network that scales x before its first layer or
adds a skip in x (experiments/mnist.py's preconditioned `NoiseConditionalScore`: c_in(t) x,
and -x / (σ² + σ_d²)) keeps the d columns of I; the answer is the same either way.
score_sde (and libraries copied from it) estimate it with ONE Hutchinson probe u, u^T (∂v/∂x) u,
drawn once per path: unbiased for the integral, but log p is then a random variable whose
spread, of order sqrt(2 Σ_{i≠j} J_ij²) integrated over t, shows up as bits/dim that change
from run to run. `trace="hutchinson"` keeps that estimator for comparison.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jsm import _validate
from jsm.diffusion import _each, _ode_options, _prepare, _score, check_solved, ode_drift, solve_ode
from jsm.forward import divergence_batch
from jsm.scores import value_and_hutchinson
from jsm.sde import SDE

__all__ = ["LIKELIHOOD_T_MIN", "TRACES", "bits_per_dim", "divergence_fn", "flow_to_prior", "log_prob"]

Array = jax.Array
TRACES = ("exact", "hutchinson")
LIKELIHOOD_T_MIN = 1e-5  # Song et al.'s ε for likelihoods: p_{t_min} is p_0 to O(σ_{t_min}²)


def divergence_fn(vector_fn, trace: str = "exact", probes: Array | None = None):
    """x -> (v(x), div v(x)) for ONE example x of any shape, d = prod(x.shape).

    "exact": tr(∂v/∂x) from one first-order forward jet of v (value and Jacobian together,
    `jsm.forward.divergence_batch`, which flattens x). "hutchinson": mean_j u_j^T (∂v/∂x) u_j
    over the rows of `probes` (m, d), one JVP each (`jsm.scores.value_and_hutchinson`).
    """
    _validate.choice("trace", trace, TRACES)
    vector_fn = _validate.same_shape("vector_fn", vector_fn)

    def both(x: Array) -> tuple[Array, Array]:
        if trace == "exact":
            v, div = divergence_batch(vector_fn)(x[None])
            return v[0], div[0]
        return value_and_hutchinson(vector_fn, x, probes.reshape(-1, *x.shape))

    return both


def _field_and_divergence(s, sde: SDE, t, trace: str, probes: Array | None):
    """x -> (v(x, t), div v(x, t)) for the probability-flow field v = f - g² s / 2 (`ode_drift`).

    "exact": div v = div f - g(t)² div s / 2, each term by its own jet, so that the score network
    is seen alone: where x enters s only through a first dense layer narrower than x (after a
    concatenate with t's features at most), its divergence takes the first-layer seed
    (`jsm.forward`); the drift f, linear in x, costs one contraction shared by the batch. x used
    anywhere else in s (a scaling by c_in(t), a skip -x/σ²) keeps the d rows of I, the same answer.
    """
    if trace != "exact":
        return divergence_fn(lambda z: ode_drift(s, sde, z, t), trace, probes)
    drift = divergence_fn(lambda z: sde.drift(z, t))
    score = divergence_fn(lambda z: s(z, t))
    scale = 0.5 * sde.diffusion(t) ** 2

    def both(x: Array) -> tuple[Array, Array]:
        (f, div_f), (score_x, div_s) = drift(x), score(x)
        return f - scale * score_x, div_f - scale * div_s

    return both


@functools.partial(jax.jit, static_argnames=("score_fn", "trace", "max_steps"))
def _flow_with_divergence(score_fn, sde, xs, y, w, args, probes, t_min, rtol, atol, trace, max_steps):
    def one(x, label, u):
        s = _score(score_fn, label, w, args)
        field = lambda t, state: _field_and_divergence(s, sde, t, trace, u)(state[0])
        (x_T, integral), info = solve_ode(field, (x, jnp.zeros((), x.dtype)), t_min, sde.T,
                                          rtol=rtol, atol=atol, max_steps=max_steps)
        return x_T, integral, info

    return _each(one, xs, y, probes)


def flow_to_prior(
    score_fn, sde: SDE, xs: Array, *, trace: str = "exact", key: Array | None = None, n_probes: int = 1,
    t_min: float = LIKELIHOOD_T_MIN, rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096, y=None,
    guidance=None, args: tuple = (), info: bool = False,
):
    """(x_T, ∫_{t_min}^T div v(x_t, t) dt) for each example: the two terms of `log_prob`.

    log p_{t_min}(x) = log π(x_T) + the integral, for any density π standing in for p_T.
    Arguments as in `log_prob`; a failed solve gives NaN for both terms of its example.

    Returns:
      x_T (n, *shape) and the integrated divergence (n,); with `info`, also the `SolveInfo`.
    """
    xs, y, w, args = _prepare(score_fn, sde, "xs", xs, y, guidance, args)
    _validate.choice("trace", trace, TRACES)
    max_steps = _ode_options(sde, t_min, rtol, atol, max_steps)
    probes = None
    if trace == "hutchinson":
        if key is None:
            raise ValueError('trace="hutchinson" needs a PRNG key (key=jax.random.key(seed)); '
                             'trace="exact" needs none')
        _validate.key("key", key)
        n_probes = _validate.positive_int("n_probes", n_probes)
        d = math.prod(xs.shape[1:])
        probes = jax.random.rademacher(key, (xs.shape[0], n_probes, d), xs.dtype)
    dt = xs.dtype
    x_T, integral, stats = _flow_with_divergence(
        score_fn, sde, xs, y, w, args, probes, jnp.asarray(t_min, dt), jnp.asarray(rtol, dt),
        jnp.asarray(atol, dt), trace, max_steps)
    if info:
        return x_T, integral, stats
    check_solved("log_prob", stats, max_steps, rtol, atol)
    return x_T, integral


def log_prob(
    score_fn, sde: SDE, xs: Array, *, trace: str = "exact", key: Array | None = None, n_probes: int = 1,
    t_min: float = LIKELIHOOD_T_MIN, rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096,
    prior_log_prob=None, y=None, guidance=None, args: tuple = (), info: bool = False,
):
    """log p_{t_min}(x) of the model whose score is s, by the probability-flow ODE, for each x in xs.

        log p_{t_min}(x) = log π(x_T) + ∫_{t_min}^{T} div v(x_t, t) dt,   v = f - g² s / 2.

    With the exact score, the result is log p_{t_min}, which differs from log p_0 by
    O(σ_{t_min}²) (1e-6 relative for the VP SDE at t_min = 1e-5), plus the prior mismatch
    log π(x_T) - log p_T(x_T), plus the solver's error (of the order of rtol · |log p| + atol
    per unit time; ~1e-4 at the defaults in float32).

    Parameters are data: `log_prob(score_fn, sde, xs, args=(params,))` with
    score_fn(x, t, params) compiles once, and every later call with new parameters of the
    same shapes (an evaluation every N training steps) reuses it; a closure over params
    (`lambda x, t: net(params, x, t)`) is a new function at each call and compiles the whole
    solve again (see `jsm.diffusion`).

    Args:
      score_fn: s(x, t, *args) (or s(x, t, y, *args) with `y`), one example of any shape.
      sde: the forward SDE.
      xs: (n, *shape) points, finite.
      trace: "exact" (the forward jet, with the first-layer seed where the network allows it,
        see the module docstring; deterministic; `key` is ignored) or "hutchinson"
        (`n_probes` Rademacher probes per example, fixed along its path; needs `key`).
      key: PRNG key for the Hutchinson probes.
      n_probes: Hutchinson probes per example, >= 1.
      t_min: where the ODE starts, in (0, 1); 1e-5 as in Song et al.
      rtol, atol: the solver's tolerances.
      max_steps: the most solver steps per example. An example whose solve fails (steps ran
        out, or its state became non-finite) gets NaN, inside `jit` too; called outside
        `jit` without `info`, the call raises a RuntimeError with the remedy.
      prior_log_prob: log π for one example (default `sde.prior_log_prob`).
      y: (n,) integer class labels for a conditional s(x, t, y, *args): then log p(x | y).
      guidance: w, classifier-free guidance of the conditional score (data; needs `y`).
      args: passed on to score_fn (network parameters): data, never recompiled.
      info: also return the solver's `jsm.diffusion.SolveInfo` per example (and do not raise).

    Returns:
      (n,) log-densities, in nats; with `info`, (log-densities, SolveInfo).
    """
    out = flow_to_prior(score_fn, sde, xs, trace=trace, key=key, n_probes=n_probes, t_min=t_min, rtol=rtol,
                        atol=atol, max_steps=max_steps, y=y, guidance=guidance, args=args, info=info)
    prior = sde.prior_log_prob if prior_log_prob is None else prior_log_prob
    log_p = jax.vmap(prior)(out[0]) + out[1]
    return (log_p, out[2]) if info else log_p


def bits_per_dim(log_p, d: int, *, bin_width: float | None = None) -> Array:
    """Negative log-likelihood in bits per dimension.

    Continuous data:  bpd = -log p(x) / (d log 2).
    Discrete data on a grid of spacing Δ = `bin_width` (e.g. 8-bit images scaled to [0, 1]:
    Δ = 1/256; to [-1, 1]: Δ = 2/256), dequantised by uniform noise over each value's bin,
    the probability of the bin is ≈ p(x) Δ^d, so

        bpd = -(log p(x) + d log Δ) / (d log 2) = -log p(x) / (d log 2) - log2 Δ.

    The offset -log2 Δ (+8 bits for [0, 1] images) is what makes a density on rescaled data
    comparable with published bits/dim; leaving it out, or using the wrong Δ for the
    scaling, is the usual cause of puzzling numbers.

    Args:
      log_p: log-densities in nats, any shape (e.g. (n,) from `log_prob`).
      d: the number of dimensions of one example, prod(shape).
      bin_width: Δ > 0 for dequantised discrete data; None for continuous data.

    Returns:
      bits/dim, the shape of log_p.
    """
    d = _validate.positive_int("d", d)
    log_p = jnp.asarray(log_p, dtype=jnp.result_type(log_p, float))
    offset = 0.0
    if bin_width is not None:
        _validate.positive("bin_width", bin_width)
        offset = d * jnp.log(jnp.asarray(bin_width, log_p.dtype))
    return -(log_p + offset) / (d * math.log(2.0))
