"""What every stage of the demo shares: the run sizes, the console and the progress bars."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

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


def log(msg: str) -> None:
    """Prints a line of the demo's report (above any progress bar on the terminal)."""
    tqdm.write(msg)
    sys.stdout.flush()  # in order with the stage-4 process that shares the output


def progress(iterable: Iterable[Any] | None = None, **kw: Any) -> tqdm:
    """A ``tqdm`` bar on stderr, shown only when stderr is a terminal (as the library's)."""
    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **kw)


def window(seq_len: int) -> int:
    """Tokens per rolling window of the sequence scores."""
    return min(16, seq_len)
