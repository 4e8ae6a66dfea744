"""Shared benchmark plumbing: machine description, matmul peak, alternating-round timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def machine() -> str:
    """One line: CPU model, cores, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = [f"jax {jax.__version__}", f"numpy {np.__version__}"]
    for mod in ("torch", "sklearn", "datasketches", "pyod"):
        try:
            m = __import__(mod)
            versions.append(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            pass
    return f"{cpu}, {os.cpu_count()} cores, {jax.devices()[0].platform}; " + ", ".join(versions)


def block(x):
    """Waits for jax arrays (and passes anything else through)."""
    return jax.block_until_ready(x)


def matmul_peak(dtype=jnp.float32, n: int = 2048, reps: int = 5) -> float:
    """This machine's measured dense matmul rate in GFLOP/s (best of ``reps``)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    block(f(a))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        block(f(a))
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def alternating(impls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Times each implementation once per round, in alternating order (the machine's speed
    drifts 2-3x minute to minute: ratios within a round are what is comparable)."""
    for f in impls.values():  # warm-up / compile
        block(f())
    times: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(rounds):
        order = list(impls) if r % 2 == 0 else list(reversed(impls))
        for k in order:
            t = time.perf_counter()
            block(impls[k]())
            times[k].append(time.perf_counter() - t)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time(b) / time(a): how many times faster ``a`` is than ``b``."""
    return statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))
