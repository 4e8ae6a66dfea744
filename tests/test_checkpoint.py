"""Checkpoints: bit-exact round trips, resume, shardings, merges, splicing, errors, SIGKILL."""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jaxmon
from jaxmon import checkpoint

from laws import assert_trees_equal, sigkill_when

D = 16
EXAMPLE = jax.ShapeDtypeStruct((D,), jnp.float32)


def _rows(rng, n, d=D):
    return jnp.asarray(rng.normal(size=(n, d)) * 3.0 + 1.0, jnp.float32)


@pytest.fixture
def fitted_gaussian(rng):
    est = jaxmon.gaussian(shrinkage="ledoit_wolf")
    state = est.update(est.init(EXAMPLE), _rows(rng, 300))
    return est, state, est.finalize(state)


def test_round_trip_is_bit_exact_and_needs_no_user_code(tmp_path, fitted_gaussian):
    est, state, fitted = fitted_gaussian
    checkpoint.save(tmp_path, est, state, fitted=fitted, step=7, metadata={"model": "tiny"})
    ck = jaxmon.load(tmp_path)
    assert ck.step == 7
    assert ck.estimator.spec == est.spec
    assert_trees_equal(ck.state, state)
    assert_trees_equal(ck.fitted, fitted)
    assert ck.metadata["rows"] == 300 == jaxmon.num_rows(ck.state)
    assert ck.metadata["example"] == {"shape": [D], "dtype": "float32"}  # inferred
    assert ck.metadata["user"] == {"model": "tiny"}
    assert ck.metadata["jaxmon_version"] == jaxmon.__version__
    # The rebuilt estimator scores exactly like the original.
    q = _rows(np.random.default_rng(5), 20)
    np.testing.assert_array_equal(ck.estimator.score(ck.fitted, q), est.score(fitted, q))


def test_latest_and_given_steps(tmp_path, rng):
    est = jaxmon.gaussian(diagonal=True)
    s = est.init(EXAMPLE)
    saved = []
    for step in (0, 5, 10):
        s = est.update(s, _rows(rng, 10))
        checkpoint.save(tmp_path, est, s, step=step)
        saved.append(s)
    assert checkpoint.steps(tmp_path) == [0, 5, 10]
    assert_trees_equal(jaxmon.load(tmp_path).state, saved[-1])
    assert_trees_equal(jaxmon.load(tmp_path, step=5).state, saved[1])
    assert jaxmon.load(tmp_path).fitted is None
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        checkpoint.save(tmp_path, est, s, step=5)


def test_resume_accumulation_exactly(tmp_path, rng):
    est = jaxmon.gaussian()
    a, b = _rows(rng, 64), _rows(rng, 64)
    s_a = est.update(est.init(EXAMPLE), a)
    checkpoint.save(tmp_path, est, s_a)
    ck = jaxmon.load(tmp_path)
    assert_trees_equal(ck.estimator.update(ck.state, b), est.update(s_a, b))


def test_restore_onto_eight_devices_replicated_and_sharded(tmp_path, fitted_gaussian):
    est, state, fitted = fitted_gaussian
    checkpoint.save(tmp_path, est, state, fitted=fitted)
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, PartitionSpec())
    ck = checkpoint.load(tmp_path, sharding=replicated)
    for leaf in jax.tree_util.tree_leaves((ck.state, ck.fitted)):
        assert leaf.sharding == replicated
    assert_trees_equal(ck.state, state)

    # Shard every matrix by rows over the 8 devices, replicate the rest.
    def rows_sharded(sds):
        return NamedSharding(mesh, PartitionSpec("x") if len(sds.shape) == 2 else PartitionSpec())

    ck = checkpoint.load(tmp_path, sharding=rows_sharded)
    assert ck.state.m2.sharding.spec == PartitionSpec("x")
    assert len(ck.state.m2.addressable_shards) == 8
    assert ck.state.m2.addressable_shards[0].data.shape == (D // 8, D)
    assert_trees_equal(ck.state, state)
    assert_trees_equal(ck.fitted, fitted)
    # A pytree of shardings works too.
    tree = jax.tree_util.tree_map(lambda _: replicated, state)
    ck = checkpoint.load(tmp_path, sharding=tree, with_fitted=False)
    assert ck.state.mean.sharding == replicated and ck.fitted is None


def test_merge_states_saved_by_separate_jobs(tmp_path, rng):
    est = jaxmon.gaussian(shrinkage="oas")
    parts = [_rows(rng, 64) for _ in range(3)]
    states = [est.update(est.init(EXAMPLE), p) for p in parts]
    dirs = []
    for i, s in enumerate(states):
        dirs.append(tmp_path / f"job{i}")
        checkpoint.save(dirs[-1], est, s, step=3)
    merged = checkpoint.merge(dirs, finalize=True)
    expected = est.merge(est.merge(states[0], states[1]), states[2])
    assert_trees_equal(merged.state, expected)
    assert merged.metadata["rows"] == 192
    one_pass = est.update(est.init(EXAMPLE), jnp.concatenate(parts))
    np.testing.assert_allclose(merged.state.m2, one_pass.m2, rtol=2e-5, atol=1e-3)
    np.testing.assert_allclose(merged.fitted.covariance, est.finalize(one_pass).covariance, 1e-5)

    other = tmp_path / "other"
    checkpoint.save(other, jaxmon.gaussian(), states[0])
    with pytest.raises(checkpoint.CheckpointError, match="spec"):
        checkpoint.merge([dirs[0], other])


def test_mismatches_give_clear_errors(tmp_path, fitted_gaussian):
    est, state, fitted = fitted_gaussian
    checkpoint.save(tmp_path, est, state, fitted=fitted)
    with pytest.raises(checkpoint.CheckpointError, match="differs from the given estimator"):
        checkpoint.load(tmp_path, estimator=jaxmon.gaussian())
    with pytest.raises(checkpoint.CheckpointError, match=r"float32\[16\] in the checkpoint"):
        checkpoint.load(tmp_path, estimator=est, example=jax.ShapeDtypeStruct((8,), jnp.float32))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint directory"):
        checkpoint.load(tmp_path / "missing")
    with pytest.raises(checkpoint.CheckpointError, match="no step 3"):
        checkpoint.load(tmp_path, step=3)
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        checkpoint.save(tmp_path / "b", est, state, example=jax.ShapeDtypeStruct((4,), jnp.float32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.load(tmp_path / "empty")


def test_splices_into_the_users_composite_checkpoint(tmp_path, fitted_gaussian):
    est, state, fitted = fitted_gaussian
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    opt_state = optax.adam(1e-3).init(params)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(
            12,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                **checkpoint.save_args(est, state, fitted=fitted, step=12),
            ),
        )
        mngr.wait_until_finished()
    # load() reads only sealed steps: seal what the user's own manager wrote.
    checkpoint.seal(tmp_path, 12)
    abstract = lambda t: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, t)
    with ocp.CheckpointManager(tmp_path) as mngr:
        out = mngr.restore(
            12,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(params)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state)),
                **checkpoint.restore_args(est, EXAMPLE, fitted=True),
            ),
        )
    assert_trees_equal(out["params"], params)
    ck = checkpoint.restored(out, est=est, example=EXAMPLE)
    assert ck.step == 12
    assert_trees_equal(ck.state, state)
    assert_trees_equal(ck.fitted, fitted)
    # The jaxmon items alone are a complete jaxmon checkpoint too.
    assert_trees_equal(checkpoint.load(tmp_path, step=12).state, state)
    with pytest.raises(checkpoint.CheckpointError, match="differs"):
        checkpoint.restored(out, est=jaxmon.gaussian(diagonal=True))


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    from _kill_save import states

    d = 3000  # a 36 MB covariance: its save takes long enough to be killed mid-way
    directory = tmp_path / "ck"
    script = os.path.join(os.path.dirname(__file__), "_kill_save.py")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, script, str(directory), str(d)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "step0"
    assert proc.stdout.readline().strip() == "saving1"

    def well_inside_the_save() -> bool:
        if not any("tmp" in n for n in os.listdir(directory)):
            return False
        time.sleep(0.05)  # the step's temp dir exists: its data files are being written
        return True

    sigkill_when(proc, well_inside_the_save, timeout=60, poll=0.002)
    assert any("tmp" in n for n in os.listdir(directory))  # the interrupted step's leftovers
    assert checkpoint.steps(directory) == [0]
    est, s0, s1 = states(d)
    ck = jaxmon.load(directory)
    assert ck.step == 0
    assert_trees_equal(ck.state, s0)
    # The next save in the same directory cleans the leftovers and succeeds.
    checkpoint.save(directory, est, s1, step=1)
    assert not any("tmp" in n for n in os.listdir(directory))
    assert_trees_equal(jaxmon.load(directory).state, s1)


def test_monitor_round_trip_and_example_check(tmp_path, rng):
    # (A calibrated monitor, whose fitted value is a registered dataclass with a static field,
    # is round-tripped by tests/test_cli.py's fit/score run.)
    mon = jaxmon.monitor({"blocks/*/out": jaxmon.gaussian(shrinkage=0.1)})
    example = {
        "blocks/0/out": jax.ShapeDtypeStruct((D,), jnp.float32),
        "blocks/1/out": jax.ShapeDtypeStruct((4,), jnp.float32),
    }
    taps = lambda n: {"blocks/0/out": _rows(rng, n), "blocks/1/out": _rows(rng, n, 4)}
    state = mon.update(mon.init(example), taps(64))
    fitted = mon.finalize(state)
    checkpoint.save(tmp_path, mon, state, fitted=fitted, example=example)
    ck = jaxmon.load(tmp_path)
    assert_trees_equal(ck.state, state)
    assert_trees_equal(ck.fitted, fitted)
    assert jaxmon.num_rows(ck.state) == jaxmon.num_rows(state)
    assert ck.example == example
    q = taps(16)
    for k, v in ck.estimator.score(ck.fitted, q).items():
        np.testing.assert_array_equal(v, mon.score(fitted, q)[k])
    wrong = dict(example, **{"blocks/1/out": jax.ShapeDtypeStruct((5,), jnp.float32)})
    with pytest.raises(checkpoint.CheckpointError, match="blocks/1/out"):
        checkpoint.load(tmp_path, estimator=mon, example=wrong)


def test_items_saved_under_another_prefix_seal_and_load(tmp_path, fitted_gaussian):
    """``save_args(prefix=...)`` names the items; ``seal`` and ``load`` take the same prefix."""
    est, state, fitted = fitted_gaussian
    other = jaxmon.gaussian(diagonal=True)
    other_state = other.update(other.init(EXAMPLE), _rows(np.random.default_rng(3), 50))
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(
            4,
            args=ocp.args.Composite(
                **checkpoint.save_args(est, state, fitted=fitted, step=4, prefix="probe_a"),
                **checkpoint.save_args(other, other_state, step=4, prefix="probe_b"),
            ),
        )
        mngr.wait_until_finished()
    with pytest.raises(checkpoint.CheckpointError, match="another prefix"):
        checkpoint.seal(tmp_path, 4)
    checkpoint.seal(tmp_path, 4, prefix="probe_a")
    ck = checkpoint.load(tmp_path, prefix="probe_a")
    assert ck.step == 4 and ck.estimator.spec == est.spec
    assert_trees_equal(ck.state, state)
    assert_trees_equal(ck.fitted, fitted)
    with pytest.raises(checkpoint.CheckpointError, match=r"probe_b_.* not written by"):
        checkpoint.load(tmp_path, prefix="probe_b")  # its files are not in the digest record
    # The digest record covers the sealed prefix's items, and a flipped bit there is caught.
    record = (tmp_path / "4" / checkpoint.DIGESTS).read_text()
    assert "probe_a_state/" in record and "probe_b_state/" not in record
    data = max(
        (p for p in (tmp_path / "4" / "probe_a_state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load(tmp_path, prefix="probe_a")
