"""Pyramid pooling (PSPNet) and the resampling it needs: adaptive average pooling and
align-corners (multi-)linear resizing, for 2-D and 3-D channels-last tensors.

Both resampling operations are separable and linear, so each spatial axis is resampled by a
small (L_out, L_in) matrix built with NumPy at trace time (shapes are static) and applied with
one ``tensordot`` per axis: no Python loop over output cells runs inside the traced program.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Matrices hold exact weights (0, 1, 1/n, interpolation fractions); HIGHEST keeps TPUs from
# rounding float32 operands to bfloat16, which would break "corners preserved exactly".
_PRECISION = jax.lax.Precision.HIGHEST


def _spatial_size(x: jax.Array, size: int | Sequence[int], what: str) -> tuple[int, ...]:
    """Normalise an int-or-tuple size to one positive int per spatial axis of ``x``."""
    if x.ndim < 3:
        raise ValueError(f"{what}: expected (B, *spatial, C) with >= 1 spatial axis, got shape {x.shape}")
    n_spatial = x.ndim - 2
    sizes = (size,) * n_spatial if isinstance(size, (int, np.integer)) else tuple(size)
    if len(sizes) != n_spatial or any(int(s) < 1 for s in sizes):
        raise ValueError(f"{what}: size {size!r} does not give {n_spatial} positive sizes for shape {x.shape}")
    return tuple(int(s) for s in sizes)


def _resample(x: jax.Array, size: int | Sequence[int], matrix: Callable, what: str) -> jax.Array:
    """Resample each spatial axis of ``x`` to ``size`` with its ``matrix(L_in, L_out)``."""
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
    return _resample(x, output_size, _adaptive_pool_matrix, "adaptive_avg_pool")


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
    return _resample(x, size, _align_corners_matrix, "resize_align_corners")


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling module (2-D or 3-D).

    For each bin size b: adaptive average pool to b per spatial axis → 1×1 conv C → R (no bias)
    → BatchNorm → ReLU → align-corners linear resize back to the input's spatial size; the
    result is ``concat([x, branch_1, ..., branch_k], axis=-1)``.

    With ``use_norm=False`` the BatchNorm is dropped and the 1×1 conv gets a bias instead, so
    the branch keeps an affine offset.

    **Arguments:**

    - `bins`: pooled output size of each branch (int, or one int per spatial axis).
    - `reduction_channels`: R, channels per branch; default ``C // len(bins)``.
    - `use_norm`: BatchNorm after the 1×1 conv (``momentum=0.9``, ``epsilon=1e-5``).
    - `dtype`: computation dtype (None: inferred from inputs and parameters, as Flax does).
    - `param_dtype`: parameter dtype.

    **Call** ``(x, train=False)``: `x` is `(B, *spatial, C)`; `train=True` uses batch
    statistics and updates ``batch_stats`` (pass ``mutable=["batch_stats"]``).

    **Returns:**

    `(B, *spatial, C + len(bins) * R)`.
    """

    bins: Sequence[int | Sequence[int]] = (1, 2, 3, 6)
    reduction_channels: int | None = None
    use_norm: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        spatial = x.shape[1:-1]
        reduced = self.reduction_channels
        if reduced is None:
            reduced = x.shape[-1] // len(self.bins)
        if reduced < 1:
            raise ValueError(f"PyramidPooling: {x.shape[-1]} channels give no channels per branch for bins {self.bins}")
        branches = [x]
        for i, b in enumerate(self.bins):
            y = adaptive_avg_pool(x, b)  # y: [B, *bin, C]
            y = nn.Conv(
                reduced, (1,) * len(spatial), use_bias=not self.use_norm,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"bin{i}_conv",
            )(y)  # y: [B, *bin, R]
            if self.use_norm:
                y = nn.BatchNorm(
                    use_running_average=not train, momentum=0.9, epsilon=1e-5,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"bin{i}_norm",
                )(y)
            y = nn.relu(y)
            branches.append(resize_align_corners(y, spatial))  # [B, *spatial, R]
        return jnp.concatenate(branches, axis=-1)  # [B, *spatial, C + k R]
