"""The scale and device benchmarks stay runnable: each runs end to end at tiny sizes on CPU.

``benchmarks/device_check.py --smoke`` is the command an accelerator host runs in full; here it
must produce its report (every check, every column) on CPU. ``bench_scale.py --quick`` must
print its memory table, whose per-device bytes are checked against the allocated shards.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"
pytestmark = pytest.mark.slow


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def test_device_check_smoke_writes_its_report(tmp_path):
    out = tmp_path / "device.md"
    proc = subprocess.run(
        ["timeout", "-k", "5", "300", sys.executable, str(BENCH / "device_check.py"), "--smoke",
         "--out", str(out)],
        capture_output=True, text=True, env=_env(1), timeout=320,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for check in ("moments update", "Mahalanobis score", "score_store", "train step + monitor"):
        assert check in text, check
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 2 * 3 + 1 + 2  # header, (f32, bf16, score) x 2 widths, store, 2 steps
    assert all(line.count("|") == 8 for line in rows)
    assert "Measured matmul peak" in text and "symmetric_product" in text


def test_bench_scale_quick_runs_on_eight_devices():
    proc = subprocess.run(
        ["timeout", "-k", "5", "300", sys.executable, str(BENCH / "bench_scale.py"), "--quick"],
        capture_output=True, text=True, env=_env(8), timeout=320,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checked against the allocated shards at d=64: equal" in proc.stdout
    assert "fitted t ∝" in proc.stdout and "3. Finalize" in proc.stdout and "norm s" in proc.stdout
