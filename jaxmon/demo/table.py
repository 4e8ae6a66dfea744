"""The demo's result table: AUROC and recall at 1% FPR per detector, tap and anomaly kind, at
token and sequence level, from token scores and the query set's labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxmon
from jaxmon import metrics
from jaxmon.demo import lm
from jaxmon.demo.common import log, window
from jaxmon.query import MonitorKey

COMBINE = ("fisher", "bonferroni", "cauchy")
ALL_TAPS = "all taps"  # the "tap" of the rows that combine every key's p-values
ORDER = (
    "gaussian",
    "pca_fd",
    "knn",
    "transition",
    *(f"combined({m})" for m in COMBINE),
    *(f"probe_{k}" for k in lm.KINDS[1:]),
)


def combined_key(method: str) -> str:
    """The table's key of the combination of every key's p-values by ``method``."""
    return MonitorKey.of(ALL_TAPS, f"combined({method})").format()


def _fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def _metrics(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUROC, recall at 1% FPR) of ``scores[pos]`` against ``scores[neg]`` (jaxmon.metrics)."""
    s = np.concatenate([scores[pos], scores[neg]])
    y = np.r_[np.ones(int(pos.sum()), bool), np.zeros(int(neg.sum()), bool)]
    return metrics.auroc(s, y), metrics.recall_at_fpr(s, y, fpr=0.01)


def seq_aggregate(token_scores: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Max over rolling means of each sequence's token scores, per key (``[rows]`` flat)."""
    n_seq = next(iter(token_scores.values())).size // seq_len
    seg = np.repeat(np.arange(n_seq, dtype=np.int32), seq_len)
    out = jaxmon.sequence_scores(
        {k: jnp.asarray(v.reshape(-1), jnp.float32) for k, v in token_scores.items()},
        seg,
        num_segments=n_seq,
        reduce="max_rolling_mean",
        window=window(seq_len),
    )
    return {k: np.asarray(v) for k, v in out.items()}


def sequence_p_values(calc, calq, seq_len: int) -> dict[str, jax.Array]:
    """Natural-log sequence p-values of the query sequences, per key: each sequence's own
    aggregate against the aggregates of the held-out clean sequences (not a token p-value)."""
    clean = seq_aggregate({k: calc.scores(k, raw=True) for k in calc.keys}, seq_len)
    null = jaxmon.sequence_null(clean)
    agg = seq_aggregate({k: calq.scores(k, raw=True) for k in calq.keys}, seq_len)
    return jaxmon.sequence_p_values(null, agg, log=True)


def _rows(keys) -> list[tuple[int, str, str, str]]:
    """``(order, detector, tap, key)`` per key, in the table's order."""
    rows = []
    for key in keys:
        k = MonitorKey.parse(key)
        det = k.detector or ("transition" if k.pair else key)
        rank = ORDER.index(det) if det in ORDER else len(ORDER)
        rows.append((rank, det, k.base, key))
    return sorted(rows, key=lambda r: (r[0], r[1], r[2]))


def score_table(
    args, token_scores: dict[str, np.ndarray], labels, *, seq_override=None
) -> tuple[list[str], dict]:
    """One table: per key, AUROC and recall@1%FPR per anomaly kind, token and sequence level.

    ``seq_override`` gives the sequence scores of some keys directly (the combinations of
    sequence-level p-values); the others aggregate their token scores.
    """
    kind, tok_label = labels["kind"], labels["token_label"]
    seq_len = tok_label.shape[1]
    seq_scores = seq_aggregate(token_scores, seq_len)
    seq_scores.update(seq_override or {})
    clean_tok = np.repeat(kind == 0, seq_len)
    kinds = list(lm.KINDS[1:])
    rows = _rows(token_scores)
    wd = max(len("detector"), *(len(r[1]) for r in rows))
    wt = max(len("tap"), *(len(r[2]) for r in rows))
    head = f"{'detector':{wd}s} {'tap':{wt}s}" + "".join(f" | {k:^27s}" for k in kinds)
    sub = f"{'':{wd}s} {'':{wt}s}" + " |  tok AUC R@1%  seq AUC R@1%" * len(kinds)
    lines = [head, sub, "-" * len(sub)]
    results = {}
    for _, det, tap, key in rows:
        flat, seq = token_scores[key].reshape(-1), np.asarray(seq_scores[key])
        row = f"{det:{wd}s} {tap:{wt}s}"
        results[key] = {}
        for i, k in enumerate(kinds, start=1):
            pos_tok = np.repeat(kind == i, seq_len) & tok_label.reshape(-1)
            t_auc, t_rec = _metrics(flat, pos_tok, clean_tok)
            s_auc, s_rec = _metrics(seq, kind == i, kind == 0)
            results[key][k] = {
                "token_auroc": t_auc,
                "token_recall_at_1pct_fpr": t_rec,
                "sequence_auroc": s_auc,
                "sequence_recall_at_1pct_fpr": s_rec,
            }
            row += f" | {_fmt(t_auc)} {_fmt(t_rec)}  {_fmt(s_auc)} {_fmt(s_rec)}"
        lines.append(row)
    lines.append(
        f"(token level: anomalous tokens vs every token of clean held-out sequences; sequence "
        f"level: max over {window(seq_len)}-token rolling means of the token scores, and for "
        f"combined rows the combination of each key's sequence p-value, calibrated on held-out "
        f"clean sequences; probe_<kind>: a probe fitted from {args.probe_seqs} labelled "
        f"sequences of that kind; {int((kind == 0).sum())} clean sequences)"
    )
    return lines, results


def unsupervised(results: dict) -> list[str]:
    """The table's keys of single unsupervised detectors (not combinations, not probes)."""
    out = []
    for key in results:
        k = MonitorKey.parse(key)
        if k.base != ALL_TAPS and not (k.detector or "").startswith("probe_"):
            out.append(key)
    return out


def combination_check(results: dict) -> dict:
    """Each combination rule against the median (and best) single unsupervised key."""
    single = unsupervised(results)
    out = {}
    for kind in lm.KINDS[1:]:
        for level in ("token_auroc", "sequence_auroc"):
            vals = [results[k][kind][level] for k in single]
            entry = {"median_key": float(np.median(vals)), "best_key": float(np.max(vals))}
            for m in COMBINE:
                entry[m] = results[combined_key(m)][kind][level]
            out[f"{kind}/{level}"] = entry
    log("      combinations against the median and best single key (AUROC):")
    log(
        f"        {'kind/level':28s} {'median':>7s} {'best':>7s} "
        + " ".join(f"{m:>10s}" for m in COMBINE)
    )
    for name, e in out.items():
        log(
            f"        {name:28s} {e['median_key']:7.3f} {e['best_key']:7.3f} "
            + " ".join(f"{e[m]:10.3f}" for m in COMBINE)
        )
    return out
