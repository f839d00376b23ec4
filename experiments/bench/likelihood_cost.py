"""What does the EXACT probability-flow log-likelihood cost against Hutchinson's estimate, and how many probes
does Hutchinson need before its noise is negligible?

log p(x) = log π(x_T) + ∫ div v(x_t, t) dt (`jsm.likelihood.log_prob`), the divergence exact (one first-order
forward jet of v, `trace="exact"`) or estimated by k Rademacher probes held fixed along the path
(`trace="hutchinson"`, k in {1, 4, 16, 64}). The score network s(x, t) is a small MLP on [x, t] (2 hidden layers
of 64, tanh, untrained: the cost and the estimator's noise do not need a trained model), the SDE VP, the solver
diffrax's adaptive Tsit5 at the default tolerances.

Reported per d and method:
  ms_per_example   the wall time of `log_prob` on the batch, per example (jitted, median of reps)
  steps            the solver's steps per example (diffrax's num_steps, accepted and rejected, from
                   `likelihood.flow_to_prior(..., info=True)`: the very solve `log_prob` runs, same probes)
  nfe              evaluations of (v, div v) per example (SolveInfo.num_fevals: Tsit5 (FSAL) evaluates the
                   field 6 times per step, plus one)
  sd_bpd           Hutchinson: the standard deviation of one example's bits/dim over probe keys (averaged over
                   examples); exact: 0
  rmse_bpd         Hutchinson: the root-mean-square distance to the exact bits/dim
  x_exact_time     time per example against the exact trace's
  ms_per_eval      ms_per_example / nfe: the cost of ONE evaluation of (v, div v), i.e. of one jet (exact) or
                   of k JVPs (Hutchinson), per solver step's stage, inside the solve

Where the time goes (the `per_evaluation` table, `--eval-dims`, default 784): ONE evaluation of the field
with its divergence, for batches of `--eval-batch` examples (1 and 8), jitted alone and timed, with XLA's compiled cost
analysis (`jax.jit(f).lower(...).compile().cost_analysis()`: flops and bytes accessed) per example, for
  score            v(x, t) alone: the floor, what a sampler pays per step
  exact            jsm's exact divergence (`likelihood.divergence_fn(trace="exact")`: the forward jet,
                   value and the d x d Jacobian, then its trace)
  exact_by_hand    the same trace written for this MLP, keeping only what the trace needs from the last
                   layer: J_2 (d x h) then Σ_i (J_2 W_3)_ii as one contraction (d h, not d h d, multiply-adds);
                   it agrees with "exact" to float rounding and shows what the full last-layer Jacobian costs
  hutchinson_k     k Rademacher JVPs
for the benchmark's MLP, and (`--mnist-net`) for experiments/mnist.py's score network at d = 784,
`nets.NoiseConditionalScore(784, (256, 256))` (Fourier time features, preconditioned); and the exact jet's
flops counted by hand, layer by layer (`jet_flops`), next to XLA's count: the last layer's (d x h) @ (h x d)
Jacobian, of which the trace needs only the diagonal, is most of them; the first layer's seed I_d @ W_1 is
a dense product with the identity, shared by the batch.

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
from timing import compiled_cost, compiled_megabytes, interleaved, load_average, save, table

HIDDEN = (64, 64)
MNIST_HIDDEN = (256, 256)  # experiments/mnist.py's likelihood network
MNIST_FREQUENCIES = 16  # its Fourier features of t: 2 x 16 inputs besides x
PROBES = (1, 4, 16, 64)
TARGET_BPD = 0.01


def score_params(key, d: int) -> list:
    """[(W, b)] of an MLP on [x, t]: (d + 1) -> HIDDEN -> d."""
    sizes = (d + 1, *HIDDEN, d)
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        key, k = jax.random.split(key)
        params.append((jax.random.normal(k, (a, b)) / math.sqrt(a), jnp.zeros(b)))
    return params


def score_net(key, d: int):
    """s(x, t): an MLP on [x, t], (d,) x () -> (d,)."""
    params = score_params(key, d)

    def score(x, t):
        h = jnp.concatenate([x, jnp.reshape(t, (1,)).astype(x.dtype)])
        for w, b in params[:-1]:
            h = jnp.tanh(h @ w + b)
        w, b = params[-1]
        return h @ w + b

    return score


def steps_per_example(score, sde, xs, trace: str, key=None, n_probes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The solver's (num_steps, num_fevals) per example, from the very solve `log_prob` runs (same probes)."""
    *_, info = likelihood.flow_to_prior(score, sde, xs, trace=trace, key=key, n_probes=n_probes, info=True)
    return np.asarray(info.num_steps), np.asarray(info.num_fevals)


def exact_by_hand(params, sde, x, t):
    """(v, div v) of v = f - g² s / 2 for `score_net`'s MLP, the trace taken inside the last layer's contraction."""
    (w1, b1), (w2, b2), (w3, b3) = params
    d = x.shape[0]
    h0 = jnp.concatenate([x, jnp.reshape(t, (1,)).astype(x.dtype)])
    h1 = jnp.tanh(h0 @ w1 + b1)
    h2 = jnp.tanh(h1 @ w2 + b2)
    s = h2 @ w3 + b3
    j1 = w1[:d] * (1.0 - h1**2)  # ∂h1/∂x: (d, h), row i = ∂/∂x_i
    j2 = (j1 @ w2) * (1.0 - h2**2)  # ∂h2/∂x: (d, h)
    div_s = jnp.einsum("ij,ji->", j2, w3)  # Σ_i ∂s_i/∂x_i without forming (d, d)
    g2 = sde.diffusion(t) ** 2
    v = sde.drift(x, t) - 0.5 * g2 * s
    # the VP drift f = -β(t) x / 2 acts on each coordinate alike: div f = d ∂f_1/∂x_1
    div_f = d * jax.grad(lambda z: sde.drift(z, t)[0])(jnp.zeros(1))[0]
    return v, div_f - 0.5 * g2 * div_s


def mnist_score(key):
    """experiments/mnist.py's likelihood network at d = 784, untrained: score(x, t)."""
    from flax import nnx

    sde = jsm.sde.VPSDE()
    net = jsm.nets.NoiseConditionalScore(784, MNIST_HIDDEN, rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 2**30))),
                                         noise="t", marginal=sde.marginal, data_scale=1.0, activation=jax.nn.silu,
                                         n_frequencies=MNIST_FREQUENCIES)
    apply, params = jsm.nets.pure(net)
    return lambda x, t: apply(params, x, t)


def jet_flops(layers: tuple[int, ...], n: int) -> dict:
    """MFLOP per example of the exact jet through an MLP with widths `layers` = (in, h_1, ..., h_L, d), d columns.

    The seed I_d @ W_1 (d x in times in x h_1) once per batch; each hidden layer (d x h_i) @ (h_i x h_{i+1});
    the last (d x h_L) @ (h_L x d), of which the trace needs only Σ_i Σ_j J_ij W_ji (d h_L multiply-adds).
    """
    d = layers[-1]
    seed = 2 * d * layers[0] * layers[1] / n
    hidden = sum(2 * d * a * b for a, b in zip(layers[1:-2], layers[2:-1]))
    last = 2 * d * layers[-2] * d
    mega = lambda v: v / 1e6
    return {"first_layer_seed": mega(seed), "hidden": mega(hidden), "last_layer": mega(last),
            "total": mega(seed + hidden + last), "last_layer_trace_only": mega(2 * d * layers[-2])}


def per_evaluation(name: str, score, d: int, n: int, probes, reps: int, by_hand=None, layers=None) -> list[dict]:
    """Time and cost analysis of ONE evaluation of (v, div v) for a batch of n examples, per example."""
    sde = jsm.sde.VPSDE()
    t = jnp.asarray(0.5)
    xs = jax.random.normal(jax.random.key(1), (n, d))
    field = lambda z: diffusion.ode_drift(score, sde, z, t)
    split = lambda x: likelihood._field_and_divergence(score, sde, t, "exact", None)(x)
    fns = {"score": (lambda xs: jax.vmap(field)(xs), (xs,)),
           "exact": (lambda xs: jax.vmap(likelihood.divergence_fn(field, "exact"))(xs), (xs,)),
           "exact_split": (lambda xs: jax.vmap(split)(xs), (xs,))}
    if by_hand is not None:
        fns["exact_by_hand"] = (lambda xs: jax.vmap(lambda x: by_hand(sde, x, t))(xs), (xs,))
    for k in probes:
        u = jax.random.rademacher(jax.random.key(k), (n, k, d), xs.dtype)
        one = lambda x, p: likelihood.divergence_fn(field, "hutchinson", p)(x)
        fns[f"hutchinson_{k}"] = (lambda xs, u: jax.vmap(one)(xs, u), (xs, u))
    rows, outputs = [], {}
    for what, (fn, args) in fns.items():
        compiled = jax.jit(fn).lower(*args).compile()
        seconds, out = timed(lambda: compiled(*args), reps)
        outputs[what] = out
        c = compiled_cost(compiled)
        rows.append({"net": name, "d": d, "what": what, "n": n, "ms_per_example": 1e3 * seconds / n,
                     "mflops_per_example": c["flops"] / n / 1e6, "mbytes_per_example": c["bytes"] / n / 1e6})
        if what == "exact" and layers is not None:
            rows[-1]["analytic_mflops"] = jet_flops(layers, n)
    base = rows[0]
    for r in rows:
        r["x_score_time"] = r["ms_per_example"] / base["ms_per_example"]
        r["x_score_flops"] = r["mflops_per_example"] / base["mflops_per_example"]
        r["gflop_per_s"] = r["mflops_per_example"] / r["ms_per_example"]
    if by_hand is not None:  # the hand-written trace is the same number
        np.testing.assert_allclose(np.asarray(outputs["exact_by_hand"][1]), np.asarray(outputs["exact"][1]),
                                   rtol=1e-3, atol=1e-3 * d)
    return rows


DIVERGENCE_NET = (784, 256, 256, 784)  # a tanh score network s: (784,) -> (784,)


def divergence_table(n: int, reps: int) -> list[dict]:
    """The exact divergence tr ∂s/∂x of a DIVERGENCE_NET tanh score, batch n, no parameter gradient:
      forward    `jsm.forward.divergence_batch(s)`: the first-layer seed (h = 256 directions q_j, W_1 = QR)
                 and the last layer's contraction (Σ_j (W_3 q_j) · ∂a/∂q_j, never the (n, h, d) Jacobian)
      forward_I  the same with the d rows of I (`_reduce=False`): the contraction only, the seed off
      vmapped    `jax.vmap(jsm.divergence(s))` (custom_vmap: the batched path)
      jacfwd     the trace of `jax.jacfwd(s)`, vmapped
    timed in one process, interleaved rep by rep (median, min), with XLA's compiled flops and memory."""
    sizes = DIVERGENCE_NET
    keys = jax.random.split(jax.random.key(7), len(sizes) - 1)
    params = [(jax.random.normal(k, (a, b)) / math.sqrt(a), jnp.full((b,), 0.1)) for k, a, b in
              zip(keys, sizes[:-1], sizes[1:])]

    def score(params, x):
        for w, b in params[:-1]:
            x = jnp.tanh(x @ w + b)
        return x @ params[-1][0] + params[-1][1]

    s = lambda p: (lambda x: score(p, x))
    fns = {"forward": lambda p, xs: jsm.forward.divergence_batch(s(p))(xs)[1],
           "forward_I": lambda p, xs: jsm.forward.divergence_batch(s(p), _reduce=False)(xs)[1],
           "vmapped": lambda p, xs: jax.vmap(jsm.divergence(s(p)))(xs),
           "jacfwd": lambda p, xs: jax.vmap(lambda x: jnp.trace(jax.jacfwd(s(p))(x)))(xs)}
    xs = jax.random.normal(jax.random.key(1), (n, sizes[0]))
    compiled = {k: jax.jit(f).lower(params, xs).compile() for k, f in fns.items()}
    outs = {k: np.asarray(c(params, xs)) for k, c in compiled.items()}
    for k, out in outs.items():  # the same trace by every route
        np.testing.assert_allclose(out, outs["jacfwd"], rtol=1e-3, atol=1e-3 * np.max(np.abs(outs["jacfwd"])))
    times = interleaved(compiled, params, xs, reps=reps)
    load = load_average()
    rows = []
    for k, c in compiled.items():
        (med, low), (jac_med, jac_low) = times[k], times["jacfwd"]
        rows.append({"net": "-".join(map(str, sizes)) + " tanh", "n": n, "method": k, "ms": 1e3 * med,
                     "ms_min": 1e3 * low, "x_jacfwd": jac_med / med, "x_jacfwd_min": jac_low / low,
                     "gflop": compiled_cost(c)["flops"] / 1e9, "MB": compiled_megabytes(c), "load": load})
    return rows


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
    parser.add_argument("--eval-dims", default="784", help="d for the per-evaluation table ('' for none)")
    parser.add_argument("--eval-batch", default="1,8", help="batch sizes n of the per-evaluation table")
    parser.add_argument("--mnist-net", action=argparse.BooleanOptionalAction, default=True,
                        help="also the per-evaluation table of experiments/mnist.py's score network at d = 784")
    parser.add_argument("--divergence-batch", type=int, default=64,
                        help="batch of the divergence table (the 784-256-256-784 tanh score; 0 for none)")
    parser.add_argument("--divergence-reps", type=int, default=7)
    parser.add_argument("--out", default="runs/bench/likelihood_cost.json")
    args = parser.parse_args(argv)
    divergence = divergence_table(args.divergence_batch, args.divergence_reps) if args.divergence_batch else []
    if divergence:
        print("The exact divergence of a score network, no parameter gradient; one process, interleaved reps; "
              "x_jacfwd > 1: faster than jacfwd's trace:")
        print(table(divergence, ["net", "n", "method", "ms", "ms_min", "x_jacfwd", "x_jacfwd_min", "gflop", "MB",
                                 "load"]), flush=True)
    sde = jsm.sde.VPSDE()
    rows = []
    for d, n, n_keys in zip(map(int, args.dims.split(",")), map(int, args.examples.split(",")),
                            map(int, args.keys.split(","))):
        score = score_net(jax.random.key(d), d)
        xs = jax.random.normal(jax.random.key(0), (n, d))
        bpd = lambda log_p: np.asarray(likelihood.bits_per_dim(log_p, d))
        t_exact, log_p = timed(lambda: likelihood.log_prob(score, sde, xs), args.reps)
        exact = bpd(log_p)
        steps, nfe = steps_per_example(score, sde, xs, "exact")
        rows.append({"d": d, "method": "exact", "k": 0, "n": n, "ms_per_example": 1e3 * t_exact / n,
                     "steps": float(steps.mean()), "nfe": float(nfe.mean()), "sd_bpd": 0.0,
                     "rmse_bpd": 0.0, "x_exact_time": 1.0, "ms_per_eval": 1e3 * t_exact / n / float(nfe.mean())})
        print(f"d={d}: exact {1e3 * t_exact / n:.1f} ms/example, {steps.mean():.0f} steps", flush=True)
        for k in map(int, args.probes.split(",")):
            keys = jax.random.split(jax.random.key(k), n_keys)
            run = lambda key: likelihood.log_prob(score, sde, xs, trace="hutchinson", key=key, n_probes=k)
            t_h, _ = timed(lambda: run(keys[0]), args.reps)
            draws = np.stack([bpd(run(key)) for key in keys])  # (keys, n)
            h_steps, h_nfe = steps_per_example(score, sde, xs, "hutchinson", keys[0], k)
            rows.append({"d": d, "method": "hutchinson", "k": k, "n": n, "ms_per_example": 1e3 * t_h / n,
                         "steps": float(h_steps.mean()), "nfe": float(h_nfe.mean()),
                         "sd_bpd": float(np.mean(np.std(draws, axis=0, ddof=1))),
                         "rmse_bpd": float(np.sqrt(np.mean((draws - exact) ** 2))), "x_exact_time": t_h / t_exact,
                         "ms_per_eval": 1e3 * t_h / n / float(h_nfe.mean())})
            print(f"d={d}: hutchinson k={k} {1e3 * t_h / n:.1f} ms/example, sd {rows[-1]['sd_bpd']:.4f} bits/dim",
                  flush=True)
    columns = ["d", "method", "k", "n", "ms_per_example", "steps", "nfe", "ms_per_eval", "sd_bpd", "rmse_bpd",
               "x_exact_time"]
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
    evals = []
    probe_list = [int(k) for k in args.probes.split(",")]
    for d in [int(v) for v in args.eval_dims.split(",") if v]:
        key = jax.random.key(d)
        params = score_params(key, d)
        for n in [int(v) for v in args.eval_batch.split(",") if v]:
            evals += per_evaluation(f"bench MLP {HIDDEN}", score_net(key, d), d, n, probe_list, args.reps,
                                    by_hand=lambda sde, x, t: exact_by_hand(params, sde, x, t),
                                    layers=(d + 1, *HIDDEN, d))
            if args.mnist_net and d == 784:
                evals += per_evaluation("mnist.py MLP (256, 256)", mnist_score(key), d, n, probe_list, args.reps,
                                        layers=(d + 2 * MNIST_FREQUENCIES, *MNIST_HIDDEN, d))
    if evals:
        print("\nOne evaluation of (v, div v), per example (XLA cost analysis; x_score: against v alone):")
        print(table(evals, ["net", "d", "what", "n", "ms_per_example", "mflops_per_example", "mbytes_per_example",
                            "x_score_time", "x_score_flops", "gflop_per_s"]))
        print("\nThe exact jet's flops per example, by layer (2 d a b for a (d x a) Jacobian times an (a x b) weight; "
              "the first layer's seed, I_d @ W_1, is shared by the batch):")
        for e in (r for r in evals if r["what"] == "exact"):
            a = e["analytic_mflops"]
            print(f"  {e['net']}, d={e['d']}, n={e['n']}: first-layer seed {a['first_layer_seed']:.1f} + hidden "
                  f"{a['hidden']:.1f} + last layer {a['last_layer']:.1f} = {a['total']:.1f} MFLOP (XLA counts "
                  f"{e['mflops_per_example']:.1f}); the last layer is {a['last_layer'] / a['total']:.0%}; only the "
                  f"trace needed from it: {a['last_layer_trace_only']:.2f} MFLOP")
        for r in (r for r in evals if r["what"] == "exact_by_hand"):
            e = next(x for x in evals if x["what"] == "exact" and x["net"] == r["net"] and x["n"] == r["n"])
            print(f"{r['net']}, d={r['d']}, n={r['n']}: the exact jet costs {e['mflops_per_example']:.1f} MFLOP per "
                  f"evaluation, {e['x_score_flops']:.0f}x the score's; the same trace without the last layer's d x d "
                  f"Jacobian (nor the identity seed) {r['mflops_per_example']:.2f} MFLOP, "
                  f"{e['ms_per_example'] / r['ms_per_example']:.1f}x faster")
    save(args.out, rows, score_hidden=HIDDEN, sde="VPSDE", target_bpd=TARGET_BPD, first_k_under_target=summary,
         per_evaluation=evals, divergence=divergence)
    return rows


if __name__ == "__main__":
    main()
