"""The scikit-learn front door: equals the estimator, streams, calibrates, plays with sklearn."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import jaxmon
from jaxmon.sklearn import Detector


def _rows(rng, n, d=5):
    return rng.standard_normal((n, d)) @ np.triu(np.ones((d, d))) + 4.0


def test_decision_function_equals_the_estimator(rng):
    x, q = _rows(rng, 700), _rows(rng, 50) * 1.5
    det = Detector(jaxmon.gaussian(shrinkage="oas"), batch_size=256).fit(x)
    est = jaxmon.gaussian(shrinkage="oas")
    f = est.finalize(est.update(est.init(x.astype(np.float32)), jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(
        det.decision_function(q), np.asarray(est.score(f, jnp.asarray(q, jnp.float32))), rtol=1e-4
    )
    assert det.decision_scores_.shape == (700,) and det.labels_.shape == (700,)


def test_partial_fit_in_chunks_equals_fit(rng):
    x, q = _rows(rng, 900), _rows(rng, 40)
    whole = Detector(batch_size=128).fit(x)
    chunked = Detector(batch_size=128)
    for part in np.array_split(x, 4):
        chunked.partial_fit(part)
    np.testing.assert_allclose(chunked.decision_function(q), whole.decision_function(q), rtol=1e-4)
    assert jaxmon.num_rows(chunked.state_) == 900


def test_calibrate_sets_the_false_positive_rate(rng):
    x, clean, fresh = _rows(rng, 3000), _rows(rng, 4000), _rows(rng, 4000)
    det = Detector(batch_size=1024).fit(x).calibrate(clean, fpr=0.05)
    flagged = det.predict(fresh).mean()
    # Binomial sd at n=4000, p=0.05 is 0.0034; allow 4 sd plus the calibration set's own noise.
    assert abs(flagged - 0.05) < 0.02, flagged
    assert det.predict(_rows(rng, 200) + 30.0).mean() == 1.0
    with pytest.raises(ValueError, match="fpr"):
        det.calibrate(clean, fpr=1.5)


def test_clone_params_and_pipeline(rng):
    det = Detector(jaxmon.gaussian(diagonal=True), fpr=0.1, batch_size=64)
    twin = clone(det)
    assert twin.get_params()["fpr"] == 0.1 and twin is not det
    spec = Detector(jaxmon.gaussian(diagonal=True).spec.to_json())
    x, q = _rows(rng, 300), _rows(rng, 30)
    np.testing.assert_allclose(
        spec.fit(x).decision_function(q), clone(det).fit(x).decision_function(q), rtol=1e-5
    )
    pipe = make_pipeline(StandardScaler(), Detector(batch_size=64)).fit(x)
    assert pipe.decision_function(q).shape == (30,)
    assert set(np.unique(pipe.predict(q))) <= {0, 1}


def test_errors_are_clear(rng):
    det = Detector(batch_size=64).fit(_rows(rng, 100))
    with pytest.raises(ValueError, match="5 features"):
        det.decision_function(_rows(rng, 10, d=4))
    with pytest.raises(TypeError, match="jaxmon estimator"):
        Detector(estimator=42).fit(_rows(rng, 10))


@pytest.mark.slow
def test_scikit_learn_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator

    # These checks assume scikit-learn's outlier conventions (predict in {-1, 1}, decision
    # function positive for inliers); Detector follows PyOD's (1 = outlier, higher = odder).
    pyod_convention = {
        "check_outlier_contamination": "PyOD convention: no contamination parameter",
        "check_outliers_fit_predict": "predict returns {0, 1} (PyOD), not {-1, 1}",
        "check_outliers_train": "predict returns {0, 1} (PyOD), not {-1, 1}",
        "check_fit2d_1sample": "one row is a valid (degenerate) stream for a moments estimator",
        "check_fit2d_1feature": "one feature is fine; the check expects an error message",
    }
    results = check_estimator(
        Detector(batch_size=64), expected_failed_checks=pyod_convention, on_fail=None
    )
    failed = [r for r in results if r["status"] == "failed"]
    assert not failed, [(r["check_name"], str(r["exception"])[:200]) for r in failed]
