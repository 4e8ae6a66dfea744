"""A scikit-learn-style front door: jaxmon detectors without learning JAX.

``Detector(jaxmon.gaussian(shrinkage="ledoit_wolf")).fit(X)`` streams ``X`` through the
estimator in batches; ``partial_fit`` keeps streaming (states merge exactly, so the order and
size of the chunks does not matter); ``decision_function`` returns anomaly scores and
``calibrate(X_clean, fpr=...)`` sets the threshold that ``predict`` uses.

Conventions follow PyOD, whose users this serves: ``decision_function`` is *higher = more
anomalous* (as every jaxmon score), ``predict`` returns 1 for outliers and 0 for inliers, and a
fitted detector exposes ``decision_scores_``, ``threshold_`` and ``labels_``. The class is a
scikit-learn ``BaseEstimator``: ``clone``, ``get_params`` / ``set_params`` and ``Pipeline``
work (with ``Pipeline.decision_function`` after a scaler, say).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

import jaxmon
from jaxmon._base import Estimator
from jaxmon.errors import ConfigError, NotFittedError


def _resolve(estimator: Estimator | str | None) -> Estimator:
    if estimator is None:
        return jaxmon.gaussian(shrinkage="ledoit_wolf")
    if isinstance(estimator, str):
        return jaxmon.from_spec(estimator)
    if isinstance(estimator, Estimator):
        return estimator
    raise ConfigError(
        "Detector(estimator=...) takes a jaxmon estimator (e.g. jaxmon.gaussian()), its spec "
        f"JSON string, or None; got {type(estimator).__name__}"
    )


class Detector(OutlierMixin, BaseEstimator):
    """Wraps a jaxmon estimator as a scikit-learn / PyOD-style outlier detector.

    Args:
      estimator: a jaxmon ``Estimator`` over rows ``[n, d]`` (default
        ``jaxmon.gaussian(shrinkage="ledoit_wolf")``) or its ``spec.to_json()`` string.
      fpr: target false-positive rate of the default threshold, set on the training rows by
        ``fit`` and on held-out clean rows by ``calibrate`` (preferred: training rows score
        lower than unseen clean rows, so a threshold from them flags more than ``fpr``).
      batch_size: rows per jitted update / score call; the last batch is padded and masked
        so each call compiles once.

    Non-finite rows: ``fit`` excludes them (counted in ``jaxmon.num_nonfinite(self.state_)``;
    fitting on rows that are all non-finite raises ``NotFittedError``); ``decision_function``
    scores them ``+inf`` and ``predict`` flags them (1): a row holding NaN/inf is never an
    inlier.

    Attributes:
      n_features_in_: feature count seen by ``fit``.
      state_, fitted_: the estimator's mergeable state and its finalized value.
      decision_scores_: scores of the training rows (PyOD).
      threshold_: score above which ``predict`` says outlier.
      labels_: ``predict`` of the training rows (PyOD).
    """

    def __init__(
        self,
        estimator: Estimator | str | None = None,
        *,
        fpr: float = 0.01,
        batch_size: int = 8192,
    ):
        self.estimator = estimator
        self.fpr = fpr
        self.batch_size = batch_size

    # ------------------------------------------------------------------ helpers
    def _batches(self, X: np.ndarray):
        b = int(self.batch_size)
        for start in range(0, len(X), b):
            chunk = X[start : start + b]
            n = len(chunk)
            if n < b and len(X) > b:  # pad the tail so one compiled shape serves every batch
                pad = np.zeros((b - n, X.shape[1]), X.dtype)
                chunk = np.concatenate([chunk, pad])
            mask = np.arange(len(chunk)) < n
            yield jnp.asarray(chunk), jnp.asarray(mask), n

    def _check(self, X, *, reset: bool) -> np.ndarray:
        if not isinstance(self.batch_size, int | np.integer) or int(self.batch_size) < 1:
            raise ConfigError(
                f"Detector: batch_size must be a positive int, got {self.batch_size!r}"
            )
        # Non-finite rows are allowed: they are excluded from fits and score +inf.
        X = validate_data(
            self, X, reset=reset, dtype=[np.float32, np.float64], ensure_all_finite=False
        )
        return np.asarray(X, np.float32)

    # ------------------------------------------------------------------ API
    def fit(self, X, y=None) -> Detector:
        """Fits from scratch on ``X [n, d]`` (``y`` is ignored)."""
        for attr in ("state_", "fitted_"):
            if hasattr(self, attr):
                delattr(self, attr)
        return self.partial_fit(X, y)

    def partial_fit(self, X, y=None) -> Detector:
        """Streams more rows ``X`` into the detector's state and refits.

        Non-finite rows are excluded (and counted in ``jaxmon.num_nonfinite(self.state_)``).
        """
        first = not hasattr(self, "state_")
        X = self._check(X, reset=first)
        est = _resolve(self.estimator)
        if first:
            self.state_ = est.init(jax.ShapeDtypeStruct((X.shape[1],), jnp.float32))
        for xb, mb, _ in self._batches(X):
            self.state_ = est.update(self.state_, xb, mask=mb)
        self.fitted_ = est.finalize(self.state_)
        self.decision_scores_ = self._scores(est, X)
        self.threshold_ = _upper_quantile(self.decision_scores_, self.fpr)
        self.labels_ = (self.decision_scores_ > self.threshold_).astype(int)
        return self

    def _scores(self, est: Estimator, X: np.ndarray) -> np.ndarray:
        out = [
            np.asarray(est.score(self.fitted_, xb, mask=mb))[:n] for xb, mb, n in self._batches(X)
        ]
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def decision_function(self, X) -> np.ndarray:
        """Anomaly scores of ``X``: higher means more anomalous."""
        check_is_fitted(self, "fitted_")
        return self._scores(_resolve(self.estimator), self._check(X, reset=False))

    def score_samples(self, X) -> np.ndarray:
        """scikit-learn's convention (higher = more normal): ``-decision_function(X)``."""
        return -self.decision_function(X)

    def calibrate(self, X_clean, *, fpr: float | None = None) -> Detector:
        """Sets ``threshold_`` so that a fraction ``fpr`` of held-out clean rows is flagged.

        Args:
          X_clean: trusted rows not used for fitting.
          fpr: target false-positive rate (default: the ``fpr`` given at construction).
        """
        check_is_fitted(self, "fitted_")
        rate = self.fpr if fpr is None else fpr
        if not 0.0 < rate < 1.0:
            raise ConfigError(f"Detector.calibrate: fpr must lie in (0, 1), got {rate}")
        self.threshold_ = _upper_quantile(self.decision_function(X_clean), rate)
        return self

    def predict(self, X) -> np.ndarray:
        """1 for rows scoring above ``threshold_`` (outliers), 0 otherwise (PyOD convention).

        Rows that score NaN (none should; kept as a guard) are outliers too: "no answer" must
        never read as "normal".
        """
        check_is_fitted(self, "threshold_")
        s = self.decision_function(X)
        return ((s > self.threshold_) | np.isnan(s)).astype(int)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # non-finite rows are excluded, not fatal
        return tags


def _upper_quantile(scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold with at most ``fpr`` of ``scores`` strictly above it.

    Rows scoring ``+inf`` (non-finite inputs) are left out: they are flagged whatever the
    threshold, and must not drag it to infinity.

    Raises:
      NotFittedError: no finite score to set a threshold from.
    """
    s = np.sort(np.asarray(scores, np.float64))
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise NotFittedError(
            "Detector: no finite score to set a threshold from (every row was NaN/inf); "
            "fit or calibrate on finite trusted rows"
        )
    k = int(np.floor(fpr * len(s)))  # rows allowed above the threshold
    return float(s[len(s) - 1 - k]) if k < len(s) else float(s[0]) - 1.0
