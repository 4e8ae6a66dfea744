"""The README's 30-line tour runs as written, and what it prints is right.

The tour prints the three most anomalous tokens of ``blocks/1/resid:gauss`` (calibrated scores,
``-log10 p``) and the audit of the reloaded against the in-memory fit. Both are recomputed here
in float64 numpy from the rows the tour drew: the Gaussian fit on pass 1, its Mahalanobis
distances, and conformal p-values against the distances of the pass-2 (calibration) rows.
"""

import re
from pathlib import Path

import numpy as np

import jaxmon.query

README = Path(__file__).resolve().parent.parent / "README.md"


class _Recorder:
    """A numpy Generator that keeps every ``normal`` draw (the tour's only use of ``rng``)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.draws = rng, []

    def normal(self, *args, **kwargs):
        out = self.rng.normal(*args, **kwargs)
        self.draws.append(out)
        return out

    def __getattr__(self, name):
        return getattr(self.rng, name)


def _tour_code() -> str:
    section = README.read_text().split("## A 30-line tour", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _acts_by_size(draws: list[np.ndarray]) -> dict[int, list[np.ndarray]]:
    """The tour's ``acts(n)`` values in call order, by ``n``: each call draws ``[n, 16]`` rows,
    then a ``[16, 16]`` mixing matrix, and returns ``rows @ mix + 3`` in float32."""
    out: dict[int, list[np.ndarray]] = {}
    for rows, mix in zip(draws[::2], draws[1::2], strict=True):
        assert mix.shape == (16, 16)
        out.setdefault(rows.shape[0], []).append((rows @ mix + 3).astype(np.float32))
    return out


def _mahalanobis_sq(x, mean, cov):
    y = np.asarray(x, np.float64) - mean
    return np.einsum("nd,nd->n", y, np.linalg.solve(cov, y.T).T)


def test_readme_tour_prints_the_right_numbers(monkeypatch):
    code = _tour_code()
    assert len(code.strip().splitlines()) <= 30  # the heading's promise
    real = np.random.default_rng
    recorders = []

    def default_rng(seed=None):
        rec = _Recorder(real(seed))
        recorders.append(rec)
        return rec

    monkeypatch.setattr(np.random, "default_rng", default_rng)
    scope = {"__name__": "readme_tour"}
    exec(compile(code, str(README), "exec"), scope)
    monkeypatch.setattr(np.random, "default_rng", real)
    acts = _acts_by_size(recorders[0].draws)
    # taps(n) draws blocks/0 then blocks/1; pass 1 (fit), pass 2 (calibration), then the store.
    train, held, query = acts[2048][1], acts[2048][3], acts[5000][1]
    res = scope["res"]
    assert res.rows == 5000
    store = jaxmon.query.open_store(res.summary["store"])
    np.testing.assert_array_equal(store.read("blocks/1/resid", 0, 5000).result(), query)

    # gaussian(): maximum-likelihood covariance, ridge 1e-6 x the mean variance.
    mean = train.astype(np.float64).mean(0)
    cov = np.cov(train.astype(np.float64), rowvar=False, bias=True)
    cov += 1e-6 * np.trace(cov) / 16 * np.eye(16)
    d_cal = np.sort(_mahalanobis_sq(held, mean, cov))
    d_query = _mahalanobis_sq(query, mean, cov)
    np.testing.assert_allclose(res.scores("blocks/1/resid:gauss", raw=True), d_query, rtol=1e-3)

    # The printed top tokens are the rows of largest distance, best first (rows within the
    # sketch's 1% relative bucket width of each other may tie), and each score is -log10 of its
    # conformal p-value (1 + #{calibration >= d}) / (1 + n), up to that bucket width around d
    # (and the tail model past the calibration maximum).
    top = res.top("blocks/1/resid:gauss")[:3]
    rows = [t["row"] for t in top]
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert set(np.flatnonzero(d_query > d_query[rows[-1]] * 1.02)) <= set(rows)
    assert rows[0] == np.argmax(d_query)
    n = len(d_cal)
    for t in top:
        d = d_query[t["row"]]
        assert t["sequence_id"] == 0 and t["position"] == t["row"]
        if d > d_cal[-1]:
            assert t["score"] >= -np.log10(1 / (n + 1)) - 1e-5
            continue
        p_lo = (1 + np.sum(d_cal >= d * 1.02)) / (n + 1)
        p_hi = (1 + np.sum(d_cal >= d / 1.02)) / (n + 1)
        assert -np.log10(p_hi) - 1e-5 <= t["score"] <= -np.log10(p_lo) + 1e-5, (t, p_lo, p_hi)

    # The reloaded fitted monitor equals the in-memory one: every audit statistic is 0.
    cmp = scope["audit"]["blocks/0/resid:gauss"]
    assert cmp.distance == 0.0 and all(v == 0.0 for v in cmp.stats.values()), cmp
    p = scope["p"]
    assert all(np.all((np.asarray(v) > 0) & (np.asarray(v) <= 1)) for v in p.values())
    assert "blocks/0/resid->blocks/1/resid" in p
