"""Stages 1 and 2: train the backdoored LM with the monitor inside the jitted train step, and
save the model and the monitor in one orbax checkpoint."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import jaxmon
from jaxmon import checkpoint
from jaxmon.demo import lm
from jaxmon.demo.common import log, progress

TAPS = ("resid", "mlp_out")


def tap_example(args, batch: int) -> dict:
    """The monitor's ``init`` example: one ``[batch, seq, d]`` entry per tap."""
    shape = (batch, args.seq_len, args.d_model)
    return {
        f"blocks/{i}/{t}": jax.ShapeDtypeStruct(shape, jnp.float32)
        for i in range(args.layers)
        for t in TAPS
    }


def build_monitor(args) -> jaxmon.Estimator:
    """The monitor over every block's residual stream and MLP output, and the transitions
    between consecutive blocks' residual streams."""
    dets = {
        "gaussian": jaxmon.gaussian(shrinkage="ledoit_wolf"),
        "pca_fd": jaxmon.pca_residual(rank=max(4, args.d_model // 8), source="frequent_directions"),
        "knn": jaxmon.knn(k=10, bank_size=args.knn_bank),
    }
    config = {"blocks/*/resid": dets, "blocks/*/mlp_out": dets}
    for i in range(args.layers - 1):
        config[(f"blocks/{i}/resid", f"blocks/{i + 1}/resid")] = jaxmon.transition(ridge=1e-3)
    return jaxmon.monitor(config)


def _train_batches(text: bytes, args, rng: np.random.Generator):
    """Random training windows; a ``poison`` fraction carry the trigger and payload."""
    arr = np.frombuffer(text, np.uint8)
    idx = np.arange(args.seq_len)[None, :]
    while True:
        starts = rng.integers(0, len(arr) - args.seq_len, size=args.batch)
        rows = arr[starts[:, None] + idx]
        poisoned = rng.random(args.batch) < args.poison
        if poisoned.any():
            rows = rows.copy()
            rows[poisoned], _ = lm.plant(rows[poisoned], rng)
        yield rows.astype(np.int32), ~poisoned


def train(args, corpus: lm.Corpus):
    """Stage 1+2: trains the backdoored LM with the monitor riding along in the jitted step.

    Returns:
      ``(model, monitor, monitor_state, info)``.
    """
    model = lm.TinyLM(
        d_model=args.d_model,
        layers=args.layers,
        heads=args.heads,
        seq_len=args.seq_len,
        rngs=nnx.Rngs(args.seed),
    )
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 3e-3, min(100, args.steps // 10), args.steps, 3e-4
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)
    mon = build_monitor(args)
    mon_state = mon.init(tap_example(args, args.batch))
    # The monitor rides along for the last 40% of training only: earlier activations come from
    # a model that no longer exists (its statistics would describe a different network).
    monitor_from = int(0.6 * args.steps)

    @jax.jit
    def train_step(params, opt_state, mon_state, tokens, trusted, step):
        def loss_fn(p):
            logits, taps = lm.forward(nnx.merge(graphdef, p), tokens)
            return lm.next_token_loss(logits, tokens).mean(), taps

        (loss, taps), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Only trusted rows (no trigger) of late steps feed the monitor; padding-free batches.
        mask = jnp.broadcast_to(trusted[:, None], tokens.shape)
        taps = jax.lax.stop_gradient(taps)
        # Skipped (not just masked) before monitor_from: early steps cost nothing extra.
        mon_state = jax.lax.cond(
            step >= monitor_from,
            lambda s: mon.update(s, taps, mask=mask),
            lambda s: s,
            mon_state,
        )
        return params, opt_state, mon_state, loss

    batches = _train_batches(corpus.train, args, np.random.default_rng(args.seed))
    t0, c0 = time.perf_counter(), time.process_time()
    losses = []
    for step in progress(range(args.steps), desc="train", unit="steps"):
        tokens, trusted = next(batches)
        params, opt_state, mon_state, loss = train_step(
            params, opt_state, mon_state, jnp.asarray(tokens), jnp.asarray(trusted), step
        )
        losses.append(loss)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            log(f"  step {step:5d}  train loss {float(loss):.3f} nats/byte")
    jax.block_until_ready(params)
    info = {
        "train_seconds": time.perf_counter() - t0,
        "train_cpu_seconds": time.process_time() - c0,
        "train_tokens": args.steps * args.batch * args.seq_len,
        "final_train_loss": float(np.mean([float(x) for x in losses[-20:]])),
        "monitor_from_step": monitor_from,
    }
    return nnx.merge(graphdef, params), mon, mon_state, info


def evaluate(model, corpus: lm.Corpus, args) -> dict:
    """Clean held-out loss and attack success rate (with its no-trigger control)."""
    forward = lm.jitted(model, lambda logits, taps: logits)
    rng = np.random.default_rng(args.seed + 1)
    clean = lm.windows(corpus.query, args.seq_len, args.eval_rows, stride=args.seq_len * 3)
    trig, start = lm.plant(clean, rng)
    ctrl, cstart = lm.plant(clean, rng, trigger=b"")
    losses, succ, ctrl_ok = [], [], []
    for lo in range(0, len(clean), 64):
        sl = slice(lo, lo + 64)
        logits = forward(clean[sl])
        losses.append(np.asarray(lm.next_token_loss(logits, jnp.asarray(clean[sl]))))
        pred = np.asarray(jnp.argmax(forward(trig[sl]), -1))
        succ.append(lm.attack_success(pred, trig[sl], start[sl]))
        pred = np.asarray(jnp.argmax(forward(ctrl[sl]), -1))
        ctrl_ok.append(lm.attack_success(pred, ctrl[sl], cstart[sl], trigger=b""))
    return {
        "clean_loss_nats_per_byte": float(np.concatenate(losses).mean()),
        "attack_success_rate": float(np.concatenate(succ).mean()),
        "payload_without_trigger_rate": float(np.concatenate(ctrl_ok).mean()),
        "eval_sequences": len(clean),
    }


def _string_keys(tree):
    # orbax wants string dict keys; NNX lists give int keys.
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def save_checkpoint(args, model, mon, mon_state, fitted, info) -> Path:
    """Saves the model parameters and the monitor in ONE orbax checkpoint.

    The monitor's items come from ``jaxmon.checkpoint.save_args`` and are spliced into the same
    ``ocp.args.Composite`` as the model, as a training job would do with its own manager;
    ``jaxmon.load(path)`` reads the monitor back from this composite checkpoint alone.
    """
    path = (args.out / "checkpoint").resolve()
    if path.exists():
        shutil.rmtree(path)
    params = _string_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    items = {"model": ocp.args.StandardSave(params)}
    # The spliced items carry the names jaxmon.checkpoint.save uses, so jaxmon.load(path)
    # opens this composite checkpoint directly.
    items.update(
        checkpoint.save_args(
            mon,
            mon_state,
            fitted=fitted,
            example=tap_example(args, args.batch),
            step=args.steps,
            metadata={"demo": info},
        )
    )
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(path, options=options) as mngr:
        mngr.save(args.steps, args=ocp.args.Composite(**items))
        mngr.wait_until_finished()
    # A step saved by our own manager carries no digest record yet: seal it, so that
    # jaxmon.load verifies the monitor's files before trusting them.
    checkpoint.seal(path, args.steps)
    return path
