"""Training: a pure step (`init_state`, `make_step`) and the driver built on it (`fit`).

The step is the whole algorithm, a pure function a researcher can call in a loop of
their own (two optimizers, their own schedule of evaluations, another data pipeline):

    state = init_state(params, optimizer, key)
    step = jax.jit(make_step(loss_fn, optimizer))
    for batch in batches:
        state, metrics = step(state, batch)

Inside, every objective has ONE signature,

    loss(params, key, batch, state) -> (loss, aux, state),

`aux` a dict of scalars to log and `state` what the objective carries between steps
(the persistent chains of EBM maximum likelihood; None for most). A plain
`loss(params, key, batch)` enters through `stateless(loss, has_aux=...)`.

`fit` drives the step: jitted chunks of `log_every` steps (one host sync a chunk),
batches drawn as a function of (key, step) alone, orbax checkpoints of the whole
state (atomic, the last `keep` kept, automatic resume, damaged ones skipped), metrics
as JSON lines, callbacks every k steps whose results are saved and reused after a
restart, rollback on a non-finite step, a moving average (EMA) of the parameters,
and a progress bar. A run killed at any moment and started again with the same call
ends with exactly the parameters, metrics and callback results of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.extend import core as jcore
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jsm import _validate
from jsm.runs import save_json

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, Array, Array, PyTree], tuple[Array, dict, PyTree]]
PlainLossFn = Callable[[PyTree, Array, Array], Any]

# Test hook: `JSM_TEST_KILL_AT=<step>[:<moment>]` makes `fit` kill its own process with SIGKILL
# when the run reaches <step>, at one of these moments (default "before_save"). Kill tests use it
# to stop a run at chosen steps instead of wall-clock moments.
KILL_MOMENTS = ("before_save", "during_save", "after_save")


class TrainState(NamedTuple):
    step: Array  # () int32: the number of updates applied
    params: PyTree
    opt_state: PyTree
    key: Array  # the run's key; step t uses fold_in(., t), never a split chain
    objective_state: PyTree = None  # e.g. persistent chains; None for stateless objectives
    ema_params: PyTree = None  # the moving average of params; None without EMA


class Callback(NamedTuple):
    """`fn(state) -> dict` run by `fit` at every step that is a multiple of `every`, and at the last.

    Its results (JSON-able values; arrays become lists) are saved in
    `<workdir>/callbacks/<name>.json` before the checkpoint of that step, and a
    restarted run reuses them instead of calling `fn` again.
    """

    name: str
    every: int
    fn: Callable[[TrainState], dict]


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
    ema_params: PyTree = None  # the moving average of params, with fit(..., ema_decay=...)
    callbacks: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # name -> rows {"step", ...}


# --- the pure step -------------------------------------------------------------


def stateless(loss_fn: PlainLossFn, *, has_aux: bool = False) -> LossFn:
    """loss(params, key, batch) -> loss (or (loss, aux) with has_aux) as the one signature.

    The objective state passes through unchanged.
    """

    def full(params, key, batch, state):
        out = loss_fn(params, key, batch)
        loss, aux = out if has_aux else (out, {})
        return loss, aux, state

    return full


def _all_finite(tree: PyTree) -> Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def _ema_decay(ema_decay) -> float | None:
    if ema_decay is not None and not (isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0):
        raise ValueError(f"ema_decay must be None or a float in [0, 1), got {ema_decay!r}")
    return None if ema_decay is None else float(ema_decay)


def ema_warmup(decay: float, step: Array) -> Array:
    """β_t = min(β, (1 + t) / (10 + t)) at update t = 0, 1, ...: the average forgets the initial
    parameters within the first few hundred steps of a short run, and is β's from t ≈ 10 / (1 - β)."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def init_state(params: PyTree, optimizer: optax.GradientTransformation, key: Array, objective_state: PyTree = None,
               *, ema_decay: float | None = None) -> TrainState:
    """The state at step 0: params, optimizer.init(params), the run's key, the objective's state,
    and a copy of params as the moving average when `ema_decay` is given."""
    _validate.key("key", key)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
    ema = jax.tree.map(jnp.array, params) if _ema_decay(ema_decay) is not None else None
    return TrainState(jnp.asarray(0, jnp.int32), params, optimizer.init(params), key, objective_state, ema)


def make_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, ema_decay: float | None = None):
    """step(state, batch) -> (state, metrics): one update of θ by `optimizer` on ∇_θ loss.

    The loss of step t gets the key fold_in(split(state.key)[1], t). A step whose loss, gradient
    or new objective state is not finite is NOT applied: the returned state equals the input
    and metrics["finite"] is False. With `ema_decay` = β, the moving average
    θ̄ <- β_t θ̄ + (1 - β_t) θ follows every applied update (state.ema_params), with the
    warm-up β_t = min(β, (1 + t) / (10 + t)) of `ema_warmup`.

    Args:
      loss_fn: loss(params, key, batch, state) -> (loss, aux, state); see `stateless`.
      optimizer: an optax `GradientTransformation`.
      ema_decay: β in [0, 1), or None for no moving average.

    Returns:
      A pure, jittable step; metrics holds "loss", the aux entries and "finite".
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
    decay = _ema_decay(ema_decay)

    def loss_and_aux(params, key, batch, obj_state):
        loss, aux, obj_state = loss_fn(params, key, batch, obj_state)
        return loss, (dict(aux), obj_state)

    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.split(state.key)[1], state.step)
        (loss, (aux, obj_state)), grads = grad_fn(state.params, key, batch, state.objective_state)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if decay is not None:
            beta = ema_warmup(decay, state.step)
            ema = jax.tree.map(lambda m, p: beta * m + (1.0 - beta) * p, ema, params)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(obj_state)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new = TrainState(state.step + finite.astype(state.step.dtype), keep(params, state.params),
                         keep(opt_state, state.opt_state), state.key, keep(obj_state, state.objective_state),
                         keep(ema, state.ema_params))
        return new, {"loss": loss, **aux, "finite": finite}

    return step


# --- the driver's chunk ----------------------------------------------------------


def _batch_at(data: Array, data_key: Array, step: Array, batch_size: int) -> Array:
    """The batch of step t: epoch e = t // (n // b) visits the data in the order permutation(fold_in(key, e))."""
    n = data.shape[0]
    epoch, i = jnp.divmod(step, n // batch_size)
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), n)
    return data[jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)]


LOOPS = ("auto", "scan", "python")


@functools.lru_cache(maxsize=16)
def _make_chunk(loss_fn, optimizer: optax.GradientTransformation, batch_size: int, length: int, stateful: bool,
                has_aux: bool = False, ema_decay: float | None = None, batch_sharding: NamedSharding | None = None,
                loop: str = "scan"):
    """A function running up to `length` steps, stopping at `end` or at a non-finite step.

    loop="scan": ONE jitted `lax.scan` over the chunk (one dispatch per chunk). loop="python": the
    same step body jitted alone and called from Python once per step, the halting flag carried on
    the device (no host sync inside the chunk). With `batch_sharding`, every batch is split along
    its first axis across the mesh's "data" devices; the compiler then runs each device's share of
    the per-example work there and all-reduces the mean loss and its gradient. Cached on its
    arguments, so that calling `fit` again with the same loss and optimizer objects (resuming in
    the same process) compiles nothing new.
    """
    step = _training_step(loss_fn, optimizer, stateful, has_aux, ema_decay)

    def body(carry, data: Array, data_key: Array, end: Array):
        state, halted = carry
        active = (state.step < end) & ~halted
        batch = _batch_at(data, data_key, state.step, batch_size)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        new, metrics = step(state, batch)
        state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state)
        taken = active & metrics.pop("finite")
        return (state, halted | (active & ~taken)), (metrics, taken)

    data_key_of = lambda state: jax.random.split(state.key)[0]

    if loop == "scan":
        @jax.jit
        def run_chunk(state: TrainState, data: Array, end: Array):
            data_key = data_key_of(state)
            (state, halted), (metrics, taken) = jax.lax.scan(
                lambda carry, _: body(carry, data, data_key, end), (state, jnp.bool_(False)), None, length=length)
            return state, halted, metrics, taken

        return run_chunk

    one_step = jax.jit(body)
    first = jax.jit(lambda state: ((state, jnp.bool_(False)), data_key_of(state)))

    def run_python_chunk(state: TrainState, data: Array, end: Array):
        carry, data_key = first(state)
        outputs = []
        for _ in range(min(length, int(end) - int(state.step))):
            carry, out = one_step(carry, data, data_key, end)
            outputs.append(out)
        metrics, taken = jax.tree.map(lambda *xs: np.stack(xs), *outputs)
        return (*carry, metrics, taken)

    return run_python_chunk


def _training_step(loss_fn, optimizer, stateful: bool, has_aux: bool, ema_decay):
    """`make_step` of fit's loss, through `stateless` when it carries no objective state."""
    return make_step(loss_fn if stateful else stateless(loss_fn, has_aux=has_aux), optimizer, ema_decay=ema_decay)


def _primitive_names(jaxpr) -> set[str]:
    """The names of the primitives in a jaxpr and in every jaxpr nested in its equations."""
    names = {eqn.primitive.name for eqn in jaxpr.eqns}
    return names.union(*map(_primitive_names, jcore.subjaxprs(jaxpr)))


def _resolve_loop(loop: str, loss_fn, optimizer, stateful: bool, has_aux: bool, ema_decay, state: TrainState,
                  batch: Array, devices) -> str:
    """"auto" -> "python" when the step runs on CPUs and convolves, "scan" otherwise.

    XLA:CPU (jax 0.10) compiles the convolutions of a gradient inside a loop body without the
    layout rewrites it applies outside one, so a convnet's step inside `lax.scan` runs 3-30x
    slower than the same step jitted alone (the digits U-Net: 6.8 s against 0.21 s a step). On
    GPU and TPU, and for networks without convolutions, the scan is as fast or faster.
    """
    if loop != "auto":
        return loop
    if any(d.platform != "cpu" for d in devices):
        return "scan"
    step = _training_step(loss_fn, optimizer, stateful, has_aux, ema_decay)
    names = _primitive_names(jax.make_jaxpr(step)(state, batch).jaxpr)
    return "python" if "conv_general_dilated" in names else "scan"


# --- checkpoints ---------------------------------------------------------------


def _to_saveable(state: TrainState) -> dict:
    key = state.key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "key": key,
            "objective_state": state.objective_state, "ema_params": state.ema_params}


def _from_saved(saved: dict, like: TrainState) -> TrainState:
    key = saved["key"]
    if jnp.issubdtype(like.key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key, impl=jax.random.key_impl(like.key))
    return TrainState(jnp.asarray(saved["step"]), saved["params"], saved["opt_state"], key,
                      saved["objective_state"], saved.get("ema_params"))


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=ocp.StandardCheckpointHandler())


def _path_name(path) -> str:
    parts = []
    for k in path:
        parts.append(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))))
    return "/".join(parts)


def _shapes(tree) -> dict[str, tuple]:
    return {_path_name(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another model: its arrays' shapes differ from this run's."""


def _check_shapes(saved_tree, like: dict, where: str) -> None:
    saved, want = _shapes(saved_tree), _shapes(like)
    diff = sorted(k for k in saved.keys() | want.keys() if saved.get(k) != want.get(k))
    if diff:
        lines = "; ".join(f"{k}: saved {saved.get(k, 'absent')}, this run {want.get(k, 'absent')}" for k in diff[:5])
        raise CheckpointMismatchError(
            f"the checkpoint {where} holds arrays of other shapes than this run's ({len(diff)} differ: {lines}). "
            f"It belongs to another model or config: use a new workdir, or the same model to resume. "
            f"Nothing in the workdir was changed.")


def _restore_step(mgr: ocp.CheckpointManager, step: int, like: TrainState) -> TrainState:
    saveable = _to_saveable(like)
    _check_shapes(mgr.item_metadata(step).tree, saveable, f"{mgr.directory}/{step}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saveable)
    return _from_saved(mgr.restore(step, args=ocp.args.StandardRestore(abstract)), like)


def restore_newest(directory: str | Path, like: TrainState) -> tuple[TrainState | None, list[tuple[int, str]]]:
    """The newest checkpoint under `directory` that restores, shaped like `like`, and the skipped ones.

    Orbax writes each checkpoint to a temporary directory and renames it when complete,
    so a save interrupted by a kill is never seen. A finalised checkpoint that still
    fails to restore (a file cut short or lost: a bad copy, a disk error) is skipped and
    listed as (step, reason); older ones are tried in turn. Nothing is deleted.

    Raises:
      CheckpointMismatchError: a checkpoint's arrays have other shapes than `like`'s.
    """
    directory = Path(directory)
    if not directory.exists():
        return None, []
    skipped = []
    with _manager(directory, keep=1_000_000) as mgr:
        for step in sorted(mgr.all_steps(), reverse=True):
            try:
                return _restore_step(mgr, step, like), skipped
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means this copy is damaged
                skipped.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
    return None, skipped


def restore_latest(directory: str | Path, like: TrainState) -> TrainState | None:
    """The newest checkpoint under `directory` that restores (see `restore_newest`); None if there is none."""
    return restore_newest(directory, like)[0]


def _set_aside(directory: Path, skipped: list[tuple[int, str]]) -> Path:
    """Move damaged checkpoints out of the manager's way (a new save reuses their step): never delete them."""
    aside = directory.with_name(directory.name + ".damaged")
    aside.mkdir(exist_ok=True)
    for step, _ in skipped:
        target = aside / str(step)
        while target.exists():
            target = target.with_name(target.name + "+")
        shutil.move(str(directory / str(step)), str(target))
    return aside


# --- metrics and callbacks ---------------------------------------------------------


def _read_rows(path: Path, up_to: int, rewrite: bool = True) -> list[dict]:
    """Rows of a JSON-lines file with step <= up_to; rewrites the file to hold only those.

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
    if rewrite:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _chunk_row(step: int, metrics: dict, taken, wall_s: float) -> dict:
    taken = np.asarray(taken)
    row = {"step": step}
    for name, values in metrics.items():
        row[name] = float(np.mean(np.asarray(values)[taken]))
    row["wall_s"] = round(wall_s, 3)  # the only field that differs between identical runs
    return row


def _jsonable(result) -> dict:
    return jax.tree.map(lambda v: np.asarray(v).tolist() if hasattr(v, "shape") else v, dict(result))


class _Callbacks:
    """The callbacks' results, kept in memory and (with a workdir) in <workdir>/callbacks/<name>.json."""

    def __init__(self, callbacks: Sequence[Callback], directory: Path | None, up_to: int, write: bool = True):
        self.callbacks, self.directory, self.write = tuple(callbacks), directory, write
        self.rows: dict[str, list[dict]] = {c.name: [] for c in self.callbacks}
        if directory is not None:
            for c in self.callbacks:
                path = directory / f"{c.name}.json"
                saved = json.loads(path.read_text()) if path.exists() else []
                self.rows[c.name] = [r for r in saved if r["step"] <= up_to]

    def stops(self, step: int) -> list[int]:
        return [(step // c.every + 1) * c.every for c in self.callbacks]

    def run(self, state: TrainState, last: int) -> None:
        """Run the callbacks due at state.step: multiples of their `every`, and the run's `last` step."""
        step = int(state.step)
        for c in self.callbacks:
            due = step > 0 and (step % c.every == 0 or step == last)
            if not due or any(r["step"] == step for r in self.rows[c.name]):
                continue
            self.rows[c.name].append({"step": step, **_jsonable(c.fn(state))})
            if self.directory is not None and self.write:
                self.directory.mkdir(parents=True, exist_ok=True)
                save_json(self.directory / f"{c.name}.json", self.rows[c.name])

    def truncate(self, up_to: int) -> None:
        for c in self.callbacks:
            self.rows[c.name] = [r for r in self.rows[c.name] if r["step"] <= up_to]
            if self.directory is not None and self.write and (self.directory / f"{c.name}.json").exists():
                save_json(self.directory / f"{c.name}.json", self.rows[c.name])


def _check_callbacks(callbacks) -> tuple[Callback, ...]:
    callbacks = tuple(callbacks)
    for c in callbacks:
        if not isinstance(c, Callback):
            raise TypeError(f"callbacks must hold jsm.train.Callback(name, every, fn), got {type(c).__name__}")
        _validate.positive_int(f"callback {c.name!r} every", c.every)
        if not (isinstance(c.name, str) and c.name and c.name.replace("_", "").replace("-", "").isalnum()):
            raise ValueError(f"callback names must be non-empty words (letters, digits, _ or -), got {c.name!r}")
    names = [c.name for c in callbacks]
    if len(set(names)) != len(names):
        raise ValueError(f"callback names must be distinct, got {names}")
    return callbacks


def _kill_hook(step: int, moment: str, mgr=None) -> None:
    """The JSM_TEST_KILL_AT test hook (see KILL_MOMENTS)."""
    spec = os.environ.get("JSM_TEST_KILL_AT")
    if spec:
        at, _, when = spec.partition(":")
        if int(at) == step and (when or "before_save") == moment:
            if mgr is not None:
                mgr.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)


# --- the loop ------------------------------------------------------------------


def _roll_back(state: TrainState, start: TrainState, mgr, last_saved: int | None, bad_step: int, place):
    """The last good checkpoint (or the start), with the failed attempt's key folded with bad_step.

    Folding the key of the attempt that failed (not the checkpoint's) chains the keys of
    successive rollbacks, so two failures at the same step never reuse a key.
    """
    good = start
    if mgr is not None and last_saved is not None:
        mgr.wait_until_finished()
        good = _restore_step(mgr, last_saved, state)
    good = place(good._replace(key=jax.random.fold_in(state.key, bad_step)))
    return good, int(good.step)


def _placement(mesh, batch_size: int):
    """(where the state and data live, how a batch is split): one device, or replicated over `mesh`
    with batches split along its "data" axis."""
    if mesh is None:
        return jax.devices()[0], None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh must have an axis named 'data' to split batches along, got axes {mesh.axis_names}")
    n = mesh.shape["data"]
    if batch_size % n:
        raise ValueError(f"batch_size must be a multiple of the mesh's 'data' axis size {n}, got {batch_size}")
    # The compiler places the work (auto axes), whatever axis types the caller's mesh has.
    mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def _put(tree: PyTree, where) -> PyTree:
    """device_put, also onto devices of other processes: every process passes the same values."""
    if not isinstance(where, NamedSharding) or where.is_fully_addressable:
        return jax.device_put(tree, where)

    def leaf(x):
        if isinstance(x, jax.Array) and x.sharding == where:
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

    return jax.tree.map(leaf, tree)


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


def fit(
    loss_fn: LossFn | PlainLossFn,
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
    has_aux: bool = False,
    callbacks: Sequence[Callback] = (),
    ema_decay: float | None = None,
    mesh: Mesh | None = None,
    rollbacks: int = 0,
    loop: str = "auto",
) -> FitResult:
    """Minimise E_batch[loss(params, key, batch)] with `optimizer` for `steps` steps.

    The driver of `make_step`: it draws the batches, runs jitted chunks of steps, logs,
    checkpoints, calls the callbacks and resumes. Nothing here changes the maths of a step.

    Args:
      loss_fn: loss(params, key, batch) -> loss, or -> (loss, aux) with `has_aux=True`, aux a
        dict of scalars logged with the loss. With `objective_state`, the one signature
        loss(params, key, batch, state) -> (loss, aux, state) instead.
      params: the initial parameters (any pytree; an `nnx.State` from `jsm.nets.pure`).
      data: (n, d) training examples; each epoch visits them in a new random order,
        `batch_size` at a time (the remainder of n / batch_size is skipped that epoch).
      optimizer: an optax `GradientTransformation`.
      key: the run's PRNG key; step t uses fold_in(key, t).
      steps: total number of updates (a resumed run counts those already done).
      batch_size: examples per step.
      workdir: where `checkpoints/`, `metrics.jsonl` and `callbacks/` live; None keeps
        everything in memory.
      checkpoint_every: save every this many steps, and at the end.
      keep: how many checkpoints to keep.
      log_every: steps per logged row (and per host sync).
      progress: show a progress bar.
      objective_state: the initial state of a stateful objective; None for a plain loss.
      has_aux: a plain loss returns (loss, aux).
      callbacks: `Callback(name, every, fn)`s; fn(state) runs at every multiple of `every`
        and at step `steps` (the chunks stop there), its result saved in <workdir>/callbacks/<name>.json before
        that step's checkpoint and reused after a restart. `FitResult.callbacks` holds them.
      ema_decay: β in [0, 1): keep θ̄ <- β_t θ̄ + (1 - β_t) θ after every update, β_t = min(β,
        (1 + t) / (10 + t)) (so short runs forget the initial θ), checkpointed with the rest and
        returned as `FitResult.ema_params`. None: no moving average.
      mesh: a `jax.sharding.Mesh` with an axis "data": every batch is split along it across
        devices (batch_size must be a multiple of its size), parameters and optimizer state are
        replicated, one compiled step. It may span several processes (`jax.distributed`): each
        process then passes the same data and arguments, computes its devices' share of every
        batch, and process 0 alone writes metrics and callback results. None: one device.
      rollbacks: how many times a non-finite step may be survived: the run goes back to
        its last good checkpoint (or the start), replaces the key by fold_in(key, bad step)
        (the key of the attempt that failed) and goes on. The new key is a function of the
        old one and the step, so a killed and restarted run rolls back the same way. 0 raises.
      loop: how a chunk of steps runs: "scan", one compiled `lax.scan` (one dispatch a chunk);
        "python", the compiled step called once per step from Python (no host sync inside a
        chunk either); "auto" picks "python" when the step runs on CPUs and contains a
        convolution (XLA:CPU compiles a convnet's gradient 3-30x slower inside a loop body) and
        "scan" otherwise. Both run the same step with the same keys and batches; they may differ
        in the last bits of float rounding (two compilations), so resume a run with the loop it
        started with for bitwise-identical results (the default does).

    Returns:
      FitResult with the final params, optimizer state, objective state, moving average,
      step, the logged rows and the callbacks' results.

    Raises:
      NonFiniteError: a loss or gradient was not finite; nothing after the last
        finite step was applied or saved.
      CheckpointMismatchError: the workdir's checkpoint holds arrays of other shapes.

    A newest checkpoint that cannot be read (cut short, files lost) is skipped with a
    warning naming it and the reason, moved to `checkpoints.damaged/` (never deleted),
    and the run resumes from the newest one that restores.
    """
    data = _validate.examples("data", data)
    _validate.key("key", key)
    steps = _validate.positive_int("steps", steps, minimum=0)
    batch_size = _validate.positive_int("batch_size", batch_size)
    checkpoint_every = _validate.positive_int("checkpoint_every", checkpoint_every)
    keep = _validate.positive_int("keep", keep)
    log_every = _validate.positive_int("log_every", log_every)
    rollbacks = _validate.positive_int("rollbacks", rollbacks, minimum=0)
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    callbacks = _check_callbacks(callbacks)
    ema_decay = _ema_decay(ema_decay)
    if batch_size > data.shape[0]:
        raise ValueError(f"batch_size must be <= the number of examples {data.shape[0]}, got {batch_size}")
    stateful = objective_state is not None
    if stateful and has_aux:
        raise ValueError("has_aux is for a plain loss(params, key, batch); with objective_state the loss "
                         "returns (loss, aux, state) already")

    placement, batch_sharding = _placement(mesh, batch_size)
    place = lambda tree: _put(tree, placement)
    lead = jax.process_index() == 0  # the one process that writes files
    # Committed like a restored state, so a fresh and a resumed run share one compile.
    state = place(init_state(params, optimizer, key, objective_state, ema_decay=ema_decay))
    data = place(data)  # every device can gather any batch; the batch itself is then split
    mgr = metrics_path = callback_dir = None
    history: list[dict] = []
    if workdir is not None:
        workdir = Path(workdir)
        # Every process makes it: orbax's manager synchronises the processes only when the directory
        # is missing, and a process that saw it made by another would skip that barrier (a deadlock).
        (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
        metrics_path, callback_dir = workdir / "metrics.jsonl", workdir / "callbacks"
        restored, skipped = restore_newest(workdir / "checkpoints", state)
        if skipped and restored is None:
            raise RuntimeError(
                "fit: no checkpoint under " f"{workdir / 'checkpoints'} restores: "
                + "; ".join(f"step {s}: {why}" for s, why in skipped)
                + ". Nothing was changed; move the checkpoints away (or use a new workdir) to start afresh.")
        if skipped:
            aside = _set_aside(workdir / "checkpoints", skipped) if lead else workdir / "checkpoints.damaged"
            for s, why in skipped:
                warnings.warn(f"fit: checkpoint {workdir / 'checkpoints'}/{s} could not be restored ({why}); "
                              f"moved to {aside}/{s} and resuming from step {int(restored.step)}",
                              RuntimeWarning, stacklevel=2)
        if restored is not None:
            state = restored
        history = _read_rows(metrics_path, int(state.step), rewrite=lead)
        mgr = _manager(workdir / "checkpoints", keep)

    devices = jax.devices() if mesh is None else list(mesh.devices.flat)
    loop = _resolve_loop(loop, loss_fn, optimizer, stateful, has_aux, ema_decay, state, data[:batch_size], devices)
    run_chunk = _make_chunk(loss_fn, optimizer, batch_size, min(log_every, checkpoint_every), stateful, has_aux,
                            ema_decay, batch_sharding, loop)
    step = int(state.step)
    hooks = _Callbacks(callbacks, callback_dir, step, write=lead)
    hooks.run(state, steps)  # a callback added on resuming, or one whose result the kill lost
    last_saved = step if mgr is not None and mgr.latest_step() is not None else None
    start_state = state  # where a rollback goes when no checkpoint was saved yet
    bar = tqdm(total=steps, initial=min(step, steps), disable=not (progress and lead), desc="fit", unit="step")
    try:
        while step < steps:
            t0 = time.perf_counter()
            end = min(_next_multiple(step, log_every), _next_multiple(step, checkpoint_every), steps,
                      *hooks.stops(step))
            new_state, halted, metrics, taken = run_chunk(state, data, jnp.asarray(end, jnp.int32))
            new_step = int(new_state.step)
            if bool(halted) and rollbacks > 0:
                rollbacks -= 1
                state, step = _roll_back(state, start_state, mgr, last_saved, new_step + 1, place)
                history = [row for row in history if row["step"] <= step]
                if metrics_path is not None:
                    _read_rows(metrics_path, step, rewrite=lead)
                hooks.truncate(step)
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
            row = _chunk_row(new_step, metrics, taken, time.perf_counter() - t0)
            history.append(row)
            if metrics_path is not None and lead:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            _kill_hook(new_step, "before_save")
            hooks.run(state, steps)  # before the checkpoint: a run resumed from it never lacks these results
            if mgr is not None and (new_step % checkpoint_every == 0 or new_step == steps):
                mgr.save(new_step, args=ocp.args.StandardSave(_to_saveable(state)))
                _kill_hook(new_step, "during_save")  # the save runs in the background: killed halfway
                last_saved = new_step
                _kill_hook(new_step, "after_save", mgr)
            bar.update(new_step - step)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            step = new_step
    finally:
        bar.close()
        if mgr is not None:
            mgr.wait_until_finished()
            mgr.close()
    return FitResult(state.params, state.opt_state, int(state.step), history, state.objective_state,
                     state.ema_params, hooks.rows)
