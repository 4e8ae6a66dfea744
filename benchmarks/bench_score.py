"""Mahalanobis scoring throughput: jaxmon.gaussian().score against numpy and scikit-learn.

python benchmarks/bench_score.py             # 65,536 query rows, d in {768, 1024}
python benchmarks/bench_score.py --quick
"""

from __future__ import annotations

import argparse
import statistics

import jax.numpy as jnp
import numpy as np
from _common import alternating, machine, matmul_peak
from sklearn.covariance import EmpiricalCovariance

import jaxmon


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=65_536)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--dims", type=int, nargs="+", default=[768, 1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rows, a.dims, a.rounds = 16_384, [128], 2
    peak = matmul_peak(jnp.float32)
    print(machine())
    print(f"measured matmul peak: f32 {peak:.0f} GFLOP/s")
    print(f"{a.rows:,} query rows per pass, batches of {a.batch}, {a.rounds} alternating rounds\n")
    hdr = f"{'d':>5} {'impl':<36} {'rows/s':>12} {'jaxmon ×':>9} {'% peak':>7}"
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    nb = a.rows // a.batch
    for d in a.dims:
        mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
        train = (rng.standard_normal((4 * d, d)) @ mix + 2.0).astype(np.float32)
        est = jaxmon.gaussian(shrinkage="ledoit_wolf")
        fitted = est.finalize(est.update(est.init(train), jnp.asarray(train)))
        qs = [(rng.standard_normal((a.batch, d)) @ mix + 2.0).astype(np.float32) for _ in range(nb)]
        jq32 = [jnp.asarray(q) for q in qs]
        jq16 = [jnp.asarray(q, jnp.bfloat16) for q in qs]
        mean = np.asarray(fitted.mean)
        white = np.asarray(fitted.whitener)
        skl = EmpiricalCovariance().fit(train.astype(np.float64))
        skl.covariance_, skl.location_ = np.asarray(fitted.covariance, np.float64), mean
        skl.precision_ = np.linalg.inv(skl.covariance_)
        # Both peers score the same fitted Gaussian; check they agree with jaxmon first.
        want = skl.mahalanobis(qs[0][:256])
        got = np.asarray(est.score(fitted, jq32[0][:256]))
        np.testing.assert_allclose(got, want, rtol=1e-2)

        def run(jq):
            return [est.score(fitted, q) for q in jq]

        def run_numpy():
            return [np.sum(np.square((q - mean) @ white.T), -1) for q in qs]

        def run_sklearn():
            return [skl.mahalanobis(q) for q in qs[: max(1, nb // 4)]]

        impls = {
            "jaxmon score (f32 input)": lambda: run(jq32),
            "jaxmon score (bf16 input)": lambda: run(jq16),
            "numpy (x-μ) @ Wᵀ, f32": run_numpy,
            "sklearn EmpiricalCovariance.mahalanobis": run_sklearn,
        }
        times = alternating(impls, a.rounds)
        rows = {k: a.rows for k in impls}
        rows["sklearn EmpiricalCovariance.mahalanobis"] = max(1, nb // 4) * a.batch
        rps = {k: rows[k] / statistics.median(t) for k, t in times.items()}
        for k in impls:
            gf = 2 * d * d * rps[k] / 1e9
            r = "" if k.startswith("jaxmon") else f"{rps['jaxmon score (f32 input)'] / rps[k]:9.2f}"
            print(f"{d:>5} {k:<36} {rps[k]:12,.0f} {r:>9} {100 * gf / peak:6.0f}%")
    print("\n'jaxmon ×' = jaxmon (f32 input) rows/s / peer rows/s.")


if __name__ == "__main__":
    main()
