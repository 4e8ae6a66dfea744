"""Monitors over many taps (``monitor``) and sparse updates (``every_k``).

A monitor is itself an :class:`~jaxmon.Estimator`: its state, fitted value and scores are plain
dicts with string keys, one entry per monitored tap (or tap pair, or tap and named detector), so
merging, checkpointing and sharding need no special case.

Keys (the contract other modules rely on):

* one estimator per pattern: the tap name, ``"blocks/0/mlp_out"``;
* a dict of named estimators per pattern: ``"blocks/0/mlp_out:gauss"``;
* a pair pattern (two-tap estimators such as the transition estimator): ``"a->b"`` (and
  ``"a->b:name"``); the estimator receives the tuple ``(x_a, x_b)`` as its ``x``.

Stacked taps (scan over layers). A tap recorded inside a ``jax.lax.scan`` over layers arrives
with a leading layer axis, ``[layers, batch, seq, d]``. Declare it with
``stacked={"blocks/resid": "blocks/{i}/resid"}``: the monitor then sees one ordinary tap per
layer (``"blocks/0/resid"``, ``"blocks/1/resid"``, ...), patterns match those names, and every
state, fitted value and score is keyed by them. Updates and scores of the layers of one stacked
tap that share an estimator run as a single ``jax.vmap`` over the layer axis (one kernel for all
layers, not one per layer); ``mask`` and ``weights`` have the per-layer leading shape.

How it is built, top to bottom: the config is parsed into rules (``_parse_config``); the taps
given are expanded to per-layer names (:func:`expand`); :func:`plan` maps rules and tap names to
the keys to compute, each an entry (estimator, taps, rule, detector); :func:`entry_for_key`
rebuilds an entry from a key alone, which is all ``merge`` and ``finalize`` (and a restored
checkpoint) have; :func:`apply` runs one estimator function over the entries, the layers of a
stacked tap under one ``vmap`` (``update`` and ``score`` are both an ``apply``);
:func:`shared_scores` lets bf16 keys of one tap share its centred rows. :func:`monitor` only
assembles these. Keys are written and read by :class:`~jaxmon._keys.MonitorKey` alone.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxmon import _numerics as nm
from jaxmon._base import (
    Estimator,
    EstimatorSpec,
    ShapeError,
    check_rows,
    finish_scores,
    from_spec,
    label_kwargs,
    register,
)
from jaxmon._keys import DETECTOR, PAIR, MonitorKey
from jaxmon.errors import ConfigError, MissingTapError, NotFittedError
from jaxmon_kernels import centred

__all__ = ["monitor", "every_k", "EveryKState"]

_LAYER = "{i}"


# --------------------------------------------------------------------------- every_k


class EveryKState(NamedTuple):
    """State of :func:`every_k`: the inner state and the number of update calls seen."""

    inner: Any  # the wrapped estimator's state
    calls: jax.Array  # shape=(), dtype=uint32: update calls (summed over merged states)


def _fresh(state: Any) -> Any:
    """A copy of ``state`` whose leaves are distinct buffers.

    Inner ``init``s may return one zero array for several leaves; donating such a state to a
    jitted train step (``donate_argnums``) would donate the same buffer twice and fail.
    """
    return jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), state)


def _as_estimator(est: Estimator | Mapping[str, Any] | str, *, where: str) -> Estimator:
    if isinstance(est, Estimator):
        return est
    if isinstance(est, Mapping | str | EstimatorSpec):
        return from_spec(est)
    raise ConfigError(
        f"{where}: expected a jaxmon Estimator (e.g. jaxmon.gaussian()), got "
        f"{type(est).__name__}; did you pass the factory instead of calling it?"
    )


@register("every_k")
def every_k(estimator: Estimator | Mapping[str, Any], k: int) -> Estimator:
    """Updates ``estimator`` on every ``k``-th call only (calls 0, k, 2k, ...).

    The skipped calls cost a counter increment: the inner update runs under ``lax.cond``, so on
    skipped steps its work is not executed. Use it to monitor a training run at a fraction of
    the step cost. ``merge`` merges the inner states and sums the call counters; ``finalize``
    and ``score`` are the inner estimator's.

    Args:
      estimator: the estimator to update sparsely (or its spec dict).
      k: update period, ``k >= 1``; ``k = 1`` updates on every call.

    Returns:
      An :class:`~jaxmon.Estimator` whose state is an :class:`EveryKState`.

    Example:
      >>> est = jaxmon.every_k(jaxmon.monitor({"blocks/*/resid": jaxmon.gaussian()}), 10)
    """
    inner = _as_estimator(estimator, where="every_k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"every_k: k must be an integer >= 1, got {k!r}")
    spec = EstimatorSpec(
        "every_k",
        {"estimator": inner.spec.to_dict(), "k": k},
        mergeable=inner.spec.mergeable,
        supervised=inner.spec.supervised,
    )

    def init(example) -> EveryKState:
        return EveryKState(_fresh(inner.init(example)), jnp.zeros((), jnp.uint32))

    @jax.jit
    def update(state: EveryKState, x, *, mask=None, weights=None, labels=None) -> EveryKState:
        due = (state.calls % jnp.uint32(k)) == 0
        kw = label_kwargs(inner, mask, labels)
        if k == 1:
            new = inner.update(state.inner, x, weights=weights, **kw)
        else:
            new = jax.lax.cond(
                due,
                lambda s: inner.update(s, x, weights=weights, **kw),
                lambda s: s,
                state.inner,
            )
        return EveryKState(new, state.calls + jnp.uint32(1))

    @jax.jit
    def merge(a: EveryKState, b: EveryKState) -> EveryKState:
        return EveryKState(inner.merge(a.inner, b.inner), a.calls + b.calls)

    def finalize(state: EveryKState):
        return inner.finalize(state.inner)

    return Estimator(init, update, merge, finalize, inner.score, spec)


# --------------------------------------------------------------------------- monitor: config


@dataclasses.dataclass(frozen=True)
class _Rule:
    pattern: str | tuple[str, str]
    detectors: tuple[tuple[str | None, Estimator], ...]  # name None: a single estimator

    @property
    def pair(self) -> bool:
        return isinstance(self.pattern, tuple)

    def matches(self, taps: tuple[str, ...]) -> bool:
        """Whether this rule's pattern matches ``taps`` (one tap, or a pair for a pair rule)."""
        pats = self.pattern if isinstance(self.pattern, tuple) else (self.pattern,)
        return len(taps) == len(pats) and all(
            fnmatch.fnmatchcase(t, p) for t, p in zip(taps, pats, strict=True)
        )


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str
    est: Estimator
    taps: tuple[str, ...]  # one tap, or two for a pair
    rule: int
    detector: str | None


class Plan(NamedTuple):
    """The keys a monitor computes for a set of taps: one entry per key.

    Attributes:
      entries: per key (formatted by :class:`~jaxmon._keys.MonitorKey`) its estimator, the
        taps it reads, and the rule and detector that produced it.
      unmatched: the patterns that matched no tap.
    """

    entries: tuple[_Entry, ...]
    unmatched: tuple[str | tuple[str, str], ...]


def _natural_key(name: str) -> list[Any]:
    # "blocks/10" sorts after "blocks/9": pairs of globs are zipped in this order.
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _parse_config(config: Any) -> list[_Rule]:
    items: list[tuple[Any, Any]]
    if isinstance(config, Mapping):
        items = list(config.items())
    elif isinstance(config, Sequence) and not isinstance(config, str):
        # The spec form: [{"pattern": ..., "estimator": spec} | {"pattern": ..., "estimators": {}}]
        items = []
        for entry in config:
            pat = entry["pattern"]
            pat = tuple(pat) if isinstance(pat, list) else pat
            items.append(
                (pat, entry["estimators"] if "estimators" in entry else entry["estimator"])
            )
    else:
        raise ConfigError(
            "monitor: config must map tap patterns to estimators, e.g. "
            f"{{'blocks/*/mlp_out': jaxmon.gaussian()}}, got {type(config).__name__}"
        )
    if not items:
        raise ConfigError("monitor: config is empty; map at least one tap pattern to an estimator")
    return [_parse_rule(pat, val) for pat, val in items]


def _parse_rule(pat: Any, val: Any) -> _Rule:
    if isinstance(pat, list | tuple):
        if len(pat) != 2 or not all(isinstance(p, str) for p in pat):
            raise ConfigError(f"monitor: a pair pattern must be two tap names/globs, got {pat!r}")
        pat = (pat[0], pat[1])
    elif not isinstance(pat, str):
        raise ConfigError(f"monitor: a pattern must be a str or a pair of str, got {pat!r}")
    if not (isinstance(val, Mapping) and "name" not in val):
        return _Rule(pat, ((None, _as_estimator(val, where=f"monitor[{pat!r}]")),))
    if not val:
        raise ConfigError(f"monitor: pattern {pat!r} maps to an empty dict of detectors")
    dets = []
    for name, est in val.items():
        if not isinstance(name, str) or not name or DETECTOR in name:
            raise ConfigError(
                f"monitor: detector names must be non-empty strings without {DETECTOR!r}, "
                f"got {name!r} for pattern {pat!r}"
            )
        dets.append((name, _as_estimator(est, where=f"monitor[{pat!r}][{name!r}]")))
    return _Rule(pat, tuple(dets))


def _rules_spec(rules: list[_Rule]) -> list[dict[str, Any]]:
    out = []
    for r in rules:
        pat = list(r.pattern) if r.pair else r.pattern
        if r.detectors[0][0] is None:
            out.append({"pattern": pat, "estimator": r.detectors[0][1].spec.to_dict()})
        else:
            out.append(
                {"pattern": pat, "estimators": {n: e.spec.to_dict() for n, e in r.detectors}}
            )
    return out


def _parse_stacked(stacked: Mapping[str, str] | None) -> dict[str, str]:
    stacked = dict(stacked or {})
    for src, tmpl in stacked.items():
        if not isinstance(src, str) or not isinstance(tmpl, str) or _LAYER not in tmpl:
            raise ConfigError(
                "monitor: stacked maps a stacked tap name to a per-layer template containing "
                f"'{{i}}', e.g. {{'blocks/resid': 'blocks/{{i}}/resid'}}; got {src!r}: {tmpl!r}"
            )
    return stacked


# --------------------------------------------------------------------------- monitor: planning


def expand(
    taps: Mapping[str, Any], stacked: Mapping[str, str]
) -> dict[str, tuple[str, int | None]]:
    """Per-layer (virtual) tap names -> (source tap, layer index or None).

    A tap named in ``stacked`` (shape ``[layers, ..., d]``) becomes one name per layer, from
    its template; any other tap keeps its name.

    Raises:
      ConfigError: a tap name is not a string, or two taps produce the same name.
      ShapeError: a stacked tap has fewer than two axes.
    """
    out: dict[str, tuple[str, int | None]] = {}
    for name, x in taps.items():
        if not isinstance(name, str):
            raise ConfigError(f"monitor: tap names must be strings, got {name!r}")
        if name in stacked:
            shape = getattr(x, "shape", ())
            if len(shape) < 2:
                raise ShapeError(
                    f"monitor: stacked tap {name!r} must have shape [layers, ..., d], "
                    f"got {list(shape)}"
                )
            produced = [(stacked[name].replace(_LAYER, str(i)), i) for i in range(shape[0])]
        else:
            produced = [(name, None)]
        for virt, layer in produced:
            if virt in out:
                raise ConfigError(f"monitor: tap name {virt!r} is produced twice")
            out[virt] = (name, layer)
    return out


def _matched_groups(rule: _Rule, names: list[str], *, strict: bool) -> list[tuple[str, ...]] | None:
    """The tap tuples ``rule`` reads among ``names`` (naturally sorted); None: it matches none."""
    if not rule.pair:
        m = [(n,) for n in names if rule.matches((n,))]
        return m or None
    pa, pb = rule.pattern
    ma = [n for n in names if fnmatch.fnmatchcase(n, pa)]
    mb = [n for n in names if fnmatch.fnmatchcase(n, pb)]
    if not ma or not mb:
        return None
    if len(ma) != len(mb):
        if not strict:
            return []
        raise ConfigError(
            f"monitor: pair pattern {rule.pattern!r} matched {len(ma)} taps {ma} and "
            f"{len(mb)} taps {mb}; the two globs must match equally many taps, "
            "which are zipped in natural order"
        )
    return list(zip(ma, mb, strict=True))


def plan(rules: Sequence[_Rule], tap_names: Sequence[str], *, strict: bool) -> Plan:
    """The keys ``rules`` produce over ``tap_names``, each with its estimator and taps.

    Args:
      rules: the monitor's parsed config.
      tap_names: per-layer tap names (after :func:`expand`).
      strict: ``init``'s planning: every pattern must match, pair globs must match equally
        many taps, and every key must read back (:func:`entry_for_key`) as the entry it names.
        Otherwise (``update``/``score``) such patterns are skipped.

    Raises:
      ConfigError: two patterns produce one key; under ``strict`` also the cases above.
    """
    names = sorted(tap_names, key=_natural_key)
    entries: dict[str, _Entry] = {}
    unmatched = []
    for ri, rule in enumerate(rules):
        groups = _matched_groups(rule, names, strict=strict)
        if groups is None:
            unmatched.append(rule.pattern)
            continue
        for taps in groups:
            for det, est in rule.detectors:
                key = MonitorKey.of(taps, det).format()
                if key in entries:
                    raise ConfigError(
                        f"monitor: tap {MonitorKey.of(taps).base!r} is matched by patterns "
                        f"{rules[entries[key].rule].pattern!r} and {rule.pattern!r} with the "
                        "same key; give the detectors names ({'name': estimator}) or make "
                        "the patterns disjoint"
                    )
                entries[key] = _Entry(key, est, taps, ri, det)
    if strict and unmatched:
        raise ConfigError(
            f"monitor: pattern(s) {unmatched} match no tap; taps available: {list(names)}"
        )
    if strict:
        _check_read_back(rules, entries.values())
    return Plan(tuple(entries.values()), tuple(unmatched))


def _check_read_back(rules: Sequence[_Rule], entries: Any) -> None:
    # merge, finalize and a monitor restored from a checkpoint know a key by its name alone.
    for e in entries:
        back = entry_for_key(rules, e.key)
        if (back.rule, back.detector) != (e.rule, e.detector):
            raise ConfigError(
                f"monitor: key {e.key!r} of pattern {rules[e.rule].pattern!r} would read back "
                f"as pattern {rules[back.rule].pattern!r} (merge, finalize and a restored "
                "checkpoint know a key by its name); make the patterns disjoint, or avoid "
                f"{DETECTOR!r} and {PAIR!r} in tap names"
            )


def entry_for_key(rules: Sequence[_Rule], key: str) -> _Entry:
    """The entry of a state key, from the key alone (no taps needed: merge, finalize).

    The key's readings (:meth:`MonitorKey.readings`) are tried in order; the first rule and
    detector that could produce a reading wins.

    Raises:
      ConfigError: no pattern of ``rules`` produces ``key``.
    """
    for reading in MonitorKey.readings(key):
        for ri, rule in enumerate(rules):
            for det, est in rule.detectors:
                if det == reading.detector and rule.matches(reading.taps):
                    return _Entry(key, est, reading.taps, ri, det)
    raise ConfigError(f"monitor: state key {key!r} matches no pattern of this monitor")


# --------------------------------------------------------------------------- monitor: applying


@dataclasses.dataclass(frozen=True)
class _View:
    """The taps given to ``update``/``score`` as the monitor sees them: per-layer names."""

    taps: Mapping[str, Any]
    virt: Mapping[str, tuple[str, int | None]]  # from expand

    def get(self, name: str) -> Any:
        src, layer = self.virt[name]
        x = self.taps[src]
        return x if layer is None else x[layer]

    def x(self, e: _Entry) -> Any:
        """An entry's input: the tap's array, or the pair ``(x_a, x_b)``."""
        xs = tuple(self.get(t) for t in e.taps)
        return xs[0] if len(xs) == 1 else xs


def resolve(
    rules: Sequence[_Rule],
    stacked: Mapping[str, str],
    keys: Sequence[str],
    taps: Mapping[str, Any],
    what: str,
) -> tuple[_View, list[_Entry]]:
    """The entries for state ``keys`` given ``taps``.

    Raises:
      MissingTapError: ``taps`` lack taps that keys need (every missing tap and key named).
    """
    virt = expand(taps, stacked)
    entries = {e.key: e for e in plan(rules, list(virt), strict=False).entries}
    missing_keys = [k for k in keys if k not in entries]
    if missing_keys:
        need = {t for k in missing_keys for t in entry_for_key(rules, k).taps if t not in virt}
        raise MissingTapError(
            f"monitor.{what}: missing tap(s) {sorted(need, key=_natural_key)} needed by state "
            f"key(s) {missing_keys}; taps given: {sorted(taps, key=_natural_key)}"
            + (f" (stacked: {stacked})" if stacked else "")
        )
    return _View(taps, virt), [entries[k] for k in keys]


def _stacked_groups(
    entries: list[_Entry], view: _View
) -> tuple[list[list[tuple[_Entry, int]]], list[_Entry]]:
    """Splits entries into vmappable groups (layers of one stacked tap sharing an estimator)
    and the rest."""
    grouped: dict[tuple[str, int, str | None], list[tuple[_Entry, int]]] = {}
    rest = []
    for e in entries:
        src, layer = view.virt[e.taps[0]]
        if len(e.taps) == 1 and layer is not None:
            grouped.setdefault((src, e.rule, e.detector), []).append((e, layer))
        else:
            rest.append(e)
    groups = []
    for members in grouped.values():
        if len(members) == 1:
            rest.append(members[0][0])
        else:
            groups.append(members)
    return groups, rest


def _layer_slice(x: Any, layers: list[int]) -> Any:
    return x if layers == list(range(x.shape[0])) else x[jnp.asarray(layers)]


def apply(
    call: Callable[[Estimator, Any, Any], Any],
    values: Mapping[str, Any],
    entries: list[_Entry],
    view: _View,
    *,
    shared: Callable[[list[_Entry]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``{key: call(est, values[key], x)}`` for every entry, ``x`` the entry's input.

    The layers of one stacked tap that share an estimator run as one ``jax.vmap`` over the
    layer axis (their values stacked, results unstacked). ``shared(rest)`` may answer some of
    the other keys first (the shared bf16 scoring of :func:`shared_scores`).

    Raises:
      ShapeError: an estimator refused a tap's shape, re-raised naming the tap(s) and key(s).
    """
    groups, rest = _stacked_groups(entries, view)
    out: dict[str, Any] = {}
    for members in groups:
        e0, keys = members[0][0], [e.key for e, _ in members]
        src, layers = view.virt[e0.taps[0]][0], [layer for _, layer in members]
        stacked_values = jax.tree.map(lambda *v: jnp.stack(v), *[values[k] for k in keys])
        try:
            res = jax.vmap(lambda v, x, est=e0.est: call(est, v, x))(
                stacked_values, _layer_slice(view.taps[src], layers)
            )
        except ShapeError as err:
            raise ShapeError(
                f"monitor: stacked tap {src!r} of shape {list(view.taps[src].shape)} (layers "
                f"{layers}, keys {keys}): {err}"
            ) from None
        for j, k in enumerate(keys):
            out[k] = jax.tree.map(lambda leaf, j=j: leaf[j], res)
    if shared is not None:
        out.update(shared(rest))
    for e in rest:
        if e.key in out:
            continue
        try:
            out[e.key] = call(e.est, values[e.key], view.x(e))
        except ShapeError as err:
            shapes = {t: list(view.get(t).shape) for t in e.taps}
            raise ShapeError(f"monitor: tap(s) {shapes} for key {e.key!r}: {err}") from None
    return out


def shared_scores(
    entries: list[_Entry], fitted: Mapping[str, Any], view: _View, mask: Any
) -> dict[str, Any]:
    """Keys that score one tap by bf16 matmuls share one centred block of its rows.

    Each key adds its own offset (``center − mean`` through its matrix) after its matmul.
    Measured (``benchmarks/bench_score.py``, ``gaussian()`` + ``pca_residual(rank=64)`` on
    one bf16 tap): 1.23x (d = 1024) and 1.06x (d = 768) the rows/s of each key centring
    alone; with float32 operands sharing gains nothing (0.98-1.00x) and a single key has
    nothing to share, so only bf16 groups of two or more keys take this path. Fusing the
    keys' matmuls into one (concatenated weights) measured 0.71-0.83x (XLA then writes the
    joint product to memory): not used.

    Returns:
      Scores of the keys that took this path; the others are left to their own ``score``.
    """
    groups: dict[str, list[tuple[_Entry, Any]]] = {}
    for e in entries:
        fn = nm.block_scorer(e.est.spec) if len(e.taps) == 1 else None
        if fn is not None and _bf16_block_applies(e, fitted[e.key], view.get(e.taps[0])):
            groups.setdefault(e.taps[0], []).append((e, fn))
    out = {}
    for tap, members in groups.items():
        x = view.get(tap)
        # Score only the keys whose block scorer applies (e.g. not a diagonal Gaussian).
        try:
            rows, _, _ = check_rows(x, x.shape[-1], name=f"monitor tap {tap!r}", mask=mask)
        except ShapeError:
            continue  # let the keys' own scores raise, naming the key
        center = fitted[members[0][0].key].mean
        block = nm.CentredBlock(
            centred(nm.matmul_rows(rows), center, jnp.bfloat16), center, jnp.bfloat16
        )
        found = [(e, raw) for e, fn in members if (raw := fn(fitted[e.key], block)) is not None]
        if len(found) < 2:
            continue  # nothing shared: the keys' own scores are as fast
        for e, raw in found:
            out[e.key] = finish_scores(raw, rows, mask, x.shape[:-1], fitted[e.key].counts)
    return out


def _bf16_block_applies(e: _Entry, fitted: Any, x: Any) -> bool:
    # Otherwise the key's own score handles (or refuses) it.
    mean = getattr(fitted, "mean", None)
    return (
        isinstance(mean, jax.Array | jax.core.Tracer)
        and mean.dtype == jnp.float32
        and getattr(x, "ndim", 0) >= 1
        and x.shape[-1] == mean.shape[-1]
        and nm.score_operand(x.dtype, e.est.spec.params.get("precision", "auto")) == jnp.bfloat16
    )


# --------------------------------------------------------------------------- monitor: functions


def _init(rules: list[_Rule], stacked: dict[str, str], example: Mapping[str, Any]) -> dict:
    if not isinstance(example, Mapping):
        raise ConfigError(
            "monitor.init expects a dict {tap_name: ShapeDtypeStruct | array}, got "
            f"{type(example).__name__}"
        )
    virt = expand(example, stacked)
    out = {}
    for e in plan(rules, list(virt), strict=True).entries:
        xs = []
        for t in e.taps:
            src, layer = virt[t]
            x = example[src]
            shape = tuple(x.shape) if layer is None else tuple(x.shape[1:])
            xs.append(jax.ShapeDtypeStruct(shape, x.dtype))
        try:
            out[e.key] = e.est.init(xs[0] if len(xs) == 1 else tuple(xs))
        except ShapeError as err:
            shapes = {t: list(x.shape) for t, x in zip(e.taps, xs, strict=True)}
            raise ShapeError(f"monitor.init: tap(s) {shapes} for key {e.key!r}: {err}") from None
    return _fresh(out)


def _update(rules, stacked, state, taps, *, mask=None, weights=None, labels=None) -> dict:
    view, entries = resolve(rules, stacked, list(state), taps, "update")

    def call(est, s, x):
        return est.update(s, x, weights=weights, **label_kwargs(est, mask, labels))

    return {**state, **apply(call, state, entries, view)}


def _score(rules, stacked, fitted, taps, *, mask=None) -> dict:
    view, entries = resolve(rules, stacked, list(fitted), taps, "score")
    return apply(
        lambda est, f, x: est.score(f, x, mask=mask),
        fitted,
        entries,
        view,
        shared=lambda rest: shared_scores(rest, fitted, view, mask),
    )


def _merge(rules: list[_Rule], a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if set(a) != set(b):
        raise ConfigError(
            "monitor.merge: the states cover different keys: only in the first "
            f"{sorted(set(a) - set(b))}, only in the second {sorted(set(b) - set(a))}"
        )
    return {k: entry_for_key(rules, k).est.merge(a[k], b[k]) for k in a}


def _finalize(rules: list[_Rule], state: dict[str, Any]) -> dict[str, Any]:
    # Key by key at the Python boundary (each inner finalize is jitted): an empty key is
    # refused by name instead of finalizing into NaN scores.
    out = {}
    for k, v in state.items():
        try:
            out[k] = entry_for_key(rules, k).est.finalize(v)
        except NotFittedError as err:
            raise NotFittedError(f"monitor key {k!r}: {err}") from None
    return out


def _check_taps(what: str, taps: Any) -> None:
    if not isinstance(taps, Mapping):
        shape = getattr(taps, "shape", None)
        got = f"an array of shape {list(shape)}" if shape is not None else type(taps).__name__
        raise ShapeError(
            f"monitor.{what} expects a dict {{tap_name: array [..., d]}} of activations, got "
            f"{got}; wrap a single tap as {{'name': x}}, or use the estimator without a monitor"
        )


def _check_labels(labels: Any) -> Any:
    if labels is None:
        return None
    labels = jnp.asarray(labels)
    if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
        raise ShapeError(
            "monitor.update: labels must be integers with the taps' leading shape "
            f"(0 = trusted, 1 = flagged, -1 = unknown), got {labels.dtype}"
        )
    return labels


@register("monitor")
def monitor(
    config: Mapping[Any, Any] | Sequence[Mapping[str, Any]],
    *,
    stacked: Mapping[str, str] | None = None,
) -> Estimator:
    """One estimator over many taps: each tap matched by a pattern gets its own state.

    Args:
      config: maps a pattern to an :class:`~jaxmon.Estimator` or to a dict of named
        estimators. A pattern is a glob over tap names (``fnmatch`` semantics, so ``*`` also
        matches ``/``), or a pair of tap names/globs ``("blocks/3/out", "blocks/4/out")`` for
        two-tap estimators; the matches of the two globs of a pair are sorted naturally
        (``blocks/10`` after ``blocks/9``) and zipped, so ``("blocks/[0-2]/out",
        "blocks/[1-3]/out")`` pairs each layer with the next.
      stacked: declares taps that carry a leading layer axis (scan over layers): maps the
        stacked tap's name to a per-layer name template holding ``{i}``, e.g.
        ``{"blocks/resid": "blocks/{i}/resid"}``. Patterns, state keys and score keys then use
        the per-layer names; the layers sharing an estimator are updated in one ``vmap``.

    Returns:
      An :class:`~jaxmon.Estimator`:

      * ``init(example)`` takes ``{tap: ShapeDtypeStruct | array [..., d]}``;
      * ``update(state, taps, *, mask=None, weights=None)``: ``mask``/``weights`` have the
        taps' leading shape (``[batch, seq]``, padding False) and apply to every tap; taps not
        matched by any pattern are ignored;
      * ``merge`` and ``finalize`` map over keys; ``score(fitted, taps, *, mask=None)``
        returns ``{key: scores[...]}``, higher = more anomalous, masked tokens 0.

    Raises:
      ConfigError: a pattern matches no tap at ``init``, two patterns produce the same key, or
        a key would read back (from its name alone) as another pattern's.
      MissingTapError: ``update``/``score`` lack taps the state was built for (all are named).
      ShapeError: a tap's shape does not fit its estimator (the tap is named).

    Example:
      >>> mon = jaxmon.monitor({"blocks/*/mlp_out": jaxmon.gaussian(),
      ...                       "blocks/*/resid": {"g": jaxmon.gaussian(diagonal=True)}})
      >>> state = mon.init({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in taps.items()})
      >>> state = mon.update(state, taps, mask=tokens != PAD)
    """
    rules, stacked = _parse_config(config), _parse_stacked(stacked)
    ests = [e for r in rules for _, e in r.detectors]
    spec = EstimatorSpec(
        "monitor",
        {"config": _rules_spec(rules), "stacked": stacked},
        mergeable=all(e.spec.mergeable for e in ests),
        supervised=any(e.spec.supervised for e in ests),
    )
    jit_update = jax.jit(functools.partial(_update, rules, stacked))
    jit_score = jax.jit(functools.partial(_score, rules, stacked))

    def update(state, taps, *, mask=None, weights=None, labels=None):
        _check_taps("update", taps)
        labels = _check_labels(labels)
        return jit_update(state, taps, mask=mask, weights=weights, labels=labels)

    def score(fitted, taps, *, mask=None):
        _check_taps("score", taps)
        return jit_score(fitted, taps, mask=mask)

    return Estimator(
        functools.partial(_init, rules, stacked),
        update,
        jax.jit(functools.partial(_merge, rules)),
        functools.partial(_finalize, rules),
        score,
        spec,
    )
