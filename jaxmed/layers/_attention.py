"""CBAM attention (Woo et al., ECCV 2018): the channel gate, the spatial gate, and both in sequence.

All modules are channels-last and dimension-agnostic: an input `(B, *spatial, C)` may have one,
two or three spatial axes (2-D images `(B, H, W, C)`, 3-D volumes `(B, D, H, W, C)`). They run in
float32 and bfloat16, under `jax.jit`, `jax.vmap` and `jax.grad`.

Dtypes follow Flax: `dtype` is the computation dtype (None = promote the input with the
parameters, so a bfloat16 input with float32 parameters computes and returns float32), and
`param_dtype` is the storage dtype of the parameters.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmed.layers._conv import Conv
from jaxmed.layers._util import apply_gate, spatial_axes

Array = Any


class ChannelAttention(nn.Module):
    """CBAM channel gate: reweights channels from their global average and maximum.

    `a = sigmoid(MLP(mean_positions(x)) + MLP(max_positions(x)))` with one MLP shared by both
    pooled vectors, `C -> max(C // reduction, 1) -> C`, biases on both layers and a ReLU between;
    the output is `x * a` broadcast over all positions.

    **Arguments** (attributes):

    - `reduction`: channel reduction ratio `r` of the hidden layer (CBAM uses 16).
    - `dtype`: computation dtype (None = infer like Flax).
    - `param_dtype`: parameter dtype.

    **Call** `(x, return_attention=False)`:

    - `x`: `(B, *spatial, C)`, 1 to 3 spatial axes.
    - `return_attention`: also return the channel weights.

    **Returns:** `y` of the shape of `x`; with `return_attention`, `(y, a)` where `a` has shape
    `(B, C)` with values in (0, 1).
    """

    reduction: int = 16
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, return_attention: bool = False):
        axes = spatial_axes(x)
        channels = x.shape[-1]
        hidden = max(channels // self.reduction, 1)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Stacking the two descriptors runs the shared MLP once.
        pooled = jnp.stack([jnp.mean(x, axis=axes), jnp.max(x, axis=axes)])  # [2, B, C]
        h = nn.relu(nn.Dense(hidden, name="hidden", **dense)(pooled))  # [2, B, C/r]
        logits = jnp.sum(nn.Dense(channels, name="out", **dense)(h), axis=0)  # [B, C]
        attention = nn.sigmoid(logits)  # [B, C]
        gate = attention.reshape(attention.shape[0], *(1,) * len(axes), channels)  # [B, 1.., C]
        y = apply_gate(x, gate, self.dtype)
        return (y, attention) if return_attention else y


class SpatialAttention(nn.Module):
    """CBAM spatial gate: reweights positions from the channel-wise maximum and mean.

    `a = sigmoid(BN(conv_k([max_channels(x), mean_channels(x)])))`: the two one-channel maps are
    concatenated with the maximum FIRST (as in the official CBAM code), convolved 2 -> 1 with a
    `k x k` (`k x k x k` in 3-D) kernel, SAME padding and no bias, batch-normalised (one feature),
    and squashed; the output is `x * a` broadcast over channels.

    Initialisation decision: the official CBAM code starts the spatial BatchNorm scale at 0, so
    at initialisation `a = sigmoid(0) = 0.5` at every position whatever the input (a uniform
    gate), and the convolution kernel receives no gradient until the scale has moved away from
    0 (the scale itself does receive gradient). We follow it by default (`zero_init_norm=True`);
    set `zero_init_norm=False` for a unit scale, where the gate depends on the input from the
    first step.

    **Arguments** (attributes):

    - `kernel_size`: `k` (an int, the same on every spatial axis) or one size per spatial axis.
    - `use_norm`: BatchNorm between convolution and sigmoid; without it the gate is
      `sigmoid(conv_k(...))`, still bias-free.
    - `zero_init_norm`: start the BatchNorm scale at 0 (official CBAM init) instead of 1.
    - `dtype`: computation dtype (None = infer like Flax).
    - `param_dtype`: parameter dtype.

    **Call** `(x, train=False, return_attention=False)`:

    - `x`: `(B, *spatial, C)`, 1 to 3 spatial axes.
    - `train`: use and update batch statistics (BatchNorm momentum 0.9, epsilon 1e-5); pass
      `mutable=["batch_stats"]` to `apply`.
    - `return_attention`: also return the attention map.

    **Returns:** `y` of the shape of `x`; with `return_attention`, `(y, a)` where `a` has shape
    `(B, *spatial, 1)` with values in (0, 1) (its mean over positions serves as an image score).
    """

    kernel_size: int | Sequence[int] = 7
    use_norm: bool = True
    zero_init_norm: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_attention: bool = False):
        axes = spatial_axes(x)
        size = self.kernel_size
        kernel = (size,) * len(axes) if isinstance(size, int) else tuple(size)
        channel_max = jnp.max(x, axis=-1, keepdims=True)  # [B, *S, 1]
        channel_mean = jnp.mean(x, axis=-1, keepdims=True)  # [B, *S, 1]
        pooled = jnp.concatenate([channel_max, channel_mean], axis=-1)  # [B, *S, 2], max first
        logits = Conv(
            1, kernel, padding="SAME", use_bias=False, dtype=self.dtype,
            param_dtype=self.param_dtype, name="conv",
        )(pooled)  # [B, *S, 1]
        if self.use_norm:
            logits = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                scale_init=nn.initializers.zeros if self.zero_init_norm else nn.initializers.ones,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="norm",
            )(logits)
        attention = nn.sigmoid(logits)  # [B, *S, 1]
        y = apply_gate(x, attention, self.dtype)
        return (y, attention) if return_attention else y


class CBAM(nn.Module):
    """Convolutional Block Attention Module: `ChannelAttention` then `SpatialAttention`.

    The spatial gate sees the channel-gated features, as in the paper (channel first).

    **Arguments** (attributes):

    - `reduction`: channel-gate reduction ratio (16 in CBAM).
    - `kernel_size`: spatial-gate kernel size (7 in CBAM), an int or one size per spatial axis.
    - `use_norm`, `zero_init_norm`: spatial-gate BatchNorm switches, see `SpatialAttention`.
    - `dtype`: computation dtype (None = infer like Flax).
    - `param_dtype`: parameter dtype.

    **Call** `(x, train=False, return_attention=False)`:

    - `x`: `(B, *spatial, C)`, 1 to 3 spatial axes.
    - `train`: BatchNorm of the spatial gate in training mode (pass `mutable=["batch_stats"]`).
    - `return_attention`: also return both gates.

    **Returns:** `y` of the shape of `x`; with `return_attention`, `(y, {"channel": (B, C),
    "spatial": (B, *spatial, 1)})`.
    """

    reduction: int = 16
    kernel_size: int | Sequence[int] = 7
    use_norm: bool = True
    zero_init_norm: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_attention: bool = False):
        x, channel = ChannelAttention(
            self.reduction, dtype=self.dtype, param_dtype=self.param_dtype, name="channel"
        )(x, return_attention=True)
        y, spatial = SpatialAttention(
            self.kernel_size,
            use_norm=self.use_norm,
            zero_init_norm=self.zero_init_norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="spatial",
        )(x, train=train, return_attention=True)
        return (y, {"channel": channel, "spatial": spatial}) if return_attention else y
