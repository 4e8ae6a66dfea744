"""HTML reports with PNG plots for finished queries (used by ``jaxmon report``).

A report shows, per score key: histograms of the scores of trusted rows against query rows,
the AUROC of token and sequence scores when labels were logged, and the most anomalous
sequences with their tokens (the most anomalous token highlighted) when token text was logged.
Scores are read through :mod:`jaxmon.query` (the only tensorstore reader), subsampled with a
fixed stride beyond ``max_rows`` so a report over 10^9 tokens stays small.
"""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np

from jaxmon import metrics
from jaxmon._keys import MonitorKey
from jaxmon.errors import ConfigError
from jaxmon.query import QueryResult, load_result, open_store

__all__ = ["write_report"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _strided(n: int, max_rows: int) -> np.ndarray:
    step = max(1, -(-n // max_rows))
    return np.arange(0, n, step)


def _read(res: QueryResult, key: str, rows: np.ndarray) -> np.ndarray:
    if len(rows) == res.rows:
        return res.scores(key).astype(np.float64)
    step = int(rows[1] - rows[0]) if len(rows) > 1 else 1
    out, block = [], 1 << 20
    for lo in range(0, res.rows, block):  # bounded memory: one block at a time
        s = res.scores(key, lo, lo + block)
        first = (-lo) % step
        out.append(s[first::step])
    return np.concatenate(out).astype(np.float64)[: len(rows)]


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    scores = np.where(np.isnan(scores), np.inf, scores)  # no number ranks as most anomalous
    ok = labels >= 0
    y = labels[ok] > 0
    if y.all() or not y.any():
        return None
    return float(metrics.auroc(scores[ok], y.astype(np.int32)))


def write_report(
    query_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    trusted: str | os.PathLike | None = None,
    trusted_split: str = "trusted",
    max_rows: int = 1_000_000,
    top_sequences: int = 10,
    bins: int = 60,
) -> str:
    """Writes ``out/index.html`` and one PNG per score key for a finished query.

    Args:
      query_dir: the ``out`` directory of :func:`jaxmon.query.score_store`.
      out: the report directory (created).
      trusted: another finished query (of trusted data) whose scores form the reference
        histogram; by default the rows of ``trusted_split`` in the same store.
      trusted_split: split name of the trusted rows when ``trusted`` is not given.
      max_rows: at most this many rows per histogram (fixed-stride subsample).
      top_sequences: how many of the most anomalous sequences to list.
      bins: histogram bins.

    Returns:
      The path of ``index.html``.
    """
    plt = _plt()
    res = load_result(query_dir)
    store = open_store(res.summary["store"], check_chunks=False)
    os.makedirs(out, exist_ok=True)
    rows = _strided(res.rows, max_rows)
    splits = store.splits
    row_split = store.column("split")[rows] if "split" in store.meta else np.zeros(0)
    labels = (
        store.column("label")[rows].astype(np.int64)
        if "label" in store.meta
        else np.full(len(rows), -1)
    )
    ref = load_result(trusted) if trusted is not None else None
    code = splits.index(trusted_split) if trusted_split in splits else None
    seqs = res.sequences() if os.path.exists(os.path.join(res.directory, "sequences.npz")) else {}
    parts = _head_html(res)
    figs = []
    for i, key in enumerate(res.keys):
        s = _read(res, key, rows)
        if ref is not None:
            trusted_s = _read(ref, key, _strided(ref.rows, max_rows))
            query_s = s
        elif code is not None:
            trusted_s, query_s = s[row_split == code], s[row_split != code]
        else:
            trusted_s, query_s = np.zeros(0), s
        png = f"hist_{i:03d}.png"
        _histogram(plt, key, trusted_s, query_s, bins, os.path.join(out, png))
        figs.append((key, png))
        seq_auc = None
        if seqs and f"max/{key}" in seqs:
            seq_auc = _auroc(seqs[f"max/{key}"], seqs["label"])
        parts.append(_key_row(res, key, _auroc(s, labels), seq_auc))
    parts.append("</table>")
    for key, png in figs:
        parts.append(f"<h3>{html.escape(key)}</h3><img src='{png}' alt='histogram of {key}'>")
    if seqs:
        parts += _top_sequences_html(res, store, seqs, top_sequences)
    parts.append("</body></html>")
    path = os.path.join(out, "index.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def _head_html(res: QueryResult) -> list[str]:
    """The page's head, its summary line and the per-key table's header."""
    calibrated = " (calibrated: scores are -log10 p)" if res.summary.get("calibrated") else ""
    return [
        "<!doctype html><html><head><meta charset='utf-8'><title>jaxmon report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}"
        "mark{background:#f88}</style></head><body>",
        "<h1>jaxmon anomaly report</h1>",
        f"<p>Store <code>{html.escape(res.summary['store'])}</code>: {res.rows:,} tokens, "
        f"{res.summary.get('sequences', 0):,} sequences, estimator "
        f"<code>{html.escape(res.summary['spec']['name'])}</code>{calibrated}.</p>",
        "<h2>Per key</h2><table><tr><th>key</th><th>tap</th><th>detector</th><th>mean</th>"
        "<th>max</th><th>non-finite rows</th><th>token AUROC</th><th>sequence AUROC (max)</th>"
        "</tr>",
    ]


def _histogram(plt, key: str, trusted_s, query_s, bins: int, path: str) -> None:
    """A PNG of the trusted and query score histograms of one key."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    # Non-finite scores (rows holding NaN/inf: +inf) have no bin; the legend counts them.
    trusted_f, query_f = trusted_s[np.isfinite(trusted_s)], query_s[np.isfinite(query_s)]
    both = np.concatenate([trusted_f, query_f])
    edges = np.histogram_bin_edges(both, bins=bins) if len(both) else bins
    for name, all_s, fin in (("trusted", trusted_s, trusted_f), ("query", query_s, query_f)):
        if len(all_s):
            off = len(all_s) - len(fin)
            note = f", {off:,} non-finite not shown" if off else ""
            ax.hist(fin, edges, density=True, alpha=0.55, label=f"{name} ({len(all_s):,}{note})")
    ax.set_xlabel("score (higher = more anomalous)")
    ax.set_ylabel("density")
    ax.set_title(key)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _key_row(res: QueryResult, key: str, tok_auc: float | None, seq_auc: float | None) -> str:
    """One row of the per-key table."""
    info = res.summary["keys"][key]
    fmt = lambda v: "–" if v is None else f"{v:.4f}"
    nonfinite = info.get("nonfinite")  # absent in summaries of older versions
    return (
        f"<tr><td>{html.escape(key)}</td>{_key_cells(key)}"
        f"<td>{info['mean']:.4g}</td><td>{info['max']:.4g}</td>"
        f"<td>{'–' if nonfinite is None else f'{nonfinite:,}'}</td>"
        f"<td>{fmt(tok_auc)}</td><td>{fmt(seq_auc)}</td></tr>"
    )


def _key_cells(key: str) -> str:
    """The tap(s) and detector of a score key, as two table cells."""
    try:
        k = MonitorKey.parse(key)
    except ConfigError:  # not a monitor key (a tap name holding '->' twice): as it is
        return f"<td>{html.escape(key)}</td><td>–</td>"
    taps = " &rarr; ".join(html.escape(t) for t in k.taps)
    return f"<td>{taps}</td><td>{html.escape(k.detector or '–')}</td>"


def _top_sequences_html(res: QueryResult, store: Any, seqs: dict, k: int) -> list[str]:
    key = res.keys[0]
    top = seqs[f"max/{key}"]
    order = np.argsort(-np.where(np.isnan(top), np.inf, top), kind="stable")[:k]
    tokens = store.tokens()
    parts = [
        f"<h2>Most anomalous sequences (max token score of {html.escape(key)})</h2>",
        "<table><tr><th>sequence</th><th>max</th><th>mean</th><th>label</th><th>tokens</th></tr>",
    ]
    seq_col = None
    for j in order:
        sid = int(seqs["sequence_id"][j])
        text = ""
        if tokens is not None:
            if seq_col is None:  # token rows of the listed sequences only
                seq_col = store.column("sequence_id")
            where = np.flatnonzero(seq_col == sid)
            sc = res.scores(key, int(where[0]), int(where[-1]) + 1)[where - where[0]]
            hot = int(np.argmax(sc)) if len(sc) else -1
            words = []
            for t, r in enumerate(where[:200]):
                w = html.escape(tokens.get(int(r), "?"))
                words.append(f"<mark title='{sc[t]:.3g}'>{w}</mark>" if t == hot else w)
            text = " ".join(words)
        parts.append(
            f"<tr><td>{sid}</td><td>{seqs[f'max/{key}'][j]:.4g}</td>"
            f"<td>{seqs[f'mean/{key}'][j]:.4g}</td><td>{int(seqs['label'][j])}</td>"
            f"<td>{text}</td></tr>"
        )
    parts.append("</table>")
    return parts
