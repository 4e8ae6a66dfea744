"""jaxmon: mechanistic anomaly detection for JAX.

Streaming, mergeable estimators of what a network computes (``jaxmon.Estimator``), monitors
over many taps, probes, calibration, and batch queries over logged activations.

Submodules imported on first use (they pull in flax, orbax or tensorstore): ``jaxmon.nnx``,
``jaxmon.linen``, ``jaxmon.sharding``, ``jaxmon.checkpoint``, ``jaxmon.io``, ``jaxmon.query``,
``jaxmon.report``, ``jaxmon.sklearn``, ``jaxmon.cli``.
"""

import importlib as _importlib

from jaxmon import errors, metrics
from jaxmon._aggregate import sequence_null, sequence_p_values, sequence_scores
from jaxmon._base import (
    Counts,
    Estimator,
    EstimatorSpec,
    from_spec,
    num_nonfinite,
    num_rows,
    register,
    registered,
)
from jaxmon._calibration import (
    CalibratedFitted,
    CalibratedState,
    begin_calibration,
    calibrated,
    combine,
    p_values,
    p_values_of_scores,
    threshold,
)
from jaxmon._compare import Comparison, compare, comparison_table, permutation_test
from jaxmon._monitor import EveryKState, every_k, monitor
from jaxmon._numerics import Moments
from jaxmon._rank import format_ranking, rank_detectors, rank_scores
from jaxmon._taps import attribution_taps, capture, tap
from jaxmon.errors import (
    CheckpointError,
    ConditioningWarning,
    ConfigError,
    ExistingPathError,
    JaxmonError,
    MissingFileError,
    MissingTapError,
    NotFittedError,
    ShapeError,
    StoreError,
)
from jaxmon.estimators.batch_detectors import que_scores, spectral_signature_scores
from jaxmon.estimators.flow import FlowFitted, FlowState, flow, flow_nll
from jaxmon.estimators.frequent_directions import FDFitted, FDState, frequent_directions
from jaxmon.estimators.frequent_directions import error_bound as sketch_error_bound
from jaxmon.estimators.gaussian import GaussianFitted, gaussian
from jaxmon.estimators.mixture import MixtureFitted, gaussian_mixture
from jaxmon.estimators.pca_residual import PCAResidualFitted, pca_residual
from jaxmon.estimators.probe import (
    LogisticProbeState,
    ProbeFitted,
    ProbeState,
    probe,
    scale_free_covariance,
)
from jaxmon.estimators.quantiles import (
    QuantilesFitted,
    QuantilesState,
    log_upper_tail,
    quantile,
    quantiles,
    quantiles_accuracy,
    upper_tail,
)
from jaxmon.estimators.quantiles import rank as quantile_rank
from jaxmon.estimators.reservoir import KNNFitted, ReservoirState, knn, reservoir
from jaxmon.estimators.transition import TransitionFitted, TransitionState, transition

__version__ = "0.1.0"

__all__ = [
    # The contract: an estimator is a NamedTuple of pure functions over pytree states.
    "Estimator",
    "EstimatorSpec",
    "Counts",
    "Moments",
    "from_spec",
    "register",
    "registered",
    "num_rows",
    "num_nonfinite",
    # Per-layer detectors (level 1) and their fitted values.
    "gaussian",
    "GaussianFitted",
    "pca_residual",
    "PCAResidualFitted",
    "frequent_directions",
    "FDState",
    "FDFitted",
    "sketch_error_bound",
    "reservoir",
    "knn",
    "ReservoirState",
    "KNNFitted",
    "gaussian_mixture",
    "MixtureFitted",
    "flow",
    "FlowState",
    "FlowFitted",
    "flow_nll",
    "que_scores",
    "spectral_signature_scores",
    # Between layers (level 2).
    "transition",
    "TransitionState",
    "TransitionFitted",
    # Labels: probes and detector ranking.
    "probe",
    "ProbeState",
    "LogisticProbeState",
    "ProbeFitted",
    "scale_free_covariance",
    "rank_detectors",
    "rank_scores",
    "format_ranking",
    # Monitors, sparse updates and taps (attributions are taps too: level 3).
    "monitor",
    "every_k",
    "EveryKState",
    "tap",
    "capture",
    "attribution_taps",
    # Calibration, p-values and their combination; sequence scores.
    "quantiles",
    "QuantilesState",
    "QuantilesFitted",
    "quantile",
    "quantile_rank",
    "upper_tail",
    "log_upper_tail",
    "quantiles_accuracy",
    "calibrated",
    "begin_calibration",
    "CalibratedState",
    "CalibratedFitted",
    "p_values",
    "p_values_of_scores",
    "threshold",
    "combine",
    "sequence_scores",
    "sequence_null",
    "sequence_p_values",
    # Audits of data and edits.
    "compare",
    "Comparison",
    "comparison_table",
    "permutation_test",
    # Errors (also in jaxmon.errors) and metrics.
    "JaxmonError",
    "ShapeError",
    "MissingTapError",
    "NotFittedError",
    "ConfigError",
    "StoreError",
    "ExistingPathError",
    "MissingFileError",
    "CheckpointError",
    "ConditioningWarning",
    "errors",
    "metrics",
    # Checkpoints.
    "load",
]

_LAZY = ("nnx", "linen", "sharding", "checkpoint", "io", "query", "report", "sklearn", "cli")


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"jaxmon.{name}")
    raise AttributeError(f"module 'jaxmon' has no attribute {name!r}")


def load(directory, *, step=None, **kwargs):
    """Rebuilds estimator, state and fitted values from a checkpoint alone.

    Keyword arguments (``sharding=``, ``estimator=``, ``with_fitted=``, ...) are those of
    ``jaxmon.checkpoint.load``.
    """
    from jaxmon.checkpoint import load as _load

    return _load(directory, step=step, **kwargs)
