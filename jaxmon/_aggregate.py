"""Token scores to sequence scores: max, mean, and the max of rolling means over a window.

Tokens of many sequences arrive flattened (a packed batch, or a block of logged rows) with a
``segment_ids`` array naming each token's sequence; ``num_segments`` is static so everything
compiles once per shape and runs under ``jit`` (``jax.ops.segment_max`` / ``segment_sum``).

Which reduction: ``"max"`` flags a sequence with one very odd token (a trigger);
``"mean"`` flags a sequence that is mildly odd throughout (a distribution shift);
``"max_rolling_mean"`` sits in between: the most anomalous stretch of ``window`` consecutive
tokens, robust to one noisy token but sensitive to a short anomalous span.

Two implementations of one rule, each where it must live: :func:`sequence_scores` runs on
the device inside ``jit`` (float32, ids in ``[0, num_segments)``); :class:`SequenceTable` folds
the max and mean on the host (numpy, float64, any id values) block by block, for a stored
query too long to hold at once (``jaxmon.query``'s ``sequences.npz``). ``tests/test_aggregate.py``
checks both against the same plain-loop reference.

One p-value per sequence: a sequence aggregate is not a token score, so a token's p-value must
not be reused for it (the max over 200 tokens of a null score is far larger than one token's).
:func:`sequence_null` sketches the aggregates of *held-out clean sequences* (one quantile
sketch per key, :func:`jaxmon.quantiles`: mergeable, relative-error, with the fitted tail past
the largest one), and :func:`sequence_p_values` turns query sequences' aggregates into their
own p-values, which :func:`jaxmon.combine` combines across keys.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmon._base import ShapeError
from jaxmon.errors import ConfigError

__all__ = ["sequence_scores", "sequence_null", "sequence_p_values", "SequenceTable"]

_REDUCTIONS = ("max", "mean", "max_rolling_mean")


def sequence_scores(
    token_scores: Any,
    segment_ids: jax.Array,
    *,
    num_segments: int,
    reduce: str = "max",
    window: int | None = None,
    mask: jax.Array | None = None,
    fill: float = 0.0,
) -> Any:
    """Aggregates token scores per sequence (jittable; static ``num_segments`` and ``window``).

    Args:
      token_scores: scores ``[...]`` (higher = more anomalous), or a pytree of them (e.g. a
        monitor's ``{tap: scores}``), each with the shape of ``segment_ids``.
      segment_ids: int ``[...]``: the sequence of each token, in ``[0, num_segments)``; tokens
        with other ids are ignored. Tokens of one sequence need not be contiguous; their order
        in the flattened array is their order in the sequence (used by rolling means).
      num_segments: number of sequences (static).
      reduce: ``"max"``, ``"mean"`` or ``"max_rolling_mean"`` (the largest mean over ``window``
        consecutive tokens of a sequence; a sequence shorter than ``window`` gets its mean).
      window: tokens per rolling window (``"max_rolling_mean"`` only).
      mask: bool ``[...]``: False for padding tokens, which count as absent (rolling windows
        then span the surrounding real tokens).
      fill: the score of a sequence with no (unmasked) token.

    Returns:
      ``[num_segments]`` sequence scores (float32), with the structure of ``token_scores``.

    Raises:
      ValueError: an unknown ``reduce`` or a bad ``window``.
      ShapeError: ``segment_ids``/``mask``/scores shapes differ.
    """
    if reduce not in _REDUCTIONS:
        raise ConfigError(f"sequence_scores: reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    if reduce == "max_rolling_mean":
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(
                f"sequence_scores: reduce='max_rolling_mean' needs an integer window >= 1, "
                f"got {window!r}"
            )
    elif window is not None:
        raise ConfigError(
            f"sequence_scores: window applies to 'max_rolling_mean' only, not {reduce!r}"
        )
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ConfigError(
            f"sequence_scores: num_segments must be a positive int, got {num_segments!r}"
        )
    ids = jnp.asarray(segment_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ShapeError(f"sequence_scores: segment_ids must be integers, got {ids.dtype}")
    if mask is not None and tuple(jnp.shape(mask)) != tuple(ids.shape):
        raise ShapeError(
            f"sequence_scores: mask shape {list(jnp.shape(mask))} differs from segment_ids "
            f"shape {list(ids.shape)}"
        )

    def one(scores):
        scores = jnp.asarray(scores)
        if tuple(scores.shape) != tuple(ids.shape):
            raise ShapeError(
                f"sequence_scores: token scores of shape {list(scores.shape)} differ from "
                f"segment_ids of shape {list(ids.shape)}"
            )
        return _aggregate(
            scores.reshape(-1).astype(jnp.float32),
            ids.reshape(-1).astype(jnp.int32),
            None if mask is None else jnp.asarray(mask).reshape(-1).astype(bool),
            num_segments,
            reduce,
            window,
            float(fill),
        )

    return jax.tree.map(one, token_scores)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _aggregate(v, ids, mask, n, reduce, window, fill):
    present = (ids >= 0) & (ids < n)
    if mask is not None:
        present = present & mask
    seg = jnp.where(present, ids, n)  # id n: dropped by the segment ops (out of range)
    count = jax.ops.segment_sum(present.astype(jnp.float32), seg, num_segments=n)
    empty = count == 0
    total = jax.ops.segment_sum(jnp.where(present, v, 0.0), seg, num_segments=n)
    mean = total / jnp.where(empty, 1.0, count)
    if reduce == "mean":
        out = mean
    elif reduce == "max":
        out = jax.ops.segment_max(jnp.where(present, v, -jnp.inf), seg, num_segments=n)
    else:
        # Make each sequence contiguous (stable: keeps token order), absent tokens last.
        order = jnp.argsort(seg, stable=True)
        vs, gs = v[order], seg[order]
        w = min(window, vs.shape[0])
        # Window sums by reduce_window, not cumsum differences, which would lose digits over
        # long streams.
        sums = jax.lax.reduce_window(vs, 0.0, jax.lax.add, (w,), (1,), "VALID")
        starts = gs[: sums.shape[0]]
        ends = gs[w - 1 :]
        valid = (starts == ends) & (starts < n)
        best = jax.ops.segment_max(
            jnp.where(valid, sums / w, -jnp.inf), jnp.where(valid, starts, n), num_segments=n
        )
        # A sequence shorter than the window has no full window: use its mean.
        out = jnp.where(jnp.isneginf(best), mean, best)
    return jnp.where(empty, jnp.float32(fill), out)


class SequenceTable:
    """Per-sequence aggregates folded block by block on the host (numpy, float64).

    For each sequence id (any integers, in any order, split across blocks): the token count,
    the max and the mean of each score key, and the max of each integer column (a sequence's
    label or split; -1 when every token holds less). Each :meth:`add` reduces one block to its
    sequences; :meth:`finish` merges the blocks (max of maxes, sum of sums), so memory grows
    with the number of sequences, not of tokens.

    Example:
      >>> table = SequenceTable(["h"], columns=["label"])
      >>> table.add(ids[:1000], {"h": scores[:1000]}, {"label": labels[:1000]})
      >>> table.add(ids[1000:], {"h": scores[1000:]}, {"label": labels[1000:]})
      >>> table.finish()["mean/h"]  # one entry per sorted unique id
    """

    def __init__(self, keys: Sequence[str], columns: Sequence[str] = ()):
        self.keys = list(keys)
        self.columns = list(columns)
        self.parts: list[dict[str, np.ndarray]] = []

    def add(
        self,
        sequence_id: np.ndarray,
        scores: Mapping[str, np.ndarray],
        columns: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Folds one block: ``sequence_id[n]``, ``scores {key: [n]}``, ``columns {name: [n]}``."""
        uniq, inv = np.unique(sequence_id, return_inverse=True)
        m = len(uniq)
        rec = {"sequence_id": uniq, "tokens": np.bincount(inv, minlength=m).astype(np.int64)}
        for col in self.columns:
            rec[col] = _group_max(inv, m, np.asarray(columns[col]).astype(np.int64), -1)
        for k, s in scores.items():
            rec[f"max/{k}"] = _group_max(inv, m, s, -np.inf)
            rec[f"sum/{k}"] = np.bincount(inv, weights=s, minlength=m)
        self.parts.append(rec)

    def finish(self) -> dict[str, np.ndarray]:
        """``sequence_id`` (sorted), ``tokens``, the columns, ``max/{key}`` and ``mean/{key}``
        per sequence (empty when no block was added)."""
        if not self.parts:
            return {}
        cat = lambda f: np.concatenate([p[f] for p in self.parts])
        uniq, inv = np.unique(cat("sequence_id"), return_inverse=True)
        m = len(uniq)
        out = {"sequence_id": uniq}
        out["tokens"] = np.bincount(inv, cat("tokens"), m).astype(np.int64)
        for col in self.columns:
            out[col] = _group_max(inv, m, cat(col), -1)
        for k in self.keys:
            out[f"max/{k}"] = _group_max(inv, m, cat(f"max/{k}"), -np.inf)
            out[f"mean/{k}"] = np.bincount(inv, cat(f"sum/{k}"), m) / np.maximum(out["tokens"], 1)
        return out


def _group_max(inv: np.ndarray, m: int, values: np.ndarray, fill) -> np.ndarray:
    """``out[g] = max(fill, values[inv == g])`` for ``g < m``, in ``fill``'s dtype."""
    out = np.full(m, fill, np.int64 if isinstance(fill, int) else np.float64)
    np.maximum.at(out, inv, values)
    return out


def sequence_null(seq_scores: Any, *, relative_accuracy: float = 0.01) -> Any:
    """The null distribution of sequence aggregates: one quantile sketch per score key.

    Args:
      seq_scores: aggregates ``[sequences]`` of held-out *clean* sequences (e.g. from
        :func:`sequence_scores` of raw token scores), or a pytree of them (one per key).
      relative_accuracy: of the sketches (:func:`jaxmon.quantiles`).

    Returns:
      A pytree (like ``seq_scores``) of :class:`~jaxmon.QuantilesFitted`.

    Raises:
      NotFittedError: a key without any finite aggregate.
    """
    from jaxmon.estimators.quantiles import quantiles

    sk = quantiles(relative_accuracy=relative_accuracy)

    def one(v):
        v = jnp.asarray(v, jnp.float32).reshape(-1)
        return sk.finalize(sk.update(sk.init(jax.ShapeDtypeStruct((), jnp.float32)), v))

    return jax.tree.map(one, seq_scores)


def sequence_p_values(null: Any, seq_scores: Any, *, log: bool = False) -> Any:
    """p-values of sequences' aggregates against :func:`sequence_null` of clean sequences.

    Conformal up to the largest clean aggregate, the fitted generalized Pareto tail beyond it
    (:func:`jaxmon.upper_tail`), so the strongest sequences stay ordered.

    Args:
      null: from :func:`sequence_null` (same keys as ``seq_scores``).
      seq_scores: aggregates ``[sequences]`` of the query sequences (same reduction).
      log: return natural-log p-values (never underflow).

    Returns:
      p-values (or their logs) with the structure of ``seq_scores``.
    """
    from jaxmon.estimators.quantiles import QuantilesFitted, log_upper_tail

    def one(f, v):
        lp = log_upper_tail(f, jnp.asarray(v, jnp.float32))
        return lp if log else jnp.exp(lp)

    return jax.tree.map(one, null, seq_scores, is_leaf=lambda x: isinstance(x, QuantilesFitted))
