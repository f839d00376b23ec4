"""EBM maximum likelihood: the surrogate's gradient, CD and persistent chains (their resume: tests/test_resume.py)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import chex
import numpy as np
import pytest

from jsm import ebm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ebm_mle  # noqa: E402

from conftest import tol


@pytest.mark.numerics
def test_surrogate_gradient_is_the_negative_log_likelihood_gradient(key):
    """f_θ(x) = θ x²/2 (a Gaussian of precision θ): -log-lik = θ E x²/2 - 1/2 log θ + const,
    whose gradient E_data x²/2 - 1/(2θ) the surrogate must give with exact samples of q_θ."""
    theta = 2.0
    k1, k2 = jax.random.split(key)
    data = 0.8 * jax.random.normal(k1, (4000, 1))
    energy = lambda t: (lambda x: t * x[0] ** 2 / 2)
    exact = float(jnp.mean(data**2) / 2 - 1 / (2 * theta))

    def grad_with(k):
        samples = jax.random.normal(k, (4000, 1)) / jnp.sqrt(theta)
        return jax.grad(lambda t: ebm.ebm_surrogate(energy(t), data, samples)[0])(theta)

    grads = np.asarray(jax.vmap(grad_with)(jax.random.split(k2, 200)))
    assert abs(grads.mean() - exact) < 5 * grads.std() / np.sqrt(grads.size)
    # The penalty adds exactly α ∂/∂θ (E f_data² + E f_model²).
    samples = jax.random.normal(k2, (4000, 1)) / jnp.sqrt(theta)
    with_penalty = jax.grad(lambda t: ebm.ebm_surrogate(energy(t), data, samples, 0.1)[0])(theta)
    penalty = jax.grad(lambda t: 0.1 * (jnp.mean(jax.vmap(energy(t))(data) ** 2) + jnp.mean(jax.vmap(energy(t))(samples) ** 2)))(theta)
    np.testing.assert_allclose(with_penalty - grad_with(k2), penalty, rtol=tol(1e-4, 1e-10))


def test_samples_carry_no_gradient(key):
    data = jax.random.normal(key, (64, 2))
    energy = lambda t: (lambda x: t * jnp.sum(x**2))
    # d/dθ through the chains would differ from the surrogate's formula; stopped, it equals it.
    g = jax.grad(lambda t: ebm.contrastive_divergence(energy(t), key, data, n_steps=5, step_size=0.01)[0])(1.0)
    samples = ebm.langevin_samples(energy(1.0), key, data, 5, 0.01)
    np.testing.assert_allclose(g, jnp.mean(jnp.sum(data**2, -1)) - jnp.mean(jnp.sum(samples**2, -1)), rtol=tol(1e-5, 1e-11))


def test_persistent_chains_update_the_buffer(key):
    buffer = ebm.init_replay_buffer(key, 512, 2)
    chex.assert_shape(buffer, (512, 2))
    data = jax.random.normal(key, (128, 2))
    energy = lambda x: 0.5 * jnp.sum(x**2)
    loss, aux, new = ebm.persistent_cd(energy, key, data, buffer, n_steps=10, step_size=0.05, reinit_fraction=0.0)
    chex.assert_shape(new, (512, 2))
    changed = np.any(np.asarray(new != buffer), axis=1)
    assert changed.sum() == 128  # exactly the drawn chains moved
    # The loss is the surrogate on the chains written back: data energy minus chain energy.
    moved = np.asarray(new)[changed]
    np.testing.assert_allclose(loss, 0.5 * np.mean(np.sum(np.asarray(data) ** 2, -1)) - 0.5 * np.mean(np.sum(moved**2, -1)),
                               rtol=tol(1e-5, 1e-11), atol=tol(1e-6, 1e-12))
    assert set(aux) == {"energy_data", "energy_model", "energy_gap", "penalty"}
    with pytest.raises(ValueError, match=r"buffer must have shape \(>= 128, 2\), got \(64, 2\)"):
        ebm.persistent_cd(energy, key, data, buffer[:64])
    with pytest.raises(ValueError, match=r"reinit_fraction must be in \[0, 1\], got 1.5"):
        ebm.persistent_cd(energy, key, data, buffer, reinit_fraction=1.5)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_pcd_restarts_a_binomial_reinit_fraction_of_the_chains(fraction, key):
    """Each drawn chain restarts from uniform noise on [lo, hi]^d with probability `reinit_fraction`.

    The buffer sits at 100, far outside [lo, hi] = [-1, 1]; one Langevin step of size 1e-6 on a
    flat energy moves a chain by ~1e-3, so a chain found in the box was restarted. The count is
    Binomial(n, fraction): within 4 standard deviations (exact at 0 and 1). The asymmetric 0.2
    tells `fraction` from its complement (800 vs 200 of 1000, 12 SD apart).
    """
    n, d = 1000, 2
    buffer = jnp.full((n, d), 100.0)
    data = jnp.zeros((n, d))
    flat = lambda x: 0.0 * jnp.sum(x)
    _, _, new = ebm.persistent_cd(flat, key, data, buffer, n_steps=1, step_size=1e-6,
                                  reinit_fraction=fraction, lo=-1.0, hi=1.0)
    new = np.asarray(new)
    in_box = np.all(np.abs(new) < 1.01, axis=1)
    assert np.all(in_box | (np.abs(new - 100.0) < 0.01).all(axis=1))  # every chain is one or the other
    restarted = int(in_box.sum())
    sd = np.sqrt(n * fraction * (1 - fraction))
    assert abs(restarted - n * fraction) <= 4 * sd, (restarted, n * fraction, sd)
    if 0 < fraction < 1:  # the restarts are uniform on the box: mean 0, variance 1/3 per coordinate
        box = new[in_box]
        assert np.all(np.abs(box.mean(0)) < 5 * np.sqrt(1 / 3 / box.shape[0]))


@pytest.mark.slow
def test_ebm_experiment_writes_its_numbers(tmp_path):
    config = ebm_mle.Config(workdir=str(tmp_path), steps=40, evaluations=2, hidden=(16,), n_train=512, n_test=256,
                            batch_size=64, buffer_size=256, grid_n=32, checkpoint_every=20, log_every=10,
                            steps_langevin=5, progress=False)
    out = ebm_mle.main(config)
    assert (tmp_path / "figures" / "energy.png").exists()
    for method in ("cd", "pcd"):
        assert [e["step"] for e in out[method]["evaluations"]] == [20, 40]
        assert out[method]["test_log_likelihood"] < out["target_test_log_likelihood"] + 0.05  # no model beats p
        # The box quadrature is an upper bound; the bound on the mass off the box gives the lower one.
        assert out[method]["test_log_likelihood_lower_bound"] <= out[method]["test_log_likelihood"]


@pytest.mark.numerics
def test_the_bound_on_the_mass_off_the_box_is_the_closed_form_for_a_flat_mlp():
    """With every weight zero the MLP is its output bias b and L = 0, so the bound is
    exp(-b) 2π ∫_4^∞ ρ exp(-ρ²/(2 s²)) dρ = exp(-b) 2π s² exp(-16 / (2 s²))."""
    from flax import nnx

    from jsm import nets

    config = ebm_mle.Config()
    apply, params = nets.pure(nets.MLPEnergy(2, (8, 8), rngs=nnx.Rngs(0)))
    params = jax.tree.map(jnp.zeros_like, params)
    b = 0.7
    last_bias = [k for k, v in jax.tree_util.tree_flatten_with_path(params)[0] if v.shape == (1,)]
    assert len(last_bias) == 1
    params = jax.tree_util.tree_map_with_path(lambda k, v: v + b if k == last_bias[0] else v, params)
    s = config.prior_scale
    want = -b + np.log(2 * np.pi * s**2) - ebm_mle.BOX**2 / (2 * s**2)
    np.testing.assert_allclose(ebm_mle.log_outside_bound(apply, params, config), want, rtol=1e-6)
