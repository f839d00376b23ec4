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


# --- class and time conditioning of the MLP score ---------------------------------------


_SMALL = dict(base=4, num_groups=4, emb_dim=16)  # UNets for 2 CPU cores: a few thousand parameters


def _vp_marginal(t):
    """(α_t, σ_t) of a variance-preserving path with α_t² + σ_t² = 1."""
    return jnp.exp(-t), jnp.sqrt(-jnp.expm1(-2 * t))


def test_noise_conditional_score_defaults_are_unchanged_by_the_new_options():
    """No classes, noise="sigma": the same parameters as before (MLP on [x, log σ]), no embedding."""
    apply, params = nets.pure(nets.NoiseConditionalScore(2, (8,), rngs=nnx.Rngs(0)))
    shapes = sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(params))
    assert shapes == sorted([(3, 8), (8,), (8, 2), (2,)])


def test_class_conditional_score_embeds_the_label_and_the_null_label():
    ncs = nets.NoiseConditionalScore(2, (8,), rngs=nnx.Rngs(0), num_classes=3, class_dim=4)
    x = jnp.array([0.3, -0.2])
    outs = [ncs(x, 0.5, y) for y in (0, 1, 2, nets.NULL_LABEL)]
    assert all(o.shape == (2,) for o in outs)
    assert all(not np.allclose(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])
    np.testing.assert_array_equal(ncs(x, 0.5), outs[-1])  # y=None is the null label
    # s(x, σ, y) = g([x, log σ, E[y]]) / σ, E's row K for the null label.
    h = jnp.concatenate([x, jnp.log(jnp.array([0.5])), ncs.label_embedding.embedding[...][1]])
    np.testing.assert_allclose(outs[1], ncs.mlp(h) / 0.5, rtol=tol(1e-6, 1e-12))
    h = jnp.concatenate([x, jnp.log(jnp.array([0.5])), ncs.label_embedding.embedding[...][3]])
    np.testing.assert_allclose(outs[-1], ncs.mlp(h) / 0.5, rtol=tol(1e-6, 1e-12))
    apply, params = nets.pure(ncs)
    batch = jax.vmap(lambda x, y: apply(params, x, 0.5, y))(jnp.stack([x, x]), jnp.array([1, -1]))
    np.testing.assert_allclose(batch, jnp.stack([outs[1], outs[-1]]), rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-14))
    with pytest.raises(ValueError, match=r"y must be an integer label in \[0, 3\) or NULL_LABEL = -1, got 3"):
        ncs(x, 0.5, 3)
    with pytest.raises(TypeError, match="takes no label y"):
        nets.NoiseConditionalScore(2, (8,), rngs=nnx.Rngs(0))(x, 0.5, 1)


@pytest.mark.numerics
def test_time_conditional_score_sees_fourier_features_of_t():
    x, t = jnp.array([0.3, -0.2, 1.0]), 0.3
    alpha, sigma = _vp_marginal(jnp.asarray(t))
    raw = nets.NoiseConditionalScore(3, (8,), rngs=nnx.Rngs(0), noise="t", n_frequencies=4)
    h = jnp.concatenate([x, nets.fourier_features(jnp.asarray(t), 4)])
    np.testing.assert_allclose(raw(x, t), raw.mlp(h), rtol=tol(1e-6, 1e-12))
    scaled = nets.NoiseConditionalScore(3, (8,), rngs=nnx.Rngs(0), noise="t", n_frequencies=4, marginal=_vp_marginal)
    np.testing.assert_allclose(scaled(x, t), scaled.mlp(h) / sigma, rtol=tol(1e-6, 1e-12))
    # Preconditioned for x = α_t x_0 + σ_t z: s = -x/v + α σ_d/(σ sqrt v) g(x/sqrt v, γ(t)), v = σ² + α²σ_d².
    pre = nets.NoiseConditionalScore(3, (8,), rngs=nnx.Rngs(0), noise="t", n_frequencies=4, marginal=_vp_marginal,
                                     data_scale=0.4)
    v = sigma**2 + alpha**2 * 0.4**2
    g = pre.mlp(jnp.concatenate([x / jnp.sqrt(v), nets.fourier_features(jnp.asarray(t), 4)]))
    np.testing.assert_allclose(pre(x, t), -x / v + alpha * 0.4 / (sigma * jnp.sqrt(v)) * g, rtol=tol(1e-5, 1e-12))
    assert pre(jnp.ones((5, 3)), t).shape == (5, 3)
    # γ(v) = [sin ω_k v, cos ω_k v], ω geometric from 1 to 1000.
    np.testing.assert_allclose(nets.fourier_features(jnp.asarray(0.5), 3),
                               [np.sin(0.5), np.sin(0.5 * np.sqrt(1000)), np.sin(500), np.cos(0.5),
                                np.cos(0.5 * np.sqrt(1000)), np.cos(500)], rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))


@pytest.mark.parametrize("kw, error, match", [
    (dict(noise="log_sigma"), ValueError, r"noise must be one of \('sigma', 't'\), got 'log_sigma'"),
    (dict(noise="t", data_scale=0.5), ValueError, "data_scale with noise='t' needs marginal"),
    (dict(marginal=_vp_marginal), ValueError, "marginal .* is for noise='t'"),
    (dict(num_classes=0), ValueError, "num_classes must be an int >= 1, got 0"),
])
def test_conditioning_bad_options(kw, error, match):
    with pytest.raises(error, match=match):
        nets.NoiseConditionalScore(2, (8,), rngs=nnx.Rngs(0), **kw)
    with pytest.raises(error, match=match):
        nets.UNet(1, rngs=nnx.Rngs(0), **_SMALL, **kw)


# --- UNet ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, mults", [((8, 8, 1), (1, 2)), ((28, 28, 1), (1, 2, 2, 2)), ((32, 32, 3), (1, 2))])
def test_unet_shapes_and_one_example_equals_a_batch_of_one(shape, mults):
    """28 -> 14 -> 7 -> 4 and back (4 -> 7): up-sampling meets each skip at its exact size."""
    apply, params = nets.pure(nets.UNet(shape[-1], rngs=nnx.Rngs(0), channel_mults=mults, data_scale=0.5, **_SMALL))
    xs = jax.random.normal(jax.random.key(0), (2, *shape))
    sigmas = jnp.array([0.3, 2.0])
    batch = jax.jit(jax.vmap(apply, in_axes=(None, 0, 0)))(params, xs, sigmas)
    assert batch.shape == (2, *shape) and np.all(np.isfinite(batch))
    one = jax.jit(apply)(params, xs[1], sigmas[1])
    np.testing.assert_allclose(one, batch[1], rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))
    assert not np.allclose(batch[0], batch[1])


def _zero_last_layer(params):
    """The parameters with g's last layer (conv_out) zero: then g = 0."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros_like(p) if "conv_out" in jax.tree_util.keystr(path) else p, params)


@pytest.fixture(scope="module")
def unet():
    module = nets.UNet(1, rngs=nnx.Rngs(1), data_scale=0.5, num_classes=3, **_SMALL)
    apply, params = nets.pure(module)
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)
    g = jax.jit(lambda p, x, sigma, y: nnx.merge(graphdef, p, rest).g(x, sigma, y))
    return module, jax.jit(apply), g, params


def test_unet_class_embedding_changes_the_score_and_the_null_label_works(unet):
    module, apply, _, params = unet
    x = jax.random.normal(jax.random.key(2), (8, 8, 1))
    outs = [apply(params, x, 0.7, y) for y in (0, 2, nets.NULL_LABEL)]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[0], outs[2])
    no_label = jax.jit(lambda p, x: nets.pure(module)[0](p, x, 0.7))(params, x)  # y=None: the null label
    np.testing.assert_allclose(no_label, outs[2], rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-14))
    batch = jax.jit(jax.vmap(apply, in_axes=(None, 0, None, 0)))(params, jnp.stack([x, x, x]), 0.7, jnp.array([0, 2, -1]))
    np.testing.assert_allclose(batch, jnp.stack(outs), rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))
    # e = W_2 SiLU(W_1 γ(log σ / 4)) + E[y]: Karras's c_noise = log σ / 4 under the Fourier features.
    gamma = nets.fourier_features(jnp.log(jnp.asarray(0.7)) / 4, module.n_frequencies)
    e = module.emb_out(jax.nn.silu(module.emb_in(gamma))) + module.label_embedding.embedding[...][2]
    np.testing.assert_allclose(module.embedding(jnp.asarray(0.7), 2), e, rtol=tol(1e-6, 1e-12), atol=tol(1e-7, 1e-14))
    with pytest.raises(ValueError, match=r"x must be ONE image of shape \(h, w, 1\).*got shape \(2, 8, 8, 1\)"):
        module(jnp.stack([x, x]), 0.7)
    with pytest.raises(ValueError, match=r"y must be an integer label in \[0, 3\) or NULL_LABEL = -1, got 3"):
        module(x, 0.7, 3)


@pytest.mark.numerics
def test_unet_preconditioning_is_the_gaussian_score_plus_a_scaled_correction(unet):
    """s = -x/(σ²+σ_d²) + σ_d/(σ sqrt(σ²+σ_d²)) g(x/sqrt(σ²+σ_d²)); with g's last layer zero, exactly -x/(σ²+σ_d²)."""
    _, apply, g, params = unet
    x, sigma, total = jax.random.normal(jax.random.key(3), (8, 8, 1)), 0.7, 0.7**2 + 0.5**2
    want = -x / total + 0.5 / (sigma * np.sqrt(total)) * g(params, x / np.sqrt(total), jnp.asarray(sigma), 1)
    np.testing.assert_allclose(apply(params, x, sigma, 1), want, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-14))
    # Exact up to the round-off of -x/(σ²+σ_d²) itself (x64: 1e-14).
    np.testing.assert_allclose(apply(_zero_last_layer(params), x, sigma, 1), -x / total, rtol=tol(1e-6, 1e-14))
    # noise="t" with the marginal (α_t, σ_t): the score of N(0, (σ_t² + α_t² σ_d²) I).
    timed, timed_params = nets.pure(nets.UNet(1, rngs=nnx.Rngs(1), data_scale=0.5, noise="t", marginal=_vp_marginal,
                                              **_SMALL))
    alpha, sigma_t = _vp_marginal(jnp.asarray(0.3))
    np.testing.assert_allclose(jax.jit(timed)(_zero_last_layer(timed_params), x, 0.3),
                               -x / (sigma_t**2 + alpha**2 * 0.25), rtol=tol(1e-6, 1e-12))


def test_a_few_steps_of_denoising_score_matching_reduce_the_loss():
    """J = 1/2 E |s(x + σu, σ) + u/σ|² on 8 tiny images, with the noise held fixed across steps."""
    optax = pytest.importorskip("optax")
    apply, params = nets.pure(nets.UNet(1, rngs=nnx.Rngs(0), data_scale=0.5, **_SMALL))
    key_x, key_u, key_s = jax.random.split(jax.random.key(4), 3)
    xs = 0.5 * jnp.sign(jax.random.normal(key_x, (8, 8, 8, 1)))  # ±0.5 pixels: σ_d = 0.5
    us, sigmas = jax.random.normal(key_u, xs.shape), jnp.exp(jax.random.uniform(key_s, (8,), minval=-2.0, maxval=1.0))

    def loss(params):
        s = jax.vmap(lambda x, u, sigma: apply(params, x + sigma * u, sigma))(xs, us, sigmas)
        return 0.5 * jnp.mean(jnp.sum((s + us / sigmas[:, None, None, None]) ** 2 * sigmas[:, None, None, None] ** 2,
                                      axis=(1, 2, 3)))

    optimizer = optax.adam(3e-3)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    for _ in range(10):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses
