"""Can a noise-conditional score network trained on 1347 real 8x8 digits sample digits?

Trains `ncsn` (with the control-variate estimator) on scikit-learn's handwritten
digits, centred, with a preconditioned network: `--net mlp` (default) an MLP on the
64 pixels (`NoiseConditionalScore(data_scale=...)`), `--net unet` a U-Net on the digits
as (8, 8, 1) images (`UNet(channels=1, data_scale=...)`, 8x8 -> 4x4). Samples with annealed
Langevin (chains of the net's example shape) plus a final Tweedie denoising step
x + σ_L² s(x, σ_L), drawn from the moving average of the parameters (`ema_decay`), and
scores the samples honestly against two references: real held-out digits, and a
Gaussian fitted to the training digits (full covariance).
Scores: a logistic-regression classifier trained on the real training digits gives
each sample's class confidence, the class balance of the samples (entropy of the
mean prediction / log 10) and an Inception-Score analogue exp E_x KL(p(y|x) || p(y));
and the MMD² to the held-out digits (Gaussian kernel, one bandwidth for all).

    python experiments/digits.py --workdir runs/digits
    python experiments/digits.py --net unet --workdir runs/digits_unet

Writes results.json (with the training seconds), figures/samples.png and the network's
checkpoints/ and metrics.jsonl under --workdir.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jsm
from jsm import data, metrics, nets, objectives, plot, runs, samplers

import common


NETS = ("mlp", "unet")
IMAGE = (8, 8, 1)  # one digit for the U-Net: 8 x 8 pixels, one channel
EMA_DECAY = 0.99  # measured at the default 10k steps: better than 0.999 and than none (README)


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/digits"
    steps: int = 10_000
    seed: int = 0
    sigma_max: float = 5.0  # about the largest distance between two digits (4.6)
    sigma_min: float = 0.05
    n_levels: int = 10
    n_steps_each: int = 100
    step_size: float = 1e-4  # a at the last level: 0.04 σ_L²
    snr: float = 0.0  # > 0: the signal-to-noise step rule (norms averaged over the chains) instead of step_size
    learning_rate: float = 1e-3
    batch_size: int = 128
    net: str = dataclasses.field(default="mlp", metadata={
        "choices": NETS, "help": "mlp: an MLP on the 64 pixels; unet: a U-Net on (8, 8, 1) images"})
    hidden: tuple[int, ...] = (512, 512)  # the MLP's hidden layers (--net mlp)
    base: int = 16  # the U-Net's channels at 8x8 (--net unet)
    channel_mults: tuple[int, ...] = (1, 2)  # the U-Net's channels per resolution, base * mult: 8x8, 4x4
    # θ̄ <- β θ̄ + (1 - β) θ after every update; samples use θ̄. 0: no average (the last θ).
    ema_decay: float = EMA_DECAY
    checkpoint_every: int = 1000
    log_every: int = 100
    progress: bool = True


def schedule(config: Config) -> jax.Array:
    return common.geometric_sigmas(config.sigma_max, config.sigma_min, config.n_levels)


def example_shape(config: Config) -> tuple[int, ...]:
    """The shape of one digit as the network sees it: (64,) for the MLP, (8, 8, 1) for the U-Net."""
    return (64,) if config.net == "mlp" else IMAGE


def network(config: Config, data_scale: float) -> nnx.Module:
    """s_θ(x, σ) on one digit of `example_shape(config)`, preconditioned with σ_d = data_scale."""
    _validate_net(config)
    if config.net == "mlp":
        return nets.NoiseConditionalScore(64, config.hidden, rngs=nnx.Rngs(config.seed), data_scale=data_scale)
    return nets.UNet(channels=1, base=config.base, channel_mults=config.channel_mults, rngs=nnx.Rngs(config.seed),
                     data_scale=data_scale)


def _validate_net(config: Config) -> None:
    if config.net not in NETS:
        raise ValueError(f"config.net must be one of {NETS}, got {config.net!r}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be in [0, 1) (0: no moving average), got {config.ema_decay!r}")


def train(config: Config, split: data.Split):
    """NCSN on the centred digits x - μ with a preconditioned network (σ_d = their pixel std); the
    returned score is that of the digits themselves, s(x, σ) = s_θ̄(x - μ, σ) with θ̄ the moving
    average of the parameters (the last θ when config.ema_decay = 0), on one digit of shape
    `example_shape(config)`: (64,) for the MLP, (8, 8, 1) for the U-Net."""
    shape = example_shape(config)
    mean = jnp.asarray(split.x_train.mean(0))
    centred = jnp.asarray(split.x_train) - mean
    apply, params = nets.pure(network(config, float(centred.std())))
    levels = schedule(config)
    loss = lambda p, k, xs: objectives.ncsn(lambda x, s: apply(p, x, s), k, xs, levels, variance_reduction="control_variate")
    result = jsm.fit(loss, params, centred.reshape(-1, *shape), optimizer=optax.adam(config.learning_rate),
                     key=jax.random.key(config.seed), ema_decay=config.ema_decay or None, **runs.fit_options(config))
    final = result.params if result.ema_params is None else result.ema_params
    mean = mean.reshape(shape)
    return (lambda x, s: apply(final, x - mean, s)), result


def sample(config: Config, score, n: int) -> jax.Array:
    """Annealed Langevin from uniform noise, a Tweedie step at σ_L, clipped to the pixel range: (n, 64).

    The chains have the shape the score takes, `example_shape(config)`; the same uniform draws
    start them whichever the net."""
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    k_init, k_run = jax.random.split(key)
    x0 = jax.random.uniform(k_init, (n, 64)).reshape(n, *example_shape(config))
    levels = schedule(config)
    if config.snr > 0:
        kernel = samplers.annealed_langevin(score, levels, config.n_steps_each, snr=config.snr)
    else:
        kernel = samplers.annealed_langevin(score, levels, config.n_steps_each, config.step_size)
    xs = samplers.run_chains(kernel, k_run, x0, config.n_levels * config.n_steps_each)[0].position
    sigma_l = levels[-1]
    xs = xs + sigma_l**2 * jax.vmap(lambda x: score(x, sigma_l))(xs)  # E[x_clean | x_noisy] (Tweedie)
    return jnp.clip(xs.reshape(n, 64), 0.0, 1.0)


def gaussian_baseline(split: data.Split, key, n: int) -> jax.Array:
    mean = split.x_train.mean(0)
    cov = np.cov(split.x_train.T) + 1e-4 * np.eye(64)
    return jnp.clip(jsm.targets.Gaussian(jnp.asarray(mean), jnp.asarray(cov)).sample(key, n), 0.0, 1.0)


def scores(xs, classifier, real_test, bandwidth: float) -> dict:
    probs = classifier.predict_proba(np.asarray(xs, np.float64))
    marginal = probs.mean(0)
    kl = np.sum(probs * (np.log(probs + 1e-12) - np.log(marginal + 1e-12)), axis=1)
    return {
        "confidence": float(probs.max(1).mean()),
        "class_balance": float(-np.sum(marginal * np.log(marginal + 1e-12)) / np.log(10)),
        "inception_score": float(np.exp(kl.mean())),
        "mmd2_to_held_out": float(metrics.mmd(jnp.asarray(xs), jnp.asarray(real_test), bandwidth)),
    }


def tile(xs, pad: int = 1) -> np.ndarray:
    """64 digits (64, 64) as an 8 x 8 grid of 8x8 images with `pad` blank pixels between them."""
    imgs = np.pad(np.asarray(xs).reshape(8, 8, 8, 8), ((0, 0), (0, 0), (0, pad), (0, pad)))
    return imgs.transpose(0, 2, 1, 3).reshape(8 * (8 + pad), 8 * (8 + pad))


def training_seconds(workdir) -> float:
    """Σ wall_s over the rows of <workdir>/metrics.jsonl: the training time (compilation included, checkpoints not)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return float("nan")
    return float(sum(json.loads(line).get("wall_s", 0.0) for line in path.read_text().splitlines() if line.strip()))


def main(config: Config) -> dict:
    from sklearn.linear_model import LogisticRegression

    workdir = runs.prepare_workdir(config)
    split = data.digits(config.seed)
    classifier = LogisticRegression(max_iter=5000).fit(split.x_train, split.y_train)
    n = split.x_test.shape[0]
    pooled = np.concatenate([split.x_train[:n], split.x_test])
    bandwidth = float(np.median(np.linalg.norm(pooled[:, None] - pooled[None], axis=-1)))
    score, result = train(config, split)
    sets = {
        "real held-out digits": split.x_test,
        "real training digits": split.x_train[:n],
        "Gaussian baseline": gaussian_baseline(split, jax.random.fold_in(jax.random.key(config.seed), 2), n),
        "NCSN + annealed Langevin": sample(config, score, n),
    }
    out = {"classifier_test_accuracy": float(classifier.score(split.x_test, split.y_test)), "bandwidth": bandwidth,
           "net": config.net, "steps": int(result.step), "ema_decay": config.ema_decay,
           "training_seconds": training_seconds(workdir), "final_loss": result.history[-1]["loss"],
           **{name: scores(xs, classifier, split.x_test, bandwidth) for name, xs in sets.items()}}
    fig, axes = plot.figure(3, size=4)
    for ax, name in zip(axes, ("real held-out digits", "Gaussian baseline", "NCSN + annealed Langevin")):
        ax.imshow(tile(sets[name][:64]), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        label = f"{name} (U-Net)" if name.startswith("NCSN") and config.net == "unet" else name
        ax.set_title(f"{label}\nIS {out[name]['inception_score']:.2f}, MMD² {out[name]['mmd2_to_held_out']:.4f}")
    plot.save(fig, workdir / "figures" / "samples.png")
    runs.save_json(workdir / "results.json", out)
    print(f"classifier accuracy on held-out digits: {out['classifier_test_accuracy']:.3f}; "
          f"{config.net}: {out['steps']} steps in {out['training_seconds']:.0f} s")
    for name in sets:
        r = out[name]
        print(f"{name:26s} confidence {r['confidence']:.3f}  balance {r['class_balance']:.3f}  "
              f"IS {r['inception_score']:.2f}  MMD² {r['mmd2_to_held_out']:.4f}")
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
