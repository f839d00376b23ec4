"""Each experiment runs end to end at a tiny size and leaves its files and numbers behind."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# experiments/ is on the path (pyproject's pythonpath), as it is for the scripts themselves.
import annealed_langevin
import gan_modes
import kl_directions
import langevin_step_size
import score_matching_2d
import tour
from jsm import data, nets, runs, targets


@pytest.mark.slow
@pytest.mark.parametrize("objective", score_matching_2d.OBJECTIVES)
def test_score_matching_2d(objective, tmp_path):
    config = score_matching_2d.Config(
        workdir=str(tmp_path), objective=objective, steps=40, checkpoint_every=20, log_every=20, hidden=(16,),
        n_train=512, n_test=256, n_chains=64, langevin_steps=5, progress=False,
    )
    out = score_matching_2d.main(config)
    for name in ("config.json", "metrics.jsonl", "results.json", "figures/score_field.png", "figures/loss.png"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "checkpoints" / "40").is_dir()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["objective"] == objective and "orbax-checkpoint" in saved["versions"]
    assert out["fisher_divergence"] > 0 and out["langevin_nonfinite_chains"] == 0


def test_changed_config_refuses_to_resume(tmp_path):
    config = score_matching_2d.Config(workdir=str(tmp_path), progress=False)
    runs.prepare_workdir(config)
    runs.prepare_workdir(score_matching_2d.Config(workdir=str(tmp_path), steps=10, progress=False))  # steps may grow
    with pytest.raises(ValueError, match=r"another config \(sigma: 0.15 -> 0.5\)"):
        runs.prepare_workdir(score_matching_2d.Config(workdir=str(tmp_path), sigma=0.5))


def test_command_line_flags_cover_the_config():
    config = runs.parse_config(score_matching_2d.Config, ["--workdir", "w", "--steps", "7", "--seed", "3",
                                                          "--objective", "ism", "--hidden", "8,8", "--no-progress"])
    assert (config.workdir, config.steps, config.seed, config.objective, config.hidden, config.progress) == (
        "w", 7, 3, "ism", (8, 8), False)
    with pytest.raises(SystemExit):
        runs.parse_config(score_matching_2d.Config, ["--objective", "mle"])


@pytest.mark.slow
def test_langevin_step_size(tmp_path):
    config = langevin_step_size.Config(workdir=str(tmp_path), steps=200, every=100, n_chains=256,
                                       step_sizes=(0.01, 0.3), progress=False)
    out = langevin_step_size.main(config)
    assert (tmp_path / "figures" / "bias.png").exists()
    assert out["mala_acceptance"]["0.01"] > out["mala_acceptance"]["0.3"]
    assert len(out["ula"]["0.01"]) == 2 and out["floor"] > 0


@pytest.mark.slow
def test_annealed_langevin(tmp_path):
    config = annealed_langevin.Config(workdir=str(tmp_path), steps=50, n_chains=512, n_levels=5, n_steps_each=40,
                                      hidden=(16,), n_train=1024, log_every=25, checkpoint_every=50, progress=False)
    out = annealed_langevin.main(config)
    assert (tmp_path / "figures" / "samples.png").exists() and config.ema_decay == 0.99
    assert abs(out["plain Langevin, exact score"] - 0.8) > 0.15  # stuck at the initial split
    assert abs(out["annealed, exact noised score"] - 0.8) < 0.08


@pytest.mark.parametrize("script", ["score_matching_2d", "annealed_langevin"])
def test_learned_scores_are_the_moving_average_of_the_parameters(script, tmp_path):
    """With ema_decay = β the scripts evaluate and sample s at θ̄ (fit's ema_params), not at the last θ."""
    x = jnp.array([0.3, -0.2])
    if script == "score_matching_2d":
        config = score_matching_2d.Config(workdir=str(tmp_path), steps=4, log_every=2, checkpoint_every=4, hidden=(8,),
                                          n_train=512, ema_decay=0.5, progress=False)
        score, result = score_matching_2d.train(config)
        apply, _ = nets.pure(nets.MLPScore(2, (8,), rngs=nnx.Rngs(config.seed)))
        at = lambda params: apply(params, x)
        got = score(x)
    else:
        config = annealed_langevin.Config(workdir=str(tmp_path), steps=4, log_every=2, checkpoint_every=4,
                                          hidden=(8,), n_train=512, ema_decay=0.5, progress=False)
        score, result = annealed_langevin.train_ncsn(config, annealed_langevin.make_target())
        apply, _ = nets.pure(nets.NoiseConditionalScore(2, (8,), rngs=nnx.Rngs(config.seed)))
        at = lambda params: apply(params, x, 0.5)
        got = score(x, 0.5)
    np.testing.assert_allclose(got, at(result.ema_params), rtol=1e-6)
    assert not np.allclose(got, at(result.params))
    with pytest.raises(ValueError, match=r"config.ema_decay must be in \[0, 1\)"):
        module = score_matching_2d if script == "score_matching_2d" else annealed_langevin
        fn = module.train if script == "score_matching_2d" else (lambda c: module.train_ncsn(c, module.make_target()))
        fn(dataclasses.replace(config, ema_decay=-0.1))


@pytest.mark.slow
def test_kl_directions_forward_covers_reverse_seeks(tmp_path):
    out = kl_directions.main(kl_directions.Config(workdir=str(tmp_path), steps=600, progress=False))
    fwd, rev = out["forward"], out["reverse"]
    assert 0.45 < fwd["mass_on_left_mode_side"] < 0.7  # one Gaussian over both modes
    assert min(rev["mass_on_left_mode_side"], 1 - rev["mass_on_left_mode_side"]) < 0.01  # on one mode only
    assert fwd["forward_kl"] < rev["forward_kl"] and rev["reverse_kl"] < fwd["reverse_kl"]  # each wins its own KL


def test_mode_scores_count_modes_and_quality(key):
    ring = targets.Ring(8, 2.0, 0.1)
    exact = gan_modes.mode_scores(ring.sample(key, 4000), ring, key)
    assert exact["modes_covered"] == 8 and exact["high_quality"] > 0.98
    collapsed = ring.means[0] + 0.1 * jax.random.normal(key, (4000, 2))
    one = gan_modes.mode_scores(collapsed, ring, key)
    assert one["modes_covered"] == 1 and one["high_quality"] > 0.98 and one["sliced_w1"] > 10 * exact["sliced_w1"]


@pytest.mark.slow
def test_gan_modes_runs_all_three_models(tmp_path):
    config = gan_modes.Config(workdir=str(tmp_path), steps=20, gan_steps=40, evaluations=2, hidden=(16,), n_train=1024,
                              n_samples=256, progress=False)
    out = gan_modes.main(config)
    assert (tmp_path / "figures" / "samples.png").exists()
    assert set(out) >= {"GAN", "EBM (PCD)", "score model (NCSN)", "exact samples", "gan_over_training"}
    assert [r["step"] for r in out["gan_over_training"]] == [20, 40]


def test_tour_identities_hold_for_any_model(key):
    ring = targets.Ring(8, 2.0, 0.3)
    for s in (lambda x: -x, lambda x: jnp.tanh(x) - 0.3 * x):
        ids = tour.identities(s, ring, 0.2, key)
        assert abs(ids["J_ESM-J_ISM"] - ids["C"]) < 5 * ids["se1"]
        assert abs(ids["J_ESM(p_sigma)-J_DSM"] - ids["C'"]) < 5 * ids["se2"]


def test_tour_reuses_finished_sections(tmp_path, monkeypatch):
    calls = []

    def fake(config, out):
        calls.append(out)
        return tour.Section("t", "x", {"v": 1.0}, [])

    config = tour.Config(workdir=str(tmp_path), steps=5, progress=False)
    first = tour.run_section("fake", fake, config, tmp_path)
    again = tour.run_section("fake", fake, config, tmp_path)
    assert len(calls) == 1 and again.metrics["v"] == first.metrics["v"] == 1.0
    tour.run_section("fake", fake, tour.Config(workdir=str(tmp_path), steps=6, progress=False), tmp_path)
    assert len(calls) == 2  # other settings: the section runs again


@pytest.mark.slow
def test_dsm_variance(tmp_path):
    import dsm_variance

    config = dsm_variance.Config(workdir=str(tmp_path), steps=20, sigmas=(1.0, 0.01), n_draws=20, evaluations=1,
                                 hidden=(16,), n_train=1024, n_test=256, progress=False)
    out = dsm_variance.main(config)
    assert (tmp_path / "figures" / "variance.png").exists()
    ratios = out["variance_ratio_at_sigma=0.01"]
    assert ratios["antithetic"] > 100 and ratios["control_variate"] > 100


def test_digits_split_is_fixed_by_seed_and_stratified():
    from jsm import data

    a, b, c = data.digits(0), data.digits(0), data.digits(1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)
    assert a.x_train.shape == (1347, 64) and a.x_test.shape == (450, 64)
    assert a.x_train.min() == 0.0 and a.x_train.max() == 1.0  # the 17 grey levels 0..16, divided by 16
    np.testing.assert_array_equal(np.unique(a.x_train * 16), np.arange(17))
    assert np.all(np.bincount(a.y_test, minlength=10) >= 40)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        data.digits(0, test_fraction=1.0)


@pytest.mark.slow
def test_digits_experiment_scores_every_set(tmp_path):
    import digits

    config = digits.Config(workdir=str(tmp_path), steps=20, hidden=(32,), n_levels=3, n_steps_each=5, log_every=10,
                           checkpoint_every=20, progress=False)
    out = digits.main(config)
    assert (tmp_path / "figures" / "samples.png").exists() and out["classifier_test_accuracy"] > 0.9
    assert out["net"] == "mlp" and out["steps"] == 20 and out["ema_decay"] == digits.EMA_DECAY
    assert out["training_seconds"] > 0
    real = out["real held-out digits"]
    assert real["confidence"] > 0.8 and real["class_balance"] > 0.99 and abs(real["mmd2_to_held_out"]) < 0.01
    assert out["Gaussian baseline"]["inception_score"] < real["inception_score"]


@pytest.mark.slow
def test_digits_unet_trains_on_images_and_samples_from_the_moving_average(tmp_path):
    """--net unet: ncsn on (n, 8, 8, 1) digits, chains of (8, 8, 1) images, samples returned as (n, 64);
    the score is the network at the moving average θ̄ of the parameters, not at the last θ."""
    import digits

    config = digits.Config(workdir=str(tmp_path), net="unet", steps=3, base=8, channel_mults=(1,), n_levels=2,
                           n_steps_each=1, log_every=3, checkpoint_every=3, ema_decay=0.5, progress=False)
    split = data.digits(config.seed)
    score, result = digits.train(config, split)
    x, sigma = jnp.full((8, 8, 1), 0.3), jnp.float32(0.5)
    assert score(x, sigma).shape == (8, 8, 1)
    centred = split.x_train - split.x_train.mean(0)
    apply, _ = nets.pure(digits.network(config, float(centred.std())))
    mean = jnp.asarray(split.x_train.mean(0)).reshape(8, 8, 1)
    np.testing.assert_allclose(score(x, sigma), apply(result.ema_params, x - mean, sigma), rtol=1e-6, atol=1e-6)
    assert not np.allclose(score(x, sigma), apply(result.params, x - mean, sigma))
    xs = digits.sample(config, score, 5)
    assert xs.shape == (5, 64) and np.all((xs >= 0) & (xs <= 1))


def test_digits_config_refuses_an_unknown_net_or_decay(tmp_path):
    import digits

    for config, match in ((digits.Config(workdir=str(tmp_path), net="resnet"), r"config.net must be one of \('mlp', 'unet'\)"),
                          (digits.Config(workdir=str(tmp_path), ema_decay=1.0), r"config.ema_decay must be in \[0, 1\)")):
        with pytest.raises(ValueError, match=match):
            digits.train(config, data.digits(0))
    assert runs.parse_config(digits.Config, ["--net", "unet", "--ema-decay", "0"]).net == "unet"
    with pytest.raises(SystemExit):
        runs.parse_config(digits.Config, ["--net", "resnet"])


def test_benchmarks_run_at_a_tiny_size(tmp_path):
    import chain_throughput
    import trace_cost

    rows = trace_cost.main(["--dims", "2", "--score-net-dims", "2", "--inference-dims", "2", "--memory-dims", "8",
                            "--diagonal-dims", "4", "--reps", "1", "--out", str(tmp_path / "t.json")])
    assert {r["method"] for r in rows} >= {"forward", "jacfwd", "jacrev", "hutchinson", "ssm", "dsm"}
    assert {r["net"] for r in rows} == {"energy", "score"}
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [(r["net"], r["d"], r["method"]) for r in saved["rows"]] == [(r["net"], r["d"], r["method"]) for r in rows]
    assert {r["what"] for r in saved["diagonal"]} == {"laplacian", "diagonal", "diagonal jacfwd", "ism step",
                                                       "ism step λ=0.1"}
    rows = chain_throughput.main(["--chains", "16", "--steps", "5", "--reps", "1", "--out", str(tmp_path / "c.json")])
    assert len([r for r in rows if r["sampler"].startswith("jsm")]) == 4
