"""Checkpoints of estimator states and fitted values, through orbax (the only orbax importer).

A jaxmon checkpoint holds up to three orbax items per step:

* ``jaxmon_state``: the mergeable summary (a pytree of arrays), saved with ``StandardSave``;
* ``jaxmon_fitted`` (optional): the output of ``finalize``;
* ``jaxmon_meta``: a small JSON record: the estimator spec (``jaxmon.from_spec`` rebuilds the
  estimator with no user code), the jaxmon version, the ``init`` example shapes/dtypes, the
  structure (pytree node types, shapes, dtypes) of state and fitted, exact row counts, the
  creation step and time, and the user's own metadata.

The structure record lets :func:`load` build the abstract restore target (with shardings) from
the checkpoint alone. The items splice into a user's own ``ocp.CheckpointManager`` next to the
model and optimizer with :func:`save_args` / :func:`restore_args`.

Atomicity is orbax's: a step is written to ``<step>.orbax-checkpoint-tmp-*`` and renamed when
complete, so a process killed during a save leaves the previous steps intact (the temporary
directory is ignored on restore and removed by the next manager opened here).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxmon._base import Estimator, from_spec, num_nonfinite, num_rows

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load",
    "merge",
    "restore_args",
    "restored",
    "save",
    "save_args",
]

FORMAT = "jaxmon-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or does not match the estimator or example."""


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


# --------------------------------------------------------------------------- pytree structure


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _structure(tree: Any) -> Any:
    """JSON description of a pytree: node types, and shape/dtype of every leaf."""
    if tree is None:
        return {"t": "none"}
    if _is_namedtuple(tree):
        cls = type(tree)
        return {
            "t": "namedtuple",
            "cls": f"{cls.__module__}:{cls.__qualname__}",
            "fields": [[f, _structure(getattr(tree, f))] for f in cls._fields],
        }
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        # A dataclass registered as a pytree (jax.tree_util.register_dataclass): plain values
        # (str, int, float, bool) are its static metadata, stored as they are.
        cls = type(tree)
        fields = []
        for f in dataclasses.fields(tree):
            v = getattr(tree, f.name)
            static = isinstance(v, str | bool | int | float) and not hasattr(v, "shape")
            fields.append([f.name, {"t": "static", "value": v} if static else _structure(v)])
        return {"t": "dataclass", "cls": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(tree, Mapping):
        for k in tree:
            if not isinstance(k, str):
                raise CheckpointError(
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
    raise CheckpointError(
        f"cannot checkpoint a pytree node of type {type(tree).__name__}: jaxmon states must be "
        "built from NamedTuples, dicts, tuples, lists and arrays"
    )


def _build(struct: Any, leaf: Callable[[str, tuple[int, ...], Any], Any], path: str = "") -> Any:
    """Rebuilds a pytree from :func:`_structure` output, making each leaf with ``leaf``."""
    t = struct["t"]
    if t == "none":
        return None
    if t == "leaf":
        return leaf(path, tuple(struct["shape"]), jnp.dtype(struct["dtype"]))
    if t == "static":
        return struct["value"]
    if t in ("namedtuple", "dataclass"):
        mod, _, qual = struct["cls"].partition(":")
        try:
            cls: Any = importlib.import_module(mod)
            for part in qual.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError) as e:
            raise CheckpointError(
                f"the checkpoint's state type {struct['cls']} cannot be imported ({e}); was it "
                "written by another jaxmon version or a plugin that is not installed?"
            ) from None
        built = {f: _build(s, leaf, f"{path}.{f}") for f, s in struct["fields"]}
        return cls(**built)
    if t == "dict":
        return {k: _build(s, leaf, f"{path}[{k!r}]") for k, s in struct["items"]}
    items = [_build(s, leaf, f"{path}[{i}]") for i, s in enumerate(struct["items"])]
    return tuple(items) if t == "tuple" else items


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two structure records differ, in words, or None when they are equal."""
    if a.get("t") != b.get("t"):
        return f"at {path or 'the root'}: {a.get('t')} vs {b.get('t')}"
    t = a["t"]
    if t == "leaf":
        if a["shape"] != b["shape"] or a["dtype"] != b["dtype"]:
            return (
                f"at {path or 'the root'}: {a['dtype']}{a['shape']} in the checkpoint vs "
                f"{b['dtype']}{b['shape']} expected"
            )
        return None
    if t == "none":
        return None
    if t == "static":
        if a["value"] != b["value"]:
            return f"at {path or 'the root'}: {a['value']!r} vs {b['value']!r}"
        return None
    key = "fields" if t in ("namedtuple", "dataclass") else "items"
    ia, ib = a[key], b[key]
    if t in ("namedtuple", "dataclass", "dict"):
        ka, kb = [k for k, _ in ia], [k for k, _ in ib]
        if ka != kb:
            missing = sorted(set(kb) - set(ka))
            extra = sorted(set(ka) - set(kb))
            return (
                f"at {path or 'the root'}: keys differ (missing in the checkpoint: {missing}, "
                f"unexpected: {extra})"
            )
        for (k, sa), (_, sb) in zip(ia, ib, strict=True):
            sub = f"{path}[{k!r}]" if t == "dict" else f"{path}.{k}"
            d = _first_difference(sa, sb, sub)
            if d:
                return d
        return None
    if len(ia) != len(ib):
        return f"at {path or 'the root'}: {len(ia)} items in the checkpoint vs {len(ib)} expected"
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
    return {"shape": list(example.shape), "dtype": _dtype_name(example.dtype)}


def _example_from_json(ex: Any) -> Any:
    if "dict" in ex:
        return {k: _example_from_json(v) for k, v in ex["dict"].items()}
    if "tuple" in ex:
        return tuple(_example_from_json(v) for v in ex["tuple"])
    return jax.ShapeDtypeStruct(tuple(ex["shape"]), jnp.dtype(ex["dtype"]))


def _infer_example(est: Estimator, state: Any) -> Any:
    """Guesses a single-array ``init`` example that reproduces ``state``'s structure.

    Tries ``[d]`` float32 examples for every trailing size in the state. Returns None for
    estimators whose example is a dict of taps (monitors: pass ``example=``) or when nothing
    matches; the checkpoint then still loads, but cannot check the example.
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
        except Exception:
            continue
        if _first_difference(want, got) is None:
            return ex
    return None


# --------------------------------------------------------------------------- shardings


def _sharding_fn(sharding: Any, struct: Any) -> Callable[[str, tuple, Any], Any]:
    """Turns the ``sharding=`` argument into ``leaf(path, shape, dtype) -> ShapeDtypeStruct``."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        one = sharding or default
        return lambda path, shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)
    if callable(sharding):
        return lambda path, shape, dtype: jax.ShapeDtypeStruct(
            shape, dtype, sharding=sharding(jax.ShapeDtypeStruct(shape, dtype)) or default
        )
    # A pytree of shardings with the structure of the state: pair it leaf by leaf.
    skeleton = _build(struct, lambda p, s, d: p)
    paths = jax.tree_util.tree_leaves(skeleton)
    leaves = jax.tree_util.tree_leaves(
        sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    if len(leaves) != len(paths):
        raise CheckpointError(
            f"sharding= has {len(leaves)} leaves but the checkpointed tree has {len(paths)}; "
            "pass one jax.sharding.Sharding, a callable, or a pytree matching the state"
        )
    table = dict(zip(paths, leaves, strict=True))
    return lambda path, shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=table[path])


def _abstract(struct: Any, sharding: Any) -> Any:
    return _build(struct, _sharding_fn(sharding, struct))


# --------------------------------------------------------------------------- metadata


def _counts_json(state: Any) -> tuple[Any, Any]:
    try:
        return num_rows(state), num_nonfinite(state)
    except TypeError:  # a state without a row counter (a plain pytree): nothing to report
        return None, None


def _metadata(
    est: Estimator, state: Any, fitted: Any, example: Any, step: int, user: Any
) -> dict[str, Any]:
    import jaxmon

    if example is None:
        example = _infer_example(est, state)
    elif _first_difference(_structure(state), _structure(jax.eval_shape(est.init, example))):
        diff = _first_difference(_structure(state), _structure(jax.eval_shape(est.init, example)))
        raise CheckpointError(f"the state does not match est.init(example) {diff}")
    rows, nonfinite = _counts_json(state)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jaxmon_version": jaxmon.__version__,
        "spec": est.spec.to_dict(),
        "example": None if example is None else _example_to_json(example),
        "state_tree": _structure(state),
        "fitted_tree": None if fitted is None else _structure(fitted),
        "rows": rows,
        "nonfinite": nonfinite,
        "step": int(step),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "user": {} if user is None else dict(user),
    }


def _check_meta(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} holds no jaxmon metadata item; is it a jaxmon checkpoint?")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} was written by a newer jaxmon (format {meta['format_version']}); upgrade"
        )
    return dict(meta)


def _check_against(meta: Mapping[str, Any], est: Estimator | None, example: Any) -> None:
    """Raises a clear :class:`CheckpointError` when ``est``/``example`` do not match ``meta``."""
    if est is not None and est.spec.to_dict() != meta["spec"]:
        raise CheckpointError(
            f"the checkpoint holds a {meta['spec']['name']} estimator with spec {meta['spec']}, "
            f"which differs from the given estimator's spec {est.spec.to_dict()}"
        )
    if example is not None:
        e = est or from_spec(meta["spec"])
        diff = _first_difference(meta["state_tree"], _structure(jax.eval_shape(e.init, example)))
        if diff:
            raise CheckpointError(
                f"the checkpointed state does not match the given example's shapes {diff}"
            )


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

    Example:
      >>> mngr.save(step, args=ocp.args.Composite(
      ...     params=ocp.args.StandardSave(params),
      ...     **jaxmon.checkpoint.save_args(monitor, mon_state, example=taps_example)))
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
    abstract_state = jax.eval_shape(est.init, example)
    out = {
        f"{prefix}_state": ocp.args.StandardRestore(
            _abstract(_structure(abstract_state), sharding)
        ),
        f"{prefix}_meta": ocp.args.JsonRestore(),
    }
    if fitted:
        if fitted_sharding is None and (
            sharding is None or isinstance(sharding, jax.sharding.Sharding) or callable(sharding)
        ):
            fitted_sharding = sharding
        abstract_fitted = jax.eval_shape(est.finalize, abstract_state)
        out[f"{prefix}_fitted"] = ocp.args.StandardRestore(
            _abstract(_structure(abstract_fitted), fitted_sharding)
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

    Raises:
      CheckpointError: the items are missing or do not match ``est`` / ``example``.
    """
    try:
        meta = items[f"{prefix}_meta"]
        state = items[f"{prefix}_state"]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"the restored composite holds no {prefix}_state/{prefix}_meta items"
        ) from None
    meta = _check_meta(meta, "the restored composite")
    _check_against(meta, est, example)
    fitted = items.get(f"{prefix}_fitted") if hasattr(items, "get") else None
    return Checkpoint(
        est or from_spec(meta["spec"]),
        state,
        fitted,
        meta,
        int(meta["step"] if step is None else step),
    )


# --------------------------------------------------------------------------- directory API


def _manager(directory: str | os.PathLike, *, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        create=create,
        # Leftovers of a save killed mid-way are removed when a manager opens the directory.
        cleanup_tmp_directories=create,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


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

    Args:
      directory: the checkpoint root (one subdirectory per step, orbax layout).
      est: the estimator; its spec is stored so :func:`load` needs no user code.
      state: the estimator's state.
      fitted: optional ``est.finalize(state)``.
      step: the step number (must not exist yet).
      metadata: JSON-serialisable user metadata, returned as ``Checkpoint.metadata["user"]``.
      example: the ``init`` example (dict of taps for monitors); inferred when omitted for
        single-array estimators.

    Returns:
      The path of the saved step.

    Raises:
      CheckpointError: the step exists already, or ``state`` does not match ``example``.
    """
    args = save_args(est, state, fitted=fitted, example=example, step=step, metadata=metadata)
    with _manager(directory, create=True) as mngr:
        if step in mngr.all_steps():
            raise CheckpointError(f"step {step} already exists in {os.fspath(directory)}")
        mngr.save(step, args=ocp.args.Composite(**args))
        mngr.wait_until_finished()
    return os.path.join(os.fspath(directory), str(step))


def _open_existing(directory: str | os.PathLike) -> ocp.CheckpointManager:
    path = os.fspath(directory)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint directory at {path}")
    return _manager(path, create=False)


def steps(directory: str | os.PathLike) -> list[int]:
    """The complete steps saved under ``directory`` (interrupted saves are not listed)."""
    with _open_existing(directory) as mngr:
        return sorted(mngr.all_steps())


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
    """Rebuilds estimator, state and fitted value from a checkpoint alone.

    Args:
      directory: the checkpoint root given to :func:`save`.
      step: which step; the latest complete one by default.
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
      CheckpointError: no checkpoint there, no such step, or a spec/shape mismatch.
    """
    where = os.fspath(directory)
    with _open_existing(directory) as mngr:
        all_steps = sorted(mngr.all_steps())
        if not all_steps:
            raise CheckpointError(f"{where} holds no complete checkpoint")
        if step is None:
            step = all_steps[-1]
        elif step not in all_steps:
            raise CheckpointError(f"{where} has no step {step} (steps: {all_steps})")
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(jaxmon_meta=ocp.args.JsonRestore()))[
                "jaxmon_meta"
            ]
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"{where} step {step} holds no jaxmon metadata ({e})") from None
        meta = _check_meta(meta, f"{where} step {step}")
        _check_against(meta, estimator, example)
        est = estimator or from_spec(meta["spec"])
        items = {"jaxmon_state": ocp.args.StandardRestore(_abstract(meta["state_tree"], sharding))}
        if with_fitted and meta.get("fitted_tree") is not None:
            if fitted_sharding is None and not _is_tree_of_shardings(sharding):
                fitted_sharding = sharding
            items["jaxmon_fitted"] = ocp.args.StandardRestore(
                _abstract(meta["fitted_tree"], fitted_sharding)
            )
        out = mngr.restore(step, args=ocp.args.Composite(**items))
    state = out["jaxmon_state"]
    fitted = out["jaxmon_fitted"] if "jaxmon_fitted" in items else None
    return Checkpoint(est, state, fitted, meta, int(step))


def _is_tree_of_shardings(sharding: Any) -> bool:
    return not (
        sharding is None or isinstance(sharding, jax.sharding.Sharding) or callable(sharding)
    )


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
      CheckpointError: no directories, or their estimators/state shapes differ.
    """
    if not directories:
        raise CheckpointError("merge needs at least one checkpoint directory")
    first = load(directories[0], step=step, with_fitted=False)
    state = first.state
    for d in directories[1:]:
        other = load(d, step=step, with_fitted=False)
        if other.metadata["spec"] != first.metadata["spec"]:
            raise CheckpointError(
                f"cannot merge {os.fspath(d)}: its estimator spec {other.metadata['spec']} "
                f"differs from {first.metadata['spec']}"
            )
        diff = _first_difference(first.metadata["state_tree"], other.metadata["state_tree"])
        if diff:
            raise CheckpointError(f"cannot merge {os.fspath(d)}: its state differs {diff}")
        state = first.estimator.merge(state, other.state)
    meta = dict(first.metadata)
    meta["rows"], meta["nonfinite"] = _counts_json(state)
    meta["merged_from"] = [os.fspath(d) for d in directories]
    fitted = first.estimator.finalize(state) if finalize else None
    if fitted is not None:
        meta["fitted_tree"] = _structure(fitted)
    return Checkpoint(first.estimator, state, fitted, meta, first.step)
