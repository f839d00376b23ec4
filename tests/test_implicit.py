"""The GAN objective: one scalar whose gradient is each player's own gradient."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsm import implicit, nets

from conftest import tol


def test_gan_loss_gives_each_player_its_own_gradient(key):
    rngs = nnx.Rngs(0)
    g_apply, gp = nets.pure(implicit.Generator(3, 2, (16,), rngs=rngs))
    d_apply, dp = nets.pure(implicit.Discriminator(2, (16,), rngs=rngs))
    params = {"generator": gp, "discriminator": dp}
    data = jax.random.normal(key, (64, 2))
    grads = jax.grad(lambda p: implicit.gan_loss(g_apply, d_apply, p, key, data, 3)[0])(params)

    z = jax.random.normal(key, (64, 3))
    fake = lambda pg: jax.vmap(lambda zi: g_apply(pg, zi))(z)
    logits = lambda pd, xs: jax.vmap(lambda x: d_apply(pd, x))(xs)
    # The slow obvious way: -E log σ(D(x)) - E log(1 - σ(D(g(z)))) and -E log σ(D(g(z))).
    loss_d = lambda pd: -jnp.mean(jnp.log(jax.nn.sigmoid(logits(pd, data)))) - jnp.mean(jnp.log(1 - jax.nn.sigmoid(logits(pd, fake(gp)))))
    loss_g = lambda pg: -jnp.mean(jnp.log(jax.nn.sigmoid(logits(dp, fake(pg)))))
    for got, want in ((grads["discriminator"], jax.grad(loss_d)(dp)), (grads["generator"], jax.grad(loss_g)(gp))):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=tol(1e-4, 1e-10), atol=tol(1e-6, 1e-12))


def test_push_forward_shapes_and_checks(key):
    g_apply, gp = nets.pure(implicit.Generator(4, 3, (8,), rngs=nnx.Rngs(0)))
    xs = implicit.push_forward(lambda z: g_apply(gp, z), key, 10, 4)
    assert xs.shape == (10, 3)
    import pytest

    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        implicit.push_forward(lambda z: z, key, 0, 4)
