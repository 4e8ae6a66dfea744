"""Helper for tests/test_query.py: a query that scores slowly, to be SIGKILLed mid-run.

Usage: python _kill_query.py STORE CHECKPOINT OUT BLOCK_ROWS SLEEP_S
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

from jaxmon import query

if __name__ == "__main__":
    store, ckpt, out, block_rows, pause = sys.argv[1:6]
    query.score_store(
        store,
        ckpt,
        out=out,
        tap="h",
        block_rows=int(block_rows),
        top_k=10,
        callback=lambda done, total: time.sleep(float(pause)),
    )
    print("finished", flush=True)
