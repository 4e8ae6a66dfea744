"""The core contract: a mergeable estimator as a NamedTuple of pure functions.

An :class:`Estimator` follows the optax pattern. Its state is a pytree summary of every row seen so
far and obeys two laws, checked for every estimator by ``tests/laws.py``:

* ``merge(init(example), s) == s`` (``init`` is the identity), and ``merge`` is associative and
  commutative (exactly for moments and reservoirs, within a documented bound for sketches);
* ``update(s, concat(a, b)) ≈ merge(update(s, a), update(init, b))``: streaming in batches, on
  separate devices or hosts, then merging, equals one pass over all the rows.

Everything that cannot be merged (eigendecompositions, Cholesky factors, EM) happens once in
``finalize``. ``score`` maps rows to anomaly scores where *higher means more anomalous*.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxmon.errors import ConfigError, NotFittedError, ShapeError

State = Any  # a pytree
Fitted = Any  # a pytree
Array = jax.Array


class InitFn(Protocol):
    def __call__(self, example: jax.ShapeDtypeStruct | Array) -> State: ...


class UpdateFn(Protocol):
    def __call__(
        self, state: State, x: Array, *, mask: Array | None = None, weights: Array | None = None
    ) -> State: ...


class LabelledUpdateFn(Protocol):
    """The update of an estimator that learns from labels (``spec.supervised``)."""

    def __call__(
        self,
        state: State,
        x: Array,
        *,
        mask: Array | None = None,
        weights: Array | None = None,
        labels: Array | None = None,
    ) -> State: ...


class MergeFn(Protocol):
    def __call__(self, a: State, b: State) -> State: ...


class FinalizeFn(Protocol):
    def __call__(self, state: State) -> Fitted: ...


class ScoreFn(Protocol):
    def __call__(self, fitted: Fitted, x: Array, *, mask: Array | None = None) -> Array: ...


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """Frozen, JSON-serialisable description of an estimator: the single source of truth.

    Attributes:
      name: registry key of the factory that built the estimator (``"gaussian"``).
      params: keyword arguments of that factory; JSON values only. Nested estimators (in
        combinators) are stored as their own spec dicts.
      mergeable: False for estimators that learn by gradient, whose merge is an approximation
        (averaged parameters) rather than an exact summary.
      supervised: True for estimators whose ``update`` takes ``labels=`` (probes, and
        combinators holding one): 0 = trusted, 1 = flagged, -1 = unknown. Combinators give
        labels to supervised estimators and turn them into a mask of trusted rows for the
        others (:func:`label_kwargs`), so flagged rows never shape what "normal" means.
    """

    name: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    mergeable: bool = True
    supervised: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-compatible dicts (``supervised`` only when True)."""
        out = {"name": self.name, "params": _jsonable(self.params), "mergeable": self.mergeable}
        if self.supervised:
            out["supervised"] = True
        return out

    def to_json(self) -> str:
        """The spec as a canonical JSON string; ``jaxmon.from_spec`` rebuilds the estimator."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EstimatorSpec) and self.to_json() == other.to_json()


def _jsonable(value: Any) -> Any:
    if isinstance(value, EstimatorSpec):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(
        f"estimator hyperparameter {value!r} of type {type(value).__name__} is not JSON-"
        "serialisable; specs may hold only None, bool, int, float, str, lists and dicts"
    )


class Estimator(NamedTuple):
    """A mergeable streaming estimator: pure functions over pytree states.

    Attributes:
      init: ``(example: ShapeDtypeStruct | array [..., d]) -> State``, the empty summary.
      update: ``(state, x[..., d], *, mask=None, weights=None) -> State``. Leading axes are
        flattened into rows; rows where ``mask`` is False count as absent; rows holding any
        NaN/inf are excluded and counted (``jaxmon.num_nonfinite``). Estimators that learn
        from labels (``spec.supervised``) also take ``labels=`` ``[...]`` int: 0 = trusted,
        1 = flagged, -1 = unknown (:class:`LabelledUpdateFn`).
      merge: ``(state, state) -> State``: associative, commutative, ``init`` is its identity.
      finalize: ``(state) -> Fitted``: the non-mergeable work, done once.
      score: ``(fitted, x[..., d], *, mask=None) -> [...]``: one score per row, higher = more
        anomalous; masked rows score 0.
      spec: the hyperparameters; ``jaxmon.from_spec(spec.to_json())`` rebuilds this estimator.
    """

    init: InitFn
    update: UpdateFn
    merge: MergeFn
    finalize: FinalizeFn
    score: ScoreFn
    spec: EstimatorSpec


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Estimator]] = {}
# Estimators registered by modules that ``import jaxmon`` does not load (they pull in heavier
# dependencies): from_spec imports them on demand, so a checkpoint needs no user code.
_LAZY_PROVIDERS = {"shard_local": "jaxmon.sharding", "shard_wide": "jaxmon.sharding"}


def register(name: str, builder: Callable[..., Estimator] | None = None):
    """Registers ``builder(**params) -> Estimator`` under ``name`` (usable as a decorator).

    Builders of combinators receive nested estimators as spec dicts and call ``from_spec``.
    """

    def deco(fn: Callable[..., Estimator]) -> Callable[..., Estimator]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ConfigError(f"an estimator named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco(builder) if builder is not None else deco


def from_spec(spec: str | Mapping[str, Any] | EstimatorSpec) -> Estimator:
    """Rebuilds an estimator from its spec (JSON string, dict or ``EstimatorSpec``).

    Only names in jaxmon's registry are built (never a module path or callable named by the
    spec), with the spec's JSON parameters as keyword arguments. Equal specs give back the same
    :class:`Estimator` object, so its jitted functions compile once per process (see
    :func:`_built`).

    Raises:
      ConfigError: the spec is not valid JSON or not a spec dict, names no registered
        estimator, or its parameters do not fit the estimator.
    """
    if isinstance(spec, EstimatorSpec):
        spec = spec.to_dict()
    elif isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f'an estimator spec must be JSON like \'{{"name": "gaussian"}}\' (from '
                f"est.spec.to_json()), got {spec[:60]!r}; to build one by name use "
                "jaxmon.from_spec({'name': ...})"
            ) from e
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ConfigError(
            f"an estimator spec is a dict with a 'name' and 'params', got {str(spec)[:80]}"
        )
    name = spec["name"]
    params = spec.get("params", {})
    if not isinstance(params, Mapping):
        raise ConfigError(f"the params of estimator spec {name!r} must be a dict, got {params!r}")
    try:
        key = json.dumps(params, sort_keys=True)
    except (TypeError, ValueError):  # not JSON (an Estimator object as a param): build afresh
        return _build(name, params)
    if json.loads(key) != params:  # tuples (JSON makes lists): the factory gets them as given
        return _build(name, params)
    return _built(name, key)


# The one estimator cache of jaxmon (spec -> Estimator). An estimator is a pure function of its
# spec, so equal specs may share one object and its jitted functions. Combinators rely on it:
# a fitted value that carries only its spec (``CalibratedFitted``) finds its inner estimator
# here, also in a fresh process after ``jaxmon.load``, with no module-level registry of the
# objects a user built.
@functools.lru_cache(maxsize=256)
def _built(name: str, params_json: str) -> Estimator:
    """``from_spec`` of the spec ``{name, params}`` (params as canonical JSON), cached."""
    return _build(name, json.loads(params_json))


def _build(name: str, params: Mapping[str, Any]) -> Estimator:
    if name not in _REGISTRY and name in _LAZY_PROVIDERS:
        importlib.import_module(_LAZY_PROVIDERS[name])
    if name not in _REGISTRY:
        raise ConfigError(
            f"no estimator named {name!r} is registered (known: {sorted(_REGISTRY)}); "
            "was the spec written by a newer jaxmon, or is a plugin module not imported?"
        )
    try:
        return _REGISTRY[name](**{str(k): v for k, v in params.items()})
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"estimator spec {name!r} has parameters its factory refuses ({_gist(e)})"
        ) from e


def _gist(e: BaseException) -> str:
    from jaxmon.errors import one_line

    return one_line(e)


def registered() -> list[str]:
    """Names of every registered estimator."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- row counts


class Counts(NamedTuple):
    """Exact row counters, carried by every state.

    float32 is exact only to 2^24 and int32 overflows at 2^31, so each count is two uint32
    words ``[lo, hi]`` with carry: exact to 2^64 rows with x64 off.
    """

    rows: Array  # shape=(2,), dtype=uint32: rows folded into the state
    nonfinite: Array  # shape=(2,), dtype=uint32: valid-mask rows excluded for NaN/inf


def counts_zero() -> Counts:
    """Empty counters."""
    # Two distinct buffers: a state whose leaves alias one buffer cannot be donated.
    return Counts(jnp.zeros((2,), jnp.uint32), jnp.zeros((2,), jnp.uint32))


def _add_words(a: Array, b: Array) -> Array:
    lo = a[0] + b[0]
    carry = (lo < a[0]).astype(jnp.uint32)
    return jnp.stack([lo, a[1] + b[1] + carry])


def counts_add(c: Counts, rows: Array, nonfinite: Array) -> Counts:
    """Adds per-batch counts (non-negative int32 scalars) to ``c``."""
    r = jnp.stack([rows.astype(jnp.uint32), jnp.uint32(0)])
    n = jnp.stack([nonfinite.astype(jnp.uint32), jnp.uint32(0)])
    return Counts(_add_words(c.rows, r), _add_words(c.nonfinite, n))


def counts_merge(a: Counts, b: Counts) -> Counts:
    """Exact sum of two counters (associative, commutative)."""
    return Counts(_add_words(a.rows, b.rows), _add_words(a.nonfinite, b.nonfinite))


def _words_to_int(words: Any) -> int:
    w = np.asarray(jax.device_get(words)).astype(np.uint64)
    # Stacked (vmapped) counters: sum the per-layer counts exactly in Python ints.
    w = w.reshape(-1, 2)
    return sum(int(lo) + (int(hi) << 32) for lo, hi in w)


def _find_counts(state: State) -> list[tuple[str, Counts]]:
    found = []
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, Counts))
    for path, leaf in leaves:
        if isinstance(leaf, Counts):
            found.append((jax.tree_util.keystr(path), leaf))
    return found


def _count(state: State, field: str) -> int | dict[str, int]:
    found = _find_counts(state)
    if not found:
        raise ConfigError(f"{type(state).__name__} holds no jaxmon row counter")
    if len(found) == 1:
        return _words_to_int(getattr(found[0][1], field))
    return {path: _words_to_int(getattr(c, field)) for path, c in found}


def num_rows(state: State) -> int | dict[str, int]:
    """Exact number of rows folded into ``state`` (beyond 2^32 too).

    Returns an ``int`` for a single estimator's state; for a composite state holding several
    counters (a monitor over taps), a dict from the counter's pytree path to its count.
    """
    return _count(state, "rows")


def num_nonfinite(state: State) -> int | dict[str, int]:
    """Exact number of rows that were excluded from ``state`` because they held NaN or inf."""
    return _count(state, "nonfinite")


# --------------------------------------------------------------------------- input checks

_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def feature_dim(example: jax.ShapeDtypeStruct | Array, *, name: str) -> int:
    """The trailing feature size of an ``init`` example, checked."""
    shape = getattr(example, "shape", None)
    if shape is None or len(shape) < 1:
        raise ShapeError(
            f"{name}.init expects an example array or jax.ShapeDtypeStruct of shape [..., d], "
            f"got {example!r}"
        )
    return int(shape[-1])


def check_rows(
    x: Array,
    d: int,
    *,
    name: str,
    mask: Array | None = None,
    weights: Array | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Validates ``x[..., d]`` (and mask/weights ``[...]``) and flattens them to rows.

    Shapes are static under ``jit``, so this raises at trace time, at the Python boundary.

    Raises:
      ShapeError: naming the estimator, the expected shape and dtype, and what was given.
    """
    x = jnp.asarray(x) if not isinstance(x, jax.Array | jax.core.Tracer) else x
    if x.ndim < 1 or x.shape[-1] != d:
        raise ShapeError(
            f"{name}: expected activations of shape [..., {d}] and a float dtype "
            f"(float32, bfloat16, float16), got shape {list(x.shape)} {x.dtype}"
        )
    if not any(x.dtype == f for f in _FLOATS):
        raise ShapeError(
            f"{name}: expected a float dtype (float32, bfloat16, float16) for activations of shape "
            f"[..., {d}], got {x.dtype}; cast integer inputs with x.astype(jnp.float32)"
        )
    lead = x.shape[:-1]
    rows = x.reshape(-1, d)
    for label, arr in (("mask", mask), ("weights", weights)):
        if arr is not None and tuple(arr.shape) != tuple(lead):
            raise ShapeError(
                f"{name}: {label} must have the leading shape of the activations {list(lead)} "
                f"(activations {list(x.shape)}), got {list(arr.shape)}"
            )
    m = None if mask is None else jnp.asarray(mask).reshape(-1).astype(bool)
    w = None if weights is None else jnp.asarray(weights).reshape(-1)
    return rows, m, w


def check_labels(labels: Any, lead: tuple[int, ...], *, name: str) -> Array:
    """Validates ``labels[...]`` (the rows' leading shape, integers) and flattens them.

    Raises:
      ShapeError: wrong shape or a non-integer dtype.
    """
    lab = labels if isinstance(labels, jax.Array | jax.core.Tracer) else jnp.asarray(labels)
    if tuple(lab.shape) != tuple(lead):
        raise ShapeError(
            f"{name}: labels must have the leading shape of the activations {list(lead)}, got "
            f"{list(lab.shape)} (0 = trusted, 1 = flagged, -1 = unknown)"
        )
    if not (jnp.issubdtype(lab.dtype, jnp.integer) or lab.dtype == jnp.bool_):
        raise ShapeError(
            f"{name}: labels must be integers (0 = trusted, 1 = flagged, -1 = unknown), got "
            f"{lab.dtype}"
        )
    return lab.reshape(-1).astype(jnp.int32)


def trusted_mask(mask: Array | None, labels: Array | None) -> Array | None:
    """The rows an unsupervised estimator may fold: ``mask`` and (when labelled) label 0."""
    if labels is None:
        return mask
    trusted = jnp.asarray(labels) == 0
    return trusted if mask is None else jnp.asarray(mask).astype(bool) & trusted


def label_kwargs(est: Estimator, mask: Array | None, labels: Array | None) -> dict[str, Any]:
    """Keyword arguments for ``est.update``: labels for a supervised estimator, else a mask.

    Unsupervised estimators fold only trusted rows (label 0, or every row when no labels are
    given), so flagged examples never contaminate their statistics.
    """
    if labels is not None and est.spec.supervised:
        return {"mask": mask, "labels": labels}
    return {"mask": trusted_mask(mask, labels)}


def valid_rows(rows: Array, mask: Array | None) -> tuple[Array, Array]:
    """``(ok, bad)``: rows to fold (mask and finite) and rows excluded for NaN/inf."""
    # x * 0 is 0 for finite x and NaN for ±inf/NaN, so one row sum finds any non-finite entry;
    # it runs ~3x faster than all(isfinite(x)) over bf16 rows on CPU and cannot overflow.
    finite = ~nonfinite_rows(rows)
    m = jnp.ones(rows.shape[:1], bool) if mask is None else mask
    return m & finite, m & ~finite


def masked_scores(scores: Array, mask: Array | None, lead: tuple[int, ...]) -> Array:
    """Reshapes row scores to ``lead`` and zeroes masked rows (with ``where``, NaN-safe)."""
    s = scores.reshape(lead)
    if mask is None:
        return s
    return jnp.where(jnp.asarray(mask).reshape(lead), s, jnp.zeros((), s.dtype))


def nonfinite_rows(rows: Array) -> Array:
    """``[n]`` bool: rows holding any NaN or inf (one row sum of ``x * 0``, overflow-free)."""
    zero = jnp.zeros((), rows.dtype)
    return ~jnp.isfinite(jnp.sum(rows * zero, axis=-1, dtype=jnp.float32))


def fitted_rows(counts: Counts) -> Array:
    """``()`` bool: the fit saw at least one row (either count word non-zero)."""
    return jnp.any(counts.rows != 0)


def finish_scores(
    scores: Array,
    rows: Array | tuple[Array, ...],
    mask: Array | None,
    lead: tuple[int, ...],
    counts: Counts | None = None,
) -> Array:
    """The house rules for row scores, applied in one place by every ``score``.

    * a row holding any NaN/inf scores ``+inf`` (maximally anomalous, never "normal"); for a
      pair estimator ``rows`` is a tuple and a row is non-finite if either side is;
    * when ``counts`` (the fitted value's row counter) says the fit saw no rows, every row
      scores NaN: an empty fit gives no number rather than a confident one (outside ``jit``,
      ``finalize`` already refused it with :class:`NotFittedError`);
    * masked rows score 0.

    Returns:
      Scores of shape ``lead``.
    """
    parts = rows if isinstance(rows, tuple) else (rows,)
    bad = nonfinite_rows(parts[0])
    for r in parts[1:]:
        bad = bad | nonfinite_rows(r)
    out = jnp.where(bad, jnp.asarray(jnp.inf, scores.dtype), scores)
    if counts is not None:
        out = jnp.where(fitted_rows(counts), out, jnp.asarray(jnp.nan, scores.dtype))
    return masked_scores(out, mask, lead)


# --------------------------------------------------------------------------- empty fits


def is_traced(tree: Any) -> bool:
    """True when any leaf of ``tree`` is a tracer (inside ``jit``/``vmap``/``eval_shape``)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def require_rows(state: State, name: str) -> None:
    """Refuses, at the Python boundary, to finalize a state that holds no rows.

    Every row counter in ``state`` must be non-zero: for a composite state (a monitor, a
    calibrated estimator) the message names the part that is empty. Inside ``jit`` (traced
    state) this does nothing; the fitted value then scores NaN (see :func:`finish_scores`).

    Raises:
      NotFittedError: naming the estimator, the empty part and the rows excluded as non-finite.
    """
    if is_traced(state):
        return
    found = _find_counts(state)
    if not found:
        return
    words = jax.device_get([(c.rows, c.nonfinite) for _, c in found])
    for (path, _), (rows, bad) in zip(found, words, strict=True):
        if _words_to_int(rows) == 0:
            nbad = _words_to_int(bad)
            where = f" (part {path})" if len(found) > 1 else ""
            why = (
                f"all {nbad:,} rows it was given held NaN or inf and were excluded"
                if nbad
                else "it was never updated with a row (or every row was masked)"
            )
            raise NotFittedError(
                f"{name}.finalize: the state{where} holds no rows: {why}; fit on trusted rows "
                "before finalize"
            )


def require_fitted(fitted: Fitted, name: str) -> None:
    """Refuses, at the Python boundary, a fitted value that was fitted on no rows.

    Raises:
      NotFittedError: ``fitted`` (or a part of it) records zero rows.
    """
    if is_traced(fitted):
        return
    found = _find_counts(fitted)
    if not found:
        return
    words = jax.device_get([c.rows for _, c in found])
    for (path, _), rows in zip(found, words, strict=True):
        if _words_to_int(rows) == 0:
            where = f" (part {path})" if len(found) > 1 else ""
            raise NotFittedError(
                f"{name}: the fitted value{where} was fitted on no rows (finalize under jit of an "
                "empty state); its scores would be NaN: fit on trusted rows first"
            )
