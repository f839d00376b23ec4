"""experiments/mnist.py runs end to end at its --quick sizes and leaves its documented results and figures."""

import json
import math

import numpy as np
import pytest

# experiments/ is on the path (pyproject's pythonpath), as it is for the scripts themselves.
import mnist


@pytest.mark.slow
def test_mnist_quick(tmp_path):
    # two of the three few-step samplers (ddim is dpmpp_2m's first-order twin): CI's time
    config = mnist.resolve(mnist.Config(workdir=str(tmp_path), quick=True, progress=False,
                                        samplers=("heun", "dpmpp_2m")))
    out = mnist.main(config)
    saved = json.loads((tmp_path / "results.json").read_text())
    for name in ("samples_per_class", "guidance_sweep", "bits_per_dim", "samplers"):
        assert (tmp_path / "figures" / f"{name}.png").exists(), name
    assert set(saved) >= {"bits_per_dim", "hutchinson", "exact", "bits_per_dim_over_training", "samplers", "guidance",
                          "conditioning_check", "classifier", "training", "stage_seconds", "wall_s"}

    # the bits/dim table: every row finite, with its standard error over the same n_test images
    bpd = saved["bits_per_dim"]
    assert bpd["n_test"] == config.n_test and bpd["bin_width"] == 1 / 256
    assert len(bpd["table"]) == 7 and [p["bits_per_dim"] for p in bpd["published_full_mnist"]] == [1.06, 1.05, 0.99]
    for r in bpd["table"]:
        assert r["n_images"] == config.n_test
        assert math.isfinite(r["bits_per_dim"]) and r["standard_error"] > 0, r
        assert math.isfinite(r["difference_to_exact"]), r
    exact = bpd["table"][0]
    assert exact["model"].endswith("exact trace") and exact["difference_to_exact"] == 0.0
    assert exact["seconds_per_image"] > 0
    # the exact value is the evaluation inside the training run, and the same compiled solve gives it again
    assert saved["bits_per_dim_over_training"][-1]["mean"] == pytest.approx(exact["bits_per_dim"], abs=1e-9)
    assert saved["exact"]["recheck_max_abs_diff"] <= 1e-5
    assert saved["exact"]["tolerance_check"]["max_abs_diff_bpd"] < 0.1

    # Hutchinson (one probe, averaged over keys) is unbiased: within a few paired standard errors of exact, give or
    # take the solver's error (its two solves take different steps; the tolerance check bounds that error)
    mean_of_keys = next(r for r in bpd["table"] if "mean of" in r["model"])
    solver = saved["exact"]["tolerance_check"]["max_abs_diff_bpd"]
    assert abs(mean_of_keys["difference_to_exact"]) < 4 * mean_of_keys["difference_standard_error"] + 2 * solver
    h = saved["hutchinson"]
    assert [r["k"] for r in h["probes"]] == list(config.hutchinson_probes)
    assert all(r["per_image_std_bpd"] > 0 and r["seconds_per_image"] > 0 for r in h["probes"])
    assert h["k_needed_extrapolated"] >= 1 and "EXTRAPOLATED" in h["note"]
    assert len(h["one_probe"]["mean_per_key"]) == config.hutchinson_keys

    # every fixed-step sampler used exactly the function evaluations asked for; the adaptive one reports its own
    table = saved["samplers"]["table"]
    assert {r["method"] for r in table} == {*config.samplers, "adaptive"}
    for r in table:
        if r["method"] == "adaptive":
            assert r["nfe"] > 0 and r["success"] == 1.0
            continue
        assert r["nfe"] == r["nfe_asked"] == r["nfe_min"] == r["nfe_max"], r
        assert r["n_steps"] == (r["nfe_asked"] // 2 if r["method"] == "heun" else r["nfe_asked"])
        assert math.isfinite(r["frechet_distance"]) and 0.0 <= r["confidence"] <= 1.0
    assert len(table) == len(config.samplers) * len(config.nfe) + 1
    assert set(saved["guidance"]) == {str(w) for w in config.guidance_weights}
    assert all(0.0 <= g["accuracy"] <= 1.0 for g in saved["guidance"].values())
    assert np.isfinite(saved["samplers"]["real_training_digits"]["frechet_distance"])

    assert out["bits_per_dim"]["table"] == bpd["table"]
