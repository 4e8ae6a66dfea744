"""kNN scoring throughput: bf16 candidate matmuls + exact float32 re-rank against float32.

``jaxmon.knn`` (``precision="auto"``: bf16 distance matmuls, an exact float32 re-rank of
``k'`` candidates, proven by an error bound) against the same estimator with
``precision="float32"`` (float32 matmuls throughout: the route before issue 15), PyTorch CPU
(``torch.cdist`` + ``topk``, float32) and PyOD's ``KNN`` on the same bank, in alternating
rounds in one process. Prints rows/s, ratios, the fraction of the measured f32 and bf16 matmul
peaks (counting 2·d flops per query-bank pair) and checks that every k-th distance equals the
float32 route's bit for bit.

    python benchmarks/bench_knn.py             # d=384, bank 8192, k=10, 16,384 queries
    python benchmarks/bench_knn.py --quick
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _common import alternating, machine, ratio
from _peaks import Peaks

import jaxmon


def normal_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Correlated Gaussian rows with mean 3 (as the tests' law suite draws them), float32."""
    mix = np.random.default_rng(1).standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    return (rng.standard_normal((n, d)) @ mix + 3.0).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--bank", type=int, default=8192)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=16_384)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.d, a.bank, a.queries, a.rounds = 64, 1024, 2048, 2
    print(machine())
    peaks = Peaks()
    rng = np.random.default_rng(0)
    d, k = a.d, a.k
    train = normal_rows(rng, 4 * a.bank, d)
    queries = normal_rows(rng, a.queries, d)
    fast = jaxmon.knn(k=k, bank_size=a.bank)
    slow = jaxmon.knn(k=k, bank_size=a.bank, precision="float32")
    state = fast.update(fast.init(jax.ShapeDtypeStruct((d,), jnp.float32)), jnp.asarray(train))
    fitted = fast.finalize(state)
    q = jnp.asarray(queries)
    got = np.asarray(fast.score(fitted, q))
    want = np.asarray(slow.score(fitted, q))
    equal = float(np.mean(got == want))
    print(
        f"d={d}, bank {a.bank}, k={k}, {a.queries:,} queries (correlated Gaussian rows, mean 3), "
        f"{a.rounds} alternating rounds; k-th distances equal to the float32 route's: "
        f"{100 * equal:.2f}% (max rel diff {np.max(np.abs(got - want) / want):.1e})\n"
    )
    impls = {
        "jaxmon knn (auto: bf16 + exact re-rank)": lambda: fast.score(fitted, q),
        "jaxmon knn (precision='float32')": lambda: slow.score(fitted, q),
    }
    rows = {k_: a.queries for k_ in impls}
    bank = np.asarray(state.rows)[np.asarray(state.filled)]
    if a.peers:
        try:
            import torch

            tb, tq = torch.from_numpy(bank), torch.from_numpy(queries)

            def run_torch():
                out = []
                for i in range(0, len(tq), 1024):
                    dist = torch.cdist(tq[i : i + 1024], tb)
                    out.append(dist.topk(k, largest=False).values[:, -1])
                return torch.cat(out)

            impls["torch cdist + topk (f32)"] = run_torch
            rows["torch cdist + topk (f32)"] = a.queries
        except ImportError:
            pass
        try:
            from pyod.models.knn import KNN

            peer = KNN(n_neighbors=k, method="largest").fit(bank)
            sub = queries[: max(1024, a.queries // 4)]
            impls["pyod KNN (largest)"] = lambda: peer.decision_function(sub)
            rows["pyod KNN (largest)"] = len(sub)
        except ImportError:
            pass
    times = alternating(impls, a.rounds)
    peaks.sample()
    print(peaks.line())
    peak32, peak16 = peaks.best32, peaks.best16
    hdr = f"{'impl':<42} {'rows/s':>10} {'auto ×':>8} {'% f32 pk':>9} {'% bf16 pk':>10}"
    print(hdr)
    print("-" * len(hdr))
    first = next(iter(impls))
    for name, ts in times.items():
        rps = rows[name] / statistics.median(ts)
        gf = 2 * d * a.bank * rps / 1e9
        r = "" if name == first else f"{_speedup(times, rows, first, name):8.2f}"
        print(f"{name:<42} {rps:10,.0f} {r:>8} {100 * gf / peak32:8.0f}% {100 * gf / peak16:9.0f}%")
    print(
        f"\n'auto ×' = median over rounds of (auto rows/s) / (peer rows/s); float32 route vs "
        f"auto: {ratio(times, first, 'jaxmon knn (precision=' + repr('float32') + ')'):.2f}x"
    )


def _speedup(times, rows, a: str, b: str) -> float:
    per = [(rows[a] / ta) / (rows[b] / tb) for ta, tb in zip(times[a], times[b], strict=True)]
    return statistics.median(per)


if __name__ == "__main__":
    main()
