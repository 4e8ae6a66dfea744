"""Helper for tests/test_io.py: an ActivationWriter that logs until it is SIGKILLed.

Usage: python _kill_writer.py STORE. Writes the deterministic batches of :func:`batch` (with
padding masks, labels, two splits and token text) and prints ``wrote <i>`` after each write; it
never closes the store, so whatever the store holds was committed while writing.
"""

import sys
import time

import numpy as np

from jaxmon import io

CHUNK_ROWS = 32


def batch(i: int) -> tuple[dict, dict]:
    """The ``i``-th write: ``(taps, keyword arguments)``, the same in every process."""
    rng = np.random.default_rng([7, i])
    x = rng.normal(size=(4, 24, 16)).astype(np.float32)
    mask = np.ones((4, 24), bool)
    mask[:, 24 - i % 5 :] = False  # right padding, a different amount per write
    kw = {
        "mask": mask,
        "label": rng.integers(0, 2, size=4),
        "split": ("trusted", "query")[i % 2],
        "tokens": [[f"w{i}.{b}.{t}" for t in range(24)] for b in range(4)],
    }
    return {"h": x, "g": x[..., :3] * 2}, kw


if __name__ == "__main__":
    w = io.ActivationWriter(sys.argv[1], chunk_rows=CHUNK_ROWS, commit_interval=0.05)
    i = 0
    while True:
        taps, kw = batch(i)
        w.write(taps, **kw)
        print(f"wrote {i}", flush=True)
        i += 1
        time.sleep(0.005)
