"""Flax NNX energy and score networks, and the bridge to pure functions.

Modules take ONE example x: the MLPs a vector (d,) (they also broadcast over
leading batch axes), `UNet` an image (h, w, c) (batch it with jax.vmap). Activations are smooth (softplus by default) so that the second
derivatives that implicit score matching and Langevin's MALA need exist.

`pure(module)` returns `(apply, params)` with `apply(params, *args)` a pure
function: that is what `jax.grad`, `jax.jit`, optax and orbax want.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsm import _validate
from jsm.diffusion import NULL_LABEL  # the "no label" class of s(x, σ, y), for classifier-free guidance

__all__ = [
    "MLP", "MLPEnergy", "MLPScore", "NOISE_INPUTS", "NoiseConditionalScore", "UNet",
    "fourier_features", "preconditioned_score", "pure", "total_variance",
]

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


NOISE_INPUTS = ("sigma", "t")


def fourier_features(v: Array, n_frequencies: int, max_frequency: float = 1000.0) -> Array:
    """γ(v) = [sin(ω_k v), cos(ω_k v)]_k, ω_k = max_frequency^(k / (n - 1)), k = 0..n-1: (...,) -> (..., 2n).

    The sinusoidal embedding of a noise level (Vaswani et al. 2017; Ho et al. 2020), with
    frequencies from 1 to `max_frequency` on a geometric grid.
    """
    omega = jnp.asarray(max_frequency, v.dtype) ** (jnp.arange(n_frequencies, dtype=v.dtype) / max(n_frequencies - 1, 1))
    angle = v[..., None] * omega
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def total_variance(sigma: Array, data_scale: float, alpha: Array | None = None) -> Array:
    """σ² + α² σ_d²: the variance per coordinate of x = α x_0 + σ z for x_0 of scale σ_d (α = 1 if None)."""
    return sigma**2 + (data_scale**2 if alpha is None else (alpha * data_scale) ** 2)


def preconditioned_score(x: Array, g: Array, sigma: Array, data_scale: float, alpha: Array | None = None) -> Array:
    """s = -x / v + α σ_d / (σ sqrt(v)) · g,  v = σ² + α² σ_d² (Karras et al. 2022, EDM).

    The score of their denoiser D(x) = c_skip x + c_out g for x = α x_0 + σ z: the score of
    N(0, v I) plus a correction of order one in g, which sees c_in x = x / sqrt(v). With
    α = 1 (None) this is the variance-exploding case x = x_0 + σ z. Shapes: x, g (*shape);
    σ, α broadcast against them.
    """
    total = total_variance(sigma, data_scale, alpha)
    scale = data_scale if alpha is None else alpha * data_scale
    return -x / total + scale / (sigma * jnp.sqrt(total)) * g


def _label_index(y, num_classes: int) -> Array:
    """The embedding row of label y: y itself for y in [0, K), row K for NULL_LABEL."""
    if _validate.is_concrete(y):
        host = np.asarray(y)
        if not np.issubdtype(host.dtype, np.integer) or np.any((host != NULL_LABEL) & ((host < 0) | (host >= num_classes))):
            raise ValueError(f"y must be an integer label in [0, {num_classes}) or NULL_LABEL = {NULL_LABEL}, got {y!r}")
    y = jnp.asarray(y, jnp.int32)
    return jnp.where(y == NULL_LABEL, num_classes, y)


class _Conditioning:
    """Shared by the conditional networks: the noise input, the class label, the preconditioning."""

    def _init_conditioning(self, noise, data_scale, marginal, num_classes):
        self.noise = _validate.choice("noise", noise, NOISE_INPUTS)
        if data_scale is not None:
            _validate.positive("data_scale", data_scale)
            data_scale = float(data_scale)
        if marginal is not None and noise != "t":
            raise ValueError(f"marginal (t -> (α_t, σ_t)) is for noise='t', got noise={noise!r}")
        if marginal is not None and not callable(marginal):
            raise TypeError(f"marginal must be a function t -> (alpha_t, sigma_t) such as sde.marginal, "
                            f"got {type(marginal).__name__}")
        if noise == "t" and data_scale is not None and marginal is None:
            raise ValueError("data_scale with noise='t' needs marginal=sde.marginal (the preconditioning uses α_t "
                             "and σ_t), got marginal=None")
        if num_classes is not None:
            num_classes = _validate.positive_int("num_classes", num_classes)
        self.data_scale, self.marginal, self.num_classes = data_scale, marginal, num_classes

    def _alpha_sigma(self, noise: Array) -> tuple[Array | None, Array | None]:
        """(α, σ) of x = α x_0 + σ z at this noise input; (None, σ) for σ; (None, None) for t without marginal."""
        if self.noise == "sigma":
            return None, noise
        if self.marginal is None:
            return None, None
        alpha, sigma = self.marginal(noise)
        return jnp.asarray(alpha, noise.dtype), jnp.asarray(sigma, noise.dtype)

    def _check_label(self, y):
        if y is not None and self.num_classes is None:
            raise TypeError(f"this network has no classes (num_classes=None), so it takes no label y, got y={y!r}")
        return NULL_LABEL if y is None else y


class NoiseConditionalScore(_Conditioning, nnx.Module):
    """s_θ(x, σ): ((d,), ()) -> (d,), one network for every noise level.

    Default: s_θ(x, σ) = g_θ(x, log σ) / σ: the 1/σ is the size of the true noised
    score (Song & Ermon 2020), so g_θ only learns a direction of order one.

    With `data_scale` = σ_d, the per-coordinate scale of (centred) data, the network
    is preconditioned as in Karras et al. (2022): it sees c_in x = x / sqrt(σ² + σ_d²),
    of order one at every level, and corrects the score of N(0, (σ² + σ_d²) I):

        s_θ(x, σ) = -x / (σ² + σ_d²) + σ_d / (σ sqrt(σ² + σ_d²)) · g_θ(c_in x, log σ / 4),

    i.e. the score of their denoiser c_skip x + c_out g_θ. Centre the data first.

    Options (the defaults above are unchanged by them):

    noise="t": s_θ(x, t) for an SDE model, t in [0, 1]; g_θ sees the Fourier features
      `fourier_features(t, n_frequencies)` instead of log σ. With `marginal` = t -> (α_t, σ_t)
      (e.g. `sde.marginal`): s_θ = g_θ / σ_t, or with `data_scale` the preconditioning
      above for x = α_t x_0 + σ_t z (`preconditioned_score`); without it s_θ = g_θ.
    num_classes=K: s_θ(x, σ, y), y in [0, K) or `NULL_LABEL` (= -1, also y=None): the
      unconditional score, for classifier-free guidance s_w = (1 + w) s(x, σ, y) - w s(x, σ, ∅).
      A learned embedding (K + 1 rows, the last the null label) of size `class_dim` is
      appended to g_θ's input.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), *, rngs: nnx.Rngs,
                 data_scale: float | None = None, noise: str = "sigma", marginal: Callable | None = None,
                 num_classes: int | None = None, n_frequencies: int = 16, class_dim: int = 16, **kw):
        self._init_conditioning(noise, data_scale, marginal, num_classes)
        noise_dim = 1 if noise == "sigma" else 2 * n_frequencies
        class_in = 0 if num_classes is None else class_dim
        self.mlp = MLP(dim + noise_dim + class_in, hidden, dim, rngs=rngs, **kw)
        self.n_frequencies = n_frequencies
        self.label_embedding = None if num_classes is None else nnx.Embed(num_classes + 1, class_dim, rngs=rngs)

    def __call__(self, x: Array, sigma: Array, y: Array | int | None = None) -> Array:
        """s_θ(x, σ) (or s_θ(x, t) with noise="t"; s_θ(x, σ, y) with classes): (..., d) -> (..., d)."""
        y = self._check_label(y)
        noise = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:-1])
        alpha, sigma = self._alpha_sigma(noise)
        if self.noise == "sigma":
            sigma = sigma[..., None]
            feature = jnp.log(sigma) if self.data_scale is None else jnp.log(sigma) / 4
        else:
            feature = fourier_features(noise, self.n_frequencies)
            alpha, sigma = (None if v is None else v[..., None] for v in (alpha, sigma))
        extra = [feature]
        if self.num_classes is not None:
            index = jnp.broadcast_to(_label_index(y, self.num_classes), x.shape[:-1])
            extra.append(self.label_embedding(index).astype(x.dtype))
        if self.data_scale is None:
            g = self.mlp(jnp.concatenate([x, *extra], axis=-1))
            return g if sigma is None else g / sigma
        total = total_variance(sigma, self.data_scale, alpha)
        g = self.mlp(jnp.concatenate([x / jnp.sqrt(total), *extra], axis=-1))
        return preconditioned_score(x, g, sigma, self.data_scale, alpha)


# --- UNet ----------------------------------------------------------------------------


def _groups(channels: int, num_groups: int) -> int:
    """The largest group count <= num_groups that divides `channels`."""
    return math.gcd(channels, num_groups)


class _ResBlock(nnx.Module):
    """h -> skip(h) + conv(σ(GN(conv(σ(GN(h))) + W e)))  with σ = SiLU and e the noise (+ class) embedding."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, num_groups: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(c_in, num_groups=_groups(c_in, num_groups), rngs=rngs)
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), padding="SAME", rngs=rngs)
        self.emb = nnx.Linear(emb_dim, c_out, rngs=rngs)
        self.norm2 = nnx.GroupNorm(c_out, num_groups=_groups(c_out, num_groups), rngs=rngs)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), padding="SAME", rngs=rngs)
        self.skip = nnx.Conv(c_in, c_out, (1, 1), rngs=rngs) if c_in != c_out else None

    def __call__(self, h: Array, emb: Array) -> Array:
        r = self.conv1(jax.nn.silu(self.norm1(h)))
        r = r + self.emb(jax.nn.silu(emb))[:, None, None, :]
        r = self.conv2(jax.nn.silu(self.norm2(r)))
        return (h if self.skip is None else self.skip(h)) + r


class UNet(_Conditioning, nnx.Module):
    """s_θ(x, σ) for images: x (h, w, c), σ () -> (h, w, c); ONE example (batch with jax.vmap).

    A DDPM-style UNet (Ho et al. 2020) g_θ: residual blocks (GroupNorm, SiLU, 3x3 convs)
    at each resolution, down-sampling by stride-2 3x3 convs with SAME padding (so odd
    sizes work: 28 -> 14 -> 7 -> 4) and up-sampling by nearest resize to the skip's exact
    size then a 3x3 conv, skips concatenated; the noise level enters every block through
    `fourier_features` of log σ / 4 (noise="sigma") or of t (noise="t"), passed through an
    MLP, plus a learned class embedding when `num_classes` is given. The score is built
    from g_θ exactly as in `NoiseConditionalScore` (same `noise`, `data_scale`, `marginal`
    and label options): s = g/σ; with `data_scale` σ_d,
    s = -x / (σ² + σ_d²) + σ_d / (σ sqrt(σ² + σ_d²)) g_θ(x / sqrt(σ² + σ_d²)) (Karras et al. 2022).

    Resolutions: len(channel_mults), with base · channel_mults[i] channels at level i.
    (1, 2) halves once (8x8 -> 4x4, 28 -> 14, 32 -> 16); (1, 2, 2) twice (28 -> 7).

    Args:
      channels: c, the image's channels.
      base: channels of the first level.
      channel_mults: the channel multiplier per resolution.
      num_res_blocks: residual blocks per resolution on the way down (one more on the way up).
      num_groups: GroupNorm groups (reduced to a divisor of each channel count).
      emb_dim: size of the noise (+ class) embedding.
      n_frequencies: Fourier frequencies of the noise input.
      noise, data_scale, marginal, num_classes: as in `NoiseConditionalScore`.
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, base: int = 16, channel_mults: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, num_groups: int = 8, emb_dim: int = 64, n_frequencies: int = 16,
                 noise: str = "sigma", data_scale: float | None = None, marginal: Callable | None = None,
                 num_classes: int | None = None):
        self._init_conditioning(noise, data_scale, marginal, num_classes)
        self.channels = _validate.positive_int("channels", channels)
        if len(channel_mults) == 0:
            raise ValueError(f"channel_mults must name at least one resolution, got {tuple(channel_mults)}")
        for name, v in (("base", base), ("num_res_blocks", num_res_blocks), ("num_groups", num_groups),
                        ("emb_dim", emb_dim), ("n_frequencies", n_frequencies),
                        *((f"channel_mults[{i}]", m) for i, m in enumerate(channel_mults))):
            _validate.positive_int(name, v)
        self.n_frequencies = n_frequencies
        self.emb_in = nnx.Linear(2 * n_frequencies, emb_dim, rngs=rngs)
        self.emb_out = nnx.Linear(emb_dim, emb_dim, rngs=rngs)
        self.label_embedding = None if num_classes is None else nnx.Embed(num_classes + 1, emb_dim, rngs=rngs)
        self.conv_in = nnx.Conv(channels, base, (3, 3), padding="SAME", rngs=rngs)

        block = lambda a, b: _ResBlock(a, b, emb_dim, num_groups, rngs=rngs)
        ch, skips, last = base, [base], len(channel_mults) - 1
        down, downsample = [], []
        for i, mult in enumerate(channel_mults):
            level = []
            for _ in range(num_res_blocks):
                level.append(block(ch, base * mult))
                ch = base * mult
                skips.append(ch)
            down.append(nnx.List(level))
            if i < last:
                downsample.append(nnx.Conv(ch, ch, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs))
                skips.append(ch)
        self.down, self.downsample = nnx.List(down), nnx.List(downsample)
        self.mid = nnx.List([block(ch, ch), block(ch, ch)])
        up, upsample = [], []
        for i, mult in reversed(list(enumerate(channel_mults))):
            level = []
            for _ in range(num_res_blocks + 1):
                level.append(block(ch + skips.pop(), base * mult))
                ch = base * mult
            up.append(nnx.List(level))
            if i > 0:
                upsample.append(nnx.Conv(ch, ch, (3, 3), padding="SAME", rngs=rngs))
        self.up, self.upsample = nnx.List(up), nnx.List(upsample)
        self.norm_out = nnx.GroupNorm(ch, num_groups=_groups(ch, num_groups), rngs=rngs)
        self.conv_out = nnx.Conv(ch, channels, (3, 3), padding="SAME", rngs=rngs)  # the last layer

    def embedding(self, noise: Array, y) -> Array:
        """e = W_2 SiLU(W_1 γ(v)) (+ E[y]), v = log σ / 4 or t: () -> (emb_dim,)."""
        v = jnp.log(noise) / 4 if self.noise == "sigma" else noise
        e = self.emb_out(jax.nn.silu(self.emb_in(fourier_features(v, self.n_frequencies))))
        if self.num_classes is not None:
            e = e + self.label_embedding(_label_index(y, self.num_classes))
        return e

    def g(self, x: Array, noise: Array, y=None) -> Array:
        """g_θ(x, noise, y): the raw network, (h, w, c) -> (h, w, c)."""
        emb = self.embedding(noise, y)[None]
        h = self.conv_in(x[None])  # a batch of one for the conv layers
        hs = [h]
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, emb)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for j, level in enumerate(self.up):
            for block in level:
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), emb)
            if j < len(self.upsample):  # up to the next skip's exact size (7 -> 14, 4 -> 7)
                _, height, width, _ = hs[-1].shape
                h = jax.image.resize(h, (1, height, width, h.shape[-1]), method="nearest")
                h = self.upsample[j](h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))[0]

    def __call__(self, x: Array, sigma: Array, y: Array | int | None = None) -> Array:
        """s_θ(x, σ) (or (x, t) with noise="t"; (x, σ, y) with classes): (h, w, c) -> (h, w, c)."""
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(f"x must be ONE image of shape (h, w, {self.channels}) (batch with jax.vmap), "
                             f"got shape {tuple(x.shape)}")
        if jnp.ndim(sigma) != 0:
            raise ValueError(f"sigma (the noise input, σ or t) must be a scalar, got shape {jnp.shape(sigma)}")
        y = self._check_label(y)
        if jnp.ndim(y) != 0:
            raise ValueError(f"y must be one label (a scalar), got shape {jnp.shape(y)}")
        noise = jnp.asarray(sigma, x.dtype)
        alpha, sigma = self._alpha_sigma(noise)
        if self.data_scale is None:
            g = self.g(x, noise, y)
            return g if sigma is None else g / sigma
        g = self.g(x / jnp.sqrt(total_variance(sigma, self.data_scale, alpha)), noise, y)
        return preconditioned_score(x, g, sigma, self.data_scale, alpha)


def pure(module: nnx.Module) -> tuple[Callable[..., Any], nnx.State]:
    """Split an NNX module into `apply(params, *args)` and its parameters.

    Only `nnx.Param` variables are trainable `params`; any other state is
    frozen into `apply` as it is now.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(params: nnx.State, *args: Any) -> Any:
        return nnx.merge(graphdef, params, rest)(*args)

    return apply, params
