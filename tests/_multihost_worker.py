"""One process of the two-process ``jax.distributed`` test (run by tests/test_sharding.py).

Usage: python _multihost_worker.py PROCESS_ID PORT OUT.npz
Each process owns 2 CPU devices; the global mesh has 4. Both processes generate the same global
batches (same seed) and contribute their own rows; process 0 writes the merged statistics.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=2 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=20"
)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def main() -> None:
    pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid
    )
    import jaxmon
    import jaxmon.sharding as js

    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    mon = jaxmon.monitor({"h": jaxmon.gaussian()})
    sest = js.shard_local(mon, mesh)
    state = sest.init({"h": jax.ShapeDtypeStruct((8, 3, 5), jnp.float32)})
    rng = np.random.default_rng(0)
    sh = NamedSharding(mesh, P("data"))
    # Rows of this process: the devices of process i hold a contiguous block of the batch.
    local = slice(pid * 4, (pid + 1) * 4)
    for _ in range(3):
        x = (rng.standard_normal((8, 3, 5)) * 2 + 5).astype(np.float32)
        m = rng.random((8, 3)) < 0.7
        gx = jax.make_array_from_process_local_data(sh, x[local], x.shape)
        gm = jax.make_array_from_process_local_data(sh, m[local], m.shape)
        state = sest.update(state, {"h": gx}, mask=gm)
        jax.block_until_ready(state)  # the deadlock trap: block every step
    merged = js.merge_replicas(sest, state)
    merged = jax.jit(lambda s: s, out_shardings=NamedSharding(mesh, P()))(merged)
    jax.block_until_ready(merged)
    g = merged["h"]
    if pid == 0:
        np.savez(
            out,
            mean=np.asarray(g.mean),
            m2=np.asarray(g.m2),
            rows=np.asarray(g.counts.rows),
            replicas=np.int64(jax.tree.leaves(state)[0].shape[0]),
            processes=np.int64(jax.process_count()),
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
