"""Does annealing fix the mixture weights that plain Langevin gets wrong?

A 2-D mixture of two well-separated Gaussians with weights 0.8 / 0.2. Chains started
uniformly over the box sit in the basin where they start: the score inside each
basin ignores the other mode's mass, so plain Langevin returns the weights of the
initialisation (about 1/2), not 0.8. Annealed Langevin (Song & Ermon 2019) walks
down a schedule of noise scales σ_1 > ... > σ_L: at large σ the noised density
p_σ has one connected bump and the chains spread in the right proportions.

Three samplers, one answer each (the fraction of chains in the heavy mode):
plain ULA with the exact score; annealed Langevin with the exact noised score
∇log p_σ; and annealed Langevin with a noise-conditional network trained by `ncsn`
(sampled at the moving average of its parameters, `ema_decay`).

    python experiments/annealed_langevin.py --workdir runs/annealed_langevin

Writes results.json, figures/samples.png, and the network's checkpoints/ and metrics.jsonl.
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
from jsm import nets, objectives, plot, runs, samplers, targets

import common

BOX = ((-8.0, -8.0), (8.0, 8.0))


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/annealed_langevin"
    seed: int = 0
    steps: int = 3000  # training steps of the noise-conditional network
    n_chains: int = 4000
    sigma_max: float = 10.0
    sigma_min: float = 0.1
    n_levels: int = 10
    n_steps_each: int = 100
    step_size: float = 2e-3  # a at the last level; level i uses a σ_i² / σ_L²
    plain_step_size: float = 0.05
    learning_rate: float = 2e-3
    variance_reduction: str = dataclasses.field(
        default="control_variate", metadata={"choices": ("none", "antithetic", "control_variate"),
                                             "help": "NCSN's estimator; see experiments/dsm_variance.py"})
    batch_size: int = 256
    hidden: tuple[int, ...] = (128, 128)
    # θ̄ <- β θ̄ + (1 - β) θ after every update; the learned score is sampled at θ̄. 0: the last θ.
    ema_decay: float = 0.99  # over 3000 steps 0.99 beat 0.999 and no average (README)
    n_train: int = 20_000
    checkpoint_every: int = 1000
    log_every: int = 100
    progress: bool = True


def make_target() -> targets.GaussianMixture:
    means = jnp.array([[-4.0, 0.0], [4.0, 0.0]])
    return targets.GaussianMixture(means, jnp.array([0.5, 0.5]), jnp.array([0.8, 0.2]))


def heavy_fraction(xs: jax.Array) -> float:
    """Fraction of samples on the heavy (left) mode's side."""
    return float(jnp.mean(xs[:, 0] < 0))


def sigmas(config: Config) -> jax.Array:
    return common.geometric_sigmas(config.sigma_max, config.sigma_min, config.n_levels)


def train_ncsn(config: Config, target):
    """s_θ̄(x, σ) by noise-conditional DSM on samples of the target, θ̄ the moving average of the
    parameters (the last θ when config.ema_decay = 0); resumes from the workdir."""
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be in [0, 1) (0: no moving average), got {config.ema_decay!r}")
    key = jax.random.key(config.seed)
    k_data, k_fit = jax.random.split(key)
    apply, params = nets.pure(nets.NoiseConditionalScore(2, config.hidden, rngs=nnx.Rngs(config.seed)))
    levels = sigmas(config)
    vr = None if config.variance_reduction == "none" else config.variance_reduction
    result = jsm.fit(
        lambda p, k, xs: objectives.ncsn(lambda x, s: apply(p, x, s), k, xs, levels, variance_reduction=vr),
        params,
        target.sample(k_data, config.n_train),
        optimizer=optax.adam(config.learning_rate),
        key=k_fit,
        ema_decay=config.ema_decay or None,
        **runs.fit_options(config),
    )
    final = result.params if result.ema_params is None else result.ema_params
    return (lambda x, s: apply(final, x, s)), result


def initial_positions(config: Config) -> tuple[jax.Array, jax.Array]:
    """(key for the chains, x0 uniform over the box)."""
    k_init, k_run = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
    return k_run, jax.random.uniform(k_init, (config.n_chains, 2), minval=BOX[0][0], maxval=BOX[1][0])


def annealed_samples(config: Config, noise_score, key: jax.Array, x0: jax.Array) -> jax.Array:
    """Final positions of annealed Langevin on s(x, σ) over the config's schedule."""
    kernel = samplers.annealed_langevin(noise_score, sigmas(config), config.n_steps_each, config.step_size)
    return samplers.run_chains(kernel, key, x0, config.n_levels * config.n_steps_each)[0].position


def sample_all(config: Config, target, learned_score) -> dict[str, jax.Array]:
    key, x0 = initial_positions(config)
    n_steps = config.n_levels * config.n_steps_each
    plain = samplers.run_chains(samplers.ula(target.score, config.plain_step_size), key, x0, n_steps)[0].position
    return {
        "plain Langevin, exact score": plain,
        "annealed, exact noised score": annealed_samples(config, lambda x, s: target.noised(s).score(x), key, x0),
        "annealed, learned score (ncsn)": annealed_samples(config, learned_score, key, x0),
    }


def main(config: Config) -> dict:
    workdir = runs.prepare_workdir(config)
    target = make_target()
    learned, result = train_ncsn(config, target)
    finals = sample_all(config, target, learned)
    exact = target.sample(jax.random.fold_in(jax.random.key(config.seed), 2), config.n_chains)
    se = float(np.sqrt(0.8 * 0.2 / config.n_chains))
    out = {"true_weight": 0.8, "standard_error": se, "exact_samples": heavy_fraction(exact),
           **{name: heavy_fraction(xs) for name, xs in finals.items()},
           "ncsn_final_loss": result.history[-1]["loss"]}
    fig, axes = plot.figure(4)
    plot.density(axes[0], target.log_prob, *BOX, title="target (weights 0.8 / 0.2)")
    for ax, (name, xs) in zip(axes[1:], finals.items()):
        plot.samples(ax, xs, *BOX, bins=80, title=f"{name}\nheavy mode: {heavy_fraction(xs):.2f}")
    plot.save(fig, workdir / "figures" / "samples.png")
    runs.save_json(workdir / "results.json", out)
    for name in finals:
        print(f"{name:32s} weight of the heavy mode = {out[name]:.3f}  (true 0.8 ± {se:.3f})")
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
