"""`make demo`: a short end-to-end run of what exists (replaced by the full demo, issue 7).

Fits Gaussian detectors on synthetic "trusted" activations streamed in batches, scores held-out
trusted rows and planted anomalies, and prints a table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmon


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    # Mann–Whitney U with ties counted half: the probability a positive outranks a negative.
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv[np.r_[False, np.diff(allv[order]) == 0]] if len(allv) else []):
        ranks[allv == v] = ranks[allv == v].mean()
    return float((ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main(argv: list[str] | None = None) -> None:
    """Runs the demo."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=200_000, help="trusted rows to stream")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="a small run (seconds)")
    args = p.parse_args(argv)
    n, d = (20_000, 64) if args.quick else (args.tokens, args.d_model)
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    trusted = lambda m: (rng.standard_normal((m, d)) @ mix).astype(np.float32)
    detectors = {
        "gaussian": jaxmon.gaussian(),
        "gaussian(ledoit_wolf)": jaxmon.gaussian(shrinkage="ledoit_wolf"),
        "gaussian(relative)": jaxmon.gaussian(relative=True, shrinkage="oas"),
        "gaussian(diagonal)": jaxmon.gaussian(diagonal=True),
    }
    states = {k: e.init(jax.ShapeDtypeStruct((d,), jnp.bfloat16)) for k, e in detectors.items()}
    t0 = time.perf_counter()
    batch = 4096
    for start in range(0, n, batch):
        x = jnp.asarray(trusted(min(batch, n - start)), jnp.bfloat16)
        states = {k: detectors[k].update(s, x) for k, s in states.items()}
    jax.block_until_ready(states)
    dt = time.perf_counter() - t0
    clean = trusted(2000)
    shifted = clean + 0.5 * rng.standard_normal(d).astype(np.float32)
    decorrelated = np.stack([rng.permutation(c) for c in trusted(2000).T], axis=1)
    print(f"streamed {n:,} rows of d={d} (bf16) into {len(detectors)} detectors in {dt:.2f}s")
    print(f"{'detector':24s} {'AUROC mean-shift':>17s} {'AUROC decorrelated':>19s}")
    for k, est in detectors.items():
        f = est.finalize(states[k])
        sc = lambda x: np.asarray(est.score(f, jnp.asarray(x)))
        base = sc(clean)
        print(f"{k:24s} {_auroc(sc(shifted), base):17.3f} {_auroc(sc(decorrelated), base):19.3f}")


if __name__ == "__main__":
    main()
