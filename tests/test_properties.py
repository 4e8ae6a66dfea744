"""Property-based guarantees for every estimator of the law suite (issue 11's battery, part 2).

Over hypothesis-drawn leading shapes, dtypes, masks and NaN/inf patterns, for every estimator:

* no exception but a jaxmon one (``jaxmon.errors.JaxmonError``) escapes ``init``/``update``/
  ``merge``/``finalize``/``score``; the only refusals allowed on well-formed input are
  ``NotFittedError`` (no usable rows) and, for ill-formed input, ``ShapeError``;
* a finite, unmasked query row never scores NaN; a row holding NaN/inf scores ``+inf``; a masked
  row scores 0.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxmon
from jaxmon.errors import JaxmonError, NotFittedError, ShapeError

D = 4
# A few fixed row counts keep the number of compilations small; the draws vary the rest.
ROWS = (0, 1, 3, 24)

ESTIMATORS = {
    "gaussian": lambda: jaxmon.gaussian(),
    "gaussian_lw": lambda: jaxmon.gaussian(shrinkage="ledoit_wolf"),
    "gaussian_diag": lambda: jaxmon.gaussian(diagonal=True),
    "gaussian_relative": lambda: jaxmon.gaussian(relative=True),
    "pca_residual": lambda: jaxmon.pca_residual(rank=2),
    "pca_residual_fd": lambda: jaxmon.pca_residual(rank=1, source="frequent_directions"),
    "frequent_directions": lambda: jaxmon.frequent_directions(sketch_size=4),
    "reservoir": lambda: jaxmon.reservoir(size=8),
    "knn": lambda: jaxmon.knn(k=2, bank_size=8),
    "mixture": lambda: jaxmon.gaussian_mixture(components=2, bank_size=16, iters=3),
    "flow": lambda: jaxmon.flow(num_layers=2, hidden=8),
    "quantiles": lambda: jaxmon.quantiles(),
}


@functools.cache
def _est(name: str) -> jaxmon.Estimator:
    return ESTIMATORS[name]()


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@st.composite
def batches(draw, *, rows: int | None = None):
    """A batch ``x`` (leading shape [n] or [2, n/2]), a mask or None, and its NaN/inf rows."""
    n = draw(st.sampled_from(ROWS)) if rows is None else rows
    two_d = n % 2 == 0 and n > 0 and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = (rng.standard_normal((n, D)) * draw(st.sampled_from([0.1, 1.0, 30.0])) + 2.0).astype(
        np.float32
    )
    poison = np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    for i in np.flatnonzero(poison):
        x[i, draw(st.integers(0, D - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    mask = None
    if draw(st.booleans()):
        mask = np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    lead = (2, n // 2) if two_d else (n,)
    dtype = _DTYPES[draw(st.sampled_from(list(_DTYPES)))]
    xs = jnp.asarray(x.reshape(*lead, D), dtype)
    ms = None if mask is None else jnp.asarray(mask.reshape(lead))
    return xs, ms, poison.reshape(lead), (mask.reshape(lead) if mask is not None else None)


def _jaxmon_only(fn, *args, **kwargs):
    """Calls ``fn``; any exception that is not a jaxmon error fails the test."""
    try:
        return fn(*args, **kwargs)
    except JaxmonError:
        raise
    except Exception as e:  # pragma: no cover - the failure path
        pytest.fail(f"a non-jaxmon {type(e).__name__} escaped {fn}: {e}")


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@given(data=st.data())
def test_finite_rows_never_score_nan_and_only_jaxmon_errors_escape(name, data):
    est = _est(name)
    fit, fit_mask, _, _ = data.draw(batches(), label="fit batch")
    state = _jaxmon_only(est.init, jax.ShapeDtypeStruct((D,), fit.dtype))
    state = _jaxmon_only(est.update, state, fit, mask=fit_mask)
    state = _jaxmon_only(est.merge, state, est.init(jax.ShapeDtypeStruct((D,), fit.dtype)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jaxmon.ConditioningWarning)
            fitted = _jaxmon_only(est.finalize, state)
    except NotFittedError:
        # Refused only when no usable row (or, for banks, too few distinct rows) was folded.
        return
    q, q_mask, poison, mask = data.draw(batches(rows=24), label="query batch")
    scores = np.asarray(_jaxmon_only(est.score, fitted, q, mask=q_mask), np.float64)
    assert scores.shape == tuple(q.shape[:-1])
    live = np.ones(poison.shape, bool) if mask is None else mask
    assert not np.any(np.isnan(scores[live])), scores
    assert np.all(np.isposinf(scores[live & poison])), scores[live & poison]
    assert np.all(scores[~live] == 0)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@given(
    width=st.sampled_from([D - 1, D + 1]),
    dtype=st.sampled_from([jnp.int32, jnp.uint8, jnp.bool_]),
    bad=st.sampled_from(["width", "dtype", "mask"]),
)
def test_ill_formed_input_is_a_shape_error(name, width, dtype, bad):
    est = _est(name)
    state = est.init(jax.ShapeDtypeStruct((D,), jnp.float32))
    good = jnp.ones((6, D), jnp.float32)
    if bad == "width":
        args, kw = (jnp.ones((6, width), jnp.float32),), {}
    elif bad == "dtype":
        args, kw = (jnp.ones((6, D), dtype),), {}
    else:
        args, kw = (good,), {"mask": jnp.ones((5,), bool)}
    with pytest.raises(ShapeError):
        est.update(state, *args, **kw)


@functools.cache
def _calibrated_monitor() -> jaxmon.Estimator:
    mon = jaxmon.monitor(
        {"a": jaxmon.gaussian(shrinkage="ledoit_wolf"), ("a", "b"): jaxmon.transition()}
    )
    return jaxmon.calibrated(mon)


@given(data=st.data())
def test_calibrated_monitor_over_a_pair_keeps_the_guarantees(data):
    cal = _calibrated_monitor()
    example = {t: jax.ShapeDtypeStruct((D,), jnp.float32) for t in ("a", "b")}

    def taps(batch):
        x, m, poison, mask = batch
        x = x.astype(jnp.float32)
        # Tap b is a noisy linear function of tap a (the pair's transition is learnable).
        return {"a": x, "b": x[..., ::-1] * 0.5 + 1.0}, m, poison, mask

    fit, fit_mask, _, _ = taps(data.draw(batches(rows=24), label="fit"))
    held, held_mask, _, _ = taps(data.draw(batches(rows=24), label="held-out"))
    try:
        s = _jaxmon_only(cal.update, cal.init(example), fit, mask=fit_mask)
        s = _jaxmon_only(jaxmon.begin_calibration, cal, s)
        s = _jaxmon_only(cal.update, s, held, mask=held_mask)
        fitted = _jaxmon_only(cal.finalize, s)
    except NotFittedError:
        return
    q, q_mask, poison, mask = taps(data.draw(batches(rows=24), label="query"))
    out = _jaxmon_only(cal.score, fitted, q, mask=q_mask)
    p = _jaxmon_only(jaxmon.p_values, fitted, q, mask=q_mask)
    live = np.ones(poison.shape, bool) if mask is None else mask
    for key in ("a", "a->b"):
        s = np.asarray(out[key], np.float64)
        assert not np.any(np.isnan(s[live])), (key, s)
        assert np.all(np.isposinf(s[live & poison])), (key, s)
        assert np.all(np.asarray(p[key])[live & poison] == 0.0)
        assert np.all(s[~live] == 0)
