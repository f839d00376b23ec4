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

    s_θ(x, σ) = g_θ(x, log σ) / σ: the 1/σ is the size of the true noised score
    (Song & Ermon 2020), so g_θ only learns a direction of order one.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), *, rngs: nnx.Rngs, **kw):
        self.mlp = MLP(dim + 1, hidden, dim, rngs=rngs, **kw)

    def __call__(self, x: Array, sigma: Array) -> Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:-1])
        h = jnp.concatenate([x, jnp.log(sigma)[..., None]], axis=-1)
        return self.mlp(h) / sigma[..., None]


def pure(module: nnx.Module) -> tuple[Callable[..., Any], nnx.State]:
    """Split an NNX module into `apply(params, *args)` and its parameters.

    Only `nnx.Param` variables are trainable `params`; any other state is
    frozen into `apply` as it is now.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(params: nnx.State, *args: Any) -> Any:
        return nnx.merge(graphdef, params, rest)(*args)

    return apply, params
