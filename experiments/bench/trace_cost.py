"""What does an exact trace cost against DSM as d grows? ISM loss + parameter gradient, measured.

An MLP energy f_θ (3 hidden layers of 128, softplus), batch 256. Each method computes
one training step's loss and its gradient with respect to θ:

  forward          exact ISM of the energy, `jsm.objectives.ism_energy(f, xs)` (the default "auto"):
                   one second-order forward jet of f, the batch folded into its matrix products; where d
                   exceeds the first layer's width h, along the h columns of Q (W_1 = QR, the first-layer
                   seed: ∇_x f = Q ∇_u f, Δ_x f = Δ_u f)
  forward_I        (only where d > h) the same loss by the jet along the d rows of I (`_reduce=False`): the
                   path before the seed, for the before/after ratio
  jacfwd, jacrev   exact ISM, 1/2 |∇f|² - Δf, by `ism_energy(f, xs, method=...)`
  score_of         exact ISM of the score as an opaque vector field, `ism(jsm.score_of(f), xs)`:
                   a first-order jet of -∇f's graph (what the energy path saves)
  folx             exact ISM with folx's forward Laplacian (peer; skipped if not installed)
  hutchinson       ISM with a one-probe Hutchinson ESTIMATE of Δf
  ssm              sliced score matching, one projection
  dsm              denoising score matching

A second table does the same for a score NETWORK s_θ: (d,) -> (d,) (ISM with
tr ∂s/∂x by "forward", "jacfwd" and "jacrev"): the measurements behind `method="auto"`.

An INFERENCE table (no parameter gradient) times the Laplacian alone on two networks, the
energy above (batch 256) and a wide one (tanh, d -> 768-768-512-512 -> 1, batch 64):
  forward    `jsm.forward.laplacian_batch(f)(xs)` (= forward_jet_batch(f)(xs).laplacian); where d exceeds
             the first layer's width h it seeds the h rows of W's QR factor R at z = x W (Δf = tr(H WᵀW))
  forward_I  (only where d > h) the same with the d rows of I seeded at x (`_reduce=False`): the path
             before that reduction, for the before/after ratio
  vmapped    `jax.vmap(jsm.laplacian(f, method="forward"))(xs)` (custom_vmap: the batched path)
  folx       `jax.vmap(folx.forward_laplacian(f))(xs).laplacian`
  jacfwd     `jax.vmap(jsm.laplacian(f, method="jacfwd"))(xs)`
and the divergence of a score network (first-order jet; the likelihood's trace): forward
(`jsm.forward.divergence_batch`: the first-layer seed where d > h, and the last layer's contraction),
forward_I (d > h: the d rows of I), vmapped (`jax.vmap(jsm.divergence(s, "forward"))`), jacfwd.
All methods of one row are timed in ONE process, interleaved rep by rep (median and min of
the reps), so that the ratios hold on a shared machine.

A MEMORY table: XLA's compiled memory (`memory_analysis()`: temporaries + arguments + outputs)
of the Laplacian at d in {128, 512, 2048} (energy net), forward unchunked and with
`chunk_size=128`, folx and jacfwd, each also with its parameter gradient, and its time.

A DIAGONAL table: the exact Hessian diagonal ∂²f/∂x_k² (`jsm.forward.hessian_diagonal_batch`: each of the
d directions carries its own second derivative, pushed like the Jacobian) against the Laplacian
(`jsm.forward.laplacian_batch`) on the energy net, batch 256, at d in {32, 128, 512}: time (median and
min of interleaved reps) and compiled memory, and the jacfwd diagonal (the full Hessian) for scale;
where d exceeds the first layer's width the Laplacian seeds only h rows (above) and the diagonal
cannot (the seed mixes the coordinates), so the Laplacian with the d rows of I (laplacian_I) is
timed too, the like-for-like ratio. Then the training step of Kingma & LeCun's regularised ISM,
value_and_grad of `ism_energy(f, xs, hessian_penalty=0.1)`, against the plain ISM step. The goal
set for the diagonal was at most 1.5x the Laplacian's time; the table says what it is.

The methods of one d are compiled once and timed in one process, interleaved rep by rep (median and
min), beside XLA's compiled flops (`cost_analysis()`) and memory (temporaries + arguments + outputs)
and the machine's load average. Reported: milliseconds per step, the speed-up over jacfwd and folx
(> 1: faster), the ratio to DSM, and the ratio to a FLOP lower bound
of an exact Laplacian at the machine's measured matmul throughput. The bound counts the
dense products any exact method must do: the value (2 b (d h + 2 h² + h)) and the d
Jacobian columns through the two h x h layers (2 b d · 2 h²), times 3 for the gradient.

    python experiments/bench/trace_cost.py --out runs/bench/trace_cost.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import jsm
from jsm import nets, objectives, scores
from timing import (compiled_cost, compiled_megabytes, interleaved, load_average, matmul_flops_per_second, save,
                    table, time_call)

HIDDEN, BATCH = (128, 128, 128), 256


def folx_laplacian(energy):
    try:
        import folx
    except ImportError:
        return None
    return lambda x: folx.forward_laplacian(energy)(x).laplacian


def ism_energy_d_rows(energy, xs):
    """ism_energy's loss, 1/2 |∇f|² - Δf, by the forward jet along the d rows of I: the first-layer seed off."""
    jet = jsm.forward.forward_jet_batch(energy, _reduce=False)(xs)
    return jnp.mean(0.5 * jnp.sum(jet.jacobian**2, axis=-1) - jet.laplacian)


def losses(apply, d: int):
    score = lambda p: (lambda x: -jax.grad(lambda y: apply(p, y))(x))
    out = {
        "forward": lambda p, k, xs: objectives.ism_energy(lambda x: apply(p, x), xs, method="forward"),
        **({"forward_I": lambda p, k, xs: ism_energy_d_rows(lambda x: apply(p, x), xs)} if d > HIDDEN[0] else {}),
        "jacfwd": lambda p, k, xs: objectives.ism_energy(lambda x: apply(p, x), xs, method="jacfwd"),
        "jacrev": lambda p, k, xs: objectives.ism_energy(lambda x: apply(p, x), xs, method="jacrev"),
        "score_of": lambda p, k, xs: objectives.ism(jsm.score_of(lambda x: apply(p, x)), xs, method="forward"),
        "hutchinson": lambda p, k, xs: jnp.mean(jax.vmap(
            lambda x, kk: 0.5 * jnp.sum(score(p)(x) ** 2) + scores.hutchinson_divergence(score(p))(x, kk))(
                xs, jax.random.split(k, xs.shape[0]))),
        "ssm": lambda p, k, xs: objectives.ssm(score(p), k, xs, 1),
        "dsm": lambda p, k, xs: objectives.dsm(score(p), k, xs, 0.1),
    }
    if folx_laplacian(lambda x: x.sum()) is not None:
        def folx_ism(p, k, xs):
            energy = lambda x: apply(p, x)
            lap, grad = folx_laplacian(energy), jax.grad(energy)
            return jnp.mean(jax.vmap(lambda x: 0.5 * jnp.sum(grad(x) ** 2) - lap(x))(xs))
        out["folx"] = folx_ism
    return out


def score_net_losses(apply):
    return {m: (lambda p, k, xs, m=m: objectives.ism(lambda x: apply(p, x), xs, method=m))
            for m in ("forward", "jacfwd", "jacrev")}


EXACT = ("forward", "forward_I", "jacfwd", "jacrev", "score_of", "folx")


def lower_bound_flops(d: int, h: int = 128) -> float:
    value = 2 * BATCH * (d * h + 2 * h * h + h)
    jacobian = 2 * BATCH * d * 2 * h * h
    return 3 * (value + jacobian)


WIDE, WIDE_BATCH = (768, 768, 512, 512), 64


def inference_laplacians(apply, reduced: bool = False) -> dict:
    """The Laplacian-only methods; `reduced` (d > the first layer's width) adds forward_I."""
    energy = lambda p: (lambda x: apply(p, x))
    out = {
        "forward": lambda p, xs: jsm.forward.laplacian_batch(energy(p))(xs),
        **({"forward_I": lambda p, xs: jsm.forward.laplacian_batch(energy(p), _reduce=False)(xs)} if reduced else {}),
        "vmapped": lambda p, xs: jax.vmap(jsm.laplacian(energy(p), method="forward"))(xs),
        "jacfwd": lambda p, xs: jax.vmap(jsm.laplacian(energy(p), method="jacfwd"))(xs),
    }
    if folx_laplacian(lambda x: x.sum()) is not None:
        out["folx"] = lambda p, xs: jax.vmap(folx_laplacian(energy(p)))(xs)
    return out


def inference_divergences(apply, reduced: bool = False) -> dict:
    """The divergence methods; `reduced` (d > the first layer's width) adds forward_I, the d rows of I."""
    field = lambda p: (lambda x: apply(p, x))
    return {
        "forward": lambda p, xs: jsm.forward.divergence_batch(field(p))(xs)[1],
        **({"forward_I": lambda p, xs: jsm.forward.divergence_batch(field(p), _reduce=False)(xs)[1]}
           if reduced else {}),
        "vmapped": lambda p, xs: jax.vmap(jsm.divergence(field(p), method="forward"))(xs),
        "jacfwd": lambda p, xs: jax.vmap(jsm.divergence(field(p), method="jacfwd"))(xs),
    }


def inference_table(dims, reps: int) -> list[dict]:
    rows = []
    nets_ = [("energy 3x128", lambda d: nets.MLPEnergy(d, HIDDEN, rngs=nnx.Rngs(0)), BATCH, inference_laplacians,
              HIDDEN[0]),
             ("wide tanh", lambda d: nets.MLPEnergy(d, WIDE, activation=jnp.tanh, rngs=nnx.Rngs(0)), WIDE_BATCH,
              inference_laplacians, WIDE[0]),
             ("score 3x128 (div)", lambda d: nets.MLPScore(d, HIDDEN, rngs=nnx.Rngs(0)), BATCH, inference_divergences,
              HIDDEN[0])]
    for net, build, batch, fns, width in nets_:
        for d in dims:
            apply, params = nets.pure(build(d))
            xs = jax.random.normal(jax.random.key(0), (batch, d))
            times = interleaved({k: jax.jit(f) for k, f in fns(apply, d > width).items()}, params, xs, reps=reps)
            for name, (med, low) in times.items():
                row = {"net": net, "d": d, "method": name, "ms": 1e3 * med, "ms_min": 1e3 * low,
                       "x_jacfwd": times["jacfwd"][0] / med}
                if "folx" in times:
                    row["folx_over"] = times["folx"][0] / med  # > 1: faster than folx
                    row["folx_over_min"] = times["folx"][1] / low
                if name in ("vmapped", "forward_I"):
                    row["x_forward"] = med / times["forward"][0]  # > 1: slower than forward
                rows.append(row)
            print(f"{net} d={d}: " + ", ".join(f"{k} {1e3 * v[0]:.2f} ms" for k, v in times.items()), flush=True)
    return rows


def memory_table(dims, reps: int, chunk: int = 128) -> list[dict]:
    rows = []
    for d in dims:
        apply, params = nets.pure(nets.MLPEnergy(d, HIDDEN, rngs=nnx.Rngs(0)))
        xs = jax.random.normal(jax.random.key(0), (BATCH, d))
        energy = lambda p: (lambda x: apply(p, x))
        laps = {"forward": lambda p, xs: jsm.forward.laplacian_batch(energy(p))(xs),
                f"forward chunk {chunk}": lambda p, xs: jsm.forward.laplacian_batch(energy(p), chunk_size=chunk)(xs),
                "jacfwd": lambda p, xs: jax.vmap(jsm.laplacian(energy(p), method="jacfwd"))(xs)}
        if folx_laplacian(lambda x: x.sum()) is not None:
            laps["folx"] = lambda p, xs: jax.vmap(folx_laplacian(energy(p)))(xs)
        fns = {**{k: f for k, f in laps.items()},
               **{k + " +grad": jax.grad(lambda p, xs, f=f: jnp.mean(f(p, xs))) for k, f in laps.items()}}
        mem = {k: compiled_megabytes(jax.jit(f).lower(params, xs).compile()) for k, f in fns.items()}
        times = interleaved({k: jax.jit(f) for k, f in fns.items()}, params, xs, reps=reps)
        for name in fns:
            base = "forward +grad" if name.endswith("+grad") else "forward"
            rows.append({"d": d, "what": name, "MB": mem[name], "x_forward_MB": mem[name] / mem[base],
                         "ms": 1e3 * times[name][0], "x_forward_time": times[name][0] / times[base][0]})
        print(f"memory d={d}: " + ", ".join(f"{k} {v:.0f} MB" for k, v in mem.items()), flush=True)
    return rows


def diagonal_table(dims, reps: int, lam: float = 0.1) -> list[dict]:
    """Hessian diagonal against Laplacian (time, compiled memory); the regularised ISM step against the plain one."""
    rows = []
    for d in dims:
        apply, params = nets.pure(nets.MLPEnergy(d, HIDDEN, rngs=nnx.Rngs(0)))
        xs = jax.random.normal(jax.random.key(0), (BATCH, d))
        energy = lambda p: (lambda x: apply(p, x))
        fns = {"laplacian": lambda p, xs: jsm.forward.laplacian_batch(energy(p))(xs)}
        if d > HIDDEN[0]:
            fns["laplacian_I"] = lambda p, xs: jsm.forward.laplacian_batch(energy(p), _reduce=False)(xs)
        fns |= {
            "diagonal": lambda p, xs: jsm.forward.hessian_diagonal_batch(energy(p))(xs).diagonal,
            "diagonal jacfwd": lambda p, xs: jax.vmap(jsm.hessian_diagonal(energy(p), method="jacfwd"))(xs),
            "ism step": jax.value_and_grad(lambda p, xs: objectives.ism_energy(energy(p), xs)),
            f"ism step λ={lam:g}": jax.value_and_grad(
                lambda p, xs: objectives.ism_energy(energy(p), xs, hessian_penalty=lam)),
        }
        mem = {k: compiled_megabytes(jax.jit(f).lower(params, xs).compile()) for k, f in fns.items()}
        times = interleaved({k: jax.jit(f) for k, f in fns.items()}, params, xs, reps=reps)
        for name in fns:
            base = "ism step" if name.startswith("ism step") else "laplacian"
            row = {"d": d, "what": name, "ms": 1e3 * times[name][0], "ms_min": 1e3 * times[name][1],
                   "MB": mem[name], "vs": base, "x_time": times[name][0] / times[base][0],
                   "x_time_min": times[name][1] / times[base][1], "x_MB": mem[name] / mem[base]}
            if name == "diagonal" and "laplacian_I" in times:
                row["x_time_vs_I"] = times[name][0] / times["laplacian_I"][0]
                row["x_time_min_vs_I"] = times[name][1] / times["laplacian_I"][1]
                row["x_MB_vs_I"] = mem[name] / mem["laplacian_I"]
            rows.append(row)
        print(f"diagonal d={d}: " + ", ".join(f"{k} {1e3 * v[0]:.2f} ms" for k, v in times.items()), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="2,8,32,128,512")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--score-net-dims", default="2,8,32,128",
                        help="dimensions of the score-network table ('' to skip it)")
    parser.add_argument("--inference-dims", default="2,8,32,128,512",
                        help="dimensions of the inference (Laplacian only) table ('' to skip it)")
    parser.add_argument("--memory-dims", default="128,512,2048", help="dimensions of the memory table ('' to skip)")
    parser.add_argument("--diagonal-dims", default="32,128,512",
                        help="dimensions of the Hessian-diagonal table ('' to skip)")
    parser.add_argument("--out", default="runs/bench/trace_cost.json")
    args = parser.parse_args(argv)
    dims = lambda s: [int(v) for v in s.split(",")] if s else []
    inference = inference_table(dims(args.inference_dims), args.reps)
    memory = memory_table(dims(args.memory_dims), args.reps)
    diagonal = diagonal_table(dims(args.diagonal_dims), args.reps)
    throughput = matmul_flops_per_second()
    rows = []
    key = jax.random.key(1)
    for d in dims(args.dims):
        apply, params = nets.pure(nets.MLPEnergy(d, HIDDEN, rngs=nnx.Rngs(0)))
        xs = jax.random.normal(jax.random.key(0), (BATCH, d))
        steps = {name: jax.jit(jax.value_and_grad(loss)).lower(params, key, xs).compile()
                 for name, loss in losses(apply, d).items()}
        times = interleaved(steps, params, key, xs, reps=args.reps)
        bound = lower_bound_flops(d) / throughput
        load = load_average()
        for name, (t, t_min) in times.items():
            rows.append({"net": "energy", "d": d, "method": name, "ms": 1e3 * t, "ms_min": 1e3 * t_min,
                         "x_dsm": t / times["dsm"][0], "x_jacfwd": times["jacfwd"][0] / t,
                         **({"x_folx": times["folx"][0] / t, "x_folx_min": times["folx"][1] / t_min}
                            if "folx" in times else {}),
                         "gflop": compiled_cost(steps[name])["flops"] / 1e9, "MB": compiled_megabytes(steps[name]),
                         "x_flop_bound": t / bound if name in EXACT else float("nan"), "load": load})
        print(f"d={d} (load {load}): " + ", ".join(f"{k} {1e3 * v[0]:.2f} ms" for k, v in times.items()), flush=True)
    for d in (map(int, args.score_net_dims.split(",")) if args.score_net_dims else ()):
        apply, params = nets.pure(nets.MLPScore(d, HIDDEN, rngs=nnx.Rngs(0)))
        xs = jax.random.normal(jax.random.key(0), (BATCH, d))
        times = {name: time_call(jax.jit(jax.value_and_grad(loss)), params, key, xs, reps=args.reps)
                 for name, loss in score_net_losses(apply).items()}
        for name, t in times.items():
            rows.append({"net": "score", "d": d, "method": name, "ms": 1e3 * t, "x_jacfwd": t / times["jacfwd"],
                         "auto": name == scores.resolve_method("auto")})
    print("ISM loss + parameter gradient, MLP energy f_θ (score -∇f_θ); one process, interleaved reps; x_jacfwd,"
          " x_folx > 1: faster than them; gflop and MB from XLA's compiled cost and memory analyses:")
    print(table([r for r in rows if r["net"] == "energy"], ["d", "method", "ms", "ms_min", "x_jacfwd", "x_folx",
                                                            "x_folx_min", "gflop", "MB", "x_dsm", "x_flop_bound",
                                                            "load"]))
    if args.score_net_dims:
        print("\nISM loss + parameter gradient, score network s_θ:")
        print(table([r for r in rows if r["net"] == "score"], ["d", "method", "ms", "x_jacfwd", "auto"]))
    if inference:
        print("\nInference: the Laplacian alone (and a score network's divergence), no parameter gradient;"
              " folx_over > 1: faster than folx; one process, interleaved reps:")
        print(table(inference, ["net", "d", "method", "ms", "ms_min", "folx_over", "folx_over_min", "x_jacfwd",
                                "x_forward"]))
    if memory:
        print("\nCompiled memory (temporaries + arguments + outputs) of the Laplacian, energy 3x128, batch 256:")
        print(table(memory, ["d", "what", "MB", "x_forward_MB", "ms", "x_forward_time"]))
    if diagonal:
        print("\nThe exact Hessian diagonal against the Laplacian (x_* vs laplacian), and the regularised ISM step "
              "(loss + parameter gradient, λ > 0) against the plain one (x_* vs ism step); energy 3x128, batch 256,"
              " one process, interleaved reps; goal: diagonal <= 1.5x the Laplacian's time:")
        print(table(diagonal, ["d", "what", "ms", "ms_min", "MB", "vs", "x_time", "x_time_min", "x_MB", "x_time_vs_I",
                               "x_time_min_vs_I", "x_MB_vs_I"]))
    save(args.out, rows, inference=inference, memory=memory, diagonal=diagonal, matmul_flops_per_second=throughput,
         batch=BATCH, hidden=HIDDEN, wide=WIDE, wide_batch=WIDE_BATCH)
    return rows


if __name__ == "__main__":
    main()
