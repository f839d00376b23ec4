"""Diffusion models: the score of p_t learned for all t, then the SDE run backwards.

For a forward SDE dx = f(x, t) dt + g(t) dW (`jsm.sde`) with marginals p_t, the
reverse-time SDE and the probability-flow ODE (Anderson 1982; Song et al. 2021)

    dx = [f(x, t) - g(t)² ∇log p_t(x)] dt + g(t) dW̄      (t from T down to 0),
    dx/dt = f(x, t) - g(t)² ∇log p_t(x) / 2              (either way),

carry p_T back to p_0: the first with noise (`reverse_sde`), the second deterministically,
as a bijection (`probability_flow` from noise to data, `encode` from data to noise;
`jsm.likelihood` integrates its divergence for exact log-densities). Both need only the
score, learned by `dsm_sde`: denoising score matching at a random time t,

    J(θ) = E_{t ~ U(t_min, 1)} λ(t) E_{x_0, z} 1/2 |s_θ(α_t x_0 + σ_t z, t) + z / σ_t|²,

minimised by s_θ(·, t) = ∇log p_t for every t, whatever the weighting λ.

Score functions act on ONE example x of any shape: s(x, t) -> x.shape, or s(x, t, y) with a
class label y (`guided`). Batches are (n, *shape). Samplers and solvers are jitted with the
score function as a static argument: keep one function object to reuse the compilation
(a new closure recompiles); the SDE is a pytree, so new parameter values do not.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from jsm import _validate
from jsm.sde import SDE

Array = jax.Array
TimeScoreFn = Callable[..., Array]

WEIGHTINGS = ("sigma2", "likelihood")
VARIANCE_REDUCTIONS = (None, "antithetic", "control_variate")
NULL_LABEL = -1  # the "no label" class of a conditional score s(x, t, y), for classifier-free guidance
SAMPLING_T_MIN = 1e-3  # where sampling stops: Song et al.'s ε for the SDE and ODE samplers


# --- boundary checks --------------------------------------------------------------


def _check_sde(sde) -> None:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a jsm.sde SDE (VESDE, VPSDE, SubVPSDE), got {type(sde).__name__}")


def _batch(name: str, xs) -> Array:
    """A non-empty batch (n, *shape) of finite floats, n >= 1 and at least one more axis."""
    arr = _validate.float_array(name, xs)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a batch of shape (n, *shape) with n >= 1, got shape {tuple(arr.shape)}")
    return arr


def _t_min(name: str, t_min, T: float) -> None:
    if _validate.is_concrete(t_min) and not 0.0 < float(t_min) < T:
        raise ValueError(f"{name} must be in (0, {T}), got {t_min!r}")


def _labels(y, n: int) -> Array | None:
    if y is None:
        return None
    y = jnp.asarray(y)
    if y.shape != (n,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must be integer labels of shape ({n},), one per example, got {y.dtype} {y.shape}")
    return y


def _with_label(score_fn: TimeScoreFn, y) -> Callable[[Array, Array], Array]:
    """s(x, t) from s(x, t, y) for one example's label y (or s itself when y is None)."""
    return score_fn if y is None else (lambda x, t: score_fn(x, t, y))


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


# --- training: denoising score matching at a random time ----------------------------


def training_times(sde: SDE, key: Array, n: int, *, t_min: float = 1e-5, weighting: str = "sigma2"):
    """Times t (n,) and their weights w (n,), so that mean_i w_i ℓ(t_i) estimates E_{t~U(t_min,1)} λ(t) ℓ(t).

    "sigma2":      λ(t) = σ_t² (Song & Ermon; every t's term O(1)), t ~ U(t_min, 1), w = σ_t².
    "likelihood":  λ(t) = g(t)² (Song, Durkan, Murray & Ermon 2021: then (1 - t_min) J is the
                   score-matching part of a bound on -E log p_0). Drawn uniformly, g(t)² ℓ(t)
                   ~ (g²/σ²) · O(1) blows up as t -> 0 (like 1/t for the VP SDE, so its variance
                   like 1/t_min), so t is importance-sampled from q(t) ∝ g(t)²/σ_t² = -dλ_snr/dt,
                   λ_snr(t) = log(α_t²/σ_t²): uniform in log-SNR, t = λ_snr⁻¹(u), u ~ U(λ_snr(1),
                   λ_snr(t_min)), and w = g²/((1 - t_min) q) = Z σ_t² / (1 - t_min), Z = λ_snr(t_min) -
                   λ_snr(1). Unbiased, and w ℓ = Z/(1 - t_min) · 1/2 |σ_t s + z|² is O(1) at every t:
                   finite variance however small t_min.
    """
    _check_sde(sde)
    _validate.key("key", key)
    _validate.choice("weighting", weighting, WEIGHTINGS)
    _t_min("t_min", t_min, sde.T)
    u = jax.random.uniform(key, (n,))
    if weighting == "sigma2":
        t = t_min + (sde.T - t_min) * u
        return t, sde.marginal(t)[1] ** 2
    hi, lo = sde.log_snr(t_min), sde.log_snr(sde.T)
    t = jnp.clip(sde.t_of_log_snr(lo + u * (hi - lo)), t_min, sde.T)
    return t, (hi - lo) / (sde.T - t_min) * sde.marginal(t)[1] ** 2


def dsm_sde_per_example(score_fn, sde: SDE, x: Array, t, z: Array, weight, variance_reduction=None) -> Array:
    """w · 1/2 |s(α_t x + σ_t z, t) + z/σ_t|² for ONE clean x and its noise z (any shape, the same), t and w ().

    `variance_reduction` as in `jsm.objectives.dsm`, at the fixed t: "antithetic" averages the
    terms of z and -z; "control_variate" subtracts z·s(α_t x, t)/σ_t, the cross term at the
    clean point, whose mean over z is zero.
    """
    alpha, sigma = sde.marginal(t)
    loss = lambda e: 0.5 * jnp.sum((score_fn(alpha * x + sigma * e, t) + e / sigma) ** 2)
    if variance_reduction == "antithetic":
        term = 0.5 * (loss(z) + loss(-z))
    elif variance_reduction == "control_variate":
        term = loss(z) - jnp.sum(z * score_fn(alpha * x, t)) / sigma
    else:
        term = loss(z)
    return weight * term


def dsm_sde(
    score_fn, sde: SDE, key: Array, xs: Array, *, t_min: float = 1e-5, weighting: str = "sigma2",
    variance_reduction: str | None = None,
) -> Array:
    """Denoising score matching over the SDE's times (Song et al. 2021), a batch mean.

        J(θ) = E_{t ~ U(t_min, 1)} λ(t) E 1/2 |s(α_t x_0 + σ_t z, t) + z/σ_t|²,   z ~ N(0, I),

    minimised by s(·, t) = ∇log p_t. Each example gets its own t (`training_times`, which
    documents the weightings and the importance sampling of "likelihood") and noise z:
    k_t, k_z = jax.random.split(key).

    Args:
      score_fn: s(x, t), one example x (any shape) and a scalar t -> x.shape.
      sde: a `jsm.sde` SDE.
      key: PRNG key.
      xs: (n, *shape) clean data.
      t_min: the smallest time, in (0, 1).
      weighting: "sigma2" (λ = σ_t²) or "likelihood" (λ = g(t)², importance-sampled).
      variance_reduction: None, "antithetic" or "control_variate" (see `jsm.objectives.dsm`).
        Both remove the cross term z·s/σ_t, whose variance grows like 1/σ_t², so they pay off
        where σ_t is small: for the exact score of a 2-D mixture under the VP SDE, they cut the
        per-example θ-gradient's variance 400x at t = 1e-3 and 24x at t = 0.01. At large σ_t
        the clean point's score s(α_t x, t) no longer predicts s(α_t x + σ_t z, t), and the
        control variate ADDS variance (3.7x at t = 0.5; ~1.7x averaged over t ~ U(t_min, 1)),
        while antithetic sampling still helps (0.4x at t = 0.5; ~0.85x over t).

    Returns:
      () the batch mean of the per-example terms.
    """
    _check_sde(sde)
    xs = _batch("xs", xs)
    _validate.key("key", key)
    _validate.choice("variance_reduction", variance_reduction, VARIANCE_REDUCTIONS)
    k_t, k_z = jax.random.split(key)
    t, w = training_times(sde, k_t, xs.shape[0], t_min=t_min, weighting=weighting)
    z = jax.random.normal(k_z, xs.shape, xs.dtype)
    per_example = lambda x, ti, zi, wi: dsm_sde_per_example(score_fn, sde, x, ti, zi, wi, variance_reduction)
    return jnp.mean(jax.vmap(per_example)(xs, t.astype(xs.dtype), z, w.astype(xs.dtype)))


# --- sampling: the reverse-time SDE --------------------------------------------------


def reverse_sde(
    score_fn, sde: SDE, key: Array, x_T: Array, n_steps: int, *, corrector_steps: int = 0, snr: float = 0.16,
    denoise: bool = True, t_min: float = SAMPLING_T_MIN, y=None,
) -> Array:
    """Samples of p_0 from x_T ~ π by the reverse-time SDE, predictor-corrector (Song et al. 2021).

    On the grid t_i = T + i (t_min - T) / n_steps, i = 0..n_steps, with Δ = (T - t_min)/n_steps:

      predictor (Euler-Maruyama, backwards): x <- x - [f(x, t_i) - g(t_i)² s(x, t_i)] Δ + g(t_i) sqrt(Δ) u;
      corrector (`corrector_steps` Langevin steps at t_{i+1}, jsm's convention, see
                 `jsm.samplers`): x <- x + a s(x, t) + sqrt(2a) u with a = 2 (snr |u| / |s|)²,
                 the norms |·| over all entries AVERAGED OVER THE BATCH, as in score_sde: one a
                 per step, whose drift is `snr` times the noise on average (the rule of
                 `jsm.samplers.annealed_langevin(snr=)` under `run_chains` too). Per-example norms
                 make a ∝ 1/|s_i|² heavy-tailed, since |s| -> 0 at a mode's centre: the samples'
                 covariance came out 2-4x too large on a 2-D mixture and 30% off on a 10-D
                 Gaussian, where the averaged rule is right;
      denoise:   x_0 = (x + σ² s(x, t_min)) / α at t_min (Tweedie), which removes the last
                 step's noise of size g sqrt(Δ), far above σ_{t_min}.

    The sampler stops at t_min = 1e-3 (Song et al.'s ε), not 0, where a learned score of
    size 1/σ_t is unreliable; the denoising step then estimates x_0 from x_{t_min}.
    Step i draws its noise from fold_in(key, i) for the whole batch, so the chains are
    reproducible for a given key and batch.

    Args:
      score_fn: s(x, t) (or s(x, t, y) with `y`), one example of any shape.
      sde: the forward SDE.
      key: PRNG key.
      x_T: (n, *shape) draws of the prior, e.g. `sde.prior_sample(key, (n, d))`.
      n_steps: predictor steps, >= 1.
      corrector_steps: Langevin steps after each predictor step, >= 0.
      snr: the corrector's signal-to-noise ratio, > 0 (Song et al.: 0.16 for images).
      denoise: end with Tweedie's denoising step.
      t_min: the end time, in (0, 1).
      y: (n,) integer class labels, one per example, for a conditional s(x, t, y).

    Returns:
      (n, *shape) samples. Non-finite examples are counted in a RuntimeWarning.
    """
    _check_sde(sde)
    _validate.key("key", key)
    x_T = _batch("x_T", x_T)
    n_steps = _validate.positive_int("n_steps", n_steps)
    corrector_steps = _validate.positive_int("corrector_steps", corrector_steps, minimum=0)
    _validate.positive("snr", snr)
    _t_min("t_min", t_min, sde.T)
    y = _labels(y, x_T.shape[0])
    out = _reverse_sde(score_fn, sde, key, x_T, y, n_steps, corrector_steps, bool(denoise),
                       jnp.asarray(snr, x_T.dtype), jnp.asarray(t_min, x_T.dtype))
    _warn_nonfinite("reverse_sde", out)
    return out


def _batch_score(score_fn, xs: Array, ys, t) -> Array:
    return jax.vmap(lambda x, label: _with_label(score_fn, label)(x, t))(xs, ys)


def _corrector_step(score_fn, key: Array, xs: Array, ys, t, snr) -> Array:
    """One Langevin step at t for the whole batch, a = 2 (snr mean_i|u_i| / mean_i|s_i|)²."""
    from jsm.samplers import _langevin_move  # here, not at the top: jsm.samplers re-exports this module

    s = _batch_score(score_fn, xs, ys, t)
    u = jax.random.normal(key, xs.shape, xs.dtype)
    norm = lambda v: jnp.mean(jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=-1)))
    a = 2.0 * (snr * norm(u) / norm(s)) ** 2
    return _langevin_move(xs, s, a, u)


@functools.partial(jax.jit, static_argnames=("score_fn", "n_steps", "corrector_steps", "denoise"))
def _reverse_sde(score_fn, sde, key, x_T, y, n_steps, corrector_steps, denoise, snr, t_min):
    ts = jnp.linspace(jnp.asarray(sde.T, x_T.dtype), t_min, n_steps + 1)
    delta = (sde.T - t_min) / n_steps

    def predictor(x, label, u, t):  # Euler-Maruyama backwards in time, from t to t - Δ
        drift = reverse_drift(_with_label(score_fn, label), sde, x, t)
        return x - drift * delta + sde.diffusion(t) * jnp.sqrt(delta) * u

    def step(x, i):
        k_pred, k_corr = jax.random.split(jax.random.fold_in(key, i))
        u = jax.random.normal(k_pred, x.shape, x.dtype)
        x = jax.vmap(predictor, in_axes=(0, 0, 0, None))(x, y, u, ts[i])
        for j in range(corrector_steps):
            x = _corrector_step(score_fn, jax.random.fold_in(k_corr, j), x, y, ts[i + 1], snr)
        return x, None

    x, _ = jax.lax.scan(step, x_T, jnp.arange(n_steps))
    if denoise:
        x = jax.vmap(lambda xi, label: tweedie_denoise(_with_label(score_fn, label), sde, xi, t_min))(x, y)
    return x


# --- sampling and encoding: the probability-flow ODE ------------------------------------


def solve_ode(vector_field, y0, t0, t1, *, rtol, atol, max_steps: int):
    """y(t1) for dy/dt = vector_field(t, y) from y(t0) = y0 (any pytree), either direction.

    diffrax's Tsit5 (5th order, embedded 4th-order error estimate) with a PID step-size
    controller, the first step chosen by diffrax. Solver failures do not raise inside
    `jit`: the result is returned with `ok` (False when max_steps ran out) and the number
    of accepted steps, for the caller to report.

    Returns:
      (y1, ok (), n_steps ()).
    """
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), diffrax.Tsit5(), t0, t1, None, y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps, throw=False,
    )
    y1 = jax.tree.map(lambda a: a[0], sol.ys)
    return y1, sol.result == diffrax.RESULTS.successful, sol.stats["num_steps"]


def check_solved(where: str, ok, max_steps: int, rtol, atol) -> None:
    """Raise a RuntimeError naming max_steps when any concrete solve ran out of steps."""
    if _validate.is_concrete(ok):
        n_bad = int(np.sum(~np.asarray(ok)))
        if n_bad:
            raise RuntimeError(
                f"{where}: the ODE solver used all max_steps={max_steps} steps on {n_bad} of {np.size(ok)} examples "
                f"(rtol={float(rtol)}, atol={float(atol)}) before reaching the end time; raise max_steps, loosen "
                "rtol/atol, or check the score function (a score that blows up near t_min makes the ODE stiff)")


def _ode_args(sde, x, t_min, rtol, atol, max_steps):
    _check_sde(sde)
    x = _batch("x", x)
    _t_min("t_min", t_min, sde.T)
    _validate.positive("rtol", rtol)
    _validate.positive("atol", atol)
    max_steps = _validate.positive_int("max_steps", max_steps)
    return x, max_steps


@functools.partial(jax.jit, static_argnames=("score_fn", "max_steps"))
def _flow(score_fn, sde, xs, y, t0, t1, rtol, atol, max_steps):
    def one(x, label):
        s_fn = _with_label(score_fn, label)
        x1, ok, _ = solve_ode(lambda t, x: ode_drift(s_fn, sde, x, t), x, t0, t1,
                              rtol=rtol, atol=atol, max_steps=max_steps)
        return x1, ok

    return jax.vmap(one)(xs, y)


@functools.partial(jax.jit, static_argnames=("score_fn",))
def _denoise_batch(score_fn, sde, xs, y, t):
    return jax.vmap(lambda x, label: tweedie_denoise(_with_label(score_fn, label), sde, x, t))(xs, y)


def probability_flow(
    score_fn, sde: SDE, x_T: Array, *, t_min: float = SAMPLING_T_MIN, rtol: float = 1e-5, atol: float = 1e-5,
    max_steps: int = 4096, denoise: bool = False, y=None,
) -> Array:
    """Samples of p_{t_min} from x_T ~ π: the probability-flow ODE dx/dt = f - g² s / 2 from T to t_min.

    Deterministic: a bijection x_T <-> x_{t_min} that `encode` inverts, solved per example
    with diffrax's adaptive Tsit5 (`solve_ode`). With `denoise`, Tweedie's step
    (x + σ² s) / α at t_min follows (no longer invertible).

    Args:
      score_fn: s(x, t) (or s(x, t, y) with `y`), one example of any shape.
      sde: the forward SDE.
      x_T: (n, *shape) draws of the prior.
      t_min: the end time, in (0, 1).
      rtol, atol: the step-size controller's relative and absolute tolerances.
      max_steps: the most steps per example; running out raises a RuntimeError (outside jit).
      denoise: end with Tweedie's denoising step.
      y: (n,) integer class labels for a conditional s(x, t, y).

    Returns:
      (n, *shape) samples.
    """
    x_T, max_steps = _ode_args(sde, x_T, t_min, rtol, atol, max_steps)
    y = _labels(y, x_T.shape[0])
    dt = x_T.dtype
    x, ok = _flow(score_fn, sde, x_T, y, jnp.asarray(sde.T, dt), jnp.asarray(t_min, dt),
                  jnp.asarray(rtol, dt), jnp.asarray(atol, dt), max_steps)
    check_solved("probability_flow", ok, max_steps, rtol, atol)
    if denoise:
        x = _denoise_batch(score_fn, sde, x, y, jnp.asarray(t_min, dt))
    _warn_nonfinite("probability_flow", x)
    return x


def encode(
    score_fn, sde: SDE, x0: Array, *, t_min: float = SAMPLING_T_MIN, rtol: float = 1e-5, atol: float = 1e-5,
    max_steps: int = 4096, y=None,
) -> Array:
    """The latent x_T of data x0 (n, *shape): the probability-flow ODE forward, t_min to T.

    The inverse of `probability_flow` (without `denoise`), to the solver's tolerance: an
    invertible encoding, as in a normalising flow. Arguments as in `probability_flow`.
    """
    x0, max_steps = _ode_args(sde, x0, t_min, rtol, atol, max_steps)
    y = _labels(y, x0.shape[0])
    dt = x0.dtype
    x, ok = _flow(score_fn, sde, x0, y, jnp.asarray(t_min, dt), jnp.asarray(sde.T, dt),
                  jnp.asarray(rtol, dt), jnp.asarray(atol, dt), max_steps)
    check_solved("encode", ok, max_steps, rtol, atol)
    return x


# --- conditioning: classifier-free guidance ------------------------------------------------


def guided(score_fn, w: float) -> Callable[[Array, Array, Array], Array]:
    """Classifier-free guidance (Ho & Salimans 2022): s_w(x, t, y) = (1 + w) s(x, t, y) - w s(x, t, ∅).

    s(x, t, ∅) = s(x, t, NULL_LABEL) is the unconditional score of the same network, trained
    with labels dropped to NULL_LABEL = -1. Since ∇log p_t(x|y) - ∇log p_t(x) = ∇log p_t(y|x),
    s_w = s(·|y) + w ∇log p_t(y|x): the score of p_t(x|y) p_t(y|x)^w, an implicit classifier's
    gradient amplified by w. w = 0 is the conditional score, w = -1 the unconditional one.

    w is closed over: to sweep it without recompiling a sampler, call the sampler inside
    `jax.jit` with w as an argument.

    Args:
      score_fn: s(x, t, y), one example, an integer label y (NULL_LABEL for none).
      w: the guidance strength (finite; typically 0 to ~5).
    """
    if _validate.is_concrete(w) and not np.all(np.isfinite(np.asarray(w, dtype=float))):
        raise ValueError(f"w must be finite, got {w!r}")

    def score(x: Array, t, y) -> Array:
        return (1.0 + w) * score_fn(x, t, y) - w * score_fn(x, t, NULL_LABEL)

    return score
