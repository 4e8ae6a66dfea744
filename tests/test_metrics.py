"""jaxmon.metrics against scikit-learn on random data with ties."""

import functools

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

import jaxmon
from jaxmon import metrics


def _data(seed, n=400, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[:2] = [True, False]
    s = rng.standard_normal(n) + 1.2 * y
    if ties:
        s = np.round(s * 2) / 2  # heavy ties, within and across classes
    return s, y


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [True, False])
def test_against_scikit_learn(seed, ties):
    s, y = _data(seed, ties=ties)
    assert metrics.auroc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(s, y) == pytest.approx(
        skm.average_precision_score(y, s), abs=1e-12
    )
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    ours = metrics.roc_curve(s, y)
    for a, b in zip(ours, (fpr, tpr, thr), strict=True):
        np.testing.assert_allclose(a, b)
    for t in (0.5, 0.8, 0.95, 1.0):
        assert metrics.fpr_at_tpr(s, y, tpr=t) == pytest.approx(np.min(fpr[tpr >= t]))
    for f in (0.0, 0.01, 0.1, 0.5):
        assert metrics.recall_at_fpr(s, y, fpr=f) == pytest.approx(np.max(tpr[fpr <= f]))
    # 0/1 integer labels and bool labels agree; module reachable as jaxmon.metrics.
    assert jaxmon.metrics.auroc(s, y.astype(int)) == metrics.auroc(s, y)


def test_bootstrap_interval_covers_the_population_auroc():
    # Normal scores: AUROC = Phi(delta / sqrt(2)) exactly.
    delta, n, trials, level = 1.0, 80, 60, 0.9
    truth = norm.cdf(delta / np.sqrt(2))
    rng = np.random.default_rng(7)
    covered = 0
    for t in range(trials):
        s = np.r_[rng.standard_normal(n) + delta, rng.standard_normal(n)]
        y = np.r_[np.ones(n, bool), np.zeros(n, bool)]
        ci = metrics.bootstrap_ci(metrics.auroc, s, y, n_boot=150, seed=t, level=level)
        assert ci.low <= ci.estimate <= ci.high
        covered += ci.low <= truth <= ci.high
    # Binomial(60, 0.9): 5th-95th percentile is 50-57; percentile bootstraps under-cover a bit.
    assert 45 <= covered <= 60


def test_bootstrap_is_reproducible_and_takes_partials():
    s, y = _data(3)
    m = functools.partial(metrics.recall_at_fpr, fpr=0.1)
    a = metrics.bootstrap_ci(m, s, y, n_boot=50, seed=1)
    b = metrics.bootstrap_ci(m, s, y, n_boot=50, seed=1)
    assert a == b and a.estimate == m(s, y)
    wide = metrics.bootstrap_ci(metrics.auroc, s[:60], y[:60], n_boot=200, seed=0)
    narrow = metrics.bootstrap_ci(metrics.auroc, s, y, n_boot=200, seed=0)
    assert wide.high - wide.low > narrow.high - narrow.low


def test_input_errors():
    with pytest.raises(ValueError, match="both classes"):
        metrics.auroc([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([np.nan, 2.0], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        metrics.auroc([1.0, 2.0], [2, 0])
    with pytest.raises(ValueError, match="labels"):
        metrics.auroc([1.0, 2.0, 3.0], [1, 0])


def test_inf_scores_rank_highest_and_nan_is_refused():
    # Rows holding NaN/inf score +inf in jaxmon: the metrics treat +inf as the largest score.
    rng = np.random.default_rng(5)
    s = rng.normal(size=200)
    y = rng.random(200) < 0.3
    s[:10] = np.inf
    finite = np.where(np.isinf(s), 1e300, s)  # same order, for scikit-learn
    assert metrics.auroc(s, y) == pytest.approx(skm.roc_auc_score(y, finite), abs=1e-12)
    assert metrics.average_precision(s, y) == pytest.approx(
        skm.average_precision_score(y, finite), abs=1e-12
    )
    s[11] = np.nan
    with pytest.raises(jaxmon.ConfigError, match="NaN"):
        metrics.auroc(s, y)


def test_bootstrap_auroc_equals_auroc_of_each_resample():
    from jaxmon.metrics import _weighted_auroc

    rng = np.random.default_rng(9)
    s = np.round(rng.normal(size=300) * 3) / 3  # ties
    y = rng.random(300) < 0.3
    s[y] += 0.7
    order = np.argsort(s, kind="stable")
    ss, ys = s[order], y[order]
    group = np.r_[0, np.cumsum(ss[1:] != ss[:-1])]
    gp, gn = group[ys], group[~ys]
    pos, neg = np.nonzero(ys)[0], np.nonzero(~ys)[0]
    for _ in range(5):
        ip, ineg = rng.integers(0, pos.size, pos.size), rng.integers(0, neg.size, neg.size)
        wp = np.bincount(ip, minlength=pos.size).astype(float)
        wn = np.bincount(ineg, minlength=neg.size).astype(float)
        idx = np.r_[pos[ip], neg[ineg]]
        want = skm.roc_auc_score(ys[idx], ss[idx])
        assert _weighted_auroc(gp, wp, gn, wn, int(group[-1]) + 1) == pytest.approx(want, abs=1e-12)
    ci = metrics.bootstrap_auroc(s, y, n_boot=300, seed=1)
    slow = metrics.bootstrap_ci(metrics.auroc, s, y, n_boot=300, seed=1)
    assert ci.estimate == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    # Same bootstrap distribution (different draws): the intervals agree closely.
    assert ci.low == pytest.approx(slow.low, abs=0.02) and ci.high == pytest.approx(
        slow.high, abs=0.02
    )
