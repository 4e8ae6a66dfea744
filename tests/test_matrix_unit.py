"""Issue 15: scoring on the bf16 matrix unit, kNN candidates in bf16, shared centring, drift.

References are float64 numpy; "the input's own rounding" is measured, not assumed: the float64
score of float32 rows against the float64 score of the same rows rounded to bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxmon
from jaxmon_kernels import (
    knn_kth_distance,
    knn_kth_distance_reference,
    mahalanobis_sq,
    mahalanobis_sq_reference,
)

BF16 = jnp.bfloat16


def demo_like(rng: np.random.Generator, n: int, d: int, *, seed: int = 0) -> np.ndarray:
    """Residual-stream-like rows: a power-law spectrum, a few outlier features whose mean is
    far larger than their spread, Student-t tails; float32. ``seed`` fixes the law."""
    law = np.random.default_rng(seed)
    basis = np.linalg.qr(law.standard_normal((d, d)))[0]
    scale = (1.0 + np.arange(d)) ** -0.7
    mean = law.standard_normal(d) * 0.5
    mean[law.choice(d, 4, replace=False)] = law.choice([-1, 1], 4) * law.uniform(20, 60, 4)
    z = rng.standard_t(6, (n, d)) * scale
    return (z @ basis.T + mean).astype(np.float32)


def labelled_queries(rng, n: int, d: int):
    """Clean rows (label 0), a shift along a low-variance direction (1), a wider spread (2) and
    rows of the same law (3: AUROC near 0.5, where ties of ranks would show first)."""
    clean = demo_like(rng, n, d)
    law = np.random.default_rng(0)
    basis = np.linalg.qr(law.standard_normal((d, d)))[0]
    shifted = demo_like(rng, n // 4, d) + 0.6 * basis[:, -1]
    wide = demo_like(rng, n // 4, d) * 1.05
    same = demo_like(rng, n // 4, d)
    x = np.concatenate([clean, shifted, wide, same])
    y = np.repeat([0, 1, 2, 3], [n, n // 4, n // 4, n // 4])
    return x, y


def _score64(x, mean, cov) -> np.ndarray:
    y = np.asarray(x, np.float64) - mean
    return np.einsum("nd,nd->n", y, np.linalg.solve(cov, y.T).T)


# --------------------------------------------------------------------------- kernels


def test_bf16_operand_mahalanobis_loses_no_more_than_the_inputs_own_rounding(rng):
    d = 256
    x32 = demo_like(rng, 2000, d)
    cov = np.cov(x32[:1000].T.astype(np.float64)) + 1e-3 * np.eye(d)
    mean = x32[:1000].mean(0).astype(np.float64)
    w = np.linalg.inv(np.linalg.cholesky(cov))
    q32 = x32[1000:]
    qb = jnp.asarray(q32, BF16)
    exact_b = _score64(np.asarray(qb, np.float64), mean, cov)  # the bf16 rows, exactly
    rounding = np.abs(_score64(q32, mean, cov) - exact_b) / exact_b  # the input's own rounding
    args = (jnp.asarray(mean, jnp.float32), jnp.asarray(w, jnp.float32))
    got = np.asarray(mahalanobis_sq(qb, *args, operand_dtype=BF16), np.float64)
    err = np.abs(got - exact_b) / exact_b
    assert np.median(err) <= np.median(rounding), (np.median(err), np.median(rounding))
    assert err.max() < 1e-2
    # The float32 route stays at float32 accuracy; the reference is the float32 route.
    f32 = np.asarray(mahalanobis_sq(qb, *args), np.float64)
    np.testing.assert_allclose(f32, exact_b, rtol=2e-4)
    np.testing.assert_allclose(f32, np.asarray(mahalanobis_sq_reference(qb, *args)), rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bank_rows", [8, 300, 1024])
def test_knn_kernel_routes_equal_each_other_and_the_reference(normalize, bank_rows, rng):
    d, k = 24, 3
    bank = demo_like(rng, bank_rows, d)
    q = demo_like(rng, 333, d)
    if normalize:
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    center = bank.mean(0)
    bb = 128
    pad = -(-bank_rows // min(bb, bank_rows)) * min(bb, bank_rows) - bank_rows
    b = np.concatenate([bank - center, np.zeros((pad, d), np.float32)])
    filled = np.arange(len(b)) < bank_rows
    bsq = np.where(filled, np.sum(b * b, -1), np.inf).astype(np.float32)
    qc = jnp.asarray(q - center)
    args = (qc, jnp.asarray(b), jnp.asarray(bsq), jnp.asarray(filled))
    kw = {"k": k, "query_block": 64, "bank_block": bb}
    fast = np.asarray(knn_kth_distance(*args, **kw, candidates="bfloat16"))
    slow = np.asarray(knn_kth_distance(*args, **kw, candidates="float32"))
    np.testing.assert_array_equal(fast, slow)
    ref = np.asarray(knn_kth_distance_reference(qc, jnp.asarray(b), jnp.asarray(filled), k))
    np.testing.assert_allclose(fast, ref, rtol=1e-5)
    # And against float64 numpy.
    d64 = np.linalg.norm((q - center)[:, None, :].astype(np.float64) - (bank - center), axis=-1)
    np.testing.assert_allclose(fast, np.sort(d64, 1)[:, k - 1], rtol=1e-4)


# --------------------------------------------------------------------------- estimators


def _fit(est, x):
    return est.finalize(est.update(est.init(x), jnp.asarray(x)))


ESTIMATORS = {
    "gaussian": lambda p: jaxmon.gaussian(shrinkage="ledoit_wolf", precision=p),
    "gaussian_relative": lambda p: jaxmon.gaussian(relative=True, precision=p),
    "pca_residual": lambda p: jaxmon.pca_residual(rank=16, precision=p),
    "knn": lambda p: jaxmon.knn(k=5, bank_size=512, precision=p),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_bf16_scores_keep_rankings_on_demo_like_rows(name, rng):
    # Issue 15's acceptance: Spearman >= 0.999 between bf16 and f32 scoring of the same bf16
    # rows, AUROC of every label within 0.001.
    d = 128
    train = demo_like(rng, 8 * d, d)
    est, ref = ESTIMATORS[name]("auto"), ESTIMATORS[name]("float32")
    fitted = _fit(ref, train)
    x, y = labelled_queries(rng, 4000, d)
    xb = jnp.asarray(x, BF16)
    fast = np.asarray(est.score(fitted, xb))
    slow = np.asarray(ref.score(fitted, xb))
    assert stats.spearmanr(fast, slow).statistic >= 0.999
    for label in (1, 2, 3):
        sel = (y == 0) | (y == label)
        a = jaxmon.metrics.auroc(fast[sel], y[sel] == label)
        b = jaxmon.metrics.auroc(slow[sel], y[sel] == label)
        assert abs(a - b) <= 1e-3, (label, a, b)
    if name == "knn":  # kNN is exact, not merely rank-preserving
        np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("name", ["gaussian", "pca_residual"])
def test_bf16_scores_against_float64(name, rng):
    d = 96
    train = demo_like(rng, 10 * d, d)
    est = ESTIMATORS[name]("auto")
    f = _fit(est, train)
    q32 = demo_like(rng, 1500, d)
    qb = jnp.asarray(q32, BF16)
    exact32 = np.asarray(ESTIMATORS[name]("float32").score(f, jnp.asarray(q32)), np.float64)
    # float64 reference of the bf16 rows, through the fitted model's float64 arithmetic.
    mean = np.asarray(f.mean, np.float64)
    yb = np.asarray(qb, np.float64) - mean
    if name == "gaussian":
        exact_b = _score64(np.asarray(qb, np.float64), mean, np.asarray(f.covariance, np.float64))
    else:
        v = np.asarray(f.components, np.float64)
        p = yb @ v.T
        r = yb - p @ v
        lam, s2 = np.asarray(f.eigenvalues, np.float64), float(f.residual_variance)
        exact_b = np.sum(p * p / lam, -1) + np.sum(r * r, -1) / s2
    got = np.asarray(est.score(f, qb), np.float64)
    err = np.abs(got - exact_b) / exact_b
    rounding = np.abs(exact32 - exact_b) / exact_b
    assert np.median(err) <= np.median(rounding), (np.median(err), np.median(rounding))
    assert np.max(err) < 2e-2


def test_bf16_transition_against_float64(rng):
    da, db = 48, 32
    amap = rng.standard_normal((da, db)) / np.sqrt(da)
    xa = demo_like(rng, 2000, da)
    xb = (xa @ amap + 0.2 * rng.standard_normal((2000, db)) + 5.0).astype(np.float32)
    est = jaxmon.transition(ridge=1e-3)
    f = est.finalize(est.update(est.init((xa[0], xb[0])), (jnp.asarray(xa), jnp.asarray(xb))))
    qa = demo_like(rng, 1000, da)
    qbb = (qa @ amap + 0.2 * rng.standard_normal((1000, db)) + 5.0).astype(np.float32)
    pa, pb = jnp.asarray(qa, BF16), jnp.asarray(qbb, BF16)

    def exact(a, b):
        ya = np.asarray(a, np.float64) - np.asarray(f.mean_a, np.float64)
        yb = np.asarray(b, np.float64) - np.asarray(f.mean_b, np.float64)
        r = yb - ya @ np.asarray(f.coef, np.float64)
        return _score64(r, 0.0, np.asarray(f.residual_covariance, np.float64))

    exact_b = exact(pa, pb)
    rounding = np.abs(exact(qa, qbb) - exact_b) / exact_b
    got = np.asarray(est.score(f, (pa, pb)), np.float64)
    err = np.abs(got - exact_b) / exact_b
    # The residual covariance is factorised with a small ridge: float32 and the ridge cost
    # ~1e-4, far below the bf16 rows' own rounding (~1e-2 here).
    assert np.median(err) <= np.median(rounding)
    assert np.max(err) < 5e-2


def test_bf16_rows_with_a_mean_far_above_their_spread_are_centred_in_float32(rng):
    # bf16 holds 8 significant bits: at 1e4 its spacing is 64. Centring in bf16 would erase the
    # spread; centring in float32 scores the bf16 values exactly as the float32 path does.
    d = 16
    x = (rng.standard_normal((4000, d)) * 100 + 1e4).astype(np.float32)
    xb = jnp.asarray(x, BF16)
    for make in (jaxmon.gaussian, lambda **kw: jaxmon.pca_residual(rank=4, **kw)):
        f = _fit(make(precision="float32"), np.asarray(xb, np.float32))
        fast = np.asarray(make().score(f, xb[:500]))
        slow = np.asarray(make(precision="float32").score(f, xb[:500]))
        np.testing.assert_allclose(fast, slow, rtol=2e-2)
        assert stats.spearmanr(fast, slow).statistic > 0.999


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_nonfinite_rows_score_inf_under_every_precision(name, rng):
    d = 24
    train = demo_like(rng, 600, d)
    f = _fit(ESTIMATORS[name]("float32"), train)
    q = demo_like(rng, 40, d)
    q[3, 0], q[7, -1], q[9] = np.nan, np.inf, -np.inf
    for precision in ("auto", "bfloat16", "float32"):
        est = ESTIMATORS[name](precision)
        for dtype in (jnp.float32, BF16):
            s = np.asarray(est.score(f, jnp.asarray(q, dtype)))
            assert np.all(np.isposinf(s[[3, 7, 9]])), (precision, dtype, s[[3, 7, 9]])
            assert np.all(np.isfinite(np.delete(s, [3, 7, 9])))
            mask = np.ones(40, bool)
            mask[3] = False
            m = np.asarray(est.score(f, jnp.asarray(q, dtype), mask=jnp.asarray(mask)))
            assert m[3] == 0 and np.isposinf(m[7])


def test_float32_rows_can_opt_into_bf16_operands(rng):
    d = 64
    train = demo_like(rng, 2000, d)
    f = _fit(jaxmon.gaussian(), train)
    q = jnp.asarray(demo_like(rng, 500, d))
    slow = np.asarray(jaxmon.gaussian().score(f, q))  # auto: float32 rows stay float32
    np.testing.assert_array_equal(
        slow, np.asarray(jaxmon.gaussian(precision="float32").score(f, q))
    )
    fast = np.asarray(jaxmon.gaussian(precision="bfloat16").score(f, q))
    assert not np.array_equal(fast, slow)
    np.testing.assert_allclose(fast, slow, rtol=3e-2)


def test_precision_knob_in_specs():
    # "auto" is the default and stays out of the spec: specs and checkpoints written before
    # the knob existed compare equal to the new defaults.
    for make in (
        jaxmon.gaussian,
        jaxmon.transition,
        lambda **kw: jaxmon.pca_residual(rank=2, **kw),
    ):
        assert "precision" not in make().spec.params
        spec = make(precision="float32").spec
        assert spec.params["precision"] == "float32"
        assert jaxmon.from_spec(spec.to_json()).spec == spec
        with pytest.raises(jaxmon.ConfigError, match="precision"):
            make(precision="fp8")
    assert (
        jaxmon.knn(k=2, bank_size=8, precision="bfloat16").spec == jaxmon.knn(k=2, bank_size=8).spec
    )
    assert jaxmon.knn(k=2, bank_size=8, precision="float32").spec.params["precision"] == "float32"
    with pytest.raises(jaxmon.ConfigError, match="precision"):
        jaxmon.knn(k=2, bank_size=8, precision="half")


# --------------------------------------------------------------------------- kNN


def test_knn_candidates_fall_back_to_float32_on_near_ties(rng):
    # Six distinct rows, each repeated 50 times with a tag of a few ulps in one feature (the
    # reservoir keeps distinct rows only): dozens of bank rows sit at almost the same distance,
    # no error bound can separate the k-th from the (k'+1)-th candidate, and every query block
    # falls back to the float32 route. The answer is still the float32 route's.
    d = 8
    x = np.repeat(demo_like(rng, 6, d), 50, axis=0)
    x[:, -1] += (np.arange(len(x)) % 50).astype(np.float32) * np.float32(2**-10)
    est = jaxmon.knn(k=4, bank_size=256)
    f = _fit(est, x)
    q = jnp.asarray(demo_like(rng, 300, d))
    fast = np.asarray(est.score(f, q))
    slow = np.asarray(jaxmon.knn(k=4, bank_size=256, precision="float32").score(f, q))
    np.testing.assert_array_equal(fast, slow)


def test_knn_bf16_queries_and_large_means(rng):
    d = 32
    x = (rng.standard_normal((3000, d)) * 2 + 500).astype(np.float32)
    est = jaxmon.knn(k=7, bank_size=1000)
    f = _fit(est, x)
    for q in (jnp.asarray(x[:400] + 0.5), jnp.asarray(x[:400] + 0.5, BF16)):
        fast = np.asarray(est.score(f, q))
        slow = np.asarray(jaxmon.knn(k=7, bank_size=1000, precision="float32").score(f, q))
        np.testing.assert_array_equal(fast, slow)


# --------------------------------------------------------------------------- moments


def test_drifting_stream_keeps_float32_accuracy(rng):
    # Batches whose means jump by 1e4 (a drifting or regime-switching stream): each batch is
    # summed about its own shift and merged exactly, so nothing cancels catastrophically.
    d = 6
    est = jaxmon.gaussian(shrinkage="ledoit_wolf")
    s = est.init(jax.ShapeDtypeStruct((d,), jnp.float32))
    parts = []
    for i, offset in enumerate([0.0, 1e4, -1e4, 2e4, 5.0]):
        part = (rng.standard_normal((400, d)) + offset + i).astype(np.float32)
        parts.append(part)
        s = est.update(s, jnp.asarray(part))
    x = np.concatenate(parts).astype(np.float64)
    np.testing.assert_allclose(np.asarray(s.mean), x.mean(0), rtol=1e-6, atol=1e-3)
    c = x - x.mean(0)
    np.testing.assert_allclose(
        np.asarray(s.m2), c.T @ c, rtol=1e-5, atol=1e-5 * np.abs(c.T @ c).max()
    )
    a = np.sum(c * c, -1)
    np.testing.assert_allclose(float(s.m4), np.sum(a * a), rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(s.m3),
        (a[:, None] * c).sum(0),
        rtol=1e-3,
        atol=1e-3 * np.abs(c).max() ** 3 * len(c),
    )


# --------------------------------------------------------------------------- shared centring


def test_monitor_keys_on_one_bf16_tap_share_one_centred_block(rng):
    d = 40
    dets = {
        "g": jaxmon.gaussian(shrinkage="ledoit_wolf"),
        "rel": jaxmon.gaussian(relative=True),
        "diag": jaxmon.gaussian(diagonal=True),  # no matmul: scored on its own
        "pca": jaxmon.pca_residual(rank=6),
        "fd": jaxmon.pca_residual(rank=6, source="frequent_directions"),  # another mean
        "knn": jaxmon.knn(k=3, bank_size=128),
    }
    mon = jaxmon.monitor({"t": dets, "u": {"g": jaxmon.gaussian()}})
    train = {"t": demo_like(rng, 1500, d), "u": demo_like(rng, 1500, d, seed=1)}
    fitted = mon.finalize(mon.update(mon.init({k: v[:1] for k, v in train.items()}), train))
    q = demo_like(rng, 300, d)
    q[5, 2], q[9] = np.nan, np.inf
    mask = np.ones(300, bool)
    mask[11] = False
    taps = {"t": jnp.asarray(q, BF16), "u": jnp.asarray(demo_like(rng, 300, d, seed=1), BF16)}
    got = mon.score(fitted, taps, mask=jnp.asarray(mask))
    for name, est in dets.items():
        want = np.asarray(est.score(fitted[f"t:{name}"], taps["t"], mask=jnp.asarray(mask)))
        g = np.asarray(got[f"t:{name}"])
        assert np.all(np.isposinf(g[[5, 9]])) and g[11] == 0
        ok = np.isfinite(want)
        # The first key's mean is the shared centre: its scores are the key's own, bit for bit;
        # the others differ by the bf16 rounding of rows centred on a slightly different mean
        # (relative scores are differences of two distances: compared on the score scale).
        if name == "g":
            np.testing.assert_array_equal(g, want)
        scale = np.median(np.abs(want[ok]))
        np.testing.assert_allclose(g[ok], want[ok], rtol=2e-2, atol=1e-2 * scale)
    alone = jaxmon.gaussian().score(fitted["u:g"], taps["u"], mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(got["u:g"]), np.asarray(alone))
    # float32 taps keep every key's own float32 path.
    f32 = mon.score(fitted, {k: v.astype(jnp.float32) for k, v in taps.items()})
    for name, est in dets.items():
        want = np.asarray(est.score(fitted[f"t:{name}"], taps["t"].astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(f32[f"t:{name}"]), want)
