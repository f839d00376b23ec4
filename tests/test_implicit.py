"""The GAN objective: one scalar whose gradient is each player's own gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jsm import implicit, nets

from conftest import FLOAT, tol


@pytest.mark.numerics
def test_gan_loss_gives_each_player_its_own_loss_and_gradient(key):
    rngs = nnx.Rngs(0)
    g_apply, gp = nets.pure(implicit.Generator(3, 2, (16,), rngs=rngs))
    d_apply, dp = nets.pure(implicit.Discriminator(2, (16,), rngs=rngs))
    params = {"generator": gp, "discriminator": dp}
    data = jax.random.normal(key, (64, 2))
    (loss, aux), grads = jax.value_and_grad(lambda p: implicit.gan_loss(g_apply, d_apply, p, key, data, 3), has_aux=True)(params)

    z = jax.random.normal(key, (64, 3))
    fake = lambda pg: jax.vmap(lambda zi: g_apply(pg, zi))(z)
    logits = lambda pd, xs: jax.vmap(lambda x: d_apply(pd, x))(xs)
    # The slow obvious way: L_D = -E log σ(D(x)) - E log(1 - σ(D(g(z)))), L_G = -E log σ(D(g(z))) (non-saturating).
    loss_d = lambda pd: -jnp.mean(jnp.log(jax.nn.sigmoid(logits(pd, data)))) - jnp.mean(jnp.log(1 - jax.nn.sigmoid(logits(pd, fake(gp)))))
    loss_g = lambda pg: -jnp.mean(jnp.log(jax.nn.sigmoid(logits(dp, fake(pg)))))
    for got, want in ((grads["discriminator"], jax.grad(loss_d)(dp)), (grads["generator"], jax.grad(loss_g)(gp))):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=tol(1e-4, 1e-10), atol=tol(1e-6, 1e-12))
    np.testing.assert_allclose([aux["loss_d"], aux["loss_g"], loss], [loss_d(dp), loss_g(gp), loss_d(dp) + loss_g(gp)],
                               rtol=tol(1e-5, 1e-12))
    real, fakes = np.asarray(logits(dp, data)), np.asarray(logits(dp, fake(gp)))
    accuracy = (np.sum(real > 0) + np.sum(fakes < 0)) / (len(real) + len(fakes))
    assert 0 < accuracy < 1  # a fresh D is neither always right nor always wrong: the check below bites
    np.testing.assert_allclose(aux["d_accuracy"], accuracy, rtol=tol(1e-6, 1e-12))


def test_push_forward_is_g_of_standard_normal_latents(key):
    g_apply, gp = nets.pure(implicit.Generator(4, 3, (8,), rngs=nnx.Rngs(0)))
    g = lambda z: g_apply(gp, z)
    xs = implicit.push_forward(g, key, 10, 4)
    chex.assert_shape(xs, (10, 3))
    chex.assert_type(xs, FLOAT)
    z = jax.random.normal(key, (10, 4))
    np.testing.assert_allclose(xs, np.stack([g(zi) for zi in z]), rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-12))
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        implicit.push_forward(g, key, 0, 4)
