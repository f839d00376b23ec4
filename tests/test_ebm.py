"""EBM maximum likelihood: the surrogate's gradient, CD and persistent chains, resumable state."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsm import objectives as O

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
        return jax.grad(lambda t: O.ebm_surrogate(energy(t), data, samples)[0])(theta)

    grads = np.asarray(jax.vmap(grad_with)(jax.random.split(k2, 200)))
    assert abs(grads.mean() - exact) < 5 * grads.std() / np.sqrt(grads.size)
    # The penalty adds exactly α ∂/∂θ (E f_data² + E f_model²).
    samples = jax.random.normal(k2, (4000, 1)) / jnp.sqrt(theta)
    with_penalty = jax.grad(lambda t: O.ebm_surrogate(energy(t), data, samples, 0.1)[0])(theta)
    penalty = jax.grad(lambda t: 0.1 * (jnp.mean(jax.vmap(energy(t))(data) ** 2) + jnp.mean(jax.vmap(energy(t))(samples) ** 2)))(theta)
    np.testing.assert_allclose(with_penalty - grad_with(k2), penalty, rtol=tol(1e-4, 1e-10))


def test_samples_carry_no_gradient(key):
    data = jax.random.normal(key, (64, 2))
    energy = lambda t: (lambda x: t * jnp.sum(x**2))
    # d/dθ through the chains would differ from the surrogate's formula; stopped, it equals it.
    g = jax.grad(lambda t: O.contrastive_divergence(energy(t), key, data, n_steps=5, step_size=0.01)[0])(1.0)
    samples = O.langevin_samples(energy(1.0), key, data, 5, 0.01)
    np.testing.assert_allclose(g, jnp.mean(jnp.sum(data**2, -1)) - jnp.mean(jnp.sum(samples**2, -1)), rtol=tol(1e-5, 1e-11))


def test_persistent_chains_update_the_buffer_and_restart_a_fraction(key):
    buffer = O.init_replay_buffer(key, 512, 2)
    data = jax.random.normal(key, (128, 2))
    energy = lambda x: 0.5 * jnp.sum(x**2)
    loss, aux, new = O.persistent_cd(energy, key, data, buffer, n_steps=10, step_size=0.05, reinit_fraction=0.0)
    changed = np.any(np.asarray(new != buffer), axis=1)
    assert new.shape == buffer.shape and changed.sum() == 128  # exactly the drawn chains moved
    assert set(aux) == {"energy_data", "energy_model", "energy_gap", "penalty"}
    with pytest.raises(ValueError, match=r"buffer must have shape \(>= 128, 2\), got \(64, 2\)"):
        O.persistent_cd(energy, key, data, buffer[:64])
    with pytest.raises(ValueError, match="reinit_fraction must be in"):
        O.persistent_cd(energy, key, data, buffer, reinit_fraction=1.5)


@pytest.mark.slow
def test_pcd_run_stopped_and_resumed_restores_chains_exactly(tmp_path):
    small = dict(hidden=(16,), n_train=512, n_test=256, batch_size=64, buffer_size=256, grid_n=32,
                 checkpoint_every=10, log_every=10, steps_langevin=5, progress=False)
    whole = ebm_mle.Config(workdir=str(tmp_path / "a"), steps=40, evaluations=1, **small)
    _, hist_a, evals_a = ebm_mle.train(whole, "pcd")
    half = ebm_mle.Config(workdir=str(tmp_path / "b"), steps=20, evaluations=1, **small)
    ebm_mle.train(half, "pcd")
    _, hist_b, evals_b = ebm_mle.train(dataclasses.replace(half, steps=40), "pcd")
    assert [r["loss"] for r in hist_a] == [r["loss"] for r in hist_b]
    assert evals_a == evals_b


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
        assert 0.0 <= out[method]["spurious_mass"] <= 1.0
