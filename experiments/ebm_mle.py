"""What do short-run contrastive divergence and persistent chains leave in an EBM's energy?

Fits an MLP energy f_θ to samples of an 8-mode ring by maximum likelihood, the model
term of ∇_θ log q_θ from Langevin chains: started at the data for `--steps-langevin`
steps (CD), or kept between updates in a replay buffer with 5% restarted from noise
(PCD). In 2-D, log Z_θ is computed by quadrature on the box [-4, 4]², with a bound on
the mass outside it, so the held-out log-likelihood is reported between two close bounds
as training goes, and so is the model's mass where the data has
none: CD's chains never leave the data, so low-energy regions elsewhere are never
sampled and never corrected.

    python experiments/ebm_mle.py --method pcd --workdir runs/ebm_mle

Writes, per method, <workdir>/<method>/ with checkpoints/ and metrics.jsonl, and
results.json and figures/energy.png in <workdir>.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.integrate
from flax import nnx

import jsm
from jsm import ebm, nets, partition, plot, quadrature, runs, samplers

import common

METHODS = ("cd", "pcd")
BOX = 4.0  # the box [-4, 4]^2: chains' restarts, quadrature, figures
LO, HI = jnp.full(2, -BOX), jnp.full(2, BOX)


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/ebm_mle"
    method: str = dataclasses.field(default="both", metadata={"choices": (*METHODS, "both")})
    steps: int = 2000
    seed: int = 0
    evaluations: int = 5  # times the exact log-likelihood is computed during training
    steps_langevin: int = 20
    step_size: float = 5e-3  # Langevin's a: x' = x - a ∇f + sqrt(2a) u
    energy_penalty: float = 0.1
    prior_scale: float = 3.0  # f_θ(x) = MLP_θ(x) + |x|²/(2 s²): q_θ stays normalisable on R²
    buffer_size: int = 1024  # small enough that each chain is revisited every few updates
    learning_rate: float = 1e-3
    batch_size: int = 256
    hidden: tuple[int, ...] = (64, 64)
    n_train: int = 10_000
    n_test: int = 5_000
    grid_n: int = 128
    long_run_chains: int = 2000  # chains of the figure's long Langevin runs from noise
    checkpoint_every: int = 200
    log_every: int = 50
    progress: bool = True


def make_target():
    return common.ring(scale=0.3)


def energy_model(apply, config: Config):
    """(params, x) -> f_θ(x): the MLP plus a fixed Gaussian factor, so that ∫ exp(-f_θ) < ∞
    however the MLP extrapolates outside the data (a softplus MLP can fall linearly forever)."""
    return lambda p, x: apply(p, x) + 0.5 * jnp.dot(x, x) / config.prior_scale**2


def loss_for(method: str, apply, config: Config):
    f = energy_model(apply, config)
    energy = lambda p: (lambda x: f(p, x))
    if method == "cd":
        return lambda p, k, xs: ebm.contrastive_divergence(
            energy(p), k, xs, config.steps_langevin, config.step_size, config.energy_penalty)
    return lambda p, k, xs, buffer: ebm.persistent_cd(
        energy(p), k, xs, buffer, config.steps_langevin, config.step_size,
        energy_penalty=config.energy_penalty, lo=-BOX, hi=BOX)


def log_outside_bound(apply, params, config: Config) -> float:
    """log of an upper bound on ∫ exp(-f_θ) over R² minus the box, which the quadrature leaves out.

    Outside the box |x| > BOX. The MLP is L-Lipschitz with L = Π_i |W_i|_2 (softplus is
    1-Lipschitz), so MLP(x) >= MLP(0) - L|x| and, in polar coordinates,

        ∫_{|x| > BOX} exp(-f_θ) <= exp(-MLP(0)) 2π ∫_BOX^∞ ρ exp(Lρ - ρ²/(2 s²)) dρ,   s = prior_scale.
    """
    lipschitz = float(np.prod([np.linalg.norm(np.asarray(w), 2) for w in jax.tree.leaves(params) if w.ndim == 2]))
    log_integrand = lambda r: np.log(r) + lipschitz * r - r**2 / (2 * config.prior_scale**2)
    peak = max(log_integrand(BOX), log_integrand(max(BOX, lipschitz * config.prior_scale**2)))
    tail, _ = scipy.integrate.quad(lambda r: np.exp(log_integrand(r) - peak), BOX, np.inf)
    return float(-apply(params, jnp.zeros(2)) + np.log(2 * np.pi * tail) + peak)


def exact_scores(apply, params, target, x_test, config: Config) -> dict:
    """Held-out log-likelihood with log Z_θ by quadrature on the box, and the model's mass where the
    target has almost none.

    The quadrature integrates exp(-f_θ) over the box only, so "test_log_likelihood" is an upper
    bound; adding the bound on the mass outside (`log_outside_bound`) gives a lower bound, and the
    truth lies between the two.
    """
    energy = lambda x: energy_model(apply, config)(params, x)
    log_z = partition.log_z_grid(energy, LO, HI, config.grid_n)
    points, log_w = quadrature.grid(LO, HI, config.grid_n)
    log_q = -jax.vmap(energy)(points) - log_z
    log_p = jax.vmap(target.log_prob)(points)
    empty = log_p < jnp.max(log_p) + jnp.log(1e-3)  # p below 1/1000 of its peak
    log_likelihood = float(-jnp.mean(jax.vmap(energy)(x_test)) - log_z)
    outside = log_outside_bound(apply, params, config)
    return {
        "test_log_likelihood": log_likelihood,
        "test_log_likelihood_lower_bound": log_likelihood - float(np.logaddexp(0.0, outside - float(log_z))),
        "spurious_mass": float(jnp.sum(jnp.exp(log_w + log_q) * empty)),
    }


def train(config: Config, method: str, target=None):
    """Train one method; returns (energy_fn, history, evaluations). Resumes from <workdir>/<method>."""
    target = target or make_target()
    key = jax.random.key(config.seed)
    k_data, k_test, k_buffer, k_fit = jax.random.split(key, 4)
    apply, params = nets.pure(nets.MLPEnergy(2, config.hidden, rngs=nnx.Rngs(config.seed)))
    f = energy_model(apply, config)
    data, x_test = target.sample(k_data, config.n_train), target.sample(k_test, config.n_test)
    buffer = ebm.init_replay_buffer(k_buffer, config.buffer_size, 2, -BOX, BOX)
    loss, optimizer = loss_for(method, apply, config), optax.adam(config.learning_rate, b1=0.5)
    # Evaluated inside the run, at fixed steps: saved with the run, so a killed run reports the same numbers.
    evaluate = common.evaluations("evaluations", config.steps, config.evaluations,
                                  lambda state: exact_scores(apply, state.params, target, x_test, config))
    result = jsm.fit(
        loss, params, data, optimizer=optimizer, key=k_fit, steps=config.steps, batch_size=config.batch_size,
        workdir=f"{config.workdir}/{method}", checkpoint_every=config.checkpoint_every,
        log_every=config.log_every, progress=config.progress, has_aux=method == "cd",
        objective_state=buffer if method == "pcd" else None, callbacks=[evaluate],
    )
    return (lambda x: f(result.params, x)), result.history, result.callbacks["evaluations"]


def long_run_samples(energy, config: Config, n: int = 2000) -> jax.Array:
    """Where the model's own Langevin dynamics go from noise, run 100x longer than in training."""
    key = jax.random.fold_in(jax.random.key(config.seed), 7)
    x0 = jax.random.uniform(key, (n, 2), minval=-BOX, maxval=BOX)
    kernel = samplers.ula(jsm.score_of(energy), config.step_size)
    return samplers.run_chains(kernel, key, x0, 100 * config.steps_langevin)[0].position


def main(config: Config) -> dict:
    workdir = runs.prepare_workdir(config)
    target = make_target()
    methods = METHODS if config.method == "both" else (config.method,)
    x_test = target.sample(jax.random.split(jax.random.key(config.seed), 4)[1], config.n_test)
    out = {"target_test_log_likelihood": float(jnp.mean(jax.vmap(target.log_prob)(x_test)))}
    fig, axes = plot.figure(1 + 2 * len(methods), size=3.6)
    plot.density(axes[0], target.log_prob, LO, HI, title="data density p")
    for i, method in enumerate(methods):
        energy, history, evals = train(config, method, target)
        out[method] = {"evaluations": evals, **evals[-1], "final_energy_gap": history[-1]["energy_gap"]}
        plot.energy(axes[1 + 2 * i], energy, LO, HI, title=f"{method.upper()}: energy f_θ")
        plot.samples(axes[2 + 2 * i], long_run_samples(energy, config, config.long_run_chains), LO, HI, bins=80,
                     title=f"{method.upper()}: long Langevin runs from noise")
        print(f"{method}: held-out log-likelihood {evals[-1]['test_log_likelihood']:.3f} "
              f"(>= {evals[-1]['test_log_likelihood_lower_bound']:.3f} with the mass outside the box) "
              f"(target {out['target_test_log_likelihood']:.3f}), mass where p ~ 0: {evals[-1]['spurious_mass']:.3f}")
    plot.save(fig, workdir / "figures" / "energy.png")
    runs.save_json(workdir / "results.json", out)
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
