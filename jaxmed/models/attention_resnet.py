"""ResNet with spatial attention after the stem and after the last layer: the feature network
of the whole-slide system (`docs/pathology.md`).

    image [B, H, W, 3]
      -> conv 7x7/2 -> norm -> ReLU                                     [B, H/2, W/2, w]
      -> SpatialAttention (stem)                                        [B, H/2, W/2, w]
      -> max-pool 3x3/2                                                  [B, H/4, W/4, w]
      -> layers 1-4 of basic blocks, widths w, 2w, 4w, 8w               [B, H/32, W/32, 8w]
      -> SpatialAttention (last): map a [B, H/32, W/32, 1]
      -> global average pool -> features                                 [B, 8w]
      -> (with `num_classes`) dense `hidden` -> ReLU -> dense classes    [B, num_classes]

With `w = 64` and `(2, 2, 2, 2)` blocks this is ResNet-18 with the two attention gates: a
512-d feature per image. The image's attention score is the mean of the last attention map,
a number in (0, 1): how strongly the network attends to the image as a whole, used to weigh
its feature against those of other images (`jaxmed.pathology.fusion`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers import SpatialAttention
from jaxmed.models._util import spatial_dims
from jaxmed.models.resnet import (
    BasicBlock,
    ModuleDef,
    ResNetLayer,
    batch_norm,
    conv_norm,
    he_normal_conv,
)

Array = jax.Array

__all__ = ["AttentionResNet", "AttentionResNet18"]


class AttentionResNet(nn.Module):
    """A ResNet feature extractor with spatial attention after the stem and the last layer.

    **Arguments** (attributes):

    - `stage_sizes`: blocks in each of the four layers (ResNet-18: `(2, 2, 2, 2)`).
    - `block`: the residual block (`BasicBlock`; `Bottleneck` multiplies the feature size by 4).
    - `width`: base width `w` (64 in ResNet-18); layer `i` is `w 2^i` wide.
    - `num_classes`: classes of the pre-training head; None for features only.
    - `hidden`: width of the head's first dense layer (256).
    - `attention_kernel`: kernel size of both spatial attention convolutions (7, as CBAM).
    - `dtype`, `param_dtype`: computation and parameter dtypes.
    - `conv`, `norm`: layer factories of the stem and the blocks (`jaxmed.models.resnet`).

    **Call** `(x, train=False)`: `x` is `(B, H, W, C)` (or `(B, D, H, W, C)`); `train` uses
    and updates batch statistics (pass `mutable=["batch_stats"]`).

    **Returns:** a dict with
    `"features"` `(B, 8 w block.expansion)` (global average of the gated last-layer features),
    `"score"` `(B,)` float32, the mean of the last attention map,
    `"attention"` `(B, *spatial / 32, 1)`, the last attention map, in (0, 1),
    and with `num_classes` `"logits"` `(B, num_classes)`.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: type[nn.Module] = BasicBlock
    width: int = 64
    num_classes: int | None = None
    hidden: int = 256
    attention_kernel: int = 7
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv: ModuleDef = he_normal_conv
    norm: ModuleDef = batch_norm

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
        nsp = spatial_dims(x, "AttentionResNet")
        if len(self.stage_sizes) != 4:
            raise ValueError(f"AttentionResNet has 4 layers, got stage_sizes "
                             f"{tuple(self.stage_sizes)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        layer_kw = dict(**kw, conv=self.conv, norm=self.norm)
        attention = functools.partial(SpatialAttention, self.attention_kernel, **kw)

        h = nn.relu(conv_norm(x, self.width, 7, strides=2, suffix="_stem", train=train,
                              **layer_kw))  # h: [B, *S/2, w]
        h = attention(name="stem_attention")(h, train=train)
        h = nn.max_pool(h, (3,) * nsp, strides=(2,) * nsp,
                        padding=((1, 1),) * nsp)  # h: [B, *S/4, w]
        for i, size in enumerate(self.stage_sizes):
            h = ResNetLayer(self.block, self.width * 2**i, size, 1 if i == 0 else 2,
                            **layer_kw, name=f"layer{i + 1}")(h, train=train)
        h, a = attention(name="attention")(h, train=train,
                                           return_attention=True)  # h: [B, *S/32, C]
        axes = tuple(range(1, nsp + 1))
        features = jnp.mean(h, axis=axes)  # [B, C]
        out = {"features": features,
               "score": jnp.mean(a.astype(jnp.float32), axis=axes + (nsp + 1,)),  # [B]
               "attention": a}
        if self.num_classes is not None:
            z = nn.relu(nn.Dense(self.hidden, **kw, name="hidden")(features))  # [B, hidden]
            out["logits"] = nn.Dense(self.num_classes, **kw, name="head")(z)  # [B, classes]
        return out


AttentionResNet18 = functools.partial(AttentionResNet, stage_sizes=(2, 2, 2, 2),
                                      block=BasicBlock)
