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
    assert js.state_sharding(wide)(m2) == m2.sharding
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


# --------------------------------------------------------------------------- wide taps


def _moments64(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = rows.astype(np.float64)
    c = rows - rows.mean(0)
    return rows.mean(0), c.T @ c


def _collective_shapes(compiled_text: str) -> list[str]:
    """Result shapes of every cross-device collective in compiled HLO text."""
    import re

    ops = r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    return re.findall(rf"= (\([^()]*\)|\S+) {ops}(?:-start)?\(", compiled_text)


def test_shard_wide_composed_with_shard_local_on_a_data_by_model_mesh():
    """Replicas over "data", each replica's d×d moments split by columns over "model"."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AUTO, AUTO))
    g = jaxmon.gaussian(shrinkage="ledoit_wolf")
    sest = js.shard_wide(js.shard_local(g, mesh, "data"), mesh, "model")
    assert sest.spec == js.shard_local(g, mesh, "data", model_axis="model").spec
    d = 24
    s0 = sest.init(jax.ShapeDtypeStruct((d,), jnp.float32))
    rng = np.random.default_rng(5)
    s, rows, per_replica = s0, [], [[] for _ in range(4)]
    for _ in range(3):
        x = (normal_rows(rng, 64, d) * 3 + 40).astype(np.float32)  # means far above the spread
        m = rng.random(64) < 0.8
        s = sest.update(s, _put(mesh, x), mask=_put(mesh, m))
        jax.block_until_ready(s)  # the deadlock trap: block every step
        rows.append(x[m])
        for r in range(4):  # the rows of data group r: its contiguous quarter of the batch
            sl = slice(16 * r, 16 * (r + 1))
            per_replica[r].append(x[sl][m[sl]])
    for leaf, leaf0 in zip(jax.tree.leaves(s), jax.tree.leaves(s0), strict=True):
        assert leaf.sharding.spec == leaf0.sharding.spec and leaf.shape == leaf0.shape
    assert s.m2.sharding.spec == P("data", None, "model")
    assert s.m2.addressable_shards[0].data.shape == (1, d, d // 2)  # d²/2 floats per device
    # Each replica holds exactly its own group's rows: nothing crossed the data axis.
    for r in range(4):
        mean, m2 = _moments64(np.concatenate(per_replica[r]))
        np.testing.assert_allclose(np.asarray(s.mean[r]), mean, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(s.m2[r]), m2, rtol=2e-5, atol=2e-3)
    # What crosses the model axis per update is O(n·d): never a d×d matrix.
    text = jax.jit(sest.update).lower(s, _put(mesh, x), mask=_put(mesh, m)).compile().as_text()
    shapes = _collective_shapes(text)
    assert shapes, "expected some O(n·d) collectives over the model axis"
    assert not any(f"{d},{d}]" in sh or f"{d},{d // 2}]" in sh for sh in shapes), shapes
    merged = js.merge_replicas(sest, s)
    assert merged.m2.sharding.spec == P(None, "model")
    all_rows = np.concatenate(rows)
    mean, m2 = _moments64(all_rows)
    assert jaxmon.num_rows(merged) == len(all_rows)
    np.testing.assert_allclose(np.asarray(merged.mean), mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(merged.m2), m2, rtol=2e-5, atol=2e-3)
    from sklearn.covariance import LedoitWolf

    ref = LedoitWolf().fit(all_rows.astype(np.float64)).covariance_
    np.testing.assert_allclose(np.asarray(sest.finalize(s).covariance), ref, rtol=1e-4, atol=1e-4)
    # Replica-wise merge keeps the layout and equals merging the rows twice.
    twice = js.merge_replicas(sest, sest.merge(s, s))
    assert sest.merge(s, s).m2.sharding.spec == P("data", None, "model")
    np.testing.assert_allclose(np.asarray(twice.m2), 2 * m2, rtol=2e-5, atol=4e-3)
    assert jaxmon.from_spec(sest.spec.to_json()).spec == sest.spec


def test_wide_replicas_checkpoint_onto_a_mesh_of_another_shape(tmp_path):
    """Saved on a (4 data × 2 model) mesh, restored onto (2 × 4), regrouped, continued."""
    from jaxmon import checkpoint

    from laws import assert_trees_equal

    d = 16
    g = jaxmon.gaussian()
    mesh_a = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AUTO, AUTO))
    sest_a = js.shard_local(g, mesh_a, "data", model_axis="model")
    rng = np.random.default_rng(6)
    s_a, rows = sest_a.init(jax.ShapeDtypeStruct((d,), jnp.float32)), []
    for _ in range(2):
        x = (normal_rows(rng, 32, d) + 7).astype(np.float32)
        s_a = sest_a.update(s_a, _put(mesh_a, x))
        jax.block_until_ready(s_a)
        rows.append(x)
    checkpoint.save(tmp_path / "ck", sest_a, s_a, fitted=sest_a.finalize(s_a))

    mesh_b = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO))
    sest_b = js.shard_local(g, mesh_b, "data", model_axis="model")
    ck = checkpoint.load(
        tmp_path / "ck",
        sharding=js.state_sharding(sest_b),  # the same layout rule, on the new mesh
        fitted_sharding=NamedSharding(mesh_b, P()),
    )
    assert ck.estimator.spec == sest_a.spec
    assert ck.state.m2.sharding.spec == P("data", None, "model")
    assert ck.state.m2.addressable_shards[0].data.shape == (2, d, d // 4)
    assert_trees_equal(ck.state, s_a)  # bit for bit, whatever the layout
    s_b = js.merge_replicas(ck.estimator, ck.state, into=sest_b)
    assert js.replica_count(s_b) == 2 and s_b.m2.sharding.spec == P("data", None, "model")
    assert s_b.m2.addressable_shards[0].data.shape == (1, d, d // 4)
    x = (normal_rows(rng, 32, d) + 7).astype(np.float32)
    s_b = sest_b.update(s_b, _put(mesh_b, x))
    jax.block_until_ready(s_b)
    rows.append(x)
    merged = js.merge_replicas(sest_b, s_b)
    mean, m2 = _moments64(np.concatenate(rows))
    assert jaxmon.num_rows(merged) == 96
    np.testing.assert_allclose(np.asarray(merged.mean), mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(merged.m2), m2, rtol=2e-5, atol=1e-3)
    with pytest.raises(jaxmon.errors.ConfigError, match="cannot be grouped"):
        mesh_c = jax.make_mesh((8,), ("data",), axis_types=(AUTO,))
        js.merge_replicas(sest_b, s_b, into=js.shard_local(g, mesh_c))
