"""Kernels against their plain-jnp references and float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmon_kernels import (
    mahalanobis_sq,
    mahalanobis_sq_reference,
    moment_stats,
    moment_stats_reference,
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("diagonal", [False, True])
def test_moment_stats_matches_reference_and_float64(dtype, weighted, diagonal, rng):
    n, d = 301, 24
    x = jnp.asarray(rng.standard_normal((n, d)) + 2.0, dtype)
    ok = jnp.asarray(rng.random(n) < 0.8)
    shift = jnp.asarray(np.full(d, 2.0), jnp.float32)
    w = jnp.asarray(rng.random(n), jnp.float32) if weighted else None
    got = moment_stats(x, ok, shift, w, diagonal=diagonal)
    ref = moment_stats_reference(x, ok, shift, w, diagonal=diagonal)
    # float64 numpy, from the rows as the kernel sees them (bf16-rounded).
    y = np.asarray(x, np.float64)[np.asarray(ok)] - 2.0
    ww = np.asarray(w, np.float64)[np.asarray(ok)] if weighted else np.ones(len(y))
    a = np.sum(y * y, -1)
    m2 = (ww[:, None] * y).T @ y
    want = (ww.sum(), ww @ y, np.diag(m2) if diagonal else m2, (ww * a) @ y, np.sum(ww * a * a))
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    for g, r, v in zip(got, ref, want, strict=True):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(r), rtol=tol, atol=tol * np.abs(v).max()
        )
        np.testing.assert_allclose(np.asarray(g), v, rtol=tol, atol=tol * np.abs(v).max())


def test_moment_stats_ignores_nan_in_excluded_rows(rng):
    x = rng.standard_normal((50, 4)).astype(np.float32)
    x[3] = np.nan
    ok = np.ones(50, bool)
    ok[3] = False
    got = moment_stats(jnp.asarray(x), jnp.asarray(ok), jnp.zeros(4, jnp.float32))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mahalanobis_matches_reference_and_float64(dtype, rng):
    d = 16
    c = rng.standard_normal((d, d))
    cov = c @ c.T + np.eye(d)
    mean = rng.standard_normal(d)
    w = np.linalg.inv(np.linalg.cholesky(cov))
    x = jnp.asarray(rng.standard_normal((200, d)) * 2 + mean, dtype)
    got = mahalanobis_sq(x, jnp.asarray(mean, jnp.float32), jnp.asarray(w, jnp.float32))
    ref = mahalanobis_sq_reference(x, jnp.asarray(mean, jnp.float32), jnp.asarray(w, jnp.float32))
    x64 = np.asarray(x, np.float64) - mean
    want = np.einsum("nd,de,ne->n", x64, np.linalg.inv(cov), x64)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
