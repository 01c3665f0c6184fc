"""Segmentation network: stem, CBAM, dilated ResNet, CBAM, pyramid pooling, head.

    image [B, H, W, 3]
      -> stem: conv 3x3/2 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU       [B, H/2, W/2, 2w]
         (or ResNet's conv 7x7/2 -> BN -> ReLU, `stem="7x7"`)            [B, H/2, W/2, w]
      -> max-pool 3x3/2                                                  [B, H/4, W/4, 2w]
      -> CBAM (cbam_stem)
      -> ResNet layers 1-4 (layer 4, and at output stride 8 layer 3, dilated instead of strided)
      -> CBAM (cbam)
      -> PyramidPooling (bins 1, 2, 3, 6; C/4 channels per branch)      [B, H/16, W/16, 2C]
      -> head: conv 3x3 -> BN -> ReLU -> dropout -> conv 1x1            [B, H/16, W/16, classes]
      -> align-corners bilinear resize to the input size               [B, H, W, classes]

`w` is the base width (64 in the original design); every width scales with it. The ResNet
layers are `jaxmed.models.resnet`'s. Sizes use PyTorch's convolution arithmetic (explicit
symmetric padding), so a 473 x 473 input reproduces the original design's trace exactly: stem
237, pool 119, layer1 119, layer2 60, layer3 30, layer4 30. The design and its decisions:
`docs/segmentation.md`.

Everything is channels-last and dimension-agnostic: `(B, H, W, C)` images or `(B, D, H, W, C)`
volumes (3x3 kernels become 3x3x3, bilinear becomes trilinear).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers import CBAM, Conv, PyramidPooling, resize_align_corners
from jaxmed.models._util import spatial_dims
from jaxmed.models.resnet import (
    RESNET_DEPTHS,
    ResNetLayer,
    batch_norm,
    conv_norm,
    dilation_schedule,
    he_normal_conv,
)

Array = jax.Array

__all__ = ["STEMS", "SegmentationHead", "SegmentationNet"]

STEMS = ("3x3", "7x7")

_LAYERS = dict(conv=he_normal_conv, norm=batch_norm)


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
        y = nn.relu(conv_norm(x, self.hidden, 3, train=train, dtype=self.dtype,
                              param_dtype=self.param_dtype, **_LAYERS))  # y: [B, *S, hidden]
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        return Conv(self.num_classes, (1,) * (x.ndim - 2), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="classifier")(y)  # [B, *S, classes]


class _Stem(nn.Module):
    """Two-conv stem: conv 3x3/2 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU.

    `[B, *S, C] -> [B, *S/2, 2w]`.
    """

    width: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cn = functools.partial(conv_norm, train=train, dtype=self.dtype,
                               param_dtype=self.param_dtype, **_LAYERS)
        h = nn.relu(cn(x, self.width, 3, strides=2, suffix="1"))  # h: [B, *S/2, w]
        return nn.relu(cn(h, 2 * self.width, 3, suffix="2"))  # [B, *S/2, 2w]


class SegmentationNet(nn.Module):
    """Attention + residual + pyramid-pooling segmentation network (PSPNet with CBAM).

    stem (conv 3x3/2 to `w`, conv 3x3 to `2w`, each BN + ReLU) -> max-pool 3x3/2 -> CBAM ->
    ResNet layers 1-4 (`depth`; layer `i` has bottleneck width `w 2^i`, times 4 channels out for
    ResNet-50/101/152; `w 2^i` out for basic blocks) -> CBAM -> PyramidPooling (`ppm_bins`,
    `C / len(bins)` channels per branch, BN, ReLU, align-corners resize, concatenated with its
    input) -> `SegmentationHead` (hidden `8w`, 512 at `w = 64`) -> align-corners (bi/tri)linear
    resize of the logits to the input size. With `aux_head`, a `SegmentationHead` (hidden `4w`)
    on layer 3, resized to the input too (PSPNet's deep supervision; the program weights its
    loss 0.4). `SegmentationNet()` is the original design (`docs/segmentation.md`): ResNet-50,
    `w = 64`, output stride 16, meant for 473 x 473 inputs; any input size works.

    Layer 4 (and at output stride 8 also layer 3) is dilated instead of strided, following
    `dilation_schedule`. The stem has two convolutions as the original design has (PSPNet's
    deep stem has three), so layer 1 sees `2w` channels, not torchvision's `w`: its first
    block's 1x1 conv and projection are that much larger than in torchvision's ResNet-50.
    `stem="7x7"` puts ResNet's own stem there instead (`conv_stem`, `norm_stem`, as in
    `ResNet`): the backbone is then torchvision's ResNet array for array, so its ImageNet
    weights load (`jaxmed.weights`).

    The outputs of the stem, the max-pool and layers 1-4 are sown into the `'intermediates'`
    collection as `stem_features`, `pool_features`, `layer1_features` ... `layer4_features`
    (Flax forbids reusing the submodule names `stem`, `layer1`, ... there), and with `use_cbam`
    the spatial attention maps `(B, *spatial, 1)` as `cbam_stem_attention` and `cbam_attention`:
    `apply(..., mutable=["intermediates"])` returns them, each as a one-element tuple.

    **Arguments** (attributes):

    - `num_classes`: output classes (3: outside kidney, hydronephrosis fluid, kidney tissue).
    - `depth`: ResNet depth, a key of `RESNET_DEPTHS` (18, 34, 50, 101, 152).
    - `width`: base width `w` (64 in the original design); scales the stem, layers and heads.
    - `output_stride`: 16 (default, the original design), 8 (PSPNet, ~4x the compute of layers
      3-4) or 32.
    - `stem`: `"3x3"` (the original design's two convolutions, to `2w` channels) or `"7x7"`
      (ResNet's conv 7x7/2, to `w` channels).
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
    stem: str = "3x3"
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
            raise ValueError(f"width and num_classes must be >= 1, got {self.width} and "
                             f"{self.num_classes}")
        dilation_schedule(self.output_stride)  # validates output_stride
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")

    def _cbam(self, x: Array, train: bool, name: str) -> Array:
        if not self.use_cbam:
            return x
        x, attention = CBAM(self.cbam_reduction, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=name)(x, train=train, return_attention=True)
        self.sow("intermediates", f"{name}_attention", attention["spatial"])  # [B, *S, 1]
        return x

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> dict[str, Array]:
        self._check()
        nsp = spatial_dims(x, "SegmentationNet")
        size = x.shape[1:-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block, blocks = RESNET_DEPTHS[self.depth]

        if self.stem == "7x7":
            h = nn.relu(conv_norm(x, self.width, 7, strides=2, suffix="_stem", train=train,
                                  **kw, **_LAYERS))  # h: [B, *S/2, w]
        else:
            h = _Stem(self.width, **kw, name="stem")(x, train=train)  # h: [B, *S/2, 2w]
        self.sow("intermediates", "stem_features", h)
        h = nn.max_pool(h, (3,) * nsp, strides=(2,) * nsp,
                        padding=((1, 1),) * nsp)  # h: [B, *S/4, 2w]
        self.sow("intermediates", "pool_features", h)
        h = self._cbam(h, train, "cbam_stem")

        features = {}
        schedule = dilation_schedule(self.output_stride)
        for i, (strides, first_dilation, dilation) in enumerate(schedule):
            h = ResNetLayer(block, self.width * 2**i, blocks[i], strides, first_dilation, dilation,
                            **kw, **_LAYERS,
                            name=f"layer{i + 1}")(h, train=train)  # h: [B, *S/stride, C_i]
            self.sow("intermediates", f"layer{i + 1}_features", h)
            features[i + 1] = h

        h = self._cbam(h, train, "cbam")
        if self.use_ppm:
            h = PyramidPooling(self.ppm_bins, h.shape[-1] // len(self.ppm_bins), **kw,
                               name="ppm")(h, train=train)  # h: [B, *S/os, 2C]
        logits = SegmentationHead(8 * self.width, self.num_classes, self.dropout_rate, **kw,
                                  name="head")(h, train=train)  # [B, *S/os, classes]
        out = {"logits": resize_align_corners(logits, size)}  # [B, *S, classes]
        if self.aux_head:
            aux = SegmentationHead(4 * self.width, self.num_classes, self.dropout_rate, **kw,
                                   name="aux_head")(features[3], train=train)  # [B, *S/s3, classes]
            out["aux_logits"] = resize_align_corners(aux, size)
        return out
