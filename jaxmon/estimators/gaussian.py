"""The Gaussian family: Mahalanobis scores from one mergeable moments state.

Level 1 of the seed paper (per-layer activation distributions). The state is
:class:`jaxmon._numerics.Moments`; shrinkage (fixed, Ledoit–Wolf 2004, OAS of Chen et al. 2010)
is computed in ``finalize`` from streamed statistics and equals scikit-learn's ``LedoitWolf`` /
``OAS`` / ``ShrunkCovariance`` on the same rows, however they were batched or merged.
"""

from __future__ import annotations

import functools
import warnings
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
    is_traced,
    num_rows,
    register,
    require_rows,
)
from jaxmon.errors import ConditioningWarning, ConfigError
from jaxmon_kernels import centred, mahalanobis_sq


class GaussianFitted(NamedTuple):
    """A fitted Gaussian. For ``diagonal=True``, ``covariance`` holds the variances ``[d]``."""

    mean: jax.Array  # shape=(d,), dtype=float32
    covariance: jax.Array  # shape=(d, d) (or (d,) when diagonal): after shrinkage
    whitener: jax.Array  # shape=(d, d) = L⁻¹ (or (d,) = 1/σ when diagonal)
    diag_whitener: jax.Array  # shape=(d,) = 1/σ, the diagonal model (relative scores)
    shrinkage: jax.Array  # shape=(): the shrinkage intensity applied, in [0, 1]
    condition_number: jax.Array  # shape=(): of the covariance that is factorised
    log_det: jax.Array  # shape=(): log-determinant of that covariance
    counts: Counts  # rows the fit saw (zero rows: every score is NaN)


def _shrinkage_intensity(m: nm.Moments, shrinkage) -> jax.Array:
    n, p = m.weight, m.mean.shape[0]
    emp = nm.covariance(m)
    if shrinkage is None:
        return jnp.zeros((), emp.dtype)
    if isinstance(shrinkage, float | int):
        return jnp.asarray(float(shrinkage), emp.dtype)
    trace = jnp.trace(emp)
    mu = trace / p
    if shrinkage == "ledoit_wolf":
        # scikit-learn's ledoit_wolf_shrinkage, with Σ|x-μ|⁴ (its β_) streamed as M4.
        delta_ = jnp.sum(emp * emp)
        beta = (m.m4 / n - delta_) / (p * n)
        delta = (delta_ - 2.0 * mu * trace + p * mu**2) / p
        beta = jnp.minimum(beta, delta)
        return jnp.where(beta == 0, 0.0, beta / jnp.where(delta == 0, 1.0, delta))
    # OAS, as scikit-learn's _oas (Chen et al. 2010, eq. 23 without the 2/p factor).
    alpha = jnp.mean(emp * emp)
    num = alpha + mu**2
    den = (n + 1) * (alpha - mu**2 / p)
    return jnp.where(den == 0, 1.0, jnp.minimum(num / jnp.where(den == 0, 1.0, den), 1.0))


@register("gaussian")
def gaussian(
    *,
    shrinkage: float | str | None = None,
    diagonal: bool = False,
    relative: bool = False,
    ridge: float = 1e-6,
    precision: str = "auto",
) -> Estimator:
    """Gaussian density of activations; score = squared Mahalanobis distance.

    Args:
      shrinkage: ``None`` (empirical covariance), a float ``s`` in [0, 1]
        (``(1-s)·S + s·tr(S)/d·I``, as ``sklearn.covariance.ShrunkCovariance``),
        ``"ledoit_wolf"`` or ``"oas"`` (intensity estimated from the streamed data).
      diagonal: model only the variances (O(d) state and score).
      relative: the relative Mahalanobis score of Ren et al. (2021), "A simple fix to
        Mahalanobis distance": the full-covariance distance minus the distance under the
        diagonal (independent-features) Gaussian of the same data. It discounts directions
        that are merely high-variance per feature and highlights broken correlations.
      ridge: added to the diagonal (times the mean variance) of the factorised covariance
        only, so that a rank-deficient covariance (fewer rows than features) still factorises.
      precision: operands of the scoring matmul. ``"auto"`` (default): bf16 query rows are
        centred in float32, then multiplied by a bf16 copy of the whitener with float32
        accumulation (the bf16 matrix unit; error no larger than the rows' own bf16 rounding);
        float32 rows are scored in float32. ``"float32"``: float32 throughout. ``"bfloat16"``:
        bf16 operands for float32 rows too (faster, ~1e-3 relative score error).
        Fitting is unaffected.

    Returns:
      An :class:`~jaxmon.Estimator` whose fitted value is a :class:`GaussianFitted`. Scores are
      squared Mahalanobis distances: higher means more anomalous.

    Example:
      >>> est = jaxmon.gaussian(shrinkage="ledoit_wolf")
      >>> s = est.update(est.init(jax.ShapeDtypeStruct((768,), jnp.bfloat16)), acts)
      >>> scores = est.score(est.finalize(s), queries)
    """
    if shrinkage is not None and not isinstance(shrinkage, str):
        if not 0.0 <= float(shrinkage) <= 1.0:
            raise ConfigError(f"gaussian: a fixed shrinkage must lie in [0, 1], got {shrinkage}")
        shrinkage = float(shrinkage)
    elif isinstance(shrinkage, str) and shrinkage not in ("ledoit_wolf", "oas"):
        raise ConfigError(
            f"gaussian: shrinkage must be None, a float, 'ledoit_wolf' or 'oas', got {shrinkage!r}"
        )
    if diagonal and isinstance(shrinkage, str):
        raise ConfigError(
            "gaussian: diagonal=True keeps no off-diagonal statistics, so Ledoit-Wolf/OAS "
            "cannot be estimated; use shrinkage=None or a fixed float"
        )
    if diagonal and relative:
        raise ConfigError("gaussian: relative=True compares full against diagonal; drop diagonal")
    precision = nm.check_precision("gaussian", precision)
    return _gaussian(shrinkage, bool(diagonal), bool(relative), float(ridge), precision)


@functools.lru_cache(maxsize=64)
def _gaussian(shrinkage, diagonal: bool, relative: bool, ridge: float, precision: str) -> Estimator:
    # Cached by (normalised) hyperparameters: estimators are pure functions, so equal specs,
    # from_spec included, share one set of jitted functions and compile once per process.
    params = {"shrinkage": shrinkage, "diagonal": diagonal, "relative": relative, "ridge": ridge}
    if precision != "auto":  # specs (and checkpoints) written before the knob stay equal
        params["precision"] = precision
    spec = EstimatorSpec("gaussian", params)
    name = "gaussian"

    def init(example) -> nm.Moments:
        d = feature_dim(example, name=name)
        return nm.moments_init(d, getattr(example, "dtype", jnp.float32), diagonal=diagonal)

    @jax.jit
    def update(state: nm.Moments, x, *, mask=None, weights=None) -> nm.Moments:
        rows, m, w = check_rows(x, state.mean.shape[0], name=name, mask=mask, weights=weights)
        return nm.moments_update(state, rows, m, w)

    @jax.jit
    def _finalize(state: nm.Moments) -> GaussianFitted:
        emp = nm.covariance(state)
        var = jnp.diagonal(emp) if emp.ndim == 2 else emp
        mu = jnp.mean(var)
        floor = nm.scale_free_ridge(ridge, mu)
        diag_whitener = nm.whiten(var, floor, diagonal=True).whitener
        s = _shrinkage_intensity(state, shrinkage)
        if diagonal:
            cov = (1 - s) * emp + s * mu
        else:
            cov = (1 - s) * emp + s * mu * jnp.eye(emp.shape[0], dtype=emp.dtype)
        w = nm.whiten(cov, floor, diagonal=diagonal)
        cond = nm.condition_number(w, diagonal=diagonal)
        return GaussianFitted(
            state.mean, cov, w.whitener, diag_whitener, s, cond, w.log_det, state.counts
        )

    def finalize(state: nm.Moments) -> GaussianFitted:
        require_rows(state, name)
        if shrinkage is None and not diagonal and not is_traced(state):
            n, d = num_rows(state), state.mean.shape[0]
            if n <= d:
                warnings.warn(
                    f"gaussian: {n} rows for {d} features leave the empirical covariance "
                    "singular (only the ridge keeps it invertible), so Mahalanobis scores are "
                    'dominated by noise directions; use gaussian(shrinkage="ledoit_wolf")',
                    ConditioningWarning,
                    stacklevel=2,
                )
        return _finalize(state)

    @jax.jit
    def score(fitted: GaussianFitted, x, *, mask=None):
        d = fitted.mean.shape[0]
        rows, _, _ = check_rows(x, d, name=name, mask=mask)
        xs = nm.matmul_rows(rows)  # finish_scores below checks the original rows
        if diagonal:
            out = jnp.sum(jnp.square(centred(xs, fitted.mean) * fitted.whitener[None]), -1)
        else:
            operand = nm.score_operand(rows.dtype, precision)
            out = mahalanobis_sq(xs, fitted.mean, fitted.whitener, operand_dtype=operand)
            if relative:
                z = centred(xs, fitted.mean) * fitted.diag_whitener[None]
                out = out - jnp.sum(z * z, -1)
        return finish_scores(out, rows, mask, x.shape[:-1], fitted.counts)

    return Estimator(init, update, nm.moments_merge_jit, finalize, score, spec)


@nm.register_block_scorer("gaussian")
def _block_score(params, fitted: GaussianFitted, block: nm.CentredBlock):
    """Raw scores of a monitor's shared centred block (full covariance only)."""
    if params.get("diagonal"):
        return None
    acc = fitted.mean.dtype
    offset = block.center - fitted.mean  # centred + offset = rows - mean
    w = fitted.whitener.astype(block.operand)
    z = jax.lax.dot_general(block.centred, w, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    z = z + (fitted.whitener @ offset)[None, :]
    out = jnp.sum(z * z, -1)
    if params.get("relative"):
        zd = (block.centred.astype(acc) + offset[None, :]) * fitted.diag_whitener[None]
        out = out - jnp.sum(zd * zd, -1)
    return out
