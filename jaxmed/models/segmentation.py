"""Segmentation network of SPEC S4: stem, CBAM, dilated ResNet, CBAM, pyramid pooling, head.

    image [B, H, W, 3]
      -> stem: conv 3x3/2 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU       [B, H/2, W/2, 2w]
      -> max-pool 3x3/2                                                  [B, H/4, W/4, 2w]
      -> CBAM (cbam_stem)
      -> ResNet layers 1-4 (layer 4, and at output stride 8 layer 3, dilated instead of strided)
      -> CBAM (cbam)
      -> PyramidPooling (bins 1, 2, 3, 6; C/4 channels per branch)      [B, H/16, W/16, 2C]
      -> head: conv 3x3 -> BN -> ReLU -> dropout -> conv 1x1            [B, H/16, W/16, classes]
      -> align-corners bilinear resize to the input size               [B, H, W, classes]

`w` is the base width (64 in the seed); every width scales with it. Sizes use PyTorch's
convolution arithmetic (explicit symmetric padding), so a 473 x 473 input reproduces the seed's
trace exactly: stem 237, pool 119, layer1 119, layer2 60, layer3 30, layer4 30.

Everything is channels-last and dimension-agnostic: `(B, H, W, C)` images or `(B, D, H, W, C)`
volumes (3x3 kernels become 3x3x3, bilinear becomes trilinear).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers import CBAM, PyramidPooling, resize_align_corners

Array = jax.Array

__all__ = [
    "RESNET_DEPTHS",
    "BasicBlock",
    "Bottleneck",
    "ResNetLayer",
    "SegmentationHead",
    "SegmentationNet",
    "dilation_schedule",
]

# He (Kaiming) normal on fan-out, as torchvision initialises ResNet convolutions: ReLU networks
# trained from scratch keep unit activation scale through depth.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _spatial_dims(x: Array, who: str) -> int:
    nsp = x.ndim - 2
    if nsp not in (2, 3):
        raise ValueError(f"{who} expects (B, H, W, C) or (B, D, H, W, C) input, got shape {x.shape}")
    return nsp


def _conv_norm(x: Array, features: int, kernel: int, *, strides: int = 1, dilation: int = 1, name: str,
               train: bool, dtype: Any, param_dtype: Any) -> Array:
    """Bias-free conv `conv{name}` + BatchNorm `norm{name}` (call inside a compact method).

    Padding is `dilation * (kernel - 1) / 2` on both sides of every spatial axis, as PyTorch's
    `padding=dilation`; Flax's "SAME" would put the odd pixel of a strided conv on the high side
    only and shift the sampling grid of even-sized inputs.
    """
    nsp = x.ndim - 2
    pad = dilation * (kernel - 1) // 2
    x = nn.Conv(features, (kernel,) * nsp, strides=(strides,) * nsp, padding=((pad, pad),) * nsp,
                kernel_dilation=(dilation,) * nsp, use_bias=False, kernel_init=_CONV_INIT,
                dtype=dtype, param_dtype=param_dtype, name=f"conv{name}")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, param_dtype=param_dtype, name=f"norm{name}")(x)


# ----------------------------------------------------------------------------
# Residual blocks and layers
# ----------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block (ResNet-18/34): two 3x3 conv-BN, ReLU between, identity or projection.

    `relu(BN(conv3(relu(BN(conv3_s(x))))) + shortcut(x))`; the stride sits on the first conv.
    Dilation decision: torchvision refuses dilation in basic blocks; here both 3x3 convs use
    `dilation` (padding = dilation), so a dilated layer keeps the receptive-field growth of the
    strided one it replaces.

    **Arguments** (attributes):

    - `features`: output channels (expansion 1).
    - `strides`: stride of the first conv and of the projection.
    - `dilation`: dilation of both 3x3 convs.
    - `dtype`, `param_dtype`: computation and parameter dtypes.

    **Call** `(x, train=False)`: `x` is `(B, *spatial, C_in)`; `train` uses and updates batch
    statistics (pass `mutable=["batch_stats"]`).

    **Returns:** `(B, *ceil(spatial / strides), features)`.
    """

    features: int
    strides: int = 1
    dilation: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cn = functools.partial(_conv_norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.relu(cn(x, self.features, 3, strides=self.strides, dilation=self.dilation, name="1"))
        y = cn(y, self.features, 3, dilation=self.dilation, name="2")  # y: [B, *S/s, F]
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = cn(x, self.features, 1, strides=self.strides, name="_downsample")
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (ResNet-50/101/152): 1x1 -> 3x3 -> 1x1 (x4), identity or projection.

    `relu(BN(conv1(relu(BN(conv3_s,d(relu(BN(conv1(x)))))))) + shortcut(x))`; the stride and the
    dilation sit on the 3x3 conv (torchvision's v1.5 placement); the shortcut is the identity
    when the shape is kept, else a strided 1x1 conv + BN.

    **Arguments** (attributes):

    - `features`: bottleneck width `F`; the block outputs `4 F` channels.
    - `strides`: stride of the 3x3 conv and of the projection.
    - `dilation`: dilation of the 3x3 conv.
    - `dtype`, `param_dtype`: computation and parameter dtypes.

    **Call** `(x, train=False)`: `x` is `(B, *spatial, C_in)`; `train` uses and updates batch
    statistics (pass `mutable=["batch_stats"]`).

    **Returns:** `(B, *ceil(spatial / strides), 4 features)`.
    """

    features: int
    strides: int = 1
    dilation: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        out = self.features * self.expansion
        cn = functools.partial(_conv_norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.relu(cn(x, self.features, 1, name="1"))  # y: [B, *S, F]
        y = nn.relu(cn(y, self.features, 3, strides=self.strides, dilation=self.dilation, name="2"))
        y = cn(y, out, 1, name="3")  # y: [B, *S/s, 4F]
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out:
            shortcut = cn(x, out, 1, strides=self.strides, name="_downsample")
        return nn.relu(y + shortcut)


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
                name=f"block{i}",
            )(x, train=train)
        return x


# Block type and blocks per layer of each ResNet depth (He et al. 2016, Table 1).
RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

# Which of layers 2, 3, 4 replace their stride 2 by dilation, per output stride.
_DILATED_LAYERS = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


def dilation_schedule(output_stride: int) -> tuple[tuple[int, int, int], ...]:
    """`(strides, first_dilation, dilation)` of ResNet layers 1-4 for an output stride.

    Layer 1 never strides (the stem and max-pool give stride 4); layers 2-4 stride by 2 unless
    dilated, in which case the dilation doubles instead and the layer's first block keeps the
    previous dilation (torchvision's `replace_stride_with_dilation`):

    - 32: `(1,1,1), (2,1,1), (2,1,1), (2,1,1)` (plain ResNet).
    - 16: `(1,1,1), (2,1,1), (2,1,1), (1,1,2)` (the seed's trace, the default).
    - 8: `(1,1,1), (2,1,1), (1,1,2), (1,2,4)` (PSPNet's dilated ResNet).
    """
    if output_stride not in _DILATED_LAYERS:
        raise ValueError(f"output_stride must be one of {sorted(_DILATED_LAYERS)}, got {output_stride!r}")
    schedule, dilation = [(1, 1, 1)], 1
    for dilate in _DILATED_LAYERS[output_stride]:
        previous = dilation
        dilation = dilation * 2 if dilate else dilation
        schedule.append((1 if dilate else 2, previous, dilation))
    return tuple(schedule)


# ----------------------------------------------------------------------------
# Heads and the network
# ----------------------------------------------------------------------------


class SegmentationHead(nn.Module):
    """PSPNet classifier: 3x3 conv (no bias) -> BN -> ReLU -> dropout -> 1x1 conv (bias).

    **Arguments** (attributes):

    - `hidden`: channels of the 3x3 conv (512 in PSPNet's main head, 256 in its auxiliary head).
    - `num_classes`: output channels.
    - `dropout_rate`: dropout probability (0.1 in PSPNet); active only with `train=True`, which
      then needs a `'dropout'` rng.
    - `dtype`, `param_dtype`: computation and parameter dtypes.

    **Call** `(x, train=False)`: `x` is `(B, *spatial, C)`.

    **Returns:** logits `(B, *spatial, num_classes)`.
    """

    hidden: int
    num_classes: int
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        y = nn.relu(_conv_norm(x, self.hidden, 3, name="", train=train, dtype=self.dtype,
                               param_dtype=self.param_dtype))  # y: [B, *S, hidden]
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        return nn.Conv(self.num_classes, (1,) * (x.ndim - 2), dtype=self.dtype, param_dtype=self.param_dtype,
                       name="classifier")(y)  # [B, *S, classes]


class _Stem(nn.Module):
    """Seed stem: conv 3x3/2 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU, `[B, *S, C] -> [B, *S/2, 2w]`."""

    width: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cn = functools.partial(_conv_norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.relu(cn(x, self.width, 3, strides=2, name="1"))  # h: [B, *S/2, w]
        return nn.relu(cn(h, 2 * self.width, 3, name="2"))  # [B, *S/2, 2w]


class SegmentationNet(nn.Module):
    """Attention + residual + pyramid-pooling segmentation network (SPEC S4; PSPNet with CBAM).

    stem (conv 3x3/2 to `w`, conv 3x3 to `2w`, each BN + ReLU) -> max-pool 3x3/2 -> CBAM ->
    ResNet layers 1-4 (`depth`; layer `i` has bottleneck width `w 2^i`, times 4 channels out for
    ResNet-50/101/152; `w 2^i` out for basic blocks) -> CBAM -> PyramidPooling (`ppm_bins`,
    `C / len(bins)` channels per branch, BN, ReLU, align-corners resize, concatenated with its
    input) -> `SegmentationHead` (hidden `8w`, 512 at `w = 64`) -> align-corners (bi/tri)linear
    resize of the logits to the input size. With `aux_head`, a `SegmentationHead` (hidden `4w`)
    on layer 3, resized to the input too (PSPNet's deep supervision; the program weights its
    loss 0.4). `SegmentationNet()` is the seed's configuration: ResNet-50, `w = 64`, output
    stride 16, meant for 473 x 473 inputs; any input size works.

    Layer 4 (and at output stride 8 also layer 3) is dilated instead of strided, following
    `dilation_schedule`. The stem has two convolutions as the seed describes (PSPNet's deep
    stem has three), so layer 1 sees `2w` channels, not torchvision's `w`: its first block's
    1x1 conv and projection are that much larger than in torchvision's ResNet-50.

    The outputs of the stem, the max-pool and layers 1-4 are sown into the `'intermediates'`
    collection as `stem_features`, `pool_features`, `layer1_features` ... `layer4_features`
    (Flax forbids reusing the submodule names `stem`, `layer1`, ... there), and with `use_cbam`
    the spatial attention maps `(B, *spatial, 1)` as `cbam_stem_attention` and `cbam_attention`:
    `apply(..., mutable=["intermediates"])` returns them, each as a one-element tuple.

    **Arguments** (attributes):

    - `num_classes`: output classes (3: outside kidney, hydronephrosis fluid, kidney tissue).
    - `depth`: ResNet depth, a key of `RESNET_DEPTHS` (18, 34, 50, 101, 152).
    - `width`: base width `w` (64 in the seed); scales the stem, layers and heads.
    - `output_stride`: 16 (default, the seed), 8 (PSPNet, ~4x the compute of layers 3-4) or 32.
    - `use_cbam`: the two CBAM modules (ablation: without them the stem and layer 4 feed the
      next stage directly).
    - `use_ppm`: pyramid pooling (ablation: without it the head takes layer 4's features).
    - `aux_head`: add the auxiliary head on layer 3.
    - `ppm_bins`: pyramid bin sizes.
    - `cbam_reduction`: CBAM channel-gate reduction ratio.
    - `dropout_rate`: dropout of both heads.
    - `dtype`, `param_dtype`: computation and parameter dtypes.

    **Call** `(x, *, train=False)`:

    - `x`: images `(B, H, W, C_in)` or volumes `(B, D, H, W, C_in)`.
    - `train`: BatchNorm uses and updates batch statistics (pass `mutable=["batch_stats"]`) and
      dropout is active (pass `rngs={"dropout": key}`).

    **Returns:** a dict with `'logits'` `(B, H, W, num_classes)` (unnormalised class scores at
    input resolution) and, with `aux_head`, `'aux_logits'` of the same shape.
    """

    num_classes: int = 3
    depth: int = 50
    width: int = 64
    output_stride: int = 16
    use_cbam: bool = True
    use_ppm: bool = True
    aux_head: bool = False
    ppm_bins: Sequence[int] = (1, 2, 3, 6)
    cbam_reduction: int = 16
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _check(self) -> None:
        if self.depth not in RESNET_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(RESNET_DEPTHS)}, got {self.depth!r}")
        if self.width < 1 or self.num_classes < 1:
            raise ValueError(f"width and num_classes must be >= 1, got {self.width} and {self.num_classes}")
        dilation_schedule(self.output_stride)  # validates output_stride

    def _cbam(self, x: Array, train: bool, name: str) -> Array:
        if not self.use_cbam:
            return x
        x, attention = CBAM(self.cbam_reduction, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(
            x, train=train, return_attention=True)
        self.sow("intermediates", f"{name}_attention", attention["spatial"])  # [B, *S, 1]
        return x

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> dict[str, Array]:
        self._check()
        nsp = _spatial_dims(x, "SegmentationNet")
        size = x.shape[1:-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block, blocks = RESNET_DEPTHS[self.depth]

        h = _Stem(self.width, **kw, name="stem")(x, train=train)  # h: [B, *S/2, 2w]
        self.sow("intermediates", "stem_features", h)
        h = nn.max_pool(h, (3,) * nsp, strides=(2,) * nsp, padding=((1, 1),) * nsp)  # [B, *S/4, 2w]
        self.sow("intermediates", "pool_features", h)
        h = self._cbam(h, train, "cbam_stem")

        features = {}
        for i, (strides, first_dilation, dilation) in enumerate(dilation_schedule(self.output_stride)):
            h = ResNetLayer(block, self.width * 2**i, blocks[i], strides, first_dilation, dilation, **kw,
                            name=f"layer{i + 1}")(h, train=train)  # h: [B, *S/stride, C_i]
            self.sow("intermediates", f"layer{i + 1}_features", h)
            features[i + 1] = h

        h = self._cbam(h, train, "cbam")
        if self.use_ppm:
            h = PyramidPooling(self.ppm_bins, h.shape[-1] // len(self.ppm_bins), **kw, name="ppm")(
                h, train=train)  # h: [B, *S/os, 2C]
        logits = SegmentationHead(8 * self.width, self.num_classes, self.dropout_rate, **kw, name="head")(
            h, train=train)  # [B, *S/os, classes]
        out = {"logits": resize_align_corners(logits, size)}  # [B, *S, classes]
        if self.aux_head:
            aux = SegmentationHead(4 * self.width, self.num_classes, self.dropout_rate, **kw, name="aux_head")(
                features[3], train=train)  # [B, *S/stride3, classes]
            out["aux_logits"] = resize_align_corners(aux, size)
        return out
