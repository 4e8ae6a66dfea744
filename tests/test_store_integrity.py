"""Store integrity: crc32c-checksummed chunks (a flipped bit is a StoreError naming the tap and
chunk, wherever it is read), truncated chunks, stores written before checksums, crafted
manifests and token sidecars: one sentence each, never a tensorstore or JSON traceback."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
from jaxmon import io, query
from jaxmon.errors import StoreError

D = 8
CHUNK = 32


@pytest.fixture
def store(tmp_path, rng):
    """640 rows (20 chunks) of two taps with row metadata and token text."""
    x = rng.normal(size=(8, 80, D)).astype(np.float32)
    with io.ActivationWriter(tmp_path / "store", chunk_rows=CHUNK) as w:
        w.write({"h": x, "g": x[..., :3]}, split="trusted", tokens=[["t"] * 80] * 8)
    return tmp_path / "store", x.reshape(-1, D)


def _chunk(store_dir, what, i):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    rel = manifest["taps"][what]["path"] if what in manifest["taps"] else f"rows/{what}"
    return store_dir / rel / "c" / str(i) / ("0" if what in manifest["taps"] else "")


def _flip(path, byte=9):
    raw = bytearray(path.read_bytes())
    raw[byte] ^= 0x10
    path.write_bytes(bytes(raw))


def _one_sentence(err):
    assert isinstance(err, StoreError) and len(str(err)) <= 300 and "\n" not in str(err)
    assert err.__cause__ is not None  # tensorstore's own error, kept for whoever debugs


def test_every_array_carries_crc32c(store):
    path, _ = store
    manifest = json.loads((path / "manifest.json").read_text())
    arrays = [info["path"] for info in manifest["taps"].values()] + list(
        manifest["row_meta"].values()
    )
    for rel in arrays:
        codecs = json.loads((path / rel / "zarr.json").read_text())["codecs"]
        assert [c["name"] for c in codecs] == ["bytes", "crc32c"], rel


def test_flipped_bit_is_a_store_error_wherever_it_is_read(store, tmp_path):
    path, x = store
    st = query.open_store(path)
    est = jaxmon.gaussian(shrinkage=0.1)
    fitted = est.finalize(est.update(est.init(jax.ShapeDtypeStruct((D,), jnp.float32)), x))
    _flip(_chunk(path, "h", 3))
    st = query.open_store(path)  # sizes are intact: opening succeeds, reading does not
    with pytest.raises(StoreError, match=r"tap 'h': chunk file taps/\S+/c/3/0 \(rows 96-127\)"):
        st.read("h", 0, 640).result()
    try:
        st.read("h", 64, 200).result()
    except StoreError as e:
        assert "fails its crc32c checksum" in str(e) and "rows 64-199" in str(e)
        _one_sentence(e)
    np.testing.assert_array_equal(st.read("h", 0, 96).result(), x[:96])  # the rest reads
    with pytest.raises(StoreError, match=r"tap 'h'.*checksum"):
        query.fit_store(path, est, tap="h", block_rows=64)
    with pytest.raises(StoreError, match=r"tap 'h'.*checksum"):
        query.score_store(path, est, fitted, out=tmp_path / "q", tap="h", block_rows=64)
    with pytest.raises(StoreError, match=r"tap 'h'.*checksum"):
        query.score_store_batch(path, out=tmp_path / "qb", tap="h", block_rows=64)
    _flip(_chunk(path, "sequence_id", 2))
    with pytest.raises(StoreError, match=r"row metadata 'sequence_id': chunk file rows/seq"):
        st.read_meta("sequence_id", 0, 640)


def test_flipped_bit_in_scores_is_a_store_error(store, tmp_path):
    path, x = store
    est = jaxmon.gaussian(shrinkage=0.1)
    fitted = est.finalize(est.update(est.init(jax.ShapeDtypeStruct((D,), jnp.float32)), x))
    res = query.score_store(path, est, fitted, out=tmp_path / "q", tap="h", block_rows=64)
    key = res.keys[0]
    good = res.scores(key)
    chunk = next((tmp_path / "q" / "scores").iterdir()) / "c" / "1"
    codecs = json.loads((chunk.parent.parent / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "crc32c"]
    _flip(chunk)
    with pytest.raises(StoreError, match=rf"scores of key '{key}': chunk file \S+/c/1 \(rows 64"):
        query.load_result(tmp_path / "q").scores(key)
    np.testing.assert_array_equal(query.load_result(tmp_path / "q").scores(key, 0, 64), good[:64])


def test_truncated_and_missing_chunks(store):
    path, _ = store
    chunk = _chunk(path, "h", 5)
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[:100])
    with pytest.raises(StoreError, match=r"truncated: chunk 5 of tap 'h' holds 100 bytes"):
        query.open_store(path)
    st = query.open_store(path, check_chunks=False)  # then reading it is the error
    with pytest.raises(
        StoreError, match=r"tap 'h': chunk file \S+/c/5/0 \(rows 160-191\) is trunc"
    ):
        st.read("h", 0, 640).result()
    chunk.unlink()
    with pytest.raises(StoreError, match="truncated: chunk 5 of tap 'h' is missing"):
        query.open_store(path)


def test_stores_written_before_checksums_still_open(tmp_path, rng, monkeypatch):
    old_spec = io._zarr3_spec

    def without_crc(*args):
        spec = old_spec(*args)
        spec["metadata"]["codecs"] = spec["metadata"]["codecs"][:1]
        return spec

    monkeypatch.setattr(io, "_zarr3_spec", without_crc)
    x = rng.normal(size=(100, D)).astype(np.float32)
    with io.ActivationWriter(tmp_path / "old", chunk_rows=CHUNK) as w:
        w.write({"h": x})
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["complete"]  # as version-1 manifests were written
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.undo()
    rel = manifest["taps"]["h"]["path"]
    codecs = json.loads((tmp_path / "old" / rel / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["bytes"]
    st = query.open_store(tmp_path / "old")
    assert st.complete and st.rows == 100
    np.testing.assert_array_equal(st.read("h", 0, 100).result(), x)


def _manifest_cases():
    """(edit of a valid manifest, message): each crafted manifest and what it must say."""

    def set_(key, value):
        return lambda m: {**m, key: value}

    def tap(**kw):
        return lambda m: {**m, "taps": {"h": {**m["taps"]["h"], **kw}}}

    return [
        (lambda m: "{not json", "is not valid JSON"),
        (lambda m: [1, 2], "is not a jaxmon activation-store manifest"),
        (set_("format", "other"), "is not a jaxmon activation-store manifest"),
        (set_("version", 99), "format version 99"),
        (set_("rows", -5), "rows must be a non-negative integer, got -5"),
        (set_("rows", "640"), "rows must be a non-negative integer"),
        (set_("rows", 10**6), "holds 640 rows but the manifest says 1000000"),
        (set_("rows", True), "rows must be a non-negative integer"),
        (set_("chunk_rows", 0), "chunk_rows must be a positive integer"),
        (set_("taps", ["h"]), "taps must be an object"),
        (tap(path="../../etc"), "points outside the store directory"),
        (tap(path="/etc"), "points outside the store directory"),
        (tap(shape=[640]), "shape \\[rows, d\\]"),
        (tap(dtype="object"), "floating dtype"),
        (tap(shape=[640, 9]), "is an array \\[..., 8\\] of float32 but the manifest says"),
        (tap(dtype="float16"), "of float32 but the manifest says \\[..., 8\\] of float16"),
        (set_("row_meta", {"label": "../../../tmp"}), "points outside the store directory"),
        (set_("tokens", "../secrets.jsonl"), "points outside the store directory"),
        (set_("splits", "trusted"), "splits must be a list of names"),
    ]


@pytest.mark.parametrize("case", range(len(_manifest_cases())))
def test_crafted_manifests_are_store_errors(store, case):
    path, _ = store
    edit, msg = _manifest_cases()[case]
    manifest = json.loads((path / "manifest.json").read_text())
    crafted = edit(manifest)
    text = crafted if isinstance(crafted, str) else json.dumps(crafted)
    (path / "manifest.json").write_text(text)
    with pytest.raises(StoreError, match=msg) as e:
        query.open_store(path)
    assert len(str(e.value)) <= 300


def test_token_sidecar_beyond_rows_and_torn_lines(store):
    path, _ = store
    sidecar = path / "tokens.jsonl"
    with open(sidecar, "a") as f:  # what a killed writer leaves: records beyond rows, torn
        f.write(json.dumps({"start": 640, "tokens": ["late"] * 5}) + "\n")
        f.write('{"start": 645, "tok')
    tokens = query.open_store(path).tokens()
    assert sorted(tokens) == list(range(640)) and set(tokens.values()) == {"t"}
    lines = sidecar.read_text().splitlines()
    sidecar.write_text("\n".join([lines[0], "{garbled", *lines[1:]]) + "\n")
    with pytest.raises(StoreError, match="line 2 is not JSON"):
        query.open_store(path).tokens()
    sidecar.write_text(json.dumps({"start": -1, "tokens": [1, 2]}) + "\n\n")
    with pytest.raises(StoreError, match=r'line 1 is not a \{"start": row'):
        query.open_store(path).tokens()


def test_records_of_finished_queries_are_checked(store, tmp_path):
    path, x = store
    est = jaxmon.gaussian(shrinkage=0.1)
    fitted = est.finalize(est.update(est.init(jax.ShapeDtypeStruct((D,), jnp.float32)), x))
    query.score_store(path, est, fitted, out=tmp_path / "q", tap="h", block_rows=64)
    (tmp_path / "q" / "summary.json").write_text("[1, 2")
    with pytest.raises(StoreError, match="is not valid JSON"):
        query.load_result(tmp_path / "q")
    (tmp_path / "q" / "summary.json").write_text(json.dumps({"rows": -1, "keys": {}}))
    with pytest.raises(StoreError, match="is not a jaxmon query summary"):
        query.load_result(tmp_path / "q")
    # sequences.npz holding an object array is refused (never unpickled).
    (tmp_path / "q" / "summary.json").write_text(json.dumps({"rows": 640, "keys": {"h": {}}}))
    np.savez(tmp_path / "q" / "sequences.npz", sequence_id=np.array([None], dtype=object))
    with pytest.raises(StoreError, match=r"cannot read .*sequences\.npz"):
        query.load_result(tmp_path / "q").sequences()
    # A garbled progress record: resuming starts over and gives the same output.
    (tmp_path / "q" / "progress.json").write_text("{torn")
    res = query.score_store(path, est, fitted, out=tmp_path / "q", tap="h", block_rows=64)
    assert res.summary["rows"] == 640
    assert os.path.exists(tmp_path / "q" / "summary.json")
