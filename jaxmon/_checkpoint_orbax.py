"""The orbax adapter of :mod:`jaxmon.checkpoint`: every orbax call of jaxmon lives here.

Private. It builds the ``ocp.args`` of the jaxmon items (and their restore targets, with
shardings), runs a ``CheckpointManager`` over a directory (alone or with every process of a
multi-process job), and turns orbax's failures into one-sentence :class:`CheckpointError`\\ s.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmon._checkpoint_records import error, short
from jaxmon.errors import one_line


def save_items(names: tuple[str, str, str], state: Any, fitted: Any, meta: Any) -> dict[str, Any]:
    """``{item name: ocp.args}`` saving state, fitted value (when not None) and metadata."""
    state_name, fitted_name, meta_name = names
    out = {state_name: ocp.args.StandardSave(state), meta_name: ocp.args.JsonSave(meta)}
    if fitted is not None:
        out[fitted_name] = ocp.args.StandardSave(fitted)
    return out


def restore_items(
    names: tuple[str, str, str],
    abstract_state: Any,
    abstract_fitted: Any,
    *,
    sharding: Any,
    fitted_sharding: Any,
    meta: bool = True,
) -> dict[str, Any]:
    """``{item name: ocp.args}`` restoring onto ``abstract_*`` (fitted when not None).

    ``fitted_sharding`` defaults to ``sharding`` when that is one sharding or a callable.
    """
    state_name, fitted_name, meta_name = names
    out = {state_name: ocp.args.StandardRestore(with_shardings(abstract_state, sharding))}
    if meta:
        out[meta_name] = ocp.args.JsonRestore()
    if abstract_fitted is not None:
        if fitted_sharding is None and not _is_tree_of_shardings(sharding):
            fitted_sharding = sharding
        out[fitted_name] = ocp.args.StandardRestore(
            with_shardings(abstract_fitted, fitted_sharding)
        )
    return out


def with_shardings(abstract: Any, sharding: Any) -> Any:
    """``abstract`` (a pytree of ``ShapeDtypeStruct``) with a sharding on every leaf.

    ``sharding`` is None (the first local device), one ``jax.sharding.Sharding``, a callable
    ``(ShapeDtypeStruct) -> Sharding``, or a pytree of shardings with the leaves of ``abstract``.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    plain = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        chosen = [sharding or default] * len(plain)
    elif callable(sharding):
        chosen = [sharding(x) or default for x in plain]
    else:
        chosen = jax.tree_util.tree_leaves(
            sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
        )
        if len(chosen) != len(plain):
            raise error(
                f"sharding= has {len(chosen)} leaves but the checkpointed tree has {len(plain)}; "
                "pass one jax.sharding.Sharding, a callable, or a pytree matching the state"
            )
    out = []
    for x, s in zip(plain, chosen, strict=True):
        try:
            out.append(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        except (TypeError, ValueError) as e:
            raise error(
                f"the sharding chosen for a {x.dtype.name}{list(x.shape)} leaf does not fit it "
                f"({one_line(e, 100)}); pass fitted_sharding= or a callable sharding="
            ) from e
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_tree_of_shardings(sharding: Any) -> bool:
    return not (
        sharding is None or isinstance(sharding, jax.sharding.Sharding) or callable(sharding)
    )


def replicated_saves(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with every saved array held by this process alone made a global replicated one.

    orbax writes arrays of a global mesh only: a state every process holds whole (e.g. from a
    multi-process ``fit_store``; the same values everywhere) becomes replicated over every
    device of the job, and orbax writes it once. Arrays already spread over a global mesh are
    left as they are.
    """
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(x: Any) -> Any:
        if not getattr(x, "is_fully_addressable", True):
            return x
        local = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(local.shape, everywhere, lambda idx: local[idx])

    return {
        k: ocp.args.StandardSave(jax.tree_util.tree_map(put, v.item))
        if isinstance(v, ocp.args.StandardSave)
        else v
        for k, v in args.items()
    }


def _manager(directory: str, *, create: bool, alone: bool = True) -> ocp.CheckpointManager:
    """An orbax manager of ``directory``.

    ``alone``: in a multi-process job, this process runs the manager by itself (orbax's
    ``active_processes={this process}``): for reading a checkpoint into this process's own
    devices, and for the single writer of a state every process holds whole. Otherwise every
    process of the job takes part (states sharded over a global mesh).
    """
    multiprocessing = None
    if alone and jax.process_count() > 1:
        me = jax.process_index()
        multiprocessing = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"jaxmon_p{me}"
        )
        if create:  # orbax leaves the root to us when a manager runs on some processes only
            os.makedirs(directory, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        create=create and multiprocessing is None,
        # Leftovers of a save killed mid-way are removed when a manager opens the directory.
        cleanup_tmp_directories=create,
        enable_async_checkpointing=False,
        multiprocessing_options=multiprocessing or ocp.options.MultiprocessingOptions(),
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def all_steps(root: str) -> list[int]:
    """Every step orbax considers finalized (sealed or not)."""
    if not os.path.isdir(root):
        raise error(f"no checkpoint directory at {short(root)}")
    try:
        with _manager(root, create=False) as mngr:
            return sorted(int(s) for s in mngr.all_steps())
    except Exception as e:
        raise error(f"cannot list the steps of {short(root)} ({one_line(e, 120)})") from e


def read_json_item(root: str, step: int, item: str) -> Any:
    """The raw JSON of the metadata item ``item`` of a step, errors as one sentence."""
    if not os.path.isdir(os.path.join(root, str(step), item)):
        raise error(f"step {step} of {short(root)} has no {item} item; is it a jaxmon checkpoint?")
    args = ocp.args.Composite(**{item: ocp.args.JsonRestore()})
    try:
        with _manager(root, create=False) as mngr:
            return mngr.restore(step, args=args)[item]
    except Exception as e:
        raise error(
            f"the metadata item {item} of step {step} in {short(root)} cannot be read "
            f"({one_line(e, 100)})"
        ) from e


def write_step(root: str, step: int, args: dict[str, Any]) -> None:
    """orbax writes one step of ``args`` (every process of the job takes part)."""
    try:
        with _manager(root, create=True, alone=False) as mngr:
            mngr.save(step, args=ocp.args.Composite(**args))
            mngr.wait_until_finished()
    except Exception as e:
        raise error(f"cannot save step {step} to {short(root)} ({one_line(e, 120)})") from e


def read_step(root: str, step: int, targets: dict[str, Any], where: str) -> dict[str, Any]:
    """The items of ``targets`` (from :func:`restore_items`) restored from one step.

    Into this process's own devices every process reads by itself; into a global mesh every
    process takes part in one restore.
    """
    alone = all(
        leaf.sharding.is_fully_addressable
        for target in targets.values()
        for leaf in jax.tree_util.tree_leaves(getattr(target, "item", None))
    )
    try:
        with _manager(root, create=False, alone=alone) as mngr:
            return mngr.restore(step, args=ocp.args.Composite(**targets))
    except Exception as e:
        raise error(f"orbax cannot restore {where} ({one_line(e, 120)})") from e
