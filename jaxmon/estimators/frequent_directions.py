"""Frequent Directions: a mergeable ℓ×d sketch of the centred covariance, O(ℓd) memory.

Frequent Directions (Liberty 2013; Ghashami, Liberty, Phillips & Woodruff 2016, "Frequent
Directions: simple and deterministic matrix sketching") keeps ``B[ℓ, d]`` with
``0 ≼ AᵀA − BᵀB ≼ Δ·I`` where ``Δ`` is the total "shrink mass" and, for every ``k < ℓ``,

    Δ ≤ ‖A − A_k‖²_F / (ℓ − k).

**What ``A`` is here (mean-centring).** Activations have means far larger than their spread, and
a sketch of raw rows would spend its directions on the mean. The state keeps the exact streaming
weighted mean ``μ`` (Chan, Golub & LeVeque) and sketches the *centred* scatter

    C = Σ_i w_i (x_i − μ)(x_i − μ)ᵀ,

so ``A`` is the matrix of rows ``√w_i (x_i − μ)`` about the exact mean of everything folded in.
Each batch is centred on its own mean (computed in two passes, so float32 keeps its digits), and
Chan's cross term becomes one extra row: merging groups ``a`` and ``b`` adds
``√(W_a W_b / W) (μ_b − μ_a)``, whose outer product is exactly the correction
``C = C_a + C_b + (W_a W_b / W) δδᵀ``. The sketched rows therefore have Gram exactly ``C`` and
Frobenius mass exactly ``tr C`` (tracked as ``trace``), so the guarantees above hold with
``A`` = the centred data. :func:`error_bound` returns ``Δ``: ``‖C − BᵀB‖₂ ≤ Δ`` (in units of
the scatter; divide by ``weight`` for the covariance).

**The shrink.** Rows are appended to the sketch ℓ at a time (a 2ℓ-row buffer) and shrunk: the
top-ℓ singular pairs of the buffer ``Z`` come from ``eigh`` of the small Gram ``Z Zᵀ``
(2ℓ × 2ℓ) instead of an SVD of ``Z`` (2ℓ × d): the same O(ℓ²d) flops, but as two matrix
products that run at matmul speed, plus an O(ℓ³) eigensolve. The squared-singular-value error of
the Gram route is about ``ε·σ₁²`` absolute, far inside the FD bound for float32. Each shrink
subtracts ``δ = σ_ℓ²`` from every squared singular value, removing at least ``ℓδ`` of
Frobenius mass; that is all the bound's proof needs, and it holds for any buffer size and for
merges (concatenate both sketches plus the Chan row, shrink once).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmon import _numerics as nm
from jaxmon._base import (
    Counts,
    Estimator,
    EstimatorSpec,
    check_rows,
    counts_add,
    counts_merge,
    counts_zero,
    feature_dim,
    finish_scores,
    register,
    require_rows,
    valid_rows,
)
from jaxmon.errors import ConfigError

__all__ = [
    "FDFitted",
    "FDState",
    "error_bound",
    "frequent_directions",
]

_HI = jax.lax.Precision.HIGHEST


class FDState(NamedTuple):
    """A Frequent Directions sketch of the centred scatter (see module docstring)."""

    counts: Counts
    weight: jax.Array  # shape=(), dtype=float32: Σ w
    mean: jax.Array  # shape=(d,), dtype=float32: exact streaming weighted mean
    trace: jax.Array  # shape=(), dtype=float32: tr C = Σ w |x - μ|², exact
    sketch: jax.Array  # shape=(ℓ, d), dtype=float32: B, rows σ_i v_iᵀ after each shrink
    shrunk: jax.Array  # shape=(), dtype=float32: Δ, total shrink mass: ‖C − BᵀB‖₂ ≤ Δ


class FDFitted(NamedTuple):
    """A finalised sketch: principal directions of the centred covariance."""

    mean: jax.Array  # shape=(d,)
    sketch: jax.Array  # shape=(ℓ, d): B (BᵀB ≈ C, the centred scatter)
    components: jax.Array  # shape=(ℓ, d): orthonormal right singular vectors of B, by σ desc
    eigenvalues: jax.Array  # shape=(ℓ,): σ_i² / W, covariance eigenvalue estimates (≤ true)
    trace: jax.Array  # shape=(): tr C / W, the exact total variance
    error_bound: jax.Array  # shape=(): Δ / W, bound on the covariance error (spectral norm)
    counts: Counts  # rows the sketch saw (zero rows: every score is NaN)


# --------------------------------------------------------------------------- internals


def fd_init(d: int, ell: int, dtype=jnp.float32) -> FDState:
    """Empty sketch (the identity of :func:`fd_merge`)."""
    acc = nm.acc_dtype(dtype)
    z = lambda: jnp.zeros((), acc)  # distinct buffers, so that states can be donated
    return FDState(counts_zero(), z(), jnp.zeros((d,), acc), z(), jnp.zeros((ell, d), acc), z())


def _shrink(z: jax.Array, ell: int) -> tuple[jax.Array, jax.Array]:
    """FD shrink of ``z[m, d]`` (m ≥ ℓ) to ``ℓ`` rows; returns ``(B, δ)``.

    ``B`` has rows ``√(σ_i² − δ) v_iᵀ`` for the top-ℓ singular pairs, ``δ = σ_ℓ²`` (so row ℓ is
    zero and the next ℓ rows fit in the buffer).
    """
    g = jnp.matmul(z, z.T, precision=_HI)
    lam, u = jnp.linalg.eigh(g)  # ascending
    lam = jnp.maximum(lam[::-1][:ell], 0)
    u = u[:, ::-1][:, :ell]
    delta = lam[ell - 1]
    pos = lam > 0
    # u_iᵀ z = σ_i v_iᵀ, so scale by √(σ_i² − δ)/σ_i (zero for the null space).
    scale = jnp.where(
        pos, jnp.sqrt(jnp.maximum(lam - delta, 0)) / jnp.sqrt(jnp.where(pos, lam, 1)), 0
    )
    b = jnp.matmul((u * scale[None, :]).T, z, precision=_HI)
    return b, delta


def _fold(sketch: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Appends ``rows`` ℓ at a time and shrinks after each: returns ``(B, Σδ)``."""
    ell, d = sketch.shape
    m = rows.shape[0]
    chunks = -(-m // ell)
    pad = chunks * ell - m
    if pad:
        rows = jnp.concatenate([rows, jnp.zeros((pad, d), rows.dtype)])
    rows = rows.reshape(chunks, ell, d)

    def step(carry, chunk):
        b, total = carry
        b, delta = _shrink(jnp.concatenate([b, chunk]), ell)
        return (b, total + delta), None

    (b, total), _ = jax.lax.scan(step, (sketch, jnp.zeros((), sketch.dtype)), rows)
    return b, total


def _chan(wa, ma, wb, mb):
    """Joint weight, mean and the Chan cross-term row ``√(W_a W_b / W)(μ_b − μ_a)``."""
    w = wa + wb
    frac = jnp.where(w > 0, wb / jnp.where(w > 0, w, 1), 0)
    delta = mb - ma
    return w, ma + frac * delta, jnp.sqrt(wa * frac) * delta


def fd_update(state: FDState, rows: jax.Array, mask=None, weights=None) -> FDState:
    """Folds ``rows[n, d]`` into the sketch (masked rows absent, non-finite rows counted)."""
    ok, bad = valid_rows(rows, mask)
    acc = state.mean.dtype
    xr = jnp.where(ok[:, None], rows.astype(acc), jnp.zeros((), acc))
    wv = ok.astype(acc) if weights is None else jnp.where(ok, weights.astype(acc), 0)
    wb = jnp.sum(wv)
    cnt = jnp.sum(ok).astype(acc)
    # Two-pass batch mean: a rough mean, then the exact correction about it.
    rough = jnp.sum(xr, 0) / jnp.maximum(cnt, 1)
    dev = jnp.where(ok[:, None], xr - rough[None, :], jnp.zeros((), acc))
    mb = rough + (wv @ dev) / jnp.where(wb > 0, wb, 1)
    y = jnp.where(ok[:, None], (xr - mb[None, :]) * jnp.sqrt(wv)[:, None], jnp.zeros((), acc))
    w, mean, corr = _chan(state.weight, state.mean, wb, mb)
    sketch, delta = _fold(state.sketch, jnp.concatenate([y, corr[None, :]]))
    counts = counts_add(state.counts, jnp.sum(ok).astype(jnp.int32), jnp.sum(bad).astype(jnp.int32))
    trace = state.trace + jnp.sum(y * y) + corr @ corr
    return FDState(counts, w, mean, trace, sketch, state.shrunk + delta)


def fd_merge(a: FDState, b: FDState) -> FDState:
    """Merges two sketches: concatenate both plus the Chan row, shrink once.

    Commutative and associative up to the documented bound (not bit-exact): the result sketches
    the centred scatter of the union with ``Δ = Δ_a + Δ_b + δ_merge``.
    """
    ell = a.sketch.shape[0]
    w, mean, corr = _chan(a.weight, a.mean, b.weight, b.mean)
    sketch, delta = _shrink(jnp.concatenate([a.sketch, b.sketch, corr[None, :]]), ell)
    trace = a.trace + b.trace + corr @ corr
    return FDState(
        counts_merge(a.counts, b.counts), w, mean, trace, sketch, a.shrunk + b.shrunk + delta
    )


fd_merge_jit = jax.jit(fd_merge)


def fd_spectrum(state: FDState) -> tuple[jax.Array, jax.Array]:
    """``(σ², V)``: squared singular values ``[ℓ]`` (descending) and right singular vectors
    ``[ℓ, d]`` of the sketch, from ``eigh`` of the ℓ×ℓ Gram (O(ℓ²d))."""
    b = state.sketch
    lam, u = jnp.linalg.eigh(jnp.matmul(b, b.T, precision=_HI))
    lam, u = jnp.maximum(lam[::-1], 0), u[:, ::-1]
    pos = lam > 1e-6 * jnp.maximum(lam[0], jnp.finfo(lam.dtype).tiny)
    inv = jnp.where(pos, jax.lax.rsqrt(jnp.where(pos, lam, 1)), 0)
    v = jnp.matmul((u * inv[None, :]).T, b, precision=_HI)
    return jnp.where(pos, lam, 0), v


def error_bound(state: FDState | FDFitted) -> jax.Array:
    """The guaranteed spectral-norm error of a Frequent Directions sketch.

    For a state: ``Δ`` with ``0 ≼ C − BᵀB ≼ Δ·I``, where ``C = Σ w (x − μ)(x − μ)ᵀ`` is the
    centred scatter of every row folded in (about their exact mean). For a fitted value: the
    same bound divided by the total weight, i.e. on the covariance ``C / W``. Also
    ``Δ ≤ ‖A − A_k‖²_F / (ℓ − k)`` for every ``k < ℓ``.

    Args:
      state: an :class:`FDState` (also the state of ``pca_residual(source="frequent_directions")``)
        or an :class:`FDFitted`.

    Returns:
      A float scalar.
    """
    if isinstance(state, FDFitted):
        return state.error_bound
    if not hasattr(state, "shrunk"):
        raise ConfigError(
            f"error_bound expects a Frequent Directions state or fitted value, got "
            f"{type(state).__name__}; estimators built on exact moments have no sketch error"
        )
    return state.shrunk


def residual_sq(rows: jax.Array, mean: jax.Array, components: jax.Array) -> jax.Array:
    """``|(I − VᵀV)(x − μ)|²`` per row for orthonormal rows ``V[k, d]`` (computed as the norm
    of the explicit residual, which keeps its digits when the residual is small)."""
    z = rows.astype(mean.dtype) - mean[None, :]
    p = jnp.matmul(z, components.T, precision=_HI)
    r = z - jnp.matmul(p, components, precision=_HI)
    return jnp.sum(r * r, -1)


# --------------------------------------------------------------------------- estimator


@register("frequent_directions")
def frequent_directions(*, sketch_size: int, rank: int | None = None) -> Estimator:
    """Frequent Directions sketch of the centred covariance; score = residual energy.

    Args:
      sketch_size: ℓ, rows of the sketch (memory ``ℓ·d`` floats; update cost O(ℓd) per row).
      rank: the score's subspace: the top ``rank`` sketched directions (default ``ℓ // 2``;
        FD's guarantee on the top-k subspace tightens as ``k`` falls below ℓ).

    Returns:
      An :class:`~jaxmon.Estimator` with :class:`FDState` states and :class:`FDFitted` fitted
      values (``.sketch`` is the ℓ×d sketch). ``score`` is the squared norm of ``x − μ``
      outside the top-``rank`` principal subspace (the PCA reconstruction error): higher
      means more anomalous. :func:`error_bound` gives the sketch's guaranteed error.

    Example:
      >>> est = jaxmon.frequent_directions(sketch_size=64)
      >>> s = est.update(est.init(jax.ShapeDtypeStruct((8192,), jnp.bfloat16)), acts)
      >>> jaxmon.sketch_error_bound(s)  # ‖C − BᵀB‖₂ ≤ this
    """
    return _frequent_directions(int(sketch_size), rank)


@functools.lru_cache(maxsize=64)
def _frequent_directions(ell: int, rank: int | None) -> Estimator:
    # Cached by hyperparameters: estimators are pure functions, so equal specs share one set
    # of jitted functions and compile once per process (from_spec included).
    sketch_size = ell
    if ell < 2:
        raise ConfigError(f"frequent_directions: sketch_size must be at least 2, got {sketch_size}")
    k = ell // 2 if rank is None else int(rank)
    if not 0 <= k < ell:
        raise ConfigError(f"frequent_directions: rank must lie in [0, sketch_size), got {rank}")
    spec = EstimatorSpec("frequent_directions", {"sketch_size": ell, "rank": rank})
    name = "frequent_directions"

    def init(example) -> FDState:
        d = feature_dim(example, name=name)
        return fd_init(d, ell, getattr(example, "dtype", jnp.float32))

    @jax.jit
    def update(state: FDState, x, *, mask=None, weights=None) -> FDState:
        rows, m, w = check_rows(x, state.mean.shape[0], name=name, mask=mask, weights=weights)
        return fd_update(state, rows, m, w)

    @jax.jit
    def _finalize(state: FDState) -> FDFitted:
        lam, v = fd_spectrum(state)
        w = jnp.where(state.weight > 0, state.weight, 1)
        return FDFitted(
            state.mean,
            state.sketch,
            v,
            lam / w,
            state.trace / w,
            state.shrunk / w,
            state.counts,
        )

    def finalize(state: FDState) -> FDFitted:
        require_rows(state, name)
        return _finalize(state)

    @jax.jit
    def score(fitted: FDFitted, x, *, mask=None):
        rows, _, _ = check_rows(x, fitted.mean.shape[0], name=name, mask=mask)
        out = residual_sq(rows, fitted.mean, fitted.components[:k])
        return finish_scores(out, rows, mask, x.shape[:-1], fitted.counts)

    return Estimator(init, update, fd_merge_jit, finalize, score, spec)
