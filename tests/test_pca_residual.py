"""PCA-residual (probabilistic PCA) scores from exact moments and from a Frequent Directions
sketch, against float64 numpy; the law suite for both sources; a d = 16384 sketch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_frequent_directions import fd_compare

import jaxmon

from laws import LawCase, LawSuite


class TestPCAResidualMomentsLaws(LawSuite):
    case = LawCase(make=lambda: jaxmon.pca_residual(rank=2), weights=True)


class TestPCAResidualSketchLaws(LawSuite):
    case = LawCase(
        make=lambda: jaxmon.pca_residual(rank=2, source="frequent_directions", sketch_size=8),
        compare=fd_compare,
        d=10,
        n=64,
        weights=True,
    )


def subspace_distance(v, basis):
    """Spectral distance between the projectors on rows of ``v`` and columns of ``basis``
    (sine of the largest principal angle), without forming d×d projectors."""
    sv = np.linalg.svd(v @ basis, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - sv.min() ** 2)))


def ppca_reference(x64, q64, rank, mean, vecs, lam, total):
    """Float64 PPCA squared Mahalanobis distance with the given parameters."""
    d = x64.shape[1]
    resid = (total - lam.sum()) / (d - rank)
    z = q64 - mean
    p = z @ vecs.T
    r = z - p @ vecs
    return np.sum(p**2 / lam, -1) + np.sum(r**2, -1) / resid


def low_rank_rows(rng, n, d, r=3, noise=0.1, mean=10.0):
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0][:, :r]
    return (
        rng.standard_normal((n, r)) * [3.0, 2.0, 1.5][:r]
    ) @ basis.T + noise * rng.standard_normal((n, d)) + mean, basis


def test_moments_source_matches_numpy_ppca(rng):
    d, rank = 12, 3
    x, _ = low_rank_rows(rng, 600, d)
    x = x.astype(np.float32)
    est = jaxmon.pca_residual(rank=rank, ridge=0.0)
    s0 = est.init(x[0])
    s = est.merge(est.update(s0, jnp.asarray(x[:250])), est.update(s0, jnp.asarray(x[250:])))
    f = est.finalize(s)
    x64 = x.astype(np.float64)
    mu, cov = x64.mean(0), np.cov(x64.T, bias=True)
    w, u = np.linalg.eigh(cov)
    lam, vecs = w[::-1][:rank], u[:, ::-1][:, :rank].T
    np.testing.assert_allclose(np.asarray(f.eigenvalues), lam, rtol=1e-4)
    np.testing.assert_allclose(
        float(f.residual_variance), (np.trace(cov) - lam.sum()) / (d - rank), rtol=1e-3
    )
    q = low_rank_rows(np.random.default_rng(5), 40, d)[0] + rng.standard_normal((40, d)) * 0.3
    want = ppca_reference(x64, q, rank, mu, vecs, lam, np.trace(cov))
    got = np.asarray(est.score(f, jnp.asarray(q, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=2e-3)


def test_sketch_source_matches_numpy_ppca_of_its_own_spectrum_and_the_exact_subspace(rng):
    d, rank, ell = 30, 3, 8
    x, basis = low_rank_rows(rng, 800, d)
    x = x.astype(np.float32)
    est = jaxmon.pca_residual(rank=rank, source="frequent_directions", sketch_size=ell, ridge=0.0)
    s = est.update(est.init(x[0]), jnp.asarray(x))
    f = est.finalize(s)
    x64 = x.astype(np.float64)
    cov = np.cov(x64.T, bias=True)
    w = np.sort(np.linalg.eigvalsh(cov))[::-1]
    bound = float(jaxmon.sketch_error_bound(s)) / len(x)
    lam = np.asarray(f.eigenvalues, np.float64)
    tol = 1e-5 * np.trace(cov)
    # FD: the sketch's λ̂_i lie in [λ_i − Δ/W, λ_i]; the fitted variances add ρ ∈ [0, Δ/W].
    assert np.all(lam <= w[:rank] + bound + tol) and np.all(lam >= w[:rank] - bound - tol)
    b = np.asarray(s.sketch, np.float64)
    sig2 = np.sort(np.linalg.eigvalsh(b @ b.T))[::-1][:rank] / len(x)
    rho = (np.trace(cov) - np.sum(b * b) / len(x)) / d
    np.testing.assert_allclose(lam, sig2 + rho, rtol=1e-4, atol=tol)
    # The planted subspace is recovered (projector distance).
    v = np.asarray(f.components, np.float64)
    assert subspace_distance(v, basis) < 0.05
    q = x64[:40] + rng.standard_normal((40, d)) * 0.5
    want = ppca_reference(x64, q, rank, np.asarray(f.mean, np.float64), v, lam, np.trace(cov))
    np.testing.assert_allclose(
        np.asarray(est.score(f, jnp.asarray(q, jnp.float32))), want, rtol=2e-3
    )


def test_residual_energy_flags_off_subspace_rows(rng):
    # Anomalies small in norm but off the planted subspace score above every inlier.
    d = 16
    x, basis = low_rank_rows(rng, 1000, d, noise=0.05)
    est = jaxmon.pca_residual(rank=3)
    f = est.finalize(est.update(est.init(x[:1].astype(np.float32)), jnp.asarray(x, jnp.float32)))
    off = np.linalg.qr(np.concatenate([basis, rng.standard_normal((d, 1))], 1))[0][:, 3]
    s_in = np.asarray(est.score(f, jnp.asarray(x[:100], jnp.float32)))
    s_odd = np.asarray(est.score(f, jnp.asarray(x[:50] + off[None, :], jnp.float32)))
    # A unit step off the subspace (spread 0.05 there) beats every inlier; the same rows'
    # in-subspace spread is 30-60 times larger, so a plain norm would not separate them.
    assert s_odd.min() > s_in.max()


def test_sketch_source_on_a_flat_spectrum_scores_like_the_exact_model(rng):
    # Isotropic rows: a small sketch's eigenvalues collapse towards 0 (Δ/W is most of the
    # variance); with the shed mass restored the inlier scores stay near E[χ²_d] = d, as exact.
    d = 16
    x = jnp.asarray(rng.standard_normal((512, d)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((256, d)), jnp.float32)
    means = []
    for kw in ({}, {"source": "frequent_directions", "sketch_size": 6}):
        est = jaxmon.pca_residual(rank=3, **kw)
        means.append(
            float(np.mean(np.asarray(est.score(est.finalize(est.update(est.init(x[0]), x)), q))))
        )
    assert abs(means[0] - d) < 0.15 * d and abs(means[1] - d) < 0.25 * d, means


@pytest.mark.slow
def test_sketch_source_at_d_16384_keeps_o_ell_d_memory(rng):
    d, rank, ell, n = 16384, 4, 12, 192
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    x = (rng.standard_normal((n, rank)) * [8.0, 6.0, 4.0, 3.0]) @ basis.T
    x = (x + 0.01 * rng.standard_normal((n, d)) + 2.0).astype(np.float32)
    est = jaxmon.pca_residual(rank=rank, source="frequent_directions", sketch_size=ell)
    s0 = est.init(jax.ShapeDtypeStruct((d,), jnp.bfloat16))
    s = est.merge(
        est.update(s0, jnp.asarray(x[:96], jnp.bfloat16)),
        est.update(s0, jnp.asarray(x[96:], jnp.bfloat16)),
    )
    floats = sum(leaf.size for leaf in jax.tree.leaves(s) if leaf.dtype == jnp.float32)
    assert floats <= (ell + 1) * d + 8  # O(ℓd): no d×d anywhere
    f = est.finalize(s)
    v = np.asarray(f.components, np.float64)
    # Against the exact top-4 subspace of the same (bf16-rounded) rows, from a float64 SVD.
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    exact = np.linalg.svd(xb - xb.mean(0), full_matrices=False)[2][:rank]
    assert subspace_distance(v, exact.T) < 0.05
    assert subspace_distance(v, basis) < 0.1
    normal = np.asarray(est.score(f, jnp.asarray(x[:64])))
    off = rng.standard_normal(d)
    off -= basis @ (basis.T @ off)
    off *= 2.0 / np.linalg.norm(off)
    odd = np.asarray(est.score(f, jnp.asarray(x[:64] + off[None, :].astype(np.float32))))
    assert np.median(odd) > 2 * np.median(normal)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="source"):
        jaxmon.pca_residual(rank=2, source="svd")
    with pytest.raises(ValueError, match="exceed"):
        jaxmon.pca_residual(rank=4, source="frequent_directions", sketch_size=4)
    with pytest.raises(ValueError, match="sketch_size"):
        jaxmon.pca_residual(rank=2, sketch_size=8)
    with pytest.raises(ValueError, match="below the feature size"):
        jaxmon.pca_residual(rank=6).init(jax.ShapeDtypeStruct((6,), jnp.float32))
