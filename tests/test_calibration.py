"""Calibration: FPR at the threshold, uniform p-values, combination against scipy, laws."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

import jaxmon
from jaxmon.estimators.quantiles import QuantilesState, quantile

from laws import LawCase, LawSuite, leaves_close, normal_rows

D = 6


def _calibrating(make_inner, *, fit_rows: int = 400):
    """The calibrated estimator with ``init`` replaced by "fit the inner, begin calibration".

    The law suite knows one pass; the calibrated estimator's own state, update and merge are
    those of the calibration pass (phase 1), so the laws run there: ``init`` returns a phase-1
    state whose inner Gaussian was fitted on fixed trusted rows of the same law.
    """
    cal = jaxmon.calibrated(make_inner())
    trusted = jnp.asarray(normal_rows(np.random.default_rng(100), fit_rows, D))
    cache = {}

    def init(example):
        key = (tuple(example.shape), str(example.dtype))
        if key not in cache:
            s = cal.init(example)
            cache[key] = jaxmon.begin_calibration(cal, cal.update(s, trusted))
        return cache[key]

    return cal._replace(init=init)


# One estimator for every law (jitted functions compile once); init is cached per example.
_CALIBRATING = functools.cache(lambda: _calibrating(jaxmon.gaussian))


def _sketches(state):
    return jax.tree.leaves(state.scores, is_leaf=lambda x: isinstance(x, QuantilesState))


def _compare(est, a, b) -> None:
    """Same inner fit exactly, same row counts exactly, and score sketches whose quantiles agree.

    Scores of the same rows computed in different batch shapes (or from bf16 input) differ by
    float rounding, which can move a score across a bucket edge: the sketches then differ by
    one bucket, so quantiles are compared within twice the sketch's relative accuracy (plus
    bf16's rounding of the rows themselves).
    """
    leaves_close(a.inner, b.inner, rtol=1e-6, atol=1e-6)
    leaves_close(a.fitted, b.fitted, rtol=1e-6, atol=1e-6)
    assert int(a.phase) == int(b.phase)
    grid = jnp.linspace(0.0, 1.0, 41)
    for sa, sb in zip(_sketches(a), _sketches(b), strict=True):
        np.testing.assert_array_equal(np.asarray(sa.counts.rows), np.asarray(sb.counts.rows))
        np.testing.assert_array_equal(
            np.asarray(sa.counts.nonfinite), np.asarray(sb.counts.nonfinite)
        )
        qa, qb = np.asarray(quantile(sa, grid)), np.asarray(quantile(sb, grid))
        np.testing.assert_allclose(qa, qb, rtol=0.05, atol=1e-3, equal_nan=True)


class TestCalibratedLaws(LawSuite):
    """The laws on the calibration pass. The state holds two row counters (the inner fit's and
    the calibration sketch's), so ``num_rows`` returns a dict; the two laws that compare it with
    an int are restated below on the calibration counter, with the same checks."""

    case = LawCase(make=lambda: _CALIBRATING(), compare=_compare)

    def test_masked_rows_equal_dropped_rows(self):
        est = self.est
        x = self.data(5)
        keep = np.random.default_rng(6).random(len(x)) < 0.6
        garbage = x.copy()
        garbage[~keep] = 1e4
        masked = est.update(self.empty(est), jnp.asarray(garbage), mask=jnp.asarray(keep))
        dropped = est.update(self.empty(est), jnp.asarray(x[keep]))
        self.same(est, masked, dropped)
        assert jaxmon.num_rows(masked.scores) == int(keep.sum())

    def test_nonfinite_rows_are_excluded_and_counted(self):
        est = self.est
        x = self.data(7)
        bad = np.zeros(len(x), bool)
        bad[[1, 5, 17]] = True
        poisoned = x.copy()
        poisoned[1, 0], poisoned[5, -1], poisoned[17, :] = np.nan, np.inf, -np.inf
        s = est.update(self.empty(est), jnp.asarray(poisoned))
        clean = est.update(self.empty(est), jnp.asarray(x[~bad]))
        self.same(est, s._replace(scores=_zero_nonfinite(s.scores)), clean)
        assert jaxmon.num_nonfinite(s.scores) == 3
        assert jaxmon.num_rows(s.scores) == len(x) - 3
        for leaf in jax.tree.leaves(s):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert bool(jnp.all(jnp.isfinite(leaf)))


def _zero_nonfinite(sk):
    return sk._replace(counts=sk.counts._replace(nonfinite=jnp.zeros_like(sk.counts.nonfinite)))


def _split(x, *sizes):
    """Consecutive pieces of one sample (``normal_rows`` draws a new law on every call)."""
    out, start = [], 0
    for n in sizes:
        out.append(x[start : start + n])
        start += n
    return out


def _fit_and_calibrate(cal, fit, heldout, *, batch=5000):
    s = cal.init(jax.ShapeDtypeStruct((fit.shape[1],), jnp.float32))
    s = cal.update(s, jnp.asarray(fit))
    s = jaxmon.begin_calibration(cal, s)
    # Held-out rows streamed in batches on two "replicas", merged at the end.
    halves = [s, s]
    for i, start in enumerate(range(0, len(heldout), batch)):
        halves[i % 2] = cal.update(halves[i % 2], jnp.asarray(heldout[start : start + batch]))
    return cal.finalize(cal.merge(*halves))


N_CAL, N_NEW = 20000, 20000


@pytest.fixture(scope="module")
def gaussian_calibration():
    """One Gaussian (d = 8) fitted on 5000 rows, calibrated on 20000 held-out rows of the same
    law, and 20000 fresh rows of that law."""
    rng = np.random.default_rng(20)
    inner = jaxmon.gaussian(shrinkage="ledoit_wolf")
    cal = jaxmon.calibrated(inner)
    fit, held, fresh = _split(normal_rows(rng, 5000 + N_CAL + N_NEW, 8), 5000, N_CAL, N_NEW)
    return cal, inner, _fit_and_calibrate(cal, fit, held), jnp.asarray(fresh)


@pytest.mark.parametrize("fpr", [0.01, 0.05])
def test_empirical_fpr_at_threshold_matches_target(gaussian_calibration, fpr):
    cal, inner, f, fresh = gaussian_calibration
    t = float(jaxmon.threshold(f, fpr=fpr))
    raw = np.asarray(inner.score(f.inner, fresh))
    # Binomial noise of the calibration and of the fresh sample, plus the sketch's relative
    # error on the threshold (1% of a chi-square score moves the rate by well under 0.1 fpr).
    sd = np.sqrt(fpr * (1 - fpr) * (1 / N_CAL + 1 / N_NEW))
    tol = 4 * sd + 0.1 * fpr
    assert abs(np.mean(raw >= t) - fpr) < tol
    # On the calibrated scale the same rule is score >= -log10(fpr).
    sc = np.asarray(cal.score(f, fresh))
    assert abs(np.mean(sc >= -np.log10(fpr)) - fpr) < tol


def test_p_values_are_uniform_on_trusted_data(gaussian_calibration):
    cal, _, f, fresh = gaussian_calibration
    p = np.asarray(jaxmon.p_values(f, fresh))
    # p is exp(log p) in float32: near p = 1 the two differ by float32 rounding (~1e-8).
    np.testing.assert_allclose(-np.log10(p), np.asarray(cal.score(f, fresh)), rtol=1e-5, atol=1e-6)
    # Conditionally on the calibration sample the p-values are uniform only up to its own
    # empirical-CDF noise (KS ~ 1/sqrt(n_cal)), hence the loose threshold.
    assert scipy.stats.kstest(p[:5000], "uniform").pvalue > 1e-3
    # And far from uniform on anomalies: most p-values are tiny.
    q = np.asarray(jaxmon.p_values(f, (fresh - 3.0) * 3.0 + 3.0))
    assert np.median(q) < 0.01


def test_monitor_inner_gives_per_tap_p_values_and_combines():
    rng = np.random.default_rng(22)
    mon = jaxmon.monitor({"a": jaxmon.gaussian(), "b": jaxmon.gaussian(diagonal=True)})
    cal = jaxmon.calibrated(mon)
    n = 1000  # one batch shape throughout: one compile per function
    ex = {
        "a": jax.ShapeDtypeStruct((n, 6), jnp.float32),
        "b": jax.ShapeDtypeStruct((n, 3), jnp.float32),
    }

    def taps(scale=1.0):
        return {
            "a": jnp.asarray((rng.standard_normal((n, 6)) * scale).astype(np.float32)),
            "b": jnp.asarray(rng.standard_normal((n, 3)).astype(np.float32)),
        }

    # The same mask everywhere, so that each function compiles once.
    mask = jnp.asarray(np.arange(n) % 10 != 0)
    s = cal.update(cal.init(ex), taps(), mask=mask)
    assert jaxmon.num_rows(s)[".inner['a'].counts"] == int(mask.sum())
    s = jaxmon.begin_calibration(cal, s)
    for _ in range(3):
        s = cal.update(s, taps(), mask=mask)
    assert jaxmon.num_rows(s)[".scores['a'].counts"] == 3 * int(mask.sum())
    f = cal.finalize(s)
    t = jaxmon.threshold(f, fpr=0.05)
    assert set(t) == {"a", "b"}
    p = jaxmon.p_values(f, taps(), mask=mask)
    assert set(p) == {"a", "b"} and p["a"].shape == (n,)
    assert float(p["a"][0]) == 1.0  # masked
    combined = np.asarray(jaxmon.combine(p))
    assert combined.shape == (n,)
    # Anomalies on tap "a" only still show up in the combined score.
    pa = jaxmon.p_values(f, taps(scale=4.0), mask=mask)
    assert np.median(np.asarray(jaxmon.combine(pa, method="bonferroni"))) < 0.05
    sc = cal.score(f, taps(), mask=mask)
    assert float(sc["a"][0]) == 0.0 and float(sc["b"][0]) == 0.0
    assert float(jnp.min(sc["a"][1:10])) >= 0.0


@pytest.mark.parametrize("k", [1, 3, 12])
def test_combine_matches_scipy(k):
    rng = np.random.default_rng(23)
    p = rng.uniform(size=(k, 50)) ** rng.uniform(0.5, 4, (k, 1))
    p[:, 0] = 1e-8  # strong evidence everywhere
    ours_f = np.asarray(jaxmon.combine(jnp.asarray(p, jnp.float32), method="fisher", axis=0))
    ours_t = np.asarray(jaxmon.combine(jnp.asarray(p, jnp.float32), method="tippett", axis=0))
    ours_b = np.asarray(
        jaxmon.combine(
            {str(i): jnp.asarray(p[i], jnp.float32) for i in range(k)}, method="bonferroni"
        )
    )
    ref_f = np.array(
        [scipy.stats.combine_pvalues(p[:, j], method="fisher").pvalue for j in range(50)]
    )
    ref_t = np.array(
        [scipy.stats.combine_pvalues(p[:, j], method="tippett").pvalue for j in range(50)]
    )
    np.testing.assert_allclose(ours_f, ref_f, rtol=2e-3, atol=1e-7)
    np.testing.assert_allclose(ours_t, ref_t, rtol=2e-3, atol=1e-7)
    np.testing.assert_allclose(ours_b, np.minimum(1, k * p.min(0)), rtol=1e-5)
    assert np.all(ours_b >= ours_t * (1 - 1e-5))  # Bonferroni is the conservative bound
    # scipy's call form: one 1-D array of k p-values -> one p-value; a list of taps too.
    one = float(jaxmon.combine(jnp.asarray(p[:, 1], jnp.float32), method="fisher"))
    assert one == pytest.approx(ref_f[1], rel=2e-3)
    # The default is Bonferroni (measured on the demo: see combine's docstring).
    default = np.asarray(jaxmon.combine(jnp.asarray(p, jnp.float32), axis=0))
    np.testing.assert_allclose(default, np.minimum(1, k * p.min(0)), rtol=1e-5)
    listed = np.asarray(jaxmon.combine([jnp.asarray(r, jnp.float32) for r in p], method="min_p"))
    np.testing.assert_allclose(listed, ours_b, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 12])
def test_combine_log_matches_scipy_where_p_underflows(k):
    """log=True equals scipy's float64 log tail, including p-values below float32's range."""
    rng = np.random.default_rng(29)
    p = rng.uniform(size=(k, 40)) ** rng.uniform(0.5, 4, (k, 1))
    p[:, 0] = 1e-20  # Fisher over 12 taps: p ~ 1e-218, far below float32's range (1e-38)
    p[:, 1] = 1.0
    pj = jnp.asarray(p, jnp.float32)
    p32 = np.asarray(pj, np.float64)  # the float32-rounded inputs both sides see
    log_f = np.asarray(jaxmon.combine(pj, axis=0, method="fisher", log=True), np.float64)
    ref_f = scipy.stats.chi2.logsf(-2 * np.log(p32).sum(0), 2 * k)
    np.testing.assert_allclose(log_f, ref_f, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(log_f))
    if k > 1:  # the plain float32 p-value is 0 there: log space is what keeps the evidence
        assert (
            float(jaxmon.combine(pj[:, :1], axis=0, method="fisher")[0]) == 0.0 and log_f[0] < -88
        )
    log_t = np.asarray(jaxmon.combine(pj, axis=0, method="tippett", log=True), np.float64)
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf for the all-ones column: exact
        ref_t = np.log(-np.expm1(k * np.log1p(-p32.min(0))))
    np.testing.assert_allclose(log_t, ref_t, rtol=1e-4, atol=1e-6)
    log_b = np.asarray(jaxmon.combine(pj, axis=0, method="bonferroni", log=True), np.float64)
    np.testing.assert_allclose(log_b, np.minimum(0, np.log(k * p32.min(0))), rtol=1e-5, atol=1e-6)
    # Where the plain p-value is representable, log=True is its log.
    plain = np.asarray(jaxmon.combine(pj[:, 2:], axis=0, method="fisher"), np.float64)
    np.testing.assert_allclose(np.exp(log_f[2:]), plain, rtol=2e-3, atol=1e-7)


def test_protocol_errors():
    cal = jaxmon.calibrated(jaxmon.gaussian())
    s = cal.init(jax.ShapeDtypeStruct((3,), jnp.float32))
    with pytest.raises(ValueError, match="begin_calibration"):
        cal.finalize(s)
    with pytest.raises(TypeError, match="calibrated"):
        jaxmon.begin_calibration(jaxmon.gaussian(), s)
    with pytest.raises(ValueError, match="fpr"):
        jaxmon.threshold(None, fpr=0.0)
    with pytest.raises(ValueError, match="method"):
        jaxmon.combine(jnp.ones((2, 3)), method="stouffer", axis=0)
    with pytest.raises(jaxmon.ShapeError, match="shape"):
        jaxmon.combine({"a": jnp.ones(3), "b": jnp.ones(4)})
    rebuilt = jaxmon.from_spec(cal.spec.to_json())
    assert rebuilt.spec == cal.spec


@pytest.mark.slow
def test_calibrated_detectors_example_prints_real_numbers(capsys):
    import importlib.util
    import pathlib
    import re

    path = pathlib.Path(__file__).parents[1] / "examples" / "calibrated_detectors.py"
    spec = importlib.util.spec_from_file_location("calibrated_detectors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main(["--seed", "1"])
    out = capsys.readouterr().out
    rows = re.findall(
        r"detector=(\S+) auroc=([\d.]+) recall@1%fpr=([\d.]+) threshold@1%fpr=(\S+) "
        r"fpr_at_threshold=([\d.]+)",
        out,
    )
    assert len(rows) == 4, out  # three detectors and the combined score
    for name, auc, recall, thr, fpr in rows:
        auc, recall, thr, fpr = float(auc), float(recall), float(thr), float(fpr)
        assert auc == pytest.approx(results[name]["auroc"], abs=1e-4)
        assert 0.75 < auc <= 1.0, (name, auc)  # planted anomalies are found
        # Against scikit-learn on the example's own scores and labels: AUROC, and recall at
        # 1% FPR as the best true-positive rate on the ROC curve at or below that FPR.
        s, y = results["test_scores"][name], results["test_labels"]
        assert auc == pytest.approx(sklearn.metrics.roc_auc_score(y, s), abs=1e-4)
        fpr_curve, tpr_curve, _ = sklearn.metrics.roc_curve(y, s)
        assert recall == pytest.approx(tpr_curve[fpr_curve <= 0.01].max(), abs=1e-4), name
        assert np.isfinite(thr)
        assert fpr == pytest.approx(float(np.mean(s[~y] >= thr)), abs=1e-4)
        # The 1% threshold from held-out trusted rows gives ~1% FPR on fresh trusted rows
        # (3000 rows: binomial sd 0.0018).
        assert fpr < 0.02, (name, fpr)
    seq = re.findall(r"sequences=(\S+) ((?:auroc\[\S+\]=[\d.]+ ?)+)", out)
    assert {s for s, _ in seq} == {"max", "mean", "max_rolling_mean"}
    for reduce, aucs in seq:
        for k, v in re.findall(r"auroc\[(\S+)\]=([\d.]+)", aucs):
            assert float(v) == pytest.approx(results[f"sequence_{reduce}"][k], abs=1e-4)


@pytest.mark.parametrize("k", [2, 7])
def test_cauchy_combination_matches_float64_and_log_inputs_keep_the_evidence(k):
    rng = np.random.default_rng(k)
    # From very small to near 1, including p-values whose tan((1/2 - p) π) is huge.
    p = 10.0 ** rng.uniform(-12, 0, size=(k, 200))
    t = np.mean(np.tan((0.5 - p) * np.pi), axis=0)
    want = 0.5 - np.arctan(t) / np.pi
    want = np.where(t > 1, np.arctan(1 / t) / np.pi, want)
    got = np.asarray(jaxmon.combine(jnp.asarray(p, jnp.float32), method="cauchy", axis=0))
    np.testing.assert_allclose(got, want, rtol=2e-4)
    # Log inputs: the same numbers, and evidence beyond float32's range is not clamped.
    for method in ("fisher", "bonferroni", "tippett", "cauchy"):
        lp = jnp.asarray(np.log(p), jnp.float32)
        a = np.asarray(jaxmon.combine(lp, method=method, axis=0, log=True, log_inputs=True))
        b = np.asarray(jaxmon.combine(jnp.asarray(p, jnp.float32), method=method, axis=0, log=True))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        far = jnp.asarray(np.full((k, 3), -1.0) * np.array([200.0, 400.0, 800.0]), jnp.float32)
        lf = np.asarray(jaxmon.combine(far, method=method, axis=0, log=True, log_inputs=True))
        assert np.all(np.isfinite(lf)) and np.all(np.diff(lf) < 0), (method, lf)
    # A p-value of 0 (a row holding NaN/inf) combines to 0 by every rule.
    zero = jnp.asarray(np.r_[0.0, np.full(k - 1, 0.5)], jnp.float32)
    for method in ("fisher", "bonferroni", "tippett", "cauchy"):
        assert float(jaxmon.combine(zero, method=method)) == 0.0, method


def test_p_values_of_stored_raw_scores_equal_p_values_of_the_rows(gaussian_calibration):
    _, inner, f, fresh = gaussian_calibration
    raw = inner.score(f.inner, fresh)
    np.testing.assert_array_equal(
        np.asarray(jaxmon.p_values_of_scores(f, raw, log=True)),
        np.asarray(jaxmon.p_values(f, fresh, log=True)),
    )


_FRESH_PROCESS = """
import sys
import jax.numpy as jnp
import numpy as np
import jaxmon

ck = jaxmon.load(sys.argv[1])
rows = jnp.asarray(np.load(sys.argv[2]))
np.save(sys.argv[3], np.asarray(jaxmon.p_values(ck.fitted, rows, log=True)))
state = jaxmon.begin_calibration(ck.estimator, ck.state)
np.save(sys.argv[4], np.asarray(jaxmon.threshold(ck.estimator.finalize(
    ck.estimator.update(state, rows)), fpr=0.1)))
"""


def test_p_values_and_begin_calibration_in_a_fresh_process_after_load(tmp_path):
    """Functions given only a fitted value (or a rebuilt estimator) need nothing the fitting
    process built: a new process finds the inner estimator from the checkpoint's spec alone."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(31)
    cal = jaxmon.calibrated(jaxmon.gaussian(shrinkage="oas"))
    fit, held, new = _split(normal_rows(rng, 900, D), 400, 300, 200)
    s = cal.update(cal.init(jax.ShapeDtypeStruct((D,), jnp.float32)), jnp.asarray(fit))
    fitting = s
    s = jaxmon.begin_calibration(cal, s)
    fitted = cal.finalize(cal.update(s, jnp.asarray(held)))
    jaxmon.checkpoint.save(tmp_path / "ck", cal, fitting, fitted=fitted)
    np.save(tmp_path / "rows.npy", np.asarray(new, np.float32))
    out_p, out_t = tmp_path / "p.npy", tmp_path / "t.npy"
    paths = [str(p) for p in (tmp_path / "ck", tmp_path / "rows.npy", out_p, out_t)]
    subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, *paths],
        check=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    want = jaxmon.p_values(fitted, jnp.asarray(new, jnp.float32), log=True)
    np.testing.assert_array_equal(np.load(out_p), np.asarray(want))
    refit = cal.finalize(cal.update(s, jnp.asarray(new, jnp.float32)))
    np.testing.assert_array_equal(np.load(out_t), np.asarray(jaxmon.threshold(refit, fpr=0.1)))


def test_equal_specs_give_one_estimator_object():
    """``from_spec`` is the one place estimators are cached: the inner estimator a fitted value
    finds by its spec is the same object (and jitted functions) every time."""
    mon = jaxmon.monitor({"a": jaxmon.gaussian(diagonal=True)})
    cal = jaxmon.calibrated(mon)
    a = jaxmon.from_spec(cal.spec.to_json())
    assert a is jaxmon.from_spec(cal.spec.to_dict()) is jaxmon.from_spec(cal.spec)
    assert a.spec == cal.spec
    inner = jaxmon.from_spec(cal.spec.params["estimator"])
    assert inner is jaxmon.from_spec(mon.spec) and inner.spec == mon.spec
