"""Flax Linen taps without editing the model: ``capture_intermediates`` or ``intercept_methods``.

* :func:`capture` runs ``module.apply(..., capture_intermediates=<path filter>)``: the outputs
  of modules whose path matches a glob are tapped (``"Block_0/Dense_0"`` for ``__call__``,
  ``"Block_0/Dense_0/encode"`` for another method), together with anything the model sows
  into the ``"intermediates"`` collection (``"Block_0/mlp_out"``).
* :func:`intercept` wraps ``apply`` in ``nn.intercept_methods``: it can tap a module's *input*
  as well as its output (``record="input"`` taps the first positional argument, named
  ``"Block_0/MLP_0/input"``): the residual stream entering a block, for instance.

Both return ``(out, {"path/to/tap": array})`` with the taps ``stop_gradient``-ed; any other
mutable collections the caller asked for are returned as in ``apply`` (``(out, vars), taps``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from jaxmon._taps import auxiliary, matches_any, name_taps, tap_patterns
from jaxmon.errors import ConfigError

__all__ = ["capture", "intercept", "flatten_intermediates"]

_COLL = "intermediates"


def _path_of(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.scope.path) if module.scope is not None else ""


def flatten_intermediates(tree: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Flattens a Linen ``intermediates`` collection to ``{"path/to/tap": array}``.

    Sown tuples of one value are named by their path; ``n > 1`` values get ``"/i"`` appended;
    a trailing ``__call__`` is dropped (the module path names its output).
    """
    entries: list[tuple[list[str], Any]] = []

    def walk(node: Any, names: list[str]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, [*names, str(k)])
        else:
            entries.append((names, node))

    walk(tree, [])
    return name_taps(entries, drop_call=True)


def _split(result: Any, mutable: Any) -> tuple[Any, dict[str, Any]]:
    out, variables = result
    variables = dict(variables)
    inter = variables.pop(_COLL, {})
    if mutable:
        return (out, variables), inter
    return out, inter


def _finish(out, inter, patterns, what):
    taps = flatten_intermediates(inter)
    if patterns is not None and not taps:
        raise ConfigError(f"jaxmon.linen.{what}: paths {list(patterns)} matched no module output")
    return out, auxiliary(taps)


def capture(
    fn: nn.Module,
    *,
    paths: Sequence[str] | None = None,
    method: str | Callable[..., Any] | None = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Taps a Linen module's outputs by path with ``capture_intermediates``.

    The same form as :func:`jaxmon.capture` and :func:`jaxmon.nnx.capture`; a Linen module
    keeps its variables outside, so the wrapped function takes them first.

    Args:
      fn: the (unbound) Linen module, run by ``fn.apply``.
      paths: globs over module paths (``"Block_*/Dense_0"``); ``None`` keeps only what the
        model sows into ``"intermediates"``.
      method: passed to ``apply`` (default ``__call__``).

    Returns:
      ``f(variables, *args, mutable=(), **kwargs) -> (out, taps)``.
    """
    module = fn
    patterns = tap_patterns(paths, where="jaxmon.linen.capture")

    def keep(mdl: nn.Module, method_name: str) -> bool:
        if patterns is None:
            return False
        path = _path_of(mdl)
        name = path if method_name == "__call__" else f"{path}/{method_name}"
        return matches_any(name, patterns)

    def wrapped(variables, *args, mutable: Any = (), **kwargs):
        mut = [_COLL, *([mutable] if isinstance(mutable, str) else list(mutable or ()))]
        res = module.apply(
            variables, *args, capture_intermediates=keep, mutable=mut, method=method, **kwargs
        )
        out, inter = _split(res, mutable)
        return _finish(out, inter, patterns, "capture")

    return wrapped


def intercept(
    fn: nn.Module,
    *,
    paths: Sequence[str],
    record: str = "output",
    method: str | Callable[..., Any] | None = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Taps module inputs or outputs by path with ``nn.intercept_methods``.

    Args:
      fn: the (unbound) Linen module, run by ``fn.apply``.
      paths: globs over module paths (``"Block_*"``); only ``__call__`` is intercepted.
      record: ``"output"`` (tap named by the module path), ``"input"`` (the first positional
        argument, named ``"<path>/input"``) or ``"both"``.
      method: passed to ``apply``.

    Returns:
      ``f(variables, *args, mutable=(), **kwargs) -> (out, taps)``.
    """
    if record not in ("output", "input", "both"):
        raise ConfigError(
            f"jaxmon.linen.intercept: record must be output/input/both, got {record!r}"
        )
    module = fn
    patterns = tap_patterns(paths, where="jaxmon.linen.intercept")

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        mdl = context.module
        if not matches_any(_path_of(mdl), patterns):
            return out
        if record in ("input", "both") and args:
            mdl.sow(_COLL, "input", args[0])
        if record in ("output", "both"):
            mdl.sow(_COLL, "__call__", out)
        return out

    def wrapped(variables, *args, mutable: Any = (), **kwargs):
        mut = [_COLL, *([mutable] if isinstance(mutable, str) else list(mutable or ()))]
        with nn.intercept_methods(interceptor):
            res = module.apply(variables, *args, mutable=mut, method=method, **kwargs)
        out, inter = _split(res, mutable)
        return _finish(out, inter, patterns, "intercept")

    return wrapped
