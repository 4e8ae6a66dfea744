"""The small MLP both audit examples probe: plain JAX, taps returned as an auxiliary output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

D_IN, HIDDEN, CLASSES = 32, 64, 8
LAYERS = ("layer1", "layer2", "layer3")
# Class centres of the synthetic inputs (fixed, so both examples see the same task).
CENTRES = np.random.default_rng(0).standard_normal((CLASSES, D_IN)) * 1.5


def init_model(key):
    """Weights of a D_IN -> HIDDEN x3 -> CLASSES MLP."""
    sizes = [D_IN, HIDDEN, HIDDEN, HIDDEN, CLASSES]
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros((b,)))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def forward(params, x):
    """Returns ``(logits, taps)``: the plain-JAX tapping convention."""
    taps = {}
    h = x
    for i, (w, b) in enumerate(params[:-1]):
        h = jax.nn.gelu(h @ w + b[None, :])
        taps[f"layer{i + 1}"] = h
    w, b = params[-1]
    return h @ w + b[None, :], taps
