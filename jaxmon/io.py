"""Activation logs: one zarr3 array per tap, written asynchronously with tensorstore.

Layout of a store directory::

    manifest.json            the commit record: taps, shapes, dtypes, committed row count,
                             chunk rows, splits, sidecars (see :class:`Manifest`)
    taps/<i>_<name>/         zarr3 array [>= rows, d] per tap (bf16 allowed), chunks [chunk_rows, d]
    rows/sequence_id/        zarr3 int64 [>= rows]
    rows/position/           zarr3 int32 [>= rows]
    rows/label/              zarr3 int8 [>= rows] (-1 where no label was given)
    rows/split/              zarr3 int8 [>= rows] (index into manifest["splits"], -1 for none)
    tokens.jsonl             optional token text: {"start": row, "tokens": [...]} per write

Every array carries the zarr3 ``crc32c`` codec: a chunk damaged on disk fails its checksum when
it is read (a :class:`~jaxmon.errors.StoreError` naming the tap and chunk), instead of being
read as wrong numbers. Stores written without it still open (each array's codecs come from its
own ``zarr.json``).

**Validated at the call.** :meth:`ActivationWriter.write` checks tap names, widths, dtypes and
the leading shapes of taps, mask, row metadata and tokens against each other and against the
first write *before* anything is queued, and refuses a bad write with a typed error at that
call; the rows accepted before it are untouched and :meth:`ActivationWriter.close` still writes
a valid store of them.

**Committed as chunks land.** The manifest's ``rows`` is the store's commit record: readers
read rows ``[0, rows)`` only and ignore what lies beyond it in the arrays or the token sidecar.
The writer saves the manifest (``rows = 0``) as soon as the arrays exist, then replaces it
atomically (a temporary file and ``os.replace``) whenever more rows are durable: every chunk of
every tap and of every row-metadata column holding them has been written (tensorstore writes
each chunk file whole) and their token text is flushed. It does so at most every
``commit_interval`` seconds (0.5 s by default, and when the writer idles): one JSON file of a
few KiB, nothing next to the chunk writes. A writer process that is killed leaves a store that
opens with every committed row: every whole chunk written more than about ``commit_interval``
before the kill. Rows still buffered (less than one chunk) or queued are lost. Like the score
writes of :mod:`jaxmon.query` this guards against the death of the process, not against power
loss (the manifest is not fsynced). :meth:`ActivationWriter.close` commits the rest, trims the
arrays to the rows written and marks the manifest ``complete``.

Writes are chunk-aligned (rows are buffered until a whole chunk is ready) and run on a
background thread with a bounded queue, so the caller only pays for the checks and for handing
over its arrays (a JAX job's arrays start their device-to-host copy at once and are converted
off-thread). Reading lives in :mod:`jaxmon.query`.

**Many processes (``jax.distributed``).** When ``jax.process_count() > 1`` every process makes
the same ``ActivationWriter(path)`` call and writes its own rows; the path must be on a file
system that every process sees. Rows of different processes never share a file: each process
writes a complete single-process store of its own, a *shard*, and the store directory ties them
together::

    manifest.json            written by process 0 only (format version 2): the shard list
                             {"path": "shards/<i>", "rows": ...}; at close also the total row
                             count, the taps, the union of the splits and "complete"
    shards/00000/            process 0's rows: the single-process layout above, with its own
    shards/00001/            manifest.json committing its rows as its chunks land, ...

Why shards and not row ranges of one array: a process does not know in advance how many rows it
will write, and two processes creating the same zarr array collide on its metadata; a shard is
written exactly as a single-process store, so every guarantee above (validated writes, rows
committed as chunks land, SIGKILL safety, crc32c) holds per process unchanged.

*Row order*: the store's rows are shard 0's rows in the order process 0 wrote them, then
shard 1's, and so on (process-major). Split names are per shard on disk and read back as one
list (the union in that order); default ``sequence_id`` values are made distinct across
processes (``local_id * process_count + process_index``); explicit ones are kept as given.

*Barriers*: the constructor and :meth:`ActivationWriter.close` are collective. In the
constructor process 0 alone validates (or, with ``overwrite=True``, removes) the path and
writes the root manifest (``complete: false``), then every process learns the outcome in one
all-gather (a failure there raises the same error on every process) before it creates its own
shard. At close every process closes its shard, an all-gather tells each one every shard's
outcome and row count, process 0 writes the root manifest (``complete: true`` only when every
shard closed), and a second all-gather makes sure it is on disk before any process returns.
A killed process leaves its shard's committed rows readable, as in one process; a reader of a
store whose close never happened opens every shard's committed rows.

The importers (:func:`import_npy`, :func:`import_npz`, :func:`import_safetensors`) never run
code from a file: no pickle (object arrays are refused), safetensors headers are parsed as
plain JSON and every offset is checked against the file's size.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import queue
import re
import shutil
import struct
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from jaxmon.errors import (
    ConfigError,
    ExistingPathError,
    MissingFileError,
    ShapeError,
    StoreError,
    one_line,
)

__all__ = [
    "ActivationWriter",
    "MANIFEST",
    "Manifest",
    "all_gather_ints",
    "import_arrays",
    "import_npy",
    "import_npz",
    "import_safetensors",
    "process_info",
    "resolve_collective",
    "shard_path",
]

MANIFEST = "manifest.json"
FORMAT = "jaxmon-activations"
VERSION = 2  # 1: a single-process store; 2: a store of per-process shards (see above)
ROW_META = {"sequence_id": "int64", "position": "int32", "label": "int8", "split": "int8"}
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
COMMIT_INTERVAL = 0.5  # seconds between manifest commits while writing
_TARGET_CHUNK_BYTES = 4 << 20
_MAX_JSON_BYTES = 64 << 20  # a manifest or safetensors header beyond this is not one


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


def _dtype_name(x: Any) -> str | None:
    """numpy's name of ``x``'s dtype (``"bfloat16"`` too) without converting ``x``; None if none."""
    dt = getattr(x, "dtype", None)
    if dt is None:
        return None
    if hasattr(x, "detach"):  # torch: "torch.float32"
        return str(dt).removeprefix("torch.")
    try:
        return np.dtype(dt).name
    except TypeError:
        return str(dt)


def _zarr3_spec(path: str, shape: Sequence[int], dtype: str, chunks: Sequence[int]) -> dict:
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            # Plain bytes: no compression (activations barely compress; zstd costs 3x in
            # write throughput here) and no sharding, so one chunk is one file. crc32c appends
            # a 4-byte checksum to each chunk, verified on every read: bit rot is an error,
            # never silent numbers.
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "crc32c"},
            ],
        },
        "create": True,
        # Write every chunk, even all-zero ones, so that a missing chunk file always means a
        # truncated store (tensorstore would otherwise skip chunks equal to the fill value).
        "store_data_equal_to_fill_value": True,
    }


def _safe_name(i: int, name: str) -> str:
    """The directory name of the ``i``-th array named ``name`` (a tap or a score key)."""
    return f"{i:03d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


def _write_json_atomic(path: str, obj: Any, *, indent: int | None = None) -> None:
    """Replaces the JSON file ``path`` atomically: a reader sees the old file or the new one.

    ``os.replace`` is atomic for readers and survives a killed process; no fsync: like the
    tensorstore writes, it guards against the death of the process, not against power loss.
    """
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def default_chunk_rows(d: int, itemsize: int) -> int:
    """A power of two giving ~4 MiB chunks, within [256, 65536] rows."""
    rows = _TARGET_CHUNK_BYTES // max(1, d * itemsize)
    return int(min(65536, max(256, 1 << max(0, int(rows).bit_length() - 1))))


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- processes


def process_info() -> tuple[int, int]:
    """``(process index, process count)`` of a ``jax.distributed`` job; ``(0, 1)`` without one.

    JAX is only asked when it is imported already (a program that never imported it cannot
    have initialised ``jax.distributed``), so writing from a PyTorch job costs no JAX start-up.
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return 0, 1
    return int(jax.process_index()), int(jax.process_count())


def all_gather_ints(values: Sequence[int]) -> np.ndarray:
    """Every process's ``values`` (same length everywhere), as an int64 array ``[processes, k]``.

    A collective: every process must call it, in the same order; it is also the barrier that
    the multi-process writer and queries use. 64-bit values travel as pairs of 32-bit words
    (JAX without x64 would silently truncate int64).
    """
    own = np.asarray(values, np.int64).reshape(-1)
    if process_info()[1] == 1:
        return own[None]
    from jax.experimental import multihost_utils

    words = np.ascontiguousarray(own).view(np.int32)
    got = np.asarray(multihost_utils.process_allgather(words))
    return np.ascontiguousarray(got).view(np.int64).reshape(got.shape[0], -1)


def resolve_collective(collective: bool | None) -> tuple[int, int]:
    """``(process index, process count)`` that a collective call splits its work over.

    ``collective=None`` means "every process of the job takes part" (``(0, 1)`` alone);
    ``False`` makes this process act alone, as in a single-process job.
    """
    if collective is False:
        return 0, 1
    if collective not in (None, True):
        raise ConfigError(f"collective must be None, True or False, got {_short(collective)}")
    return process_info()


# --------------------------------------------------------------------------- the manifest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _inside(rel: Any, where: str, field: str) -> str:
    """``rel`` if it is a relative path that stays inside the store directory."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise StoreError(f"{where}: {field} must be a relative path, got {_short(rel)}")
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise StoreError(
            f"{where}: {field} {_short(rel)} points outside the store directory; a store only "
            "references files inside itself"
        )
    return norm


@dataclasses.dataclass
class Manifest:
    """The commit record of a store (``manifest.json``), shared by the writer and the reader.

    Attributes:
      rows: committed rows; readers read rows ``[0, rows)`` of every array and ignore the rest.
      chunk_rows: rows per zarr chunk (None for a store that never received a write).
      taps: ``{tap: {"path": relative path, "shape": [rows, d], "dtype": name}}``.
      row_meta: ``{column: relative path}`` of the row-metadata arrays.
      splits: split names (``rows/split`` holds indices into this list).
      has_labels: whether any write gave labels.
      tokens: relative path of the token-text sidecar, or None.
      complete: False while the writer runs (or after it failed or was killed).
      shards: for a store written by several processes, ``[{"path": relative path, "rows":
        rows at close or None}]`` in row order (the shards hold the data; ``taps`` then has
        no paths); None for a single-process store.
    """

    rows: int = 0
    chunk_rows: int | None = None
    taps: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    row_meta: dict[str, str] = dataclasses.field(default_factory=dict)
    splits: list[str] = dataclasses.field(default_factory=list)
    has_labels: bool = False
    tokens: str | None = None
    complete: bool = True
    shards: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON object saved in ``manifest.json``."""
        obj = dataclasses.asdict(self)
        if self.shards is None:
            # A single-process store stays version 1, readable by every earlier jaxmon.
            del obj["shards"]
            return {"format": FORMAT, "version": 1, **obj}
        return {"format": FORMAT, "version": VERSION, **obj}

    def save(self, directory: str | os.PathLike) -> None:
        """Replaces ``directory/manifest.json`` atomically (a reader sees the old or the new)."""
        _write_json_atomic(os.path.join(os.fspath(directory), MANIFEST), self.to_json(), indent=1)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        """Reads and validates ``directory/manifest.json``.

        Raises:
          StoreError: no manifest, garbled JSON, wrong field types, a negative row count, or a
            path that leaves the store directory.
        """
        directory = os.fspath(directory)
        path = os.path.join(directory, MANIFEST)
        if not os.path.isdir(directory):
            raise StoreError(f"no activation store at {directory}")
        if not os.path.isfile(path):
            raise StoreError(
                f"{directory} has no manifest.json: not an activation store, or its writer "
                "died before its first write"
            )
        if os.path.getsize(path) > _MAX_JSON_BYTES:
            raise StoreError(f"{path} is larger than any activation-store manifest")
        try:
            with open(path, "rb") as f:
                obj = json.loads(f.read().decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise StoreError(f"{path} is not valid JSON ({one_line(e, 100)})") from e
        return cls.from_json(obj, path)

    @classmethod
    def from_json(cls, obj: Any, where: str = MANIFEST) -> Manifest:
        """Validates a parsed manifest (see :meth:`load`)."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise StoreError(f"{where} is not a jaxmon activation-store manifest")
        version = obj.get("version")
        if not _is_int(version) or version > VERSION:
            raise StoreError(
                f"{where} has format version {_short(version)}; this jaxmon reads versions up "
                f"to {VERSION} (upgrade jaxmon)"
            )

        def field(name: str, ok: Callable[[Any], bool], want: str, default: Any = ...) -> Any:
            if name not in obj and default is not ...:
                return default
            v = obj.get(name)
            if not ok(v):
                raise StoreError(f"{where}: {name} must be {want}, got {_short(v)}")
            return v

        rows = field("rows", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
        chunk_rows = field(
            "chunk_rows", lambda v: v is None or (_is_int(v) and v > 0), "a positive integer"
        )
        shards_in = field("shards", lambda v: v is None or isinstance(v, list), "a list", None)
        shards = None
        if shards_in is not None:
            shards = []
            for i, sh in enumerate(shards_in):
                ok = isinstance(sh, dict) and (
                    sh.get("rows") is None or (_is_int(sh["rows"]) and sh["rows"] >= 0)
                )
                if not ok:
                    raise StoreError(
                        f"{where}: shard {i} must be {{'path': ..., 'rows': n}}, got {_short(sh)}"
                    )
                path = _inside(sh.get("path"), where, f"the path of shard {i}")
                shards.append({"path": path, "rows": sh.get("rows")})
        taps_in = field("taps", lambda v: isinstance(v, dict), "an object")
        taps = {}
        for name, info in taps_in.items():
            ok = (
                isinstance(info, dict)
                and isinstance(info.get("shape"), list)
                and len(info["shape"]) == 2
                and all(_is_int(s) and s >= 0 for s in info["shape"])
                and info.get("dtype") in FLOAT_DTYPES
            )
            if not ok:
                raise StoreError(
                    f"{where}: tap {_short(name)} must be described by a path, a shape [rows, d] "
                    f"and a floating dtype, got {_short(info)}"
                )
            taps[name] = {"shape": list(info["shape"]), "dtype": info["dtype"]}
            if shards is None:  # a sharded store's taps live in its shards
                path = _inside(info.get("path"), where, f"the path of tap {_short(name)}")
                taps[name] = {"path": path, **taps[name]}
        meta_in = field("row_meta", lambda v: isinstance(v, dict), "an object", {})
        row_meta = {
            k: _inside(v, where, f"the path of row metadata {_short(k)}")
            for k, v in meta_in.items()
        }
        splits = field(
            "splits",
            lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
            "a list of names",
            [],
        )
        has_labels = field("has_labels", lambda v: isinstance(v, bool), "true or false", False)
        tokens = field("tokens", lambda v: v is None or isinstance(v, str), "a path", None)
        if tokens is not None:
            tokens = _inside(tokens, where, "the token sidecar")
        complete = field("complete", lambda v: isinstance(v, bool), "true or false", True)
        return cls(
            rows, chunk_rows, taps, row_meta, list(splits), has_labels, tokens, complete, shards
        )


def read_tokens(path: str, rows: int) -> dict[int, str]:
    """Token text by row from a ``tokens.jsonl`` sidecar, for rows ``[0, rows)`` only.

    Records beyond the committed rows, and a last line torn by a killed writer, are ignored.

    Raises:
      StoreError: a record (other than a torn last line) that is not ``{"start": row,
        "tokens": [str, ...]}``.
    """
    out: dict[int, str] = {}
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            if i == last:  # a torn record: the writer died while writing it
                break
            raise StoreError(f"{path}: line {i + 1} is not JSON ({one_line(e, 80)})") from e
        ok = (
            isinstance(rec, dict)
            and _is_int(rec.get("start"))
            and rec["start"] >= 0
            and isinstance(rec.get("tokens"), list)
            and all(isinstance(t, str) for t in rec["tokens"])
        )
        if not ok:
            raise StoreError(
                f'{path}: line {i + 1} is not a {{"start": row, "tokens": [...]}} record'
            )
        start = rec["start"]
        for j, t in enumerate(rec["tokens"][: max(0, rows - start)]):
            out[start + j] = t
    return out


# --------------------------------------------------------------------------- the writer


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(_bf16() if name == "bfloat16" else name)


def _rows_shape(what: str, v: Any, lead: tuple[int, ...], *, per_sequence: bool) -> None:
    """Refuses row metadata (or a mask) whose shape or dtype cannot describe the rows."""
    if v is None:
        return
    if getattr(v, "shape", None) is None:
        v = np.asarray(v)  # lists and Python scalars: host data, cheap to convert here
    shape = tuple(int(s) for s in v.shape)
    n = math.prod(lead)
    is_mask = what == "mask"
    ok = (
        shape == lead
        or (is_mask and shape == (n,))
        or (not is_mask and shape == ())
        or (per_sequence and len(lead) >= 2 and shape == lead[:1])
    )
    if not ok:
        forms = [list(lead)] + ([[n]] if is_mask and len(lead) != 1 else [])
        forms += [[]] if not is_mask else []
        forms += [[lead[0]]] if per_sequence and len(lead) >= 2 else []
        raise ShapeError(
            f"{what} has shape {list(shape)} but the taps of this write have rows of leading "
            f"shape {list(lead)}; give {what} one of the shapes {forms}"
        )
    dt = _dtype_name(v) or ""
    if not (dt == "bool" or dt.startswith(("int", "uint")) or (is_mask and "float" in dt)):
        raise ShapeError(f"{what} must hold integers{' or booleans' if is_mask else ''}, got {dt}")


def _row_metadata(
    lead: tuple[int, ...],
    *,
    sequences: np.ndarray,
    sequence_id: Any = None,
    position: Any = None,
    label: Any = None,
    split: int = -1,
    first_position: int = 0,
) -> dict[str, np.ndarray]:
    """The row-metadata columns of rows of leading shape ``lead``, flat, defaults filled in.

    The one place that says what a row's metadata is when it is not given, for
    :meth:`ActivationWriter.write` and :func:`import_arrays`:

    * ``sequence_id``: ``sequences[j]`` for the rows of entry ``j`` of a ``[batch, seq, ...]``
      write, ``sequences[0]`` for every row of a ``[tokens]`` write;
    * ``position``: the index along the last leading axis (from ``first_position`` for
      ``[tokens]`` rows that continue a sequence);
    * ``label``: -1 (unknown); ``split``: the split's code (-1: none).

    Given values broadcast over the rows: a scalar, one per sequence (``[batch]`` for
    ``[batch, seq, ...]`` rows) or one per row (their shapes were checked by
    :func:`_rows_shape`).
    """
    ids = np.asarray(sequences, np.int64).reshape(-1)

    def column(v: Any, default: Callable[[], np.ndarray], dtype: str) -> np.ndarray:
        if v is None:
            out = default()
        else:
            v = _to_numpy(v)
            if v.ndim == 0:
                out = np.full(lead, v)
            elif len(lead) >= 2 and v.shape == lead[:1]:
                out = np.broadcast_to(v.reshape(lead[:1] + (1,) * (len(lead) - 1)), lead)
            else:
                out = v
        return np.asarray(out, dtype).reshape(-1)

    if len(lead) >= 2:
        seq_default = lambda: np.broadcast_to(ids[:, None], (lead[0], math.prod(lead[1:])))
        pos_default = lambda: np.broadcast_to(np.arange(lead[-1]), lead)
    else:
        seq_default = lambda: np.full(lead, ids[0])
        pos_default = lambda: first_position + np.arange(math.prod(lead)).reshape(lead)
    return {
        "sequence_id": column(sequence_id, seq_default, "int64"),
        "position": column(position, pos_default, "int32"),
        "label": column(label, lambda: np.full(lead, -1), "int8"),
        "split": np.full(math.prod(lead), split, np.int8),
    }


def _check_taps(taps: Mapping[str, Any]) -> tuple[tuple[int, ...], dict, dict]:
    """``(leading shape, {tap: width}, {tap: dtype})`` of one write's taps, or a refusal."""
    lead: tuple[int, ...] | None = None
    widths, dtypes = {}, {}
    for name, x in taps.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tap names must be non-empty strings, got {_short(name)}")
        shape, dt = getattr(x, "shape", None), _dtype_name(x)
        if shape is None or dt is None:
            raise ShapeError(f"tap {name!r}: expected an array [..., d], got {type(x)}")
        shape = tuple(int(s) for s in shape)
        if not shape or shape[-1] < 1:
            raise ShapeError(f"tap {name!r}: expected an array [..., d], got shape {[*shape]}")
        if dt not in FLOAT_DTYPES:
            raise ShapeError(
                f"tap {name!r}: activations must be floating point "
                f"({', '.join(FLOAT_DTYPES)}), got {dt}"
            )
        if lead is None:
            lead = shape[:-1]
        elif shape[:-1] != lead:
            raise ShapeError(
                f"tap {name!r} has leading shape {list(shape[:-1])} but other taps have "
                f"{list(lead)}; every tap of one write must cover the same tokens"
            )
        widths[name], dtypes[name] = shape[-1], dt
    assert lead is not None
    return lead, widths, dtypes


def _is_seq(t: Any) -> bool:
    return hasattr(t, "__len__") and not isinstance(t, str | bytes)


def _tokens_depth(tokens: Any, lead: tuple[int, ...]) -> int:
    """How deep ``tokens`` nests (0: an array to flatten); refuses a count that misses rows."""
    n = math.prod(lead)
    shape = getattr(tokens, "shape", None)
    if shape is not None:
        if tuple(shape) in (lead, (n,)):
            return 0
        raise ShapeError(
            f"tokens has shape {list(shape)} but this write has rows of leading shape {list(lead)}"
        )
    if not lead:
        return -1  # a single row: one token
    if not _is_seq(tokens):
        raise ShapeError(f"tokens must be nested lists of strings, got {type(tokens).__name__}")
    if len(lead) >= 2 and len(tokens) == n and (n == 0 or not _is_seq(tokens[0])):
        return 1  # a flat list of one token per row

    def walk(t: Any, dims: tuple[int, ...], where: str) -> None:
        if not _is_seq(t) or len(t) != dims[0]:
            got = f"{len(t)} entries" if _is_seq(t) else type(t).__name__
            raise ShapeError(
                f"tokens{where} has {got} where the rows of leading shape {list(lead)} need "
                f"{dims[0]}"
            )
        if len(dims) > 1:
            for i, u in enumerate(t):
                walk(u, dims[1:], f"{where}[{i}]")

    walk(tokens, lead, "")
    return len(lead)


def _flat_tokens(tokens: Any, depth: int) -> list[str]:
    if depth == -1:
        return [str(tokens)]
    if depth == 0:
        return [str(t) for t in np.asarray(tokens, dtype=object).reshape(-1)]
    if depth == 1:
        return [str(t) for t in tokens]
    return [s for t in tokens for s in _flat_tokens(t, depth - 1)]


@dataclasses.dataclass(frozen=True)
class _Write:
    """One accepted :meth:`ActivationWriter.write`, handed to the background thread.

    Attributes:
      taps: ``{tap: [*lead, d]}`` arrays in the first write's order (JAX, numpy or PyTorch).
      lead: the leading shape of the rows.
      mask, sequence_id, position, label: as given to ``write`` (checked, not converted).
      split: the split's code (-1: none).
      tokens: the token strings as given, or None; ``tokens_depth``: how they nest.
      first_sequence: the first default sequence id of this write (this process's count).
    """

    taps: dict[str, Any]
    lead: tuple[int, ...]
    mask: Any
    sequence_id: Any
    position: Any
    label: Any
    split: int
    tokens: Any
    tokens_depth: int | None
    first_sequence: int


class _Column:
    """One growing zarr3 array, its chunk-aligned buffer and how far its writes have landed."""

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
        self.durable = 0  # rows whose writes have all completed (a prefix: writes land in order)
        self.broken = False  # a write failed: nothing beyond `durable` may be committed

    def _ensure(self, rows: int) -> None:
        if rows > self.capacity:
            while self.capacity < rows:
                self.capacity *= 2
            # The metadata (zarr.json) is replaced whole: a killed writer leaves the old or the
            # new shape, both at least the committed rows.
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
        pending.append((self.store[self.written : self.written + n].write(out), self, n))
        self.written += n

    def close(self, rows: int) -> None:
        self.store.resize(
            exclusive_max=[rows, *self.shape_tail], shrink_only=True, resize_metadata_only=True
        ).result()


def _prepare_directory(path: str, overwrite: bool) -> None:
    """Creates the store directory ``path`` (removing a store there with ``overwrite``)."""
    if os.path.lexists(path):
        if not overwrite:
            raise ExistingPathError(f"{path} exists already; pass overwrite=True to replace it")
        if not os.path.isdir(path) or os.path.islink(path):
            raise StoreError(f"{path} is not a directory; refusing to replace it")
        names = set(os.listdir(path))
        if names and not names & {MANIFEST, "taps", "rows", "shards"}:
            raise StoreError(
                f"{path} is not empty and holds no activation store; refusing to delete it "
                "(overwrite=True only replaces a store)"
            )
        shutil.rmtree(path)
    os.makedirs(path)


def shard_path(i: int) -> str:
    """The directory of process ``i``'s shard, relative to the store directory."""
    return f"shards/{i:05d}"


class ActivationWriter:
    """Writes activations of named taps (and row metadata) to a zarr3 store, asynchronously.

    Every :meth:`write` must give every tap of the first write, each with the width and a
    floating dtype, and all with one leading shape (``[batch, seq]`` or ``[tokens]``; it may
    differ from write to write). Rows where ``mask`` is False (padding) are not logged. A write
    that breaks these rules is refused at the call, before anything is queued; the rows
    accepted before it stay, and :meth:`close` (also when the ``with`` block ends with an
    error) writes a valid store of them. The row count is committed while writing (see the
    module docstring): a killed writer leaves a store of every row committed before the kill.

    Under ``jax.distributed`` every process makes the same call and writes its own rows into
    its own shard of the store (see the module docstring for the layout, the row order and the
    two collective steps: the constructor and :meth:`close`).

    Args:
      directory: the store directory (created; must not exist unless ``overwrite=True``).
      dtype: stored dtype of the taps (``"bfloat16"``, ``"float32"``, ``"float16"``,
        ``"float64"``); default: the dtype of each tap's first write.
      chunk_rows: rows per zarr chunk (default: ~4 MiB chunks of the widest tap).
      max_pending: writes queued or in flight before :meth:`write` blocks (back-pressure).
      overwrite: remove an existing store first (only a store, or an empty directory).
      commit_interval: at most this many seconds between two commits of the row count.
      collective: ``None`` (default): with several ``jax.distributed`` processes, every one of
        them writes its shard (each must make this call); ``False``: this process writes a
        single-process store alone (no other process may write to ``directory``).

    Raises:
      ExistingPathError: ``directory`` exists and ``overwrite`` is False (a FileExistsError).
      StoreError: ``directory`` is a file, or a non-empty directory that is not a store.
      ConfigError: a ``dtype``, ``chunk_rows``, ``max_pending``, ``commit_interval`` or
        ``collective`` that cannot work.

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
        commit_interval: float = COMMIT_INTERVAL,
        collective: bool | None = None,
    ):
        if dtype is not None and str(dtype) not in FLOAT_DTYPES:
            raise ConfigError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {_short(dtype)}")
        if chunk_rows is not None and (not _is_int(chunk_rows) or chunk_rows < 1):
            raise ConfigError(f"chunk_rows must be a positive integer, got {_short(chunk_rows)}")
        if not _is_int(max_pending) or max_pending < 0:
            raise ConfigError(f"max_pending must be an integer >= 0, got {_short(max_pending)}")
        if not isinstance(commit_interval, int | float) or not commit_interval > 0:
            raise ConfigError(f"commit_interval must be > 0 seconds, got {_short(commit_interval)}")
        self.process, self.processes = resolve_collective(collective)
        self.root = os.path.abspath(os.fspath(directory))
        if self.processes == 1:
            _prepare_directory(self.root, overwrite)
            self.directory = self.root  # where this process's arrays and manifest go
        else:
            self.directory = self._prepare_shard(overwrite)
        self.dtype = None if dtype is None else str(dtype)
        self.chunk_rows = chunk_rows
        self.max_pending = max_pending
        self.commit_interval = float(commit_interval)
        self._spec: dict[str, tuple[int, str]] | None = None  # tap -> (width, stored dtype)
        self._taps: dict[str, _Column] = {}
        self._meta: dict[str, _Column] = {}
        self._splits: list[str] = []
        self._rows = 0  # rows accepted (after masking), known once the worker converts them
        self._next_seq = 0
        self._has_labels = False
        self._tokens_file = None
        self._committed = 0  # rows in the last saved manifest
        self._last_commit = 0.0
        self._manifest: dict[str, Any] | None = None
        self._failure: StoreError | None = None
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
        """Checks and queues one batch of rows; returns as soon as the arrays are handed over.

        Args:
          taps: ``{tap: [..., d]}`` floating arrays (JAX, numpy or PyTorch), same leading shape.
          mask: ``[...]`` booleans; False rows (padding) are dropped.
          sequence_id: ``[...]`` or ``[batch]`` ints; default: a new id per sequence (each
            ``[batch, seq]`` row, or the whole write for ``[tokens]`` inputs), distinct across
            the processes of a ``jax.distributed`` job.
          position: ``[...]`` ints; default: the index along the last leading axis.
          label: an int, ``[batch]`` or ``[...]`` ints (e.g. 1 = anomalous); -1 = unknown.
          split: a name for these rows (``"trusted"``, ``"query"``...).
          tokens: token strings with the leading shape (nested lists), logged as text.

        Raises:
          ShapeError: a tap whose width differs from its first write, a non-floating tap, taps
            of different leading shapes, or a mask, row metadata or tokens that do not match
            the rows. Nothing of the refused write is logged.
          ConfigError: taps missing or extra (compared with the first write), or not a dict.
          StoreError: the writer is closed, or its background writes failed.
        """
        self._raise_if_failed()
        if self._closed:
            raise StoreError(f"the ActivationWriter of {self.directory} is closed")
        if not isinstance(taps, Mapping):
            raise ConfigError(
                f"write() takes a dict {{tap name: [..., d] array}}, got {type(taps).__name__}"
            )
        if not taps:
            raise ConfigError("write() needs at least one tap")
        if split is not None and not isinstance(split, str):
            raise ConfigError(f"split must be a name (a string), got {type(split).__name__}")
        lead, widths, dtypes = _check_taps(taps)
        _rows_shape("mask", mask, lead, per_sequence=False)
        _rows_shape("sequence_id", sequence_id, lead, per_sequence=True)
        _rows_shape("position", position, lead, per_sequence=True)
        _rows_shape("label", label, lead, per_sequence=True)
        depth = None if tokens is None else _tokens_depth(tokens, lead)
        with self._lock:
            self._check_spec(widths, dtypes, lead)
            # Accepted: from here on, nothing refuses the write.
            seq0 = self._next_seq
            if sequence_id is None:
                self._next_seq += lead[0] if len(lead) >= 2 else 1
            if split is not None and split not in self._splits:
                self._splits.append(split)
            split_code = -1 if split is None else self._splits.index(split)
            if label is not None:
                self._has_labels = True
        handed = {k: taps[k] for k in self._spec}  # the first write's order
        for x in handed.values():
            if hasattr(x, "copy_to_host_async"):
                x.copy_to_host_async()  # start the device-to-host copy; convert off-thread
        self._queue.put(
            _Write(
                handed, lead, mask, sequence_id, position, label, split_code, tokens, depth, seq0
            )
        )

    def _check_spec(self, widths: dict[str, int], dtypes: dict[str, str], lead: tuple) -> None:
        """Refuses taps that differ from the first write's; the first write sets them."""
        spec = self._spec or {k: (d, self.dtype or dtypes[k]) for k, d in widths.items()}
        if set(widths) != set(spec):
            raise ConfigError(
                f"write() got taps {sorted(widths)} but this store logs {sorted(spec)}; "
                "every write must give every tap"
            )
        for k, d in widths.items():
            if d != spec[k][0]:
                raise ShapeError(
                    f"tap {k!r}: expected [..., {spec[k][0]}] (the width of its first "
                    f"write), got {[*lead, d]}"
                )
        if self._spec is None:
            self._spec = spec
            if self.chunk_rows is None:
                widest = max(d * _np_dtype(dt).itemsize for d, dt in spec.values())
                self.chunk_rows = default_chunk_rows(widest, 1)

    def close(self) -> dict[str, Any]:
        """Waits for every write, trims the arrays to the rows written, commits the manifest.

        Under ``jax.distributed`` this is collective (every process must close): each process
        closes its shard, then process 0 writes the store's manifest (see the module docstring).

        Returns:
          The manifest (also saved as ``manifest.json``); for a store of several processes the
          store's manifest (``shards`` lists every process's rows), the same on every process.

        Raises:
          StoreError: the background writes failed (a disk error...); the store then holds
            the rows committed before the failure, readable, and the message says how many.
            With several processes: also when another process's shard failed, or the shards
            disagree on the taps (names, widths, dtypes); the same error on every process.
        """
        if self._closed:
            if self._failure is not None:
                raise self._failure
            if self._manifest is not None:
                return self._manifest
        if self.processes == 1:
            return self._close_local()
        own: StoreError | None = None
        try:
            self._close_local()
        except StoreError as e:
            own = e
        return self._close_shards(own)

    def _close_local(self) -> dict[str, Any]:
        """Closes this process's store (or shard): every write landed, trimmed, committed."""
        if self._closed:
            if self._failure is not None:
                raise self._failure
            if self._manifest is not None:
                return self._manifest
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        cols = (*self._taps.values(), *self._meta.values())
        if self._error is None:
            try:
                for col in cols:
                    col.append(np.zeros((0, *col.shape_tail), col.dtype), self._pending, final=True)
                self._drain(0)
                for col in cols:
                    col.close(self._rows)
                if self._tokens_file is not None:
                    self._tokens_file.close()
                manifest = self._manifest_at(self._rows, complete=True)
                manifest.save(self.directory)
                self._manifest = manifest.to_json()
                return self._manifest
            except Exception as e:
                self._error = e
        raise self._fail() from self._error

    @property
    def rows(self) -> int:
        """Rows this process wrote so far (after masking; exact once :meth:`close` returned)."""
        return self._rows

    # ---------------------------------------------------------------- many processes

    def _prepare_shard(self, overwrite: bool) -> str:
        """Collective: process 0 prepares the store directory; every process creates its shard.

        Returns:
          This process's shard directory.
        """
        n = self.processes
        code, own = 0, None
        if self.process == 0:
            try:
                _prepare_directory(self.root, overwrite)
                shards = [{"path": shard_path(i), "rows": None} for i in range(n)]
                Manifest(complete=False, shards=shards).save(self.root)
            except ExistingPathError as e:
                code, own = 1, e
            except StoreError as e:
                code, own = 2, e
            except OSError as e:
                code, own = 3, e
        # Every process learns process 0's outcome (this is also the barrier after which the
        # directory exists): a refused path is the same error everywhere, not a hang.
        code = int(all_gather_ints([code])[0, 0])
        if own is not None:
            if isinstance(own, OSError):
                raise StoreError(f"cannot create the store {self.root} ({one_line(own)})") from own
            raise own
        if code == 1:
            raise ExistingPathError(
                f"{self.root} exists already; pass overwrite=True to replace it"
            )
        if code:
            raise StoreError(
                f"process 0 could not prepare the store directory {self.root} (its error says why)"
            )
        directory = os.path.join(self.root, shard_path(self.process))
        made = None
        try:
            os.makedirs(directory)
        except OSError as e:
            made = e
        # A second agreement: a process that cannot create its shard must not leave the others
        # waiting for it at close.
        failed = [i for i, (c,) in enumerate(all_gather_ints([made is not None])) if c]
        if made is not None:
            raise StoreError(f"cannot create the shard {directory} ({one_line(made)})") from made
        if failed:
            raise StoreError(f"process {failed[0]} could not create its shard of {self.root}")
        return directory

    def _close_shards(self, own: StoreError | None) -> dict[str, Any]:
        """Collective close: every shard's outcome, then the store's manifest from process 0."""
        got = all_gather_ints([0 if own is None else 1])
        failed = [i for i in range(self.processes) if got[i, 0]]
        # Every process reads the shard manifests and reaches the same verdict on its own.
        try:
            root, disagree = _merged_manifest(self.root, self.processes, failed), None
        except StoreError as e:
            root, disagree = None, e
        saved = 0
        if self.process == 0 and root is not None:
            try:
                root.save(self.root)
            except OSError as e:
                saved, disagree = (
                    1,
                    StoreError(f"cannot write the manifest of {self.root} ({one_line(e)})"),
                )
                disagree.__cause__ = e
        saved = int(all_gather_ints([saved])[0, 0])  # the manifest is on disk for everyone
        err = own or disagree
        if err is None and failed:
            err = StoreError(
                f"process {failed[0]} of {self.processes} failed to write its shard of "
                f"{self.root}; the store keeps every shard's committed rows"
            )
        if err is None and saved:
            err = StoreError(f"process 0 could not write the manifest of the store {self.root}")
        if err is not None:
            self._failure = err
            raise err
        assert root is not None
        self._manifest = root.to_json()
        return self._manifest

    def _sequence_ids(self, local: np.ndarray) -> np.ndarray:
        """Default sequence ids, distinct across the processes of a job (the identity alone)."""
        if self.processes == 1:
            return local
        return local * self.processes + self.process

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # The caller's error is the one to raise; the rows accepted before it are kept.
        try:
            self.close()
        except Exception as e:
            if isinstance(exc, BaseException):
                exc.add_note(f"jaxmon: closing the activation store failed too: {one_line(e)}")

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(
                f"writing activations to {self.directory} failed ({one_line(self._error, 120)}); "
                "close() keeps the rows committed so far"
            ) from self._error

    # ---------------------------------------------------------------- commits

    def _manifest_at(self, rows: int, *, complete: bool) -> Manifest:
        with self._lock:
            splits, has_labels = list(self._splits), self._has_labels
        return Manifest(
            rows=rows,
            chunk_rows=self.chunk_rows,
            taps={
                name: {
                    "path": os.path.relpath(col.store.kvstore.path, self.directory).rstrip("/"),
                    "shape": [rows, *col.shape_tail],
                    "dtype": col.dtype,
                }
                for name, col in self._taps.items()
            },
            row_meta={k: f"rows/{k}" for k in self._meta},
            splits=splits,
            has_labels=has_labels,
            tokens="tokens.jsonl" if self._tokens_file is not None else None,
            complete=complete,
        )

    def _commit(self, *, force: bool = False) -> None:
        """Saves the manifest with every row now durable (at most every ``commit_interval``)."""
        now = time.monotonic()
        if not self._taps or (not force and now - self._last_commit < self.commit_interval):
            return
        cols = (*self._taps.values(), *self._meta.values())
        rows = min(col.durable for col in cols)
        if rows == self._committed and not force:
            return
        if self._tokens_file is not None:
            self._tokens_file.flush()  # token records of committed rows reach the OS first
        self._manifest_at(rows, complete=False).save(self.directory)
        self._committed, self._last_commit = rows, now

    def _pop(self) -> None:
        """Waits for the oldest pending chunk write and moves its column's durable mark."""
        fut, col, n = self._pending.popleft()
        try:
            fut.result()
        except BaseException:
            col.broken = True
            raise
        if not col.broken:
            col.durable += n

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pop()

    def _reap(self) -> None:
        while self._pending and self._pending[0][0].done():
            self._pop()

    def _fail(self) -> StoreError:
        """Commits the rows that did land; returns the failure as one StoreError."""
        err = self._error
        while self._pending:
            try:
                self._pop()
            except Exception:
                pass
        cols = (*self._taps.values(), *self._meta.values())
        rows = min((col.durable for col in cols), default=0)
        kept = f"the store keeps the {rows:,} rows committed before it"
        try:
            if self._tokens_file is not None and not self._tokens_file.closed:
                self._tokens_file.close()
            if self._taps:
                self._manifest_at(rows, complete=False).save(self.directory)
        except Exception as e:
            kept = f"even the manifest could not be saved ({one_line(e, 60)})"
        self._failure = StoreError(
            f"writing activations to {self.directory} failed ({one_line(err, 120)}); {kept}"
        )
        return self._failure

    # ---------------------------------------------------------------- worker side

    def _work(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self.commit_interval)
                except queue.Empty:
                    item = ()  # idle: commit what has landed since
                if item is None:
                    return
                if item:
                    self._consume(item)
                    self._drain(self.max_pending)
                self._reap()
                self._commit()
        except BaseException as e:
            self._error = e
            while self._queue.get() is not None:  # unblock a producer waiting on put()
                pass

    def _open_columns(self) -> None:
        assert self._spec is not None and self.chunk_rows is not None
        for i, (name, (width, dt)) in enumerate(self._spec.items()):
            path = os.path.join(self.directory, "taps", _safe_name(i, name))
            self._taps[name] = _Column(path, width, dt, self.chunk_rows)
        for k, dt in ROW_META.items():
            path = os.path.join(self.directory, "rows", k)
            self._meta[k] = _Column(path, None, dt, self.chunk_rows)
        self._commit(force=True)  # rows = 0: the store opens from here on

    def _consume(self, item: _Write) -> None:
        lead, tokens = item.lead, item.tokens
        arrays = {k: _to_numpy(v) for k, v in item.taps.items()}
        n = math.prod(lead)
        if not self._taps:
            self._open_columns()
        mask = item.mask
        keep = None if mask is None else _to_numpy(mask).reshape(-1).astype(bool)
        # Default sequence ids: one per [batch] entry (or one for a [tokens] write), distinct
        # across the processes of a job.
        first = item.first_sequence
        ids = self._sequence_ids(
            first + np.arange(lead[0] if len(lead) >= 2 else 1, dtype=np.int64)
        )
        meta = _row_metadata(
            lead,
            sequences=ids,
            sequence_id=item.sequence_id,
            position=item.position,
            label=item.label,
            split=item.split,
        )
        if keep is not None:
            meta = {k: v[keep] for k, v in meta.items()}
        kept = len(meta["position"])
        if tokens is not None:
            flat = _flat_tokens(tokens, item.tokens_depth)
            if keep is not None:
                flat = [t for t, k in zip(flat, keep, strict=True) if k]
            if self._tokens_file is None:
                self._tokens_file = open(  # kept open for the writer's lifetime
                    os.path.join(self.directory, "tokens.jsonl"), "a", encoding="utf-8"
                )
            rec = {"start": self._rows, "tokens": flat}
            self._tokens_file.write(json.dumps(rec) + "\n")
        for name, a in arrays.items():
            col = self._taps[name]
            rows = a.reshape(n, a.shape[-1])
            if keep is not None:
                rows = rows[keep]
            col.append(rows.astype(_np_dtype(col.dtype)), self._pending)
        for k, v in meta.items():
            self._meta[k].append(v, self._pending)
        self._rows += kept


def _merged_manifest(root: str, processes: int, failed: Sequence[int]) -> Manifest:
    """The store's manifest from its shards' manifests (their taps must agree).

    Raises:
      StoreError: a shard without a readable manifest, or shards that logged different taps
        (names, widths or dtypes).
    """
    shards, splits = [], []
    spec, first, chunk_rows, has_labels, total = None, -1, None, False, 0
    complete = not failed
    for i in range(processes):
        rel = shard_path(i)
        m = Manifest.load(os.path.join(root, rel))
        if m.taps:
            tap_spec = {k: (v["shape"][1], v["dtype"]) for k, v in m.taps.items()}
            if spec is None:
                spec, first, chunk_rows = tap_spec, i, m.chunk_rows
            elif tap_spec != spec:
                raise StoreError(
                    f"process {i} logged taps {_short(tap_spec, 80)} but process {first} logged "
                    f"{_short(spec, 80)} into {root}: every process must write the same taps "
                    "with the same widths and dtypes"
                )
        splits += [s for s in m.splits if s not in splits]
        has_labels |= m.has_labels
        complete &= m.complete
        shards.append({"path": rel, "rows": m.rows})
        total += m.rows
    taps = {k: {"shape": [total, d], "dtype": dt} for k, (d, dt) in (spec or {}).items()}
    return Manifest(
        rows=total,
        chunk_rows=chunk_rows,
        taps=taps,
        splits=splits,
        has_labels=has_labels,
        complete=complete,
        shards=shards,
    )


# --------------------------------------------------------------------------- importers


def _read_header(f: Any, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an ``.npy`` stream (its header is a literal, parsed without eval)."""
    try:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f)
    except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile) as e:
        raise StoreError(f"{where} is not a valid .npy array ({one_line(e, 100)})") from e
    if dtype.hasobject:
        raise StoreError(
            f"{where} holds Python objects (a pickle); jaxmon never unpickles data: save numeric "
            "arrays"
        )
    if fortran:
        raise StoreError(f"{where}: Fortran-ordered arrays are not supported; save in C order")
    if any(s < 0 for s in shape):
        raise StoreError(f"{where} has a negative dimension in its shape {list(shape)}")
    return tuple(shape), dtype


class _NpyStream:
    """Sequential row blocks of an ``.npy`` held in a zip member (``.npz``), bounded memory."""

    def __init__(self, zf: zipfile.ZipFile, member: str, where: str):
        self.where = f"{where} member {member!r}"
        self.f = zf.open(member)
        self.shape, self.dtype = _read_header(self.f, self.where)
        self.ndim = len(self.shape)
        self._pos = 0

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(self.shape[0])
        if start != self._pos:
            raise ValueError("row blocks of a .npz member must be read in order")
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        try:
            buf = self.f.read((stop - start) * row)
        except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:  # zlib/CRC errors
            raise StoreError(f"{self.where} cannot be read ({one_line(e, 100)})") from e
        if len(buf) != (stop - start) * row:
            raise StoreError(
                f"{self.where} is truncated: rows {start}-{stop - 1} are missing from the file"
            )
        self._pos = stop
        return np.frombuffer(buf, self.dtype).reshape((stop - start, *self.shape[1:]))


_SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "F64": "float64",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-maps every tensor of a safetensors file (8 bytes of header length, JSON, data).

    Every field is checked before any byte of data is mapped: the header must be a JSON object
    within the file, each tensor a known dtype, a shape and offsets inside the data section
    whose length matches the shape.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StoreError(f"{path} is not a safetensors file (shorter than its 8-byte header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_JSON_BYTES):
            raise StoreError(
                f"{path}: the safetensors header claims {n:,} bytes but the file holds "
                f"{size - 8:,} after its length field (truncated or not safetensors)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise StoreError(f"{path}: the safetensors header is not JSON ({one_line(e, 80)})") from e
    if not isinstance(header, dict):
        raise StoreError(f"{path}: the safetensors header is not a JSON object")
    data = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"{path}: tensor {_short(name, 40)}"
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            raise StoreError(f"{what} has no dtype entry ({_short(info)})")
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise StoreError(f"{what} has unsupported dtype {_short(info['dtype'])}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
            raise StoreError(f"{what} has an invalid shape {_short(shape)}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise StoreError(
                f"{what} has data offsets {_short(offsets)} outside the file's {data:,} data "
                "bytes (truncated or crafted file)"
            )
        dt = _np_dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        start, stop = offsets
        if stop - start != math.prod(shape) * dt.itemsize:
            raise StoreError(
                f"{what}: its offsets span {stop - start:,} bytes but shape {shape} of "
                f"{info['dtype']} needs {math.prod(shape) * dt.itemsize:,}"
            )
        if stop == start:  # mmap refuses empty ranges
            out[name] = np.zeros(shape, dt)
        else:
            out[name] = np.memmap(path, dt, mode="r", offset=8 + n + start, shape=tuple(shape))
    return out


def _import_lead(arrays: Mapping[str, Any]) -> tuple[int, ...]:
    """The leading shape of arrays to import (``[tokens]`` or ``[batch, seq]``), or a refusal."""
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    lead = next(iter(shapes.values()))[:-1]
    for k, s in shapes.items():
        if s[:-1] != lead or len(s) not in (2, 3):
            raise ShapeError(
                f"tap {k!r} has shape {list(s)}; every tap must be [tokens, d] or [batch, seq, d] "
                f"with the same leading shape {list(lead)}"
            )
        dt = _dtype_name(arrays[k])
        if dt not in FLOAT_DTYPES:
            raise ShapeError(f"tap {k!r}: activations must be floating point, got {dt}")
    return lead


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

    Raises:
      ShapeError: taps of different leading shapes, not ``[tokens, d]``/``[batch, seq, d]``,
        not floating point, or row metadata that does not match them.
      ConfigError: no arrays, or ``block_rows`` < 1.
      StoreError: an input that cannot be read (see the ``import_*`` functions).
    """
    if not arrays:
        raise ConfigError("no tap arrays to import")
    if not _is_int(block_rows) or block_rows < 1:
        raise ConfigError(f"block_rows must be a positive integer, got {_short(block_rows)}")
    lead = _import_lead(arrays)
    meta = {"sequence_id": sequence_id, "position": position, "label": label}
    meta = {k: None if v is None else np.asarray(v) for k, v in meta.items()}
    for k, v in meta.items():
        if v is not None and v.shape not in (lead, lead[:1], ()):
            raise ShapeError(f"{k} has shape {list(v.shape)} for rows of shape {list(lead)}")
    # Stream along the first axis; for [batch, seq, d], blocks of whole sequences.
    per = math.prod(lead[1:]) if len(lead) > 1 else 1
    step = max(1, block_rows // max(per, 1))
    n0 = lead[0]
    # Importing is one process's job (every process importing the same files would log them
    # twice): the writer acts alone here, whatever the job's process count.
    with ActivationWriter(
        directory, dtype=dtype, chunk_rows=chunk_rows, overwrite=overwrite, collective=False
    ) as w:
        for i in range(0, n0, step):
            sl = slice(i, min(n0, i + step))
            block = {k: np.asarray(a[sl]) for k, a in arrays.items()}
            given = {k: v if v is None or v.ndim == 0 else v[sl] for k, v in meta.items()}
            rows = (sl.stop - sl.start, *lead[1:])
            # The writer's defaults, for the whole input rather than one block: a [tokens]
            # array is one sequence whose positions run on across blocks; [batch, seq] rows
            # are one sequence per batch entry, numbered from the input's first.
            cols = _row_metadata(
                rows,
                sequences=np.arange(sl.start, sl.stop) if len(lead) > 1 else 0,
                sequence_id=given["sequence_id"],
                position=given["position"],
                first_position=i if len(lead) == 1 else 0,
            )
            w.write(
                block,
                split=split,
                label=given["label"],
                sequence_id=cols["sequence_id"].reshape(rows),
                position=cols["position"].reshape(rows),
            )
    return w.close()


def _pick(found: Mapping[str, Any], taps: Iterable[str] | None, where: str) -> dict[str, Any]:
    meta_names = {"sequence_id", "position", "label"}
    names = [k for k in found if k not in meta_names] if taps is None else list(taps)
    missing = [t for t in names if t not in found]
    if missing:
        raise StoreError(f"{where} has no tap {missing[0]!r} (it holds {sorted(found)})")
    return {t: found[t] for t in names}


def import_npy(
    directory: str | os.PathLike, files: Mapping[str, str | os.PathLike], **kwargs: Any
) -> dict[str, Any]:
    """Imports ``{tap: path.npy}`` (memory-mapped, streamed) with :func:`import_arrays`.

    Files are memory-mapped with ``allow_pickle=False``: an array of Python objects is refused,
    never unpickled.

    Raises:
      MissingFileError: a file does not exist (a FileNotFoundError).
      StoreError: a file that is not a numeric ``.npy`` array (pickled objects included).
    """
    arrays = {}
    for tap, path in files.items():
        if not os.path.exists(path):
            raise MissingFileError(f"no such .npy file: {os.fspath(path)}")
        with open(path, "rb") as f:  # check the header first: objects never reach np.load
            _read_header(f, os.fspath(path))
        try:
            arrays[tap] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise StoreError(f"{os.fspath(path)} cannot be read ({one_line(e, 100)})") from e
        if not isinstance(arrays[tap], np.ndarray):
            raise StoreError(f"{os.fspath(path)} is not a .npy array")
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
    Members are read with ``allow_pickle=False``: object arrays are refused, never unpickled.

    Raises:
      MissingFileError: ``path`` does not exist (a FileNotFoundError).
      StoreError: not a zip of ``.npy`` members, a member holding objects, a truncated or
        corrupted member, or no member named by ``taps``.
    """
    where = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"no such .npz file: {where}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise StoreError(f"{where} is not an .npz (zip) file ({one_line(e, 80)})") from e
    with zf:
        members = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
        for k in ("sequence_id", "position", "label"):
            if k in members and kwargs.get(k) is None:
                with zf.open(members[k]) as f:
                    _read_header(f, f"{where} member {members[k]!r}")
                with zf.open(members[k]) as f:
                    try:
                        kwargs[k] = np.lib.format.read_array(f, allow_pickle=False)
                    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                        raise StoreError(
                            f"{where} member {members[k]!r} cannot be read ({one_line(e, 80)})"
                        ) from e
        streams = {t: _NpyStream(zf, members[t], where) for t in _pick(members, taps, where)}
        return import_arrays(directory, streams, **kwargs)


def import_safetensors(
    directory: str | os.PathLike,
    path: str | os.PathLike,
    *,
    taps: Iterable[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Imports the tensors of a safetensors file (memory-mapped; bf16 kept as bf16).

    The header is parsed directly (no ``safetensors`` package needed) and validated against the
    file's size before anything is mapped. Tensors named ``sequence_id``, ``position`` or
    ``label`` become row metadata unless given.

    Raises:
      MissingFileError: ``path`` does not exist (a FileNotFoundError).
      StoreError: a truncated file, a header that is not a JSON object, an unknown dtype, or
        offsets outside the file or not matching a tensor's shape.
    """
    if not os.path.exists(path):
        raise MissingFileError(f"no such safetensors file: {os.fspath(path)}")
    found = _safetensors(os.fspath(path))
    for k in ("sequence_id", "position", "label"):
        if k in found and kwargs.get(k) is None:
            kwargs[k] = np.asarray(found[k])
    return import_arrays(directory, _pick(found, taps, os.fspath(path)), **kwargs)
