"""How many Langevin chain-steps per second does `run_chains` sustain, against blackjax?

ULA and MALA on an 8-component 2-D Gaussian mixture (the Ring target, its log-density
a few dense products) and on an MLP energy in d = 64, at 1k and 16k chains. The peer
(blackjax, optional: `pip install blackjax`) runs MALA on the same mixture written the
obvious way (broadcast differences and a logsumexp), vmapped over chains inside a
jitted lax.scan, as its documentation does.

    python experiments/bench/chain_throughput.py --out runs/bench/chain_throughput.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import logsumexp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, table, time_call  # noqa: E402

import jsm  # noqa: E402
from jsm import nets, samplers, targets  # noqa: E402

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
    mlp_energy = lambda x: apply(params, x)
    problems = {
        "mixture d=2": (ring.score, ring.log_prob, 2),
        "MLP energy d=64": (jsm.score_of(mlp_energy), lambda x: -mlp_energy(x), 64),
    }
    rows = []
    key = jax.random.key(0)
    for n_chains in map(int, args.chains.split(",")):
        for problem, (score, log_prob, d) in problems.items():
            x0 = jax.random.normal(key, (n_chains, d))
            for name, kernel in (("ula", samplers.ula(score, STEP)), ("mala", samplers.mala(log_prob, STEP))):
                t = time_call(lambda k, x: samplers.run_chains(kernel, k, x, args.steps)[0].position, key, x0,
                              reps=args.reps)
                rows.append({"problem": problem, "chains": n_chains, "sampler": f"jsm {name}",
                             "chain_steps_per_s": n_chains * args.steps / t})
            if problem.startswith("mixture"):
                peer = blackjax_mala(obvious_mixture_log_prob(ring), args.steps)
                if peer is not None:
                    t = time_call(peer, key, x0, reps=args.reps)
                    rows.append({"problem": problem, "chains": n_chains, "sampler": "blackjax mala (obvious target)",
                                 "chain_steps_per_s": n_chains * args.steps / t})
            print(f"{n_chains} chains, {problem}: done", flush=True)
    print(table(rows, ["problem", "chains", "sampler", "chain_steps_per_s"]))
    save(args.out, rows, steps=args.steps, step_size=STEP)
    return rows


if __name__ == "__main__":
    main()
