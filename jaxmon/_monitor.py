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
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping, Sequence
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


# --------------------------------------------------------------------------- monitor


@dataclasses.dataclass(frozen=True)
class _Rule:
    pattern: str | tuple[str, str]
    detectors: tuple[tuple[str | None, Estimator], ...]  # name None: a single estimator

    @property
    def pair(self) -> bool:
        return isinstance(self.pattern, tuple)


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str
    est: Estimator
    taps: tuple[str, ...]  # one tap, or two for a pair
    rule: int
    detector: str | None


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
    rules = []
    for pat, val in items:
        if isinstance(pat, list | tuple):
            if len(pat) != 2 or not all(isinstance(p, str) for p in pat):
                raise ConfigError(
                    f"monitor: a pair pattern must be two tap names/globs, got {pat!r}"
                )
            pat = (pat[0], pat[1])
        elif not isinstance(pat, str):
            raise ConfigError(f"monitor: a pattern must be a str or a pair of str, got {pat!r}")
        if isinstance(val, Mapping) and "name" not in val:
            if not val:
                raise ConfigError(f"monitor: pattern {pat!r} maps to an empty dict of detectors")
            dets = []
            for name, est in val.items():
                if not isinstance(name, str) or not name or ":" in name:
                    raise ConfigError(
                        f"monitor: detector names must be non-empty strings without ':', "
                        f"got {name!r} for pattern {pat!r}"
                    )
                dets.append((name, _as_estimator(est, where=f"monitor[{pat!r}][{name!r}]")))
            rules.append(_Rule(pat, tuple(dets)))
        else:
            rules.append(_Rule(pat, ((None, _as_estimator(val, where=f"monitor[{pat!r}]")),)))
    return rules


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
      ConfigError: a pattern matches no tap at ``init``, or two patterns produce the same key.
      MissingTapError: ``update``/``score`` lack taps the state was built for (all are named).
      ShapeError: a tap's shape does not fit its estimator (the tap is named).

    Example:
      >>> mon = jaxmon.monitor({"blocks/*/mlp_out": jaxmon.gaussian(),
      ...                       "blocks/*/resid": {"g": jaxmon.gaussian(diagonal=True)}})
      >>> state = mon.init({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in taps.items()})
      >>> state = mon.update(state, taps, mask=tokens != PAD)
    """
    rules = _parse_config(config)
    stacked = dict(stacked or {})
    for src, tmpl in stacked.items():
        if not isinstance(src, str) or not isinstance(tmpl, str) or _LAYER not in tmpl:
            raise ConfigError(
                "monitor: stacked maps a stacked tap name to a per-layer template containing "
                f"'{{i}}', e.g. {{'blocks/resid': 'blocks/{{i}}/resid'}}; got {src!r}: {tmpl!r}"
            )
    spec = EstimatorSpec(
        "monitor",
        {"config": _rules_spec(rules), "stacked": stacked},
        mergeable=all(e.spec.mergeable for r in rules for _, e in r.detectors),
        supervised=any(e.spec.supervised for r in rules for _, e in r.detectors),
    )
    # key -> entry, filled by every plan; merge/finalize have no taps to plan from.
    known: dict[str, _Entry] = {}

    def expand(taps: Mapping[str, Any]) -> dict[str, tuple[str, int | None]]:
        """Per-layer (virtual) tap names -> (source tap, layer index or None)."""
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
                for i in range(shape[0]):
                    virt = stacked[name].replace(_LAYER, str(i))
                    if virt in out:
                        raise ConfigError(f"monitor: tap name {virt!r} is produced twice")
                    out[virt] = (name, i)
            else:
                if name in out:
                    raise ConfigError(f"monitor: tap name {name!r} is produced twice")
                out[name] = (name, None)
        return out

    def plan(names: Sequence[str], *, strict: bool) -> list[_Entry]:
        names = sorted(names, key=_natural_key)
        entries: dict[str, _Entry] = {}
        unmatched = []
        for ri, rule in enumerate(rules):
            if rule.pair:
                pa, pb = rule.pattern
                ma = [n for n in names if fnmatch.fnmatchcase(n, pa)]
                mb = [n for n in names if fnmatch.fnmatchcase(n, pb)]
                if not ma or not mb:
                    unmatched.append(rule.pattern)
                    continue
                if len(ma) != len(mb):
                    if not strict:
                        continue
                    raise ConfigError(
                        f"monitor: pair pattern {rule.pattern!r} matched {len(ma)} taps {ma} and "
                        f"{len(mb)} taps {mb}; the two globs must match equally many taps, "
                        "which are zipped in natural order"
                    )
                groups = [((a, b), f"{a}->{b}") for a, b in zip(ma, mb, strict=True)]
            else:
                m = [n for n in names if fnmatch.fnmatchcase(n, rule.pattern)]
                if not m:
                    unmatched.append(rule.pattern)
                groups = [((n,), n) for n in m]
            for taps, base in groups:
                for det, est in rule.detectors:
                    key = base if det is None else f"{base}:{det}"
                    if key in entries:
                        raise ConfigError(
                            f"monitor: tap {base!r} is matched by patterns "
                            f"{rules[entries[key].rule].pattern!r} and {rule.pattern!r} with the "
                            "same key; give the detectors names ({'name': estimator}) or make "
                            "the patterns disjoint"
                        )
                    entries[key] = _Entry(key, est, taps, ri, det)
        if strict and unmatched:
            raise ConfigError(
                f"monitor: pattern(s) {unmatched} match no tap; taps available: {list(names)}"
            )
        known.update(entries)
        return list(entries.values())

    def lookup(key: str) -> _Entry:
        if key in known:
            return known[key]
        # A state restored in a fresh process: rebuild the entry from the key alone.
        for ri, rule in enumerate(rules):
            for det, est in rule.detectors:
                suffix = "" if det is None else f":{det}"
                if not key.endswith(suffix):
                    continue
                base = key[: len(key) - len(suffix)] if suffix else key
                if rule.pair:
                    if "->" not in base:
                        continue
                    a, b = base.split("->", 1)
                    if fnmatch.fnmatchcase(a, rule.pattern[0]) and fnmatch.fnmatchcase(
                        b, rule.pattern[1]
                    ):
                        return _Entry(key, est, (a, b), ri, det)
                elif fnmatch.fnmatchcase(base, rule.pattern):
                    return _Entry(key, est, (base,), ri, det)
        raise ConfigError(f"monitor: state key {key!r} matches no pattern of this monitor")

    def resolve(state_keys, taps: Mapping[str, Any], what: str):
        """Entries for ``state_keys`` given ``taps``; raises naming missing taps."""
        virt = expand(taps)
        entries = {e.key: e for e in plan(list(virt), strict=False)}
        missing_keys = [k for k in state_keys if k not in entries]
        if missing_keys:
            need = sorted(
                {t for k in missing_keys for t in lookup(k).taps if t not in virt}, key=_natural_key
            )
            raise MissingTapError(
                f"monitor.{what}: missing tap(s) {need} needed by state key(s) {missing_keys}; "
                f"taps given: {sorted(taps, key=_natural_key)}"
                + (f" (stacked: {stacked})" if stacked else "")
            )
        return virt, [entries[k] for k in state_keys]

    def get(taps, virt, name):
        src, layer = virt[name]
        x = taps[src]
        return x if layer is None else x[layer]

    def groups_of(entries, virt):
        """Splits entries into vmappable stacked groups and the rest."""
        grouped: dict[tuple[str, int, str | None], list[tuple[_Entry, int]]] = {}
        rest = []
        for e in entries:
            if len(e.taps) == 1 and virt[e.taps[0]][1] is not None:
                src, layer = virt[e.taps[0]]
                grouped.setdefault((src, e.rule, e.detector), []).append((e, layer))
            else:
                rest.append(e)
        singles = []
        for members in grouped.values():
            if len(members) == 1:
                rest.append(members[0][0])
            else:
                singles.append(members)
        return singles, rest

    def tap_error(e: _Entry, err: ShapeError, taps, virt) -> ShapeError:
        shapes = {t: list(get(taps, virt, t).shape) for t in e.taps}
        return ShapeError(f"monitor: tap(s) {shapes} for key {e.key!r}: {err}")

    def layer_slice(x, layers):
        if list(layers) == list(range(x.shape[0])):
            return x
        return x[jnp.asarray(layers)]

    def stack(trees):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)

    def tap_x(e: _Entry, taps, virt):
        xs = tuple(get(taps, virt, t) for t in e.taps)
        return xs[0] if len(xs) == 1 else xs

    def init(example: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(example, Mapping):
            raise ConfigError(
                "monitor.init expects a dict {tap_name: ShapeDtypeStruct | array}, got "
                f"{type(example).__name__}"
            )
        virt = expand(example)
        out = {}
        for e in plan(list(virt), strict=True):
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
                raise ShapeError(
                    f"monitor.init: tap(s) {shapes} for key {e.key!r}: {err}"
                ) from None
        return _fresh(out)

    def update(
        state: dict[str, Any], taps: Mapping[str, Any], *, mask=None, weights=None, labels=None
    ):
        virt, entries = resolve(list(state), taps, "update")
        new = dict(state)
        singles, rest = groups_of(entries, virt)
        for members in singles:
            e0 = members[0][0]
            src = virt[e0.taps[0]][0]
            layers = [layer for _, layer in members]
            xs = layer_slice(taps[src], layers)
            st = stack([state[e.key] for e, _ in members])
            try:
                kw = label_kwargs(e0.est, mask, labels)
                st = jax.vmap(
                    lambda s, x, est=e0.est, kw=kw: est.update(s, x, weights=weights, **kw)
                )(st, xs)
            except ShapeError as err:
                raise ShapeError(
                    f"monitor: stacked tap {src!r} of shape {list(taps[src].shape)} (layers "
                    f"{layers}, keys {[e.key for e, _ in members]}): {err}"
                ) from None
            for j, (e, _) in enumerate(members):
                new[e.key] = jax.tree.map(lambda leaf, j=j: leaf[j], st)
        for e in rest:
            try:
                new[e.key] = e.est.update(
                    state[e.key],
                    tap_x(e, taps, virt),
                    weights=weights,
                    **label_kwargs(e.est, mask, labels),
                )
            except ShapeError as err:
                raise tap_error(e, err, taps, virt) from None
        return new

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        if set(a) != set(b):
            raise ConfigError(
                "monitor.merge: the states cover different keys: only in the first "
                f"{sorted(set(a) - set(b))}, only in the second {sorted(set(b) - set(a))}"
            )
        return {k: lookup(k).est.merge(a[k], b[k]) for k in a}

    def finalize(state: dict[str, Any]) -> dict[str, Any]:
        # Key by key at the Python boundary (each inner finalize is jitted): an empty key is
        # refused by name instead of finalizing into NaN scores.
        out = {}
        for k, v in state.items():
            try:
                out[k] = lookup(k).est.finalize(v)
            except NotFittedError as err:
                raise NotFittedError(f"monitor key {k!r}: {err}") from None
        return out

    def checked(what: str, taps: Any) -> None:
        if not isinstance(taps, Mapping):
            shape = getattr(taps, "shape", None)
            got = f"an array of shape {list(shape)}" if shape is not None else type(taps).__name__
            raise ShapeError(
                f"monitor.{what} expects a dict {{tap_name: array [..., d]}} of activations, got "
                f"{got}; wrap a single tap as {{'name': x}}, or use the estimator without a monitor"
            )

    def score(fitted: dict[str, Any], taps: Mapping[str, Any], *, mask=None) -> dict[str, Any]:
        virt, entries = resolve(list(fitted), taps, "score")
        out = {}
        singles, rest = groups_of(entries, virt)
        for members in singles:
            e0 = members[0][0]
            src = virt[e0.taps[0]][0]
            layers = [layer for _, layer in members]
            xs = layer_slice(taps[src], layers)
            ft = stack([fitted[e.key] for e, _ in members])
            try:
                sc = jax.vmap(lambda f, x, est=e0.est: est.score(f, x, mask=mask))(ft, xs)
            except ShapeError as err:
                raise ShapeError(
                    f"monitor: stacked tap {src!r} of shape {list(taps[src].shape)} (layers "
                    f"{layers}): {err}"
                ) from None
            for j, (e, _) in enumerate(members):
                out[e.key] = sc[j]
        out.update(shared_scores(rest, fitted, taps, virt, mask))
        for e in rest:
            if e.key in out:
                continue
            try:
                out[e.key] = e.est.score(fitted[e.key], tap_x(e, taps, virt), mask=mask)
            except ShapeError as err:
                raise tap_error(e, err, taps, virt) from None
        return out

    def shared_scores(entries, fitted, taps, virt, mask) -> dict[str, Any]:
        """Keys that score one tap by bf16 matmuls share one centred block of its rows.

        Each key adds its own offset (``center − mean`` through its matrix) after its matmul.
        Measured (``benchmarks/bench_score.py``, ``gaussian()`` + ``pca_residual(rank=64)`` on
        one bf16 tap): 1.23x (d = 1024) and 1.06x (d = 768) the rows/s of each key centring
        alone; with float32 operands sharing gains nothing (0.98-1.00x) and a single key has
        nothing to share, so only bf16 groups of two or more keys take this path. Fusing the
        keys' matmuls into one (concatenated weights) measured 0.71-0.83x (XLA then writes the
        joint product to memory): not used.
        """
        groups: dict[str, list[tuple[_Entry, Any]]] = {}
        for e in entries:
            fn = nm.block_scorer(e.est.spec) if len(e.taps) == 1 else None
            x = get(taps, virt, e.taps[0])
            f = fitted[e.key]
            mean = getattr(f, "mean", None)
            precision = e.est.spec.params.get("precision", "auto")
            if (
                fn is None
                or not isinstance(mean, jax.Array | jax.core.Tracer)
                or mean.dtype != jnp.float32
                or getattr(x, "ndim", 0) < 1
                or x.shape[-1] != mean.shape[-1]
                or nm.score_operand(x.dtype, precision) != jnp.bfloat16
            ):
                continue  # the key's own score handles (or refuses) it
            groups.setdefault(e.taps[0], []).append((e, fn))
        out = {}
        for tap, members in groups.items():
            x = get(taps, virt, tap)
            # Score only the keys whose block scorer applies (e.g. not a diagonal Gaussian).
            try:
                rows, _, _ = check_rows(x, x.shape[-1], name=f"monitor tap {tap!r}", mask=mask)
            except ShapeError:
                continue  # let the keys' own scores raise, naming the key
            center = fitted[members[0][0].key].mean
            block = nm.CentredBlock(
                centred(nm.matmul_rows(rows), center, jnp.bfloat16), center, jnp.bfloat16
            )
            found = []
            for e, fn in members:
                raw = fn(fitted[e.key], block)
                if raw is not None:
                    found.append((e, raw))
            if len(found) < 2:
                continue  # nothing shared: the keys' own scores are as fast
            for e, raw in found:
                counts = fitted[e.key].counts
                out[e.key] = finish_scores(raw, rows, mask, x.shape[:-1], counts)
        return out

    jit_update, jit_score = jax.jit(update), jax.jit(score)

    def update_checked(state, taps, *, mask=None, weights=None, labels=None):
        checked("update", taps)
        if labels is not None:
            labels = jnp.asarray(labels)
            if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
                raise ShapeError(
                    "monitor.update: labels must be integers with the taps' leading shape "
                    f"(0 = trusted, 1 = flagged, -1 = unknown), got {labels.dtype}"
                )
        return jit_update(state, taps, mask=mask, weights=weights, labels=labels)

    def score_checked(fitted, taps, *, mask=None):
        checked("score", taps)
        return jit_score(fitted, taps, mask=mask)

    return Estimator(init, update_checked, jax.jit(merge), finalize, score_checked, spec)
