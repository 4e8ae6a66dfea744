"""Train-step cost of a jaxmon monitor: the NNX example LM with and without it.

Measures, in one process and in alternating rounds (the machine's speed drifts, and it is
shared), the jitted train step of ``examples/train_nnx.py`` (a pre-LN transformer LM, AdamW,
state donated) at d = 256:

* ``plain``: the train step without a monitor (taps are still captured: free under jit);
* ``gram floor (4)`` / ``gram floor (8)``: the same step plus only ``acc + xᵀx`` per tap (one
  float32 Gram of the tap's ``[tokens, d]`` rows, no mask, no mean, nothing else): what the
  Gram products alone cost inside this step, measured;
* ``resid`` (4 taps) / ``resid+mlp`` (8 taps): plus ``every_k(monitor({pattern: gaussian()}), 1)``
  updated on every step, as ``train_nnx.py`` builds it: the exact update (masked padding,
  non-finite rows excluded and counted, batch mean and shift, Gram, Σy and Σ|y|²y, the exact
  fold into the state).

The *arithmetic floor* of a config is its Gram flops (2·tokens·d² per tap) over the plain
step's flops (XLA's cost analysis of the compiled step). Issue 15's target: overhead <= that
floor + 2 points with 4 and 8 taps. Overheads are medians over rounds of t(config)/t(plain) − 1.

Run: ``python benchmarks/bench_train_step.py`` (``--quick`` for a seconds-long smoke test).
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
import train_nnx
from _common import machine
from _peaks import Peaks

import jaxmon
import jaxmon.nnx as jnnx


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _gram_floor(acc: dict, taps: dict, mask) -> dict:
    """``acc + xᵀx`` per monitored tap: the Gram products and nothing else."""
    out = {}
    for k, a in acc.items():
        x = taps[k].reshape(-1, taps[k].shape[-1])
        out[k] = a + jax.lax.dot_general(
            x, x, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps-per-round", type=int, default=5)
    a = p.parse_args(argv)
    if a.quick:
        a.d, a.layers, a.seq, a.batch, a.rounds, a.steps_per_round = 64, 2, 32, 4, 3, 2
    print(machine())
    peaks = Peaks()
    args = train_nnx.parse(
        [
            f"--d={a.d}",
            f"--layers={a.layers}",
            f"--seq={a.seq}",
            f"--batch={a.batch}",
            "--heads=4",
            "--vocab=256",
        ]
    )
    model = train_nnx.LM(args.vocab, args.d, args.layers, args.heads, args.seq, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(args.lr), wrt=nnx.Param)
    graphdef, state0 = nnx.split((model, opt))

    def loss_and_taps(model, tokens, valid):  # as train_nnx.build
        logits, taps = jnnx.capture(model)(tokens[:, :-1], valid[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        keep = valid[:, 1:]
        denom = jnp.maximum(jnp.sum(keep), 1).astype(ce.dtype)
        return jnp.sum(jnp.where(keep, ce, 0.0)) / denom, taps

    def make_step(update):
        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(state, mstate, tokens, valid):
            model, opt = nnx.merge(graphdef, state)
            grad_fn = nnx.value_and_grad(loss_and_taps, has_aux=True)
            (loss, taps), grads = grad_fn(model, tokens, valid)
            opt.update(model, grads)
            if update is not None:
                mstate = update(mstate, taps, valid[:, :-1])
            return nnx.state((model, opt)), mstate, loss

        return step

    rng = np.random.default_rng(0)
    chain = train_nnx.make_chain(rng, 256)
    data = train_nnx.markov_batches(rng, 256, a.batch, a.seq, chain)
    batches = [next(data) for _ in range(4)]
    example = jax.eval_shape(
        lambda st, t, v: loss_and_taps(nnx.merge(graphdef, st)[0], t, v)[1], state0, *batches[0]
    )
    patterns = {"4": "blocks/*/resid", "8": "blocks/*"}
    configs = {"plain": (None, None, 0)}
    for n, pattern in patterns.items():
        keys = [k for k in example if fnmatch.fnmatchcase(k, pattern)]
        zeros = {k: jnp.zeros((a.d, a.d), jnp.float32) for k in keys}
        configs[f"gram floor ({len(keys)})"] = (_gram_floor, zeros, len(keys))
        mon = jaxmon.every_k(jaxmon.monitor({pattern: jaxmon.gaussian()}), 1)
        name = "resid" if n == "4" else "resid+mlp"
        mstate = mon.init({k: example[k] for k in keys})
        configs[name] = (
            lambda m, taps, mask, mon=mon: mon.update(m, taps, mask=mask),
            mstate,
            len(keys),
        )

    runners, info = {}, {}
    flops_plain = None
    for name, (update, mstate, ntaps) in configs.items():
        st = jax.tree.map(jnp.copy, state0)
        step = make_step(update)
        if name == "plain":
            cost = step.lower(st, mstate, *batches[0]).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            flops_plain = float(cost.get("flops", float("nan")))
        holder = {"s": st, "m": jax.tree.map(jnp.copy, mstate)}
        info[name] = {"state_bytes": _nbytes(mstate) if mstate is not None else 0, "taps": ntaps}

        def run(holder=holder, step=step):
            for i in range(a.steps_per_round):
                tokens, valid = batches[i % len(batches)]
                holder["s"], holder["m"], loss = step(holder["s"], holder["m"], tokens, valid)
            return loss

        runners[name] = run

    for f in runners.values():  # compile + warm up
        jax.block_until_ready(f())
    times = {k: [] for k in runners}
    for r in range(a.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for k in order:
            t = time.perf_counter()
            jax.block_until_ready(runners[k]())
            times[k].append((time.perf_counter() - t) / a.steps_per_round)
    peaks.sample()

    tokens_per_step = a.batch * a.seq
    params = sum(x.size for x in jax.tree.leaves(state0))
    print(peaks.line())
    print(
        f"\nNNX LM d={a.d}, layers={a.layers}, seq={a.seq}, batch={a.batch} "
        f"({tokens_per_step} tokens/step), {a.rounds} alternating rounds x "
        f"{a.steps_per_round} steps; state leaves (model+AdamW): {params / 1e6:.1f}M; "
        f"plain step {flops_plain / 1e9:.2f} GFLOP (XLA cost analysis)"
    )
    print(
        f"{'config':16s} {'taps':>4s} {'ms/step':>8s} {'overhead':>9s} {'(IQR)':>17s} "
        f"{'arith. floor':>12s} {'monitor state':>14s}"
    )
    base_t = times["plain"]
    for k in runners:
        med = statistics.median(times[k]) * 1e3
        ratios = sorted(t / b for t, b in zip(times[k], base_t, strict=True))
        q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
        ntaps = info[k]["taps"]
        floor = 100 * ntaps * 2 * tokens_per_step * a.d**2 / flops_plain
        st = info[k]["state_bytes"] / 2**20
        print(
            f"{k:16s} {ntaps:4d} {med:8.2f} {100 * (q2 - 1):+8.1f}% "
            f"[{100 * (q1 - 1):+5.1f}, {100 * (q3 - 1):+5.1f}]% {floor:11.1f}% {st:10.2f} MiB"
        )
    floors = [k for k in runners if "floor" in k]
    for mon_k, floor_k in zip(("resid", "resid+mlp"), floors, strict=True):
        excess = statistics.median(t / f for t, f in zip(times[mon_k], times[floor_k], strict=True))
        print(
            f"{mon_k}: {100 * (excess - 1):+.1f}% step time over '{floor_k}' (median of per-round "
            "ratios): what the exact update adds beyond the Gram products"
        )
    print(
        "overhead = median over rounds of t(config)/t(plain) - 1 (same process, alternating); "
        "arith. floor = Gram flops / plain-step flops. The machine is shared and noisy."
    )


if __name__ == "__main__":
    main()
