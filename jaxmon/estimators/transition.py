"""Layer-to-layer transition estimator: level 2 of the seed paper (how modes propagate).

A per-layer detector asks "does this layer's activation look normal?". Two layers can each look
normal while the *map* between them is abnormal: information moved between them in an unusual
way. The transition estimator keeps the joint moments of a pair of taps ``(a, b)`` (one mergeable
:class:`~jaxmon._numerics.Moments` over the concatenation ``[a, b]``, split into its blocks),
fits in ``finalize`` the ridge-regularised linear map ``b ≈ μ_b + (a - μ_a) C`` and the covariance
of its residual, and scores the squared Mahalanobis norm of the residual of each row.

Used through a monitor with a pair pattern::

    mon = jaxmon.monitor({("blocks/3/out", "blocks/4/out"): jaxmon.transition(ridge=1e-3)})

The estimator receives the tuple ``(x_a, x_b)`` as its ``x`` (both ``[..., d_a]`` and
``[..., d_b]`` with the same leading shape); ``init`` takes a tuple of two examples.
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
    ShapeError,
    check_rows,
    feature_dim,
    finish_scores,
    register,
    require_rows,
)
from jaxmon.errors import ConfigError
from jaxmon_kernels import centred, mahalanobis_sq

__all__ = ["transition", "TransitionState", "TransitionFitted"]


class TransitionState(NamedTuple):
    """Joint moments of two taps, stored as the blocks of the joint :class:`Moments`.

    The ``b``-``a`` block of the joint second moment is the transpose of ``m2_ab`` and is not
    stored. Merging reassembles the joint moments and uses Chan's exact formulas.
    """

    counts: Counts  # exact row counters (rows with NaN/inf in either tap are excluded)
    weight: jax.Array  # shape=(), dtype=float32: Σ w
    mean_a: jax.Array  # shape=(d_a,), dtype=float32
    mean_b: jax.Array  # shape=(d_b,), dtype=float32
    m2_aa: jax.Array  # shape=(d_a, d_a): Σ w (a-μ_a)(a-μ_a)ᵀ
    m2_ab: jax.Array  # shape=(d_a, d_b): Σ w (a-μ_a)(b-μ_b)ᵀ
    m2_bb: jax.Array  # shape=(d_b, d_b): Σ w (b-μ_b)(b-μ_b)ᵀ
    m3: jax.Array  # shape=(d_a + d_b,): third joint power sum (kept so merges stay exact)
    m4: jax.Array  # shape=(): fourth joint power sum


class TransitionFitted(NamedTuple):
    """The fitted linear map ``b ≈ mean_b + (a - mean_a) @ coef`` and its residual Gaussian."""

    mean_a: jax.Array  # shape=(d_a,)
    mean_b: jax.Array  # shape=(d_b,)
    coef: jax.Array  # shape=(d_a, d_b): the ridge map (folded through the PCA basis if rank)
    residual_covariance: jax.Array  # shape=(d_b, d_b): covariance of the training residuals
    whitener: jax.Array  # shape=(d_b, d_b) = L⁻¹ of the (floored) residual covariance
    explained_variance: jax.Array  # shape=(): 1 - tr(residual cov) / tr(cov of b), the R²
    condition_number: jax.Array  # shape=(): of the factorised residual covariance
    log_det: jax.Array  # shape=(): log-determinant of the factorised residual covariance
    counts: Counts  # rows the fit saw (zero rows: every score is NaN)


def _joint(s: TransitionState) -> nm.Moments:
    m2 = jnp.block([[s.m2_aa, s.m2_ab], [s.m2_ab.T, s.m2_bb]])
    return nm.Moments(s.counts, s.weight, jnp.concatenate([s.mean_a, s.mean_b]), m2, s.m3, s.m4)


def _split(m: nm.Moments, d_a: int) -> TransitionState:
    return TransitionState(
        m.counts,
        m.weight,
        m.mean[:d_a],
        m.mean[d_a:],
        m.m2[:d_a, :d_a],
        m.m2[:d_a, d_a:],
        m.m2[d_a:, d_a:],
        m.m3,
        m.m4,
    )


def _pair(x, name: str, what: str):
    if not isinstance(x, tuple | list) or len(x) != 2:
        raise ShapeError(
            f"{name}: {what} must be a pair (x_a, x_b) of the two taps' activations, got "
            f"{type(x).__name__}; use it through jaxmon.monitor with a pair pattern "
            "{('tap_a', 'tap_b'): jaxmon.transition(...)} or pass a tuple yourself"
        )
    return x[0], x[1]


def _pair_inputs(x, d_a: int, d_b: int, name: str, mask=None, weights=None):
    """Both taps' rows, checked and flattened, in one dtype: ``(rows_a, rows_b, m, w, lead)``."""
    xa, xb = _pair(x, name, "x")
    ra, m, w = check_rows(xa, d_a, name=f"{name} (first tap)", mask=mask, weights=weights)
    rb, _, _ = check_rows(xb, d_b, name=f"{name} (second tap)")
    if tuple(xa.shape[:-1]) != tuple(xb.shape[:-1]):
        raise ShapeError(
            f"{name}: the two taps must have the same leading shape (one row of each per "
            f"token), got {list(xa.shape)} and {list(xb.shape)}"
        )
    # Strict promotion forbids mixing bf16 and f32 implicitly; a common dtype keeps the joint
    # Gram in one kernel call (bf16 only when both taps are bf16).
    dt = ra.dtype if ra.dtype == rb.dtype else jnp.float32
    return ra.astype(dt), rb.astype(dt), m, w, tuple(xa.shape[:-1])


def _pair_rows(x, d_a: int, d_b: int, name: str, mask=None, weights=None):
    ra, rb, m, w, lead = _pair_inputs(x, d_a, d_b, name, mask, weights)
    return jnp.concatenate([ra, rb], axis=1), m, w, lead


_NAME = "transition"


# Module-level jitted functions (hyperparameters static): every estimator instance with the same
# hyperparameters shares one compiled kernel per shape, e.g. a monitor over many tap pairs.
@jax.jit
def _update(state: TransitionState, x, mask, weights) -> TransitionState:
    d_a, d_b = state.mean_a.shape[0], state.mean_b.shape[0]
    rows, m, w, _ = _pair_rows(x, d_a, d_b, _NAME, mask, weights)
    return _split(nm.moments_update(_joint(state), rows, m, w), d_a)


@jax.jit
def _merge(a: TransitionState, b: TransitionState) -> TransitionState:
    return _split(nm.moments_merge(_joint(a), _joint(b)), a.mean_a.shape[0])


@functools.partial(jax.jit, static_argnames=("rank",))
def _finalize(
    state: TransitionState, ridge: jax.Array, residual_ridge: jax.Array, *, rank: int | None
) -> TransitionFitted:
    # The ridges are traced (one compiled finalize serves every value); the rank sets shapes.
    w = state.weight
    inv_w = jnp.where(w > 0, 1 / jnp.where(w > 0, w, 1), 0)
    s_aa, s_ab, s_bb = state.m2_aa * inv_w, state.m2_ab * inv_w, state.m2_bb * inv_w
    d_a, d_b = s_ab.shape
    lam = nm.scale_free_ridge(ridge, jnp.trace(s_aa) / d_a)
    if rank is None:
        coef = nm.cholesky_solve(nm.whiten(s_aa, lam), s_ab)
    else:
        # Principal component regression: a diagonal solve in the top-`rank` eigenbasis.
        evals, evecs = jnp.linalg.eigh(s_aa)
        basis, top = evecs[:, d_a - rank :], evals[d_a - rank :]
        denom = jnp.maximum(top, 0) + lam
        inv = jnp.where(denom > 0, 1 / jnp.where(denom > 0, denom, 1), 0)
        coef = basis @ ((basis.T @ s_ab) * inv[:, None])
    cross = s_ab.T @ coef  # Σ_ba C
    res = s_bb - cross - cross.T + coef.T @ (s_aa @ coef)
    res = 0.5 * (res + res.T)
    w = nm.whiten(res, nm.scale_free_ridge(residual_ridge, jnp.trace(res) / d_b))
    tr_b = jnp.trace(s_bb)
    explained = jnp.where(tr_b > 0, 1 - jnp.trace(res) / jnp.where(tr_b > 0, tr_b, 1), 0)
    return TransitionFitted(
        state.mean_a,
        state.mean_b,
        coef,
        res,
        w.whitener,
        explained,
        nm.condition_number(w),
        w.log_det,
        state.counts,
    )


@functools.partial(jax.jit, static_argnames=("precision",))
def _score(fitted: TransitionFitted, x, mask, *, precision: str = "auto"):
    d_a, d_b = fitted.coef.shape
    # The taps stay apart (no joint row): slices of a joint bf16 row would reach the matmuls
    # through an extra float32 copy.
    ra, rb, _, _, lead = _pair_inputs(x, d_a, d_b, _NAME, mask)
    acc = fitted.coef.dtype
    operand = nm.score_operand(ra.dtype, precision)
    # Centre in float32 (activations' means dwarf their spread) before the map; with bf16
    # operands the map and the whitening run on the matrix unit, the residual in float32.
    # finish_scores below checks the original rows; the matmuls read their own handles.
    ya = centred(nm.matmul_rows(ra), fitted.mean_a, operand)
    yb = centred(nm.matmul_rows(rb), fitted.mean_b)
    coef = fitted.coef if operand is None else fitted.coef.astype(operand)
    pred = jax.lax.dot_general(ya, coef, (((1,), (0,)), ((), ())), preferred_element_type=acc)
    out = mahalanobis_sq(yb - pred, jnp.zeros((d_b,), acc), fitted.whitener, operand_dtype=operand)
    return finish_scores(out, (ra, rb), mask, lead, fitted.counts)


@register("transition")
def transition(
    *,
    ridge: float = 1e-3,
    rank: int | None = None,
    residual_ridge: float = 1e-6,
    precision: str = "auto",
) -> Estimator:
    """Transition between two taps: score = squared Mahalanobis norm of the linear residual.

    ``finalize`` fits ``C = (Σ_aa + λ I)⁻¹ Σ_ab`` from the centred joint covariance blocks
    (maximum-likelihood, ``M2 / W``), so ``b̂ = μ_b + (a - μ_a) C`` is ridge regression of ``b``
    on ``a`` fitted on every streamed row; then the covariance of the residual ``r = b - b̂`` on
    those rows, ``Σ_rr = Σ_bb - Σ_ba C - Cᵀ Σ_ab + Cᵀ Σ_aa C``, and its Cholesky whitener.

    Args:
      ridge: the ridge ``λ`` relative to the mean variance of ``a``: ``λ = ridge · tr(Σ_aa)/d_a``
        (scale-free, as activations' scales vary by orders of magnitude; equals scikit-learn's
        ``Ridge(alpha=λ · n)`` on the same rows). ``0`` gives ordinary least squares.
      rank: fit the map in the top-``rank`` principal components of ``a`` (principal component
        regression) instead of all ``d_a`` directions, for wide taps or few rows; the map is
        folded back to ``[d_a, d_b]`` so scoring costs the same.
      residual_ridge: added to the residual covariance's diagonal (times its mean variance)
        before the Cholesky factorisation, so a (near-)deterministic map still factorises.
      precision: operands of the two scoring matmuls (the map and the whitening): ``"auto"``
        (bf16 taps: bf16 operands with float32 accumulation, after float32 centring; the
        residual is formed in float32), ``"float32"`` or ``"bfloat16"`` (see
        :func:`jaxmon.gaussian`).

    Returns:
      An :class:`~jaxmon.Estimator` over pairs ``(x_a, x_b)``; its fitted value is a
      :class:`TransitionFitted`. Scores are squared Mahalanobis norms of the residual: higher
      means more anomalous ("information did not move from a to b the usual way").

    Example:
      >>> est = jaxmon.transition(ridge=1e-3)
      >>> s = est.init((jax.ShapeDtypeStruct((768,), jnp.float32),) * 2)
      >>> s = est.update(s, (acts_3, acts_4))
      >>> scores = est.score(est.finalize(s), (q_3, q_4))
    """
    if not float(ridge) >= 0.0:
        raise ConfigError(f"transition: ridge must be >= 0, got {ridge}")
    if rank is not None and (isinstance(rank, bool) or int(rank) < 1):
        raise ConfigError(f"transition: rank must be None or a positive int, got {rank!r}")
    if not float(residual_ridge) >= 0.0:
        raise ConfigError(f"transition: residual_ridge must be >= 0, got {residual_ridge}")
    ridge, residual_ridge = float(ridge), float(residual_ridge)
    rank = None if rank is None else int(rank)
    precision = nm.check_precision("transition", precision)
    params = {"ridge": ridge, "rank": rank, "residual_ridge": residual_ridge}
    if precision != "auto":  # specs (and checkpoints) written before the knob stay equal
        params["precision"] = precision
    spec = EstimatorSpec("transition", params)

    def init(example) -> TransitionState:
        ea, eb = _pair(example, _NAME, "the init example")
        d_a, d_b = feature_dim(ea, name=_NAME), feature_dim(eb, name=_NAME)
        if rank is not None and rank > d_a:
            raise ConfigError(f"transition: rank={rank} exceeds the first tap's width {d_a}")
        dtypes = {jnp.dtype(getattr(e, "dtype", jnp.float32)) for e in (ea, eb)}
        dt = dtypes.pop() if len(dtypes) == 1 else jnp.dtype(jnp.float32)
        return _split(nm.moments_init(d_a + d_b, dt), d_a)

    def update(state: TransitionState, x, *, mask=None, weights=None) -> TransitionState:
        return _update(state, x, mask, weights)

    def finalize(state: TransitionState) -> TransitionFitted:
        require_rows(state, _NAME)
        acc = state.m2_aa.dtype
        return _finalize(
            state, jnp.asarray(ridge, acc), jnp.asarray(residual_ridge, acc), rank=rank
        )

    def score(fitted: TransitionFitted, x, *, mask=None):
        return _score(fitted, x, mask, precision=precision)

    return Estimator(init, update, _merge, finalize, score, spec)
