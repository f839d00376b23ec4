"""How much gradient noise does DSM carry at small σ, and what do antithetic noise and a control variate buy?

DSM's per-example loss 1/2 |s(x + σu) + u/σ|² contains the zero-mean cross term
u·s(x)/σ, so its parameter gradient's variance grows like 1/σ². Two unbiased fixes
(`jsm.objectives.dsm(..., variance_reduction=...)`): antithetic pairs (u, -u), and the
control variate that subtracts u·s(x)/σ at the clean x. This script measures the
variance of the parameter gradient of an MLP score against σ from 1 to 1e-3 for the
three estimators, then trains at a small σ with each and tracks the Fisher divergence
to the score of p_σ, the thing DSM learns.

    python experiments/dsm_variance.py --workdir runs/dsm_variance

Writes results.json and figures/variance.png under --workdir.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jsm
from jsm import nets, objectives, plot, runs, targets

import common

ESTIMATORS = objectives.VARIANCE_REDUCTIONS


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/dsm_variance"
    steps: int = 2000  # training steps at the small σ, for each estimator
    seed: int = 0
    sigmas: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
    n_draws: int = 200  # gradients per σ and estimator
    batch_size: int = 64
    train_sigma: float = 0.02
    evaluations: int = 5
    learning_rate: float = 1e-3
    hidden: tuple[int, ...] = (64, 64)
    n_train: int = 20_000
    n_test: int = 5_000
    checkpoint_every: int = 500
    log_every: int = 100
    progress: bool = True


def make_target() -> targets.GaussianMixture:
    return common.ring(scale=0.3)


def name(vr) -> str:
    return "plain" if vr is None else vr


def gradient_variance(config: Config, target) -> dict:
    """Total variance Σ_j Var[∂L/∂θ_j] of minibatch gradients, per estimator and σ."""
    apply, params = nets.pure(nets.MLPScore(2, config.hidden, rngs=nnx.Rngs(config.seed)))
    key = jax.random.key(config.seed)
    xs = target.sample(key, config.n_draws * config.batch_size).reshape(config.n_draws, config.batch_size, 2)
    keys = jax.random.split(jax.random.fold_in(key, 1), config.n_draws)
    out = {}
    for vr in ESTIMATORS:
        @jax.jit
        def total_variance(sigma):
            grad = lambda k, x: jax.grad(lambda p: objectives.dsm(lambda y: apply(p, y), k, x, sigma, vr))(params)
            g = jax.vmap(grad)(keys, xs)
            return sum(jnp.sum(jnp.var(leaf, axis=0)) for leaf in jax.tree.leaves(g))
        out[name(vr)] = [float(total_variance(jnp.float32(s))) for s in config.sigmas]
    return out


def train_each(config: Config, target) -> dict:
    """Fisher divergence to ∇log p_σ on held-out samples of p_σ during training, per estimator."""
    noised = target.noised(config.train_sigma)
    key = jax.random.key(config.seed)
    k_data, k_test, k_fit = jax.random.split(jax.random.fold_in(key, 2), 3)
    data, x_test = target.sample(k_data, config.n_train), noised.sample(k_test, config.n_test)
    curves = {}
    for vr in ESTIMATORS:
        apply, params = nets.pure(nets.MLPScore(2, config.hidden, rngs=nnx.Rngs(config.seed)))
        loss = lambda p, k, xs, vr=vr: objectives.dsm(lambda y: apply(p, y), k, xs, config.train_sigma, vr)
        fisher = common.evaluations(
            "fisher", config.steps, config.evaluations,
            lambda state: {"fisher_divergence_to_p_sigma": objectives.esm(lambda y: apply(state.params, y),
                                                                          noised.score, x_test)})
        result = jsm.fit(loss, params, data, optimizer=optax.adam(config.learning_rate), key=k_fit,
                         steps=config.steps, batch_size=256, workdir=f"{config.workdir}/{name(vr)}",
                         checkpoint_every=config.checkpoint_every, log_every=config.log_every, progress=config.progress,
                         callbacks=[fisher])
        curves[name(vr)] = result.callbacks["fisher"]
    return curves


def main(config: Config) -> dict:
    workdir = runs.prepare_workdir(config)
    target = make_target()
    variance = gradient_variance(config, target)
    curves = train_each(config, target)
    i_small = config.sigmas.index(min(config.sigmas, key=lambda s: abs(s - 0.01)))
    out = {
        "sigmas": list(config.sigmas),
        "gradient_variance": variance,
        f"variance_ratio_at_sigma={config.sigmas[i_small]}": {
            k: variance["plain"][i_small] / v[i_small] for k, v in variance.items() if k != "plain"},
        "training_at_sigma": config.train_sigma,
        "curves": curves,
        "final_fisher_divergence": {k: c[-1]["fisher_divergence_to_p_sigma"] for k, c in curves.items()},
    }
    fig, (a, b) = plot.figure(2, size=4.5)
    for k, v in variance.items():
        a.loglog(config.sigmas, v, "o-", label=k)
    a.set_xlabel("σ")
    a.set_ylabel("total variance of the parameter gradient")
    a.legend()
    for k, c in curves.items():
        b.semilogy([r["step"] for r in c], [r["fisher_divergence_to_p_sigma"] for r in c], "o-", label=k)
    b.set_xlabel("step")
    b.set_ylabel(f"Fisher divergence to ∇log p_σ (σ = {config.train_sigma})")
    b.legend()
    for ax in (a, b):
        ax.set_aspect("auto")
    plot.save(fig, workdir / "figures" / "variance.png")
    runs.save_json(workdir / "results.json", out)
    for k, v in out[f"variance_ratio_at_sigma={config.sigmas[i_small]}"].items():
        print(f"{k}: gradient variance {v:.0f}x lower than plain DSM at σ = {config.sigmas[i_small]}")
    for k, v in out["final_fisher_divergence"].items():
        print(f"{k}: Fisher divergence to ∇log p_σ after {config.steps} steps at σ = {config.train_sigma}: {v:.3f}")
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
