"""`fit` on a mesh of forced host devices, and across 2 processes on localhost with JAX's own runtime.

Each case runs `tests/distributed_fit.py` in fresh processes (the device count and the distributed
runtime are fixed when JAX starts). Float32 all-reduces sum in another order than one device does,
so parameters agree within a few ulps, not bitwise.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = str(Path(__file__).with_name("distributed_fit.py"))
ULPS = dict(rtol=0, atol=2e-6)  # parameters of order 0.1-1 after 40-60 Adam steps


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


def _run(out, *runs, devices=4):
    env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    subprocess.run([sys.executable, WORKER, str(out), *runs], env=env, check=True, capture_output=True, timeout=300)
    return np.load(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hosts(out, run, kill_at=None):
    """Two processes of one device each training together; process 1 killed at step `kill_at` if given
    (STEP[:MOMENT] of tests/kill_at.py; a multiple of log_every, where both processes end a chunk)."""
    port = _free_port()
    procs, logs = [], []
    for pid in (0, 1):
        env = _env(JSM_PROCESS=f"{pid}/2/{port}")
        if kill_at:  # JAX writes cache entries in place: a process killed mid-write would leave a cut one
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
        kill = ["--kill-at", kill_at] if kill_at and pid == 1 else []
        # Output goes to files: a pipe that nobody reads while waiting on the other process fills and blocks.
        logs.append(Path(str(out) + f".{pid}.log"))
        with logs[-1].open("w") as log:
            procs.append(subprocess.Popen([sys.executable, WORKER, str(out), run, *kill], env=env, stdout=log,
                                          stderr=log, stdin=subprocess.DEVNULL))
    if kill_at:
        assert procs[1].wait(timeout=120) == -signal.SIGKILL
        time.sleep(1.0)
        procs[0].kill()  # waits on its dead peer in the next all-reduce (or is stopped by the runtime)
        procs[0].wait()
        return None
    for p, log in zip(procs, logs):
        assert p.wait(timeout=120) == 0, log.read_text()[-3000:]  # a hang fails in 2 minutes, not 5
    return np.load(out)


@pytest.mark.slow
def test_a_four_device_mesh_trains_like_one_device_and_its_checkpoint_resumes_on_one_and_two(tmp_path):
    a = _run(tmp_path / "a.npz", f"4:{tmp_path / 'w4'}:40", "0:-:40", "0:-:60")
    assert (int(a["devices0"]), int(a["devices1"])) == (4, 1)
    assert str(a["batch_error"]) == "batch_size must be a multiple of the mesh's 'data' axis size 4, got 6"
    np.testing.assert_allclose(a["run0"], a["run1"], **ULPS)
    for n in ("1", "2"):
        shutil.copytree(tmp_path / "w4", tmp_path / f"w{n}")
    b = _run(tmp_path / "b.npz", f"0:{tmp_path / 'w1'}:60", f"2:{tmp_path / 'w2'}:60")
    assert (int(b["devices0"]), int(b["devices1"])) == (1, 2)
    np.testing.assert_allclose(b["run0"], a["run2"], **ULPS)  # 40 steps on 4 devices + 20 on 1 = 60 on 1
    np.testing.assert_allclose(b["run1"], a["run2"], **ULPS)


@pytest.mark.slow
def test_two_processes_train_one_model_and_resume_after_one_is_killed(tmp_path):
    ref = _run(tmp_path / "ref.npz", "0:-:40", devices=1)
    together = _hosts(tmp_path / "two.npz", f"all:{tmp_path / 'w'}:40")
    assert int(together["devices0"]) == 2
    np.testing.assert_allclose(together["run0"], ref["run0"], **ULPS)
    # Process 1 dies at step 30 (its last checkpoint: 20); both are started again with the same command.
    assert _hosts(tmp_path / "k.npz", f"all:{tmp_path / 'k'}:40", kill_at="30") is None
    resumed = _hosts(tmp_path / "k.npz", f"all:{tmp_path / 'k'}:40")
    np.testing.assert_array_equal(resumed["run0"], together["run0"])


def test_bad_meshes_are_refused_before_anything_is_written(tmp_path):
    import jax
    import optax

    import jsm

    data = np.zeros((64, 2), np.float32)
    kw = dict(optimizer=optax.sgd(0.1), key=jax.random.key(0), steps=2, workdir=tmp_path / "w", progress=False)
    loss = lambda p, k, xs: ((xs - p) ** 2).mean()
    mesh = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match=r"mesh must have an axis named 'data'.*got axes \('batch',\)"):
        jsm.fit(loss, np.zeros(2, np.float32), data, batch_size=8, mesh=mesh, **kw)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh or None, got str"):
        jsm.fit(loss, np.zeros(2, np.float32), data, batch_size=8, mesh="data", **kw)
    assert not (tmp_path / "w").exists()
