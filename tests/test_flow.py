"""The normalising-flow density: laws it can keep, training on a stream, planted anomalies,
data-parallel steps under shard_map, and checkpoint round trips."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from sklearn.metrics import roc_auc_score

import jaxmon
from jaxmon.estimators.flow import FlowState

from laws import LawCase, LawSuite, leaves_close, normal_rows, without_nonfinite_count


def compare_flow_states(est, a, b):
    """What a flow's state guarantees when the rows were batched differently. Training is not a
    mergeable summary: one optimizer step on rows ``a ∪ b`` differs from steps on ``a`` and on
    ``b`` averaged by ``merge``, so the split-and-merge law (and update of a concatenation =
    merge of updates) cannot hold for the parameters and optimizer state. What does hold, and
    is checked: the same pytree structure, shapes and dtypes; the standardisation moments and
    row counters equal (they are an exact mergeable summary)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert (u.shape, u.dtype) == (v.shape, v.dtype)
    leaves_close(a.moments, b.moments, rtol=1e-4, atol=1e-4)


def compare_flow_merges(est, a, b):
    """The merge laws hold for the whole state, trained parameters and optimizer moments
    included: merge with init is exact, and the row-weighted average of parameters commutes
    and associates up to rounding."""
    compare_flow_states(est, a, b)
    leaves_close(a, b, rtol=1e-5, atol=1e-7)


def compare_flow_same_rows(est, a, b):
    """States of the same rows in the same steps (masked = dropped rows, non-finite = clean
    rows, jit = eager) differ only by the order of float sums, and Adam's gradient moments
    agree to rounding. The parameters cannot agree to rounding after the first step: at the
    identity initialisation some gradients are rounding noise (b2's, ~1e-7, zero in exact
    arithmetic on standardised rows) and Adam's normalised step ``lr·m/(√v + ε)`` turns noise
    into ±lr moves, so parameters are compared to within two steps of ``lr`` here (and to
    1e-5 after three warm-up steps, where no gradient is noise, in
    test_masked_rows_leave_parameters_equal below)."""
    compare_flow_states(est, a, b)
    leaves_close(a.opt_state, b.opt_state, rtol=1e-4, atol=1e-6)
    leaves_close(a.step, b.step, rtol=0, atol=0)
    lr = float(est.spec.params.get("learning_rate", 1e-3))
    leaves_close(a.params, b.params, rtol=1e-4, atol=2 * lr)


def compare_flow_states_bf16(est, a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    leaves_close(a.moments.counts, b.moments.counts, rtol=0, atol=0)
    np.testing.assert_allclose(a.moments.mean, b.moments.mean, rtol=1e-2, atol=0.05)


FLOW = dict(num_layers=2, hidden=16)


class TestFlowLaws(LawSuite):
    case = LawCase(
        make=lambda: jaxmon.flow(**FLOW),
        compare=compare_flow_states,
        compare_merges=compare_flow_merges,
        compare_same_rows=compare_flow_same_rows,
        weights=True,
    )

    def test_bf16_input_equals_its_float32_upcast(self):
        # bf16 changes the moments within bf16 rounding; compare at that tolerance.
        est = self.est
        xb = jnp.asarray(self.data(8), jnp.bfloat16)
        sb = est.update(self.empty(est, jnp.bfloat16), xb)
        sf = est.update(self.empty(est), xb.astype(jnp.float32))
        compare_flow_states_bf16(est, sb, sf)

    @pytest.mark.slow
    def test_jit_equals_eager(self):
        # Unchanged law; slow because eager mode compiles every primitive of the optax step and
        # of the coupling layers' gradient one by one (~75 s on the shared 2-core machine).
        super().test_jit_equals_eager()


def _manifold(rng, n, d=4):
    """Rows on a curved manifold with activation-like offsets: x1 = sin(2 x0), x3 = x0 x2."""
    z = rng.standard_normal((n, d))
    z[:, 1] = np.sin(2 * z[:, 0]) + 0.1 * z[:, 1]
    z[:, 3] = z[:, 0] * z[:, 2] + 0.1 * z[:, 3]
    return (z * np.array([3.0, 0.5, 2.0, 1.0]) + np.array([40.0, -7.0, 12.0, 3.0])).astype(
        np.float32
    )


def _off_manifold(rng, n, d=4):
    """Same per-feature marginals, broken dependence: each column shuffled on its own."""
    x = _manifold(rng, n, d)
    return np.stack([rng.permutation(c) for c in x.T], 1)


def _train(est, rng, steps, batch=256, state=None):
    state = est.init(jax.ShapeDtypeStruct((4,), jnp.float32)) if state is None else state
    for _ in range(steps):
        state = est.update(state, jnp.asarray(_manifold(rng, batch)))
    return state


def test_trains_on_a_stream_and_scores_planted_anomalies_higher():
    rng = np.random.default_rng(0)
    est = jaxmon.flow(num_layers=4, hidden=32, learning_rate=3e-3)
    held_out = jnp.asarray(_manifold(np.random.default_rng(1), 2000))
    state = _train(est, rng, 1)
    nll = [float(jnp.mean(est.score(est.finalize(state), held_out)))]
    for _ in range(3):
        state = _train(est, rng, 100, state=state)
        nll.append(float(jnp.mean(est.score(est.finalize(state), held_out))))
    assert int(state.step) == 301 and jaxmon.num_rows(state) == 301 * 256
    # Held-out NLL decreases over training, by far more than its sampling noise (~0.03 nats).
    assert nll[-1] < nll[0] - 1.0, nll
    assert all(b < a + 0.05 for a, b in itertools.pairwise(nll)), nll
    # After 1 step the flow is ~the identity: its NLL is that of the diagonal Gaussian.
    x = np.asarray(held_out, np.float64)
    diag_nll = 0.5 * np.mean(np.sum((x - x.mean(0)) ** 2 / x.var(0), 1))
    diag_nll += 0.5 * np.sum(np.log(2 * np.pi * x.var(0)))
    assert abs(nll[0] - diag_nll) < 0.2, (nll[0], diag_nll)
    fitted = est.finalize(state)
    ok = np.asarray(est.score(fitted, held_out[:1000]))
    odd = np.asarray(est.score(fitted, jnp.asarray(_off_manifold(np.random.default_rng(2), 1000))))
    auroc = roc_auc_score(np.r_[np.zeros(1000), np.ones(1000)], np.r_[ok, odd])
    assert auroc > 0.9, auroc


# The tests below use the law suite's shapes ([96, 6] rows, with or without a mask) and its
# hyperparameters, so they reuse its compiled update instead of compiling their own.
EX6 = jax.ShapeDtypeStruct((6,), jnp.float32)


def _steps(est, seed, steps, state=None):
    rng = np.random.default_rng(seed)
    state = est.init(EX6) if state is None else state
    for _ in range(steps):
        state = est.update(state, jnp.asarray(normal_rows(rng, 96, 6)))
    return state


def _state(est, seed, rows):
    """One step on ``rows`` valid rows out of 96 (the rest masked out)."""
    x = normal_rows(np.random.default_rng(seed), 96, 6)
    return est.update(est.init(EX6), jnp.asarray(x), mask=jnp.asarray(np.arange(96) < rows))


def test_masked_rows_leave_parameters_equal():
    est = jaxmon.flow(**FLOW)
    s = _steps(est, 3, 3)  # non-zero output layers, so every parameter gets a gradient
    x = normal_rows(np.random.default_rng(4), 96, 6)
    keep = np.random.default_rng(6).random(96) < 0.6  # the law suite's draw: same shapes
    garbage = x.copy()
    garbage[~keep] = 1e4
    garbage[np.flatnonzero(keep)[0]] = np.nan  # a NaN row that is not masked
    masked = est.update(s, jnp.asarray(garbage), mask=jnp.asarray(keep))
    assert int(masked.step) == 4 and jaxmon.num_nonfinite(masked) == 1
    assert jaxmon.num_rows(masked) == jaxmon.num_rows(s) + int(keep.sum()) - 1
    # The NaN row, excluded, changes the rows of the step: compare with the same rows dropped.
    x_nan = x.copy()
    x_nan[np.flatnonzero(keep)[0]] = 1e4
    keep_clean = keep.copy()
    keep_clean[np.flatnonzero(keep)[0]] = False
    clean = est.update(s, jnp.asarray(x_nan), mask=jnp.asarray(keep_clean))
    leaves_close(without_nonfinite_count(masked), clean, rtol=1e-5, atol=1e-6)
    dropped = est.update(s, jnp.asarray(x[keep]))
    masked_ok = est.update(s, jnp.asarray(np.where(keep[:, None], x, 1e4)), mask=jnp.asarray(keep))
    leaves_close(masked_ok.params, dropped.params, rtol=1e-5, atol=1e-6)
    # A batch without valid rows takes no step.
    none = est.update(s, jnp.asarray(x), mask=jnp.zeros(96, bool))
    leaves_close(none.params, s.params, rtol=0, atol=0)
    assert int(none.step) == int(s.step)


def test_merge_averages_parameters_by_rows_seen():
    est = jaxmon.flow(**FLOW)
    a, b, c = _state(est, 6, 96), _state(est, 7, 32), _state(est, 8, 64)
    empty = est.init(EX6)
    leaves_close(est.merge(empty, a), a, rtol=0, atol=0)
    # Commutative up to rounding (the compiler may fuse w_a·x + w_b·y into either fma).
    leaves_close(est.merge(a, b), est.merge(b, a), rtol=1e-6, atol=1e-9)
    leaves_close(
        est.merge(est.merge(a, b), c).params,
        est.merge(a, est.merge(b, c)).params,
        rtol=1e-5,
        atol=1e-7,
    )
    m = est.merge(a, b)
    want = (96 * np.asarray(a.params["w2"]) + 32 * np.asarray(b.params["w2"])) / 128
    np.testing.assert_allclose(np.asarray(m.params["w2"]), want, rtol=1e-5, atol=1e-7)
    assert jaxmon.num_rows(m) == 128 and not est.spec.mergeable


def test_checkpoint_round_trips_resume_training_exactly(tmp_path):
    est = jaxmon.flow(**FLOW, seed=3)
    s = _steps(est, 9, 3)
    nxt = jnp.asarray(normal_rows(np.random.default_rng(10), 96, 6))
    # Flatten to numpy and back (what any array store does).
    leaves, treedef = jax.tree.flatten(s)
    restored = jax.tree.unflatten(treedef, [jnp.asarray(np.asarray(v)) for v in leaves])
    rebuilt = jaxmon.from_spec(est.spec.to_json())
    leaves_close(rebuilt.init(EX6).params, est.init(EX6).params, rtol=0, atol=0)
    leaves_close(rebuilt.update(restored, nxt), est.update(s, nxt), rtol=0, atol=0)
    # Through orbax (jaxmon.checkpoint), with the fitted value too.
    from jaxmon import checkpoint

    checkpoint.save(tmp_path / "ckpt", est, s, fitted=est.finalize(s), example=EX6)
    ck = checkpoint.load(tmp_path / "ckpt")
    assert isinstance(ck.state, FlowState) and ck.estimator.spec == est.spec
    leaves_close(ck.estimator.update(ck.state, nxt), est.update(s, nxt), rtol=0, atol=0)
    np.testing.assert_array_equal(
        np.asarray(ck.estimator.score(ck.fitted, nxt)), np.asarray(est.score(est.finalize(s), nxt))
    )


def test_data_parallel_step_equals_one_device_step():
    """Under shard_map with axis_name, each replica sees half the batch; the step equals one
    step on the whole batch on one device (gradients and moments reduced over the axis)."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    est_dp = jaxmon.flow(**FLOW, axis_name="data")
    est_1 = jaxmon.flow(**FLOW)
    x = jnp.asarray(normal_rows(np.random.default_rng(10), 192, 6))
    s0 = est_1.update(est_1.init(EX6), x[:96])
    step = jax.jit(
        jax.shard_map(
            lambda s, xb: est_dp.update(s, xb), mesh=mesh, in_specs=(P(), P("data")), out_specs=P()
        )
    )
    got = step(s0, x)
    jax.block_until_ready(got)
    want = est_1.update(s0, x)
    leaves_close(got.moments, want.moments, rtol=1e-5, atol=1e-4)
    leaves_close(got.params, want.params, rtol=1e-4, atol=1e-6)
    assert jaxmon.num_rows(got) == 96 + 192


def test_bad_inputs():
    with pytest.raises(jaxmon.ShapeError, match="at least 2 features"):
        jaxmon.flow().init(jax.ShapeDtypeStruct((1,), jnp.float32))
    with pytest.raises(ValueError, match="num_layers"):
        jaxmon.flow(num_layers=1)
