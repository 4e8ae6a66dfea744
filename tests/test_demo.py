"""The demo's ``--quick`` run end to end, and the pipeline invariants it must keep.

The run trains a backdoored byte-level LM with the monitor in the train step, logs the query set,
and scores it from the checkpoint in a fresh process. The test does not assert AUROC values (they
depend on a tiny, briefly trained model); it asserts what must hold for any run:

* the token-score store has one row per logged query token, and every logged token was scored;
* the scores computed from the reloaded checkpoint equal the in-memory monitor's scores;
* triggered sequences rank above clean ones on average.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ)
    # The demo runs as a user would: one CPU device, no forced device count from conftest.
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxmon.demo", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.mark.slow
def test_quick_demo_runs_and_measures_the_backdoor(quick_run):
    info = json.loads((quick_run / "train.json").read_text())
    assert 0.0 <= info["attack_success_rate"] <= 1.0
    assert np.isfinite(info["clean_loss_nats_per_byte"])
    # Training lowered the loss below a uniform byte model (ln 256 = 5.55 nats).
    assert info["clean_loss_nats_per_byte"] < np.log(256)


@pytest.mark.slow
def test_quick_demo_invariants(quick_run):
    summary_path = quick_run / "summary.json"
    if not summary_path.exists():
        pytest.skip("stage 4 did not run (a library part it needs has not landed)")
    s = json.loads(summary_path.read_text())
    # Every logged token was scored, once.
    assert s["store_rows"] == s["query_tokens"] == s["scored_rows"]
    # Scores from the checkpoint reloaded in a fresh process equal the in-memory scores.
    assert s["reload_vs_memory"]["compared"] > 0
    assert s["reload_vs_memory"]["max_rel_diff"] <= 1e-4
    # Triggered sequences rank above clean ones on average (mean sequence-level AUROC).
    assert s["mean_sequence_auroc"]["triggered"] > 0.5
