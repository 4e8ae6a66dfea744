"""NNX taps (sown and zero-edit) against activations computed by hand in float64 numpy."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmon
import jaxmon.nnx as jnnx

D, L = 4, 2


class Block(nnx.Module):
    def __init__(self, rngs):
        self.mlp = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.mlp(x))
        self.sow(jnnx.Tap, "mlp_out", h)
        return x + h


class Model(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(L)])
        self.head = nnx.Linear(D, 1, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)[..., 0]


def by_hand(model, x):
    """Every block's MLP output, its Linear's output and the block output, in float64."""
    h = np.asarray(x, np.float64)
    taps = {}
    for i, b in enumerate(model.blocks):
        k = np.asarray(b.mlp.kernel[...], np.float64)
        bias = np.asarray(b.mlp.bias[...], np.float64)
        lin = h @ k + bias
        m = np.tanh(lin)
        taps[f"blocks/{i}/mlp"] = lin
        taps[f"blocks/{i}/mlp_out"] = m
        h = h + m
        taps[f"blocks/{i}"] = h
    return taps


def _xs(rng, n=3):
    return [jnp.asarray(rng.standard_normal((2, 5, D)), jnp.float32) for _ in range(n)]


def test_sown_and_zero_edit_taps_equal_hand_computed_without_warnings():
    model = Model(nnx.Rngs(0))
    x = _xs(np.random.default_rng(0), 1)[0]
    ref = by_hand(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warnings from the capture path
        _, sown = jnnx.capture(model)(x)
        _, both = jnnx.capture(model, paths=["blocks/*"])(x)
        _, jitted = nnx.jit(lambda m, x: jnnx.capture(m, paths=["blocks/?/mlp"])(x))(model, x)
    assert sorted(sown) == ["blocks/0/mlp_out", "blocks/1/mlp_out"]
    assert set(both) == set(ref)
    assert sorted(jitted) == [
        "blocks/0/mlp",
        "blocks/0/mlp_out",
        "blocks/1/mlp",
        "blocks/1/mlp_out",
    ]
    for k, v in both.items():
        np.testing.assert_allclose(np.asarray(v), ref[k], rtol=1e-5, atol=1e-6)
    for k, v in jitted.items():
        np.testing.assert_allclose(np.asarray(v), ref[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="matched no module output"):
        jnnx.capture(model, paths=["nope/*"])(x)


def test_monitor_in_jitted_nnx_train_step_compiles_once_and_matches_numpy():
    rng = np.random.default_rng(1)
    model = Model(nnx.Rngs(1))
    opt = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
    mon = jaxmon.monitor({"blocks/*/mlp_out": jaxmon.gaussian(), "blocks/?": jaxmon.gaussian()})
    xs = _xs(rng)
    masks = [jnp.asarray(rng.random((2, 5)) < 0.7) for _ in xs]
    graphdef, state = nnx.split((model, opt))
    example = nnx.eval_shape(lambda m, x: jnnx.capture(m, paths=["blocks/?"])(x)[1], model, xs[0])
    mstate = mon.init(example)
    traces = []

    @jax.jit
    def step(state, mstate, x, mask):
        traces.append(1)
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(model):
            y, taps = jnnx.capture(model, paths=["blocks/?"])(x)
            return jnp.sum(jnp.where(mask, y, 0.0) ** 2) / jnp.sum(mask).astype(jnp.float32), taps

        (loss, taps), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), mon.update(mstate, taps, mask=mask), loss

    refs = []
    for x, m in zip(xs, masks, strict=True):
        model, _ = nnx.merge(graphdef, state)
        refs.append({k: v[np.asarray(m)] for k, v in by_hand(model, x).items()})
        state, mstate, _ = step(state, mstate, x, m)
    assert len(traces) == 1
    fitted = mon.finalize(mstate)
    assert set(fitted) == {f"blocks/{i}{s}" for i in range(L) for s in ("", "/mlp_out")}
    for k, f in fitted.items():
        rows = np.concatenate([r[k] for r in refs])
        assert jaxmon.num_rows(mstate[k]) == len(rows)
        np.testing.assert_allclose(np.asarray(f.mean), rows.mean(0), rtol=1e-4, atol=1e-5)
        cov = np.cov(rows, rowvar=False, bias=True)
        np.testing.assert_allclose(np.asarray(f.covariance), cov, rtol=1e-3, atol=1e-5)


def test_taps_are_not_differentiated():
    model = Model(nnx.Rngs(2))
    x = _xs(np.random.default_rng(2), 1)[0]

    def taps_loss(m):
        _, taps = jnnx.capture(m, paths=["blocks/*"])(x)
        return sum(jnp.sum(t) for t in taps.values())

    grads = nnx.grad(taps_loss)(model)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
    with warnings.catch_warnings():
        # The reference runs the model bare: its sow outside nnx.capture is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        g_plain = nnx.grad(lambda m: jnp.sum(m(x)))(model)
    g_cap = nnx.grad(lambda m: jnp.sum(jnnx.capture(m)(x)[0]))(model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_plain, g_cap)


class ScanModel(nnx.Module):
    """Blocks stacked with nnx.vmap and applied with nnx.scan (scan over layers)."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def test_nnx_scan_taps_are_stacked_and_split_per_layer_by_the_monitor():
    model = ScanModel(nnx.Rngs(3))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, D)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 5)) < 0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, taps = jnnx.capture(model)(x)
    assert taps["blocks/mlp_out"].shape == (L, 2, 5, D)
    h = np.asarray(x, np.float64)
    mon = jaxmon.monitor(
        {"blocks/*/mlp_out": jaxmon.gaussian()},
        stacked={"blocks/mlp_out": "blocks/{i}/mlp_out"},
    )
    fitted = mon.finalize(mon.update(mon.init(taps), taps, mask=mask))
    for i in range(L):
        k = np.asarray(model.blocks.mlp.kernel[...][i], np.float64)
        b = np.asarray(model.blocks.mlp.bias[...][i], np.float64)
        m = np.tanh(h @ k + b)
        np.testing.assert_allclose(np.asarray(taps["blocks/mlp_out"][i]), m, rtol=1e-5, atol=1e-6)
        rows = m[np.asarray(mask)]
        f = fitted[f"blocks/{i}/mlp_out"]
        np.testing.assert_allclose(np.asarray(f.mean), rows.mean(0), rtol=1e-4, atol=1e-5)
        h = h + m
