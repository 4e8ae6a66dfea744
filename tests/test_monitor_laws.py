"""The shared law suite on monitors: rows ``[..., d]`` become a dict of taps (``LawCase.inputs``).

Cases: several taps with named detectors (including the shared bf16 centred-block scoring of
two matmul keys on one tap), a pair pattern of transition estimators, a ``stacked=`` tap whose
layers are updated under one ``vmap``, ``every_k(monitor, k=3)``, and ``shard_local`` over the
8 forced CPU devices with states compared after ``merge_replicas``.

Every tap sees every column of the rows, exactly (doubling, negation, reversal, or the two
halves read together by a pair), so a masked, non-finite or bf16 row means the same to every
key and each row is counted once per key (``LawCase.counters``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
import jaxmon.sharding as js

from laws import LawCase, LawSuite, leaves_close

# --------------------------------------------------------------------------- several taps


def _three_taps(x):
    return {"blocks/0/resid": x, "blocks/1/resid": x + x, "embed": -x[..., ::-1]}


class TestMonitorNamedDetectorsLaws(LawSuite):
    """Two taps with three named detectors each (a full and a PCA-residual score share one
    centred bf16 block per tap) and a third tap with one estimator: seven keys."""

    case = LawCase(
        make=lambda: jaxmon.monitor(
            {
                "blocks/*/resid": {
                    "full": jaxmon.gaussian(),
                    "pca": jaxmon.pca_residual(rank=2),
                    "diag": jaxmon.gaussian(diagonal=True),
                },
                "embed": jaxmon.gaussian(shrinkage="ledoit_wolf"),
            }
        ),
        inputs=_three_taps,
        counters=7,
        weights=True,
    )


# --------------------------------------------------------------------------- pair pattern


def _layer_taps(x):
    # Halves of the rows: each pair key reads all six columns, and neither side of a pair is a
    # function of the other (a transition's residual is not degenerate).
    return {
        "blocks/0/resid": x[..., :3],
        "blocks/1/resid": x[..., 3:],
        "blocks/2/resid": -x[..., :3],
    }


class TestMonitorPairLaws(LawSuite):
    """A pair pattern zipping layer i with layer i+1: keys ``0->1`` and ``1->2``."""

    case = LawCase(
        make=lambda: jaxmon.monitor(
            {("blocks/[01]/resid", "blocks/[12]/resid"): jaxmon.transition()}
        ),
        inputs=_layer_taps,
        counters=2,
        weights=True,
    )

    def test_misshaped_input_names_expected_shape(self):
        # The rows are split into taps of 3 features: the error names the tap and its width.
        est = self.est
        s = self.empty(est)
        with pytest.raises(jaxmon.ShapeError, match=r"blocks/1/resid.*\[\.\.\., 3\]"):
            est.update(s, self.x(jnp.zeros((4, 7), jnp.float32)))
        with pytest.raises(jaxmon.ShapeError, match="float"):
            est.update(s, self.x(jnp.zeros((4, 6), jnp.int32)))


# --------------------------------------------------------------------------- stacked tap


def _stacked_taps(x):
    return {"blocks/resid": jnp.stack([x, x + x, -x, x[..., ::-1]])}


class TestMonitorStackedLaws(LawSuite):
    """A ``[layers, ..., d]`` tap: layers 0-2 share one estimator (one ``vmap``), layer 3 has
    its own named detector."""

    case = LawCase(
        make=lambda: jaxmon.monitor(
            {
                "blocks/[0-2]/resid": jaxmon.gaussian(),
                "blocks/3/resid": {"d": jaxmon.gaussian(diagonal=True)},
            },
            stacked={"blocks/resid": "blocks/{i}/resid"},
        ),
        inputs=_stacked_taps,
        counters=4,
        weights=True,
    )


# --------------------------------------------------------------------------- every_k


def _two_taps(x):
    return {"blocks/0/resid": x, "blocks/1/resid": -x}


def _inner_close(est, a, b):
    """every_k's counter counts update calls: a stream split in three and merged has seen three
    calls where one pass saw one. The summary of the rows (``inner``) must agree."""
    leaves_close(a.inner, b.inner, rtol=1e-4, atol=1e-4)


def _whole_close(est, a, b):
    leaves_close(a, b, rtol=1e-4, atol=1e-4)


class TestEveryK3Laws(LawSuite):
    """``every_k(monitor, 3)``. Every law below starts from ``init``, whose first update is due;
    the one law that updates a non-empty state is restated for the due calls."""

    case = LawCase(
        make=lambda: jaxmon.every_k(jaxmon.monitor({"blocks/*/resid": jaxmon.gaussian()}), 3),
        inputs=_two_taps,
        counters=2,
        weights=True,
        compare=_inner_close,
        compare_merges=_whole_close,
        compare_same_rows=_whole_close,
    )

    def test_update_of_concat_equals_merge_of_updates(self):
        est = self.est
        a, b = self.data(2), self.data(3)
        s0 = est.update(self.empty(est), self.x(self.data(4)))  # call 0: due
        garbage = self.x(np.full_like(a, 1e4))
        s = est.update(est.update(s0, garbage), garbage)  # calls 1 and 2: skipped
        leaves_close(s.inner, s0.inner, rtol=0, atol=0)
        assert int(s.calls) == 3
        one = est.update(s, self.x(np.concatenate([a, b])))  # call 3: due
        two = est.merge(est.update(s, self.x(a)), est.update(self.empty(est), self.x(b)))
        self.same(est, one, two)
        assert int(one.calls) == 4 and int(two.calls) == 5


# --------------------------------------------------------------------------- shard_local


@functools.cache
def _mesh():
    assert jax.device_count() >= 8, "conftest forces 8 CPU devices"
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _pad_rows(tree, pad):
    return jax.tree.map(
        lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]), tree
    )


def _sharded_monitor() -> jaxmon.Estimator:
    """``shard_local(monitor)`` whose update pads a batch to a multiple of the 8 replicas with
    masked rows (how an uneven batch is fed to data-parallel replicas)."""
    sest = js.shard_local(
        jaxmon.monitor({"blocks/*/resid": jaxmon.gaussian(shrinkage="ledoit_wolf")}), _mesh()
    )

    def update(state, x, *, mask=None, weights=None):
        n = jax.tree.leaves(x)[0].shape[0]
        pad = -n % 8
        if pad:
            x = _pad_rows(x, pad)
            mask = jnp.ones((n,), bool) if mask is None else mask
            mask = jnp.concatenate([mask, jnp.zeros((pad,), bool)])
            if weights is not None:
                weights = jnp.concatenate([weights, jnp.zeros((pad,), weights.dtype)])
        return sest.update(state, x, mask=mask, weights=weights)

    return sest._replace(update=update)


_SHARDED = functools.cache(_sharded_monitor)


def _replicas_close(est, a, b):
    """Sharded states compare as their merged replicas: one state of the monitor."""
    leaves_close(js.merge_replicas(est, a), js.merge_replicas(est, b), rtol=1e-4, atol=1e-4)


class TestShardLocalMonitorLaws(LawSuite):
    """``shard_local(monitor)`` over 8 devices: each law on the merged replicas."""

    case = LawCase(
        make=_SHARDED,
        inputs=_two_taps,
        counters=2,
        weights=True,
        compare=_replicas_close,
    )

    def test_jit_equals_eager(self):
        pytest.skip(
            "the inner monitor's jit == eager is TestMonitorNamedDetectorsLaws's law; eager "
            "shard_map over 8 devices runs op by op (~100 s on 2 cores) and tests jax itself"
        )

    def test_merged_replicas_equal_one_device(self):
        est = self.est
        inner = jaxmon.monitor({"blocks/*/resid": jaxmon.gaussian(shrinkage="ledoit_wolf")})
        x = self.data(30)
        keep = np.random.default_rng(31).random(len(x)) < 0.7
        s = est.update(self.empty(est), self.x(x), mask=jnp.asarray(keep))
        example = jax.eval_shape(_two_taps, jax.ShapeDtypeStruct((self.case.d,), jnp.float32))
        one = inner.update(inner.init(example), self.x(x[keep]))
        leaves_close(js.merge_replicas(est, s), one, rtol=1e-4, atol=1e-4)
        assert js.replica_count(s) == 8
