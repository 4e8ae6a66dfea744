"""The digest record of a checkpoint step: sizes and SHA-256 of its files, written and verified.

Private to :mod:`jaxmon.checkpoint`. ``jaxmon_digests.json`` is written atomically (tmp file,
fsync, rename) once orbax has finalized a step; a step without it is an interrupted save.
``load`` verifies every file it is about to read against it before orbax reads a byte.
No orbax here: only files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Sequence

from jaxmon._checkpoint_records import FORMAT_VERSION, error, short
from jaxmon.errors import one_line

DIGESTS = "jaxmon_digests.json"
_DIGESTS_FORMAT = "jaxmon-digests"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, str(step))


def covered_files(step_path: str, items: Collection[str]) -> list[str]:
    """Files the digest record covers, relative to the step (``/``-separated, sorted).

    The step's own top-level files and every file of the jaxmon ``items``; other items of a
    composite the user wrote with their own manager (a model) are theirs to verify.
    """
    out = []
    for name in sorted(os.listdir(step_path)):
        path = os.path.join(step_path, name)
        if os.path.isdir(path):
            if name not in items:
                continue
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for f in sorted(files):
                    rel = os.path.relpath(os.path.join(root, f), step_path)
                    out.append(rel.replace(os.sep, "/"))
        elif not name.startswith(DIGESTS):
            out.append(name)
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def write_digests(step_path: str, items: Collection[str]) -> None:
    """Writes ``jaxmon_digests.json`` for a finalized step: tmp file, fsync, atomic rename."""
    files = {}
    for rel in covered_files(step_path, items):
        path = os.path.join(step_path, rel)
        files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    record = {
        "format": _DIGESTS_FORMAT,
        "format_version": FORMAT_VERSION,
        "algorithm": "sha256",
        "files": files,
    }
    tmp = os.path.join(step_path, f"{DIGESTS}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_path, DIGESTS))
    try:  # make the rename itself durable (not possible on every platform)
        fd = os.open(step_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def is_sealed(root: str, step: int) -> bool:
    return os.path.isfile(os.path.join(step_dir(root, step), DIGESTS))


def _read_record(record_path: str, where: str) -> dict[str, dict]:
    """The ``files`` of a digest record, checked, or a one-sentence error naming the record."""
    try:
        with open(record_path, "rb") as f:
            record = json.loads(f.read())
        files = record["files"]
        if record.get("format") != _DIGESTS_FORMAT or record.get("algorithm") != "sha256":
            raise ValueError(f"unknown digest record format {record.get('format')!r}")
        if not isinstance(files, dict) or not all(
            isinstance(v, dict)
            and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise ValueError("malformed file entries")
        for rel in files:
            parts = rel.split("/")
            # Names come from a file: they must stay inside the step directory.
            if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"file name {rel[:40]!r} outside the step")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise error(
            f"the digest record {DIGESTS} of {where} cannot be read ({one_line(e, 80)})"
        ) from e
    return files


def _verify_file(path: str, rel: str, want: dict, where: str) -> None:
    """One file against its entry: present, of the recorded size and digest."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise error(f"checkpoint file {rel} of {where} is missing ({one_line(e, 60)})") from e
    if size != want["size"]:
        cause = OSError(f"{path}: {size} bytes on disk, {want['size']} recorded")
        raise error(
            f"checkpoint file {rel} of {where} is truncated or overwritten: {size} bytes on "
            f"disk, {want['size']} recorded at save time"
        ) from cause
    try:
        digest = _sha256(path)
    except OSError as e:
        raise error(f"checkpoint file {rel} of {where} cannot be read ({one_line(e, 60)})") from e
    if digest != want["sha256"]:
        cause = ValueError(f"{path}: sha256 {digest}, recorded {want['sha256']}")
        raise error(
            f"checkpoint file {rel} of {where} is corrupted: its SHA-256 digest differs from "
            "the one recorded at save time"
        ) from cause


def verify(root: str, step: int, items: Sequence[str]) -> None:
    """Checks every covered file of ``items`` (and the step's own files) against the record."""
    path = step_dir(root, step)
    where = f"step {step} of {short(root)}"
    files = _read_record(os.path.join(path, DIGESTS), where)

    def wanted(rel: str) -> bool:
        return "/" not in rel or rel.split("/", 1)[0] in items

    present = {rel for rel in covered_files(path, items) if wanted(rel)}
    for rel in sorted(r for r in files if wanted(r)):
        _verify_file(os.path.join(path, *rel.split("/")), rel, files[rel], where)
    extra = sorted(present - set(files))
    if extra:
        cause = ValueError(f"files not in {DIGESTS}: {extra}")
        raise error(
            f"checkpoint file {extra[0]} of {where} was not written by the save (it is not in "
            f"{DIGESTS})"
        ) from cause
