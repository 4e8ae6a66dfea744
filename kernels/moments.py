"""Masked, weighted moment statistics of a batch of rows around a shift: the Gram hot loop.

For rows ``x[n, d]``, a validity mask ``ok[n]``, optional weights ``w[n] >= 0`` and a shift
``s[d]`` (a guess of the mean), with ``y = x - s`` on valid rows:

    weight = Σ w          s1 = Σ w y            m2 = Σ w y yᵀ   (or its diagonal)
    m3 = Σ w |y|² y        m4 = Σ w |y|⁴

Centring on a shift close to the mean before the Gram product is what keeps float32 exact
enough when activations have means far larger than their spread; the caller recentres the
result on the exact mean (``jaxmon._numerics``). Invalid rows are zeroed with ``where``, never
multiplied by a mask, so NaN/inf rows cannot leak in.

Why two layouts: on CPUs with a bf16 matrix unit (AMX), XLA reaches its peak only when the
contracted (row) axis is the minor one. A transpose written inside the same jit is folded into
the dot and does not help; an ``optimization_barrier`` forces the copy, which costs far less
than it saves for bf16. For float32 the plain ``[n, d]`` contraction is XLA's fastest path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MomentStats(NamedTuple):
    """Weighted power sums of ``y = x - shift`` over the valid rows of one batch."""

    weight: jax.Array  # shape=(), dtype=acc
    s1: jax.Array  # shape=(d,), dtype=acc
    m2: jax.Array  # shape=(d, d) or (d,) when diagonal, dtype=acc
    m3: jax.Array  # shape=(d,), dtype=acc
    m4: jax.Array  # shape=(), dtype=acc


def _acc_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def moment_stats_reference(
    x: jax.Array,
    ok: jax.Array,
    shift: jax.Array,
    weights: jax.Array | None = None,
    *,
    diagonal: bool = False,
) -> MomentStats:
    """Plain-jnp reference: upcasts the batch and computes every sum directly."""
    acc = _acc_dtype(x)
    y = jnp.where(ok[:, None], x.astype(acc) - shift.astype(acc)[None, :], 0)
    w = ok.astype(acc) if weights is None else jnp.where(ok, weights.astype(acc), 0)
    a = jnp.sum(y * y, axis=-1)
    m2 = jnp.sum(w[:, None] * y * y, 0) if diagonal else (w[:, None] * y).T @ y
    return MomentStats(jnp.sum(w), w @ y, m2, (w * a) @ y, jnp.sum(w * a * a))


_TILE = 128


def _rows_minor(y: jax.Array) -> jax.Array:
    """``y.T`` materialised as a real ``[d, n]`` buffer.

    XLA folds a plain transpose into the dot (even behind an ``optimization_barrier``), which
    leaves the slow ``[n, d]`` contraction; a tiled reshape-transpose is not folded, and costs a
    few ms against the tens of ms it saves on the matrix unit.
    """
    n, d = y.shape
    pad = (-n) % _TILE
    if pad:  # zero rows add nothing to the Gram
        y = jnp.concatenate([y, jnp.zeros((pad, d), y.dtype)])
    t = y.reshape(-1, _TILE, d).transpose(2, 0, 1).reshape(d, n + pad)
    return jax.lax.optimization_barrier(t)


def _gram(y: jax.Array, acc: jnp.dtype) -> jax.Array:
    if y.dtype == jnp.bfloat16:
        yt = _rows_minor(y)
        dims = (((1,), (1,)), ((), ()))
        return jax.lax.dot_general(yt, yt, dims, preferred_element_type=acc)
    dims = (((0,), (0,)), ((), ()))
    return jax.lax.dot_general(y, y, dims, preferred_element_type=acc)


def moment_stats(
    x: jax.Array,
    ok: jax.Array,
    shift: jax.Array,
    weights: jax.Array | None = None,
    *,
    diagonal: bool = False,
) -> MomentStats:
    """Moment statistics of a batch (see module docstring); bf16 in, float32 out.

    bf16 rows stay bf16 up to the matrix unit (the Gram accumulates in float32 through
    ``preferred_element_type``); float16 is widened to float32 first, since this CPU's matrix
    unit has no float16 mode and bf16 would lose three of its mantissa bits.

    Args:
      x: rows ``[n, d]``, float32 / bfloat16 / float16 (float64 with x64 on).
      ok: ``[n]`` bool, the rows to include.
      shift: ``[d]``, subtracted before the products (ideally close to the batch mean).
      weights: optional ``[n]`` non-negative row weights.
      diagonal: keep only the diagonal of ``m2``.

    Returns:
      ``MomentStats`` in float32 (float64 for float64 input).
    """
    acc = _acc_dtype(x)
    if x.dtype == jnp.bfloat16:
        return _moment_stats_bf16(x, ok, shift, weights, diagonal=diagonal)
    if x.dtype == jnp.float16:
        x = x.astype(jnp.float32)
    y = jnp.where(ok[:, None], x - shift.astype(x.dtype)[None, :], 0)
    a = jnp.sum(y * y, axis=-1)
    w = ok.astype(acc) if weights is None else jnp.where(ok, weights.astype(acc), 0)
    yw = y if weights is None else y * jnp.sqrt(w)[:, None]
    m2 = jnp.sum(yw * yw, axis=0) if diagonal else _gram(yw, acc)
    return MomentStats(jnp.sum(w), w @ y, m2, (w * a) @ y, jnp.sum(w * a * a))


def _moment_stats_bf16(x, ok, shift, weights, *, diagonal):
    # Every sum is taken over the same bf16-rounded centred rows ``yb``, so the statistics are
    # those of one consistent set of rows (the rounding moves each centred value by at most
    # 2^-9 relative) and the whole batch stays bf16: reading it in float32 would double the
    # memory traffic, which costs more than the Gram product on the matrix unit.
    acc = jnp.float32
    yb = jnp.where(ok[:, None], x - shift.astype(x.dtype)[None, :], jnp.zeros((), x.dtype))
    w = ok.astype(acc) if weights is None else jnp.where(ok, weights.astype(acc), 0)
    if weights is not None:
        yb = (yb.astype(acc) * jnp.sqrt(w)[:, None]).astype(x.dtype)
    a = jnp.sum(jnp.square(yb.astype(acc)), axis=-1)  # = w |y|² when weighted
    # s1 = Σ w y and m3 = Σ w |y|² y as one product: rows of yb already carry sqrt(w).
    coef = jnp.stack([jnp.ones_like(w) if weights is None else jnp.sqrt(w), a])
    if weights is not None:
        coef = coef.at[1].set(a / jnp.where(w > 0, jnp.sqrt(w), 1))
    z = jax.lax.dot_general(
        coef.astype(x.dtype), yb, (((1,), (0,)), ((), ())), preferred_element_type=acc
    )
    m2 = jnp.sum(jnp.square(yb.astype(acc)), axis=0) if diagonal else _gram(yb, acc)
    m4 = jnp.sum(a * a / jnp.where(w > 0, w, 1))
    return MomentStats(jnp.sum(w), z[0], m2, z[1], m4)
