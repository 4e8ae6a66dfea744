"""Batch anomaly queries over activation stores (the only module that reads tensorstore).

A store written by :class:`jaxmon.io.ActivationWriter` is read, fitted on, calibrated on and
scored in chunk-aligned blocks: memory is bounded by the block size, not by the number of
tokens (per-sequence aggregates are O(sequences)).

* :func:`fit_store` folds blocks into an estimator's state; :func:`calibrate_store` runs the
  two passes of calibration (fit, :func:`jaxmon.begin_calibration`, held-out rows, finalize).
* :func:`score_store` scores every row and is a pipeline of named parts: the one block reader
  (:func:`_read_blocks`: the reads of block ``i+1`` are issued before block ``i`` is scored, the
  tail block is padded and masked so the scoring function compiles once), a compiled block
  scorer split over the local devices (data parallel), the score arrays (one zarr3 array per
  score key), a running top-k and non-finite count per key (:class:`_Tally`), the resume
  journal (:class:`_Journal`: after each completed block a small progress record is replaced
  atomically, so a killed query resumes from its last completed block and produces
  bit-identical output) and the summary pass (:class:`_KeyStats`; per-sequence aggregates by
  :class:`jaxmon._aggregate.SequenceTable`).
* :func:`score_store_batch` runs whole-batch detectors (QUE, spectral signatures) through the
  same scoring loop, as plain score functions.

Long loops show a ``tqdm`` progress bar on stderr when it is a terminal (``progress=``).

Rows holding NaN or inf in a tap are maximally anomalous: every jaxmon estimator scores them
``+inf``; the summary counts them per score key (``nonfinite``) and they lead the top-k.

Every read goes through :class:`Store` (or :class:`QueryResult`), which turns a damaged array
(a chunk failing its ``crc32c`` checksum, a truncated or missing chunk file) into one
:class:`~jaxmon.errors.StoreError` naming the tap or column, the rows and the chunk file, with
tensorstore's error chained as its cause.

**Many processes (``jax.distributed``).** :func:`fit_store`, :func:`calibrate_store`,
:func:`score_store` and :func:`score_store_batch` are collective: every process makes the same
call, on a store and an output directory that every process sees. Blocks of ``b`` rows are
dealt round robin (block ``i`` to process ``i % process_count``) and split over each process's
local devices.

* ``fit_store`` folds each process's blocks locally (one replica per device, merged with the
  estimator's own ``merge``), then gathers every process's state (``process_allgather``) and
  tree-merges them in process order: every process returns the same state, bit for bit, equal
  to a one-process fit up to float rounding and with exactly the same row counts.
* ``score_store``: process 0 decides between resuming and starting afresh and prepares the
  output (arrays, ``query.json``); after a barrier the others open it. Score chunks are
  blocks, so processes never write the same file. Each process commits its own
  ``progress-<i>.json`` after each of its blocks, so a killed process resumes from its last
  block (the others skip what they finished). After a barrier, process 0 merges the top-k
  (the order is fixed: score, then row) and the non-finite counts of every record, writes
  ``sequences.npz`` and ``summary.json`` (with ``processes``: the rows each scored); after a
  last barrier every process returns the same :class:`QueryResult`. Scores, top-k and
  summary equal a one-process run's.

Every barrier is an all-gather of a status word: when one process fails, every process raises
(its own error where it failed, a :class:`StoreError` naming that process elsewhere) instead
of leaving the others waiting.

Output directory of a query::

    query.json         what was scored (store, keys, spec, block rows, process count); first
    progress.json      next block, the running top-k and non-finite counts (replaced atomically
                       per block); ``progress-<i>.json`` per process with several processes
    scores/<i>_<key>/  zarr3 float32 [rows] per score key (crc32c-checksummed chunks)
    raw/<i>_<key>/     for a calibrated query, the raw inner scores too (scored once)
    sequences.npz      per-sequence id, tokens, label, split, max and mean score per key
    summary.json       per key: top-k tokens, score statistics, non-finite rows, and when the
                       estimator is calibrated, threshold exceedances at several false-positive
                       rates; the rows each process scored
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from tqdm import tqdm

from jaxmon._aggregate import SequenceTable
from jaxmon._base import Estimator, EstimatorSpec, label_kwargs, nonfinite_rows, require_fitted
from jaxmon._calibration import (
    CalibratedFitted,
    CalibratedState,
    _inner_for,
    begin_calibration,
    calibrated,
    p_values_of_scores,
    threshold,
)
from jaxmon._keys import EstimatorKind, MonitorKey, kind_of
from jaxmon.errors import ConfigError, StoreError, one_line
from jaxmon.io import (
    MANIFEST,
    Manifest,
    _safe_name,
    _write_json_atomic,
    _zarr3_spec,
    all_gather_ints,
    read_tokens,
    resolve_collective,
)

__all__ = [
    "Calibration",
    "MonitorKey",
    "PendingRead",
    "QueryResult",
    "Store",
    "StoreError",
    "calibrate_store",
    "fit_store",
    "load_result",
    "open_store",
    "rank_store",
    "score_store",
    "score_store_batch",
]

FPRS = (0.1, 0.01, 0.001)
_MAX_MESSAGE = 300

# A plain score function, the one thing the scoring loop needs from an estimator or a batch
# detector: ``score(fitted, x, *, mask=None) -> [rows] | {key: [rows]}``, higher = more anomalous.
ScoreFn = Callable[..., Any]


# --------------------------------------------------------------------------- stores


def _clip(text: str, limit: int = _MAX_MESSAGE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _open_array(path: str, what: str) -> ts.TensorStore:
    if not os.path.exists(os.path.join(path, "zarr.json")):
        raise StoreError(_clip(f"the store is truncated: {what} has no zarr array at {path}"))
    try:
        return ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, open=True
        ).result()
    except Exception as e:
        raise StoreError(_clip(f"cannot open {what} at {path}: {one_line(e, 120)}")) from e


# Tensorstore's status codes on a read, as the words a user needs.
_REASONS = (
    ("DATA_LOSS", "fails its crc32c checksum (corrupted on disk)"),
    ("Not enough data", "is truncated"),
    ("FAILED_PRECONDITION", "is truncated or malformed"),
    ("NOT_FOUND", "is missing"),
    ("PERMISSION_DENIED", "is not readable (permissions)"),
)


def _read_error(
    e: BaseException,
    store_dir: str,
    what: str,
    arr: ts.TensorStore,
    start: int,
    stop: int,
    locate: Callable[[str], tuple[int, int]] | None = None,
) -> StoreError:
    """One sentence for a failed read of rows ``[start, stop)`` of ``what``.

    ``locate(chunk file path)`` gives ``(first row, rows per chunk)`` of the array holding that
    chunk file, for arrays pieced together from shards (default: ``arr``'s own chunks).
    """
    msg = str(e)
    reason = next((r for code, r in _REASONS if code in msg), None)
    found = re.search(r'"([^"]*?/c((?:/\d+)+))"', msg)
    rows = f"rows {start}-{stop - 1}"
    if found:
        if locate is None:
            offset, chunk_rows = 0, int(arr.chunk_layout.read_chunk.shape[0])
        else:
            offset, chunk_rows = locate(found.group(1))
        i = int(found.group(2).split("/")[1])
        key = os.path.relpath(found.group(1), store_dir)
        lo = offset + i * chunk_rows
        where = f"chunk file {key} (rows {lo}-{lo + chunk_rows - 1})"
    else:
        where = "a chunk"
    if reason is None:
        reason = f"cannot be read ({one_line(e, 100)})"
    return StoreError(
        _clip(f"{what}: {where} {reason}, so {rows} cannot be read from the store at {store_dir}")
    )


class PendingRead:
    """A read in flight, as returned by :meth:`Store.read`.

    :meth:`result` waits for the rows; a damaged chunk raises :class:`StoreError` (one sentence
    naming the tap and chunk) with tensorstore's error as its cause.
    """

    __slots__ = ("_fail", "_future")

    def __init__(self, future: Any, fail: Callable[[BaseException], StoreError]):
        self._future = future
        self._fail = fail

    def result(self) -> np.ndarray:
        """The rows, once read."""
        try:
            return self._future.result()
        except Exception as e:
            raise self._fail(e) from e

    def done(self) -> bool:
        """Whether the read has finished (successfully or not)."""
        return bool(self._future.done())


def _check_chunks(arr: ts.TensorStore, path: str, rows: int, what: str) -> None:
    """Every chunk that holds rows must exist on disk (a missing one would read as zeros).

    For plain (uncompressed) chunks the file size is known, so a truncated file is caught here
    too; checksums are verified when the rows are read.
    """
    chunk = arr.chunk_layout.read_chunk.shape
    n_row_chunks = -(-rows // chunk[0])
    n_col_chunks = [-(-int(s) // int(c)) for s, c in zip(arr.shape[1:], chunk[1:], strict=True)]
    names = [c.get("name") for c in arr.codec.to_json().get("codecs", [])]
    size = None
    if names and names[0] == "bytes" and all(n == "crc32c" for n in names[1:]):
        size = math.prod(chunk) * arr.dtype.numpy_dtype.itemsize + 4 * (len(names) - 1)
    for i in range(n_row_chunks):
        for rest in np.ndindex(*n_col_chunks):
            key = os.path.join(path, "c", str(i), *map(str, rest))
            rows_i = f"rows {i * chunk[0]}-{min(rows, (i + 1) * chunk[0]) - 1}"
            try:
                got = os.stat(key).st_size
            except FileNotFoundError:
                raise StoreError(
                    _clip(
                        f"the store is truncated: chunk {i} of {what} is missing ({key}); "
                        f"{rows_i} cannot be read"
                    )
                ) from None
            if size is not None and got != size:
                raise StoreError(
                    _clip(
                        f"the store is truncated: chunk {i} of {what} holds {got} bytes instead "
                        f"of {size} ({key}); {rows_i} cannot be read"
                    )
                )


@dataclasses.dataclass
class Store:
    """An opened activation store (see :mod:`jaxmon.io` for the layout).

    Reads cover the committed rows ``[0, rows)`` only; a failed read (a chunk failing its
    checksum, a truncated chunk file) raises :class:`StoreError`.

    A store written by several processes reads as one: its rows are every shard's committed
    rows, process 0's first (the row order of :mod:`jaxmon.io`); ``taps`` and ``meta`` are then
    virtual arrays pieced together from the shards (``tensorstore.concat``), ``splits`` is the
    union of the shards' split names and :meth:`read_meta` maps each shard's split codes onto
    it. ``parts`` lists ``(first row, rows, shard)`` (empty for a single-process store).
    """

    directory: str
    manifest: dict[str, Any]
    taps: dict[str, ts.TensorStore]
    meta: dict[str, ts.TensorStore]
    parts: list[tuple[int, int, Store]] = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> int:
        """Number of logged rows (tokens) committed to the store."""
        return int(self.manifest["rows"])

    @property
    def chunk_rows(self) -> int:
        """Rows per zarr chunk."""
        return int(self.manifest["chunk_rows"] or 1)

    @property
    def splits(self) -> list[str]:
        """Split names; ``rows/split`` holds indices into this list (-1: none)."""
        return list(self.manifest.get("splits", []))

    @property
    def complete(self) -> bool:
        """False when the writer has not closed the store (still running, failed or killed)."""
        return bool(self.manifest.get("complete", True))

    def _range(self, start: int, stop: int) -> tuple[int, int]:
        start = max(0, min(int(start), self.rows))
        return start, max(start, min(int(stop), self.rows))

    def _locate(self, chunk_file: str) -> tuple[int, int]:
        """(first row, rows per chunk) of the shard holding ``chunk_file``."""
        for first, _, part in self.parts:
            if chunk_file.startswith(part.directory + os.sep):
                return first, part.chunk_rows
        return 0, self.chunk_rows

    def _start(self, what: str, arr: ts.TensorStore, start: int, stop: int) -> PendingRead:
        start, stop = self._range(start, stop)
        locate = self._locate if self.parts else None
        fail = lambda e: _read_error(e, self.directory, what, arr, start, stop, locate)
        try:
            return PendingRead(arr[start:stop].read(), fail)
        except Exception as e:
            raise fail(e) from e

    def read(self, tap: str, start: int, stop: int) -> PendingRead:
        """Starts reading rows ``[start, stop)`` of ``tap`` (clamped to the store).

        Returns:
          A :class:`PendingRead`: its ``result()`` is the ``[rows, d]`` array.

        Raises:
          StoreError: no such tap; from ``result()``: the rows cannot be read.
        """
        if tap not in self.taps:
            raise StoreError(f"the store has no tap {tap!r} (taps: {sorted(self.taps)})")
        return self._start(f"tap {tap!r}", self.taps[tap], start, stop)

    def read_meta(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a row-metadata column (``sequence_id``, ``label``...).

        Raises:
          StoreError: no such column, or the rows cannot be read.
        """
        if name not in self.meta:
            raise StoreError(f"the store has no row metadata {name!r} (has {sorted(self.meta)})")
        out = self._start(f"row metadata {name!r}", self.meta[name], start, stop).result()
        if name == "split" and self.parts:
            out = self._global_splits(out, *self._range(start, stop))
        return out

    def column(self, name: str) -> np.ndarray:
        """Every committed row of a row-metadata column, read in bounded steps.

        Raises:
          StoreError: no such column, or rows that cannot be read.
        """
        step = 1 << 20
        parts = [self.read_meta(name, lo, lo + step) for lo in range(0, self.rows, step)]
        if not parts:
            return self.read_meta(name, 0, 0)
        return np.concatenate(parts)

    def _global_splits(self, codes: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Each shard's split codes (indices into its own list) as indices into ``splits``."""
        out = codes.copy()
        names = self.splits
        for first, rows, part in self.parts:
            lo, hi = max(start, first), min(stop, first + rows)
            if lo >= hi:
                continue
            # Index 0 of the table is the code -1 (no split); shard code c sits at c + 1.
            table = np.array([-1] + [names.index(x) for x in part.splits], np.int64)
            local = codes[lo - start : hi - start].astype(np.int64)
            out[lo - start : hi - start] = table[np.clip(local + 1, 0, len(table) - 1)]
        return out

    def tokens(self) -> dict[int, str] | None:
        """Token text by row, when it was logged (loads the sidecar; for reports).

        Records beyond the committed rows, and a last line torn by a killed writer, are ignored.
        """
        if self.parts:
            found = [(first, rows, part.tokens()) for first, rows, part in self.parts]
            if all(t is None for _, _, t in found):
                return None
            out: dict[int, str] = {}
            for first, rows, t in found:
                out.update({first + r: v for r, v in (t or {}).items() if r < rows})
            return out
        name = self.manifest.get("tokens")
        if not name:
            return None
        path = os.path.join(self.directory, name)
        try:
            return read_tokens(path, self.rows)
        except OSError as e:
            raise StoreError(_clip(f"cannot read the token sidecar {path}: {one_line(e)}")) from e


def open_store(directory: str | os.PathLike, *, check_chunks: bool = True) -> Store:
    """Opens and validates an activation store (written by one process or by several).

    A store whose writer is still running, failed or was killed opens too, with the rows
    committed so far (``Store.complete`` is then False); for a store of several processes,
    every shard's committed rows.

    Raises:
      StoreError: no manifest, a manifest that is not valid (garbled JSON, wrong types, a
        negative row count, a path leaving the store directory), a missing array, an array
        shorter than the manifest's row count or of another width or dtype, (with
        ``check_chunks``) a chunk file missing or truncated on disk, or shards that hold
        fewer rows than the store's manifest records or disagree on their taps.
    """
    directory = os.path.abspath(os.fspath(directory))
    manifest = Manifest.load(directory)
    if manifest.shards is not None:
        return _open_sharded(directory, manifest, check_chunks)
    rows = manifest.rows
    taps, meta = {}, {}
    for name, info in manifest.taps.items():
        p = os.path.join(directory, info["path"])
        arr = _open_array(p, f"tap {name!r}")
        if arr.rank != 2:
            raise StoreError(f"tap {name!r} is not a [rows, d] array (its shape is {arr.shape})")
        if arr.shape[0] < rows:
            raise StoreError(
                f"the store is truncated: tap {name!r} holds {arr.shape[0]} rows but the "
                f"manifest says {rows}"
            )
        got = (int(arr.shape[1]), arr.dtype.numpy_dtype.name)
        if got != (info["shape"][1], info["dtype"]):
            raise StoreError(
                f"tap {name!r} is an array [..., {got[0]}] of {got[1]} but the manifest says "
                f"[..., {info['shape'][1]}] of {info['dtype']}"
            )
        if check_chunks:
            _check_chunks(arr, p, rows, f"tap {name!r}")
        taps[name] = arr
    for name, rel in manifest.row_meta.items():
        p = os.path.join(directory, rel)
        arr = _open_array(p, f"row metadata {name!r}")
        if arr.rank != 1 or arr.shape[0] < rows:
            raise StoreError(
                f"the store is truncated: row metadata {name!r} holds {arr.shape[0]} rows but "
                f"the manifest says {rows}"
            )
        if check_chunks:
            _check_chunks(arr, p, rows, f"row metadata {name!r}")
        meta[name] = arr
    return Store(directory, manifest.to_json(), taps, meta)


def _open_sharded(directory: str, manifest: Manifest, check_chunks: bool) -> Store:
    """A store written by several processes, read as one (see :class:`Store`)."""
    assert manifest.shards is not None
    parts: list[tuple[int, int, Store]] = []
    first = 0
    spec: dict[str, tuple[int, str]] | None = None
    for i, shard in enumerate(manifest.shards):
        path = os.path.join(directory, shard["path"])
        if not os.path.isfile(os.path.join(path, MANIFEST)) and not manifest.complete:
            continue  # its process died before its first commit: no rows
        part = open_store(path, check_chunks=check_chunks)
        if part.manifest.get("shards") is not None:
            raise StoreError(f"shard {i} of {directory} is itself a store of shards")
        rows = part.rows if shard["rows"] is None else int(shard["rows"])
        if part.rows < rows:
            raise StoreError(
                f"the store is truncated: shard {i} ({shard['path']}) holds {part.rows} rows but "
                f"the manifest of {directory} says {rows}"
            )
        if rows == 0:
            continue
        got = {k: (int(a.shape[1]), a.dtype.numpy_dtype.name) for k, a in part.taps.items()}
        if spec is None:
            spec = got
        elif got != spec:
            raise StoreError(
                f"shard {i} of {directory} holds taps {got} where earlier shards hold {spec}"
            )
        parts.append((first, rows, part))
        first += rows

    def joined(arrays: list[ts.TensorStore]) -> ts.TensorStore:
        return arrays[0] if len(arrays) == 1 else ts.concat(arrays, axis=0)

    taps = {t: joined([p.taps[t][:r] for _, r, p in parts]) for t in (spec or {})}
    cols = set.intersection(*(set(p.meta) for _, _, p in parts)) if parts else set()
    meta = {c: joined([p.meta[c][:r] for _, r, p in parts]) for c in sorted(cols)}
    splits: list[str] = []
    for _, _, p in parts:
        splits += [x for x in p.splits if x not in splits]
    merged = dataclasses.replace(
        manifest,
        rows=first,
        chunk_rows=parts[0][2].chunk_rows if parts else manifest.chunk_rows,
        taps={t: {"shape": [first, d], "dtype": dt} for t, (d, dt) in (spec or {}).items()},
        row_meta={c: f"rows/{c}" for c in sorted(cols)},  # inside each shard
        splits=splits,
        has_labels=any(p.manifest.get("has_labels") for _, _, p in parts),
        complete=manifest.complete and all(p.complete for _, _, p in parts),
        shards=[
            {"path": os.path.relpath(p.directory, directory), "start": f, "rows": r}
            for f, r, p in parts
        ],
    ).to_json()
    return Store(directory, merged, taps, meta, parts)


def _as_store(store: Store | str | os.PathLike) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def _result(fut: Any, fail: Callable[[BaseException], StoreError]) -> np.ndarray:
    try:
        return fut.result()
    except Exception as e:
        raise fail(e) from e


def _positive(value: Any, name: str, *, optional: bool = False) -> Any:
    """``value`` if it is an integer >= 1 (or None when optional), else a ConfigError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- what to read


def _single_tap(store: Store, tap: str | None, purpose: str) -> str:
    """The tap a single-tap estimator reads: ``tap``, or the store's only one."""
    if tap is None:
        if len(store.taps) != 1:
            raise StoreError(
                f"the store holds taps {sorted(store.taps)}; say which one {purpose} with tap="
            )
        return next(iter(store.taps))
    if tap not in store.taps:
        raise StoreError(f"the store has no tap {tap!r} (taps: {sorted(store.taps)})")
    return tap


def _store_example(store: Store, taps: Sequence[str], monitor: bool) -> Any:
    """The ``init`` example of one row: ``{tap: ShapeDtypeStruct}`` or, single-tap, one entry."""
    example = {
        t: jax.ShapeDtypeStruct((int(store.taps[t].shape[1]),), store.taps[t].dtype.numpy_dtype)
        for t in taps
    }
    return example if monitor else example[taps[0]]


def _require_estimator(est: Any, where: str, *, checkpoints: bool = False) -> Estimator:
    """``est`` if it is an estimator; else a ConfigError naming what ``where`` takes."""
    if not isinstance(est, Estimator):
        also = ", a Checkpoint or a checkpoint path" if checkpoints else ""
        raise ConfigError(
            f"{where}: expected a jaxmon Estimator (e.g. jaxmon.gaussian()){also}, got "
            f"{type(est).__name__}"
        )
    return est


def _checkpoint(est_or_checkpoint: Any) -> Any:
    """A :class:`jaxmon.checkpoint.Checkpoint` for a path or a Checkpoint; None otherwise."""
    if isinstance(est_or_checkpoint, str | os.PathLike):
        from jaxmon import checkpoint

        return checkpoint.load(est_or_checkpoint)
    if hasattr(est_or_checkpoint, "estimator") and hasattr(est_or_checkpoint, "state"):
        return est_or_checkpoint
    return None


def _resolve(est_or_checkpoint: Any, fitted: Any) -> tuple[Estimator, Any, dict[str, Any]]:
    """(estimator, fitted, info) from an estimator + fitted, a Checkpoint or a checkpoint path."""
    info: dict[str, Any] = {}
    ck = _checkpoint(est_or_checkpoint)
    if ck is not None:
        info = {"checkpoint_step": ck.step, "checkpoint_rows": ck.metadata.get("rows")}
        est = ck.estimator
        if fitted is None:
            fitted = ck.fitted if ck.fitted is not None else est.finalize(ck.state)
    else:
        est = _require_estimator(est_or_checkpoint, "score_store", checkpoints=True)
    if fitted is None:
        raise ConfigError("score_store needs fitted values: pass fitted= or a checkpoint")
    return est, fitted, info


def _keyed_fitted(kind: EstimatorKind, fitted: Any) -> Mapping[str, Any]:
    """A monitor's fitted values by key (the inner ones of a calibrated monitor)."""
    inner = fitted.inner if kind.calibrated else fitted
    if not isinstance(inner, Mapping):
        raise ConfigError(
            f"the fitted value of a monitor is a dict keyed by monitor keys, got "
            f"{type(inner).__name__}: pass the fitted value of this estimator"
        )
    return inner


def _taps_to_score(kind: EstimatorKind, fitted: Any, store: Store, tap: str | None) -> list[str]:
    """The taps a query reads: those its monitor keys name, or the single-tap estimator's."""
    if not kind.monitor:
        return [_single_tap(store, tap, "this estimator scores")]
    needed: list[str] = []
    for key in _keyed_fitted(kind, fitted):
        for t in MonitorKey.parse(str(key)).taps:
            if t not in store.taps:
                raise StoreError(
                    f"the store has no tap {t!r} needed by score key {key!r} (taps: "
                    f"{sorted(store.taps)})"
                )
            if t not in needed:
                needed.append(t)
    if tap is not None and tap not in needed:
        raise StoreError(f"tap {tap!r} is not scored by this monitor (its keys read taps {needed})")
    return needed


def _mesh(devices: Sequence[Any] | None) -> jax.sharding.Mesh:
    devs = list(devices) if devices is not None else jax.local_devices()
    if not devs:
        raise ConfigError("devices is empty: give at least one device (default: all local ones)")
    return jax.sharding.Mesh(np.array(devs), ("data",))


def _block_rows(store: Store, block_rows: int | None, n_dev: int) -> int:
    c = store.chunk_rows
    if block_rows is None:
        width = sum(int(a.shape[1]) * a.dtype.numpy_dtype.itemsize for a in store.taps.values())
        block_rows = max(c, (32 << 20) // max(1, width))  # ~32 MiB of activations per block
    b = max(c, (int(block_rows) // c) * c)  # chunk aligned
    while b % n_dev:
        b += c
    return b


def _bar(total: int, *, progress: bool | None, desc: str, initial: int = 0) -> tqdm:
    """A ``tqdm`` bar over rows on stderr.

    ``progress=None``: shown only when stderr is a terminal, and only by process 0 of a
    ``jax.distributed`` job (one bar, not one per process); True/False: always/never.
    """
    if progress is None:
        disable = None if jax.process_index() == 0 else True  # None: tqdm's terminal check
    else:
        disable = not progress
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="rows",
        disable=disable,
        file=sys.stderr,
        mininterval=0.2,
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------- the block reader


@dataclasses.dataclass
class _Block:
    """One block of a store, as :func:`_read_blocks` yields it.

    Attributes:
      index: the block number: rows ``[index * b, index * b + b)`` of the store.
      start: its first row.
      valid: how many of its ``b`` rows exist (the tail block is padded).
      taps: ``{tap: [b, d]}`` rows, zero-padded past ``valid``.
      meta: ``{column: [b]}`` row metadata asked for, ``-1`` past ``valid``.
    """

    index: int
    start: int
    valid: int
    taps: dict[str, np.ndarray]
    meta: dict[str, np.ndarray]

    def mask(self) -> np.ndarray:
        """``[b]`` bool: the rows that exist."""
        b = len(next(iter(self.taps.values())))
        return np.arange(b) < self.valid


def _pad(x: np.ndarray, b: int, fill: Any = 0) -> np.ndarray:
    """``x`` padded with ``fill`` to ``b`` rows (the same shapes every block: one compile)."""
    if len(x) == b:
        return x
    out = np.full((b, *x.shape[1:]), fill, x.dtype)
    out[: len(x)] = x
    return out


def _read_blocks(
    store: Store, taps: Sequence[str], b: int, blocks: Sequence[int], *, meta: Sequence[str] = ()
) -> Iterator[_Block]:
    """The blocks ``blocks`` of ``b`` rows of ``taps`` (and row metadata ``meta``), in order.

    The one block reader of :func:`fit_store` and :func:`score_store` (and any other pass over
    a store): the reads of the next block are issued before the current one is handed out, the
    tail block is padded (see :class:`_Block`), and a damaged chunk is a :class:`StoreError`.
    """
    n = store.rows

    def issue(i: int) -> tuple[int, dict[str, PendingRead]]:
        lo = i * b
        return lo, {t: store.read(t, lo, lo + b) for t in taps}

    pending = issue(blocks[0]) if len(blocks) else None
    for j, i in enumerate(blocks):
        assert pending is not None
        lo, futs = pending
        pending = issue(blocks[j + 1]) if j + 1 < len(blocks) else None  # read-ahead
        xs = {t: _pad(fut.result(), b) for t, fut in futs.items()}
        cols = {c: _pad(store.read_meta(c, lo, lo + b), b, -1) for c in meta}
        yield _Block(i, lo, min(b, n - lo), xs, cols)


def _assigned(n_blocks: int, process: int, processes: int) -> list[int]:
    """The blocks process ``process`` of ``processes`` handles: every ``processes``-th one.

    Round robin keeps the processes' shares within one block of each other, whatever the
    store's length, and is fixed by the block count alone (a resumed job gets the same).
    """
    return list(range(process, n_blocks, processes))


def _block_rows_of(n: int, b: int, blocks: Sequence[int]) -> int:
    """Rows of the store in the given blocks of ``b`` rows."""
    return int(sum(max(0, min(b, n - i * b)) for i in blocks))


def _agree(err: Exception | None, what: str, processes: int) -> None:
    """Collective: every process learns whether any failed, and then all of them raise.

    The process that failed raises its own error; the others a :class:`StoreError` naming it.
    Also the barrier between the steps of a multi-process query or fit.
    """
    if processes == 1:
        if err is not None:
            raise err
        return
    got = all_gather_ints([0 if err is None else 1])
    if err is not None:
        raise err
    failed = [i for i in range(got.shape[0]) if got[i, 0]]
    if failed:
        raise StoreError(
            f"process {failed[0]} of {processes} failed {what} (its own error says why); the "
            "blocks committed so far are kept: run the same call again to resume"
        )


# --------------------------------------------------------------------------- the block scorer


@dataclasses.dataclass(frozen=True)
class _Scoring:
    """What a query scores, whatever produced it (an estimator or a batch detector).

    Attributes:
      score: the plain score function (see :data:`ScoreFn`); for a calibrated query, the
        inner estimator's (the calibrated ``-log10 p`` is looked up from its raw scores).
      fitted: what ``score`` takes (for a calibrated query, the ``CalibratedFitted``).
      taps: the store's taps read.
      monitor: whether ``score`` takes ``{tap: rows}`` and returns ``{key: scores}``.
      calibrated: whether the scores are calibrated (the raw ones are kept too).
      spec: the JSON spec recorded in ``query.json`` and ``summary.json``.
      info: more of the record (the checkpoint's step and rows).
    """

    score: ScoreFn
    fitted: Any
    taps: list[str]
    monitor: bool
    calibrated: bool
    spec: dict[str, Any]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _block_fn(scoring: _Scoring) -> Callable:
    """``(fitted, {tap: [b, d]}, mask [b]) -> (scores, finite, raw)``, each a dict per key.

    For a calibrated fitted value the rows are scored once: the inner estimator's raw scores,
    and the calibrated ``-log10 p`` looked up from them (:func:`jaxmon.p_values_of_scores`);
    ``raw`` is None otherwise. ``finite`` says, per tap, which rows hold no NaN/inf.
    """
    taps, monitor = scoring.taps, scoring.monitor

    def as_dict(out):
        out = out if monitor else {taps[0]: out}
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    def f(fitted, xs, mask):
        x = xs if monitor else xs[taps[0]]
        raw = None
        if not scoring.calibrated:
            out = scoring.score(fitted, x, mask=mask)
        else:
            raw = scoring.score(fitted.inner, x, mask=mask)
            lp = p_values_of_scores(fitted, raw, log=True)
            # -log10 p, 0 on masked rows: exactly what calibrated(...).score gives.
            out = jax.tree.map(lambda v: jnp.where(mask, -v / jnp.log(10.0), 0.0), lp)
            raw = as_dict(raw)
        # Which rows hold a NaN/inf, per tap, whatever the estimator made of them. The same
        # expression as the estimators' own check (finish_scores), so XLA computes it once:
        # measured free next to a Gaussian score (an all(isfinite) here cost ~5%).
        finite = {t: ~nonfinite_rows(v) for t, v in xs.items()}
        return as_dict(out), finite, raw

    return f


@dataclasses.dataclass
class _Compiled:
    """The block scorer compiled once for the padded block shape (the tail block reuses it).

    Attributes:
      fn: the compiled ``(fitted, xs, mask) -> (scores, finite, raw)``.
      fitted: the fitted value, replicated over the mesh.
      rows: the sharding of a block's rows (split over the devices).
      keys: the score keys, in the scorer's output order.
      key_taps: the taps each key reads: its non-finite rows are those with a NaN/inf in any.
    """

    fn: Callable
    fitted: Any
    rows: jax.sharding.NamedSharding
    keys: list[str]
    key_taps: dict[str, list[str]]

    def __call__(self, blk: _Block) -> tuple[dict, dict, dict | None]:
        """Scores one block: ``(scores, finite, raw)`` on the host, ``[b]`` per key or tap."""
        xs = {t: jax.device_put(x, self.rows) for t, x in blk.taps.items()}
        mask = jax.device_put(blk.mask(), self.rows)
        return jax.device_get(self.fn(self.fitted, xs, mask))


def _compile(scoring: _Scoring, store: Store, mesh: jax.sharding.Mesh, b: int) -> _Compiled:
    """Traces and compiles the block scorer once for blocks of ``b`` rows over ``mesh``."""
    P = jax.sharding.PartitionSpec
    rows = jax.sharding.NamedSharding(mesh, P("data"))
    rep = jax.sharding.NamedSharding(mesh, P())
    fn = jax.jit(_block_fn(scoring), in_shardings=(rep, rows, rows), out_shardings=rows)
    fitted = jax.device_put(scoring.fitted, rep)
    abstract = {
        t: jax.ShapeDtypeStruct(
            (b, int(store.taps[t].shape[1])), store.taps[t].dtype.numpy_dtype, sharding=rows
        )
        for t in scoring.taps
    }
    lowered = fn.lower(fitted, abstract, jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=rows))
    keys = list(lowered.out_info[0])
    taps = scoring.taps
    if scoring.monitor:
        key_taps = {k: [t for t in MonitorKey.parse(k).taps if t in taps] or taps for k in keys}
    else:
        key_taps = dict.fromkeys(keys, taps)
    return _Compiled(lowered.compile(), fitted, rows, keys, key_taps)


# --------------------------------------------------------------------------- top-k


def _rank(sc: np.ndarray) -> np.ndarray:
    """Ordering key of scores: NaN (no number, which no jaxmon estimator should give) ranks
    with +inf at the top, so it is never silently dropped."""
    sc = np.asarray(sc, np.float64)
    return np.where(np.isnan(sc), np.inf, sc)


def _block_topk(sc: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top ``k`` of a block by (rank desc, index asc), in O(n)."""
    if len(sc) <= k:
        return np.arange(len(sc))
    rank = _rank(sc)
    kth = np.partition(rank, len(rank) - k)[len(rank) - k]  # the k-th largest
    above = np.flatnonzero(rank > kth)
    tied = np.flatnonzero(rank == kth)[: k - len(above)]  # ties: lowest rows, as in the merge
    return np.concatenate([above, tied])


def _topk_merge(rows_a, sc_a, rows_b, sc_b, k: int):
    """Top ``k`` by (score desc, row asc): deterministic under ties, whatever the blocking.

    ``+inf`` (non-finite rows) ranks first; NaN ranks with it.
    """
    rows = np.concatenate([rows_a, rows_b])
    sc = np.concatenate([sc_a, sc_b])
    order = np.lexsort((rows, -_rank(sc)))[:k]
    return rows[order], sc[order]


@dataclasses.dataclass
class _Tally:
    """What a scoring pass carries from block to block, per key: the running top-k (rows and
    scores) and the count of non-finite rows. Merging two tallies (two processes' blocks)
    gives the tally of both, whatever the order."""

    k: int
    topk: dict[str, tuple[np.ndarray, np.ndarray]]
    nonfinite: dict[str, int]

    @classmethod
    def empty(cls, keys: Sequence[str], k: int) -> _Tally:
        none = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        return cls(k, dict.fromkeys(keys, none), dict.fromkeys(keys, 0))

    def add(self, key: str, first_row: int, scores: np.ndarray, nonfinite: int) -> None:
        """Folds in one block's scores of ``key`` (rows from ``first_row``)."""
        idx = _block_topk(scores, self.k)
        rows = first_row + idx.astype(np.int64)
        self.topk[key] = _topk_merge(*self.topk[key], rows, scores[idx], self.k)
        self.nonfinite[key] += int(nonfinite)

    def merge(self, other: _Tally) -> None:
        for key in self.topk:
            self.topk[key] = _topk_merge(*self.topk[key], *other.topk[key], self.k)
            self.nonfinite[key] += other.nonfinite[key]

    def to_json(self) -> dict[str, Any]:
        # float(np.float32) is exact in a double, and JSON writes doubles with round-trip repr.
        topk = {
            key: {"rows": [int(r) for r in rows], "scores": [float(s) for s in sc]}
            for key, (rows, sc) in self.topk.items()
        }
        return {"topk": topk, "nonfinite": dict(self.nonfinite)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], keys: Sequence[str], k: int) -> _Tally:
        topk = {
            key: (np.asarray(v["rows"], np.int64), np.asarray(v["scores"], np.float32))
            for key, v in obj["topk"].items()
        }
        if set(topk) != set(keys):
            raise ValueError("a record of another query")
        return cls(k, topk, {key: int(obj["nonfinite"][key]) for key in keys})


# --------------------------------------------------------------------------- the resume journal


class _Journal:
    """The resume journal of a query in ``out``: ``query.json`` (what is scored) and one
    progress record per process (next block and :class:`_Tally`), replaced atomically after
    each committed block, so a killed query resumes from its last completed block."""

    def __init__(self, out: str, process: int, processes: int):
        self.out, self.process, self.processes = out, process, processes
        self.record = os.path.join(out, "query.json")

    def progress_path(self, process: int) -> str:
        """A process's progress record (``progress.json`` when the query has one process)."""
        if self.processes == 1:
            return os.path.join(self.out, "progress.json")
        return os.path.join(self.out, f"progress-{process:05d}.json")

    def start(self, query: dict[str, Any], resume: bool) -> bool:
        """Collective: whether the query starts afresh; process 0 decides and prepares ``out``.

        Resumed when ``resume`` and ``out`` holds this very query; started afresh (``out``
        emptied) when it holds no query yet, or ``resume`` is False.
        """
        code, own = 0, None
        if self.process == 0:
            try:
                code = 1
                if resume and os.path.exists(self.record):
                    if _load_json(self.record, "a query record") != query:
                        code = 2
                        raise _output_error(code, self.out)
                else:
                    code = 0
                    if os.path.isdir(self.out) and os.listdir(self.out):
                        if not os.path.exists(self.record):
                            code = 3
                            raise _output_error(code, self.out)
                        shutil.rmtree(self.out)
                    os.makedirs(self.out, exist_ok=True)
            except (StoreError, OSError) as e:
                code = code if isinstance(e, StoreError) and code in (2, 3) else 4
                own = e
        if self.processes > 1:
            code = int(all_gather_ints([code])[0, 0])
        if own is not None:
            raise own
        if code > 1:
            raise _output_error(code, self.out)
        return code == 0

    def write_record(self, query: dict[str, Any]) -> None:
        _write_json_atomic(self.record, query)

    def commit(self, next_block: int, tally: _Tally) -> None:
        """This process's blocks before ``next_block`` are on disk, with this tally."""
        record = {"next_block": next_block, **tally.to_json()}
        _write_json_atomic(self.progress_path(self.process), record)

    def read(
        self, process: int, keys: Sequence[str], n_blocks: int, k: int, *, strict: bool = False
    ) -> tuple[int, _Tally]:
        """``(next block, tally)`` of a process's progress record.

        A missing or unreadable record (an older jaxmon's, a process killed before its first
        record) means "start this process's blocks over", which gives the same output; with
        ``strict`` (the records of a finished query) it is a :class:`StoreError`.
        """
        path = self.progress_path(process)
        try:
            prog = _load_json(path, "a query's progress record")
            start = int(prog["next_block"])
            if not 0 <= start <= n_blocks:
                raise ValueError("a record of another query")
            return start, _Tally.from_json(prog, keys, k)
        except (OSError, KeyError, TypeError, ValueError) as e:  # StoreError is a ValueError
            if strict:
                raise StoreError(
                    _clip(f"the progress record {path} is unreadable: {one_line(e)}")
                ) from e
            return 0, _Tally.empty(keys, k)


def _output_error(code: int, out: str) -> StoreError:
    if code == 2:
        return StoreError(
            f"{out} holds a different query (store, estimator, blocks, devices or processes "
            "differ); choose another output directory or pass resume=False"
        )
    if code == 3:
        return StoreError(
            f"out={out} is a directory that holds no jaxmon query; refusing to replace it: "
            "choose a new or empty directory"
        )
    return StoreError(f"process 0 could not prepare the query output {out} (its error says why)")


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class QueryResult:
    """What :func:`score_store` produced (everything also lies in ``directory``)."""

    directory: str
    rows: int
    keys: list[str]
    summary: dict[str, Any]

    def top(self, key: str) -> list[dict[str, Any]]:
        """The top-k most anomalous tokens of ``key``: row, score, sequence_id, position."""
        return self.summary["keys"][key]["top"]

    def scores(
        self, key: str, start: int = 0, stop: int | None = None, *, raw: bool = False
    ) -> np.ndarray:
        """Per-token scores of ``key`` for rows ``[start, stop)`` (float32).

        Args:
          key: a score key.
          start, stop: the rows.
          raw: for a calibrated query, the raw inner scores (kept by the same pass) instead of
            the calibrated ``-log10 p``.

        Raises:
          StoreError: no such key, no raw scores kept, or the scores cannot be read.
        """
        if key not in self.keys:
            raise StoreError(f"the query has no score key {key!r} (keys: {self.keys})")
        if raw and not self.summary.get("raw"):
            raise StoreError(
                f"the query in {self.directory} kept no raw scores (only calibrated queries do)"
            )
        what = f"{'raw ' if raw else ''}scores of key {key!r}"
        path = _score_path(self.directory, self.keys.index(key), key, raw=raw)
        arr = _open_array(path, what)
        start = max(0, min(int(start), self.rows))
        stop = max(start, self.rows if stop is None else min(int(stop), self.rows))
        fail = lambda e: _read_error(e, self.directory, what, arr, start, stop)
        return _result(arr[start:stop].read(), fail)

    def sequences(self) -> dict[str, np.ndarray]:
        """Per-sequence aggregates: ``sequence_id``, ``tokens``, ``label``, ``split`` and
        ``max/<key>``, ``mean/<key>`` (read without pickle)."""
        path = os.path.join(self.directory, "sequences.npz")
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # OSError, ValueError (objects), zipfile.BadZipFile, zlib.error
            raise StoreError(_clip(f"cannot read {path}: {one_line(e, 120)}")) from e


def _load_json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise StoreError(_clip(f"{path} ({what}) is not valid JSON: {one_line(e, 100)}")) from e


def load_result(directory: str | os.PathLike) -> QueryResult:
    """Opens the output of a finished :func:`score_store`.

    Raises:
      StoreError: no ``summary.json``, or one that is not a query summary.
    """
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, "summary.json")
    if not os.path.isfile(path):
        raise StoreError(f"{directory} holds no finished query (no summary.json)")
    summary = _load_json(path, "a query summary")
    ok = (
        isinstance(summary, dict)
        and isinstance(summary.get("rows"), int)
        and summary["rows"] >= 0
        and isinstance(summary.get("keys"), dict)
        and all(isinstance(v, dict) for v in summary["keys"].values())
    )
    if not ok:
        raise StoreError(f"{path} is not a jaxmon query summary")
    return QueryResult(directory, int(summary["rows"]), list(summary["keys"]), summary)


# --------------------------------------------------------------------------- score arrays

_RAW = "\x00raw:"  # prefix of raw-score arrays in a query's array dict (not a key name)


def _score_path(out: str, i: int, key: str, *, raw: bool = False) -> str:
    return os.path.join(out, "raw" if raw else "scores", _safe_name(i, key))


def _score_arrays(
    out: str, keys: Sequence[str], n: int, b: int, *, create: bool, raw: bool = False
) -> dict[str, ts.TensorStore]:
    """The score arrays of a query: created (process 0 of a fresh query) or opened.

    With ``raw`` (a calibrated query), the raw inner scores too, keyed ``_RAW + key``.
    """
    outs = {}
    for kind, prefix in (("scores", ""), ("raw scores", _RAW)) if raw else (("scores", ""),):
        for i, k in enumerate(keys):
            # The writer's array layout (crc32c-checksummed chunks), in one place. Chunks are
            # blocks, so processes scoring different blocks never write the same file.
            path = _score_path(out, i, k, raw=bool(prefix))
            spec = _zarr3_spec(path, (n,), "float32", (b,))
            if not create:
                spec = {"driver": "zarr3", "kvstore": spec["kvstore"]}
            try:
                outs[prefix + k] = ts.open(spec, open=not create).result()
            except Exception as e:
                raise StoreError(
                    _clip(f"cannot open the {kind} of key {k!r} in {out}: {one_line(e, 120)}")
                ) from e
    return outs


def _start_writes(
    outs: dict[str, ts.TensorStore], blk: _Block, scores: dict, raw: dict | None
) -> list[tuple[str, Any]]:
    """Issues the writes of one block's scores (and raw scores) of every key."""
    lo, valid = blk.start, blk.valid
    writes = []
    for k, s in scores.items():
        writes.append((k, outs[k][lo : lo + valid].write(np.asarray(s[:valid], np.float32))))
        if raw is not None:
            rs = np.asarray(raw[k][:valid], np.float32)
            writes.append((k, outs[_RAW + k][lo : lo + valid].write(rs)))
    return writes


def _finish_writes(writes: list[tuple[str, Any]], out: str, blk: _Block) -> None:
    """Waits for a block's writes: they are on disk, or a StoreError names the key and rows."""
    for k, w in writes:
        try:
            w.result()
        except Exception as e:
            raise StoreError(
                _clip(
                    f"cannot write the scores of key {k!r}, rows {blk.start}-"
                    f"{blk.start + blk.valid - 1}, to {out}: {one_line(e, 120)}"
                )
            ) from e


# --------------------------------------------------------------------------- per-key statistics


@dataclasses.dataclass
class _KeyStats:
    """Statistics of one key's scores, folded block by block in the summary pass.

    Moments are over finite scores (one ``+inf`` row would make them meaningless); min and max
    over every score but NaN; the exceedances of a calibrated key (``-log10 p``) at each FPR.
    """

    total: float = 0.0
    total_sq: float = 0.0
    finite: int = 0
    nan: int = 0
    low: float = np.inf
    high: float = -np.inf
    exceed: dict[float, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(FPRS, 0))

    def add(self, s: np.ndarray, *, calibrated: bool) -> None:
        fin = np.isfinite(s)
        f = s if fin.all() else s[fin]
        self.finite += len(f)
        self.total += float(f.sum())
        self.total_sq += float((f * f).sum())
        nan = np.isnan(s)
        self.nan += int(nan.sum())
        num = s[~nan] if nan.any() else s
        if len(num):
            self.low = min(self.low, float(num.min()))
            self.high = max(self.high, float(num.max()))
        if calibrated:  # calibrated scores are -log10 p
            for fpr in FPRS:
                self.exceed[fpr] += int(np.sum(s >= -np.log10(fpr)))

    def to_json(
        self,
        top: list[dict[str, Any]],
        nonfinite: int,
        *,
        calibrated: bool,
        thresholds: dict[str, float] | None,
    ) -> dict[str, Any]:
        m = max(self.finite, 1)
        mean = self.total / m
        info = {
            "top": top,
            "mean": mean,
            "std": float(np.sqrt(max(self.total_sq / m - mean * mean, 0.0))),
            "min": self.low,
            "max": self.high,
            "nonfinite": int(nonfinite),
            "nan": self.nan,
        }
        if calibrated:
            info["exceedances"] = {str(f): c for f, c in self.exceed.items()}
            if thresholds:
                info["raw_thresholds"] = thresholds
        return info


def _top_items(store: Store, rows: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    """The top-k rows of a key as summary entries (with sequence id and position if logged)."""
    items = [{"row": int(r), "score": float(s)} for r, s in zip(rows, scores, strict=True)]
    if "sequence_id" not in store.meta or not len(rows):
        return items
    lo, hi = int(rows.min()), int(rows.max()) + 1

    def col(c: str) -> np.ndarray:  # top-k rows are few: one point read per column
        fail = lambda e: _read_error(
            e, store.directory, f"row metadata {c!r}", store.meta[c], lo, hi
        )
        return _result(store.meta[c].vindex[rows].read(), fail).astype(np.int64)

    for item, seq, pos in zip(items, col("sequence_id"), col("position"), strict=True):
        item["sequence_id"], item["position"] = int(seq), int(pos)
    return items


def _thresholds(fitted) -> dict[str, dict[str, float]]:
    """Raw-score thresholds at each FPR, per key, for a calibrated fitted value."""
    out: dict[str, dict[str, float]] = {}
    for fpr in FPRS:
        th = threshold(fitted, fpr=fpr)
        items = th.items() if isinstance(th, Mapping) else [(None, th)]
        for k, v in items:
            out.setdefault(k, {})[str(fpr)] = float(np.asarray(v))
    if None in out:  # a single estimator: its only key is the tap (filled by the caller)
        single = out.pop(None)
        return {"*": single}
    return out


# --------------------------------------------------------------------------- the query


@dataclasses.dataclass
class _Run:
    """One process's view of a query run: what it scores, where, and its share of blocks."""

    store: Store
    scoring: _Scoring
    compiled: _Compiled
    journal: _Journal
    record: dict[str, Any]  # what query.json says
    b: int
    n_blocks: int

    @property
    def out(self) -> str:
        return self.journal.out

    @property
    def keys(self) -> list[str]:
        return self.compiled.keys

    def blocks_of(self, process: int) -> list[int]:
        return _assigned(self.n_blocks, process, self.journal.processes)

    def rows_of(self, blocks: Sequence[int]) -> int:
        return _block_rows_of(self.store.rows, self.b, blocks)


def score_store(
    store: Store | str | os.PathLike,
    est_or_checkpoint: Any,
    fitted: Any = None,
    *,
    out: str | os.PathLike,
    tap: str | None = None,
    block_rows: int | None = None,
    top_k: int = 100,
    resume: bool = True,
    progress: bool | None = None,
    devices: Sequence[Any] | None = None,
    callback: Callable[[int, int], None] | None = None,
    collective: bool | None = None,
) -> QueryResult:
    """Scores every token of an activation store; resumable, memory bounded by the block.

    Under ``jax.distributed`` every process makes the same call (``store`` and ``out`` on a
    file system all of them see): block ``i`` is scored by process ``i % process_count`` on its
    local devices and written to its own chunk of each score array; process 0 creates the
    output (the others open it after a barrier), each process keeps its own progress record
    (``progress-<i>.json``) so a killed process resumes from its last block, and process 0
    merges the top-k and writes the summary once every block is in. Scores, top-k and summary
    equal a one-process run's; every process returns the same result.

    Args:
      store: an opened :class:`Store` or its directory.
      est_or_checkpoint: an :class:`~jaxmon.Estimator` (with ``fitted``), a
        :class:`jaxmon.checkpoint.Checkpoint` or a checkpoint directory (fitted values come
        from it, or are computed with ``finalize``).
      fitted: the fitted value when an estimator is given.
      out: output directory (see the module docstring).
      tap: for a single-tap estimator, which tap of the store it scores (needed when the store
        holds several); monitors read the taps their score keys name.
      block_rows: rows per block (rounded to whole chunks and to a multiple of the device
        count); default ~32 MiB of activations.
      top_k: how many of the most anomalous tokens to keep per key (non-finite rows, which
        score ``+inf``, come first).
      resume: continue an interrupted query in ``out`` (else start over).
      progress: show a ``tqdm`` progress bar on stderr (default: only on a terminal, and only
        on process 0).
      devices: this process's devices to split blocks over (default: ``jax.local_devices()``).
      callback: ``callback(rows_done, rows_total)`` after each committed block, counting the
        rows of this process's blocks.
      collective: ``None`` (default): every process of a ``jax.distributed`` job takes part;
        ``False``: this process scores the whole store alone.

    Returns:
      A :class:`QueryResult`. Its summary holds per key ``nonfinite`` (rows holding NaN/inf in
      any tap the key reads), ``nan`` (rows whose score is NaN, which no jaxmon estimator should
      give), ``mean``/``std`` over finite scores and ``min``/``max`` over all but NaN; and
      ``processes``: ``[{"process": i, "rows": rows scored by process i}, ...]``.

    Raises:
      StoreError: a truncated, damaged or inconsistent store, a missing tap, an ``out`` that is
        a file or a directory holding something other than a query, or that holds a different
        query; with several processes, also on every process when one of them failed.
      ConfigError: ``block_rows`` or ``top_k`` < 1, no devices, or not an estimator.
      NotFittedError: a fitted value fitted on no rows.
    """
    block_rows = _positive(block_rows, "block_rows", optional=True)
    top_k = _positive(top_k, "top_k")
    resolve_collective(collective)  # refuses a bad value before any work
    out = _output_dir(out)
    store = _as_store(store)
    scoring = _scoring_of(*_resolve(est_or_checkpoint, fitted), store, tap)
    return _run_query(
        store,
        scoring,
        out=out,
        block_rows=block_rows,
        top_k=top_k,
        resume=resume,
        progress=progress,
        devices=devices,
        callback=callback,
        collective=collective,
        desc="score_store",
    )


def _scoring_of(
    est: Estimator, fitted: Any, info: dict[str, Any], store: Store, tap: str | None
) -> _Scoring:
    """What :func:`score_store` scores with an estimator: its score function, or for a
    calibrated one the inner estimator's (the calibrated scores are looked up from them)."""
    require_fitted(fitted, "score_store")
    kind = kind_of(est)
    score = est.score
    if kind.calibrated:
        if not isinstance(fitted, CalibratedFitted):
            raise ConfigError(
                f"score_store: {est.spec.name} is calibrated but its fitted value is a "
                f"{type(fitted).__name__}; pass the fitted value of this estimator"
            )
        score = _inner_for(fitted.spec).score
    taps = _taps_to_score(kind, fitted, store, tap)
    return _Scoring(score, fitted, taps, kind.monitor, kind.calibrated, est.spec.to_dict(), info)


def _output_dir(out: str | os.PathLike) -> str:
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise StoreError(f"out={out} is a file; score_store writes a directory there")
    return out


def _run_query(
    store: Store,
    scoring: _Scoring,
    *,
    out: str,
    block_rows: int | None,
    top_k: int,
    resume: bool,
    progress: bool | None,
    devices: Sequence[Any] | None,
    callback: Callable[[int, int], None] | None,
    collective: bool | None,
    desc: str,
) -> QueryResult:
    """The scoring pipeline: compile, open the journal and outputs, score, summarize.

    Collectives happen the same number of times on every process, errors or not: a process
    that failed keeps its error until the next agreement point (:func:`_agree`), then all raise.
    """
    process, processes = resolve_collective(collective)
    mesh = _mesh(devices)
    b = _block_rows(store, block_rows, mesh.devices.size)
    compiled = _compile(scoring, store, mesh, b)
    record = _query_record(store, scoring, compiled.keys, b, mesh.devices.size, top_k, processes)
    journal = _Journal(out, process, processes)
    run = _Run(store, scoring, compiled, journal, record, b, -(-store.rows // b))
    fresh = journal.start(record, resume)
    outs, err = _create_outputs(run, fresh), None
    tally = _Tally.empty(run.keys, top_k)
    try:
        if outs is None:
            outs = _score_arrays(out, run.keys, store.rows, b, create=False, raw=scoring.calibrated)
        start = 0
        if fresh:
            journal.commit(0, tally)
        else:
            start, tally = journal.read(process, run.keys, run.n_blocks, top_k)
        _score_blocks(run, outs, tally, start, progress=progress, callback=callback, desc=desc)
    except Exception as e:
        if processes == 1:
            raise
        err = e
    return _finish_query(run, outs, tally, err)


def _query_record(
    store: Store,
    scoring: _Scoring,
    keys: list[str],
    b: int,
    n_dev: int,
    top_k: int,
    processes: int,
) -> dict[str, Any]:
    """What ``query.json`` says: a query resumes only into a directory holding this record."""
    record = {
        "format": "jaxmon-query",
        "store": store.directory,
        "rows": store.rows,
        "block_rows": b,
        "devices": n_dev,
        "keys": keys,
        "taps": scoring.taps,
        "spec": scoring.spec,
        "calibrated": scoring.calibrated,
        "top_k": top_k,
        **scoring.info,
    }
    if scoring.calibrated:  # the raw inner scores are kept too (scored once)
        record["raw"] = True
    if processes > 1:  # a one-process query keeps the record earlier versions wrote
        record["processes"] = processes
    return record


def _create_outputs(run: _Run, fresh: bool) -> dict[str, ts.TensorStore] | None:
    """Collective: process 0 of a fresh query creates the score arrays, then ``query.json``.

    Only after that barrier may the others open them (two processes creating one zarr array
    collide on its metadata). Returns the arrays where they were created, else None.
    """
    outs, err = None, None
    journal = run.journal
    if fresh and journal.process == 0:
        try:
            raw = run.scoring.calibrated
            outs = _score_arrays(run.out, run.keys, run.store.rows, run.b, create=True, raw=raw)
            journal.write_record(run.record)
        except Exception as e:
            if journal.processes == 1:
                raise
            err = e
    if fresh and journal.processes > 1:
        _agree(err, "while creating the output", journal.processes)
    return outs


def _score_blocks(
    run: _Run,
    outs: dict[str, ts.TensorStore],
    tally: _Tally,
    start_block: int,
    *,
    progress: bool | None,
    callback: Callable[[int, int], None] | None,
    desc: str,
) -> None:
    """Scores this process's blocks from ``start_block``, committing each to the journal."""
    mine = run.blocks_of(run.journal.process)
    my_rows = run.rows_of(mine)
    done = run.rows_of([i for i in mine if i < start_block])
    todo = [i for i in mine if i >= start_block]
    taps, key_taps = run.scoring.taps, run.compiled.key_taps
    with _bar(my_rows, initial=done, progress=progress, desc=desc) as bar:
        for blk in _read_blocks(run.store, taps, run.b, todo):
            scores, finite, raw = run.compiled(blk)
            writes = _start_writes(outs, blk, scores, raw)
            bad = {t: ~np.asarray(finite[t][: blk.valid]) for t in taps}
            for k in run.keys:  # while the writes are in flight
                nonfinite = np.logical_or.reduce([bad[t] for t in key_taps[k]]).sum()
                sc = np.asarray(scores[k][: blk.valid], np.float32)
                tally.add(k, blk.start, sc, nonfinite)
            _finish_writes(writes, run.out, blk)
            # The block's scores are on disk: only now does the progress record move past it.
            run.journal.commit(next((i for i in mine if i > blk.index), run.n_blocks), tally)
            done += blk.valid
            bar.update(blk.valid)
            if callback is not None:
                callback(done, my_rows)


def _finish_query(
    run: _Run, outs: dict[str, ts.TensorStore] | None, tally: _Tally, err: Exception | None
) -> QueryResult:
    """Collective: merges every process's tally and writes the summary (process 0)."""
    processes = run.journal.processes
    per_process = [{"process": i, "rows": run.rows_of(run.blocks_of(i))} for i in range(processes)]
    if processes == 1:
        assert outs is not None
        summary = _summarize(run, outs, tally, per_process)
        return QueryResult(run.out, run.store.rows, run.keys, summary)
    # Every block of every process is on disk (or one failed: then every process raises).
    _agree(err, "while scoring its blocks", processes)
    err = None
    if run.journal.process == 0:
        try:
            for i in range(1, processes):
                _, other = run.journal.read(i, run.keys, run.n_blocks, tally.k, strict=True)
                tally.merge(other)
            assert outs is not None
            _summarize(run, outs, tally, per_process)
        except Exception as e:
            err = e
    _agree(err, "while writing the summary", processes)  # summary.json is on disk
    return load_result(run.out)


def _summarize(
    run: _Run, outs: dict[str, ts.TensorStore], tally: _Tally, processes: list[dict[str, int]]
) -> dict[str, Any]:
    """Second, cheap pass over the written scores: per-sequence aggregates and statistics."""
    store, keys, out = run.store, run.keys, run.out
    calibrated = run.scoring.calibrated
    stats = {k: _KeyStats() for k in keys}
    table = SequenceTable(keys, columns=("label", "split"))

    def read_scores(k: str, lo: int, hi: int) -> np.ndarray:
        fail = lambda e: _read_error(e, out, f"scores of key {k!r}", outs[k], lo, hi)
        return _result(outs[k][lo:hi].read(), fail).astype(np.float64)

    for lo in range(0, store.rows, run.b):
        hi = min(store.rows, lo + run.b)
        blk = {k: read_scores(k, lo, hi) for k in keys}
        for k, s in blk.items():
            stats[k].add(s, calibrated=calibrated)
        if "sequence_id" in store.meta:
            meta = {c: store.read_meta(c, lo, hi) for c in ("sequence_id", "label", "split")}
            table.add(meta.pop("sequence_id"), blk, meta)
    seqs = table.finish()
    if seqs:
        np.savez(os.path.join(out, "sequences.npz"), **seqs)
    summary: dict[str, Any] = {
        "rows": store.rows,
        "keys": {},
        "sequences": len(seqs.get("sequence_id", [])),
        "calibrated": calibrated,
        "store": store.directory,
        "splits": store.splits,
        "block_rows": run.b,
        "spec": run.record["spec"],
        "processes": processes,
        "raw": bool(run.record.get("raw", False)),
    }
    thresholds = _thresholds(run.scoring.fitted) if calibrated else {}
    for k in keys:
        top = _top_items(store, *tally.topk[k])
        th = thresholds.get(k, thresholds.get("*"))
        summary["keys"][k] = stats[k].to_json(
            top, tally.nonfinite[k], calibrated=calibrated, thresholds=th
        )
    _write_json_atomic(os.path.join(out, "summary.json"), summary)
    return summary


# --------------------------------------------------------------------------- fitting


@dataclasses.dataclass(frozen=True)
class _FitPlan:
    """What a fit over a store reads and how (see :func:`_fit_plan`)."""

    taps: list[str]
    monitor: bool
    example: Any  # the init example of one row
    split_code: int | None  # only rows of this split (an index into store.splits)
    relabel: Callable[[np.ndarray], np.ndarray] | None  # stored labels -> row labels
    mesh: jax.sharding.Mesh
    b: int

    @property
    def meta(self) -> tuple[str, ...]:
        """The row-metadata columns each block needs."""
        split = () if self.split_code is None else ("split",)
        return split + (() if self.relabel is None else ("label",))


def _fit_plan(
    store: Store,
    est: Estimator,
    *,
    tap: str | None,
    split: str | None,
    block_rows: int | None,
    monitor: bool | None,
    labels: bool | Mapping[int, int] | None,
    devices: Sequence[Any] | None,
) -> _FitPlan:
    if monitor is None:
        monitor = kind_of(est).monitor
    taps = list(store.taps) if monitor else [_single_tap(store, tap, "to fit")]
    code = None
    if split is not None:
        if split not in store.splits:
            raise StoreError(f"the store has no split {split!r} (splits: {store.splits})")
        code = store.splits.index(split)
    relabel = _relabel(labels if labels is not None else est.spec.supervised)
    # Estimators whose merge is not exact (learned densities) fold every block on one device.
    mesh = _mesh(devices if est.spec.mergeable else list(devices or jax.local_devices())[:1])
    b = _block_rows(store, block_rows, mesh.devices.size)
    return _FitPlan(taps, monitor, _store_example(store, taps, monitor), code, relabel, mesh, b)


def fit_store(
    store: Store | str | os.PathLike,
    est: Estimator,
    state: Any = None,
    *,
    tap: str | None = None,
    split: str | None = None,
    block_rows: int | None = None,
    monitor: bool | None = None,
    labels: bool | Mapping[int, int] | None = None,
    progress: bool | None = None,
    devices: Sequence[Any] | None = None,
    collective: bool | None = None,
) -> tuple[Any, Any]:
    """Folds the rows of a store (optionally one split) into an estimator's state.

    Blocks are split over this process's devices (``shard_local``: one replica per device, no
    communication per block, replicas merged with the estimator's own ``merge`` at the end).
    Under ``jax.distributed`` every process makes the same call: block ``i`` is folded by
    process ``i % process_count``, then every process's state is gathered
    (``process_allgather``) and tree-merged in process order, so every process returns the
    same state, bit for bit, equal to a one-process fit up to float rounding (row counts
    exactly). Estimators whose merge is not exact (``spec.mergeable`` False: learned
    densities) fold every block on one device of every process instead.

    Args:
      store: a :class:`Store` or its directory.
      est: the estimator (a monitor receives ``{tap: rows}`` of every tap in the store).
      state: a state to continue (default ``est.init(example)``). Process 0's first device
        continues it; the other replicas start empty (for a calibrated estimator in its
        calibration pass: its fitted value with empty score sketches), so its rows count once.
      tap: for a single-tap estimator, which tap to fit on (needed with several taps).
      split: only rows of this split (e.g. ``"trusted"``).
      block_rows: rows per block (chunk aligned, a multiple of the device count; the tail is
        masked so it compiles once).
      monitor: whether ``est`` takes a dict of taps (default: when it is a monitor, or a
        wrapper of one such as ``calibrated``).
      labels: the store's ``label`` column as row labels (0 = trusted, 1 = flagged, anything
        else = unknown): ``True``, or a mapping of stored values to labels (unmapped values are
        unknown, e.g. ``{0: 0, 2: 1}`` fits a probe of stored label 2 against label 0). Default
        (``None``): used when ``est`` learns from labels (``spec.supervised``), not otherwise.
        Unsupervised estimators (and a monitor's unsupervised keys) fold only label-0 rows.
      progress: show a ``tqdm`` progress bar on stderr (default: only on a terminal).
      devices: this process's devices to split blocks over (default: ``jax.local_devices()``).
      collective: ``None`` (default): every process of a ``jax.distributed`` job takes part;
        ``False``: this process folds the whole store alone.

    Returns:
      ``(state, example)``: the state (on the first of ``devices``) and the ``init`` example
      (for checkpoints).

    Raises:
      StoreError: a missing tap or split, or rows that cannot be read (a damaged chunk); with
        several processes, on every process when one of them failed.
      ConfigError: ``block_rows`` < 1, no devices, or ``est`` is not an estimator.
    """
    kw = {"tap": tap, "split": split, "block_rows": block_rows, "monitor": monitor}
    kw.update(labels=labels, progress=progress, devices=devices, collective=collective)
    return _fit_store(store, est, state, desc="fit_store", **kw)


def _fit_store(
    store: Store | str | os.PathLike,
    est: Estimator,
    state: Any,
    *,
    desc: str,
    progress: bool | None,
    collective: bool | None,
    block_rows: int | None,
    **plan: Any,
) -> tuple[Any, Any]:
    """:func:`fit_store` with its progress bar named ``desc``."""
    block_rows = _positive(block_rows, "block_rows", optional=True)
    _require_estimator(est, "fit_store")
    process, processes = resolve_collective(collective)
    store = _as_store(store)
    fit = _fit_plan(store, est, block_rows=block_rows, **plan)
    n_blocks = -(-store.rows // fit.b)
    split_work = est.spec.mergeable and processes > 1
    blocks = _assigned(n_blocks, process, processes) if split_work else list(range(n_blocks))
    continues = process == 0 or not split_work
    err, local = None, None
    try:
        with _bar(_block_rows_of(store.rows, fit.b, blocks), progress=progress, desc=desc) as bar:
            local = _fold_blocks(est, store, fit, blocks, state, continues=continues, bar=bar)
    except Exception as e:
        if not split_work:
            raise
        err = e
    if not split_work:
        return local, fit.example
    _agree(err, "while fitting its blocks", processes)
    return _merge_processes(est, local, fit.mesh.devices.flat[0]), fit.example


def _fold_blocks(
    est: Estimator,
    store: Store,
    fit: _FitPlan,
    blocks: Sequence[int],
    state: Any,
    *,
    continues: bool,
    bar: tqdm,
) -> Any:
    """This process's blocks folded into one state of ``est`` (replicas merged).

    With ``continues`` the first replica starts from ``state`` (else from ``est``'s identity in
    the pass ``state`` is in); every other replica starts from that identity.
    """
    from jaxmon.sharding import merge_replicas, shard_local

    start = est.init(fit.example) if state is None else state
    blank = _identity_like(est, start, fit.example) if (state is not None) else start
    first = start if continues else blank
    devs = list(fit.mesh.devices.flat)
    if len(devs) == 1:
        folder, acc = est, first
        put = lambda x: jax.device_put(x, devs[0])
    else:
        folder = shard_local(est, fit.mesh, "data")
        rows = jax.sharding.NamedSharding(fit.mesh, jax.sharding.PartitionSpec("data"))
        if state is None:
            acc = folder.init(fit.example)
        else:
            acc = jax.tree.map(
                lambda f, z: np.stack([np.asarray(f)] + [np.asarray(z)] * (len(devs) - 1)),
                jax.device_get(first),
                jax.device_get(blank),
            )
            acc = jax.device_put(acc, rows)
        put = lambda x: jax.device_put(x, rows)
    for blk in _read_blocks(store, fit.taps, fit.b, blocks, meta=fit.meta):
        mask = blk.mask()
        if fit.split_code is not None:
            mask &= blk.meta["split"] == fit.split_code
        xs = {t: put(x) for t, x in blk.taps.items()}
        lab = None if fit.relabel is None else put(fit.relabel(blk.meta["label"]))
        # The one update call of a fit over a store: labels for supervised estimators, a mask
        # of trusted rows for the others (label_kwargs).
        kw = label_kwargs(folder, put(mask), lab)
        acc = folder.update(acc, xs if fit.monitor else xs[fit.taps[0]], **kw)
        if len(devs) > 1:
            # Many forced CPU devices on few cores deadlock when many steps are in flight.
            jax.block_until_ready(acc)
        bar.update(blk.valid)
    if len(devs) > 1:
        acc = jax.device_put(merge_replicas(folder, acc), devs[0])
    return acc


def _relabel(labels: bool | Mapping[int, int]) -> Callable[[np.ndarray], np.ndarray] | None:
    """Stored label values -> row labels (0 trusted, 1 flagged, -1 unknown), or None."""
    if labels is False:
        return None
    if labels is True:
        return lambda v: np.where((v == 0) | (v == 1), v, -1).astype(np.int32)
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, int | np.integer) and v in (-1, 0, 1) for k, v in labels.items()
    ):
        raise ConfigError(
            f"labels must be True, False or a mapping of stored label values to 0 (trusted), 1 "
            f"(flagged) or -1 (unknown), got {labels!r}"
        )
    table = {int(k): int(v) for k, v in labels.items()}

    def remap(v: np.ndarray) -> np.ndarray:
        out = np.full(v.shape, -1, np.int32)
        for k, lab in table.items():
            out[v == k] = lab
        return out

    return remap


def _identity_like(est: Estimator, state: Any, example: Any) -> Any:
    """The identity of ``est.merge`` for states in the pass ``state`` is in.

    ``est.init(example)``, except for a calibrated estimator in its calibration pass: rows then
    fold into the score sketches of the stored fitted value, so the identity is ``state`` with
    empty sketches (its merge keeps one inner state and adds the sketches).
    """
    fresh = est.init(example)
    if isinstance(state, CalibratedState) and int(jax.device_get(state.phase)) == 1:
        return state._replace(scores=fresh.scores)
    return fresh


def _merge_processes(est: Estimator, local: Any, device: Any) -> Any:
    """Every process's state gathered and tree-merged in process order: the same on each."""
    from jax.experimental import multihost_utils

    from jaxmon.sharding import _tree_merge

    stacked = multihost_utils.process_allgather(jax.device_get(local))
    # One program on the same inputs in the same order: every process gets identical bits.
    merged = _tree_merge(est, jax.device_put(stacked, device))
    return jax.block_until_ready(merged)


# --------------------------------------------------------------------------- calibration


class Calibration(NamedTuple):
    """What :func:`calibrate_store` returns: all a checkpoint of the calibrated estimator needs.

    Attributes:
      estimator: the calibrated estimator (``jaxmon.calibrated(...)``).
      state: its state after the held-out pass (a ``CalibratedState`` in phase 1).
      fitted: ``estimator.finalize(state)``: a ``CalibratedFitted``, ready for
        :func:`jaxmon.p_values`, :func:`jaxmon.threshold` and :func:`score_store`.
      example: the ``init`` example (for ``jaxmon.checkpoint.save``).
    """

    estimator: Estimator
    state: Any
    fitted: Any
    example: Any


def calibrate_store(
    store: Store | str | os.PathLike,
    est_or_checkpoint: Any,
    state: Any = None,
    *,
    fit_split: str | None = None,
    calibration_store: Store | str | os.PathLike | None = None,
    calibration_split: str | None = None,
    tap: str | None = None,
    block_rows: int | None = None,
    labels: bool | Mapping[int, int] | None = None,
    progress: bool | None = None,
    devices: Sequence[Any] | None = None,
    collective: bool | None = None,
) -> Calibration:
    """Calibrates an estimator on a store: fit, :func:`jaxmon.begin_calibration`, held out.

    The two passes of :func:`jaxmon.calibrated`, each a :func:`fit_store` over a store:

    1. **fit**: the rows of ``fit_split`` of ``store`` fold into the inner estimator. Skipped
       when the estimator is fitted already: a :class:`jaxmon.checkpoint.Checkpoint` (or its
       directory), or an estimator given with its ``state``. The fitted state of an
       uncalibrated estimator becomes the inner state of ``jaxmon.calibrated(estimator)``.
    2. **held out**: :func:`jaxmon.begin_calibration` finalizes the inner state, then the rows
       of ``calibration_split`` of ``calibration_store`` (default: ``store``) fold into one
       score sketch per key; the result is finalized.

    An estimator made by :func:`jaxmon.calibrated` is used as it is (a calibrated checkpoint is
    calibrated again, from its inner state); any other is wrapped with ``calibrated`` (default
    ``relative_accuracy``).

    Args:
      store: the store to fit on, and to calibrate on unless ``calibration_store`` is given.
      est_or_checkpoint: an :class:`~jaxmon.Estimator`, a Checkpoint or a checkpoint directory.
      state: with an estimator, its fitted state (skips the fitting pass).
      fit_split: the rows of ``store`` to fit on (default: every row).
      calibration_store: the held-out rows' store (default: ``store``).
      calibration_split: only these rows of the held-out store (default: every row).
      tap, block_rows, labels, progress, devices, collective: as for :func:`fit_store`, for
        both passes.

    Returns:
      A :class:`Calibration` ``(estimator, state, fitted, example)``.

    Raises:
      ConfigError: held-out rows that would overlap the fitted rows (one store for both
        passes, but ``fit_split`` or ``calibration_split`` not given, or the same split), or
        ``fit_split`` given for an estimator that is fitted already.
      StoreError, NotFittedError: as for :func:`fit_store` and ``finalize`` (a key without
        held-out rows).

    Example:
      >>> ck = jaxmon.load("checkpoint")                  # fitted in the train step
      >>> cal = jaxmon.query.calibrate_store("heldout_store", ck)
      >>> res = jaxmon.query.score_store("query_store", cal.estimator, cal.fitted, out="q")
    """
    ck = _checkpoint(est_or_checkpoint)
    est = ck.estimator if ck is not None else est_or_checkpoint
    _require_estimator(est, "calibrate_store", checkpoints=True)
    state = ck.state if ck is not None else state
    _check_held_out(state is not None, fit_split, calibration_store is None, calibration_split)
    held_out = store if calibration_store is None else calibration_store
    cal = est if kind_of(est).calibrated else calibrated(est)
    kw = {"tap": tap, "block_rows": block_rows, "labels": labels, "progress": progress}
    kw.update(devices=devices, collective=collective, monitor=None)
    example = ck.example if ck is not None else None
    if state is None:
        state, example = _fit_store(store, cal, None, split=fit_split, desc="calibrate: fit", **kw)
    elif cal is not est:  # a fitted uncalibrated state: the inner state of `cal`
        example = example if example is not None else _example_of(held_out, est, tap)
        state = _calibrated_state(cal, state, example)
    state = begin_calibration(cal, state)
    state, got = _fit_store(
        held_out, cal, state, split=calibration_split, desc="calibrate: held out", **kw
    )
    return Calibration(cal, state, cal.finalize(state), got if example is None else example)


def _check_held_out(
    fitted: bool, fit_split: str | None, one_store: bool, calibration_split: str | None
) -> None:
    """Refuses calibration rows that would not be held out from the fitted rows."""
    if fitted:
        if fit_split is not None:
            raise ConfigError(
                "calibrate_store: fit_split is for the fitting pass, but the estimator is "
                "fitted already (a checkpoint, or a state given); leave fit_split out"
            )
        return
    if one_store and None in (fit_split, calibration_split):
        raise ConfigError(
            "calibrate_store: the calibration rows must be held out from the fitted rows: give "
            "fit_split= and another calibration_split=, or calibration_store="
        )
    if one_store and calibration_split == fit_split:
        raise ConfigError(
            f"calibrate_store: the calibration rows must be held out from the fitted rows, "
            f"but fit_split and calibration_split are both {fit_split!r}"
        )


def _example_of(store: Store | str | os.PathLike, est: Estimator, tap: str | None) -> Any:
    store = _as_store(store)
    monitor = kind_of(est).monitor
    taps = list(store.taps) if monitor else [_single_tap(store, tap, "to fit")]
    return _store_example(store, taps, monitor)


def _calibrated_state(cal: Estimator, inner_state: Any, example: Any) -> Any:
    """The state of ``cal = calibrated(est)`` whose fitting pass ended at ``inner_state``.

    Its other fields (zero fitted value and sketches, phase 0) are ``cal.init``'s;
    :func:`jaxmon.begin_calibration` fills them.
    """
    return cal.init(example)._replace(inner=inner_state)


# --------------------------------------------------------------------------- batch detectors


def _batch_score(method: str, alpha: float, num_directions: int) -> tuple[ScoreFn, dict]:
    """A batch detector as a plain score function of ``(trusted fitted, query moments)``, and
    the spec recorded with its query."""
    from jaxmon.estimators.batch_detectors import que_scores, spectral_signature_scores

    if method == "que":

        def score(fitted, x, *, mask=None):
            return que_scores(fitted[0], fitted[1], x, alpha=alpha, mask=mask)

    elif method == "spectral":

        def score(fitted, x, *, mask=None):
            return spectral_signature_scores(
                fitted[0], fitted[1], x, num_directions=num_directions, mask=mask
            )

    else:
        raise ConfigError(f"method must be 'que' or 'spectral', got {method!r}")
    params = {"method": method, "alpha": alpha, "num_directions": num_directions}
    return score, EstimatorSpec("batch_detector", params).to_dict()


def score_store_batch(
    store: Store | str | os.PathLike,
    *,
    out: str | os.PathLike,
    tap: str | None = None,
    method: str = "que",
    trusted_split: str = "trusted",
    query_split: str | None = None,
    alpha: float = 4.0,
    num_directions: int = 1,
    block_rows: int | None = None,
    top_k: int = 100,
    resume: bool = True,
    progress: bool | None = None,
    devices: Sequence[Any] | None = None,
    collective: bool | None = None,
) -> QueryResult:
    """Whole-batch detectors (QUE, spectral signatures) over a store, as streaming passes.

    QUE and spectral signatures need the query set's own covariance, which no single block
    holds. Three passes over the store, each bounded by the block size like
    :func:`score_store`: (1) the trusted moments (``trusted_split``), (2) the query set's
    moments (``query_split``; ``None`` = every row), (3) every row scored against both by the
    scoring loop of :func:`score_store` (so the output, resumability and top-k are the same).
    Trusted rows are scored too, which gives the scores' null distribution for free.

    Args:
      store: a :class:`Store` or its directory.
      out: output directory of the scoring pass.
      tap: the tap to audit (needed when the store holds several).
      method: ``"que"`` (Dong, Hopkins & Li 2019) or ``"spectral"`` (Tran, Li & Madry 2018).
      trusted_split, query_split: the splits whose statistics are compared.
      alpha: QUE's inverse temperature; num_directions: spectral signature directions.
      block_rows, top_k, resume, progress, devices, collective: as for :func:`score_store`
        (under ``jax.distributed`` every pass is split over the processes).

    Returns:
      The :class:`QueryResult` of the scoring pass (one score key).

    Raises:
      ConfigError: an unknown ``method``, or as for :func:`score_store`.
    """
    from jaxmon.estimators.gaussian import gaussian

    score, spec = _batch_score(method, alpha, num_directions)
    top_k = _positive(top_k, "top_k")
    out = _output_dir(out)
    store = _as_store(store)
    tap = _single_tap(store, tap, "to audit")
    g = gaussian()
    kw = {"tap": tap, "block_rows": block_rows, "devices": devices, "collective": collective}
    kw.update(progress=progress, monitor=False, labels=None)
    trusted, _ = _fit_store(store, g, None, split=trusted_split, desc="trusted moments", **kw)
    moments, _ = _fit_store(store, g, None, split=query_split, desc="query moments", **kw)
    fitted = (g.finalize(trusted), moments)
    scoring = _Scoring(score, fitted, [tap], monitor=False, calibrated=False, spec=spec)
    return _run_query(
        store,
        scoring,
        out=out,
        block_rows=_positive(block_rows, "block_rows", optional=True),
        top_k=top_k,
        resume=resume,
        progress=progress,
        devices=devices,
        callback=None,
        collective=collective,
        desc="score_store_batch",
    )


# --------------------------------------------------------------------------- ranking


def rank_store(
    store: Store | str | os.PathLike,
    est_or_checkpoint: Any = None,
    fitted: Any = None,
    *,
    query: QueryResult | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    flagged: int | Sequence[int] = 1,
    trusted: int = 0,
    sequences: bool = True,
    reductions: Sequence[str] = ("max", "mean", "max_rolling_mean"),
    window: int = 16,
    fpr: float = 0.01,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    **score_kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`jaxmon.rank_detectors` over a store, with the store's ``label`` column.

    Every score key (and, with ``sequences``, every sequence aggregation; for a calibrated
    query, the combinations across keys) is ranked by AUROC of the rows labelled ``flagged``
    against the rows labelled ``trusted``, with a bootstrap interval and the recall at ``fpr``.
    The rows are scored once: give ``query=`` (a finished :func:`score_store` of this store),
    or ``out=`` to score the store there first (``score_kwargs`` go to :func:`score_store`).

    Args:
      store: the store (its ``label`` and ``sequence_id`` columns are read).
      est_or_checkpoint, fitted: what to score with, as for :func:`score_store` (unless
        ``query`` is given).
      query: a finished query of ``store`` to rank, instead of scoring.
      out: where to score the store (when no ``query`` is given).
      flagged: the stored label value(s) of the flagged rows.
      trusted: the stored label value of the clean rows.
      sequences: also rank sequence aggregates (by the ``sequence_id`` column).
      reductions, window, fpr, n_boot, level, seed: as for :func:`jaxmon.rank_detectors`.

    Returns:
      As :func:`jaxmon.rank_detectors`: one dict per entry, best AUROC first.

    Raises:
      StoreError: no rows with those labels, or a query of another store.
      ConfigError: neither ``query`` nor ``out``.
    """
    from jaxmon._rank import rank_scores

    store = _as_store(store)
    if query is None and out is None:
        raise ConfigError(
            "rank_store: give query= (a finished score_store of this store) or out= (a "
            "directory to score the store into)"
        )
    if query is None:
        res = score_store(store, est_or_checkpoint, fitted, out=out, **score_kwargs)
    else:
        res = _query_of(store, query)
    clean_rows, flag_rows = _labelled_rows(store, flagged, trusted)
    clean, flag = {}, {}
    for k in res.keys:  # one key's scores in memory at a time
        s = res.scores(k)
        clean[k], flag[k] = s[clean_rows], s[flag_rows]
    ids = None
    if sequences and "sequence_id" in store.meta:
        seq = store.column("sequence_id")
        ids = (seq[clean_rows], seq[flag_rows])
    return rank_scores(
        clean,
        flag,
        sequence_id=ids,
        calibrated=bool(res.summary.get("calibrated")),
        reductions=reductions,
        window=window,
        fpr=fpr,
        n_boot=n_boot,
        level=level,
        seed=seed,
    )


def _query_of(store: Store, query: QueryResult | str | os.PathLike) -> QueryResult:
    """A finished query of ``store`` (one of another store is refused)."""
    res = query if isinstance(query, QueryResult) else load_result(query)
    if res.rows != store.rows:
        raise StoreError(
            f"the query in {res.directory} scored {res.rows:,} rows but the store at "
            f"{store.directory} holds {store.rows:,}: rank a query of this store"
        )
    return res


def _labelled_rows(
    store: Store, flagged: int | Sequence[int], trusted: int
) -> tuple[np.ndarray, np.ndarray]:
    """The rows labelled ``trusted`` and those labelled ``flagged`` (both must exist)."""
    labels = store.column("label").astype(np.int64)
    want = np.atleast_1d(np.asarray(flagged, np.int64))
    clean_rows = np.flatnonzero(labels == int(trusted))
    flag_rows = np.flatnonzero(np.isin(labels, want))
    if not len(clean_rows) or not len(flag_rows):
        raise StoreError(
            f"rank_store: the store at {store.directory} holds {len(clean_rows):,} rows labelled "
            f"{trusted} and {len(flag_rows):,} labelled {want.tolist()}; both are needed"
        )
    return clean_rows, flag_rows
