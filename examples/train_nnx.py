"""Train a small Flax NNX transformer LM with optax while jaxmon monitors every block.

Every block sows its residual stream (``blocks/{i}/resid``) and MLP output
(``blocks/{i}/mlp_out``) as ``jaxmon.nnx.Tap``; one ``jaxmon.monitor`` keeps a Gaussian per tap,
updated inside the jitted train step (no host sync), with padding tokens masked out. At the
end the monitor is finalized and scores held-out text against random token soup: the anomalous
input should score higher at every tap.

Run: ``python examples/train_nnx.py --steps 150`` (about half a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxmon
import jaxmon.nnx as jnnx

PAD = 0


class Block(nnx.Module):
    """Pre-LayerNorm transformer block; sows its MLP output and residual stream."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        h = self.down(jax.nn.gelu(self.up(self.ln2(x))))
        self.sow(jnnx.Tap, "mlp_out", h)
        x = x + h
        self.sow(jnnx.Tap, "resid", x)
        return x


class LM(nnx.Module):
    """A decoder-only language model."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq, d)) * 0.02)
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array, valid: jax.Array) -> jax.Array:
        n = tokens.shape[1]
        x = self.embed(tokens) + self.pos[...][None, :n]
        mask = nnx.combine_masks(
            nnx.make_causal_mask(tokens), nnx.make_attention_mask(valid, valid)
        )
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def markov_batches(rng: np.random.Generator, vocab: int, batch: int, seq: int, trans: np.ndarray):
    """Endless padded batches from a fixed sparse Markov chain (token 0 is padding)."""
    while True:
        toks = np.zeros((batch, seq + 1), np.int32)
        lengths = rng.integers(seq // 2, seq + 2, batch)
        toks[:, 0] = rng.integers(1, vocab, batch)
        for t in range(1, seq + 1):
            p = trans[toks[:, t - 1]]
            toks[:, t] = (p.cumsum(1) > rng.random((batch, 1))).argmax(1)
        valid = np.arange(seq + 1)[None, :] < lengths[:, None]
        toks[~valid] = PAD
        yield jnp.asarray(toks), jnp.asarray(valid)


def make_chain(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """Each token has three likely successors (never the padding token)."""
    trans = np.full((vocab, vocab), 1e-3)
    for a in range(vocab):
        trans[a, rng.choice(np.arange(1, vocab), 3, replace=False)] = 1.0
    trans[:, PAD] = 0.0
    return trans / trans.sum(1, keepdims=True)


def build(args: argparse.Namespace, seed: int = 0):
    """Model, optimizer, monitor, and the jitted train step."""
    model = LM(args.vocab, args.d, args.layers, args.heads, args.seq, rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adamw(args.lr), wrt=nnx.Param)
    monitor = jaxmon.every_k(jaxmon.monitor({args.taps: jaxmon.gaussian()}), args.every_k)
    graphdef, state = nnx.split((model, opt))

    def forward(model, tokens, valid):
        return jnnx.capture(model)(tokens, valid)

    def loss_and_taps(model, tokens, valid):
        logits, taps = forward(model, tokens[:, :-1], valid[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        keep = valid[:, 1:]
        loss = jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.maximum(jnp.sum(keep), 1).astype(ce.dtype)
        return loss, taps

    @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames="monitored")
    def train_step(state, mstate, tokens, valid, monitored=True):
        model, opt = nnx.merge(graphdef, state)
        (loss, taps), grads = nnx.value_and_grad(loss_and_taps, has_aux=True)(model, tokens, valid)
        opt.update(model, grads)
        if monitored:
            mstate = monitor.update(mstate, taps, mask=valid[:, :-1])
        return nnx.state((model, opt)), mstate, loss

    @jax.jit
    def taps_of(state, tokens, valid):
        model, _ = nnx.merge(graphdef, state)
        return forward(model, tokens, valid)[1]

    example = jax.eval_shape(
        taps_of,
        state,
        jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32),
        jax.ShapeDtypeStruct((args.batch, args.seq), jnp.bool_),
    )
    return state, monitor, monitor.init(example), train_step, taps_of


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--every-k", type=int, default=1)
    p.add_argument("--taps", default="blocks/*", help="glob over tap names to monitor")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, tuple[float, float]]:
    args = parse(argv)
    rng = np.random.default_rng(0)
    chain = make_chain(rng, args.vocab)
    data = markov_batches(rng, args.vocab, args.batch, args.seq, chain)
    state, monitor, mstate, train_step, taps_of = build(args)
    t0 = time.perf_counter()
    for step in range(args.steps):
        tokens, valid = next(data)
        state, mstate, loss = train_step(state, mstate, tokens, valid)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {float(loss):.3f}")
    print(
        f"{args.steps} steps in {time.perf_counter() - t0:.1f}s; rows per tap:",
        sorted(set(jaxmon.num_rows(mstate).values())),
    )
    fitted = monitor.finalize(mstate)
    tokens, valid = next(data)
    clean = taps_of(state, tokens[:, :-1], valid[:, :-1])
    soup = jnp.where(valid, jnp.asarray(rng.integers(1, args.vocab, tokens.shape)), PAD)
    odd = taps_of(state, soup[:, :-1], valid[:, :-1])
    m = valid[:, :-1]
    s_clean = monitor.score(fitted, clean, mask=m)
    s_odd = monitor.score(fitted, odd, mask=m)
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
