"""The store pipeline under jax.distributed: two local CPU processes (2 devices each) write one
store, fit one state and score one query, equal to a single process; a killed process resumes;
the CLI runs unchanged as two processes.

Each process runs tests/_store_worker.py (or the CLI) under ``timeout -k`` on a random free port;
this process (8 forced devices, no jax.distributed) checks the results against numpy and
against one-process runs of the same calls.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
from jaxmon import checkpoint, query

sys.path.insert(0, os.path.dirname(__file__))
import _store_worker as W

sys.path.pop(0)

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("_store_worker.py")
TWO_DEVICES = (
    "--xla_force_host_platform_device_count=2 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=60"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": TWO_DEVICES, **extra}


def _start(argv_of, *, limit: int = 240, env_of=None) -> list[subprocess.Popen]:
    """Two processes ``argv_of(i)`` under ``timeout -k``, each in its own process group."""
    return [
        subprocess.Popen(
            ["timeout", "-k", "5", str(limit), *argv_of(i)],
            env=env_of(i) if env_of else _env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that a kill reaches the Python child of `timeout`
        )
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    logs = [p.communicate()[0].decode(errors="replace") for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return logs


def _worker(work: Path, mode: str, *args: str):
    port = _free_port()
    return lambda i: [sys.executable, str(WORKER), str(i), str(port), str(work), mode, *args]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Two processes: ActivationWriter, fit_store, score_store (the acceptance calls)."""
    work = tmp_path_factory.mktemp("two_processes")
    _finish(_start(_worker(work, "pipeline")))
    return work


def _expected_rows():
    """Every written row, process-major (the documented row order), as numpy columns."""
    cols = {k: [] for k in ("h", "g", "sequence_id", "position", "label", "split", "tokens")}
    for pid in range(2):
        seq = 0  # default sequence ids count per process, interleaved across processes
        for taps, kw in W.rows_of(pid):
            m = kw["mask"]
            cols["h"].append(taps["h"][m])
            cols["g"].append(taps["g"][m])
            if "sequence_id" in kw:
                ids = kw["sequence_id"]
            else:
                ids = (seq + np.arange(4)) * 2 + pid
                seq += 4
            cols["sequence_id"].append(np.broadcast_to(ids[:, None], m.shape)[m])
            cols["position"].append(np.broadcast_to(np.arange(25), m.shape)[m])
            cols["label"].append(np.broadcast_to(kw["label"][:, None], m.shape)[m])
            cols["split"].append(np.full(m.shape, ["trusted", "query"].index(kw["split"]))[m])
            cols["tokens"] += list(np.asarray(kw["tokens"])[m])
    return {k: (v if k == "tokens" else np.concatenate(v)) for k, v in cols.items()}


def test_two_processes_write_one_store_in_process_order(pipeline):
    st = query.open_store(pipeline / "store")
    ref = _expected_rows()
    n = len(ref["h"])
    assert st.rows == n and st.complete
    root = json.loads((pipeline / "store" / "manifest.json").read_text())
    assert root["version"] == 2 and root["complete"] and root["rows"] == n
    assert [s["path"] for s in root["shards"]] == ["shards/00000", "shards/00001"]
    assert sum(s["rows"] for s in root["shards"]) == n
    # The two shards name their splits in different orders; the store reads one list.
    assert st.splits == ["trusted", "query"]
    for p in ("shards/00000", "shards/00001"):
        assert json.loads((pipeline / "store" / p / "manifest.json").read_text())["complete"]
    np.testing.assert_array_equal(st.read("h", 0, n).result(), ref["h"])
    np.testing.assert_array_equal(st.read("g", 0, n).result(), ref["g"])
    for col in ("sequence_id", "position", "label", "split"):
        np.testing.assert_array_equal(st.read_meta(col, 0, n), ref[col], err_msg=col)
    # A read across the boundary between the shards, and split codes remapped within it.
    r0 = root["shards"][0]["rows"]
    np.testing.assert_array_equal(st.read("h", r0 - 5, r0 + 7).result(), ref["h"][r0 - 5 : r0 + 7])
    np.testing.assert_array_equal(
        st.read_meta("split", r0 - 5, r0 + 7), ref["split"][r0 - 5 : r0 + 7]
    )
    ids = ref["sequence_id"]
    assert len(np.unique(ids)) == 2 * 3 * 4 - 4  # defaults never collide across processes
    tokens = st.tokens()
    assert [tokens[r] for r in range(n)] == ref["tokens"]


def _leaves(path: Path, prefix: str) -> list[np.ndarray]:
    z = np.load(path)
    return [z[f"{prefix}_{j}"] for j in range(len([k for k in z.files if k.startswith(prefix)]))]


def test_two_process_fit_equals_one_process_and_numpy(pipeline):
    a, b = _leaves(pipeline / "fit_0.npz", "state"), _leaves(pipeline / "fit_1.npz", "state")
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()  # identical on every process
    mon = W.monitor()
    state, example = query.fit_store(pipeline / "store", mon, split="trusted")
    assert example == {
        "h": jax.ShapeDtypeStruct((W.D,), jnp.float32),
        "g": jax.ShapeDtypeStruct((3,), jnp.float32),
    }
    two = jax.tree.unflatten(jax.tree.structure(state), a)
    # Row counts exactly; moments within float32 rounding of a one-process fit (rtol 2e-5).
    assert jaxmon.num_rows(two) == jaxmon.num_rows(state)
    assert jaxmon.num_nonfinite(two) == jaxmon.num_nonfinite(state)
    for x, y in zip(jax.tree.leaves(two), jax.tree.leaves(state), strict=True):
        scale = float(np.max(np.abs(np.asarray(y, np.float64)), initial=1.0))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6 * scale)
    # ... and both against float64 numpy over the trusted, finite rows.
    ref = _expected_rows()
    keep = (ref["split"] == 0) & np.isfinite(ref["h"]).all(1)
    rows = ref["h"][keep].astype(np.float64)
    assert jaxmon.num_rows(two)["['h'].counts"] == len(rows)
    assert jaxmon.num_nonfinite(two)["['h'].counts"] == 1
    np.testing.assert_allclose(np.asarray(two["h"].mean), rows.mean(0), rtol=1e-6)
    c = rows - rows.mean(0)
    np.testing.assert_allclose(np.asarray(two["h"].m2), c.T @ c, rtol=1e-5, atol=1e-3)


def _one_process_query(pipeline: Path, out: Path) -> query.QueryResult:
    """The same score_store call in this one process, with the two-process fitted leaves."""
    mon = W.monitor()
    st = query.open_store(pipeline / "store")
    example = {t: jax.ShapeDtypeStruct((int(a.shape[1]),), jnp.float32) for t, a in st.taps.items()}
    fitted = W.fitted_from(str(pipeline / "fit_0.npz"), mon, example)
    # Two devices, as each worker has: every device scores the same rows in the same shapes.
    return query.score_store(
        st,
        mon,
        fitted,
        out=out,
        block_rows=W.BLOCK_ROWS,
        top_k=W.TOP_K,
        devices=jax.local_devices()[:2],
    )


def _assert_same_query(got: query.QueryResult, ref: query.QueryResult) -> None:
    assert got.rows == ref.rows and got.keys == ref.keys
    for k in ref.keys:
        np.testing.assert_array_equal(got.scores(k), ref.scores(k), err_msg=k)
        assert got.top(k) == ref.top(k)
    assert got.summary["keys"] == ref.summary["keys"]
    a, b = got.sequences(), ref.sequences()
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_two_process_scores_equal_one_process(pipeline, tmp_path):
    got = query.load_result(pipeline / "q")
    ref = _one_process_query(pipeline, tmp_path / "q1")
    _assert_same_query(got, ref)
    n, b = got.rows, W.BLOCK_ROWS
    blocks = -(-n // b)
    rows = [sum(min(b, n - i * b) for i in range(p, blocks, 2)) for p in range(2)]
    assert got.summary["processes"] == [
        {"process": 0, "rows": rows[0]},
        {"process": 1, "rows": rows[1]},
    ]
    assert ref.summary["processes"] == [{"process": 0, "rows": n}]
    # The NaN row written by process 1 leads every key's top-k, scored +inf and counted.
    for k in got.keys:
        assert got.top(k)[0]["score"] == np.inf and got.summary["keys"][k]["nonfinite"] == 1
    meta = query.open_store(pipeline / "store").read_meta("sequence_id", 0, n)
    assert [t["sequence_id"] for t in got.top("h")] == [int(meta[t["row"]]) for t in got.top("h")]


def test_two_process_batch_detector_equals_one_process(pipeline, tmp_path):
    got = query.load_result(pipeline / "qb")
    ref = query.score_store_batch(
        pipeline / "store", out=tmp_path / "qb", tap="h", block_rows=W.BLOCK_ROWS, top_k=W.TOP_K
    )
    # Its statistics are two fits (equal up to float rounding), so the scores are close.
    np.testing.assert_allclose(got.scores("h"), ref.scores("h"), rtol=1e-4, atol=1e-5)
    assert [p["process"] for p in got.summary["processes"]] == [0, 1]
    assert got.top("h")[0]["score"] == np.inf  # the NaN row of process 1


def test_killed_process_resumes_and_the_query_equals_an_uninterrupted_one(pipeline, tmp_path):
    out = tmp_path / "qk"
    procs = _start(_worker(pipeline, "score", str(out), "1", "0.4"))
    try:
        deadline = time.time() + 200
        while procs[1].poll() is None:  # process 1 SIGKILLs itself after its first block
            assert time.time() < deadline, "process 1 never reached its kill point"
            time.sleep(0.05)
    finally:
        for p in procs:  # then process 0 dies too, wherever it is: mid-block or at a barrier
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    # `timeout` passes its child's death by SIGKILL on (as its own, or as status 137).
    assert procs[1].returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), procs[1].returncode
    assert (Path(f"{out}.blocks-1")).read_text() == "1"
    assert not (out / "summary.json").exists()
    prog = json.loads((out / "progress-00001.json").read_text())
    assert prog["next_block"] == 3  # process 1 scores blocks 1, 3, 5, ...: block 1 is in
    _finish(_start(_worker(pipeline, "score", str(out), "-1", "0")))
    n_blocks = -(-query.open_store(pipeline / "store").rows // W.BLOCK_ROWS)
    mine = len(range(1, n_blocks, 2))
    assert int(Path(f"{out}.blocks-1").read_text()) == mine - 1  # resumed, not started over
    _assert_same_query(query.load_result(out), query.load_result(pipeline / "q"))


def test_cli_fit_and_score_run_unchanged_as_two_processes(pipeline, tmp_path):
    config = tmp_path / "fit.json"
    config.write_text(
        json.dumps(
            {
                "split": "trusted",
                "calibration_split": "query",  # a second, continued fit: the score sketches
                "monitor": {
                    "h": {"name": "gaussian", "params": {"shrinkage": "ledoit_wolf"}},
                    "g": {"name": "gaussian", "params": {"diagonal": True}},
                },
            }
        )
    )
    store, ck, q = pipeline / "store", tmp_path / "ck", tmp_path / "q"
    port = _free_port()
    cli = [sys.executable, "-m", "jaxmon.cli"]
    fit = lambda i: [
        *cli, "fit", str(config), str(store), "-o", str(ck),
        "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
    ]  # fmt: skip
    logs = _finish(_start(fit))
    assert "fitted calibrated" in logs[0] and "fitted" not in logs[1]  # process 0 reports
    # The score step finds the job from the environment instead of flags.
    port = _free_port()
    env_of = lambda i: _env(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
    )
    score = lambda i: [*cli, "score", str(store), str(ck), "-o", str(q), "--block-rows", "64"]
    _finish(_start(score, env_of=env_of))
    loaded = checkpoint.load(ck)
    cal = jaxmon.calibrated(W.monitor())
    state, _ = query.fit_store(store, cal, split="trusted")
    state, _ = query.fit_store(store, cal, jaxmon.begin_calibration(cal, state), split="query")
    # Every counter exactly (the monitor's and the calibration sketches': the continued pass
    # counted each calibration row once), the moments up to float rounding.
    assert jaxmon.num_rows(loaded.state) == jaxmon.num_rows(state)
    got, ref = loaded.state.inner, state.inner
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        scale = float(np.max(np.abs(np.asarray(y, np.float64)), initial=1.0))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6 * scale)
    got = query.load_result(q)
    assert [p["process"] for p in got.summary["processes"]] == [0, 1]
    ref = query.score_store(
        store, loaded, out=tmp_path / "q1", block_rows=64, devices=jax.local_devices()[:2]
    )
    _assert_same_query(got, ref)
