"""Pyramid pooling (PSPNet) for 2-D and 3-D channels-last tensors."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers._conv import Conv
from jaxmed.layers._resample import adaptive_avg_pool, resize_align_corners


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
            raise ValueError(f"PyramidPooling: {x.shape[-1]} channels give no channels per branch "
                             f"for bins {self.bins}")
        branches = [x]
        for i, b in enumerate(self.bins):
            y = adaptive_avg_pool(x, b)  # y: [B, *bin, C]
            y = Conv(
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
