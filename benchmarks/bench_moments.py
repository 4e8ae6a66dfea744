"""Moments update throughput: jaxmon.gaussian().update against numpy, PyTorch and scikit-learn.

Streams ``--rows`` rows at each d through each implementation in alternating rounds and prints
rows/s, jaxmon's speed ratio against each peer (>1 = jaxmon faster) and the fraction of this
machine's measured f32 and bf16 matmul peaks (counting the Gram product as 2·n·d² flops). The
peer issue 15 names is a plain jitted centred Gram ``acc + (x − x̄)ᵀ(x − x̄)`` (no mask, no
exact merge, no fourth moments): the arithmetic floor of an exact update in XLA.

    python benchmarks/bench_moments.py            # 262,144 rows, d in {768, 1024}
    python benchmarks/bench_moments.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _common import alternating, machine, ratio
from _peaks import Peaks

import jaxmon


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=262_144)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--dims", type=int, nargs="+", default=[768, 1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rows, a.dims, a.rounds = 16_384, [256], 2
    try:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
    except ImportError:
        torch = None
    from sklearn.decomposition import IncrementalPCA

    print(machine())
    print(f"{a.rows:,} rows per pass, batches of {a.batch}, {a.rounds} alternating rounds")
    peaks = Peaks()
    lines = []
    rng = np.random.default_rng(0)
    nb = a.rows // a.batch
    for d in a.dims:
        base = rng.standard_normal((a.batch, d)).astype(np.float32) + 3.0
        np_batches = [base + np.float32(i * 1e-3) for i in range(nb)]
        for dtype in (jnp.float32, jnp.bfloat16):
            name = "f32" if dtype == jnp.float32 else "bf16"
            est = jaxmon.gaussian()
            jb = [jnp.asarray(b, dtype) for b in np_batches]

            def run_jaxmon(est=est, jb=jb, dtype=dtype, d=d):
                s = est.init(jax.ShapeDtypeStruct((d,), dtype))
                for b in jb:
                    s = est.update(s, b)
                return s

            impls = {"jaxmon gaussian().update": run_jaxmon}

            @jax.jit
            def centred_gram(acc, x):
                y = x - jnp.mean(x, 0, dtype=jnp.float32).astype(x.dtype)
                dims = (((0,), (0,)), ((), ()))
                return acc + jax.lax.dot_general(y, y, dims, preferred_element_type=jnp.float32)

            def run_plain(jb=jb, d=d, centred_gram=centred_gram):
                acc = jnp.zeros((d, d), jnp.float32)
                for b in jb:
                    acc = centred_gram(acc, b)
                return acc

            impls["jax acc + (x-x̄)ᵀ(x-x̄), jitted"] = run_plain
            if dtype == jnp.float32:

                def run_numpy(npb=np_batches, d=d):
                    acc = np.zeros((d, d), np.float32)
                    for b in npb:
                        acc += b.T @ b
                    return acc

                impls["numpy acc += X.T @ X"] = run_numpy
            if torch is not None:
                tdt = torch.float32 if dtype == jnp.float32 else torch.bfloat16
                tb = [torch.from_numpy(b).to(tdt) for b in np_batches]

                def run_torch(tb=tb, tdt=tdt, d=d):
                    acc = torch.zeros((d, d), dtype=tdt)
                    for b in tb:
                        acc.addmm_(b.T, b)
                    return acc

                impls[f"torch addmm_ ({name})"] = run_torch
            times = alternating(impls, a.rounds)
            peaks.sample()
            if dtype == jnp.float32:
                ipca_b = np_batches[: max(2, nb // 8)]  # SVD per batch: far slower, fewer rows

                def run_ipca(ipca_b=ipca_b):
                    m = IncrementalPCA(n_components=min(64, d))
                    for b in ipca_b:
                        m.partial_fit(b)
                    return m

                t_ipca = alternating({"ipca": run_ipca}, 1)["ipca"]
            jt = statistics.median(times["jaxmon gaussian().update"])
            for k, ts in times.items():
                t = statistics.median(ts)
                gf = 2 * a.rows * d * d / t / 1e9
                r = (
                    ""
                    if k.startswith("jaxmon")
                    else f"{ratio(times, 'jaxmon gaussian().update', k):9.2f}"
                )
                lines.append((d, name, k, a.rows / t, r, gf))
            if dtype == jnp.float32:
                n_ipca = len(ipca_b) * a.batch
                rps = n_ipca / statistics.median(t_ipca)
                lines.append(
                    (d, name, "sklearn IncrementalPCA", rps, f"{(a.rows / jt) / rps:9.2f}", None)
                )
    print(peaks.line() + "\n")
    hdr = (
        f"{'d':>5} {'input':>5} {'impl':<32} {'rows/s':>12} {'jaxmon ×':>9} "
        f"{'% f32 pk':>9} {'% bf16 pk':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    for d, name, k, rps, r, gf in lines:
        pk = (
            "" if gf is None else f"{100 * gf / peaks.best32:8.0f}% {100 * gf / peaks.best16:9.0f}%"
        )
        print(f"{d:>5} {name:>5} {k:<32} {rps:12,.0f} {r:>9} {pk}")
    print("\n'jaxmon ×' = median over rounds of peer time / jaxmon time (>1 = jaxmon faster);")
    print("jaxmon's update also excludes non-finite rows, keeps exact counts, the exact Chan merge")
    print("and the Ledoit-Wolf third/fourth-moment sums.")


if __name__ == "__main__":
    main()
