"""Diffusion models: the score of p_t learned for all t, then the SDE run backwards.

For a forward SDE dx = f(x, t) dt + g(t) dW (`jsm.sde`) with marginals p_t, the
reverse-time SDE and the probability-flow ODE (Anderson 1982; Song et al. 2021)

    dx = [f(x, t) - g(t)² ∇log p_t(x)] dt + g(t) dW̄      (t from T down to 0),
    dx/dt = f(x, t) - g(t)² ∇log p_t(x) / 2              (either way),

carry p_T back to p_0: the first with noise (`reverse_sde`), the second deterministically,
as a bijection (`probability_flow` from noise to data, `encode` from data to noise;
`jsm.likelihood` integrates its divergence for exact log-densities). Both need only the
score, learned by `jsm.objectives.dsm_sde` (denoising score matching at a random time t).

Score functions act on ONE example x of any shape: s(x, t, *args) -> x.shape, or
s(x, t, y, *args) with a class label y. Batches are (n, *shape).

Parameters are data. `args` (network parameters, any pytrees) and the guidance weight w
(`guidance=`) are traced, so a second call with new values of the same shapes compiles
nothing; the score function itself is static and compared by identity. Pass parameters
through `args`, not through a closure:

    probability_flow(score_fn, sde, x_T, args=(params,))             # score_fn(x, t, params)
    probability_flow(lambda x, t: score_fn(x, t, params), sde, x_T)  # a NEW function: compiles again

Measured on a 2-core CPU (`nets.NoiseConditionalScore(2, (64, 64))`, 64 examples, default
tolerances; the machine was shared, so read the ratios): `probability_flow` took 6.6, 5.5, 6.2 s
for three calls with a closure over new parameters (each compiles the whole diffrax solve
again), and 5.0, 0.25, 0.24 s with the parameters in `args`; `likelihood.log_prob` 7.0, 9.2,
7.7 s against 8.3, 0.40, 0.38 s.

A solve that fails (max_steps ran out, or the state became non-finite) returns NaN for
that example, inside `jax.jit` or not, never a plausible number; called eagerly, the
samplers also raise with the remedy, unless `info=True` asks for the solver statistics
(`SolveInfo`) instead.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jsm import _compat, _validate
from jsm.samplers import CHAINS, snr_langevin_move
from jsm.sde import SDE, check_sde, check_t_min

__all__ = [
    "FLOW_METHODS", "KARRAS_RHO", "NULL_LABEL", "SAMPLING_T_MIN", "SolveInfo", "check_solved", "encode", "guided",
    "ode_drift", "probability_flow", "reverse_drift", "reverse_sde", "solve_ode", "time_grid", "tweedie_denoise",
]

Array = jax.Array
TimeScoreFn = Callable[..., Array]

NULL_LABEL = -1  # the "no label" class of a conditional score s(x, t, y), for classifier-free guidance
SAMPLING_T_MIN = 1e-3  # where sampling stops: Song et al.'s ε for the SDE and ODE samplers
TSIT5_STAGES = 6  # new evaluations of the vector field per Tsit5 step (7 stages, the first shared with the last)


class SolveInfo(NamedTuple):
    """What the ODE solver did, per example (each field (n,))."""

    success: Array  # bool: reached the end time with a finite state (else that example is NaN)
    num_steps: Array  # int: steps tried, accepted and rejected
    num_accepted_steps: Array  # int
    num_fevals: Array  # int: evaluations of the vector field (of the score, or of its jet)


# --- boundary checks and the score of one example ------------------------------------


def _labels(y, n: int) -> Array | None:
    if y is None:
        return None
    y = jnp.asarray(y)
    if y.shape != (n,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must be integer labels of shape ({n},), one per example, got {y.dtype} {y.shape}")
    return y


def _guidance(guidance, y):
    if guidance is None:
        return None
    if y is None:
        raise ValueError("guidance needs class labels y (classifier-free guidance conditions on y), got y=None")
    if _validate.is_concrete(guidance) and not np.all(np.isfinite(np.asarray(guidance, dtype=float))):
        raise ValueError(f"guidance must be a finite weight w, got {guidance!r}")
    return jnp.asarray(guidance)


def _check_score(score_fn, x: Array, y, args: tuple) -> None:
    """score_fn must map one example (and t, y, *args) to x's shape: checked by tracing, before compiling."""
    t = jax.ShapeDtypeStruct((), x.dtype)
    one = jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    label = () if y is None else (jax.ShapeDtypeStruct((), y.dtype),)
    out = jax.eval_shape(score_fn, one, t, *label, *args)
    if getattr(out, "shape", None) != one.shape:
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"score_fn must map one example of shape {one.shape} (and t{', y' if label else ''}, "
                         f"*args) to the same shape, got {got}")


def _prepare(score_fn, sde, name: str, x, y, guidance, args) -> tuple:
    """The shared boundary of the samplers and the likelihood: (x, y, w, args), checked."""
    check_sde(sde)
    x = _validate.examples(name, x)
    y = _labels(y, x.shape[0])
    w = _guidance(guidance, y)
    args = tuple(args)
    _check_score(score_fn, x, y, args)
    return x, y, w, args


def _score(score_fn, y, w, args: tuple) -> Callable[[Array, Array], Array]:
    """s(x, t) for ONE example: s(x, t, *args), or s(x, t, y, *args) with its label, guided by w if given."""
    if y is None:
        return lambda x, t: score_fn(x, t, *args)
    if w is None:
        return lambda x, t: score_fn(x, t, y, *args)
    return lambda x, t: guided(score_fn, w)(x, t, y, *args)


def _warn_nonfinite(where: str, x) -> None:
    if _validate.is_concrete(x):
        bad = int(np.sum(~np.all(np.isfinite(np.asarray(x).reshape(x.shape[0], -1)), axis=-1)))
        if bad:
            warnings.warn(f"{where}: {bad} of {x.shape[0]} examples are not finite; check the score "
                          "function near t = T (large inputs) and t = t_min (large outputs)", RuntimeWarning,
                          stacklevel=3)


# --- the drifts of the reverse-time SDE and the probability-flow ODE ----------------------


def reverse_drift(score_fn, sde: SDE, x: Array, t) -> Array:
    """f(x, t) - g(t)² s(x, t): the drift of the reverse-time SDE, in forward time."""
    return sde.drift(x, t) - sde.diffusion(t) ** 2 * score_fn(x, t)


def ode_drift(score_fn, sde: SDE, x: Array, t) -> Array:
    """v(x, t) = f(x, t) - g(t)² s(x, t) / 2: the probability-flow ODE dx/dt = v."""
    return sde.drift(x, t) - 0.5 * sde.diffusion(t) ** 2 * score_fn(x, t)


def tweedie_denoise(score_fn, sde: SDE, x: Array, t) -> Array:
    """E[x_0 | x_t = x] = (x + σ_t² ∇log p_t(x)) / α_t (Tweedie's formula), with s for ∇log p_t."""
    alpha, sigma = sde.marginal(t)
    return (x + sigma**2 * score_fn(x, t)) / alpha


# --- sampling: the reverse-time SDE --------------------------------------------------


def reverse_sde(
    score_fn, sde: SDE, key: Array, x_T: Array, n_steps: int, *, corrector_steps: int = 0, snr: float = 0.16,
    denoise: bool = True, t_min: float = SAMPLING_T_MIN, y=None, guidance=None, args: tuple = (),
) -> Array:
    """Samples of p_0 from x_T ~ π by the reverse-time SDE, predictor-corrector (Song et al. 2021).

    On the grid t_i = T + i (t_min - T) / n_steps, i = 0..n_steps, with Δ = (T - t_min)/n_steps:

      predictor (Euler-Maruyama, backwards): x <- x - [f(x, t_i) - g(t_i)² s(x, t_i)] Δ + g(t_i) sqrt(Δ) u;
      corrector (`corrector_steps` Langevin steps at t_{i+1}, jsm's convention, see
                 `jsm.samplers`): x <- x + a s(x, t) + sqrt(2a) u with a = 2 (snr |u| / |s|)²,
                 the norms |·| over all entries AVERAGED OVER THE BATCH, as in score_sde: one a
                 per step, whose drift is `snr` times the noise on average
                 (`jsm.samplers.snr_langevin_move`, the rule of `annealed_langevin(snr=)` too).
                 Per-example norms make a ∝ 1/|s_i|² heavy-tailed, since |s| -> 0 at a mode's
                 centre: the samples' covariance came out 2-4x too large on a 2-D mixture and 30%
                 off on a 10-D Gaussian, where the averaged rule is right;
      denoise:   x_0 = (x + σ² s(x, t_min)) / α at t_min (Tweedie), which removes the last
                 step's noise of size g sqrt(Δ), far above σ_{t_min}.

    The sampler stops at t_min = 1e-3 (Song et al.'s ε), not 0, where a learned score of
    size 1/σ_t is unreliable; the denoising step then estimates x_0 from x_{t_min}.
    Step i draws its noise from fold_in(key, i) for the whole batch, so the chains are
    reproducible for a given key and batch. A batch sharded over devices stays sharded.

    Args:
      score_fn: s(x, t, *args) (or s(x, t, y, *args) with `y`), one example of any shape.
      sde: the forward SDE.
      key: PRNG key.
      x_T: (n, *shape) draws of the prior, e.g. `sde.prior_sample(key, (n, d))`.
      n_steps: predictor steps, >= 1.
      corrector_steps: Langevin steps after each predictor step, >= 0.
      snr: the corrector's signal-to-noise ratio, > 0 (Song et al.: 0.16 for images); data.
      denoise: end with Tweedie's denoising step.
      t_min: the end time, in (0, 1).
      y: (n,) integer class labels, one per example, for a conditional s(x, t, y, *args).
      guidance: w, classifier-free guidance (`guided`) of the conditional score, data: a new w
        compiles nothing. Needs `y`.
      args: passed on to score_fn (network parameters, any pytrees): data, never recompiled.

    Returns:
      (n, *shape) samples. Non-finite examples are counted in a RuntimeWarning.
    """
    x_T, y, w, args = _prepare(score_fn, sde, "x_T", x_T, y, guidance, args)
    _validate.key("key", key)
    n_steps = _validate.positive_int("n_steps", n_steps)
    corrector_steps = _validate.positive_int("corrector_steps", corrector_steps, minimum=0)
    _validate.positive("snr", snr)
    check_t_min(t_min, sde.T)
    out = _reverse_sde(score_fn, sde, key, x_T, y, w, args, n_steps, corrector_steps, bool(denoise),
                       jnp.asarray(snr, x_T.dtype), jnp.asarray(t_min, x_T.dtype))
    _warn_nonfinite("reverse_sde", out)
    return out


def _each(fn, xs: Array, ys, *batched):
    """fn(x, label, *rest) vmapped over the batch (labels None or (n,)), named as `run_chains`' chains axis."""
    return jax.vmap(fn, axis_name=CHAINS)(xs, ys, *batched)


@functools.partial(jax.jit, static_argnames=("score_fn", "n_steps", "corrector_steps", "denoise"))
def _reverse_sde(score_fn, sde, key, x_T, y, w, args, n_steps, corrector_steps, denoise, snr, t_min):
    ts = jnp.linspace(jnp.asarray(sde.T, x_T.dtype), t_min, n_steps + 1)
    delta = (sde.T - t_min) / n_steps

    def predictor(x, label, u, t):  # Euler-Maruyama backwards in time, from t to t - Δ
        drift = reverse_drift(_score(score_fn, label, w, args), sde, x, t)
        return x - drift * delta + sde.diffusion(t) * jnp.sqrt(delta) * u

    def corrector(x, label, u, t):  # the batch is the chains over which snr's norms are averaged
        return snr_langevin_move(x, _score(score_fn, label, w, args)(x, t), u, snr)

    def step(x, i):
        k_pred, k_corr = jax.random.split(jax.random.fold_in(key, i))
        u = jax.random.normal(k_pred, x.shape, x.dtype)
        x = _each(lambda xi, label, ui: predictor(xi, label, ui, ts[i]), x, y, u)
        for j in range(corrector_steps):
            u = jax.random.normal(jax.random.fold_in(k_corr, j), x.shape, x.dtype)
            x = _each(lambda xi, label, ui: corrector(xi, label, ui, ts[i + 1]), x, y, u)
        return x, None

    x, _ = jax.lax.scan(step, x_T, jnp.arange(n_steps))
    if denoise:
        x = _each(lambda xi, label: tweedie_denoise(_score(score_fn, label, w, args), sde, xi, t_min), x, y)
    return x


# --- sampling and encoding: the probability-flow ODE ------------------------------------


def _finish(diffrax, sol, evaluations_per_step: int, first: int) -> tuple:
    """(y1, SolveInfo) of a diffrax solution saved at t1: NaN where the solve failed or went non-finite."""
    y1 = jax.tree.map(lambda a: a[0], sol.ys)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(y1)]))
    success = (sol.result == diffrax.RESULTS.successful) & finite
    y1 = jax.tree.map(lambda a: jnp.where(success, a, jnp.nan), y1)
    n = sol.stats["num_steps"]
    return y1, SolveInfo(success, n, sol.stats["num_accepted_steps"], evaluations_per_step * n + first)


def solve_ode(vector_field, y0, t0, t1, *, rtol, atol, max_steps: int) -> tuple:
    """y(t1) for dy/dt = vector_field(t, y) from y(t0) = y0 (any pytree), either direction.

    diffrax's Tsit5 (5th order, embedded 4th-order error estimate) with a PID step-size
    controller, the first step chosen by diffrax. A failed solve (max_steps ran out, or a
    non-finite state) does not raise inside `jit`: its y1 is NaN, and `SolveInfo.success`
    says so, for the caller to report.

    Returns:
      (y1, SolveInfo) for this one solve (fields of shape ()).
    """
    import diffrax  # here: `import jsm` does not load diffrax until a solve needs it

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), diffrax.Tsit5(), t0, t1, None, y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps, throw=False,
    )
    return _finish(diffrax, sol, TSIT5_STAGES, 1)


def check_solved(where: str, info: SolveInfo, max_steps: int, rtol, atol) -> None:
    """Raise a RuntimeError with the remedy when a concrete solve failed, naming how (steps or non-finite)."""
    if not _validate.is_concrete(info.success):
        return
    failed = ~np.asarray(info.success)
    if not failed.any():
        return
    out_of_steps = int(np.sum(failed & (np.asarray(info.num_steps) >= max_steps)))
    nonfinite = int(failed.sum()) - out_of_steps
    n = np.size(failed)
    msg = [f"{where}: {int(failed.sum())} of {n} ODE solves failed (their results are NaN)"]
    if out_of_steps:
        msg.append(f"{out_of_steps} used all max_steps={max_steps} steps (rtol={float(rtol)}, atol={float(atol)}) "
                   "before reaching the end time: raise max_steps or loosen rtol/atol")
    if nonfinite:
        msg.append(f"{nonfinite} reached a non-finite state")
    msg.append("check the score function too (a score that blows up near t_min makes the ODE stiff); "
               "info=True returns the solver statistics instead of raising")
    raise RuntimeError("; ".join(msg))


def _ode_options(sde, t_min, rtol, atol, max_steps) -> int:
    check_t_min(t_min, sde.T)
    _validate.positive("rtol", rtol)
    _validate.positive("atol", atol)
    return _validate.positive_int("max_steps", max_steps)


def _heun(vector_field, y0, ts: Array) -> tuple:
    """Heun's method (2nd order, two evaluations a step) on the given grid ts, through diffrax."""
    import diffrax

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), diffrax.Heun(), ts[0], ts[-1], None, y0,
        stepsize_controller=diffrax.StepTo(ts=ts), saveat=diffrax.SaveAt(t1=True), max_steps=ts.shape[0] - 1,
        throw=False,
    )
    return _finish(diffrax, sol, 2, 0)


def _dpm_solver_pp(denoise_fn, sde: SDE, x: Array, ts: Array, second_order: bool) -> tuple:
    """DPM-Solver++ (Lu et al. 2022) on the grid ts: 2M (multistep) or first order (= DDIM, η = 0).

    With λ_t = log(α_t/σ_t), h_i = λ_{t_{i+1}} - λ_{t_i} and D_i the denoiser x̂_0(x_{t_i}, t_i),

        x_{t_{i+1}} = (σ_{t_{i+1}}/σ_{t_i}) x_{t_i} + α_{t_{i+1}} (1 - e^{-h_i}) D,

    exact for a denoiser constant in t; D = D_i (first order), or 2M's extrapolation
    D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h_i, from the second step on. One
    evaluation of the score per step.
    """
    alphas, sigmas = sde.marginal(ts)
    lam = jnp.log(alphas) - jnp.log(sigmas)

    def step(carry, i):
        x, d_prev = carry
        d = denoise_fn(x, ts[i])
        h = lam[i + 1] - lam[i]
        if second_order:
            r = jnp.where(i == 0, 1.0, (lam[i] - lam[jnp.maximum(i - 1, 0)]) / h)
            d_used = jnp.where(i == 0, d, (1.0 + 0.5 / r) * d - (0.5 / r) * d_prev)
        else:
            d_used = d
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * jnp.expm1(-h) * d_used
        return (x, d), None

    n = ts.shape[0] - 1
    (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), jnp.arange(n))
    success = jnp.all(jnp.isfinite(x))
    steps = jnp.asarray(n, jnp.int32)
    return jnp.where(success, x, jnp.nan), SolveInfo(success, steps, steps, steps)


FLOW_METHODS = ("adaptive", "heun", "ddim", "dpmpp_2m")
KARRAS_RHO = 7.0  # Karras et al. (2022)'s ρ: the grid's steps concentrate at low noise


def time_grid(sde: SDE, n_steps: int, t_min, *, spacing: str = "log_snr", rho: float = KARRAS_RHO) -> Array:
    """n_steps + 1 times from T down to t_min, for the fixed-step probability-flow solvers.

    "log_snr":  uniform in λ(t) = log(α_t²/σ_t²) (DPM-Solver's grid), t_i = λ⁻¹(λ_i).
    "karras":   uniform in ς^{1/ρ}, ς = σ_t/α_t the noise-to-signal ratio, ρ = 7 (Karras et
                al. 2022, EDM's grid): ς_i = (ς_max^{1/ρ} + i/N (ς_min^{1/ρ} - ς_max^{1/ρ}))^ρ.
    The end points are T and t_min exactly.
    """
    dt = jnp.result_type(float)
    t_min = jnp.asarray(t_min, dt)
    lam_T, lam_min = sde.log_snr(jnp.asarray(sde.T, dt)), sde.log_snr(t_min)
    u = jnp.linspace(0.0, 1.0, n_steps + 1, dtype=dt)
    if spacing == "log_snr":
        lam = lam_T + u * (lam_min - lam_T)
    else:
        lo, hi = jnp.exp(-lam_min / (2 * rho)), jnp.exp(-lam_T / (2 * rho))  # ς^{1/ρ} at t_min and at T
        lam = -2.0 * rho * jnp.log(hi + u * (lo - hi))
    ts = sde.t_of_log_snr(lam)
    return ts.at[0].set(sde.T).at[-1].set(t_min)


@functools.partial(jax.jit, static_argnames=("score_fn", "max_steps", "method", "denoise"))
def _flow(score_fn, sde, xs, y, w, args, ts, rtol, atol, max_steps, method="adaptive", denoise=False):
    def one(x, label):
        s = _score(score_fn, label, w, args)
        field = lambda t, z: ode_drift(s, sde, z, t)
        if method == "adaptive":
            x1, info = solve_ode(field, x, ts[0], ts[-1], rtol=rtol, atol=atol, max_steps=max_steps)
        elif method == "heun":
            x1, info = _heun(field, x, ts)
        else:
            x1, info = _dpm_solver_pp(lambda z, t: tweedie_denoise(s, sde, z, t), sde, x, ts, method == "dpmpp_2m")
        return (tweedie_denoise(s, sde, x1, ts[-1]) if denoise else x1), info

    return _each(one, xs, y)


def _fixed_steps(method: str, n_steps) -> int | None:
    _validate.choice("method", method, FLOW_METHODS)
    if method == "adaptive":
        if n_steps is not None:
            raise ValueError(f'n_steps is for the fixed-step methods; method="adaptive" chooses its own steps '
                             f"(set rtol/atol), got n_steps={n_steps!r}")
        return None
    if n_steps is None:
        raise ValueError(f"method={method!r} needs n_steps, the number of steps from T to t_min")
    return _validate.positive_int("n_steps", n_steps)


def _run_flow(where, score_fn, sde, x, t0, t1, *, rtol, atol, max_steps, denoise, y, guidance, args, info,
              method="adaptive", n_steps=None):
    x, y, w, args = _prepare(score_fn, sde, "x_T" if where == "probability_flow" else "x0", x, y, guidance, args)
    max_steps = _ode_options(sde, min(t0, t1), rtol, atol, max_steps)
    n_steps = _fixed_steps(method, n_steps)
    dt = x.dtype
    if n_steps is None:
        ts = jnp.asarray([t0, t1], dt)
    else:
        ts = time_grid(sde, n_steps, t1, spacing="karras" if method == "heun" else "log_snr").astype(dt)
    out, stats = _flow(score_fn, sde, x, y, w, args, ts, jnp.asarray(rtol, dt), jnp.asarray(atol, dt), max_steps,
                       method, denoise)
    if info:
        return out, stats
    check_solved(where, stats, max_steps, rtol, atol)
    _warn_nonfinite(where, out)
    return out


def probability_flow(
    score_fn, sde: SDE, x_T: Array, *, method: str = "adaptive", n_steps: int | None = None,
    t_min: float = SAMPLING_T_MIN, rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096,
    denoise: bool = False, y=None, guidance=None, args: tuple = (), info: bool = False,
):
    """Samples of p_{t_min} from x_T ~ π: the probability-flow ODE dx/dt = f - g² s / 2 from T to t_min.

    Deterministic: a bijection x_T <-> x_{t_min} that `encode` inverts. With `denoise`,
    Tweedie's step (x + σ² s) / α at t_min follows (one more score evaluation; no longer
    invertible). A batch sharded over devices stays sharded. The solvers (`method`):

      "adaptive"  diffrax's Tsit5 with error control (`solve_ode`), per example: the
                  reference, ~6 score evaluations a step, as many steps as rtol/atol need.
      "heun"      Heun's method (2nd order, 2 evaluations a step) on Karras et al.'s grid
                  (`time_grid(spacing="karras")`), through diffrax: EDM's sampler.
      "ddim"      DDIM (η = 0, Song et al. 2021), the exact solver for a denoiser constant
                  between steps: 1st order, 1 evaluation a step, on the log-SNR grid.
      "dpmpp_2m"  DPM-Solver++(2M) (Lu et al. 2022): DDIM's step with a multistep 2nd-order
                  denoiser, 1 evaluation a step, on the log-SNR grid.

    The fixed-step methods need `n_steps` (their cost is n_steps or 2 n_steps evaluations);
    their orders are checked on the closed-form flow of Gaussian data in the tests.

    Args:
      score_fn: s(x, t, *args) (or s(x, t, y, *args) with `y`), one example of any shape.
      sde: the forward SDE.
      x_T: (n, *shape) draws of the prior.
      method: one of `FLOW_METHODS`, above.
      n_steps: steps from T to t_min, for the fixed-step methods (None for "adaptive").
      t_min: the end time, in (0, 1).
      rtol, atol: the adaptive step-size controller's relative and absolute tolerances.
      max_steps: the most adaptive steps per example. An example whose solve fails (steps ran
        out, or its state became non-finite) is NaN, whatever the method; called outside
        `jit` without `info`, the call raises a RuntimeError with the remedy.
      denoise: end with Tweedie's denoising step.
      y: (n,) integer class labels for a conditional s(x, t, y, *args).
      guidance: w, classifier-free guidance of the conditional score (data; needs `y`).
      args: passed on to score_fn (network parameters): data, never recompiled.
      info: also return the solver's `SolveInfo` per example (and do not raise on failures).

    Returns:
      (n, *shape) samples; with `info`, (samples, SolveInfo).
    """
    return _run_flow("probability_flow", score_fn, sde, x_T, sde.T, t_min, rtol=rtol, atol=atol,
                     max_steps=max_steps, denoise=bool(denoise), y=y, guidance=guidance, args=args, info=info,
                     method=method, n_steps=n_steps)


def encode(
    score_fn, sde: SDE, x0: Array, *, t_min: float = SAMPLING_T_MIN, rtol: float = 1e-5, atol: float = 1e-5,
    max_steps: int = 4096, y=None, guidance=None, args: tuple = (), info: bool = False,
):
    """The latent x_T of data x0 (n, *shape): the probability-flow ODE forward, t_min to T.

    The inverse of `probability_flow` (without `denoise`), to the solver's tolerance: an
    invertible encoding, as in a normalising flow. Adaptive steps; arguments and returns as
    in `probability_flow`.
    """
    return _run_flow("encode", score_fn, sde, x0, t_min, sde.T, rtol=rtol, atol=atol, max_steps=max_steps,
                     denoise=False, y=y, guidance=guidance, args=args, info=info)


# --- conditioning: classifier-free guidance ------------------------------------------------


def guided(score_fn, w) -> Callable[..., Array]:
    """Classifier-free guidance (Ho & Salimans 2022): s_w(x, t, y) = (1 + w) s(x, t, y) - w s(x, t, ∅).

    s(x, t, ∅) = s(x, t, NULL_LABEL) is the unconditional score of the same network, trained
    with labels dropped to NULL_LABEL = -1. Since ∇log p_t(x|y) - ∇log p_t(x) = ∇log p_t(y|x),
    s_w = s(·|y) + w ∇log p_t(y|x): the score of p_t(x|y) p_t(y|x)^w, an implicit classifier's
    gradient amplified by w. w = 0 is the conditional score, w = -1 the unconditional one.

    Further arguments are passed on: s_w(x, t, y, *args) = (1 + w) s(x, t, y, *args) - ....
    w is closed over, so each new w is a new function and recompiles a sampler; to sweep w,
    give the samplers `guidance=w` instead (data: compiles once).

    Args:
      score_fn: s(x, t, y, *args), one example, an integer label y (NULL_LABEL for none).
      w: the guidance strength (finite; typically 0 to ~5).
    """
    if _validate.is_concrete(w) and not np.all(np.isfinite(np.asarray(w, dtype=float))):
        raise ValueError(f"w must be finite, got {w!r}")

    def score(x: Array, t, y, *args) -> Array:
        return (1.0 + w) * score_fn(x, t, y, *args) - w * score_fn(x, t, NULL_LABEL, *args)

    return score


__getattr__ = _compat.moved(__name__, {
    "dsm_sde": "jsm.objectives.dsm_sde",
    "dsm_sde_per_example": "jsm.objectives.dsm_sde_per_example",
    "training_times": "jsm.objectives.training_times",
    "WEIGHTINGS": "jsm.objectives.WEIGHTINGS",
    "VARIANCE_REDUCTIONS": "jsm.objectives.VARIANCE_REDUCTIONS",
})
