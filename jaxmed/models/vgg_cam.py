"""VGG16-CAM classifier with dual threshold-suppression modules (`docs/wsol.md`).

The backbone is the CAM variant of VGG16 used by the WSOL evaluation protocol
(clovaai/wsolevaluation): the thirteen 3×3 conv layers of VGG16 with pool5 removed, then
conv6 (3×3 → 1024, ReLU), global average pooling and one linear classifier. At 224×224 the
last conv features are 14×14×1024; the class activation map of class c is
``Σ_k W[k, c] · features[..., k]`` with ``W = cam_weights(variables)`` (see
`jaxmed.explain.cam`).

`ThresholdSuppression` modules (`jaxmed.layers`) can be inserted after any named conv layer
(after its ReLU, before the following pool); the original design inserts one or two, after
conv4_3 and conv5_3.

Every conv layer is a `ConvReLU` block named `conv1_1` … `conv5_3`, `conv6`, whose output is
the rectified activation, so Grad-CAM at a layer name sees what the next layer sees. A module
inserted after `conv4_3` is named `conv4_3_suppression`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers import Conv, ThresholdSuppression

__all__ = ["CONV_NAMES", "ConvReLU", "VGGCAM", "cam_weights"]

# VGG16: conv layers per stage; a 2×2 max-pool separates consecutive stages (pool5 removed).
_CONVS_PER_STAGE = (2, 2, 3, 3, 3)

CONV_NAMES = tuple(
    f"conv{stage}_{i}" for stage, n in enumerate(_CONVS_PER_STAGE, start=1) for i in range(1, n + 1)
) + ("conv6",)

# wsolevaluation's `initialize_weights(init_mode='he')`: convs kaiming-normal (fan_out, ReLU
# gain), biases 0, the classifier N(0, 0.01). They then load ImageNet weights into conv1_1 …
# conv5_3; here that is `jaxmed.weights` (`--pretrained`), and without it training starts from
# the He initialisation.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_classifier_init = nn.initializers.normal(0.01)


class ConvReLU(nn.Module):
    """3×3 (×3) convolution, SAME padding, stride 1 → optional BatchNorm → ReLU.

    **Arguments:**

    - `features`: output channels.
    - `batch_norm`: add BatchNorm between the conv and the ReLU (the conv then has no bias).
    - `dtype`, `param_dtype`: computation and parameter dtypes.

    **Call** ``(x, train=False)``: `x` is `(B, *spatial, C_in)` with 2 or 3 spatial axes;
    `train` selects batch statistics for BatchNorm.

    **Returns:**

    `(B, *spatial, features)`, non-negative.
    """

    features: int
    batch_norm: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n_spatial = x.ndim - 2
        x = Conv(
            self.features, (3,) * n_spatial, padding="SAME", use_bias=not self.batch_norm,
            kernel_init=_conv_init, dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
        )(x)  # [B, *S, features]
        if self.batch_norm:
            x = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5,
                dtype=self.dtype, param_dtype=self.param_dtype, name="bn",
            )(x)
        return nn.relu(x)


class VGGCAM(nn.Module):
    """VGG16-CAM classifier with optional threshold-suppression modules (2-D or 3-D).

    Layout: conv1_1, conv1_2, pool, conv2_1, conv2_2, pool, conv3_1…3, pool, conv4_1…3, pool,
    conv5_1…3, conv6, global average pooling, Dense (`classifier`). Each conv is a `ConvReLU`
    block (3×3 SAME, ReLU); pools are 2×2, stride 2 (spatial sizes are floored, as in PyTorch).
    A `ThresholdSuppression` named `<conv>_suppression` follows each conv listed in `modules`.

    Initialisation (as wsolevaluation's "he" mode; its ImageNet weights for conv1_1 … conv5_3
    load with `jaxmed.weights.load_torchvision`): conv kernels He-normal over fan-out,
    classifier kernel N(0, 0.01), biases 0.
    VGG trained from scratch converges slowly and can stall without normalisation;
    `batch_norm=True` adds BatchNorm to every conv block (then call with `train=True` in
    training and `mutable=['batch_stats']`).

    **Arguments:**

    - `num_classes`: number of classes.
    - `widths`: channels of the five conv stages (VGG16: 64, 128, 256, 512, 512).
    - `conv6_width`: channels of conv6, i.e. of the CAM features (1024).
    - `modules`: names of conv layers (`CONV_NAMES`) each followed by a threshold-suppression
      module, e.g. `('conv4_3', 'conv5_3')`. Unknown names raise `ValueError`.
    - `cr`, `alpha`, `t`: threshold-suppression parameters (see `jaxmed.layers`
      `ThresholdSuppression`), shared by all inserted modules.
    - `batch_norm`: BatchNorm in every conv block.
    - `dtype`, `param_dtype`: computation and parameter dtypes, passed to every layer.

    **Call** ``(x, *, train=False)``: `x` is `(B, H, W, C)` or `(B, D, H, W, C)`.

    **Returns:**

    A dict with `'logits'` `(B, num_classes)` and `'features'` `(B, h, w, conv6_width)` (or
    `(B, d, h, w, conv6_width)`) with `h = H // 16`: the rectified conv6 output (after its
    suppression module, if any), i.e. exactly what is average-pooled into the classifier, so
    ``logits = mean over positions of features @ W + b`` and the CAM is consistent with them.
    """

    num_classes: int
    widths: Sequence[int] = (64, 128, 256, 512, 512)
    conv6_width: int = 1024
    modules: Sequence[str] = ()
    cr: float = 0.8
    alpha: float = 0.8
    t: float = 0.4
    batch_norm: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _check(self) -> None:
        if len(self.widths) != len(_CONVS_PER_STAGE):
            raise ValueError(f"widths needs {len(_CONVS_PER_STAGE)} stage widths, got "
                             f"{tuple(self.widths)}")
        unknown = [m for m in self.modules if m not in CONV_NAMES]
        if unknown:
            raise ValueError(f"unknown module position(s) {unknown}; valid names: "
                             f"{', '.join(CONV_NAMES)}")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        self._check()
        n_spatial = x.ndim - 2
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def conv(x, name, width):
            x = ConvReLU(width, batch_norm=self.batch_norm, name=name, **kw)(x, train=train)
            if name in self.modules:
                x = ThresholdSuppression(self.cr, self.alpha, self.t, name=f"{name}_suppression",
                                         **kw)(x)
            return x

        for stage, (n_convs, width) in enumerate(zip(_CONVS_PER_STAGE, self.widths), start=1):
            if stage > 1:
                x = nn.max_pool(x, (2,) * n_spatial, strides=(2,) * n_spatial)
            for i in range(1, n_convs + 1):
                x = conv(x, f"conv{stage}_{i}", width)  # [B, *S / 2^(stage-1), width]
        features = conv(x, "conv6", self.conv6_width)  # A: [B, *S / 16, K]
        pooled = jnp.mean(features, axis=tuple(range(1, features.ndim - 1)))  # [B, K]
        logits = nn.Dense(
            self.num_classes, kernel_init=_classifier_init, name="classifier", **kw
        )(pooled)  # [B, num_classes]
        return {"logits": logits, "features": features}


def cam_weights(variables: Any) -> jax.Array:
    """The classifier kernel `W` `(conv6_width, num_classes)`: CAM_c = Σ_k W[k, c] A_k.

    It is `variables['params']['classifier']['kernel']`.
    """
    return variables["params"]["classifier"]["kernel"]

