"""Flax NNX taps: sow into :class:`Tap`, or tap module outputs by path without editing the model.

Two ways to tap an NNX model, both returning ``(out, {"path/to/tap": array})`` where the taps
are auxiliary outputs (``stop_gradient``-ed, never differentiated):

* **sown taps**: a module calls ``self.sow(jaxmon.nnx.Tap, "mlp_out", h)``; the tap is named by
  the module path plus the sown name: ``"blocks/0/mlp_out"``;
* **zero-edit**: ``capture(model, paths=["blocks/*/mlp"])`` records the outputs of the
  modules whose path matches a glob (``fnmatch``), ``"blocks/0/mlp"`` for ``__call__``
  (``"blocks/0/mlp/encode"`` for another public method), without touching the model's code.

Both use ``nnx.capture`` of the current flax release (no deprecated implicit sow). Inside
``nnx.scan`` over layers the sown values carry the layer axis: declare them with
``jaxmon.monitor(..., stacked=...)``.

Example:
  >>> (loss, taps), grads = nnx.value_and_grad(
  ...     lambda m: (lambda o, t: (loss_fn(o), t))(*jaxmon.nnx.capture(m)(x)), has_aux=True)(model)
  >>> mon_state = mon.update(mon_state, taps, mask=tokens != PAD)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from jaxmon._taps import auxiliary, matches_any, name_taps, tap_patterns
from jaxmon.errors import ConfigError

__all__ = ["Tap", "capture", "flatten_taps"]


class Tap(nnx.Intermediate):
    """The jaxmon intermediate type: ``self.sow(jaxmon.nnx.Tap, "name", x)`` marks a tap."""


class _MethodOutput(nnx.Intermediate):
    """Module method outputs recorded by the zero-edit mode (kept apart from sown taps)."""


def _key_name(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def flatten_taps(state: Any, *, method_outputs: bool = False) -> dict[str, jax.Array]:
    """Flattens a captured NNX state to ``{"path/to/tap": array}``.

    A value sown once is named by its path; a value sown ``n > 1`` times in one call gets
    ``"/0"`` ... ``"/{n-1}"`` appended. With ``method_outputs``, a trailing ``__call__`` is
    dropped (the module path names its output). Non-array values are skipped.
    """
    entries = (
        ([_key_name(p) for p in path], var.get_value() if hasattr(var, "get_value") else var.value)
        for path, var in nnx.to_flat_state(state)
    )
    return name_taps(entries, drop_call=method_outputs)


def capture(
    fn: nnx.Module | Callable[..., Any],
    *,
    paths: Sequence[str] | None = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Wraps an NNX model (or a function whose first argument is one) to return ``(out, taps)``.

    The same form as :func:`jaxmon.capture` and :func:`jaxmon.linen.capture`.

    Args:
      fn: a module (its ``__call__`` is run), a bound method, or ``f(model, *args)``.
      paths: zero-edit mode: globs over module paths (``"blocks/*/mlp"``, ``"blocks/*"``);
        the outputs of matching modules' methods are tapped in addition to sown :class:`Tap`
        values. ``None``: sown taps only.

    Returns:
      A function with ``fn``'s arguments returning ``(out, taps)``, ``taps`` a dict from tap
      name to array, ``stop_gradient``-ed.

    Raises:
      ValueError: ``paths`` matched no module output (the available paths are listed).
    """
    patterns = tap_patterns(paths, where="jaxmon.nnx.capture")

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if patterns is None:
            out, state = nnx.capture(fn, Tap)(*args, **kwargs)
            return out, auxiliary(flatten_taps(state))
        out, state, methods = nnx.capture(fn, Tap, _MethodOutput, method_outputs=_MethodOutput)(
            *args, **kwargs
        )
        taps = flatten_taps(state)
        outs = flatten_taps(methods, method_outputs=True)
        chosen = {k: v for k, v in outs.items() if matches_any(k, patterns)}
        if not chosen:
            raise ConfigError(
                f"jaxmon.nnx.capture: paths {patterns} matched no module output; "
                f"module outputs available: {sorted(outs)}"
            )
        taps.update(chosen)
        return out, auxiliary(taps)

    return wrapped
