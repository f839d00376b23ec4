"""How many Langevin chain-steps per second does `run_chains` sustain, against blackjax?

ULA and MALA on an 8-component 2-D Gaussian mixture (the Ring target, its log-density
a few dense products) and on an MLP energy in d = 64 whose parameters are passed as
`args`, at 1k and 16k chains. Kernels are data: the column "rebuilt per call" times the
same sampler with its kernel built anew, with a new step size, before every call; it
reuses the compiled loop, so it should match the kernel built once (before kernels were
pytrees it recompiled every call: 1.6M against 5.4M chain-steps/s).
The peer (blackjax, optional: `pip install blackjax`) runs MALA on the same mixture
written the obvious way (broadcast differences and a logsumexp), vmapped over chains
inside a jitted lax.scan, as its documentation does; and the same blackjax kernel
under `run_chains` through `samplers.from_blackjax`.

    python experiments/bench/chain_throughput.py --out runs/bench/chain_throughput.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import logsumexp

from jsm import nets, samplers, targets
from timing import save, table, time_call

STEP = 0.05


def obvious_mixture_log_prob(t: targets.GaussianMixture):
    def log_prob(x):
        sq = jnp.sum((x[None, :] - t.means) ** 2, axis=-1)
        comp = jnp.log(t.weights / t.weights.sum()) - t.dim * jnp.log(t.scales) - 0.5 * sq / t.scales**2
        return logsumexp(comp) - 0.5 * t.dim * jnp.log(2 * jnp.pi)
    return log_prob


def blackjax_mala(log_prob, n_steps: int):
    try:
        import blackjax
    except ImportError:
        return None
    kernel = blackjax.mala(log_prob, STEP)

    @jax.jit
    def run(key, x0):
        state = jax.vmap(kernel.init)(x0)

        def body(state, k):
            keys = jax.random.split(k, x0.shape[0])
            state, _ = jax.vmap(kernel.step)(keys, state)
            return state, None

        state, _ = jax.lax.scan(body, state, jax.random.split(key, n_steps))
        return state.position

    return run


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
    new_steps = iter(STEP * (1.0 + 1e-3 * i) for i in range(10**6))
    for n_chains in map(int, args.chains.split(",")):
        for problem, (score, log_prob, d, kernel_args) in problems.items():
            x0 = jax.random.normal(key, (n_chains, d))

            def row(sampler: str, fn, **extra) -> None:
                t = time_call(fn, key, x0, reps=args.reps)
                rows.append({"problem": problem, "chains": n_chains, "sampler": sampler,
                             "chain_steps_per_s": n_chains * args.steps / t, **extra})

            for name, make in (("ula", samplers.ula), ("mala", samplers.mala)):
                fn = score if name == "ula" else log_prob
                kernel = make(fn, STEP)
                # The same sampler, its kernel rebuilt with a new step size before every call.
                rebuilt = time_call(lambda k, x: samplers.run_chains(
                    make(fn, next(new_steps)), k, x, args.steps, args=kernel_args)[0].position, key, x0, reps=args.reps)
                row(f"jsm {name}",
                    lambda k, x: samplers.run_chains(kernel, k, x, args.steps, args=kernel_args)[0].position,
                    rebuilt_per_call_chain_steps_per_s=n_chains * args.steps / rebuilt)
            if problem.startswith("mixture"):
                peer = blackjax_mala(obvious_mixture_log_prob(ring), args.steps)
                if peer is not None:
                    import blackjax

                    row("blackjax mala (obvious target)", peer)
                    kernel = samplers.from_blackjax(blackjax.mala, obvious_mixture_log_prob(ring), step_size=STEP)
                    row("blackjax mala (obvious target) under jsm run_chains",
                        lambda k, x: samplers.run_chains(kernel, k, x, args.steps)[0].position)
            print(f"{n_chains} chains, {problem}: done", flush=True)
    print(table(rows, ["problem", "chains", "sampler", "chain_steps_per_s", "rebuilt_per_call_chain_steps_per_s"]))
    save(args.out, rows, steps=args.steps, step_size=STEP)
    return rows


if __name__ == "__main__":
    main()
