"""Test setup: 8 forced CPU devices (set before jax initialises) and strict promotion."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "collective_call_terminate_timeout" not in _flags:
    _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=30"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# The law suite is one set of methods shared by every estimator's subclass: hypothesis sees
# several "executors" for it, which is intended (derandomized, no example database).
settings.register_profile(
    "jaxmon",
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.differing_executors],
)
settings.load_profile("jaxmon")


@pytest.fixture
def rng():
    """A seeded numpy generator, fresh per test."""
    import numpy as np

    return np.random.default_rng(0)
