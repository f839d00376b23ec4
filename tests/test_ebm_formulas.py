"""The EBM losses and the parameters' moving average against hand-written float64 references.

ebm.py: the surrogate's value, aux and θ-gradient written out (E_data ∇_θ f - E_model ∇_θ f plus
the penalty's), with no gradient through the model samples; contrastive divergence as the
surrogate on its own Langevin samples; the chains of CD and PCD against ULA on a Gaussian,
whose mean and variance after k steps are a closed-form recursion, and whose one-step noise
can be read back. train.py: ema_warmup's β_t and the EMA recursion of `make_step`, a skipped
(non-finite) step included, against the recursion by hand.

Each test was checked to fail under a planted bug in the formula it covers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsm import ebm, train
from conftest import FLOAT, X64, tol


def as_float(x):
    """x as an array of the default float (float32, or float64 under JAX_ENABLE_X64)."""
    return jnp.asarray(x, FLOAT)


# --- the surrogate ---------------------------------------------------------------------------


def _energy(theta):
    """f_θ(x) = θ_0 |x|²/2 + θ_1 Σ sin x: ∇_θ f = (|x|²/2, Σ sin x)."""
    return lambda x: theta[0] * jnp.sum(x**2) / 2 + theta[1] * jnp.sum(jnp.sin(x))


def _features(x):
    return np.stack([np.sum(x**2, -1) / 2, np.sum(np.sin(x), -1)], -1)


@pytest.mark.numerics
def test_surrogate_value_aux_and_gradient_are_the_hand_formulas():
    """L = E_d f - E_m f + α (E_d f² + E_m f²) and ∇_θ L = E_d ∇f - E_m ∇f + 2α (E_d f ∇f + E_m f ∇f):
    descending it raises the model samples' energy and lowers the data's (the sign of maximum
    likelihood, ∇_θ E_data[-log q_θ] = E_data ∇f - E_q ∇f). Samples built from θ carry no gradient."""
    rng = np.random.default_rng(0)
    theta, alpha = np.array([0.7, -0.4]), 0.3
    data, base = rng.normal(size=(6, 2)), rng.normal(size=(5, 2)) * 2.0
    samples = theta[0] * base
    phi_d, phi_m = _features(data), _features(samples)
    f_d, f_m = phi_d @ theta, phi_m @ theta
    want_loss = f_d.mean() - f_m.mean() + alpha * (np.mean(f_d**2) + np.mean(f_m**2))
    want_grad = phi_d.mean(0) - phi_m.mean(0) + 2 * alpha * (np.mean(f_d[:, None] * phi_d, 0)
                                                             + np.mean(f_m[:, None] * phi_m, 0))

    def loss(th):  # the samples depend on θ here; the surrogate must not differentiate through them
        return ebm.ebm_surrogate(_energy(th), as_float(data), th[0] * as_float(base), alpha)

    (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(as_float(theta))
    np.testing.assert_allclose(value, want_loss, rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(grad, want_grad, rtol=tol(1e-5, 1e-12))
    want_aux = {"energy_data": f_d.mean(), "energy_model": f_m.mean(), "energy_gap": f_d.mean() - f_m.mean(),
                "penalty": alpha * (np.mean(f_d**2) + np.mean(f_m**2))}
    for name, want in want_aux.items():
        np.testing.assert_allclose(aux[name], want, rtol=tol(1e-5, 1e-12), err_msg=name)


# --- the chains of CD and PCD ------------------------------------------------------------------

CENTRE, SCALE, STEP = np.array([1.0, -2.0]), 1.5, 0.05


def _gaussian_energy(x):
    """q = N(c, s² I): f = |x - c|² / (2 s²), s(x) = -(x - c) / s²."""
    return jnp.sum((x - as_float(CENTRE)) ** 2) / (2 * SCALE**2)


def test_contrastive_divergence_is_the_surrogate_on_its_own_langevin_samples(key):
    """CD(θ) = ebm_surrogate(f_θ, data, langevin_samples(f_θ, key, data, k, a)): value, aux, θ-gradient."""
    data = as_float(np.random.default_rng(1).normal(size=(64, 2)))
    energy = lambda th: (lambda x: th * _gaussian_energy(x))
    cd = lambda th: ebm.contrastive_divergence(energy(th), key, data, n_steps=3, step_size=STEP, energy_penalty=0.1)
    (value, aux), grad = jax.value_and_grad(cd, has_aux=True)(as_float(1.0))
    samples = ebm.langevin_samples(energy(1.0), key, data, 3, STEP)
    sur = lambda th: ebm.ebm_surrogate(energy(th), data, samples, 0.1)
    (want_value, want_aux), want_grad = jax.value_and_grad(sur, has_aux=True)(as_float(1.0))
    np.testing.assert_allclose(value, want_value, rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(grad, want_grad, rtol=tol(1e-5, 1e-12))
    for name in want_aux:
        np.testing.assert_allclose(aux[name], want_aux[name], rtol=tol(1e-5, 1e-12), err_msg=name)


def test_contrastive_divergence_chains_are_ula_from_the_data(key):
    """CD's chains are k ULA steps x' = x + a s(x) + sqrt(2a) u from the data; on q = N(c, s² I) the
    mean and variance of each coordinate follow m' = c + r (m - c), v' = r² v + 2a, r = 1 - a/s²,
    from the data's sample mean and variance (4000 chains, 5 standard errors of the chains' noise)."""
    n, k = 4000, 5
    data = np.array([-1.0, 0.5]) + 0.5 * np.random.default_rng(1).normal(size=(n, 2))
    samples = ebm.langevin_samples(_gaussian_energy, key, as_float(data), k, STEP)
    r, m, v = 1 - STEP / SCALE**2, data.mean(0), data.var(0)
    for _ in range(k):
        m, v = CENTRE + r * (m - CENTRE), r**2 * v + 2 * STEP
    x = np.asarray(samples, np.float64)
    noise_var = v - r ** (2 * k) * data.var(0)
    np.testing.assert_array_less(np.abs(x.mean(0) - m), 5 * np.sqrt(noise_var / n))
    np.testing.assert_allclose(x.var(0), v, rtol=5 * np.sqrt(2 / n))


def test_persistent_cd_moves_the_drawn_chains_by_one_ula_step(key):
    """reinit_fraction = 0, one step: each drawn chain x becomes x + a s(x) + sqrt(2a) u, so
    u = (x' - x - a s(x)) / sqrt(2a), read back, is N(0, I) and uncorrelated with x (4000 numbers,
    5 standard errors); the loss is the surrogate on the chains written back."""
    size, n = 3000, 2000
    buffer = as_float(CENTRE + 2.0 * np.random.default_rng(2).normal(size=(size, 2)))
    data = as_float(np.zeros((n, 2)))
    loss, aux, new = ebm.persistent_cd(_gaussian_energy, key, data, buffer, n_steps=1, step_size=STEP,
                                       reinit_fraction=0.0)
    old, new = np.asarray(buffer, np.float64), np.asarray(new, np.float64)
    moved = np.any(old != new, axis=1)
    assert moved.sum() == n
    x, x1 = old[moved], new[moved]
    u = (x1 - x + STEP * (x - CENTRE) / SCALE**2) / np.sqrt(2 * STEP)
    se = 1 / np.sqrt(u.size)
    assert abs(u.mean()) < 5 * se and abs(u.var() - 1) < 5 * np.sqrt(2) * se, (u.mean(), u.var())
    corr = np.corrcoef(u.ravel(), (x - CENTRE).ravel())[0, 1]
    assert abs(corr) < 5 * se, corr
    f = lambda z: np.sum((z - CENTRE) ** 2, -1) / (2 * SCALE**2)
    np.testing.assert_allclose(loss, f(np.zeros((n, 2))).mean() - f(x1).mean(), rtol=tol(1e-5, 1e-10))
    np.testing.assert_allclose(aux["energy_model"], f(x1).mean(), rtol=tol(1e-5, 1e-10))


# --- the moving average of the parameters ---------------------------------------------------------

@pytest.mark.numerics
def test_ema_warmup_is_min_of_beta_and_the_warmup_fraction():
    steps = np.arange(0, 80)
    for beta in (0.0, 0.6, 0.9, 0.999):
        got = train.ema_warmup(beta, jnp.asarray(steps, jnp.int32))
        np.testing.assert_allclose(got, np.minimum(beta, (1 + steps) / (10 + steps)), rtol=tol(1e-6, 1e-13))
        assert got.dtype == FLOAT


@pytest.mark.numerics
def test_ema_of_make_step_is_the_hand_recursion_and_skips_a_nonfinite_step():
    """SGD on ℓ(θ) = 1/2 mean_rows |w - row|² + 1/2 (b - 1)²: θ <- θ - η ∇ℓ, then
    θ̄ <- β_t θ̄ + (1 - β_t) θ with t the number of updates applied before, β_t = min(β, (1+t)/(10+t))
    (warm-up until t = 13 for β = 0.6), θ̄_0 = θ_0. A NaN batch at call 7 changes nothing, t included."""
    lr, beta, calls, bad = 0.1, 0.6, 25, 7
    rng = np.random.default_rng(4)
    batches = rng.normal(size=(calls, 4, 3)) + np.array([1.0, -2.0, 0.5])
    batches[bad, 0, 0] = np.nan

    def loss_fn(params, key, batch, state):
        value = 0.5 * jnp.mean(jnp.sum((params["w"] - batch) ** 2, -1)) + 0.5 * (params["b"] - 1.0) ** 2
        return value, {}, state

    params = {"w": as_float(np.array([0.3, 0.0, -1.0])), "b": as_float(4.0)}
    optimizer = optax.sgd(lr)
    state = train.init_state(params, optimizer, jax.random.key(0), ema_decay=beta)
    for name in params:
        np.testing.assert_array_equal(state.ema_params[name], params[name])
    step = jax.jit(train.make_step(loss_fn, optimizer, ema_decay=beta))
    w, b = np.array([0.3, 0.0, -1.0]), 4.0
    ema_w, ema_b, t = w.copy(), b, 0
    for i in range(calls):
        state, metrics = step(state, as_float(batches[i]))
        if i == bad:
            assert not bool(metrics["finite"])
            continue
        w, b = w - lr * (w - batches[i].mean(0)), b - lr * (b - 1.0)
        beta_t = min(beta, (1 + t) / (10 + t))
        ema_w, ema_b, t = beta_t * ema_w + (1 - beta_t) * w, beta_t * ema_b + (1 - beta_t) * b, t + 1
    assert int(state.step) == calls - 1
    np.testing.assert_allclose(state.params["w"], w, rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(state.ema_params["w"], ema_w, rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(state.ema_params["b"], ema_b, rtol=tol(1e-5, 1e-12))
