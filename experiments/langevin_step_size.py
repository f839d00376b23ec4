"""How does Langevin's bias depend on the step size a and the number of steps K, ULA against MALA?

Both kernels use the convention x' = x + a ∇log p(x) + sqrt(2a) u. ULA's stationary
law is off by O(a), so its error stops falling with K at a floor set by a; MALA's
Metropolis correction removes that floor, at the price of rejections when a is large.
The error is the sliced Wasserstein-1 distance between the chains' positions and
exact samples of a banana-shaped target, next to the floor of two exact samples.
The banana's curvature grows in its tails, so ULA with a large a is not even
stable: its chains blow up (reported as diverged), while MALA rejects those moves.

    python experiments/langevin_step_size.py --workdir runs/langevin_step_size

Writes results.json and figures/bias.png under --workdir.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jsm import metrics, plot, runs, samplers, targets


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/langevin_step_size"
    seed: int = 0
    steps: int = 2000  # the longest chains; errors are read every `every` steps
    every: int = 100
    n_chains: int = 5000
    step_sizes: tuple[float, ...] = (0.003, 0.01, 0.03, 0.06, 0.1, 0.3)
    progress: bool = True


def make_target() -> targets.Banana:
    return targets.Banana(scale=1.0, curvature=0.5, width=0.5)


def run(config: Config) -> dict:
    """Errors of ULA and MALA for each step size, after each `every` steps."""
    target = make_target()
    key = jax.random.key(config.seed)
    k_init, k_exact, k_floor, k_chain, k_proj = jax.random.split(key, 5)
    # Started in a tight cloud above the banana, so that K must cover the transient too.
    x0 = jnp.array([0.0, 3.0]) + 0.3 * jax.random.normal(k_init, (config.n_chains, 2))
    exact = target.sample(k_exact, config.n_chains)
    sw = jax.jit(jax.vmap(lambda xs: metrics.sliced_wasserstein(xs, exact, k_proj)))
    out = {
        "steps": list(range(config.every, config.steps + 1, config.every)),
        "floor": float(metrics.sliced_wasserstein(target.sample(k_floor, config.n_chains), exact, k_proj)),
        "ula": {},
        "mala": {},
        "mala_acceptance": {},
        "ula_diverged_chains": {},
    }
    for a in config.step_sizes:
        for name, kernel in (("ula", samplers.ula(target.score, a)), ("mala", samplers.mala(target.log_prob, a))):
            _, trace, info = samplers.run_chains(kernel, k_chain, x0, config.steps, thin=config.every)
            # A diverged chain makes the distance infinite, not NaN: the kernel failed outright.
            errors = np.asarray(sw(trace))
            out[name][str(a)] = np.where(np.isfinite(errors), errors, np.inf).tolist()
            if name == "mala":
                out["mala_acceptance"][str(a)] = float(jnp.mean(info.acceptance_rate))
            else:
                out["ula_diverged_chains"][str(a)] = int(jnp.sum(info.n_nonfinite > 0))
        if config.progress:
            print(f"a = {a:g}: ULA {out['ula'][str(a)][-1]:.3f}, MALA {out['mala'][str(a)][-1]:.3f} "
                  f"(acceptance {out['mala_acceptance'][str(a)]:.2f}); floor {out['floor']:.3f}")
    return out


def figure(config: Config, out: dict, path) -> None:
    fig, (a, b) = plot.figure(2, size=4.5)
    sizes = [float(s) for s in out["ula"]]
    for name, style in (("ula", "o-"), ("mala", "s--")):
        a.loglog(sizes, [out[name][str(s)][-1] for s in config.step_sizes], style, label=name.upper())
    diverged = [s for s in sizes if out["ula_diverged_chains"][str(s)] > 0]
    if diverged:
        top = max(v[-1] for k in ("ula", "mala") for v in out[k].values() if np.isfinite(v[-1]))
        a.plot(diverged, [top] * len(diverged), "rx", ms=9, label="ULA diverged")
    a.axhline(out["floor"], color="0.5", ls=":", label="two exact samples")
    a.set_xlabel("step size a")
    a.set_ylabel(f"sliced W1 after {out['steps'][-1]} steps")
    a.legend()
    for s in config.step_sizes:
        if np.all(np.isfinite(out["ula"][str(s)])):
            b.loglog(out["steps"], out["ula"][str(s)], label=f"ULA a={s:g}")
    b.axhline(out["floor"], color="0.5", ls=":")
    b.set_xlabel("steps K")
    b.set_ylabel("sliced W1")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.set_aspect("auto")
    plot.save(fig, path)


def main(config: Config) -> dict:
    workdir = runs.prepare_workdir(config)
    out = run(config)
    figure(config, out, workdir / "figures" / "bias.png")
    best = min(config.step_sizes, key=lambda s: out["ula"][str(s)][-1])
    out["summary"] = {
        "floor": out["floor"],
        "ula_best_step_size": best,
        "ula_error_at_largest_step": out["ula"][str(config.step_sizes[-1])][-1],
        "mala_error_at_largest_step": out["mala"][str(config.step_sizes[-1])][-1],
    }
    runs.save_json(workdir / "results.json", out)
    print(f"ULA error at a={config.step_sizes[-1]}: {out['summary']['ula_error_at_largest_step']:.3f}, "
          f"MALA: {out['summary']['mala_error_at_largest_step']:.3f}, floor {out['floor']:.3f}")
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
