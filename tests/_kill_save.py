"""Helper for tests/test_checkpoint.py: saves step 0, then a large step 1 and gets killed.

Usage: python _kill_save.py DIRECTORY D. Prints "step0" once step 0 is complete, then
"saving1" just before the save of step 1 starts (the test SIGKILLs it during that save).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxmon
from jaxmon import checkpoint


def states(d: int):
    """Two deterministic states of a Gaussian over ``d`` features (the second has more rows)."""
    est = jaxmon.gaussian()
    rng = np.random.default_rng(1)
    s0 = est.update(
        est.init(jax.ShapeDtypeStruct((d,), jnp.float32)),
        jnp.asarray(rng.normal(size=(8, d)), jnp.float32),
    )
    s1 = est.update(s0, jnp.asarray(rng.normal(size=(8, d)), jnp.float32))
    return est, s0, s1


if __name__ == "__main__":
    directory, d = sys.argv[1], int(sys.argv[2])
    est, s0, s1 = states(d)
    checkpoint.save(directory, est, s0, step=0)
    print("step0", flush=True)
    jax.block_until_ready(s1)
    print("saving1", flush=True)
    checkpoint.save(directory, est, s1, step=1)
    print("step1", flush=True)
