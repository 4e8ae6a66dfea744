"""Scoring throughput: jaxmon's whitening scores on float32 and bf16 rows, against peers.

For each d, in alternating rounds in one process: ``jaxmon.gaussian().score`` on float32 rows
(the float32 path), on bf16 rows (``precision="auto"``: bf16 matmul operands, float32
accumulation), and on bf16 rows with ``precision="float32"`` (how bf16 rows were scored before
issue 15); numpy and PyTorch CPU computing ``|(x − μ) Wᵀ|²`` (float32, and bf16 for torch);
scikit-learn's ``EmpiricalCovariance.mahalanobis``. Then ``pca_residual`` (rank 64) and
``transition`` (a d→d map) on float32 and bf16 rows. Prints rows/s, ratios, and the fraction of
this machine's measured f32 and bf16 matmul peaks (counting 2·d² flops per row for the
Gaussian, 4·d·rank for PCA, 4·d² for the transition).

    python benchmarks/bench_score.py             # 65,536 query rows, d in {768, 1024}
    python benchmarks/bench_score.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _common import alternating, machine
from _peaks import Peaks
from sklearn.covariance import EmpiricalCovariance

import jaxmon

F32_IN = "jaxmon gaussian, f32 rows"
BF16_IN = "jaxmon gaussian, bf16 rows (auto)"


def _speedup(times, rows, a: str, b: str) -> float:
    """Median over rounds of rows/s of ``a`` over rows/s of ``b``."""
    per = [(rows[a] / ta) / (rows[b] / tb) for ta, tb in zip(times[a], times[b], strict=True)]
    return statistics.median(per)


def _table(times, rows, flops_per_row, ref: str, peaks: Peaks) -> None:
    for k, ts in times.items():
        rps = rows[k] / statistics.median(ts)
        gf = flops_per_row[k] * rps / 1e9
        r = "" if k == ref else f"{_speedup(times, rows, k, ref):8.2f}"
        p32, p16 = 100 * gf / peaks.best32, 100 * gf / peaks.best16
        print(f"  {k:<46} {rps:10,.0f} {r:>8} {p32:8.0f}% {p16:9.0f}%")


def _header(ref: str) -> None:
    hdr = f"  {'impl':<46} {'rows/s':>10} {'× ref':>8} {'% f32 pk':>9} {'% bf16 pk':>10}"
    print(hdr + f"   (ref = {ref})")
    print("  " + "-" * (len(hdr) - 2))


def bench_gaussian(a, d, rng, peaks: Peaks, torch) -> dict:
    nb = a.rows // a.batch
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    train = (rng.standard_normal((4 * d, d)) @ mix + 2.0).astype(np.float32)
    est = jaxmon.gaussian(shrinkage="ledoit_wolf")
    old = jaxmon.gaussian(shrinkage="ledoit_wolf", precision="float32")
    fitted = est.finalize(est.update(est.init(train), jnp.asarray(train)))
    qs = [(rng.standard_normal((a.batch, d)) @ mix + 2.0).astype(np.float32) for _ in range(nb)]
    jq32 = [jnp.asarray(q) for q in qs]
    jq16 = [jnp.asarray(q, jnp.bfloat16) for q in qs]
    mean = np.asarray(fitted.mean)
    white = np.asarray(fitted.whitener)
    skl = EmpiricalCovariance().fit(train.astype(np.float64))
    skl.covariance_, skl.location_ = np.asarray(fitted.covariance, np.float64), mean
    skl.precision_ = np.linalg.inv(skl.covariance_)
    # Every route scores the same fitted Gaussian: check they agree first.
    want = skl.mahalanobis(qs[0][:256])
    for x in (jq32[0][:256], jq16[0][:256]):
        np.testing.assert_allclose(np.asarray(est.score(fitted, x)), want, rtol=5e-2)
    impls = {
        F32_IN: lambda: [est.score(fitted, q) for q in jq32],
        BF16_IN: lambda: [est.score(fitted, q) for q in jq16],
        "jaxmon gaussian, bf16 rows, precision=float32": lambda: [
            old.score(fitted, q) for q in jq16
        ],
        "numpy (x-μ) @ Wᵀ, f32": lambda: [np.sum(np.square((q - mean) @ white.T), -1) for q in qs],
    }
    sk_rows = max(1, nb // 4) * a.batch
    if torch is not None:
        tq32 = [torch.from_numpy(q) for q in qs]
        tq16 = [q.to(torch.bfloat16) for q in tq32]
        tm32, tw32 = torch.from_numpy(mean.copy()), torch.from_numpy(white.T.copy())
        tw16 = tw32.to(torch.bfloat16)

        def run_torch(tq, tw, low):
            out = []
            for q in tq:
                y = q.float() - tm32  # centred in float32, as jaxmon does
                z = (y.to(torch.bfloat16) if low else y) @ tw
                out.append(z.float().square().sum(-1))
            return out

        impls["torch (x-μ) @ Wᵀ, f32"] = lambda: run_torch(tq32, tw32, False)
        impls["torch (x-μ) @ Wᵀ, bf16 operands"] = lambda: run_torch(tq16, tw16, True)
    impls["sklearn EmpiricalCovariance.mahalanobis"] = lambda: [
        skl.mahalanobis(q) for q in qs[: max(1, nb // 4)]
    ]
    times = alternating(impls, a.rounds)
    peaks.sample()
    rows = {k: a.rows for k in impls}
    rows["sklearn EmpiricalCovariance.mahalanobis"] = sk_rows
    flops = {k: 2 * d * d for k in impls}
    return {
        "title": f"gaussian(shrinkage='ledoit_wolf').score, d={d}",
        "times": times,
        "rows": rows,
        "flops": flops,
        "ref": F32_IN,
        "d": d,
    }


def _report_gaussian(r: dict, peaks: Peaks) -> None:
    times, rows = r["times"], r["rows"]
    print(f"\n{r['title']}:")
    _header(F32_IN)
    _table(times, rows, r["flops"], F32_IN, peaks)
    print(
        f"  -> bf16 rows (auto) vs f32 rows: {_speedup(times, rows, BF16_IN, F32_IN):.2f}x; "
        f"vs bf16 rows scored in f32: "
        f"{_speedup(times, rows, BF16_IN, 'jaxmon gaussian, bf16 rows, precision=float32'):.2f}x"
    )


def bench_others(a, d, rng, peaks: Peaks) -> dict:
    nb = a.rows // a.batch
    rank = 64
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    train = (rng.standard_normal((4 * d, d)) @ mix + 2.0).astype(np.float32)
    qs = [(rng.standard_normal((a.batch, d)) @ mix + 2.0).astype(np.float32) for _ in range(nb)]
    pca = jaxmon.pca_residual(rank=rank)
    pf = pca.finalize(pca.update(pca.init(train), jnp.asarray(train)))
    tr = jaxmon.transition()
    amap = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
    pair = (jnp.asarray(train), jnp.asarray(train @ amap + 1.0))
    tf = tr.finalize(tr.update(tr.init(pair), pair))
    q32 = [jnp.asarray(q) for q in qs]
    q16 = [jnp.asarray(q, jnp.bfloat16) for q in qs]
    p32 = [(q, q @ jnp.asarray(amap) + 1.0) for q in q32]
    p16 = [(a_.astype(jnp.bfloat16), b_.astype(jnp.bfloat16)) for a_, b_ in p32]
    impls = {
        "pca_residual(rank=64), f32 rows": lambda: [pca.score(pf, q) for q in q32],
        "pca_residual(rank=64), bf16 rows (auto)": lambda: [pca.score(pf, q) for q in q16],
        "transition, f32 pairs": lambda: [tr.score(tf, p) for p in p32],
        "transition, bf16 pairs (auto)": lambda: [tr.score(tf, p) for p in p16],
    }
    times = alternating(impls, a.rounds)
    peaks.sample()
    rows = {k: a.rows for k in impls}
    flops = {k: (4 * d * rank if k.startswith("pca") else 4 * d * d) for k in impls}
    return {"times": times, "rows": rows, "flops": flops, "d": d}


def _report_others(r: dict, peaks: Peaks) -> None:
    print(f"\npca_residual and transition, d={r['d']}:")
    _header("the same estimator on f32 rows")
    for base in ("pca_residual(rank=64)", "transition"):
        sub = {k: v for k, v in r["times"].items() if k.startswith(base)}
        ref = next(iter(sub))
        _table(sub, r["rows"], r["flops"], ref, peaks)


def bench_shared(a, d, rng, peaks: Peaks) -> dict:
    """A monitor with two matmul keys on one tap: one shared centred block vs each key alone."""
    nb = a.rows // a.batch
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    train = (rng.standard_normal((4 * d, d)) @ mix + 2.0).astype(np.float32)
    dets = {"g": jaxmon.gaussian(shrinkage="ledoit_wolf"), "p": jaxmon.pca_residual(rank=64)}
    mon = jaxmon.monitor({"h": dets})
    fit = mon.finalize(mon.update(mon.init({"h": train[:1]}), {"h": jnp.asarray(train)}))
    qs = [
        jnp.asarray((rng.standard_normal((a.batch, d)) @ mix + 2.0).astype(np.float32), dtype)
        for dtype in (jnp.bfloat16, jnp.float32)
        for _ in range(nb)
    ]
    q16, q32 = qs[:nb], qs[nb:]

    @jax.jit
    def per_key(fit, x):  # what the monitor did before issue 15: each key centres the rows
        return {f"h:{k}": e.score(fit[f"h:{k}"], x) for k, e in dets.items()}

    impls = {
        "monitor, bf16 rows (shared centred block)": lambda: [
            mon.score(fit, {"h": q}) for q in q16
        ],
        "each key alone, bf16 rows": lambda: [per_key(fit, q) for q in q16],
        "monitor, f32 rows": lambda: [mon.score(fit, {"h": q}) for q in q32],
        "each key alone, f32 rows": lambda: [per_key(fit, q) for q in q32],
    }
    times = alternating(impls, a.rounds)
    peaks.sample()
    rows = {k: a.rows for k in impls}
    flops = {k: 2 * d * d + 4 * d * 64 for k in impls}
    return {"times": times, "rows": rows, "flops": flops, "d": d}


def _report_shared(r: dict, peaks: Peaks) -> None:
    print(f"\nmonitor {{'h': {{gaussian, pca_residual(rank=64)}}}} on one tap, d={r['d']}:")
    _header("each key alone, on the same rows")
    for dt in ("bf16", "f32"):
        sub = {
            k: v for k, v in r["times"].items() if k.endswith(f"{dt} rows") or f"{dt} rows " in k
        }
        ref = next(k for k in sub if k.startswith("each key"))
        _table(sub, r["rows"], r["flops"], ref, peaks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=65_536)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--dims", type=int, nargs="+", default=[768, 1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--others", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rows, a.dims, a.rounds = 16_384, [128], 2
    try:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
    except ImportError:
        torch = None
    print(machine())
    print(f"{a.rows:,} query rows per pass, batches of {a.batch}, {a.rounds} alternating rounds")
    peaks = Peaks()
    rng = np.random.default_rng(0)
    results = []
    for d in a.dims:
        results.append((_report_gaussian, bench_gaussian(a, d, rng, peaks, torch)))
        if a.others:
            results.append((_report_others, bench_others(a, d, rng, peaks)))
            results.append((_report_shared, bench_shared(a, d, rng, peaks)))
    print(peaks.line())
    for report, r in results:
        report(r, peaks)
    print(
        "\n'× ref' = median over rounds of the per-round rows/s ratio to the reference "
        "(>1 = faster). The machine is shared: read the ratios."
    )
    jax.clear_caches()


if __name__ == "__main__":
    main()
