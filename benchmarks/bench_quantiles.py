"""jaxmon.quantiles against Apache DataSketches KLL: update values/s and accuracy, same streams.

Run:  .venv/bin/python benchmarks/bench_quantiles.py [--quick] [--rounds R] [--n N]

Both sketches see the same float32 streams (normal, Pareto(1) heavy tail, sorted normal,
many duplicates), in batches of ``--batch`` values, in alternating rounds in this process (the
machine is shared and its speed swings minute to minute: read the ratios). jaxmon's batches
are already device arrays (on CPU the "device" is host memory); a second column includes the
``jnp.asarray`` copy of each numpy batch. Accuracy is measured against exact numpy quantiles:
the largest rank error over 999 probes and the largest relative value error at tail quantiles
(0.99, 0.999, 0.9999). A histogram update is a scatter, not matrix arithmetic, so a matmul
peak fraction does not apply.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxmon

try:
    from datasketches import kll_floats_sketch
except ImportError as err:  # pragma: no cover
    raise SystemExit(f"bench_quantiles needs the datasketches package: {err}") from None


def streams(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    x = rng.standard_normal(n)
    return {
        "normal": x,
        "pareto(1)": rng.pareto(1.0, n),
        "sorted normal": np.sort(x),
        "duplicates": rng.integers(0, 50, n) * 0.5,
    }


def _errors(est_quantile, est_rank, x: np.ndarray) -> tuple[float, float]:
    xs = np.sort(x.astype(np.float64))
    qs = np.linspace(0.001, 0.999, 999)
    probes = np.quantile(xs, qs, method="lower")
    exact_rank = np.searchsorted(xs, probes, side="right") / xs.size
    rank_err = float(np.max(np.abs(est_rank(probes) - exact_rank)))
    tail = np.array([0.99, 0.999, 0.9999])
    exact_tail = np.quantile(xs, tail, method="lower")
    rel = np.abs(est_quantile(tail) - exact_tail) / np.maximum(np.abs(exact_tail), 1e-30)
    return rank_err, float(np.max(rel))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=1 << 22, help="values per stream")
    ap.add_argument("--batch", type=int, default=1 << 18, help="values per update call")
    ap.add_argument("--k", type=int, default=200, help="KLL k (200: ~1.65%% rank error)")
    ap.add_argument("--relative-accuracy", type=float, default=0.01)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.n, args.batch = 2, 1 << 16, 1 << 14

    est = jaxmon.quantiles(relative_accuracy=args.relative_accuracy)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    rng = np.random.default_rng(0)
    data = {k: v.astype(np.float32) for k, v in streams(rng, args.n).items()}
    batches = {k: np.split(v, args.n // args.batch) for k, v in data.items()}
    dev = {k: [jnp.asarray(b) for b in v] for k, v in batches.items()}

    def run_jaxmon(name, *, copy):
        s = est.init(scalar)
        for b in batches[name] if copy else dev[name]:
            s = est.update(s, jnp.asarray(b) if copy else b)
        return jax.block_until_ready(s)

    def run_kll(name):
        sk = kll_floats_sketch(args.k)
        for b in batches[name]:
            sk.update(b)
        return sk

    for name in data:  # compile and warm up
        run_jaxmon(name, copy=False)
        run_kll(name)

    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()}")
    print(
        f"versions: jax {jax.__version__}, numpy {np.__version__}, "
        f"datasketches {importlib.metadata.version('datasketches')}, "
        f"python {platform.python_version()}"
    )
    print(
        f"n = {args.n} values per stream, batch {args.batch}, {args.rounds} alternating rounds; "
        f"jaxmon relative_accuracy={args.relative_accuracy}, KLL k={args.k}"
    )
    header = (
        "| stream | jaxmon Mval/s | jaxmon+copy Mval/s | KLL Mval/s | speed ratio (median) "
        "| rank err jaxmon | rank err KLL | tail rel err jaxmon | tail rel err KLL |"
    )
    print(header)
    print("|" + "---|" * 9)
    for name, x in data.items():
        t_j, t_c, t_k = [], [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            s = run_jaxmon(name, copy=False)
            t_j.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sk = run_kll(name)
            t_k.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_jaxmon(name, copy=True)
            t_c.append(time.perf_counter() - t0)
        ratio = statistics.median(k / j for k, j in zip(t_k, t_j, strict=True))
        f = est.finalize(s)
        ej = _errors(
            lambda q, f=f: np.asarray(jaxmon.quantile(f, jnp.asarray(q, jnp.float32)), np.float64),
            lambda v, f=f: np.asarray(
                jaxmon.quantile_rank(f, jnp.asarray(v, jnp.float32)), np.float64
            ),
            x,
        )
        ek = _errors(
            lambda q, sk=sk: np.array([sk.get_quantile(float(v)) for v in q]),
            lambda v, sk=sk: np.array([sk.get_rank(float(u)) for u in v]),
            x,
        )
        mv = lambda ts: args.n / statistics.median(ts) / 1e6
        print(
            f"| {name} | {mv(t_j):.1f} | {mv(t_c):.1f} | {mv(t_k):.1f} | {ratio:.1f}x "
            f"| {ej[0]:.2e} | {ek[0]:.2e} | {ej[1]:.2e} | {ek[1]:.2e} |"
        )


if __name__ == "__main__":
    main()
