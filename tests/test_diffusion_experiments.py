"""The diffusion experiments run end to end at a tiny size and leave their documented results and figures."""

import json

import pytest

# experiments/ is on the path (pyproject's pythonpath), as it is for the scripts themselves.
import diffusion_2d
import diffusion_digits


@pytest.mark.slow
def test_diffusion_2d(tmp_path):
    # n_test = grid_n²: the in-run evaluations and the figure's grid share one compiled ODE solve
    config = diffusion_2d.Config(
        workdir=str(tmp_path), steps=40, hidden=(16,), n_train=512, n_test=64, evaluations=2, n_samples=128,
        pc_steps=10, grid_n=8, ebm_steps=10, ncsn_steps=10, gan_steps=10, checkpoint_every=20, log_every=20,
        progress=False)
    out = diffusion_2d.main(config)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "figures" / "diffusion_2d.png").exists()
    ll = saved["test_log_likelihood"]
    assert set(ll) >= {"true", "score_model_exact_ode", "ebm_pcd", "ebm_cd"}
    assert all(isinstance(v, float) for v in ll.values())
    assert [r["step"] for r in saved["score_model_over_training"]] == [20, 40]
    assert set(saved["samples"]) >= {"score model, PC", "score model, ODE", "NCSN, annealed Langevin", "GAN",
                                     "exact samples"}
    assert saved["samples"]["exact samples"]["modes_covered"] == 8
    assert out["test_log_likelihood"] == ll


@pytest.mark.slow
def test_diffusion_digits(tmp_path):
    config = diffusion_digits.Config(
        workdir=str(tmp_path), steps=30, hidden=(16,), evaluations=1, n_test=16, hutchinson_keys=2, pc_steps=5,
        n_per_class=2, ncsn_steps=10, checkpoint_every=30, log_every=10, progress=False)
    out = diffusion_digits.main(config)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "figures" / "diffusion_digits.png").exists()
    bpd = saved["bits_per_dim"]
    assert set(bpd) == {"score_model_exact", "score_model_hutchinson", "gaussian_baseline"}
    assert set(bpd["score_model_hutchinson"]) >= {"mean", "std"} and len(bpd["score_model_hutchinson"]["per_key"]) == 2
    assert set(saved["guidance_accuracy"]) == {"0.0", "1.0", "3.0"}
    assert all(0.0 <= a <= 1.0 for a in saved["guidance_accuracy"].values())
    assert set(saved["samples"]) >= {"score model, PC", "score model, ODE", "NCSN + annealed Langevin",
                                     "Gaussian baseline", "real held-out digits"}
    # the same exact bits/dim as the evaluation inside the run (same EMA parameters, same points)
    assert saved["bits_per_dim_over_training"][-1]["exact"] == pytest.approx(bpd["score_model_exact"], abs=1e-4)
    assert out["bits_per_dim"]["gaussian_baseline"] == bpd["gaussian_baseline"]
