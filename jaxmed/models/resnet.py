"""ResNet (He et al., CVPR 2016) for 2-D images and 3-D volumes, with dilated stages.

    image [B, H, W, C]
      -> stem: conv 7x7/2 -> norm -> ReLU                               [B, H/2, W/2, w]
      -> max-pool 3x3/2                                                  [B, H/4, W/4, w]
      -> layers 1-4 of `stage_sizes` blocks (layer 1 keeps the size; layers 2-4 halve it
         unless dilated instead, see `dilation_schedule`)              [B, H/os, W/os, C]
      -> (with `num_classes`) global average pool -> dense              [B, num_classes]

`w` is the base width; layer `i` (0-based) has blocks of width `w 2^i`, which output `w 2^i`
channels (`BasicBlock`, ResNet-18/34) or `4 w 2^i` (`Bottleneck`, ResNet-50/101/152). The
variants are `functools.partial`s of `ResNet` (`ResNet50(num_classes=1000)`), and the blocks and
layers are modules of their own, so other networks assemble them around their own stems and
heads (`jaxmed.models.segmentation`).

Sizes use PyTorch's convolution arithmetic: explicit symmetric padding `dilation (k - 1) / 2`,
so any input size gives torchvision's feature sizes. Convolutions and normalisations come from
the factories `conv` and `norm` (default: `jaxmed.layers.Conv` with He-normal fan-out kernels,
and BatchNorm with momentum 0.9 and epsilon 1e-5), so the same blocks serve 2-D and 3-D inputs
and other layer choices. Everything is channels-last: `(B, H, W, C)` images or `(B, D, H, W, C)`
volumes (3x3 kernels become 3x3x3). Design notes: `docs/segmentation.md`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers import Conv
from jaxmed.models._util import spatial_dims

Array = jax.Array
ModuleDef = Callable[..., nn.Module]

__all__ = [
    "RESNET_DEPTHS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "ResNetLayer",
    "batch_norm",
    "conv_norm",
    "dilation_schedule",
    "he_normal_conv",
    "he_normal_fan_out",
]

# He (Kaiming) normal on fan-out, as torchvision initialises ResNet convolutions: ReLU networks
# trained from scratch keep unit activation scale through depth.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
he_normal_conv = functools.partial(Conv, kernel_init=he_normal_fan_out)
batch_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def conv_norm(x: Array, features: int, kernel: int, *, conv: ModuleDef, norm: ModuleDef,
              train: bool, strides: int = 1, dilation: int = 1, suffix: str = "",
              dtype: Any = None, param_dtype: Any = jnp.float32) -> Array:
    """Bias-free convolution `conv{suffix}` then normalisation `norm{suffix}`.

    Call it inside a compact method: both submodules belong to the caller. Padding is
    `dilation (kernel - 1) / 2` on both sides of every spatial axis, as PyTorch's
    `padding=dilation`; Flax's "SAME" would put the odd pixel of a strided convolution on the
    high side only and shift the sampling grid of even-sized inputs.

    **Arguments:**

    - `x`: `(B, *spatial, C_in)`.
    - `features`, `kernel`, `strides`, `dilation`: output channels, and the kernel size, stride
      and dilation of every spatial axis.
    - `conv`: called as `conv(features, kernel_size, strides=, padding=, kernel_dilation=,
      use_bias=False, dtype=, param_dtype=, name=)`, e.g. `he_normal_conv` or `nn.Conv`.
    - `norm`: called as `norm(use_running_average=, dtype=, param_dtype=, name=)`, e.g.
      `batch_norm`.
    - `train`: normalise with batch statistics (`use_running_average=False`).
    - `suffix`: ends the two submodules' names.
    - `dtype`, `param_dtype`: computation and parameter dtypes.

    **Returns:** `(B, *ceil(spatial / strides), features)`.
    """
    nsp = x.ndim - 2
    pad = dilation * (kernel - 1) // 2
    x = conv(features, (kernel,) * nsp, strides=(strides,) * nsp, padding=((pad, pad),) * nsp,
             kernel_dilation=(dilation,) * nsp, use_bias=False, dtype=dtype,
             param_dtype=param_dtype, name=f"conv{suffix}")(x)
    return norm(use_running_average=not train, dtype=dtype, param_dtype=param_dtype,
                name=f"norm{suffix}")(x)


# ----------------------------------------------------------------------------
# Residual blocks and layers
# ----------------------------------------------------------------------------


class _Block(nn.Module):
    """Attributes and shortcut shared by the residual blocks."""

    features: int
    strides: int = 1
    dilation: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv: ModuleDef = he_normal_conv
    norm: ModuleDef = batch_norm

    expansion: ClassVar[int] = 1

    def _conv_norm(self, train: bool) -> Callable[..., Array]:
        return functools.partial(conv_norm, conv=self.conv, norm=self.norm, train=train,
                                 dtype=self.dtype, param_dtype=self.param_dtype)

    def _shortcut(self, x: Array, train: bool) -> Array:
        """The identity when the shape is kept, else a strided 1x1 conv + norm (`_downsample`)."""
        out = self.features * self.expansion
        if self.strides == 1 and x.shape[-1] == out:
            return x
        return self._conv_norm(train)(x, out, 1, strides=self.strides, suffix="_downsample")


class BasicBlock(_Block):
    """ResNet basic block (ResNet-18/34): two 3x3 conv-norm, ReLU between, identity or projection.

    `relu(N(conv3(relu(N(conv3_s(x))))) + shortcut(x))`; the stride sits on the first conv.
    Dilation decision: torchvision refuses dilation in basic blocks; here both 3x3 convs use
    `dilation` (padding = dilation), so a dilated layer keeps the receptive-field growth of the
    strided one it replaces.

    **Arguments** (attributes): `features`, the output channels (expansion 1); `strides`, of
    the first conv and of the projection; `dilation`, of both 3x3 convs; `dtype` and
    `param_dtype`; the layer factories `conv` and `norm` (see `conv_norm`).

    **Call** `(x, train=False)`: `(B, *spatial, C_in)` -> `(B, *ceil(spatial / strides),
    features)`; `train` uses and updates batch statistics (pass `mutable=["batch_stats"]`).
    """

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cn = self._conv_norm(train)
        y = nn.relu(cn(x, self.features, 3, strides=self.strides, dilation=self.dilation,
                       suffix="1"))
        y = cn(y, self.features, 3, dilation=self.dilation, suffix="2")  # y: [B, *S/s, F]
        return nn.relu(y + self._shortcut(x, train))


class Bottleneck(_Block):
    """ResNet v1.5 bottleneck (ResNet-50/101/152): 1x1 -> 3x3 -> 1x1 (x4), identity or projection.

    `relu(N(conv1(relu(N(conv3_s,d(relu(N(conv1(x)))))))) + shortcut(x))`; the stride and the
    dilation sit on the 3x3 conv (torchvision's v1.5 placement); the shortcut is the identity
    when the shape is kept, else a strided 1x1 conv + norm.

    **Arguments** (attributes): `features`, the bottleneck width `F` (the block outputs `4 F`
    channels); `strides` and `dilation`, of the 3x3 conv (the projection takes the stride too);
    `dtype` and `param_dtype`; the layer factories `conv` and `norm` (see `conv_norm`).

    **Call** `(x, train=False)`: `(B, *spatial, C_in)` -> `(B, *ceil(spatial / strides),
    4 features)`; `train` uses and updates batch statistics (pass `mutable=["batch_stats"]`).
    """

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cn = self._conv_norm(train)
        y = nn.relu(cn(x, self.features, 1, suffix="1"))  # y: [B, *S, F]
        y = nn.relu(cn(y, self.features, 3, strides=self.strides, dilation=self.dilation,
                       suffix="2"))  # y: [B, *S/s, F]
        y = cn(y, self.features * self.expansion, 1, suffix="3")  # y: [B, *S/s, 4F]
        return nn.relu(y + self._shortcut(x, train))


class ResNetLayer(nn.Module):
    """One ResNet layer (stage): `num_blocks` blocks `block0 ...`, the first one changing shape.

    The first block gets `strides` and `first_dilation`, the others stride 1 and `dilation`:
    torchvision's `replace_stride_with_dilation` convention, where the first block of a dilated
    layer keeps the previous layer's dilation (see `dilation_schedule`).

    **Arguments** (attributes):

    - `block`: `Bottleneck` or `BasicBlock`.
    - `features`: the block's `features` (bottleneck width, or output channels of basic blocks).
    - `num_blocks`: number of blocks.
    - `strides`, `first_dilation`, `dilation`: see above.
    - `dtype`, `param_dtype`: computation and parameter dtypes.
    - `conv`, `norm`: layer factories of the blocks (see `conv_norm`).

    **Call** `(x, train=False)`: `x` is `(B, *spatial, C_in)`.

    **Returns:** `(B, *ceil(spatial / strides), features * block.expansion)`.
    """

    block: type[nn.Module]
    features: int
    num_blocks: int
    strides: int = 1
    first_dilation: int = 1
    dilation: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv: ModuleDef = he_normal_conv
    norm: ModuleDef = batch_norm

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        for i in range(self.num_blocks):
            first = i == 0
            x = self.block(
                self.features,
                strides=self.strides if first else 1,
                dilation=self.first_dilation if first else self.dilation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                conv=self.conv,
                norm=self.norm,
                name=f"block{i}",
            )(x, train=train)
        return x


# Which of layers 2, 3, 4 replace their stride 2 by dilation, per output stride.
_DILATED_LAYERS = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


def dilation_schedule(output_stride: int) -> tuple[tuple[int, int, int], ...]:
    """`(strides, first_dilation, dilation)` of ResNet layers 1-4 for an output stride.

    Layer 1 never strides (the stem and max-pool give stride 4); layers 2-4 stride by 2 unless
    dilated, in which case the dilation doubles instead and the layer's first block keeps the
    previous dilation (torchvision's `replace_stride_with_dilation`):

    - 32: `(1,1,1), (2,1,1), (2,1,1), (2,1,1)` (plain ResNet).
    - 16: `(1,1,1), (2,1,1), (2,1,1), (1,1,2)` (layer 4 dilated).
    - 8: `(1,1,1), (2,1,1), (1,1,2), (1,2,4)` (PSPNet's dilated ResNet).
    """
    if output_stride not in _DILATED_LAYERS:
        raise ValueError(
            f"output_stride must be one of {sorted(_DILATED_LAYERS)}, got {output_stride!r}")
    schedule, dilation = [(1, 1, 1)], 1
    for dilate in _DILATED_LAYERS[output_stride]:
        previous = dilation
        dilation = dilation * 2 if dilate else dilation
        schedule.append((1 if dilate else 2, previous, dilation))
    return tuple(schedule)


# ----------------------------------------------------------------------------
# The network and its variants
# ----------------------------------------------------------------------------


class ResNet(nn.Module):
    """ResNet: 7x7/2 stem, max-pool 3x3/2, four layers of residual blocks, optional classifier.

    With `width=64` and `num_classes=1000` the parameters are torchvision's (the running
    statistics aside): ResNet-18 11,689,512, ResNet-50 25,557,032. The outputs of the stem and
    of layers 1-4 are sown into the `'intermediates'` collection as `stem_features`,
    `layer1_features` ... `layer4_features`: `apply(..., mutable=["intermediates"])` returns
    them, each as a one-element tuple.

    **Arguments** (attributes):

    - `stage_sizes`: blocks in each of the four layers (`RESNET_DEPTHS`).
    - `block`: `BasicBlock` or `Bottleneck`.
    - `width`: base width `w`: the stem's channels and layer 1's block width.
    - `num_classes`: classes of the head (global average pool, then dense `head`); None for the
      features of layer 4 only.
    - `output_stride`: 32 (plain ResNet), 16 or 8: layers 4, or 3 and 4, are dilated instead of
      strided (`dilation_schedule`), with the same parameters.
    - `dtype`, `param_dtype`: computation and parameter dtypes.
    - `conv`, `norm`: layer factories of the stem and the blocks (see `conv_norm`).

    **Call** `(x, train=False)`: `x` is `(B, H, W, C_in)` or `(B, D, H, W, C_in)`; `train` uses
    and updates batch statistics (pass `mutable=["batch_stats"]`).

    **Returns:** logits `(B, num_classes)`, or without `num_classes` layer 4's features
    `(B, *spatial / output_stride, w 2^3 block.expansion)` (sizes rounded up at each stride).
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module]
    width: int = 64
    num_classes: int | None = None
    output_stride: int = 32
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv: ModuleDef = he_normal_conv
    norm: ModuleDef = batch_norm

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        nsp = spatial_dims(x, "ResNet")
        schedule = dilation_schedule(self.output_stride)
        if len(self.stage_sizes) != len(schedule):
            raise ValueError(f"ResNet has {len(schedule)} layers, got stage_sizes "
                             f"{tuple(self.stage_sizes)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, conv=self.conv, norm=self.norm)

        h = nn.relu(conv_norm(x, self.width, 7, strides=2, suffix="_stem", train=train,
                              **kw))  # h: [B, *S/2, w]
        self.sow("intermediates", "stem_features", h)
        h = nn.max_pool(h, (3,) * nsp, strides=(2,) * nsp,
                        padding=((1, 1),) * nsp)  # h: [B, *S/4, w]
        for i, (strides, first_dilation, dilation) in enumerate(schedule):
            h = ResNetLayer(self.block, self.width * 2**i, self.stage_sizes[i], strides,
                            first_dilation, dilation, **kw,
                            name=f"layer{i + 1}")(h, train=train)  # h: [B, *S/stride, C_i]
            self.sow("intermediates", f"layer{i + 1}_features", h)
        if self.num_classes is None:
            return h
        h = jnp.mean(h, axis=tuple(range(1, nsp + 1)))  # h: [B, C]
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="head")(h)  # [B, classes]


# Block type and blocks per layer of each ResNet depth (He et al. 2016, Table 1).
RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def _variant(depth: int) -> Callable[..., ResNet]:
    block, stage_sizes = RESNET_DEPTHS[depth]
    return functools.partial(ResNet, stage_sizes=stage_sizes, block=block)


ResNet18 = _variant(18)
ResNet34 = _variant(34)
ResNet50 = _variant(50)
ResNet101 = _variant(101)
ResNet152 = _variant(152)
