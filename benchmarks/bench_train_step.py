"""Train-step cost of a jaxmon monitor: the NNX example LM with and without it.

Measures, in one process and in alternating rounds (this machine's speed drifts), the jitted
train step of ``examples/train_nnx.py`` (a pre-LN transformer LM, AdamW) at d >= 256:

* ``plain``: the train step without the monitor (taps are still captured: they are free
  under jit, XLA drops unused outputs);
* ``resid``: plus ``jaxmon.monitor({"blocks/*/resid": gaussian()})`` updated every step
  (``every_k`` = 1): every block's residual stream, the issue's target (<= 5% overhead);
* ``resid+mlp``: residual stream and MLP output of every block (2 taps per block).

Memory added = bytes of the monitor state (it lives on device between steps) plus the
difference in XLA's temporary buffer size of the compiled step.

Run: ``python benchmarks/bench_train_step.py`` (``--quick`` for a seconds-long smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
import train_nnx
from _common import machine, matmul_peak


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _temp_bytes(fn, *args) -> int | None:
    try:
        mem = fn.lower(*args).compile().memory_analysis()
        return int(mem.temp_size_in_bytes)
    except Exception:  # memory_analysis is backend-dependent
        return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps-per-round", type=int, default=5)
    a = p.parse_args(argv)
    if a.quick:
        a.d, a.layers, a.seq, a.batch, a.rounds, a.steps_per_round = 64, 2, 32, 4, 3, 2
    print(machine())
    peak = matmul_peak(n=1024 if a.quick else 2048)
    print(f"f32 matmul peak here: {peak:.0f} GFLOP/s")

    base = [
        f"--d={a.d}",
        f"--layers={a.layers}",
        f"--seq={a.seq}",
        f"--batch={a.batch}",
        "--heads=4",
        "--vocab=256",
    ]
    configs = {"plain": "blocks/*/resid", "resid": "blocks/*/resid", "resid+mlp": "blocks/*"}
    rng = np.random.default_rng(0)
    chain = train_nnx.make_chain(rng, 256)
    data = train_nnx.markov_batches(rng, 256, a.batch, a.seq, chain)
    batches = [next(data) for _ in range(4)]

    runners, info = {}, {}
    for name, pattern in configs.items():
        args = train_nnx.parse([*base, f"--taps={pattern}"])
        state, _, mstate, train_step, _ = train_nnx.build(args)
        params = sum(x.size for x in jax.tree.leaves(state))
        monitored = name != "plain"
        holder = {"state": state, "m": mstate}
        tokens, valid = batches[0]
        temp = None if a.quick else _temp_bytes(train_step, state, mstate, tokens, valid, monitored)
        info[name] = {"state_bytes": _nbytes(mstate) if monitored else 0, "temp": temp}

        def run(holder=holder, train_step=train_step, monitored=monitored):
            for i in range(a.steps_per_round):
                tokens, valid = batches[i % len(batches)]
                holder["state"], holder["m"], loss = train_step(
                    holder["state"], holder["m"], tokens, valid, monitored=monitored
                )
            return loss

        runners[name] = run

    for f in runners.values():  # compile + warm up
        jax.block_until_ready(f())
    times = {k: [] for k in runners}
    for r in range(a.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for k in order:
            t = time.perf_counter()
            jax.block_until_ready(runners[k]())
            times[k].append((time.perf_counter() - t) / a.steps_per_round)

    tokens_per_step = a.batch * a.seq
    print(
        f"\nNNX LM d={a.d}, layers={a.layers}, seq={a.seq}, batch={a.batch} "
        f"({tokens_per_step} tokens/step), every_k=1, {a.rounds} alternating rounds x "
        f"{a.steps_per_round} steps; state leaves (model+AdamW): {params / 1e6:.1f}M"
    )
    print(
        f"{'config':10s} {'taps':>5s} {'ms/step':>9s} {'overhead':>9s} {'(IQR)':>16s} "
        f"{'monitor state':>14s} {'XLA temp +':>11s}"
    )
    base_t = times["plain"]
    for k in runners:
        med = statistics.median(times[k]) * 1e3
        ratios = sorted(t / b for t, b in zip(times[k], base_t, strict=True))
        q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
        ntaps = 0 if k == "plain" else a.layers * (2 if k == "resid+mlp" else 1)
        st = info[k]["state_bytes"] / 2**20
        tb, t0 = info[k]["temp"], info["plain"]["temp"]
        dtemp = "n/a" if tb is None or t0 is None else f"{(tb - t0) / 2**20:+.1f} MiB"
        print(
            f"{k:10s} {ntaps:5d} {med:9.2f} {100 * (q2 - 1):+8.1f}% "
            f"[{100 * (q1 - 1):+.1f}, {100 * (q3 - 1):+.1f}]% {st:11.2f} MiB {dtemp:>11s}"
        )
    print(
        "overhead = median over rounds of t(config)/t(plain) - 1 (same process, alternating); "
        "the machine is shared and noisy."
    )


if __name__ == "__main__":
    main()
