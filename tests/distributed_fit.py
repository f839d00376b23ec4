"""A worker for the data-parallel and multi-host tests of `fit` (run as a script, never collected).

    python distributed_fit.py OUT RUN [RUN ...] [--kill-at STEP[:MOMENT]]

Each RUN is `devices:workdir:steps`: `fit` on a mesh over the first `devices` devices (0: no mesh,
one device), resuming from `workdir` ("-": none). With JSM_PROCESS=i/n/port the process first
joins an n-process JAX runtime on localhost (CPU collectives over gloo), and devices=all means every
device of every process. OUT gets the final parameters and EMA of each run (process 0 only).
With --kill-at, the process kills itself at that step and moment of its runs (tests/kill_at.py).
"""

import os
import sys

import jax

if os.environ.get("JSM_PROCESS"):
    pid, n, port = map(int, os.environ["JSM_PROCESS"].split("/"))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jsm  # noqa: E402
from jsm import nets, objectives  # noqa: E402

from kill_at import arm  # noqa: E402 - tests/, this script's folder

args = sys.argv[1:]
if "--kill-at" in args:
    i = args.index("--kill-at")
    arm(args[i + 1])
    del args[i : i + 2]

apply, params = nets.pure(nets.MLPScore(2, (16, 16), rngs=nnx.Rngs(0)))
data = jax.random.normal(jax.random.key(1), (256, 2)) * jnp.array([1.0, 0.3])
loss = lambda p, k, xs: objectives.dsm(lambda x: apply(p, x), k, xs, 0.5)
optimizer = optax.adam(1e-2)
out = {}
if len(jax.devices()) == 4:  # a batch that the mesh's data axis does not divide
    try:
        jsm.fit(loss, params, data, optimizer=optimizer, key=jax.random.key(0), steps=1, batch_size=6,
                mesh=jax.make_mesh((4,), ("data",)), progress=False)
    except ValueError as e:
        out["batch_error"] = np.asarray(str(e))
for i, spec in enumerate(args[1:]):
    devices, workdir, steps = spec.split(":")
    n_dev = len(jax.devices()) if devices == "all" else int(devices)
    mesh = jax.make_mesh((n_dev,), ("data",), devices=jax.devices()[:n_dev]) if n_dev else None
    r = jsm.fit(loss, params, data, optimizer=optimizer, key=jax.random.key(0), steps=int(steps), batch_size=64,
                workdir=None if workdir == "-" else workdir, checkpoint_every=20, log_every=10, progress=False,
                mesh=mesh, ema_decay=0.9, allow_changes=("mesh",))  # a checkpoint resumes on other meshes
    # Replicated: every device, in every process, holds the whole value.
    leaves = [np.asarray(x.addressable_shards[0].data) for x in jax.tree.leaves((r.params, r.ema_params))]
    out[f"run{i}"] = np.concatenate([x.ravel() for x in leaves])
    out[f"devices{i}"] = np.asarray(len(jax.tree.leaves(r.params)[0].sharding.device_set))
if jax.process_index() == 0:
    np.savez(args[0], **out)
