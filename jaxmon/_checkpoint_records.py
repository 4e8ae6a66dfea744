"""What a checkpoint records about its pytrees, as JSON, and how a saved record is checked.

Private to :mod:`jaxmon.checkpoint`. Three records live in a step's ``jaxmon_meta`` item:

* the *structure* of the state and the fitted value (:func:`describe`): node kinds, type names,
  field names, static fields, and every leaf's shape and dtype. :func:`describe` is the one
  function here that walks a pytree node by node: ``jax.tree_util`` flattens leaves, but the
  record also keeps what flattening drops (``None`` and empty nodes, type names, static
  fields, dict order), and changing it would change the on-disk format;
* the ``init`` *example* (:func:`example_record`, :func:`example_from_record`): a dict/tuple of
  shapes and dtypes, from which ``load`` rebuilds the restore target;
* the *metadata* record around them (:func:`metadata`, :func:`check_meta`).

Records read from a file are only ever compared with records this jaxmon builds
(:func:`first_difference`); nothing in them is imported or called.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmon._base import Estimator, from_spec, num_nonfinite, num_rows
from jaxmon.errors import CheckpointError, JaxmonError, one_line

FORMAT = "jaxmon-checkpoint"
FORMAT_VERSION = 2
_MAX_MESSAGE = 300


def item_names(prefix: str = "jaxmon") -> tuple[str, str, str]:
    """The orbax items of one jaxmon checkpoint, ``(state, fitted, meta)``: ``save_args``
    names them by its ``prefix``; ``seal``, ``load`` and ``restored`` take the same one."""
    return f"{prefix}_state", f"{prefix}_fitted", f"{prefix}_meta"


# --------------------------------------------------------------------------- errors


def short(path: str | os.PathLike, limit: int = 110) -> str:
    """A path clipped from the left, so that messages stay one short sentence."""
    p = os.fspath(path)
    return p if len(p) <= limit else "..." + p[-(limit - 3) :]


def error(sentence: str) -> CheckpointError:
    """A :class:`CheckpointError` of one line of at most 300 characters, ending with a period."""
    text = " ".join(sentence.split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 4].rstrip() + "..."
    if not text.endswith((".", "?", "!")):
        text += "."
    return CheckpointError(text)


# --------------------------------------------------------------------------- structure record


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def describe(tree: Any) -> Any:
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
            "fields": [[f, describe(getattr(tree, f))] for f in cls._fields],
        }
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        # A dataclass registered as a pytree (jax.tree_util.register_dataclass): plain values
        # (str, int, float, bool) are its static metadata, stored as they are.
        fields = []
        for f in dataclasses.fields(tree):
            v = getattr(tree, f.name)
            static = isinstance(v, str | bool | int | float) and not hasattr(v, "shape")
            fields.append([f.name, {"t": "static", "value": v} if static else describe(v)])
        return {"t": "dataclass", "type": type(tree).__name__, "fields": fields}
    if isinstance(tree, Mapping):
        for k in tree:
            if not isinstance(k, str):
                raise error(
                    f"state dicts must have string keys to be checkpointed (orbax), got {k!r}"
                )
        return {"t": "dict", "items": [[k, describe(v)] for k, v in tree.items()]}
    if isinstance(tree, tuple | list):
        return {"t": type(tree).__name__, "items": [describe(v) for v in tree]}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return {"t": "leaf", "shape": list(tree.shape), "dtype": _dtype_name(tree.dtype)}
    if isinstance(tree, int | float | bool | np.generic):
        a = np.asarray(tree)
        return {"t": "leaf", "shape": [], "dtype": _dtype_name(a.dtype)}
    raise error(
        f"cannot checkpoint a pytree node of type {type(tree).__name__}: jaxmon states must be "
        "built from NamedTuples, dicts, tuples, lists and arrays"
    )


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
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
    if t in ("leaf", "none", "static"):
        return _leaf_difference(a, b, where)
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
        subs = [f"{path}[{k!r}]" if t == "dict" else f"{path}.{k}" for k in kb]
        pairs = [(sa, sb) for (_, sa), (_, sb) in zip(ia, ib, strict=True)]
    else:
        if len(ia) != len(ib):
            return f"at {where}: {len(ia)} items in the checkpoint vs {len(ib)} expected"
        subs = [f"{path}[{i}]" for i in range(len(ib))]
        pairs = list(zip(ia, ib, strict=True))
    for sub, (sa, sb) in zip(subs, pairs, strict=True):
        d = first_difference(sa, sb, sub)
        if d:
            return d
    return None


def _leaf_difference(a: Mapping[str, Any], b: Mapping[str, Any], where: str) -> str | None:
    """How two childless records (a leaf, ``None``, a static field) of one kind differ."""
    t = a["t"]
    if t == "leaf" and (a.get("shape") != b["shape"] or a.get("dtype") != b["dtype"]):
        return (
            f"at {where}: {a.get('dtype')}{a.get('shape')} in the checkpoint vs "
            f"{b['dtype']}{b['shape']} expected"
        )
    if t == "static" and a.get("value") != b["value"]:
        return f"at {where}: {a.get('value')!r} in the checkpoint vs {b['value']!r} expected"
    return None


def difference_from(record: Any, tree: Any) -> str | None:
    """Where a (saved) structure record differs from that of ``tree``, or None."""
    return first_difference(record, describe(tree))


# --------------------------------------------------------------------------- example record


def example_record(example: Any) -> Any:
    """The ``init`` example (array, ``ShapeDtypeStruct``, or dicts/tuples of them) as JSON."""
    if isinstance(example, Mapping):
        return {"dict": {str(k): example_record(v) for k, v in example.items()}}
    if isinstance(example, tuple | list):
        return {"tuple": [example_record(v) for v in example]}
    return {"shape": [int(s) for s in example.shape], "dtype": _dtype_name(example.dtype)}


def example_from_record(ex: Any) -> Any:
    """The ``init`` example from its JSON record; only numeric dtypes and integer shapes."""
    if isinstance(ex, Mapping) and isinstance(ex.get("dict"), Mapping):
        return {str(k): example_from_record(v) for k, v in ex["dict"].items()}
    if isinstance(ex, Mapping) and isinstance(ex.get("tuple"), list):
        return tuple(example_from_record(v) for v in ex["tuple"])
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
        raise error(f"the checkpoint's init example record {str(ex)[:80]} is malformed")
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _infer_example(est: Estimator, state: Any) -> Any:
    """Guesses a single-array ``init`` example that reproduces ``state``'s structure.

    Tries ``[d]`` float32 examples for every trailing size in the state. Returns None for
    estimators whose example is a dict of taps (monitors: pass ``example=``) or when nothing
    matches.
    """
    want = describe(state)
    sizes = []
    for leaf in jax.tree_util.tree_leaves(state):
        for s in getattr(leaf, "shape", ())[-2:]:
            if s not in sizes:
                sizes.append(int(s))
    for d in sizes:
        ex = jax.ShapeDtypeStruct((d,), jnp.float32)
        try:
            abstract = jax.eval_shape(est.init, ex)
        except Exception:  # any refusal of this guess: try the next size
            continue
        if difference_from(want, abstract) is None:
            return ex
    return None


def abstract_trees(est: Estimator, example: Any, *, fitted: bool, what: str) -> tuple[Any, Any]:
    """``(eval_shape(init, example), eval_shape(finalize, that) or None)``, errors as sentences."""
    name = est.spec.name
    try:
        abstract_state = jax.eval_shape(est.init, example)
    except Exception as e:
        raise error(
            f"{what}: the {name} estimator's init refuses the example ({one_line(e, 120)})"
        ) from e
    if not fitted:
        return abstract_state, None
    try:
        abstract_fitted = jax.eval_shape(est.finalize, abstract_state)
    except Exception as e:
        raise error(
            f"{what}: the {name} estimator's finalize cannot be traced on its state "
            f"({one_line(e, 120)})"
        ) from e
    return abstract_state, abstract_fitted


# --------------------------------------------------------------------------- metadata record


def counts(state: Any) -> tuple[Any, Any]:
    """``(rows, nonfinite)`` of a state for the record, or ``(None, None)`` without counters."""
    try:
        return num_rows(state), num_nonfinite(state)
    except (TypeError, JaxmonError):  # a state without a row counter: nothing to report
        return None, None


def metadata(
    est: Estimator, state: Any, fitted: Any, example: Any, step: int, user: Any
) -> dict[str, Any]:
    """The ``jaxmon_meta`` record; refuses, at save time, what ``load`` could not restore."""
    import jaxmon

    if example is None:
        example = _infer_example(est, state)
        if example is None:
            raise error(
                f"cannot infer the init example of this {est.spec.name} state; pass example= "
                "(what est.init was given: an array, ShapeDtypeStruct or dict of taps) so the "
                "checkpoint can be restored"
            )
    example = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example)
    abstract_state, abstract_fitted = abstract_trees(
        est, example, fitted=fitted is not None, what="cannot save"
    )
    state_tree = describe(state)
    diff = difference_from(state_tree, abstract_state)
    if diff:
        raise error(f"the state does not match est.init(example) {diff}")
    fitted_tree = None
    if fitted is not None:
        fitted_tree = describe(fitted)
        diff = difference_from(fitted_tree, abstract_fitted)
        if diff:
            raise error(f"the fitted value does not match est.finalize(state) {diff}")
    if user is not None and not isinstance(user, Mapping):
        raise error(f"metadata= must be a dict of JSON values, got {type(user).__name__}")
    rows, nonfinite = counts(state)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jaxmon_version": jaxmon.__version__,
        "spec": est.spec.to_dict(),
        "example": example_record(example),
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
        raise error(f"metadata= must be JSON-serialisable ({one_line(e, 100)})") from e
    return meta


def older_format(where: str, version: int) -> CheckpointError:
    return error(
        f"{where} was written by an older jaxmon checkpoint format (version {version}) that is "
        "no longer read, as it named Python classes to import; re-save it with this jaxmon"
    )


def check_meta(meta: Any, where: str, *, oldest: int = FORMAT_VERSION) -> dict[str, Any]:
    """The metadata record as a dict, or a :class:`CheckpointError` saying what is wrong."""
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise error(f"{where} holds no jaxmon metadata record; is it a jaxmon checkpoint?")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise error(f"{where} has a malformed format version {str(version)[:20]!r}")
    if version > FORMAT_VERSION:
        raise error(
            f"{where} was written by a newer jaxmon (checkpoint format {version}, this one reads "
            f"{FORMAT_VERSION}); upgrade jaxmon"
        )
    if version < oldest:
        raise older_format(where, version)
    for key in ("spec", "example", "state_tree", "fitted_tree", "step"):
        if key not in meta:
            raise error(f"{where} has a malformed metadata record (no {key!r})")
    if not isinstance(meta["spec"], Mapping) or not isinstance(meta["step"], int):
        raise error(f"{where} has a malformed metadata record (spec or step)")
    return dict(meta)


def check_record(
    record: Any, abstract: Any, what: str, est: Estimator, *, item: str, where: str
) -> None:
    """Refuses a saved structure record that differs from the target this jaxmon builds."""
    expected = describe(abstract)
    diff = first_difference(record, expected)
    if diff:
        # The whole of both records goes into the chained cause, for whoever debugs it.
        cause = ValueError(
            f"saved {json.dumps(record)[:4000]} vs expected {json.dumps(expected)[:4000]}"
        )
        raise error(
            f"the {what} recorded in {item} of {where} does not match this jaxmon's "
            f"{est.spec.name} {diff}"
        ) from cause


def estimator_of(meta: Mapping[str, Any], where: str) -> Estimator:
    """The estimator named by the record's spec, from jaxmon's registry only."""
    try:
        return from_spec(meta["spec"])
    except Exception as e:
        raise error(
            f"{where} names an estimator this jaxmon cannot build ({one_line(e, 150)})"
        ) from e


def check_against(meta: Mapping[str, Any], est: Estimator | None, example: Any) -> None:
    """Raises a clear :class:`CheckpointError` when ``est``/``example`` do not match ``meta``."""
    if est is not None and est.spec.to_dict() != meta["spec"]:
        raise error(
            f"the checkpoint holds a {meta['spec'].get('name')} estimator whose spec differs from "
            f"the given estimator's spec (saved {json.dumps(meta['spec'])[:80]}, given "
            f"{est.spec.to_json()[:80]})"
        )
    if example is not None:
        e = est or estimator_of(meta, "the checkpoint")
        abstract, _ = abstract_trees(e, example, fitted=False, what="cannot check the example")
        diff = difference_from(meta["state_tree"], abstract)
        if diff:
            raise error(f"the checkpointed state does not match the given example's shapes {diff}")
