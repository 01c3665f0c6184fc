"""`FeatureClassifier`: the small conv classifier whose feature nodes the atlas explains.

The layout at the full size; the default program uses a smaller input with the same layers
(the flatten then has (S / 32)² · 64 units, e.g. 2 · 2 · 64 = 256 at 64 × 64):

| layer                                   | output                  |
|-----------------------------------------|-------------------------|
| input                                   | 256 × 256 × 3           |
| block 1: conv 3×3, conv 3×3, pool 2×2   | 128 × 128 × 8           |
| block 2                                 | 64 × 64 × 16            |
| block 3                                 | 32 × 32 × 32            |
| block 4                                 | 16 × 16 × 64            |
| block 5                                 | 8 × 8 × 64              |
| flatten                                 | 8 · 8 · 64 = 4096       |
| FC `fc` (ReLU)                          | 16                      |
| FC `logits`                             | 5 (softmax in the loss) |

Every conv is 3×3 with SAME padding and stride 1, followed by the activation; each block ends
with a 2×2 max-pool of stride 2. The convs are named `block{b}_conv1`, `block{b}_conv2`
(b = 1 … number of blocks), the dense layers `fc` and `logits`. Each named module returns its
PRE-activation output: the activation is applied after the module, so a node's value (its
output at a named layer, see `jaxmed.explain.node_values`) is the pre-activation one, and
swapping `activation` (guided back-propagation, deconvnet) changes every nonlinearity at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers import Conv

__all__ = ["FeatureClassifier"]

# He initialisation: the layers before a ReLU keep the activations' scale through the twelve
# layers of a network trained from scratch (LeCun's default halves the variance per ReLU).
_relu_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class FeatureClassifier(nn.Module):
    """Conv blocks (two 3×3 convs and a 2×2 max-pool each) → flatten → FC `hidden` → FC classes.

    See the module docstring for the layout and the layer names. Conv and `fc` kernels are
    He-normal, `logits` LeCun-normal, biases zero.

    **Arguments:**

    - `filters`: channels of the blocks' convs, one entry per block (8, 16, 32, 64, 64).
    - `hidden`: units of the `fc` layer (the atlas's default feature nodes).
    - `num_classes`: outputs of the `logits` layer.
    - `activation`: the nonlinearity after every conv and after `fc` (`nn.relu`); every
      nonlinearity of the network goes through it.
    - `dtype`: computation dtype (parameters are float32).

    **Call** ``(x, train=False)``: `x` is `[B, S, S, C]` (or `[B, D, H, W, C]`), each spatial
    size divisible by ``2 ** len(filters)``; `train` is accepted for the training loop's
    calling convention and changes nothing (the network has no dropout or batch statistics).

    **Returns:**

    `{'logits': [B, num_classes]}` float32.
    """

    filters: Sequence[int] = (8, 16, 32, 64, 64)
    hidden: int = 16
    num_classes: int = 5
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = jnp.float32

    def _check(self, x: jax.Array) -> None:
        if x.ndim not in (4, 5):
            raise ValueError(f"FeatureClassifier expects [B, S, S, C] (or [B, D, H, W, C]) input, "
                             f"got shape {x.shape}")
        factor = 2 ** len(self.filters)
        if any(s % factor for s in x.shape[1:-1]):
            raise ValueError(
                f"FeatureClassifier: the input's spatial size {tuple(x.shape[1:-1])} must be "
                f"divisible by 2**{len(self.filters)} = {factor} (one 2×2 max-pool per block "
                f"of filters={tuple(self.filters)}), e.g. {8 * factor} → 8")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        del train  # nothing depends on it
        self._check(x)
        n_spatial = x.ndim - 2
        x = x.astype(self.dtype)
        for block, width in enumerate(self.filters, start=1):
            for i in (1, 2):
                x = Conv(width, (3,) * n_spatial, padding="SAME", kernel_init=_relu_init,
                         dtype=self.dtype, name=f"block{block}_conv{i}")(x)  # [B, *S_b, width]
                x = self.activation(x)
            x = nn.max_pool(x, (2,) * n_spatial, strides=(2,) * n_spatial)  # [B, *S_b / 2, width]
        x = x.reshape(x.shape[0], -1)  # row-major over (h, w, c): [B, h·w·c]
        x = self.activation(nn.Dense(self.hidden, kernel_init=_relu_init, dtype=self.dtype,
                                     name="fc")(x))  # [B, hidden]
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)  # [B, classes]
        return {"logits": logits.astype(jnp.float32)}
