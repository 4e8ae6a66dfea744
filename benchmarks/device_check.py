"""One-command device check: jaxmon's hot paths on one GPU or TPU host, in at most ~5 minutes.

Everything runs on ``jax.devices()[0]`` (``score_store`` on all local devices) and is reported
as a fraction of that device's matmul peak *measured in the same process* (a dense square
GEMM per dtype), and against PyTorch on the same device when PyTorch sees it (CUDA):

1. **Moments update**, f32 and bf16 input: ``jaxmon.gaussian().update`` rows/s at d=1024 and
   4096, counted as the 2·n·d² flops of its Gram; the bare Gram by ``x.T @ x`` and by
   ``jax.lax.linalg.symmetric_product`` (cuBLAS syrk on GPU: half the flops), to say which
   route the kernel should take on this device; PyTorch ``acc.addmm_(x.T, x)`` as the peer.
2. **Mahalanobis scoring**: ``score`` of a fitted Gaussian (2·n·d² flops), against PyTorch
   ``((x - mean) @ W).square().sum(-1)`` with the same whitener.
3. **score_store from a local store**: a bf16 store written to a temporary directory on the
   host's disk, scored end to end; rows/s against in-memory scoring of the same rows.
4. **Train-step overhead**: a jitted SGD step of residual MLP blocks (d → 4d → d, 4 blocks)
   with and without ``jaxmon.monitor({"block*": gaussian()})`` on every block's output, in
   alternating rounds; the Gram flops are ~4% of the step's, which is the floor.

Writes ``benchmarks/results/device.md`` (``--out``). ``--smoke`` runs tiny sizes on any backend
(CPU included) in seconds: the test suite runs it so the script stays runnable.

    python benchmarks/device_check.py            # on the accelerator host
    python benchmarks/device_check.py --smoke --out /tmp/device.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import block, machine

import jaxmon
from jaxmon import io, query

RESULTS = Path(__file__).parent / "results" / "device.md"


# --------------------------------------------------------------------------- timing


def _timed(fn, reps: int, sync=block) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up (compile) run."""
    sync(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _torch_on(platform: str):
    """``(torch, device)`` when PyTorch sees this accelerator (CUDA), else ``(torch|None, None)``.

    On a CPU-only run PyTorch's CPU is the peer (same device); on TPU there is none.
    """
    try:
        import torch
    except ImportError:
        return None, None
    if platform == "gpu" and torch.cuda.is_available():
        return torch, "cuda"
    if platform == "cpu":
        return torch, "cpu"
    return torch, None


def _torch_sync(torch, device):
    def sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    return sync


def peak(dtype, n: int, reps: int) -> float:
    """Measured dense GEMM rate of device 0 in GFLOP/s (median of ``reps``)."""
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype))
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * n**3 / _timed(lambda: f(a), reps) / 1e9


# --------------------------------------------------------------------------- checks


def check_moments(d: int, rows: int, dtype, reps: int, torch, tdev) -> dict:
    x = jax.device_put(
        jnp.asarray(np.random.default_rng(1).standard_normal((rows, d)) + 3.0, dtype)
    )
    est = jaxmon.gaussian()
    s0 = est.init(jax.ShapeDtypeStruct((d,), dtype))
    upd = jax.jit(est.update)
    t_upd = _timed(lambda: upd(s0, x), reps)
    dot = jax.jit(lambda x: jnp.dot(x.T, x, preferred_element_type=jnp.float32))
    t_dot = _timed(lambda: dot(x), reps)
    out = {"t": t_upd, "flops": 2 * rows * d * d, "t_dot": t_dot}
    try:
        syrk = jax.jit(
            lambda x: jax.lax.linalg.symmetric_product(
                x.T.astype(jnp.float32), jnp.zeros((d, d), jnp.float32)
            )
        )
        out["t_syrk"] = _timed(lambda: syrk(x), reps)
    except Exception as e:  # not every backend lowers it
        out["syrk_error"] = type(e).__name__
    if tdev is not None:
        tdt = torch.float32 if dtype == jnp.float32 else torch.bfloat16
        tx = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(tdev).to(tdt)
        acc = torch.zeros((d, d), dtype=tdt, device=tdev)
        out["t_torch"] = _timed(lambda: acc.addmm_(tx.T, tx), reps, _torch_sync(torch, tdev))
    return out


def check_scoring(d: int, rows: int, reps: int, torch, tdev) -> dict:
    rng = np.random.default_rng(2)
    est = jaxmon.gaussian(shrinkage="ledoit_wolf")
    fit_rows = jnp.asarray(rng.standard_normal((max(4 * d, 4096), d)), jnp.float32)
    fitted = est.finalize(est.update(est.init(jax.ShapeDtypeStruct((d,), jnp.float32)), fit_rows))
    x = jax.device_put(jnp.asarray(rng.standard_normal((rows, d)), jnp.float32))
    score = jax.jit(est.score)
    out = {"t": _timed(lambda: score(fitted, x), reps), "flops": 2 * rows * d * d}
    if tdev is not None:
        w = torch.from_numpy(np.asarray(fitted.whitener).T.copy()).to(tdev)
        mu = torch.from_numpy(np.asarray(fitted.mean)).to(tdev)
        tx = torch.from_numpy(np.asarray(x)).to(tdev)
        out["t_torch"] = _timed(
            lambda: ((tx - mu) @ w).square().sum(-1), reps, _torch_sync(torch, tdev)
        )
    return out


def check_score_store(d: int, rows: int, block_rows: int) -> dict:
    rng = np.random.default_rng(3)
    est = jaxmon.gaussian()
    with tempfile.TemporaryDirectory() as tmp:
        chunk = rng.standard_normal((min(rows, 65536), d)).astype(np.float32)
        with io.ActivationWriter(f"{tmp}/store", dtype="bfloat16") as w:
            for i in range(0, rows, len(chunk)):
                w.write({"h": chunk[: min(len(chunk), rows - i)]})
        fitted = est.finalize(
            est.update(est.init(jax.ShapeDtypeStruct((d,), jnp.float32)), jnp.asarray(chunk))
        )
        t0 = time.perf_counter()
        query.score_store(
            f"{tmp}/store", est, fitted, out=f"{tmp}/q", block_rows=block_rows, progress=False
        )
        t_store = time.perf_counter() - t0
    xb = jax.device_put(jnp.asarray(chunk, jnp.bfloat16))
    score = jax.jit(est.score)
    t_mem = _timed(lambda: score(fitted, xb), 3) * rows / len(chunk)
    return {"t": t_store, "t_mem": t_mem, "rows": rows, "bytes": rows * d * 2}


def _mlp_step(monitor, d: int, layers: int):
    def forward(params, x):
        taps = {}
        h = x
        for i, (w1, w2) in enumerate(params):
            h = h + jax.nn.gelu(h @ w1) @ w2
            taps[f"block{i}"] = h
        return jnp.mean(h * h), taps

    def step(params, mstate, x):
        (loss, taps), g = jax.value_and_grad(forward, has_aux=True)(params, x)
        params = jax.tree.map(lambda p, gp: p - 1e-4 * gp, params, g)
        if monitor is not None:
            mstate = monitor.update(mstate, jax.lax.stop_gradient(taps))
        return params, mstate, loss

    return jax.jit(step, donate_argnums=(0, 1))


def check_train_step(d: int, tokens: int, layers: int, rounds: int) -> dict:
    rng = np.random.default_rng(4)
    scale = 1 / np.sqrt(d)

    def params():
        return [
            (
                jnp.asarray(rng.standard_normal((d, 4 * d)) * scale, jnp.float32),
                jnp.asarray(rng.standard_normal((4 * d, d)) * scale / 2, jnp.float32),
            )
            for _ in range(layers)
        ]

    x = jax.device_put(jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32))
    mon = jaxmon.monitor({"block*": jaxmon.gaussian()})
    example = {f"block{i}": jax.ShapeDtypeStruct((d,), jnp.float32) for i in range(layers)}
    runs = {"plain": [params(), None, _mlp_step(None, d, layers)]}
    runs["monitor"] = [params(), mon.init(example), _mlp_step(mon, d, layers)]
    for r in runs.values():  # compile
        r[0], r[1], loss = r[2](r[0], r[1], x)
        block(loss)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(rounds):
        for k in list(runs) if i % 2 == 0 else list(reversed(runs)):
            r = runs[k]
            t = time.perf_counter()
            r[0], r[1], loss = r[2](r[0], r[1], x)
            block((r[0], r[1], loss))
            times[k].append(time.perf_counter() - t)
    over = statistics.median(
        m / p - 1 for p, m in zip(times["plain"], times["monitor"], strict=True)
    )
    step_flops = 3 * 2 * tokens * 8 * d * d * layers  # forward + backward of the matmuls
    return {
        "t_plain": statistics.median(times["plain"]),
        "overhead": over,
        "floor": 2 * tokens * d * d * layers / step_flops,
        "flops": step_flops,
    }


# --------------------------------------------------------------------------- report


def _fmt_ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{b / a:.2f}x"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any backend, seconds")
    p.add_argument("--out", default=str(RESULTS), help="markdown report to write")
    p.add_argument("--dims", type=int, nargs="+", help="widths (default 1024 4096)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    platform = dev.platform
    torch, tdev = _torch_on(platform)
    if a.smoke:
        dims, rows, peak_n, reps = a.dims or [64, 128], 2048, 256, 2
        store_rows, store_d, step_tokens, rounds = 8192, 64, 512, 2
    else:
        dims, rows, peak_n, reps = a.dims or [1024, 4096], 65536, 8192, 5
        store_rows, store_d, step_tokens, rounds = 1 << 20, 1024, 8192, 6
        if platform == "cpu":  # a CPU run of the full check would take hours
            rows, peak_n, store_rows, step_tokens = 8192, 2048, 1 << 16, 2048
    peaks = {
        "f32": peak(jnp.float32, peak_n, reps),
        "bf16": peak(jnp.bfloat16, peak_n, reps),
    }
    lines = [
        "# Device check (`benchmarks/device_check.py`)",
        "",
        f"Command: `python benchmarks/device_check.py{' --smoke' if a.smoke else ''}` "
        f"({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Device: {dev.device_kind} ({platform}, {jax.local_device_count()} local devices); "
        f"host: {machine()}",
        f"Measured matmul peak ({peak_n}x{peak_n}): f32 {peaks['f32']:.0f} GFLOP/s, bf16 "
        f"{peaks['bf16']:.0f} GFLOP/s. PyTorch peer: "
        + (f"torch {torch.__version__} on {tdev}" if tdev else "none on this device"),
        "",
        "| check | d | input | jaxmon | % of peak | PyTorch | jaxmon speed / PyTorch |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for d in dims:
        for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
            r = check_moments(d, rows, dtype, reps, torch, tdev)
            gf = r["flops"] / r["t"] / 1e9
            tgf = r["flops"] / r["t_torch"] / 1e9 if "t_torch" in r else None
            lines.append(
                f"| moments update | {d} | {name} | {gf:.0f} GFLOP/s | "
                f"{100 * gf / peaks[name]:.0f}% | "
                + (f"{tgf:.0f} GFLOP/s | " if tgf else "n/a | ")
                + _fmt_ratio(r["t"], r.get("t_torch"))
                + " |"
            )
            if "t_syrk" in r:
                faster = "symmetric_product" if r["t_syrk"] < r["t_dot"] else "x.T @ x"
                notes.append(
                    f"d={d} {name}: bare Gram x.T @ x {r['t_dot'] * 1e3:.2f} ms, "
                    f"symmetric_product {r['t_syrk'] * 1e3:.2f} ms: {faster} is faster here"
                )
            else:
                notes.append(f"d={d} {name}: symmetric_product failed ({r['syrk_error']})")
        r = check_scoring(d, rows, reps, torch, tdev)
        gf = r["flops"] / r["t"] / 1e9
        tgf = r["flops"] / r["t_torch"] / 1e9 if "t_torch" in r else None
        pct = 100 * gf / peaks["f32"]
        lines.append(
            f"| Mahalanobis score | {d} | f32 | {gf:.0f} GFLOP/s | {pct:.0f}% | "
            + (f"{tgf:.0f} GFLOP/s | " if tgf else "n/a | ")
            + _fmt_ratio(r["t"], r.get("t_torch"))
            + " |"
        )
    r = check_score_store(store_d, store_rows, min(store_rows, 1 << 17))
    lines.append(
        f"| score_store (local bf16 store, {r['rows']:,} rows) | {store_d} | bf16 | "
        f"{r['rows'] / r['t']:,.0f} rows/s ({r['bytes'] / r['t'] / 1e9:.3f} GB/s, end to end) | "
        f"{r['t_mem'] / r['t']:.3g}x in-memory scoring | n/a | n/a |"
    )
    for d in dims:
        r = check_train_step(d, step_tokens, 4, rounds)
        lines.append(
            f"| train step + monitor (4 MLP blocks, {step_tokens} tokens) | {d} | f32 | "
            f"{100 * r['overhead']:+.1f}% step time (floor {100 * r['floor']:.1f}%) | "
            f"step at {100 * r['flops'] / r['t_plain'] / 1e9 / peaks['f32']:.0f}% | n/a | n/a |"
        )
    lines += ["", "Gram routes (to choose the kernel's on this device):", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", f"Wall time: {time.perf_counter() - t_start:.0f} s.", ""]
    text = "\n".join(lines)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
