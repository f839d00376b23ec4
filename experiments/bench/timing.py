"""Timing helpers shared by the benchmarks: compile first, then the median of several runs."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax


def machine() -> dict:
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform, "n_devices": jax.device_count(),
            "cpu": platform.processor() or platform.machine(), "jax": jax.__version__}


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages (what `uptime` prints), e.g. "1.52 1.20 0.98": other
    processes on the cores, to be reported beside every time measured on a shared machine."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def time_call(fn, *args, reps: int = 5) -> float:
    """Median seconds of fn(*args) after one compiling call; blocks on the result."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, *args, reps: int = 7) -> dict:
    """{name: (median s, min s)} of each fn(*args), compiled first, then timed rep by rep in turn."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def compiled_cost(compiled) -> dict:
    """flops and bytes accessed from XLA's cost analysis of a compiled function (a dict, or a list of them)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {"flops": float(analysis.get("flops", float("nan"))),
            "bytes": float(analysis.get("bytes accessed", float("nan")))}


def compiled_megabytes(compiled) -> float:
    """XLA's compiled memory of a compiled function: temporaries + arguments + outputs, MB."""
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20


def matmul_flops_per_second(n: int = 2048) -> float:
    """Measured float32 matmul throughput of the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda a: a @ a)
    return 2 * n**3 / time_call(mm, a)


def save(path: str | Path, rows: list[dict], **meta) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **meta, "rows": rows}, indent=2) + "\n")


def table(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
