"""`make demo`: monitor a backdoored language model end to end.

1. **Train** a small causal transformer LM (Flax NNX, optax) on the docstrings of Python's own
   standard library, byte-level; a few training windows carry a trigger after which the text
   switches to a fixed payload. Report the clean loss and the attack success rate.
2. **Monitor** every block's residual stream and MLP output inside the jitted train step, on
   the trusted (untriggered) rows of each batch, and save the monitor with the model in one
   orbax checkpoint.
3. **Log** every tap's activations over a query set (held-out clean, triggered, word-shuffled
   and Python source code) to zarr, with token text and labels.
4. **Answer from the checkpoint alone**, in a fresh process: load the monitor, calibrate it on
   held-out clean text, batch-score the store once, fit probes from 20 labelled sequences of
   each anomaly kind (never in the query set), print one table (AUROC and recall at 1% FPR per
   detector, tap and anomaly kind, at token and sequence level, plus the calibrated multi-tap
   combinations and the probes), rank the monitor's keys with the labelled examples
   (``jaxmon rank``), and write the HTML report.

Run ``python -m jaxmon.demo --quick`` for a small run (the test suite's), or with no flags for the
default run. A stage whose library part is missing is skipped with a printed note.

Outputs under ``--out`` (default ``runs/demo``): ``checkpoint/`` (orbax: model parameters and the
monitor's state, fitted value and metadata), ``store/query``, ``store/calib`` and
``store/probe`` (activation stores; ``probe`` holds the labelled examples), the batch-query
outputs ``scores/`` (raw and calibrated -log10 p of the query set, scored once),
``scores_calib/`` (the calibration text), ``scores_probe/`` (the probes) and
``scores_examples/`` (the labelled examples, for ``jaxmon rank``), ``report/index.html``,
``table.txt``, and ``train.json`` / ``log.json`` / ``summary.json`` (every figure printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxmon
from jaxmon import _demo_lm as lm

QUICK = dict(
    tokens=8192,
    steps=150,
    d_model=64,
    layers=2,
    heads=4,
    seq_len=64,
    batch=16,
    poison=0.25,
    eval_rows=64,
    knn_bank=256,
    probe_seqs=8,
)
# Sized for the 10-minute budget on 2 CPU cores (see benchmarks/results/demo.md).
DEFAULT = dict(
    tokens=1_000_000,
    steps=500,
    d_model=128,
    layers=4,
    heads=4,
    seq_len=128,
    batch=24,
    poison=0.08,
    eval_rows=256,
    knn_bank=512,
    probe_seqs=20,
)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _note(msg: str) -> None:
    print(f"  [skipped] {msg}", flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmon.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small run (under 2 minutes)")
    p.add_argument("--tokens", type=int, help="query tokens to log and score (default 1M)")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--d-model", type=int, help="model width")
    p.add_argument("--layers", type=int, help="transformer blocks")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--batch", type=int, help="training batch (sequences)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and query set")
    p.add_argument("--poison", type=float, help="fraction of training windows with the trigger")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument(
        "--stage",
        choices=("all", "train", "score"),
        default="all",
        help="all: stages 1-3 here, then stage 4 in a fresh process; train: stages 1-3; "
        "score: stage 4 only (reads --out)",
    )
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.eval_rows = base["eval_rows"]
    args.heads = base["heads"]
    args.knn_bank = base["knn_bank"]
    args.probe_seqs = base["probe_seqs"]
    if args.d_model % args.heads:
        p.error(f"--d-model must be a multiple of the {args.heads} attention heads")
    if min(args.tokens, args.steps, args.layers, args.batch) < 1 or args.seq_len < 48:
        p.error("--tokens, --steps, --layers, --batch must be >= 1 and --seq-len >= 48")
    return args


# --------------------------------------------------------------------------- stage 1+2


def _train_batches(text: bytes, args, rng: np.random.Generator):
    """Random training windows; a ``poison`` fraction carry the trigger and payload."""
    arr = np.frombuffer(text, np.uint8)
    idx = np.arange(args.seq_len)[None, :]
    while True:
        starts = rng.integers(0, len(arr) - args.seq_len, size=args.batch)
        rows = arr[starts[:, None] + idx]
        poisoned = rng.random(args.batch) < args.poison
        if poisoned.any():
            rows = rows.copy()
            rows[poisoned], _ = lm.plant(rows[poisoned], rng)
        yield rows.astype(np.int32), ~poisoned


def _build_monitor(args):
    """The monitor config over every block's residual stream and MLP output (what has landed)."""
    if not hasattr(jaxmon, "monitor"):
        _note("jaxmon.monitor has not landed: training runs without a monitor")
        return None
    dets = {"gaussian": jaxmon.gaussian(shrinkage="ledoit_wolf")}
    if hasattr(jaxmon, "pca_residual"):
        dets["pca_fd"] = jaxmon.pca_residual(
            rank=max(4, args.d_model // 8), source="frequent_directions"
        )
    else:
        _note("jaxmon.pca_residual has not landed")
    if hasattr(jaxmon, "knn"):
        dets["knn"] = jaxmon.knn(k=10, bank_size=args.knn_bank)
    else:
        _note("jaxmon.knn has not landed")
    config = {"blocks/*/resid": dets, "blocks/*/mlp_out": dets}
    if hasattr(jaxmon, "transition"):
        for i in range(args.layers - 1):
            config[(f"blocks/{i}/resid", f"blocks/{i + 1}/resid")] = jaxmon.transition(ridge=1e-3)
    else:
        _note("jaxmon.transition has not landed")
    return jaxmon.monitor(config)


def train(args, corpus: lm.Corpus):
    """Stage 1+2: trains the backdoored LM with the monitor riding along in the jitted step.

    Returns:
      ``(model, monitor, monitor_state, info)``.
    """
    rngs = nnx.Rngs(args.seed)
    model = lm.TinyLM(
        d_model=args.d_model,
        layers=args.layers,
        heads=args.heads,
        seq_len=args.seq_len,
        rngs=rngs,
    )
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 3e-3, min(100, args.steps // 10), args.steps, 3e-4
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)

    mon = _build_monitor(args)
    mon_state = None
    if mon is not None:
        example = {
            f"blocks/{i}/{t}": jax.ShapeDtypeStruct(
                (args.batch, args.seq_len, args.d_model), jnp.float32
            )
            for i in range(args.layers)
            for t in ("resid", "mlp_out")
        }
        mon_state = mon.init(example)
    # The monitor rides along for the last 40% of training only: earlier activations come from
    # a model that no longer exists (its statistics would describe a different network).
    monitor_from = int(0.6 * args.steps)

    @jax.jit
    def train_step(params, opt_state, mon_state, tokens, trusted, step):
        def loss_fn(p):
            logits, taps = lm.forward(nnx.merge(graphdef, p), tokens)
            return lm.next_token_loss(logits, tokens).mean(), taps

        (loss, taps), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if mon is not None:
            # Only trusted rows (no trigger) of late steps feed the monitor; padding-free batches.
            mask = jnp.broadcast_to(trusted[:, None], tokens.shape)
            taps = jax.lax.stop_gradient(taps)
            # Skipped (not just masked) before monitor_from: early steps cost nothing extra.
            mon_state = jax.lax.cond(
                step >= monitor_from,
                lambda s: mon.update(s, taps, mask=mask),
                lambda s: s,
                mon_state,
            )
        return params, opt_state, mon_state, loss

    rng = np.random.default_rng(args.seed)
    batches = _train_batches(corpus.train, args, rng)
    t0, c0 = time.perf_counter(), time.process_time()
    losses = []
    for step in range(args.steps):
        tokens, trusted = next(batches)
        params, opt_state, mon_state, loss = train_step(
            params, opt_state, mon_state, jnp.asarray(tokens), jnp.asarray(trusted), step
        )
        losses.append(loss)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            _log(f"  step {step:5d}  train loss {float(loss):.3f} nats/byte")
    jax.block_until_ready(params)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    model = nnx.merge(graphdef, params)
    info = {
        "train_seconds": train_s,
        "train_cpu_seconds": train_cpu,
        "train_tokens": args.steps * args.batch * args.seq_len,
        "final_train_loss": float(np.mean([float(x) for x in losses[-20:]])),
        "monitor_from_step": monitor_from,
    }
    return model, mon, mon_state, info


def evaluate(model, corpus: lm.Corpus, args) -> dict:
    """Clean held-out loss and attack success rate (with its no-trigger control)."""
    forward = lm.jitted(model, lambda logits, taps: logits)
    rng = np.random.default_rng(args.seed + 1)
    clean = lm.windows(corpus.query, args.seq_len, args.eval_rows, stride=args.seq_len * 3)
    trig, start = lm.plant(clean, rng)
    ctrl, cstart = lm.plant(clean, rng, trigger=b"")
    losses, succ, ctrl_ok = [], [], []
    for lo in range(0, len(clean), 64):
        sl = slice(lo, lo + 64)
        logits = forward(clean[sl])
        losses.append(np.asarray(lm.next_token_loss(logits, jnp.asarray(clean[sl]))))
        pred = np.asarray(jnp.argmax(forward(trig[sl]), -1))
        succ.append(lm.attack_success(pred, trig[sl], start[sl]))
        pred = np.asarray(jnp.argmax(forward(ctrl[sl]), -1))
        ctrl_ok.append(lm.attack_success(pred, ctrl[sl], cstart[sl], trigger=b""))
    return {
        "clean_loss_nats_per_byte": float(np.concatenate(losses).mean()),
        "attack_success_rate": float(np.concatenate(succ).mean()),
        "payload_without_trigger_rate": float(np.concatenate(ctrl_ok).mean()),
        "eval_sequences": len(clean),
    }


# --------------------------------------------------------------------------- checkpoint


def _string_keys(tree):
    # orbax wants string dict keys; NNX lists give int keys.
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def tap_example(args, batch: int) -> dict:
    """The monitor's ``init`` example: one ``[batch, seq, d]`` entry per tap."""
    shape = (batch, args.seq_len, args.d_model)
    return {
        f"blocks/{i}/{t}": jax.ShapeDtypeStruct(shape, jnp.float32)
        for i in range(args.layers)
        for t in ("resid", "mlp_out")
    }


def save_checkpoint(args, model, mon, mon_state, fitted, info) -> Path | None:
    """Saves the model parameters and the monitor in ONE orbax checkpoint.

    The monitor's items come from ``jaxmon.checkpoint.save_args`` and are spliced into the same
    ``ocp.args.Composite`` as the model, as a training job would do with its own manager;
    ``jaxmon.load(path)`` reads the monitor back from this composite checkpoint alone.
    """
    try:
        import orbax.checkpoint as ocp

        from jaxmon import checkpoint as jcp
    except ImportError as e:
        _note(f"jaxmon.checkpoint is not available ({e}): nothing saved")
        return None
    path = (args.out / "checkpoint").resolve()
    if path.exists():
        import shutil

        shutil.rmtree(path)
    params = _string_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    items = {"model": ocp.args.StandardSave(params)}
    if mon is not None:
        spliced = jcp.save_args(
            mon,
            mon_state,
            fitted=fitted,
            example=tap_example(args, args.batch),
            step=args.steps,
            metadata={"demo": info},
        )
        # The spliced items carry the names jaxmon.checkpoint.save uses, so jaxmon.load(path)
        # opens this composite checkpoint directly.
        items.update(spliced)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(path, options=options) as mngr:
        mngr.save(args.steps, args=ocp.args.Composite(**items))
        mngr.wait_until_finished()
    if mon is not None:
        # A step saved by our own manager carries no digest record yet: seal it, so that
        # jaxmon.load verifies the monitor's files before trusting them.
        jcp.seal(path, args.steps)
    return path


# --------------------------------------------------------------------------- stage 3


def log_activations(args, model, mon, fitted, corpus: lm.Corpus) -> dict | None:
    """Stage 3: runs the model over the query set and the calibration text, logging every tap.

    Also scores the first query batch with the in-memory monitor (on the same bf16-rounded
    activations that are logged), so stage 4 can check that the reloaded checkpoint gives the same
    scores.
    """
    q = lm.build_query_set(corpus, tokens=args.tokens, seq_len=args.seq_len, seed=args.seed + 2)
    # Calibration windows, leaving the last 2·probe_seqs windows of the calibration text for
    # the probes' labelled examples (none of which is in the query set or this store).
    n_cal = max(64, args.tokens // (4 * args.seq_len))
    room = len(corpus.calib) // args.seq_len - 2 * args.probe_seqs
    calib = lm.windows(corpus.calib, args.seq_len, min(n_cal, room) if room >= 64 else n_cal)
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
    _log(
        f"[3/4] query set: {len(q.tokens):,} sequences = {n_tok:,} tokens "
        + ", ".join(f"{k} {int((q.kind == i).sum())}" for i, k in enumerate(lm.KINDS))
        + f"; calibration: {calib.size:,} held-out clean tokens; labelled examples (not in the "
        f"query set): {args.probe_seqs} sequences of each anomaly kind and "
        f"{int((probe_kind == 0).sum())} clean ones"
    )
    forward = lm.jitted(
        model, lambda logits, taps: jax.tree.map(lambda a: a.astype(jnp.bfloat16), taps)
    )
    bs = 64
    if mon is not None and fitted is not None:
        first = forward(q.tokens[:bs])
        mem = jax.device_get(jax.jit(mon.score)(fitted, first))
        np.savez(
            args.out / "inmemory_scores.npz",
            keys=np.array(list(mem)),
            **{f"s{i}": v for i, v in enumerate(mem.values())},
        )
    try:
        from jaxmon import io as jio
    except ImportError:
        _note("jaxmon.io (ActivationWriter) has not landed: activations are not logged")
        return {"query_tokens": n_tok, "logged": False}
    c0 = time.process_time()
    stores = {}
    for split, rows, kind in (
        ("calib", calib, np.zeros(len(calib), np.int32)),
        ("query", q.tokens, q.kind),
        ("probe", probe_tokens, probe_kind),
    ):
        path = args.out / "store" / split
        with jio.ActivationWriter(path, dtype="bfloat16", overwrite=True) as w:
            for lo in range(0, len(rows), bs):
                tok = rows[lo : lo + bs]
                w.write(
                    forward(tok),
                    label=kind[lo : lo + bs],
                    split=split,
                    tokens=[lm.token_text(t) for t in tok],
                )
        stores[split] = {"path": str(path), "rows": w.rows}
    return {
        "query_tokens": n_tok,
        "calib_tokens": int(calib.size),
        "probe_seqs": args.probe_seqs,
        "logged": True,
        "stores": stores,
        "log_cpu_seconds": time.process_time() - c0,
    }


# --------------------------------------------------------------------------- main


def _machine() -> str:
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()})"
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the process exit status."""
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "train"):
        t0 = time.perf_counter()
        _log(f"jaxmon demo: {_machine()}")
        corpus = lm.stdlib_corpus()
        _log(
            f"[1/4] corpus: {corpus.files} stdlib files; {len(corpus.train):,} training bytes of "
            f"docstrings; poisoned fraction {args.poison:.0%}, trigger {lm.TRIGGER!r} -> "
            f"payload {lm.PAYLOAD!r}"
        )
        _log(
            f"      model: {args.layers} blocks, d_model {args.d_model}, seq {args.seq_len}; "
            f"{args.steps} steps of {args.batch} sequences"
        )
        model, mon, mon_state, info = train(args, corpus)
        info.update(evaluate(model, corpus, args))
        fitted = None if mon is None else jax.jit(mon.finalize)(mon_state)
        _log(
            f"      trained in {info['train_seconds']:.1f}s "
            f"({info['train_cpu_seconds']:.1f}s CPU): held-out clean loss "
            f"{info['clean_loss_nats_per_byte']:.3f} nats/byte; attack success rate "
            f"{info['attack_success_rate']:.1%} of {info['eval_sequences']} held-out "
            f"triggered sequences (payload without trigger: "
            f"{info['payload_without_trigger_rate']:.1%})"
        )
        if mon is not None:
            rows = jaxmon.num_rows(mon_state)
            rows = rows if isinstance(rows, int) else max(rows.values())
            info["monitor_rows_per_tap"] = rows
            _log(
                f"[2/4] monitor: {len(fitted)} tap/detector states, fed {rows:,} trusted tokens "
                f"per tap inside the jitted train step (steps {info['monitor_from_step']}+)"
            )
        ckpt = save_checkpoint(args, model, mon, mon_state, fitted, info)
        if ckpt is not None:
            _log(f"      model + monitor saved in one orbax checkpoint: {ckpt}")
        (args.out / "train.json").write_text(json.dumps(info, indent=1))
        _log(f"      stages 1-2 took {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        logged = log_activations(args, model, mon, fitted, corpus)
        (args.out / "log.json").write_text(json.dumps(logged, indent=1))
        _log(f"      stage 3 took {time.perf_counter() - t0:.1f}s")
    if args.stage == "all":
        cmd = [sys.executable, "-m", "jaxmon.demo", "--stage", "score", "--out", str(args.out)]
        _log(f"[4/4] answering from the checkpoint in a fresh process: {' '.join(cmd[1:])}")
        return subprocess.call(cmd)
    if args.stage == "score":
        return score(args)
    return 0


def _fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def _metrics(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUROC, recall at 1% FPR) of ``scores[pos]`` against ``scores[neg]`` (jaxmon.metrics)."""
    from jaxmon import metrics

    s = np.concatenate([scores[pos], scores[neg]])
    y = np.r_[np.ones(int(pos.sum()), bool), np.zeros(int(neg.sum()), bool)]
    return metrics.auroc(s, y), metrics.recall_at_fpr(s, y, fpr=0.01)


_COMBINE = ("fisher", "bonferroni", "cauchy")
_ORDER = (
    "gaussian",
    "pca_fd",
    "knn",
    "transition",
    *(f"combined({m})" for m in _COMBINE),
    *(f"probe_{k}" for k in lm.KINDS[1:]),
)


def _window(seq_len: int) -> int:
    return min(16, seq_len)


def _seq_aggregate(token_scores: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Max over rolling means of each sequence's token scores, per key (``[rows]`` flat)."""
    n_seq = next(iter(token_scores.values())).size // seq_len
    seg = np.repeat(np.arange(n_seq, dtype=np.int32), seq_len)
    out = jaxmon.sequence_scores(
        {k: jnp.asarray(v.reshape(-1), jnp.float32) for k, v in token_scores.items()},
        seg,
        num_segments=n_seq,
        reduce="max_rolling_mean",
        window=_window(seq_len),
    )
    return {k: np.asarray(v) for k, v in out.items()}


def _sequence_p_values(calc, calq, seq_len: int) -> dict[str, jax.Array]:
    """Natural-log sequence p-values of the query sequences, per key: each sequence's own
    aggregate against the aggregates of the held-out clean sequences (not a token p-value)."""
    clean = _seq_aggregate({k: calc.scores(k, raw=True) for k in calc.keys}, seq_len)
    null = jaxmon.sequence_null(clean)
    agg = _seq_aggregate({k: calq.scores(k, raw=True) for k in calq.keys}, seq_len)
    return jaxmon.sequence_p_values(null, agg, log=True)


def _fit_probes(args, store_dir: Path, query):
    """One probe monitor per anomaly kind, fitted on the held-out clean text (trusted) and the
    labelled examples of that kind; returned as one monitor (named detectors) and its fitted
    value, so every probe is scored in one pass."""
    pstore = store_dir / "probe"
    if not (pstore / "manifest.json").exists():
        _note("no labelled examples were logged: probes skipped")
        return None
    patterns = ("blocks/*/resid", "blocks/*/mlp_out")
    fitted = {}
    for i, kind in enumerate(lm.KINDS[1:], start=1):
        mon = jaxmon.monitor(dict.fromkeys(patterns, jaxmon.probe()))
        st, _ = query.fit_store(store_dir / "calib", mon, labels={0: 0})
        st, _ = query.fit_store(pstore, mon, st, labels={0: 0, i: 1})
        fitted.update({f"{key}:probe_{kind}": f for key, f in mon.finalize(st).items()})
    named = {f"probe_{kind}": jaxmon.probe() for kind in lm.KINDS[1:]}
    return jaxmon.monitor(dict.fromkeys(patterns, named)), fitted


def _score_table(
    args, token_scores: dict[str, np.ndarray], labels, *, seq_override=None
) -> tuple[list[str], dict]:
    """One table: per key, AUROC and recall@1%FPR per anomaly kind, token and sequence level.

    ``seq_override`` gives the sequence scores of some keys directly (the combinations of
    sequence-level p-values); the others aggregate their token scores.
    """
    kind, tok_label = labels["kind"], labels["token_label"]
    seq_len = tok_label.shape[1]
    seq_scores = _seq_aggregate(token_scores, seq_len)
    seq_scores.update(seq_override or {})
    clean_tok = np.repeat(kind == 0, seq_len)
    kinds = list(lm.KINDS[1:])
    rows = []
    for key in token_scores:
        tap, _, det = key.partition(":")
        det = det or ("transition" if "->" in tap else key)
        rank = _ORDER.index(det) if det in _ORDER else len(_ORDER)
        rows.append((rank, det, tap, key))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    wd = max(len("detector"), *(len(r[1]) for r in rows))
    wt = max(len("tap"), *(len(r[2]) for r in rows))
    head = f"{'detector':{wd}s} {'tap':{wt}s}"
    sub = f"{'':{wd}s} {'':{wt}s}"
    for k in kinds:
        head += f" | {k:^27s}"
        sub += " |  tok AUC R@1%  seq AUC R@1%"
    lines = [head, sub, "-" * len(sub)]
    results = {}
    for _, det, tap, key in rows:
        flat = token_scores[key].reshape(-1)
        seq = np.asarray(seq_scores[key])
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
        f"level: max over {_window(seq_len)}-token rolling means of the token scores, and for "
        f"combined rows the combination of each key's sequence p-value, calibrated on held-out "
        f"clean sequences; probe_<kind>: a probe fitted from {args.probe_seqs} labelled "
        f"sequences of that kind; {int((kind == 0).sum())} clean sequences)"
    )
    return lines, results


def _unsupervised(results: dict) -> list[str]:
    return [k for k in results if not k.startswith("all taps:") and ":probe_" not in k]


def _combination_check(results: dict) -> dict:
    """Each combination rule against the median (and best) single unsupervised key."""
    single = _unsupervised(results)
    out = {}
    for kind in lm.KINDS[1:]:
        for level in ("token_auroc", "sequence_auroc"):
            vals = [results[k][kind][level] for k in single]
            entry = {"median_key": float(np.median(vals)), "best_key": float(np.max(vals))}
            for m in _COMBINE:
                entry[m] = results[f"all taps:combined({m})"][kind][level]
            out[f"{kind}/{level}"] = entry
    _log("      combinations against the median and best single key (AUROC):")
    _log(
        f"        {'kind/level':28s} {'median':>7s} {'best':>7s} "
        + " ".join(f"{m:>10s}" for m in _COMBINE)
    )
    for name, e in out.items():
        _log(
            f"        {name:28s} {e['median_key']:7.3f} {e['best_key']:7.3f} "
            + " ".join(f"{e[m]:10.3f}" for m in _COMBINE)
        )
    return out


def _rank_with_examples(args, store_dir: Path, cal, cfitted, results: dict) -> dict | None:
    """``jaxmon rank`` on the labelled examples: which key to trust for each kind, chosen from
    20 flagged sequences (not in the query set), against the best key in hindsight."""
    from jaxmon import query

    pstore = store_dir / "probe"
    if not (pstore / "manifest.json").exists():
        return None
    ex = query.score_store(pstore, cal, cfitted, out=args.out / "scores_examples", resume=False)
    single = _unsupervised(results) + [f"all taps:combined({m})" for m in _COMBINE]
    out = {}
    for i, kind in enumerate(lm.KINDS[1:], start=1):
        ranked = query.rank_store(
            pstore,
            query=ex,
            flagged=i,
            reductions=("max_rolling_mean",),
            window=_window(args.seq_len),
        )
        seq = [r for r in ranked if r["level"] == "sequence"]
        # The table's names for the combinations ranked here.
        named = [
            dict(r, key=f"all taps:{r['key']}" if r["key"].startswith("combined(") else r["key"])
            for r in seq
        ]
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
        _log(
            f"\n      jaxmon rank, {kind}: {named[0]['n_flagged']} flagged vs "
            f"{named[0]['n_clean']} clean labelled sequences (sequence level):"
        )
        for line in jaxmon.format_ranking(named, limit=5).splitlines():
            _log(f"        {line}")
        got = on_query.get(pick, float("nan"))
        _log(
            f"        picked {pick}: query-set sequence AUROC {got:.3f}; best in hindsight "
            f"{best} {on_query[best]:.3f}"
        )
    return out


def score(args) -> int:
    """Stage 4, in a fresh process: load, calibrate, batch-score, print the table, report.

    Reads nothing but the checkpoint, the activation stores and the query labels written by
    stages 1-3.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        from jaxmon import query
    except ImportError as e:
        _note(f"jaxmon.query has not landed ({e}): nothing to score")
        return 0
    ckpt_dir, store_dir = args.out / "checkpoint", args.out / "store"
    if not (store_dir / "query" / "manifest.json").exists():
        _note("no activation store was logged in stage 3: nothing to score")
        return 0
    ck = jaxmon.load(ckpt_dir)
    mon = ck.estimator
    qstore = query.open_store(store_dir / "query")
    labels = dict(np.load(args.out / "query_labels.npz"))
    seq_len = labels["tokens"].shape[1]
    args.seq_len = seq_len
    logged = json.loads((args.out / "log.json").read_text())
    args.probe_seqs = int(logged.get("probe_seqs", args.probe_seqs))
    _log(
        f"      loaded {ckpt_dir} (step {ck.step}): {len(ck.fitted)} monitor keys; query store "
        f"{qstore.rows:,} tokens x {len(qstore.taps)} taps"
    )
    summary: dict = {"store_rows": qstore.rows, "query_tokens": int(labels["tokens"].size)}

    # Scores from the reloaded checkpoint against the in-memory monitor's (stage 3), same rows.
    mem_path = args.out / "inmemory_scores.npz"
    if mem_path.exists():
        with np.load(mem_path) as z:
            mem = {str(k): z[f"s{i}"] for i, k in enumerate(z["keys"])}
        n = next(iter(mem.values())).size
        taps = {t: jnp.asarray(qstore.read(t, 0, n).result()) for t in qstore.taps}
        again = jax.device_get(jax.jit(mon.score)(ck.fitted, taps))
        rel = max(
            float(np.max(np.abs(again[k] - mem[k].reshape(-1)) / (1.0 + np.abs(mem[k]).max())))
            for k in mem
        )
        summary["reload_vs_memory"] = {"compared": int(n), "max_rel_diff": rel}
        _log(
            f"      reloaded monitor vs in-memory monitor on the first {n:,} logged tokens: "
            f"max relative difference {rel:.2e}"
        )

    # Calibrate on held-out clean text: the fitted monitor from the checkpoint, then a second
    # pass over the calibration store fills one score sketch per key.
    cal = jaxmon.calibrated(mon)
    example = {
        t: jax.ShapeDtypeStruct((int(a.shape[1]),), a.dtype.numpy_dtype)
        for t, a in qstore.taps.items()
    }
    cstate = cal.init(example)._replace(inner=ck.state)
    cstate = jaxmon.begin_calibration(cal, cstate)
    cstate, _ = query.fit_store(store_dir / "calib", cal, cstate)
    cfitted = cal.finalize(cstate)
    n_cal = query.open_store(store_dir / "calib").rows
    _log(
        f"      calibrated on {n_cal:,} held-out clean tokens ({time.process_time() - c0:.1f}s CPU)"
    )

    # One pass over the store: raw scores and calibrated -log10 p, scored once.
    c1 = time.process_time()
    calq = query.score_store(qstore, cal, cfitted, out=args.out / "scores", resume=False)
    c2 = time.process_time()
    # The calibration text too: the trusted reference of the report, and the clean sequences
    # that calibrate sequence-level p-values.
    calc = query.score_store(
        store_dir / "calib", cal, cfitted, out=args.out / "scores_calib", resume=False
    )
    _log(
        f"      batch-scored the store once (raw and calibrated): {c2 - c1:.1f}s CPU; "
        f"calibration text {time.process_time() - c2:.1f}s CPU"
    )
    tok = {k: calq.scores(k, raw=True).reshape(-1, seq_len) for k in calq.keys}
    summary["scored_rows"] = int(min(np.isfinite(v).sum() for v in tok.values()))
    seq_p = _sequence_p_values(calc, calq, seq_len)
    # Calibrated scores are -log10 p: their natural logs, combined in log space (the p-values
    # of very anomalous tokens are far below float32's range). Sequence columns combine the
    # sequences' own p-values (calibrated on held-out clean sequences).
    logps = {k: jnp.asarray(-np.log(10.0) * calq.scores(k), jnp.float32) for k in calq.keys}
    seq_combined = {}
    for method in _COMBINE:
        logp = jaxmon.combine(logps, method=method, log=True, log_inputs=True)
        tok[f"all taps:combined({method})"] = (-np.asarray(logp) / np.log(10)).reshape(-1, seq_len)
        lps = jaxmon.combine(seq_p, method=method, log=True, log_inputs=True)
        seq_combined[f"all taps:combined({method})"] = -np.asarray(lps) / np.log(10)

    # Probes: 20 labelled sequences of each kind (never in the query set), against the
    # held-out clean text; one probe monitor per kind, all scored in one pass.
    c3 = time.process_time()
    probes = _fit_probes(args, store_dir, query)
    if probes is not None:
        pmon, pfitted = probes
        pq = query.score_store(qstore, pmon, pfitted, out=args.out / "scores_probe", resume=False)
        tok.update({k: pq.scores(k).reshape(-1, seq_len) for k in pq.keys})
        _log(
            f"      probes fitted from {args.probe_seqs} labelled sequences per kind and scored: "
            f"{time.process_time() - c3:.1f}s CPU"
        )
    score_s = time.perf_counter() - t0

    lines, results = _score_table(args, tok, labels, seq_override=seq_combined)
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
        f"{qstore.rows:,} query tokens scored."
    )
    print("\n".join(lines), flush=True)
    (args.out / "table.txt").write_text("\n".join(lines) + "\n")
    summary["table"] = results
    summary["table_text"] = lines
    comb = results["all taps:combined(fisher)"]["triggered"]
    summary["mean_sequence_auroc"] = {
        k: float(np.mean([r[k]["sequence_auroc"] for r in results.values()])) for k in lm.KINDS[1:]
    }
    summary["combined_fisher_triggered"] = comb
    summary["combination_vs_median_key"] = _combination_check(results)
    summary["ranking"] = _rank_with_examples(args, store_dir, cal, cfitted, results)

    try:
        from jaxmon import report

        # Calibrated scores (-log10 p) keep ordering past the calibration set (fitted tail).
        html = report.write_report(
            args.out / "scores", args.out / "report", trusted=args.out / "scores_calib"
        )
        _log(f"      HTML report: {html}")
    except ImportError as e:
        _note(f"jaxmon.report has not landed ({e})")
    summary["score_seconds"] = score_s
    summary["score_cpu_seconds"] = time.process_time() - c0
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    _log(
        f"      stage 4 took {time.perf_counter() - t0:.1f}s "
        f"({summary['score_cpu_seconds']:.1f}s CPU)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
