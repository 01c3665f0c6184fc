"""The attribution baseline of the mapping-GAN benchmark: a small CNN classifier and Grad-CAM.

VA-GAN (Baumgartner et al., CVPR 2018) compared its maps with attributions of a classifier
trained to tell the two groups apart. Here: a plain CNN (3^n conv -> ReLU per level, a 2^n
max-pool between levels, global average pooling, one logit for "positive"), trained with the
binary cross-entropy, and Grad-CAM (Selvaraju et al., ICCV 2017) at its last conv layer:

    w_c = mean over positions of d logit / d A_c,   cam = ReLU(sum_c w_c A_c),

upsampled (linear) to the input size and min-max normalised to [0, 1] per image. 2-D and 3-D
inputs, channels-last `(B, *S, C)`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class _Body(nn.Module):
    """Conv levels: `[B, *S, C] -> A: [B, *S / 2^(L-1), features[-1]]` (rectified)."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nsp = x.ndim - 2
        for level, f in enumerate(self.features):
            if level:
                x = nn.max_pool(x, (2,) * nsp, strides=(2,) * nsp)
            x = nn.relu(nn.Conv(f, (3,) * nsp, padding="SAME", name=f"conv{level}")(x))
        return x


class _Head(nn.Module):
    """Global average pooling and a linear layer: `A -> logit [B]`."""

    @nn.compact
    def __call__(self, a: jax.Array) -> jax.Array:
        pooled = jnp.mean(a, axis=tuple(range(1, a.ndim - 1)))  # [B, K]
        return nn.Dense(1, name="logit")(pooled)[:, 0]


class SmallCNN(nn.Module):
    """Binary classifier with a separately callable last conv layer (for Grad-CAM).

    **Call** `(x)`: `x` `(B, *S, C)` -> the positive-class logit `(B,)`.
    `features(x)` -> the last conv layer's activations `A`; `logit(A)` -> the logit.
    """

    widths: Sequence[int] = (8, 16, 32)

    def setup(self):
        self.body = _Body(tuple(self.widths))
        self.head = _Head()

    def __call__(self, x):
        return self.head(self.body(x))

    def features(self, x):
        return self.body(x)

    def logit(self, a):
        return self.head(a)


def train_classifier(images: np.ndarray, labels: np.ndarray, *, widths: Sequence[int],
                     steps: int, batch_size: int, learning_rate: float,
                     seed: int) -> tuple[SmallCNN, Any, float]:
    """Adam on the binary cross-entropy, minibatches drawn without replacement per step.

    **Returns:** `(model, params, wall seconds)`.
    """
    model = SmallCNN(tuple(widths))
    params = model.init(jax.random.key(seed), jnp.asarray(images[:1]))
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return jnp.mean(optax.sigmoid_binary_cross_entropy(model.apply(p, x), y))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(len(images), min(batch_size, len(images)), replace=False)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(images[idx]),
                                       jnp.asarray(labels[idx], jnp.float32))
    jax.block_until_ready(params)
    return model, params, time.perf_counter() - start


def predict(model: SmallCNN, params, images: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Positive-class logits `(N,)`."""
    fn = jax.jit(model.apply)
    return np.concatenate([np.asarray(fn(params, jnp.asarray(images[s:s + chunk])))
                           for s in range(0, len(images), chunk)])


def grad_cam(model: SmallCNN, params, x: jax.Array) -> jax.Array:
    """Grad-CAM of the positive class at the last conv layer.

    **Arguments:** `x`: `(B, *S, C)`.

    **Returns:** `(B, *S)` maps in [0, 1] (min-max per image; an all-zero CAM stays 0).
    """
    a = model.apply(params, x, method=SmallCNN.features)  # A: [B, *S', K]
    # Samples do not interact, so the gradient of the summed logits is each sample's own.
    grads = jax.grad(lambda a: jnp.sum(model.apply(params, a, method=SmallCNN.logit)))(a)
    spatial = tuple(range(1, a.ndim - 1))
    weights = jnp.mean(grads, axis=spatial, keepdims=True)  # w: [B, 1.., K]
    cam = nn.relu(jnp.sum(weights * a, axis=-1))  # [B, *S']
    cam = jax.image.resize(cam, (cam.shape[0], *x.shape[1:-1]), method="linear")  # [B, *S]
    low = jnp.min(cam, axis=spatial, keepdims=True)
    span = jnp.max(cam, axis=spatial, keepdims=True) - low
    return jnp.where(span > 0, (cam - low) / jnp.where(span > 0, span, 1.0), 0.0)


def grad_cam_batches(model: SmallCNN, params, images: np.ndarray, chunk: int = 16) -> np.ndarray:
    """`grad_cam` over `images` `(N, *S, C)` in jitted chunks -> `(N, *S)`."""
    fn = jax.jit(lambda p, x: grad_cam(model, p, x))
    return np.concatenate([np.asarray(fn(params, jnp.asarray(images[s:s + chunk])))
                           for s in range(0, len(images), chunk)])
