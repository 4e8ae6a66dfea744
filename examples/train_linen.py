"""Train a small Flax Linen transformer LM with optax while jaxmon monitors every block.

The model code knows nothing of jaxmon: ``jaxmon.linen.capture(model, paths=[...])`` taps,
via ``capture_intermediates``, each block's output (its residual stream, ``block_{i}``) and its
MLP's output (``block_{i}/mlp``). One ``jaxmon.monitor`` keeps a Gaussian per tap,
updated inside the jitted train step, padding masked out. At the end held-out text is scored
against random token soup.

Run: ``python examples/train_linen.py --steps 150`` (about half a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmon
import jaxmon.linen as jlinen

sys.path.insert(0, str(Path(__file__).parent))
from train_nnx import PAD, make_chain, markov_batches, parse


class Mlp(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d)(jax.nn.gelu(nn.Dense(4 * self.d)(x)))


class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x), mask=mask)
        return x + Mlp(self.d, name="mlp")(nn.LayerNorm()(x))


class LM(nn.Module):
    vocab: int
    d: int
    layers: int
    heads: int
    seq: int

    @nn.compact
    def __call__(self, tokens, valid):
        n = tokens.shape[1]
        pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
        x = nn.Embed(self.vocab, self.d)(tokens) + pos[None, :n]
        mask = nn.combine_masks(nn.make_causal_mask(tokens), nn.make_attention_mask(valid, valid))
        for i in range(self.layers):
            x = Block(self.d, self.heads, name=f"block_{i}")(x, mask)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def build(args: argparse.Namespace, seed: int = 0):
    """Parameters, optimizer state, monitor state, and the jitted train step."""
    model = LM(args.vocab, args.d, args.layers, args.heads, args.seq)
    tokens = jnp.zeros((args.batch, args.seq), jnp.int32)
    valid = jnp.ones((args.batch, args.seq), bool)
    params = model.init(jax.random.key(seed), tokens, valid)["params"]
    tx = optax.adamw(args.lr)
    opt_state = tx.init(params)
    # fnmatch's "*" also matches "/": "block_*" would tap every submodule. Name the taps.
    paths = [p for i in range(args.layers) for p in (f"block_{i}", f"block_{i}/mlp")]
    forward = jlinen.capture(model, paths=paths)
    monitor = jaxmon.every_k(jaxmon.monitor({"block_*": jaxmon.gaussian()}), args.every_k)

    def loss_and_taps(params, tokens, valid):
        logits, taps = forward({"params": params}, tokens[:, :-1], valid[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        keep = valid[:, 1:]
        loss = jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.maximum(jnp.sum(keep), 1).astype(ce.dtype)
        return loss, taps

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2), static_argnames="monitored")
    def train_step(params, opt_state, mstate, tokens, valid, monitored=True):
        (loss, taps), grads = jax.value_and_grad(loss_and_taps, has_aux=True)(params, tokens, valid)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if monitored:
            mstate = monitor.update(mstate, taps, mask=valid[:, :-1])
        return params, opt_state, mstate, loss

    @jax.jit
    def taps_of(params, tokens, valid):
        return forward({"params": params}, tokens, valid)[1]

    example = jax.eval_shape(taps_of, params, tokens, valid)
    return params, opt_state, monitor, monitor.init(example), train_step, taps_of


def main(argv=None) -> dict[str, tuple[float, float]]:
    args = parse(argv)
    rng = np.random.default_rng(0)
    chain = make_chain(rng, args.vocab)
    data = markov_batches(rng, args.vocab, args.batch, args.seq, chain)
    params, opt_state, monitor, mstate, train_step, taps_of = build(args)
    t0 = time.perf_counter()
    for step in range(args.steps):
        tokens, valid = next(data)
        params, opt_state, mstate, loss = train_step(params, opt_state, mstate, tokens, valid)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {float(loss):.3f}")
    print(
        f"{args.steps} steps in {time.perf_counter() - t0:.1f}s; rows per tap:",
        sorted(set(jaxmon.num_rows(mstate).values())),
    )
    fitted = monitor.finalize(mstate)
    tokens, valid = next(data)
    m = valid[:, :-1]
    soup = jnp.where(valid, jnp.asarray(rng.integers(1, args.vocab, tokens.shape)), PAD)
    s_clean = monitor.score(fitted, taps_of(params, tokens[:, :-1], m), mask=m)
    s_odd = monitor.score(fitted, taps_of(params, soup[:, :-1], m), mask=m)
    out = {}
    print(f"{'tap':22s} {'clean':>10s} {'random':>10s}   (mean squared Mahalanobis, valid tokens)")
    for k in sorted(s_clean):
        a = float(jnp.sum(s_clean[k]) / jnp.sum(m))
        b = float(jnp.sum(s_odd[k]) / jnp.sum(m))
        out[k] = (a, b)
        print(f"{k:22s} {a:10.1f} {b:10.1f}")
    return out


if __name__ == "__main__":
    main()
