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
axis per update. Use it when d×d per device does not fit and the data axis is small.

Both at once, on a 2-D ``(data, model)`` mesh: ``shard_wide(shard_local(est, mesh, "data"),
mesh, "model")`` (the same as ``shard_local(est, mesh, "data", model_axis="model")``). Each
data-parallel group of devices keeps one replica, whose matrix leaves are split by columns over
the group's ``model`` devices: a state leaf ``[R, d, d]`` is laid out ``P("data", None,
"model")``, d²·R/(R·M) = d²/M floats per device. An update is manual over ``data`` (each group
folds its own rows into its own replica: nothing crosses the data axis) and automatic (GSPMD)
over ``model``: the group's devices see the same rows and each computes its columns of the
Gram; what crosses the model axis is O(n·d) per update (rows and column sums), never d×d.
:func:`merge_replicas` collapses the replicas into one wide state, or regroups them onto
another mesh (``into=``): a checkpoint of such a state restores onto a mesh of another shape
with ``jaxmon.checkpoint.load(..., sharding=...)``, then ``merge_replicas(..., into=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmon._base import Estimator, EstimatorSpec, from_spec, label_kwargs, register
from jaxmon.errors import ConfigError

__all__ = ["shard_local", "merge_replicas", "replica_count", "shard_wide", "state_sharding"]


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


def _place(tree: Any, mesh: Mesh, spec_of: Callable[[Any], P]) -> Any:
    """Every leaf of ``tree`` put on ``mesh`` as ``spec_of(leaf)`` says (constrained if traced)."""

    def one(leaf):
        sh = NamedSharding(mesh, spec_of(leaf))
        if isinstance(leaf, jax.core.Tracer):
            return jax.lax.with_sharding_constraint(leaf, sh)
        return jax.device_put(leaf, sh)

    return jax.tree.map(one, tree)


@dataclasses.dataclass(frozen=True, eq=False)
class _Layout:
    """A ``shard_local`` estimator: its inner estimator, its mesh, and its functions.

    The estimator's ``init`` is this object's bound method, so :func:`merge_replicas` and
    :func:`state_sharding` find the exact inner estimator and mesh on the estimator they are
    given (:func:`_layout_of`).
    """

    inner: Estimator
    mesh: Mesh
    axis: str
    model_axis: str | None
    batch_axis: int | Mapping[str, int] = 0

    @property
    def replicas(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def manual(self) -> frozenset[str]:
        """Mesh axes ``shard_map`` is manual over: the data axis only, the model axis (if any)
        stays with GSPMD inside (an empty set means every axis)."""
        return frozenset({self.axis}) if self.model_axis is not None else frozenset()

    def inner_spec(self, leaf: Any) -> P:
        """Placement of one inner-state leaf within a replica (columns over the model axis)."""
        if self.model_axis is None:
            return P()
        return _wide_spec(leaf, self.model_axis, int(self.mesh.shape[self.model_axis]))

    def spec(self, leaf: Any) -> P:
        """Placement of one replica-stacked leaf ``[R, ...]``."""
        inner = jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
        return P(self.axis, *self.inner_spec(inner))

    def put(self, state: Any) -> Any:
        """``state`` (replica-stacked) placed or constrained to this layout."""
        return _place(state, self.mesh, self.spec)

    def put_inner(self, state: Any) -> Any:
        """An inner state (no replica axis) in the wide layout (replicated without one)."""
        return _place(state, self.mesh, self.inner_spec)

    def init(self, example):
        s = self.inner.init(example)
        stacked = jax.tree.map(
            lambda leaf: jnp.broadcast_to(jnp.asarray(leaf)[None], (self.replicas, *leaf.shape)), s
        )
        return self.put(stacked)

    def update(self, state, x, **kwargs):
        """Each device folds its shard of ``x`` (and of the keyword arrays) into its replica."""
        x_spec = _input_specs(x, self.axis, self.batch_axis)
        extra = {k: v for k, v in kwargs.items() if v is not None}
        extra_spec = {k: P(self.axis) for k in extra}

        def local(s, x, extra):
            s = jax.tree.map(lambda leaf: leaf[0], s)
            if "labels" in extra:  # labels for a supervised inner estimator, else a mask
                extra = dict(extra)
                labels = extra.pop("labels")
                extra.update(label_kwargs(self.inner, extra.pop("mask", None), labels))
            return self._restack(self.inner.update(s, x, **extra))

        state_spec = jax.tree.map(lambda _: P(self.axis), state)
        out = self._shard_map(local, (state_spec, x_spec, extra_spec), state_spec)(state, x, extra)
        return self.put(out)

    def merge(self, a, b):
        """Replica ``i`` of ``a`` merged with replica ``i`` of ``b``, on its own device."""

        def local(a, b):
            a, b = (jax.tree.map(lambda leaf: leaf[0], t) for t in (a, b))
            return self._restack(self.inner.merge(a, b))

        spec_a = jax.tree.map(lambda _: P(self.axis), a)
        return self.put(self._shard_map(local, (spec_a, spec_a), spec_a)(a, b))

    def finalize(self, state):
        return self.inner.finalize(_tree_merge(self.inner, state))

    def _restack(self, s):
        """One replica's new inner state, laid out wide if needed, with its replica axis back."""
        if self.model_axis is not None:
            s = self.put_inner(s)
        return jax.tree.map(lambda leaf: leaf[None], s)

    def _shard_map(self, fn, in_specs, out_specs):
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            axis_names=self.manual,
            check_vma=False,
        )


def shard_local(
    est: Estimator,
    mesh: Mesh,
    axis: str = "data",
    *,
    batch_axis: int | Mapping[str, int] = 0,
    model_axis: str | None = None,
) -> Estimator:
    """One replica of ``est`` per device along ``axis``; no communication per update.

    Args:
      est: any estimator (a :func:`jaxmon.monitor` included).
      mesh: the device mesh; ``mesh.shape[axis]`` replicas are kept.
      axis: the data-parallel mesh axis the batch is sharded over.
      batch_axis: which axis of each input is the batch axis sharded over ``axis`` (0 for
        ``[batch, seq, d]``); for a monitor's dict input, a dict ``{tap: axis}`` (e.g. 1 for a
        stacked ``[layers, batch, seq, d]`` tap), others default to 0. Keyword arrays of
        ``update`` (``mask``, ``weights``, ``labels``...) are sharded on their axis 0.
      model_axis: a second mesh axis over which each replica's matrix leaves (d×d moments) are
        split by columns (wide taps; see the module docstring). Every state leaf of rank >= 2
        whose last dimension divides evenly over it is split; the rest are replicated within
        the replica's group.

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
    spec = _shard_local_spec(est, mesh, axis, batch_axis, model_axis)
    layout = _Layout(est, mesh, axis, model_axis, batch_axis)
    return Estimator(
        layout.init,
        jax.jit(layout.update),
        jax.jit(layout.merge),
        layout.finalize,
        est.score,
        spec,
    )


def _shard_local_spec(
    est: Estimator,
    mesh: Mesh,
    axis: str,
    batch_axis: int | Mapping[str, int],
    model_axis: str | None,
) -> EstimatorSpec:
    """The spec of ``shard_local(est, mesh, axis, ...)``, its arguments checked."""
    if axis not in mesh.shape:
        raise ConfigError(f"shard_local: mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    if model_axis is not None and (model_axis not in mesh.shape or model_axis == axis):
        raise ConfigError(
            f"shard_local: model_axis {model_axis!r} must be another axis of the mesh (its axes: "
            f"{tuple(mesh.shape)})"
        )
    params: dict[str, Any] = {
        "estimator": est.spec.to_dict(),
        "axis": axis,
        "replicas": int(mesh.shape[axis]),
        "batch_axis": dict(batch_axis) if isinstance(batch_axis, Mapping) else batch_axis,
    }
    if model_axis is not None:  # absent otherwise: specs saved before wide taps stay equal
        params["model_axis"] = model_axis
        params["model_size"] = int(mesh.shape[model_axis])
    return EstimatorSpec(
        "shard_local", params, mergeable=est.spec.mergeable, supervised=est.spec.supervised
    )


@register("shard_local")
def _shard_local_from_spec(
    estimator: Mapping[str, Any],
    axis: str,
    replicas: int,
    batch_axis: Any = 0,
    model_axis: str | None = None,
    model_size: int = 1,
) -> Estimator:
    """Rebuilds a ``shard_local`` estimator on a mesh of the first devices of this process.

    The mesh is 1-D (``replicas`` devices) or, with a model axis, ``(replicas, model_size)``.
    To continue on a mesh of another shape, build ``shard_local`` on it and regroup the state
    with :func:`merge_replicas` (``into=``).
    """
    need = replicas * (model_size if model_axis is not None else 1)
    devices = jax.devices()
    if len(devices) < need:
        raise ConfigError(
            f"shard_local spec needs {need} devices ({replicas} along {axis!r}"
            + (f" x {model_size} along {model_axis!r}" if model_axis else "")
            + f"), this process sees {len(devices)}; rebuild with jaxmon.sharding.shard_local("
            "jaxmon.from_spec(spec['params']['estimator']), mesh) on a mesh of your choice"
        )
    if model_axis is None:
        mesh = Mesh(devices[:replicas], (axis,))
    else:
        mesh = Mesh(np.array(devices[:need]).reshape(replicas, model_size), (axis, model_axis))
    return shard_local(
        from_spec(estimator), mesh, axis, batch_axis=batch_axis, model_axis=model_axis
    )


def _layout_of(sharded_est: Estimator, what: str = "merge_replicas") -> _Layout:
    if sharded_est.spec.name != "shard_local":
        raise ConfigError(
            f"{what} expects an estimator built by jaxmon.sharding.shard_local, got "
            f"{sharded_est.spec.name!r}"
        )
    layout = getattr(sharded_est.init, "__self__", None)
    if not isinstance(layout, _Layout):  # a hand-made Estimator with this spec: rebuild it
        layout = from_spec(sharded_est.spec).init.__self__
    return layout


def replica_count(state: Any) -> int:
    """The number of replicas (the leading axis) of a ``shard_local`` state."""
    return int(jax.tree.leaves(state)[0].shape[0])


def _tree_merge_body(merge_fn, state):
    """Pairwise tree merge over the leading axis (fixed order: the same bits on every call)."""
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


_tree_merge_jit = jax.jit(_tree_merge_body, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _group_merge_jit(merge_fn, state, groups: int):
    """Replicas ``[g*k, (g+1)*k)`` merged into replica ``g``, for ``groups`` groups."""
    k = jax.tree.leaves(state)[0].shape[0] // groups
    grouped = jax.tree.map(lambda leaf: leaf.reshape(groups, k, *leaf.shape[1:]), state)
    return jax.vmap(lambda s: _tree_merge_body(merge_fn, s))(grouped)


def _tree_merge(est: Estimator, state: Any) -> Any:
    return _tree_merge_jit(est.merge, state)


def merge_replicas(sharded_est: Estimator, state: Any, *, into: Estimator | None = None) -> Any:
    """Collapses the replicas of a ``shard_local`` state into one state of the inner estimator.

    Pairwise tree merge with the inner ``merge`` (exact counters stay exact; sketches merge by
    their own rule); equal to the single-device state of the same rows up to float rounding.

    Args:
      sharded_est: the estimator returned by :func:`shard_local`.
      state: its state (leading replica axis).
      into: another ``shard_local`` estimator of the same inner estimator, e.g. on a mesh of
        another shape, whose replica count divides this state's: consecutive groups of
        replicas are merged into each of its replicas and laid out on its mesh, so the
        state continues there (see the module docstring).

    Returns:
      A state of the inner estimator, without the replica axis (wide leaves split over the
      model axis when ``sharded_est`` has one); with ``into``, a state of ``into``.

    Raises:
      ConfigError: not ``shard_local`` estimators, different inner estimators, or an ``into``
        whose replica count does not divide this state's.
    """
    src = _layout_of(sharded_est)
    if into is None:
        merged = _tree_merge(src.inner, state)
        return src.put_inner(merged) if src.model_axis is not None else merged
    dst = _layout_of(into, "merge_replicas(into=...)")
    if dst.inner.spec != src.inner.spec:
        raise ConfigError(
            "merge_replicas(into=...): the two shard_local estimators wrap different estimators "
            f"({src.inner.spec.name} vs {dst.inner.spec.name}, or other hyperparameters)"
        )
    have = replica_count(state)
    if have % dst.replicas:
        raise ConfigError(
            f"merge_replicas(into=...): {have} replicas cannot be grouped into {dst.replicas}; "
            "choose a mesh whose data axis divides the saved replica count, or merge to one "
            "state first (merge_replicas without into=)"
        )
    return dst.put(_group_merge_jit(src.inner.merge, state, dst.replicas))


def state_sharding(sharded_est: Estimator) -> Callable[[Any], NamedSharding]:
    """Where a ``shard_local`` or ``shard_wide`` estimator keeps each leaf of its state.

    Returns:
      A callable ``(leaf: ShapeDtypeStruct or array) -> NamedSharding``: pass it as
      ``sharding=`` to :func:`jaxmon.checkpoint.load` to restore a state straight into this
      layout (a saved ``shard_local`` state may hold more replicas than this mesh's data axis,
      a multiple of it: regroup it with :func:`merge_replicas` ``(into=...)``), or use
      ``.shard_shape(leaf.shape)`` of its result to count the bytes each device holds.

    Raises:
      ConfigError: not a ``shard_local`` / ``shard_wide`` estimator.
    """
    if sharded_est.spec.name == "shard_wide":
        wide = getattr(sharded_est.init, "__self__", None)
        if not isinstance(wide, _Wide):  # a hand-made Estimator with this spec: rebuild it
            wide = from_spec(sharded_est.spec).init.__self__
        return lambda leaf: NamedSharding(wide.mesh, wide.spec(leaf))
    layout = _layout_of(sharded_est, "state_sharding")
    return lambda leaf: NamedSharding(layout.mesh, layout.spec(leaf))


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

    Given a :func:`shard_local` estimator, the two compose: the result is that estimator with
    each replica's matrix leaves split over ``axis`` (``shard_local(..., model_axis=axis)``, on
    ``mesh``; see the module docstring).

    Args:
      est: any estimator (a monitor included), or a ``shard_local`` one.
      mesh: the device mesh.
      axis: the mesh axis the columns of the wide leaves are split over.

    Returns:
      An :class:`~jaxmon.Estimator` with ``est``'s state, fitted value and scores, laid out wide.
    """
    if axis not in mesh.shape:
        raise ConfigError(f"shard_wide: mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    if est.spec.name == "shard_local":
        local = _layout_of(est, "shard_wide")
        if local.axis not in mesh.shape:
            raise ConfigError(
                f"shard_wide: the shard_local estimator's data axis {local.axis!r} is not an axis "
                f"of the mesh {tuple(mesh.shape)}"
            )
        return shard_local(
            local.inner,
            mesh,
            local.axis,
            batch_axis=local.batch_axis,
            model_axis=axis,
        )
    size = int(mesh.shape[axis])
    spec = EstimatorSpec(
        "shard_wide",
        {"estimator": est.spec.to_dict(), "axis": axis, "size": size},
        mergeable=est.spec.mergeable,
        supervised=est.spec.supervised,
    )

    wide = _Wide(est, mesh, axis, size)
    return Estimator(
        wide.init, jax.jit(wide.update), jax.jit(wide.merge), est.finalize, est.score, spec
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _Wide:
    """A ``shard_wide`` estimator: one state, its matrix leaves split by columns over ``axis``.

    The estimator's ``init`` is this object's bound method (read by :func:`state_sharding`).
    """

    inner: Estimator
    mesh: Mesh
    axis: str
    size: int

    def spec(self, leaf: Any) -> P:
        return _wide_spec(leaf, self.axis, self.size)

    def put(self, state: Any) -> Any:
        return _place(state, self.mesh, self.spec)

    def init(self, example):
        return self.put(self.inner.init(example))

    def update(self, state, x, **kwargs):
        return self.put(self.inner.update(state, x, **kwargs))

    def merge(self, a, b):
        return self.put(self.inner.merge(a, b))


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
