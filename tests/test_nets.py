"""Networks: shapes, the pure-function bridge, and the noise-conditional 1/σ scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsm
from jsm import nets

from conftest import tol


def test_shapes_and_pure_apply_match_the_module():
    x = jnp.ones(3)
    for module, shape in (
        (nets.MLPEnergy(3, (8, 8), rngs=nnx.Rngs(0)), ()),
        (nets.MLPScore(3, (8,), rngs=nnx.Rngs(0)), (3,)),
    ):
        apply, params = nets.pure(module)
        assert apply(params, x).shape == shape
        np.testing.assert_array_equal(apply(params, x), module(x))
        assert jax.vmap(lambda x: apply(params, x))(jnp.ones((5, 3))).shape == (5, *shape)


def test_laplacian_gradients_reach_every_parameter_but_the_energy_offset():
    """Δf does not see f's additive constant (the output bias), and sees every other parameter."""
    apply, params = nets.pure(nets.MLPEnergy(2, (8, 8), rngs=nnx.Rngs(0)))
    grads = jax.grad(lambda p: jsm.laplacian(lambda x: apply(p, x))(jnp.ones(2)))(params)
    leaves = {jax.tree_util.keystr(path): g for path, g in jax.tree_util.tree_leaves_with_path(grads)}
    zero = [name for name, g in leaves.items() if not bool(jnp.any(g != 0))]
    assert len(leaves) == 6 and len(zero) == 1 and "2" in zero[0] and "bias" in zero[0], zero


def test_noise_conditional_score_scales_as_one_over_sigma():
    ncs = nets.NoiseConditionalScore(2, (8,), rngs=nnx.Rngs(0))
    x = jnp.array([0.3, -0.2])
    assert ncs(x, 0.5).shape == (2,) and ncs(jnp.ones((4, 2)), 0.5).shape == (4, 2)
    # s(x, σ) = g(x, log σ) / σ: removing the 1/σ leaves a function of log σ only.
    h = jnp.concatenate([x, jnp.log(jnp.array([0.5]))])
    np.testing.assert_allclose(ncs(x, 0.5) * 0.5, ncs.mlp(h), rtol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_preconditioned_score_is_a_gaussian_score_plus_a_scaled_correction():
    """With data_scale σ_d: s = -x/(σ²+σ_d²) + σ_d/(σ sqrt(σ²+σ_d²)) g(x/sqrt(σ²+σ_d²), log σ/4)."""
    ncs = nets.NoiseConditionalScore(3, (8,), rngs=nnx.Rngs(0), data_scale=0.4)
    x, sigma, total = jnp.array([0.3, -0.2, 1.5]), 0.7, 0.7**2 + 0.4**2
    g = ncs.mlp(jnp.concatenate([x / jnp.sqrt(total), jnp.log(jnp.array([sigma])) / 4]))
    want = -x / total + 0.4 / (sigma * jnp.sqrt(total)) * g
    np.testing.assert_allclose(ncs(x, sigma), want, rtol=tol(1e-6, 1e-12), atol=tol(1e-7, 1e-14))
    assert ncs(jnp.ones((5, 3)), sigma).shape == (5, 3)
    with pytest.raises(ValueError, match="data_scale must be positive and finite, got -1.0"):
        nets.NoiseConditionalScore(3, (8,), rngs=nnx.Rngs(0), data_scale=-1.0)
