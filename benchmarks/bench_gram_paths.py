"""Every route to a float32 Gram ``XᵀX`` that jax offers on this CPU, against numpy's syrk.

Issue 2 asks the float32 moments update to beat numpy's ``acc += X.T @ X`` (OpenBLAS ssyrk,
half the flops of a GEMM). This benchmark measures, on one batch and in alternating rounds in
one process, the Gram product alone by each route, so the ceiling for any jaxmon update is
visible: if no route's bare Gram beats numpy, no update built on it can.

    python benchmarks/bench_gram_paths.py                 # n=8192, d=1024
    python benchmarks/bench_gram_paths.py --rows 16384 --dim 768

Routes (``eff GF/s`` counts 2·n·d² flops for each, so syrk and GEMM are comparable):

* numpy / torch float32: OpenBLAS ssyrk, oneDNN sgemm.
* XLA float32 ``[n,d]ᵀ[n,d]``: the dot jaxmon's float32 path uses (Eigen).
* XLA float32 upper triangle: four row panels of a ``[d,n]`` buffer (10/16 of the flops).
* XLA bf16 ``[d,n][d,n]ᵀ``: one pass on the AMX unit (XNNPACK/YNN), the bf16 path's Gram;
  it is *not* a float32 result, and is the floor of any bf16-split scheme.
* XLA bf16x3 split: ``x = h + m`` in bf16, ``G = HᵀH + HᵀM + MᵀH`` (two AMX GEMMs; what
  ``jax.lax.Precision.HIGH`` means on TPUs), about 1e-5 relative: below float32 accuracy.
* torch bf16: oneDNN's AMX GEMM, for the speed this CPU's matrix unit allows.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _common import alternating, machine, matmul_peak, ratio

from jaxmon_kernels.moments import _rows_minor

_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _gram_f32(y: jax.Array) -> jax.Array:
    return jax.lax.dot_general(y, y, _TN, preferred_element_type=jnp.float32)


def _gram_nt(yt: jax.Array) -> jax.Array:
    return jax.lax.dot_general(yt, yt, _NT, preferred_element_type=jnp.float32)


def _upper_panels(yt: jax.Array, panels: int = 4) -> list[jax.Array]:
    d = yt.shape[0]
    b = d // panels
    return [
        jax.lax.dot_general(
            yt[i * b : (i + 1) * b], yt[i * b :], _NT, preferred_element_type=jnp.float32
        )
        for i in range(panels)
    ]


def _split3(y: jax.Array) -> jax.Array:
    h = y.astype(jnp.bfloat16)
    m = (y - h.astype(jnp.float32)).astype(jnp.bfloat16)
    ht, mt = _rows_minor(h), _rows_minor(m)  # jaxmon's bf16 layout trick
    hm = jax.lax.dot_general(ht, mt, _NT, preferred_element_type=jnp.float32)
    return _gram_nt(ht) + hm + hm.T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    n, d = a.rows, a.dim
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    xt = np.ascontiguousarray(x.T)
    xj, xtj = jnp.asarray(x), jnp.asarray(xt)
    xtb = jnp.asarray(xt, jnp.bfloat16)
    f32 = jax.jit(_gram_f32)
    nt = jax.jit(_gram_nt)
    tri = jax.jit(_upper_panels)
    split = jax.jit(_split3)
    impls = {
        "numpy X.T @ X (ssyrk)": lambda: x.T @ x,
        "XLA f32 [n,d]^T[n,d]": lambda: f32(xj),
        "XLA f32 [d,n][d,n]^T": lambda: nt(xtj),
        "XLA f32 upper panels": lambda: tri(xtj),
        "XLA bf16 1 pass (AMX)": lambda: nt(xtb),
        "XLA bf16x3 split (2 GEMMs)": lambda: split(xj),
    }
    try:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        tx = torch.from_numpy(x)
        tbt = torch.from_numpy(xt).to(torch.bfloat16)
        impls["torch f32 X.T @ X"] = lambda: tx.T @ tx
        impls["torch bf16 (oneDNN AMX)"] = lambda: tbt @ tbt.T
    except ImportError:
        pass
    ref = x.astype(np.float64).T @ x.astype(np.float64)

    def rel_err(g: object) -> float:
        if isinstance(g, list):  # upper panels: rebuild the upper triangle
            b = d // len(g)
            full = np.zeros((d, d))
            for i, panel in enumerate(g):
                full[i * b : (i + 1) * b, i * b :] = np.asarray(panel)
            return float(np.abs(np.triu(full) - np.triu(ref)).max() / np.abs(ref).max())
        g = np.asarray(g.float() if hasattr(g, "float") else g, np.float64)
        return float(np.abs(g - ref).max() / np.abs(ref).max())

    errs = {k: rel_err(f()) for k, f in impls.items()}
    print(machine())
    print(
        f"measured matmul peak: f32 {matmul_peak(jnp.float32):.0f} GFLOP/s, "
        f"bf16 {matmul_peak(jnp.bfloat16):.0f} GFLOP/s"
    )
    print(f"one batch n={n:,} d={d}, {a.rounds} alternating rounds\n")
    times = alternating(impls, a.rounds)
    hdr = f"{'route':<28} {'ms':>8} {'eff GF/s':>9} {'vs numpy':>9} {'max rel err':>12}"
    print(hdr)
    print("-" * len(hdr))
    base = "numpy X.T @ X (ssyrk)"
    for k, ts in times.items():
        t = statistics.median(ts)
        r = ratio(times, k, base)
        print(f"{k:<28} {t * 1e3:8.1f} {2 * n * d * d / t / 1e9:9.0f} {r:9.2f} {errs[k]:12.1e}")
    print("\n'vs numpy' = numpy time / route time (median of per-round ratios; >1 = faster).")
    print("'max rel err' = max |G - G64| / max |G64| against a float64 numpy Gram.")


if __name__ == "__main__":
    main()
