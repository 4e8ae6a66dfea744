"""QUE and spectral-signature scores against float64 numpy/scipy references, streamed query
moments against in-memory ones, and a poisoned-set audit where they beat per-row Mahalanobis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm
from sklearn.metrics import roc_auc_score

import jaxmon

# One estimator object for every test, so that its jitted functions compile once per shape.
_GAUSS = jaxmon.gaussian(ridge=0.0)


def _fit_trusted(x):
    est = _GAUSS
    return est, est.finalize(est.update(est.init(x[0]), jnp.asarray(x)))


def _query_state(rows, splits):
    est = _GAUSS
    s0 = est.init(rows[0])
    parts = [est.update(s0, jnp.asarray(p)) for p in np.split(rows, splits)]
    out = parts[0]
    for p in parts[1:]:
        out = est.merge(out, p)
    return out


def que_reference(trusted_x, q, alpha):
    t = trusted_x.astype(np.float64)
    w = np.linalg.inv(np.linalg.cholesky(np.cov(t.T, bias=True)))
    q = q.astype(np.float64)
    z = (q - q.mean(0)) @ w.T
    sig = np.cov(z.T, bias=True)
    u = expm(alpha * (sig - np.eye(len(sig))) / (np.linalg.norm(sig, 2) - 1))
    return len(sig) * np.einsum("nd,de,ne->n", z, u, z) / np.trace(u)


def test_que_matches_the_matrix_exponential_reference(rng):
    d = 10
    mix = rng.standard_normal((d, d)) / 3 + np.eye(d)
    t = (rng.standard_normal((2000, d)) @ mix + 5).astype(np.float32)
    q = (rng.standard_normal((300, d)) @ mix + 5).astype(np.float32)
    q[:30] += 2.0 * mix[0]  # excess variance along one direction
    _, trusted = _fit_trusted(t)
    streamed = _query_state(q, [100, 200])  # equal parts: one compiled update
    for alpha in (0.5, 4.0):
        want = que_reference(t, q, alpha)
        for query in (None, streamed):
            got = np.asarray(jaxmon.que_scores(trusted, query, jnp.asarray(q), alpha=alpha))
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * want.max())


def test_que_with_trusted_moments_equals_with_trusted_gaussian(rng):
    d = 6
    t = (rng.standard_normal((800, d)) * np.arange(1, d + 1) + 3).astype(np.float32)
    q = (rng.standard_normal((200, d)) * np.arange(1, d + 1) + 3).astype(np.float32)
    est, fitted = _fit_trusted(t)
    moments = est.update(est.init(t[0]), jnp.asarray(t))
    a = np.asarray(jaxmon.que_scores(fitted, None, jnp.asarray(q)))
    b = np.asarray(jaxmon.que_scores(moments, None, jnp.asarray(q), ridge=0.0))
    # Whitening by L⁻¹ or by Σ^{-1/2} differs by a rotation, which QUE is invariant to.
    np.testing.assert_allclose(a, b, rtol=1e-3)


def test_spectral_signature_is_tran_li_madry_without_trusted_stats(rng):
    d = 12
    q = (rng.standard_normal((400, d)) * np.linspace(1, 2, d) + 7).astype(np.float32)
    q64 = q.astype(np.float64)
    c = q64 - q64.mean(0)
    v = np.linalg.svd(c, full_matrices=False)[2]
    for k in (1, 3):
        want = np.sum((c @ v[:k].T) ** 2, -1)
        got = np.asarray(jaxmon.spectral_signature_scores(None, None, q, num_directions=k))
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * want.max())


def test_mask_and_leading_axes(rng):
    d = 5
    t = rng.standard_normal((500, d)).astype(np.float32)
    q = rng.standard_normal((4, 30, d)).astype(np.float32)
    mask = rng.random((4, 30)) < 0.7
    _, trusted = _fit_trusted(t)
    for fn in (jaxmon.que_scores, jaxmon.spectral_signature_scores):
        got = np.asarray(fn(trusted, None, jnp.asarray(q), mask=jnp.asarray(mask)))
        assert got.shape == (4, 30) and np.all(got[~mask] == 0)
        flat = np.asarray(fn(trusted, None, jnp.asarray(q[mask])))
        np.testing.assert_allclose(got[mask], flat, rtol=1e-4, atol=1e-5)


def test_poisoned_subset_sharing_a_direction_is_found_better_than_per_row(rng):
    # 8% of the query rows carry the same shift of 4 trusted standard deviations: each is
    # barely unusual on its own in d = 64 (Mahalanobis: +16 on a χ²₆₄ of spread 11), but
    # together they add a direction of excess variance well above the sampling noise.
    d, n = 64, 2000
    mix = rng.standard_normal((d, d)) / 4 + np.eye(d)
    t = (rng.standard_normal((4000, d)) @ mix).astype(np.float32)
    q = (rng.standard_normal((n, d)) @ mix).astype(np.float32)
    labels = np.zeros(n, bool)
    labels[rng.choice(n, 160, replace=False)] = True
    cov = np.cov(t.T.astype(np.float64), bias=True)
    direction = np.linalg.cholesky(cov) @ rng.standard_normal(d)
    direction *= 4.0 / np.sqrt(direction @ np.linalg.solve(cov, direction))
    q[labels] += direction.astype(np.float32)
    est, trusted = _fit_trusted(t)
    per_row = roc_auc_score(labels, np.asarray(est.score(trusted, jnp.asarray(q))))
    que = roc_auc_score(labels, np.asarray(jaxmon.que_scores(trusted, None, jnp.asarray(q))))
    spec = roc_auc_score(
        labels, np.asarray(jaxmon.spectral_signature_scores(trusted, None, jnp.asarray(q)))
    )
    assert que > 0.95 and spec > 0.95, (que, spec, per_row)
    assert min(que, spec) > per_row + 0.05, (que, spec, per_row)


def test_bad_inputs_raise():
    t = jnp.ones((4, 3))
    with pytest.raises(TypeError, match="trusted"):
        jaxmon.que_scores({"mean": t}, None, t)
    diag = jaxmon.gaussian(diagonal=True)
    qd = diag.update(diag.init(jax.ShapeDtypeStruct((3,), jnp.float32)), t)
    with pytest.raises(TypeError, match="non-diagonal"):
        jaxmon.spectral_signature_scores(None, qd, t)
