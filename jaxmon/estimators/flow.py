"""A learned density over a tap: a RealNVP normalising flow trained by streaming optax steps.

The flow (Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using Real NVP") is a stack
of affine coupling layers: layer ``l`` keeps the features of one parity (``(j + l) % 2 == 0``)
and maps the others ``x_j ↦ x_j · exp(s_j) + t_j`` with ``(s, t)`` an MLP of the kept features;
``log |det J| = Σ s_j`` is exact, so the log-likelihood is exact:

    log p(x) = log N(f(u); 0, I) + log |det ∂f/∂u| − Σ log σ,    u = (x − μ) / σ.

Inputs are standardised by streamed per-feature moments (activations have means far larger than
their spread, which an MLP at initialisation cannot absorb). The last layer of every MLP starts
at zero, so the untrained flow is the identity: the score then is the diagonal-Gaussian NLL.

**Training as streaming.** ``update(state, x)`` folds the batch into the moments, then takes one
optax step (Adam with global-norm clipping) on the weighted mean NLL of the batch's valid rows,
standardised with the moments so far. It is *not* a mergeable summary: ``spec.mergeable`` is
False. ``merge`` averages parameters and optimizer moments weighted by the rows each side has
seen (federated averaging: the data-parallel approximation of training on both streams; exact
only for identical parameters), merges the standardisation moments exactly and keeps the larger
step count.

**Data-parallel training.** Build the estimator with ``axis_name="data"`` and call ``update``
inside ``jax.shard_map`` over a mesh with that axis (batch sharded, state replicated): the batch
moments of all replicas are merged with ``psum``, and the gradient is the ``psum`` of the
replicas' summed gradients divided by the ``psum`` of their row weights, i.e. the gradient of
the mean NLL over the global batch. Every replica then takes the same step and the state stays
replicated; no ``merge`` is needed.

The state is a pure pytree of arrays (params, optax state, step, moments with the row counters),
checkpointable like any other; the spec holds every hyperparameter and the seed, so
``jaxmon.from_spec`` rebuilds the same initialisation.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmon import _numerics as nm
from jaxmon._base import (
    Counts,
    Estimator,
    EstimatorSpec,
    ShapeError,
    check_rows,
    feature_dim,
    finish_scores,
    register,
    require_rows,
    valid_rows,
)
from jaxmon.errors import ConfigError

__all__ = ["flow", "FlowState", "FlowFitted", "flow_nll"]


class FlowState(NamedTuple):
    """State of :func:`flow`: standardisation moments, flow parameters and optimizer state."""

    moments: nm.Moments  # diagonal moments of every folded row; holds the row counters
    params: dict[str, jax.Array]  # coupling layers, stacked over layers (see _init_params)
    opt_state: Any  # optax state of the chain (clip_by_global_norm, adam)
    step: jax.Array  # shape=(), dtype=int32: optimizer steps taken (batches with rows)


class FlowFitted(NamedTuple):
    """A trained flow with its standardisation."""

    mean: jax.Array  # shape=(d,)
    inv_std: jax.Array  # shape=(d,): 1 / σ of the standardisation
    log_std: jax.Array  # shape=(): Σ log σ, the standardisation's log-Jacobian
    params: dict[str, jax.Array]
    counts: Counts  # rows the flow was trained on (zero rows: every score is NaN)


def _masks(d: int, num_layers: int) -> jax.Array:
    """``[L, d]`` float masks: 1 for the features layer ``l`` keeps (conditions on)."""
    j = jnp.arange(d)[None, :]
    l_ = jnp.arange(num_layers)[:, None]
    return ((j + l_) % 2 == 0).astype(jnp.float32)


def _init_params(key: jax.Array, d: int, hidden: int, num_layers: int) -> dict[str, jax.Array]:
    # shapes: w1 (L, d, h), b1 (L, h), w2 (L, h, 2d), b2 (L, 2d), s_scale (L, d).
    w1 = jax.random.normal(key, (num_layers, d, hidden), jnp.float32) / math.sqrt(d)
    return {
        "w1": w1,
        "b1": jnp.zeros((num_layers, hidden), jnp.float32),
        # Zero output layers: the untrained flow is the identity map.
        "w2": jnp.zeros((num_layers, hidden, 2 * d), jnp.float32),
        "b2": jnp.zeros((num_layers, 2 * d), jnp.float32),
        "s_scale": jnp.ones((num_layers, d), jnp.float32),
    }


def flow_nll(params: dict[str, jax.Array], u: jax.Array) -> jax.Array:
    """NLL ``[n]`` of standardised rows ``u[n, d]`` under the flow (nats, no σ term)."""
    num_layers, d = params["s_scale"].shape
    masks = _masks(d, num_layers)

    def layer(carry, xs):
        z, logdet = carry
        p, m = xs
        keep = z * m[None, :]
        h = jax.nn.gelu(keep @ p["w1"] + p["b1"][None, :])
        o = h @ p["w2"] + p["b2"][None, :]
        # tanh bounds the log-scale of each step: stable under Adam from the first step.
        s = jnp.tanh(o[:, :d]) * p["s_scale"][None, :] * (1 - m)[None, :]
        t = o[:, d:] * (1 - m)[None, :]
        z = keep + (1 - m)[None, :] * (z * jnp.exp(s) + t)
        return (z, logdet + jnp.sum(s, -1)), None

    # The zero log-det is derived from u so it has u's sharding type under shard_map.
    (z, logdet), _ = jax.lax.scan(layer, (u, jnp.zeros_like(u[:, 0])), (params, masks))
    return 0.5 * jnp.sum(z * z, -1) + 0.5 * d * math.log(2 * math.pi) - logdet


def _tx(learning_rate: float, clip_norm: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))


def _standardise(m: nm.Moments) -> tuple[jax.Array, jax.Array]:
    var = nm.covariance(m)
    mean_var = jnp.mean(var)
    floor = 1e-6 * jnp.where(mean_var > 0, mean_var, 1.0)
    # Before any row: σ = 1 (the identity standardisation).
    std = jnp.where(m.weight > 0, jnp.sqrt(var + floor), 1.0)
    return m.mean, 1 / std


def _psum_moments(batch: nm.Moments, axis_name: str) -> nm.Moments:
    """Chan's merge of every replica's diagonal batch moments, written with ``psum`` only (so
    the result is replicated, as shard_map can verify): global weight and mean first, then each
    replica's centred sums moved to the global mean, ``M2 = Σ_i M2_i + W_i (μ_i − μ)²``."""
    w = jax.lax.psum(batch.weight, axis_name)
    safe = jnp.where(w > 0, w, 1)
    mean = jax.lax.psum(batch.weight * batch.mean, axis_name) / safe
    m2 = jax.lax.psum(batch.m2 + batch.weight * jnp.square(batch.mean - mean), axis_name)
    # Per-step counts stay far below 2^32, so summing the [lo, hi] words needs no carry.
    counts = jax.tree.map(lambda c: jax.lax.psum(c, axis_name), batch.counts)
    # Diagonal moments keep no third/fourth sums (fresh zeros: replicated, unlike zeros_like).
    zeros = jnp.zeros(batch.m3.shape, batch.m3.dtype), jnp.zeros((), batch.m4.dtype)
    return nm.Moments(counts, w, jnp.where(w > 0, mean, 0), m2, *zeros)


@functools.partial(jax.jit, static_argnames=("learning_rate", "clip_norm", "axis_name"))
def _update(state: FlowState, x, mask, weights, *, learning_rate, clip_norm, axis_name):
    d = state.moments.mean.shape[0]
    rows, m, w = check_rows(x, d, name="flow", mask=mask, weights=weights)
    acc = state.moments.mean.dtype
    empty = nm.moments_init(d, acc, diagonal=True)
    batch = nm.moments_update(empty, rows, m, w)
    if axis_name is not None:
        batch = _psum_moments(batch, axis_name)
    moments = nm.moments_merge(state.moments, batch)
    mean, inv_std = _standardise(moments)
    ok, _ = valid_rows(rows, m)
    wi = ok.astype(acc) if w is None else jnp.where(ok, w.astype(acc), 0)
    u = jnp.where(ok[:, None], (rows.astype(acc) - mean[None, :]) * inv_std[None, :], 0)

    def total_nll(params):
        return jnp.sum(wi * flow_nll(params, u))

    grads = jax.grad(total_nll)(state.params)
    den = jnp.sum(wi)
    if axis_name is not None:
        grads, den = jax.lax.psum((grads, den), axis_name)
    grads = jax.tree.map(lambda g: g / jnp.where(den > 0, den, 1), grads)
    took = den > 0
    params, opt_state = nm.optimizer_step(
        _tx(learning_rate, clip_norm), grads, state.params, state.opt_state, took
    )
    return FlowState(moments, params, opt_state, state.step + took.astype(jnp.int32))


@jax.jit
def _merge(a: FlowState, b: FlowState) -> FlowState:
    wa, wb = a.moments.weight, b.moments.weight
    return FlowState(
        nm.moments_merge(a.moments, b.moments),
        nm.average_by_rows(a.params, b.params, wa, wb),
        nm.average_by_rows(a.opt_state, b.opt_state, wa, wb),
        jnp.maximum(a.step, b.step),
    )


@jax.jit
def _finalize(state: FlowState) -> FlowFitted:
    mean, inv_std = _standardise(state.moments)
    return FlowFitted(mean, inv_std, -jnp.sum(jnp.log(inv_std)), state.params, state.moments.counts)


def _checked_finalize(state: FlowState) -> FlowFitted:
    require_rows(state, "flow")
    return _finalize(state)


@jax.jit
def _score(fitted: FlowFitted, x, mask):
    d = fitted.mean.shape[0]
    rows, _, _ = check_rows(x, d, name="flow", mask=mask)
    u = (rows.astype(fitted.mean.dtype) - fitted.mean[None, :]) * fitted.inv_std[None, :]
    nll = flow_nll(fitted.params, u) + fitted.log_std
    return finish_scores(nll, rows, mask, x.shape[:-1], fitted.counts)


def _init(example, seed: int, hidden: int, num_layers: int, tx) -> FlowState:
    d = feature_dim(example, name="flow")
    if d < 2:
        raise ShapeError(
            f"flow: a coupling flow needs at least 2 features, got an example of width {d}; "
            "use jaxmon.gaussian or jaxmon.quantiles for scalar taps"
        )
    acc = nm.acc_dtype(getattr(example, "dtype", jnp.float32))
    params = _init_params(jax.random.key(seed), d, hidden, num_layers)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(params)
    return FlowState(
        nm.moments_init(d, acc, diagonal=True), params, opt_state, jnp.zeros((), jnp.int32)
    )


@register("flow")
def flow(
    *,
    num_layers: int = 4,
    hidden: int = 64,
    learning_rate: float = 1e-3,
    clip_norm: float = 1.0,
    seed: int = 0,
    axis_name: str | None = None,
) -> Estimator:
    """A RealNVP normalising flow over a tap; score = negative log-likelihood (nats).

    Args:
      num_layers: affine coupling layers (alternating feature parity); at least 2, so every
        feature is transformed.
      hidden: width of each coupling layer's one-hidden-layer MLP.
      learning_rate: Adam's step size; each ``update`` call is one step.
      clip_norm: global gradient-norm clip before Adam.
      seed: seeds the initial parameters (``jax.random.key(seed)``); stored in the spec.
      axis_name: the data-parallel mesh axis when ``update`` runs inside ``jax.shard_map``
        (gradients and batch moments are reduced over it); ``None`` on one device.

    Returns:
      An :class:`~jaxmon.Estimator` with ``spec.mergeable = False`` (see the module docstring
      for what ``merge`` means here). ``score`` is the exact NLL ``−log p(x)`` of each row in
      the tap's own units: higher means more anomalous.

    Example:
      >>> est = jaxmon.flow(hidden=128)
      >>> s = est.init(jax.ShapeDtypeStruct((256,), jnp.float32))
      >>> for batch in trusted_batches:
      ...     s = est.update(s, batch)
      >>> nll = est.score(est.finalize(s), queries)
    """
    for label, v in (("num_layers", num_layers), ("hidden", hidden)):
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise ConfigError(f"flow: {label} must be a positive int, got {v!r}")
    if int(num_layers) < 2:
        raise ConfigError(f"flow: num_layers must be >= 2 so every feature moves, got {num_layers}")
    if not float(learning_rate) > 0 or not float(clip_norm) > 0:
        raise ConfigError("flow: learning_rate and clip_norm must be positive")
    num_layers, hidden, seed = int(num_layers), int(hidden), int(seed)
    learning_rate, clip_norm = float(learning_rate), float(clip_norm)
    spec = EstimatorSpec(
        "flow",
        {
            "num_layers": num_layers,
            "hidden": hidden,
            "learning_rate": learning_rate,
            "clip_norm": clip_norm,
            "seed": seed,
            "axis_name": axis_name,
        },
        mergeable=False,
    )

    def init(example) -> FlowState:
        return _init(example, seed, hidden, num_layers, _tx(learning_rate, clip_norm))

    def update(state: FlowState, x, *, mask=None, weights=None) -> FlowState:
        return _update(
            state,
            x,
            mask,
            weights,
            learning_rate=learning_rate,
            clip_norm=clip_norm,
            axis_name=axis_name,
        )

    def score(fitted: FlowFitted, x, *, mask=None):
        return _score(fitted, x, mask)

    return Estimator(init, update, _merge, _checked_finalize, score, spec)
