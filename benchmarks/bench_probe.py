"""Probes: update throughput against gaussian() (same Gram), and the cost of rank_detectors.

1. ``jaxmon.probe()`` (mean difference: a full d×d trusted state, a diagonal flagged one) and
   ``jaxmon.probe("lda")`` (two full states) against ``jaxmon.gaussian()`` at the same d, in
   alternating rounds, as rows/s, the ratio to gaussian() (~1 expected for the mean difference,
   ~0.5 for LDA: two Grams) and the fraction of this machine's matmul peak; scikit-learn's
   LinearDiscriminantAnalysis (one batch fit of the same rows) as the peer.
2. ``jaxmon.rank_detectors`` over ``--rank-tokens`` clean tokens and 2% flagged ones, for a
   monitor of ``--keys`` Gaussian keys: seconds for scoring, the AUROC bootstraps and the
   sequence aggregations, against scikit-learn's ``roc_auc_score`` once per key.

    python benchmarks/bench_probe.py             # d=1024, 262,144 rows; 1M tokens for ranking
    python benchmarks/bench_probe.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import alternating, machine, matmul_peak, ratio

import jaxmon


def _updates(a, peak32: float, peak16: float) -> None:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    rng = np.random.default_rng(0)
    d, nb = a.d, a.rows // a.batch
    base = rng.standard_normal((a.batch, d)).astype(np.float32) + 3.0
    labels = np.zeros(a.batch, np.int32)
    labels[:: max(1, a.batch // 20)] = 1  # ~20 flagged rows per batch
    hdr = f"{'input':>5} {'impl':<34} {'rows/s':>12} {'÷ gaussian':>10} {'% peak':>7}"
    print(hdr)
    print("-" * len(hdr))
    for dtype in (jnp.float32, jnp.bfloat16):
        name = "f32" if dtype == jnp.float32 else "bf16"
        batches = [jnp.asarray(base + np.float32(i * 1e-3), dtype) for i in range(nb)]
        lab = jnp.asarray(labels)
        ests = {
            "gaussian().update": (jaxmon.gaussian(), False),
            "probe().update (mean difference)": (jaxmon.probe(), True),
            'probe("lda").update': (jaxmon.probe("lda"), True),
        }

        def runner(est, labelled, dtype=dtype, batches=batches):
            def run():
                s = est.init(jax.ShapeDtypeStruct((d,), dtype))
                for b in batches:
                    s = est.update(s, b, labels=lab) if labelled else est.update(s, b)
                return s

            return run

        impls = {k: runner(*v) for k, v in ests.items()}
        times = alternating(impls, a.rounds)
        peak = peak32 if dtype == jnp.float32 else peak16
        for k, ts in times.items():
            t = statistics.median(ts)
            gf = 2 * a.rows * d * d / t / 1e9
            r = (
                ""
                if k.startswith("gaussian")
                else f"{1 / ratio(times, 'gaussian().update', k):10.2f}"
            )
            print(f"{name:>5} {k:<34} {a.rows / t:12,.0f} {r:>10} {100 * gf / peak:6.0f}%")
    x = np.concatenate([base + np.float32(i * 1e-3) for i in range(max(1, nb // 8))])
    y = np.tile(labels, max(1, nb // 8))
    t = time.perf_counter()
    LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, y)
    sk = len(x) / (time.perf_counter() - t)
    print(f"{'f32':>5} {'sklearn LDA(lsqr, auto).fit':<34} {sk:12,.0f} {'':>10} {'':>7}")
    print("(÷ gaussian = gaussian time / probe time, median over alternating rounds; the LDA")
    print(" probe keeps two full moment states, so two Grams per update)\n")


def _ranking(a) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    d, seq = 64, 128
    taps = [f"t{i}" for i in range(a.keys)]
    mon = jaxmon.monitor({"*": jaxmon.gaussian()})
    ex = {t: jax.ShapeDtypeStruct((d,), jnp.float32) for t in taps}
    fit = {t: jnp.asarray(rng.standard_normal((8192, d)), jnp.float32) for t in taps}
    f = mon.finalize(mon.update(mon.init(ex), fit))
    n_clean = a.rank_tokens // seq * seq
    n_flag = max(seq, (a.rank_tokens // 50) // seq * seq)
    clean = {t: rng.standard_normal((n_clean, d)).astype(np.float32) for t in taps}
    flagged = {t: (rng.standard_normal((n_flag, d)) + 0.3).astype(np.float32) for t in taps}
    ids = (np.arange(n_clean) // seq, np.arange(n_flag) // seq)
    t0 = time.perf_counter()
    ranked = jaxmon.rank_detectors(mon, f, clean, flagged, sequence_id=ids)
    t_rank = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc = mon.score(f, {t: jnp.asarray(v[:65536]) for t, v in clean.items()})
    jax.block_until_ready(sc)
    t_score = (time.perf_counter() - t0) * (n_clean + n_flag) / 65536
    t0 = time.perf_counter()
    y = np.r_[np.zeros(n_clean), np.ones(n_flag)]
    for t in taps:
        roc_auc_score(y, np.r_[clean[t][:, 0], flagged[t][:, 0]])
    t_sk = time.perf_counter() - t0
    print(
        f"rank_detectors: {a.keys} keys, {n_clean:,} clean + {n_flag:,} flagged tokens, "
        f"{len(ranked)} ranked entries (tokens + 3 sequence aggregations), 200 bootstraps each"
    )
    print(f"  total {t_rank:.1f}s; of which scoring ≈ {t_score:.1f}s")
    print(f"  scikit-learn roc_auc_score once per key (no interval): {t_sk:.2f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--rows", type=int, default=262_144)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rank-tokens", type=int, default=1_000_000)
    p.add_argument("--keys", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.d, a.rows, a.rounds, a.rank_tokens, a.keys = 256, 32_768, 2, 65_536, 2
    peak32, peak16 = matmul_peak(jnp.float32), matmul_peak(jnp.bfloat16)
    print(machine())
    print(f"measured matmul peak: f32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    print(f"d={a.d}, {a.rows:,} rows per pass, batches of {a.batch}, {a.rounds} rounds\n")
    _updates(a, peak32, peak16)
    _ranking(a)


if __name__ == "__main__":
    main()
