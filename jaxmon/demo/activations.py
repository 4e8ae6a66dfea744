"""Stage 3: run the model over the query set, the calibration text and the labelled examples,
logging every tap's activations (and the tokens and labels) to activation stores."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmon import io
from jaxmon.demo import lm
from jaxmon.demo.common import log, progress

BATCH = 64  # sequences per forward pass and per write


def _calibration_windows(args, corpus: lm.Corpus) -> np.ndarray:
    """Held-out clean windows for calibration, leaving the last ``2·probe_seqs`` windows of the
    calibration text for the probes' labelled examples (none of which is in the query set)."""
    n_cal = max(64, args.tokens // (4 * args.seq_len))
    room = len(corpus.calib) // args.seq_len - 2 * args.probe_seqs
    return lm.windows(corpus.calib, args.seq_len, min(n_cal, room) if room >= 64 else n_cal)


def _save_in_memory_scores(args, forward, mon, fitted, tokens: np.ndarray) -> None:
    """Scores the first query batch with the in-memory monitor, on the same bf16-rounded
    activations that are logged, so stage 4 can check the reloaded checkpoint against it."""
    mem = jax.device_get(jax.jit(mon.score)(fitted, forward(tokens[:BATCH])))
    np.savez(
        args.out / "inmemory_scores.npz",
        keys=np.array(list(mem)),
        **{f"s{i}": v for i, v in enumerate(mem.values())},
    )


def _write_store(args, forward, split: str, rows: np.ndarray, kind: np.ndarray) -> dict:
    """Logs every tap of ``rows`` (token windows) to ``store/<split>``, with labels and text."""
    path = args.out / "store" / split
    bar = progress(total=rows.size, desc=f"log {split}", unit="tokens")
    with bar, io.ActivationWriter(path, dtype="bfloat16", overwrite=True) as w:
        for lo in range(0, len(rows), BATCH):
            tok = rows[lo : lo + BATCH]
            w.write(
                forward(tok),
                label=kind[lo : lo + BATCH],
                split=split,
                tokens=[lm.token_text(t) for t in tok],
            )
            bar.update(tok.size)
    return {"path": str(path), "rows": w.rows}


def log_activations(args, model, mon, fitted, corpus: lm.Corpus) -> dict:
    """Stage 3: runs the model over the query set and the calibration text, logging every tap.

    Also scores the first query batch with the in-memory monitor (see
    :func:`_save_in_memory_scores`).
    """
    q = lm.build_query_set(corpus, tokens=args.tokens, seq_len=args.seq_len, seed=args.seed + 2)
    calib = _calibration_windows(args, corpus)
    probe_tokens, probe_kind = lm.build_probe_set(
        corpus,
        per_kind=args.probe_seqs,
        seq_len=args.seq_len,
        skip=len(calib),
        query_windows=int((q.kind == 0).sum()),
        seed=args.seed + 3,
    )
    np.savez(
        args.out / "query_labels.npz",
        tokens=q.tokens,
        kind=q.kind,
        token_label=q.token_label,
        trigger_start=q.trigger_start,
        kinds=np.array(lm.KINDS),
    )
    n_tok = q.tokens.size
    log(
        f"[3/4] query set: {len(q.tokens):,} sequences = {n_tok:,} tokens "
        + ", ".join(f"{k} {int((q.kind == i).sum())}" for i, k in enumerate(lm.KINDS))
        + f"; calibration: {calib.size:,} held-out clean tokens; labelled examples (not in the "
        f"query set): {args.probe_seqs} sequences of each anomaly kind and "
        f"{int((probe_kind == 0).sum())} clean ones"
    )
    forward = lm.jitted(
        model, lambda logits, taps: jax.tree.map(lambda a: a.astype(jnp.bfloat16), taps)
    )
    _save_in_memory_scores(args, forward, mon, fitted, q.tokens)
    c0 = time.process_time()
    stores = {
        split: _write_store(args, forward, split, rows, kind)
        for split, rows, kind in (
            ("calib", calib, np.zeros(len(calib), np.int32)),
            ("query", q.tokens, q.kind),
            ("probe", probe_tokens, probe_kind),
        )
    }
    return {
        "query_tokens": n_tok,
        "calib_tokens": int(calib.size),
        "probe_seqs": args.probe_seqs,
        "logged": True,
        "stores": stores,
        "log_cpu_seconds": time.process_time() - c0,
    }
