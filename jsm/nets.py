"""Flax NNX energy and score networks, and the bridge to pure functions.

Modules take ONE example x of shape (d,) (they also broadcast over leading
batch axes). Activations are smooth (softplus by default) so that the second
derivatives that implicit score matching and Langevin's MALA need exist.

`pure(module)` returns `(apply, params)` with `apply(params, *args)` a pure
function: that is what `jax.grad`, `jax.jit`, optax and orbax want.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jsm import _validate

Array = jax.Array


class MLP(nnx.Module):
    """x -> W_L σ(... σ(W_1 x + b_1) ...) + b_L."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        *,
        activation: Callable[[Array], Array] = jax.nn.softplus,
        rngs: nnx.Rngs,
    ):
        sizes = (in_dim, *hidden, out_dim)
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class MLPEnergy(nnx.Module):
    """f_θ(x): (d,) -> (), an MLP with a scalar output."""

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), *, rngs: nnx.Rngs, **kw):
        self.mlp = MLP(dim, hidden, 1, rngs=rngs, **kw)

    def __call__(self, x: Array) -> Array:
        return self.mlp(x)[..., 0]


class MLPScore(nnx.Module):
    """s_θ(x): (d,) -> (d,), a score modelled directly (no energy behind it)."""

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), *, rngs: nnx.Rngs, **kw):
        self.mlp = MLP(dim, hidden, dim, rngs=rngs, **kw)

    def __call__(self, x: Array) -> Array:
        return self.mlp(x)


class NoiseConditionalScore(nnx.Module):
    """s_θ(x, σ): ((d,), ()) -> (d,), one network for every noise level.

    Default: s_θ(x, σ) = g_θ(x, log σ) / σ: the 1/σ is the size of the true noised
    score (Song & Ermon 2020), so g_θ only learns a direction of order one.

    With `data_scale` = σ_d, the per-coordinate scale of (centred) data, the network
    is preconditioned as in Karras et al. (2022): it sees c_in x = x / sqrt(σ² + σ_d²),
    of order one at every level, and corrects the score of N(0, (σ² + σ_d²) I):

        s_θ(x, σ) = -x / (σ² + σ_d²) + σ_d / (σ sqrt(σ² + σ_d²)) · g_θ(c_in x, log σ / 4),

    i.e. the score of their denoiser c_skip x + c_out g_θ. Centre the data first.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), *, rngs: nnx.Rngs,
                 data_scale: float | None = None, **kw):
        self.mlp = MLP(dim + 1, hidden, dim, rngs=rngs, **kw)
        if data_scale is not None:
            _validate.positive("data_scale", data_scale)
            data_scale = float(data_scale)
        self.data_scale = data_scale

    def __call__(self, x: Array, sigma: Array) -> Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:-1])[..., None]
        if self.data_scale is None:
            return self.mlp(jnp.concatenate([x, jnp.log(sigma)], axis=-1)) / sigma
        total = sigma**2 + self.data_scale**2
        g = self.mlp(jnp.concatenate([x / jnp.sqrt(total), jnp.log(sigma) / 4], axis=-1))
        return -x / total + self.data_scale / (sigma * jnp.sqrt(total)) * g


def pure(module: nnx.Module) -> tuple[Callable[..., Any], nnx.State]:
    """Split an NNX module into `apply(params, *args)` and its parameters.

    Only `nnx.Param` variables are trainable `params`; any other state is
    frozen into `apply` as it is now.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(params: nnx.State, *args: Any) -> Any:
        return nnx.merge(graphdef, params, rest)(*args)

    return apply, params
