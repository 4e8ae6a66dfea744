"""The Gaussian family against scikit-learn and float64 numpy, plus the shared law suite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf, ShrunkCovariance

import jaxmon
from jaxmon import _base

from laws import LawCase, LawSuite, normal_rows


class TestGaussianLaws(LawSuite):
    case = LawCase(make=lambda: jaxmon.gaussian(), weights=True)


class TestGaussianLedoitWolfLaws(LawSuite):
    case = LawCase(make=lambda: jaxmon.gaussian(shrinkage="ledoit_wolf"), weights=True)


class TestGaussianOASLaws(LawSuite):
    case = LawCase(make=lambda: jaxmon.gaussian(shrinkage="oas"), weights=True)


class TestGaussianFixedShrinkageLaws(LawSuite):
    case = LawCase(make=lambda: jaxmon.gaussian(shrinkage=0.25), weights=True)


class TestGaussianDiagonalLaws(LawSuite):
    case = LawCase(make=lambda: jaxmon.gaussian(diagonal=True), weights=True)


def correlated_rows(rng, n, d):
    """Strongly correlated rows (cumulative sums of ``normal_rows``' features)."""
    return np.cumsum(normal_rows(rng, n, d), axis=1)


def decorrelated_rows(rng, n, d):
    """Rows with the marginals of ``correlated_rows`` but independent features (each column
    permuted on its own): what the relative score is built to flag."""
    x = correlated_rows(rng, n, d)
    return np.stack([rng.permutation(col) for col in x.T], axis=1)


class TestGaussianRelativeLaws(LawSuite):
    case = LawCase(
        make=lambda: jaxmon.gaussian(relative=True, shrinkage=0.1),
        rows=correlated_rows,
        anomalies=decorrelated_rows,
        weights=True,
    )


def _stream(est, x, splits, dtype=jnp.float32):
    """Feeds ``x`` in pieces to separate states, then merges them pairwise (tree order).

    Pieces are padded to one shape and masked, so each estimator compiles once per test.
    """
    parts = np.split(x, splits)
    width = max(len(p) for p in parts)
    states = []
    for p in parts:
        padded = np.zeros((width, x.shape[1]), x.dtype)
        padded[: len(p)] = p
        s0 = est.init(jax.ShapeDtypeStruct((x.shape[1],), dtype))
        mask = jnp.asarray(np.arange(width) < len(p))
        states.append(est.update(s0, jnp.asarray(padded, dtype), mask=mask))
    while len(states) > 1:
        states = [
            est.merge(states[i], states[i + 1]) if i + 1 < len(states) else states[i]
            for i in range(0, len(states), 2)
        ]
    return est.finalize(states[0])


@pytest.mark.parametrize(
    ("shrinkage", "reference"),
    [
        (None, EmpiricalCovariance()),
        ("ledoit_wolf", LedoitWolf()),
        ("oas", OAS()),
        (0.3, ShrunkCovariance(shrinkage=0.3)),
    ],
)
@pytest.mark.parametrize("d", [5, 40])
def test_matches_scikit_learn_in_batches(shrinkage, reference, d, rng):
    # n close to d makes the shrinkage intensity large enough to matter.
    n = 3 * d + 7
    x = (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 5.0).astype(np.float32)
    # ridge=0: compare the exact estimator (the ridge only guards rank-deficient inputs).
    est = jaxmon.gaussian(shrinkage=shrinkage, ridge=0.0)
    fitted = _stream(est, x, [n // 5, n // 2, n - 3])
    ref = reference.fit(x.astype(np.float64))
    scale = np.abs(ref.covariance_).max()
    np.testing.assert_allclose(np.asarray(fitted.mean), ref.location_, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(fitted.covariance), ref.covariance_, atol=2e-5 * scale)
    if hasattr(ref, "shrinkage_"):
        np.testing.assert_allclose(float(fitted.shrinkage), ref.shrinkage_, rtol=1e-4, atol=1e-6)
    q = (rng.standard_normal((50, d)) * 2 + 5.0).astype(np.float32)
    got = np.asarray(est.score(fitted, jnp.asarray(q)))
    want = ref.mahalanobis(q.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-3)


def test_large_mean_small_spread_keeps_covariance_in_float32(rng):
    d = 8
    x = rng.standard_normal((20000, d)) @ (rng.standard_normal((d, d)) * 0.3 + np.eye(d)) + 1e4
    fitted = _stream(jaxmon.gaussian(), x.astype(np.float32), [4096, 8192, 12288, 16384])
    want = np.cov(x.astype(np.float32).astype(np.float64).T, bias=True)
    rel = np.abs(np.asarray(fitted.covariance) - want).max() / np.abs(want).max()
    assert rel < 1e-3, rel


def test_bf16_input_covariance_against_float64(rng):
    d = 32
    x = jnp.asarray(rng.standard_normal((4000, d)) * 2 + 7, jnp.bfloat16)
    fitted = _stream(jaxmon.gaussian(), np.asarray(x), [1000, 2500], dtype=jnp.bfloat16)
    assert fitted.covariance.dtype == jnp.float32
    want = np.cov(np.asarray(x, np.float64).T, bias=True)
    # Centring in bf16 rounds each centred value by at most 2^-9 relative.
    np.testing.assert_allclose(np.asarray(fitted.covariance), want, atol=4e-3 * np.abs(want).max())


def test_float16_input(rng):
    x = (rng.standard_normal((500, 6)) + 2).astype(np.float16)
    est = jaxmon.gaussian()
    f = est.finalize(est.update(est.init(x), jnp.asarray(x)))
    want = np.cov(x.astype(np.float64).T, bias=True)
    np.testing.assert_allclose(np.asarray(f.covariance), want, rtol=1e-4, atol=1e-4)


def test_diagonal_and_relative_scores_against_numpy(rng):
    d = 10
    x = (rng.standard_normal((800, d)) @ rng.standard_normal((d, d))).astype(np.float32)
    q = (rng.standard_normal((30, d)) * 3).astype(np.float32)
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    mu, cov = x64.mean(0), np.cov(x64.T, bias=True)
    full = np.einsum("nd,de,ne->n", q64 - mu, np.linalg.inv(cov), q64 - mu)
    diag = np.sum((q64 - mu) ** 2 / np.diag(cov), -1)
    for kwargs, want in (({"diagonal": True}, diag), ({"relative": True}, full - diag)):
        est = jaxmon.gaussian(**kwargs, ridge=0.0)
        f = est.finalize(est.update(est.init(x), jnp.asarray(x)))
        np.testing.assert_allclose(
            np.asarray(est.score(f, jnp.asarray(q))), want, rtol=1e-3, atol=1e-2
        )


def test_condition_number_and_log_det(rng):
    d = 6
    x = (rng.standard_normal((400, d)) * np.arange(1, d + 1)).astype(np.float32)
    est = jaxmon.gaussian(ridge=0.0)
    f = est.finalize(est.update(est.init(x), jnp.asarray(x)))
    eig = np.linalg.eigvalsh(np.cov(x.astype(np.float64).T, bias=True))
    np.testing.assert_allclose(float(f.condition_number), eig.max() / eig.min(), rtol=1e-3)
    np.testing.assert_allclose(float(f.log_det), np.log(eig).sum(), rtol=1e-4)


def test_row_count_is_exact_beyond_two_to_the_32():
    est = jaxmon.gaussian()
    s = est.update(est.init(jax.ShapeDtypeStruct((3,), jnp.float32)), jnp.ones((5, 3)))
    big = s._replace(counts=_base.Counts(jnp.array([2**32 - 3, 1], jnp.uint32), s.counts.nonfinite))
    merged = est.merge(big, s)
    assert jaxmon.num_rows(merged) == (2**32 - 3) + 2**32 + 5
    assert jaxmon.num_rows(est.merge(merged, merged)) == 2 * ((2**32 - 3) + 2**32 + 5)


@pytest.mark.parametrize("bad", [1.5, -0.1, "ledoit", "shrink"])
def test_bad_hyperparameters_are_rejected(bad):
    with pytest.raises(ValueError, match="shrinkage"):
        jaxmon.gaussian(shrinkage=bad)


def test_diagonal_refuses_estimated_shrinkage():
    with pytest.raises(ValueError, match="diagonal"):
        jaxmon.gaussian(diagonal=True, shrinkage="oas")


def test_from_spec_rejects_unknown_names():
    with pytest.raises(ValueError, match="no estimator named 'nope'"):
        jaxmon.from_spec('{"name": "nope", "params": {}}')


def test_shared_whitener_against_float64_numpy():
    """_numerics.whiten, used by gaussian, transition, mixture and probe, against numpy."""
    from jaxmon import _numerics as nm

    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 40, 6))
    cov = np.einsum("knd,kne->kde", a, a) / 40  # a batch of 3 covariances (a mixture's)
    floor = 0.25
    w = nm.whiten(jnp.asarray(cov, jnp.float32), floor)
    fac = cov + floor * np.eye(6)
    np.testing.assert_allclose(np.asarray(w.covariance), fac, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w.factor), np.linalg.cholesky(fac), rtol=1e-4, atol=1e-5)
    white = np.asarray(w.whitener, np.float64)
    eye = np.broadcast_to(np.eye(6), fac.shape)
    np.testing.assert_allclose(white @ fac @ np.swapaxes(white, 1, 2), eye, atol=1e-4)
    np.testing.assert_allclose(np.asarray(w.log_det), np.linalg.slogdet(fac)[1], rtol=1e-5)
    cond = np.asarray(nm.condition_number(w))
    np.testing.assert_allclose(cond, np.linalg.cond(fac), rtol=1e-4)
    rhs = rng.standard_normal((3, 6, 2))
    got = nm.cholesky_solve(w, jnp.asarray(rhs, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.linalg.solve(fac, rhs), rtol=1e-4, atol=1e-5)
    var = np.diagonal(cov, axis1=1, axis2=2)
    d = nm.whiten(jnp.asarray(var, jnp.float32), floor, diagonal=True)
    np.testing.assert_allclose(np.asarray(d.whitener), 1 / np.sqrt(var + floor), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(d.log_det), np.log(var + floor).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(nm.condition_number(d, diagonal=True)),
        (var + floor).max(-1) / (var + floor).min(-1),
        rtol=1e-5,
    )
