"""The transition estimator against float64 numpy, the shared law suite, and the synthetic case
of issue 6 (each layer's marginal unchanged, the map between them rotated)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import jaxmon
from jaxmon._base import Estimator, EstimatorSpec, check_rows, register

from laws import LawCase, LawSuite


@register("_test_transition_split")
def split_adapter(*, d_a: int, ridge: float, rank: int | None = None) -> Estimator:
    """A test-only estimator: the law suite feeds ``[..., d]`` arrays, the transition estimator
    takes pairs. This wrapper splits the last axis at ``d_a`` into ``(x_a, x_b)`` so that every
    law runs on the real estimator's update/merge/finalize/score. It is registered (under a
    private name) so the spec round-trip law rebuilds the wrapper, not the bare estimator. The
    shape check on the concatenated array happens here first (the law suite expects the message
    to name ``d``); the estimator's own pair checks are tested separately below."""
    inner = jaxmon.transition(ridge=ridge, rank=rank)
    spec = EstimatorSpec("_test_transition_split", {"d_a": d_a, "ridge": ridge, "rank": rank})

    def split(x, d):
        check_rows(x, d, name="transition (test adapter)")
        return (x[..., :d_a], x[..., d_a:])

    def init(example):
        d = example.shape[-1]
        dt = example.dtype
        return inner.init((jax.ShapeDtypeStruct((d_a,), dt), jax.ShapeDtypeStruct((d - d_a,), dt)))

    def update(state, x, *, mask=None, weights=None):
        d = state.mean_a.shape[0] + state.mean_b.shape[0]
        return inner.update(state, split(x, d), mask=mask, weights=weights)

    def score(fitted, x, *, mask=None):
        d = sum(fitted.coef.shape)
        return inner.score(fitted, split(x, d), mask=mask)

    return Estimator(init, update, inner.merge, inner.finalize, score, spec)


class TestTransitionLaws(LawSuite):
    case = LawCase(make=lambda: split_adapter(d_a=3, ridge=1e-3), weights=True)


def _fit(est, xa, xb, splits=(), dtype=jnp.float32):
    """Streams (xa, xb) in pieces into separate states and merges them."""
    ex = (jax.ShapeDtypeStruct((xa.shape[1],), dtype), jax.ShapeDtypeStruct((xb.shape[1],), dtype))
    states = [
        est.update(est.init(ex), (jnp.asarray(a, dtype), jnp.asarray(b, dtype)))
        for a, b in zip(np.split(xa, splits), np.split(xb, splits), strict=True)
    ]
    s = states[0]
    for t in states[1:]:
        s = est.merge(s, t)
    return s, est.finalize(s)


def _pair_data(rng, n, d_a, d_b, mean_a=5.0, mean_b=-3.0, noise=0.3):
    a = rng.standard_normal((n, d_a)) @ rng.standard_normal((d_a, d_a)) + mean_a
    b = a @ rng.standard_normal((d_a, d_b)) / np.sqrt(d_a) + noise * rng.standard_normal((n, d_b))
    return a.astype(np.float32), (b + mean_b).astype(np.float32)


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_ridge_map_and_residual_against_numpy(ridge, rng):
    d_a, d_b, n = 7, 5, 600
    xa, xb = _pair_data(rng, n, d_a, d_b)
    est = jaxmon.transition(ridge=ridge, residual_ridge=0.0)
    state, fitted = _fit(est, xa, xb, splits=[100, 350, 351])
    assert jaxmon.num_rows(state) == n
    a64, b64 = xa.astype(np.float64), xb.astype(np.float64)
    ca, cb = a64 - a64.mean(0), b64 - b64.mean(0)
    s_aa = ca.T @ ca / n
    lam = ridge * np.trace(s_aa) / d_a
    if ridge == 0.0:
        want = np.linalg.lstsq(ca, cb, rcond=None)[0]
    else:
        want = np.linalg.solve(s_aa + lam * np.eye(d_a), ca.T @ cb / n)
    np.testing.assert_allclose(np.asarray(fitted.coef), want, rtol=2e-3, atol=2e-4)
    res = cb - ca @ want
    res_cov = res.T @ res / n
    np.testing.assert_allclose(
        np.asarray(fitted.residual_covariance), res_cov, atol=2e-3 * np.abs(res_cov).max()
    )
    r2 = 1 - np.trace(res_cov) / np.trace(cb.T @ cb / n)
    np.testing.assert_allclose(float(fitted.explained_variance), r2, rtol=1e-3)
    # Scores: squared Mahalanobis norm of query residuals under the residual covariance.
    qa, qb = _pair_data(np.random.default_rng(1), 40, d_a, d_b, noise=1.0)
    r = (qb - b64.mean(0)) - (qa - a64.mean(0)) @ want
    want_s = np.einsum("nd,de,ne->n", r, np.linalg.inv(res_cov), r)
    got = np.asarray(est.score(fitted, (jnp.asarray(qa), jnp.asarray(qb))))
    np.testing.assert_allclose(got, want_s, rtol=5e-3)
    np.testing.assert_allclose(
        float(fitted.log_det), np.linalg.slogdet(res_cov)[1], rtol=1e-3, atol=1e-3
    )


def test_low_rank_map_is_principal_component_regression(rng):
    d_a, d_b, n, k = 12, 4, 800, 5
    xa, xb = _pair_data(rng, n, d_a, d_b)
    est = jaxmon.transition(ridge=0.0, rank=k, residual_ridge=0.0)
    _, fitted = _fit(est, xa, xb, splits=[300])
    a64, b64 = xa.astype(np.float64), xb.astype(np.float64)
    ca, cb = a64 - a64.mean(0), b64 - b64.mean(0)
    _, vecs = np.linalg.eigh(ca.T @ ca / n)
    basis = vecs[:, -k:]
    want = basis @ np.linalg.lstsq(ca @ basis, cb, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(fitted.coef), want, rtol=5e-3, atol=5e-4)


def test_rotated_map_is_invisible_per_layer_but_not_to_the_transition():
    """Issue 6: b = W a + noise for trusted rows, b = R W a + noise for anomalies, with R an
    orthogonal rotation. a is the same law in both; b ~ N(μ_b, WWᵀ + σ²I) in both when W is
    orthogonal, so each layer's marginal is unchanged and only the map differs."""
    rng = np.random.default_rng(0)
    d, n = 16, 4000
    w = np.linalg.qr(rng.standard_normal((d, d)))[0]
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    mu_a, mu_b, noise = rng.standard_normal(d) * 3, rng.standard_normal(d) * 3, 0.3

    def draw(m, wmap):
        za = rng.standard_normal((m, d))
        b = za @ wmap.T + noise * rng.standard_normal((m, d)) + mu_b
        return (za + mu_a).astype(np.float32), b.astype(np.float32)

    train_a, train_b = draw(n, w)
    ok_a, ok_b = draw(1000, w)
    bad_a, bad_b = draw(1000, rot @ w)
    labels = np.r_[np.zeros(1000), np.ones(1000)]
    aurocs = {}
    g = jaxmon.gaussian()
    for tap, train, ok, bad in (("a", train_a, ok_a, bad_a), ("b", train_b, ok_b, bad_b)):
        f = g.finalize(g.update(g.init(train), jnp.asarray(train)))
        s = np.r_[np.asarray(g.score(f, jnp.asarray(ok))), np.asarray(g.score(f, jnp.asarray(bad)))]
        aurocs[tap] = roc_auc_score(labels, s)
    est = jaxmon.transition(ridge=1e-3)
    _, fitted = _fit(est, train_a, train_b, splits=[1000, 2500])
    s = np.r_[
        np.asarray(est.score(fitted, (jnp.asarray(ok_a), jnp.asarray(ok_b)))),
        np.asarray(est.score(fitted, (jnp.asarray(bad_a), jnp.asarray(bad_b)))),
    ]
    aurocs["transition"] = roc_auc_score(labels, s)
    assert 0.4 <= aurocs["a"] <= 0.6, aurocs
    assert 0.4 <= aurocs["b"] <= 0.6, aurocs
    assert aurocs["transition"] > 0.95, aurocs


def test_bf16_pair_and_mixed_dtypes(rng):
    xa, xb = _pair_data(rng, 500, 6, 4)
    est = jaxmon.transition(ridge=1e-3)
    _, f32 = _fit(est, xa, xb)
    _, fbf = _fit(est, xa, xb, dtype=jnp.bfloat16)
    assert fbf.coef.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(fbf.coef), np.asarray(f32.coef), atol=0.05)
    # One bf16 tap and one float32 tap: accumulated in float32.
    s = est.init(
        (jax.ShapeDtypeStruct((6,), jnp.bfloat16), jax.ShapeDtypeStruct((4,), jnp.float32))
    )
    s = est.update(s, (jnp.asarray(xa, jnp.bfloat16), jnp.asarray(xb)))
    assert s.m2_aa.dtype == jnp.float32 and jaxmon.num_rows(s) == 500


def test_pair_inputs_are_checked():
    est = jaxmon.transition(ridge=1e-3)
    ex = (jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32))
    s = est.init(ex)
    with pytest.raises(jaxmon.ShapeError, match="pair"):
        est.update(s, jnp.zeros((4, 5), jnp.float32))
    with pytest.raises(jaxmon.ShapeError, match="pair"):
        est.init(jax.ShapeDtypeStruct((5,), jnp.float32))
    with pytest.raises(jaxmon.ShapeError, match=r"second tap.*\[\.\.\., 2\]"):
        est.update(s, (jnp.zeros((4, 3)), jnp.zeros((4, 3))))
    with pytest.raises(jaxmon.ShapeError, match="same leading shape"):
        est.update(s, (jnp.zeros((4, 3)), jnp.zeros((5, 2))))
    with pytest.raises(ValueError, match="rank"):
        jaxmon.transition(ridge=0.1, rank=4).init(ex)
    with pytest.raises(ValueError, match="ridge"):
        jaxmon.transition(ridge=-1.0)


def test_leading_axes_mask_and_nonfinite_rows(rng):
    xa, xb = _pair_data(rng, 48, 4, 3)
    est = jaxmon.transition(ridge=1e-2)
    ex = (jax.ShapeDtypeStruct((4,), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))
    mask = rng.random(48) < 0.7
    pa, pb = xa.copy(), xb.copy()
    pb[3, 1] = np.nan  # a NaN in the second tap drops the whole pair row
    s = est.update(
        est.init(ex),
        (jnp.asarray(pa.reshape(4, 12, 4)), jnp.asarray(pb.reshape(4, 12, 3))),
        mask=jnp.asarray(mask.reshape(4, 12)),
    )
    keep = mask.copy()
    keep[3] = False
    clean = est.update(est.init(ex), (jnp.asarray(xa[keep]), jnp.asarray(xb[keep])))
    assert jaxmon.num_rows(s) == keep.sum()
    assert jaxmon.num_nonfinite(s) == int(mask[3])
    np.testing.assert_allclose(np.asarray(s.m2_ab), np.asarray(clean.m2_ab), rtol=1e-4, atol=1e-4)
    f = est.finalize(s)
    sc = est.score(f, (jnp.asarray(xa.reshape(4, 12, 4)), jnp.asarray(xb.reshape(4, 12, 3))))
    assert sc.shape == (4, 12)


def test_inside_a_monitor_with_a_pair_pattern(rng):
    if not hasattr(jaxmon, "monitor"):
        pytest.skip("jaxmon.monitor not available")
    xa, xb = _pair_data(rng, 256, 6, 5)
    mon = jaxmon.monitor({("l0", "l1"): jaxmon.transition(ridge=1e-3)})
    ex = {
        "l0": jax.ShapeDtypeStruct((6,), jnp.float32),
        "l1": jax.ShapeDtypeStruct((5,), jnp.float32),
    }
    s = mon.update(mon.init(ex), {"l0": jnp.asarray(xa), "l1": jnp.asarray(xb)})
    f = mon.finalize(s)
    got = mon.score(f, {"l0": jnp.asarray(xa), "l1": jnp.asarray(xb)})
    est = jaxmon.transition(ridge=1e-3)
    _, want_f = _fit(est, xa, xb)
    want = est.score(want_f, (jnp.asarray(xa), jnp.asarray(xb)))
    np.testing.assert_allclose(np.asarray(got["l0->l1"]), np.asarray(want), rtol=1e-4, atol=1e-4)
    rebuilt = jaxmon.from_spec(mon.spec.to_json())
    assert rebuilt.spec == mon.spec
