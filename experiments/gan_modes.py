"""Which models cover all 8 modes of a ring: a GAN, an EBM, or a score model with annealed Langevin?

The same 8-Gaussian ring trains three models of the same size: a GAN (implicit
generator, non-saturating JS-type objective), an EBM by maximum likelihood with
persistent Langevin chains (forward KL), and a noise-conditional score network by
denoising score matching, sampled with annealed Langevin. Each is scored the same
way on 2000 samples: modes covered (a mode counts when it holds at least a quarter
of its fair share 1/8 within 3 std of its centre), the fraction of high-quality
samples (within 3 std of some mode), and the sliced Wasserstein-1 distance to exact
samples. The GAN is also scored as it trains, where mode collapse shows.

    python experiments/gan_modes.py --workdir runs/gan_modes

Writes results.json and figures/samples.png under --workdir, and each model's run in a subfolder.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jsm
from jsm import implicit, metrics, nets, plot, runs, targets

import annealed_langevin
import common
import ebm_mle

BOX = ((-3.0, -3.0), (3.0, 3.0))


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/gan_modes"
    steps: int = 3000  # for the EBM and the score model
    gan_steps: int = 10_000  # a GAN step is ~10x cheaper than an EBM step (no Langevin chains)
    seed: int = 0
    scale: float = 0.1  # std of each ring mode
    n_samples: int = 2000
    evaluations: int = 6  # times the GAN is scored during training
    latent_dim: int = 8
    hidden: tuple[int, ...] = (128, 128)
    learning_rate: float = 2e-4
    batch_size: int = 256
    n_train: int = 20_000
    progress: bool = True


def make_target(config: Config) -> targets.GaussianMixture:
    return common.ring(scale=config.scale)


def mode_scores(xs: jax.Array, target: targets.GaussianMixture, key: jax.Array) -> dict:
    """Modes covered, fraction of high-quality samples and sliced W1 to exact samples."""
    xs = jnp.where(jnp.isfinite(xs), xs, 1e6)
    dist = jnp.linalg.norm(xs[:, None, :] - target.means[None], axis=-1)  # (n, 8)
    near = dist < 3 * target.scales[None]
    share = jnp.mean(near, axis=0)  # fraction of samples at each mode
    k_exact, k_proj = jax.random.split(key)
    exact = target.sample(k_exact, xs.shape[0])
    return {
        "modes_covered": int(jnp.sum(share >= 0.25 / target.means.shape[0])),
        "high_quality": float(jnp.mean(jnp.any(near, axis=1))),
        "sliced_w1": float(metrics.sliced_wasserstein(jnp.clip(xs, -1e3, 1e3), exact, k_proj)),
    }


def train_gan(config: Config, target, data) -> tuple[jax.Array, list[dict]]:
    """Train the GAN, scored `evaluations` times during training; returns its final samples and the scores."""
    rngs = nnx.Rngs(config.seed)
    leaky = lambda x: jax.nn.leaky_relu(x, 0.2)  # GANs need no second derivatives; leaky ReLU trains them best
    g_apply, g_params = nets.pure(implicit.Generator(config.latent_dim, 2, config.hidden, rngs=rngs, activation=leaky))
    d_apply, d_params = nets.pure(implicit.Discriminator(2, config.hidden, rngs=rngs, activation=leaky))
    loss = lambda p, k, xs: implicit.gan_loss(g_apply, d_apply, p, k, xs, config.latent_dim)
    key = jax.random.fold_in(jax.random.key(config.seed), 3)
    params = {"generator": g_params, "discriminator": d_params}
    samples = lambda p: implicit.push_forward(lambda z: g_apply(p["generator"], z), jax.random.fold_in(key, 1),
                                              config.n_samples, config.latent_dim)
    score = common.evaluations("mode_scores", config.gan_steps, config.evaluations,
                               lambda state: mode_scores(samples(state.params), target, jax.random.fold_in(key, 2)))
    result = jsm.fit(loss, params, data, optimizer=optax.adam(config.learning_rate, b1=0.5), key=key,
                     steps=config.gan_steps, batch_size=config.batch_size, has_aux=True, callbacks=[score],
                     workdir=f"{config.workdir}/gan", checkpoint_every=1000, log_every=100, progress=config.progress)
    return samples(result.params), result.callbacks["mode_scores"]


def train_ebm(config: Config, target) -> jax.Array:
    ebm_config = ebm_mle.Config(workdir=f"{config.workdir}/ebm", steps=config.steps, seed=config.seed, evaluations=1,
                                hidden=config.hidden, n_train=config.n_train, progress=config.progress)
    energy, _, _ = ebm_mle.train(ebm_config, "pcd", target)
    return ebm_mle.long_run_samples(energy, ebm_config, config.n_samples)


def train_score_model(config: Config, target) -> jax.Array:
    al_config = annealed_langevin.Config(workdir=f"{config.workdir}/ncsn", steps=config.steps, seed=config.seed,
                                         sigma_max=3.0, sigma_min=0.05, step_size=5e-4, hidden=config.hidden,
                                         n_train=config.n_train, n_chains=config.n_samples, progress=config.progress)
    score, _ = annealed_langevin.train_ncsn(al_config, target)
    key, x0 = annealed_langevin.initial_positions(al_config)
    return annealed_langevin.annealed_samples(al_config, score, key, jnp.clip(x0, -3.0, 3.0))


def main(config: Config) -> dict:
    workdir = runs.prepare_workdir(config)
    target = make_target(config)
    data = target.sample(jax.random.key(config.seed), config.n_train)
    key = jax.random.fold_in(jax.random.key(config.seed), 9)
    gan_xs, gan_history = train_gan(config, target, data)
    samples = {"GAN": gan_xs, "EBM (PCD)": train_ebm(config, target), "score model (NCSN)": train_score_model(config, target)}
    out = {name: mode_scores(xs, target, key) for name, xs in samples.items()}
    out["exact samples"] = mode_scores(target.sample(jax.random.fold_in(key, 1), config.n_samples), target, key)
    out["gan_over_training"] = gan_history
    fig, axes = plot.figure(4, size=3.6)
    plot.density(axes[0], target.log_prob, *BOX, title="data: 8 modes")
    for ax, (name, xs) in zip(axes[1:], samples.items()):
        plot.samples(ax, xs, *BOX, bins=90, title=f"{name}: {out[name]['modes_covered']}/8 modes, "
                     f"{100 * out[name]['high_quality']:.0f}% good")
    plot.save(fig, workdir / "figures" / "samples.png")
    runs.save_json(workdir / "results.json", out)
    for name in (*samples, "exact samples"):
        r = out[name]
        print(f"{name:20s} modes {r['modes_covered']}/8  high-quality {r['high_quality']:.2f}  sliced W1 {r['sliced_w1']:.3f}")
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
