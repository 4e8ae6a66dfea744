"""Do bf16 matmul operands change what a monitor ranks as anomalous? Checked on a real store.

Scores every row of an activation store twice with the checkpoint's fitted monitor: once with
``precision="float32"`` and once with ``precision="bfloat16"`` set on every estimator that has
the knob (``gaussian``, ``pca_residual``, ``transition``, ``knn``), on the rows as stored (a bf16
store is what ``precision="auto"`` scores with bf16 operands). Prints, per score key, the
Spearman rank correlation of the two score vectors and the largest relative difference, and,
when the store has a ``label`` row column, the AUROC of each label against label 0 (clean) under
both precisions. Issue 15 asks for Spearman >= 0.999 per key and AUROCs equal within 0.001.

    python benchmarks/check_bf16_rankings.py runs/demo/store/query runs/demo/checkpoint

``--make-synthetic DIR`` first writes ``DIR/store`` and ``DIR/checkpoint`` with demo-like
statistics (4 blocks x {resid, mlp_out} taps of width 128, bf16, a power-law spectrum, a few
features whose mean dwarfs their spread, Student-t tails; the demo's detectors: Ledoit-Wolf
Gaussian, Frequent Directions PCA-residual, kNN, layer-to-layer transitions; labels 0 clean,
1 a planted shift along a low-variance direction, 2 a wider spread, 3 the clean law), so the
check can run without ``make demo``:

    python benchmarks/check_bf16_rankings.py --make-synthetic /tmp/b /tmp/b/store /tmp/b/checkpoint

Exit status 0 when every key meets both thresholds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import jaxmon
from jaxmon import metrics, query

KNOB = ("gaussian", "pca_residual", "transition", "knn")


def with_precision(spec: Any, precision: str) -> Any:
    """A copy of a spec dict with ``precision`` set on every estimator that has the knob."""
    spec = copy.deepcopy(spec)

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if node.get("name") in KNOB and isinstance(node.get("params"), dict):
                node["params"]["precision"] = precision
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return spec


def flat_scores(out: Any) -> dict[str, np.ndarray]:
    """A monitor's ``{key: scores}`` (or one estimator's scores, as key ``"score"``)."""
    if isinstance(out, Mapping):
        return {str(k): np.asarray(v).reshape(-1) for k, v in out.items()}
    return {"score": np.asarray(out).reshape(-1)}


def score_store_both(
    store_dir: str, ck: Any, *, block_rows: int, max_rows: int | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]:
    """Scores of every row under both precisions, and the ``label`` column if present."""
    store = query.open_store(store_dir)
    spec = ck.estimator.spec.to_dict()
    est32 = jaxmon.from_spec(with_precision(spec, "float32"))
    est16 = jaxmon.from_spec(with_precision(spec, "bfloat16"))
    f32, f16 = jax.jit(est32.score), jax.jit(est16.score)
    rows = store.rows if max_rows is None else min(store.rows, max_rows)
    taps = sorted(store.taps)
    single = not isinstance(ck.fitted, Mapping)
    out32: dict[str, list] = {}
    out16: dict[str, list] = {}
    for lo in range(0, rows, block_rows):
        hi = min(rows, lo + block_rows)
        block = {t: store.read(t, lo, hi).result() for t in taps}
        n = hi - lo
        # Pad the last block (masked) so both scorers compile once.
        mask = np.arange(block_rows) < n
        block = {
            t: jnp.asarray(np.concatenate([a, np.zeros((block_rows - n, a.shape[1]), a.dtype)]))
            for t, a in block.items()
        }
        x = block[taps[0]] if single else block
        for fn, acc in ((f32, out32), (f16, out16)):
            for k, v in flat_scores(fn(ck.fitted, x, mask=jnp.asarray(mask))).items():
                acc.setdefault(k, []).append(v[:n])
    labels = store.read_meta("label", 0, rows) if "label" in store.meta else None
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}
    return cat(out32), cat(out16), labels


def agreement(s32: np.ndarray, s16: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Spearman, max relative difference and per-label AUROCs of two score vectors."""
    ok = np.isfinite(s32) & np.isfinite(s16)
    out: dict[str, Any] = {
        "rows": int(ok.sum()),
        "nonfinite_agree": bool(np.array_equal(np.isfinite(s32), np.isfinite(s16))),
        "spearman": float(stats.spearmanr(s32[ok], s16[ok]).statistic),
        "max_rel_diff": float(np.max(np.abs(s16[ok] - s32[ok]) / (np.abs(s32[ok]) + 1e-12))),
        "auroc": {},
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        for v in sorted(set(labels.tolist()) - {0}):
            sel = ok & ((labels == v) | (labels == 0))
            if sel.sum() == 0 or (labels[sel] == v).all():
                continue
            y = labels[sel] == v
            out["auroc"][int(v)] = (metrics.auroc(s32[sel], y), metrics.auroc(s16[sel], y))
    return out


def _demo_like(rng, n: int, d: int, law: int) -> np.ndarray:
    g = np.random.default_rng(law)
    basis = np.linalg.qr(g.standard_normal((d, d)))[0]
    scale = (1.0 + np.arange(d)) ** -0.7
    mean = g.standard_normal(d) * 0.5
    mean[g.choice(d, 4, replace=False)] = g.choice([-1, 1], 4) * g.uniform(20, 60, 4)
    return ((rng.standard_t(6, (n, d)) * scale) @ basis.T + mean).astype(np.float32)


def make_synthetic(out: str, *, rows: int = 65_536, d: int = 128, blocks: int = 4) -> None:
    """Writes a demo-like bf16 store (``out/store``) and fitted monitor (``out/checkpoint``)."""
    from jaxmon import checkpoint
    from jaxmon import io as jio

    rng = np.random.default_rng(0)
    taps = [f"blocks/{i}/{t}" for i in range(blocks) for t in ("resid", "mlp_out")]
    mixes = {
        t: np.random.default_rng(100 + j).standard_normal((d, d)) / np.sqrt(d)
        for j, t in enumerate(taps)
    }

    def draw(n: int, kind: np.ndarray) -> dict[str, np.ndarray]:
        out_, prev = {}, None
        for j, t in enumerate(taps):
            x = _demo_like(rng, n, d, law=j)
            if prev is not None:  # each tap carries part of the previous one (a residual stream)
                x = x + prev @ mixes[t] * 0.5
            low = np.linalg.qr(np.random.default_rng(j).standard_normal((d, d)))[0][:, -1]
            x[kind == 1] += 0.8 * low * np.abs(x).mean()
            x[kind == 2] *= 1.05
            out_[t], prev = x, x
        return out_

    mon = jaxmon.monitor(
        {
            "blocks/*/*": {
                "gaussian": jaxmon.gaussian(shrinkage="ledoit_wolf"),
                "pca_fd": jaxmon.pca_residual(rank=16, source="frequent_directions"),
                "knn": jaxmon.knn(k=10, bank_size=2048),
            },
            ("blocks/[0-2]/resid", "blocks/[1-3]/resid"): jaxmon.transition(ridge=1e-3),
        }
    )
    train = draw(4 * rows // 2, np.zeros(4 * rows // 2, int))
    cast = lambda t: {k: jnp.asarray(v, jnp.bfloat16) for k, v in t.items()}
    state = mon.update(mon.init({k: v[:1] for k, v in cast(train).items()}), cast(train))
    fitted = mon.finalize(state)
    example = {k: jnp.zeros((1, d), jnp.bfloat16) for k in taps}
    checkpoint.save(f"{out}/checkpoint", mon, state, fitted=fitted, example=example)
    kind = rng.choice(4, rows, p=[0.7, 0.1, 0.1, 0.1])
    q = draw(rows, kind)
    with jio.ActivationWriter(f"{out}/store", dtype="bfloat16", overwrite=True) as w:
        for lo in range(0, rows, 4096):
            sl = slice(lo, lo + 4096)
            w.write({k: v[sl] for k, v in q.items()}, label=kind[sl].astype(np.int32), split="q")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="activation store directory (e.g. runs/demo/store/query)")
    p.add_argument("checkpoint", help="checkpoint directory holding the fitted monitor")
    p.add_argument("--block-rows", type=int, default=8192)
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--min-spearman", type=float, default=0.999)
    p.add_argument("--max-auroc-diff", type=float, default=0.001)
    p.add_argument("--make-synthetic", metavar="DIR", default=None)
    a = p.parse_args(argv)
    if a.make_synthetic:
        make_synthetic(a.make_synthetic)
    ck = jaxmon.load(a.checkpoint)
    if ck.fitted is None:
        print(f"{a.checkpoint} holds no fitted value to score with", file=sys.stderr)
        return 2
    s32, s16, labels = score_store_both(a.store, ck, block_rows=a.block_rows, max_rows=a.max_rows)
    print(f"{len(s32)} keys, {len(next(iter(s32.values()))):,} rows; jax {jax.__version__}")
    print(f"{'key':<44} {'spearman':>9} {'max rel':>9}  AUROC f32 / bf16 per label (vs 0)")
    failed = []
    for k in sorted(s32):
        r = agreement(s32[k], s16[k], labels)
        aucs = "  ".join(f"{v}: {x:.4f}/{y:.4f}" for v, (x, y) in r["auroc"].items())
        worst = max((abs(x - y) for x, y in r["auroc"].values()), default=0.0)
        bad = r["spearman"] < a.min_spearman or worst > a.max_auroc_diff
        bad = bad or not r["nonfinite_agree"]
        failed += [k] if bad else []
        flag = "  FAIL" if bad else ""
        print(f"{k:<44} {r['spearman']:9.6f} {r['max_rel_diff']:9.2e}  {aucs}{flag}")
    print(
        f"{'all keys pass' if not failed else f'{len(failed)} key(s) fail'}: Spearman >= "
        f"{a.min_spearman}, |AUROC f32 - bf16| <= {a.max_auroc_diff}, the same non-finite rows"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
