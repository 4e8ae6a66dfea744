"""Activation stores: the writer (JAX, numpy, PyTorch inputs; bf16; masks; row metadata) and
the importers (.npy, .npz, safetensors), read back through jaxmon.query.open_store."""

import json
import os
import struct
import subprocess
import sys
import time
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmon
from jaxmon import io, query
from jaxmon.errors import ConfigError, ShapeError, StoreError

from laws import json_field, sigkill_when

try:
    import torch
except ImportError:  # torch is only a benchmark extra: its interop tests skip without it
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def _read_all(store, tap):
    return store.taps[tap][: store.rows].read().result()


def test_writer_round_trip_with_metadata_mask_and_tokens(tmp_path, rng):
    b, s, chunk = 3, 20, 16
    xs, masks = [], []
    with io.ActivationWriter(tmp_path / "st", chunk_rows=chunk, max_pending=2) as w:
        for i in range(5):
            x = rng.normal(size=(b, s, 6)).astype(np.float32)
            m = np.ones((b, s), bool)
            m[:, s - i :] = False  # right padding, a different amount per batch
            # Alternate JAX, numpy and PyTorch inputs for the same tap.
            arr = (jnp.asarray(x), x, torch.from_numpy(x) if torch else x)[i % 3]
            w.write(
                {"blocks/0/out": arr, "emb": x[..., :2] * 10},
                mask=m,
                split="trusted" if i < 2 else "query",
                label=np.arange(b) % 2 if i >= 2 else None,
                tokens=[[f"w{j}" for j in range(s)] for _ in range(b)],
            )
            xs.append(x)
            masks.append(m)
    manifest = json.loads((tmp_path / "st" / "manifest.json").read_text())
    x_all = np.concatenate(
        [x.reshape(-1, 6)[m.reshape(-1)] for x, m in zip(xs, masks, strict=False)]
    )
    n = len(x_all)
    assert manifest["rows"] == n and manifest["chunk_rows"] == chunk
    assert manifest["taps"]["blocks/0/out"]["shape"] == [n, 6]
    assert manifest["taps"]["emb"]["dtype"] == "float32"
    assert manifest["splits"] == ["trusted", "query"]
    store = query.open_store(tmp_path / "st")
    np.testing.assert_array_equal(_read_all(store, "blocks/0/out"), x_all)
    np.testing.assert_array_equal(_read_all(store, "emb"), x_all[:, :2] * 10)
    # Chunk-aligned: one file per chunk of 16 rows.
    path = tmp_path / "st" / manifest["taps"]["emb"]["path"] / "c"
    assert len(os.listdir(path)) == -(-n // chunk)
    seq = np.concatenate(
        [np.broadcast_to(np.arange(i * b, i * b + b)[:, None], (b, s)) for i in range(5)]
    )
    pos = np.broadcast_to(np.arange(s), (5 * b, s))
    keep = np.concatenate(masks)
    lab = np.concatenate(
        [
            np.full((b, s), -1) if i < 2 else np.broadcast_to((np.arange(b) % 2)[:, None], (b, s))
            for i in range(5)
        ]
    )
    spl = np.concatenate([np.full((b, s), 0 if i < 2 else 1) for i in range(5)])
    for name, ref in (("sequence_id", seq), ("position", pos), ("label", lab), ("split", spl)):
        np.testing.assert_array_equal(store.read_meta(name, 0, n), ref[keep])
    tokens = store.tokens()
    assert len(tokens) == n and tokens[0] == "w0" and tokens[s - 1] == f"w{s - 1}"


def test_writer_bfloat16_from_every_framework(tmp_path, rng):
    x = rng.normal(size=(40, 8)).astype(np.float32)
    want = x.astype(ml_dtypes.bfloat16)
    with io.ActivationWriter(tmp_path / "st", dtype="bfloat16", chunk_rows=32) as w:
        w.write({"t": jnp.asarray(x, jnp.bfloat16)})
        w.write({"t": x})
        if torch is not None:
            w.write({"t": torch.from_numpy(x).to(torch.bfloat16)})
    k = 3 if torch is not None else 2
    store = query.open_store(tmp_path / "st")
    got = _read_all(store, "t")
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == (40 * k, 8)
    np.testing.assert_array_equal(got.view(np.uint16), np.tile(want, (k, 1)).view(np.uint16))
    # [tokens, d] writes: one sequence per write, positions count within it.
    np.testing.assert_array_equal(
        store.read_meta("sequence_id", 0, 40 * k), np.repeat(np.arange(k), 40)
    )
    np.testing.assert_array_equal(store.read_meta("position", 0, 40 * k), np.tile(np.arange(40), k))


def test_writer_errors(tmp_path, rng):
    with io.ActivationWriter(tmp_path / "st") as w:
        w.write({"a": np.zeros((4, 3), np.float32)})
        with pytest.raises(ConfigError, match="every write must give every tap"):
            w.write({"b": np.zeros((4, 3), np.float32)})
        with pytest.raises(ShapeError, match="same tokens"):
            w.write({"a": np.zeros((4, 3), np.float32), "b": np.zeros((5, 3), np.float32)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.ActivationWriter(tmp_path / "st")
    w = io.ActivationWriter(tmp_path / "st2")
    with pytest.raises(ShapeError, match=r"tap 'a': activations must be floating point.*int32"):
        w.write({"a": np.zeros((4, 3), np.int32)})  # refused at the call, not on the worker
    with pytest.raises(ConfigError, match="takes a dict"):
        w.write(np.zeros((4, 3), np.float32))
    with pytest.raises(ConfigError, match="dtype must be one of"):
        io.ActivationWriter(tmp_path / "st3", dtype="int8")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("years of work")
    with pytest.raises(StoreError, match="holds no activation store; refusing to delete"):
        io.ActivationWriter(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "thesis.txt").exists()


GOOD = 5000


def _good_rows(rng):
    return [rng.normal(size=(500, 6)).astype(np.float32) for _ in range(GOOD // 500)]


BAD_WRITES = [
    # (what the call gives, the error class, what its message must say)
    ({"a": np.zeros((4, 5), np.float32), "b": np.zeros((4, 2), np.float32)}, {}, ShapeError,
     r"tap 'a': expected \[\.\.\., 6\] \(the width of its first write\), got \[4, 5\]"),
    ({"a": np.zeros((4, 6), np.int64), "b": np.zeros((4, 2), np.float32)}, {}, ShapeError,
     "tap 'a': activations must be floating point"),
    ({"a": np.zeros((4, 6), np.float32)}, {}, ConfigError, "every write must give every tap"),
    ({"a": np.zeros((4, 6), np.float32), "b": np.zeros((3, 2), np.float32)}, {}, ShapeError,
     "tap 'b' has leading shape"),
    ({"a": np.zeros((2, 4, 6), np.float32), "b": np.zeros((2, 4, 2), np.float32)},
     {"mask": np.ones((2, 5), bool)}, ShapeError, r"mask has shape \[2, 5\]"),
    ({"a": np.zeros((2, 4, 6), np.float32), "b": np.zeros((2, 4, 2), np.float32)},
     {"sequence_id": np.arange(3)}, ShapeError, r"sequence_id has shape \[3\]"),
    ({"a": np.zeros((2, 4, 6), np.float32), "b": np.zeros((2, 4, 2), np.float32)},
     {"position": np.zeros((4, 2), np.int32)}, ShapeError, r"position has shape \[4, 2\]"),
    ({"a": np.zeros((2, 4, 6), np.float32), "b": np.zeros((2, 4, 2), np.float32)},
     {"label": np.zeros(4, np.int32)}, ShapeError, r"label has shape \[4\]"),
    ({"a": np.zeros((2, 4, 6), np.float32), "b": np.zeros((2, 4, 2), np.float32)},
     {"label": np.zeros((2, 4), np.float32)}, ShapeError, "label must hold integers"),
    ({"a": np.zeros((2, 4, 6), np.float32), "b": np.zeros((2, 4, 2), np.float32)},
     {"tokens": [["x"] * 4, ["y"] * 3]}, ShapeError, r"tokens\[1\] has 3 entries"),
    ({"a": np.zeros((4, 6), np.float32), "b": np.zeros((4, 2), np.float32)},
     {"split": 3}, ConfigError, "split must be a name"),
]  # fmt: skip


def test_refused_writes_keep_the_good_rows(tmp_path, rng):
    good = _good_rows(rng)
    w = io.ActivationWriter(tmp_path / "st", chunk_rows=64, max_pending=2)
    for i, x in enumerate(good):
        w.write({"a": x, "b": x[:, :2]}, split="trusted", tokens=[f"t{i}"] * len(x))
    for taps, kw, cls, msg in BAD_WRITES:
        with pytest.raises(cls, match=msg) as e:
            w.write(taps, **kw)
        assert len(str(e.value)) <= 300
    manifest = w.close()
    assert manifest["rows"] == GOOD and manifest["complete"] and manifest["splits"] == ["trusted"]
    store = query.open_store(tmp_path / "st")
    np.testing.assert_array_equal(_read_all(store, "a"), np.concatenate(good))
    np.testing.assert_array_equal(
        store.read_meta("sequence_id", 0, GOOD), np.repeat(range(10), 500)
    )
    assert len(store.tokens()) == GOOD


def test_error_inside_the_with_block_keeps_the_rows(tmp_path, rng):
    good = _good_rows(rng)
    with pytest.raises(ShapeError, match="width of its first write"):
        with io.ActivationWriter(tmp_path / "st", chunk_rows=64) as w:
            for x in good:
                w.write({"a": x})
            w.write({"a": np.zeros((3, 7), np.float32)})  # the mistake ends the block
    store = query.open_store(tmp_path / "st")
    assert store.rows == GOOD and store.complete
    np.testing.assert_array_equal(_read_all(store, "a"), np.concatenate(good))


def test_background_write_failure_keeps_committed_rows(tmp_path, rng):
    """A chunk write that fails on disk: the committed rows stay readable, one StoreError."""
    chunk = 32
    w = io.ActivationWriter(tmp_path / "st", chunk_rows=chunk, commit_interval=0.01)
    xs = [rng.normal(size=(chunk, 4)).astype(np.float32) for _ in range(40)]
    for x in xs[:10]:
        w.write({"a": x})
    manifest = tmp_path / "st" / "manifest.json"
    deadline = time.time() + 30
    while json.loads(manifest.read_text())["rows"] < 10 * chunk:
        assert time.time() < deadline, "the first ten chunks were never committed"
        time.sleep(0.01)
    # A file where chunk 12's directory must go: tensorstore cannot write it (even as root).
    path = tmp_path / "st" / json.loads(manifest.read_text())["taps"]["a"]["path"] / "c" / "12"
    path.write_bytes(b"in the way")
    with pytest.raises(StoreError, match=r"writing activations to .* failed") as e:
        for x in xs[10:]:
            w.write({"a": x})
            time.sleep(0.002)
        w.close()
    if "keeps the" not in str(e.value):  # write() raised first; close() commits and says so
        with pytest.raises(StoreError, match="keeps the") as e:
            w.close()
    assert e.value.__cause__ is not None and len(str(e.value)) <= 300
    store = query.open_store(tmp_path / "st")
    assert 10 * chunk <= store.rows <= 12 * chunk and not store.complete
    np.testing.assert_array_equal(_read_all(store, "a"), np.concatenate(xs)[: store.rows])
    with pytest.raises(StoreError, match="failed"):
        w.write({"a": xs[0]})


@pytest.mark.slow
def test_killed_writer_leaves_a_readable_prefix(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        from _kill_writer import CHUNK_ROWS, batch
    finally:
        sys.path.pop(0)
    store_dir = tmp_path / "st"
    script = os.path.join(os.path.dirname(__file__), "_kill_writer.py")
    proc = subprocess.Popen(
        [sys.executable, script, str(store_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    # Kill well into the run, with several commits behind it.
    committed = 8 * CHUNK_ROWS
    sigkill_when(proc, lambda: json_field(store_dir / "manifest.json", "rows", 0) >= committed)
    writes = int(proc.stdout.read().split()[-1]) + 1
    store = query.open_store(store_dir)
    n = store.rows
    assert not store.complete and n >= committed and n % CHUNK_ROWS == 0
    # What the writer was given, rebuilt: the store's rows are a prefix of it, bit for bit.
    h, g, seq, pos, lab, spl, tok = [], [], [], [], [], [], []
    for i in range(writes + 1):
        taps, kw = batch(i)
        keep = kw["mask"]
        h.append(taps["h"][keep])
        g.append(taps["g"][keep])
        seq.append(np.broadcast_to(np.arange(4 * i, 4 * i + 4)[:, None], (4, 24))[keep])
        pos.append(np.broadcast_to(np.arange(24), (4, 24))[keep])
        lab.append(np.broadcast_to(kw["label"][:, None], (4, 24))[keep])
        spl.append(np.full((4, 24), i % 2)[keep])
        tok += list(np.asarray(kw["tokens"])[keep])
    assert n <= sum(len(x) for x in h)
    np.testing.assert_array_equal(_read_all(store, "h"), np.concatenate(h)[:n])
    np.testing.assert_array_equal(_read_all(store, "g"), np.concatenate(g)[:n])
    for name, ref in (("sequence_id", seq), ("position", pos), ("label", lab), ("split", spl)):
        np.testing.assert_array_equal(store.read_meta(name, 0, n), np.concatenate(ref)[:n])
    assert store.splits == ["trusted", "query"]
    tokens = store.tokens()
    assert sorted(tokens) == list(range(n)) and [tokens[r] for r in range(n)] == tok[:n]


def test_import_npy_and_npz(tmp_path, rng):
    a = rng.normal(size=(300, 12)).astype(np.float32)
    c = rng.normal(size=(300, 5)).astype(np.float16)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "c.npy", c)
    io.import_npy(
        tmp_path / "s1",
        {"a": tmp_path / "a.npy", "c": tmp_path / "c.npy"},
        chunk_rows=64,
        block_rows=100,
    )
    st = query.open_store(tmp_path / "s1")
    np.testing.assert_array_equal(_read_all(st, "a"), a)
    np.testing.assert_array_equal(_read_all(st, "c"), c)
    np.testing.assert_array_equal(st.read_meta("position", 0, 300), np.arange(300))

    # [batch, seq, d] arrays in a compressed .npz with a per-sequence label member.
    x = rng.normal(size=(10, 30, 4)).astype(np.float32)
    lab = np.arange(10) % 2
    np.savez_compressed(tmp_path / "acts.npz", resid=x, label=lab)
    io.import_npz(
        tmp_path / "s2", tmp_path / "acts.npz", chunk_rows=64, block_rows=90, split="query"
    )
    st = query.open_store(tmp_path / "s2")
    assert list(st.taps) == ["resid"] and st.rows == 300 and st.splits == ["query"]
    np.testing.assert_array_equal(_read_all(st, "resid"), x.reshape(-1, 4))
    np.testing.assert_array_equal(st.read_meta("label", 0, 300), np.repeat(lab, 30))
    np.testing.assert_array_equal(st.read_meta("sequence_id", 0, 300), np.repeat(np.arange(10), 30))
    with pytest.raises(FileNotFoundError):
        io.import_npz(tmp_path / "s5", tmp_path / "missing.npz")


@needs_torch
def test_import_safetensors(tmp_path, rng):
    from safetensors.torch import save_file

    # safetensors with a bf16 tensor (written by the reference writer), parsed by jaxmon.io
    # without the safetensors package.
    t = torch.from_numpy(rng.normal(size=(64, 6)).astype(np.float32)).to(torch.bfloat16)
    save_file({"h": t, "g": torch.ones(64, 3)}, str(tmp_path / "x.safetensors"))
    io.import_safetensors(tmp_path / "s3", tmp_path / "x.safetensors", taps=["h"], chunk_rows=32)
    st = query.open_store(tmp_path / "s3")
    got = _read_all(st, "h")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
    with pytest.raises(StoreError, match="no tap 'nope'"):
        io.import_safetensors(tmp_path / "s4", tmp_path / "x.safetensors", taps=["nope"])


# ----------------------------------------------------------------- loaders never run code


class _RunsCode:
    """Unpickling this creates a directory: proof that a loader executed code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _live_pickle(path, marker, save):
    """Saves an object array whose unpickling would run code, and proves that it would."""
    save(path, np.array([[_RunsCode(marker)], [None]], dtype=object))
    loaded = np.load(path, allow_pickle=True)  # what an unsafe loader would do
    if isinstance(loaded, np.lib.npyio.NpzFile):
        loaded = loaded[loaded.files[0]]
    assert os.path.isdir(marker), "the crafted file must really run code when unpickled"
    os.rmdir(marker)


def test_npy_holding_pickled_objects_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "code_ran"
    _live_pickle(tmp_path / "evil.npy", marker, lambda p, a: np.save(p, a, allow_pickle=True))
    with pytest.raises(StoreError, match="holds Python objects") as e:
        io.import_npy(tmp_path / "s", {"h": tmp_path / "evil.npy"})
    assert not marker.exists() and len(str(e.value)) <= 300
    # Other crafted .npy files: garbage, truncated data, integers.
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00{'descr': os.system('x')}\n")
    with pytest.raises(StoreError, match=r"not a valid \.npy"):
        io.import_npy(tmp_path / "s", {"h": tmp_path / "junk.npy"})
    np.save(tmp_path / "ok.npy", np.ones((64, 4), np.float32))
    raw = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(StoreError, match="cannot be read"):
        io.import_npy(tmp_path / "s", {"h": tmp_path / "short.npy"})
    np.save(tmp_path / "int.npy", np.ones((64, 4), np.int32))
    with pytest.raises(ShapeError, match="tap 'h': activations must be floating point"):
        io.import_npy(tmp_path / "s", {"h": tmp_path / "int.npy"})
    assert not marker.exists()


def test_npz_holding_pickled_objects_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "code_ran"
    x = np.ones((8, 4), np.float32)
    for member in ("h", "label"):  # a tap, and a row-metadata member (read whole)
        path = tmp_path / f"evil_{member}.npz"
        _live_pickle(path, marker, lambda p, a, m=member: np.savez(p, **{m: a}))
        if member == "label":  # add a good tap next to the evil label
            with zipfile.ZipFile(path, "a") as zf, zf.open("h.npy", "w") as f:
                np.lib.format.write_array(f, x)
        with pytest.raises(StoreError, match="holds Python objects"):
            io.import_npz(tmp_path / "s", path)
        assert not marker.exists()
    (tmp_path / "junk.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(StoreError, match=r"is not an \.npz \(zip\) file"):
        io.import_npz(tmp_path / "s", tmp_path / "junk.npz")
    # One flipped bit in a member's data: the zip's CRC refuses it, in one sentence.
    np.savez(tmp_path / "ok.npz", h=np.arange(4096, dtype=np.float32).reshape(1024, 4))
    raw = bytearray((tmp_path / "ok.npz").read_bytes())
    raw[len(raw) // 2] ^= 1
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"member 'h\.npy' cannot be read"):
        io.import_npz(tmp_path / "s", tmp_path / "flipped.npz", block_rows=4096)
    with pytest.raises(StoreError, match="no tap 'nope'"):
        io.import_npz(tmp_path / "s", tmp_path / "ok.npz", taps=["nope"])


def _safetensors_file(path, header, data=b"", *, length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def test_import_safetensors_written_by_hand(tmp_path, rng):
    x = rng.normal(size=(40, 6)).astype(np.float32)
    lab = np.arange(40, dtype=np.int64) % 2
    header = {
        "__metadata__": {"format": "pt"},
        "h": {"dtype": "F32", "shape": [40, 6], "data_offsets": [0, x.nbytes]},
        "label": {"dtype": "I64", "shape": [40], "data_offsets": [x.nbytes, x.nbytes + 320]},
    }
    path = _safetensors_file(tmp_path / "x.safetensors", header, x.tobytes() + lab.tobytes())
    io.import_safetensors(tmp_path / "s", path, chunk_rows=16)
    st = query.open_store(tmp_path / "s")
    assert list(st.taps) == ["h"]
    np.testing.assert_array_equal(_read_all(st, "h"), x)
    np.testing.assert_array_equal(st.read_meta("label", 0, 40), lab)


def test_import_safetensors_from_the_reference_writer(tmp_path, rng):
    st_numpy = pytest.importorskip("safetensors.numpy")
    h = rng.normal(size=(50, 6)).astype(np.float16)
    st_numpy.save_file(
        {"h": h, "g": np.ones((50, 3), np.float32), "position": np.arange(50)[::-1].copy()},
        str(tmp_path / "x.safetensors"),
    )
    io.import_safetensors(tmp_path / "s", tmp_path / "x.safetensors", taps=["h"], chunk_rows=16)
    st = query.open_store(tmp_path / "s")
    np.testing.assert_array_equal(_read_all(st, "h"), h)
    np.testing.assert_array_equal(st.read_meta("position", 0, 50), np.arange(50)[::-1])


CRAFTED_SAFETENSORS = [
    # (header, data, claimed header length, error class, message)
    ({"h": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16, 1 << 62,
     StoreError, "the safetensors header claims"),
    ({"h": {"dtype": "F32", "shape": [2, 2], "data_offsets": [-8, 8]}}, b"\0" * 16, None,
     StoreError, "data offsets"),
    ({"h": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1 << 40]}}, b"\0" * 16, None,
     StoreError, "outside the file"),
    ({"h": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16, None,
     StoreError, "needs 64"),
    ({"h": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, b"\0" * 16, None,
     StoreError, "invalid shape"),
    ({"h": {"dtype": "Q99", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16, None,
     StoreError, "unsupported dtype 'Q99'"),
    ({"h": "not a tensor"}, b"", None, StoreError, "has no dtype entry"),
    ([1, 2, 3], b"", None, StoreError, "not a JSON object"),
    (b'{"h": {"dtype": "F3', b"", None, StoreError, "not JSON"),
    (b"\xff\xfe\x00", b"", None, StoreError, "not JSON"),
    ({"h": {"dtype": "I32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16, None,
     ShapeError, "tap 'h': activations must be floating point"),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(CRAFTED_SAFETENSORS)))
def test_crafted_safetensors_give_one_sentence(tmp_path, case):
    header, data, length, cls, msg = CRAFTED_SAFETENSORS[case]
    path = _safetensors_file(tmp_path / "x.safetensors", header, data, length=length)
    with pytest.raises(cls, match=msg) as e:
        io.import_safetensors(tmp_path / "s", path)
    assert len(str(e.value)) <= 300


def test_truncated_safetensors(tmp_path):
    (tmp_path / "tiny.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(StoreError, match="shorter than its 8-byte header"):
        io.import_safetensors(tmp_path / "s", tmp_path / "tiny.safetensors")
    header = {"h": {"dtype": "F32", "shape": [8, 2], "data_offsets": [0, 64]}}
    path = _safetensors_file(tmp_path / "cut.safetensors", header, b"\0" * 40)  # 24 bytes short
    with pytest.raises(StoreError, match="outside the file's 40 data bytes"):
        io.import_safetensors(tmp_path / "s", path)


# --------------------------------------------------------------------------- stores of shards


def _two_shards(root, rng):
    """The layout several processes write (built here by one process): two shards whose split
    lists differ in order, explicit sequence ids, token text; returns what was written."""
    want = {"h": [], "split": [], "seq": [], "tok": []}
    for p, splits in ((0, ["trusted", "query"]), (1, ["query", "trusted", "extra"])):
        with io.ActivationWriter(root / io.shard_path(p), chunk_rows=8, collective=False) as w:
            for i, sp in enumerate(splits):
                x = rng.normal(size=(2, 10 + p, 4)).astype(np.float32)
                ids = 100 * p + 2 * i + np.arange(2)
                toks = [[f"{p}.{i}.{b}.{t}" for t in range(10 + p)] for b in range(2)]
                w.write({"h": x}, split=sp, sequence_id=ids, tokens=toks)
                want["h"].append(x.reshape(-1, 4))
                want["split"] += [sp] * x.shape[0] * x.shape[1]
                want["seq"].append(np.repeat(ids, 10 + p))
                want["tok"] += [t for row in toks for t in row]
    io._merged_manifest(str(root), 2, []).save(root)
    return {**want, "h": np.concatenate(want["h"]), "seq": np.concatenate(want["seq"])}


def test_a_store_of_process_shards_reads_as_one_in_process_order(tmp_path, rng):
    root = tmp_path / "st"
    want = _two_shards(root, rng)
    n = len(want["h"])
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == 2 and [s["rows"] for s in manifest["shards"]] == [40, 66]
    st = query.open_store(root)
    assert st.rows == n == 106 and st.complete and st.splits == ["trusted", "query", "extra"]
    np.testing.assert_array_equal(st.read("h", 0, n).result(), want["h"])
    np.testing.assert_array_equal(st.read("h", 35, 47).result(), want["h"][35:47])  # across
    np.testing.assert_array_equal(st.read_meta("sequence_id", 0, n), want["seq"])
    codes = st.read_meta("split", 30, n)
    assert [st.splits[c] for c in codes] == want["split"][30:]
    tokens = st.tokens()
    assert [tokens[r] for r in range(n)] == want["tok"]
    # The pipeline reads it like any store: a block of 32 rows straddles the two shards.
    est = jaxmon.gaussian()
    state, _ = query.fit_store(root, est, split="query", block_rows=32)
    rows = want["h"][np.asarray(want["split"]) == "query"].astype(np.float64)
    assert jaxmon.num_rows(state) == len(rows)
    np.testing.assert_allclose(np.asarray(state.mean), rows.mean(0), rtol=1e-5, atol=1e-6)
    fitted = est.finalize(state)
    res = query.score_store(root, est, fitted, out=tmp_path / "q", block_rows=32)
    ref = np.asarray(est.score(fitted, jnp.asarray(want["h"])))
    np.testing.assert_allclose(res.scores("h"), ref, rtol=1e-5, atol=1e-5)
    assert res.summary["processes"] == [{"process": 0, "rows": n}]


def test_a_store_of_shards_refuses_damage_naming_the_shard(tmp_path, rng):
    root = tmp_path / "st"
    _two_shards(root, rng)
    chunk = root / "shards" / "00001" / "taps" / "000_h" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[9] ^= 0x10
    chunk.write_bytes(bytes(raw))
    st = query.open_store(root)
    # Shard 1 starts at row 40: its chunk 1 (8 rows per chunk) holds rows 48-55 of the store.
    with pytest.raises(
        StoreError, match=r"chunk file shards/00001/taps/000_h/c/1/0 \(rows 48-55\)"
    ):
        st.read("h", 0, 106).result()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][1]["rows"] = 70
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"truncated: shard 1 .* holds 66 rows but"):
        query.open_store(root)
    manifest["shards"][1]["path"] = "../elsewhere"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="points outside the store"):
        query.open_store(root)
    # A job killed before process 1 committed anything: process 0's rows open.
    manifest["shards"][1]["path"] = "shards/00002"
    manifest["complete"], manifest["shards"][0]["rows"], manifest["shards"][1]["rows"] = (
        False,
        None,
        None,
    )
    (root / "manifest.json").write_text(json.dumps(manifest))
    st = query.open_store(root)
    assert st.rows == 40 and not st.complete
    with pytest.raises(ConfigError, match="collective"):
        io.ActivationWriter(tmp_path / "other", collective="yes")
