"""Batch detectors: score a whole query set against trusted statistics (QUE, spectral signatures).

Per-row detectors (Mahalanobis, kNN, PCA residual) ask "is this row unusual?". Batch detectors
ask "which rows of this *set* carry a direction the set has too much of?". They use the query
set's own second moments, so a weak signal that many rows share adds up coherently:

* **When to use them.** Auditing a dataset that may be poisoned (backdoor triggers, a planted
  behaviour, a distribution shift affecting a fraction of rows), where the anomalies are many
  and share a direction, each too weak to stand out alone. Tran, Li & Madry (2018) showed that
  backdoored examples separate along the top singular direction of the representations; QUE
  (Dong, Hopkins & Li 2019, "Quantum Entropy Scoring for Fast Robust Mean Estimation and
  Improved Outlier Detection") weighs all excess-variance directions softly and is the
  outlier score behind SPECTRE (Hayase et al. 2021).
* **When not to.** For isolated anomalies, or a query set of a few rows (its covariance is
  then noise), use a per-row detector. The scores are relative to the set: the same row scores
  differently in another set, which is why these are functions, not ``Estimator`` s (whose
  scores must not depend on the other rows of a batch).

Two passes: the trusted statistics come from any fitted :func:`jaxmon.gaussian` (or a
:class:`jaxmon._numerics.Moments` state); the query set's moments are streamed in a second pass
with the same estimator's ``update`` (a ``Moments`` state, mergeable across devices), then every
query row is scored in a third, blockable pass: ``que_scores(trusted, query_state, rows)``.
With ``query=None`` the moments are computed from ``queries`` itself (one in-memory set).

Geometry: rows are whitened by the trusted covariance (``z = W(x − μ_q)``, centred on the
query set's mean as both papers do) and ``Σ̃ = W Σ_q Wᵀ`` is the query covariance in those
units; ``Σ̃ ≈ I`` when the query set looks like the trusted data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmon import _numerics as nm
from jaxmon._base import check_rows, finish_scores
from jaxmon.errors import ConfigError
from jaxmon.estimators.gaussian import GaussianFitted

__all__ = ["que_scores", "spectral_signature_scores"]

_HI = jax.lax.Precision.HIGHEST


def _whitener(trusted, d: int, ridge: float) -> jax.Array:
    """``W[d, d]`` with ``W Σ_t Wᵀ = I`` (identity when ``trusted`` is None)."""
    if trusted is None:
        return jnp.eye(d, dtype=jnp.float32)
    if isinstance(trusted, GaussianFitted):
        w = trusted.whitener
        return jnp.diag(w) if w.ndim == 1 else w
    if isinstance(trusted, nm.Moments):
        cov = nm.covariance(trusted)
        if cov.ndim == 1:
            return jnp.diag(jax.lax.rsqrt(cov + ridge * jnp.mean(cov)))
        lam, v = jnp.linalg.eigh(cov)
        lam = lam + ridge * jnp.mean(lam)
        return jax.lax.rsqrt(jnp.maximum(lam, jnp.finfo(lam.dtype).tiny))[:, None] * v.T
    raise ConfigError(
        f"trusted must be a fitted jaxmon.gaussian() (GaussianFitted), a Moments state or None, "
        f"got {type(trusted).__name__}"
    )


def _query_moments(query, rows, mask) -> nm.Moments:
    if query is None:
        d = rows.shape[1]
        return nm.moments_update(nm.moments_init(d, rows.dtype), rows, mask)
    if not isinstance(query, nm.Moments) or query.m2.ndim != 2:
        raise ConfigError(
            "query must be a full (non-diagonal) Moments state of the query set, e.g. "
            "jaxmon.gaussian().update(state, rows), or None to use the queries themselves"
        )
    return query


def _whitened(trusted, query, queries, mask, ridge):
    d = queries.shape[-1]
    rows, m, _ = check_rows(queries, d, name="batch detector", mask=mask)
    q = _query_moments(query, rows, m)
    w = _whitener(trusted, d, ridge).astype(q.mean.dtype)
    z = jnp.matmul(rows.astype(q.mean.dtype) - q.mean[None, :], w.T, precision=_HI)
    sig = jnp.matmul(jnp.matmul(w, nm.covariance(q), precision=_HI), w.T, precision=_HI)
    lam, u = jnp.linalg.eigh(0.5 * (sig + sig.T))  # ascending
    return z, lam, u, rows


@functools.partial(jax.jit, static_argnames=("ridge",))
def que_scores(
    trusted: GaussianFitted | nm.Moments | None,
    query: nm.Moments | None,
    queries: jax.Array,
    *,
    alpha: float = 4.0,
    mask: jax.Array | None = None,
    ridge: float = 1e-6,
) -> jax.Array:
    """Quantum-entropy (QUE) outlier scores of a query set (Dong, Hopkins & Li 2019).

    With whitened, query-centred rows ``z`` and ``Σ̃`` as in the module docstring,

        U = exp(α (Σ̃ − I) / (‖Σ̃‖₂ − 1)),     τ(x) = d · zᵀ U z / tr U.

    ``α → 0`` gives the squared whitened distance ``|z|²``; ``α → ∞`` the spectral signature
    along the top excess-variance direction. (The normalisation is shifted by ``λ_max`` inside
    the exponent, which cancels in the ratio, so no ``exp`` overflows; ``‖Σ̃‖₂ − 1`` is floored
    at 1e-3 when the set has no excess variance.)

    Args:
      trusted: trusted statistics: a fitted ``jaxmon.gaussian()``, a ``Moments`` state, or
        None (no whitening).
      query: the query set's ``Moments`` (a streamed second pass), or None to use ``queries``.
      queries: rows ``[..., d]`` to score.
      alpha: the entropy temperature (the paper's default is 4).
      mask: ``[...]``: rows to leave out (of the query moments when ``query`` is None); they
        score 0.
      ridge: relative ridge on a ``Moments`` trusted covariance.

    Returns:
      Scores ``[...]``: higher means more anomalous *relative to this query set*.
    """
    z, lam, u, rows = _whitened(trusted, query, queries, mask, ridge)
    top = lam[-1]
    scale = jnp.maximum(top - 1, 1e-3)
    e = jnp.exp(alpha * (lam - top) / scale)
    p = jnp.matmul(z, u, precision=_HI)
    tau = z.shape[1] * jnp.sum(p * p * e[None, :], -1) / jnp.sum(e)
    return finish_scores(tau, rows, mask, queries.shape[:-1])


@functools.partial(jax.jit, static_argnames=("num_directions", "ridge"))
def spectral_signature_scores(
    trusted: GaussianFitted | nm.Moments | None,
    query: nm.Moments | None,
    queries: jax.Array,
    *,
    num_directions: int = 1,
    mask: jax.Array | None = None,
    ridge: float = 1e-6,
) -> jax.Array:
    """Spectral-signature scores (Tran, Li & Madry 2018): squared projection of each centred row
    on the top ``num_directions`` eigenvectors of the query covariance.

    With ``trusted=None`` this is the paper's score exactly (top right singular vectors of the
    centred query matrix); with trusted statistics the rows are whitened first, so the
    directions are those where the query set has the most variance *in excess of* the trusted
    data, not merely the directions activations always vary in.

    Args:
      trusted: a fitted ``jaxmon.gaussian()``, a ``Moments`` state, or None.
      query: the query set's ``Moments``, or None to use ``queries``.
      queries: rows ``[..., d]`` to score.
      num_directions: how many top directions to sum over.
      mask: rows to leave out (they score 0).
      ridge: relative ridge on a ``Moments`` trusted covariance.

    Returns:
      Scores ``[...]``: higher means more anomalous relative to this query set.
    """
    z, _, u, rows = _whitened(trusted, query, queries, mask, ridge)
    p = jnp.matmul(z, u[:, -num_directions:], precision=_HI)
    return finish_scores(jnp.sum(p * p, -1), rows, mask, queries.shape[:-1])
