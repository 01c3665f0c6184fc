"""Evaluation metrics, in jax.numpy so that they run under `jax.jit` and on device."""

from typing import Any

import jax.numpy as jnp

Array = Any


def ncc(a: Array, b: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Normalised cross-correlation: the Pearson correlation between two maps.

    `ncc = sum((a - mean a)(b - mean b)) / sqrt(sum((a - mean a)^2) sum((b - mean b)^2))`,
    the means and sums taken over `axis`. This is VA-GAN's score of a key feature map against
    the ground-truth effect. It is defined as 0 when either map is constant over `axis` (the
    correlation is undefined there, and 0 says "no agreement" without producing NaN).

    **Arguments:**

    - `a`, `b`: arrays of the same shape (numpy or JAX; computed in at least float32).
    - `axis`: axes flattened into one map; None = all, one score for the pair. For a batch
      `(B, *spatial, C)` use `axis=tuple(range(1, a.ndim))` to get one score per sample.

    **Returns:** the correlation in [-1, 1], of the shape of `a` without `axis` (a scalar for
    `axis=None`).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"ncc needs maps of the same shape, got {a.shape} and {b.shape}")
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    da = a - jnp.mean(a, axis=axis, keepdims=True)
    db = b - jnp.mean(b, axis=axis, keepdims=True)
    covariance = jnp.sum(da * db, axis=axis)
    scale = jnp.sqrt(jnp.sum(da * da, axis=axis) * jnp.sum(db * db, axis=axis))
    # Constancy tested exactly (max == min): the mean of a constant map is not always exact in
    # floating point, which would leave rounding noise with a correlation of +-1.
    def varies(x):
        return jnp.max(x, axis=axis) > jnp.min(x, axis=axis)

    defined = varies(a) & varies(b) & (scale > 0)
    return jnp.where(defined, covariance / jnp.where(defined, scale, 1.0), 0.0)
