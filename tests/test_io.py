"""Activation stores: the writer (JAX, numpy, PyTorch inputs; bf16; masks; row metadata) and
the importers (.npy, .npz, safetensors), read back through jaxmon.query.open_store."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxmon import io, query

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
        with pytest.raises(ValueError, match="every write must give every tap"):
            w.write({"b": np.zeros((4, 3), np.float32)})
        with pytest.raises(ValueError, match="same tokens"):
            w.write({"a": np.zeros((4, 3), np.float32), "b": np.zeros((5, 3), np.float32)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.ActivationWriter(tmp_path / "st")
    w = io.ActivationWriter(tmp_path / "st2")
    w.write({"a": np.zeros((4, 3), np.int32)})  # integer activations fail on the worker thread
    with pytest.raises(RuntimeError, match="floating point"):
        w.close()


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
    with pytest.raises(KeyError, match="no tap 'nope'"):
        io.import_safetensors(tmp_path / "s4", tmp_path / "x.safetensors", taps=["nope"])
