"""Squared Mahalanobis distance of rows against a fitted Gaussian, as one GEMM.

``finalize`` computes the whitener ``W = L⁻¹`` once from the Cholesky factor ``L`` of the
(shrunk) covariance, so that ``(x - μ)ᵀ Σ⁻¹ (x - μ) = |W (x - μ)|²``: scoring is a matrix
product, never a per-query inverse or triangular solve.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mahalanobis_sq_reference(x: jax.Array, mean: jax.Array, whitener: jax.Array) -> jax.Array:
    """Plain-jnp reference: ``sum((W (x - μ))², -1)`` with a triangular solve-free product."""
    acc = whitener.dtype
    y = x.astype(acc) - mean[None, :]
    return jnp.sum(jnp.square(y @ whitener.T), axis=-1)


def mahalanobis_sq(x: jax.Array, mean: jax.Array, whitener: jax.Array) -> jax.Array:
    """Squared Mahalanobis distances ``[n]`` of rows ``x[n, d]``; bf16 rows are centred in f32.

    Args:
      x: rows ``[n, d]`` of any float dtype.
      mean: ``[d]`` float32.
      whitener: ``[d, d]`` lower-triangular ``L⁻¹`` (or any whitening matrix), float32.
    """
    acc = whitener.dtype
    # Centre in float32: rows of mean 1e4 and spread 1 would lose every digit in bf16.
    y = x.astype(acc) - mean[None, :]
    z = jax.lax.dot_general(y, whitener, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    return jnp.sum(z * z, axis=-1)
