"""The one training loop: `fit`.

`fit` knows an objective only as `loss(params, key, batch) -> loss` (or
`(loss, aux)` with `aux` a dict of scalars to log). An objective that carries
state between steps (the persistent chains of EBM maximum likelihood) passes
`objective_state=` and is called as `loss(params, key, batch, state) -> (loss,
aux, new_state)`; that state is checkpointed and restored with the rest. It brings:

- an optax optimizer (the loop never writes an update rule);
- jitted steps, scanned in chunks of `log_every` so the host syncs once a chunk;
- determinism: the batch and the key of step t are functions of (key, t) alone,
  so a run killed at any moment and started again with the same call ends with
  exactly the parameters of an uninterrupted run;
- orbax checkpoints of the whole state (params, optimizer state, step, key,
  objective state) in
  `<workdir>/checkpoints/`, atomic, the last `keep` kept, and automatic resume;
- metrics as JSON lines in `<workdir>/metrics.jsonl`, one object per logged
  chunk with at least `step` and `loss` (the chunk's mean loss);
- a NaN guard: a step whose loss or gradient is not finite is not applied, the
  run stops with `NonFiniteError`, and the last good checkpoint stays in place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jsm import _validate

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, Array, Array], Any]


class TrainState(NamedTuple):
    step: Array  # () int32: the number of updates applied
    params: PyTree
    opt_state: PyTree
    key: Array  # the run's key; step t uses fold_in(., t), never a split chain
    objective_state: PyTree = None  # e.g. persistent chains; None for stateless objectives


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN or inf; `state` is the last finite state."""

    def __init__(self, message: str, step: int, checkpoint_step: int | None, state: TrainState):
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step
        self.state = state


@dataclasses.dataclass
class FitResult:
    params: PyTree
    opt_state: PyTree
    step: int
    history: list[dict]  # the rows of metrics.jsonl, resumed runs included
    objective_state: PyTree = None


def _loss_and_aux(loss_fn: LossFn, stateful: bool) -> Callable[..., tuple[Array, tuple[dict, PyTree]]]:
    """loss(params, key, batch, state) -> (loss, (aux, new_state)), whatever loss_fn returns."""

    def wrapped(params, key, batch, state):
        if stateful:
            loss, aux, state = loss_fn(params, key, batch, state)
        else:
            out = loss_fn(params, key, batch)
            loss, aux = out if isinstance(out, tuple) else (out, {})
        return loss, (dict(aux), state)

    return wrapped


def _all_finite(tree: PyTree) -> Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


@functools.lru_cache(maxsize=16)
def _make_chunk(loss_fn: LossFn, optimizer: optax.GradientTransformation, batch_size: int, length: int,
                stateful: bool):
    """A jitted function running up to `length` steps, stopping at `end` or at a non-finite step.

    Cached on its arguments, so that calling `fit` again with the same loss and optimizer
    objects (training in segments, resuming in the same process) compiles nothing new.
    """
    grad_fn = jax.value_and_grad(_loss_and_aux(loss_fn, stateful), has_aux=True)

    def batch_at(data: Array, data_key: Array, step: Array) -> Array:
        n = data.shape[0]
        epoch, i = jnp.divmod(step, n // batch_size)
        perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), n)
        return data[jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)]

    @jax.jit
    def run_chunk(state: TrainState, data: Array, end: Array):
        data_key, loss_key = jax.random.split(state.key)

        def body(carry, _):
            state, halted = carry
            batch = batch_at(data, data_key, state.step)
            key = jax.random.fold_in(loss_key, state.step)
            (loss, (aux, obj_state)), grads = grad_fn(state.params, key, batch, state.objective_state)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            active = (state.step < end) & ~halted
            finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(obj_state)
            take = active & finite
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(take, a, b), new, old)
            state = TrainState(
                state.step + take.astype(state.step.dtype),
                keep(params, state.params),
                keep(opt_state, state.opt_state),
                state.key,
                keep(obj_state, state.objective_state),
            )
            return (state, halted | (active & ~finite)), (loss, aux, take)

        (state, halted), (losses, aux, taken) = jax.lax.scan(
            body, (state, jnp.bool_(False)), None, length=length
        )
        return state, halted, losses, aux, taken

    return run_chunk


# --- checkpoints ---------------------------------------------------------------


def _to_saveable(state: TrainState) -> dict:
    key = state.key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "key": key,
            "objective_state": state.objective_state}


def _from_saved(saved: dict, like: TrainState) -> TrainState:
    key = saved["key"]
    if jnp.issubdtype(like.key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key, impl=jax.random.key_impl(like.key))
    return TrainState(jnp.asarray(saved["step"]), saved["params"], saved["opt_state"], key,
                      saved["objective_state"])


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def restore_latest(directory: str | Path, like: TrainState) -> TrainState | None:
    """The newest finalised checkpoint under `directory`, shaped like `like`; None if there is none.

    Orbax writes each checkpoint to a temporary directory and renames it when
    complete, so a save interrupted by a kill is never restored.
    """
    directory = Path(directory)
    if not directory.exists():
        return None
    with _manager(directory, keep=1_000_000) as mgr:
        step = mgr.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
        saved = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    return _from_saved(saved, like)


# --- metrics -------------------------------------------------------------------


def _read_metrics(path: Path, up_to: int) -> list[dict]:
    """Rows of metrics.jsonl with step <= up_to; rewrites the file to hold only those.

    A run killed after its last checkpoint may have logged steps that the
    resumed run will log again, and a kill mid-write leaves a partial line.
    """
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", math.inf) <= up_to:
                rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _chunk_row(step: int, losses, aux, taken, wall_s: float) -> dict:
    taken = np.asarray(taken)
    row = {"step": step, "loss": float(np.mean(np.asarray(losses)[taken]))}
    for name, values in aux.items():
        row[name] = float(np.mean(np.asarray(values)[taken]))
    row["wall_s"] = round(wall_s, 3)  # the only field that differs between identical runs
    return row


# --- the loop ------------------------------------------------------------------


def _roll_back(state: TrainState, start: TrainState, mgr, last_saved: int | None, bad_step: int):
    """The last good checkpoint (or the start), with the failed attempt's key folded with bad_step.

    Folding the key of the attempt that failed (not the checkpoint's) chains the keys of
    successive rollbacks, so two failures at the same step never reuse a key.
    """
    good = start
    if mgr is not None and last_saved is not None:
        mgr.wait_until_finished()
        good = restore_latest(mgr.directory, state)
    good = jax.device_put(good._replace(key=jax.random.fold_in(state.key, bad_step)), jax.devices()[0])
    return good, int(good.step)


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


def fit(
    loss_fn: LossFn,
    params: PyTree,
    data: Array,
    *,
    optimizer: optax.GradientTransformation,
    key: Array,
    steps: int,
    batch_size: int = 256,
    workdir: str | Path | None = None,
    checkpoint_every: int = 1000,
    keep: int = 3,
    log_every: int = 100,
    progress: bool = True,
    objective_state: PyTree = None,
    rollbacks: int = 0,
) -> FitResult:
    """Minimise E_batch[loss(params, key, batch)] with `optimizer` for `steps` steps.

    Args:
      loss_fn: loss(params, key, batch) -> () or ((), dict of () arrays).
      params: the initial parameters (any pytree; an `nnx.State` from `jsm.nets.pure`).
      data: (n, d) training examples; each epoch visits them in a new random order,
        `batch_size` at a time (the remainder of n / batch_size is skipped that epoch).
      optimizer: an optax `GradientTransformation`.
      key: the run's PRNG key; step t uses fold_in(key, t).
      steps: total number of updates (a resumed run counts those already done).
      batch_size: examples per step.
      workdir: where `checkpoints/` and `metrics.jsonl` live; None keeps everything in memory.
      checkpoint_every: save every this many steps, and at the end.
      keep: how many checkpoints to keep.
      log_every: steps per logged row (and per host sync).
      progress: show a progress bar.
      objective_state: the initial state of a stateful objective (see the module doc);
        None for `loss(params, key, batch)`.
      rollbacks: how many times a non-finite step may be survived: the run goes back to
        its last good checkpoint (or the start), replaces the key by fold_in(key, bad step)
        (the key of the attempt that failed) and goes on. The new key is a function of the old one and the step, so a killed
        and restarted run rolls back the same way. 0 raises at once.

    Returns:
      FitResult with the final params, optimizer state, objective state, step and the logged rows.

    Raises:
      NonFiniteError: a loss or gradient was not finite; nothing after the last
        finite step was applied or saved.
    """
    data = _validate.batch("data", data)
    _validate.key("key", key)
    steps = _validate.positive_int("steps", steps, minimum=0)
    batch_size = _validate.positive_int("batch_size", batch_size)
    checkpoint_every = _validate.positive_int("checkpoint_every", checkpoint_every)
    keep = _validate.positive_int("keep", keep)
    log_every = _validate.positive_int("log_every", log_every)
    rollbacks = _validate.positive_int("rollbacks", rollbacks, minimum=0)
    if batch_size > data.shape[0]:
        raise ValueError(f"batch_size must be <= the number of examples {data.shape[0]}, got {batch_size}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")

    stateful = objective_state is not None
    state = TrainState(jnp.asarray(0, jnp.int32), params, optimizer.init(params), key, objective_state)
    # Committed to the device like a restored state, so a fresh and a resumed run share one compile.
    state = jax.device_put(state, jax.devices()[0])
    mgr = metrics_path = None
    history: list[dict] = []
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        metrics_path = workdir / "metrics.jsonl"
        restored = restore_latest(workdir / "checkpoints", state)
        if restored is not None:
            state = restored
        history = _read_metrics(metrics_path, int(state.step))
        mgr = _manager(workdir / "checkpoints", keep)

    run_chunk = _make_chunk(loss_fn, optimizer, batch_size, min(log_every, checkpoint_every), stateful)
    step = int(state.step)
    last_saved = step if mgr is not None and mgr.latest_step() is not None else None
    start_state = state  # where a rollback goes when no checkpoint was saved yet
    bar = tqdm(total=steps, initial=min(step, steps), disable=not progress, desc="fit", unit="step")
    try:
        while step < steps:
            t0 = time.perf_counter()
            end = min(_next_multiple(step, log_every), _next_multiple(step, checkpoint_every), steps)
            new_state, halted, losses, aux, taken = run_chunk(state, data, jnp.asarray(end, jnp.int32))
            new_step = int(new_state.step)
            if bool(halted) and rollbacks > 0:
                rollbacks -= 1
                state, step = _roll_back(state, start_state, mgr, last_saved, new_step + 1)
                history = [row for row in history if row["step"] <= step]
                if metrics_path is not None:
                    _read_metrics(metrics_path, step)
                bar.reset(total=steps)
                bar.update(step)
                bar.write(f"fit: non-finite at step {new_step + 1}; rolled back to step {step} with a new key "
                          f"({rollbacks} rollbacks left)")
                continue
            if bool(halted):
                where = f"{mgr.directory}/{last_saved}" if last_saved is not None else "none saved yet"
                raise NonFiniteError(
                    f"fit: the loss or a gradient became non-finite at step {new_step + 1}; "
                    f"that update was not applied. Last good checkpoint: {where} "
                    f"(step {last_saved}). Try a smaller learning rate, gradient clipping "
                    f"(optax.clip_by_global_norm), a larger noise scale / energy penalty, or "
                    f"fit(..., rollbacks=k) to go back to the checkpoint with a new key.",
                    step=new_step + 1,
                    checkpoint_step=last_saved,
                    state=new_state,
                )
            state = new_state
            row = _chunk_row(new_step, losses, aux, taken, time.perf_counter() - t0)
            history.append(row)
            if metrics_path is not None:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if mgr is not None and (new_step % checkpoint_every == 0 or new_step == steps):
                mgr.save(new_step, args=ocp.args.StandardSave(_to_saveable(state)))
                last_saved = new_step
            bar.update(new_step - step)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            step = new_step
    finally:
        bar.close()
        if mgr is not None:
            mgr.wait_until_finished()
            mgr.close()
    return FitResult(state.params, state.opt_state, int(state.step), history, state.objective_state)
