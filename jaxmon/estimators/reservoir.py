"""A priority (bottom-k) reservoir with bit-exact merges, and kNN scores against its bank.

**Sampling.** Every row gets a 64-bit priority that is a hash of its own float32 bit pattern and
the seed; the reservoir keeps the ``size`` rows of smallest priority (bottom-k sampling; Cohen
& Kaplan 2007). With an ideal hash the priorities are i.i.d. uniform, so the kept rows are a
uniform sample without replacement of the distinct rows seen.

**Why hash the content** rather than draw priorities from a key and a running row offset: the
sample is then a function of the *set* of rows alone, not of how they were batched, which
device saw them or in which order states were merged. Merging is "keep the ``size`` smallest of
both", which is associative, commutative and has the empty reservoir as identity, *bit-exactly*
(the kept entries are sorted by priority, so even the layout is canonical). States from
different devices need no stream ids and stay unbiased: a row's priority does not depend on
where it was seen, and rows on different devices are different rows, with independent hashes.
Offset-derived priorities would need a globally unique offset per row, and their sample would
change with the batching.

Caveats, stated plainly: identical rows share a priority, so exact duplicates are kept or
dropped together (a stream dominated by one repeated row, such as a BOS-token activation,
should mask it); distinct rows whose 64-bit priorities collide (probability ≈ n²/2⁶⁵) are
ordered arbitrarily, the only way merges could differ bit-wise.

**kNN** (Sun, Ming, Zhu & Li 2022, "Out-of-distribution detection with deep nearest
neighbors"): the bank is the reservoir, fixed in ``finalize``; the score is the Euclidean
distance to the k-th nearest bank row, optionally on L2-normalised features as in that paper.
Scoring runs over blocks of queries (``lax.map``) and, inside each, over blocks of the bank
(``lax.scan``) with a running top-k, so memory is ``query_block × bank_block`` floats whatever
the number of queries (twice that for the bf16 candidate search). Candidates are ranked by
``|q|² + |b|² − 2 q·b`` (one matmul per block, on bf16 operands by default) on rows centred on
the bank mean, which keeps float32 digits when activations have large means; the k-th
neighbour's distance is then recomputed exactly as ``|q − b|``, with a proof that no other bank
row is nearer (``jaxmon_kernels.knn``): the scores equal the float32 route's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmon import _numerics as nm
from jaxmon._base import (
    Counts,
    Estimator,
    EstimatorSpec,
    check_rows,
    counts_add,
    counts_merge,
    counts_zero,
    feature_dim,
    finish_scores,
    is_traced,
    register,
    require_rows,
    valid_rows,
)
from jaxmon.errors import ConfigError, NotFittedError
from jaxmon_kernels import knn_kth_distance

__all__ = ["KNNFitted", "ReservoirState", "knn", "reservoir"]

_EMPTY = np.uint32(0xFFFFFFFF)


class ReservoirState(NamedTuple):
    """The ``size`` rows of smallest priority seen so far, sorted by priority."""

    counts: Counts
    priority: jax.Array  # shape=(size, 2), dtype=uint32: [hi, lo] words; all-ones when empty
    filled: jax.Array  # shape=(size,), dtype=bool
    rows: jax.Array  # shape=(size, d), dtype=float32 (zeros when empty)


class KNNFitted(NamedTuple):
    """A kNN bank: reservoir rows, centred (or L2-normalised), padded to whole blocks."""

    center: jax.Array  # shape=(d,): subtracted from queries and bank (bank mean, or 0)
    bank: jax.Array  # shape=(B, d), B = bank_size rounded up to whole bank blocks
    bank_sq: jax.Array  # shape=(B,): |bank row|², +inf for empty slots (never a neighbour)
    filled: jax.Array  # shape=(B,), dtype=bool
    counts: Counts  # rows the reservoir saw (zero rows: every score is NaN)


# --------------------------------------------------------------------------- priorities


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: full avalanche on uint32 words."""
    h = h ^ (h >> jnp.uint32(16))
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> jnp.uint32(13))
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> jnp.uint32(16))


def seed_salts(seed: int) -> np.ndarray:
    """Four uint32 salts derived from the seed (host side, at build time)."""
    return np.random.SeedSequence(int(seed)).generate_state(4, np.uint32)


def row_priority(rows: jax.Array, salts: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo)`` 64-bit priority words ``[n]`` of rows (float32/float64), from their bits.

    Each word is a sum over columns of independently salted, avalanched words (position enters
    through the per-column salt), finalised once more: a row-content hash computed as two
    elementwise passes and a row reduction.
    """
    n = rows.shape[0]
    bits = jax.lax.bitcast_convert_type(rows, jnp.uint32)
    # An explicit width: reshape(n, -1) cannot infer it for an empty batch (n = 0).
    bits = bits.reshape(n, int(np.prod(bits.shape[1:])))
    col = jnp.arange(bits.shape[1], dtype=jnp.uint32)
    s1 = _fmix(col * jnp.uint32(0x9E3779B9) + jnp.uint32(salts[0]))
    s2 = _fmix(col * jnp.uint32(0x7FEB352D) + jnp.uint32(salts[1]))
    h1 = jnp.sum(_fmix(bits ^ s1[None, :]), axis=1, dtype=jnp.uint32)
    h2 = jnp.sum(_fmix(bits + s2[None, :]), axis=1, dtype=jnp.uint32)
    hi = _fmix(h1 ^ jnp.uint32(salts[2]))
    lo = _fmix(h2 ^ jnp.uint32(salts[3]) ^ (hi * jnp.uint32(0x27D4EB2F)))
    return hi, lo


# --------------------------------------------------------------------------- reservoir state


def reservoir_init(d: int, size: int, dtype=jnp.float32) -> ReservoirState:
    """Empty reservoir (the identity of :func:`reservoir_merge`)."""
    acc = nm.acc_dtype(dtype)
    return ReservoirState(
        counts_zero(),
        jnp.full((size, 2), _EMPTY, jnp.uint32),
        jnp.zeros((size,), bool),
        jnp.zeros((size, d), acc),
    )


def _keep_smallest(counts, prio, filled, rows, size: int) -> ReservoirState:
    # Sort key: (empty, hi, lo); empty entries are canonical (all-ones, zero rows), and equal
    # keys among filled entries mean equal rows, so the result is bit-identical in any order.
    empty = (~filled).astype(jnp.uint32)
    idx = jnp.arange(filled.shape[0], dtype=jnp.int32)
    _, hi, lo, order = jax.lax.sort((empty, prio[:, 0], prio[:, 1], idx), num_keys=3)
    take = order[:size]
    kept = filled[take]
    rows = jnp.where(kept[:, None], rows[take], jnp.zeros((), rows.dtype))
    prio = jnp.where(kept[:, None], jnp.stack([hi[:size], lo[:size]], 1), _EMPTY)
    return ReservoirState(counts, prio, kept, rows)


def reservoir_update(
    state: ReservoirState, rows: jax.Array, mask: jax.Array | None, salts: np.ndarray
) -> ReservoirState:
    """Offers ``rows[n, d]`` to the reservoir (masked rows absent, non-finite rows counted)."""
    ok, bad = valid_rows(rows, mask)
    acc = state.rows.dtype
    # Hash the accumulation-dtype values: a bf16 row and its float32 upcast get one priority.
    xr = jnp.where(ok[:, None], rows.astype(acc), jnp.zeros((), acc))
    hi, lo = row_priority(xr, salts)
    prio = jnp.where(ok[:, None], jnp.stack([hi, lo], 1), _EMPTY)
    counts = counts_add(state.counts, jnp.sum(ok).astype(jnp.int32), jnp.sum(bad).astype(jnp.int32))
    return _keep_smallest(
        counts,
        jnp.concatenate([state.priority, prio]),
        jnp.concatenate([state.filled, ok]),
        jnp.concatenate([state.rows, xr]),
        state.filled.shape[0],
    )


def reservoir_merge(a: ReservoirState, b: ReservoirState) -> ReservoirState:
    """Keeps the ``size`` smallest priorities of both: bit-exact, associative, commutative."""
    return _keep_smallest(
        counts_merge(a.counts, b.counts),
        jnp.concatenate([a.priority, b.priority]),
        jnp.concatenate([a.filled, b.filled]),
        jnp.concatenate([a.rows, b.rows]),
        a.filled.shape[0],
    )


reservoir_merge_jit = jax.jit(reservoir_merge)


def require_bank(state: ReservoirState, need: int, name: str, what: str) -> None:
    """Refuses (outside ``jit``) to finalize a bank of fewer than ``need`` distinct rows.

    Raises:
      NotFittedError: no rows at all, or fewer distinct rows than ``need`` (``what`` says why).
    """
    require_rows(state, name)
    if is_traced(state):
        return
    held = int(jnp.sum(state.filled))
    if held < need:
        raise NotFittedError(
            f"{name}.finalize: the bank holds {held} distinct rows but {what} needs {need}; "
            f"fit on at least {need} distinct trusted rows"
        )


# --------------------------------------------------------------------------- kNN


def map_blocks(fn, rows: jax.Array, block: int) -> jax.Array:
    """Applies ``fn: [b, d] -> [b]`` over row blocks (``lax.map``), padding the tail: memory is
    bounded by the block, not by the number of rows."""
    n = rows.shape[0]
    b = max(1, min(block, n))
    nb = -(-n // b)
    pad = nb * b - n
    if pad:
        rows = jnp.concatenate([rows, jnp.zeros((pad, rows.shape[1]), rows.dtype)])
    out = jax.lax.map(fn, rows.reshape(nb, b, rows.shape[1]))
    return out.reshape(-1)[:n]


def _normalise(x: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(x * x, -1, keepdims=True))
    return x / jnp.where(norm > 0, norm, 1)


def knn_bank(state: ReservoirState, *, normalize: bool, bank_block: int) -> KNNFitted:
    """Builds the padded, centred (or normalised) bank from a reservoir."""
    rows, filled = state.rows, state.filled
    size, d = rows.shape
    if normalize:
        rows = _normalise(rows)
        center = jnp.zeros((d,), rows.dtype)
    else:
        cnt = jnp.sum(filled).astype(rows.dtype)
        center = jnp.sum(rows, 0) / jnp.maximum(cnt, 1)  # empty slots are zero rows
    bank = jnp.where(filled[:, None], rows - center[None, :], jnp.zeros((), rows.dtype))
    bb = min(bank_block, size)
    pad = -(-size // bb) * bb - size
    if pad:
        bank = jnp.concatenate([bank, jnp.zeros((pad, d), bank.dtype)])
        filled = jnp.concatenate([filled, jnp.zeros((pad,), bool)])
    bank_sq = jnp.where(filled, jnp.sum(bank * bank, -1), jnp.inf)
    return KNNFitted(center, bank, bank_sq, filled, state.counts)


def kth_distance(
    fitted: KNNFitted,
    rows: jax.Array,
    *,
    k: int,
    normalize: bool,
    query_block: int,
    bank_block: int,
    precision: str = "auto",
) -> jax.Array:
    """Euclidean distance ``[n]`` from each row to its k-th nearest bank row (inf if the bank
    holds fewer than k rows), computed block by block (``jaxmon_kernels.knn_kth_distance``).

    ``precision="auto"`` finds candidates with bf16 distance matmuls and proves them with an
    exact float32 re-rank (the same k-th distance as ``"float32"``, which runs the float32
    matmul throughout).
    """
    q = rows.astype(fitted.bank.dtype)
    if normalize:
        q = _normalise(q)
    q = q - fitted.center[None, :]
    # bf16 candidates need float32 banks (a float64 bank under x64 keeps its own precision).
    fast = precision != "float32" and fitted.bank.dtype == jnp.float32
    return knn_kth_distance(
        q,
        fitted.bank,
        fitted.bank_sq,
        fitted.filled,
        k=k,
        query_block=query_block,
        bank_block=bank_block,
        candidates="bfloat16" if fast else "float32",
    )


def _build(
    name: str,
    spec: EstimatorSpec,
    *,
    k: int,
    size: int,
    seed: int,
    normalize: bool,
    query_block: int,
    bank_block: int,
    precision: str = "auto",
) -> Estimator:
    salts = seed_salts(seed)

    def init(example) -> ReservoirState:
        d = feature_dim(example, name=name)
        return reservoir_init(d, size, getattr(example, "dtype", jnp.float32))

    @jax.jit
    def update(state: ReservoirState, x, *, mask=None, weights=None) -> ReservoirState:
        if weights is not None:
            raise ConfigError(
                f"{name}: row weights are not supported (a priority sample keeps rows, not "
                "mass); pass mask= to drop rows"
            )
        rows, m, _ = check_rows(x, state.rows.shape[1], name=name, mask=mask)
        return reservoir_update(state, rows, m, salts)

    @jax.jit
    def _finalize(state: ReservoirState) -> KNNFitted:
        return knn_bank(state, normalize=normalize, bank_block=bank_block)

    def finalize(state: ReservoirState) -> KNNFitted:
        require_bank(state, k, name, f"k={k} (every score would be inf)")
        return _finalize(state)

    @jax.jit
    def score(fitted: KNNFitted, x, *, mask=None):
        rows, _, _ = check_rows(x, fitted.center.shape[0], name=name, mask=mask)
        out = kth_distance(
            fitted,
            rows,
            k=k,
            normalize=normalize,
            query_block=query_block,
            bank_block=bank_block,
            precision=precision,
        )
        return finish_scores(out, rows, mask, x.shape[:-1], fitted.counts)

    return Estimator(init, update, reservoir_merge_jit, finalize, score, spec)


@register("reservoir")
def reservoir(*, size: int, seed: int = 0) -> Estimator:
    """A uniform sample of ``size`` rows by priority (bottom-k) sampling; exact merges.

    Args:
      size: rows kept.
      seed: salts the row-content hash that sets priorities (see module docstring).

    Returns:
      An :class:`~jaxmon.Estimator` whose state is a :class:`ReservoirState` (``.rows``,
      ``.filled``) and whose merge is bit-identical in any order. ``finalize`` builds a
      :class:`KNNFitted` bank; ``score`` is the distance to the nearest sampled row (kNN with
      k = 1): higher means more anomalous.
    """
    return _reservoir(int(size), int(seed))


@functools.lru_cache(maxsize=64)
def _reservoir(size: int, seed: int) -> Estimator:
    if size < 1:
        raise ConfigError(f"reservoir: size must be at least 1, got {size}")
    spec = EstimatorSpec("reservoir", {"size": size, "seed": seed})
    return _build(
        "reservoir",
        spec,
        k=1,
        size=size,
        seed=seed,
        normalize=False,
        query_block=1024,
        bank_block=2048,
    )


@register("knn")
def knn(
    *,
    k: int,
    bank_size: int,
    seed: int = 0,
    normalize: bool = False,
    query_block: int = 1024,
    bank_block: int = 2048,
    precision: str = "auto",
) -> Estimator:
    """Distance to the k-th nearest neighbour in a reservoir bank (Sun et al. 2022).

    Args:
      k: which neighbour (1 = nearest). The paper's choice on large banks is tens to hundreds.
      bank_size: rows in the bank (a :func:`reservoir` of this size, seeded by ``seed``).
      seed: salts the reservoir's priorities.
      normalize: L2-normalise bank rows and queries first, as Sun et al. do (scale-free
        features); otherwise plain Euclidean distance.
      query_block, bank_block: scoring block sizes: memory is ``query_block × bank_block``
        distances whatever the number of queries (at most twice that with bf16 candidates).
      precision: ``"auto"`` (default; ``"bfloat16"`` is a synonym) finds each query's nearest
        candidates with bf16 distance matmuls (float32 accumulation, the matrix unit) and
        re-ranks them exactly in float32, with a proof that no other bank row is nearer (a
        query block without the proof is recomputed in float32): the scores equal the
        ``"float32"`` route's, which runs float32 matmuls throughout.

    Returns:
      An :class:`~jaxmon.Estimator` with :class:`ReservoirState` states and :class:`KNNFitted`
      fitted values. Scores are distances to the k-th nearest bank row (+inf while the bank
      holds fewer than k rows): higher means more anomalous. A row that is itself in the bank
      counts as its own neighbour at distance 0.
    """
    precision = nm.check_precision("knn", precision)
    return _knn(
        int(k),
        int(bank_size),
        int(seed),
        bool(normalize),
        int(query_block),
        int(bank_block),
        "auto" if precision == "bfloat16" else precision,
    )


@functools.lru_cache(maxsize=64)
def _knn(k, bank_size, seed, normalize, query_block, bank_block, precision) -> Estimator:
    if not 1 <= k <= bank_size:
        raise ConfigError(f"knn: need 1 ≤ k ≤ bank_size, got k={k}, bank_size={bank_size}")
    if query_block < 1 or bank_block < 1:
        raise ConfigError("knn: query_block and bank_block must be positive")
    params = {
        "k": k,
        "bank_size": bank_size,
        "seed": seed,
        "normalize": normalize,
        "query_block": query_block,
        "bank_block": bank_block,
    }
    if precision != "auto":  # specs (and checkpoints) written before the knob stay equal
        params["precision"] = precision
    return _build(
        "knn",
        EstimatorSpec("knn", params),
        k=k,
        size=bank_size,
        seed=seed,
        normalize=normalize,
        query_block=query_block,
        bank_block=bank_block,
        precision=precision,
    )
