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
batches drawn as a function of (key, step) alone, checkpoints of the whole state
(`jsm.checkpoint`: atomic, the last `keep` kept, automatic resume, damaged ones set
aside), metrics as JSON lines, callbacks every k steps whose results are saved and
reused after a restart, rollback on a non-finite step, a moving average (EMA) of the
parameters, and a progress bar. A run killed at any moment and started again with the
same call ends with exactly the parameters, metrics and callback results of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jcore
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jsm import _compat, _validate
from jsm.runs import save_json

__all__ = ["LOOPS", "Callback", "FitResult", "NonFiniteError", "TrainState", "ema_warmup", "fit", "init_state",
           "make_step", "stateless"]

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, Array, Array, PyTree], tuple[Array, dict, PyTree]]
PlainLossFn = Callable[[PyTree, Array, Array], Any]

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
    t = jnp.asarray(step, jnp.result_type(float))  # float64 under JAX_ENABLE_X64
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


class _Order(NamedTuple):
    """The order in which an epoch visits the data: epoch e's permutation(fold_in(data_key, e)) of n."""

    epoch: Array
    perm: Array


def _order_at(order: _Order | None, data: Array, data_key: Array, step: Array, batch_size: int) -> _Order:
    """The order of step t's epoch e = t // (n // b): `order` when it is that epoch's, else drawn anew.

    A permutation of n costs a sort of n keys (7 ms at n = 20 000 on a CPU core, 30x a small MLP's
    step), so a chunk draws it once an epoch and carries it from step to step.
    """
    epoch = step // (data.shape[0] // batch_size)
    draw = lambda: _Order(epoch, jax.random.permutation(jax.random.fold_in(data_key, epoch), data.shape[0]))
    return draw() if order is None else jax.lax.cond(epoch == order.epoch, lambda: order, draw)


def _batch_at(data: Array, order: _Order, step: Array, batch_size: int) -> Array:
    """The batch of step t: the i-th b entries of its epoch's order, i = t mod (n // b)."""
    i = step % (data.shape[0] // batch_size)
    return data[jax.lax.dynamic_slice_in_dim(order.perm, i * batch_size, batch_size)]


LOOPS = ("auto", "scan", "python")


class _Chunk(NamedTuple):
    """What a compiled chunk of steps is specialised on: a static argument of its `jax.jit`.

    jit's own cache is keyed on it, so calling `fit` again with the same loss and optimizer
    objects (resuming in the same process) compiles nothing new, and new objects compile anew.
    With `batch_sharding`, every batch is split along its first axis across the mesh's "data"
    devices; the compiler then runs each device's share of the per-example work there and
    all-reduces the mean loss and its gradient.
    """

    loss_fn: Callable
    optimizer: optax.GradientTransformation
    batch_size: int
    length: int  # the most steps a chunk runs
    stateful: bool  # loss_fn has the one signature (with objective state), else a plain loss
    has_aux: bool = False
    ema_decay: float | None = None
    batch_sharding: NamedSharding | None = None


def _training_step(spec: _Chunk):
    """`make_step` of fit's loss, through `stateless` when it carries no objective state."""
    loss_fn = spec.loss_fn if spec.stateful else stateless(spec.loss_fn, has_aux=spec.has_aux)
    return make_step(loss_fn, spec.optimizer, ema_decay=spec.ema_decay)


def _data_key(state: TrainState) -> Array:
    return jax.random.split(state.key)[0]


def _body(spec: _Chunk, carry, data: Array, data_key: Array, end: Array):
    """One step of a chunk, skipped once `end` is reached or a step was not finite."""
    state, halted, order = carry
    active = (state.step < end) & ~halted
    order = _order_at(order, data, data_key, state.step, spec.batch_size)
    batch = _batch_at(data, order, state.step, spec.batch_size)
    if spec.batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, spec.batch_sharding)
    new, metrics = _training_step(spec)(state, batch)
    state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state)
    taken = active & metrics.pop("finite")
    return (state, halted | (active & ~taken), order), (metrics, taken)


def _start(state: TrainState, data: Array, batch_size: int):
    """A chunk's first carry (state, halted, the order of its first epoch) and the run's data key."""
    data_key = _data_key(state)
    return (state, jnp.bool_(False), _order_at(None, data, data_key, state.step, batch_size)), data_key


@functools.partial(jax.jit, static_argnames="spec")
def _scan_chunk(state: TrainState, data: Array, end: Array, spec: _Chunk):
    """ONE compiled `lax.scan` over the chunk: one dispatch per chunk."""
    carry, data_key = _start(state, data, spec.batch_size)
    (state, halted, _), (metrics, taken) = jax.lax.scan(
        lambda carry, _: _body(spec, carry, data, data_key, end), carry, None, length=spec.length)
    return state, halted, metrics, taken


_python_step = jax.jit(_body, static_argnums=0)
_python_start = jax.jit(_start, static_argnums=2)


def _python_chunk(state: TrainState, data: Array, end: Array, spec: _Chunk):
    """The step body of `_scan_chunk` compiled alone and called from Python once per step, the
    halting flag and the epoch's order carried on the device (no host sync inside the chunk)."""
    carry, data_key = _python_start(state, data, spec.batch_size)
    outputs = []
    for _ in range(min(spec.length, int(end) - int(state.step))):
        carry, out = _python_step(spec, carry, data, data_key, end)
        outputs.append(out)
    metrics, taken = jax.tree.map(lambda *xs: np.stack(xs), *outputs)
    return (*carry[:2], metrics, taken)


def _make_chunk(spec: _Chunk, loop: str):
    """chunk(state, data, end) -> (state, halted, metrics, taken): up to `spec.length` steps, stopping
    at step `end` or at a non-finite step, run as loop="scan" or loop="python"."""
    return functools.partial(_scan_chunk if loop == "scan" else _python_chunk, spec=spec)


def _primitive_names(jaxpr) -> set[str]:
    """The names of the primitives in a jaxpr and in every jaxpr nested in its equations."""
    names = {eqn.primitive.name for eqn in jaxpr.eqns}
    return names.union(*map(_primitive_names, jcore.subjaxprs(jaxpr)))


def _resolve_loop(loop: str, spec: _Chunk, state: TrainState, batch: Array, devices) -> str:
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
    names = _primitive_names(jax.make_jaxpr(_training_step(spec))(state, batch).jaxpr)
    return "python" if "conv_general_dilated" in names else "scan"


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
        return [_next_multiple(step, c.every) for c in self.callbacks]

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


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


# --- devices -----------------------------------------------------------------------


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


# --- the driver ------------------------------------------------------------------
#
# `fit` checks its arguments, opens the workdir (`_resume`), then runs chunks until `steps` (`_drive`):
# a finished chunk is logged, called back and saved (`_finish_chunk`); a chunk that met a
# non-finite step raises or rolls back (`_non_finite`). `_Run` is what they share.


@dataclasses.dataclass
class _Run:
    """The state of a run between chunks, and where its files go."""

    state: TrainState
    place: Callable[[PyTree], PyTree]  # puts a state where the run keeps it (one device or the mesh)
    lead: bool  # the one process that writes files
    hooks: _Callbacks | None = None
    mgr: Any = None  # the orbax manager of jsm.checkpoint; None without a workdir
    metrics_path: Path | None = None
    history: list[dict] = dataclasses.field(default_factory=list)
    last_saved: int | None = None  # the newest checkpoint's step
    start: TrainState | None = None  # where a rollback goes when no checkpoint was saved yet

    @property
    def step(self) -> int:
        return int(self.state.step)


def _check_options(data, batch_size: int, loop: str, callbacks, ema_decay, objective_state, has_aux: bool):
    """fit's checks beyond single numbers; returns (callbacks, ema_decay) checked."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    callbacks = _check_callbacks(callbacks)
    ema_decay = _ema_decay(ema_decay)
    if batch_size > data.shape[0]:
        raise ValueError(f"batch_size must be <= the number of examples {data.shape[0]}, got {batch_size}")
    if objective_state is not None and has_aux:
        raise ValueError("has_aux is for a plain loss(params, key, batch); with objective_state the loss "
                         "returns (loss, aux, state) already")
    return callbacks, ema_decay


def _check_data(data) -> Array:
    """ONE array of every training example, finite: fit draws the batches itself."""
    if isinstance(data, (list, tuple)):
        raise TypeError(f"data must be ONE array (n, *shape) holding every training example (fit draws the batches "
                        f"itself), got a {type(data).__name__} of {len(data)} items: concatenate batches along axis 0; "
                        f"give labels as part of each example (e.g. an extra column) and split them in the loss")
    return _validate.examples("data", data)


def _describe(out) -> str:
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(map(_describe, out))})"
    if isinstance(out, dict):
        return "a dict"
    return f"an array of shape {tuple(out.shape)}" if hasattr(out, "shape") else type(out).__name__


def _check_loss(loss_fn, params, key, batch, objective_state, has_aux: bool) -> None:
    """The loss traced once on one batch, before anything compiles: its signature and what it returns."""
    stateful = objective_state is not None
    call = (params, key, batch, objective_state) if stateful else (params, key, batch)
    want = ("loss(params, key, batch, state) -> (loss, aux, state)" if stateful else
            "loss(params, key, batch) -> (loss, aux)" if has_aux else "loss(params, key, batch) -> loss")
    try:
        inspect.signature(loss_fn).bind(*call)
    except TypeError as e:
        raise TypeError(f"loss_fn must be {want}; it cannot take {len(call)} arguments ({e})") from None
    except ValueError:  # no signature to read (a C function): the trace below tells
        pass
    out = jax.eval_shape(loss_fn, *call)
    scalar = lambda o: getattr(o, "shape", None) == ()
    pair = isinstance(out, (tuple, list)) and len(out) == (3 if stateful else 2)
    if (stateful or has_aux) and pair and scalar(out[0]) and isinstance(out[1], dict) or not (
            stateful or has_aux) and scalar(out):
        return
    hint = ""
    if not stateful and not has_aux and isinstance(out, (tuple, list)) and len(out) == 2:
        hint = "; a loss returning (loss, aux) needs has_aux=True"
    elif has_aux and scalar(out):
        hint = "; has_aux=True expects (loss, aux): drop has_aux for a plain loss"
    elif (pair and not scalar(out[0])) or (not isinstance(out, (tuple, list)) and not scalar(out)):
        hint = "; the loss must be a scalar (the batch mean)"
    elif pair:
        hint = "; aux must be a dict of scalars (logged with the loss)"
    raise TypeError(f"loss_fn must be {want}, got {_describe(out)}{hint}")


# What a workdir's run is bound to: resuming it with other values would silently change the run.
SETTINGS_FILE = "fit.json"


def _settings(data: Array, batch_size: int, ema_decay, mesh) -> dict:
    mesh_info = None if mesh is None else {"axes": list(mesh.axis_names), "shape": list(mesh.devices.shape)}
    return {"batch_size": batch_size, "data_shape": list(data.shape), "data_dtype": str(data.dtype),
            "ema_decay": ema_decay, "mesh": mesh_info}


def _check_settings(workdir: Path, settings: dict, allow_changes, lead: bool) -> None:
    """Refuse to resume a workdir under other settings (naming them) unless allowed; record them."""
    path = workdir / SETTINGS_FILE
    before = json.loads(path.read_text()) if path.exists() else None
    if before is not None:
        changed = sorted(k for k in settings if before.get(k, settings[k]) != settings[k])
        allowed = set(settings) if allow_changes is True else set(allow_changes or ())
        refused = [k for k in changed if k not in allowed]
        if refused:
            what = "; ".join(f"{k}: {before.get(k)!r} then, {settings[k]!r} now" for k in refused)
            raise ValueError(f"fit: {workdir} holds a run started with other settings ({what}). Resuming would change "
                             f"the run silently: use a new workdir, or pass allow_changes={tuple(refused)!r} (or True) "
                             "to resume under the new ones")
    if lead and before != settings:  # written whole, then renamed: another process never reads half a file
        workdir.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".json.part")
        part.write_text(json.dumps(settings, indent=1))
        part.replace(path)


def _resume(run: _Run, workdir: Path, keep: int) -> None:
    """Restore the newest checkpoint of `workdir` that reads, set damaged ones aside (with a warning
    each), keep the metrics logged up to it and open the checkpoint manager."""
    from jsm import checkpoint  # imported on demand: orbax only for runs that write checkpoints

    directory = workdir / "checkpoints"
    # Every process makes it: orbax's manager synchronises the processes only when the directory
    # is missing, and a process that saw it made by another would skip that barrier (a deadlock).
    directory.mkdir(parents=True, exist_ok=True)
    restored, skipped = checkpoint.restore_newest(directory, run.state)
    if skipped and restored is None:
        raise RuntimeError(
            f"fit: no checkpoint under {directory} restores: " + "; ".join(f"step {s}: {why}" for s, why in skipped)
            + ". Nothing was changed; move the checkpoints away (or use a new workdir) to start afresh.")
    if skipped:
        aside = checkpoint.set_aside(directory, skipped) if run.lead else workdir / "checkpoints.damaged"
        for s, why in skipped:
            warnings.warn(f"fit: checkpoint {directory}/{s} could not be restored ({why}); moved to {aside}/{s} "
                          f"and resuming from step {int(restored.step)}", RuntimeWarning, stacklevel=3)
    if restored is not None:
        run.state = restored
        if run.lead:
            print(f"fit: resuming {workdir} from step {run.step}", file=sys.stderr)
    run.metrics_path = workdir / "metrics.jsonl"
    run.history = _read_rows(run.metrics_path, run.step, rewrite=run.lead)
    run.mgr = checkpoint.manager(directory, keep)
    run.last_saved = run.step if run.mgr.latest_step() is not None else None


def _drive(run: _Run, chunk, data: Array, last: int, log_every: int, checkpoint_every: int, rollbacks: int,
           bar) -> None:
    """Run chunks until step `last`; each ends at the next multiple of `log_every`, of `checkpoint_every`
    or of a callback's `every`, or at `last`."""
    while run.step < last:
        t0 = time.perf_counter()
        end = min(_next_multiple(run.step, log_every), _next_multiple(run.step, checkpoint_every), last,
                  *run.hooks.stops(run.step))
        state, halted, metrics, taken = chunk(run.state, data, jnp.asarray(end, jnp.int32))
        if bool(halted):
            rollbacks = _non_finite(run, state, rollbacks, last, bar)
            continue
        row = _chunk_row(int(state.step), metrics, taken, time.perf_counter() - t0)
        _finish_chunk(run, state, row, last, checkpoint_every, bar)


def _finish_chunk(run: _Run, state: TrainState, row: dict, last: int, checkpoint_every: int, bar) -> None:
    """Log a chunk's row, run the callbacks due, then save when a checkpoint is due."""
    from jsm import checkpoint

    previous, run.state = run.step, state
    run.history.append(row)
    if run.metrics_path is not None and run.lead:
        with run.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    run.hooks.run(state, last)  # before the checkpoint: a run resumed from it never lacks these results
    if run.mgr is not None and (run.step % checkpoint_every == 0 or run.step == last):
        checkpoint.save(run.mgr, run.step, state)
        run.last_saved = run.step
    bar.update(run.step - previous)
    bar.set_postfix(loss=f"{row['loss']:.4g}")


def _non_finite(run: _Run, stopped: TrainState, rollbacks: int, last: int, bar) -> int:
    """A chunk `stopped` before a non-finite step: raise NonFiniteError, or with rollbacks left go back
    to the last good checkpoint (or the start) and return how many rollbacks are left."""
    bad_step = int(stopped.step) + 1
    if rollbacks == 0:
        where = f"{run.mgr.directory}/{run.last_saved}" if run.last_saved is not None else "none saved yet"
        raise NonFiniteError(
            f"fit: the loss or a gradient became non-finite at step {bad_step}; that update was not applied. "
            f"Last good checkpoint: {where} (step {run.last_saved}). Try a smaller learning rate, gradient "
            f"clipping (optax.clip_by_global_norm), a larger noise scale / energy penalty, or "
            f"fit(..., rollbacks=k) to go back to the checkpoint with a new key.",
            step=bad_step, checkpoint_step=run.last_saved, state=stopped)
    _roll_back(run, bad_step)
    bar.reset(total=last)
    bar.update(run.step)
    bar.write(f"fit: non-finite at step {bad_step}; rolled back to step {run.step} with a new key "
              f"({rollbacks - 1} rollbacks left)")
    return rollbacks - 1


def _roll_back(run: _Run, bad_step: int) -> None:
    """Back to the last good checkpoint (or the start), with the failed attempt's key folded with bad_step;
    the rows and callback results past it are dropped.

    Folding the key of the attempt that failed (not the checkpoint's) chains the keys of
    successive rollbacks, so two failures at the same step never reuse a key.
    """
    good = run.start
    if run.mgr is not None and run.last_saved is not None:
        from jsm import checkpoint

        run.mgr.wait_until_finished()
        good = checkpoint.restore(run.mgr, run.last_saved, run.state)
    run.state = run.place(good._replace(key=jax.random.fold_in(run.state.key, bad_step)))
    run.history = [row for row in run.history if row["step"] <= run.step]
    if run.metrics_path is not None:
        _read_rows(run.metrics_path, run.step, rewrite=run.lead)
    run.hooks.truncate(run.step)


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
    allow_changes: bool | Sequence[str] = False,
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
      allow_changes: a workdir records the run's batch_size, data shape and dtype, ema_decay and
        mesh (`<workdir>/fit.json`), and resuming it with other values raises a ValueError naming
        them; True, or the names of the fields, allows the change. Parameter shapes are checked
        against the checkpoint (`CheckpointMismatchError`). What fit cannot see is not checked:
        a learning rate or schedule inside the optax optimizer, the loss's own constants.

    Returns:
      FitResult with the final params, optimizer state, objective state, moving average,
      step, the logged rows and the callbacks' results.

    Raises:
      NonFiniteError: a loss or gradient was not finite; nothing after the last
        finite step was applied or saved.
      jsm.checkpoint.CheckpointMismatchError: the workdir's checkpoint holds arrays of other shapes.

    A newest checkpoint that cannot be read (cut short, files lost) is skipped with a
    warning naming it and the reason, moved to `checkpoints.damaged/` (never deleted),
    and the run resumes from the newest one that restores (see `jsm.checkpoint`).
    """
    data = _check_data(data)
    _validate.key("key", key)
    steps = _validate.positive_int("steps", steps, minimum=0)
    batch_size = _validate.positive_int("batch_size", batch_size)
    checkpoint_every = _validate.positive_int("checkpoint_every", checkpoint_every)
    keep = _validate.positive_int("keep", keep)
    log_every = _validate.positive_int("log_every", log_every)
    rollbacks = _validate.positive_int("rollbacks", rollbacks, minimum=0)
    callbacks, ema_decay = _check_options(data, batch_size, loop, callbacks, ema_decay, objective_state, has_aux)
    _check_loss(loss_fn, params, key, jax.ShapeDtypeStruct((batch_size,) + data.shape[1:], data.dtype),
                objective_state, has_aux)
    placement, batch_sharding = _placement(mesh, batch_size)
    spec = _Chunk(loss_fn, optimizer, batch_size, min(log_every, checkpoint_every), objective_state is not None,
                  has_aux, ema_decay, batch_sharding)

    place = functools.partial(_put, where=placement)
    # Committed like a restored state, so a fresh and a resumed run share one compile.
    run = _Run(place(init_state(params, optimizer, key, objective_state, ema_decay=ema_decay)), place,
               lead=jax.process_index() == 0)
    data = place(data)  # every device can gather any batch; the batch itself is then split
    if workdir is not None:
        _check_settings(Path(workdir), _settings(data, batch_size, ema_decay, mesh), allow_changes, run.lead)
        _resume(run, Path(workdir), keep)
    devices = jax.devices() if mesh is None else list(mesh.devices.flat)
    chunk = _make_chunk(spec, _resolve_loop(loop, spec, run.state, data[:batch_size], devices))
    run.hooks = _Callbacks(callbacks, None if workdir is None else Path(workdir) / "callbacks", run.step,
                           write=run.lead)
    run.hooks.run(run.state, steps)  # a callback added on resuming, or one whose result the kill lost
    run.start = run.state

    if progress and run.lead:  # imported on demand, as orbax is
        from tqdm.auto import tqdm
    else:  # disabled: tqdm.auto would still warn in a notebook without ipywidgets
        from tqdm import tqdm
    bar = tqdm(total=steps, initial=min(run.step, steps), disable=not (progress and run.lead), desc="fit",
               unit="step")
    try:
        _drive(run, chunk, data, steps, log_every, checkpoint_every, rollbacks, bar)
    finally:
        bar.close()
        if run.mgr is not None:
            run.mgr.wait_until_finished()
            run.mgr.close()
    s = run.state
    return FitResult(s.params, s.opt_state, int(s.step), run.history, s.objective_state, s.ema_params, run.hooks.rows)


# Names that lived here before checkpoints had a module of their own.
__getattr__ = _compat.moved(__name__, {name: f"jsm.checkpoint.{name}" for name in (
    "CheckpointMismatchError", "restore_latest", "restore_newest")})
