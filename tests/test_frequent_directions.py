"""Frequent Directions: the law suite (merges exact within the FD bound) and the bound itself
against exact float64 eigendecompositions, after merges in several orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
from jaxmon.estimators.frequent_directions import FDState

from laws import LawCase, LawSuite


def _gram(s: FDState) -> np.ndarray:
    b = np.asarray(s.sketch, np.float64)
    return b.T @ b


def fd_compare(est, a: FDState, b: FDState) -> None:
    """Two FD states summarise the same rows: exact counts, equal mean/weight/trace, and sketch
    Grams within the FD guarantee. Both satisfy ``C − Δ·I ≼ BᵀB ≼ C`` for the same ``C``, so
    their Grams differ by at most ``max(Δ_a, Δ_b)`` in spectral norm; each ``Δ`` also obeys the
    k = 0 bound ``Δ ≤ tr C / ℓ``. Merges are not bit-exact (the shrink's eigensolve rounds)."""
    np.testing.assert_array_equal(np.asarray(a.counts.rows), np.asarray(b.counts.rows))
    np.testing.assert_array_equal(np.asarray(a.counts.nonfinite), np.asarray(b.counts.nonfinite))
    np.testing.assert_allclose(float(a.weight), float(b.weight), rtol=1e-5)
    tr = max(float(a.trace), float(b.trace), 1e-6)
    spread = np.sqrt(tr / max(float(a.weight), 1.0))
    np.testing.assert_allclose(np.asarray(a.mean), np.asarray(b.mean), atol=1e-4 * (1 + spread))
    np.testing.assert_allclose(float(a.trace), float(b.trace), rtol=1e-4, atol=1e-6)
    tol = 2e-5 * tr
    ell = a.sketch.shape[0]
    gap = np.linalg.norm(_gram(a) - _gram(b), 2)
    assert gap <= max(float(a.shrunk), float(b.shrunk)) + tol, (gap, a.shrunk, b.shrunk)
    for s in (a, b):
        assert float(s.shrunk) <= tr / ell + tol


class TestFrequentDirectionsLaws(LawSuite):
    # Integer weights do not equal repeated rows exactly for a sketch (the shrinks differ):
    # weighted streams are checked against their own FD bound below instead.
    case = LawCase(
        make=lambda: jaxmon.frequent_directions(sketch_size=8), compare=fd_compare, d=10, n=64
    )


def decaying_rows(rng, n, d, mean=100.0):
    """Rows with a geometrically decaying spectrum and a large mean."""
    scales = 0.8 ** np.arange(d)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return ((rng.standard_normal((n, d)) * scales) @ basis.T + mean).astype(np.float32)


def _merge_orders(est, parts):
    """The same pieces merged sequentially, in reverse, as a balanced tree, and randomly."""
    d = parts[0].shape[1]
    n = max(len(p) for p in parts)
    states = []
    for p in parts:  # padded with masked rows so that one compiled update serves every piece
        xp = np.zeros((n, d), np.float32)
        xp[: len(p)] = p
        s0 = est.init(jax.ShapeDtypeStruct((d,), jnp.float32))
        states.append(est.update(s0, jnp.asarray(xp), mask=jnp.asarray(np.arange(n) < len(p))))
    seq = states[0]
    for s in states[1:]:
        seq = est.merge(seq, s)
    rev = states[-1]
    for s in reversed(states[:-1]):
        rev = est.merge(s, rev)
    tree = list(states)
    while len(tree) > 1:
        tree = [
            est.merge(tree[i], tree[i + 1]) if i + 1 < len(tree) else tree[i]
            for i in range(0, len(tree), 2)
        ]
    rng = np.random.default_rng(1)
    pool = list(states)
    while len(pool) > 1:
        i, j = sorted(rng.choice(len(pool), 2, replace=False))
        b, a = pool.pop(j), pool.pop(i)
        pool.append(est.merge(a, b))
    return {"sequential": seq, "reverse": rev, "tree": tree[0], "random": pool[0]}


def test_bound_against_exact_svd_after_merges_in_any_order(rng):
    d, ell = 40, 8
    x = decaying_rows(rng, 700, d)
    est = jaxmon.frequent_directions(sketch_size=ell)
    parts = np.split(x, [50, 51, 230, 400, 420, 690])
    x64 = x.astype(np.float64)
    c = (x64 - x64.mean(0)).T @ (x64 - x64.mean(0))
    eig = np.sort(np.linalg.eigvalsh(c))[::-1]
    tol = 1e-5 * eig.sum()
    for order, s in _merge_orders(est, parts).items():
        delta = float(jaxmon.sketch_error_bound(s))
        err = c - _gram(s)
        ev = np.linalg.eigvalsh(err)
        # 0 ≼ C − BᵀB ≼ Δ·I: the sketch never overstates the covariance, by at most Δ.
        assert ev.min() >= -tol, (order, ev.min())
        assert np.abs(ev).max() <= delta + tol, (order, np.abs(ev).max(), delta)
        for k in range(ell):
            tail = eig[k:].sum()  # ‖A − A_k‖²_F of the centred rows
            assert delta <= tail / (ell - k) + tol, (order, k, delta, tail / (ell - k))
        assert delta > 0  # the stream is longer than ℓ: the bound is not vacuous
        np.testing.assert_allclose(np.asarray(s.mean), x64.mean(0), rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(float(s.trace), eig.sum(), rtol=1e-4)
        assert jaxmon.num_rows(s) == len(x)


def test_low_rank_stream_is_captured_exactly(rng):
    # Rank-3 data in d=30 with ℓ=8: nothing to shrink, so BᵀB equals C and Δ ≈ 0.
    x = (rng.standard_normal((500, 3)) @ rng.standard_normal((3, 30)) + 7).astype(np.float32)
    est = jaxmon.frequent_directions(sketch_size=8)
    s = est.update(est.init(x[0]), jnp.asarray(x))
    x64 = x.astype(np.float64)
    c = (x64 - x64.mean(0)).T @ (x64 - x64.mean(0))
    assert float(jaxmon.sketch_error_bound(s)) <= 1e-5 * np.trace(c)
    np.testing.assert_allclose(_gram(s), c, atol=2e-5 * np.trace(c))


def test_fitted_sketch_components_and_scores(rng):
    d, ell = 20, 6
    x = decaying_rows(rng, 400, d, mean=50.0)
    est = jaxmon.frequent_directions(sketch_size=ell, rank=2)
    f = est.finalize(est.update(est.init(x[0]), jnp.asarray(x)))
    assert f.sketch.shape == (ell, d)
    v = np.asarray(f.components, np.float64)
    nz = np.asarray(f.eigenvalues) > 0
    np.testing.assert_allclose(v[nz] @ v[nz].T, np.eye(nz.sum()), atol=1e-4)
    # The sketched top subspace is close to the exact one (FD: σ² off by at most Δ).
    x64 = x.astype(np.float64)
    cov = np.cov(x64.T, bias=True)
    w = np.linalg.eigvalsh(cov)
    # FD guarantee per eigenvalue: λ_i − Δ/W ≤ λ̂_i ≤ λ_i.
    lam, exact = np.asarray(f.eigenvalues, np.float64), w[::-1][:ell]
    tol = 1e-5 * w.sum()
    assert np.all(lam <= exact + tol)
    assert np.all(lam >= exact - float(jaxmon.sketch_error_bound(f)) - tol)
    assert float(jaxmon.sketch_error_bound(f)) < exact[0]  # and the guarantee is not vacuous
    # Score = squared residual outside the top-2 sketched directions (float64 reference).
    q = decaying_rows(rng, 30, d, mean=50.0) * 1.5
    vk = v[:2]
    z = q.astype(np.float64) - np.asarray(f.mean, np.float64)
    want = np.sum((z - (z @ vk.T) @ vk) ** 2, -1)
    np.testing.assert_allclose(np.asarray(est.score(f, jnp.asarray(q))), want, rtol=1e-3)


def test_weighted_rows_meet_the_bound_on_the_weighted_scatter(rng):
    x = decaying_rows(rng, 300, 12, mean=20.0)
    w = rng.integers(0, 4, len(x)).astype(np.float32)
    est = jaxmon.frequent_directions(sketch_size=5)
    s0 = est.init(x[0])
    s = est.merge(
        est.update(s0, jnp.asarray(x[:120]), weights=jnp.asarray(w[:120])),
        est.update(s0, jnp.asarray(x[120:]), weights=jnp.asarray(w[120:])),
    )
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    mu = w64 @ x64 / w64.sum()
    c = ((x64 - mu) * w64[:, None]).T @ (x64 - mu)
    np.testing.assert_allclose(np.asarray(s.mean), mu, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(s.weight), w64.sum())
    ev = np.linalg.eigvalsh(c - _gram(s))
    tol = 1e-5 * np.trace(c)
    assert ev.min() >= -tol and ev.max() <= float(s.shrunk) + tol
    assert float(s.shrunk) <= np.sort(np.linalg.eigvalsh(c))[::-1][2:].sum() / 3 + tol


def test_bf16_input_accumulates_in_float32(rng):
    x = decaying_rows(rng, 256, 16, mean=5.0)
    est = jaxmon.frequent_directions(sketch_size=6)
    s = est.update(
        est.init(jax.ShapeDtypeStruct((16,), jnp.bfloat16)), jnp.asarray(x, jnp.bfloat16)
    )
    assert s.sketch.dtype == jnp.float32 and s.mean.dtype == jnp.float32
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    c = (xb - xb.mean(0)).T @ (xb - xb.mean(0))
    assert np.linalg.norm(c - _gram(s), 2) <= float(s.shrunk) + 1e-5 * np.trace(c)


@pytest.mark.parametrize(("sketch_size", "rank"), [(1, None), (4, 4), (4, -1)])
def test_bad_hyperparameters(sketch_size, rank):
    with pytest.raises(ValueError, match=r"sketch_size|rank"):
        jaxmon.frequent_directions(sketch_size=sketch_size, rank=rank)


def test_error_bound_rejects_other_states():
    est = jaxmon.gaussian()
    with pytest.raises(TypeError, match="Frequent Directions"):
        jaxmon.sketch_error_bound(est.init(jax.ShapeDtypeStruct((3,), jnp.float32)))


def test_empty_state_can_be_donated(rng):
    # Leaves of an empty state must not alias one buffer, or donation fails.
    est = jaxmon.frequent_directions(sketch_size=4)
    x = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
    step = jax.jit(lambda s, x: est.update(s, x), donate_argnums=0)
    s = step(est.init(jax.ShapeDtypeStruct((6,), jnp.float32)), x)
    assert jaxmon.num_rows(step(s, x)) == 32
