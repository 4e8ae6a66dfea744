"""Plain-JAX taps: ``tap`` marks an activation, ``capture`` returns it, ``attribution_taps``.

Design (why not a Python-level collector): a value recorded by a Python list during tracing
escapes whatever transform was active when it was recorded. A tap inside ``jax.lax.scan``, a
nested ``jax.jit`` or ``jax.checkpoint`` would leak a tracer. So ``tap`` binds an identity
primitive (``jaxmon_tap``, lowered to nothing), and ``capture(fn)`` traces ``fn`` to a jaxpr and
evaluates it with a small interpreter that returns the value at every tap as an extra output:

* nested ``jit``: inlined, its taps come out;
* ``lax.scan`` (also ``nnx.scan`` / ``nn.scan``, which lower to it): re-run as a scan whose
  extra outputs are the taps, so **a tap inside a scan body comes out stacked along the scan
  axis** (``[length, ...]``; the ``stacked=`` option of :func:`jaxmon.monitor` splits it into
  per-layer taps);
* ``jax.checkpoint`` (remat): re-wrapped, taps become its outputs;
* ``vmap`` inside ``fn``: the tap records the batched value, vmapped axis first;
* ``grad`` inside ``fn``: the tap records the primal; tangents pass through untouched.

Taps inside ``lax.cond``/``while_loop``/``custom_vjp`` bodies raise ``NotImplementedError``
(their number of executions is not static). ``capture`` itself works under ``jit``, ``grad``
(taps are ``stop_gradient``-ed auxiliary outputs), ``vmap`` (taps gain the vmapped axis) and
``scan``. Outside ``capture``, ``tap`` is the identity and costs nothing.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxmon.errors import ConfigError

__all__ = ["tap", "capture", "attribution_taps"]

# --------------------------------------------------------------------------- the primitive

tap_p = Primitive("jaxmon_tap")
tap_p.def_impl(lambda x, *, name: x)
tap_p.def_abstract_eval(lambda x, *, name: x)
mlir.register_lowering(tap_p, lambda ctx, x, *, name: [x])


def _tap_jvp(primals, tangents, *, name):
    # The tangent bypasses the tap: a tap is never differentiated.
    return tap_p.bind(primals[0], name=name), tangents[0]


def _tap_batch(args, dims, *, name):
    (x,), (d,) = args, dims
    if d is None:  # not mapped
        return tap_p.bind(x, name=name), d
    return tap_p.bind(jnp.moveaxis(x, d, 0), name=name), 0


ad.primitive_jvps[tap_p] = _tap_jvp
batching.primitive_batchers[tap_p] = _tap_batch


def tap(x: jax.Array, name: str) -> jax.Array:
    """Marks ``x`` as the tap ``name``; returns ``x`` unchanged (use the returned value).

    Inside a function wrapped by :func:`capture`, the value of ``x`` is returned in the taps
    dict under ``name``. Elsewhere it is the identity (and compiles to nothing under ``jit``).

    Args:
      x: an activation, ``[..., d]``.
      name: the tap's path-like name, e.g. ``"blocks/3/mlp_out"``.

    Returns:
      ``x``. Write ``h = jaxmon.tap(h, "name")``: a discarded result may be removed by dead-code
      elimination inside differentiated scans.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"jaxmon.tap: name must be a non-empty str, got {name!r}")
    return tap_p.bind(jnp.asarray(x), name=name)


# --------------------------------------------------------------------------- the interpreter


def _sub_jaxprs(params: dict[str, Any]):
    for v in params.values():
        vs = v if isinstance(v, tuple | list) else (v,)
        for u in vs:
            if isinstance(u, jax.extend.core.ClosedJaxpr):
                yield u.jaxpr
            elif isinstance(u, jax.extend.core.Jaxpr):
                yield u


def _tap_names(jaxpr, cache: dict[int, tuple[str, ...]]) -> tuple[str, ...]:
    """Names of every tap in ``jaxpr`` and its sub-jaxprs (static)."""
    key = id(jaxpr)
    if key not in cache:
        names: list[str] = []
        for eqn in jaxpr.eqns:
            if eqn.primitive is tap_p:
                names.append(eqn.params["name"])
            for sub in _sub_jaxprs(eqn.params):
                names.extend(_tap_names(sub, cache))
        cache[key] = tuple(names)
    return cache[key]


class _Ctx:
    """Per-(sub)trace collector: recorded taps and perturbations added at taps."""

    def __init__(self, perturb: dict[str, Any], cache: dict[int, tuple[str, ...]]):
        self.perturb = perturb
        self.cache = cache
        self.taps: dict[str, Any] = {}

    def child(self, perturb: dict[str, Any]) -> _Ctx:
        return _Ctx(perturb, self.cache)

    def record(self, name: str, value: Any) -> None:
        if name in self.taps:
            raise ConfigError(
                f"jaxmon.capture: the tap {name!r} is recorded twice in one call; give each "
                "tap a unique name (a tap inside a scan body is recorded once, stacked)"
            )
        self.taps[name] = value


def _eval(jaxpr, consts, args, ctx: _Ctx) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        prim, params = eqn.primitive, eqn.params
        if prim is tap_p:
            name = params["name"]
            x = invals[0]
            if name in ctx.perturb:
                x = x + ctx.perturb[name]
            ctx.record(name, jax.lax.stop_gradient(x))
            # Re-bind so that an enclosing capture sees the tap too.
            outs = [tap_p.bind(x, name=name)]
        elif not any(_tap_names(s, ctx.cache) for s in _sub_jaxprs(params)):
            with eqn.ctx.manager:
                outs = prim.bind(*invals, **prim.get_bind_params(params))
            outs = outs if prim.multiple_results else [outs]
        elif prim.name in ("jit", "pjit", "closed_call", "core_call"):
            cj = params.get("jaxpr", params.get("call_jaxpr"))
            if isinstance(cj, jax.extend.core.ClosedJaxpr):
                outs = _eval(cj.jaxpr, cj.consts, invals, ctx)
            else:
                outs = _eval(cj, [], invals, ctx)
        elif prim.name == "scan":
            outs = _eval_scan(params, invals, ctx)
        elif prim.name in ("remat2", "checkpoint", "remat"):
            outs = _eval_remat(params, invals, ctx)
        else:
            raise NotImplementedError(
                f"jaxmon.capture: taps {list(_tap_names_of(params, ctx))} are inside a "
                f"'{prim.name}' (e.g. lax.cond, while_loop, custom_vjp); "
                "only jit, scan and checkpoint bodies can carry taps. Move the tap outside, or "
                "return the value as an output of that construct."
            )
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _tap_names_of(params, ctx):
    for s in _sub_jaxprs(params):
        yield from _tap_names(s, ctx.cache)


def _eval_scan(params, invals, ctx: _Ctx) -> list[Any]:
    nc, ncarry = params["num_consts"], params["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    body = params["jaxpr"]
    inner = _tap_names(body.jaxpr, ctx.cache)
    # Perturbations of taps inside the body are stacked along the scan axis, like the taps.
    pert = {n: ctx.perturb[n] for n in inner if n in ctx.perturb}

    def step(carry, x):
        x_i, pert_i = x
        sub = ctx.child(pert_i)
        outs = _eval(body.jaxpr, body.consts, [*consts, *carry, *x_i], sub)
        return list(outs[:ncarry]), (list(outs[ncarry:]), sub.taps)

    carry, (ys, taps) = jax.lax.scan(
        step,
        list(init),
        (list(xs), pert),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    for name, value in taps.items():
        ctx.record(name, value)
    return [*carry, *ys]


def _eval_remat(params, invals, ctx: _Ctx) -> list[Any]:
    jaxpr = params["jaxpr"]

    def body(*args):
        sub = ctx.child(ctx.perturb)
        outs = _eval(jaxpr, [], args, sub)
        return outs, sub.taps

    outs, taps = jax.checkpoint(body, prevent_cse=params["prevent_cse"], policy=params["policy"])(
        *invals
    )
    for name, value in taps.items():
        ctx.record(name, value)
    return outs


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | jax.core.Tracer) or hasattr(x, "__array__")


def _run(fn: Callable, args, kwargs, perturb: dict[str, Any]):
    """Traces ``fn`` and evaluates it, returning ``(out, taps)``."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_arr = [_is_array(x) and not isinstance(x, str) for x in leaves]
    dyn = [x for x, a in zip(leaves, is_arr, strict=True) if a]
    out_tree = []

    def flat_fn(*dyn_leaves):
        it = iter(dyn_leaves)
        full = [next(it) if a else x for x, a in zip(leaves, is_arr, strict=True)]
        a, k = jax.tree.unflatten(treedef, full)
        out = fn(*a, **k)
        flat, tree = jax.tree.flatten(out)
        out_tree.append(tree)
        return flat

    closed = jax.make_jaxpr(flat_fn)(*dyn)
    ctx = _Ctx(perturb, {})
    outs = _eval(closed.jaxpr, closed.consts, dyn, ctx)
    return jax.tree.unflatten(out_tree[0], outs), ctx.taps


def capture(fn: Callable[..., Any]) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Wraps ``fn`` so that it returns ``(out, taps)``, ``taps = {name: value}``.

    Every :func:`tap` executed by ``fn`` (also inside nested ``jit``, ``scan`` and
    ``checkpoint``; see the module docstring) is returned, ``stop_gradient``-ed: taps are
    auxiliary outputs and are never differentiated. A tap inside a scan body is stacked along
    the scan axis. Non-array arguments (Python scalars, strings, config objects) are static.

    The Flax front ends have the same form, ``capture(fn, *, paths=None)``
    (:func:`jaxmon.nnx.capture`, :func:`jaxmon.linen.capture`), where ``paths`` also taps
    module outputs by path; plain JAX has no module paths, so every tap is ``jaxmon.tap``.

    Args:
      fn: the function to run; it calls :func:`tap`.

    Returns:
      A function with ``fn``'s arguments returning ``(out, taps)``.

    Example:
      >>> def mlp(w, x):
      ...     h = jaxmon.tap(jax.nn.relu(x @ w), "hidden")
      ...     return h.sum()
      >>> out, taps = jax.jit(jaxmon.capture(mlp))(w, x)   # taps["hidden"]: [n, d]
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return _run(fn, args, kwargs, {})

    return wrapped


# --------------------------------------------------------------------------- shared by front ends


def tap_patterns(paths: Sequence[str] | None, *, where: str) -> list[str] | None:
    """The ``paths=`` globs of a ``capture`` front end, checked (None: no zero-edit taps).

    Raises:
      ConfigError: a glob is not a string.
    """
    if paths is None:
        return None
    patterns = list(paths)
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{where}: paths must be strings (globs), got {paths!r}")
    return patterns


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """``name`` matches one of the globs (``fnmatch``, case-sensitive; ``*`` crosses ``/``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def name_taps(
    entries: Iterable[tuple[Sequence[str], Any]], *, drop_call: bool = False
) -> dict[str, jax.Array]:
    """``{"path/to/tap": array}`` from ``(path, value)`` pairs of a framework's tap tree.

    The one naming rule of the Flax front ends (:func:`jaxmon.nnx.flatten_taps`,
    :func:`jaxmon.linen.flatten_intermediates`): a value sown once is named by its path
    (names joined by ``/``); a tuple of ``n > 1`` values (sown ``n`` times in one call) gets
    ``"/0"`` ... ``"/{n-1}"`` appended; non-array values are skipped. With ``drop_call``, a
    trailing ``__call__`` is dropped (the module path names its output).
    """
    out: dict[str, jax.Array] = {}
    for path, value in entries:
        names = [str(p) for p in path]
        if drop_call and names and names[-1] == "__call__":
            names = names[:-1]
        name = "/".join(names) or "__call__"
        values = value if isinstance(value, tuple) else (value,)
        arrays = [v for v in values if isinstance(v, jax.Array | jax.core.Tracer)]
        if len(arrays) == 1:
            out[name] = arrays[0]
        else:
            for i, v in enumerate(arrays):
                out[f"{name}/{i}"] = v
    return out


def auxiliary(taps: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Taps as auxiliary outputs: ``stop_gradient``-ed, never differentiated."""
    return {k: jax.lax.stop_gradient(v) for k, v in taps.items()}


def attribution_taps(
    fn: Callable[..., Any],
    target: Callable[[Any], jax.Array] | None = None,
    *,
    with_activations: bool = False,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Activation × gradient of a scalar target at every tap, as taps (circuit-level signal).

    For each tap ``a``, the attribution is ``a ⊙ ∂target/∂a``: a first-order estimate of each
    feature's contribution to the target (gradient × input), the circuit-level signal of the
    seed paper. Fit any estimator on them, e.g. ``jaxmon.monitor({"*": jaxmon.gaussian()})``.

    The gradient is taken with respect to the tapped activations only (through the rest of the
    network downstream of each tap), in the same trace as the forward pass, so it lives in the
    same jitted step; it costs one backward pass.

    Args:
      fn: a function that calls :func:`tap`.
      target: maps ``fn``'s output to a scalar; ``None`` when ``fn`` returns a scalar. For
        per-token attributions, sum over the batch (rows do not interact, so each row's
        gradient is its own), e.g. ``lambda logits: logits[..., label].sum()``.
      with_activations: also return the plain taps.

    Returns:
      A function returning ``(out, attributions)`` (or ``(out, attributions, taps)``), both
      dicts keyed by tap name with the taps' shapes; all ``stop_gradient``-ed.
    """
    target = target if target is not None else (lambda out: out)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        _, shapes = jax.eval_shape(lambda a, k: _run(fn, a, k, {}), args, kwargs)
        zeros = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}

        def objective(pert):
            out, taps = _run(fn, args, kwargs, pert)
            t = target(out)
            if jnp.ndim(t) != 0:
                raise ConfigError(
                    "jaxmon.attribution_taps: target(out) must be a scalar, got shape "
                    f"{jnp.shape(t)}; pass target= that reduces the output (e.g. a sum)"
                )
            return t, (out, taps)

        grads, (out, taps) = jax.grad(objective, has_aux=True)(zeros)
        attr = {n: jax.lax.stop_gradient(taps[n] * grads[n]) for n in taps}
        if with_activations:
            return out, attr, taps
        return out, attr

    return wrapped
