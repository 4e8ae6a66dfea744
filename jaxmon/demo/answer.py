"""Stage 4, in a fresh process: answer from the checkpoint alone.

Load the monitor, calibrate it on held-out clean text, batch-score the store once (raw and
calibrated scores), fit probes from a few labelled sequences of each anomaly kind, print one
table, rank the monitor's keys with the labelled examples (``jaxmon rank``) and write the HTML
report. Reads nothing but the checkpoint, the activation stores and the query labels written
by stages 1-3.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxmon
from jaxmon import query, report
from jaxmon.demo import lm
from jaxmon.demo.common import log, window
from jaxmon.demo.table import (
    ALL_TAPS,
    COMBINE,
    combination_check,
    combined_key,
    score_table,
    sequence_p_values,
    unsupervised,
)
from jaxmon.query import MonitorKey


def _reload_vs_memory(args, qstore: query.Store, ck) -> dict | None:
    """Scores from the reloaded checkpoint against the in-memory monitor's (stage 3), on the
    same logged rows."""
    mem_path = args.out / "inmemory_scores.npz"
    if not mem_path.exists():
        return None
    with np.load(mem_path) as z:
        mem = {str(k): z[f"s{i}"] for i, k in enumerate(z["keys"])}
    n = next(iter(mem.values())).size
    taps = {t: jnp.asarray(qstore.read(t, 0, n).result()) for t in qstore.taps}
    again = jax.device_get(jax.jit(ck.estimator.score)(ck.fitted, taps))
    rel = max(
        float(np.max(np.abs(again[k] - mem[k].reshape(-1)) / (1.0 + np.abs(mem[k]).max())))
        for k in mem
    )
    log(
        f"      reloaded monitor vs in-memory monitor on the first {n:,} logged tokens: "
        f"max relative difference {rel:.2e}"
    )
    return {"compared": int(n), "max_rel_diff": rel}


def _combined(calq, calc, seq_len: int) -> tuple[dict, dict]:
    """Token and sequence scores of every combination rule over all keys (``-log10 p``).

    Calibrated scores are -log10 p: their natural logs are combined in log space (the p-values
    of very anomalous tokens are far below float32's range). Sequence columns combine the
    sequences' own p-values (calibrated on held-out clean sequences).
    """
    seq_p = sequence_p_values(calc, calq, seq_len)
    logps = {k: jnp.asarray(-np.log(10.0) * calq.scores(k), jnp.float32) for k in calq.keys}
    tok, seq = {}, {}
    for method in COMBINE:
        logp = jaxmon.combine(logps, method=method, log=True, log_inputs=True)
        tok[combined_key(method)] = (-np.asarray(logp) / np.log(10)).reshape(-1, seq_len)
        lps = jaxmon.combine(seq_p, method=method, log=True, log_inputs=True)
        seq[combined_key(method)] = -np.asarray(lps) / np.log(10)
    return tok, seq


def _fit_probes(store_dir: Path):
    """One probe monitor per anomaly kind, fitted on the held-out clean text (trusted) and the
    labelled examples of that kind; returned as one monitor (named detectors) and its fitted
    value, so every probe is scored in one pass."""
    pstore = store_dir / "probe"
    patterns = ("blocks/*/resid", "blocks/*/mlp_out")
    fitted = {}
    for i, kind in enumerate(lm.KINDS[1:], start=1):
        mon = jaxmon.monitor(dict.fromkeys(patterns, jaxmon.probe()))
        st, _ = query.fit_store(store_dir / "calib", mon, labels={0: 0})
        st, _ = query.fit_store(pstore, mon, st, labels={0: 0, i: 1})
        for key, f in mon.finalize(st).items():
            fitted[MonitorKey.parse(key).with_detector(f"probe_{kind}").format()] = f
    named = {f"probe_{kind}": jaxmon.probe() for kind in lm.KINDS[1:]}
    return jaxmon.monitor(dict.fromkeys(patterns, named)), fitted


def _rank_with_examples(args, store_dir: Path, cal, cfitted, results: dict) -> dict:
    """``jaxmon rank`` on the labelled examples: which key to trust for each kind, chosen from
    20 flagged sequences (not in the query set), against the best key in hindsight."""
    pstore = store_dir / "probe"
    ex = query.score_store(pstore, cal, cfitted, out=args.out / "scores_examples", resume=False)
    single = unsupervised(results) + [combined_key(m) for m in COMBINE]
    out = {}
    for i, kind in enumerate(lm.KINDS[1:], start=1):
        ranked = query.rank_store(
            pstore,
            query=ex,
            flagged=i,
            reductions=("max_rolling_mean",),
            window=window(args.seq_len),
        )
        # The table's names for the combinations ranked here ("combined(fisher)", ...).
        named = [dict(r, key=_table_key(r["key"])) for r in ranked if r["level"] == "sequence"]
        pick = named[0]["key"]
        on_query = {k: results[k][kind]["sequence_auroc"] for k in single if k in results}
        best = max(on_query, key=on_query.get)
        out[kind] = {
            "picked": pick,
            "picked_ci": [named[0]["ci_low"], named[0]["ci_high"]],
            "picked_query_auroc": on_query.get(pick),
            "best_key": best,
            "best_query_auroc": on_query[best],
            "top": named[:5],
        }
        log(
            f"\n      jaxmon rank, {kind}: {named[0]['n_flagged']} flagged vs "
            f"{named[0]['n_clean']} clean labelled sequences (sequence level):"
        )
        for line in jaxmon.format_ranking(named, limit=5).splitlines():
            log(f"        {line}")
        got = on_query.get(pick, float("nan"))
        log(
            f"        picked {pick}: query-set sequence AUROC {got:.3f}; best in hindsight "
            f"{best} {on_query[best]:.3f}"
        )
    return out


def _table_key(ranked_key: str) -> str:
    """The table's key of a key ranked by ``rank_store`` (its combinations are bare names)."""
    if ranked_key.startswith("combined("):
        return MonitorKey.of(ALL_TAPS, ranked_key).format()
    return ranked_key


def _headline(args, n_cal: int, rows: int) -> None:
    train = json.loads((args.out / "train.json").read_text())
    print()
    print(
        f"Backdoored LM: held-out clean loss {train['clean_loss_nats_per_byte']:.3f} nats/byte, "
        f"attack success rate {train['attack_success_rate']:.1%} "
        f"(payload without trigger {train['payload_without_trigger_rate']:.1%})."
    )
    print(
        f"Monitor fitted in the train step on {train.get('monitor_rows_per_tap', 0):,} trusted "
        f"tokens per tap; calibrated on {n_cal:,} held-out clean tokens; "
        f"{rows:,} query tokens scored."
    )


def answer(args) -> int:
    """Stage 4: load, calibrate, batch-score, probe, print the table, rank, report."""
    t0, c0 = time.perf_counter(), time.process_time()
    ckpt_dir, store_dir = args.out / "checkpoint", args.out / "store"
    ck = jaxmon.load(ckpt_dir)
    qstore = query.open_store(store_dir / "query")
    labels = dict(np.load(args.out / "query_labels.npz"))
    args.seq_len = seq_len = labels["tokens"].shape[1]
    logged = json.loads((args.out / "log.json").read_text())
    args.probe_seqs = int(logged.get("probe_seqs", args.probe_seqs))
    log(
        f"      loaded {ckpt_dir} (step {ck.step}): {len(ck.fitted)} monitor keys; query store "
        f"{qstore.rows:,} tokens x {len(qstore.taps)} taps"
    )
    summary: dict = {"store_rows": qstore.rows, "query_tokens": int(labels["tokens"].size)}
    reload = _reload_vs_memory(args, qstore, ck)
    if reload is not None:
        summary["reload_vs_memory"] = reload

    # Calibrate on held-out clean text, from the checkpoint's fitted monitor: one pass over
    # the calibration store fills one score sketch per key.
    cal, _, cfitted, _ = query.calibrate_store(store_dir / "calib", ck)
    n_cal = query.open_store(store_dir / "calib").rows
    log(
        f"      calibrated on {n_cal:,} held-out clean tokens ({time.process_time() - c0:.1f}s CPU)"
    )

    # One pass over the store: raw scores and calibrated -log10 p, scored once. The
    # calibration text too: the trusted reference of the report, and the clean sequences that
    # calibrate sequence-level p-values.
    c1 = time.process_time()
    calq = query.score_store(qstore, cal, cfitted, out=args.out / "scores", resume=False)
    c2 = time.process_time()
    calc = query.score_store(
        store_dir / "calib", cal, cfitted, out=args.out / "scores_calib", resume=False
    )
    log(
        f"      batch-scored the store once (raw and calibrated): {c2 - c1:.1f}s CPU; "
        f"calibration text {time.process_time() - c2:.1f}s CPU"
    )
    tok = {k: calq.scores(k, raw=True).reshape(-1, seq_len) for k in calq.keys}
    summary["scored_rows"] = int(min(np.isfinite(v).sum() for v in tok.values()))
    tok_combined, seq_combined = _combined(calq, calc, seq_len)
    tok.update(tok_combined)

    # Probes: a few labelled sequences of each kind (never in the query set), against the
    # held-out clean text; one probe monitor per kind, all scored in one pass.
    c3 = time.process_time()
    pmon, pfitted = _fit_probes(store_dir)
    pq = query.score_store(qstore, pmon, pfitted, out=args.out / "scores_probe", resume=False)
    tok.update({k: pq.scores(k).reshape(-1, seq_len) for k in pq.keys})
    log(
        f"      probes fitted from {args.probe_seqs} labelled sequences per kind and scored: "
        f"{time.process_time() - c3:.1f}s CPU"
    )
    score_s = time.perf_counter() - t0

    _table_rank_report(
        args, tok, labels, seq_combined, (n_cal, qstore.rows), (cal, cfitted), summary
    )
    summary["score_seconds"] = score_s
    summary["score_cpu_seconds"] = time.process_time() - c0
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(
        f"      stage 4 took {time.perf_counter() - t0:.1f}s "
        f"({summary['score_cpu_seconds']:.1f}s CPU)"
    )
    return 0


def _table_rank_report(args, tok, labels, seq_combined, sizes, calibrated, summary) -> None:
    """Prints the table, ranks keys with the labelled examples, writes the HTML report."""
    (n_cal, rows), (cal, cfitted) = sizes, calibrated
    store_dir = args.out / "store"
    lines, results = score_table(args, tok, labels, seq_override=seq_combined)
    _headline(args, n_cal, rows)
    print("\n".join(lines), flush=True)
    (args.out / "table.txt").write_text("\n".join(lines) + "\n")
    summary["table"] = results
    summary["table_text"] = lines
    summary["mean_sequence_auroc"] = {
        k: float(np.mean([r[k]["sequence_auroc"] for r in results.values()])) for k in lm.KINDS[1:]
    }
    summary["combined_fisher_triggered"] = results[combined_key("fisher")]["triggered"]
    summary["combination_vs_median_key"] = combination_check(results)
    summary["ranking"] = _rank_with_examples(args, store_dir, cal, cfitted, results)

    # Calibrated scores (-log10 p) keep ordering past the calibration set (fitted tail).
    html = report.write_report(
        args.out / "scores", args.out / "report", trusted=args.out / "scores_calib"
    )
    log(f"      HTML report: {html}")
