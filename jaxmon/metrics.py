"""Detection metrics for host-side evaluation (numpy): AUROC, AP, FPR@TPR, recall@FPR, CIs.

Conventions: ``scores`` higher = more anomalous; ``labels`` 1 (or True) for anomalies, the
positive class. Ties are handled as scikit-learn does: tied scores form one threshold (one
point of the ROC / precision-recall curve), and AUROC counts a tied pair as one half.
Numbers agree with ``sklearn.metrics`` (``roc_auc_score``, ``average_precision_score``,
``roc_curve``) to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxmon.errors import ConfigError

__all__ = [
    "auroc",
    "average_precision",
    "fpr_at_tpr",
    "recall_at_fpr",
    "roc_curve",
    "bootstrap_ci",
    "bootstrap_auroc",
    "ConfidenceInterval",
]


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ConfigError(f"metrics: {s.size} scores but {y.size} labels")
    if np.any(np.isnan(s)):
        # +inf is an ordinary (the largest) score: jaxmon gives it to rows holding NaN/inf.
        raise ConfigError("metrics: scores hold NaN; drop or mask those rows first")
    if y.dtype != bool:
        if not np.all((y == 0) | (y == 1)):
            raise ConfigError("metrics: labels must be 0/1 or bool (1 = anomaly)")
        y = y == 1
    if y.all() or not y.any():
        raise ConfigError("metrics: labels need both classes (anomalies and normals)")
    return s, y


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct score, decreasing thresholds, from (0, 0).

    As ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``: point ``i`` flags the rows
    with ``score >= thresholds[i]``; the first threshold is ``inf`` (nothing flagged).
    """
    s, y = _check(scores, labels)
    tps, fps, thr = _counts(s, y)
    return fps / fps[-1], tps / tps[-1], thr


def _counts(s: np.ndarray, y: np.ndarray):
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # Last index of each run of tied scores: one curve point per distinct threshold.
    # (s[1:] != s[:-1], not np.diff: inf - inf is NaN, which would split a run of +inf.)
    last = np.r_[np.nonzero(s[1:] != s[:-1])[0], s.size - 1]
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    return np.r_[0.0, tps], np.r_[0.0, fps], np.r_[np.inf, s[last]]


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(anomaly scores above normal), ties counted 1/2."""
    s, y = _check(scores, labels)
    # Mann-Whitney U with average ranks over ties.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = avg_rank[inverse]
    p, n = y.sum(), (~y).sum()
    return float((ranks[y].sum() - p * (p + 1) / 2.0) / (p * n))


def average_precision(scores, labels) -> float:
    """Average precision, ``Σ (R_i - R_{i-1}) P_i`` over distinct thresholds (scikit-learn's)."""
    s, y = _check(scores, labels)
    tps, fps, _ = _counts(s, y)
    tps, fps = tps[1:], fps[1:]
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(scores, labels, *, tpr: float = 0.95) -> float:
    """Smallest false-positive rate of a threshold that detects at least ``tpr`` of anomalies."""
    if not 0.0 <= tpr <= 1.0:
        raise ConfigError(f"fpr_at_tpr: tpr must lie in [0, 1], got {tpr}")
    fpr, tp_rate, _ = roc_curve(scores, labels)
    return float(fpr[np.searchsorted(tp_rate, tpr, side="left")])


def recall_at_fpr(scores, labels, *, fpr: float = 0.01) -> float:
    """Largest true-positive rate (recall) of a threshold with false-positive rate <= ``fpr``."""
    if not 0.0 <= fpr <= 1.0:
        raise ConfigError(f"recall_at_fpr: fpr must lie in [0, 1], got {fpr}")
    fp_rate, tp_rate, _ = roc_curve(scores, labels)
    return float(tp_rate[np.searchsorted(fp_rate, fpr, side="right") - 1])


class ConfidenceInterval(NamedTuple):
    """A metric on the full data and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    scores,
    labels,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ConfidenceInterval:
    """Percentile bootstrap interval of ``metric(scores, labels)``.

    Resampling is stratified (anomalies and normals are resampled separately, keeping their
    counts), so every resample has both classes and the class balance of the data.

    Args:
      metric: e.g. :func:`auroc`, or ``functools.partial(recall_at_fpr, fpr=0.01)``.
      scores, labels: as for the metrics.
      n_boot: number of resamples.
      seed: of ``np.random.default_rng``.
      level: coverage of the interval, in (0, 1).

    Returns:
      A :class:`ConfidenceInterval` ``(estimate, low, high)``.
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"bootstrap_ci: level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ConfigError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    s, y = _check(scores, labels)
    pos, neg = np.nonzero(y)[0], np.nonzero(~y)[0]
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        stats[b] = metric(s[idx], y[idx])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return ConfidenceInterval(float(metric(s, y)), float(low), float(high))


def bootstrap_auroc(
    scores, labels, *, n_boot: int = 200, seed: int = 0, level: float = 0.95
) -> ConfidenceInterval:
    """:func:`bootstrap_ci` of :func:`auroc`, in O(n) per resample (for millions of rows).

    The same stratified percentile bootstrap, computed without re-sorting: the rows are sorted
    once into groups of tied scores; a resample only changes how many copies of each row it
    holds, and the Mann–Whitney statistic of weighted rows is
    ``Σ_g P_g (N_{<g} + N_g / 2) / (P N)`` over the groups ``g`` (``P_g``, ``N_g``: resampled
    anomalies and normals in the group). Equal to :func:`auroc` of the resampled rows.

    Returns:
      A :class:`ConfidenceInterval` ``(auroc, low, high)``.
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"bootstrap_auroc: level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ConfigError(f"bootstrap_auroc: n_boot must be >= 1, got {n_boot}")
    s, y = _check(scores, labels)
    order = np.argsort(s, kind="stable")
    ss, ys = s[order], y[order]
    group = np.r_[0, np.cumsum(ss[1:] != ss[:-1])]
    n_groups = int(group[-1]) + 1
    gp, gn = group[ys], group[~ys]
    p, n = gp.size, gn.size
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        wp = np.bincount(rng.integers(0, p, p), minlength=p).astype(np.float64)
        wn = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        stats[b] = _weighted_auroc(gp, wp, gn, wn, n_groups)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    full = _weighted_auroc(gp, np.ones(p), gn, np.ones(n), n_groups)
    return ConfidenceInterval(float(full), float(low), float(high))


def _weighted_auroc(gp, wp, gn, wn, n_groups: int) -> float:
    pg = np.bincount(gp, wp, n_groups)
    ng = np.bincount(gn, wn, n_groups)
    below = np.cumsum(ng) - ng
    return float(np.sum(pg * (below + 0.5 * ng)) / (wp.sum() * wn.sum()))
