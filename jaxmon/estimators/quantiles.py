"""A mergeable quantile sketch with static shapes: a log-linear histogram of float32 bit patterns.

Why a relative-error sketch (and not rank-error KLL compactors)
----------------------------------------------------------------
The values this sketch sees are mostly anomaly scores and activations: they span orders of
magnitude (a Mahalanobis distance of 3 next to one of 3e4), and the part that matters is the far
upper tail, because a p-value at a false-positive rate of 1e-3 is read off the 99.9th percentile.
A rank-error sketch (KLL, GK) guarantees ``|rank error| <= eps * n`` uniformly, so at eps = 1e-3
the 99.9th percentile can be *any* value between the 99.8th and the 100th: useless exactly where
calibration needs it. A relative-error sketch (DDSketch, Masson et al. 2019; HDR Histogram)
returns every quantile within a *relative value* error ``alpha`` of the exact one, at every rank,
tails included. It is also a fixed array of bucket counts, so

* ``update`` is one bit-cast, one shift and one scatter-add: static shapes, jittable, fast;
* ``merge`` adds counts: exact, associative and commutative bit for bit (a KLL merge is random
  and only approximately order-independent), so replicas on many devices merge exactly.

Buckets
-------
A float32 ``v`` is bit-cast to an int32 and mapped monotonically to ``key`` (negative floats have
their magnitude bits flipped so keys sort like values). Dropping the low ``23 - m`` mantissa
bits, ``bucket = key >> (23 - m)``, leaves the sign, the exponent and ``m`` leading mantissa
bits: each bucket spans ``[L, L (1 + 2^-m))`` in magnitude (log-linear buckets, as HDR
Histogram and DDSketch's "fast" mappings). There are ``2^(9+m)`` buckets covering every finite
float32 (m = 6: 32768 buckets; counts are two uint32 words each, exact to 2^64 per bucket).

Documented error bound
----------------------
With ``r = 2^-m`` and ``alpha = r / (2 + r)`` (``relative_accuracy`` picks the smallest ``m``
with ``alpha <= relative_accuracy``; 0.01 gives m = 6, alpha = 0.00775):

* ``quantile(f, q)`` returns ``v`` with ``|v - x_k| <= alpha |x_k|`` where ``x_k`` is the exact
  sorted value at rank ``k = floor(q (n - 1))`` (numpy ``method="lower"``), for ``|x_k| >= 2^-126``
  (normal floats); below that the error is absolute, at most ``2^-126``. ``q = 0`` and ``q = 1``
  return the exact minimum and maximum.
* ``rank(f, v)`` (the fraction of values ``<= v``) lies between the exact fractions of values
  ``< v - r|v|`` and ``<= v + r|v|``.

Both hold after any sequence of updates and merges, since the state is the same either way. The
bucket of a value is a function of its float32 rounding: float64 inputs (x64 on) are rounded to
float32 first (relative 2^-24 more).

Counts: ranks are float32 cumulative counts in ``finalize``, exact up to 2^24 values and with a
relative rounding of 6e-8 beyond (negligible next to ``alpha`` for all practical streams).

The upper tail beyond the data
------------------------------
Conformal p-values stop at ``1 / (n + 1)``: every value above the largest sketched one would
tie there, and the strongest anomalies would be ordered by row number. ``finalize`` therefore
also fits a generalized Pareto distribution (GPD) to the top exceedances of the sketched values,
the extreme-value model of any tail above a high threshold (Pickands–Balkema–de Haan), by
probability-weighted moments (Hosking & Wallis 1987) over the top ``K = max(min(n, 20), n/20)``
values read off the buckets. Threshold stability moves it to the maximum ``M`` (scale
``σ_M = σ_u + ξ (M − u)``), and :func:`upper_tail` continues the conformal p-value past ``M`` as

    p(v) = 1 / (n + 1) · (1 + ξ (v − M) / σ_M)^(−1/ξ),      v > M,

continuous at ``M`` and strictly decreasing in ``v``. The shape is kept in
``[0.1, 0.9]``: a light (exponential or bounded) tail fitted to a few hundred exceedances cannot
be told apart from a slightly heavy one, and beyond the data the heavier choice gives the larger,
conservative p-value, which also stays representable in float32 far past the data (a tail of
``ξ = 0`` would underflow to 0 a few hundred scale units out and tie the extremes again).
:func:`log_upper_tail` gives ``log p`` with no underflow at all.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmon._base import (
    Counts,
    Estimator,
    EstimatorSpec,
    ShapeError,
    check_rows,
    counts_add,
    counts_merge,
    counts_zero,
    masked_scores,
    register,
    require_rows,
    valid_rows,
)
from jaxmon.errors import ConfigError

__all__ = [
    "quantiles",
    "quantile",
    "rank",
    "upper_tail",
    "log_upper_tail",
    "QuantilesState",
    "QuantilesFitted",
    "quantiles_accuracy",
]

_NAME = "quantiles"
_MIN_BITS, _MAX_BITS = 1, 10
# The GPD shape of the tail beyond the data (module docstring): floor and cap.
_XI_MIN, _XI_MAX = 0.1, 0.9


class QuantilesState(NamedTuple):
    """State of :func:`quantiles`: bucket counts plus exact extremes and row counters."""

    counts: Counts  # rows folded in, rows excluded for NaN/inf
    buckets: jax.Array  # shape=(2, 2^(9+m)), dtype=uint32: [lo, hi] words of each bucket count
    minimum: jax.Array  # shape=example.shape, dtype=float32: per position within a row (+inf: none)
    maximum: jax.Array  # shape=example.shape, dtype=float32: per position within a row (-inf: none)


class QuantilesFitted(NamedTuple):
    """Finalized sketch: per-bucket and cumulative counts (float32) and the exact extremes."""

    bucket_counts: jax.Array  # shape=(B,), dtype=float32: values per bucket
    below: jax.Array  # shape=(B,), dtype=float32: values in buckets strictly below
    above: jax.Array  # shape=(B,), dtype=float32: values in buckets strictly above
    total: jax.Array  # shape=(), dtype=float32: number of values n
    minimum: jax.Array  # shape=example.shape, dtype=float32: smallest value per row position
    maximum: jax.Array  # shape=example.shape, dtype=float32: largest value per row position
    tail_scale: jax.Array  # shape=(), dtype=float32: GPD scale σ_M of exceedances over the max
    tail_shape: jax.Array  # shape=(), dtype=float32: GPD shape ξ, in [0.1, 0.9]


def _bits_for(relative_accuracy: float) -> int:
    for m in range(_MIN_BITS, _MAX_BITS + 1):
        r = 2.0**-m
        if r / (2 + r) <= relative_accuracy:
            return m
    raise ConfigError(
        f"quantiles: relative_accuracy={relative_accuracy} is finer than the finest supported "
        f"({quantiles_accuracy(_MAX_BITS):.2e}, 2^{9 + _MAX_BITS} buckets)"
    )


def quantiles_accuracy(mantissa_bits: int) -> float:
    """The guaranteed relative accuracy ``alpha = r / (2 + r)``, ``r = 2^-m``, of ``m`` bits."""
    r = 2.0**-mantissa_bits
    return r / (2 + r)


def _bits_of(num_buckets: int) -> int:
    return round(math.log2(num_buckets)) - 9


def _bucket_of(values: jax.Array, m: int) -> jax.Array:
    """Monotone bucket index in ``[0, 2^(9+m))`` of float32 values (NaN/inf map to high ids)."""
    shift = 23 - m
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
    # Negative floats: flip the magnitude bits so keys increase with the value.
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return (key >> shift) + jnp.int32(1 << (31 - shift))


def _float_of_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bucket_bounds(m: int) -> tuple[jax.Array, jax.Array]:
    """Smallest and largest float32 of every bucket (inclusive), shape (B,) each."""
    shift = 23 - m
    b = jnp.arange(1 << (9 + m), dtype=jnp.int32) - jnp.int32(1 << (31 - shift))
    first = b << shift
    # The last key of a bucket; int32 wrap only happens in the NaN range, which is never filled.
    last = first + jnp.int32((1 << shift) - 1)
    return _float_of_key(first), _float_of_key(last)


def _representative(lo: jax.Array, hi: jax.Array) -> jax.Array:
    # Harmonic mean 2 lo hi / (lo + hi): its relative error is at most (hi-lo)/(hi+lo) at both
    # ends (DDSketch's choice). Written as 2 / (1/lo + 1/hi) so that lo*hi cannot overflow; a
    # bucket touching zero (subnormals) gets 0, whose error is below 2^-126 there.
    with jax.numpy_dtype_promotion("standard"):
        inv = 1.0 / lo + 1.0 / hi
        rep = jnp.where(jnp.isfinite(inv) & (inv != 0), 2.0 / inv, 0.0)
    return rep.astype(jnp.float32)


def _is_scalar_row(shape: tuple[int, ...]) -> bool:
    return int(np.prod(shape, dtype=np.int64)) == 1


@register("quantiles")
def quantiles(*, relative_accuracy: float = 0.01) -> Estimator:
    """A mergeable relative-error quantile sketch of scalar values (see the module docstring).

    Every element of ``x`` is one value. ``init(example)``: with a one-element example (shape
    ``()``, ``(1,)``, or ``None``) every element of ``x`` is its own row, and ``x``, ``mask`` and
    ``weights`` may have any (matching) shape; with an example of shape ``e`` (e.g. ``(d,)``)
    a row is the trailing ``e`` block of ``x[..., *e]``, all its values are sketched, and a row
    holding any NaN/inf is excluded whole and counted, as for every other estimator.

    Args:
      relative_accuracy: the guaranteed relative error ``alpha`` of every quantile; the sketch
        uses the smallest number of mantissa bits ``m`` whose ``alpha`` is at most this
        (0.01 -> m = 6, 32768 buckets, 256 KiB of state).

    Returns:
      An :class:`~jaxmon.Estimator` with a :class:`QuantilesState`; ``finalize`` gives a
      :class:`QuantilesFitted` for :func:`quantile`, :func:`rank` and :func:`upper_tail`.
      ``score`` is the upper-tail surprisal ``-log p`` (natural log) of each row's largest
      value, with ``p`` from :func:`upper_tail` (conformal within the data, the fitted tail
      beyond): higher = further in the upper tail; ``+inf`` for a row holding NaN/inf.
      ``weights`` must be non-negative integers (repetition counts; rounded).

    Example:
      >>> est = jaxmon.quantiles()
      >>> s = est.update(est.init(jax.ShapeDtypeStruct((), jnp.float32)), scores)
      >>> jaxmon.quantile(est.finalize(s), 0.99)
    """
    if isinstance(relative_accuracy, bool) or not 0 < float(relative_accuracy) < 1:
        raise ConfigError(
            f"quantiles: relative_accuracy must lie in (0, 1), got {relative_accuracy!r}"
        )
    relative_accuracy = float(relative_accuracy)
    m = _bits_for(relative_accuracy)
    spec = EstimatorSpec("quantiles", {"relative_accuracy": relative_accuracy})

    def init(example=None) -> QuantilesState:
        return _init(example, m)

    def update(state: QuantilesState, x, *, mask=None, weights=None) -> QuantilesState:
        return _update(state, x, mask, weights, m=m)

    def score(fitted: QuantilesFitted, x, *, mask=None):
        return _score(fitted, x, mask)

    return Estimator(init, update, _merge, _checked_finalize, score, spec)


def _init(example, m: int) -> QuantilesState:
    shape = () if example is None else tuple(getattr(example, "shape", np.shape(example)))
    return QuantilesState(
        counts_zero(),
        jnp.zeros((2, 1 << (9 + m)), jnp.uint32),
        jnp.full(shape, jnp.inf, jnp.float32),
        jnp.full(shape, -jnp.inf, jnp.float32),
    )


def _rows_of(row_shape: tuple[int, ...], x, mask, weights, *, what: str):
    """``(rows[n, width], lead, mask[n], weights[n])``: ``x`` as rows of ``row_shape``, checked.

    A one-element ``row_shape`` makes every element of ``x`` its own row (any shape of ``x``);
    otherwise a row is the trailing ``row_shape`` block. Dtype and mask/weights shapes are
    checked by :func:`jaxmon._base.check_rows`, as for every estimator.
    """
    x = x if isinstance(x, jax.Array | jax.core.Tracer) else jnp.asarray(x)
    if _is_scalar_row(row_shape):
        lead, width = tuple(x.shape), 1
    else:
        k = len(row_shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k :]) != tuple(row_shape):
            want = ", ".join(str(s) for s in row_shape)
            raise ShapeError(
                f"{_NAME}.{what}: expected values of shape [..., {want}] and a float dtype "
                f"(the shape of the init example), got {list(x.shape)} {x.dtype}; "
                "initialise with a scalar example to sketch arrays of any shape"
            )
        lead, width = tuple(x.shape[: x.ndim - k]), int(np.prod(row_shape))
    mask, weights = (None if a is None else jnp.asarray(a) for a in (mask, weights))
    rows, mk, w = check_rows(
        x.reshape(*lead, width), width, name=f"{_NAME}.{what}", mask=mask, weights=weights
    )
    return rows, lead, mk, w


@functools.partial(jax.jit, static_argnames=("m",))
def _update(state: QuantilesState, x, mask, weights, *, m: int) -> QuantilesState:
    nb = state.buckets.shape[1]
    rows, _, mk, w = _rows_of(state.minimum.shape, x, mask, weights, what="update")
    width = rows.shape[1]
    rows32 = rows.astype(jnp.float32)  # a float64 value beyond float32's range is non-finite
    vals = rows32.reshape(-1)
    ok, _ = valid_rows(rows32, mk)
    ok_v = ok if width == 1 else jnp.repeat(ok, width)
    # Out-of-range ids (excluded rows) are dropped by the scatter.
    idx = jnp.where(ok_v, _bucket_of(vals, m), jnp.int32(nb))
    if w is None:
        hist = jnp.zeros((nb,), jnp.uint32).at[idx].add(jnp.uint32(1), mode="drop")
    else:
        wi = jnp.round(w.astype(jnp.float32)).astype(jnp.uint32)
        inc = wi if width == 1 else jnp.repeat(wi, width)
        hist = jnp.zeros((nb,), jnp.uint32).at[idx].add(inc, mode="drop")
        # A row of weight 0 adds no value: keep it out of the extremes too.
        ok_v = ok_v & (inc > 0)
    lo, hi = _extremes(vals, ok_v, width, state.minimum.shape)
    # Row counts from the histogram (B additions) rather than from a pass over the batch:
    # reductions over millions of bools are a large share of XLA's CPU time here.
    if w is None:
        n_ok = (jnp.sum(hist) // jnp.uint32(width)).astype(jnp.int32)
    else:
        n_ok = jnp.sum(ok).astype(jnp.int32)
    n_sel = jnp.int32(rows.shape[0]) if mk is None else jnp.sum(mk).astype(jnp.int32)
    return QuantilesState(
        counts_add(state.counts, n_ok, n_sel - n_ok),
        _add_bucket_words(state.buckets, jnp.stack([hist, jnp.zeros_like(hist)])),
        jnp.minimum(state.minimum, lo),
        jnp.maximum(state.maximum, hi),
    )


def _extremes(vals, ok_v, width: int, shape) -> tuple[jax.Array, jax.Array]:
    """Smallest and largest kept value per position within a row (``±inf`` when none)."""
    lo_v = jnp.where(ok_v, vals, jnp.inf)
    hi_v = jnp.where(ok_v, vals, -jnp.inf)
    # initial=: an empty batch (no rows at all) is a no-op, not a reduction error. Flat 1-D
    # arrays when a row is one value: XLA's CPU loops over an [n, 1] layout run slower.
    if width == 1:
        lo = jnp.min(lo_v, initial=jnp.inf)
        hi = jnp.max(hi_v, initial=-jnp.inf)
    else:
        lo = jnp.min(lo_v.reshape(-1, width), axis=0, initial=jnp.inf)
        hi = jnp.max(hi_v.reshape(-1, width), axis=0, initial=-jnp.inf)
    return lo.reshape(shape), hi.reshape(shape)


def _add_bucket_words(a: jax.Array, b: jax.Array) -> jax.Array:
    """Exact sum of two ``[2, B]`` arrays of ``[lo, hi]`` uint32 counter words (with carry)."""
    # Each bucket is a two-word counter, as jaxmon._base.Counts: counts_merge adds words alike.
    return counts_merge(Counts(a, a[:, :0]), Counts(b, b[:, :0])).rows


@jax.jit
def _merge(a: QuantilesState, b: QuantilesState) -> QuantilesState:
    return QuantilesState(
        counts_merge(a.counts, b.counts),
        _add_bucket_words(a.buckets, b.buckets),
        jnp.minimum(a.minimum, b.minimum),
        jnp.maximum(a.maximum, b.maximum),
    )


@jax.jit
def _finalize_jit(state: QuantilesState) -> QuantilesFitted:
    return _finalize(state)


def _checked_finalize(state: QuantilesState) -> QuantilesFitted:
    require_rows(state, _NAME)
    return _finalize_jit(state)


@jax.jit
def _score(fitted: QuantilesFitted, x, mask):
    rows, lead, mk, _ = _rows_of(fitted.minimum.shape, x, mask, None, what="score")
    # A row is as anomalous as its largest value; a row holding NaN/inf maximally so.
    vals = rows.astype(jnp.float32)
    top = jnp.where(jnp.all(jnp.isfinite(vals), -1), jnp.max(vals, -1), jnp.inf)
    # Not finish_scores: an empty sketch scores NaN even for a non-finite row (no counts here).
    return masked_scores(-log_upper_tail(fitted, top), mk, lead)


def _finalize(state: QuantilesState) -> QuantilesFitted:
    words = state.buckets.astype(jnp.float32)
    c = words[0] + words[1] * jnp.float32(2.0**32)
    inclusive = jnp.cumsum(c)
    total = inclusive[-1]
    below = inclusive - c
    # The upper tail is summed from the top so that small tail counts keep every digit.
    above = jnp.cumsum(c[::-1])[::-1] - c
    scale, shape = _tail_fit(c, above, total, jnp.min(state.minimum), jnp.max(state.maximum))
    return QuantilesFitted(c, below, above, total, state.minimum, state.maximum, scale, shape)


def _tail_fit(
    c: jax.Array, above: jax.Array, total: jax.Array, lo_all: jax.Array, hi_all: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(σ_M, ξ)`` of a GPD fitted to the top values of a histogram (module docstring).

    Probability-weighted moments on the top ``K`` values, each at its bucket's representative
    (clamped to the exact extremes): ``a0 = mean(y)``, ``a1 = mean((1 − p_j) y_(j))`` with
    plotting positions ``p_j = (j − 0.35) / K`` over the ascending excesses ``y = x − u``, where
    ``u`` is the representative of the bucket of the ``K``-th largest value; then
    ``ξ = 2 − a0 / (a0 − 2 a1)``, ``σ_u = 2 a0 a1 / (a0 − 2 a1)``, ``σ_M = σ_u + ξ (M − u)``.
    """
    m = _bits_of(c.shape[0])
    lo, hi = _bucket_bounds(m)
    rep = jnp.clip(_representative(lo, hi), lo_all, hi_all)
    k = jnp.maximum(jnp.minimum(total, 20.0), jnp.floor(total / 20.0))
    w = jnp.clip(k - above, 0.0, c)  # top-K values held by each bucket
    first = jnp.argmax(w > 0)  # lowest bucket holding any of them
    u = rep[first]
    y = jnp.where(w > 0, jnp.maximum(rep - u, 0.0), 0.0)
    r = jnp.cumsum(w) - w  # ascending rank offset of each bucket's values
    kk = jnp.maximum(k, 1.0)
    a0 = jnp.sum(w * y) / kk
    weight1 = w - (w * r + 0.5 * w * (w + 1.0) - 0.35 * w) / kk
    a1 = jnp.sum(y * weight1) / kk
    den = a0 - 2.0 * a1
    ok = (den > 0) & (a1 > 0)
    safe = jnp.where(ok, den, 1.0)
    xi = jnp.where(ok, 2.0 - a0 / safe, _XI_MAX)
    sigma_u = jnp.where(ok, 2.0 * a0 * a1 / safe, a0)
    xi = jnp.clip(xi, _XI_MIN, _XI_MAX)
    # A degenerate tail (all top values equal) still needs a positive scale: one float32 ulp
    # of the maximum, so anything above it is very unlikely, but ordered.
    ulp = jnp.maximum(jnp.abs(hi_all), 1.0) * jnp.float32(2.0**-22)
    sigma = jnp.maximum(sigma_u + xi * (hi_all - u), ulp)
    sigma = jnp.where(jnp.isfinite(sigma), sigma, ulp)
    return sigma.astype(jnp.float32), xi.astype(jnp.float32)


def _fitted(f) -> QuantilesFitted:
    if isinstance(f, QuantilesState):
        return _finalize(f)
    if not isinstance(f, QuantilesFitted):
        raise ConfigError(
            f"expected a QuantilesFitted (est.finalize(state)) or a QuantilesState, got "
            f"{type(f).__name__}"
        )
    return f


def _position(f: QuantilesFitted, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Bucket of ``v`` and its linear position in ``[0, 1]`` inside the bucket.

    The bucket is narrowed to the exact ``[min, max]`` of the values, so the top bucket's
    upper-tail count reaches 0 exactly at the maximum (the p-value is then continuous there).
    """
    m = _bits_of(f.bucket_counts.shape[0])
    v = v.astype(jnp.float32)
    b = jnp.clip(_bucket_of(v, m), 0, f.bucket_counts.shape[0] - 1)
    lo, hi = _bucket_bounds(m)
    lo_all, hi_all = jnp.min(f.minimum), jnp.max(f.maximum)
    blo, bhi = jnp.maximum(lo[b], lo_all), jnp.minimum(hi[b], hi_all)
    width = bhi - blo
    frac = jnp.where(width > 0, (v - blo) / jnp.where(width > 0, width, 1.0), 1.0)
    return b, jnp.clip(frac, 0.0, 1.0)


@jax.jit
def rank(fitted: QuantilesFitted | QuantilesState, v) -> jax.Array:
    """Estimated fraction of sketched values ``<= v`` (``v`` any shape; jittable).

    Guarantee (module docstring): between the exact fractions of values ``< v - r|v|`` and
    ``<= v + r|v|`` with ``r = 2^-m``. Inside a bucket the count is interpolated linearly.
    Returns 0 for an empty sketch.
    """
    f = _fitted(fitted)
    v = jnp.asarray(v, jnp.float32)
    b, frac = _position(f, v)
    le = f.below[b] + f.bucket_counts[b] * frac
    lo_all, hi_all = jnp.min(f.minimum), jnp.max(f.maximum)
    le = jnp.where(v >= hi_all, f.total, jnp.where(v < lo_all, 0.0, le))
    return jnp.where(f.total > 0, le / jnp.maximum(f.total, 1.0), 0.0)


@jax.jit
def log_upper_tail(fitted: QuantilesFitted | QuantilesState, v) -> jax.Array:
    """Natural log of :func:`upper_tail`, which never underflows (jittable).

    Past the largest sketched value the GPD tail is evaluated in log space, so values many
    scale units beyond the data keep distinct, ordered log p-values. NaN values count as
    ``+inf`` (log p = -inf); an empty sketch gives NaN.
    """
    f = _fitted(fitted)
    v = jnp.asarray(v, jnp.float32)
    v = jnp.where(jnp.isnan(v), jnp.inf, v)
    b, frac = _position(f, v)
    ge = f.above[b] + f.bucket_counts[b] * (1.0 - frac)
    lo_all, hi_all = jnp.min(f.minimum), jnp.max(f.maximum)
    ge = jnp.where(v > hi_all, 0.0, jnp.where(v <= lo_all, f.total, ge))
    log_n1 = jnp.log1p(f.total)
    conformal = jnp.log1p(ge) - log_n1
    xi, sigma = f.tail_shape, f.tail_scale
    excess = jnp.where(v > hi_all, v - hi_all, 0.0)
    beyond = -log_n1 - jnp.log1p(xi * excess / sigma) / xi
    out = jnp.where(v > hi_all, beyond, conformal)
    return jnp.where(f.total > 0, out, jnp.nan)


@jax.jit
def upper_tail(fitted: QuantilesFitted | QuantilesState, v) -> jax.Array:
    """Upper-tail p-value: conformal up to the largest sketched value, a GPD tail beyond.

    For ``v`` up to the largest sketched value ``M``: ``(1 + #{values >= v}) / (1 + n)``, valid
    (super-uniform) for a ``v`` exchangeable with the sketched values, up to the sketch's
    within-bucket interpolation; the tail count is summed from the top, so p-values near
    ``1/n`` keep their precision. For ``v > M``: the fitted generalized Pareto tail (module
    docstring), strictly decreasing, below ``1 / (n + 1)``: an extrapolation, so its validity
    there rests on the tail model (conservative by construction of the shape floor). NaN and
    ``+inf`` values get p = 0 (float32 may also round far-out values to 0: use
    :func:`log_upper_tail` for ordering there). NaN for an empty sketch.
    """
    return jnp.exp(log_upper_tail(fitted, v))


@jax.jit
def quantile(fitted: QuantilesFitted | QuantilesState, q) -> jax.Array:
    """The ``q``-quantile (``q`` in [0, 1], any shape; jittable) within the relative bound.

    Returns the representative of the bucket holding the sorted value of rank
    ``floor(q (n - 1))`` (numpy ``method="lower"``), clamped to the exact ``[min, max]``;
    ``q = 0`` / ``q = 1`` give the exact minimum / maximum. NaN for an empty sketch.
    """
    f = _fitted(fitted)
    m = _bits_of(f.bucket_counts.shape[0])
    q = jnp.asarray(q, jnp.float32)
    k = jnp.floor(jnp.clip(q, 0.0, 1.0) * (f.total - 1.0))
    inclusive = f.below + f.bucket_counts
    b = jnp.clip(jnp.searchsorted(inclusive, k, side="right"), 0, inclusive.shape[0] - 1)
    lo, hi = _bucket_bounds(m)
    rep = _representative(lo, hi)[b]
    lo_all, hi_all = jnp.min(f.minimum), jnp.max(f.maximum)
    out = jnp.clip(rep, lo_all, hi_all)
    out = jnp.where(k <= 0, lo_all, jnp.where(k >= f.total - 1.0, hi_all, out))
    return jnp.where(f.total > 0, out, jnp.nan)
