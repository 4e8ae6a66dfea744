"""Checkpoints of estimator states and fitted values, through orbax.

A jaxmon checkpoint step holds up to three orbax items and one digest record:

* ``jaxmon_state``: the mergeable summary (a pytree of arrays), saved with ``StandardSave``;
* ``jaxmon_fitted`` (optional): the output of ``finalize``;
* ``jaxmon_meta``: a small JSON record (format version 2): the estimator spec, the ``init``
  example's shapes and dtypes, the structure of state and fitted (node kinds, type *names*,
  field names, shapes and dtypes; for diagnostics and checks), exact row counts, the step, the
  creation time, the jaxmon version and the user's own metadata;
* ``jaxmon_digests.json``: the size and SHA-256 digest of every file of the step, written
  atomically once orbax has finalized the step, and verified by :func:`load` before orbax reads
  a byte.

**No code from data.** Restoring never imports or calls anything named by the checkpoint's
files: the estimator is rebuilt by name from jaxmon's registry (``jaxmon.from_spec``), and the
abstract restore target is ``jax.eval_shape(est.init, example)`` (and
``jax.eval_shape(est.finalize, ...)`` for the fitted value) from the saved spec and example.
The saved structure record is only compared with that target, so a crafted or stale file
gives a :class:`CheckpointError` naming the first difference.

**Verified.** A bit flip, a missing, truncated or unexpected file, or garbled metadata is a
:class:`CheckpointError` of one sentence naming the file (the lower layer's error chained as
``__cause__``). A step whose digest record is missing is treated as an interrupted save:
:func:`steps` does not list it, :func:`load` picks the latest verified step, and :func:`save`
may write that step number again.

**Atomic.** A step is written by orbax to ``<step>.orbax-checkpoint-tmp-*`` and renamed when
complete; the digest record is written last. A process killed at any point of a save leaves
the previous steps intact.

**Many processes.** Under ``jax.distributed`` :func:`save` is collective (see its docstring);
:func:`load` into this process's own devices (the default) is done by each process alone
(orbax's ``active_processes``), into a global mesh by all processes together.

The items also splice into a user's own ``ocp.CheckpointManager`` next to the model and
optimizer with :func:`save_args` / :func:`restore_args` / :func:`restored`; call :func:`seal`
after such a save so that :func:`load` can read (and verify) the jaxmon items directly.

Layout: this module is the public API; the work is split by concern into private modules:
``_checkpoint_records`` (the JSON records of the metadata item: structure, example, spec;
one-sentence errors), ``_checkpoint_digests`` (the digest record: write, verify) and
``_checkpoint_orbax`` (the adapter that holds every orbax call).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jaxmon import _checkpoint_digests as digests
from jaxmon import _checkpoint_orbax as orbax_io
from jaxmon import _checkpoint_records as records
from jaxmon._base import Estimator
from jaxmon._checkpoint_digests import DIGESTS
from jaxmon._checkpoint_records import FORMAT, FORMAT_VERSION, error, short
from jaxmon.errors import CheckpointError, one_line

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load",
    "merge",
    "restore_args",
    "restored",
    "save",
    "save_args",
    "seal",
    "steps",
]


@dataclasses.dataclass
class Checkpoint:
    """What a jaxmon checkpoint holds, rebuilt with no user code.

    Attributes:
      estimator: rebuilt from the stored spec with ``jaxmon.from_spec``.
      state: the mergeable state (same pytree types as when saved).
      fitted: the fitted value, or None when none was saved.
      metadata: the JSON record (``spec``, ``jaxmon_version``, ``example``, ``rows``, ``step``,
        ``created``, ``user``, ...).
      step: the checkpoint step.
    """

    estimator: Estimator
    state: Any
    fitted: Any
    metadata: dict[str, Any]
    step: int

    @property
    def example(self) -> Any:
        """The ``init`` example as ``jax.ShapeDtypeStruct`` pytree, or None if not recorded."""
        ex = self.metadata.get("example")
        return None if ex is None else records.example_from_record(ex)


# --------------------------------------------------------------------------- splice API


def save_args(
    est: Estimator,
    state: Any,
    *,
    fitted: Any = None,
    example: Any = None,
    step: int = 0,
    metadata: Mapping[str, Any] | None = None,
    prefix: str = "jaxmon",
) -> dict[str, Any]:
    """Orbax save arguments for a monitor, to splice into the user's own composite checkpoint.

    Args:
      est: the estimator (its spec is stored).
      state: its state.
      fitted: optional fitted value.
      example: the ``init`` example (array, ``ShapeDtypeStruct`` or dict of them for monitors);
        inferred for single-array estimators when omitted.
      step: recorded in the metadata.
      metadata: JSON-serialisable user metadata.
      prefix: item names are ``f"{prefix}_state"``, ``f"{prefix}_fitted"``, ``f"{prefix}_meta"``.

    Returns:
      A dict of item name to ``ocp.args`` to unpack into ``ocp.args.Composite``.

    Raises:
      CheckpointError: no example can be inferred, the state or fitted value does not match the
        estimator and example, or the metadata is not JSON.

    Example:
      >>> mngr.save(step, args=ocp.args.Composite(
      ...     params=ocp.args.StandardSave(params),
      ...     **jaxmon.checkpoint.save_args(monitor, mon_state, example=taps_example)))
      >>> mngr.wait_until_finished()
      >>> jaxmon.checkpoint.seal(mngr.directory, step)  # so that jaxmon.load can verify it
    """
    meta = records.metadata(est, state, fitted, example, step, metadata)
    return orbax_io.save_items(records.item_names(prefix), state, fitted, meta)


def restore_args(
    est: Estimator,
    example: Any,
    *,
    fitted: bool = False,
    sharding: Any = None,
    fitted_sharding: Any = None,
    prefix: str = "jaxmon",
) -> dict[str, Any]:
    """Orbax restore arguments matching :func:`save_args`, built from the estimator and example.

    Args:
      est: the estimator that was saved.
      example: its ``init`` example (the abstract target is ``jax.eval_shape(est.init, example)``
        and, for ``fitted=True``, ``jax.eval_shape(est.finalize, state)``).
      fitted: also restore the fitted item.
      sharding: one ``jax.sharding.Sharding`` for every leaf, a callable
        ``(ShapeDtypeStruct) -> Sharding``, or a pytree of shardings like the state.
      fitted_sharding: the same for the fitted value (defaults to ``sharding`` when that is a
        single sharding or callable).
      prefix: as in :func:`save_args`.

    Returns:
      A dict of item name to ``ocp.args``; pass the restored composite to :func:`restored`.
    """
    abstract_state, abstract_fitted = records.abstract_trees(
        est, example, fitted=fitted, what="cannot build the restore target"
    )
    return orbax_io.restore_items(
        records.item_names(prefix),
        abstract_state,
        abstract_fitted,
        sharding=sharding,
        fitted_sharding=fitted_sharding,
    )


def restored(
    items: Mapping[str, Any],
    *,
    est: Estimator | None = None,
    example: Any = None,
    step: int | None = None,
    prefix: str = "jaxmon",
) -> Checkpoint:
    """Wraps the jaxmon items of a restored composite (see :func:`restore_args`).

    The data was restored by the caller's own manager against the target of
    :func:`restore_args`, so metadata of format version 1 is accepted here (only its JSON is
    read).

    Raises:
      CheckpointError: the items are missing or do not match ``est`` / ``example``.
    """
    state_name, fitted_name, meta_name = records.item_names(prefix)
    try:
        meta = items[meta_name]
        state = items[state_name]
    except (KeyError, TypeError) as e:
        raise error(f"the restored composite holds no {state_name}/{meta_name} items") from e
    meta = records.check_meta(meta, "the restored composite", oldest=1)
    records.check_against(meta, est, example)
    fitted = items.get(fitted_name) if hasattr(items, "get") else None
    return Checkpoint(
        est or records.estimator_of(meta, "the restored composite"),
        state,
        fitted,
        meta,
        int(meta["step"] if step is None else step),
    )


# --------------------------------------------------------------------------- directory API


def seal(directory: str | os.PathLike, step: int, *, prefix: str = "jaxmon") -> str:
    """Records the digests of a step written by the caller's own ``CheckpointManager``.

    Call it once the manager's save of ``step`` (with items from :func:`save_args`) has
    finished (``mngr.wait_until_finished()``), on the primary process; :func:`load` then
    verifies the jaxmon items against it. :func:`save` seals its own steps.

    Args:
      directory: the manager's root directory.
      step: the step to seal.
      prefix: the ``prefix`` the items were saved with (:func:`save_args`).

    Returns:
      The path of the digest record.

    Raises:
      CheckpointError: the step does not exist (or is still being written) or has no jaxmon
        items, or the record cannot be written.
    """
    root = os.fspath(directory)
    items = records.item_names(prefix)
    step_dir = digests.step_dir(root, int(step))
    if not os.path.isdir(os.path.join(step_dir, items[2])):
        raise error(
            f"step {step} of {short(root)} holds no finished {prefix} items to seal (is its save "
            "still running, or were the items saved under another prefix?)"
        )
    try:
        digests.write_digests(step_dir, items)
    except OSError as e:
        raise error(
            f"cannot write the digest record of step {step} in {short(root)} ({one_line(e, 100)})"
        ) from e
    return os.path.join(step_dir, DIGESTS)


def save(
    directory: str | os.PathLike,
    est: Estimator,
    state: Any,
    *,
    fitted: Any = None,
    step: int = 0,
    metadata: Mapping[str, Any] | None = None,
    example: Any = None,
) -> str:
    """Saves ``state`` (and ``fitted``) of ``est`` as step ``step`` under ``directory``.

    Under ``jax.distributed`` every process makes the same call, and orbax writes the step
    with all of them: a state that every process holds whole (arrays on its own devices, the
    same values everywhere, e.g. the result of a multi-process
    :func:`jaxmon.query.fit_store`) is first made a replicated array of the whole job (so it
    is written once), a state sharded over a global mesh is written shard by shard. Process 0
    seals the step, and every process returns once it is sealed (or raises when the save
    failed anywhere).

    Args:
      directory: the checkpoint root (one subdirectory per step, orbax layout).
      est: the estimator; its spec is stored so :func:`load` needs no user code.
      state: the estimator's state.
      fitted: optional ``est.finalize(state)``.
      step: the step number (must not exist yet; an interrupted save of it is replaced).
      metadata: JSON-serialisable user metadata, returned as ``Checkpoint.metadata["user"]``.
      example: the ``init`` example (dict of taps for monitors); inferred when omitted for
        single-array estimators (a :class:`CheckpointError` asks for it otherwise).

    Returns:
      The path of the saved step.

    Raises:
      CheckpointError: the step exists already, ``directory`` is a file, the example cannot be
        inferred, ``state``/``fitted`` do not match the estimator and example, or the write
        fails.
    """
    root = os.fspath(directory)
    if os.path.exists(root) and not os.path.isdir(root):
        raise error(f"cannot save a checkpoint to {short(root)}: it exists and is not a directory")
    args = save_args(est, state, fitted=fitted, example=example, step=step, metadata=metadata)
    processes = jax.process_count()
    if processes > 1:
        args = orbax_io.replicated_saves(args)
    err = None
    try:
        _save_step(root, step, args)
    except CheckpointError as e:
        err = e
    if processes == 1:
        if err is not None:
            raise err
        return digests.step_dir(root, step)
    from jaxmon.io import all_gather_ints

    # Every process returns once the step is sealed, or raises when process 0 failed.
    failed = [i for i, (bad,) in enumerate(all_gather_ints([err is not None])) if bad]
    if err is not None:
        raise err
    if failed:
        raise error(
            f"process {failed[0]} could not save step {step} to {short(root)} (its error says why)"
        )
    return digests.step_dir(root, step)


def _save_step(root: str, step: int, args: dict[str, Any]) -> None:
    """Writes one step (every process) and seals it (process 0)."""
    step_dir = digests.step_dir(root, step)
    if os.path.isdir(step_dir):
        if digests.is_sealed(root, step):
            raise error(f"step {step} already exists in {short(root)}")
        foreign = [
            n
            for n in sorted(os.listdir(step_dir))
            if os.path.isdir(os.path.join(step_dir, n)) and n not in records.item_names()
        ]
        if foreign:
            raise error(
                f"step {step} of {short(root)} holds items not written by jaxmon.checkpoint.save; "
                "choose another step"
            )
        # An interrupted jaxmon save (finalized by orbax, never sealed): replace it.
        shutil.rmtree(step_dir)
    orbax_io.write_step(root, step, args)
    if jax.process_index() == 0:
        seal(root, step)


def steps(directory: str | os.PathLike) -> list[int]:
    """The complete, sealed steps under ``directory`` (interrupted saves are not listed).

    Raises:
      CheckpointError: no directory there, or orbax cannot list it.
    """
    root = os.fspath(directory)
    return [s for s in orbax_io.all_steps(root) if digests.is_sealed(root, s)]


def load(
    directory: str | os.PathLike,
    *,
    step: int | None = None,
    estimator: Estimator | None = None,
    example: Any = None,
    sharding: Any = None,
    fitted_sharding: Any = None,
    with_fitted: bool = True,
    prefix: str = "jaxmon",
) -> Checkpoint:
    """Rebuilds estimator, state and fitted value from a checkpoint alone, verified.

    Nothing named by the checkpoint's files is imported or called: the estimator comes from
    jaxmon's registry by its spec name, and the restore target from ``jax.eval_shape`` of its
    ``init`` (and ``finalize``) on the saved example. Every file read is first checked
    against the step's digest record.

    Args:
      directory: the checkpoint root given to :func:`save`.
      step: which step; the latest verified one by default.
      estimator: when given, its spec must equal the stored one (else a clear error).
      example: when given, the stored state must match ``estimator.init(example)``.
      sharding: where to put the state's leaves: one ``jax.sharding.Sharding`` (e.g. a
        replicated ``NamedSharding`` on a mesh), a callable ``(ShapeDtypeStruct) -> Sharding``,
        or a pytree of shardings like the state. Default: the first local device.
      fitted_sharding: the same for the fitted value (defaults to ``sharding`` when that is one
        sharding or a callable).
      with_fitted: restore the fitted value if one was saved.
      prefix: the ``prefix`` the items were saved with (:func:`save_args`, then :func:`seal`
        with the same prefix).

    Returns:
      A :class:`Checkpoint`.

    Raises:
      CheckpointError: no checkpoint there, no such (or an unsealed) step, a corrupted, missing,
        truncated or unexpected file, malformed metadata, an older or newer format, an
        estimator this jaxmon does not know, or a spec/shape mismatch. One sentence, naming
        the file where one is at fault, with the lower layer's error as ``__cause__``.
    """
    root = os.fspath(directory)
    step = _pick_step(root, step, prefix)
    where = f"step {step} of {short(root)}"
    state_name, fitted_name, meta_name = names = records.item_names(prefix)
    digests.verify(root, step, [meta_name, state_name] + ([fitted_name] if with_fitted else []))
    raw = orbax_io.read_json_item(root, step, meta_name)
    meta = records.check_meta(raw, f"the {meta_name} item of {where}")
    records.check_against(meta, estimator, example)
    est = estimator or records.estimator_of(meta, where)
    has_fitted = with_fitted and meta["fitted_tree"] is not None
    abstract_state, abstract_fitted = records.abstract_trees(
        est,
        records.example_from_record(meta["example"]),
        fitted=has_fitted,
        what=f"cannot restore {where}",
    )
    records.check_record(
        meta["state_tree"], abstract_state, "state", est, item=meta_name, where=where
    )
    if has_fitted:
        records.check_record(
            meta["fitted_tree"], abstract_fitted, "fitted value", est, item=meta_name, where=where
        )
    targets = orbax_io.restore_items(
        names,
        abstract_state,
        abstract_fitted,
        sharding=sharding,
        fitted_sharding=fitted_sharding,
        meta=False,
    )
    out = orbax_io.read_step(root, step, targets, where)
    fitted = out[fitted_name] if has_fitted else None
    return Checkpoint(est, out[state_name], fitted, meta, int(step))


def _pick_step(root: str, step: int | None, prefix: str) -> int:
    """The sealed step to load: ``step``, or the latest; errors say why a step cannot be read."""
    all_steps = orbax_io.all_steps(root)
    sealed = [s for s in all_steps if digests.is_sealed(root, s)]
    if step is None:
        if not sealed:
            if all_steps:
                raise _unsealed_error(root, all_steps[-1], prefix)
            raise error(f"{short(root)} holds no complete checkpoint")
        return sealed[-1]
    if step not in all_steps:
        raise error(f"{short(root)} has no step {step} (steps: {sealed})")
    if step not in sealed:
        raise _unsealed_error(root, step, prefix)
    return step


def _unsealed_error(root: str, step: int, prefix: str) -> CheckpointError:
    """Why an unsealed step cannot be loaded: an older format, or an unfinished save."""
    where = f"step {step} of {short(root)}"
    try:
        meta = orbax_io.read_json_item(root, step, records.item_names(prefix)[2])
    except CheckpointError:
        meta = None
    # Format 1 wrote no digest record: say so rather than call it an interrupted save.
    if isinstance(meta, Mapping) and meta.get("format") == FORMAT:
        version = meta.get("format_version")
        if isinstance(version, int) and version < FORMAT_VERSION:
            return records.older_format(where, version)
    err = error(
        f"{where} has no {DIGESTS}: its save was interrupted, or another CheckpointManager "
        "wrote it (then call jaxmon.checkpoint.seal on it once saved)"
    )
    path = os.path.join(digests.step_dir(root, step), DIGESTS)
    err.__cause__ = FileNotFoundError(errno.ENOENT, "no digest record", path)
    return err


def merge(
    directories: Sequence[str | os.PathLike],
    *,
    step: int | None = None,
    finalize: bool = False,
    prefix: str = "jaxmon",
) -> Checkpoint:
    """Merges the states saved by separate jobs (same estimator) into one.

    Args:
      directories: checkpoint roots, one per job.
      step: the step to read in each (latest by default).
      finalize: also compute ``fitted = est.finalize(merged_state)``.
      prefix: as in :func:`load`.

    Returns:
      A :class:`Checkpoint` with the merged state; its metadata is the first job's with the
      summed row counts and ``merged_from`` listing the sources.

    Raises:
      CheckpointError: no directories, a checkpoint that cannot be loaded, or their
        estimators/state shapes differ.
    """
    if not directories:
        raise error("merge needs at least one checkpoint directory")
    first = load(directories[0], step=step, with_fitted=False, prefix=prefix)
    state = first.state
    for d in directories[1:]:
        other = load(d, step=step, with_fitted=False, prefix=prefix)
        if other.metadata["spec"] != first.metadata["spec"]:
            raise error(
                f"cannot merge {short(d)}: its estimator spec differs from the first "
                f"checkpoint's ({json.dumps(other.metadata['spec'])[:60]} vs "
                f"{json.dumps(first.metadata['spec'])[:60]})"
            )
        diff = records.first_difference(other.metadata["state_tree"], first.metadata["state_tree"])
        if diff:
            raise error(f"cannot merge {short(d)}: its state differs {diff}")
        state = first.estimator.merge(state, other.state)
    meta = dict(first.metadata)
    meta["rows"], meta["nonfinite"] = records.counts(state)
    meta["merged_from"] = [os.fspath(d) for d in directories]
    fitted = first.estimator.finalize(state) if finalize else None
    if fitted is not None:
        meta["fitted_tree"] = records.describe(fitted)
    return Checkpoint(first.estimator, state, fitted, meta, first.step)
