"""jsm: score matching, energy-based models and Langevin sampling in JAX.

A model is a density known up to a constant, q(x) = exp(-f(x)) / Z. Every
function here acts on ONE example x (a vector (d,), or an image (h, w, c) where
nothing needs a flat vector); `jax.vmap` batches, `jax.jit` compiles, `jax.sharding`
spreads over devices.

Submodules load when first used (`jsm.diffusion` brings diffrax, `jsm.fit` orbax,
`jsm.plot` matplotlib), so `import jsm` costs little more than importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "checkpoint",
    "data",
    "diagnostics",
    "diffusion",
    "divergence",
    "ebm",
    "fit",
    "forward",
    "hessian_diagonal",
    "hutchinson_divergence",
    "implicit",
    "jacobian_diagonal",
    "laplacian",
    "likelihood",
    "metrics",
    "nets",
    "objectives",
    "partition",
    "plot",
    "runs",
    "samplers",
    "score_of",
    "scores",
    "sde",
    "targets",
    "train",
]
__version__ = "0.1.0"

_SUBMODULES = {
    "checkpoint", "data", "diagnostics", "diffusion", "ebm", "forward", "implicit", "likelihood", "metrics", "nets",
    "objectives", "partition", "plot", "runs", "samplers", "scores", "sde", "targets", "train",
}
_FUNCTIONS = {"divergence": "scores", "hessian_diagonal": "scores", "hutchinson_divergence": "scores",
              "jacobian_diagonal": "scores", "laplacian": "scores", "score_of": "scores", "fit": "train"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FUNCTIONS:
        value = getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from jsm import (checkpoint, data, diagnostics, diffusion, ebm, forward, implicit, likelihood, metrics, nets,
                     objectives, partition, plot, runs, samplers, scores, sde, targets, train)
    from jsm.scores import (divergence, hessian_diagonal, hutchinson_divergence, jacobian_diagonal, laplacian,
                            score_of)
    from jsm.train import fit
