"""How many Langevin chain-steps per second does `run_chains` sustain, against blackjax?

ULA and MALA on an 8-component 2-D Gaussian mixture (the Ring target) and on an MLP energy in
d = 64 whose parameters are passed as `args`, at 1k and 16k chains. Kernels are data: the
column "rebuilt per call" times the same sampler with its kernel built anew, with a new step
size, before every call; it reuses the compiled loop, so it should match the kernel built once
(before kernels were pytrees it recompiled every call: 1.6M against 5.4M chain-steps/s).

jsm MALA on the mixture is timed three more ways (columns): given the target's closed-form
pair, `mala(ring.log_prob, a, value_and_grad=ring.log_prob_and_score)`, and that kernel run
from an "rbg" and an "unsafe_rbg" key (`jax.random.key(0, impl=...)`) instead of threefry.

The peer (blackjax, optional: `pip install blackjax`) runs MALA on the same mixture written
the obvious way (broadcast differences and a logsumexp), vmapped over chains inside a jitted
lax.scan, as its documentation does; then the same kernel run from an "unsafe_rbg" key; given
the closed-form target `ring.log_prob` (blackjax takes a log-density only, and differentiates
it); compiled with the XLA options of jsm's chain loop (`jsm._jax_internals.CPU_LOOP_OPTIONS`, which keep
XLA:CPU's YNNPACK off the small reductions), to show what that option alone is worth; and
the obvious-target kernel under `run_chains` through `samplers.from_blackjax`.

    python experiments/bench/chain_throughput.py --out runs/bench/chain_throughput.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import logsumexp

from jsm import _jax_internals, nets, samplers, targets
from timing import save, table, time_call

STEP = 0.05


def obvious_mixture_log_prob(t: targets.GaussianMixture):
    def log_prob(x):
        sq = jnp.sum((x[None, :] - t.means) ** 2, axis=-1)
        comp = jnp.log(t.weights / t.weights.sum()) - t.dim * jnp.log(t.scales) - 0.5 * sq / t.scales**2
        return logsumexp(comp) - 0.5 * t.dim * jnp.log(2 * jnp.pi)
    return log_prob


def blackjax_mala(log_prob, n_steps: int, compiler_options: dict | None = None):
    try:
        import blackjax
    except ImportError:
        return None
    kernel = blackjax.mala(log_prob, STEP)

    def run(key, x0):
        state = jax.vmap(kernel.init)(x0)

        def body(state, k):
            keys = jax.random.split(k, x0.shape[0])
            state, _ = jax.vmap(kernel.step)(keys, state)
            return state, None

        state, _ = jax.lax.scan(body, state, jax.random.split(key, n_steps))
        return state.position

    return jax.jit(run, compiler_options=compiler_options)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", default="1000,16000")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/chain_throughput.json")
    args = parser.parse_args(argv)
    ring = targets.Ring(8, 2.0, 0.3)
    apply, params = nets.pure(nets.MLPEnergy(64, (128, 128), rngs=nnx.Rngs(0)))
    mlp_log_prob = lambda x, p: -apply(p, x)  # the parameters are data: args=(params,)
    problems = {
        "mixture d=2": (ring.score, ring.log_prob, 2, ()),
        "MLP energy d=64": (jax.grad(mlp_log_prob), mlp_log_prob, 64, (params,)),
    }
    rows = []
    key = jax.random.key(0)
    keys = {impl: jax.random.key(0, impl=impl) for impl in ("rbg", "unsafe_rbg")}
    new_steps = iter(STEP * (1.0 + 1e-3 * i) for i in range(10**6))
    for n_chains in map(int, args.chains.split(",")):
        for problem, (score, log_prob, d, kernel_args) in problems.items():
            x0 = jax.random.normal(key, (n_chains, d))
            rate = lambda fn, k=key: n_chains * args.steps / time_call(fn, k, x0, reps=args.reps)

            def row(sampler: str, fn, k=key, **extra) -> None:
                rows.append({"problem": problem, "chains": n_chains, "sampler": sampler,
                             "chain_steps_per_s": rate(fn, k), **extra})

            def run(kernel):
                return lambda k, x: samplers.run_chains(kernel, k, x, args.steps, args=kernel_args)[0].position

            for name, make in (("ula", samplers.ula), ("mala", samplers.mala)):
                fn = score if name == "ula" else log_prob
                # The same sampler, its kernel rebuilt with a new step size before every call.
                rebuilt = rate(lambda k, x: run(make(fn, next(new_steps)))(k, x))
                extra = {"rebuilt_per_call_chain_steps_per_s": rebuilt}
                if name == "mala" and problem.startswith("mixture"):
                    fused = run(samplers.mala(ring.log_prob, STEP, value_and_grad=ring.log_prob_and_score))
                    extra["log_prob_and_score"] = rate(fused)
                    for impl, k in keys.items():
                        extra[f"log_prob_and_score_{impl}_key"] = rate(fused, k)
                row(f"jsm {name}", run(make(fn, STEP)), **extra)
            if problem.startswith("mixture"):
                obvious = obvious_mixture_log_prob(ring)
                peer = blackjax_mala(obvious, args.steps)
                if peer is not None:
                    import blackjax

                    row("blackjax mala (obvious target)", peer)
                    row("blackjax mala (obvious target), unsafe_rbg key", peer, keys["unsafe_rbg"])
                    row("blackjax mala (closed-form target ring.log_prob)", blackjax_mala(ring.log_prob, args.steps))
                    row("blackjax mala (obvious target), jsm's XLA options",
                        blackjax_mala(obvious, args.steps, _jax_internals.CPU_LOOP_OPTIONS))
                    kernel = samplers.from_blackjax(blackjax.mala, obvious, step_size=STEP)
                    row("blackjax mala (obvious target) under jsm run_chains", run(kernel))
            print(f"{n_chains} chains, {problem}: done", flush=True)
    columns = ["problem", "chains", "sampler", "chain_steps_per_s", "rebuilt_per_call_chain_steps_per_s",
               "log_prob_and_score", "log_prob_and_score_rbg_key", "log_prob_and_score_unsafe_rbg_key"]
    print(table(rows, columns))
    for n_chains in map(int, args.chains.split(",")):
        at = {r["sampler"]: r for r in rows if r["chains"] == n_chains and r["problem"].startswith("mixture")}
        if "blackjax mala (obvious target)" in at:
            peer = at["blackjax mala (obvious target)"]["chain_steps_per_s"]
            mala = at["jsm mala"]
            print(f"{n_chains} chains, mixture: jsm mala / blackjax mala (obvious target) = "
                  f"{mala['chain_steps_per_s'] / peer:.2f} (autodiff), {mala['log_prob_and_score'] / peer:.2f} "
                  f"(log_prob_and_score)")
    save(args.out, rows, steps=args.steps, step_size=STEP)
    return rows


if __name__ == "__main__":
    main()
