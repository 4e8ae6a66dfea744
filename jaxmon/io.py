"""Activation logs: one zarr3 array per tap, written asynchronously with tensorstore.

Layout of a store directory::

    manifest.json            taps, shapes, dtypes, row count, chunk rows, splits, sidecars
    taps/<i>_<name>/         zarr3 array [rows, d] per tap (bf16 allowed), chunks [chunk_rows, d]
    rows/sequence_id/        zarr3 int64 [rows]
    rows/position/           zarr3 int32 [rows]
    rows/label/              zarr3 int8 [rows] (-1 where no label was given)
    rows/split/              zarr3 int8 [rows] (index into manifest["splits"], -1 for none)
    tokens.jsonl             optional token text: {"start": row, "tokens": [...]} per write

Writes are chunk-aligned (rows are buffered until a whole chunk is ready) and run on a
background thread with a bounded queue, so the caller only pays for handing over its arrays
(a JAX job's arrays start their device-to-host copy at once and are converted off-thread).
Reading lives in :mod:`jaxmon.query`.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import struct
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

__all__ = [
    "ActivationWriter",
    "MANIFEST",
    "import_arrays",
    "import_npy",
    "import_npz",
    "import_safetensors",
]

MANIFEST = "manifest.json"
FORMAT = "jaxmon-activations"
ROW_META = {"sequence_id": "int64", "position": "int32", "label": "int8", "split": "int8"}
_TARGET_CHUNK_BYTES = 4 << 20


def _bf16():
    import ml_dtypes  # a jax dependency

    return ml_dtypes.bfloat16


def _to_numpy(x: Any) -> np.ndarray:
    """An array from JAX, numpy or PyTorch (CPU or not, bf16 included) as numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            return x.view(dtype=__import__("torch").int16).numpy().view(_bf16())
        return x.numpy()
    return np.asarray(x)


def _zarr3_spec(path: str, shape: Sequence[int], dtype: str, chunks: Sequence[int]) -> dict:
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            # Plain bytes: no compression (activations barely compress; zstd costs 3x in
            # write throughput here) and no sharding, so one chunk is one file.
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        },
        "create": True,
        # Write every chunk, even all-zero ones, so that a missing chunk file always means a
        # truncated store (tensorstore would otherwise skip chunks equal to the fill value).
        "store_data_equal_to_fill_value": True,
    }


def _safe_name(i: int, name: str) -> str:
    return f"{i:03d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


def default_chunk_rows(d: int, itemsize: int) -> int:
    """A power of two giving ~4 MiB chunks, within [256, 65536] rows."""
    rows = _TARGET_CHUNK_BYTES // max(1, d * itemsize)
    return int(min(65536, max(256, 1 << max(0, int(rows).bit_length() - 1))))


class _Column:
    """One growing zarr3 array and its chunk-aligned buffer."""

    def __init__(self, path: str, width: int | None, dtype: str, chunk_rows: int):
        self.shape_tail = () if width is None else (width,)
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self.capacity = chunk_rows * 16
        self.store = ts.open(
            _zarr3_spec(
                path, (self.capacity, *self.shape_tail), dtype, (chunk_rows, *self.shape_tail)
            )
        ).result()
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0  # rows handed to tensorstore (always a multiple of chunk_rows until close)

    def _ensure(self, rows: int) -> None:
        if rows > self.capacity:
            while self.capacity < rows:
                self.capacity *= 2
            self.store = self.store.resize(
                exclusive_max=[self.capacity, *self.shape_tail],
                expand_only=True,
                resize_metadata_only=True,
            ).result()

    def append(self, x: np.ndarray, pending: collections.deque, *, final: bool = False) -> None:
        if len(x):
            self.buffer.append(x)
            self.buffered += len(x)
        n = self.buffered if final else (self.buffered // self.chunk_rows) * self.chunk_rows
        if n == 0:
            return
        data = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        out, rest = data[:n], data[n:]
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)
        self._ensure(self.written + n)
        pending.append(self.store[self.written : self.written + n].write(out))
        self.written += n

    def close(self, rows: int) -> None:
        self.store.resize(
            exclusive_max=[rows, *self.shape_tail], shrink_only=True, resize_metadata_only=True
        ).result()


class ActivationWriter:
    """Writes activations of named taps (and row metadata) to a zarr3 store, asynchronously.

    Every :meth:`write` must give every tap, with the same leading shape (``[batch, seq]`` or
    ``[tokens]``). Rows where ``mask`` is False (padding) are not logged.

    Args:
      directory: the store directory (created; must not exist unless ``overwrite=True``).
      dtype: stored dtype of the taps (``"bfloat16"``, ``"float32"``, ``"float16"``); default:
        the dtype of each tap's first write.
      chunk_rows: rows per zarr chunk (default: ~4 MiB chunks of the widest tap).
      max_pending: writes queued or in flight before :meth:`write` blocks (back-pressure).
      overwrite: remove an existing store first.

    Example:
      >>> with jaxmon.io.ActivationWriter("acts", dtype="bfloat16") as w:
      ...     for batch in data:
      ...         out, taps = forward(params, batch)        # taps: {name: [b, s, d]}
      ...         w.write(taps, mask=batch["mask"], split="trusted", label=batch["label"])
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        dtype: str | None = None,
        chunk_rows: int | None = None,
        max_pending: int = 8,
        overwrite: bool = False,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory):
            if not overwrite:
                raise FileExistsError(
                    f"{self.directory} exists already; pass overwrite=True to replace it"
                )
            shutil.rmtree(self.directory)
        os.makedirs(self.directory)
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self.max_pending = max_pending
        self._taps: dict[str, _Column] = {}
        self._declared: tuple[str, ...] = ()  # tap names fixed by the first write
        self._meta: dict[str, _Column] = {}
        self._splits: list[str] = []
        self._rows = 0  # rows accepted (after masking), known once the worker converts them
        self._next_seq = 0
        self._has_labels = False
        self._tokens_file = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._pending: collections.deque = collections.deque()
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="jaxmon-writer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller side

    def write(
        self,
        taps: Mapping[str, Any],
        *,
        mask: Any = None,
        sequence_id: Any = None,
        position: Any = None,
        label: Any = None,
        split: str | None = None,
        tokens: Sequence[Any] | None = None,
    ) -> None:
        """Queues one batch of rows; returns as soon as the arrays are handed over.

        Args:
          taps: ``{tap: [..., d]}`` arrays (JAX, numpy or PyTorch), same leading shape.
          mask: ``[...]`` booleans; False rows (padding) are dropped.
          sequence_id: ``[...]`` or ``[batch]`` ints; default: a new id per sequence (each
            ``[batch, seq]`` row, or the whole write for ``[tokens]`` inputs).
          position: ``[...]`` ints; default: the index along the last leading axis.
          label: an int, ``[batch]`` or ``[...]`` ints (e.g. 1 = anomalous); -1 = unknown.
          split: a name for these rows (``"trusted"``, ``"query"``...).
          tokens: token strings with the leading shape (nested lists), logged as text.

        Raises:
          ValueError: taps missing/extra or with mismatched shapes.
        """
        self._raise_if_failed()
        if self._closed:
            raise ValueError("this ActivationWriter is closed")
        if not taps:
            raise ValueError("write() needs at least one tap")
        lead = None
        handed = {}
        for name, x in taps.items():
            if not hasattr(x, "shape") or len(x.shape) < 1:
                raise ValueError(f"tap {name!r}: expected an array [..., d], got {type(x)}")
            if lead is None:
                lead = tuple(x.shape[:-1])
            elif tuple(x.shape[:-1]) != lead:
                raise ValueError(
                    f"tap {name!r} has leading shape {list(x.shape[:-1])} but other taps have "
                    f"{list(lead)}; every tap of one write must cover the same tokens"
                )
            if hasattr(x, "copy_to_host_async"):
                x.copy_to_host_async()  # start the device-to-host copy; convert off-thread
            handed[name] = x
        with self._lock:
            known = set(self._declared)
            if known and set(handed) != known:
                raise ValueError(
                    f"write() got taps {sorted(handed)} but this store logs {sorted(known)}; "
                    "every write must give every tap"
                )
            self._declared = tuple(handed)
            n_seq = lead[0] if len(lead) >= 2 else 1
            seq0 = self._next_seq
            if sequence_id is None:
                self._next_seq += n_seq
            if split is not None and split not in self._splits:
                self._splits.append(split)
            split_code = -1 if split is None else self._splits.index(split)
        if label is not None:
            self._has_labels = True
        item = (handed, lead, mask, sequence_id, position, label, split_code, tokens, seq0)
        self._queue.put(item)

    def close(self) -> dict[str, Any]:
        """Waits for every write, trims the arrays to the rows written, writes the manifest.

        Returns:
          The manifest (also saved as ``manifest.json``).
        """
        if self._closed:
            return self._manifest
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
        for col in (*self._taps.values(), *self._meta.values()):
            col.append(np.zeros((0, *col.shape_tail), col.dtype), self._pending, final=True)
        self._drain(0)
        for col in (*self._taps.values(), *self._meta.values()):
            col.close(self._rows)
        if self._tokens_file is not None:
            self._tokens_file.close()
        self._manifest = {
            "format": FORMAT,
            "version": 1,
            "rows": self._rows,
            "chunk_rows": self.chunk_rows,
            "taps": {
                name: {
                    "path": os.path.relpath(col.store.kvstore.path, self.directory).rstrip("/"),
                    "shape": [self._rows, *col.shape_tail],
                    "dtype": col.dtype,
                }
                for name, col in self._taps.items()
            },
            "row_meta": {k: f"rows/{k}" for k in self._meta},
            "splits": list(self._splits),
            "has_labels": self._has_labels,
            "tokens": "tokens.jsonl" if self._tokens_file is not None else None,
        }
        tmp = os.path.join(self.directory, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self._manifest, f, indent=1)
        os.replace(tmp, os.path.join(self.directory, MANIFEST))
        return self._manifest

    @property
    def rows(self) -> int:
        """Rows written so far (after masking; exact once :meth:`close` returned)."""
        return self._rows

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the caller's error; stop the worker
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing activations failed: {self._error}") from self._error

    # ---------------------------------------------------------------- worker side

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def _work(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                self._consume(*item)
                self._drain(self.max_pending)
        except BaseException as e:
            self._error = e
            while self._queue.get() is not None:  # unblock a producer waiting on put()
                pass

    def _columns(self, arrays: Mapping[str, np.ndarray]) -> None:
        widest = max(
            int(a.shape[-1]) * np.dtype(self._dtype_of(a)).itemsize for a in arrays.values()
        )
        if self.chunk_rows is None:
            self.chunk_rows = default_chunk_rows(widest, 1)
        for i, (name, a) in enumerate(arrays.items()):
            path = os.path.join(self.directory, "taps", _safe_name(i, name))
            self._taps[name] = _Column(path, int(a.shape[-1]), self._dtype_of(a), self.chunk_rows)
        for k, dt in ROW_META.items():
            path = os.path.join(self.directory, "rows", k)
            self._meta[k] = _Column(path, None, dt, self.chunk_rows)

    def _dtype_of(self, a: np.ndarray) -> str:
        if self.dtype is not None:
            return str(self.dtype)
        name = np.dtype(a.dtype).name
        if name not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"activations must be floating point, got {name}")
        return name

    def _consume(self, handed, lead, mask, sequence_id, position, label, split, tokens, seq0):
        arrays = {k: _to_numpy(v) for k, v in handed.items()}
        n = int(np.prod(lead)) if lead else 1
        if not self._taps:
            self._columns(arrays)
        keep = None if mask is None else _to_numpy(mask).reshape(-1).astype(bool)
        if keep is not None and keep.shape[0] != n:
            raise ValueError(f"mask has {keep.shape[0]} entries for {n} rows of shape {lead}")

        def rows_of(v: Any, default: Callable[[], np.ndarray], dtype: str) -> np.ndarray:
            if v is None:
                out = default()
            else:
                v = _to_numpy(v)
                if v.ndim == 0:
                    out = np.full(lead, v)
                elif len(lead) >= 2 and v.shape == lead[:1]:
                    out = np.broadcast_to(v.reshape(lead[:1] + (1,) * (len(lead) - 1)), lead)
                elif v.shape == lead:
                    out = v
                else:
                    raise ValueError(f"row metadata of shape {list(v.shape)} for rows {list(lead)}")
            out = np.asarray(out, dtype).reshape(-1)
            return out if keep is None else out[keep]

        if len(lead) >= 2:
            seq_default = lambda: np.broadcast_to(
                (seq0 + np.arange(lead[0]))[:, None], (lead[0], int(np.prod(lead[1:])))
            )
            pos_default = lambda: np.broadcast_to(np.arange(lead[-1]), lead)
        else:
            seq_default = lambda: np.full(lead, seq0)
            pos_default = lambda: np.arange(n).reshape(lead)
        meta = {
            "sequence_id": rows_of(sequence_id, seq_default, "int64"),
            "position": rows_of(position, pos_default, "int32"),
            "label": rows_of(label, lambda: np.full(lead, -1), "int8"),
            "split": rows_of(None, lambda: np.full(lead, split), "int8"),
        }
        kept = len(meta["position"])
        if tokens is not None:
            flat = np.asarray(tokens, dtype=object).reshape(-1)
            if flat.shape[0] != n:
                raise ValueError(f"tokens has {flat.shape[0]} entries for {n} rows")
            if keep is not None:
                flat = flat[keep]
            if self._tokens_file is None:
                self._tokens_file = open(os.path.join(self.directory, "tokens.jsonl"), "a")
            rec = {"start": self._rows, "tokens": [str(t) for t in flat]}
            self._tokens_file.write(json.dumps(rec) + "\n")
        for name, a in arrays.items():
            col = self._taps[name]
            rows = a.reshape(n, a.shape[-1])
            if keep is not None:
                rows = rows[keep]
            col.append(
                rows.astype(np.dtype(_bf16() if col.dtype == "bfloat16" else col.dtype)),
                self._pending,
            )
        for k, v in meta.items():
            self._meta[k].append(v, self._pending)
        self._rows += kept


# --------------------------------------------------------------------------- importers


class _NpyStream:
    """Sequential row blocks of an ``.npy`` held in a zip member (``.npz``), bounded memory."""

    def __init__(self, zf: zipfile.ZipFile, member: str):
        self.f = zf.open(member)
        version = np.lib.format.read_magic(self.f)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(self.f)
        if fortran:
            raise ValueError(f"{member}: Fortran-ordered arrays are not supported; save C order")
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self._pos = 0

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(self.shape[0])
        if start != self._pos:
            raise ValueError("row blocks of a .npz member must be read in order")
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        buf = self.f.read((stop - start) * row)
        self._pos = stop
        return np.frombuffer(buf, self.dtype).reshape((stop - start, *self.shape[1:]))


def _safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-maps every tensor of a safetensors file (its header is 8 bytes + JSON)."""
    dtypes = {
        "F32": np.float32,
        "F16": np.float16,
        "F64": np.float64,
        "BF16": None,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dt = np.dtype(_bf16() if info["dtype"] == "BF16" else dtypes[info["dtype"]])
        start, stop = info["data_offsets"]
        shape = tuple(info["shape"])
        if stop - start != int(np.prod(shape)) * dt.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has inconsistent offsets (truncated file?)")
        out[name] = np.memmap(path, dt, mode="r", offset=8 + n + start, shape=shape)
    return out


def import_arrays(
    directory: str | os.PathLike,
    arrays: Mapping[str, Any],
    *,
    sequence_id: Any = None,
    position: Any = None,
    label: Any = None,
    split: str | None = None,
    dtype: str | None = None,
    chunk_rows: int | None = None,
    block_rows: int = 65536,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes arrays logged elsewhere (``[tokens, d]`` or ``[batch, seq, d]``) as a store.

    The arrays are read in blocks of ``block_rows`` tokens, so memory-mapped inputs stream.
    Row metadata arrays have the arrays' leading shape (``sequence_id``/``position`` default as in
    :meth:`ActivationWriter.write`: one sequence per ``[batch]`` row, or per ``[tokens]`` array).

    Returns:
      The manifest of the new store.
    """
    if not arrays:
        raise ValueError("no tap arrays to import")
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    lead = next(iter(shapes.values()))[:-1]
    for k, s in shapes.items():
        if s[:-1] != lead or len(s) not in (2, 3):
            raise ValueError(
                f"tap {k!r} has shape {list(s)}; every tap must be [tokens, d] or [batch, seq, d] "
                f"with the same leading shape {list(lead)}"
            )
    meta = {"sequence_id": sequence_id, "position": position, "label": label}
    meta = {k: None if v is None else np.asarray(v) for k, v in meta.items()}
    for k, v in meta.items():
        if v is not None and v.shape not in (lead, lead[:1], ()):
            raise ValueError(f"{k} has shape {list(v.shape)} for rows of shape {list(lead)}")
    # Stream along the first axis; for [batch, seq, d], blocks of whole sequences.
    per = int(np.prod(lead[1:])) if len(lead) > 1 else 1
    step = max(1, block_rows // per)
    n0 = lead[0]
    if len(lead) == 1:
        if meta["sequence_id"] is None:
            meta["sequence_id"] = np.zeros(lead, np.int64)
        if meta["position"] is None:
            meta["position"] = np.arange(n0)
    with ActivationWriter(directory, dtype=dtype, chunk_rows=chunk_rows, overwrite=overwrite) as w:
        for i in range(0, n0, step):
            sl = slice(i, min(n0, i + step))
            block = {k: np.asarray(a[sl]) for k, a in arrays.items()}
            kw = {}
            for k, v in meta.items():
                if v is None:
                    continue
                kw[k] = v if v.ndim == 0 else v[sl]
            if len(lead) > 1 and kw.get("sequence_id") is None:
                kw["sequence_id"] = np.arange(sl.start, sl.stop)
            w.write(block, split=split, **kw)
    return w.close()


def _pick(found: Mapping[str, Any], taps: Iterable[str] | None, where: str) -> dict[str, Any]:
    meta_names = {"sequence_id", "position", "label"}
    names = [k for k in found if k not in meta_names] if taps is None else list(taps)
    missing = [t for t in names if t not in found]
    if missing:
        raise KeyError(f"{where} has no tap {missing[0]!r} (it holds {sorted(found)})")
    return {t: found[t] for t in names}


def import_npy(
    directory: str | os.PathLike, files: Mapping[str, str | os.PathLike], **kwargs: Any
) -> dict[str, Any]:
    """Imports ``{tap: path.npy}`` (memory-mapped, streamed) with :func:`import_arrays`."""
    arrays = {}
    for tap, path in files.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such .npy file: {os.fspath(path)}")
        arrays[tap] = np.load(path, mmap_mode="r")
    return import_arrays(directory, arrays, **kwargs)


def import_npz(
    directory: str | os.PathLike,
    path: str | os.PathLike,
    *,
    taps: Iterable[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Imports the arrays of an ``.npz`` (streamed member by member in row blocks).

    Members named ``sequence_id``, ``position`` or ``label`` become row metadata unless given.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such .npz file: {os.fspath(path)}")
    with zipfile.ZipFile(path) as zf:
        members = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
        for k in ("sequence_id", "position", "label"):
            if k in members and kwargs.get(k) is None:
                with zf.open(members[k]) as f:
                    kwargs[k] = np.lib.format.read_array(f)
        streams = {t: _NpyStream(zf, members[t]) for t in _pick(members, taps, os.fspath(path))}
        return import_arrays(directory, streams, **kwargs)


def import_safetensors(
    directory: str | os.PathLike,
    path: str | os.PathLike,
    *,
    taps: Iterable[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Imports the tensors of a safetensors file (memory-mapped; bf16 kept as bf16).

    The header is parsed directly (no ``safetensors`` package needed). Tensors named
    ``sequence_id``, ``position`` or ``label`` become row metadata unless given.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such safetensors file: {os.fspath(path)}")
    found = _safetensors(os.fspath(path))
    for k in ("sequence_id", "position", "label"):
        if k in found and kwargs.get(k) is None:
            kwargs[k] = np.asarray(found[k])
    return import_arrays(directory, _pick(found, taps, os.fspath(path)), **kwargs)
