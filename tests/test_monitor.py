"""Monitors over taps and every_k, against float64 numpy on the same activations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
from jaxmon._base import Estimator, EstimatorSpec, register
from jaxmon._keys import MonitorKey

from laws import LawCase, LawSuite, leaves_close, normal_rows


def _inner_close(est, a, b):
    """every_k's call counter counts update calls, not rows: a stream split in three and merged
    has seen three calls where one pass saw one. The summary of the rows (``inner``) is what
    must agree; the counter is checked in test_every_k_updates_on_every_kth_call."""
    leaves_close(a.inner, b.inner, rtol=1e-4, atol=1e-4)


@register("_test_monitor_on_arrays")
def _monitor_on_arrays(inner=None) -> Estimator:
    """Test-only adapter: a monitor over one tap ``"t"`` fed arrays, so the monitor (and
    every_k around it) runs through the shared law suite, which passes arrays, not dicts."""
    if inner is None:
        inner = jaxmon.every_k(jaxmon.monitor({"t": jaxmon.gaussian()}), 1)
    mon = jaxmon.from_spec(inner) if isinstance(inner, dict) else inner
    return Estimator(
        lambda ex: mon.init({"t": ex}),
        lambda s, x, *, mask=None, weights=None: mon.update(
            s, {"t": x}, mask=mask, weights=weights
        ),
        mon.merge,
        mon.finalize,
        lambda f, x, *, mask=None: mon.score(f, {"t": x}, mask=mask)["t"],
        EstimatorSpec("_test_monitor_on_arrays", {"inner": mon.spec.to_dict()}),
    )


class TestMonitorEveryK1Laws(LawSuite):
    """every_k(monitor, 1) over one tap must obey every law of the inner Gaussian."""

    case = LawCase(
        make=lambda: _monitor_on_arrays(
            jaxmon.every_k(jaxmon.monitor({"t": jaxmon.gaussian()}), 1)
        ),
        weights=True,
        compare=_inner_close,
    )


@register("_test_concat_pair")
def _concat_pair() -> Estimator:
    """A test-only two-tap estimator: a Gaussian over the concatenation [x_a, x_b]."""
    g = jaxmon.gaussian()

    def cat(x):
        assert isinstance(x, tuple) and len(x) == 2, "pair estimators receive (x_a, x_b)"
        a, b = x
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((*a.shape[:-1], a.shape[-1] + b.shape[-1]), a.dtype)
        return jnp.concatenate([a, b], axis=-1)

    return Estimator(
        lambda ex: g.init(cat(ex)),
        lambda s, x, *, mask=None, weights=None: g.update(s, cat(x), mask=mask, weights=weights),
        g.merge,
        g.finalize,
        lambda f, x, *, mask=None: g.score(f, cat(x), mask=mask),
        EstimatorSpec("_test_concat_pair", {}),
    )


def _taps(rng, b=3, s=5, d=4, layers=3):
    out = {}
    for i in range(layers):
        out[f"blocks/{i}/resid"] = normal_rows(rng, b * s, d).reshape(b, s, d) * (i + 1)
        out[f"blocks/{i}/mlp_out"] = normal_rows(rng, b * s, d + 1).reshape(b, s, d + 1) - i
    out["embed"] = normal_rows(rng, b * s, 2).reshape(b, s, 2)
    return {k: jnp.asarray(v) for k, v in out.items()}


def _example(taps):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in taps.items()}


def _np_moments(rows):
    rows = np.asarray(rows, np.float64)
    mean = rows.mean(0)
    return mean, np.cov(rows, rowvar=False, bias=True)


def test_glob_monitor_matches_numpy_per_tap_with_mask():
    rng = np.random.default_rng(0)
    mon = jaxmon.monitor({"blocks/*/mlp_out": jaxmon.gaussian(), "embed": jaxmon.gaussian()})
    batches = [_taps(rng) for _ in range(3)]
    masks = [jnp.asarray(rng.random((3, 5)) < 0.7) for _ in batches]
    state = mon.init(_example(batches[0]))
    assert sorted(state) == ["blocks/0/mlp_out", "blocks/1/mlp_out", "blocks/2/mlp_out", "embed"]
    for t, m in zip(batches, masks, strict=True):
        # Padding filled with garbage that would dominate any statistic if it leaked in.
        t = {k: jnp.where(m[..., None], v, 1e4) for k, v in t.items()}
        state = mon.update(state, t, mask=m)
    fitted = mon.finalize(state)
    for key in state:
        rows = np.concatenate(
            [np.asarray(t[key])[np.asarray(m)] for t, m in zip(batches, masks, strict=True)]
        )
        mean, cov = _np_moments(rows)
        np.testing.assert_allclose(np.asarray(fitted[key].mean), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(fitted[key].covariance), cov, rtol=1e-4, atol=1e-4)
    assert jaxmon.num_rows(state) == {
        f"['{k}'].counts": int(sum(np.asarray(m).sum() for m in masks)) for k in state
    }
    scores = mon.score(fitted, batches[0], mask=masks[0])
    assert set(scores) == set(state) and scores["embed"].shape == (3, 5)
    assert np.all(np.asarray(scores["embed"])[~np.asarray(masks[0])] == 0)
    direct = jaxmon.gaussian().score(fitted["embed"], batches[0]["embed"], mask=masks[0])
    np.testing.assert_allclose(np.asarray(scores["embed"]), np.asarray(direct), rtol=1e-6)


def test_named_detectors_and_pair_keys_and_spec_round_trip():
    rng = np.random.default_rng(1)
    mon = jaxmon.monitor(
        {
            "blocks/*/resid": {"full": jaxmon.gaussian(), "diag": jaxmon.gaussian(diagonal=True)},
            ("blocks/[0-1]/resid", "blocks/[1-2]/resid"): _concat_pair(),
        }
    )
    taps = _taps(rng)
    state = mon.update(mon.init(_example(taps)), taps)
    assert sorted(state) == sorted(
        [f"blocks/{i}/resid:{d}" for i in range(3) for d in ("full", "diag")]
        + ["blocks/0/resid->blocks/1/resid", "blocks/1/resid->blocks/2/resid"]
    )
    pair = np.concatenate(
        [np.asarray(taps["blocks/1/resid"]), np.asarray(taps["blocks/2/resid"])], -1
    )
    mean, cov = _np_moments(pair.reshape(-1, 8))
    f = mon.finalize(state)
    np.testing.assert_allclose(
        np.asarray(f["blocks/1/resid->blocks/2/resid"].mean), mean, rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(f["blocks/1/resid->blocks/2/resid"].covariance), cov, rtol=1e-4, atol=1e-4
    )
    assert f["blocks/0/resid:diag"].covariance.shape == (4,)
    rebuilt = jaxmon.from_spec(mon.spec.to_json())
    assert rebuilt.spec == mon.spec
    # A fresh monitor (no init in this process) merges and finalizes by key alone.
    leaves_close(
        rebuilt.finalize(rebuilt.merge(state, state)),
        mon.finalize(mon.merge(state, state)),
        rtol=1e-6,
        atol=1e-6,
    )
    s1, s2 = mon.score(f, taps), rebuilt.score(f, taps)
    leaves_close(s1, s2, rtol=1e-6, atol=1e-6)


def test_stacked_taps_equal_unstacked_per_layer_states():
    rng = np.random.default_rng(2)
    taps = _taps(rng)
    layered = {k: v for k, v in taps.items() if k.endswith("resid")}
    stacked_taps = {"blocks/resid": jnp.stack([layered[f"blocks/{i}/resid"] for i in range(3)])}
    mask = jnp.asarray(rng.random((3, 5)) < 0.6)
    plain = jaxmon.monitor({"blocks/*/resid": jaxmon.gaussian()})
    stk = jaxmon.monitor(
        {"blocks/*/resid": jaxmon.gaussian()}, stacked={"blocks/resid": "blocks/{i}/resid"}
    )
    sp = plain.update(plain.init(_example(layered)), layered, mask=mask)
    ss = stk.update(stk.init(_example(stacked_taps)), stacked_taps, mask=mask)
    assert sorted(ss) == ["blocks/0/resid", "blocks/1/resid", "blocks/2/resid"]
    leaves_close(ss, sp, rtol=1e-6, atol=1e-6)
    # A pattern selecting some layers only, and pairs across layers of one stacked tap.
    sel = jaxmon.monitor(
        {
            "blocks/[02]/resid": jaxmon.gaussian(),
            ("blocks/0/resid", "blocks/2/resid"): _concat_pair(),
        },
        stacked={"blocks/resid": "blocks/{i}/resid"},
    )
    s_sel = sel.update(sel.init(_example(stacked_taps)), stacked_taps, mask=mask)
    leaves_close(s_sel["blocks/2/resid"], sp["blocks/2/resid"], rtol=1e-6, atol=1e-6)
    pair = np.concatenate(
        [np.asarray(layered["blocks/0/resid"]), np.asarray(layered["blocks/2/resid"])], -1
    )
    mean, _ = _np_moments(pair[np.asarray(mask)])
    np.testing.assert_allclose(
        np.asarray(s_sel["blocks/0/resid->blocks/2/resid"].mean), mean, rtol=1e-5
    )
    fp, fs = plain.finalize(sp), stk.finalize(ss)
    leaves_close(
        stk.score(fs, stacked_taps, mask=mask),
        plain.score(fp, layered, mask=mask),
        rtol=1e-5,
        atol=1e-5,
    )


def test_errors_name_the_tap():
    rng = np.random.default_rng(3)
    taps = _taps(rng)
    mon = jaxmon.monitor({"blocks/*/mlp_out": jaxmon.gaussian()})
    state = mon.init(_example(taps))
    bad = dict(taps, **{"blocks/1/mlp_out": jnp.zeros((3, 5, 7), jnp.float32)})
    with pytest.raises(jaxmon.ShapeError, match=r"blocks/1/mlp_out.*\[\.\.\., 5\]"):
        mon.update(state, bad)
    missing = {k: v for k, v in taps.items() if k != "blocks/2/mlp_out"}
    with pytest.raises(KeyError, match="blocks/2/mlp_out"):
        mon.update(state, missing)
    with pytest.raises(ValueError, match=r"nope.*match no tap"):
        jaxmon.monitor({"nope/*": jaxmon.gaussian()}).init(_example(taps))
    with pytest.raises(ValueError, match="same key"):
        jaxmon.monitor({"blocks/*": jaxmon.gaussian(), "*/mlp_out": jaxmon.gaussian()}).init(
            _example(taps)
        )
    stk = jaxmon.monitor({"b/*/r": jaxmon.gaussian()}, stacked={"r": "b/{i}/r"})
    st = stk.init({"r": jax.ShapeDtypeStruct((2, 4, 3), jnp.float32)})
    with pytest.raises(jaxmon.ShapeError, match=r"stacked tap 'r'.*\[\.\.\., 3\]"):
        stk.update(st, {"r": jnp.zeros((2, 4, 6), jnp.float32)})
    with pytest.raises(TypeError, match="factory"):
        jaxmon.monitor({"x": jaxmon.gaussian})


def test_monitor_in_jitted_train_step_compiles_once():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)
    mon = jaxmon.monitor({"h": jaxmon.gaussian()})
    traces = []

    # Donating the monitor state (as a train step does) needs distinct buffers in it.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(w, mstate, x, mask):
        traces.append(1)

        def loss(w):
            h = jnp.tanh(x @ w)
            return jnp.mean(jnp.where(mask[..., None], h, 0.0) ** 2), h

        (lo, h), g = jax.value_and_grad(loss, has_aux=True)(w)
        return w - 0.1 * g, mon.update(mstate, {"h": h}, mask=mask), lo

    mstate = mon.init({"h": jax.ShapeDtypeStruct((2, 6, 4), jnp.float32)})
    hs = []
    for _ in range(4):
        x = jnp.asarray(normal_rows(rng, 12, 4).reshape(2, 6, 4))
        mask = jnp.asarray(rng.random((2, 6)) < 0.8)
        hs.append(np.tanh(np.asarray(x, np.float64) @ np.asarray(w, np.float64))[np.asarray(mask)])
        w, mstate, _ = step(w, mstate, x, mask)
    assert len(traces) == 1
    mean, cov = _np_moments(np.concatenate(hs))
    f = mon.finalize(mstate)["h"]
    np.testing.assert_allclose(np.asarray(f.mean), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(f.covariance), cov, rtol=1e-3, atol=1e-5)


def test_every_k_updates_on_every_kth_call():
    rng = np.random.default_rng(5)
    g = jaxmon.gaussian()
    est = jaxmon.every_k(g, 3)
    xs = [jnp.asarray(normal_rows(rng, 8, 3)) for _ in range(7)]
    s = est.init(jax.ShapeDtypeStruct((3,), jnp.float32))
    step = jax.jit(est.update)
    for x in xs:
        s = step(s, x)
    assert int(s.calls) == 7
    ref = g.init(jax.ShapeDtypeStruct((3,), jnp.float32))
    for x in (xs[0], xs[3], xs[6]):
        ref = g.update(ref, x)
    leaves_close(s.inner, ref, rtol=1e-6, atol=1e-6)
    assert jaxmon.num_rows(s) == 24
    rebuilt = jaxmon.from_spec(est.spec.to_json())
    assert rebuilt.spec == est.spec
    # every_k of a monitor (the training use), and a monitor of every_k, round trip too.
    mon = jaxmon.every_k(jaxmon.monitor({"a/*": {"g": jaxmon.gaussian()}}), 2)
    assert jaxmon.from_spec(mon.spec.to_json()).spec == mon.spec
    with pytest.raises(ValueError, match="k must be"):
        jaxmon.every_k(g, 0)


def test_pair_keys_read_back_as_pairs_in_a_fresh_monitor():
    # "blocks/*/resid" also matches the string "blocks/0/resid->blocks/1/resid" (fnmatch's *
    # crosses "/" and "->"): a key is read as a pair first, so a monitor rebuilt from its spec
    # (a restored checkpoint) merges and finalizes the pair key with the transition estimator.
    rng = np.random.default_rng(6)
    taps = _taps(rng)
    mon = jaxmon.monitor(
        {
            "blocks/*/resid": jaxmon.gaussian(),
            ("blocks/0/resid", "blocks/1/resid"): jaxmon.transition(),
        }
    )
    state = mon.update(mon.init(_example(taps)), taps)
    rebuilt = jaxmon.from_spec(mon.spec.to_json())
    f = rebuilt.finalize(rebuilt.merge(state, state))
    assert isinstance(f["blocks/0/resid->blocks/1/resid"], jaxmon.TransitionFitted)
    leaves_close(f, mon.finalize(mon.merge(state, state)), rtol=1e-6, atol=1e-6)
    leaves_close(rebuilt.score(f, taps), mon.score(f, taps), rtol=1e-6, atol=1e-6)


def test_keys_that_read_back_as_another_pattern_are_refused_at_init():
    rng = np.random.default_rng(7)
    taps = _taps(rng)
    # The first pair zips 0->1 and 1->2; "blocks/0/resid->blocks/2/resid" also fits its globs,
    # so from its name alone it would be merged and finalized by the first pattern's estimator.
    mon = jaxmon.monitor(
        {
            ("blocks/[01]/resid", "blocks/[12]/resid"): _concat_pair(),
            ("blocks/0/resid", "blocks/2/resid"): jaxmon.transition(),
        }
    )
    with pytest.raises(jaxmon.ConfigError, match=r"blocks/0/resid->blocks/2/resid.*read back"):
        mon.init(_example(taps))


def test_tap_names_holding_key_separators():
    # A tap name with ":" or "->" is ambiguous as a key; a monitor reads it back as the pattern
    # that produced it when only one reading fits.
    rng = np.random.default_rng(8)
    x = {
        "attn:q": jnp.asarray(normal_rows(rng, 12, 3)),
        "a->b": jnp.asarray(normal_rows(rng, 12, 3)),
    }
    mon = jaxmon.monitor({"*": jaxmon.gaussian()})
    state = mon.update(mon.init(_example(x)), x)
    assert sorted(state) == ["a->b", "attn:q"]
    rebuilt = jaxmon.from_spec(mon.spec.to_json())
    leaves_close(rebuilt.finalize(state), mon.finalize(state), rtol=0, atol=0)
    readings = [(k.taps, k.detector) for k in MonitorKey.readings("a->b:c")]
    assert readings == [
        (("a", "b"), "c"),
        (("a->b",), "c"),
        (("a", "b:c"), None),
        (("a->b:c",), None),
    ]
    assert MonitorKey.readings("x") == (MonitorKey(("x",)),)


def test_stacked_score_errors_name_the_stacked_tap_and_keys():
    stk = jaxmon.monitor({"b/*/r": jaxmon.gaussian()}, stacked={"r": "b/{i}/r"})
    rng = np.random.default_rng(9)
    x = {"r": jnp.asarray(normal_rows(rng, 16, 3).reshape(2, 8, 3))}
    f = stk.finalize(stk.update(stk.init(_example(x)), x))
    with pytest.raises(
        jaxmon.ShapeError, match=r"stacked tap 'r'.*'b/0/r', 'b/1/r'.*\[\.\.\., 3\]"
    ):
        stk.score(f, {"r": jnp.zeros((2, 4, 6), jnp.float32)})
    with pytest.raises(jaxmon.MissingTapError, match=r"missing tap\(s\) \['b/0/r', 'b/1/r'\]"):
        stk.score(f, {"q": x["r"]})
    with pytest.raises(jaxmon.ShapeError, match="expects a dict"):
        stk.score(f, x["r"])
