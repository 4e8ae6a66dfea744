"""Checkpoints of estimator states and fitted values, through orbax (the only orbax importer).

A jaxmon checkpoint step holds up to three orbax items and one digest record:

* ``jaxmon_state``: the mergeable summary (a pytree of arrays), saved with ``StandardSave``;
* ``jaxmon_fitted`` (optional): the output of ``finalize``;
* ``jaxmon_meta``: a small JSON record (format version 2): the estimator spec, the ``init``
  example's shapes and dtypes, the structure of state and fitted (node kinds, type *names*,
  field names, shapes and dtypes; for diagnostics and checks), exact row counts, the step, the
  creation time, the jaxmon version and the user's own metadata;
* ``jaxmon_digests.json``: the size and SHA-256 digest of every file of the step, written
  atomically once orbax has finalized the step, and verified by :func:`load` before orbax reads
  a byte.

**No code from data.** Restoring never imports or calls anything named by the checkpoint's
files: the estimator is rebuilt by name from jaxmon's registry (``jaxmon.from_spec``), and the
abstract restore target is ``jax.eval_shape(est.init, example)`` (and
``jax.eval_shape(est.finalize, ...)`` for the fitted value) from the saved spec and example.
The saved structure record is only compared with that target, so a crafted or stale file
gives a :class:`CheckpointError` naming the first difference.

**Verified.** A bit flip, a missing, truncated or unexpected file, or garbled metadata is a
:class:`CheckpointError` of one sentence naming the file (the lower layer's error chained as
``__cause__``). A step whose digest record is missing is treated as an interrupted save:
:func:`steps` does not list it, :func:`load` picks the latest verified step, and :func:`save`
may write that step number again.

**Atomic.** A step is written by orbax to ``<step>.orbax-checkpoint-tmp-*`` and renamed when
complete; the digest record is written last. A process killed at any point of a save leaves
the previous steps intact.

**Many processes.** Under ``jax.distributed`` :func:`save` is collective (see its docstring);
:func:`load` into this process's own devices (the default) is done by each process alone
(orbax's ``active_processes``), into a global mesh by all processes together.

The items also splice into a user's own ``ocp.CheckpointManager`` next to the model and
optimizer with :func:`save_args` / :func:`restore_args` / :func:`restored`; call :func:`seal`
after such a save so that :func:`load` can read (and verify) the jaxmon items directly.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxmon._base import Estimator, from_spec, num_nonfinite, num_rows
from jaxmon.errors import CheckpointError, JaxmonError, one_line

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load",
    "merge",
    "restore_args",
    "restored",
    "save",
    "save_args",
    "seal",
    "steps",
]

FORMAT = "jaxmon-checkpoint"
FORMAT_VERSION = 2
DIGESTS = "jaxmon_digests.json"
_DIGESTS_FORMAT = "jaxmon-digests"
_ITEMS = ("jaxmon_state", "jaxmon_fitted", "jaxmon_meta")
_MAX_MESSAGE = 300


@dataclasses.dataclass
class Checkpoint:
    """What a jaxmon checkpoint holds, rebuilt with no user code.

    Attributes:
      estimator: rebuilt from the stored spec with ``jaxmon.from_spec``.
      state: the mergeable state (same pytree types as when saved).
      fitted: the fitted value, or None when none was saved.
      metadata: the JSON record (``spec``, ``jaxmon_version``, ``example``, ``rows``, ``step``,
        ``created``, ``user``, ...).
      step: the checkpoint step.
    """

    estimator: Estimator
    state: Any
    fitted: Any
    metadata: dict[str, Any]
    step: int

    @property
    def example(self) -> Any:
        """The ``init`` example as ``jax.ShapeDtypeStruct`` pytree, or None if not recorded."""
        ex = self.metadata.get("example")
        return None if ex is None else _example_from_json(ex)


# --------------------------------------------------------------------------- errors


def _short(path: str | os.PathLike, limit: int = 110) -> str:
    """A path clipped from the left, so that messages stay one short sentence."""
    p = os.fspath(path)
    return p if len(p) <= limit else "..." + p[-(limit - 3) :]


def _error(sentence: str) -> CheckpointError:
    """A :class:`CheckpointError` of one line of at most 300 characters, ending with a period."""
    text = " ".join(sentence.split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 4].rstrip() + "..."
    if not text.endswith((".", "?", "!")):
        text += "."
    return CheckpointError(text)


# --------------------------------------------------------------------------- pytree structure


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _structure(tree: Any) -> Any:
    """JSON description of a pytree: node kinds, type names, and shape/dtype of every leaf.

    Type names are recorded for diagnostics only (never imported, never compared), so renaming
    or moving a state class does not invalidate saved checkpoints.
    """
    if tree is None:
        return {"t": "none"}
    if _is_namedtuple(tree):
        cls = type(tree)
        return {
            "t": "namedtuple",
            "type": cls.__name__,
            "fields": [[f, _structure(getattr(tree, f))] for f in cls._fields],
        }
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        # A dataclass registered as a pytree (jax.tree_util.register_dataclass): plain values
        # (str, int, float, bool) are its static metadata, stored as they are.
        fields = []
        for f in dataclasses.fields(tree):
            v = getattr(tree, f.name)
            static = isinstance(v, str | bool | int | float) and not hasattr(v, "shape")
            fields.append([f.name, {"t": "static", "value": v} if static else _structure(v)])
        return {"t": "dataclass", "type": type(tree).__name__, "fields": fields}
    if isinstance(tree, Mapping):
        for k in tree:
            if not isinstance(k, str):
                raise _error(
                    f"state dicts must have string keys to be checkpointed (orbax), got {k!r}"
                )
        return {"t": "dict", "items": [[k, _structure(v)] for k, v in tree.items()]}
    if isinstance(tree, tuple | list):
        return {"t": type(tree).__name__, "items": [_structure(v) for v in tree]}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return {"t": "leaf", "shape": list(tree.shape), "dtype": _dtype_name(tree.dtype)}
    if isinstance(tree, int | float | bool | np.generic):
        a = np.asarray(tree)
        return {"t": "leaf", "shape": [], "dtype": _dtype_name(a.dtype)}
    raise _error(
        f"cannot checkpoint a pytree node of type {type(tree).__name__}: jaxmon states must be "
        "built from NamedTuples, dicts, tuples, lists and arrays"
    )


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two structure records differ, in words, or None when they are equal.

    ``a`` may come from a file: anything malformed in it is reported as a difference, never
    raised as a ``KeyError``/``TypeError``.
    """
    where = path or "the root"
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return f"at {where}: a malformed structure record"
    if a.get("t") != b.get("t"):
        return f"at {where}: {a.get('t')} in the checkpoint vs {b.get('t')} expected"
    t = a["t"]
    if t == "leaf":
        if a.get("shape") != b["shape"] or a.get("dtype") != b["dtype"]:
            return (
                f"at {where}: {a.get('dtype')}{a.get('shape')} in the checkpoint vs "
                f"{b['dtype']}{b['shape']} expected"
            )
        return None
    if t == "none":
        return None
    if t == "static":
        if a.get("value") != b["value"]:
            return f"at {where}: {a.get('value')!r} in the checkpoint vs {b['value']!r} expected"
        return None
    key = "fields" if t in ("namedtuple", "dataclass") else "items"
    ia, ib = a.get(key), b[key]
    if not isinstance(ia, list):
        return f"at {where}: a malformed structure record"
    if t in ("namedtuple", "dataclass", "dict"):
        if not all(isinstance(kv, list) and len(kv) == 2 for kv in ia):
            return f"at {where}: a malformed structure record"
        ka, kb = [k for k, _ in ia], [k for k, _ in ib]
        if ka != kb:
            missing = [k for k in kb if k not in ka]
            extra = [k for k in ka if k not in kb]
            return (
                f"at {where}: fields differ (missing in the checkpoint: {missing}, "
                f"unexpected: {extra})"
            )
        for (k, sa), (_, sb) in zip(ia, ib, strict=True):
            sub = f"{path}[{k!r}]" if t == "dict" else f"{path}.{k}"
            d = _first_difference(sa, sb, sub)
            if d:
                return d
        return None
    if len(ia) != len(ib):
        return f"at {where}: {len(ia)} items in the checkpoint vs {len(ib)} expected"
    for i, (sa, sb) in enumerate(zip(ia, ib, strict=True)):
        d = _first_difference(sa, sb, f"{path}[{i}]")
        if d:
            return d
    return None


def _example_to_json(example: Any) -> Any:
    if isinstance(example, Mapping):
        return {"dict": {str(k): _example_to_json(v) for k, v in example.items()}}
    if isinstance(example, tuple | list):
        return {"tuple": [_example_to_json(v) for v in example]}
    return {"shape": [int(s) for s in example.shape], "dtype": _dtype_name(example.dtype)}


def _example_from_json(ex: Any) -> Any:
    """The ``init`` example from its JSON record; only numeric dtypes and integer shapes."""
    if isinstance(ex, Mapping) and isinstance(ex.get("dict"), Mapping):
        return {str(k): _example_from_json(v) for k, v in ex["dict"].items()}
    if isinstance(ex, Mapping) and isinstance(ex.get("tuple"), list):
        return tuple(_example_from_json(v) for v in ex["tuple"])
    shape = ex.get("shape") if isinstance(ex, Mapping) else None
    name = ex.get("dtype") if isinstance(ex, Mapping) else None
    ok_shape = isinstance(shape, list) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    )
    try:
        dtype = jnp.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    # Object, string and time dtypes are not activations; refusing them keeps the example data.
    if not ok_shape or dtype is None or dtype.kind in "OSUMm":
        raise _error(f"the checkpoint's init example record {str(ex)[:80]} is malformed")
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _infer_example(est: Estimator, state: Any) -> Any:
    """Guesses a single-array ``init`` example that reproduces ``state``'s structure.

    Tries ``[d]`` float32 examples for every trailing size in the state. Returns None for
    estimators whose example is a dict of taps (monitors: pass ``example=``) or when nothing
    matches.
    """
    want = _structure(state)
    sizes = []
    for leaf in jax.tree_util.tree_leaves(state):
        for s in getattr(leaf, "shape", ())[-2:]:
            if s not in sizes:
                sizes.append(int(s))
    for d in sizes:
        ex = jax.ShapeDtypeStruct((d,), jnp.float32)
        try:
            got = _structure(jax.eval_shape(est.init, ex))
        except Exception:  # any refusal of this guess: try the next size
            continue
        if _first_difference(want, got) is None:
            return ex
    return None


def _abstract_trees(est: Estimator, example: Any, *, fitted: bool, what: str) -> tuple[Any, Any]:
    """``(eval_shape(init, example), eval_shape(finalize, that) or None)``, errors as sentences."""
    name = est.spec.name
    try:
        abstract_state = jax.eval_shape(est.init, example)
    except Exception as e:
        raise _error(
            f"{what}: the {name} estimator's init refuses the example ({one_line(e, 120)})"
        ) from e
    if not fitted:
        return abstract_state, None
    try:
        abstract_fitted = jax.eval_shape(est.finalize, abstract_state)
    except Exception as e:
        raise _error(
            f"{what}: the {name} estimator's finalize cannot be traced on its state "
            f"({one_line(e, 120)})"
        ) from e
    return abstract_state, abstract_fitted


# --------------------------------------------------------------------------- shardings


def _with_shardings(abstract: Any, sharding: Any) -> Any:
    """``abstract`` (a pytree of ``ShapeDtypeStruct``) with a sharding on every leaf.

    ``sharding`` is None (the first local device), one ``jax.sharding.Sharding``, a callable
    ``(ShapeDtypeStruct) -> Sharding``, or a pytree of shardings with the leaves of ``abstract``.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    plain = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        chosen = [sharding or default] * len(plain)
    elif callable(sharding):
        chosen = [sharding(x) or default for x in plain]
    else:
        chosen = jax.tree_util.tree_leaves(
            sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
        )
        if len(chosen) != len(plain):
            raise _error(
                f"sharding= has {len(chosen)} leaves but the checkpointed tree has {len(plain)}; "
                "pass one jax.sharding.Sharding, a callable, or a pytree matching the state"
            )
    out = []
    for x, s in zip(plain, chosen, strict=True):
        try:
            out.append(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        except (TypeError, ValueError) as e:
            raise _error(
                f"the sharding chosen for a {x.dtype.name}{list(x.shape)} leaf does not fit it "
                f"({one_line(e, 100)}); pass fitted_sharding= or a callable sharding="
            ) from e
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_tree_of_shardings(sharding: Any) -> bool:
    return not (
        sharding is None or isinstance(sharding, jax.sharding.Sharding) or callable(sharding)
    )


# --------------------------------------------------------------------------- metadata


def _counts_json(state: Any) -> tuple[Any, Any]:
    try:
        return num_rows(state), num_nonfinite(state)
    except (TypeError, JaxmonError):  # a state without a row counter: nothing to report
        return None, None


def _metadata(
    est: Estimator, state: Any, fitted: Any, example: Any, step: int, user: Any
) -> dict[str, Any]:
    """The ``jaxmon_meta`` record; refuses, at save time, what :func:`load` could not restore."""
    import jaxmon

    if example is None:
        example = _infer_example(est, state)
        if example is None:
            raise _error(
                f"cannot infer the init example of this {est.spec.name} state; pass example= "
                "(what est.init was given: an array, ShapeDtypeStruct or dict of taps) so the "
                "checkpoint can be restored"
            )
    example = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example)
    abstract_state, abstract_fitted = _abstract_trees(
        est, example, fitted=fitted is not None, what="cannot save"
    )
    state_tree = _structure(state)
    diff = _first_difference(state_tree, _structure(abstract_state))
    if diff:
        raise _error(f"the state does not match est.init(example) {diff}")
    fitted_tree = None
    if fitted is not None:
        fitted_tree = _structure(fitted)
        diff = _first_difference(fitted_tree, _structure(abstract_fitted))
        if diff:
            raise _error(f"the fitted value does not match est.finalize(state) {diff}")
    if user is not None and not isinstance(user, Mapping):
        raise _error(f"metadata= must be a dict of JSON values, got {type(user).__name__}")
    rows, nonfinite = _counts_json(state)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jaxmon_version": jaxmon.__version__,
        "spec": est.spec.to_dict(),
        "example": _example_to_json(example),
        "state_tree": state_tree,
        "fitted_tree": fitted_tree,
        "rows": rows,
        "nonfinite": nonfinite,
        "step": int(step),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "user": {} if user is None else dict(user),
    }
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _error(f"metadata= must be JSON-serialisable ({one_line(e, 100)})") from e
    return meta


def _older_format(where: str, version: int) -> CheckpointError:
    return _error(
        f"{where} was written by an older jaxmon checkpoint format (version {version}) that is "
        "no longer read, as it named Python classes to import; re-save it with this jaxmon"
    )


def _check_meta(meta: Any, where: str, *, oldest: int = FORMAT_VERSION) -> dict[str, Any]:
    """The metadata record as a dict, or a :class:`CheckpointError` saying what is wrong."""
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise _error(f"{where} holds no jaxmon metadata record; is it a jaxmon checkpoint?")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _error(f"{where} has a malformed format version {str(version)[:20]!r}")
    if version > FORMAT_VERSION:
        raise _error(
            f"{where} was written by a newer jaxmon (checkpoint format {version}, this one reads "
            f"{FORMAT_VERSION}); upgrade jaxmon"
        )
    if version < oldest:
        raise _older_format(where, version)
    for key in ("spec", "example", "state_tree", "fitted_tree", "step"):
        if key not in meta:
            raise _error(f"{where} has a malformed metadata record (no {key!r})")
    if not isinstance(meta["spec"], Mapping) or not isinstance(meta["step"], int):
        raise _error(f"{where} has a malformed metadata record (spec or step)")
    return dict(meta)


def _check_record(record: Any, abstract: Any, what: str, est: Estimator, where: str) -> None:
    """Refuses a saved structure record that differs from the target this jaxmon builds."""
    expected = _structure(abstract)
    diff = _first_difference(record, expected)
    if diff:
        # The whole of both records goes into the chained cause, for whoever debugs it.
        cause = ValueError(
            f"saved {json.dumps(record)[:4000]} vs expected {json.dumps(expected)[:4000]}"
        )
        raise _error(
            f"the {what} recorded in jaxmon_meta of {where} does not match this jaxmon's "
            f"{est.spec.name} {diff}"
        ) from cause


def _estimator(meta: Mapping[str, Any], where: str) -> Estimator:
    """The estimator named by the record's spec, from jaxmon's registry only."""
    try:
        return from_spec(meta["spec"])
    except Exception as e:
        raise _error(
            f"{where} names an estimator this jaxmon cannot build ({one_line(e, 150)})"
        ) from e


def _check_against(meta: Mapping[str, Any], est: Estimator | None, example: Any) -> None:
    """Raises a clear :class:`CheckpointError` when ``est``/``example`` do not match ``meta``."""
    if est is not None and est.spec.to_dict() != meta["spec"]:
        raise _error(
            f"the checkpoint holds a {meta['spec'].get('name')} estimator whose spec differs from "
            f"the given estimator's spec (saved {json.dumps(meta['spec'])[:80]}, given "
            f"{est.spec.to_json()[:80]})"
        )
    if example is not None:
        e = est or _estimator(meta, "the checkpoint")
        abstract, _ = _abstract_trees(e, example, fitted=False, what="cannot check the example")
        diff = _first_difference(meta["state_tree"], _structure(abstract))
        if diff:
            raise _error(f"the checkpointed state does not match the given example's shapes {diff}")


# --------------------------------------------------------------------------- splice API


def save_args(
    est: Estimator,
    state: Any,
    *,
    fitted: Any = None,
    example: Any = None,
    step: int = 0,
    metadata: Mapping[str, Any] | None = None,
    prefix: str = "jaxmon",
) -> dict[str, Any]:
    """Orbax save arguments for a monitor, to splice into the user's own composite checkpoint.

    Args:
      est: the estimator (its spec is stored).
      state: its state.
      fitted: optional fitted value.
      example: the ``init`` example (array, ``ShapeDtypeStruct`` or dict of them for monitors);
        inferred for single-array estimators when omitted.
      step: recorded in the metadata.
      metadata: JSON-serialisable user metadata.
      prefix: item names are ``f"{prefix}_state"``, ``f"{prefix}_fitted"``, ``f"{prefix}_meta"``.

    Returns:
      A dict of item name to ``ocp.args`` to unpack into ``ocp.args.Composite``.

    Raises:
      CheckpointError: no example can be inferred, the state or fitted value does not match the
        estimator and example, or the metadata is not JSON.

    Example:
      >>> mngr.save(step, args=ocp.args.Composite(
      ...     params=ocp.args.StandardSave(params),
      ...     **jaxmon.checkpoint.save_args(monitor, mon_state, example=taps_example)))
      >>> mngr.wait_until_finished()
      >>> jaxmon.checkpoint.seal(mngr.directory, step)  # so that jaxmon.load can verify it
    """
    meta = _metadata(est, state, fitted, example, step, metadata)
    out = {
        f"{prefix}_state": ocp.args.StandardSave(state),
        f"{prefix}_meta": ocp.args.JsonSave(meta),
    }
    if fitted is not None:
        out[f"{prefix}_fitted"] = ocp.args.StandardSave(fitted)
    return out


def restore_args(
    est: Estimator,
    example: Any,
    *,
    fitted: bool = False,
    sharding: Any = None,
    fitted_sharding: Any = None,
    prefix: str = "jaxmon",
) -> dict[str, Any]:
    """Orbax restore arguments matching :func:`save_args`, built from the estimator and example.

    Args:
      est: the estimator that was saved.
      example: its ``init`` example (the abstract target is ``jax.eval_shape(est.init, example)``
        and, for ``fitted=True``, ``jax.eval_shape(est.finalize, state)``).
      fitted: also restore the fitted item.
      sharding: one ``jax.sharding.Sharding`` for every leaf, a callable
        ``(ShapeDtypeStruct) -> Sharding``, or a pytree of shardings like the state.
      fitted_sharding: the same for the fitted value (defaults to ``sharding`` when that is a
        single sharding or callable).
      prefix: as in :func:`save_args`.

    Returns:
      A dict of item name to ``ocp.args``; pass the restored composite to :func:`restored`.
    """
    abstract_state, abstract_fitted = _abstract_trees(
        est, example, fitted=fitted, what="cannot build the restore target"
    )
    out = {
        f"{prefix}_state": ocp.args.StandardRestore(_with_shardings(abstract_state, sharding)),
        f"{prefix}_meta": ocp.args.JsonRestore(),
    }
    if fitted:
        if fitted_sharding is None and not _is_tree_of_shardings(sharding):
            fitted_sharding = sharding
        out[f"{prefix}_fitted"] = ocp.args.StandardRestore(
            _with_shardings(abstract_fitted, fitted_sharding)
        )
    return out


def restored(
    items: Mapping[str, Any],
    *,
    est: Estimator | None = None,
    example: Any = None,
    step: int | None = None,
    prefix: str = "jaxmon",
) -> Checkpoint:
    """Wraps the jaxmon items of a restored composite (see :func:`restore_args`).

    The data was restored by the caller's own manager against the target of
    :func:`restore_args`, so metadata of format version 1 is accepted here (only its JSON is
    read).

    Raises:
      CheckpointError: the items are missing or do not match ``est`` / ``example``.
    """
    try:
        meta = items[f"{prefix}_meta"]
        state = items[f"{prefix}_state"]
    except (KeyError, TypeError) as e:
        raise _error(f"the restored composite holds no {prefix}_state/{prefix}_meta items") from e
    meta = _check_meta(meta, "the restored composite", oldest=1)
    _check_against(meta, est, example)
    fitted = items.get(f"{prefix}_fitted") if hasattr(items, "get") else None
    return Checkpoint(
        est or _estimator(meta, "the restored composite"),
        state,
        fitted,
        meta,
        int(meta["step"] if step is None else step),
    )


# --------------------------------------------------------------------------- digests


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, str(step))


def _covered_files(step_dir: str) -> list[str]:
    """Files the digest record covers, relative to the step (``/``-separated, sorted).

    The step's own top-level files and every file of the jaxmon items; other items of a
    composite the user wrote with their own manager (a model) are theirs to verify.
    """
    out = []
    for name in sorted(os.listdir(step_dir)):
        path = os.path.join(step_dir, name)
        if os.path.isdir(path):
            if name not in _ITEMS:
                continue
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for f in sorted(files):
                    rel = os.path.relpath(os.path.join(root, f), step_dir)
                    out.append(rel.replace(os.sep, "/"))
        elif not name.startswith(DIGESTS):
            out.append(name)
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _write_digests(step_dir: str) -> None:
    """Writes ``jaxmon_digests.json`` for a finalized step: tmp file, fsync, atomic rename."""
    files = {}
    for rel in _covered_files(step_dir):
        path = os.path.join(step_dir, rel)
        files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    record = {
        "format": _DIGESTS_FORMAT,
        "format_version": FORMAT_VERSION,
        "algorithm": "sha256",
        "files": files,
    }
    tmp = os.path.join(step_dir, f"{DIGESTS}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, DIGESTS))
    try:  # make the rename itself durable (not possible on every platform)
        fd = os.open(step_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _is_sealed(root: str, step: int) -> bool:
    return os.path.isfile(os.path.join(_step_dir(root, step), DIGESTS))


def _verify(root: str, step: int, items: Sequence[str]) -> None:
    """Checks every covered file of ``items`` (and the step's own files) against the record."""
    step_dir = _step_dir(root, step)
    where = f"step {step} of {_short(root)}"
    record_path = os.path.join(step_dir, DIGESTS)
    try:
        with open(record_path, "rb") as f:
            record = json.loads(f.read())
        files = record["files"]
        if record.get("format") != _DIGESTS_FORMAT or record.get("algorithm") != "sha256":
            raise ValueError(f"unknown digest record format {record.get('format')!r}")
        if not isinstance(files, dict) or not all(
            isinstance(v, dict)
            and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise ValueError("malformed file entries")
        for rel in files:
            parts = rel.split("/")
            # Names come from a file: they must stay inside the step directory.
            if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"file name {rel[:40]!r} outside the step")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _error(
            f"the digest record {DIGESTS} of {where} cannot be read ({one_line(e, 80)})"
        ) from e

    def wanted(rel: str) -> bool:
        return "/" not in rel or rel.split("/", 1)[0] in items

    present = {rel for rel in _covered_files(step_dir) if wanted(rel)}
    for rel in sorted(r for r in files if wanted(r)):
        path = os.path.join(step_dir, *rel.split("/"))
        want = files[rel]
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise _error(f"checkpoint file {rel} of {where} is missing ({one_line(e, 60)})") from e
        if size != want["size"]:
            cause = OSError(f"{path}: {size} bytes on disk, {want['size']} recorded")
            raise _error(
                f"checkpoint file {rel} of {where} is truncated or overwritten: {size} bytes on "
                f"disk, {want['size']} recorded at save time"
            ) from cause
        try:
            digest = _sha256(path)
        except OSError as e:
            raise _error(
                f"checkpoint file {rel} of {where} cannot be read ({one_line(e, 60)})"
            ) from e
        if digest != want["sha256"]:
            cause = ValueError(f"{path}: sha256 {digest}, recorded {want['sha256']}")
            raise _error(
                f"checkpoint file {rel} of {where} is corrupted: its SHA-256 digest differs from "
                "the one recorded at save time"
            ) from cause
    extra = sorted(present - set(files))
    if extra:
        cause = ValueError(f"files not in {DIGESTS}: {extra}")
        raise _error(
            f"checkpoint file {extra[0]} of {where} was not written by the save (it is not in "
            f"{DIGESTS})"
        ) from cause


def seal(directory: str | os.PathLike, step: int) -> str:
    """Records the digests of a step written by the caller's own ``CheckpointManager``.

    Call it once the manager's save of ``step`` (with items from :func:`save_args`) has
    finished (``mngr.wait_until_finished()``), on the primary process; :func:`load` then
    verifies the jaxmon items against it. :func:`save` seals its own steps.

    Args:
      directory: the manager's root directory.
      step: the step to seal.

    Returns:
      The path of the digest record.

    Raises:
      CheckpointError: the step does not exist (or is still being written) or has no jaxmon
        items, or the record cannot be written.
    """
    root = os.fspath(directory)
    step_dir = _step_dir(root, int(step))
    meta_dir = os.path.join(step_dir, "jaxmon_meta")
    if not os.path.isdir(meta_dir):
        raise _error(
            f"step {step} of {_short(root)} holds no finished jaxmon items to seal (is its save "
            "still running, or were the items saved under another prefix?)"
        )
    try:
        _write_digests(step_dir)
    except OSError as e:
        raise _error(
            f"cannot write the digest record of step {step} in {_short(root)} ({one_line(e, 100)})"
        ) from e
    return os.path.join(step_dir, DIGESTS)


# --------------------------------------------------------------------------- directory API


def _manager(directory: str, *, create: bool, alone: bool = True) -> ocp.CheckpointManager:
    """An orbax manager of ``directory``.

    ``alone``: in a multi-process job, this process runs the manager by itself (orbax's
    ``active_processes={this process}``): for reading a checkpoint into this process's own
    devices, and for the single writer of a state every process holds whole. Otherwise every
    process of the job takes part (states sharded over a global mesh).
    """
    multiprocessing = None
    if alone and jax.process_count() > 1:
        me = jax.process_index()
        multiprocessing = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"jaxmon_p{me}"
        )
        if create:  # orbax leaves the root to us when a manager runs on some processes only
            os.makedirs(directory, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        create=create and multiprocessing is None,
        # Leftovers of a save killed mid-way are removed when a manager opens the directory.
        cleanup_tmp_directories=create,
        enable_async_checkpointing=False,
        multiprocessing_options=multiprocessing or ocp.options.MultiprocessingOptions(),
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _replicated_globally(tree: Any) -> Any:
    """``tree`` with every array held by this process alone made a global replicated array.

    Every process must hold the same values (the same call on every process); arrays already
    spread over a global mesh are left as they are.
    """
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(x: Any) -> Any:
        if not getattr(x, "is_fully_addressable", True):
            return x
        local = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(local.shape, everywhere, lambda idx: local[idx])

    return jax.tree_util.tree_map(put, tree)


def _all_steps(root: str) -> list[int]:
    """Every step orbax considers finalized (sealed or not)."""
    if not os.path.isdir(root):
        raise _error(f"no checkpoint directory at {_short(root)}")
    try:
        with _manager(root, create=False) as mngr:
            return sorted(int(s) for s in mngr.all_steps())
    except Exception as e:
        raise _error(f"cannot list the steps of {_short(root)} ({one_line(e, 120)})") from e


def _read_meta(root: str, step: int) -> Any:
    """The raw ``jaxmon_meta`` JSON of a step (through orbax), errors as one sentence."""
    if not os.path.isdir(os.path.join(_step_dir(root, step), "jaxmon_meta")):
        raise _error(
            f"step {step} of {_short(root)} has no jaxmon_meta item; is it a jaxmon checkpoint?"
        )
    try:
        with _manager(root, create=False) as mngr:
            args = ocp.args.Composite(jaxmon_meta=ocp.args.JsonRestore())
            return mngr.restore(step, args=args)["jaxmon_meta"]
    except Exception as e:
        raise _error(
            f"the metadata item jaxmon_meta of step {step} in {_short(root)} cannot be read "
            f"({one_line(e, 100)})"
        ) from e


def _unsealed_error(root: str, step: int) -> CheckpointError:
    """Why an unsealed step cannot be loaded: an older format, or an unfinished save."""
    where = f"step {step} of {_short(root)}"
    try:
        meta = _read_meta(root, step)
    except CheckpointError:
        meta = None
    # Format 1 wrote no digest record: say so rather than call it an interrupted save.
    if isinstance(meta, Mapping) and meta.get("format") == FORMAT:
        version = meta.get("format_version")
        if isinstance(version, int) and version < FORMAT_VERSION:
            return _older_format(where, version)
    err = _error(
        f"{where} has no {DIGESTS}: its save was interrupted, or another CheckpointManager "
        "wrote it (then call jaxmon.checkpoint.seal on it once saved)"
    )
    path = os.path.join(_step_dir(root, step), DIGESTS)
    err.__cause__ = FileNotFoundError(errno.ENOENT, "no digest record", path)
    return err


def save(
    directory: str | os.PathLike,
    est: Estimator,
    state: Any,
    *,
    fitted: Any = None,
    step: int = 0,
    metadata: Mapping[str, Any] | None = None,
    example: Any = None,
) -> str:
    """Saves ``state`` (and ``fitted``) of ``est`` as step ``step`` under ``directory``.

    Under ``jax.distributed`` every process makes the same call, and orbax writes the step
    with all of them: a state that every process holds whole (arrays on its own devices, the
    same values everywhere, e.g. the result of a multi-process
    :func:`jaxmon.query.fit_store`) is first made a replicated array of the whole job (so it
    is written once), a state sharded over a global mesh is written shard by shard. Process 0
    seals the step, and every process returns once it is sealed (or raises when the save
    failed anywhere).

    Args:
      directory: the checkpoint root (one subdirectory per step, orbax layout).
      est: the estimator; its spec is stored so :func:`load` needs no user code.
      state: the estimator's state.
      fitted: optional ``est.finalize(state)``.
      step: the step number (must not exist yet; an interrupted save of it is replaced).
      metadata: JSON-serialisable user metadata, returned as ``Checkpoint.metadata["user"]``.
      example: the ``init`` example (dict of taps for monitors); inferred when omitted for
        single-array estimators (a :class:`CheckpointError` asks for it otherwise).

    Returns:
      The path of the saved step.

    Raises:
      CheckpointError: the step exists already, ``directory`` is a file, the example cannot be
        inferred, ``state``/``fitted`` do not match the estimator and example, or the write
        fails.
    """
    root = os.fspath(directory)
    if os.path.exists(root) and not os.path.isdir(root):
        raise _error(
            f"cannot save a checkpoint to {_short(root)}: it exists and is not a directory"
        )
    args = save_args(est, state, fitted=fitted, example=example, step=step, metadata=metadata)
    step_dir = _step_dir(root, step)
    processes = jax.process_count()
    if processes > 1:
        # orbax writes arrays of a global mesh only: a state every process holds whole (e.g.
        # from a multi-process fit_store) becomes replicated over every device of the job,
        # and orbax writes it once.
        args = {
            k: ocp.args.StandardSave(_replicated_globally(v.item))
            if isinstance(v, ocp.args.StandardSave)
            else v
            for k, v in args.items()
        }
    err = None
    try:
        _save_step(root, step, step_dir, args)
    except CheckpointError as e:
        err = e
    if processes == 1:
        if err is not None:
            raise err
        return step_dir
    from jaxmon.io import all_gather_ints

    # Every process returns once the step is sealed, or raises when process 0 failed.
    failed = [i for i, (bad,) in enumerate(all_gather_ints([err is not None])) if bad]
    if err is not None:
        raise err
    if failed:
        raise _error(
            f"process {failed[0]} could not save step {step} to {_short(root)} (its error says why)"
        )
    return step_dir


def _save_step(root: str, step: int, step_dir: str, args: dict[str, Any]) -> None:
    """Writes one step (every process) and seals it (process 0)."""
    if os.path.isdir(step_dir):
        if _is_sealed(root, step):
            raise _error(f"step {step} already exists in {_short(root)}")
        foreign = [
            n
            for n in sorted(os.listdir(step_dir))
            if os.path.isdir(os.path.join(step_dir, n)) and n not in _ITEMS
        ]
        if foreign:
            raise _error(
                f"step {step} of {_short(root)} holds items not written by jaxmon.checkpoint.save; "
                "choose another step"
            )
        # An interrupted jaxmon save (finalized by orbax, never sealed): replace it.
        shutil.rmtree(step_dir)
    try:
        with _manager(root, create=True, alone=False) as mngr:
            mngr.save(step, args=ocp.args.Composite(**args))
            mngr.wait_until_finished()
    except Exception as e:
        raise _error(f"cannot save step {step} to {_short(root)} ({one_line(e, 120)})") from e
    if jax.process_index() == 0:
        seal(root, step)


def steps(directory: str | os.PathLike) -> list[int]:
    """The complete, sealed steps under ``directory`` (interrupted saves are not listed).

    Raises:
      CheckpointError: no directory there, or orbax cannot list it.
    """
    root = os.fspath(directory)
    return [s for s in _all_steps(root) if _is_sealed(root, s)]


def load(
    directory: str | os.PathLike,
    *,
    step: int | None = None,
    estimator: Estimator | None = None,
    example: Any = None,
    sharding: Any = None,
    fitted_sharding: Any = None,
    with_fitted: bool = True,
) -> Checkpoint:
    """Rebuilds estimator, state and fitted value from a checkpoint alone, verified.

    Nothing named by the checkpoint's files is imported or called: the estimator comes from
    jaxmon's registry by its spec name, and the restore target from ``jax.eval_shape`` of its
    ``init`` (and ``finalize``) on the saved example. Every file read is first checked
    against the step's digest record.

    Args:
      directory: the checkpoint root given to :func:`save`.
      step: which step; the latest verified one by default.
      estimator: when given, its spec must equal the stored one (else a clear error).
      example: when given, the stored state must match ``estimator.init(example)``.
      sharding: where to put the state's leaves: one ``jax.sharding.Sharding`` (e.g. a
        replicated ``NamedSharding`` on a mesh), a callable ``(ShapeDtypeStruct) -> Sharding``,
        or a pytree of shardings like the state. Default: the first local device.
      fitted_sharding: the same for the fitted value (defaults to ``sharding`` when that is one
        sharding or a callable).
      with_fitted: restore the fitted value if one was saved.

    Returns:
      A :class:`Checkpoint`.

    Raises:
      CheckpointError: no checkpoint there, no such (or an unsealed) step, a corrupted, missing,
        truncated or unexpected file, malformed metadata, an older or newer format, an
        estimator this jaxmon does not know, or a spec/shape mismatch. One sentence, naming
        the file where one is at fault, with the lower layer's error as ``__cause__``.
    """
    root = os.fspath(directory)
    all_steps = _all_steps(root)
    sealed = [s for s in all_steps if _is_sealed(root, s)]
    if step is None:
        if not sealed:
            if all_steps:
                raise _unsealed_error(root, all_steps[-1])
            raise _error(f"{_short(root)} holds no complete checkpoint")
        step = sealed[-1]
    elif step not in all_steps:
        raise _error(f"{_short(root)} has no step {step} (steps: {sealed})")
    elif step not in sealed:
        raise _unsealed_error(root, step)
    where = f"step {step} of {_short(root)}"

    items = ["jaxmon_meta", "jaxmon_state"]
    if with_fitted:
        items.append("jaxmon_fitted")
    _verify(root, step, items)
    meta = _check_meta(_read_meta(root, step), f"the jaxmon_meta item of {where}")
    _check_against(meta, estimator, example)
    est = estimator or _estimator(meta, where)
    has_fitted = with_fitted and meta["fitted_tree"] is not None
    saved_example = _example_from_json(meta["example"])
    abstract_state, abstract_fitted = _abstract_trees(
        est, saved_example, fitted=has_fitted, what=f"cannot restore {where}"
    )
    _check_record(meta["state_tree"], abstract_state, "state", est, where)
    targets = {"jaxmon_state": ocp.args.StandardRestore(_with_shardings(abstract_state, sharding))}
    if has_fitted:
        _check_record(meta["fitted_tree"], abstract_fitted, "fitted value", est, where)
        if fitted_sharding is None and not _is_tree_of_shardings(sharding):
            fitted_sharding = sharding
        targets["jaxmon_fitted"] = ocp.args.StandardRestore(
            _with_shardings(abstract_fitted, fitted_sharding)
        )
    # Into this process's own devices every process reads by itself; into a global mesh
    # every process takes part in one restore.
    alone = all(
        leaf.sharding.is_fully_addressable
        for target in targets.values()
        for leaf in jax.tree_util.tree_leaves(target.item)
    )
    try:
        with _manager(root, create=False, alone=alone) as mngr:
            out = mngr.restore(step, args=ocp.args.Composite(**targets))
    except Exception as e:
        raise _error(f"orbax cannot restore {where} ({one_line(e, 120)})") from e
    state = out["jaxmon_state"]
    fitted = out["jaxmon_fitted"] if has_fitted else None
    return Checkpoint(est, state, fitted, meta, int(step))


def merge(
    directories: Sequence[str | os.PathLike],
    *,
    step: int | None = None,
    finalize: bool = False,
) -> Checkpoint:
    """Merges the states saved by separate jobs (same estimator) into one.

    Args:
      directories: checkpoint roots, one per job.
      step: the step to read in each (latest by default).
      finalize: also compute ``fitted = est.finalize(merged_state)``.

    Returns:
      A :class:`Checkpoint` with the merged state; its metadata is the first job's with the
      summed row counts and ``merged_from`` listing the sources.

    Raises:
      CheckpointError: no directories, a checkpoint that cannot be loaded, or their
        estimators/state shapes differ.
    """
    if not directories:
        raise _error("merge needs at least one checkpoint directory")
    first = load(directories[0], step=step, with_fitted=False)
    state = first.state
    for d in directories[1:]:
        other = load(d, step=step, with_fitted=False)
        if other.metadata["spec"] != first.metadata["spec"]:
            raise _error(
                f"cannot merge {_short(d)}: its estimator spec differs from the first "
                f"checkpoint's ({json.dumps(other.metadata['spec'])[:60]} vs "
                f"{json.dumps(first.metadata['spec'])[:60]})"
            )
        diff = _first_difference(other.metadata["state_tree"], first.metadata["state_tree"])
        if diff:
            raise _error(f"cannot merge {_short(d)}: its state differs {diff}")
        state = first.estimator.merge(state, other.state)
    meta = dict(first.metadata)
    meta["rows"], meta["nonfinite"] = _counts_json(state)
    meta["merged_from"] = [os.fspath(d) for d in directories]
    fitted = first.estimator.finalize(state) if finalize else None
    if fitted is not None:
        meta["fitted_tree"] = _structure(fitted)
    return Checkpoint(first.estimator, state, fitted, meta, first.step)
