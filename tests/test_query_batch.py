"""Whole-batch detectors over a store: streaming passes equal the in-memory functions."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import jaxmon
from jaxmon import io, query

D = 12


@pytest.fixture
def poisoned_store(tmp_path, rng):
    """Trusted rows, then a query split where 15% of rows carry a weak shared direction."""
    direction = np.zeros(D, np.float32)
    direction[:3] = 1.0
    trusted = rng.normal(size=(1200, D)).astype(np.float32) + 2.0
    queries = rng.normal(size=(1200, D)).astype(np.float32) + 2.0
    poisoned = rng.random(1200) < 0.15
    queries[poisoned] += 2.0 * direction
    with io.ActivationWriter(tmp_path / "store", chunk_rows=64) as w:
        w.write({"h": trusted}, split="trusted")
        w.write({"h": queries}, split="query", label=poisoned.astype(np.int32))
    return tmp_path / "store", trusted, queries, poisoned


@pytest.mark.parametrize("method", ["que", "spectral"])
def test_streamed_batch_detector_equals_in_memory(poisoned_store, tmp_path, method):
    path, trusted, queries, poisoned = poisoned_store
    res = query.score_store_batch(
        path, out=tmp_path / method, method=method, query_split="query", block_rows=256
    )
    (key,) = res.keys
    got = np.asarray(res.scores(key, 0, 2400))
    g = jaxmon.gaussian()
    t = g.finalize(g.update(g.init(trusted), jnp.asarray(trusted)))
    qm = g.update(g.init(queries), jnp.asarray(queries))
    fn = jaxmon.que_scores if method == "que" else jaxmon.spectral_signature_scores
    want = np.asarray(fn(t, qm, jnp.asarray(np.concatenate([trusted, queries]))))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.median(np.abs(want)))
    # The shared direction is what a per-set detector is for: poisoned rows rank high.
    assert roc_auc_score(poisoned, got[1200:]) > 0.85
