"""experiments/ism_overfitting.py: its curvature-backprop diagonal against the exact one; the --quick run's files."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import jsm
from jsm import nets

# experiments/ is on the path (pyproject's pythonpath), as it is for the scripts themselves.
import ism_overfitting
from conftest import tol


def test_curvature_backprop_is_exact_with_one_hidden_layer_and_not_with_two():
    """Becker & LeCun's diagonal drops only the off-diagonal Hessian terms of the layers below the last
    hidden one: with one hidden layer there are none (∂²f/∂z² is diagonal), with two there are."""
    x = jax.random.normal(jax.random.key(0), (6,))
    for hidden, exact in (((9,), True), ((9, 7), False)):
        apply, params = nets.pure(nets.MLPEnergy(6, hidden, rngs=nnx.Rngs(1)))
        reference = jsm.hessian_diagonal(lambda y: apply(params, y), method="jacfwd")(x)
        approx = ism_overfitting.curvature_backprop(params, x)
        assert approx.shape == x.shape
        if exact:
            np.testing.assert_allclose(approx, reference, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-14))
        else:
            assert np.max(np.abs(approx - reference)) > 1e-3 * np.max(np.abs(reference))


@pytest.mark.slow
def test_ism_overfitting_quick(tmp_path):
    config = ism_overfitting.resolve(ism_overfitting.Config(workdir=str(tmp_path), quick=True, progress=False))
    out = ism_overfitting.main(config)
    saved = json.loads((tmp_path / "results.json").read_text())
    for name in ("curves", "samples"):
        assert (tmp_path / "figures" / f"{name}.png").exists(), name
    assert set(saved) >= {"methods", "table", "curves", "losses", "references", "curvature_backprop", "data", "wall_s"}
    names = [m.name for m in ism_overfitting.methods(config)]
    assert saved["methods"] == names == [r["method"] for r in saved["table"]]
    assert {m.objective for m in ism_overfitting.methods(config)} == {"ism", "ism_penalty", "ism_cbp", "dsm"}
    assert saved["data"]["n_train"] == config.n_train and saved["data"]["d"] == 64

    for row in saved["table"]:
        name = row["method"]
        # the curve: the shared initialisation at step 0, then every evaluation up to the last step
        curve = saved["curves"][name]
        assert curve[0] == saved["curves"][names[0]][0] and curve[0]["step"] == 0
        assert curve[-1]["step"] == config.steps and len(curve) == config.evaluations + 1
        assert all(math.isfinite(r["held_out_j_ism"]) and math.isfinite(r["train_j_ism"]) for r in curve)
        assert row["final_held_out_j_ism"] == curve[-1]["held_out_j_ism"]
        assert row["best_held_out_j_ism"] == min(r["held_out_j_ism"] for r in curve)
        assert saved["losses"][name][-1]["step"] == config.steps
        assert math.isfinite(row["final_training_loss"]) and row["training_seconds"] > 0
        assert row["non_finite_at_step"] is None
        # the samples: MALA tuned and run, every chain finite, scored
        assert 0.0 < row["acceptance"] <= 1.0 and row["step_size"] > 0 and row["nonfinite_samples"] == 0
        assert math.isfinite(row["mmd2_to_held_out"]) and row["nearest_train_ratio"] > 0
        assert 0.0 <= row["confidence"] <= 1.0
        assert ("denoised" in row) == (row["objective"] == "dsm")

    refs = saved["references"]
    assert refs["training digits"]["nearest_train_ratio"] == 0.0  # the training digits are their own neighbours
    assert math.isfinite(refs["Gaussian fit"]["held_out_j_ism"])
    check = saved["curvature_backprop"]
    assert set(check["models"]) == {"initialisation", *names}
    for parts in check["models"].values():
        for c in (parts["train"], parts["held_out"]):
            assert c["relative_error"] >= 0 and c["mean_sum_sq_exact"] > 0 and c["mean_sum_sq_approximate"] > 0, c
    assert check["exact_ms"] > 0 and check["approximate_ms"] > 0
    assert out["table"] == saved["table"]
