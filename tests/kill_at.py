"""Run a script that calls `jsm.fit`, killing its process with SIGKILL at a chosen step and moment.

    python tests/kill_at.py STEP[:MOMENT] SCRIPT [ARGS ...]

runs SCRIPT with ARGS as `python SCRIPT ARGS` would (through runpy, as "__main__", its folder
first on sys.path), with `arm(STEP[:MOMENT])` in force. The moments, at step STEP of a run:

    before_save   (the default) once the chunk ending at STEP is logged in metrics.jsonl, before
                  that step's callbacks run and before its checkpoint is saved;
    during_save   as soon as `jsm.checkpoint.save` has handed the checkpoint to orbax, which is
                  still writing it in the background: the save is cut halfway;
    after_save    once that checkpoint is completely written.

A process that imports jsm itself calls `arm` directly (tests/distributed_fit.py). The kill
tests stop runs at chosen steps rather than at wall-clock moments, so that the same kills
happen on any machine, at any load. Test-only: nothing in jsm knows about it.
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import sys
from pathlib import Path

MOMENTS = ("before_save", "during_save", "after_save")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    """Kill this process at `spec` = STEP[:MOMENT] of the next runs of `jsm.fit` (see the module docstring)."""
    at, _, moment = spec.partition(":")
    at, moment = int(at), moment or "before_save"
    if moment not in MOMENTS:
        raise ValueError(f"moment must be one of {MOMENTS}, got {moment!r}")
    if moment == "before_save":
        _kill_in_a_first_callback(at)
    else:
        _kill_in_save(at, wait=moment == "after_save")


def _kill_in_a_first_callback(at: int) -> None:
    """`jsm.fit` with one more callback, first of all, every `at` steps, that kills at step `at`.

    fit runs its callbacks after logging a chunk and before saving its checkpoint. The callback is
    added only to runs that reach `at` (a callback also runs at a run's last step); its stop at
    multiples of `at` leaves the steps before `at` in the chunks they had. Across processes, pick a
    step where a chunk ends anyway (a multiple of log_every), or the processes' chunks differ.
    """
    import jsm
    from jsm import train

    fit = train.fit

    def kill(state):
        if int(state.step) == at:
            _die()
        return {}

    @functools.wraps(fit)
    def fit_killed(*args, callbacks=(), **kwargs):
        if kwargs.get("steps", 0) >= at:
            callbacks = (train.Callback("kill_at", at, kill), *callbacks)
        return fit(*args, callbacks=callbacks, **kwargs)

    jsm.fit = train.fit = fit_killed


def _kill_in_save(at: int, wait: bool) -> None:
    """`jsm.checkpoint.save` that kills once it has started (wait=False) or finished (wait=True) step `at`."""
    from jsm import checkpoint

    save = checkpoint.save

    @functools.wraps(save)
    def save_killed(mgr, step, state):
        save(mgr, step, state)
        if step == at:
            if wait:
                mgr.wait_until_finished()
            _die()

    checkpoint.save = save_killed


if __name__ == "__main__":
    spec, script, *args = sys.argv[1:]
    arm(spec)
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)  # where `python SCRIPT` looks first
    runpy.run_path(script, run_name="__main__")
