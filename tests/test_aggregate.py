"""Token-to-sequence aggregation against plain Python loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon


def _reference(v, ids, mask, n, reduce, window, fill):
    out = np.full(n, fill, np.float64)
    for s in range(n):
        x = v[(ids == s) & mask]  # token order preserved
        if len(x) == 0:
            continue
        if reduce == "max":
            out[s] = x.max()
        elif reduce == "mean":
            out[s] = x.mean()
        elif len(x) < window:
            out[s] = x.mean()
        else:
            out[s] = max(x[i : i + window].mean() for i in range(len(x) - window + 1))
    return out


@pytest.mark.parametrize("reduce,window", [("max", None), ("mean", None), ("max_rolling_mean", 4)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_loops(reduce, window, contiguous):
    rng = np.random.default_rng(0)
    n_tok, n = 300, 12
    ids = np.sort(rng.integers(-1, n + 1, n_tok))  # includes ignored ids -1 and n
    if not contiguous:
        ids = rng.permutation(ids)
    v = rng.standard_normal(n_tok).astype(np.float32)
    v[rng.random(n_tok) < 0.1] = -5.0  # ties and negatives
    mask = rng.random(n_tok) < 0.85
    fn = jax.jit(
        lambda v, ids, m: jaxmon.sequence_scores(
            v, ids, num_segments=n + 2, reduce=reduce, window=window, mask=m, fill=-7.0
        )
    )
    got = np.asarray(fn(jnp.asarray(v), jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    # n + 2 segments: segment n is present in ids, n + 1 is empty (gets the fill).
    ref = _reference(v, ids, mask, n + 2, reduce, window or 0, -7.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert got[n + 1] == -7.0


def test_pytree_scores_leading_axes_and_short_sequences():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((2, 5)).astype(np.float32)
    ids = np.array([[0, 0, 0, 1, 1], [2, 2, 2, 2, 2]], np.int32)
    out = jaxmon.sequence_scores(
        {"a": jnp.asarray(v), "b": jnp.asarray(-v)},
        jnp.asarray(ids),
        num_segments=3,
        reduce="max_rolling_mean",
        window=3,
    )
    for key, x in (("a", v), ("b", -v)):
        ref = _reference(x.reshape(-1), ids.reshape(-1), np.ones(10, bool), 3, "roll", 3, 0.0)
        np.testing.assert_allclose(np.asarray(out[key]), ref, rtol=1e-6)


def test_errors():
    s, ids = jnp.zeros(4), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="reduce"):
        jaxmon.sequence_scores(s, ids, num_segments=2, reduce="median")
    with pytest.raises(ValueError, match="window"):
        jaxmon.sequence_scores(s, ids, num_segments=2, reduce="max_rolling_mean")
    with pytest.raises(jaxmon.ShapeError, match="segment_ids"):
        jaxmon.sequence_scores(jnp.zeros(5), ids, num_segments=2)
    with pytest.raises(jaxmon.ShapeError, match="integers"):
        jaxmon.sequence_scores(s, jnp.zeros(4), num_segments=2)


def test_sequence_p_values_are_calibrated_on_clean_sequences():
    # Null aggregates: the max over 50 tokens of N(0, 1); token-level p-values would call
    # every sequence anomalous, sequence-level ones are uniform on clean sequences.
    rng = np.random.default_rng(0)
    tok = rng.normal(size=(4000, 50)).astype(np.float32)
    ids = np.repeat(np.arange(4000), 50).astype(np.int32)
    agg = jaxmon.sequence_scores(jnp.asarray(tok.reshape(-1)), jnp.asarray(ids), num_segments=4000)
    np.testing.assert_allclose(np.asarray(agg), tok.max(1), rtol=1e-6)
    null = jaxmon.sequence_null({"k": agg[:2000]})
    p = np.asarray(jaxmon.sequence_p_values(null, {"k": agg[2000:]})["k"])
    for a in (0.01, 0.05, 0.2, 0.5):
        assert abs(np.mean(p <= a) - a) < 0.02 + a * 0.1, (a, np.mean(p <= a))
    # Beyond the clean sequences: strictly decreasing, log p never underflows.
    far = jnp.asarray([10.0, 20.0, 40.0, 1e4], jnp.float32)
    lp = np.asarray(jaxmon.sequence_p_values(null, {"k": far}, log=True)["k"])
    assert np.all(np.diff(lp) < 0) and np.all(np.isfinite(lp))


def test_host_sequence_table_matches_loops_and_the_device_aggregation():
    """SequenceTable (numpy, blocks, any ids) equals plain loops and sequence_scores."""
    from jaxmon._aggregate import SequenceTable

    rng = np.random.default_rng(3)
    n_tok = 700
    ids = rng.choice(np.array([-4, 0, 7, 9, 100, 2**40]), n_tok)  # any ints, interleaved
    s = {"a": rng.standard_normal(n_tok) * 1e3 + 1e6, "b": -rng.exponential(size=n_tok)}
    label = rng.integers(-3, 3, n_tok)
    table = SequenceTable(["a", "b"], columns=["label"])
    for lo, hi in [(0, 1), (1, 250), (250, 251), (251, 700)]:  # a sequence spans blocks
        table.add(ids[lo:hi], {k: v[lo:hi] for k, v in s.items()}, {"label": label[lo:hi]})
    got = table.finish()
    uniq = np.unique(ids)
    np.testing.assert_array_equal(got["sequence_id"], uniq)
    for j, sid in enumerate(uniq):
        sel = ids == sid
        assert got["tokens"][j] == sel.sum()
        assert got["label"][j] == max(-1, max(label[sel]))
        for k, v in s.items():
            assert got[f"max/{k}"][j] == max(v[sel])
            np.testing.assert_allclose(got[f"mean/{k}"][j], sum(v[sel]) / sel.sum(), rtol=1e-13)
    assert SequenceTable(["a"]).finish() == {}
    # The device implementation (float32, ids renumbered to 0..n-1) gives the same aggregates.
    dense = np.searchsorted(uniq, ids).astype(np.int32)
    for reduce in ("max", "mean"):
        dev = jaxmon.sequence_scores(
            {k: jnp.asarray(v - 1e6 if k == "a" else v, jnp.float32) for k, v in s.items()},
            jnp.asarray(dense),
            num_segments=len(uniq),
            reduce=reduce,
        )
        for k in s:
            want = got[f"{reduce}/{k}"] - (1e6 if k == "a" else 0)
            np.testing.assert_allclose(np.asarray(dev[k]), want, rtol=1e-5, atol=1e-3)
