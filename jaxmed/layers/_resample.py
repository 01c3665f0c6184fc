"""Separable linear resampling of channels-last tensors (1-D to 3-D): adaptive average pooling,
align-corners (multi-)linear resizing, and `resample`, which applies any per-axis matrix.

Both operations are separable and linear, so each spatial axis is resampled by a small
(L_out, L_in) matrix built with NumPy at trace time (shapes are static) and applied with one
``tensordot`` per axis: no Python loop over output cells runs inside the traced program.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.layers._util import per_axis

# Matrices hold exact weights (0, 1, 1/n, interpolation fractions); HIGHEST keeps TPUs from
# rounding float32 operands to bfloat16, which would break "corners preserved exactly".
_PRECISION = jax.lax.Precision.HIGHEST


def _spatial_size(x: jax.Array, size: int | Sequence[int], what: str) -> tuple[int, ...]:
    """Normalise an int-or-tuple size to one positive int per spatial axis of ``x``."""
    if x.ndim < 3:
        raise ValueError(f"{what}: expected (B, *spatial, C) with >= 1 spatial axis, got shape "
                         f"{x.shape}")
    n_spatial = x.ndim - 2
    sizes = per_axis(size, n_spatial)
    if len(sizes) != n_spatial or any(s < 1 for s in sizes):
        raise ValueError(f"{what}: size {size!r} does not give {n_spatial} positive sizes for "
                         f"shape {x.shape}")
    return sizes


def resample(x: jax.Array, size: int | Sequence[int],
             matrix: Callable[[int, int], np.ndarray], what: str = "resample") -> jax.Array:
    """Resamples each spatial axis of `x` to `size` with the linear map `matrix(L_in, L_out)`.

    Axis by axis, `y = M @ x` along the axis with `M = matrix(L_in, L_out)` of shape
    `(L_out, L_in)`, built with NumPy at trace time and applied in the dtype of `x` at HIGHEST
    precision; an axis whose length is already `L_out` is left as it is (the identity).
    `adaptive_avg_pool` and `resize_align_corners` are this with their matrices.

    **Arguments:**

    - `x`: `(B, *spatial, C)` with 1, 2 or 3 spatial axes.
    - `size`: an int (same for every spatial axis) or one int per spatial axis.
    - `matrix`: `(L_in, L_out) -> (L_out, L_in)` NumPy array.
    - `what`: the caller's name, for error messages.

    **Returns:** `(B, *size, C)`, in the dtype of `x`.
    """
    sizes = _spatial_size(x, size, what)
    for axis, (length_in, length_out) in enumerate(zip(x.shape[1:-1], sizes), start=1):
        if length_in == length_out:
            continue  # both operations are the identity at equal sizes
        m = jnp.asarray(matrix(length_in, length_out), dtype=x.dtype)  # m: [L_out, L_in]
        y = jnp.tensordot(m, x, axes=((1,), (axis,)), precision=_PRECISION)  # y: [L_out, B, ..., C]
        x = jnp.moveaxis(y, 0, axis)
    return x


def _adaptive_pool_matrix(length_in: int, length_out: int) -> np.ndarray:
    """(L_out, L_in) averaging matrix: row i averages [floor(i L / n), ceil((i + 1) L / n))."""
    i = np.arange(length_out)
    starts = (i * length_in) // length_out
    ends = -((-(i + 1) * length_in) // length_out)  # ceil division
    cols = np.arange(length_in)
    inside = (cols[None, :] >= starts[:, None]) & (cols[None, :] < ends[:, None])
    return inside / (ends - starts)[:, None]


def _align_corners_matrix(length_in: int, length_out: int) -> np.ndarray:
    """(L_out, L_in) linear-interpolation matrix with align_corners=True.

    Output o samples input coordinate o (L_in - 1) / (L_out - 1) (0 when L_out == 1); the end
    points land exactly on the input end points, so corners are copied, not interpolated.
    """
    o = np.arange(length_out)
    src = o * (length_in - 1) / (length_out - 1) if length_out > 1 else np.zeros(1)
    lo = np.minimum(np.floor(src).astype(np.int64), length_in - 1)
    hi = np.minimum(lo + 1, length_in - 1)
    frac = src - lo
    mat = np.zeros((length_out, length_in))
    np.add.at(mat, (o, lo), 1.0 - frac)
    np.add.at(mat, (o, hi), frac)
    return mat


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
    """Adaptive average pooling with PyTorch ``AdaptiveAvgPool{2,3}d`` semantics.

    Along an axis of length L with n bins, bin i averages the inputs in
    [floor(i L / n), ceil((i + 1) L / n)); bins may overlap when n does not divide L, and
    n > L (upsampling) is allowed.

    **Arguments:**

    - `x`: `(B, *spatial, C)` with 1, 2 or 3 spatial axes.
    - `output_size`: an int (same for every spatial axis) or one int per spatial axis.

    **Returns:**

    `(B, *output_size, C)`, in the dtype of `x`.
    """
    return resample(x, output_size, _adaptive_pool_matrix, "adaptive_avg_pool")


def resize_align_corners(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """(Bi/tri-)linear resize with ``align_corners=True`` (PyTorch ``interpolate`` semantics).

    Output coordinate o along an axis maps to input coordinate o (L_in - 1) / (L_out - 1), or 0
    when L_out == 1; values are linearly interpolated between the two nearest inputs, axis by
    axis. Works for up- and down-sampling; no antialiasing filter is applied when shrinking
    (``jax.image.resize`` differs on both counts: half-pixel centres and antialiasing).

    **Arguments:**

    - `x`: `(B, *spatial, C)` with 1, 2 or 3 spatial axes.
    - `size`: an int (same for every spatial axis) or one int per spatial axis.

    **Returns:**

    `(B, *size, C)`, in the dtype of `x`.
    """
    return resample(x, size, _align_corners_matrix, "resize_align_corners")
