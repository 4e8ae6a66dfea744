"""PCA-residual / low-rank Gaussian: energy outside the top subspace plus whitened distance in it.

The fitted model is probabilistic PCA (Tipping & Bishop 1999) with the top-``rank`` principal
directions ``V`` kept and an isotropic residual variance ``σ²`` elsewhere:

    Σ = Vᵀ Λ V + σ² (I − VᵀV),     σ² = (tr Σ̂ − Σ_{i≤r} λ_i) / (d − r),

and the score is its squared Mahalanobis distance

    score(x) = Σ_i (v_i·(x − μ))² / λ_i  +  |(I − VᵀV)(x − μ)|² / σ²,

the in-subspace whitened distance plus the reconstruction error in units of the residual
variance: the two halves of ViM (Wang et al. 2022) and of PCA-reconstruction detectors, with
weights fixed by the data rather than tuned.

Two sources of the subspace:

* ``source="moments"``: exact covariance from :class:`jaxmon._numerics.Moments` (d×d state,
  exact Chan merges), ``eigh`` in ``finalize``;
* ``source="frequent_directions"``: a Frequent Directions sketch (O(ℓd) state; works at
  d = 16k). The sketch's eigenvalues ``λ̂_i`` lie within ``Δ/W`` (``error_bound/W``) below the
  true ones, and on flat spectra they collapse towards 0, which would inflate the whitened
  distance. The variance along each sketched direction is therefore ``λ̂_i + ρ``, with
  ``ρ = (tr Σ̂ − |B|²_F/W)/d`` the mass the sketch shed spread isotropically (``C ≈ BᵀB + ρI``);
  ``ρ ≤ Δ/W``, so this stays inside FD's guarantee ``[λ̂_i, λ̂_i + Δ/W]``. The total variance
  ``tr Σ̂`` is tracked exactly, so σ² absorbs the rest.
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
    feature_dim,
    finish_scores,
    register,
    require_rows,
)
from jaxmon.errors import ConfigError
from jaxmon.estimators import frequent_directions as fd
from jaxmon_kernels import centred

__all__ = ["PCAResidualFitted", "pca_residual"]

_HI = jax.lax.Precision.HIGHEST


class PCAResidualFitted(NamedTuple):
    """A fitted low-rank Gaussian (probabilistic PCA)."""

    mean: jax.Array  # shape=(d,)
    components: jax.Array  # shape=(rank, d): orthonormal principal directions, λ descending
    eigenvalues: jax.Array  # shape=(rank,): variances along them (floored by the ridge)
    residual_variance: jax.Array  # shape=(): σ², mean variance outside the subspace
    counts: Counts  # rows the fit saw (zero rows: every score is NaN)


def pca_scores(
    fitted: PCAResidualFitted, rows: jax.Array, operand_dtype: jnp.dtype | None = None
) -> jax.Array:
    """PPCA squared Mahalanobis distances ``[n]`` of ``rows[n, d]`` (see module docstring).

    With ``operand_dtype=jnp.bfloat16`` both products (projection ``p = V z`` and reconstruction
    ``Vᵀ p``) take bf16 operands with float32 accumulation; rows are centred in float32 first,
    and the residual ``z − Vᵀ p`` is formed in float32 from the same rounded centred rows.
    """
    return _centred_scores(fitted, centred(rows, fitted.mean, operand_dtype), None, operand_dtype)


def _centred_scores(fitted: PCAResidualFitted, z, offset, operand_dtype) -> jax.Array:
    """Scores of ``z + offset = rows − mean`` (``offset`` None: zero)."""
    acc = fitted.mean.dtype
    comps = fitted.components
    if operand_dtype is None:
        p = jnp.matmul(z, comps.T, precision=_HI)
    else:
        p = jax.lax.dot_general(
            z, comps.astype(operand_dtype), (((1,), (1,)), ((), ())), preferred_element_type=acc
        )
    if offset is not None:
        p = p + (comps @ offset)[None, :]
    if operand_dtype is None:
        recon = jnp.matmul(p, comps, precision=_HI)
    else:
        recon = jax.lax.dot_general(
            p.astype(operand_dtype),
            comps.astype(operand_dtype),
            (((1,), (0,)), ((), ())),
            preferred_element_type=acc,
        )
    zf = z.astype(acc) if offset is None else z.astype(acc) + offset[None, :]
    r = zf - recon
    inside = jnp.sum(p * p / fitted.eigenvalues[None, :], -1)
    return inside + jnp.sum(r * r, -1) / fitted.residual_variance


@nm.register_block_scorer("pca_residual")
def _block_score(params, fitted: PCAResidualFitted, block: nm.CentredBlock):
    """Raw scores of a monitor's shared centred block."""
    return _centred_scores(fitted, block.centred, block.center - fitted.mean, block.operand)


def _fit(mean, lam, vecs, total, d: int, rank: int, ridge: float, counts) -> PCAResidualFitted:
    lam = jnp.maximum(lam, 0)
    floor = ridge * jnp.where(total > 0, total / d, 1.0)
    resid = jnp.maximum(total - jnp.sum(lam), 0) / (d - rank)
    return PCAResidualFitted(mean, vecs, lam + floor, resid + floor, counts)


@register("pca_residual")
def pca_residual(
    *,
    rank: int,
    source: str = "moments",
    sketch_size: int | None = None,
    ridge: float = 1e-6,
    precision: str = "auto",
) -> Estimator:
    """Low-rank Gaussian: whitened distance in the top-``rank`` subspace + residual energy.

    Args:
      rank: r, principal directions modelled individually (``1 ≤ r < d``).
      source: ``"moments"`` (exact d×d covariance) or ``"frequent_directions"`` (an ℓ×d
        sketch, for wide taps).
      sketch_size: ℓ for the sketch (default ``2·rank``; must exceed ``rank``). Only with
        ``source="frequent_directions"``.
      ridge: added to every variance, times the mean variance, so that rank-deficient data
        (fewer rows than features, or an empty residual) still scores finitely.
      precision: operands of the scoring matmuls: ``"auto"`` (bf16 rows: bf16 operands with
        float32 accumulation after float32 centring; other rows: float32), ``"float32"`` or
        ``"bfloat16"`` (see :func:`jaxmon.gaussian`).

    Returns:
      An :class:`~jaxmon.Estimator` whose fitted value is a :class:`PCAResidualFitted`. Scores
      are squared PPCA Mahalanobis distances: higher means more anomalous.

    Example:
      >>> est = jaxmon.pca_residual(rank=32, source="frequent_directions", sketch_size=128)
    """
    if source not in ("moments", "frequent_directions"):
        raise ConfigError(
            f"pca_residual: source must be 'moments' or 'frequent_directions', got {source!r}"
        )
    if int(rank) < 1:
        raise ConfigError(f"pca_residual: rank must be at least 1, got {rank}")
    if source == "moments" and sketch_size is not None:
        raise ConfigError("pca_residual: sketch_size applies only to source='frequent_directions'")
    if source == "frequent_directions":
        sketch_size = 2 * int(rank) if sketch_size is None else int(sketch_size)
        if sketch_size <= int(rank):
            raise ConfigError(
                f"pca_residual: sketch_size ({sketch_size}) must exceed rank ({rank})"
            )
    precision = nm.check_precision("pca_residual", precision)
    return _pca_residual(int(rank), source, sketch_size, float(ridge), precision)


@functools.lru_cache(maxsize=64)
def _pca_residual(
    rank: int, source: str, ell: int | None, ridge: float, precision: str
) -> Estimator:
    # Cached by hyperparameters: equal specs share one set of compiled functions.
    params = {"rank": rank, "source": source, "sketch_size": ell, "ridge": ridge}
    if precision != "auto":  # specs (and checkpoints) written before the knob stay equal
        params["precision"] = precision
    spec = EstimatorSpec("pca_residual", params)
    name = "pca_residual"
    sketched = source == "frequent_directions"

    def init(example):
        d = feature_dim(example, name=name)
        if rank >= d:
            raise ConfigError(
                f"{name}: rank ({rank}) must be below the feature size ({d}); "
                "use jaxmon.gaussian() to model every direction"
            )
        dtype = getattr(example, "dtype", jnp.float32)
        return fd.fd_init(d, ell, dtype) if sketched else nm.moments_init(d, dtype)

    @jax.jit
    def update(state, x, *, mask=None, weights=None):
        rows, m, w = check_rows(x, state.mean.shape[0], name=name, mask=mask, weights=weights)
        return (fd.fd_update if sketched else nm.moments_update)(state, rows, m, w)

    @jax.jit
    def _finalize(state) -> PCAResidualFitted:
        d = state.mean.shape[0]
        wt = jnp.where(state.weight > 0, state.weight, 1)
        if sketched:
            sig2, vecs = fd.fd_spectrum(state)
            total = state.trace / wt
            # Mass the sketch shed, spread isotropically (C ≈ BᵀB + ρI): stays inside FD's
            # guarantee λ̂_i ≤ λ_i ≤ λ̂_i + Δ/W since tr(C − BᵀB) ≤ dΔ, and keeps flat spectra
            # (where λ̂ collapses towards 0) from inflating the whitened distance.
            rho = jnp.maximum(total - jnp.sum(sig2) / wt, 0) / d
            lam, vecs = sig2[:rank] / wt + rho, vecs[:rank]
        else:
            cov = nm.covariance(state)
            ev, u = jnp.linalg.eigh(cov)
            lam, vecs = ev[::-1][:rank], u[:, ::-1][:, :rank].T
            total = jnp.trace(cov)
        return _fit(state.mean, lam, vecs, total, d, rank, ridge, state.counts)

    def finalize(state) -> PCAResidualFitted:
        require_rows(state, name)
        return _finalize(state)

    @jax.jit
    def score(fitted: PCAResidualFitted, x, *, mask=None):
        rows, _, _ = check_rows(x, fitted.mean.shape[0], name=name, mask=mask)
        # finish_scores checks the original rows; the matmuls read their own handle on them.
        out = pca_scores(fitted, nm.matmul_rows(rows), nm.score_operand(rows.dtype, precision))
        return finish_scores(out, rows, mask, x.shape[:-1], fitted.counts)

    merge = fd.fd_merge_jit if sketched else nm.moments_merge_jit
    return Estimator(init, update, merge, finalize, score, spec)
