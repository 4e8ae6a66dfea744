"""jaxmon.compare against float64 numpy / scipy closed forms, and the permutation test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import jaxmon
from jaxmon._compare import frechet_sq

D = 6
GAUSS = jaxmon.gaussian(ridge=0.0)  # one instance: its jitted functions compile once per shape
GAUSS_DIAG = jaxmon.gaussian(diagonal=True, ridge=0.0)


def _rows(seed, n=800, d=D, shift=0.0, scale=1.0):
    """Rows of one fixed correlated law (the mixing is the same for every seed)."""
    mix = np.random.default_rng(99).standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((n, d)) @ mix) * scale + 2.0 + shift).astype(np.float32)


def _fit(est, x):
    return est.finalize(est.update(est.init(x), jnp.asarray(x)))


def _kl_ref(mu0, c0, mu1, c1):
    """KL(N0 ‖ N1), float64 closed form."""
    d = len(mu0)
    i1 = np.linalg.inv(c1)
    dm = mu1 - mu0
    return 0.5 * (
        np.trace(i1 @ c0) + dm @ i1 @ dm - d + np.linalg.slogdet(c1)[1] - np.linalg.slogdet(c0)[1]
    )


def _frechet_ref(mu0, c0, mu1, c1):
    covmean = scipy.linalg.sqrtm(c0 @ c1).real
    return np.sum((mu0 - mu1) ** 2) + np.trace(c0 + c1 - 2 * covmean)


def test_gaussian_frechet_and_kl_against_scipy():
    xa, xb = _rows(0), _rows(1, shift=0.3, scale=1.4)
    res = jaxmon.compare(_fit(GAUSS, xa), _fit(GAUSS, xb))
    a64, b64 = xa.astype(np.float64), xb.astype(np.float64)
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    ca, cb = np.cov(a64.T, bias=True), np.cov(b64.T, bias=True)
    assert res.kind == "gaussian"
    np.testing.assert_allclose(res.stats["frechet"], _frechet_ref(mu_a, ca, mu_b, cb), rtol=1e-4)
    assert res.distance == res.stats["frechet"]
    np.testing.assert_allclose(res.stats["kl_ab"], _kl_ref(mu_a, ca, mu_b, cb), rtol=1e-3)
    np.testing.assert_allclose(res.stats["kl_ba"], _kl_ref(mu_b, cb, mu_a, ca), rtol=1e-3)
    np.testing.assert_allclose(res.stats["mean_shift"], np.linalg.norm(mu_a - mu_b), rtol=1e-4)
    assert np.isnan(res.p_value)


def test_diagonal_gaussians_against_closed_forms():
    xa, xb = _rows(2), _rows(3, shift=-0.5, scale=0.7)
    res = jaxmon.compare(_fit(GAUSS_DIAG, xa), _fit(GAUSS_DIAG, xb))
    a64, b64 = xa.astype(np.float64), xb.astype(np.float64)
    mu_a, mu_b, va, vb = a64.mean(0), b64.mean(0), a64.var(0), b64.var(0)
    assert res.kind == "gaussian_diagonal"
    want_f = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    np.testing.assert_allclose(res.stats["frechet"], want_f, rtol=1e-4)
    want_kl = _kl_ref(mu_a, np.diag(va), mu_b, np.diag(vb))
    np.testing.assert_allclose(res.stats["kl_ab"], want_kl, rtol=1e-3)


def test_identical_fits_are_at_distance_zero_and_frechet_is_stable_when_close():
    x = _rows(4)
    f = _fit(GAUSS, x)
    res = jaxmon.compare(f, f)
    assert abs(res.stats["kl_ab"]) < 1e-6 and abs(res.stats["kl_ba"]) < 1e-6
    assert res.distance < 1e-6 * float(jnp.trace(f.covariance))
    # Nearly equal Gaussians: the float64 evaluation keeps the small difference.
    c = np.cov(x.astype(np.float64).T, bias=True)
    mu = x.astype(np.float64).mean(0)
    c2 = c * (1 + 1e-4)
    np.testing.assert_allclose(
        frechet_sq(mu, c, mu, c2), _frechet_ref(mu, c, mu, c2), rtol=1e-3, atol=1e-12
    )


def test_monitor_dicts_are_compared_per_tap():
    fa = {"l0": _fit(GAUSS, _rows(5)), "l1": _fit(GAUSS, _rows(6))}
    fb = {"l0": _fit(GAUSS, _rows(7)), "l1": _fit(GAUSS, _rows(8, shift=2.0))}
    res = jaxmon.compare(fa, fb)
    assert list(res) == ["l0", "l1"]
    assert res["l1"].distance > 10 * res["l0"].distance  # the shifted tap moved
    table = jaxmon.comparison_table(res)
    assert "l1" in table and "frechet" in table and "kl_ab" in table
    with pytest.raises(ValueError, match="only one"):
        jaxmon.compare(fa, {"l0": fb["l0"]})
    odd = {**fa, "l2": (jnp.zeros(3),)}
    with pytest.raises(TypeError, match="l2"):
        jaxmon.compare(odd, {**fb, "l2": (jnp.zeros(3),)})
    assert list(jaxmon.compare(odd, {**fb, "l2": (jnp.zeros(3),)}, skip_unsupported=True)) == [
        "l0",
        "l1",
    ]
    with pytest.raises(jaxmon.ShapeError, match="width"):
        jaxmon.compare(fa["l0"], _fit(GAUSS, _rows(9, d=D + 1)))


def test_transition_maps():
    rng = np.random.default_rng(10)
    a = rng.standard_normal((600, 4)).astype(np.float32)
    w1 = rng.standard_normal((4, 3))
    w2 = w1 + 0.5 * rng.standard_normal((4, 3))
    est = jaxmon.transition(ridge=0.0)
    fits = []
    for w in (w1, w2):
        b = (a @ w + 0.1 * rng.standard_normal((600, 3))).astype(np.float32)
        ex = (jax.ShapeDtypeStruct((4,), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))
        fits.append(est.finalize(est.update(est.init(ex), (jnp.asarray(a), jnp.asarray(b)))))
    res = jaxmon.compare(*fits)
    ca, cb = np.asarray(fits[0].coef, np.float64), np.asarray(fits[1].coef, np.float64)
    np.testing.assert_allclose(
        res.distance, np.linalg.norm(cb - ca) / np.linalg.norm(ca), rtol=1e-5
    )
    # Same map, residual covariances close: KL near zero.
    same = jaxmon.compare(fits[0], fits[0])
    assert same.distance == 0 and abs(same.stats["residual_kl_ab"]) < 1e-6
    assert res.distance > 0.2


def test_frequent_directions_principal_angles_against_scipy():
    rng = np.random.default_rng(11)
    d, n = 12, 2000
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    spectrum = np.array([10, 8, 6, 5] + [0.05] * (d - 4))

    def draw(rot):
        return ((rng.standard_normal((n, d)) * np.sqrt(spectrum)) @ (rot @ basis).T + 1).astype(
            np.float32
        )

    small = scipy.linalg.expm(0.05 * (lambda m: m - m.T)(rng.standard_normal((d, d))))
    big = scipy.linalg.expm(1.0 * (lambda m: m - m.T)(rng.standard_normal((d, d))))
    est = jaxmon.frequent_directions(sketch_size=8)
    f0, f_small, f_big = (_fit(est, draw(r)) for r in (np.eye(d), small, big))
    near, far = jaxmon.compare(f0, f_small), jaxmon.compare(f0, f_big)
    assert near.kind == "subspace" and near.stats["subspace_rank"] == 4
    want = scipy.linalg.subspace_angles(
        np.asarray(f0.components[:4], np.float64).T, np.asarray(f_big.components[:4], np.float64).T
    )
    np.testing.assert_allclose(far.distance, np.sqrt(np.sum(want**2)), rtol=1e-4, atol=1e-6)
    assert near.distance < 0.5 < far.distance


def test_quantile_sketches_ks_brackets_scipy():
    rng = np.random.default_rng(12)
    est = jaxmon.quantiles(relative_accuracy=0.01)
    ex = jax.ShapeDtypeStruct((), jnp.float32)
    va = rng.gamma(2.0, size=4000).astype(np.float32)
    vb = rng.gamma(2.0, size=3000).astype(np.float32)
    vc = (rng.gamma(2.0, size=3000) * 1.15).astype(np.float32)
    fa, fb, fc = (est.finalize(est.update(est.init(ex), jnp.asarray(v))) for v in (va, vb, vc))
    for other, v in ((fb, vb), (fc, vc)):
        res = jaxmon.compare(fa, other)
        exact = scipy.stats.ks_2samp(va, v, method="asymp")
        assert res.stats["ks"] - 1e-6 <= exact.statistic <= res.stats["ks_upper_bound"] + 1e-6
        assert res.stats["ks_upper_bound"] - res.stats["ks"] < 0.02  # buckets are narrow
    same, shifted = jaxmon.compare(fa, fb), jaxmon.compare(fa, fc)
    assert same.p_value > 0.01 and shifted.p_value < 1e-6
    exact = scipy.stats.ks_2samp(va, vc, method="asymp")
    np.testing.assert_allclose(shifted.distance, exact.statistic, atol=0.01)


@pytest.mark.parametrize("statistic", ["frechet", "kl", "mean_shift"])
def test_permutation_test(statistic):
    xa, xb, xc = _rows(13, n=150, d=4), _rows(14, n=120, d=4), _rows(15, n=120, d=4, shift=0.6)
    t, p_same = jaxmon.permutation_test(xa, xb, statistic=statistic, num_permutations=99)
    _, p_diff = jaxmon.permutation_test(xa, xc, statistic=statistic, num_permutations=99)
    if statistic == "frechet":
        a64, b64 = xa.astype(np.float64), xb.astype(np.float64)
        ref = _frechet_ref(
            a64.mean(0), np.cov(a64.T, bias=True), b64.mean(0), np.cov(b64.T, bias=True)
        )
        np.testing.assert_allclose(t, ref, rtol=1e-4)
    # xa and xb share one law; xc is shifted by 0.6 per feature.
    assert p_same > 0.05 and p_diff == pytest.approx(1 / 100)
