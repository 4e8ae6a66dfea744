"""One process of the two-process store pipeline tests (run by tests/test_multiprocess_store.py).

Usage: python _store_worker.py PROCESS_ID PORT WORKDIR MODE [ARGS...]

Each process owns 2 CPU devices under ``jax.distributed`` (4 in all) and makes exactly the calls
an acceptance check makes, with identical arguments on both processes:

* ``pipeline``: ``ActivationWriter(WORKDIR/store, overwrite=True)`` with this process's rows
  (:func:`rows_of`), ``fit_store(store, monitor, split="trusted")``, then
  ``score_store(store, monitor, fitted, out=WORKDIR/q, block_rows=BLOCK_ROWS, top_k=TOP_K)``
  and ``score_store_batch(store, out=WORKDIR/qb, tap="h", ...)`` (QUE); each process saves
  its state and fitted leaves to ``WORKDIR/fit_<i>.npz``.
* ``score OUT KILL_AFTER PAUSE``: scores the store with the fitted leaves of ``fit_0.npz`` into
  ``OUT``, sleeping ``PAUSE`` seconds after each committed block; process 1 SIGKILLs itself
  after ``KILL_AFTER`` of its blocks (-1: never). Each process writes how many blocks it scored
  in this run to ``OUT.blocks-<i>``.
"""

import os
import signal
import sys
import time

if __name__ == "__main__":  # the test imports this module for its data: leave its jax alone
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=2 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=60"
    )

import jax
import numpy as np

D = 8
CHUNK_ROWS = 16
BLOCK_ROWS = 64
TOP_K = 9
WRITES = (3, 2)  # writes per process: the shards differ in length


def rows_of(pid: int) -> list[tuple[dict, dict]]:
    """Process ``pid``'s writes: ``(taps, keyword arguments)`` each, deterministic.

    Batches of 4 sequences of 25 tokens, right-padded; explicit, globally distinct sequence ids
    except in the last write (defaults, which the writer makes distinct across processes);
    process 1's second write holds a NaN row and a planted anomaly.
    """
    out = []
    for i in range(WRITES[pid]):
        rng = np.random.default_rng([pid, i])
        x = (rng.normal(size=(4, 25, D)) * 2 + 5).astype(np.float32)
        mask = np.ones((4, 25), bool)
        mask[:, 25 - (i + pid) % 4 :] = False
        if pid == 1 and i == 1:
            x[2, 3] = np.nan
            x[0, 5:9] += 12.0
        kw = {
            "mask": mask,
            "split": ("trusted", "query")[(i + pid) % 2],
            "label": np.array([0, 1, 0, 1]) * (i % 2),
            "tokens": [[f"p{pid}w{i}s{b}t{t}" for t in range(25)] for b in range(4)],
        }
        if i < WRITES[pid] - 1:
            kw["sequence_id"] = 1000 + 1000 * pid + 10 * i + np.arange(4)
        out.append(({"h": x, "g": x[..., :3] * 0.5}, kw))
    return out


def monitor():
    import jaxmon

    return jaxmon.monitor(
        {"h": jaxmon.gaussian(shrinkage="ledoit_wolf"), "g": jaxmon.gaussian(diagonal=True)}
    )


def fitted_from(path: str, mon, example):
    """The fitted value whose leaves ``path`` holds (bit for bit)."""
    abstract = jax.eval_shape(mon.finalize, jax.eval_shape(mon.init, example))
    leaves = np.load(path)
    n = len([k for k in leaves.files if k.startswith("fitted_")])
    return jax.tree.unflatten(
        jax.tree.structure(abstract), [leaves[f"fitted_{j}"] for j in range(n)]
    )


def main() -> None:
    pid, port, work, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid
    )
    from jaxmon import io, query

    assert jax.process_count() == 2 and jax.local_device_count() == 2
    store = os.path.join(work, "store")
    mon = monitor()
    if mode == "pipeline":
        with io.ActivationWriter(store, overwrite=True, chunk_rows=CHUNK_ROWS) as w:
            for taps, kw in rows_of(pid):
                w.write(taps, **kw)
        state, example = query.fit_store(store, mon, split="trusted")
        fitted = mon.finalize(state)
        np.savez(
            os.path.join(work, f"fit_{pid}.npz"),
            **{f"state_{j}": np.asarray(x) for j, x in enumerate(jax.tree.leaves(state))},
            **{f"fitted_{j}": np.asarray(x) for j, x in enumerate(jax.tree.leaves(fitted))},
        )
        query.score_store(
            store, mon, fitted, out=os.path.join(work, "q"), block_rows=BLOCK_ROWS, top_k=TOP_K
        )
        query.score_store_batch(
            store, out=os.path.join(work, "qb"), tap="h", block_rows=BLOCK_ROWS, top_k=TOP_K
        )
    elif mode == "score":
        out, kill_after, pause = sys.argv[5], int(sys.argv[6]), float(sys.argv[7])
        st = query.open_store(store)
        example = {
            t: jax.ShapeDtypeStruct((int(a.shape[1]),), a.dtype.numpy_dtype)
            for t, a in st.taps.items()
        }
        fitted = fitted_from(os.path.join(work, "fit_0.npz"), mon, example)
        scored = []

        def after_block(done: int, total: int) -> None:
            scored.append(done)
            with open(f"{out}.blocks-{pid}", "w") as f:
                f.write(str(len(scored)))
            if pid == 1 and len(scored) == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up at all, mid-query
            time.sleep(pause)

        query.score_store(
            st, mon, fitted, out=out, block_rows=BLOCK_ROWS, top_k=TOP_K, callback=after_block
        )
        with open(f"{out}.blocks-{pid}", "w") as f:
            f.write(str(len(scored)))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(f"process {pid}: {mode} done", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
