"""Plain-JAX taps against activations computed by hand in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon

L, D = 3, 5


def _params(rng):
    return {
        "w_in": jnp.asarray(rng.standard_normal((D, D)) / np.sqrt(D), jnp.float32),
        "blocks": jnp.asarray(rng.standard_normal((L, D, D)) / np.sqrt(D), jnp.float32),
        "u": jnp.asarray(rng.standard_normal((D,)), jnp.float32),
    }


def model(p, x):
    """An embedding, a scan over residual blocks (taps stacked), a jitted head."""
    h = jaxmon.tap(jnp.tanh(x @ p["w_in"]), "embed")

    def block(h, w):
        h = h + jaxmon.tap(jnp.tanh(h @ w), "blocks/mlp_out")
        return h, None

    h, _ = jax.lax.scan(block, h, p["blocks"])
    h = jax.jit(lambda h: jaxmon.tap(h, "final"))(h)
    return jnp.sum(h * p["u"][None, None, :])


def by_hand(p, x):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    h = np.tanh(x @ p["w_in"])
    taps = {"embed": h}
    outs = []
    for w in p["blocks"]:
        m = np.tanh(h @ w)
        outs.append(m)
        h = h + m
    taps["blocks/mlp_out"] = np.stack(outs)
    taps["final"] = h
    return float(np.sum(h * p["u"])), taps


def test_taps_equal_hand_computed_under_jit_and_eager():
    rng = np.random.default_rng(0)
    p, x = _params(rng), jnp.asarray(rng.standard_normal((2, 7, D)), jnp.float32)
    ref_out, ref = by_hand(p, x)
    with jax.checking_leaks():
        for f in (jaxmon.capture(model), jax.jit(jaxmon.capture(model))):
            out, taps = f(p, x)
            assert set(taps) == set(ref)
            np.testing.assert_allclose(float(out), ref_out, rtol=1e-4)
            for k in ref:
                assert taps[k].shape == ref[k].shape, k
                np.testing.assert_allclose(np.asarray(taps[k]), ref[k], rtol=1e-4, atol=1e-5)
        # capture of jit: the taps inside the jitted function come out, no tracer leaks.
        out, taps = jaxmon.capture(jax.jit(model))(p, x)
        np.testing.assert_allclose(
            np.asarray(taps["blocks/mlp_out"]), ref["blocks/mlp_out"], rtol=1e-4, atol=1e-5
        )
    # Outside capture, tap is the identity.
    np.testing.assert_allclose(float(jax.jit(model)(p, x)), ref_out, rtol=1e-4)


def test_taps_are_not_differentiated_and_grad_is_unchanged():
    rng = np.random.default_rng(1)
    p, x = _params(rng), jnp.asarray(rng.standard_normal((2, 4, D)), jnp.float32)
    g_plain = jax.grad(model)(p, x)
    g_cap = jax.jit(jax.grad(lambda p: jaxmon.capture(model)(p, x)[0]))(p)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_plain, g_cap
    )
    # A loss on the taps alone has zero gradient: they are stop_gradient-ed aux outputs.
    g_taps = jax.grad(lambda p: sum(jnp.sum(t) for t in jaxmon.capture(model)(p, x)[1].values()))(p)
    assert all(float(jnp.max(jnp.abs(v))) == 0.0 for v in jax.tree.leaves(g_taps))
    # value_and_grad with taps as aux, and a grad taken inside the captured function.
    (_, taps), _ = jax.value_and_grad(lambda p: jaxmon.capture(model)(p, x), has_aux=True)(p)
    assert taps["blocks/mlp_out"].shape == (L, 2, 4, D)

    def inner_grad(p, x):
        return jax.grad(model)(p, x)["u"]

    gu, taps = jaxmon.capture(inner_grad)(p, x)
    np.testing.assert_allclose(np.asarray(gu), np.asarray(g_plain["u"]), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(taps["final"]), by_hand(p, x)[1]["final"], rtol=1e-4, atol=1e-5
    )


def test_vmap_of_capture_stacks_the_vmapped_axis_first():
    rng = np.random.default_rng(2)
    p, x = _params(rng), jnp.asarray(rng.standard_normal((3, 2, 4, D)), jnp.float32)
    _, taps = jax.vmap(jaxmon.capture(model), in_axes=(None, 0))(p, x)
    assert taps["blocks/mlp_out"].shape == (3, L, 2, 4, D)
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(taps["blocks/mlp_out"][i]),
            by_hand(p, x[i])[1]["blocks/mlp_out"],
            rtol=1e-4,
            atol=1e-5,
        )
    # vmap inside the captured function: the tap records the batched value.
    _, t2 = jaxmon.capture(lambda p, x: jax.vmap(model, in_axes=(None, 0))(p, x))(p, x)
    np.testing.assert_allclose(np.asarray(t2["embed"]), np.asarray(taps["embed"]), rtol=1e-6)


def test_monitor_on_stacked_capture_matches_numpy_moments():
    rng = np.random.default_rng(3)
    p = _params(rng)
    mon = jaxmon.monitor(
        {"blocks/*/mlp_out": jaxmon.gaussian(), "embed": jaxmon.gaussian()},
        stacked={"blocks/mlp_out": "blocks/{i}/mlp_out"},
    )
    fwd = jax.jit(jaxmon.capture(model))
    xs = [jnp.asarray(rng.standard_normal((2, 6, D)), jnp.float32) for _ in range(3)]
    masks = [jnp.asarray(rng.random((2, 6)) < 0.7) for _ in xs]
    state = mon.init(jax.eval_shape(fwd, p, xs[0])[1])
    for x, m in zip(xs, masks, strict=True):
        state = jax.jit(mon.update)(state, fwd(p, x)[1], mask=m)
    fitted = mon.finalize(state)
    refs = [by_hand(p, x)[1] for x in xs]
    for i in range(L):
        rows = np.concatenate(
            [r["blocks/mlp_out"][i][np.asarray(m)] for r, m in zip(refs, masks, strict=True)]
        )
        f = fitted[f"blocks/{i}/mlp_out"]
        np.testing.assert_allclose(np.asarray(f.mean), rows.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(f.covariance), np.cov(rows, rowvar=False, bias=True), rtol=1e-3, atol=1e-5
        )


def test_attribution_taps_equal_activation_times_gradient():
    rng = np.random.default_rng(4)
    p, x = _params(rng), jnp.asarray(rng.standard_normal((2, 3, D)), jnp.float32)
    _, attr, taps = jax.jit(jaxmon.attribution_taps(model, with_activations=True))(p, x)
    _, ref = by_hand(p, x)
    u = np.asarray(p["u"], np.float64)
    # d out/d final = u, and the last block's output is added straight into final: also u.
    np.testing.assert_allclose(np.asarray(attr["final"]), ref["final"] * u, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(attr["blocks/mlp_out"][-1]), ref["blocks/mlp_out"][-1] * u, rtol=1e-4, atol=1e-5
    )
    # The embedding's gradient by hand: back through the blocks in float64.
    w = np.asarray(p["blocks"], np.float64)
    g = np.broadcast_to(u, ref["final"].shape).copy()
    hs = [ref["embed"]]
    for i in range(L):
        hs.append(hs[-1] + ref["blocks/mlp_out"][i])
    for i in reversed(range(L)):
        m = ref["blocks/mlp_out"][i]
        g = g + ((g * (1 - m**2)) @ w[i].T)
    np.testing.assert_allclose(np.asarray(attr["embed"]), ref["embed"] * g, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(taps["embed"]), ref["embed"], rtol=1e-4, atol=1e-5)
    # A non-scalar target is a clear error.
    with pytest.raises(ValueError, match="scalar"):
        jaxmon.attribution_taps(lambda x: jaxmon.tap(x, "a") * 2)(x)


def test_unsupported_and_duplicate_taps_raise():
    x = jnp.ones((3, D))
    with pytest.raises(NotImplementedError, match="cond"):
        jaxmon.capture(lambda x: jax.lax.cond(True, lambda y: jaxmon.tap(y, "c"), lambda y: y, x))(
            x
        )
    with pytest.raises(ValueError, match="twice"):
        jaxmon.capture(lambda x: jaxmon.tap(jaxmon.tap(x, "a") + 1, "a"))(x)
    with pytest.raises(TypeError, match="name"):
        jaxmon.tap(x, 3)
