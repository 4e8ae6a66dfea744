"""Audit a model edit: which layers moved, and by how much (issue 6).

A small MLP classifier (plain JAX, trained here) is edited two ways, and the same probe inputs
run through the model before and after each edit. A monitor fits a Gaussian per layer and a
transition estimator between consecutive layers on each model's activations;
``jaxmon.compare(before, after)`` then reports per tap how far the activations moved (squared
Fréchet distance, KL) and how much the layer-to-layer map changed.

Edits audited:

* ``none``: the same model on a second probe batch (the noise floor of every statistic);
* ``rank_one_layer2``: a rank-one change of the second layer's weights (a ROME-style localised
  edit). ``layer1`` cannot move (distance exactly 0); ``layer2`` and everything after it does.
  Of the transitions, ``layer1->layer2`` changes most: it is the edited map. ``layer2->layer3``
  is the same function as before, yet its *linear fit* moves too (less), because that function
  is nonlinear and is now fitted over a shifted input distribution: transition comparisons
  localise an edit by which map moved most, not by an exact zero;
* ``finetune_relabel``: 100 steps of fine-tuning that relabel class 0 as class 1 (a targeted
  behaviour change); every layer may move, the transitions show where most.

Run: ``python examples/audit_edit.py`` (about 20 s on two CPU cores).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _toy_mlp import CENTRES, CLASSES, D_IN, HIDDEN, LAYERS, forward, init_model

import jaxmon

N_PROBE = 3000
COLUMNS = ("kl_ab", "mean_shift", "cov_change", "residual_kl_ab")


def sample(rng, n):
    y = rng.integers(0, CLASSES, n)
    return (CENTRES[y] + rng.standard_normal((n, D_IN))).astype(np.float32), y


def train(params, rng, steps, *, lr=3e-3, relabel=None):
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss(p):
            logits, _ = forward(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    for _ in range(steps):
        x, y = sample(rng, 256)
        if relabel is not None:
            y = np.where(y == relabel[0], relabel[1], y)
        params, opt = step(params, opt, jnp.asarray(x), jnp.asarray(y))
    return params


def accuracy(params, x, y, cls=None):
    pred = np.asarray(jnp.argmax(forward(params, jnp.asarray(x))[0], -1))
    sel = np.ones(len(y), bool) if cls is None else y == cls
    return float(np.mean(pred[sel] == y[sel]))


def main() -> None:
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    base = train(init_model(jax.random.key(0)), rng, 200)

    # Rank-one edit of layer 2: w ← w + u vᵀ with v a direction layer-1 activations use.
    w2, b2 = base[1]
    u = jnp.asarray(np.random.default_rng(2).standard_normal(HIDDEN), jnp.float32)
    v = jnp.asarray(np.random.default_rng(3).standard_normal(HIDDEN), jnp.float32)
    scale = 0.5 * jnp.linalg.norm(w2) / (jnp.linalg.norm(u) * jnp.linalg.norm(v))
    rank_one = [base[0], (w2 + scale * jnp.outer(u, v), b2), *base[2:]]
    finetuned = train(base, rng, 100, lr=1e-3, relabel=(0, 1))

    mon = jaxmon.monitor(
        {
            "layer*": jaxmon.gaussian(shrinkage="ledoit_wolf"),
            ("layer1", "layer2"): jaxmon.transition(ridge=1e-2),
            ("layer2", "layer3"): jaxmon.transition(ridge=1e-2),
        }
    )
    example = {k: jax.ShapeDtypeStruct((HIDDEN,), jnp.float32) for k in LAYERS}
    taps_of = jax.jit(lambda p, x: forward(p, x)[1])

    def fit(params, x):
        state = mon.init(example)
        for chunk in np.array_split(x, 3):
            state = mon.update(state, taps_of(params, jnp.asarray(chunk)))
        return mon.finalize(state)

    probe, probe_y = sample(rng, N_PROBE)
    probe2, _ = sample(rng, N_PROBE)
    before = fit(base, probe)
    edits = {
        "none": (base, probe2),
        "rank_one_layer2": (rank_one, probe),
        "finetune_relabel": (finetuned, probe),
    }
    print(f"jaxmon {jaxmon.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}")
    print(f"model: MLP {D_IN}->{HIDDEN}x3->{CLASSES}; {N_PROBE} probe inputs\n")
    for name, (params, x) in edits.items():
        acc = accuracy(params, probe, probe_y)
        acc0 = accuracy(params, probe, probe_y, cls=0)
        print(f"== edit: {name}  (probe accuracy {acc:.3f}, on class 0: {acc0:.3f})")
        res = jaxmon.compare(before, fit(params, x))
        taps_b, taps_a = taps_of(base, jnp.asarray(probe)), taps_of(params, jnp.asarray(x))
        for layer in LAYERS:
            # Permutation p-value of the Fréchet distance (600 probe rows a side, 99 draws).
            _, p = jaxmon.permutation_test(
                taps_b[layer][:600], taps_a[layer][:600], num_permutations=99, seed=0
            )
            res[layer] = res[layer]._replace(p_value=p, test="permutation (99)")
        print(jaxmon.comparison_table(res, columns=COLUMNS, digits=3))
        print()
    print(f"total time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
