"""Can a noise-conditional score network trained on 1347 real 8x8 digits sample digits?

Trains `ncsn` (with the control-variate estimator) on scikit-learn's handwritten
digits, centred, with a preconditioned network (`NoiseConditionalScore(data_scale=...)`), samples with annealed Langevin plus a final Tweedie denoising step
x + σ_L² s(x, σ_L), and scores the samples honestly against two references: real
held-out digits, and a Gaussian fitted to the training digits (full covariance).
Scores: a logistic-regression classifier trained on the real training digits gives
each sample's class confidence, the class balance of the samples (entropy of the
mean prediction / log 10) and an Inception-Score analogue exp E_x KL(p(y|x) || p(y));
and the MMD² to the held-out digits (Gaussian kernel, one bandwidth for all).

    python experiments/digits.py --workdir runs/digits

Writes results.json, figures/samples.png and the network's checkpoints/ under --workdir.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jsm
from jsm import data, metrics, nets, objectives, plot, runs, samplers

import common


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
    snr: float = 0.0  # > 0: the signal-to-noise step rule (a per chain and step) instead of step_size
    learning_rate: float = 1e-3
    batch_size: int = 128
    hidden: tuple[int, ...] = (512, 512)
    checkpoint_every: int = 1000
    log_every: int = 100
    progress: bool = True


def schedule(config: Config) -> jax.Array:
    return common.geometric_sigmas(config.sigma_max, config.sigma_min, config.n_levels)


def train(config: Config, split: data.Split):
    """NCSN on the centred digits x - μ with a preconditioned network (σ_d = their pixel std); the
    returned score is that of the digits themselves: s(x, σ) = s_θ(x - μ, σ)."""
    mean = jnp.asarray(split.x_train.mean(0))
    centred = jnp.asarray(split.x_train) - mean
    net = nets.NoiseConditionalScore(64, config.hidden, rngs=nnx.Rngs(config.seed), data_scale=float(centred.std()))
    apply, params = nets.pure(net)
    levels = schedule(config)
    loss = lambda p, k, xs: objectives.ncsn(lambda x, s: apply(p, x, s), k, xs, levels, variance_reduction="control_variate")
    result = jsm.fit(loss, params, centred, optimizer=optax.adam(config.learning_rate),
                     key=jax.random.key(config.seed), **runs.fit_options(config))
    return (lambda x, s: apply(result.params, x - mean, s)), result


def sample(config: Config, score, n: int) -> jax.Array:
    """Annealed Langevin from uniform noise, a Tweedie step at σ_L, clipped to the pixel range."""
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    k_init, k_run = jax.random.split(key)
    x0 = jax.random.uniform(k_init, (n, 64))
    levels = schedule(config)
    if config.snr > 0:
        kernel = samplers.annealed_langevin(score, levels, config.n_steps_each, snr=config.snr)
    else:
        kernel = samplers.annealed_langevin(score, levels, config.n_steps_each, config.step_size)
    xs = samplers.run_chains(kernel, k_run, x0, config.n_levels * config.n_steps_each)[0].position
    sigma_l = levels[-1]
    xs = xs + sigma_l**2 * jax.vmap(lambda x: score(x, sigma_l))(xs)  # E[x_clean | x_noisy] (Tweedie)
    return jnp.clip(xs, 0.0, 1.0)


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
           "final_loss": result.history[-1]["loss"],
           **{name: scores(xs, classifier, split.x_test, bandwidth) for name, xs in sets.items()}}
    fig, axes = plot.figure(3, size=4)
    for ax, name in zip(axes, ("real held-out digits", "Gaussian baseline", "NCSN + annealed Langevin")):
        ax.imshow(tile(sets[name][:64]), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}\nIS {out[name]['inception_score']:.2f}, MMD² {out[name]['mmd2_to_held_out']:.4f}")
    plot.save(fig, workdir / "figures" / "samples.png")
    runs.save_json(workdir / "results.json", out)
    print(f"classifier accuracy on held-out digits: {out['classifier_test_accuracy']:.3f}")
    for name in sets:
        r = out[name]
        print(f"{name:26s} confidence {r['confidence']:.3f}  balance {r['class_balance']:.3f}  "
              f"IS {r['inception_score']:.2f}  MMD² {r['mmd2_to_held_out']:.4f}")
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
