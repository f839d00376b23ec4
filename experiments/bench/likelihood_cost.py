"""What does the EXACT probability-flow log-likelihood cost against Hutchinson's estimate, and how many probes
does Hutchinson need before its noise is negligible?

log p(x) = log π(x_T) + ∫ div v(x_t, t) dt (`jsm.likelihood.log_prob`), the divergence exact (one first-order
forward jet of v, `trace="exact"`) or estimated by k Rademacher probes held fixed along the path
(`trace="hutchinson"`, k in {1, 4, 16, 64}). The score network s(x, t) is a small MLP on [x, t] (2 hidden layers
of 64, tanh, untrained: the cost and the estimator's noise do not need a trained model), the SDE VP, the solver
diffrax's adaptive Tsit5 at the default tolerances.

Reported per d and method:
  ms_per_example   the wall time of `log_prob` on the batch, per example (jitted, median of reps)
  steps            the solver's steps per example (diffrax's num_steps, from a solve through the same helpers
                   as `log_prob`: jsm.likelihood.divergence_fn, jsm.diffusion.ode_drift and solve_ode);
                   Tsit5 (FSAL) evaluates the field about 6 times per step
  nfe              ≈ 6 · steps + 1 evaluations of (v, div v)
  sd_bpd           Hutchinson: the standard deviation of one example's bits/dim over probe keys (averaged over
                   examples); exact: 0
  rmse_bpd         Hutchinson: the root-mean-square distance to the exact bits/dim
  x_exact_time     time per example against the exact trace's

    python experiments/bench/likelihood_cost.py --out runs/bench/likelihood_cost.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jsm
from jsm import diffusion, likelihood
from timing import save, table

HIDDEN = (64, 64)
PROBES = (1, 4, 16, 64)
TARGET_BPD = 0.01


def score_net(key, d: int):
    """s(x, t): an MLP on [x, t], (d,) x () -> (d,)."""
    sizes = (d + 1, *HIDDEN, d)
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        key, k = jax.random.split(key)
        params.append((jax.random.normal(k, (a, b)) / math.sqrt(a), jnp.zeros(b)))

    def score(x, t):
        h = jnp.concatenate([x, jnp.reshape(t, (1,)).astype(x.dtype)])
        for w, b in params[:-1]:
            h = jnp.tanh(h @ w + b)
        w, b = params[-1]
        return h @ w + b

    return score


def steps_per_example(score, sde, xs, trace: str, probes) -> np.ndarray:
    """diffrax's num_steps for each example, solving as `log_prob` does."""
    t_min = jnp.asarray(likelihood.LIKELIHOOD_T_MIN, xs.dtype)

    @jax.jit
    def solve(xs, probes):
        def one(x, u):
            def field(t, state):
                return likelihood.divergence_fn(lambda z: diffusion.ode_drift(score, sde, z, t), trace, u)(state[0])

            _, _, n = diffusion.solve_ode(field, (x, jnp.zeros((), x.dtype)), t_min, sde.T,
                                          rtol=jnp.asarray(1e-5, xs.dtype), atol=jnp.asarray(1e-5, xs.dtype),
                                          max_steps=4096)
            return n

        return jax.vmap(one)(xs, probes)

    if probes is None:
        probes = jnp.zeros((xs.shape[0], 1, xs.shape[1]), xs.dtype)
    return np.asarray(solve(xs, probes))


def timed(fn, reps: int) -> tuple[float, object]:
    out = jax.block_until_ready(fn())  # compiles
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="2,64,784")
    parser.add_argument("--examples", default="8,4,2", help="examples per d (784 is slow on a CPU)")
    parser.add_argument("--keys", default="8,6,4", help="Hutchinson probe keys per d (for the spread over keys)")
    parser.add_argument("--probes", default=",".join(map(str, PROBES)))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/likelihood_cost.json")
    args = parser.parse_args(argv)
    sde = jsm.sde.VPSDE()
    rows = []
    for d, n, n_keys in zip(map(int, args.dims.split(",")), map(int, args.examples.split(",")),
                            map(int, args.keys.split(","))):
        score = score_net(jax.random.key(d), d)
        xs = jax.random.normal(jax.random.key(0), (n, d))
        bpd = lambda log_p: np.asarray(likelihood.bits_per_dim(log_p, d))
        t_exact, log_p = timed(lambda: likelihood.log_prob(score, sde, xs), args.reps)
        exact = bpd(log_p)
        steps = steps_per_example(score, sde, xs, "exact", None)
        rows.append({"d": d, "method": "exact", "k": 0, "n": n, "ms_per_example": 1e3 * t_exact / n,
                     "steps": float(steps.mean()), "nfe": float(6 * steps.mean() + 1), "sd_bpd": 0.0,
                     "rmse_bpd": 0.0, "x_exact_time": 1.0})
        print(f"d={d}: exact {1e3 * t_exact / n:.1f} ms/example, {steps.mean():.0f} steps", flush=True)
        for k in map(int, args.probes.split(",")):
            keys = jax.random.split(jax.random.key(k), n_keys)
            run = lambda key: likelihood.log_prob(score, sde, xs, trace="hutchinson", key=key, n_probes=k)
            t_h, _ = timed(lambda: run(keys[0]), args.reps)
            draws = np.stack([bpd(run(key)) for key in keys])  # (keys, n)
            probes = jax.random.rademacher(keys[0], (n, k, d), xs.dtype)  # as flow_to_prior draws them
            h_steps = steps_per_example(score, sde, xs, "hutchinson", probes)
            rows.append({"d": d, "method": "hutchinson", "k": k, "n": n, "ms_per_example": 1e3 * t_h / n,
                         "steps": float(h_steps.mean()), "nfe": float(6 * h_steps.mean() + 1),
                         "sd_bpd": float(np.mean(np.std(draws, axis=0, ddof=1))),
                         "rmse_bpd": float(np.sqrt(np.mean((draws - exact) ** 2))), "x_exact_time": t_h / t_exact})
            print(f"d={d}: hutchinson k={k} {1e3 * t_h / n:.1f} ms/example, sd {rows[-1]['sd_bpd']:.4f} bits/dim",
                  flush=True)
    columns = ["d", "method", "k", "n", "ms_per_example", "steps", "nfe", "sd_bpd", "rmse_bpd", "x_exact_time"]
    print("\nProbability-flow log-likelihood, exact trace against Hutchinson (bits/dim):")
    print(table(rows, columns))
    summary = {}
    for d in sorted({r["d"] for r in rows}):
        ok = [r for r in rows if r["d"] == d and r["method"] == "hutchinson" and r["rmse_bpd"] < TARGET_BPD]
        first = min(ok, key=lambda r: r["k"]) if ok else None
        # Otherwise extrapolated from the largest k, the spread falling as 1/sqrt(k): k (rmse / target)².
        last = max((r for r in rows if r["d"] == d and r["method"] == "hutchinson"), key=lambda r: r["k"])
        k_needed = last["k"] * (last["rmse_bpd"] / TARGET_BPD) ** 2
        summary[d] = {"k": first["k"] if first else None, "k_extrapolated": k_needed,
                      "x_exact_time": first["x_exact_time"] if first else None}
        print(f"d={d}: Hutchinson's error under {TARGET_BPD} bits/dim at "
              + (f"k={first['k']}, {first['x_exact_time']:.2f}x the exact trace's time" if first
                 else f"no k <= {last['k']}; about k = {k_needed:.0f} by 1/sqrt(k) from k = {last['k']} "
                      f"(then about {k_needed / last['k'] * last['x_exact_time']:.0f}x the exact trace's time, "
                      f"the probes' cost taken as linear in k)"))
    save(args.out, rows, score_hidden=HIDDEN, sde="VPSDE", target_bpd=TARGET_BPD, first_k_under_target=summary)
    return rows


if __name__ == "__main__":
    main()
