"""Sketch and bank throughput: Frequent Directions updates against a numpy FD, and kNN scoring
against PyOD's KNN on the same bank with the same k.

Each pair runs in the same process in alternating rounds (this machine's speed drifts 2-3×
minute to minute: the ratios are what to read). Prints rows/s, jaxmon's speed ratio (>1 =
jaxmon faster) and the fraction of the measured float32 matmul peak.

FD flops are counted as the Gram-route shrink does them: per ℓ rows, the (2ℓ)×(2ℓ) Gram
(8ℓ²d) and the projection back (4ℓ²d), i.e. 12ℓd per row. kNN flops: 2·d per query-bank pair.

    python benchmarks/bench_sketches.py            # d=1024 FD (ℓ=64); kNN d=256, bank 8192
    python benchmarks/bench_sketches.py --quick
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _common import alternating, machine, matmul_peak, ratio

import jaxmon


class NumpyFD:
    """A straightforward numpy Frequent Directions (Liberty 2013): a 2ℓ-row buffer filled by
    slices, shrunk with ``np.linalg.svd`` when full. No centring (jaxmon also centres)."""

    def __init__(self, d: int, ell: int):
        self.ell = ell
        self.buf = np.zeros((2 * ell, d), np.float32)
        self.used = 0

    def update(self, rows: np.ndarray) -> None:
        i = 0
        while i < len(rows):
            take = min(2 * self.ell - self.used, len(rows) - i)
            self.buf[self.used : self.used + take] = rows[i : i + take]
            self.used += take
            i += take
            if self.used == 2 * self.ell:
                self._shrink()

    def _shrink(self) -> None:
        _, s, vt = np.linalg.svd(self.buf, full_matrices=False)
        delta = s[self.ell - 1] ** 2
        keep = np.sqrt(np.maximum(s[: self.ell] ** 2 - delta, 0))
        self.buf[: self.ell] = keep[:, None] * vt[: self.ell]
        self.buf[self.ell :] = 0
        self.used = self.ell - 1


def bench_fd(a, peak: float) -> None:
    rng = np.random.default_rng(0)
    d, ell = a.fd_dim, a.ell
    nb = a.rows // a.batch
    scales = (0.97 ** np.arange(d)).astype(np.float32)
    batches = [
        (rng.standard_normal((a.batch, d)).astype(np.float32) * scales + 3.0) for _ in range(nb)
    ]
    jb = [jnp.asarray(b) for b in batches]
    est = jaxmon.frequent_directions(sketch_size=ell)

    def run_jax():
        s = est.init(jax.ShapeDtypeStruct((d,), jnp.float32))
        for b in jb:
            s = est.update(s, b)
        return s.sketch

    def run_numpy():
        fd = NumpyFD(d, ell)
        for b in batches:
            fd.update(b)
        return fd.buf

    times = alternating({"jaxmon": run_jax, "numpy": run_numpy}, a.rounds)
    rows = nb * a.batch
    print(f"\nFrequent Directions update: d={d}, ℓ={ell}, {rows:,} rows in batches of {a.batch}")
    print(f"{'impl':<34} {'rows/s':>12} {'jaxmon ×':>9} {'% f32 peak':>10}")
    for k, label in (
        ("jaxmon", "jaxmon.frequent_directions"),
        ("numpy", "numpy FD (np.linalg.svd)"),
    ):
        rps = rows / statistics.median(times[k])
        frac = rps * 12 * ell * d / 1e9 / peak
        rx = ratio(times, "jaxmon", k)
        print(f"{label:<34} {rps:>12,.0f} {rx:>9.2f} {100 * frac:>9.1f}%")
    # Accuracy of both against exact float64 (sanity: both are valid FD sketches).
    x = np.concatenate(batches).astype(np.float64)
    s = est.init(jax.ShapeDtypeStruct((d,), jnp.float32))
    for b in jb:
        s = est.update(s, b)
    c = (x - x.mean(0)).T @ (x - x.mean(0))
    b = np.asarray(s.sketch, np.float64)
    err = np.linalg.norm(c - b.T @ b, 2)
    bound = float(jaxmon.sketch_error_bound(s))
    print(
        f"jaxmon ‖C − BᵀB‖₂ = {err:.5g}, error_bound = {bound:.5g} (ratio {err / bound:.5f}; "
        f"float32 rounding allows ~1e-5·tr C = {1e-5 * np.trace(c):.3g}), ‖C‖₂ = "
        f"{np.linalg.norm(c, 2):.4g}"
    )


def bench_knn(a, peak: float) -> None:
    from pyod.models.knn import KNN

    rng = np.random.default_rng(1)
    d, k = a.knn_dim, a.k
    train = (rng.standard_normal((4 * a.bank, d)) + 2.0).astype(np.float32)
    queries = (rng.standard_normal((a.queries, d)) * 1.2 + 2.0).astype(np.float32)
    est = jaxmon.knn(k=k, bank_size=a.bank)
    s = est.update(est.init(train[0]), jnp.asarray(train))
    fitted = est.finalize(s)
    bank = np.asarray(s.rows)[np.asarray(s.filled)]
    peer = KNN(n_neighbors=k, method="largest").fit(bank)
    jq = jnp.asarray(queries)

    impls = {
        "jaxmon": lambda: est.score(fitted, jq),
        "pyod": lambda: peer.decision_function(queries),
    }
    times = alternating(impls, a.rounds)
    got = np.asarray(impls["jaxmon"]())
    want = impls["pyod"]()
    print(f"\nkNN scoring: d={d}, k={k}, bank {len(bank):,} rows, {a.queries:,} queries")
    print(f"max relative difference jaxmon vs PyOD: {np.max(np.abs(got - want) / want):.2e}")
    print(f"{'impl':<34} {'rows/s':>12} {'jaxmon ×':>9} {'% f32 peak':>10}")
    for key, label in (("jaxmon", "jaxmon.knn"), ("pyod", "pyod.models.knn.KNN")):
        rps = a.queries / statistics.median(times[key])
        frac = rps * 2 * len(bank) * d / 1e9 / peak
        print(f"{label:<34} {rps:>12,.0f} {ratio(times, 'jaxmon', key):>9.2f} {100 * frac:>9.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=65_536)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--fd-dim", type=int, default=1024)
    p.add_argument("--ell", type=int, default=64)
    p.add_argument("--knn-dim", type=int, default=256)
    p.add_argument("--bank", type=int, default=8192)
    p.add_argument("--queries", type=int, default=16_384)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rows, a.batch, a.fd_dim, a.ell = 8192, 2048, 256, 32
        a.bank, a.queries, a.knn_dim, a.rounds = 1024, 2048, 64, 2
    peak = matmul_peak(jnp.float32)
    print(machine())
    print(f"measured f32 matmul peak: {peak:.0f} GFLOP/s; {a.rounds} alternating rounds")
    bench_fd(a, peak)
    bench_knn(a, peak)


if __name__ == "__main__":
    main()
