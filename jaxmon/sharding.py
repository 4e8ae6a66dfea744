"""Data-parallel monitoring: one estimator replica per device, merged on demand.

``shard_local(est, mesh, axis="data")`` wraps any estimator (a monitor included). Its state is
the inner state with a leading *replica* axis of size ``mesh.shape[axis]``, sharded over
``axis``: each data-parallel device folds its own shard of the batch into its own replica, with
**zero communication per update** (``jax.shard_map``). ``merge_replicas`` collapses the replicas
into one state of the inner estimator when statistics are needed (for ``finalize``, a report,
a checkpoint meant for another mesh).

Why a tree merge and not a ``psum``: every state here holds *centred* moments (Chan et al.), each
replica about its own mean, and exact two-word row counters; neither can be summed leaf by
leaf (a psum of the ``[lo, hi]`` uint32 words drops carries, and summed centred moments are
wrong). The replicas are merged pairwise with the inner ``merge`` in ``ceil(log2 R)`` vectorised
rounds (XLA gathers the halves between rounds), so results are exact for every estimator,
sketches included, and equal the single-device result up to float rounding.

Multi-host: the same code runs on a global mesh under ``jax.distributed`` (inputs are global
``jax.Array``s, e.g. from ``jax.make_array_from_process_local_data``); tested with two local
CPU processes (``tests/test_sharding.py::test_two_process_distributed``).

Wide taps: ``shard_wide(est, mesh, axis="model")`` keeps a *single* state whose matrix leaves
(the d×d moments) are sharded by columns over ``axis``, so each device holds d²/M floats; XLA
(GSPMD) partitions the Gram accordingly, which costs a reduce-scatter of the Gram over the data
axis per update. It is an alternative to ``shard_local`` (not combined with it yet): use it when
d×d per device does not fit, ``shard_local`` when communication per step must be zero.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmon._base import Estimator, EstimatorSpec, from_spec, register
from jaxmon.errors import ConfigError

__all__ = ["shard_local", "merge_replicas", "replica_count", "shard_wide"]

# Inner estimators by the sharded spec's JSON, so merge_replicas finds the exact object
# (from_spec rebuilds it otherwise).
_INNER: dict[str, Estimator] = {}


def _leaf_spec(x: Any, axis: str, batch_axis: int) -> P:
    ndim = len(getattr(x, "shape", ()))
    if ndim <= batch_axis:
        raise ConfigError(
            f"shard_local: an input of shape {list(getattr(x, 'shape', ()))} has no batch axis "
            f"{batch_axis} to shard over {axis!r}"
        )
    return P(*([None] * batch_axis), axis)


def _input_specs(x: Any, axis: str, batch_axis: int | Mapping[str, int]) -> Any:
    if isinstance(x, Mapping):
        return {
            k: jax.tree.map(
                lambda leaf, k=k: _leaf_spec(
                    leaf,
                    axis,
                    batch_axis.get(k, 0) if isinstance(batch_axis, Mapping) else batch_axis,
                ),
                v,
            )
            for k, v in x.items()
        }
    ba = 0 if isinstance(batch_axis, Mapping) else batch_axis
    return jax.tree.map(lambda leaf: _leaf_spec(leaf, axis, ba), x)


def shard_local(
    est: Estimator,
    mesh: Mesh,
    axis: str = "data",
    *,
    batch_axis: int | Mapping[str, int] = 0,
) -> Estimator:
    """One replica of ``est`` per device along ``axis``; no communication per update.

    Args:
      est: any estimator (a :func:`jaxmon.monitor` included).
      mesh: the device mesh; ``mesh.shape[axis]`` replicas are kept.
      axis: the data-parallel mesh axis the batch is sharded over.
      batch_axis: which axis of each input is the batch axis sharded over ``axis`` (0 for
        ``[batch, seq, d]``); for a monitor's dict input, a dict ``{tap: axis}`` (e.g. 1 for a
        stacked ``[layers, batch, seq, d]`` tap), others default to 0. ``mask``/``weights``
        are sharded on their axis 0.

    Returns:
      An :class:`~jaxmon.Estimator` whose state is the inner state with a leading replica axis
      sharded over ``axis``. ``update`` folds each device's shard into its replica;
      ``merge`` merges replica by replica; ``finalize`` merges the replicas then finalizes
      (the fitted value is the inner estimator's); ``score`` is the inner ``score``.

    Example:
      >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> sest = jaxmon.sharding.shard_local(jaxmon.gaussian(), mesh)
      >>> state = sest.update(sest.init(example), batch)        # batch sharded over "data"
      >>> single = jaxmon.sharding.merge_replicas(sest, state)  # a state of gaussian()
    """
    if axis not in mesh.shape:
        raise ConfigError(f"shard_local: mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    replicas = int(mesh.shape[axis])
    spec = EstimatorSpec(
        "shard_local",
        {
            "estimator": est.spec.to_dict(),
            "axis": axis,
            "replicas": replicas,
            "batch_axis": dict(batch_axis) if isinstance(batch_axis, Mapping) else batch_axis,
        },
        mergeable=est.spec.mergeable,
    )
    _INNER[spec.to_json()] = est
    rep = NamedSharding(mesh, P(axis))

    def init(example):
        s = est.init(example)

        def bcast(leaf):
            leaf = jnp.asarray(leaf)
            out = jnp.broadcast_to(leaf[None], (replicas, *leaf.shape))
            return (
                jax.device_put(out, rep)
                if not isinstance(out, jax.core.Tracer)
                else (jax.lax.with_sharding_constraint(out, rep))
            )

        return jax.tree.map(bcast, s)

    @jax.jit
    def update(state, x, *, mask=None, weights=None):
        x_spec = _input_specs(x, axis, batch_axis)
        extra = {k: v for k, v in (("mask", mask), ("weights", weights)) if v is not None}
        extra_spec = {k: P(axis) for k in extra}

        def local(s, x, extra):
            s = jax.tree.map(lambda leaf: leaf[0], s)
            s = est.update(s, x, **extra)
            return jax.tree.map(lambda leaf: leaf[None], s)

        state_spec = jax.tree.map(lambda _: P(axis), state)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(state_spec, x_spec, extra_spec),
            out_specs=state_spec,
            check_vma=False,
        )(state, x, extra)

    @jax.jit
    def merge(a, b):
        def local(a, b):
            a, b = (jax.tree.map(lambda leaf: leaf[0], t) for t in (a, b))
            return jax.tree.map(lambda leaf: leaf[None], est.merge(a, b))

        spec_a = jax.tree.map(lambda _: P(axis), a)
        return jax.shard_map(
            local, mesh=mesh, in_specs=(spec_a, spec_a), out_specs=spec_a, check_vma=False
        )(a, b)

    def finalize(state):
        return est.finalize(_tree_merge(est, state))

    return Estimator(init, update, merge, finalize, est.score, spec)


@register("shard_local")
def _shard_local_from_spec(
    estimator: Mapping[str, Any], axis: str, replicas: int, batch_axis: Any = 0
) -> Estimator:
    """Rebuilds a ``shard_local`` estimator on a 1-D mesh of the first ``replicas`` devices."""
    devices = jax.devices()
    if len(devices) < replicas:
        raise ConfigError(
            f"shard_local spec needs {replicas} devices along {axis!r}, this process sees "
            f"{len(devices)}; rebuild with jaxmon.sharding.shard_local(jaxmon.from_spec("
            "spec['params']['estimator']), mesh) on a mesh of your choice"
        )
    mesh = Mesh(devices[:replicas], (axis,))
    return shard_local(from_spec(estimator), mesh, axis, batch_axis=batch_axis)


def _inner_of(sharded_est: Estimator) -> Estimator:
    if sharded_est.spec.name != "shard_local":
        raise ConfigError(
            "merge_replicas expects an estimator built by jaxmon.sharding.shard_local, got "
            f"{sharded_est.spec.name!r}"
        )
    inner = _INNER.get(sharded_est.spec.to_json())
    return inner if inner is not None else from_spec(sharded_est.spec.params["estimator"])


def replica_count(state: Any) -> int:
    """The number of replicas (the leading axis) of a ``shard_local`` state."""
    return int(jax.tree.leaves(state)[0].shape[0])


@functools.partial(jax.jit, static_argnums=0)
def _tree_merge_jit(merge_fn, state):
    n = jax.tree.leaves(state)[0].shape[0]
    while n > 1:
        half = n // 2
        lo = jax.tree.map(lambda leaf, h=half: leaf[:h], state)
        hi = jax.tree.map(lambda leaf, h=half: leaf[h : 2 * h], state)
        merged = jax.vmap(merge_fn)(lo, hi)
        if n % 2:
            merged = jax.tree.map(
                lambda m, leaf, h=half: jnp.concatenate([m, leaf[2 * h :]]), merged, state
            )
        state = merged
        n = n - half
    return jax.tree.map(lambda leaf: leaf[0], state)


def _tree_merge(est: Estimator, state: Any) -> Any:
    return _tree_merge_jit(est.merge, state)


def merge_replicas(sharded_est: Estimator, state: Any) -> Any:
    """Collapses the replicas of a ``shard_local`` state into one state of the inner estimator.

    Pairwise tree merge with the inner ``merge`` (exact counters stay exact; sketches merge by
    their own rule); equal to the single-device state of the same rows up to float rounding.

    Args:
      sharded_est: the estimator returned by :func:`shard_local`.
      state: its state (leading replica axis).

    Returns:
      A state of the inner estimator, without the replica axis.
    """
    return _tree_merge(_inner_of(sharded_est), state)


def _wide_spec(leaf: Any, axis: str, size: int) -> P:
    shape = getattr(leaf, "shape", ())
    if len(shape) >= 2 and shape[-1] % size == 0 and shape[-1] >= size:
        return P(*([None] * (len(shape) - 1)), axis)
    return P()


def shard_wide(est: Estimator, mesh: Mesh, axis: str = "model") -> Estimator:
    """One state, its matrix leaves (d×d moments) sharded by columns over ``axis``.

    Every state leaf of rank >= 2 whose last dimension divides evenly over ``axis`` is sharded
    on that dimension; the rest are replicated. Updates run under ``jit`` with the state
    layout pinned (``with_sharding_constraint``), so the layout does not change across
    init/update/merge. Inputs may be sharded over any other axis (the data axis).

    Args:
      est: any estimator (a monitor included).
      mesh: the device mesh.
      axis: the mesh axis the columns of the wide leaves are split over.

    Returns:
      An :class:`~jaxmon.Estimator` with ``est``'s state, fitted value and scores, laid out wide.
    """
    if axis not in mesh.shape:
        raise ConfigError(f"shard_wide: mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    size = int(mesh.shape[axis])
    spec = EstimatorSpec(
        "shard_wide",
        {"estimator": est.spec.to_dict(), "axis": axis, "size": size},
        mergeable=est.spec.mergeable,
    )

    def layout(state):
        def put(leaf):
            sh = NamedSharding(mesh, _wide_spec(leaf, axis, size))
            if isinstance(leaf, jax.core.Tracer):
                return jax.lax.with_sharding_constraint(leaf, sh)
            return jax.device_put(leaf, sh)

        return jax.tree.map(put, state)

    def init(example):
        return layout(est.init(example))

    @jax.jit
    def update(state, x, *, mask=None, weights=None):
        return layout(est.update(state, x, mask=mask, weights=weights))

    @jax.jit
    def merge(a, b):
        return layout(est.merge(a, b))

    return Estimator(init, update, merge, est.finalize, est.score, spec)


@register("shard_wide")
def _shard_wide_from_spec(estimator: Mapping[str, Any], axis: str, size: int) -> Estimator:
    """Rebuilds a ``shard_wide`` estimator on a 1-D mesh of the first ``size`` devices."""
    devices = jax.devices()
    if len(devices) < size:
        raise ConfigError(
            f"shard_wide spec needs {size} devices along {axis!r}, this process sees "
            f"{len(devices)}; rebuild with jaxmon.sharding.shard_wide(..., mesh) yourself"
        )
    return shard_wide(from_spec(estimator), Mesh(devices[:size], (axis,)), axis)
