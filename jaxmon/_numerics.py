"""Numerics decided once: streaming, mergeable moments up to the fourth order.

The state holds, around its own weighted mean ``μ``, the centred power sums

    W = Σ w,  μ,  M2 = Σ w (x-μ)(x-μ)ᵀ,  M3 = Σ w |x-μ|² (x-μ),  M4 = Σ w |x-μ|⁴.

M2 gives the covariance; M3 and M4 are what Ledoit–Wolf's shrinkage needs (its β term is
``Σ |x-μ|⁴``), so shrinkage is computed from merged streams exactly as from all rows at once.

Batches and merges use the pairwise formulas of Chan, Golub & LeVeque (1979) generalised by
:func:`recenter`: power sums about one centre are moved exactly to another, never formed as raw
sums of squares (activations with mean 1e4 and spread 1 would lose every digit in float32).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmon._base import Counts, counts_add, counts_merge, counts_zero, valid_rows
from jaxmon_kernels import MomentStats, moment_stats


class Moments(NamedTuple):
    """Mergeable moments of weighted rows (see module docstring)."""

    counts: Counts
    weight: jax.Array  # shape=(), dtype=float32: Σ w over folded rows
    mean: jax.Array  # shape=(d,), dtype=float32
    m2: jax.Array  # shape=(d, d) or (d,) when diagonal, dtype=float32
    m3: jax.Array  # shape=(d,), dtype=float32
    m4: jax.Array  # shape=(), dtype=float32


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float64 accumulation for float64 inputs (x64 on), float32 for everything else."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def moments_init(d: int, dtype: jnp.dtype = jnp.float32, *, diagonal: bool = False) -> Moments:
    """Empty moments of ``d`` features (the identity of :func:`moments_merge`)."""
    acc = acc_dtype(dtype)
    m2 = jnp.zeros((d,) if diagonal else (d, d), acc)
    z = lambda: jnp.zeros((), acc)  # distinct buffers, so that states can be donated
    return Moments(counts_zero(), z(), jnp.zeros((d,), acc), m2, jnp.zeros((d,), acc), z())


def _quad(m2: jax.Array, v: jax.Array) -> jax.Array:
    return m2 * v if m2.ndim == 1 else m2 @ v


def recenter(s: MomentStats, delta: jax.Array) -> MomentStats:
    """Moves power sums about centre ``c`` to centre ``c - delta`` exactly.

    With ``y = x - c`` and ``y' = y + δ``: expand ``|y'|² = |y|² + 2 y·δ + |δ|²`` in each sum.
    ``s1`` need not be zero, so this serves raw batch sums about a shift and merges alike.
    """
    w, s1, m2, m3, m4 = s
    c = delta @ delta
    tr = jnp.sum(m2) if m2.ndim == 1 else jnp.trace(m2)
    m2d = _quad(m2, delta)
    s1d = s1 @ delta
    if m2.ndim == 1:
        m2n = m2 + 2 * s1 * delta + w * delta * delta
    else:
        m2n = m2 + jnp.outer(s1, delta) + jnp.outer(delta, s1) + w * jnp.outer(delta, delta)
    if m2.ndim == 1:
        # The third and fourth sums need the full M2 to move; a diagonal state does not keep them.
        return MomentStats(w, s1 + w * delta, m2n, jnp.zeros_like(m3), jnp.zeros_like(m4))
    m3n = m3 + tr * delta + 2 * m2d + 2 * s1d * delta + c * s1 + c * w * delta
    m4n = m4 + 4 * (delta @ m2d) + w * c * c + 4 * (delta @ m3) + 2 * c * tr + 4 * c * s1d
    return MomentStats(w, s1 + w * delta, m2n, m3n, m4n)


def _safe_ratio(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(b > 0, a / jnp.where(b > 0, b, 1), 0)


def moments_merge(a: Moments, b: Moments) -> Moments:
    """Exact merge of two moment states (Chan et al.): associative and commutative."""
    w = a.weight + b.weight
    delta = b.mean - a.mean
    mean = a.mean + _safe_ratio(b.weight, w) * delta
    # Both sides are centred on their own means (s1 = 0); move each to the joint mean.
    sa = recenter(MomentStats(a.weight, jnp.zeros_like(a.mean), a.m2, a.m3, a.m4), a.mean - mean)
    sb = recenter(MomentStats(b.weight, jnp.zeros_like(b.mean), b.m2, b.m3, b.m4), b.mean - mean)
    return Moments(
        counts_merge(a.counts, b.counts), w, mean, sa.m2 + sb.m2, sa.m3 + sb.m3, sa.m4 + sb.m4
    )


def moments_update(
    state: Moments,
    rows: jax.Array,
    mask: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> Moments:
    """Folds ``rows[n, d]`` into ``state``; masked rows are absent, non-finite rows counted.

    The batch is centred on a shift (its own mean, rounded to the input dtype) before the Gram
    product, then recentred exactly on the batch mean and merged with Chan's formulas.
    """
    ok, bad = valid_rows(rows, mask)
    acc = state.mean.dtype
    # The shift only has to be near the batch mean (within a few standard deviations; the
    # exact recentring below corrects it): the mean of ~128 evenly spaced valid rows is, at a
    # fraction of a full pass. With none valid among them, the running mean serves.
    stride = max(1, rows.shape[0] // 128)
    sub, sub_ok = rows[::stride], ok[::stride]
    cnt = jnp.sum(sub_ok).astype(acc)
    colsum = jnp.sum(jnp.where(sub_ok[:, None], sub, jnp.zeros((), rows.dtype)), 0, dtype=acc)
    shift = jnp.where(cnt > 0, colsum / jnp.maximum(cnt, 1), state.mean).astype(rows.dtype)
    stats = moment_stats(rows, ok, shift, weights, diagonal=state.m2.ndim == 1)
    bmean_off = _safe_ratio(stats.s1, stats.weight)  # batch mean minus shift
    centred = recenter(stats, -bmean_off)
    batch = Moments(
        counts_add(counts_zero(), jnp.sum(ok).astype(jnp.int32), jnp.sum(bad).astype(jnp.int32)),
        stats.weight,
        shift.astype(acc) + bmean_off,
        centred.m2,
        centred.m3,
        centred.m4,
    )
    return moments_merge(state, batch)


def covariance(m: Moments) -> jax.Array:
    """Biased (maximum-likelihood) covariance ``M2 / W``, as scikit-learn's estimators use."""
    return _safe_ratio(m.m2, m.weight)


moments_merge_jit = jax.jit(moments_merge)
