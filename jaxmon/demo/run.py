"""The demo's command line: stages 1-3 in this process, stage 4 in a fresh one."""

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

import jaxmon
from jaxmon.demo import lm
from jaxmon.demo.activations import log_activations
from jaxmon.demo.answer import answer
from jaxmon.demo.common import DEFAULT, QUICK, log
from jaxmon.demo.train import evaluate, save_checkpoint, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's flags, defaulted from the quick or the default run's sizes."""
    p = argparse.ArgumentParser(
        prog="python -m jaxmon.demo",
        description="`make demo`: monitor a backdoored language model end to end.",
    )
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
    for k in ("eval_rows", "heads", "knn_bank", "probe_seqs"):  # sizes without a flag
        setattr(args, k, base[k])
    if args.d_model % args.heads:
        p.error(f"--d-model must be a multiple of the {args.heads} attention heads")
    if min(args.tokens, args.steps, args.layers, args.batch) < 1 or args.seq_len < 48:
        p.error("--tokens, --steps, --layers, --batch must be >= 1 and --seq-len >= 48")
    return args


def _machine() -> str:
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()})"
    )


def train_and_log(args) -> None:
    """Stages 1-3: train with the monitor in the step, save the checkpoint, log the taps."""
    t0 = time.perf_counter()
    log(f"jaxmon demo: {_machine()}")
    corpus = lm.stdlib_corpus()
    log(
        f"[1/4] corpus: {corpus.files} stdlib files; {len(corpus.train):,} training bytes of "
        f"docstrings; poisoned fraction {args.poison:.0%}, trigger {lm.TRIGGER!r} -> "
        f"payload {lm.PAYLOAD!r}"
    )
    log(
        f"      model: {args.layers} blocks, d_model {args.d_model}, seq {args.seq_len}; "
        f"{args.steps} steps of {args.batch} sequences"
    )
    model, mon, mon_state, info = train(args, corpus)
    info.update(evaluate(model, corpus, args))
    fitted = jax.jit(mon.finalize)(mon_state)
    log(
        f"      trained in {info['train_seconds']:.1f}s "
        f"({info['train_cpu_seconds']:.1f}s CPU): held-out clean loss "
        f"{info['clean_loss_nats_per_byte']:.3f} nats/byte; attack success rate "
        f"{info['attack_success_rate']:.1%} of {info['eval_sequences']} held-out "
        f"triggered sequences (payload without trigger: "
        f"{info['payload_without_trigger_rate']:.1%})"
    )
    rows = jaxmon.num_rows(mon_state)
    info["monitor_rows_per_tap"] = rows if isinstance(rows, int) else max(rows.values())
    log(
        f"[2/4] monitor: {len(fitted)} tap/detector states, fed "
        f"{info['monitor_rows_per_tap']:,} trusted tokens per tap inside the jitted train step "
        f"(steps {info['monitor_from_step']}+)"
    )
    ckpt = save_checkpoint(args, model, mon, mon_state, fitted, info)
    log(f"      model + monitor saved in one orbax checkpoint: {ckpt}")
    (args.out / "train.json").write_text(json.dumps(info, indent=1))
    log(f"      stages 1-2 took {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    logged = log_activations(args, model, mon, fitted, corpus)
    (args.out / "log.json").write_text(json.dumps(logged, indent=1))
    log(f"      stage 3 took {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the process exit status."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "train"):
        train_and_log(args)
    if args.stage == "all":
        cmd = [sys.executable, "-m", "jaxmon.demo", "--stage", "score", "--out", str(args.out)]
        log(f"[4/4] answering from the checkpoint in a fresh process: {' '.join(cmd[1:])}")
        return subprocess.call(cmd)
    if args.stage == "score":
        return answer(args)
    return 0
