"""rank_detectors: keys ranked by AUROC with bootstrap intervals, tokens and sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

import jaxmon

D = 8


def _taps(rng, n, *, shift=0.0):
    """Tap "a" moves with ``shift``, tap "b" never does."""
    a = rng.normal(size=(n, D)).astype(np.float32)
    a[:, 0] += shift
    return {"a": a, "b": rng.normal(size=(n, D)).astype(np.float32)}


def _fitted(cal: bool):
    rng = np.random.default_rng(0)
    mon = jaxmon.monitor({"*": {"g": jaxmon.gaussian(), "knn": jaxmon.knn(k=3, bank_size=256)}})
    est = jaxmon.calibrated(mon) if cal else mon
    ex = {t: jax.ShapeDtypeStruct((D,), jnp.float32) for t in ("a", "b")}
    s = est.update(est.init(ex), jax.tree.map(jnp.asarray, _taps(rng, 2000)))
    if cal:
        s = jaxmon.begin_calibration(est, s)
        s = est.update(s, jax.tree.map(jnp.asarray, _taps(rng, 2000)))
    return est, est.finalize(s)


def test_keys_are_ranked_by_auroc_with_intervals():
    est, f = _fitted(cal=False)
    rng = np.random.default_rng(1)
    clean, flagged = _taps(rng, 600), _taps(rng, 60, shift=4.0)
    ranked = jaxmon.rank_detectors(est, f, clean, flagged, n_boot=100)
    assert [e["auroc"] for e in ranked] == sorted((e["auroc"] for e in ranked), reverse=True)
    assert {e["key"] for e in ranked} == {"a:g", "a:knn", "b:g", "b:knn"}
    assert ranked[0]["key"].startswith("a:") and ranked[-1]["key"].startswith("b:")
    # Each AUROC is the AUROC of that key's scores (scikit-learn), inside its interval.
    sc = est.score(f, jax.tree.map(jnp.asarray, clean))
    sf = est.score(f, jax.tree.map(jnp.asarray, flagged))
    y = np.r_[np.zeros(600), np.ones(60)]
    for e in ranked:
        want = roc_auc_score(y, np.r_[np.asarray(sc[e["key"]]), np.asarray(sf[e["key"]])])
        assert e["auroc"] == pytest.approx(want, abs=1e-9)
        assert e["ci_low"] <= e["auroc"] <= e["ci_high"]
        assert e["n_clean"] == 600 and e["n_flagged"] == 60 and e["level"] == "token"
        # Recall at 1% FPR: the best true-positive rate of scikit-learn's ROC curve among
        # thresholds whose false-positive rate is at most 0.01.
        fpr, tpr, _ = roc_curve(y, np.r_[np.asarray(sc[e["key"]]), np.asarray(sf[e["key"]])])
        assert e["recall_at_0.01_fpr"] == pytest.approx(np.max(tpr[fpr <= 0.01]), abs=1e-12)


def test_sequence_aggregations_and_calibrated_combinations_are_ranked():
    est, f = _fitted(cal=True)
    rng = np.random.default_rng(2)
    # 30 clean sequences of 16 tokens; 10 flagged sequences where 3 tokens of each moved.
    clean = jax.tree.map(lambda v: v.reshape(30, 16, D), _taps(rng, 480))
    flagged = jax.tree.map(lambda v: v.reshape(10, 16, D), _taps(rng, 160))
    flagged["a"][:, 5:8, 0] += 6.0
    ids = (np.repeat(np.arange(30), 16).reshape(30, 16), np.repeat(np.arange(10), 16))
    ids = (ids[0], ids[1].reshape(10, 16))
    ranked = jaxmon.rank_detectors(est, f, clean, flagged, sequence_id=ids, n_boot=50)
    keys = {(e["key"], e["level"], e["reduce"]) for e in ranked}
    for k in ("a:g", "combined(fisher)", "combined(bonferroni)", "combined(cauchy)"):
        assert (k, "token", None) in keys
        for r in ("max", "mean", "max_rolling_mean"):
            assert (k, "sequence", r) in keys
    best = ranked[0]
    assert best["auroc"] == 1.0 and best["level"] == "sequence" and best["n_flagged"] == 10
    # Sequence max of a:g equals the max of its token scores per sequence.
    seq_max = next(e for e in ranked if (e["key"], e["reduce"]) == ("a:g", "max"))
    sc = np.asarray(est.score(f, jax.tree.map(jnp.asarray, clean))["a:g"]).max(1)
    sf = np.asarray(est.score(f, jax.tree.map(jnp.asarray, flagged))["a:g"]).max(1)
    want = roc_auc_score(np.r_[np.zeros(30), np.ones(10)], np.r_[sc, sf])
    assert seq_max["auroc"] == pytest.approx(want, abs=1e-9)


def test_bad_arguments_are_typed_errors():
    est, f = _fitted(cal=False)
    rng = np.random.default_rng(3)
    clean, flagged = _taps(rng, 20), _taps(rng, 5, shift=3.0)
    with pytest.raises(jaxmon.ConfigError, match="reductions"):
        jaxmon.rank_detectors(est, f, clean, flagged, reductions=("median",))
    with pytest.raises(jaxmon.ShapeError, match="sequence ids"):
        jaxmon.rank_detectors(est, f, clean, flagged, sequence_id=(np.zeros(19), np.zeros(5)))
