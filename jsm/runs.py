"""Run bookkeeping for experiment scripts: a dataclass config on the command line, a workdir.

An experiment is a frozen dataclass `Config` plus `main(config)`. `parse_config`
turns the dataclass into command-line flags (`--workdir`, `--steps`, `--seed`, ...),
and `prepare_workdir` makes `<workdir>/` and writes `config.json` with the
versions of the stack. Re-running with the same workdir resumes; a config that
differs in anything but the fields in `RESUMABLE` is refused, so a run is never
continued under settings it did not start with.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "FIT_FIELDS", "RESUMABLE", "STACK", "fit_options", "parse_config", "prepare_workdir", "save_json", "versions",
]

C = TypeVar("C")
RESUMABLE = ("steps", "progress")  # may change between a run and its resumption
STACK = ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint")


def versions() -> dict[str, str]:
    """Installed versions of the stack, for config.json."""
    out = {}
    for name in STACK:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _flag_type(tp):
    origin = typing.get_origin(tp)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return lambda s: tuple(inner(v) for v in s.split(",") if v)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0])
    return tp


def parse_config(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """Build `cls` (a dataclass) from command-line flags, one `--name` per field.

    Tuples are written comma-separated (`--hidden 64,64`); booleans as
    `--name` / `--no-name`; a field's `metadata["choices"]` restricts its values.
    """
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip())
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "") + f" (default: {field.default!r})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            parser.add_argument(
                flag, type=_flag_type(tp), default=field.default,
                choices=field.metadata.get("choices"), help=help_text,
            )
    return cls(**vars(parser.parse_args(argv)))


def _jsonable(config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def prepare_workdir(config, resumable: tuple[str, ...] = RESUMABLE) -> Path:
    """Create `config.workdir` and its `config.json`; refuse to resume under another config.

    Fields named in `resumable` may differ from the saved config.

    Raises:
      ValueError: the workdir holds a run whose config differs outside `RESUMABLE`.
    """
    workdir = Path(config.workdir)
    (workdir / "figures").mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    current = _jsonable(config)
    if path.exists():
        previous = json.loads(path.read_text()).get("config", {})
        changed = {
            k: (previous.get(k), v) for k, v in current.items()
            if k not in resumable and k != "workdir" and previous.get(k) != v
        }
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"workdir {workdir} holds a run with another config ({detail}); "
                f"use a new --workdir, or the same settings to resume"
            )
    save_json(path, {"config": current, "versions": versions()})
    return workdir


def save_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    tmp.replace(path)


FIT_FIELDS = ("steps", "batch_size", "workdir", "checkpoint_every", "log_every", "progress")


def fit_options(config, **overrides) -> dict[str, Any]:
    """The keyword arguments of `jsm.fit` that a config carries under the same names, plus overrides."""
    return {name: getattr(config, name) for name in FIT_FIELDS if hasattr(config, name)} | overrides
