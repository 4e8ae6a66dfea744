"""Comparisons of two fitted states, per tap, for audits (sections 2.1 and 2.2 of the seed paper).

Two fitted values of the same estimator — fitted on a trusted dataset and on a generated or
curated one, or on a model before and after an edit, through the same probe inputs — are
compared per tap by :func:`compare`:

==========================  ===================================================================
fitted type                 statistics
==========================  ===================================================================
``GaussianFitted``          squared Fréchet distance (headline), KL both ways, mean shift,
                            relative covariance change
``TransitionFitted``        relative change of the layer-to-layer map (headline), KL between
                            the residual Gaussians, explained variance on each side
Frequent Directions         principal-angle distance between the top-k subspaces
quantile sketch             Kolmogorov–Smirnov distance, with its asymptotic p-value
==========================  ===================================================================

Audits run once, off the training path, so every statistic is computed on the host in float64
numpy from the float32 fitted values: the Fréchet trace term is a difference of large, nearly
equal numbers and loses every digit in float32 when the two distributions are close.

Significance. Fitted Gaussians hold no rows, so no resampling test can run on them alone; where
rows are at hand, :func:`permutation_test` gives an exact (finite-sample, distribution-free)
permutation p-value of the Fréchet / KL / mean-shift statistic, cheap for taps up to a few
hundred features and ~10⁴ rows per side (it refits two Gaussians per permutation). The KS
distance between quantile sketches comes with the asymptotic Kolmogorov p-value, which needs
only the row counts the sketches carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxmon._base import ShapeError
from jaxmon.errors import ConfigError
from jaxmon.estimators.frequent_directions import FDFitted
from jaxmon.estimators.gaussian import GaussianFitted
from jaxmon.estimators.quantiles import QuantilesFitted
from jaxmon.estimators.transition import TransitionFitted

__all__ = ["Comparison", "compare", "comparison_table", "permutation_test"]


class Comparison(NamedTuple):
    """The comparison of one tap's two fitted values.

    Attributes:
      kind: what was compared: ``"gaussian"``, ``"gaussian_diagonal"``, ``"transition"``,
        ``"subspace"``, ``"quantiles"``.
      distance: the headline distance of that kind (0 when the two fits are identical):
        squared Fréchet distance, relative map change, principal-angle distance, KS distance.
      stats: every statistic computed, by name (floats), including ``distance``'s.
      p_value: significance of the difference, or NaN where no cheap test applies.
      test: how ``p_value`` was obtained (empty when it is NaN).
    """

    kind: str
    distance: float
    stats: dict[str, float]
    p_value: float = math.nan
    test: str = ""


def _f64(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x), dtype=np.float64)


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(
            f"compare: the two fitted values have different {what} shapes {list(a.shape)} and "
            f"{list(b.shape)}; compare fits of the same tap (same width) from the same estimator"
        )


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    return (v * np.sqrt(np.clip(w, 0, None))[None, :]) @ v.T


def frechet_sq(mu_a, cov_a, mu_b, cov_b) -> float:
    """Squared Fréchet (2-Wasserstein) distance between two Gaussians, float64.

    ``|μa-μb|² + tr Σa + tr Σb - 2 tr (Σa^{1/2} Σb Σa^{1/2})^{1/2}`` (the FID formula; the
    symmetric form avoids the non-symmetric ``sqrtm(Σa Σb)``). Diagonal covariances ``[d]`` use
    the closed form ``Σ (σa - σb)²``.
    """
    mu_a, mu_b, cov_a, cov_b = map(_f64, (mu_a, mu_b, cov_a, cov_b))
    dmu = float(np.sum((mu_a - mu_b) ** 2))
    if cov_a.ndim == 1:
        return dmu + float(
            np.sum((np.sqrt(np.clip(cov_a, 0, None)) - np.sqrt(np.clip(cov_b, 0, None))) ** 2)
        )
    s = _sqrt_psd(cov_a)
    m = s @ cov_b @ s
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0, None)))
    return max(dmu + float(np.trace(cov_a) + np.trace(cov_b) - 2 * cross), 0.0)


def _kl_whitened(la: np.ndarray, wb: np.ndarray, dmu: np.ndarray) -> float:
    """KL(N(μa, La Laᵀ) ‖ N(μb, Σb)) with ``wb`` a whitener of Σb (``wbᵀ wb = Σb⁻¹``)."""
    d = la.shape[0]
    logdet_a = 2 * np.sum(np.log(np.abs(np.diagonal(la))))
    logdet_b = -2 * np.sum(np.log(np.abs(np.diagonal(wb))))
    tr = np.sum((wb @ la) ** 2)
    maha = np.sum((wb @ dmu) ** 2)
    return 0.5 * float(tr + maha - d + logdet_b - logdet_a)


def _compare_gaussians(a: GaussianFitted, b: GaussianFitted) -> Comparison:
    mu_a, mu_b, ca, cb = _f64(a.mean), _f64(b.mean), _f64(a.covariance), _f64(b.covariance)
    _check_same_shape(mu_a, mu_b, "mean")
    _check_same_shape(ca, cb, "covariance (one diagonal and one full?)")
    dmu = mu_b - mu_a
    fre = frechet_sq(mu_a, ca, mu_b, cb)
    # KL uses the covariances the detectors factorised (after shrinkage and the ridge floor),
    # recovered exactly from their whiteners W = L⁻¹: tr(Σb⁻¹Σa) = |Wb La|²_F.
    wa, wb = _f64(a.whitener), _f64(b.whitener)
    if ca.ndim == 1:
        va, vb = 1 / wa**2, 1 / wb**2
        kl_ab = 0.5 * float(np.sum(va / vb + dmu**2 / vb - 1 + np.log(vb) - np.log(va)))
        kl_ba = 0.5 * float(np.sum(vb / va + dmu**2 / va - 1 + np.log(va) - np.log(vb)))
        cov_change = float(np.linalg.norm(cb - ca) / max(np.linalg.norm(ca), 1e-300))
        kind = "gaussian_diagonal"
    else:
        la, lb = np.linalg.inv(wa), np.linalg.inv(wb)
        kl_ab, kl_ba = _kl_whitened(la, wb, dmu), _kl_whitened(lb, wa, -dmu)
        cov_change = float(np.linalg.norm(cb - ca) / max(np.linalg.norm(ca), 1e-300))
        kind = "gaussian"
    stats = {
        "frechet": fre,
        "kl_ab": kl_ab,
        "kl_ba": kl_ba,
        "mean_shift": float(np.linalg.norm(dmu)),
        "cov_change": cov_change,
    }
    return Comparison(kind, fre, stats)


def _compare_transitions(a: TransitionFitted, b: TransitionFitted) -> Comparison:
    ca, cb = _f64(a.coef), _f64(b.coef)
    _check_same_shape(ca, cb, "map")
    change = float(np.linalg.norm(cb - ca) / max(np.linalg.norm(ca), 1e-300))
    wa, wb = _f64(a.whitener), _f64(b.whitener)
    la, lb = np.linalg.inv(wa), np.linalg.inv(wb)
    zero = np.zeros(ca.shape[1])
    stats = {
        "map_change": change,
        "residual_kl_ab": _kl_whitened(la, wb, zero),
        "residual_kl_ba": _kl_whitened(lb, wa, zero),
        "explained_a": float(a.explained_variance),
        "explained_b": float(b.explained_variance),
    }
    return Comparison("transition", change, stats)


def _compare_subspaces(a: FDFitted, b: FDFitted) -> Comparison:
    va, vb = _f64(a.components), _f64(b.components)
    _check_same_shape(va, vb, "sketch")
    ea, eb = _f64(a.eigenvalues), _f64(b.eigenvalues)
    # Frequent Directions guarantees the top directions only (Δ ≤ ‖A − A_k‖²_F / (ℓ − k)): the
    # subspaces compared are the top ℓ/2, fewer if a sketch has fewer non-zero directions.
    k = max(min(va.shape[0] // 2, int(np.sum(ea > 0)), int(np.sum(eb > 0))), 1)
    cos = np.clip(np.linalg.svd(va[:k] @ vb[:k].T, compute_uv=False), 0.0, 1.0)
    theta = np.arccos(cos)
    dist = float(np.sqrt(np.sum(theta**2)))
    ta, tb = float(a.trace), float(b.trace)
    stats = {
        "principal_angle": dist,
        "max_angle_sin": float(np.sqrt(max(1.0 - np.min(cos) ** 2, 0.0))),
        "subspace_rank": float(k),
        "mean_shift": float(np.linalg.norm(_f64(a.mean) - _f64(b.mean))),
        "variance_ratio": tb / ta if ta > 0 else math.nan,
    }
    return Comparison("subspace", dist, stats)


def kolmogorov_sf(lam: float) -> float:
    """Survival function of the Kolmogorov distribution, ``P(K > lam)`` (alternating series)."""
    if lam < 0.2:
        return 1.0
    k = np.arange(1, 101)
    return float(np.clip(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k**2 * lam**2)), 0.0, 1.0))


def _compare_quantiles(a: QuantilesFitted, b: QuantilesFitted) -> Comparison:
    ca, cb = _f64(a.bucket_counts), _f64(b.bucket_counts)
    _check_same_shape(ca, cb, "bucket (different relative_accuracy?)")
    na, nb = float(np.sum(ca)), float(np.sum(cb))
    if na == 0 or nb == 0:
        raise ConfigError("compare: a quantile sketch is empty; nothing to compare")
    # Both sketches share one bucket grid: their CDFs are exact at every bucket edge. The KS
    # distance over edges is the KS statistic of the data rounded to the grid (a lower bound of
    # the exact one); within a bucket either CDF may move by the bucket's mass, which bounds the
    # exact statistic from above.
    fa, fb = np.cumsum(ca) / na, np.cumsum(cb) / nb
    ks = float(np.max(np.abs(fa - fb)))
    fa0, fb0 = fa - ca / na, fb - cb / nb  # CDFs just below each bucket
    upper = float(np.max(np.maximum(np.abs(fa - fb0), np.abs(fb - fa0))))
    # Asymptotic Kolmogorov p-value (Stephens' small-sample correction, as Numerical Recipes'
    # kstwo); on grid-rounded data the KS test is conservative.
    ne = na * nb / (na + nb)
    p = kolmogorov_sf((math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * ks)
    stats = {"ks": ks, "ks_upper_bound": upper, "n_a": na, "n_b": nb}
    return Comparison("quantiles", ks, stats, p, "asymptotic Kolmogorov (values independent)")


_HANDLERS: list[tuple[type, Any]] = [
    (GaussianFitted, _compare_gaussians),
    (TransitionFitted, _compare_transitions),
    (FDFitted, _compare_subspaces),
    (QuantilesFitted, _compare_quantiles),
]


def _handler(a: Any, b: Any):
    for typ, fn in _HANDLERS:
        if isinstance(a, typ) and isinstance(b, typ):
            return fn
    return None


def _is_single(x: Any) -> bool:
    return _handler(x, x) is not None


def compare(
    fitted_a: Any, fitted_b: Any, *, skip_unsupported: bool = False
) -> Comparison | dict[str, Comparison]:
    """Compares two fitted values of the same estimator, per tap.

    Args:
      fitted_a: the reference fit (trusted data, or the model before the edit): a single
        fitted value (``GaussianFitted``, ``TransitionFitted``, ...) or a monitor's fitted dict
        keyed by tap.
      fitted_b: the fit to audit, of the same kind (same keys for dicts).
      skip_unsupported: for dicts, leave out keys whose fitted type has no comparison (a flow,
        a kNN bank) instead of raising.

    Returns:
      A :class:`Comparison` for single fitted values; for dicts, ``{key: Comparison}`` in the
      keys' order. Directional statistics (``kl_ab``) read "a relative to b" as in
      ``KL(a ‖ b)``. Print with :func:`comparison_table`.

    Raises:
      TypeError: the two values are of a kind :func:`compare` cannot compare.
      ValueError: the two dicts have different keys.
      ShapeError: the two fits are of taps of different widths.

    Example:
      >>> res = jaxmon.compare(mon.finalize(trusted_state), mon.finalize(generated_state))
      >>> print(jaxmon.comparison_table(res))
    """
    if isinstance(fitted_a, Mapping) and not _is_single(fitted_a):
        if not isinstance(fitted_b, Mapping):
            raise ConfigError("compare: fitted_a is a dict of taps but fitted_b is not")
        only = sorted(set(fitted_a) ^ set(fitted_b))
        if only:
            raise ConfigError(
                f"compare: the two monitors fit different taps; keys in only one of them: {only}"
            )
        out = {}
        for key in fitted_a:
            fn = _handler(fitted_a[key], fitted_b[key])
            if fn is None:
                if skip_unsupported:
                    continue
                raise ConfigError(
                    f"compare: no comparison for tap {key!r} of fitted type "
                    f"{type(fitted_a[key]).__name__}; pass skip_unsupported=True to leave it out"
                )
            out[key] = fn(fitted_a[key], fitted_b[key])
        return out
    fn = _handler(fitted_a, fitted_b)
    if fn is None:
        raise ConfigError(
            f"compare: cannot compare {type(fitted_a).__name__} with {type(fitted_b).__name__}; "
            f"supported: {[t.__name__ for t, _ in _HANDLERS]} (both of the same type)"
        )
    return fn(fitted_a, fitted_b)


# --------------------------------------------------------------------------- significance


def _batched_stat(statistic: str, mu_a, cov_a, mu_b, cov_b) -> np.ndarray:
    """The statistic for stacks ``mu [p, d]``, ``cov [p, d, d]`` (few large LAPACK calls: many
    small ones thrash BLAS thread pools on shared machines)."""
    dmu = mu_a - mu_b
    if statistic == "mean_shift":
        return np.sum(dmu**2, -1)
    if statistic == "frechet":
        w, v = np.linalg.eigh(cov_a)
        root = (v * np.sqrt(np.clip(w, 0, None))[:, None, :]) @ np.swapaxes(v, 1, 2)
        m = root @ cov_b @ root
        cross = np.sum(
            np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + np.swapaxes(m, 1, 2))), 0, None)), -1
        )
        tr = np.trace(cov_a, axis1=1, axis2=2) + np.trace(cov_b, axis1=1, axis2=2)
        return np.maximum(np.sum(dmu**2, -1) + tr - 2 * cross, 0.0)
    # Symmetric KL: the traces and Mahalanobis terms; log-determinants cancel.
    d = mu_a.shape[1]
    ia, ib = np.linalg.inv(cov_a), np.linalg.inv(cov_b)
    tr = np.einsum("pij,pji->p", ib, cov_a) + np.einsum("pij,pji->p", ia, cov_b)
    maha = np.einsum("pi,pij,pj->p", dmu, ia + ib, dmu)
    return 0.5 * (tr + maha - 2 * d)


def permutation_test(
    rows_a: Any,
    rows_b: Any,
    *,
    statistic: str = "frechet",
    num_permutations: int = 199,
    seed: int = 0,
    ridge: float = 1e-6,
) -> tuple[float, float]:
    """Permutation test of "rows_a and rows_b come from the same distribution".

    The statistic compares the two samples' Gaussian fits (maximum-likelihood mean and
    covariance, float64); the rows are pooled and relabelled ``num_permutations`` times. The
    p-value ``(1 + #{T_perm ≥ T}) / (1 + num_permutations)`` is exact for any distribution
    (rows exchangeable under the null), but costs a refit per permutation (batched: one
    ``[p, d, n] @ [n, d]`` Gram and one stacked eigensolve per chunk of permutations): cheap up
    to a few hundred features and ~10⁴ rows per side; subsample rows beyond that.

    Args:
      rows_a, rows_b: ``[n_a, d]`` and ``[n_b, d]`` rows (e.g. one tap's activations on the
        trusted and on the audited data).
      statistic: ``"frechet"`` (squared Fréchet distance), ``"kl"`` (symmetric KL) or
        ``"mean_shift"`` (squared distance between means).
      num_permutations: number of random relabellings; the smallest attainable p-value is
        ``1 / (1 + num_permutations)``.
      seed: seeds ``np.random.default_rng`` (randomness only through explicit seeds).
      ridge: added to each covariance's diagonal (times its mean variance) so KL stays finite
        when a side has fewer rows than features.

    Returns:
      ``(statistic on the observed split, p-value)``.
    """
    if statistic not in ("frechet", "kl", "mean_shift"):
        raise ConfigError(
            f"permutation_test: statistic must be 'frechet', 'kl' or 'mean_shift', got "
            f"{statistic!r}"
        )
    xa, xb = _f64(rows_a), _f64(rows_b)
    if xa.ndim != 2 or xb.ndim != 2 or xa.shape[1] != xb.shape[1] or min(len(xa), len(xb)) < 2:
        raise ShapeError(
            f"permutation_test: expected rows [n_a, d] and [n_b, d] (at least 2 each), got "
            f"{list(xa.shape)} and {list(xb.shape)}"
        )
    pooled = np.concatenate([xa, xb])
    pooled = pooled - pooled.mean(0)  # centring once keeps the covariances' digits
    n_a, n, d = len(xa), len(pooled), pooled.shape[1]
    rng = np.random.default_rng(seed)
    # Split 0 is the observed one; then the random relabellings.
    splits = [np.arange(n_a)] + [rng.permutation(n)[:n_a] for _ in range(num_permutations)]
    chunk = max(1, int(2**25 // max(n * d, 1)))  # bounds the [p, d, n] stack to ~256 MiB
    with _one_blas_thread():
        stats = _permutation_stats(statistic, splits, chunk, pooled, n_a, ridge)
    t = np.concatenate(stats)
    return float(t[0]), float((1 + np.sum(t[1:] >= t[0])) / (1 + num_permutations))


def _one_blas_thread():
    """Many small LAPACK calls gain nothing from BLAS threads, and on a loaded machine the
    thread pool thrashes (10x slower here): limit it to one thread when threadpoolctl (a
    scikit-learn dependency) is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _permutation_stats(statistic, splits, chunk, pooled, n_a, ridge) -> list[np.ndarray]:
    n, d = pooled.shape
    n_b = n - n_a
    total_gram, total_sum = pooled.T @ pooled, pooled.sum(0)
    eye = np.eye(d)

    def cov(gram, s, m):
        mu = s / m
        c = gram / m - mu[:, :, None] * mu[:, None, :]
        c = 0.5 * (c + np.swapaxes(c, 1, 2))
        scale = np.maximum(np.trace(c, axis1=1, axis2=2) / d, 1e-300)
        return mu, c + ridge * scale[:, None, None] * eye[None]

    stats = []
    for i in range(0, len(splits), chunk):
        g = np.zeros((len(splits[i : i + chunk]), n))
        for j, idx in enumerate(splits[i : i + chunk]):
            g[j, idx] = 1.0
        s_a = g @ pooled
        gram_a = np.swapaxes(g[:, :, None] * pooled[None], 1, 2) @ pooled
        mu_a, c_a = cov(gram_a, s_a, n_a)
        mu_b, c_b = cov(total_gram[None] - gram_a, total_sum[None] - s_a, n_b)
        stats.append(_batched_stat(statistic, mu_a, c_a, mu_b, c_b))
    return stats


# --------------------------------------------------------------------------- printing


def comparison_table(
    results: Comparison | Mapping[str, Comparison],
    *,
    columns: Sequence[str] | None = None,
    digits: int = 4,
) -> str:
    """Formats comparisons as a plain-text table: one row per tap, one column per statistic.

    Args:
      results: what :func:`compare` returned.
      columns: the statistics to show (default: every statistic any row has); the headline
        ``distance``, the kind and the p-value are always shown.
      digits: significant digits.
    """
    if isinstance(results, Comparison):
        results = {"": results}
    cols: list[str] = []
    for r in results.values():
        cols += [k for k in r.stats if k not in cols and (columns is None or k in columns)]
    if columns is not None:
        cols = [c for c in columns if c in cols]
    header = ["tap", "kind", "distance", *cols, "p_value"]
    rows = []
    for key, r in results.items():
        cells = [key, r.kind, f"{r.distance:.{digits}g}"]
        cells += [f"{r.stats[c]:.{digits}g}" if c in r.stats else "" for c in cols]
        cells.append("" if math.isnan(r.p_value) else f"{r.p_value:.{digits}g}")
        rows.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
    lines = [fmt(header), "-+-".join("-" * w for w in widths), *(fmt(r) for r in rows)]
    return "\n".join(lines)
