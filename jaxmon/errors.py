"""Every error jaxmon raises on purpose, in one place.

Each class is a ``ValueError`` (so ``except ValueError`` keeps working) and a
:class:`JaxmonError` (so ``except jaxmon.errors.JaxmonError`` catches anything jaxmon refused).
Messages are one sentence that says what was wrong, where (the tap, key, file or row), and what
to do; the failure of a lower layer (orbax, tensorstore, numpy, JSON) is chained as
``__cause__``, never shown as a raw traceback.

Errors are raised only at the Python boundary (shapes, dtypes, configs, files, empty fits).
Inside ``jit`` nothing can raise: non-finite rows are counted and excluded from states and
score ``+inf``; a fitted value of an empty state scores NaN (see :class:`NotFittedError`).
"""

from __future__ import annotations

__all__ = [
    "JaxmonError",
    "ShapeError",
    "MissingTapError",
    "NotFittedError",
    "ConfigError",
    "StoreError",
    "ExistingPathError",
    "MissingFileError",
    "CheckpointError",
    "ConditioningWarning",
    "one_line",
]


class JaxmonError(Exception):
    """Base class of every error jaxmon raises on purpose."""


class ShapeError(JaxmonError, ValueError):
    """An input whose shape or dtype does not match what the estimator (or tap) expects."""


class MissingTapError(ShapeError, KeyError):
    """A call that lacks a tap the estimator (a monitor key, a store query) needs; names it."""

    __str__ = Exception.__str__  # KeyError would quote the whole message


class NotFittedError(JaxmonError, ValueError):
    """A fit without data: ``finalize`` of a state that holds no rows, or scoring with its result.

    Outside ``jit``, ``finalize`` raises this when the state (or any part of a composite state,
    e.g. one key of a monitor, or the calibration sketches of ``calibrated``) holds no rows.
    Inside ``jit`` nothing can raise: the fitted value records the rows it was fitted on, and
    ``score`` returns NaN for every row of a fit with none (no number, rather than a
    confident one).
    """


class ConfigError(JaxmonError, ValueError, TypeError):
    """A configuration or spec that cannot describe an estimator (unknown name, bad JSON...).

    Also a ``TypeError``: passing the wrong kind of object (a factory instead of an estimator,
    an array where a dict of taps is expected) is reported with this class too.
    """


class StoreError(JaxmonError, ValueError):
    """An activation store or query output that is missing, truncated, corrupted or inconsistent."""


class ExistingPathError(StoreError, FileExistsError):
    """An output path (a store, a query directory) exists already and would be overwritten."""


class MissingFileError(StoreError, FileNotFoundError):
    """An input file (an ``.npy``, ``.npz`` or safetensors file to import) does not exist."""


class CheckpointError(JaxmonError, ValueError):
    """A checkpoint that is missing, incomplete, corrupted, or does not match what was asked."""


class ConditioningWarning(UserWarning):
    """A fit that succeeded but whose numbers are unreliable (e.g. fewer rows than features)."""


def one_line(err: BaseException, limit: int = 160) -> str:
    """The first line of ``err``'s message, shortened to ``limit`` characters, for chaining.

    Lower layers (orbax, tensorstore) raise messages of thousands of characters; a jaxmon
    message quotes only their gist and keeps the whole error as ``__cause__``.
    """
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split())
    if not text:
        text = type(err).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
