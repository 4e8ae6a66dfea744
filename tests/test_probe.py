"""Probes: the shared laws, label laws, scikit-learn's LDA, monitors, calibration, checkpoints."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf, oas
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import jaxmon
from jaxmon import checkpoint
from jaxmon._base import EstimatorSpec, check_rows, register

from laws import LawCase, LawSuite, leaves_close

D = 6


def _labels_of(x: jax.Array) -> jax.Array:
    """Labels derived from the rows' content (so every law's split keeps them): flagged when
    the first feature is high."""
    return (x[..., 0] > 4.0).astype(jnp.int32)


@register("_test_probe_self_labelled")
def self_labelled(kind: str = "mean_difference") -> jaxmon.Estimator:
    """A test-only estimator: the probe with labels derived from the rows themselves, so the
    law suite (which feeds rows only) runs every law on the real update/merge/finalize/score."""
    inner = jaxmon.probe(kind)
    spec = EstimatorSpec("_test_probe_self_labelled", {"kind": kind})

    def update(state, x, *, mask=None, weights=None):
        d = state.trusted.mean.shape[0]
        check_rows(x, d, name="probe (test adapter)", mask=mask, weights=weights)
        return inner.update(state, x, mask=mask, weights=weights, labels=_labels_of(x))

    return inner._replace(update=jax.jit(update), spec=spec)


class TestProbeLaws(LawSuite):
    case = LawCase(make=lambda: self_labelled(), weights=True)


class TestLDAProbeLaws(LawSuite):
    case = LawCase(make=lambda: self_labelled("lda"), weights=True)


# --------------------------------------------------------------------------- label laws


def _planted(seed: int, d: int, n0: int, n1: int, *, delta: float, scales: float = 0.0):
    """Correlated trusted rows and flagged rows shifted along a planted direction."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    a = a * np.exp(rng.normal(size=d) * scales)[None, :]
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)

    def draw(n, shift):
        return (rng.normal(size=(n, d)) @ a + 2.0 + shift * (u @ a)).astype(np.float32)

    return draw, (lambda n: draw(n, 0.0)), (lambda n: draw(n, delta))


def _fit(est, x, y, *, example_dtype=jnp.float32):
    s = est.init(jax.ShapeDtypeStruct((x.shape[-1],), example_dtype))
    return est.update(s, jnp.asarray(x, example_dtype), labels=jnp.asarray(y))


@pytest.mark.parametrize("kind", ["mean_difference", "lda"])
def test_per_class_merges_are_exact_and_unknown_labels_are_dropped(kind):
    est = jaxmon.probe(kind)
    _, trusted, flagged = _planted(0, D, 0, 0, delta=3.0)
    x = np.concatenate([trusted(300), flagged(40), trusted(60)])
    y = np.r_[np.zeros(300, int), np.ones(40, int), np.full(60, -1)]
    perm = np.random.default_rng(1).permutation(len(x))
    whole = _fit(est, x, y)
    # Split at every class boundary and merge in another order: the same state.
    parts = [_fit(est, x[perm][i::3], y[perm][i::3]) for i in range(3)]
    merged = est.merge(est.merge(parts[2], parts[0]), parts[1])
    leaves_close(merged, whole, rtol=1e-5, atol=1e-4)
    # Label -1 rows are ignored: they equal dropping the rows.
    dropped = _fit(est, x[y >= 0], y[y >= 0])
    leaves_close(whole, dropped, rtol=1e-5, atol=1e-4)
    assert jaxmon.num_rows(whole) == {".trusted.counts": 300, ".flagged.counts": 40}
    # The trusted class is exactly a Gaussian's state of the trusted rows (same numerics).
    g = jaxmon.gaussian()
    gs = g.update(g.init(jax.ShapeDtypeStruct((D,), jnp.float32)), jnp.asarray(x[y == 0]))
    leaves_close(whole.trusted, gs, rtol=1e-5, atol=1e-4)


def test_no_labels_means_trusted_and_a_probe_needs_both_classes():
    est = jaxmon.probe()
    _, trusted, _ = _planted(2, D, 0, 0, delta=3.0)
    x = trusted(200)
    s = est.update(est.init(jax.ShapeDtypeStruct((D,), jnp.float32)), jnp.asarray(x))
    leaves_close(s, _fit(est, x, np.zeros(200, int)), rtol=0, atol=0)
    with pytest.raises(jaxmon.NotFittedError, match="no rows labelled flagged"):
        est.finalize(s)
    with pytest.raises(jaxmon.ShapeError, match="labels"):
        est.update(s, jnp.asarray(x), labels=jnp.zeros((199,), jnp.int32))
    with pytest.raises(jaxmon.ShapeError, match="integers"):
        est.update(s, jnp.asarray(x), labels=jnp.zeros((200,), jnp.float32))


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_free_shrinkage_matches_scikit_learn_on_standardised_rows(seed):
    rng = np.random.default_rng(seed)
    d, n = 24, 400
    a = (rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)) * np.exp(rng.normal(size=d))[None]
    x = (rng.normal(size=(n, d)) @ a + 5.0).astype(np.float32)
    g = jaxmon.gaussian()
    m = g.update(g.init(jax.ShapeDtypeStruct((d,), jnp.float32)), jnp.asarray(x))
    z = (x - x.mean(0)) / x.std(0)
    _, lw = ledoit_wolf(z.astype(np.float64))
    _, oa = oas(z.astype(np.float64))
    _, s_lw = jaxmon.scale_free_covariance(m, "ledoit_wolf")
    cov_oas, s_oas = jaxmon.scale_free_covariance(m, "oas")
    # OAS needs second moments only: exact. Ledoit-Wolf's fourth moment of standardised rows
    # is estimated from the raw rows' kurtosis (documented): within 10% on Gaussian rows.
    assert float(s_oas) == pytest.approx(oa, rel=1e-4)
    assert float(s_lw) == pytest.approx(lw, rel=0.1)
    # The shrunk matrix is (1 - s) S + s diag(S), against float64 numpy.
    emp = np.cov(x.astype(np.float64).T, bias=True)
    want = (1 - float(s_oas)) * emp + float(s_oas) * np.diag(np.diag(emp))
    np.testing.assert_allclose(np.asarray(cov_oas), want, rtol=2e-4, atol=1e-4 * emp.max())


@pytest.mark.parametrize(
    ("seed", "scales", "n1"), [(0, 0.0, 20), (1, 0.0, 20), (2, 1.0, 20), (3, 0.5, 200)]
)
def test_auroc_matches_scikit_learn_lda_on_a_planted_direction(seed, scales, n1):
    d, n0 = 32, 2000
    _, trusted, flagged = _planted(seed, d, n0, n1, delta=0.5, scales=scales)
    x = np.concatenate([trusted(n0), flagged(n1)])
    y = np.r_[np.zeros(n0, int), np.ones(n1, int)]
    xt = np.concatenate([trusted(3000), flagged(3000)])
    yt = np.r_[np.zeros(3000), np.ones(3000)]
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, y)
    want = roc_auc_score(yt, sk.decision_function(xt))
    for kind in ("mean_difference", "lda"):
        est = jaxmon.probe(kind)
        f = est.finalize(_fit(est, x, y))
        got = roc_auc_score(yt, np.asarray(est.score(f, jnp.asarray(xt))))
        assert got == pytest.approx(want, abs=0.005), (kind, got, want)


def test_logistic_probe_learns_the_direction_and_says_it_is_not_mergeable():
    d, n0, n1 = 16, 4000, 40
    _, trusted, flagged = _planted(5, d, n0, n1, delta=1.0)
    x0, x1 = trusted(n0), flagged(n1)
    est = jaxmon.probe("logistic", l2=1e-2, learning_rate=0.05)
    assert not est.spec.mergeable and est.spec.supervised
    s = est.init(jax.ShapeDtypeStruct((d,), jnp.float32))
    rng = np.random.default_rng(0)
    for _ in range(300):  # batches carry the few flagged rows, as the docstring asks
        xb = np.concatenate([x0[rng.choice(n0, 256)], x1])
        yb = np.r_[np.zeros(256, int), np.ones(n1, int)]
        s = est.update(s, jnp.asarray(xb), labels=jnp.asarray(yb))
    f = est.finalize(s)
    xt = np.concatenate([trusted(3000), flagged(3000)])
    yt = np.r_[np.zeros(3000), np.ones(3000)]
    ref = LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000)
    ref.fit(np.concatenate([x0, x1]), np.r_[np.zeros(n0), np.ones(n1)])
    want = roc_auc_score(yt, ref.decision_function(xt))
    got = roc_auc_score(yt, np.asarray(est.score(f, jnp.asarray(xt))))
    assert got == pytest.approx(want, abs=0.02), (got, want)


def test_bf16_input_matches_its_float32_upcast():
    est = jaxmon.probe()
    _, trusted, flagged = _planted(6, D, 0, 0, delta=3.0)
    x = np.concatenate([trusted(500), flagged(50)])
    y = np.r_[np.zeros(500, int), np.ones(50, int)]
    xb = jnp.asarray(x, jnp.bfloat16)
    fb = est.finalize(_fit(est, xb, y, example_dtype=jnp.bfloat16))
    ff = est.finalize(_fit(est, xb.astype(jnp.float32), y))
    q = jnp.asarray(trusted(64))
    np.testing.assert_allclose(est.score(fb, q), est.score(ff, q), rtol=3e-2, atol=3e-2)


# --------------------------------------------------------------------------- everywhere


@functools.cache
def _monitor():
    return jaxmon.monitor({"t": {"probe": jaxmon.probe(), "gauss": jaxmon.gaussian()}})


def test_monitor_gives_labels_to_probes_and_only_trusted_rows_to_the_rest():
    mon = _monitor()
    assert mon.spec.supervised
    _, trusted, flagged = _planted(7, D, 0, 0, delta=3.0)
    x = np.concatenate([trusted(400), flagged(30)])
    y = np.r_[np.zeros(400, int), np.ones(30, int)]
    s = mon.init({"t": jax.ShapeDtypeStruct((D,), jnp.float32)})
    s = mon.update(s, {"t": jnp.asarray(x)}, labels=jnp.asarray(y))
    g = jaxmon.gaussian()
    alone = g.update(g.init(jax.ShapeDtypeStruct((D,), jnp.float32)), jnp.asarray(x[:400]))
    leaves_close(s["t:gauss"], alone, rtol=1e-5, atol=1e-4)  # flagged rows never leak in
    assert jaxmon.num_rows(s["t:probe"]) == {".trusted.counts": 400, ".flagged.counts": 30}
    f = mon.finalize(s)
    q = {"t": jnp.asarray(np.concatenate([trusted(200), flagged(200)]))}
    sc = np.asarray(mon.score(f, q)["t:probe"])
    assert roc_auc_score(np.r_[np.zeros(200), np.ones(200)], sc) > 0.95


def test_calibrated_probe_calibrates_on_trusted_rows_and_round_trips_a_checkpoint(tmp_path):
    cal = jaxmon.calibrated(_monitor())
    assert cal.spec.supervised
    _, trusted, flagged = _planted(8, D, 0, 0, delta=3.0)
    ex = {"t": jax.ShapeDtypeStruct((D,), jnp.float32)}
    x = np.concatenate([trusted(400), flagged(30)])
    y = np.r_[np.zeros(400, int), np.ones(30, int)]
    s = cal.update(cal.init(ex), {"t": jnp.asarray(x)}, labels=jnp.asarray(y))
    s = jaxmon.begin_calibration(cal, s)
    held = np.concatenate([trusted(300), flagged(50)])
    hy = np.r_[np.zeros(300, int), np.ones(50, int)]
    s = cal.update(s, {"t": jnp.asarray(held)}, labels=jnp.asarray(hy))
    sketch = s.scores["t:probe"]
    assert jaxmon.num_rows(sketch) == 300  # the 50 flagged held-out rows are not the null
    f = cal.finalize(s)
    p = np.asarray(jaxmon.p_values(f, {"t": jnp.asarray(trusted(2000))})["t:probe"])
    assert abs(np.mean(p <= 0.1) - 0.1) < 0.03  # calibrated on trusted rows: uniform p
    checkpoint.save(tmp_path / "ck", cal, s, fitted=f, example=ex)
    ck = jaxmon.load(tmp_path / "ck")
    q = {"t": jnp.asarray(flagged(16))}
    np.testing.assert_array_equal(
        ck.estimator.score(ck.fitted, q)["t:probe"], cal.score(f, q)["t:probe"]
    )
