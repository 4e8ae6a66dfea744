"""Throughput of the transition estimator's update against per-layer Gaussians on the same taps.

The transition estimator over taps ``(a, b)`` of width ``d`` each keeps the joint moments of the
concatenation: one ``[n, 2d]`` Gram per batch (``2 n (2d)²`` flops as a GEMM). The per-layer peer
is what a monitor does without it: one Gaussian per tap, two ``[n, d]`` Grams (``2 · 2 n d²``
flops), so the transition costs about twice the flops of the two per-layer Gaussians together.
Peers run in alternating rounds in one process (this machine's speed swings minute to minute);
the table reports medians, ratios, and the fraction of a large float32 matmul's throughput
measured in the same process.

Run: ``python benchmarks/bench_transition.py`` (``--quick`` for a seconds-long smoke test).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmon


def _time(fn, reps: int) -> float:
    jax.block_until_ready(fn())  # compiled and warm
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def matmul_peak(n: int, reps: int) -> float:
    """FLOP/s of a large float32 matmul (the machine's practical peak for this process)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / _time(lambda: f(x), reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    args = ap.parse_args()
    dims = (64,) if args.quick else (256, 768)
    n = 512 if args.quick else 4096
    rounds, reps = (1, 2) if args.quick else (5, 5)

    peak_n = 512 if args.quick else 2048
    # The peak is re-measured in every round (alternating with the peers); the best is kept.
    peaks = [matmul_peak(peak_n, reps)]
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); python {platform.python_version()}, "
        f"jax {jax.__version__}, numpy {np.__version__}"
    )
    rows = []
    header = (
        "| d per tap | transition rows/s | 2 per-layer gaussians rows/s | ratio (transition / "
        "gaussians) | transition % of matmul peak | gaussians % of matmul peak |"
    )
    for d in dims:
        rng = np.random.default_rng(d)
        xa = jnp.asarray(rng.standard_normal((n, d)) + 5, jnp.float32)
        xb = jnp.asarray(rng.standard_normal((n, d)) - 3, jnp.float32)
        ex = jax.ShapeDtypeStruct((d,), jnp.float32)
        tr, g = jaxmon.transition(ridge=1e-3), jaxmon.gaussian()
        st, sa, sb = tr.init((ex, ex)), g.init(ex), g.init(ex)
        run_t = lambda: tr.update(st, (xa, xb))
        run_g = lambda: (g.update(sa, xa), g.update(sb, xb))
        times_t, times_g = [], []
        for _ in range(rounds):
            times_t.append(_time(run_t, reps))
            times_g.append(_time(run_g, reps))
            peaks.append(matmul_peak(peak_n, reps))
        rows.append((d, statistics.median(times_t), statistics.median(times_g)))
    peak = max(peaks)
    print(
        f"float32 matmul peak (best of {len(peaks)} measurements, {peak_n}^3): "
        f"{peak / 1e9:.0f} GFLOP/s; batch {n} rows; {rounds} alternating rounds x {reps} reps, "
        "medians\n"
    )
    print(header)
    print("|" + "---|" * 6)
    for d, tt, tg in rows:
        flops_t, flops_g = 2 * n * (2 * d) ** 2, 2 * 2 * n * d**2
        print(
            f"| {d} | {n / tt:,.0f} | {n / tg:,.0f} | {tg / tt:.2f} | "
            f"{100 * flops_t / tt / peak:.0f}% | {100 * flops_g / tg / peak:.0f}% |"
        )
    print(
        "\nNote: the machine is shared and its speed swings 2-3x; compare ratios, not absolute "
        "rows/s. The transition update does ~2x the Gram flops of two per-layer Gaussians."
    )


if __name__ == "__main__":
    main()
