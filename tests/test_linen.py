"""Linen taps (capture_intermediates and intercept_methods) against float64 numpy."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxmon
import jaxmon.linen as jlinen

D, L = 4, 2


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(D)(x))
        return x + h


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(L):
            x = Block()(x)
        return nn.Dense(1)(x)[..., 0]


def by_hand(params, x):
    h = np.asarray(x, np.float64)
    taps = {}
    for i in range(L):
        p = params[f"Block_{i}"]["Dense_0"]
        lin = h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
        taps[f"Block_{i}/input"] = h
        taps[f"Block_{i}/Dense_0"] = lin
        h = h + np.tanh(lin)
        taps[f"Block_{i}"] = h
    return taps


def test_capture_and_intercept_equal_hand_computed():
    rng = np.random.default_rng(0)
    model = Model()
    x = jnp.asarray(rng.standard_normal((2, 5, D)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    ref = by_hand(variables["params"], x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, taps = jax.jit(jlinen.capture(model, paths=["Block_*"]))(variables, x)
        _, taps_i = jlinen.intercept(model, paths=["Block_?"], record="both")(variables, x)
    assert out.shape == (2, 5)
    assert set(taps) == {f"Block_{i}{s}" for i in range(L) for s in ("", "/Dense_0")}
    assert set(taps_i) == {f"Block_{i}{s}" for i in range(L) for s in ("", "/input")}
    for k, v in {**taps, **taps_i}.items():
        np.testing.assert_allclose(np.asarray(v), ref[k], rtol=1e-5, atol=1e-6)
    # Other mutable collections still come back as in apply.
    (_, other), _ = jlinen.capture(model, paths=["Block_0"])(variables, x, mutable=["batch_stats"])
    assert "batch_stats" not in other or not other["batch_stats"]


def test_monitor_on_linen_taps_in_a_train_step_matches_numpy():
    rng = np.random.default_rng(1)
    model = Model()
    xs = [jnp.asarray(rng.standard_normal((2, 6, D)), jnp.float32) for _ in range(3)]
    masks = [jnp.asarray(rng.random((2, 6)) < 0.7) for _ in xs]
    params = model.init(jax.random.key(1), xs[0])["params"]
    fwd = jlinen.intercept(model, paths=["Block_?"], record="input")
    mon = jaxmon.monitor({"Block_*/input": jaxmon.gaussian()})
    mstate = mon.init(jax.eval_shape(lambda p, x: fwd({"params": p}, x)[1], params, xs[0]))
    traces = []

    @jax.jit
    def step(params, mstate, x, mask):
        traces.append(1)

        def loss_fn(p):
            y, taps = fwd({"params": p}, x)
            return jnp.sum(jnp.where(mask, y, 0.0) ** 2), taps

        (_, taps), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, g)
        return params, mon.update(mstate, taps, mask=mask)

    refs = []
    for x, m in zip(xs, masks, strict=True):
        refs.append({k: v[np.asarray(m)] for k, v in by_hand(params, x).items()})
        params, mstate = step(params, mstate, x, m)
    assert len(traces) == 1
    fitted = mon.finalize(mstate)
    assert sorted(fitted) == ["Block_0/input", "Block_1/input"]
    for k, f in fitted.items():
        rows = np.concatenate([r[k] for r in refs])
        np.testing.assert_allclose(np.asarray(f.mean), rows.mean(0), rtol=1e-4, atol=1e-5)
        cov = np.cov(rows, rowvar=False, bias=True)
        np.testing.assert_allclose(np.asarray(f.covariance), cov, rtol=1e-3, atol=1e-5)
