"""Implicit models: a push-forward generator x = g_θ(z), z ~ N(0, I), and the GAN objective.

An implicit model has samples but no density: neither maximum likelihood nor
score matching applies. A GAN trains g_θ against a discriminator D_φ(x) (a logit)
(Goodfellow et al. 2014). At the optimal D, the original minimax objective is
2 JS(p, q_θ) - log 4; its generator gradient vanishes when D wins, so the
non-saturating form is used in practice:

    L_D(φ) = -E_p log σ(D(x)) - E_z log(1 - σ(D(g(z)))),     L_G(θ) = -E_z log σ(D(g(z))).

JS (like reverse KL) does not punish q_θ for missing modes of p, which is why
GANs collapse onto a few modes while maximum likelihood (forward KL) covers them all.

`gan_loss` returns L_D(φ; θ fixed) + L_G(θ; φ fixed) as ONE scalar: its gradient
is ∇_φ L_D for φ and ∇_θ L_G for θ, so one optimizer step of `jsm.fit` is one
simultaneous update of both players.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jsm import _validate
from jsm.nets import MLP

__all__ = [
    "Discriminator", "Generator", "gan_loss", "push_forward",
]

Array = jax.Array


class Generator(nnx.Module):
    """g_θ: z (latent_dim,) -> x (dim,), an MLP."""

    def __init__(self, latent_dim: int, dim: int, hidden: Sequence[int] = (128, 128), *, rngs: nnx.Rngs, **kw):
        self.latent_dim = latent_dim
        self.mlp = MLP(latent_dim, hidden, dim, rngs=rngs, **kw)

    def __call__(self, z: Array) -> Array:
        return self.mlp(z)


class Discriminator(nnx.Module):
    """D_φ: x (dim,) -> () a logit; σ(D(x)) is the probability that x is real."""

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), *, rngs: nnx.Rngs, **kw):
        self.mlp = MLP(dim, hidden, 1, rngs=rngs, **kw)

    def __call__(self, x: Array) -> Array:
        return self.mlp(x)[..., 0]


def push_forward(generator_fn: Callable[[Array], Array], key: Array, n: int, latent_dim: int) -> Array:
    """n samples g(z), z ~ N(0, I_latent_dim): (n, dim)."""
    _validate.key("key", key)
    n, latent_dim = _validate.positive_int("n", n), _validate.positive_int("latent_dim", latent_dim)
    return jax.vmap(generator_fn)(jax.random.normal(key, (n, latent_dim)))


def gan_loss(
    generator_fn: Callable[[Any, Array], Array],
    discriminator_fn: Callable[[Any, Array], Array],
    params: dict,
    key: Array,
    data: Array,
    latent_dim: int,
) -> tuple[Array, dict]:
    """The non-saturating GAN objective as one loss for simultaneous updates.

    Args:
      generator_fn: g(params_g, z) -> x.
      discriminator_fn: D(params_d, x) -> logit.
      params: {"generator": params_g, "discriminator": params_d}.
      key: PRNG key for z.
      data: (n, d) real samples; as many fakes are drawn.
      latent_dim: the dimension of z.

    Returns:
      (L_D(φ; θ stopped) + L_G(θ; φ stopped), aux with both losses and D's accuracy).
    """
    data = _validate.batch("data", data)
    pg, pd = params["generator"], params["discriminator"]
    stop = jax.lax.stop_gradient
    z = jax.random.normal(key, (data.shape[0], latent_dim), data.dtype)
    g = lambda p: jax.vmap(lambda zi: generator_fn(p, zi))(z)
    d = lambda p, xs: jax.vmap(lambda x: discriminator_fn(p, x))(xs)
    real, fake = d(pd, data), d(pd, g(stop(pg)))
    # -log σ(t) = softplus(-t), -log(1 - σ(t)) = softplus(t): stable for any logit.
    loss_d = jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))
    loss_g = jnp.mean(jax.nn.softplus(-d(stop(pd), g(pg))))
    accuracy = 0.5 * (jnp.mean(real > 0) + jnp.mean(fake < 0))
    return loss_d + loss_g, {"loss_d": loss_d, "loss_g": loss_g, "d_accuracy": accuracy}
