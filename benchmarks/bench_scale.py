"""Scale: monitor state memory per device, update and finalize cost at large-model widths.

On 8 forced CPU devices, for a monitor of T full-covariance Gaussian taps
(``jaxmon.monitor({"t*": jaxmon.gaussian()})``, the heaviest per-tap state jaxmon keeps):

1. **Memory per device**, exact, from the state's shapes and each layout's shardings (nothing
   is allocated, so every point of the grid is covered): ``local`` = ``shard_local`` over 8 data
   devices (one replica per device: the whole d×d per tap), ``wide 2x4`` = ``shard_local`` over
   2 data groups with each replica's d×d split over 4 model devices, ``wide 1x8`` =
   ``shard_wide`` over 8 model devices. Plus XLA's temporary buffers of one update of the
   ``wide 2x4`` layout (compiled, not run) and a check of the shape count against the
   allocated shards at the smallest d.
2. **Update cost**: seconds to fold n tokens (batches of ``--batch`` rows, every update
   blocked) into T taps on the ``wide 2x4`` layout, for the measured grid below; the cost model
   ``t = c·T·n·d²`` is fitted (least squares on logs: exponents of n, d and T) and each point's
   measured/model ratio shows where it departs. Two reference layouts (``local``, one device)
   at one point give ratios between layouts.
3. **Finalize cost** (Ledoit–Wolf shrinkage, Cholesky, the inverse factor and the eigenvalues
   behind the condition number) per tap at each d against ``c·d³``.

The default grid (5-12 minutes on 2 shared cores, most of it the 10^6-token point and the
d=8192 finalize): d=1024 with T in {1, 4, 32} and 1.6·10^4-10^6 tokens; d=4096 with 1.6·10^4
and 6.5·10^4 tokens; d=8192 with 1.6·10^4 tokens (T=1). Larger points (32 taps at d=8192,
10^6 tokens at d=8192) are predicted by the fitted model, not timed. This machine's speed
drifts, so every timing is also given scaled by a matmul rate measured next to it.

    python benchmarks/bench_scale.py                 # the default grid
    python benchmarks/bench_scale.py --quick         # seconds: small d, for a smoke test
    python benchmarks/bench_scale.py --out benchmarks/results/scale.md
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import block, machine, matmul_peak

import jaxmon
import jaxmon.sharding as js

AUTO = jax.sharding.AxisType.Auto
GiB = float(1 << 30)


def _monitor(taps: int):
    return jaxmon.monitor({f"t{i}": jaxmon.gaussian() for i in range(taps)})


def _example(taps: int, d: int):
    return {f"t{i}": jax.ShapeDtypeStruct((d,), jnp.float32) for i in range(taps)}


def _layouts(taps: int):
    mon = _monitor(taps)
    m8 = jax.make_mesh((8,), ("data",), axis_types=(AUTO,))
    m24 = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO))
    m18 = jax.make_mesh((8,), ("model",), axis_types=(AUTO,))
    return {
        "local 8x1": (js.shard_local(mon, m8), m8),
        "wide 2x4": (js.shard_local(mon, m24, model_axis="model"), m24),
        "wide 1x8": (js.shard_wide(mon, m18, "model"), m18),
    }


def bytes_per_device(sest, example) -> int:
    """The most state bytes any one device holds (from shapes and shardings alone)."""
    where = js.state_sharding(sest)
    total = 0
    for leaf in jax.tree.leaves(jax.eval_shape(sest.init, example)):
        shard = where(leaf).shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def allocated_per_device(state) -> int:
    """Bytes of the state that device 0 actually holds."""
    dev = jax.devices()[0]
    return sum(
        s.data.nbytes for leaf in jax.tree.leaves(state) for s in leaf.addressable_shards
        if s.device == dev
    )  # fmt: skip


def _batch(mesh, taps: int, rows: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, d), np.float32) + 3).astype(np.float32)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    if "data" not in mesh.shape:
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    xs = jax.device_put(x, sh)
    return {f"t{i}": xs for i in range(taps)}


def time_update(sest, mesh, taps: int, d: int, tokens: int, batch: int) -> tuple[float, int]:
    """(seconds, tokens folded) for ``tokens`` tokens in batches of ``batch`` (after a warm-up)."""
    state = sest.init(_example(taps, d))
    xs = _batch(mesh, taps, batch, d, 0)
    upd = jax.jit(sest.update, donate_argnums=0)
    state = block(upd(state, xs))  # compile and warm up
    steps = max(1, round(tokens / batch))
    t0 = time.perf_counter()
    for _ in range(steps):
        state = block(upd(state, xs))  # block every step: forced CPU devices deadlock otherwise
    dt = time.perf_counter() - t0
    del state
    return dt, steps * batch


def temp_bytes(sest, mesh, taps: int, d: int, batch: int) -> int | None:
    abstract = jax.eval_shape(sest.init, _example(taps, d))
    where = js.state_sharding(sest)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where(x)), abstract
    )
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    xs = {
        f"t{i}": jax.ShapeDtypeStruct((batch, d), jnp.float32, sharding=rows) for i in range(taps)
    }
    try:
        mem = jax.jit(sest.update).lower(abstract, xs).compile().memory_analysis()
        return int(mem.temp_size_in_bytes)
    except Exception:  # memory_analysis is backend-dependent
        return None


def time_finalize(d: int, rows: int = 4096) -> float:
    """Seconds of one finalize (the first call's when it runs long: compiling is then noise)."""
    g = jaxmon.gaussian(shrinkage="ledoit_wolf")
    x = np.random.default_rng(1).standard_normal((rows, d), np.float32) + 3
    s = block(g.update(g.init(jax.ShapeDtypeStruct((d,), jnp.float32)), jnp.asarray(x)))
    t0 = time.perf_counter()
    block(g.finalize(s))
    first = time.perf_counter() - t0
    if first > 20:
        return first
    t0 = time.perf_counter()
    block(g.finalize(s))
    return time.perf_counter() - t0


def local_peak(quick: bool) -> float:
    """The matmul rate right now: this machine's speed drifts 2-3x within minutes (and other
    jobs share its cores), so each timing is scaled by the rate measured next to it."""
    return matmul_peak(jnp.float32, n=256 if quick else 1024, reps=3)


def fit_model(points: list[dict]) -> tuple[float, dict[str, float], float]:
    """Least squares of log t on log n, log d, log T; and c of the pure model t = c·T·n·d²."""
    a = np.array([[1, math.log(p["n"]), math.log(p["d"]), math.log(p["T"])] for p in points])
    y = np.array([math.log(p["t"]) for p in points])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    c = float(np.median([p["t"] / (p["T"] * p["n"] * p["d"] ** 2) for p in points]))
    return c, {"n": coef[1], "d": coef[2], "T": coef[3]}, float(np.exp(coef[0]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small d: a smoke test of seconds")
    p.add_argument("--batch", type=int, default=8192, help="rows per update")
    p.add_argument("--out", help="also write the report (markdown) here")
    a = p.parse_args(argv)
    assert jax.device_count() >= 8, "needs 8 (forced) devices"
    if a.quick:
        dims, grid = [64, 128, 256], [(64, 1, 2048), (64, 4, 4096), (128, 1, 4096), (256, 1, 4096)]
        finalize_dims, a.batch, ref_point = [64, 128, 256], 1024, (128, 1, 4096)
    else:
        dims = [1024, 4096, 8192]
        grid = [  # (d, taps, tokens): the measured points
            (1024, 1, 16_384),
            (1024, 1, 1_048_576),
            (1024, 4, 131_072),
            (1024, 32, 16_384),
            (4096, 1, 16_384),
            (4096, 1, 65_536),
            (8192, 1, 16_384),
        ]
        finalize_dims, ref_point = [1024, 4096, 8192], (1024, 4, 131_072)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    t_start = time.perf_counter()
    peak = matmul_peak(jnp.float32, n=512 if a.quick else 2048)
    say(machine())
    say(f"8 forced CPU devices; f32 matmul peak measured here (one device): {peak:.0f} GFLOP/s")
    say("")
    say("1. State memory per device (exact, from shapes and shardings; GiB), full Gaussian taps")
    say(f"{'d':>6} {'taps':>5} {'local 8x1':>10} {'wide 2x4':>10} {'wide 1x8':>10}  model d²·4B·T")
    for d in dims:
        for taps in (1, 32):
            got = {
                k: bytes_per_device(e, _example(taps, d)) for k, (e, _) in _layouts(taps).items()
            }
            model = 4 * d * d * taps
            say(
                f"{d:>6} {taps:>5} {got['local 8x1'] / GiB:10.3f} {got['wide 2x4'] / GiB:10.3f} "
                f"{got['wide 1x8'] / GiB:10.3f}  x{got['local 8x1'] / model:.4f} of d²·4B·T"
            )
    d0 = dims[0]
    lay = _layouts(1)
    checked = []
    for e, _ in lay.values():
        st = e.init(_example(1, d0))
        checked.append(allocated_per_device(st) == bytes_per_device(e, _example(1, d0)))
        del st
    say(
        f"(checked against the allocated shards at d={d0}: {'equal' if all(checked) else 'DIFFER'})"
    )
    say("")
    say(f"XLA temporaries of one update (wide 2x4, batches of {a.batch} rows), per device, GiB:")
    for d in dims:
        e, mesh = _layouts(1)["wide 2x4"]
        tb = temp_bytes(e, mesh, 1, d, a.batch)
        say(f"  d={d:>5}, 1 tap: {'n/a' if tb is None else f'{tb / GiB:.3f}'}")
    say("")
    say("2. Update cost (wide 2x4 layout, every update blocked). 'norm s' = seconds scaled to")
    say("   the machine's speed at the start (by a matmul rate measured next to each point);")
    say("   the cost model is fitted to those")
    say(
        f"{'d':>6} {'taps':>5} {'tokens':>10} {'seconds':>9} {'norm s':>8} {'GFLOP/s':>8} "
        f"{'% peak now':>10}"
    )
    points = []
    p0 = local_peak(a.quick)
    for d, taps, tokens in grid:
        e, mesh = _layouts(taps)["wide 2x4"]
        now = local_peak(a.quick)
        dt, n = time_update(e, mesh, taps, d, tokens, min(a.batch, tokens))
        now = (now + local_peak(a.quick)) / 2
        norm = dt * now / p0
        gf = 2 * taps * n * d * d / dt / 1e9
        points.append({"d": d, "T": taps, "n": n, "t": norm})
        say(f"{d:>6} {taps:>5} {n:>10,} {dt:9.2f} {norm:8.2f} {gf:8.1f} {100 * gf / now:9.0f}%")
    c, expo, _ = fit_model(points)
    say("")
    fitted = f"n^{expo['n']:.2f} · d^{expo['d']:.2f} · T^{expo['T']:.2f}"
    say(
        f"fitted t ∝ {fitted} (model: n^1 d^2 T^1); c = {c:.3e} s per token·d² "
        f"({2 / c / 1e9:.0f} GFLOP/s effective)"
    )
    say("measured / model (c·T·n·d²) per point:")
    for q in points:
        model = c * q["T"] * q["n"] * q["d"] ** 2
        say(f"  d={q['d']:>5} T={q['T']:>2} n={q['n']:>9,}: {q['t'] / model:.2f}")
    d, taps, tokens = ref_point
    say("")
    say(
        f"layouts at d={d}, T={taps}, {tokens:,} tokens (time ratio against wide 2x4, >1 = slower):"
    )
    ref = {}
    one_dev = jax.make_mesh((1,), ("data",), axis_types=(AUTO,), devices=jax.devices()[:1])
    for name, (e, mesh) in [
        ("wide 2x4", _layouts(taps)["wide 2x4"]),
        ("local 8x1", _layouts(taps)["local 8x1"]),
        ("one device", (js.shard_local(_monitor(taps), one_dev), one_dev)),
    ]:
        ref[name] = time_update(e, mesh, taps, d, tokens, min(a.batch, tokens))[0]
    for name, dt in ref.items():
        say(f"  {name:<11} {dt:7.2f} s  x{dt / ref['wide 2x4']:.2f}")
    say("")
    say("3. Finalize per tap, one device (Ledoit-Wolf, Cholesky, inverse factor, eigenvalues)")
    fin = []
    for d in finalize_dims:
        now = local_peak(a.quick)
        dt = time_finalize(d)
        fin.append((d, dt, dt * (now + local_peak(a.quick)) / 2 / p0))
    cf = float(np.median([norm / d**3 for d, _, norm in fin]))
    for d, dt, norm in fin:
        say(
            f"  d={d:>5}: {dt:7.3f} s (norm {norm:7.3f} s)   norm / (c·d³) = "
            f"{norm / (cf * d**3):.2f}"
        )
    slope = np.polyfit([math.log(d) for d, _, _ in fin], [math.log(t) for _, _, t in fin], 1)[0]
    say(f"  fitted t ∝ d^{slope:.2f} (model d^3); c = {cf:.3e} s per d³")
    say("")
    big = 8192
    say(f"Predicted by the fitted model (this CPU, wide 2x4): 32 taps of d={big}, 10^6 tokens:")
    say(
        f"  update {c * 32 * 1e6 * big**2 / 3600:.1f} h; finalize {32 * cf * big**3:.0f} s; "
        f"state {bytes_per_device(_layouts(32)['wide 2x4'][0], _example(32, big)) / GiB:.1f}"
        " GiB per device"
    )
    say(f"(whole run {time.perf_counter() - t_start:.0f} s)")
    if a.out:
        Path(a.out).write_text("```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
