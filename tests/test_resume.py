"""Whole experiments killed with SIGKILL (at chosen steps, before, during and after a save, through the
test-only wrapper tests/kill_at.py) and started again: they end exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from jsm import checkpoint, nets, train

from conftest import assert_same_params

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = str(Path(__file__).with_name("kill_at.py"))

SMALL = ["--steps", "300", "--checkpoint-every", "30", "--log-every", "15", "--hidden", "32,32",
         "--n-train", "2000", "--n-test", "500", "--n-chains", "64", "--langevin-steps", "10", "--no-progress"]
# PCD with its replay buffer: 2 evaluation segments, each resuming the run inside the script.
SMALL_PCD = ["--method", "pcd", "--steps", "120", "--evaluations", "2", "--checkpoint-every", "10", "--log-every", "10",
             "--hidden", "16,16", "--n-train", "1024", "--n-test", "256", "--batch-size", "64", "--buffer-size", "256",
             "--grid-n", "32", "--long-run-chains", "64", "--steps-langevin", "5", "--no-progress"]


def _command(script, workdir, args, kill_at=None):
    """`python experiments/<script> --workdir ...`, or through tests/kill_at.py to be killed at `kill_at`."""
    wrapper = [] if kill_at is None else [KILL_AT, kill_at]
    return [sys.executable, *wrapper, str(ROOT / "experiments" / script), "--workdir", str(workdir), *args]


def _finalised_steps(checkpoints: Path):
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []


def _completes(command: list[str], env: dict) -> None:
    proc = subprocess.run(command, env=env, capture_output=True)
    assert proc.returncode == 0, f"{' '.join(command[1:3])} failed ({proc.returncode}): {proc.stderr.decode()[-3000:]}"


def _kill_and_resume(tmp_path, script, args, kill_at, run_dir=""):
    """Run once whole; run again killed at each `kill_at` (STEP[:MOMENT] of tests/kill_at.py: before,
    during or after a save), each time the same command under the wrapper, and finally without it
    to the end; return the two workdirs. `run_dir` is where the checkpoints live. Chosen moments,
    not wall-clock ones: the same kills on any machine, at any load."""
    # A persistent compilation cache shared by the runs: each restart skips the compiles.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _completes(_command(script, whole, args), env)
    for spec in kill_at:
        proc = subprocess.run(_command(script, killed, args, kill_at=spec), env=env, capture_output=True)
        assert proc.returncode == -signal.SIGKILL, f"not killed at {spec}: {proc.stderr.decode()[-2000:]}"
    _completes(_command(script, killed, args), env)
    return whole / run_dir, killed / run_dir


def _logged(run_dir: Path, *fields):
    return [tuple(r[f] for f in fields) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


# A run of 40 steps logged every 10, saved every 20, with a callback every 10 (a workdir as its argument).
TINY_RUN = """
import sys
import jax, jax.numpy as jnp, optax
import jsm
jsm.fit(lambda p, k, xs: jnp.mean((xs - p) ** 2), jnp.zeros(2), jnp.ones((64, 2)), optimizer=optax.sgd(0.1),
        key=jax.random.key(0), steps=40, batch_size=16, workdir=sys.argv[1], checkpoint_every=20, log_every=10,
        progress=False, callbacks=[jsm.train.Callback("seen", 10, lambda state: {})])
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before_save", "during_save", "after_save"])
def test_the_kill_wrapper_stops_a_run_at_the_chosen_step_and_moment(tmp_path, moment):
    """Step 20, a save step: logged at each moment; before_save, ahead of its callbacks and its save;
    during_save, with the save begun and the callbacks done; after_save, with checkpoint 20 complete."""
    (tmp_path / "tiny.py").write_text(TINY_RUN)
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, KILL_AT, f"20:{moment}", str(tmp_path / "tiny.py"), str(workdir)],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert _logged(workdir, "step") == [(10,), (20,)]
    called = [r["step"] for r in json.loads((workdir / "callbacks" / "seen.json").read_text())]
    saves = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    if moment == "before_save":
        assert called == [10] and saves == []
    elif moment == "during_save":  # orbax finishes it in the background: most often still a temporary directory
        assert called == [10, 20] and len(saves) == 1 and saves[0].startswith("20")
    else:
        assert called == [10, 20] and saves == ["20"]


@pytest.mark.slow
def test_killed_experiment_resumes_to_identical_parameters(tmp_path):
    """score_matching_2d.py killed mid-chunk, in the middle of a save and right after one: parameters,
    optimizer state, EMA, metrics and results equal the uninterrupted run's."""
    whole, killed = _kill_and_resume(tmp_path, "score_matching_2d.py", SMALL,
                                     kill_at=["75", "150:during_save", "240:after_save"])
    assert json.loads((whole / "results.json").read_text()) == json.loads((killed / "results.json").read_text())
    assert _logged(whole, "step", "loss") == _logged(killed, "step", "loss")
    apply, params = nets.pure(nets.MLPScore(2, (32, 32), rngs=nnx.Rngs(0)))
    # score_matching_2d.py samples at the EMA of the parameters: the checkpoints carry it.
    like = train.TrainState(jnp.int32(0), params, optax.adam(1e-3).init(params), jax.random.key(0), None, params)
    a, b = (checkpoint.restore_latest(d / "checkpoints", like) for d in (whole, killed))
    assert int(a.step) == int(b.step) == 300
    assert_same_params(a.params, b.params)
    assert_same_params(a.opt_state, b.opt_state)
    assert_same_params(a.ema_params, b.ema_params)


@pytest.mark.slow
def test_killed_dsm_variance_reports_the_evaluations_of_an_uninterrupted_run(tmp_path):
    """Its Fisher divergences are taken inside the run (a callback), never at a resumed checkpoint."""
    args = ["--steps", "40", "--evaluations", "4", "--sigmas", "1.0,0.01", "--n-draws", "8", "--hidden", "8",
            "--n-train", "512", "--n-test", "128", "--checkpoint-every", "10", "--log-every", "10", "--no-progress"]
    whole, killed = _kill_and_resume(tmp_path, "dsm_variance.py", args, kill_at=["30", "20:during_save"])
    assert json.loads((whole / "results.json").read_text()) == json.loads((killed / "results.json").read_text())
    saved = json.loads((killed / "plain" / "callbacks" / "fisher.json").read_text())
    assert [r["step"] for r in saved] == [10, 20, 30, 40]


@pytest.mark.slow
def test_killed_pcd_run_resumes_to_identical_parameters_and_chains(tmp_path):
    """ebm_mle.py --method pcd, killed at chosen steps: before a save (evaluation due, metrics logged past the
    checkpoint), in the middle of one, and right after one. The replay buffer must come back too."""
    whole, killed = _kill_and_resume(tmp_path, "ebm_mle.py", SMALL_PCD, run_dir="pcd",
                                     kill_at=["60", "90:during_save", "100:after_save"])
    assert json.loads((whole.parent / "results.json").read_text()) == json.loads((killed.parent / "results.json").read_text())
    assert _logged(whole, "step", "loss", "energy_gap") == _logged(killed, "step", "loss", "energy_gap")
    apply, params = nets.pure(nets.MLPEnergy(2, (16, 16), rngs=nnx.Rngs(0)))
    buffer = jnp.zeros((256, 2))
    opt_state = optax.adam(1e-3, b1=0.5).init(params)
    like = train.TrainState(jnp.int32(0), params, opt_state, jax.random.key(0), buffer)
    a, b = (checkpoint.restore_latest(d / "checkpoints", like) for d in (whole, killed))
    assert int(a.step) == int(b.step) == 120
    assert_same_params(a.params, b.params)
    assert_same_params(a.opt_state, b.opt_state)
    assert_same_params(a.objective_state, b.objective_state)


