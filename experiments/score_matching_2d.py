"""How well do ESM, ISM (exact trace), DSM and sliced SM learn the score of a 2-D mixture?

Trains an MLP score network s_θ on samples of an 8-mode ring with one objective,
then measures the Fisher divergence 1/2 E_p |s_θ - ∇log p|² on held-out samples
(and, for DSM, to the noised target p_σ it actually learns), and samples the
learned score with Langevin dynamics. Both use the moving average θ̄ of the
parameters (`ema_decay`; 0: the last θ).

    python experiments/score_matching_2d.py --objective ism --steps 3000 --workdir runs/sm2d_ism

Writes to --workdir: config.json, metrics.jsonl, checkpoints/, results.json, and
figures/score_field.png (target, learned
field, Langevin samples) and figures/loss.png. Re-running with the same workdir resumes.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jsm
from jsm import nets, objectives, plot, runs, samplers, targets

import common

OBJECTIVES = ("esm", "ism", "dsm", "ssm")
BOX = ((-3.5, -3.5), (3.5, 3.5))


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/score_matching_2d"
    steps: int = 3000
    seed: int = 0
    objective: str = dataclasses.field(default="dsm", metadata={"choices": OBJECTIVES})
    sigma: float = dataclasses.field(default=0.15, metadata={"help": "DSM noise scale"})
    variance_reduction: str = dataclasses.field(
        default="none", metadata={"choices": ("none", "antithetic", "control_variate"), "help": "DSM's estimator"})
    learning_rate: float = 3e-3
    batch_size: int = 256
    hidden: tuple[int, ...] = (128, 128)
    # θ̄ <- β θ̄ + (1 - β) θ after every update; evaluation and Langevin use θ̄. 0: the last θ.
    ema_decay: float = 0.99  # over 3000 steps 0.99 beat 0.999 and no average (DSM, ISM, ESM)
    n_train: int = 20_000
    n_test: int = 5_000
    checkpoint_every: int = 500
    log_every: int = 100
    n_chains: int = 4_000
    langevin_steps: int = 500
    step_size: float = 1e-2
    progress: bool = True


def make_target() -> targets.GaussianMixture:
    return common.ring(scale=0.3)


def make_loss(objective: str, apply, target, sigma: float, variance_reduction: str = "none"):
    """loss(params, key, batch) for `jsm.fit`, for one of OBJECTIVES."""
    score = lambda params: (lambda x: apply(params, x))
    vr = None if variance_reduction == "none" else variance_reduction
    return {
        "esm": lambda p, k, xs: objectives.esm(score(p), target.score, xs),
        "ism": lambda p, k, xs: objectives.ism(score(p), xs),
        "dsm": lambda p, k, xs: objectives.dsm(score(p), k, xs, sigma, variance_reduction=vr),
        "ssm": lambda p, k, xs: objectives.ssm(score(p), k, xs, n_projections=1),
    }[objective]


def train(config: Config, target=None):
    """Fit s_θ with `config.objective`; returns (s_θ̄, fit result), θ̄ the moving average of the
    parameters (the last θ when config.ema_decay = 0). Resumes from the workdir."""
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be in [0, 1) (0: no moving average), got {config.ema_decay!r}")
    target = target or make_target()
    key = jax.random.key(config.seed)
    k_data, k_fit = jax.random.split(key)
    model = nets.MLPScore(target.dim, config.hidden, rngs=nnx.Rngs(config.seed))
    apply, params = nets.pure(model)
    data = target.sample(k_data, config.n_train)
    result = jsm.fit(
        make_loss(config.objective, apply, target, config.sigma, config.variance_reduction),
        params,
        data,
        optimizer=optax.adam(config.learning_rate),
        key=k_fit,
        ema_decay=config.ema_decay or None,
        **runs.fit_options(config),
    )
    final = result.params if result.ema_params is None else result.ema_params
    return (lambda x: apply(final, x)), result


def evaluate(config: Config, score_fn, target=None) -> tuple[dict, jax.Array]:
    """Fisher divergences on held-out samples, and Langevin samples from the learned score."""
    target = target or make_target()
    noised = target.noised(config.sigma)
    k_test, k_noisy, k_init, k_chain = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1), 4)

    @jax.jit
    def divergences(x_test, x_noisy):
        return {
            "fisher_divergence": objectives.esm(score_fn, target.score, x_test),
            # What a perfect DSM model (the score of p_σ) would score: DSM's bias at this σ.
            "fisher_divergence_of_noised_truth": objectives.esm(noised.score, target.score, x_test),
            "fisher_divergence_to_p_sigma": objectives.esm(score_fn, noised.score, x_noisy),
            "exact_mean_log_p": jnp.mean(jax.vmap(target.log_prob)(x_test)),
        }

    x_test = target.sample(k_test, config.n_test)
    out = {k: float(v) for k, v in divergences(x_test, noised.sample(k_noisy, config.n_test)).items()}
    x0 = 3.0 * jax.random.normal(k_init, (config.n_chains, target.dim))
    final, _, info = samplers.run_chains(samplers.ula(score_fn, config.step_size), k_chain, x0, config.langevin_steps)
    xs = final.position
    out["langevin_mean_log_p"] = float(jax.jit(lambda xs: jnp.mean(jax.vmap(target.log_prob)(xs)))(xs))
    out["langevin_nonfinite_chains"] = int(jnp.sum(info.n_nonfinite > 0))
    return out, xs


def figures(config: Config, score_fn, history, xs, target=None) -> None:
    target = target or make_target()
    fig, (a, b, c) = plot.figure(3)
    plot.density(a, target.log_prob, *BOX, title="target p")
    plot.score_field(a, target.score, *BOX, color="white", title="p and its score")
    error = lambda x: jnp.log10(jnp.linalg.norm(score_fn(x) - target.score(x)) + 1e-3)
    plot.scalar_field(b, error, *BOX, cmap="Greys", colorbar=True)
    plot.score_field(b, score_fn, *BOX, color="tab:red", title=f"learned s ({config.objective}), log10|s - ∇log p|")
    plot.samples(c, xs, *BOX, title="Langevin on the learned score")
    plot.save(fig, f"{config.workdir}/figures/score_field.png")
    fig, (ax,) = plot.figure(1)
    plot.loss_curve(ax, history, title=f"{config.objective} loss")
    plot.save(fig, f"{config.workdir}/figures/loss.png")


def run(config: Config) -> tuple[dict, object]:
    """Train (or resume), evaluate, draw and save; returns (metrics, the learned score function)."""
    workdir = runs.prepare_workdir(config)
    target = make_target()
    score_fn, result = train(config, target)
    metrics, xs = evaluate(config, score_fn, target)
    metrics.update(objective=config.objective, steps=result.step, final_loss=result.history[-1]["loss"])
    figures(config, score_fn, result.history, xs, target)
    runs.save_json(workdir / "results.json", metrics)
    print(f"{config.objective}: Fisher divergence to p on held-out samples = {metrics['fisher_divergence']:.4f}")
    return metrics, score_fn


def main(config: Config) -> dict:
    return run(config)[0]


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
