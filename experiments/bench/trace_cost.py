"""What does an exact trace cost against DSM as d grows? ISM loss + parameter gradient, measured.

An MLP energy f_θ (3 hidden layers of 128, softplus), batch 256. Each method computes
one training step's loss and its gradient with respect to θ:

  forward          exact ISM of the energy, `jsm.objectives.ism_energy(f, xs)` (the default "auto"):
                   one second-order forward jet of f, the batch folded into its matrix products
  jacfwd, jacrev   exact ISM, 1/2 |∇f|² - Δf, by `ism_energy(f, xs, method=...)`
  score_of         exact ISM of the score as an opaque vector field, `ism(jsm.score_of(f), xs)`:
                   a first-order jet of -∇f's graph (what the energy path saves)
  folx             exact ISM with folx's forward Laplacian (peer; skipped if not installed)
  hutchinson       ISM with a one-probe Hutchinson ESTIMATE of Δf
  ssm              sliced score matching, one projection
  dsm              denoising score matching

A second table does the same for a score NETWORK s_θ: (d,) -> (d,) (ISM with
tr ∂s/∂x by "forward", "jacfwd" and "jacrev"): the measurements behind `method="auto"`.

Reported: milliseconds per step, the ratio to DSM, and the ratio to a FLOP lower bound
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
from timing import matmul_flops_per_second, save, table, time_call

HIDDEN, BATCH = (128, 128, 128), 256


def folx_laplacian(energy):
    try:
        import folx
    except ImportError:
        return None
    return lambda x: folx.forward_laplacian(energy)(x).laplacian


def losses(apply, d: int):
    score = lambda p: (lambda x: -jax.grad(lambda y: apply(p, y))(x))
    out = {
        "forward": lambda p, k, xs: objectives.ism_energy(lambda x: apply(p, x), xs, method="forward"),
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


EXACT = ("forward", "jacfwd", "jacrev", "score_of", "folx")


def lower_bound_flops(d: int, h: int = 128) -> float:
    value = 2 * BATCH * (d * h + 2 * h * h + h)
    jacobian = 2 * BATCH * d * 2 * h * h
    return 3 * (value + jacobian)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="2,8,32,128,512")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--score-net-dims", default="2,8,32,128",
                        help="dimensions of the score-network table ('' to skip it)")
    parser.add_argument("--out", default="runs/bench/trace_cost.json")
    args = parser.parse_args(argv)
    throughput = matmul_flops_per_second()
    rows = []
    key = jax.random.key(1)
    for d in map(int, args.dims.split(",")):
        apply, params = nets.pure(nets.MLPEnergy(d, HIDDEN, rngs=nnx.Rngs(0)))
        xs = jax.random.normal(jax.random.key(0), (BATCH, d))
        times = {name: time_call(jax.jit(jax.value_and_grad(loss)), params, key, xs, reps=args.reps)
                 for name, loss in losses(apply, d).items()}
        bound = lower_bound_flops(d) / throughput
        for name, t in times.items():
            rows.append({"net": "energy", "d": d, "method": name, "ms": 1e3 * t, "x_dsm": t / times["dsm"],
                         "x_jacfwd": t / times["jacfwd"],
                         "x_flop_bound": t / bound if name in EXACT else float("nan")})
        print(f"d={d}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in times.items()), flush=True)
    for d in (map(int, args.score_net_dims.split(",")) if args.score_net_dims else ()):
        apply, params = nets.pure(nets.MLPScore(d, HIDDEN, rngs=nnx.Rngs(0)))
        xs = jax.random.normal(jax.random.key(0), (BATCH, d))
        times = {name: time_call(jax.jit(jax.value_and_grad(loss)), params, key, xs, reps=args.reps)
                 for name, loss in score_net_losses(apply).items()}
        for name, t in times.items():
            rows.append({"net": "score", "d": d, "method": name, "ms": 1e3 * t, "x_jacfwd": t / times["jacfwd"],
                         "auto": name == scores.resolve_method("auto")})
    print("ISM loss + parameter gradient, MLP energy f_θ (score -∇f_θ):")
    print(table([r for r in rows if r["net"] == "energy"], ["d", "method", "ms", "x_dsm", "x_jacfwd", "x_flop_bound"]))
    if args.score_net_dims:
        print("\nISM loss + parameter gradient, score network s_θ:")
        print(table([r for r in rows if r["net"] == "score"], ["d", "method", "ms", "x_jacfwd", "auto"]))
    save(args.out, rows, matmul_flops_per_second=throughput, batch=BATCH, hidden=HIDDEN)
    return rows


if __name__ == "__main__":
    main()
