"""jaxmon: mechanistic anomaly detection for JAX.

Streaming, mergeable estimators of what a network computes (``jaxmon.Estimator``), monitors
over many taps, calibration, and batch queries over logged activations.

Submodules imported on first use (they pull in flax, orbax or tensorstore): ``jaxmon.nnx``,
``jaxmon.linen``, ``jaxmon.sharding``, ``jaxmon.checkpoint``, ``jaxmon.io``, ``jaxmon.query``,
``jaxmon.report``, ``jaxmon.sklearn``, ``jaxmon.cli``.
"""

import importlib as _importlib

from jaxmon import errors, metrics
from jaxmon._aggregate import *
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
from jaxmon._calibration import *
from jaxmon._compare import *
from jaxmon._monitor import *
from jaxmon._rank import *
from jaxmon._taps import *
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
from jaxmon.estimators.batch_detectors import *
from jaxmon.estimators.flow import *
from jaxmon.estimators.frequent_directions import *
from jaxmon.estimators.gaussian import GaussianFitted, gaussian
from jaxmon.estimators.mixture import *
from jaxmon.estimators.pca_residual import *
from jaxmon.estimators.probe import *
from jaxmon.estimators.quantiles import *
from jaxmon.estimators.reservoir import *
from jaxmon.estimators.transition import *

__version__ = "0.1.0"

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
