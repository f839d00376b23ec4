"""What the experiment scripts share: the 8-mode ring, noise schedules, evaluation callbacks, quick sizes.

The scripts import this module (and each other) by name: run as `python experiments/<name>.py`,
Python puts experiments/ first on the module path, and pytest does the same through
`pythonpath` in pyproject.toml. Nothing here is part of the library.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp

from jsm import targets, train

C = TypeVar("C")


def ring(scale: float = 0.3, n_modes: int = 8, radius: float = 2.0) -> targets.GaussianMixture:
    """The scripts' common target: `n_modes` equal Gaussians of std `scale` on a circle of `radius`."""
    return targets.Ring(n_modes=n_modes, radius=radius, scale=scale)


def geometric_sigmas(sigma_max: float, sigma_min: float, n_levels: int) -> jax.Array:
    """σ_1 > ... > σ_L, geometric from sigma_max to sigma_min (Song & Ermon 2019), shape (L,)."""
    return jnp.geomspace(sigma_max, sigma_min, n_levels)


def evaluations(name: str, steps: int, n: int, fn: Callable[[train.TrainState], dict]) -> train.Callback:
    """`fn(state)` run `n` times in a run of `steps` steps: every ceil(steps / n) steps and at the end.

    As a `fit` callback, its results are saved in the workdir and a killed run reports
    exactly the numbers of an uninterrupted one.
    """
    return train.Callback(name, max(1, -(-steps // n)), fn)


def with_quick_sizes(config: C, quick: dict) -> C:
    """With `config.quick`, `quick`'s value for every field of `config` still at its full default
    (a size given on the command line is kept)."""
    if not config.quick:
        return config
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in quick.items() if getattr(config, k) == defaults[k]})
