"""Calibration: raw scores to p-values and thresholds, and p-values of many taps combined.

A raw score (a Mahalanobis distance, a kNN distance, a monitor's per-tap scores) means nothing
until it is compared with the scores of trusted data. :func:`calibrated` wraps any estimator
(a single detector or a whole monitor, whose scores are a dict keyed by tap) and learns, from
held-out trusted rows, a quantile sketch of its scores (:func:`jaxmon.quantiles`, one per score
leaf). Then

* ``score`` returns ``-log10 p`` (higher = more anomalous), with the conformal p-value
  ``p = (1 + #{calibration scores >= s}) / (1 + n)``: under exchangeability with the held-out
  rows, ``P(p <= a) <= a``, so a calibrated score of 2 means "rarer than 1 in 100 trusted rows".
  Beyond the largest held-out score the p-value continues along a generalized Pareto tail
  fitted to the top held-out scores (:func:`jaxmon.upper_tail`), so it keeps decreasing
  strictly with the raw score instead of tying at ``1 / (n + 1)``: the strongest anomalies stay
  ordered. There (below ``1 / (n + 1)``) the p-value is a model extrapolation, not a conformal
  guarantee. ``score`` is computed in log space and never saturates; rows holding NaN/inf get
  ``p = 0`` and score ``+inf``;
* :func:`p_values` returns those p-values and :func:`threshold` the raw-score threshold for a
  target false-positive rate;
* :func:`combine` merges the p-values of many taps into one p-value (Fisher, or min-p with
  Bonferroni or Šidák/Tippett), whose ``-log10`` is one calibrated score per row.

The two-pass protocol
---------------------
The calibrated estimator is an ordinary :class:`~jaxmon.Estimator` whose state carries a phase:

1. **fit** (phase 0): ``update`` folds rows into the inner estimator's state, exactly as the
   inner ``update`` would. Merge replicas as usual.
2. ``state = jaxmon.begin_calibration(cal, state)`` finalizes the inner state once, stores the
   fitted value in the state and switches to phase 1. Merge all replicas of phase 0 *before*
   this step: every replica must start phase 1 from the same fitted value.
3. **calibrate** (phase 1): ``update`` scores *held-out* trusted rows with the stored fitted
   value and folds the scores into the sketches (the inner state is frozen). ``merge`` adds the
   sketches exactly, so this pass shards and checkpoints like any other.
4. ``fitted = cal.finalize(state)``; ``cal.score``, :func:`p_values`, :func:`threshold`.

The same jitted ``update`` serves both passes (the phase is data, not structure: no retrace).
Rows of the fitting pass must not be reused for calibration: their scores are optimistically
small and the p-values would be anti-conservative.

The state holds the inner state, the inner fitted value and one sketch per score leaf
(``2^(9+m)`` buckets, 256 KiB at the default accuracy), so it is about twice the inner state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxmon._base import (
    Estimator,
    EstimatorSpec,
    ShapeError,
    _words_to_int,
    from_spec,
    is_traced,
    label_kwargs,
    register,
    trusted_mask,
)
from jaxmon.errors import ConfigError, NotFittedError
from jaxmon.estimators.quantiles import (
    QuantilesFitted,
    QuantilesState,
    log_upper_tail,
    quantile,
    quantiles,
)

__all__ = [
    "calibrated",
    "begin_calibration",
    "p_values",
    "p_values_of_scores",
    "threshold",
    "combine",
    "CalibratedState",
    "CalibratedFitted",
]

_SCALAR = jax.ShapeDtypeStruct((), jnp.float32)


class CalibratedState(NamedTuple):
    """State of :func:`calibrated` (see the module docstring for the two phases)."""

    inner: Any  # the wrapped estimator's state: updated in phase 0, frozen in phase 1
    fitted: Any  # inner.finalize(inner), set by begin_calibration (zeros in phase 0)
    scores: Any  # pytree like the inner scores, of QuantilesState: held-out scores (phase 1)
    phase: jax.Array  # shape=(), dtype=int32: 0 = fitting, 1 = calibrating


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["inner", "scores"], meta_fields=["spec"]
)
@dataclasses.dataclass(frozen=True)
class CalibratedFitted:
    """Fitted value of :func:`calibrated`: the inner fitted value and the score sketches.

    ``spec`` (static pytree metadata, the calibrated estimator's JSON spec) lets
    :func:`p_values` find the inner ``score`` with no estimator in hand.
    """

    inner: Any  # the wrapped estimator's fitted value
    scores: Any  # pytree like the inner scores, of QuantilesFitted
    spec: str  # static: the calibrated estimator's spec JSON


def _is_sketch(x) -> bool:
    return isinstance(x, QuantilesState | QuantilesFitted)


def _leaf_masks(scores: Any, mask: Any, *, what: str) -> list[Any]:
    """One mask per score leaf (flattened order): None, a shared array, or a matching tree."""
    leaves = jax.tree.leaves(scores)
    if mask is None:
        return [None] * len(leaves)
    if hasattr(mask, "shape"):
        m = jnp.asarray(mask).astype(bool)
        for s in leaves:
            if tuple(s.shape) != tuple(m.shape):
                raise ShapeError(
                    f"calibrated.{what}: mask of shape {list(m.shape)} does not match a score of "
                    f"shape {list(s.shape)}; give the mask the rows' leading shape"
                )
        return [m] * len(leaves)
    masks = jax.tree.leaves(mask)
    if len(masks) != len(leaves):
        raise ShapeError(
            f"calibrated.{what}: a mask tree must match the scores' structure "
            f"{jax.tree.structure(scores)}, got {jax.tree.structure(mask)}"
        )
    return [jnp.asarray(mk).astype(bool) for mk in masks]


def _log_p_values_of(inner_score: Any, fitted: CalibratedFitted, x, mask) -> Any:
    """Natural-log p-values of ``x``'s inner scores (0 on masked rows)."""
    s = inner_score(fitted.inner, x, mask=mask)
    return _log_p_of_scores(fitted, s, _leaf_masks(s, mask, what="p_values"))


# The inner score function is static: from_spec gives one estimator object per spec, so each
# calibrated spec compiles once (jit's own cache, no registry here).
_log_p_values_jit = jax.jit(_log_p_values_of, static_argnums=0)


def _log_p_of_scores(fitted: CalibratedFitted, scores: Any, masks: list[Any]) -> Any:
    leaves, treedef = jax.tree.flatten(scores)
    sketches = jax.tree.leaves(fitted.scores, is_leaf=_is_sketch)
    if len(sketches) != len(leaves):
        raise ShapeError(
            f"calibrated: {len(leaves)} score arrays for {len(sketches)} calibrated keys; give "
            f"the raw scores with the inner scores' structure {jax.tree.structure(fitted.scores)}"
        )
    out = []
    for sk, sc, mk in zip(sketches, leaves, masks, strict=True):
        lp = log_upper_tail(sk, sc)
        out.append(lp if mk is None else jnp.where(mk, lp, jnp.zeros((), lp.dtype)))
    return jax.tree.unflatten(treedef, out)


def p_values_of_scores(fitted: CalibratedFitted, scores: Any, *, log: bool = False) -> Any:
    """p-values of raw inner scores already computed (no rescoring; jittable).

    ``calibrated(est).score`` and :func:`p_values` score the rows with the inner estimator and
    look the scores up in the calibration sketches; when the raw scores are at hand (a batch
    query that keeps them), this does the lookup alone, so the rows are scored once.

    Args:
      fitted: a :class:`CalibratedFitted`.
      scores: raw inner scores with the inner scores' structure (e.g. ``{key: [...]}``).
      log: return natural-log p-values.

    Returns:
      p-values (or their logs) with the structure of ``scores``; ``+inf``/NaN scores give 0.
    """
    lp = _log_p_of_scores(fitted, scores, [None] * len(jax.tree.leaves(scores)))
    return lp if log else jax.tree.map(jnp.exp, lp)


@register("calibrated")
def calibrated(
    estimator: Estimator | Mapping[str, Any], *, relative_accuracy: float = 0.01
) -> Estimator:
    """Wraps ``estimator`` so that its scores become calibrated p-values (two passes).

    Args:
      estimator: any :class:`~jaxmon.Estimator` (or its spec dict), including a monitor whose
        scores are a dict keyed by tap.
      relative_accuracy: of the score sketches (:func:`jaxmon.quantiles`): thresholds are within
        this relative error of the exact empirical quantile of the held-out scores.

    Returns:
      An :class:`~jaxmon.Estimator` with a :class:`CalibratedState` and a
      :class:`CalibratedFitted`. ``score(fitted, x, *, mask=None)`` returns, with the inner
      scores' structure, ``-log10`` of the conformal upper-tail p-value (higher = more
      anomalous; masked rows 0). ``update``'s ``weights`` go to the inner estimator in pass 1;
      in pass 2 they are integer repetition counts of the held-out rows.

    Example:
      >>> cal = jaxmon.calibrated(jaxmon.gaussian(shrinkage="ledoit_wolf"))
      >>> s = cal.update(cal.init(example), trusted_fit)          # pass 1
      >>> s = jaxmon.begin_calibration(cal, s)
      >>> s = cal.update(s, trusted_heldout)                      # pass 2
      >>> fitted = cal.finalize(s)
      >>> t = jaxmon.threshold(fitted, fpr=0.01)                  # raw-score threshold
      >>> flags = cal.score(fitted, x) >= 2.0                     # p <= 0.01
    """
    if isinstance(estimator, Estimator):
        inner = estimator
    elif isinstance(estimator, Mapping | str | EstimatorSpec):
        inner = from_spec(estimator)
    else:
        raise ConfigError(
            f"calibrated: expected a jaxmon Estimator (e.g. jaxmon.gaussian()), got "
            f"{type(estimator).__name__}; did you pass the factory instead of calling it?"
        )
    spec = EstimatorSpec(
        "calibrated",
        {"estimator": inner.spec.to_dict(), "relative_accuracy": float(relative_accuracy)},
        mergeable=inner.spec.mergeable,
        supervised=inner.spec.supervised,
    )
    parts = _Calibration(inner, quantiles(relative_accuracy=relative_accuracy), spec.to_json())
    return Estimator(
        parts.init,
        jax.jit(parts.update),
        jax.jit(parts.merge),
        parts.finalize,
        jax.jit(parts.score),
        spec,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _Calibration:
    """The functions of one :func:`calibrated` estimator and what they share.

    The estimator's ``init`` is this object's bound method, so :func:`begin_calibration` finds
    the inner estimator on the estimator it is given (:func:`_calibration_of`).
    """

    inner: Estimator
    sketch: Estimator  # jaxmon.quantiles(relative_accuracy=...): one per score leaf
    spec_json: str  # the calibrated estimator's spec, stored on its fitted value

    def init(self, example) -> CalibratedState:
        inner_state = self.inner.init(example)
        fitted_shape = jax.eval_shape(self.inner.finalize, inner_state)
        score_shape = jax.eval_shape(self.inner.score, fitted_shape, example)
        fitted = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), fitted_shape)
        scores = jax.tree.map(lambda _: self.sketch.init(_SCALAR), score_shape)
        return CalibratedState(inner_state, fitted, scores, jnp.zeros((), jnp.int32))

    def update(self, state: CalibratedState, x, *, mask=None, weights=None, labels=None):
        def fit(st: CalibratedState) -> CalibratedState:
            kw = label_kwargs(self.inner, mask, labels)
            return st._replace(inner=self.inner.update(st.inner, x, weights=weights, **kw))

        def calibrate(st: CalibratedState) -> CalibratedState:
            # The null distribution is that of trusted rows only: flagged rows never enter it.
            trusted = trusted_mask(mask, labels)
            return st._replace(scores=self._fold_scores(st.scores, st.fitted, x, trusted, weights))

        return jax.lax.cond(state.phase == 0, fit, calibrate, state)

    def _fold_scores(self, sketches, fitted, x, mask, weights):
        s = self.inner.score(fitted, x, mask=mask)
        leaves = jax.tree.leaves(s)
        sks, treedef = jax.tree.flatten(sketches, is_leaf=_is_sketch)
        masks = _leaf_masks(s, mask, what="update")
        # Rows whose inner score is NaN/inf (a NaN input row) are excluded and counted here.
        new = [
            self.sketch.update(sk, sc, mask=mk, weights=weights)
            for sk, sc, mk in zip(sks, leaves, masks, strict=True)
        ]
        return jax.tree.unflatten(treedef, new)

    def merge(self, a: CalibratedState, b: CalibratedState) -> CalibratedState:
        both_fitting = (a.phase == 0) & (b.phase == 0)
        take_a = a.phase >= b.phase
        merged = self.inner.merge(a.inner, b.inner)
        pick = lambda u, v: jnp.where(take_a, u, v)
        # Phase 1 states share one inner state and fitted value (begin_calibration of one
        # merged state); only their sketches hold different rows.
        inner_state = jax.tree.map(
            lambda m, u, v: jnp.where(both_fitting, m, pick(u, v)), merged, a.inner, b.inner
        )
        fitted = jax.tree.map(pick, a.fitted, b.fitted)
        scores = jax.tree.map(self.sketch.merge, a.scores, b.scores, is_leaf=_is_sketch)
        return CalibratedState(inner_state, fitted, scores, jnp.maximum(a.phase, b.phase))

    def finalize(self, state: CalibratedState) -> CalibratedFitted:
        if not is_traced(state):
            if int(state.phase) == 0:
                raise NotFittedError(
                    "calibrated.finalize: the state is still in the fitting pass; call "
                    "state = jaxmon.begin_calibration(cal, state), then update with held-out "
                    "trusted rows, then finalize"
                )
            _require_calibration_rows(state)
        return _finalize_sketches(self.sketch.finalize, self.spec_json, state)

    def score(self, fitted: CalibratedFitted, x, *, mask=None):
        lp = _log_p_values_of(self.inner.score, fitted, x, mask)
        # log p = 0 on masked rows, so their calibrated score is exactly 0; -log10 from log p
        # never saturates, so scores past the calibration set stay ordered.
        return jax.tree.map(lambda v: -v / jnp.log(jnp.float32(10.0)), lp)


def _require_calibration_rows(state: CalibratedState) -> None:
    """Refuses a calibration pass that folded no held-out rows into some score sketch."""
    paths = jax.tree_util.tree_leaves_with_path(state.scores, is_leaf=_is_sketch)
    words = jax.device_get([(sk.counts.rows, sk.counts.nonfinite) for _, sk in paths])
    for (path, _), (rows, bad) in zip(paths, words, strict=True):
        if _words_to_int(rows) == 0:
            key = jax.tree_util.keystr(path) or "the scores"
            why = f"all {_words_to_int(bad):,} scored NaN/inf" if _words_to_int(bad) else "none"
            raise NotFittedError(
                f"calibrated.finalize: the calibration pass saw no rows for {key} ({why}): "
                "after begin_calibration, update with held-out trusted rows, then finalize"
            )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _finalize_sketches(sketch_finalize, spec_json: str, state: CalibratedState) -> CalibratedFitted:
    sketches = jax.tree.map(sketch_finalize, state.scores, is_leaf=_is_sketch)
    return CalibratedFitted(state.fitted, sketches, spec_json)


def _calibration_of(cal: Estimator) -> _Calibration:
    """The shared parts of a calibrated estimator (rebuilt from its spec for a hand-made one)."""
    parts = getattr(cal.init, "__self__", None)
    if isinstance(parts, _Calibration):
        return parts
    return from_spec(cal.spec).init.__self__


def _inner_for(spec_json: str) -> Estimator:
    """The inner estimator of the calibrated estimator with this spec (``from_spec``, cached)."""
    return _calibration_of(from_spec(spec_json)).inner


def begin_calibration(cal: Estimator, state: CalibratedState) -> CalibratedState:
    """Ends the fitting pass: finalizes the inner state and switches ``state`` to phase 1.

    Merge every replica of the fitting pass first; the returned state is then copied to (or
    replicated over) the devices that stream the held-out rows.

    Args:
      cal: the estimator returned by :func:`calibrated`.
      state: its state after the fitting pass.

    Returns:
      A :class:`CalibratedState` in phase 1 with the inner fitted value stored and empty
      score sketches; same structure, shapes and dtypes as ``state``.
    """
    if cal.spec.name != "calibrated":
        raise ConfigError(
            f"begin_calibration: expected an estimator made by jaxmon.calibrated(...), got "
            f"{cal.spec.name!r}"
        )
    fitted = _calibration_of(cal).inner.finalize(state.inner)
    fitted = jax.tree.map(lambda z, f: jnp.asarray(f, z.dtype), state.fitted, fitted)
    empty = jax.tree.map(
        lambda sk: jax.tree.map(jnp.zeros_like, sk)._replace(
            minimum=jnp.full_like(sk.minimum, jnp.inf), maximum=jnp.full_like(sk.maximum, -jnp.inf)
        ),
        state.scores,
        is_leaf=_is_sketch,
    )
    return CalibratedState(state.inner, fitted, empty, jnp.ones((), jnp.int32))


def p_values(fitted: CalibratedFitted, x, *, mask=None, log: bool = False):
    """Upper-tail p-values of ``x``'s inner scores, with the inner scores' structure.

    Conformal up to the largest held-out score, ``(1 + #{held-out scores >= s}) / (1 + n)``;
    beyond it, the fitted generalized Pareto tail (module docstring), strictly decreasing.

    Args:
      fitted: a :class:`CalibratedFitted`.
      x: rows (or a dict of taps) as the inner estimator's ``score`` takes them.
      mask: as for ``score``; masked rows get p = 1.
      log: return ``log p`` (natural log), which never underflows: float32 p-values round to
        0 below ~1e-45, far enough out; their logs stay ordered.

    Returns:
      p-values in ``[0, 1]`` (0 only for rows holding NaN/inf, or past float32's range), or
      their logs.

    Raises:
      NotFittedError: ``fitted`` was fitted (or calibrated) on no rows.
    """
    if not isinstance(fitted, CalibratedFitted):
        raise ConfigError(
            f"p_values: expected the fitted value of jaxmon.calibrated(...), got "
            f"{type(fitted).__name__}"
        )
    if not is_traced(fitted):
        totals = jax.device_get(
            [sk.total for sk in jax.tree.leaves(fitted.scores, is_leaf=_is_sketch)]
        )
        if any(float(t) == 0 for t in totals):
            raise NotFittedError(
                "p_values: the calibrated fitted value holds an empty score sketch (its "
                "calibration pass saw no rows); calibrate on held-out trusted rows first"
            )
    lp = _log_p_values_jit(_inner_for(fitted.spec).score, fitted, x, mask)
    return lp if log else jax.tree.map(jnp.exp, lp)


def threshold(fitted: CalibratedFitted | QuantilesFitted, *, fpr: float = 0.01):
    """Raw-score threshold(s) for a target false-positive rate on trusted data.

    Flagging rows whose *inner* (raw) score is ``>= threshold`` flags a fraction ``fpr`` of
    held-out trusted rows, up to the sketch's relative accuracy and ``1/n``. On the calibrated
    scale the equivalent rule is ``cal.score(...) >= -log10(fpr)`` (conformal: at most ``fpr``).

    Args:
      fitted: a :class:`CalibratedFitted` (or a single :class:`QuantilesFitted`).
      fpr: the target false-positive rate, in (0, 1).

    Returns:
      The ``1 - fpr`` quantile of the held-out scores, with the inner scores' structure.
    """
    if not 0.0 < float(fpr) < 1.0:
        raise ConfigError(f"threshold: fpr must lie in (0, 1), got {fpr!r}")
    sketches = fitted.scores if isinstance(fitted, CalibratedFitted) else fitted
    return jax.tree.map(lambda qf: quantile(qf, 1.0 - float(fpr)), sketches, is_leaf=_is_sketch)


_METHODS = ("fisher", "bonferroni", "min_p", "tippett", "cauchy")


def combine(
    p_values,
    *,
    method: str = "bonferroni",
    axis: int | None = None,
    log: bool = False,
    log_inputs: bool = False,
) -> jax.Array:
    """Combines the p-values of many taps into one p-value per row (jittable).

    Args:
      p_values: a container (dict, list, tuple; e.g. ``{tap: p[...]}`` from :func:`p_values`)
        of equally shaped arrays, one per tap; or one array with the taps along ``axis``
        (default 0: a 1-D array of k p-values gives one combined p-value, as
        ``scipy.stats.combine_pvalues``).
      method: ``"bonferroni"`` (default) or its alias ``"min_p"`` (the minimum p with
        Bonferroni's correction, ``min(1, k · min p)``: valid under any dependence, sensitive
        to one strong tap); ``"fisher"`` (``-2 Σ log p ~ χ²(2k)``: sensitive to evidence
        spread over many taps, valid for independent taps, anti-conservative for correlated
        ones);
        ``"tippett"`` (``1 - (1 - min p)^k``, Šidák: exact for independent taps);
        ``"cauchy"`` (Liu & Xie 2020: ``T = mean tan((1/2 − p) π)``, ``p = 1/2 − arctan(T)/π``:
        the Cauchy tail makes it approximately valid under arbitrary dependence between taps
        for small p, while it still pools evidence like Fisher).
        Why Bonferroni is the default: measured on the demo (27 keys of one model's taps,
        strongly dependent; ``benchmarks/results/demo.md``), against the median and the best
        single key's AUROC over 3 anomaly kinds x token/sequence level, Bonferroni stayed at
        or above the median key in 4 of 6 rows (Fisher 3, Cauchy 2) and was the best of the
        three where a key finds the anomaly (triggered tokens: 0.999 vs the best key's
        0.998, Fisher 0.994, Cauchy 0.998). Where no key separates a kind (median AUROC
        0.50-0.64), no combination of one-sided p-values reached the median key; there, rank
        keys with a few labelled examples (:func:`jaxmon.rank_detectors`) or fit a probe.
      axis: the tap axis when ``p_values`` is one array.
      log: return the natural log of the combined p-value instead. It never underflows: strong
        evidence spread over many taps gives Fisher p-values far below float32's smallest
        number (``1e-38``), where the plain p-value is 0 and ``-log10`` of it infinite.
      log_inputs: ``p_values`` are natural-log p-values (``jaxmon.p_values(..., log=True)``),
        so evidence beyond float32's range is not clamped before it is combined.

    Returns:
      The combined p-value (or its natural log); ``-log10`` of it is one calibrated score
      (higher = more anomalous). A p-value of 0 (a row holding NaN/inf) combines to 0.

    Raises:
      ConfigError: an unknown ``method`` or no p-values.
      ShapeError: the taps' p-values differ in shape.
    """
    if method not in _METHODS:
        raise ConfigError(f"combine: method must be one of {_METHODS}, got {method!r}")
    if hasattr(p_values, "shape"):
        p = jnp.asarray(p_values, jnp.float32)
        axis = 0 if axis is None else axis
    else:
        if axis is not None:
            raise ConfigError("combine: axis applies to a single array of p-values only")
        leaves = jax.tree.leaves(p_values)
        if not leaves:
            raise ConfigError("combine: no p-values given")
        shapes = {tuple(jnp.shape(v)) for v in leaves}
        if len(shapes) != 1:
            raise ShapeError(f"combine: every tap's p-values must share one shape, got {shapes}")
        p = jnp.stack([jnp.asarray(v, jnp.float32) for v in leaves], axis=0)
        axis = 0
    return _combine(p, method, axis, log, log_inputs)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _combine(p: jax.Array, method: str, axis: int, log: bool, log_inputs: bool) -> jax.Array:
    k = p.shape[axis]
    # Everything in log space: p-values far below float32's range keep their evidence.
    lp = jnp.minimum(p, 0.0) if log_inputs else jnp.log(jnp.clip(p, 0.0, 1.0))
    if method == "fisher":
        x = -jnp.sum(lp, axis=axis)  # half the chi2(2k) statistic -2 Σ log p
        if not log:
            # chi2(2k) survival function = regularised upper incomplete gamma Q(k, x).
            return jax.scipy.special.gammaincc(jnp.float32(k), x)
        # For integer k, Q(k, x) = e^-x Σ_{i<k} x^i / i! (a Poisson tail): its log is exact
        # where Q itself underflows.
        i = jnp.broadcast_to(jnp.arange(k, dtype=jnp.float32), (*x.shape, k))
        lx = jnp.broadcast_to(jnp.log(x)[..., None], i.shape)
        terms = jnp.where(i == 0, 0.0, i * lx) - jax.scipy.special.gammaln(i + 1)
        return -x + jax.scipy.special.logsumexp(terms, axis=-1)
    if method == "cauchy":
        return _cauchy(jnp.moveaxis(lp, axis, 0), log)
    lmin = jnp.min(lp, axis=axis)
    if method == "tippett":
        # 1 - (1 - p)^k without cancellation for small p: -expm1(k log1p(-p)); below 1e-9 its
        # log is log k + log p to float32 precision (and that form cannot underflow).
        q = -jnp.expm1(k * jnp.log1p(-jnp.exp(lmin)))
        lq = jnp.where(lmin < -20.0, jnp.log(jnp.float32(k)) + lmin, jnp.log(q))
        return lq if log else jnp.exp(lq)
    lb = jnp.minimum(0.0, jnp.log(jnp.float32(k)) + lmin)
    return lb if log else jnp.exp(lb)


def _cauchy(lp: jax.Array, log: bool) -> jax.Array:
    """Cauchy combination (equal weights) of log p-values ``lp[k, ...]``."""
    k = lp.shape[0]
    p = jnp.exp(lp)
    # tan((1/2 - p) π) = 1 / tan(p π) for p < 1/2 (no cancellation in 1/2 - p); below 1e-13 it
    # is 1 / (π p) to float32 precision, kept as a log so that it cannot overflow.
    small = lp < -30.0
    t = jnp.where(p < 0.5, 1.0 / jnp.tan(jnp.pi * p), -jnp.tan((p - 0.5) * jnp.pi))
    t = jnp.where(small, 0.0, t)
    log_big = jnp.where(small, -lp - jnp.log(jnp.pi), -jnp.inf)
    # T = (Σ t + Σ exp(log_big)) / k, with the huge terms kept in log space.
    lse = jax.scipy.special.logsumexp(log_big, axis=0)
    rest = jnp.sum(t, axis=0)
    any_big = jnp.any(small, axis=0)
    # Where some term is huge: log T = lse + log1p(rest / e^lse) - log k, and p ≈ 1 / (π T).
    log_t = lse + jnp.log1p(rest * jnp.exp(-jnp.where(any_big, lse, 0.0))) - jnp.log(1.0 * k)
    log_huge = -jnp.log(jnp.pi) - log_t
    tt = rest / k
    plain = 0.5 - jnp.arctan(tt) / jnp.pi
    # For large T, 1/2 - arctan(T)/π = arctan(1/T)/π keeps its digits.
    plain = jnp.where(tt > 1.0, jnp.arctan(1.0 / tt) / jnp.pi, plain)
    out_log = jnp.where(any_big, log_huge, jnp.log(plain))
    out_log = jnp.where(jnp.any(jnp.isneginf(lp), axis=0), -jnp.inf, out_log)
    return out_log if log else jnp.exp(out_log)
