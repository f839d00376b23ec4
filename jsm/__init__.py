"""jsm: score matching, energy-based models and Langevin sampling in JAX.

A model is a density known up to a constant, q(x) = exp(-f(x)) / Z. Every
function here acts on ONE example x (a vector (d,), or an image (h, w, c) where
nothing needs a flat vector); `jax.vmap` batches, `jax.jit` compiles, `jax.sharding`
spreads over devices. `jsm.plot` (matplotlib) and `jsm.runs` (experiment
bookkeeping) are imported on demand.
"""

from jsm import (diagnostics, diffusion, ebm, forward, implicit, likelihood, metrics, nets, objectives, partition,
                 samplers, scores, sde, targets, train)
from jsm.scores import divergence, hutchinson_divergence, laplacian, score_of
from jsm.train import fit

__all__ = [
    "diagnostics",
    "diffusion",
    "divergence",
    "ebm",
    "fit",
    "forward",
    "hutchinson_divergence",
    "implicit",
    "laplacian",
    "likelihood",
    "metrics",
    "nets",
    "objectives",
    "partition",
    "samplers",
    "score_of",
    "scores",
    "sde",
    "targets",
    "train",
]
__version__ = "0.1.0"
