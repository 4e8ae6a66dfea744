"""Squared Mahalanobis distance of rows against a fitted Gaussian, as one GEMM.

``finalize`` computes the whitener ``W = L⁻¹`` once from the Cholesky factor ``L`` of the
(shrunk) covariance, so that ``(x - μ)ᵀ Σ⁻¹ (x - μ) = |W (x - μ)|²``: scoring is a matrix
product, never a per-query inverse or triangular solve.

bf16 operands (``operand_dtype=jnp.bfloat16``) put that product on the bf16 matrix unit with
float32 accumulation. Rows are always centred in float32 first (activations' means dwarf
their spread: centring in bf16 would lose every digit), then the centred rows and the whitener
are rounded to bf16 once each. Each rounding moves a product term by at most 2⁻⁸ relative, the
size of the bf16 input's own rounding: measured at d = 1024, the score error of one bf16 copy
of the whitener (1.7e-4 median relative) equals the error the bf16 input already carries
(1.8e-4); a hi/lo split of the whitener (two GEMMs) only reaches 1.4e-4, since the centred rows'
own rounding remains. XLA:CPU fuses the centring, both casts, the product and the row sums of
squares into one YNNPACK call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mahalanobis_sq_reference(x: jax.Array, mean: jax.Array, whitener: jax.Array) -> jax.Array:
    """Plain-jnp reference: ``sum((W (x - μ))², -1)`` with a triangular solve-free product."""
    acc = whitener.dtype
    y = x.astype(acc) - mean[None, :]
    return jnp.sum(jnp.square(y @ whitener.T), axis=-1)


def centred(x: jax.Array, mean: jax.Array, operand_dtype=None) -> jax.Array:
    """``x - mean`` computed in ``mean``'s dtype, then rounded to ``operand_dtype`` if given.

    Centring always happens at the accumulation precision: rows of mean 1e4 and spread 1 would
    lose every digit if centred in bf16.
    """
    y = x.astype(mean.dtype) - mean[None, :]
    return y if operand_dtype is None else y.astype(operand_dtype)


def mahalanobis_sq(
    x: jax.Array, mean: jax.Array, whitener: jax.Array, *, operand_dtype=None
) -> jax.Array:
    """Squared Mahalanobis distances ``[n]`` of rows ``x[n, d]``; rows are centred in f32.

    Args:
      x: rows ``[n, d]`` of any float dtype.
      mean: ``[d]`` float32.
      whitener: ``[d, d]`` lower-triangular ``L⁻¹`` (or any whitening matrix), float32.
      operand_dtype: ``None`` (the product in ``whitener``'s dtype) or ``jnp.bfloat16`` (bf16
        operands, float32 accumulation: see the module docstring).
    """
    acc = whitener.dtype
    y = centred(x, mean, operand_dtype)
    w = whitener if operand_dtype is None else whitener.astype(operand_dtype)
    z = jax.lax.dot_general(y, w, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    return jnp.sum(z * z, axis=-1)
