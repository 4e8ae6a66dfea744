"""Low-level jitted kernels of jaxmon, imported as ``jaxmon_kernels``.

Each kernel is a pure function of arrays with a plain-jnp reference next to it
(``*_reference``) that the tests compare against. This package never imports ``jaxmon``.
"""

from jaxmon_kernels.knn import knn_kth_distance, knn_kth_distance_reference
from jaxmon_kernels.mahalanobis import centred, mahalanobis_sq, mahalanobis_sq_reference
from jaxmon_kernels.moments import MomentStats, moment_stats, moment_stats_reference

__all__ = [
    "MomentStats",
    "centred",
    "knn_kth_distance",
    "knn_kth_distance_reference",
    "mahalanobis_sq",
    "mahalanobis_sq_reference",
    "moment_stats",
    "moment_stats_reference",
]
