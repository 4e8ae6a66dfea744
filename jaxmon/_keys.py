"""Monitor keys (``"a->b:det"``) and what kind of estimator keys its outputs by them.

A monitor's state, fitted value and scores are dicts with string keys. This module is the one
place that reads or writes that format; everything else goes through :class:`MonitorKey`::

    key       := taps [":" detector]
    taps      := tap | tap "->" tap        (one tap, or a pair for two-tap estimators)

* ``"blocks/0/mlp_out"``: one estimator on one tap;
* ``"blocks/0/mlp_out:gauss"``: the detector named ``gauss`` on that tap;
* ``"blocks/0/resid->blocks/1/resid"`` (and ``"...:name"``): a pair of taps.

Detector names never hold ``":"`` (the monitor refuses them), so the detector is what follows
the *last* ``":"``. A tap name holding ``":"`` or ``"->"`` makes a key ambiguous; such names
read as a detector suffix or a pair.

:func:`kind_of` is the one decision "are this estimator's outputs keyed by monitor keys, and
are its scores calibrated?", taken from its spec (through wrappers such as ``calibrated``,
``every_k`` or ``shard_local``, which keep their inner spec under ``params["estimator"]``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from jaxmon._base import Estimator, EstimatorSpec
from jaxmon.errors import ConfigError

__all__ = [
    "DETECTOR",
    "PAIR",
    "EstimatorKind",
    "MonitorKey",
    "kind_of",
    "parse_pattern",
]

PAIR = "->"  # between the two taps of a pair key
DETECTOR = ":"  # before a detector's name


@dataclasses.dataclass(frozen=True)
class MonitorKey:
    """One key of a monitor's state, fitted value or scores.

    Attributes:
      taps: the tap it reads, or the two taps of a pair (source first).
      detector: the detector's name when its pattern maps to named detectors, else None.

    Example:
      >>> k = MonitorKey.parse("blocks/0/resid->blocks/1/resid:ridge")
      >>> k.taps, k.detector, k.pair
      (('blocks/0/resid', 'blocks/1/resid'), 'ridge', True)
      >>> str(MonitorKey.of("blocks/0/mlp_out", "gauss"))
      'blocks/0/mlp_out:gauss'
    """

    taps: tuple[str, ...]
    detector: str | None = None

    def __post_init__(self) -> None:
        taps = self.taps
        if (
            not isinstance(taps, tuple)
            or len(taps) not in (1, 2)
            or not all(isinstance(t, str) and t for t in taps)
        ):
            raise ConfigError(
                f"a monitor key reads one tap or a pair of taps (non-empty names), got {taps!r}"
            )
        det = self.detector
        if det is not None and (not isinstance(det, str) or not det or DETECTOR in det):
            raise ConfigError(
                f"a detector name must be a non-empty string without {DETECTOR!r}, got {det!r}"
            )

    @classmethod
    def of(cls, taps: str | Sequence[str], detector: str | None = None) -> MonitorKey:
        """The key of ``detector`` (or of the pattern's only estimator) on ``taps``.

        Args:
          taps: one tap name, or the two tap names of a pair.
          detector: the detector's name, or None.

        Raises:
          ConfigError: not one tap or two, an empty name, or a detector name holding ``":"``.
        """
        return cls((taps,) if isinstance(taps, str) else tuple(taps), detector)

    @classmethod
    def parse(cls, key: str) -> MonitorKey:
        """Reads a key written by :meth:`format` (or by a monitor).

        Raises:
          ConfigError: not a string, empty, an empty detector or tap name, or more than one
            ``"->"``.
        """
        if not isinstance(key, str) or not key:
            raise ConfigError(f"a monitor key is a non-empty string, got {key!r}")
        base, sep, det = key.rpartition(DETECTOR)
        if not sep:
            base, det = key, None
        taps = tuple(base.split(PAIR))
        if len(taps) > 2:
            raise ConfigError(
                f"monitor key {key!r} names {len(taps)} taps; a key reads one tap or a pair "
                f"'a{PAIR}b'"
            )
        try:
            return cls(taps, det)
        except ConfigError as e:
            raise ConfigError(f"{key!r} is not a monitor key: {e}") from None

    @classmethod
    def readings(cls, key: str) -> tuple[MonitorKey, ...]:
        """Every way to read ``key``, :meth:`parse`'s reading first.

        A key whose tap names hold ``":"`` or ``"->"`` reads several ways: without a detector
        (the whole key names the taps) or with one (after the last ``":"``), and as one tap or
        as a pair (split at the first ``"->"``). A monitor takes the first reading its patterns
        produce, and refuses at ``init`` a key that would read back as another pattern's.

        Raises:
          ConfigError: ``key`` is not a non-empty string.
        """
        if not isinstance(key, str) or not key:
            raise ConfigError(f"a monitor key is a non-empty string, got {key!r}")
        base, sep, det = key.rpartition(DETECTOR)
        splits = [(base, det)] if sep else []
        splits.append((key, None))
        out: list[MonitorKey] = []
        try:
            out.append(cls.parse(key))
        except ConfigError:
            pass
        for taps_part, detector in splits:
            a, arrow, b = taps_part.partition(PAIR)
            for taps in ((a, b), (taps_part,)) if arrow else ((taps_part,),):
                try:
                    reading = cls(taps, detector)
                except ConfigError:
                    continue
                if reading not in out:
                    out.append(reading)
        return tuple(out)

    @property
    def pair(self) -> bool:
        """Whether the key reads a pair of taps."""
        return len(self.taps) == 2

    @property
    def base(self) -> str:
        """The taps part: ``"a"`` or ``"a->b"``."""
        return PAIR.join(self.taps)

    def with_detector(self, detector: str | None) -> MonitorKey:
        """The key of another detector on the same taps."""
        return MonitorKey(self.taps, detector)

    def format(self) -> str:
        """The key as a string, ``"a"``, ``"a:det"``, ``"a->b"`` or ``"a->b:det"``."""
        return self.base if self.detector is None else f"{self.base}{DETECTOR}{self.detector}"

    def __str__(self) -> str:
        return self.format()


def parse_pattern(pattern: str) -> str | tuple[str, str]:
    """A config file's tap pattern: ``"a -> b"`` is the pair ``("a", "b")``, else the glob.

    Spaces around ``"->"`` are allowed in patterns written by hand (not in keys).

    Raises:
      ConfigError: more than one ``"->"``, or an empty side.
    """
    if PAIR not in pattern:
        return pattern
    sides = [p.strip() for p in pattern.split(PAIR)]
    if len(sides) != 2 or not all(sides):
        raise ConfigError(
            f"pattern {pattern!r}: a pair pattern is two tap names or globs, 'a {PAIR} b'"
        )
    return sides[0], sides[1]


class EstimatorKind(NamedTuple):
    """What :func:`kind_of` found.

    Attributes:
      monitor: the estimator takes ``{tap: rows}`` and its states, fitted values and scores are
        dicts keyed by monitor keys (a monitor, or a wrapper of one).
      calibrated: its scores are calibrated ``-log10 p`` (``jaxmon.calibrated`` is in the
        chain of wrappers); its fitted value is a ``CalibratedFitted``.
    """

    monitor: bool
    calibrated: bool


def _spec_dict(est_or_spec: Any) -> Mapping[str, Any]:
    if isinstance(est_or_spec, Estimator):
        return est_or_spec.spec.to_dict()
    if isinstance(est_or_spec, EstimatorSpec):
        return est_or_spec.to_dict()
    if isinstance(est_or_spec, str):
        try:
            return json.loads(est_or_spec)
        except ValueError as e:
            raise ConfigError(f"not an estimator spec (JSON): {est_or_spec[:80]!r}") from e
    if isinstance(est_or_spec, Mapping):
        return est_or_spec
    raise ConfigError(f"expected a jaxmon Estimator or its spec, got {type(est_or_spec).__name__}")


def kind_of(est_or_spec: Estimator | EstimatorSpec | Mapping[str, Any] | str) -> EstimatorKind:
    """Whether an estimator is a monitor and whether it is calibrated, from its spec alone.

    Wrappers (``calibrated``, ``every_k``, ``shard_local``, ``shard_wide`` and any other
    combinator that keeps one inner spec under ``params["estimator"]``) are looked through.

    Args:
      est_or_spec: an :class:`~jaxmon.Estimator`, its :class:`~jaxmon.EstimatorSpec`, the spec
        as a dict or as JSON.

    Raises:
      ConfigError: not an estimator or a spec.
    """
    spec, calibrated = _spec_dict(est_or_spec), False
    while isinstance(spec, Mapping):
        name = spec.get("name")
        if name == "monitor":
            return EstimatorKind(True, calibrated)
        calibrated |= name == "calibrated"
        params = spec.get("params")
        spec = params.get("estimator") if isinstance(params, Mapping) else None
    return EstimatorKind(False, calibrated)
