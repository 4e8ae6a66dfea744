"""Checkpoint format 2: no code from data, verified files, restore from spec + example, and the
committed fixture every later version must load.

Every crafted-file case asserts a CheckpointError of one line of at most 300 characters that
names the offending file, with the lower layer's error chained as ``__cause__``.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmon
import jaxmon.sharding as js
from jaxmon import checkpoint

from laws import assert_trees_equal

D = 16
EXAMPLE = jax.ShapeDtypeStruct((D,), jnp.float32)
FIXTURES = Path(__file__).parent / "fixtures"
SYNC = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)


def _rows(rng, n, d=D):
    return jnp.asarray(rng.normal(size=(n, d)) * 3.0 + 1.0, jnp.float32)


def _refused(fn, *names, cause=True):
    """Runs ``fn``; asserts a one-sentence CheckpointError naming ``names``; returns it."""
    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    msg = str(err)
    assert "Checkpoint" in type(err).__name__, repr(err)
    assert len(msg) <= 300 and "\n" not in msg and msg.endswith((".", "?")), msg
    for name in names:
        assert name in msg, (name, msg)
    if cause:
        assert err.__cause__ is not None, msg
    return err


@pytest.fixture
def saved(tmp_path, rng):
    """Two verified steps (0 and 1) of a Ledoit-Wolf Gaussian with fitted values."""
    est = jaxmon.gaussian(shrinkage="ledoit_wolf")
    s0 = est.update(est.init(EXAMPLE), _rows(rng, 300))
    s1 = est.update(s0, _rows(rng, 100))
    root = tmp_path / "ck"
    for step, s in enumerate((s0, s1)):
        checkpoint.save(root, est, s, fitted=est.finalize(s), step=step)
    return root, est, (s0, s1)


def _largest_file(step_dir, item):
    files = [p for p in (step_dir / item).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _rel(step_dir, path):
    return path.relative_to(step_dir).as_posix()


def _edit_meta(step_dir, edit, *, reseal=True):
    """Edits ``jaxmon_meta`` as JSON (as an attacker or a bad tool would) and re-seals the step."""
    path = step_dir / "jaxmon_meta" / "metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    if reseal:
        (step_dir / checkpoint.DIGESTS).unlink()
        checkpoint.seal(step_dir.parent, int(step_dir.name))


# --------------------------------------------------------------------------- format


def test_metadata_records_format_2_spec_example_and_type_names_only(saved):
    root, est, (_, s1) = saved
    ck = jaxmon.load(root)
    m = ck.metadata
    assert (
        m["format"] == "jaxmon-checkpoint" and m["format_version"] == 2 == checkpoint.FORMAT_VERSION
    )
    assert m["spec"] == est.spec.to_dict()
    assert m["example"] == {"shape": [D], "dtype": "float32"}

    def nodes(t):
        yield t
        for _, sub in t.get("fields", []):
            yield from nodes(sub)
        for sub in t.get("items", []):
            yield from nodes(sub[1] if isinstance(sub, list) else sub)

    for tree in (m["state_tree"], m["fitted_tree"]):
        for node in nodes(tree):
            assert "cls" not in node
            assert ":" not in node.get("type", "") and "." not in node.get("type", "")
    assert m["state_tree"]["type"] == type(s1).__name__
    # The digest record covers every file of the step, with its size.
    step_dir = root / "1"
    record = json.loads((step_dir / checkpoint.DIGESTS).read_text())
    files = sorted(
        _rel(step_dir, p)
        for p in step_dir.rglob("*")
        if p.is_file() and p.name != checkpoint.DIGESTS
    )
    assert sorted(record["files"]) == files
    for rel, entry in record["files"].items():
        assert entry["size"] == (step_dir / rel).stat().st_size
        assert len(entry["sha256"]) == 64


# --------------------------------------------------------------------------- no code from data


def test_metadata_naming_code_runs_nothing(saved, monkeypatch):
    root = saved[0]
    marker = root.parent / "pwned"
    command = f"touch {marker}"
    imported = []
    real_import = __import__("importlib").import_module

    def spy(name, *args, **kwargs):
        imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("importlib.import_module", spy)

    def os_system_node(meta):
        # What format 1 would have imported and called as os.system(command=...).
        meta["state_tree"]["cls"] = "os:system"
        meta["state_tree"]["type"] = "system"
        meta["state_tree"]["fields"].append(["command", {"t": "static", "value": command}])

    step1 = root / "1"
    shutil.copytree(step1, root.parent / "backup")
    # Edited without re-sealing: the digest record catches it first.
    _edit_meta(step1, os_system_node, reseal=False)
    _refused(lambda: jaxmon.load(root, step=1), "jaxmon_meta/metadata")
    # Edited and re-sealed (a deliberate edit): the record is compared, never imported.
    _edit_meta(step1, lambda m: None)
    _refused(lambda: jaxmon.load(root, step=1), "jaxmon_meta", "command")
    assert not marker.exists()

    # A class path alone (fields unchanged) is ignored: the data restores as usual.
    shutil.rmtree(step1)
    shutil.copytree(root.parent / "backup", step1)

    def class_path_only(meta):
        meta["state_tree"]["cls"] = "os:system"
        meta["fitted_tree"]["cls"] = "subprocess:run"

    _edit_meta(step1, class_path_only)
    assert jaxmon.load(root, step=1).state is not None

    # A spec naming something outside the registry.
    def spec_names_code(meta):
        meta["spec"] = {"name": "os:system", "params": {"command": command}}

    _edit_meta(root / "0", spec_names_code)
    err = _refused(lambda: jaxmon.load(root, step=0), "os:system")
    assert isinstance(err.__cause__, jaxmon.errors.ConfigError)
    assert not marker.exists()
    assert not [n for n in imported if not n.startswith("jaxmon")], imported


def test_format_1_checkpoint_is_refused_without_importing_it(saved, monkeypatch):
    root, _, _ = saved
    marker = root.parent / "pwned"

    def as_format_1(meta):
        meta["format_version"] = 1
        meta["state_tree"]["cls"] = "os:system"
        meta["state_tree"]["fields"].append(
            ["command", {"t": "static", "value": f"touch {marker}"}]
        )

    for step in ("0", "1"):  # format 1 wrote no digest record
        _edit_meta(root / step, as_format_1, reseal=False)
        (root / step / checkpoint.DIGESTS).unlink()
    for call in (lambda: jaxmon.load(root), lambda: jaxmon.load(root, step=0)):
        _refused(call, "older jaxmon checkpoint format (version 1)", "re-save", cause=False)
    assert checkpoint.steps(root) == []
    assert not marker.exists()


def test_newer_format_is_refused(saved):
    root, _, _ = saved
    _edit_meta(root / "1", lambda m: m.update(format_version=3))
    _refused(lambda: jaxmon.load(root), "newer jaxmon", cause=False)


# --------------------------------------------------------------------------- verified files


def test_bit_flip_in_a_data_file(saved):
    root, _, (s0, _) = saved
    step1 = root / "1"
    data = _largest_file(step1, "jaxmon_state")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    for call in (lambda: jaxmon.load(root), lambda: jaxmon.load(root, step=1)):
        _refused(call, _rel(step1, data), "corrupted", str(root))
    assert checkpoint.steps(root) == [0, 1]  # listed, but never loaded silently
    assert_trees_equal(jaxmon.load(root, step=0).state, s0)


def test_deleted_data_file(saved):
    root, _, _ = saved
    step1 = root / "1"
    data = _largest_file(step1, "jaxmon_fitted")
    data.unlink()
    err = _refused(lambda: jaxmon.load(root), _rel(step1, data), "missing")
    assert isinstance(err.__cause__, FileNotFoundError)
    # Without the fitted value the state alone is intact and loads.
    assert jaxmon.load(root, with_fitted=False).fitted is None


def test_truncated_data_file(saved):
    root, _, _ = saved
    step1 = root / "1"
    data = _largest_file(step1, "jaxmon_state")
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 3])
    _refused(lambda: jaxmon.load(root), _rel(step1, data), "truncated")


def test_garbled_metadata(saved):
    root, _, _ = saved
    meta = root / "1" / "jaxmon_meta" / "metadata"
    meta.write_text('{"format": "jaxmon-checkpoint", "spec": {nope')
    _refused(lambda: jaxmon.load(root), "jaxmon_meta/metadata")
    # Re-sealed (the record agrees with the garbled file): the JSON itself is refused.
    (root / "1" / checkpoint.DIGESTS).unlink()
    checkpoint.seal(root, 1)
    _refused(lambda: jaxmon.load(root), "jaxmon_meta", "step 1")
    # Valid JSON that is no jaxmon record.
    meta.write_text('{"hello": 1}')
    (root / "1" / checkpoint.DIGESTS).unlink()
    checkpoint.seal(root, 1)
    _refused(lambda: jaxmon.load(root), "jaxmon_meta", "no jaxmon metadata record", cause=False)


def test_missing_digest_record_is_an_interrupted_save(saved, rng):
    root, est, (s0, s1) = saved
    (root / "1" / checkpoint.DIGESTS).unlink()
    assert checkpoint.steps(root) == [0]
    ck = jaxmon.load(root)  # the previous, verified step
    assert ck.step == 0
    assert_trees_equal(ck.state, s0)
    err = _refused(lambda: jaxmon.load(root, step=1), checkpoint.DIGESTS, "interrupted")
    assert isinstance(err.__cause__, FileNotFoundError)
    # Saving that step again replaces it.
    s2 = est.update(s1, _rows(rng, 5))
    checkpoint.save(root, est, s2, step=1)
    assert checkpoint.steps(root) == [0, 1]
    assert_trees_equal(jaxmon.load(root).state, s2)


def test_garbled_digest_record_and_unexpected_file(saved):
    root, _, _ = saved
    (root / "1" / checkpoint.DIGESTS).write_text("{garbled")
    err = _refused(lambda: jaxmon.load(root), checkpoint.DIGESTS)
    assert isinstance(err.__cause__, json.JSONDecodeError)
    extra = root / "0" / "jaxmon_state" / "d" / "planted"
    extra.write_bytes(b"\0" * 8)
    _refused(lambda: jaxmon.load(root, step=0), "jaxmon_state/d/planted", "not written by")
    escape = {"format": "jaxmon-digests", "algorithm": "sha256", "files": {"../x": {}}}
    (root / "1" / checkpoint.DIGESTS).write_text(json.dumps(escape))
    _refused(lambda: jaxmon.load(root, step=1), checkpoint.DIGESTS)


def test_save_refuses_what_load_could_not_restore(tmp_path, rng):
    est = jaxmon.gaussian()
    state = est.update(est.init(EXAMPLE), _rows(rng, 40))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _refused(lambda: checkpoint.save(a_file, est, state), "a_file", "not a directory", cause=False)
    mon = jaxmon.monitor({"a": jaxmon.gaussian()})
    mstate = mon.update(mon.init({"a": EXAMPLE}), {"a": _rows(rng, 8)})
    _refused(lambda: checkpoint.save(tmp_path / "m", mon, mstate), "example=", cause=False)
    assert not (tmp_path / "m").exists()
    other_fitted = jaxmon.gaussian(diagonal=True)
    wrong = other_fitted.finalize(other_fitted.update(other_fitted.init(EXAMPLE), _rows(rng, 40)))
    _refused(
        lambda: checkpoint.save(tmp_path / "f", est, state, fitted=wrong), "fitted", cause=False
    )
    _refused(
        lambda: checkpoint.save(tmp_path / "u", est, state, metadata={"x": object()}),
        "JSON",
    )


def test_orbax_failures_are_one_sentence(saved):
    root, _, _ = saved
    # The data file orbax reads for the state is replaced by another valid-looking file and
    # the step re-sealed: the digests agree, orbax itself fails, and says so in one sentence.
    step1 = root / "1"
    for p in (step1 / "jaxmon_state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(b"\0" * p.stat().st_size)
    (step1 / checkpoint.DIGESTS).unlink()
    checkpoint.seal(root, 1)
    _refused(lambda: jaxmon.load(root), "step 1", str(root))


# --------------------------------------------------------------------------- restore from spec


def _monitor():
    return jaxmon.monitor(
        {
            "blocks/*/out": {
                "gauss": jaxmon.gaussian(shrinkage="ledoit_wolf"),
                "knn": jaxmon.knn(k=3, bank_size=64),
            }
        }
    )


def _taps(rng, n, widths=(8, 5)):
    return {f"blocks/{i}/out": _rows(rng, n, w) for i, w in enumerate(widths)}


def test_calibrated_monitor_restores_from_spec_and_example(tmp_path, rng):
    cal = jaxmon.calibrated(_monitor())
    example = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in _taps(rng, 1).items()}
    s = cal.update(cal.init(example), _taps(rng, 300))
    s = jaxmon.begin_calibration(cal, s)
    s = cal.update(s, _taps(rng, 200))
    fitted = cal.finalize(s)
    checkpoint.save(tmp_path / "ck", cal, s, fitted=fitted, example=example)
    ck = jaxmon.load(tmp_path / "ck")
    assert_trees_equal(ck.state, s)
    assert_trees_equal(ck.fitted, fitted)
    assert ck.example == example
    q = _taps(rng, 32)
    got, want = ck.estimator.score(ck.fitted, q), cal.score(fitted, q)
    assert sorted(got) == sorted(want) and len(got) == 4
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    p_got, p_want = jaxmon.p_values(ck.fitted, q), jaxmon.p_values(fitted, q)
    for k in p_want:
        np.testing.assert_array_equal(p_got[k], p_want[k])

    # The same through the splice API, in the user's own manager.
    with ocp.CheckpointManager(tmp_path / "user", options=SYNC) as mngr:
        mngr.save(
            3,
            args=ocp.args.Composite(**checkpoint.save_args(cal, s, fitted=fitted, example=example)),
        )
        mngr.wait_until_finished()
    with ocp.CheckpointManager(tmp_path / "user", options=SYNC) as mngr:
        out = mngr.restore(
            3, args=ocp.args.Composite(**checkpoint.restore_args(cal, example, fitted=True))
        )
    ck2 = checkpoint.restored(out, est=cal, example=example)
    assert_trees_equal(ck2.state, s)
    assert_trees_equal(ck2.fitted, fitted)
    # Unsealed, load refuses it and says how to fix it; sealed, it loads and verifies.
    _refused(lambda: jaxmon.load(tmp_path / "user"), "seal")
    checkpoint.seal(tmp_path / "user", 3)
    assert_trees_equal(jaxmon.load(tmp_path / "user").fitted, fitted)


def test_shard_local_state_restores_onto_the_mesh(tmp_path, rng):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    g = jaxmon.gaussian(shrinkage="ledoit_wolf")
    sest = js.shard_local(g, mesh)
    ex = jax.ShapeDtypeStruct((6,), jnp.float32)
    sharded = NamedSharding(mesh, P("data"))

    def batch():
        return jax.device_put(_rows(rng, 64, 6).reshape(16, 4, 6), sharded)

    s = sest.update(sest.init(ex), batch())
    jax.block_until_ready(s)
    checkpoint.save(tmp_path / "ck", sest, s, fitted=sest.finalize(s))  # example inferred
    replicated = NamedSharding(mesh, P())
    ck = checkpoint.load(tmp_path / "ck", sharding=sharded, fitted_sharding=replicated)
    assert ck.estimator.spec == sest.spec
    assert ck.metadata["example"] == {"shape": [6], "dtype": "float32"}
    for leaf in jax.tree.leaves(ck.state):
        assert leaf.sharding.spec == P("data") and leaf.shape[0] == 8
    assert_trees_equal(ck.state, s)
    # Accumulation resumes on the mesh exactly as in the original process.
    b = batch()
    resumed = ck.estimator.update(ck.state, b)
    jax.block_until_ready(resumed)
    expected = sest.update(s, b)
    jax.block_until_ready(expected)
    assert_trees_equal(resumed, expected)
    assert_trees_equal(js.merge_replicas(ck.estimator, ck.state), js.merge_replicas(sest, s))
    assert_trees_equal(ck.fitted, sest.finalize(s))
    assert all(x.sharding == replicated for x in jax.tree.leaves(ck.fitted))
    # A sharding that cannot fit the fitted value's scalars is refused in one sentence.
    _refused(lambda: checkpoint.load(tmp_path / "ck", sharding=sharded), "sharding")


# --------------------------------------------------------------------------- committed fixture


def test_committed_format_2_fixture_loads_and_scores_the_same():
    """A checkpoint written by format 2 (tests/fixtures/make_checkpoint_fixture.py): every later
    jaxmon must load it and reproduce its scores."""
    expected = json.loads((FIXTURES / "checkpoint_v2_expected.json").read_text())
    root = FIXTURES / "checkpoint_v2"
    before = sorted(str(p) for p in root.rglob("*"))
    ck = jaxmon.load(root)
    assert ck.metadata["format_version"] == 2 and ck.step == expected["step"]
    assert ck.estimator.spec.to_dict() == expected["spec"]
    assert jaxmon.num_rows(ck.state) == expected["rows"]
    q = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in expected["query"].items()}
    scores = ck.estimator.score(ck.fitted, q)
    p = jaxmon.p_values(ck.fitted, q)
    assert sorted(scores) == sorted(expected["scores"])
    for k, want in expected["scores"].items():
        np.testing.assert_allclose(np.asarray(scores[k]), want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(p[k]), expected["p_values"][k], rtol=1e-5, atol=1e-7)
    assert sorted(str(p) for p in root.rglob("*")) == before  # loading writes nothing


def test_resaving_the_committed_fixture_writes_the_same_records(tmp_path):
    """The records a save writes today (structure, example, spec, counts) equal, as JSON, those
    of the committed format-2 fixture: the on-disk format has not moved."""
    ck = jaxmon.load(FIXTURES / "checkpoint_v2")
    checkpoint.save(
        tmp_path / "again",
        ck.estimator,
        ck.state,
        fitted=ck.fitted,
        example=ck.example,
        step=ck.step,
        metadata=ck.metadata["user"],
    )
    again = jaxmon.load(tmp_path / "again")
    for key in ("format", "format_version", "spec", "example", "state_tree", "fitted_tree"):
        assert json.dumps(again.metadata[key]) == json.dumps(ck.metadata[key]), key
    for key in ("rows", "nonfinite", "step", "user"):
        assert again.metadata[key] == ck.metadata[key], key
    record = json.loads((tmp_path / "again" / str(ck.step) / checkpoint.DIGESTS).read_text())
    assert {k: v for k, v in record.items() if k != "files"} == {
        "format": "jaxmon-digests",
        "format_version": 2,
        "algorithm": "sha256",
    }
    assert_trees_equal(again.state, ck.state)
    assert_trees_equal(again.fitted, ck.fitted)
