"""Forward or reverse KL: which modes does a single Gaussian keep when it must fit two?

Fits q = N(μ, L Lᵀ) to a bimodal 2-D mixture p twice, with the same training loop:
by maximum likelihood on samples of p, which minimises the forward KL(p || q) and
covers both modes with one wide Gaussian; and by the reverse KL(q || p) = E_q[log q - log p],
with reparameterised samples of q, which punishes q for mass where p has none and so
settles on ONE mode. Both KLs of both fits are computed exactly on a grid.

    python experiments/kl_directions.py --workdir runs/kl_directions

Writes results.json and figures/fits.png under --workdir.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import optax

import jsm
from jsm import metrics, plot, runs, targets

LO, HI = jnp.array([-7.0, -5.0]), jnp.array([7.0, 5.0])


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/kl_directions"
    steps: int = 1500
    seed: int = 0
    learning_rate: float = 2e-2
    batch_size: int = 256
    n_train: int = 10_000
    reverse_samples: int = 256  # samples of q per reverse-KL step
    progress: bool = True


def make_target() -> targets.GaussianMixture:
    means = jnp.array([[-3.0, 0.0], [3.0, 0.0]])
    return targets.GaussianMixture(means, jnp.array([0.6, 0.6]), jnp.array([0.6, 0.4]))


def init_params() -> dict:
    """q starts as N((0.5, 0.5), 0.5² I), between the modes and a little nearer the light one."""
    return {"mean": jnp.array([0.5, 0.5]), "log_diag": jnp.log(jnp.full(2, 0.5)), "off_diag": jnp.zeros(())}


def cholesky(params: dict) -> jax.Array:
    """L, lower triangular with a positive diagonal."""
    return jnp.diag(jnp.exp(params["log_diag"])) + jnp.array([[0.0, 0.0], [1.0, 0.0]]) * params["off_diag"]


def log_q(params: dict, x: jax.Array) -> jax.Array:
    chol = cholesky(params)
    z = jax.scipy.linalg.solve_triangular(chol, x - params["mean"], lower=True)
    return -0.5 * z @ z - jnp.sum(params["log_diag"]) - math.log(2 * math.pi)


def forward_kl_loss(params, key, batch):
    """Negative log-likelihood of the data: KL(p || q) up to p's entropy."""
    return -jnp.mean(jax.vmap(lambda x: log_q(params, x))(batch))


def reverse_kl_loss(target, n: int):
    """KL(q || p) = E_z[log q(μ + L z) - log p(μ + L z)], exact up to Monte Carlo."""
    def loss(params, key, batch):
        xs = params["mean"] + jax.random.normal(key, (n, 2)) @ cholesky(params).T
        return jnp.mean(jax.vmap(lambda x: log_q(params, x) - target.log_prob(x))(xs))
    return loss


def fit_both(config: Config, target) -> dict:
    key = jax.random.key(config.seed)
    k_data, k_fit = jax.random.split(key)
    data = target.sample(k_data, config.n_train)
    common = dict(optimizer=optax.adam(config.learning_rate), key=k_fit, steps=config.steps,
                  batch_size=config.batch_size, log_every=100, checkpoint_every=500, progress=config.progress)
    return {
        "forward": jsm.fit(forward_kl_loss, init_params(), data, workdir=f"{config.workdir}/forward", **common).params,
        "reverse": jsm.fit(reverse_kl_loss(target, config.reverse_samples), init_params(), data,
                           workdir=f"{config.workdir}/reverse", **common).params,
    }


def summarise(params: dict, target) -> dict:
    q = lambda x: log_q(params, x)
    mass_left = jax.scipy.stats.norm.cdf(0.0, params["mean"][0], jnp.exp(params["log_diag"][0]))
    return {
        "mean": params["mean"].tolist(),
        "cov": (cholesky(params) @ cholesky(params).T).tolist(),
        "forward_kl": float(metrics.kl_grid(target.log_prob, q, LO, HI, 300)),
        "reverse_kl": float(metrics.kl_grid(q, target.log_prob, LO, HI, 300)),
        "mass_on_left_mode_side": float(mass_left),
    }


def main(config: Config) -> dict:
    workdir = runs.prepare_workdir(config)
    target = make_target()
    fits = fit_both(config, target)
    out = {"target_mass_on_left": 0.6, **{name: summarise(p, target) for name, p in fits.items()}}
    fig, axes = plot.figure(3)
    plot.density(axes[0], target.log_prob, LO, HI, title="p: weights 0.6 / 0.4")
    for ax, name in zip(axes[1:], ("forward", "reverse")):
        plot.density(ax, target.log_prob, LO, HI)
        plot.contours(ax, lambda x, p=fits[name]: log_q(p, x), LO, HI, color="tab:red",
                      title=f"{name} KL fit: KL(p||q)={out[name]['forward_kl']:.2f}, KL(q||p)={out[name]['reverse_kl']:.2f}")
    plot.save(fig, workdir / "figures" / "fits.png")
    runs.save_json(workdir / "results.json", out)
    for name in ("forward", "reverse"):
        r = out[name]
        print(f"{name:8s} fit: KL(p||q) = {r['forward_kl']:.3f}, KL(q||p) = {r['reverse_kl']:.3f}, "
              f"q's mass left of 0 = {r['mass_on_left_mode_side']:.2f} (p: 0.60)")
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
