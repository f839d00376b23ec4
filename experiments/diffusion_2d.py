"""What is a diffusion model's held-out log-likelihood on the 8-mode ring, exactly, and how do its samples compare?

A VP-SDE score model s_θ(x, t) is trained by `dsm_sde` on the ring of `ebm_mle.py` (std 0.3 per
mode) and its density is read off the probability-flow ODE with the EXACT divergence
(`jsm.likelihood.log_prob(trace="exact")`): a deterministic number per test point, no Hutchinson
probe. It is compared on the very test points of `ebm_mle.py` (drawn from
`jax.random.split(jax.random.key(seed), 4)[1]`) with the true log p and with the EBMs of
`ebm_mle.py` (CD and PCD, log Z by quadrature, so their numbers are exact too: the quadrature on
the box gives an upper bound, the bound on the mass outside it a lower one).

Samples: the score model by predictor-corrector (reverse SDE + one Langevin corrector per step)
and by the ODE, against the noise-conditional network with annealed Langevin and the GAN of
`gan_modes.py`, and the PCD EBM's long Langevin runs, all trained on the same ring and scored
with `gan_modes.mode_scores` (modes covered, high-quality fraction, sliced W1 to exact samples).

    python experiments/diffusion_2d.py --workdir runs/diffusion_2d

Writes results.json and figures/diffusion_2d.png under --workdir; the score model's run (checkpoints,
metrics.jsonl, the held-out log-likelihood evaluated during training) in score_model/, and the
baselines' runs in ebm/{cd,pcd}/, gan/ and ncsn/.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jsm
from jsm import diffusion, likelihood, nets, objectives, partition, plot, quadrature, runs, sde as sde_lib

import common
import ebm_mle
import gan_modes

LO, HI = ebm_mle.LO, ebm_mle.HI  # the EBM's box [-4, 4]²: its quadrature, and the figure's density grid
SAMPLE_BOX = gan_modes.BOX
# SiLU: at (256, 256) it halved softplus's gap to the true held-out log-likelihood (0.27 against 0.54 nats)
ACTIVATIONS = {"silu": jax.nn.silu, "softplus": jax.nn.softplus}


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/diffusion_2d"
    steps: int = 5000  # training steps of the score model
    seed: int = 0
    beta_min: float = 0.1
    beta_max: float = 20.0
    hidden: tuple[int, ...] = (256, 256)
    activation: str = dataclasses.field(default="silu", metadata={"choices": ("silu", "softplus")})
    learning_rate: float = 2e-3  # cosine-decayed to 5% over the run
    batch_size: int = 256
    ema_decay: float = 0.999  # every evaluation and every sample uses the moving average
    n_train: int = 10_000  # = ebm_mle's: the same training points
    n_test: int = 5_000  # = ebm_mle's: the same held-out points
    evaluations: int = 3  # times the exact held-out log-likelihood is computed during training
    n_samples: int = 2000
    pc_steps: int = 500  # predictor steps of the reverse SDE
    corrector_steps: int = 1
    snr: float = 0.16
    grid_n: int = 64  # the ODE's log-density on grid_n² points of the box, for the figure and its mass
    ebm_steps: int = 2000  # ebm_mle's default
    ncsn_steps: int = 3000  # gan_modes' score model (NCSN + annealed Langevin)
    gan_steps: int = 10_000  # gan_modes' default
    baselines: bool = True  # train the NCSN and the GAN for the sample comparison (the EBMs always)
    checkpoint_every: int = 1000
    log_every: int = 100
    progress: bool = True


def make_target():
    return ebm_mle.make_target()


def make_sde(config: Config) -> sde_lib.VPSDE:
    return sde_lib.VPSDE(beta_min=config.beta_min, beta_max=config.beta_max)


def shared_data(config: Config, target) -> tuple[jax.Array, jax.Array]:
    """(training data, held-out points), drawn exactly as `ebm_mle.train` draws them."""
    k_data, k_test, _, _ = jax.random.split(jax.random.key(config.seed), 4)
    return target.sample(k_data, config.n_train), target.sample(k_test, config.n_test)


def exact_log_likelihood(apply, sde):
    """(params, xs) -> log p_θ(x) (n,) by the probability-flow ODE with the exact divergence
    (deterministic). The parameters travel as `args`: every evaluation of a run shares one compilation."""
    score_fn = lambda x, t, params: apply(params, x, t)  # one function object: one compilation
    return lambda params, xs: likelihood.log_prob(score_fn, sde, xs, trace="exact", args=(params,))


def train(config: Config, data, x_test, sde):
    """s_θ(x, t) by `dsm_sde` (λ = σ_t²) with a preconditioned network (σ_d = the data's std);
    the exact held-out log-likelihood is evaluated `evaluations` times inside the run (on the EMA)."""
    net = nets.NoiseConditionalScore(2, config.hidden, rngs=nnx.Rngs(config.seed), noise="t",
                                     marginal=sde.marginal, data_scale=float(jnp.std(data)),
                                     activation=ACTIVATIONS[config.activation])
    apply, params = nets.pure(net)
    log_likelihood = exact_log_likelihood(apply, sde)
    loss = lambda p, k, xs: objectives.dsm_sde(lambda x, t: apply(p, x, t), sde, k, xs)
    optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps, 0.05))
    evaluate = common.evaluations(
        "log_likelihood", config.steps, config.evaluations,
        lambda state: {"test_log_likelihood": float(jnp.mean(log_likelihood(state.ema_params, x_test)))})
    result = jsm.fit(loss, params, data, optimizer=optimizer, key=jax.random.fold_in(jax.random.key(config.seed), 11),
                     ema_decay=config.ema_decay, callbacks=[evaluate],
                     **runs.fit_options(config, workdir=f"{config.workdir}/score_model"))
    return apply, log_likelihood, result


def train_ebms(config: Config, target) -> tuple[dict, ebm_mle.Config]:
    """ebm_mle's CD and PCD EBMs at its defaults (steps = ebm_steps), on the same data and test points:
    ({method: (energy f_θ, its last evaluation)}, the EBMs' config)."""
    ebm_config = ebm_mle.Config(workdir=f"{config.workdir}/ebm", steps=config.ebm_steps, seed=config.seed,
                                evaluations=1, n_train=config.n_train, n_test=config.n_test, progress=config.progress)
    out = {}
    for method in ebm_mle.METHODS:
        energy, _, evals = ebm_mle.train(ebm_config, method, target)
        out[method] = (energy, evals[-1])
    return out, ebm_config


def sample_baselines(config: Config, target, data) -> dict[str, jax.Array]:
    """gan_modes' GAN and NCSN + annealed Langevin, trained on this ring (std 0.3)."""
    gan_config = gan_modes.Config(workdir=config.workdir, steps=config.ncsn_steps, gan_steps=config.gan_steps,
                                  seed=config.seed, scale=float(target.scales[0]), n_samples=config.n_samples,
                                  evaluations=1, n_train=config.n_train, progress=config.progress)
    gan_xs, _ = gan_modes.train_gan(gan_config, target, data)
    return {"NCSN, annealed Langevin": gan_modes.train_score_model(gan_config, target), "GAN": gan_xs}


def density_panel(ax, values: np.ndarray, n: int, title: str, cmap="viridis", vmin=None, vmax=None):
    """A heat map of values (n²,) given on `quadrature.grid(LO, HI, n)`'s points ("ij" order)."""
    xx, yy, _ = plot.grid(LO, HI, n)  # "xy" order: the transpose
    mesh = ax.pcolormesh(xx, yy, values.reshape(n, n).T, cmap=cmap, shading="auto", vmin=vmin, vmax=vmax)
    plot._finish(ax, title)
    return mesh


def main(config: Config) -> dict:
    workdir = runs.prepare_workdir(config)
    target, sde = make_target(), make_sde(config)
    data, x_test = shared_data(config, target)
    true_ll = float(jnp.mean(jax.vmap(target.log_prob)(x_test)))

    apply, log_likelihood, result = train(config, data, x_test, sde)
    params = result.ema_params
    score = lambda x, t: apply(params, x, t)
    evals = result.callbacks["log_likelihood"]
    ebms, ebm_config = train_ebms(config, target)

    out = {
        "test_log_likelihood": {
            "true": true_ll,
            "score_model_exact_ode": evals[-1]["test_log_likelihood"],
            **{f"ebm_{m}": ebms[m][1]["test_log_likelihood"] for m in ebm_mle.METHODS},
            **{f"ebm_{m}_lower_bound": ebms[m][1]["test_log_likelihood_lower_bound"] for m in ebm_mle.METHODS},
        },
        "n_test": config.n_test,
        "score_model_over_training": evals,
        "score_model_final_loss": result.history[-1]["loss"],
    }

    # the ODE's density on a grid: the figure, and its mass on the box (1 minus what lies outside)
    grid_pts, log_w = quadrature.grid(LO, HI, config.grid_n)  # "ij" order: (x, y) of point i*n + j
    log_q_grid = log_likelihood(params, grid_pts)
    out["score_model_mass_on_box"] = float(jnp.sum(jnp.exp(log_w + log_q_grid)))
    log_q_fig = np.asarray(log_q_grid)
    log_p_fig = np.asarray(jax.vmap(target.log_prob)(grid_pts))

    key = jax.random.fold_in(jax.random.key(config.seed), 21)
    k_prior, k_pc, k_score = jax.random.split(key, 3)
    x_T = sde.prior_sample(k_prior, (config.n_samples, 2))
    samples = {
        "score model, PC": diffusion.reverse_sde(score, sde, k_pc, x_T, config.pc_steps,
                                                 corrector_steps=config.corrector_steps, snr=config.snr),
        "score model, ODE": diffusion.probability_flow(score, sde, x_T, denoise=True),
    }
    if config.baselines:
        samples.update(sample_baselines(config, target, data))
    samples["EBM (PCD), long Langevin"] = ebm_mle.long_run_samples(ebms["pcd"][0], ebm_config, config.n_samples)
    samples["exact samples"] = target.sample(jax.random.fold_in(key, 1), config.n_samples)
    out["samples"] = {name: gan_modes.mode_scores(xs, target, k_score) for name, xs in samples.items()}

    fig, axes = plt.subplots(2, 5, figsize=(18, 7.6))
    top, bottom = axes
    n = config.grid_n
    vmax = float(np.max(np.exp(log_p_fig)))
    density_panel(top[0], np.exp(log_p_fig), n, f"true p; held-out log p = {true_ll:.3f}", vmin=0, vmax=vmax)
    density_panel(top[1], np.exp(log_q_fig), n, f"score model, exact ODE: {out['test_log_likelihood']['score_model_exact_ode']:.3f}",
                  vmin=0, vmax=vmax)
    for ax, m in zip(top[2:4], ebm_mle.METHODS):
        plot.density(ax, lambda x, e=ebms[m][0]: -e(x), LO, HI, n=n,
                     title=f"EBM ({m.upper()}): {out['test_log_likelihood'][f'ebm_{m}']:.3f}")
    mesh = density_panel(top[4], np.clip(log_q_fig - log_p_fig, -3, 3), n, "log p_θ − log p (ODE), clipped to ±3",
                         cmap="RdBu_r", vmin=-3, vmax=3)
    plt.colorbar(mesh, ax=top[4], fraction=0.046)
    shown = [name for name in samples if name != "exact samples"][:5]
    for ax, name in zip(bottom, shown):
        r = out["samples"][name]
        plot.samples(ax, samples[name], *SAMPLE_BOX, bins=90,
                     title=f"{name}\n{r['modes_covered']}/8 modes, {100 * r['high_quality']:.0f}% good, W1 {r['sliced_w1']:.3f}")
    for ax in bottom[len(shown):]:
        ax.axis("off")
    plot.save(fig, workdir / "figures" / "diffusion_2d.png")
    runs.save_json(workdir / "results.json", out)

    ll = out["test_log_likelihood"]
    print(f"held-out log-likelihood ({config.n_test} points): true {ll['true']:.3f}, score model (exact ODE) "
          f"{ll['score_model_exact_ode']:.3f}, EBM PCD {ll['ebm_pcd']:.3f} (>= {ll['ebm_pcd_lower_bound']:.3f}), "
          f"EBM CD {ll['ebm_cd']:.3f} (>= {ll['ebm_cd_lower_bound']:.3f}); the ODE density's mass on the box "
          f"{out['score_model_mass_on_box']:.3f}")
    for name, r in out["samples"].items():
        print(f"{name:28s} modes {r['modes_covered']}/8  high-quality {r['high_quality']:.2f}  sliced W1 {r['sliced_w1']:.3f}")
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
