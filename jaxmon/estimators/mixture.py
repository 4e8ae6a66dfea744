"""Gaussian mixtures fitted by EM in ``finalize`` on a reservoir bank; score = −log-likelihood.

EM is not mergeable, so the state is a priority reservoir (:mod:`jaxmon.estimators.reservoir`:
exact, bit-identical merges) and the mixture is fitted once, in ``finalize``, on the bank:

1. centre the bank on its mean (activations have large means; EM in float32 then keeps digits);
2. pick ``components`` distinct bank rows by Gumbel-top-k from the seed, refine them with a few
   Lloyd (k-means) iterations, and take the k-means partition as the first responsibilities,
   as scikit-learn's ``init_params="kmeans"`` does;
3. run a fixed number of EM iterations (``lax.fori_loop``: one compiled loop, no host sync),
   with ``ridge × (mean variance)`` added to every covariance's diagonal (scikit-learn's
   ``reg_covar``, made scale-free).

Scores are ``−log p(x)`` under the fitted mixture, evaluated in row blocks with precomputed
whiteners ``L_j⁻¹`` (no per-query solves): higher means more anomalous.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmon import _numerics as nm
from jaxmon._base import (
    Counts,
    Estimator,
    EstimatorSpec,
    check_rows,
    counts_zero,
    feature_dim,
    finish_scores,
    register,
)
from jaxmon.errors import ConfigError
from jaxmon.estimators import reservoir as rv

__all__ = ["MixtureFitted", "gaussian_mixture"]

_HI = jax.lax.Precision.HIGHEST


class MixtureFitted(NamedTuple):
    """A fitted Gaussian mixture (means in the original coordinates are ``center + means``)."""

    center: jax.Array  # shape=(d,): the bank mean, subtracted before everything else
    means: jax.Array  # shape=(K, d): component means, centred coordinates
    covariances: jax.Array  # shape=(K, d, d) (or (K, d) when diagonal), ridge included
    whiteners: jax.Array  # shape=(K, d, d) = L_j⁻¹ (or (K, d) = 1/σ when diagonal)
    log_norm: jax.Array  # shape=(K,): log π_j − ½ (d log 2π + log det Σ_j)
    bank_log_likelihood: jax.Array  # shape=(): mean log-likelihood of the bank rows
    counts: Counts  # rows the reservoir saw (zero rows: every score is NaN)


def _log_dens(x, means, whiteners, log_norm) -> jax.Array:
    """``[K, n]`` log π_j N(x | μ_j, Σ_j) of centred rows ``x[n, d]``."""
    y = x[None, :, :] - means[:, None, :]
    if whiteners.ndim == 2:
        z = y * whiteners[:, None, :]
    else:
        z = jnp.einsum("knd,ked->kne", y, whiteners, precision=_HI)
    return log_norm[:, None] - 0.5 * jnp.sum(z * z, -1)


def _params(x, resp, reg, diagonal: bool):
    """M step: weights, means, covariances and their whiteners from responsibilities."""
    d = x.shape[1]
    nk = jnp.sum(resp, 1) + 10 * jnp.finfo(x.dtype).eps
    pi = nk / jnp.sum(nk)
    means = jnp.matmul(resp, x, precision=_HI) / nk[:, None]
    y = x[None, :, :] - means[:, None, :]
    if diagonal:
        cov = jnp.einsum("kn,knd->kd", resp, y * y) / nk[:, None]
    else:
        cov = jnp.einsum("kn,knd,kne->kde", resp, y, y, precision=_HI) / nk[:, None, None]
    w = nm.whiten(cov, reg, diagonal=diagonal)  # w.covariance: the ridge included
    log_norm = jnp.log(pi) - 0.5 * (d * math.log(2 * math.pi) + w.log_det)
    return means, w.covariance, w.whitener, log_norm


def fit_mixture(
    x: jax.Array,
    valid: jax.Array,
    *,
    components: int,
    iters: int,
    ridge: float,
    diagonal: bool,
    key: jax.Array,
    kmeans_iters: int = 10,
    counts: Counts | None = None,
) -> MixtureFitted:
    """EM on the valid rows of a bank ``x[m, d]`` (see module docstring).

    ``counts`` is the row counter recorded in the fitted value (default: the valid rows).
    """
    m = x.shape[0]
    v = valid.astype(x.dtype)
    cnt = jnp.maximum(jnp.sum(v), 1)
    center = jnp.matmul(v, x, precision=_HI) / cnt
    xc = jnp.where(valid[:, None], x - center[None, :], jnp.zeros((), x.dtype))
    var = jnp.matmul(v, xc * xc, precision=_HI) / cnt
    reg = ridge * jnp.maximum(jnp.mean(var), jnp.finfo(x.dtype).tiny)

    # Initial centres: distinct valid rows by Gumbel-top-k, then Lloyd iterations.
    g = jax.random.gumbel(key, (m,), x.dtype)
    _, pick = jax.lax.top_k(jnp.where(valid, g, -jnp.inf), components)
    centres = xc[pick]

    def hard(centres):
        d2 = jnp.sum(jnp.square(xc[None, :, :] - centres[:, None, :]), -1)
        return jax.nn.one_hot(jnp.argmin(d2, 0), components, dtype=x.dtype).T * v[None, :]

    def lloyd(_, centres):
        r = hard(centres)
        nk = jnp.sum(r, 1)
        new = jnp.matmul(r, xc, precision=_HI) / jnp.where(nk > 0, nk, 1)[:, None]
        return jnp.where((nk > 0)[:, None], new, centres)

    centres = jax.lax.fori_loop(0, kmeans_iters, lloyd, centres)
    params = _params(xc, hard(centres), reg, diagonal)

    def em(_, params):
        means, _cov, whiten, log_norm = params
        logp = _log_dens(xc, means, whiten, log_norm)
        resp = jax.nn.softmax(logp, axis=0) * v[None, :]
        return _params(xc, resp, reg, diagonal)

    means, cov, whiten, log_norm = jax.lax.fori_loop(0, iters, em, params)
    ll = jax.nn.logsumexp(_log_dens(xc, means, whiten, log_norm), axis=0)
    mean_ll = jnp.sum(jnp.where(valid, ll, 0)) / cnt
    if counts is None:
        counts = counts_zero()._replace(
            rows=jnp.stack([jnp.sum(valid).astype(jnp.uint32), jnp.uint32(0)])
        )
    return MixtureFitted(center, means, cov, whiten, log_norm, mean_ll, counts)


def mixture_nll(fitted: MixtureFitted, rows: jax.Array, *, block: int = 1024) -> jax.Array:
    """``−log p(x)`` per row ``[n]``, computed in blocks of rows."""
    x = rows.astype(fitted.center.dtype) - fitted.center[None, :]

    def one(xb):
        logp = _log_dens(xb, fitted.means, fitted.whiteners, fitted.log_norm)
        return -jax.nn.logsumexp(logp, axis=0)

    return rv.map_blocks(one, x, block)


@register("gaussian_mixture")
def gaussian_mixture(
    *,
    components: int,
    seed: int = 0,
    bank_size: int = 4096,
    iters: int = 100,
    covariance: str = "full",
    ridge: float = 1e-6,
    kmeans_iters: int = 10,
) -> Estimator:
    """A Gaussian mixture fitted by EM on a reservoir bank; score = negative log-likelihood.

    Args:
      components: K, mixture components.
      seed: salts the reservoir and seeds the initial centres.
      bank_size: rows kept by the reservoir and fitted in ``finalize`` (memory ``bank_size·d``;
        EM costs O(iters · bank_size · K · d²) once).
      iters: EM iterations (fixed: one compiled loop).
      covariance: ``"full"`` or ``"diag"``.
      ridge: added to each covariance's diagonal, times the bank's mean variance.
      kmeans_iters: Lloyd iterations refining the initial centres before EM.

    Returns:
      An :class:`~jaxmon.Estimator` with :class:`~jaxmon.ReservoirState` states (exact merges)
      and :class:`MixtureFitted` fitted values. Scores are ``−log p(x)`` in nats: higher means
      more anomalous.
    """
    if covariance not in ("full", "diag"):
        raise ConfigError(
            f"gaussian_mixture: covariance must be 'full' or 'diag', got {covariance!r}"
        )
    if not 1 <= int(components) <= int(bank_size):
        raise ConfigError(
            f"gaussian_mixture: need 1 ≤ components ≤ bank_size, got {components}, {bank_size}"
        )
    if int(iters) < 0 or int(kmeans_iters) < 0:
        raise ConfigError(
            f"gaussian_mixture: iters and kmeans_iters must be non-negative, got {iters}, "
            f"{kmeans_iters}"
        )
    return _gaussian_mixture(
        int(components),
        int(seed),
        int(bank_size),
        int(iters),
        covariance,
        float(ridge),
        int(kmeans_iters),
    )


@functools.lru_cache(maxsize=64)
def _gaussian_mixture(
    components, seed, bank_size, iters, covariance, ridge, kmeans_iters
) -> Estimator:
    # Cached by hyperparameters: equal specs share one set of compiled functions.
    spec = EstimatorSpec(
        "gaussian_mixture",
        {
            "components": components,
            "seed": seed,
            "bank_size": bank_size,
            "iters": iters,
            "covariance": covariance,
            "ridge": ridge,
            "kmeans_iters": kmeans_iters,
        },
    )
    name = "gaussian_mixture"
    salts = rv.seed_salts(seed)
    diagonal = covariance == "diag"

    def init(example) -> rv.ReservoirState:
        d = feature_dim(example, name=name)
        return rv.reservoir_init(d, bank_size, getattr(example, "dtype", jnp.float32))

    @jax.jit
    def update(state: rv.ReservoirState, x, *, mask=None, weights=None) -> rv.ReservoirState:
        if weights is not None:
            raise ConfigError(f"{name}: row weights are not supported; pass mask= to drop rows")
        rows, m, _ = check_rows(x, state.rows.shape[1], name=name, mask=mask)
        return rv.reservoir_update(state, rows, m, salts)

    @jax.jit
    def _finalize(state: rv.ReservoirState) -> MixtureFitted:
        return fit_mixture(
            state.rows,
            state.filled,
            components=components,
            iters=iters,
            ridge=ridge,
            diagonal=diagonal,
            key=jax.random.key(seed),
            kmeans_iters=kmeans_iters,
            counts=state.counts,
        )

    def finalize(state: rv.ReservoirState) -> MixtureFitted:
        rv.require_bank(state, components, name, f"a mixture of {components} components")
        return _finalize(state)

    @jax.jit
    def score(fitted: MixtureFitted, x, *, mask=None):
        rows, _, _ = check_rows(x, fitted.center.shape[0], name=name, mask=mask)
        return finish_scores(mixture_nll(fitted, rows), rows, mask, x.shape[:-1], fitted.counts)

    return Estimator(init, update, rv.reservoir_merge_jit, finalize, score, spec)
