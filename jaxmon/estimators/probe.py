"""Linear probes: detectors fitted from a handful of labelled (flagged) examples.

Unsupervised detectors learn what "normal" looks like and flag departures from it; on hard
cases (a trigger inside ordinary text, word-shuffled text) every one of them can sit near
chance. A *probe* uses a few flagged examples of a known failure class as well (the linear
"deception" probes of the field), and learns a direction in activation space that separates
that class from trusted rows. Labels arrive through the estimator contract:
``update(state, x, *, mask=None, weights=None, labels=None)`` with ``labels[...]`` int,
0 = trusted, 1 = flagged, -1 = unknown (ignored); ``labels=None`` means every row is trusted.

Kinds:

* ``"mean_difference"`` (default): the direction ``Σ⁻¹ (μ₁ − μ₀)`` with ``Σ`` the covariance of
  the *trusted* rows, shrunk toward its diagonal with a Ledoit–Wolf intensity
  (:func:`scale_free_covariance`, as scikit-learn's LDA with ``shrinkage="auto"``). Only the
  trusted class keeps a d×d state; the flagged class keeps its mean (and diagonal moments), so
  an update costs one Gram, as ``gaussian()``.
* ``"lda"``: Fisher's linear discriminant: the same direction with the *pooled* within-class
  covariance (both classes keep full moments: two Grams per update).
* ``"logistic"``: L2-regularised logistic regression trained by streaming optax (Adam) steps on
  standardised rows, with the two classes weighted equally in each batch's loss. Like
  :func:`jaxmon.flow`, it learns by gradient: ``spec.mergeable`` is False and ``merge``
  averages parameters (weighted by rows); each ``update`` is one step, so batches must carry
  flagged rows for it to learn (mix the few flagged examples into every batch).

Moment-based kinds are exact summaries: class-conditional :class:`~jaxmon._numerics.Moments`
(Chan merges, exact counters, bf16 in), so states merge exactly across batches, devices and
hosts, and ``finalize`` does the only non-mergeable work (shrinkage, Cholesky, the solve).

Scores are projections on the direction, centred between the class means: higher means more
like the flagged class. Wrap in :func:`jaxmon.calibrated` for p-values against trusted rows
(the calibration pass folds label-0 rows only), or rank detectors with
:func:`jaxmon.rank_detectors`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmon import _numerics as nm
from jaxmon._base import (
    Counts,
    Estimator,
    EstimatorSpec,
    check_labels,
    check_rows,
    feature_dim,
    finish_scores,
    is_traced,
    num_rows,
    register,
    valid_rows,
)
from jaxmon.errors import ConfigError, NotFittedError

__all__ = ["probe", "ProbeState", "ProbeFitted", "LogisticProbeState", "scale_free_covariance"]

_KINDS = ("mean_difference", "lda", "logistic")
_COVARIANCES = ("trusted", "pooled", "identity")


class ProbeState(NamedTuple):
    """Class-conditional moments of a moment-based probe (``mean_difference``, ``lda``)."""

    trusted: nm.Moments  # rows labelled 0 (or every row when no labels are given): full d×d
    flagged: nm.Moments  # rows labelled 1: full d×d (pooled covariance) or diagonal (else)


class LogisticProbeState(NamedTuple):
    """State of the logistic probe: class moments for standardisation, parameters, optimizer."""

    trusted: nm.Moments  # diagonal moments of trusted rows
    flagged: nm.Moments  # diagonal moments of flagged rows
    params: dict[str, jax.Array]  # {"w": (d,), "b": ()}: the logit on standardised rows
    opt_state: Any  # optax Adam state
    step: jax.Array  # shape=(), dtype=int32: optimizer steps taken


class ProbeFitted(NamedTuple):
    """A fitted linear probe: ``score(x) = (x − center) · direction``."""

    center: jax.Array  # shape=(d,): the midpoint of the class means (moments) / mean (logistic)
    direction: jax.Array  # shape=(d,): Σ⁻¹ (μ₁ − μ₀), or the logistic weights over σ
    bias: jax.Array  # shape=(): added to the projection (the logistic intercept; 0 otherwise)
    mean_trusted: jax.Array  # shape=(d,)
    mean_flagged: jax.Array  # shape=(d,)
    shrinkage: jax.Array  # shape=(): the shrinkage intensity applied to Σ (0 for logistic)
    separation: jax.Array  # shape=(): Mahalanobis distance of the means, √((μ₁−μ₀)ᵀΣ⁻¹(μ₁−μ₀))
    counts: Counts  # trusted rows the fit saw (zero rows: every score is NaN)
    flagged_counts: Counts  # flagged rows the fit saw


def scale_free_covariance(m: nm.Moments, shrinkage) -> tuple[jax.Array, jax.Array]:
    """``((1 − s) S + s diag(S), s)``: covariance shrunk toward its diagonal, scale-free.

    As scikit-learn's ``LinearDiscriminantAnalysis(shrinkage="auto")``: the intensity is
    Ledoit–Wolf's (or OAS's) on the *standardised* rows (the correlation matrix ``R``, shrunk
    toward ``I``), so features of very different scales (outlier dimensions of a residual
    stream) are not shrunk toward a common variance. Ledoit–Wolf needs ``Σ |z|⁴`` of the
    standardised rows, which no stream can hold before the scales are known; it is estimated
    as ``κ (d² + 2‖R‖²_F)`` per row, the Gaussian value scaled by the kurtosis ratio
    ``κ = Σ|x − μ|⁴ / (n ((tr S)² + 2‖S‖²_F))`` measured exactly on the raw rows.

    Args:
      m: full moments.
      shrinkage: ``"ledoit_wolf"``, ``"oas"``, a float in [0, 1], or None.
    """
    n = m.weight
    emp = nm.covariance(m)
    d = emp.shape[0]
    var = jnp.diagonal(emp)
    if shrinkage is None:
        return emp, jnp.zeros((), emp.dtype)
    if isinstance(shrinkage, float | int):
        s = jnp.asarray(float(shrinkage), emp.dtype)
    else:
        pos = var > 0
        inv = jnp.where(pos, jax.lax.rsqrt(jnp.where(pos, var, 1.0)), 0.0)
        r = inv[:, None] * emp * inv[None, :]
        mu = jnp.trace(r) / d
        r2 = jnp.sum(r * r)
        if shrinkage == "oas":
            alpha = r2 / (d * d)
            num = alpha + mu**2
            den = (n + 1) * (alpha - mu**2 / d)
            s = jnp.where(den == 0, 1.0, jnp.minimum(num / jnp.where(den == 0, 1.0, den), 1.0))
        else:
            tr = jnp.trace(emp)
            gauss = tr * tr + 2 * jnp.sum(emp * emp)
            kappa = jnp.where(
                gauss > 0, (m.m4 / jnp.maximum(n, 1)) / jnp.where(gauss > 0, gauss, 1), 1
            )
            z4 = kappa * (jnp.sum(pos).astype(r2.dtype) ** 2 + 2 * r2)  # per-row mean of |z|⁴
            beta = (z4 - r2) / (d * jnp.maximum(n, 1))
            delta = (r2 - 2 * mu * jnp.trace(r) + d * mu**2) / d
            beta = jnp.minimum(beta, delta)
            s = jnp.where(beta <= 0, 0.0, beta / jnp.where(delta == 0, 1.0, delta))
    cov = (1 - s) * emp + s * jnp.diag(var)
    return cov, s


def _class_rows(rows, mask, labels, weights):
    """(trusted mask, flagged mask) over rows; ``labels=None``: every row is trusted."""
    base = jnp.ones(rows.shape[:1], bool) if mask is None else mask
    if weights is not None:
        base = base & (weights > 0)
    if labels is None:
        return base, jnp.zeros_like(base)
    return base & (labels == 0), base & (labels == 1)


def _require_classes(state: Any, name: str) -> None:
    """Refuses (outside jit) a fit that lacks trusted or flagged rows."""
    if is_traced(state):
        return
    n0, n1 = num_rows(state.trusted), num_rows(state.flagged)
    if n0 == 0 or n1 == 0:
        missing = "trusted (label 0)" if n0 == 0 else "flagged (label 1)"
        raise NotFittedError(
            f"{name}.finalize: the state holds {n0:,} trusted and {n1:,} flagged rows; a probe "
            f"needs both, and has no rows labelled {missing}: pass labels= to update"
        )


@register("probe")
def probe(
    kind: str = "mean_difference",
    *,
    covariance: str | None = None,
    shrinkage: float | str | None = "ledoit_wolf",
    ridge: float = 1e-6,
    l2: float = 1e-3,
    learning_rate: float = 1e-2,
) -> Estimator:
    """A linear probe fitted from labelled rows (see the module docstring).

    Args:
      kind: ``"mean_difference"`` (default), ``"lda"`` or ``"logistic"``.
      covariance: for moment kinds, ``Σ`` of the direction ``Σ⁻¹(μ₁ − μ₀)``: ``"trusted"``
        (default of ``mean_difference``), ``"pooled"`` (within-class, default of ``lda``) or
        ``"identity"`` (the plain mean difference, "mass-mean" probe).
      shrinkage: of ``Σ`` toward its diagonal (:func:`scale_free_covariance`):
        ``"ledoit_wolf"`` (default), ``"oas"``, a float in [0, 1] or None.
      ridge: added to ``Σ``'s diagonal (times its mean variance) before the Cholesky solve.
      l2: the logistic kind's L2 penalty on the weights (standardised units).
      learning_rate: the logistic kind's Adam step size (one step per ``update``); its
        weights start at zero (the loss is convex: no random initialisation).

    Returns:
      An :class:`~jaxmon.Estimator` with ``spec.supervised`` True: ``update`` takes
      ``labels=`` (0 trusted, 1 flagged, -1 unknown). ``finalize`` gives a
      :class:`ProbeFitted`; ``score(fitted, x)`` is the projection on the probe direction:
      higher means more like the flagged class.

    Example:
      >>> pr = jaxmon.probe()
      >>> s = pr.update(pr.init(jax.ShapeDtypeStruct((768,), jnp.bfloat16)), acts, labels=y)
      >>> scores = pr.score(pr.finalize(s), queries)
    """
    if kind not in _KINDS:
        raise ConfigError(f"probe: kind must be one of {_KINDS}, got {kind!r}")
    if kind == "logistic":
        if covariance is not None:
            raise ConfigError("probe: covariance= applies to the moment kinds, not 'logistic'")
        if not float(l2) >= 0 or not float(learning_rate) > 0:
            raise ConfigError("probe: l2 must be >= 0 and learning_rate > 0")
        return _logistic(float(l2), float(learning_rate))
    covariance = covariance or ("pooled" if kind == "lda" else "trusted")
    if covariance not in _COVARIANCES:
        raise ConfigError(f"probe: covariance must be one of {_COVARIANCES}, got {covariance!r}")
    if shrinkage is not None and not isinstance(shrinkage, str):
        if not 0.0 <= float(shrinkage) <= 1.0:
            raise ConfigError(f"probe: a fixed shrinkage must lie in [0, 1], got {shrinkage}")
        shrinkage = float(shrinkage)
    elif isinstance(shrinkage, str) and shrinkage not in ("ledoit_wolf", "oas"):
        raise ConfigError(
            f"probe: shrinkage must be None, a float, 'ledoit_wolf' or 'oas', got {shrinkage!r}"
        )
    return _moment_probe(kind, covariance, shrinkage, float(ridge))


@functools.lru_cache(maxsize=64)
def _moment_probe(kind: str, covariance: str, shrinkage, ridge: float) -> Estimator:
    # Cached by hyperparameters: equal specs share one set of jitted functions.
    params = {"kind": kind, "covariance": covariance, "shrinkage": shrinkage, "ridge": ridge}
    spec = EstimatorSpec("probe", params, supervised=True)
    name = f"probe({kind})"
    pooled = covariance == "pooled"

    def init(example) -> ProbeState:
        d = feature_dim(example, name=name)
        dt = getattr(example, "dtype", jnp.float32)
        return ProbeState(nm.moments_init(d, dt), nm.moments_init(d, dt, diagonal=not pooled))

    @jax.jit
    def update(state: ProbeState, x, *, mask=None, weights=None, labels=None) -> ProbeState:
        d = state.trusted.mean.shape[0]
        rows, m, w = check_rows(x, d, name=name, mask=mask, weights=weights)
        lab = None if labels is None else check_labels(labels, x.shape[:-1], name=name)
        m0, m1 = _class_rows(rows, m, lab, w)
        return ProbeState(
            nm.moments_update(state.trusted, rows, m0, w),
            nm.moments_update(state.flagged, rows, m1, w),
        )

    @jax.jit
    def merge(a: ProbeState, b: ProbeState) -> ProbeState:
        return ProbeState(
            nm.moments_merge(a.trusted, b.trusted), nm.moments_merge(a.flagged, b.flagged)
        )

    @jax.jit
    def _finalize(state: ProbeState) -> ProbeFitted:
        t, f = state.trusted, state.flagged
        d = t.mean.shape[0]
        diff = f.mean - t.mean
        if covariance == "identity":
            direction, s = diff, jnp.zeros((), t.mean.dtype)
            sep = jnp.sqrt(diff @ diff)
        else:
            # Pooled: within-class scatter (each class about its own mean) over all rows, whose
            # fourth moments add the same way, so Ledoit–Wolf sees the pooled residuals.
            m = t
            if pooled:
                w = t.weight + f.weight
                m = nm.Moments(t.counts, w, t.mean, t.m2 + f.m2, t.m3 + f.m3, t.m4 + f.m4)
            cov, s = scale_free_covariance(m, shrinkage)
            floor = nm.scale_free_ridge(ridge, jnp.trace(cov) / d)
            direction = nm.cholesky_solve(nm.whiten(cov, floor), diff)
            sep = jnp.sqrt(jnp.maximum(diff @ direction, 0.0))
        center = 0.5 * (t.mean + f.mean)
        zero = jnp.zeros((), t.mean.dtype)
        return ProbeFitted(center, direction, zero, t.mean, f.mean, s, sep, t.counts, f.counts)

    def finalize(state: ProbeState) -> ProbeFitted:
        _require_classes(state, name)
        return _finalize(state)

    return Estimator(init, update, merge, finalize, _score(name), spec)


def _score(name: str):
    @jax.jit
    def score(fitted: ProbeFitted, x, *, mask=None):
        rows, _, _ = check_rows(x, fitted.center.shape[0], name=name, mask=mask)
        z = rows.astype(fitted.center.dtype) - fitted.center[None, :]
        out = z @ fitted.direction + fitted.bias
        return finish_scores(out, rows, mask, x.shape[:-1], fitted.counts)

    return score


# --------------------------------------------------------------------------- logistic


def _tx(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def _standardise(t: nm.Moments, f: nm.Moments) -> tuple[jax.Array, jax.Array]:
    """Mean and 1/σ of the rows of both classes (σ floored; identity before any row)."""
    both = nm.moments_merge(t, f)
    var = nm.covariance(both)
    floor = nm.scale_free_ridge(1e-6, jnp.mean(var))
    std = jnp.where(both.weight > 0, jnp.sqrt(var + floor), 1.0)
    return both.mean, 1 / std


@functools.lru_cache(maxsize=64)
def _logistic(l2: float, learning_rate: float) -> Estimator:
    params = {"kind": "logistic", "l2": l2, "learning_rate": learning_rate}
    spec = EstimatorSpec("probe", params, mergeable=False, supervised=True)
    name = "probe(logistic)"

    def init(example) -> LogisticProbeState:
        d = feature_dim(example, name=name)
        acc = nm.acc_dtype(getattr(example, "dtype", jnp.float32))
        params = {"w": jnp.zeros((d,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
        with jax.numpy_dtype_promotion("standard"):
            opt_state = _tx(learning_rate).init(params)
        return LogisticProbeState(
            nm.moments_init(d, acc, diagonal=True),
            nm.moments_init(d, acc, diagonal=True),
            params,
            opt_state,
            jnp.zeros((), jnp.int32),
        )

    def update(state: LogisticProbeState, x, *, mask=None, weights=None, labels=None):
        return _logistic_update(state, x, mask, weights, labels, l2=l2, learning_rate=learning_rate)

    def finalize(state: LogisticProbeState) -> ProbeFitted:
        _require_classes(state, name)
        return _logistic_finalize(state)

    return Estimator(init, update, _logistic_merge, finalize, _score(name), spec)


def _balanced_weights(ok0, ok1, w, acc) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(c0, c1, total)``: per-row loss weights of each class, and the batch's row weight.

    Each class carries half of a batch's loss: a handful of flagged rows among thousands of
    trusted ones still pulls the boundary (class-balanced logistic loss); a batch holding one
    class only gives it the whole loss.
    """
    wt = jnp.ones(ok0.shape, acc) if w is None else w.astype(acc)
    n0 = jnp.sum(jnp.where(ok0, wt, 0))
    n1 = jnp.sum(jnp.where(ok1, wt, 0))
    c0 = jnp.where(ok0, wt, 0) / jnp.maximum(n0, 1e-12) * jnp.where(n1 > 0, 0.5, 1.0)
    c1 = jnp.where(ok1, wt, 0) / jnp.maximum(n1, 1e-12) * jnp.where(n0 > 0, 0.5, 1.0)
    return c0, c1, n0 + n1


@functools.partial(jax.jit, static_argnames=("l2", "learning_rate"))
def _logistic_update(state: LogisticProbeState, x, mask, weights, labels, *, l2, learning_rate):
    """One Adam step of the class-balanced, L2-regularised logistic loss on a batch."""
    name = "probe(logistic)"
    d = state.trusted.mean.shape[0]
    rows, m, w = check_rows(x, d, name=name, mask=mask, weights=weights)
    lab = None if labels is None else check_labels(labels, x.shape[:-1], name=name)
    m0, m1 = _class_rows(rows, m, lab, w)
    t = nm.moments_update(state.trusted, rows, m0, w)
    f = nm.moments_update(state.flagged, rows, m1, w)
    mean, inv_std = _standardise(t, f)
    ok0, _ = valid_rows(rows, m0)
    ok1, _ = valid_rows(rows, m1)
    acc = mean.dtype
    u = jnp.where((ok0 | ok1)[:, None], (rows.astype(acc) - mean[None]) * inv_std[None], 0)
    c0, c1, total = _balanced_weights(ok0, ok1, w, acc)

    def loss(params):
        logit = u @ params["w"] + params["b"]
        # -log σ(z) = softplus(-z), -log(1 - σ(z)) = softplus(z)
        nll = jnp.sum(c1 * jax.nn.softplus(-logit) + c0 * jax.nn.softplus(logit))
        return nll + 0.5 * l2 * jnp.sum(params["w"] ** 2)

    grads = jax.grad(loss)(state.params)
    took = total > 0
    params, opt_state = nm.optimizer_step(
        _tx(learning_rate), grads, state.params, state.opt_state, took
    )
    return LogisticProbeState(t, f, params, opt_state, state.step + took.astype(jnp.int32))


@jax.jit
def _logistic_merge(a: LogisticProbeState, b: LogisticProbeState) -> LogisticProbeState:
    """Class moments merged exactly; parameters and optimizer state averaged by rows."""
    wa = a.trusted.weight + a.flagged.weight
    wb = b.trusted.weight + b.flagged.weight
    return LogisticProbeState(
        nm.moments_merge(a.trusted, b.trusted),
        nm.moments_merge(a.flagged, b.flagged),
        nm.average_by_rows(a.params, b.params, wa, wb),
        nm.average_by_rows(a.opt_state, b.opt_state, wa, wb),
        jnp.maximum(a.step, b.step),
    )


@jax.jit
def _logistic_finalize(state: LogisticProbeState) -> ProbeFitted:
    t, f = state.trusted, state.flagged
    mean, inv_std = _standardise(t, f)
    direction = state.params["w"].astype(mean.dtype) * inv_std
    diff = f.mean - t.mean
    sep = jnp.abs(diff @ direction) / jnp.maximum(jnp.sqrt(direction @ direction), 1e-30)
    zero = jnp.zeros((), mean.dtype)
    bias = state.params["b"].astype(mean.dtype)
    return ProbeFitted(mean, direction, bias, t.mean, f.mean, zero, sep, t.counts, f.counts)
