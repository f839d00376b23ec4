"""jsm: score matching, energy-based models and Langevin sampling in JAX.

A model is a density known up to a constant, q(x) = exp(-f(x)) / Z. Every
function here acts on ONE example x of shape (d,); `jax.vmap` batches,
`jax.jit` compiles. `jsm.plot` (matplotlib) and `jsm.runs` (experiment
bookkeeping) are imported on demand.
"""

from jsm import forward, implicit, metrics, nets, objectives, partition, samplers, scores, targets, train
from jsm.scores import divergence, hutchinson_divergence, laplacian, score_of
from jsm.train import fit

__all__ = [
    "divergence",
    "fit",
    "forward",
    "hutchinson_divergence",
    "implicit",
    "laplacian",
    "metrics",
    "nets",
    "objectives",
    "partition",
    "samplers",
    "score_of",
    "scores",
    "targets",
    "train",
]
__version__ = "0.1.0"
