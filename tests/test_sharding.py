"""shard_local / merge_replicas on 8 forced CPU devices (and two processes) equal one device."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmon
import jaxmon.sharding as js

from laws import leaves_close, normal_rows

AUTO = jax.sharding.AxisType.Auto


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= 8, "conftest forces 8 CPU devices"
    return jax.make_mesh((8,), ("data",), axis_types=(AUTO,))


def _put(mesh, x, spec=None):
    return jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data") if spec is None else spec))


def test_sharded_gaussian_equals_single_device(mesh):
    rng = np.random.default_rng(0)
    g = jaxmon.gaussian(shrinkage="ledoit_wolf")
    sest = js.shard_local(g, mesh)
    ex = jax.ShapeDtypeStruct((6,), jnp.float32)
    s0 = sest.init(ex)
    traces = []

    @jax.jit
    def step(s, x, m):
        traces.append(1)
        return sest.update(s, x, mask=m)

    s, ref = s0, g.init(ex)
    all_rows = []
    for _ in range(3):
        x = normal_rows(rng, 16 * 4, 6).reshape(16, 4, 6)
        m = rng.random((16, 4)) < 0.7
        x[~m] = 1e4  # padding garbage must not leak in
        s = step(s, _put(mesh, x), _put(mesh, m))
        s.counts.rows.block_until_ready()  # the deadlock trap: block every step
        ref = g.update(ref, jnp.asarray(x), mask=jnp.asarray(m))
        all_rows.append(x[m])
    assert len(traces) == 1
    for u, v in zip(jax.tree.leaves(s), jax.tree.leaves(s0), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype and u.shape[0] == 8
        assert u.sharding.spec == P("data") == v.sharding.spec
    merged = js.merge_replicas(sest, s)
    leaves_close(merged, ref, rtol=1e-4, atol=1e-3)
    rows = np.concatenate(all_rows).astype(np.float64)
    assert jaxmon.num_rows(merged) == len(rows)
    np.testing.assert_allclose(np.asarray(merged.mean), rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(sest.finalize(s).covariance),
        np.asarray(g.finalize(ref).covariance),
        rtol=1e-4,
        atol=1e-5,
    )
    # Replica-wise merge of two sharded states equals merging the single-device states.
    leaves_close(js.merge_replicas(sest, sest.merge(s, s)), g.merge(ref, ref), rtol=1e-4, atol=1e-3)


def test_sharded_monitor_with_stacked_taps_and_every_k(mesh):
    rng = np.random.default_rng(1)
    mon = jaxmon.every_k(
        jaxmon.monitor(
            {"blocks/*/resid": jaxmon.gaussian(), "embed": {"d": jaxmon.gaussian(diagonal=True)}},
            stacked={"blocks/resid": "blocks/{i}/resid"},
        ),
        2,
    )
    sest = js.shard_local(mon, mesh, batch_axis={"blocks/resid": 1})
    taps0 = {
        "blocks/resid": jax.ShapeDtypeStruct((3, 8, 5, 4), jnp.float32),
        "embed": jax.ShapeDtypeStruct((8, 5, 4), jnp.float32),
    }
    s, ref = sest.init(taps0), mon.init(taps0)
    for _ in range(3):
        taps = {
            "blocks/resid": normal_rows(rng, 120, 4).reshape(3, 8, 5, 4),
            "embed": normal_rows(rng, 40, 4).reshape(8, 5, 4),
        }
        m = rng.random((8, 5)) < 0.6
        staps = {
            "blocks/resid": _put(mesh, taps["blocks/resid"], P(None, "data")),
            "embed": _put(mesh, taps["embed"]),
        }
        s = sest.update(s, staps, mask=_put(mesh, m))
        jax.block_until_ready(s)
        ref = mon.update(ref, {k: jnp.asarray(v) for k, v in taps.items()}, mask=jnp.asarray(m))
    merged = js.merge_replicas(sest, s)
    # every_k sums call counters over merged replicas: compare the summaries.
    leaves_close(merged.inner, ref.inner, rtol=1e-4, atol=1e-4)
    assert int(merged.calls) == 8 * 3
    assert sorted(merged.inner) == ["blocks/0/resid", "blocks/1/resid", "blocks/2/resid", "embed:d"]


def test_merged_counters_stay_exact_past_2_to_32(mesh):
    """Replica counters near 2^32: a leaf-wise psum of the [lo, hi] words would drop carries."""
    g = jaxmon.gaussian()
    sest = js.shard_local(g, mesh)
    s = sest.init(jax.ShapeDtypeStruct((3,), jnp.float32))
    s = sest.update(s, _put(mesh, normal_rows(np.random.default_rng(2), 16, 3)))
    big = np.array([2**32 - 7, 1], np.uint32)
    rows = jnp.broadcast_to(jnp.asarray(big)[None], (8, 2))
    s = s._replace(counts=s.counts._replace(rows=_put(mesh, rows)))
    merged = js.merge_replicas(sest, s)
    assert jaxmon.num_rows(merged) == 8 * (2**32 - 7 + 2**32)


def test_two_dimensional_mesh_and_spec_round_trip():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AUTO, AUTO))
    g = jaxmon.gaussian()
    sest = js.shard_local(g, mesh)
    x = normal_rows(np.random.default_rng(3), 32, 5)
    s = sest.update(sest.init(jax.ShapeDtypeStruct((5,), jnp.float32)), _put(mesh, x))
    jax.block_until_ready(s)
    assert jax.tree.leaves(s)[0].shape[0] == 4 == js.replica_count(s)
    ref = g.update(g.init(jax.ShapeDtypeStruct((5,), jnp.float32)), jnp.asarray(x))
    leaves_close(js.merge_replicas(sest, s), ref, rtol=1e-4, atol=1e-4)
    rebuilt = jaxmon.from_spec(sest.spec.to_json())
    assert rebuilt.spec.params == {**sest.spec.params}
    leaves_close(js.merge_replicas(rebuilt, s), ref, rtol=1e-4, atol=1e-4)


def test_shard_wide_splits_the_d_by_d_state_over_the_model_axis():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO))
    g = jaxmon.gaussian()
    wide = js.shard_wide(jaxmon.monitor({"h": g}), mesh, "model")
    ex = {"h": jax.ShapeDtypeStruct((6, 8), jnp.float32)}
    s0 = wide.init(ex)
    rng = np.random.default_rng(4)
    s, ref = s0, g.init(jax.ShapeDtypeStruct((8,), jnp.float32))
    for _ in range(2):
        x = normal_rows(rng, 48, 8).reshape(6, 8, 8)
        s = wide.update(s, {"h": _put(mesh, x)})
        jax.block_until_ready(s)
        ref = g.update(ref, jnp.asarray(x))
    m2 = s["h"].m2
    assert m2.sharding.spec == P(None, "model") == s0["h"].m2.sharding.spec
    assert m2.addressable_shards[0].data.shape == (8, 2)  # d²/4 floats per device
    leaves_close(s["h"], ref, rtol=1e-4, atol=1e-4)
    leaves_close(wide.merge(s, s)["h"], g.merge(ref, ref), rtol=1e-4, atol=1e-4)
    f = wide.finalize(s)["h"]
    np.testing.assert_allclose(
        np.asarray(f.covariance), np.asarray(g.finalize(ref).covariance), rtol=1e-4, atol=1e-5
    )
    assert jaxmon.from_spec(wide.spec.to_json()).spec == wide.spec


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_distributed(tmp_path):
    """Two local CPU processes (2 devices each) under jax.distributed, a 4-device global mesh."""
    worker = Path(__file__).with_name("_multihost_worker.py")
    out = tmp_path / "merged.npz"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    procs = [
        subprocess.Popen(
            ["timeout", "-k", "5", "150", sys.executable, str(worker), str(i), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate()[0].decode(errors="replace") for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    r = np.load(out)
    assert int(r["processes"]) == 2 and int(r["replicas"]) == 4
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(3):
        x = (rng.standard_normal((8, 3, 5)) * 2 + 5).astype(np.float32)
        m = rng.random((8, 3)) < 0.7
        rows.append(x[m].astype(np.float64))
    rows = np.concatenate(rows)
    assert int(r["rows"][0]) == len(rows) and int(r["rows"][1]) == 0
    np.testing.assert_allclose(r["mean"], rows.mean(0), rtol=1e-5)
    centred = rows - rows.mean(0)
    np.testing.assert_allclose(r["m2"], centred.T @ centred, rtol=1e-4, atol=1e-3)
