"""The shared law suite: every estimator joins it by subclassing :class:`LawSuite`.

A subclass sets ``case`` to a :class:`LawCase`; pytest then runs every law below against it.
Laws (DESIGN.md §2): merge identity, commutativity and associativity over hypothesis-chosen
splits; ``update(concat(a, b)) ≈ merge(update(a), update(b))``; masked rows equal dropped rows;
NaN/inf rows excluded and counted; bf16 input equals its float32 upcast; jit equals eager;
one trace per shape; state types unchanged across init/update/merge; spec JSON round trip;
higher score = more anomalous; mis-shaped input raises a clear ``ShapeError``; query rows
holding NaN/inf score ``+inf`` and leave the other rows' scores unchanged; finalizing a state
without rows raises ``NotFittedError``, and a fit finalized under ``jit`` scores NaN.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxmon


def normal_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Correlated Gaussian rows with a non-zero mean, float32."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    return (rng.standard_normal((n, d)) @ mix + 3.0).astype(np.float32)


def far_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Rows far from ``normal_rows``: the same law shifted and scaled."""
    return (normal_rows(rng, n, d) - 3.0) * 4.0 + 12.0


def leaves_close(a: Any, b: Any, *, rtol: float, atol: float) -> None:
    """Asserts two pytrees have equal structure and close (integer: equal) leaves."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"tree structures differ: {ta} vs {tb}"
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(x, y)


def assert_trees_equal(a: Any, b: Any) -> None:
    """Same pytree types and bit-identical leaves."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def json_field(path: Any, field: str, default: Any = None) -> Any:
    """``field`` of the JSON file at ``path``, or ``default`` while it is missing or torn."""
    try:
        with open(path) as f:
            return json.load(f)[field]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return default


def sigkill_when(
    proc: subprocess.Popen, ready: Callable[[], bool], *, timeout: float = 120, poll: float = 0.01
) -> None:
    """SIGKILLs ``proc`` as soon as ``ready()`` holds (asserting it is still running then)."""
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, "the process ended before it could be killed"
            assert time.time() < deadline, "the process never reached the moment to kill it"
            time.sleep(poll)
        assert proc.poll() is None, "the process ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def total(count: int | dict[str, int]) -> int:
    """``jaxmon.num_rows`` summed over a state's counters (e.g. a probe's two classes)."""
    return sum(count.values()) if isinstance(count, dict) else count


def without_nonfinite_count(state: Any) -> Any:
    """``state`` with its non-finite counters zeroed, to compare with a state of clean rows."""
    return jax.tree.map(
        lambda c: (
            c._replace(nonfinite=jnp.zeros_like(c.nonfinite)) if isinstance(c, jaxmon.Counts) else c
        ),
        state,
        is_leaf=lambda c: isinstance(c, jaxmon.Counts),
    )


@dataclasses.dataclass
class LawCase:
    """How to run the law suite on one estimator.

    Attributes:
      make: builds the estimator.
      d: feature size of the test rows.
      n: rows per test stream (also the padded batch size, so each jit compiles once).
      rows: ``(rng, n, d) -> float32 rows`` of trusted data.
      anomalies: ``(rng, n, d) -> rows`` that must score higher on average.
      rtol, atol: tolerance of "≈" between states (or fitted values) built two ways.
      compare: ``(est, state_a, state_b) -> None`` asserting two states summarise the same rows;
        defaults to :func:`leaves_close` on the states. Sketches override it to check their
        documented bound, or compare fitted values.
      exact_merge: merge with ``init`` and commutation are bit-exact.
      weights: the estimator accepts ``weights=``.
      bf16_rtol, bf16_atol: tolerance of scores after bf16 input against its float32 upcast
        (``bf16_atol`` is relative to the median absolute score).
    """

    make: Callable[[], jaxmon.Estimator]
    d: int = 6
    n: int = 96
    rows: Callable[[np.random.Generator, int, int], np.ndarray] = normal_rows
    anomalies: Callable[[np.random.Generator, int, int], np.ndarray] = far_rows
    rtol: float = 1e-4
    atol: float = 1e-4
    compare: Callable[[jaxmon.Estimator, Any, Any], None] | None = None
    exact_merge: bool = False
    weights: bool = False
    # Centring in bf16 rounds each centred value by up to 2^-9 relative: scores move by ~1%.
    bf16_rtol: float = 3e-2
    bf16_atol: float = 3e-2


class LawSuite:
    """Subclass with ``case = LawCase(...)`` to run every law on an estimator."""

    case: LawCase

    # ------------------------------------------------------------------ helpers
    @property
    def est(self) -> jaxmon.Estimator:
        return self.case.make()

    def data(self, seed: int = 0, n: int | None = None) -> np.ndarray:
        c = self.case
        return c.rows(np.random.default_rng(seed), n or c.n, c.d)

    def empty(self, est: jaxmon.Estimator, dtype=jnp.float32):
        return est.init(jax.ShapeDtypeStruct((self.case.d,), dtype))

    def same(self, est, a, b, *, rtol=None, atol=None) -> None:
        c = self.case
        if c.compare is not None:
            c.compare(est, a, b)
        else:
            leaves_close(a, b, rtol=rtol or c.rtol, atol=atol or c.atol)

    def padded(self, est, rows: np.ndarray, state=None):
        """Updates with ``rows`` padded to ``n`` by masked garbage, so one compile serves all."""
        n, d = self.case.n, self.case.d
        x = np.full((n, d), 1e6, np.float32)
        x[: len(rows)] = rows
        mask = np.arange(n) < len(rows)
        state = self.empty(est) if state is None else state
        return est.update(state, jnp.asarray(x), mask=jnp.asarray(mask))

    # ------------------------------------------------------------------ laws
    def test_merge_identity(self):
        est = self.est
        s = est.update(self.empty(est), jnp.asarray(self.data()))
        left, right = est.merge(self.empty(est), s), est.merge(s, self.empty(est))
        if self.case.exact_merge:
            leaves_close(left, s, rtol=0, atol=0)
            leaves_close(right, s, rtol=0, atol=0)
        else:
            self.same(est, left, s)
            self.same(est, right, s)

    @given(st.data())
    def test_merge_laws_over_random_splits(self, data):
        est = self.est
        x = self.data(1)
        n = len(x)
        i = data.draw(st.integers(0, n), label="first split")
        j = data.draw(st.integers(i, n), label="second split")
        a, b, c = (self.padded(est, x[s]) for s in (slice(0, i), slice(i, j), slice(j, n)))
        whole = self.padded(est, x)
        ab_c = est.merge(est.merge(a, b), c)
        a_bc = est.merge(a, est.merge(b, c))
        self.same(est, ab_c, a_bc)  # associativity
        self.same(est, ab_c, whole)  # split-and-merge equals one pass
        if self.case.exact_merge:
            leaves_close(est.merge(a, b), est.merge(b, a), rtol=0, atol=0)
        else:
            self.same(est, est.merge(a, b), est.merge(b, a))  # commutativity

    def test_update_of_concat_equals_merge_of_updates(self):
        est = self.est
        a, b = self.data(2), self.data(3)
        s0 = est.update(self.empty(est), jnp.asarray(self.data(4)))
        one = est.update(s0, jnp.asarray(np.concatenate([a, b])))
        two = est.merge(est.update(s0, jnp.asarray(a)), est.update(self.empty(est), jnp.asarray(b)))
        self.same(est, one, two)

    def test_masked_rows_equal_dropped_rows(self):
        est = self.est
        x = self.data(5)
        keep = np.random.default_rng(6).random(len(x)) < 0.6
        garbage = x.copy()
        garbage[~keep] = 1e4  # would dominate any statistic if it leaked in
        masked = est.update(self.empty(est), jnp.asarray(garbage), mask=jnp.asarray(keep))
        dropped = est.update(self.empty(est), jnp.asarray(x[keep]))
        self.same(est, masked, dropped)
        assert total(jaxmon.num_rows(masked)) == int(keep.sum())

    def test_nonfinite_rows_are_excluded_and_counted(self):
        est = self.est
        x = self.data(7)
        bad = np.zeros(len(x), bool)
        bad[[1, 5, 17]] = True
        poisoned = x.copy()
        poisoned[1, 0], poisoned[5, -1], poisoned[17, :] = np.nan, np.inf, -np.inf
        s = est.update(self.empty(est), jnp.asarray(poisoned))
        clean = est.update(self.empty(est), jnp.asarray(x[~bad]))
        self.same(est, without_nonfinite_count(s), clean)
        assert total(jaxmon.num_nonfinite(s)) == 3
        assert total(jaxmon.num_rows(s)) == len(x) - 3
        for leaf in jax.tree.leaves(s):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert bool(jnp.all(jnp.isfinite(leaf))), "a non-finite row leaked into the state"

    def test_bf16_input_equals_its_float32_upcast(self):
        # States are compared through what they are for, their scores: raw power sums near zero
        # (odd moments) legitimately differ in relative terms when bf16 rows are centred in bf16.
        est = self.est
        c = self.case
        xb = jnp.asarray(self.data(8, 4 * c.n), jnp.bfloat16)
        sb = est.update(self.empty(est, jnp.bfloat16), xb)
        sf = est.update(self.empty(est), xb.astype(jnp.float32))
        assert total(jaxmon.num_rows(sb)) == total(jaxmon.num_rows(sf))
        q = jnp.asarray(self.data(18))
        got = np.asarray(est.score(est.finalize(sb), q))
        want = np.asarray(est.score(est.finalize(sf), q))
        scale = np.median(np.abs(want)) + 1e-12
        np.testing.assert_allclose(got, want, rtol=c.bf16_rtol, atol=c.bf16_atol * scale)

    def test_jit_equals_eager(self):
        est = self.est
        x = jnp.asarray(self.data(9))
        jitted = jax.jit(lambda s, x: est.update(s, x))(self.empty(est), x)
        with jax.disable_jit():
            eager = est.update(self.empty(est), x)
        self.same(est, jitted, eager)
        fj = jax.jit(est.finalize)(jitted)
        sj = jax.jit(est.score)(fj, x)
        with jax.disable_jit():
            se = est.score(est.finalize(eager), x)
        np.testing.assert_allclose(np.asarray(sj), np.asarray(se), rtol=1e-3, atol=1e-3)

    def test_one_trace_per_shape_and_stable_state_types(self):
        est = self.est
        traces = []

        def step(s, x):
            traces.append(1)
            return est.update(s, x)

        step = jax.jit(step)
        s0 = self.empty(est)
        s = s0
        for seed in range(3):
            s = step(s, jnp.asarray(self.data(10 + seed)))
        assert len(traces) == 1, f"update retraced {len(traces)} times for one shape"
        m = est.merge(s, s0)
        for other in (s, m):
            assert jax.tree.structure(other) == jax.tree.structure(s0)
            for u, v in zip(jax.tree.leaves(other), jax.tree.leaves(s0), strict=True):
                assert (u.shape, u.dtype) == (v.shape, v.dtype)
                assert getattr(u, "sharding", None) == getattr(v, "sharding", None)

    def test_spec_json_round_trip(self):
        est = self.est
        rebuilt = jaxmon.from_spec(est.spec.to_json())
        assert rebuilt.spec == est.spec
        assert rebuilt.spec.to_json() == est.spec.to_json()
        x = jnp.asarray(self.data(11))
        s = est.update(self.empty(est), x)
        np.testing.assert_allclose(
            np.asarray(est.score(est.finalize(s), x)),
            np.asarray(rebuilt.score(rebuilt.finalize(s), x)),
            rtol=1e-5,
            atol=1e-5,
        )

    def test_higher_score_means_more_anomalous(self):
        est = self.est
        c = self.case
        rng = np.random.default_rng(12)
        s = est.update(self.empty(est), jnp.asarray(c.rows(rng, 4 * c.n, c.d)))
        fitted = est.finalize(s)
        normal = np.asarray(est.score(fitted, jnp.asarray(c.rows(rng, c.n, c.d))))
        odd = np.asarray(est.score(fitted, jnp.asarray(c.anomalies(rng, c.n, c.d))))
        assert normal.shape == (c.n,) and odd.shape == (c.n,)
        assert np.mean(odd) > np.mean(normal)
        # Rank-based, so it holds for any monotone score: most anomalies beat most normals.
        assert np.mean(odd[:, None] > normal[None, :]) > 0.8

    def test_score_mask_and_leading_axes(self):
        est = self.est
        x = self.data(13)
        f = est.finalize(est.update(self.empty(est), jnp.asarray(x)))
        x3 = jnp.asarray(x[:24].reshape(2, 12, self.case.d))
        mask = jnp.asarray(np.arange(24).reshape(2, 12) % 3 != 0)
        s = np.asarray(est.score(f, x3, mask=mask))
        assert s.shape == (2, 12)
        flat = np.asarray(est.score(f, jnp.asarray(x[:24])))
        np.testing.assert_allclose(
            s.reshape(-1)[np.asarray(mask).reshape(-1)],
            flat[np.asarray(mask).reshape(-1)],
            rtol=1e-5,
            atol=1e-5,
        )
        assert np.all(s.reshape(-1)[~np.asarray(mask).reshape(-1)] == 0)

    def test_misshaped_input_names_expected_shape(self):
        est = self.est
        d = self.case.d
        s = self.empty(est)
        with pytest.raises(jaxmon.ShapeError, match=rf"\[\.\.\., {d}\]"):
            est.update(s, jnp.zeros((4, d + 1), jnp.float32))
        with pytest.raises(jaxmon.ShapeError, match="float"):
            est.update(s, jnp.zeros((4, d), jnp.int32))

    def test_nonfinite_query_rows_score_inf(self):
        est = self.est
        f = est.finalize(est.update(self.empty(est), jnp.asarray(self.data(20))))
        clean = self.data(21)
        poisoned = clean.copy()
        bad = np.zeros(len(clean), bool)
        bad[[2, 4, 7]] = True
        poisoned[2, 0], poisoned[4, -1], poisoned[7, :] = np.nan, np.inf, -np.inf
        got = np.asarray(est.score(f, jnp.asarray(poisoned)))
        want = np.asarray(est.score(f, jnp.asarray(clean)))
        assert np.all(np.isposinf(got[bad])), got[bad]
        np.testing.assert_array_equal(got[~bad], want[~bad])
        # Masked rows stay 0, non-finite or not.
        mask = np.ones(len(clean), bool)
        mask[[2, 3]] = False
        m = np.asarray(est.score(f, jnp.asarray(poisoned), mask=jnp.asarray(mask)))
        assert m[2] == 0 and m[3] == 0 and np.isposinf(m[4])

    def test_fit_without_rows_is_refused(self):
        est = self.est
        q = jnp.asarray(self.data(22))
        with pytest.raises(jaxmon.NotFittedError, match="no rows"):
            est.finalize(self.empty(est))
        # Every row masked, or every row non-finite, is a fit without rows too.
        n, d = self.case.n, self.case.d
        masked = est.update(self.empty(est), q, mask=jnp.zeros((n,), bool))
        with pytest.raises(jaxmon.NotFittedError, match="no rows"):
            est.finalize(masked)
        nan = est.update(self.empty(est), jnp.full((n, d), jnp.nan, jnp.float32))
        with pytest.raises(jaxmon.NotFittedError, match=r"NaN|no rows"):
            est.finalize(nan)
        # Inside jit nothing can raise: the fitted value answers NaN, never confident numbers.
        f = jax.jit(est.finalize)(self.empty(est))
        assert np.all(np.isnan(np.asarray(est.score(f, q))))

    def test_weights_when_supported(self):
        if not self.case.weights:
            pytest.skip("estimator takes no weights")
        est = self.est
        x = self.data(14)
        # Integer weights equal repeating rows.
        w = np.random.default_rng(15).integers(0, 3, len(x))
        weighted = est.update(self.empty(est), jnp.asarray(x), weights=jnp.asarray(w, jnp.float32))
        repeated = est.update(self.empty(est), jnp.asarray(np.repeat(x, w, axis=0)))
        q = jnp.asarray(self.data(16))
        np.testing.assert_allclose(
            np.asarray(est.score(est.finalize(weighted), q)),
            np.asarray(est.score(est.finalize(repeated), q)),
            rtol=1e-3,
            atol=1e-3,
        )
