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
            # Normwise: float32 sums round relative to their largest terms, so an entry that
            # nearly cancels (a third-moment entry 1/300 of its leaf's largest) carries the
            # rounding of the leaf's scale, not of its own size.
            scale = float(np.max(np.abs(y))) if y.size and np.all(np.isfinite(y)) else 0.0
            np.testing.assert_allclose(x, y, rtol=rtol, atol=max(atol, rtol * scale))
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
      compare_merges: ``(est, state_a, state_b) -> None`` for the merge laws (identity,
        commutativity, associativity), which hold for a state that is not a mergeable summary
        too (a flow's parameter average); defaults to ``compare``.
      compare_same_rows: ``(est, state_a, state_b) -> None`` for states folded from the same
        rows in the same update calls (masked rows = dropped rows, non-finite rows = clean
        rows, jit = eager); defaults to ``compare``. Estimators whose ``compare`` checks only
        their exact summary (a flow's moments) compare more of the state in these two.
      exact_merge: merge with ``init`` and commutation are bit-exact.
      weights: True: the estimator honours ``weights=`` (integer weights equal repeated
        rows); False: it refuses them with a :class:`jaxmon.errors.JaxmonError` naming them;
        None: it refuses them so, or they change its state (never silently ignored).
      inputs: maps rows ``[..., d]`` (an array) to the estimator's input, e.g. a monitor's
        ``{tap: array}``; traced with ``jax.eval_shape`` for ``init``'s example. Keep it exact
        in every float dtype (doubling, negation, slicing) and let every output see every
        column, so bf16 rows, masks and non-finite rows mean the same on every tap. None: the
        rows themselves.
      counters: how many row counters count each row (a monitor: one per key).
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
    weights: bool | None = None
    # Centring in bf16 rounds each centred value by up to 2^-9 relative: scores move by ~1%.
    bf16_rtol: float = 3e-2
    bf16_atol: float = 3e-2
    compare_merges: Callable[[jaxmon.Estimator, Any, Any], None] | None = None
    compare_same_rows: Callable[[jaxmon.Estimator, Any, Any], None] | None = None
    inputs: Callable[[jax.Array], Any] | None = None
    counters: int = 1


def score_leaves(scores: Any) -> list[np.ndarray]:
    """An estimator's scores as numpy arrays: one, or one per key of a monitor's dict."""
    return [np.asarray(leaf) for leaf in jax.tree.leaves(scores)]


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

    def x(self, rows: Any, dtype=None) -> Any:
        """The estimator's input for ``rows [..., d]`` (see ``LawCase.inputs``)."""
        r = jnp.asarray(rows, dtype)
        return r if self.case.inputs is None else self.case.inputs(r)

    def empty(self, est: jaxmon.Estimator, dtype=jnp.float32):
        example = jax.ShapeDtypeStruct((self.case.d,), dtype)
        if self.case.inputs is not None:
            example = jax.eval_shape(self.case.inputs, example)
        return est.init(example)

    def scores(self, est, fitted, rows: Any, *, mask=None) -> list[np.ndarray]:
        return score_leaves(est.score(fitted, self.x(rows), mask=mask))

    def same(self, est, a, b, *, rtol=None, atol=None) -> None:
        c = self.case
        if c.compare is not None:
            c.compare(est, a, b)
        else:
            leaves_close(a, b, rtol=rtol or c.rtol, atol=atol or c.atol)

    def same_merged(self, est, a, b) -> None:
        """``same`` for the merge laws (``LawCase.compare_merges``)."""
        if self.case.compare_merges is not None:
            self.case.compare_merges(est, a, b)
        else:
            self.same(est, a, b)

    def same_rows(self, est, a, b) -> None:
        """``same`` for states of the same rows and update calls (``compare_same_rows``)."""
        if self.case.compare_same_rows is not None:
            self.case.compare_same_rows(est, a, b)
        else:
            self.same(est, a, b)

    def rows_counted(self, state) -> int:
        """Rows in ``state`` per counter (a monitor counts each row once per key)."""
        n = total(jaxmon.num_rows(state))
        assert n % self.case.counters == 0, (n, self.case.counters)
        return n // self.case.counters

    def nonfinite_counted(self, state) -> int:
        n = total(jaxmon.num_nonfinite(state))
        assert n % self.case.counters == 0, (n, self.case.counters)
        return n // self.case.counters

    def padded(self, est, rows: np.ndarray, state=None):
        """Updates with ``rows`` padded to ``n`` by masked garbage, so one compile serves all."""
        n, d = self.case.n, self.case.d
        x = np.full((n, d), 1e6, np.float32)
        x[: len(rows)] = rows
        mask = np.arange(n) < len(rows)
        state = self.empty(est) if state is None else state
        return est.update(state, self.x(x), mask=jnp.asarray(mask))

    # ------------------------------------------------------------------ laws
    def test_merge_identity(self):
        est = self.est
        s = est.update(self.empty(est), self.x(self.data()))
        left, right = est.merge(self.empty(est), s), est.merge(s, self.empty(est))
        if self.case.exact_merge:
            leaves_close(left, s, rtol=0, atol=0)
            leaves_close(right, s, rtol=0, atol=0)
        else:
            self.same_merged(est, left, s)
            self.same_merged(est, right, s)

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

    def test_merge_commutes_and_associates_for_the_whole_state(self):
        # The random splits above compare with ``same``; this compares with ``same_merged``,
        # which for a state that is not a mergeable summary (a flow) covers more of the state.
        # (The law above keeps its source: hypothesis derives its draws from it.)
        est = self.est
        x = self.data(1)
        a, b, c = (self.padded(est, x[s]) for s in (slice(0, 20), slice(20, 50), slice(50, None)))
        self.same_merged(est, est.merge(est.merge(a, b), c), est.merge(a, est.merge(b, c)))
        self.same_merged(est, est.merge(a, b), est.merge(b, a))

    def test_update_of_concat_equals_merge_of_updates(self):
        est = self.est
        a, b = self.data(2), self.data(3)
        s0 = est.update(self.empty(est), self.x(self.data(4)))
        one = est.update(s0, self.x(np.concatenate([a, b])))
        two = est.merge(est.update(s0, self.x(a)), est.update(self.empty(est), self.x(b)))
        self.same(est, one, two)

    def test_masked_rows_equal_dropped_rows(self):
        est = self.est
        x = self.data(5)
        keep = np.random.default_rng(6).random(len(x)) < 0.6
        garbage = x.copy()
        garbage[~keep] = 1e4  # would dominate any statistic if it leaked in
        masked = est.update(self.empty(est), self.x(garbage), mask=jnp.asarray(keep))
        dropped = est.update(self.empty(est), self.x(x[keep]))
        self.same_rows(est, masked, dropped)
        assert self.rows_counted(masked) == int(keep.sum())

    def test_nonfinite_rows_are_excluded_and_counted(self):
        est = self.est
        x = self.data(7)
        bad = np.zeros(len(x), bool)
        bad[[1, 5, 17]] = True
        poisoned = x.copy()
        poisoned[1, 0], poisoned[5, -1], poisoned[17, :] = np.nan, np.inf, -np.inf
        s = est.update(self.empty(est), self.x(poisoned))
        clean = est.update(self.empty(est), self.x(x[~bad]))
        self.same_rows(est, without_nonfinite_count(s), clean)
        assert self.nonfinite_counted(s) == 3
        assert self.rows_counted(s) == len(x) - 3
        for leaf in jax.tree.leaves(s):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert bool(jnp.all(jnp.isfinite(leaf))), "a non-finite row leaked into the state"

    def test_bf16_input_equals_its_float32_upcast(self):
        # States are compared through what they are for, their scores: raw power sums near zero
        # (odd moments) legitimately differ in relative terms when bf16 rows are centred in bf16.
        est = self.est
        c = self.case
        xb = jnp.asarray(self.data(8, 4 * c.n), jnp.bfloat16)
        sb = est.update(self.empty(est, jnp.bfloat16), self.x(xb))
        sf = est.update(self.empty(est), self.x(xb.astype(jnp.float32)))
        assert total(jaxmon.num_rows(sb)) == total(jaxmon.num_rows(sf))
        q = self.data(18)
        got = self.scores(est, est.finalize(sb), q)
        want = self.scores(est, est.finalize(sf), q)
        for g, w in zip(got, want, strict=True):
            scale = np.median(np.abs(w)) + 1e-12
            np.testing.assert_allclose(g, w, rtol=c.bf16_rtol, atol=c.bf16_atol * scale)

    def test_jit_equals_eager(self):
        est = self.est
        x = self.x(self.data(9))
        jitted = jax.jit(lambda s, x: est.update(s, x))(self.empty(est), x)
        with jax.disable_jit():
            eager = est.update(self.empty(est), x)
        self.same_rows(est, jitted, eager)
        fj = jax.jit(est.finalize)(jitted)
        sj = jax.jit(est.score)(fj, x)
        with jax.disable_jit():
            se = est.score(est.finalize(eager), x)
        for a, b in zip(score_leaves(sj), score_leaves(se), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)

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
            s = step(s, self.x(self.data(10 + seed)))
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
        x = self.data(11)
        s = est.update(self.empty(est), self.x(x))
        for a, b in zip(
            self.scores(est, est.finalize(s), x),
            self.scores(rebuilt, rebuilt.finalize(s), x),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def test_higher_score_means_more_anomalous(self):
        est = self.est
        c = self.case
        rng = np.random.default_rng(12)
        s = est.update(self.empty(est), self.x(c.rows(rng, 4 * c.n, c.d)))
        fitted = est.finalize(s)
        normals = self.scores(est, fitted, c.rows(rng, c.n, c.d))
        odds = self.scores(est, fitted, c.anomalies(rng, c.n, c.d))
        for normal, odd in zip(normals, odds, strict=True):
            assert normal.shape == (c.n,) and odd.shape == (c.n,)
            assert np.mean(odd) > np.mean(normal)
            # Rank-based, so it holds for any monotone score: most anomalies beat most normals.
            assert np.mean(odd[:, None] > normal[None, :]) > 0.8

    def test_score_mask_and_leading_axes(self):
        est = self.est
        x = self.data(13)
        f = est.finalize(est.update(self.empty(est), self.x(x)))
        keep = np.arange(24) % 3 != 0
        mask = jnp.asarray(keep.reshape(2, 12))
        scores = self.scores(est, f, x[:24].reshape(2, 12, self.case.d), mask=mask)
        flats = self.scores(est, f, x[:24])
        for s, flat in zip(scores, flats, strict=True):
            assert s.shape == (2, 12)
            np.testing.assert_allclose(s.reshape(-1)[keep], flat[keep], rtol=1e-5, atol=1e-5)
            assert np.all(s.reshape(-1)[~keep] == 0)

    def test_misshaped_input_names_expected_shape(self):
        est = self.est
        d = self.case.d
        s = self.empty(est)
        with pytest.raises(jaxmon.ShapeError, match=rf"\[\.\.\., {d}\]"):
            est.update(s, self.x(jnp.zeros((4, d + 1), jnp.float32)))
        with pytest.raises(jaxmon.ShapeError, match="float"):
            est.update(s, self.x(jnp.zeros((4, d), jnp.int32)))

    def test_nonfinite_query_rows_score_inf(self):
        est = self.est
        f = est.finalize(est.update(self.empty(est), self.x(self.data(20))))
        clean = self.data(21)
        poisoned = clean.copy()
        bad = np.zeros(len(clean), bool)
        bad[[2, 4, 7]] = True
        poisoned[2, 0], poisoned[4, -1], poisoned[7, :] = np.nan, np.inf, -np.inf
        mask = np.ones(len(clean), bool)
        mask[[2, 3]] = False
        for got, want, m in zip(
            self.scores(est, f, poisoned),
            self.scores(est, f, clean),
            self.scores(est, f, poisoned, mask=jnp.asarray(mask)),
            strict=True,
        ):
            assert np.all(np.isposinf(got[bad])), got[bad]
            np.testing.assert_array_equal(got[~bad], want[~bad])
            # Masked rows stay 0, non-finite or not.
            assert m[2] == 0 and m[3] == 0 and np.isposinf(m[4])

    def test_fit_without_rows_is_refused(self):
        est = self.est
        q = self.x(self.data(22))
        with pytest.raises(jaxmon.NotFittedError, match="no rows"):
            est.finalize(self.empty(est))
        # Every row masked, or every row non-finite, is a fit without rows too.
        n, d = self.case.n, self.case.d
        masked = est.update(self.empty(est), q, mask=jnp.zeros((n,), bool))
        with pytest.raises(jaxmon.NotFittedError, match="no rows"):
            est.finalize(masked)
        nan = est.update(self.empty(est), self.x(jnp.full((n, d), jnp.nan, jnp.float32)))
        with pytest.raises(jaxmon.NotFittedError, match=r"NaN|no rows"):
            est.finalize(nan)
        # Inside jit nothing can raise: the fitted value answers NaN, never confident numbers.
        f = jax.jit(est.finalize)(self.empty(est))
        assert all(np.all(np.isnan(s)) for s in score_leaves(est.score(f, q)))

    def test_weights_are_honoured_or_refused(self):
        est = self.est
        x = self.data(14)
        w = np.random.default_rng(15).integers(0, 3, len(x))
        try:
            weighted = est.update(self.empty(est), self.x(x), weights=jnp.asarray(w, jnp.float32))
        except jaxmon.errors.JaxmonError as err:
            # Never silently ignored: an estimator that takes no weights refuses them by name.
            assert self.case.weights is not True, f"weights refused: {err}"
            assert "weights" in str(err), err
            return
        assert self.case.weights is not False, "weights=False, yet update accepted weights"
        if self.case.weights is None:
            plain = est.update(self.empty(est), self.x(x))
            assert any(
                not np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(weighted), jax.tree.leaves(plain), strict=True)
            ), "update accepted weights= and ignored them"
            return
        # Integer weights equal repeating rows.
        repeated = est.update(self.empty(est), self.x(np.repeat(x, w, axis=0)))
        q = self.data(16)
        for a, b in zip(
            self.scores(est, est.finalize(weighted), q),
            self.scores(est, est.finalize(repeated), q),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
