"""Checkpoints of a training state: saved whole, restored exactly, damaged ones set aside.

A checkpoint holds the whole `jsm.train.TrainState` of one step: the step count, the parameters,
the optimizer's state, the run's key, the objective's state (PCD's replay buffer, for instance)
and the moving average of the parameters. Orbax writes it under `<directory>/<step>/`, and
`manager(directory, keep)` keeps the newest `keep` of them.

Atomic saves: `save` hands the state to orbax, which writes it in the background into a
temporary directory next to the final one and renames it when every file is written. A save
cut short (the process killed, the machine down, the disk full) leaves only that temporary
directory behind: no restore ever reads it, and the next manager opened on the directory
deletes it. So the newest finished checkpoint is always complete, unless something damaged it
afterwards. `mgr.wait_until_finished()` waits for a save still being written.

Restore: `restore_newest(directory, like)` tries the checkpoints from the newest down and
returns the first one that reads back, with the same structure, dtypes and key type as the
state `like` (a freshly initialised state does). A checkpoint whose arrays have other shapes
than `like`'s belongs to another model or config: it is refused at once with
`CheckpointMismatchError`, naming the arrays that differ, rather than skipped, and nothing is
moved or deleted. `restore_latest` returns just the state.

Damaged checkpoints: a finished checkpoint that still fails to read (a file cut short or lost
by a bad copy or a disk error) is skipped, reported with its step and the reason, and the next
older one is tried. `set_aside` then moves such checkpoints to `<directory>.damaged/<step>`:
out of the way of a new save of the same step, and never deleted, so that they can still be
looked at. `jsm.fit` does both when it resumes, warns once for each damaged checkpoint, and
refuses to start afresh over a directory where no checkpoint reads at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

if TYPE_CHECKING:
    from jsm.train import TrainState

__all__ = ["CheckpointMismatchError", "manager", "restore", "restore_latest", "restore_newest", "save", "set_aside"]


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another model: its arrays' shapes differ from this run's."""


def manager(directory: str | Path, keep: int, *, clean: bool = True) -> ocp.CheckpointManager:
    """An orbax manager of the checkpoints under `directory` (created if missing), keeping the newest `keep`.

    With `clean` (the manager a run saves with), opening it deletes what interrupted saves left
    behind (their temporary directories), in the background, on the primary process only.
    Open at most one cleaning manager on a directory at a time: two would delete the same
    directories at once, and the slower one fails on files the other already removed.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=clean)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def save(mgr: ocp.CheckpointManager, step: int, state: TrainState) -> None:
    """Start saving `state` as checkpoint `step`; the files are written in the background."""
    mgr.save(step, args=ocp.args.StandardSave(_to_saveable(state)))


def restore(mgr: ocp.CheckpointManager, step: int, like: TrainState) -> TrainState:
    """Checkpoint `step` of `mgr`, shaped like `like`.

    Raises:
      CheckpointMismatchError: its arrays have other shapes than `like`'s (checked before reading them).
    """
    saveable = _to_saveable(like)
    _check_shapes(mgr.item_metadata(step).tree, saveable, f"{mgr.directory}/{step}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saveable)
    return _from_saved(mgr.restore(step, args=ocp.args.StandardRestore(abstract)), like)


def restore_newest(directory: str | Path, like: TrainState) -> tuple[TrainState | None, list[tuple[int, str]]]:
    """The newest checkpoint under `directory` that restores, shaped like `like`, and the skipped ones.

    `directory` holds the step folders, or is the workdir of a `jsm.fit` run (its `checkpoints/`).

    A finished checkpoint that fails to restore (a file cut short or lost) is skipped and
    listed as (step, reason); older ones are tried in turn. Nothing is moved or deleted.
    (None, []) when there is no checkpoint.

    Raises:
      CheckpointMismatchError: a checkpoint's arrays have other shapes than `like`'s.
    """
    directory = _checkpoints_of(Path(directory))
    if not directory.exists():
        return None, []
    skipped = []
    with manager(directory, keep=1_000_000, clean=False) as mgr:  # reads only; the run's manager cleans
        for step in sorted(mgr.all_steps(), reverse=True):
            try:
                return restore(mgr, step, like), skipped
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means this copy is damaged
                skipped.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
    return None, skipped


def _checkpoints_of(directory: Path) -> Path:
    """`directory`, or its `checkpoints/` when given the workdir of a `jsm.fit` run."""
    inner = directory / "checkpoints"
    if inner.is_dir() and not any(p.name.isdigit() for p in directory.iterdir()):
        return inner
    return directory


def restore_latest(directory: str | Path, like: TrainState) -> TrainState | None:
    """The newest checkpoint under `directory` that restores (see `restore_newest`); None if there is none."""
    return restore_newest(directory, like)[0]


def set_aside(directory: str | Path, skipped: list[tuple[int, str]]) -> Path:
    """Move the damaged checkpoints `skipped` ((step, reason) pairs) to `<directory>.damaged/`; return it.

    A new save may reuse their steps, so they leave the manager's directory; they are never
    deleted. A step already set aside before gets a `+` appended to its name.
    """
    directory = Path(directory)
    aside = directory.with_name(directory.name + ".damaged")
    aside.mkdir(exist_ok=True)
    for step, _ in skipped:
        target = aside / str(step)
        while target.exists():
            target = target.with_name(target.name + "+")
        shutil.move(str(directory / str(step)), str(target))
    return aside


# --- a state as orbax stores it ------------------------------------------------------


def _to_saveable(state: TrainState) -> dict:
    key = state.key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)  # orbax stores plain arrays: a typed key goes as its raw data
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "key": key,
            "objective_state": state.objective_state, "ema_params": state.ema_params}


def _from_saved(saved: dict, like: TrainState) -> TrainState:
    key = saved["key"]
    if jnp.issubdtype(like.key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key, impl=jax.random.key_impl(like.key))
    return like._replace(step=jnp.asarray(saved["step"]), params=saved["params"], opt_state=saved["opt_state"],
                         key=key, objective_state=saved["objective_state"], ema_params=saved.get("ema_params"))


def _path_name(path) -> str:
    return "/".join(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))) for k in path)


def _shapes(tree) -> dict[str, tuple]:
    return {_path_name(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(saved_tree, like: dict, where: str) -> None:
    saved, want = _shapes(saved_tree), _shapes(like)
    diff = sorted(k for k in saved.keys() | want.keys() if saved.get(k) != want.get(k))
    if diff:
        lines = "; ".join(f"{k}: saved {saved.get(k, 'absent')}, this run {want.get(k, 'absent')}" for k in diff[:5])
        raise CheckpointMismatchError(
            f"the checkpoint {where} holds arrays of other shapes than this run's ({len(diff)} differ: {lines}). "
            f"It belongs to another model or config: use a new workdir, or the same model to resume.{_hint(diff)} "
            f"Nothing in the workdir was changed.")


def _hint(diff: list[str]) -> str:
    """What a template built for restoring most often gets wrong, when only that part differs."""
    for part, remedy in (("ema_params", "a moving average of the parameters: build the template with "
                                        "init_state(..., ema_decay=...) when the run had one, without it otherwise"),
                         ("opt_state", "the optimizer's state: build the template with the run's optimizer")):
        if all(k.startswith(part) for k in diff):
            return f" Only {part} differs, {remedy}."
    return ""
