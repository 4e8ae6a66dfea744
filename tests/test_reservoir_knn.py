"""Priority reservoir (bit-exact merges in any order, uniform sample) and kNN against
brute-force float64 numpy on the same bank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxmon
from jaxmon.estimators.reservoir import row_priority, seed_salts

from laws import LawCase, LawSuite, leaves_close


class TestReservoirLaws(LawSuite):
    case = LawCase(make=lambda: jaxmon.reservoir(size=40, seed=3), exact_merge=True)


class TestKNNLaws(LawSuite):
    case = LawCase(make=lambda: jaxmon.knn(k=3, bank_size=40), exact_merge=True)


def _states(est, parts, n):
    d = parts[0].shape[1]
    out = []
    for p in parts:  # padded with masked rows: one compiled update for every piece
        x = np.zeros((n, d), np.float32)
        x[: len(p)] = p
        s0 = est.init(jax.ShapeDtypeStruct((d,), jnp.float32))
        out.append(est.update(s0, jnp.asarray(x), mask=jnp.asarray(np.arange(n) < len(p))))
    return out


def test_merge_is_bit_identical_in_any_order_and_equals_one_pass(rng):
    x = (rng.standard_normal((300, 5)) * 3 + 10).astype(np.float32)
    est = jaxmon.reservoir(size=32, seed=7)
    whole = _states(est, [x], 300)[0]
    perm = rng.permutation(300)
    parts = np.split(x[perm], [17, 90, 91, 200, 260])
    states = _states(est, parts, 300)
    seq = states[0]
    for s in states[1:]:
        seq = est.merge(seq, s)
    rev = states[-1]
    for s in reversed(states[:-1]):
        rev = est.merge(rev, s)
    tree = est.merge(
        est.merge(est.merge(states[4], states[1]), states[0]),
        est.merge(states[5], est.merge(states[3], states[2])),
    )
    for s in (seq, rev, tree):
        leaves_close(s, whole, rtol=0, atol=0)
    # The sample is the 32 rows of smallest priority, sorted by priority, all from the input.
    hi, lo = (np.asarray(a) for a in row_priority(jnp.asarray(x), seed_salts(7)))
    key = (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)
    want = x[np.argsort(key)[:32]]
    np.testing.assert_array_equal(np.asarray(whole.rows), want)
    assert bool(np.all(whole.filled)) and jaxmon.num_rows(whole) == 300


def test_sample_is_uniform_over_stream_positions():
    # 400 independent streams of 200 distinct rows (column 1 tags the stream, so the content
    # hash draws fresh priorities); a reservoir of 20 keeps each position with p = 0.1.
    n, size, trials = 200, 20, 400
    est = jaxmon.reservoir(size=size, seed=11)
    s0 = est.init(jax.ShapeDtypeStruct((2,), jnp.float32))
    hits = np.zeros(n)
    pos = np.arange(n, dtype=np.float32)
    for t in range(trials):
        x = np.stack([pos, np.full(n, t, np.float32)], 1)
        s = est.update(s0, jnp.asarray(x))
        kept = np.asarray(s.rows)[:, 0].astype(int)
        assert len(set(kept)) == size
        hits[kept] += 1
    bins = hits.reshape(10, 20).sum(1)  # expected trials*size/10 = 800 per bin of positions
    chi2 = ((bins - bins.mean()) ** 2 / bins.mean()).sum()
    assert stats.chi2.sf(chi2, 9) > 1e-3, (chi2, bins)
    # Early and late positions alike (a reservoir biased to the stream's start would fail).
    assert abs(hits[:100].sum() - hits[100:].sum()) < 4 * np.sqrt(trials * size)


def test_seeds_give_different_samples(rng):
    x = rng.standard_normal((200, 4)).astype(np.float32)
    a, b = (jaxmon.reservoir(size=10, seed=s) for s in (0, 1))
    ra = np.asarray(a.update(a.init(x[0]), jnp.asarray(x)).rows)
    rb = np.asarray(b.update(b.init(x[0]), jnp.asarray(x)).rows)
    assert len({r.tobytes() for r in ra} & {r.tobytes() for r in rb}) < 5


def _kth(q, bank, k):
    d2 = ((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
    return np.sqrt(np.sort(d2, 1)[:, k - 1])


@pytest.mark.parametrize("normalize", [False, True])
def test_knn_matches_brute_force_float64_on_the_same_bank(normalize, rng):
    d, k = 8, 5
    x = (rng.standard_normal((600, d)) * 2 + 50).astype(np.float32)
    # Small blocks that divide neither the bank (100) nor the queries (333): padding exercised.
    est = jaxmon.knn(k=k, bank_size=100, normalize=normalize, query_block=64, bank_block=40)
    s = est.update(est.init(x[0]), jnp.asarray(x))
    bank = np.asarray(s.rows, np.float64)[np.asarray(s.filled)]
    assert len(bank) == 100
    q = (rng.standard_normal((333, d)) * 3 + 50).astype(np.float32)
    q64 = q.astype(np.float64)
    if normalize:
        bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    want = _kth(q64, bank, k)
    got = np.asarray(est.score(est.finalize(s), jnp.asarray(q)))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * want.max())


def test_knn_with_a_bank_short_of_k_rows_is_refused(rng):
    est = jaxmon.knn(k=4, bank_size=16)
    x = rng.standard_normal((3, 2)).astype(np.float32)
    s = est.update(est.init(x[0]), jnp.asarray(x))
    with pytest.raises(jaxmon.NotFittedError, match="3 distinct rows but k=4"):
        est.finalize(s)
    # Under jit nothing can raise: every score is +inf (no neighbour is close enough to vouch).
    f = jax.jit(est.finalize)(s)
    assert np.all(np.isinf(np.asarray(est.score(f, jnp.asarray(x)))))


def test_reservoir_score_is_nearest_sample_distance(rng):
    x = rng.standard_normal((50, 3)).astype(np.float32)
    est = jaxmon.reservoir(size=20, seed=0)
    s = est.update(est.init(x[0]), jnp.asarray(x))
    q = rng.standard_normal((30, 3)).astype(np.float32)
    want = _kth(q.astype(np.float64), np.asarray(s.rows, np.float64), 1)
    got = np.asarray(est.score(est.finalize(s), jnp.asarray(q)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_weights_and_bad_hyperparameters_are_rejected():
    est = jaxmon.reservoir(size=4)
    s = est.init(jax.ShapeDtypeStruct((2,), jnp.float32))
    with pytest.raises(ValueError, match="weights"):
        est.update(s, jnp.ones((3, 2)), weights=jnp.ones(3))
    with pytest.raises(ValueError, match="k"):
        jaxmon.knn(k=10, bank_size=5)
    with pytest.raises(ValueError, match="size"):
        jaxmon.reservoir(size=0)
