"""The training loop: the pure step, exact resume, callbacks, EMA, damaged checkpoints, the NaN guard, bad input;
the names that moved to jsm.checkpoint."""

import json
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jsm
from jsm import checkpoint, nets, objectives, train

from conftest import assert_same_params



@pytest.fixture(scope="module")
def problem():
    """A small DSM problem: (loss, params, data)."""
    apply, params = nets.pure(nets.MLPScore(2, (16, 16), rngs=nnx.Rngs(0)))
    data = jax.random.normal(jax.random.key(1), (200, 2)) * jnp.array([1.0, 0.3])
    loss = lambda p, k, xs: (objectives.dsm(lambda x: apply(p, x), k, xs, 0.5), {"l2": sum(jnp.sum(w**2) for w in jax.tree.leaves(p))})
    return loss, params, data


def run(problem, workdir, steps, **kw):
    loss, params, data = problem
    kw = dict(optimizer=optax.adam(1e-2), key=jax.random.key(0), steps=steps, batch_size=32,
              workdir=workdir, checkpoint_every=20, log_every=10, progress=False, has_aux=True) | kw
    return jsm.fit(loss, params, data, **kw)



def test_stop_and_resume_equals_uninterrupted(problem, tmp_path):
    whole = run(problem, tmp_path / "whole", 60)
    first = run(problem, tmp_path / "parts", 30)
    assert first.step == 30
    resumed = run(problem, tmp_path / "parts", 60)
    assert resumed.step == 60
    assert_same_params(whole.params, resumed.params)
    assert_same_params(whole.opt_state, resumed.opt_state)
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall_s"} for r in h]
    assert strip(whole.history) == strip(resumed.history)
    rows = [json.loads(l) for l in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert all({"step", "loss", "l2"} <= set(r) for r in rows)
    # Without a workdir the same run gives the same parameters.
    assert_same_params(run(problem, None, 60).params, whole.params)


def test_interrupted_save_is_ignored_and_cleaned(problem, tmp_path):
    run(problem, tmp_path, 40)
    ckpts = tmp_path / "checkpoints"
    # What a kill during the save of step 60 leaves behind: a temporary directory.
    partial = ckpts / "60.orbax-checkpoint-tmp-1764100000000"
    shutil.copytree(ckpts / "40", partial)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 50, "loss": 1.0}\n{"step": 6')  # logged after the last checkpoint, cut mid-line
    # Restoring reads only: the one manager that saves deletes the leftover (two at once raced: the
    # slower crashed on files the other had removed, and a multi-host run hung at its next barrier).
    like = train.init_state(problem[1], optax.adam(1e-2), jax.random.key(0))
    assert int(checkpoint.restore_latest(ckpts, like).step) == 40
    time.sleep(0.5)
    assert partial.exists()
    resumed = run(problem, tmp_path, 60)
    assert not partial.exists()
    assert_same_params(resumed.params, run(problem, tmp_path / "fresh", 60).params)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]


def test_typed_and_raw_keys_restore_exactly(problem, tmp_path):
    raw = jax.random.PRNGKey(3)
    a = run(problem, tmp_path / "raw", 20, key=raw)
    b = run(problem, tmp_path / "raw", 40, key=raw)
    c = run(problem, None, 40, key=raw)
    assert_same_params(b.params, c.params)
    state = train.TrainState(jnp.int32(0), a.params, a.opt_state, jax.random.key(3))
    restored = checkpoint.restore_latest(tmp_path / "raw" / "checkpoints", state._replace(key=raw))
    assert int(restored.step) == 40 and restored.key.dtype == jnp.uint32
    np.testing.assert_array_equal(restored.key, raw)
    # The run's workdir is understood as its checkpoints/ folder.
    assert int(checkpoint.restore_latest(tmp_path / "raw", state._replace(key=raw)).step) == 40
    # A template without the run's moving average is refused, saying so.
    run(problem, tmp_path / "ema", 20, key=raw, ema_decay=0.9)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"Only ema_params differs.*ema_decay"):
        checkpoint.restore_latest(tmp_path / "ema", state._replace(key=raw))


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, loop):
    # SGD on log(p) from p = 1 with rate 0.3: p = 0.7, 0.271, -0.836, then log(p) is NaN at step 4.
    loss = lambda p, k, xs: jnp.log(p["p"])
    data = jnp.zeros((4, 1))
    with pytest.raises(train.NonFiniteError, match=r"non-finite at step 4.*checkpoints/2 \(step 2\).*learning rate") as err:
        jsm.fit(loss, {"p": jnp.float32(1.0)}, data, optimizer=optax.sgd(0.3), key=jax.random.key(0),
                steps=10, batch_size=4, workdir=tmp_path, checkpoint_every=2, log_every=1, progress=False, loop=loop)
    assert err.value.step == 4 and err.value.checkpoint_step == 2
    np.testing.assert_allclose(err.value.state.params["p"], 0.7 - 0.3 / 0.7 - 0.3 / (0.7 - 0.3 / 0.7), rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(batch_size=500), ValueError, "batch_size must be <= the number of examples 200, got 500"),
        (dict(steps=-1), ValueError, "steps must be an int >= 0, got -1"),
        (dict(log_every=0), ValueError, "log_every must be an int >= 1"),
        (dict(optimizer=lambda g: g), TypeError, "optimizer must be an optax GradientTransformation"),
        (dict(key=7), TypeError, "key must be a PRNG key"),
        (dict(loop="while"), ValueError, r"loop must be one of \('auto', 'scan', 'python'\), got 'while'"),
    ],
)
def test_bad_arguments_raise(problem, kw, error, match):
    with pytest.raises(error, match=match):
        run(problem, None, **({"steps": 10} | kw))


def test_non_finite_data_is_refused(problem):
    loss, params, data = problem
    bad = data.at[3, 1].set(jnp.inf)
    with pytest.raises(ValueError, match="data must be finite, got 1 non-finite"):
        jsm.fit(loss, params, bad, optimizer=optax.adam(1e-3), key=jax.random.key(0), steps=5, batch_size=8,
                has_aux=True)


def test_nothing_recompiles_on_a_second_call(problem, tmp_path):
    """fit in segments and run_chains called twice with the same shapes compile once; a new optimizer
    object compiles anew (jit's cache is keyed on the loss and the optimizer)."""
    from jsm import samplers

    loss, params, data = problem
    optimizer = optax.adam(1e-2)
    kw = dict(key=jax.random.key(0), batch_size=32, workdir=tmp_path, checkpoint_every=20, log_every=10,
              progress=False, has_aux=True)
    before = train._scan_chunk._cache_size()
    jsm.fit(loss, params, data, steps=20, optimizer=optimizer, **kw)
    assert train._scan_chunk._cache_size() == before + 1
    jsm.fit(loss, params, data, steps=40, optimizer=optimizer, **kw)  # resumes in the same process
    assert train._scan_chunk._cache_size() == before + 1
    jsm.fit(loss, params, data, steps=50, optimizer=optax.adam(1e-2), **kw)
    assert train._scan_chunk._cache_size() == before + 2

    kernel = samplers.ula(lambda x: -x, 0.1)
    before = samplers._run._cache_size()
    samplers.run_chains(kernel, jax.random.key(0), jnp.zeros((8, 2)), 10)
    samplers.run_chains(kernel, jax.random.key(1), jnp.ones((8, 2)), 10)
    assert samplers._run._cache_size() == before + 1


def test_rollback_goes_back_to_the_checkpoint_with_a_new_key(tmp_path):
    """A loss that is NaN for some keys: raising by default, surviving with rollbacks, deterministically."""
    def loss(p, k, xs):
        value = jnp.mean((xs - p["m"]) ** 2)
        return jnp.where(jax.random.uniform(k) < 0.03, jnp.nan, value)

    data = jax.random.normal(jax.random.key(0), (64, 1)) + 3.0
    kw = dict(optimizer=optax.sgd(0.05), key=jax.random.key(0), steps=200, batch_size=16, checkpoint_every=20,
              log_every=10, progress=False)
    with pytest.raises(train.NonFiniteError, match=r"fit\(\.\.\., rollbacks=k\)"):
        jsm.fit(loss, {"m": jnp.float32(0.0)}, data, **kw)
    a = jsm.fit(loss, {"m": jnp.float32(0.0)}, data, workdir=tmp_path / "a", rollbacks=50, **kw)
    b = jsm.fit(loss, {"m": jnp.float32(0.0)}, data, workdir=tmp_path / "b", rollbacks=50, **kw)
    assert a.step == 200 and [r["step"] for r in a.history] == list(range(10, 201, 10))
    assert all(np.isfinite(r["loss"]) for r in a.history)
    np.testing.assert_allclose(a.params["m"], 3.0, atol=0.3)
    assert_same_params(a.params, b.params)
    with pytest.raises(ValueError, match="rollbacks must be an int >= 0"):
        jsm.fit(loss, {"m": jnp.float32(0.0)}, data, rollbacks=-1, **kw)


def test_the_python_loop_takes_the_steps_of_the_scan_and_resumes_bitwise(problem, tmp_path):
    """loop="python" calls the compiled step once per step: the same batches, keys and updates as
    the scan (equal up to float rounding between two compilations), and a stopped run resumed
    with it is bitwise the uninterrupted one."""
    scanned = run(problem, None, 30, loop="scan", log_every=7)  # chunks end at multiples of 7 and of 20
    whole = run(problem, tmp_path / "whole", 30, loop="python", log_every=7)
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in whole.history] == [r["step"] for r in scanned.history] == [7, 14, 20, 21, 28, 30]
    np.testing.assert_allclose([r["loss"] for r in whole.history], [r["loss"] for r in scanned.history], rtol=1e-5)
    run(problem, tmp_path / "parts", 14, loop="python", log_every=7)
    resumed = run(problem, tmp_path / "parts", 30, loop="python", log_every=7)
    assert_same_params((whole.params, whole.opt_state), (resumed.params, resumed.opt_state))


def test_auto_loop_steps_from_python_for_a_convnet_on_cpu(problem):
    """"auto" reads the step's jaxpr: a convolution on CPU devices -> "python", otherwise "scan"."""
    loss, params, data = problem
    optimizer = optax.sgd(0.1)
    cpu = jax.devices("cpu")
    spec = lambda loss: train._Chunk(loss, optimizer, batch_size=4, length=10, stateful=False)
    resolve = lambda loss, params, batch, devices: train._resolve_loop(
        "auto", spec(loss), train.init_state(params, optimizer, jax.random.key(0)), batch, devices)
    conv = nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0))
    graph, conv_params = nnx.split(conv)
    conv_loss = lambda p, k, xs: jnp.mean(nnx.merge(graph, p)(xs) ** 2)
    images = jnp.zeros((4, 5, 5, 1))
    assert resolve(conv_loss, conv_params, images, cpu) == "python"
    assert resolve(lambda p, k, xs: loss(p, k, xs)[0], params, data[:8], cpu) == "scan"

    class Accelerator:
        platform = "gpu"

    assert resolve(conv_loss, conv_params, images, [Accelerator()]) == "scan"
    for given in ("scan", "python"):  # an explicit choice is kept
        assert train._resolve_loop(given, spec(conv_loss), None, images, cpu) == given


# --- the pure step -----------------------------------------------------------------


def batch_of(data, data_key, step, b):
    """fit's documented order, written out: epoch e = t // (n // b) visits the data in
    permutation(fold_in(data_key, e)), b at a time."""
    epoch, i = divmod(int(step), data.shape[0] // b)
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), data.shape[0])
    return data[perm[i * b:(i + 1) * b]]


def test_a_hand_written_loop_of_the_pure_step_is_fit(problem):
    loss, params, data = problem
    optimizer = optax.adam(1e-2)
    state = train.init_state(params, optimizer, jax.random.key(0))
    step = jax.jit(train.make_step(train.stateless(loss, has_aux=True), optimizer))
    data_key = jax.random.split(state.key)[0]
    for _ in range(30):
        state, metrics = step(state, batch_of(data, data_key, state.step, 32))
    assert int(state.step) == 30 and bool(metrics["finite"]) and set(metrics) == {"loss", "l2", "finite"}
    fitted = run(problem, None, 30)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(fitted.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_non_finite_step_is_not_applied():
    # SGD on log(p) from p = 0.1 with rate 1: p - 1/p = -9.9, where log is NaN.
    loss = train.stateless(lambda p, k, xs: jnp.log(p["p"]))
    optimizer = optax.sgd(1.0)
    step = train.make_step(loss, optimizer)
    state = train.init_state({"p": jnp.float32(0.1)}, optimizer, jax.random.key(0))
    state, metrics = step(state, jnp.zeros((1, 1)))
    np.testing.assert_allclose(state.params["p"], 0.1 - 1 / 0.1, rtol=1e-6)
    assert bool(metrics["finite"]) and int(state.step) == 1
    after, metrics = step(state, jnp.zeros((1, 1)))
    assert not bool(metrics["finite"]) and int(after.step) == 1
    assert_same_params((after.params, after.opt_state), (state.params, state.opt_state))


def test_ema_follows_the_updates_and_resumes_bitwise(problem, tmp_path):
    loss, params, data = problem
    optimizer, decay = optax.adam(1e-2), 0.6
    state = train.init_state(params, optimizer, jax.random.key(0), ema_decay=decay)
    step = jax.jit(train.make_step(train.stateless(loss, has_aux=True), optimizer, ema_decay=decay))
    data_key, ema = jax.random.split(state.key)[0], params
    for t in range(20):
        state, _ = step(state, batch_of(data, data_key, state.step, 32))
        beta = min(decay, (1 + t) / (10 + t))  # the warm-up 0.1, 0.18, 0.25, ..., then β = 0.6 from t = 13
        ema = jax.tree.map(lambda m, p: beta * m + (1 - beta) * p, ema, state.params)  # the slow, obvious way
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    whole = run(problem, tmp_path / "whole", 40, ema_decay=decay)
    run(problem, tmp_path / "parts", 20, ema_decay=decay)
    resumed = run(problem, tmp_path / "parts", 40, ema_decay=decay)
    assert_same_params(whole.ema_params, resumed.ema_params)
    assert run(problem, None, 10).ema_params is None
    for bad in (1.0, -0.1, "0.9"):
        with pytest.raises(ValueError, match=rf"ema_decay must be None or a float in \[0, 1\), got {bad!r}"):
            run(problem, None, 10, ema_decay=bad)


def test_the_objective_state_comes_back_on_resume(tmp_path):
    """A stateful objective (a running mean carried between steps, like PCD's replay buffer)."""
    def loss(p, k, xs, state):
        state = 0.9 * state + 0.1 * jnp.mean(xs, axis=0)
        return jnp.mean((xs - p["m"] - state) ** 2), {}, state

    data = jax.random.normal(jax.random.key(0), (64, 2)) + 3.0
    kw = dict(optimizer=optax.sgd(0.05), key=jax.random.key(0), batch_size=16, checkpoint_every=10, log_every=10,
              progress=False, objective_state=jnp.zeros(2))
    params = {"m": jnp.zeros(2)}
    whole = jsm.fit(loss, params, data, steps=40, workdir=tmp_path / "whole", **kw)
    jsm.fit(loss, params, data, steps=20, workdir=tmp_path / "parts", **kw)
    resumed = jsm.fit(loss, params, data, steps=40, workdir=tmp_path / "parts", **kw)
    assert_same_params(whole.objective_state, resumed.objective_state)
    assert_same_params(whole.params, resumed.params)
    with pytest.raises(ValueError, match="has_aux is for a plain loss"):
        jsm.fit(loss, params, data, steps=40, has_aux=True, **kw)


# --- callbacks ---------------------------------------------------------------------


def test_callbacks_run_every_k_steps_and_are_reused_after_a_restart(problem, tmp_path):
    calls = []

    def norm(state):
        calls.append(int(state.step))
        return {"norm": sum(jnp.sum(w**2) for w in jax.tree.leaves(state.params)), "vec": jnp.arange(2)}

    cb = train.Callback("norm", 25, norm)
    first = run(problem, tmp_path, 60, callbacks=[cb])
    assert calls == [25, 50, 60]
    assert [r["step"] for r in first.callbacks["norm"]] == [25, 50, 60] and first.callbacks["norm"][0]["vec"] == [0, 1]
    saved = json.loads((tmp_path / "callbacks" / "norm.json").read_text())
    assert saved == first.callbacks["norm"]
    # The final value is the norm of the final parameters.
    np.testing.assert_allclose(saved[-1]["norm"], sum(float(jnp.sum(w**2)) for w in jax.tree.leaves(first.params)),
                               rtol=1e-6)
    again = run(problem, tmp_path, 60, callbacks=[cb])  # resumes at step 60: nothing to recompute
    assert calls == [25, 50, 60] and again.callbacks == first.callbacks
    # A run resumed from step 40 (its checkpoint) keeps the result at 25 and recomputes the later ones.
    shutil.rmtree(tmp_path / "checkpoints" / "60")
    calls.clear()
    resumed = run(problem, tmp_path, 60, callbacks=[cb])
    assert calls == [50, 60] and resumed.callbacks == first.callbacks
    for bad, error, match in [(train.Callback("a b", 5, norm), ValueError, "callback names must be non-empty words"),
                              (train.Callback("n", 0, norm), ValueError, "callback 'n' every must be an int >= 1"),
                              (norm, TypeError, "callbacks must hold jsm.train.Callback")]:
        with pytest.raises(error, match=match):
            run(problem, None, 10, callbacks=[bad])


# --- damaged and foreign checkpoints -----------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_newest_checkpoint_is_skipped_never_deleted(problem, tmp_path, damage):
    run(problem, tmp_path, 60)  # checkpoints 20, 40, 60
    newest = tmp_path / "checkpoints" / "60"
    files = sorted(p for p in newest.rglob("*") if p.is_file())
    for path in files:  # a copy cut short, or files lost to a disk error
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif "ocdbt" in path.parts[-3:-1] or path.name == "_METADATA":
            path.unlink()
    with pytest.warns(RuntimeWarning, match=r"checkpoints/60 could not be restored .*moved to .*checkpoints\.damaged/60 "
                                            r"and resuming from step 40"):
        resumed = run(problem, tmp_path, 80)
    assert (tmp_path / "checkpoints.damaged" / "60").is_dir()  # kept for the user to inspect
    assert_same_params(resumed.params, run(problem, tmp_path / "fresh", 80).params)
    assert [r["step"] for r in resumed.history] == list(range(10, 81, 10))


def test_a_checkpoint_of_another_model_is_refused_and_nothing_is_overwritten(problem, tmp_path):
    run(problem, tmp_path, 40)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    apply, params = nets.pure(nets.MLPScore(2, (8, 16), rngs=nnx.Rngs(0)))
    loss = lambda p, k, xs: objectives.dsm(lambda x: apply(p, x), k, xs, 0.5)
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"checkpoints/40 holds arrays of other shapes .*layers/0/kernel/value: saved \(2, 16\), "
                             r"this run \(2, 8\).*Nothing in the workdir was changed"):
        run((loss, params, problem[2]), tmp_path, 60, has_aux=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# --- where the checkpoint names live -----------------------------------------------


@pytest.mark.parametrize("name", ["restore_latest", "restore_newest", "CheckpointMismatchError"])
def test_a_checkpoint_name_under_its_old_home_warns_and_is_the_same_object(name):
    with pytest.warns(DeprecationWarning, match=rf"jsm\.train\.{name} moved to jsm\.checkpoint\.{name}"):
        old = getattr(train, name)
    assert old is getattr(checkpoint, name)
    with pytest.raises(AttributeError, match="has no attribute 'restore_everything'"):
        train.restore_everything


def test_importing_the_training_step_loads_neither_orbax_nor_tqdm():
    """Only `fit` imports them (jsm.checkpoint, the progress bar), when it runs."""
    code = "import sys, jsm.train; print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'tqdm'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
