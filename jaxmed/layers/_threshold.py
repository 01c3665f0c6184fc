"""Dual threshold suppression for weakly-supervised localisation (2-D and 3-D).

Two branches rewrite a non-negative (post-ReLU) feature map F against each sample's and
channel's maximum m_c (a constant: gradients do not flow into the max):

- ``suppress_discriminative``: values up to T = cr·m_c are enhanced non-linearly,
  D = T·(F/T)^α, and values above T are erased, pushing the network to look beyond the
  most discriminative part of the object;
- ``suppress_irrelevant``: values below t·m_c are erased (S = F otherwise), removing weak
  background responses.

``ThresholdSuppression`` fuses both branches with learned channel weights and projects back to
C channels, so it drops into a CNN after any ReLU-activated conv layer.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers._conv import Conv

# d/dr r^α = α r^(α-1) is infinite at r = 0 for α < 1; the slope is evaluated at
# max(r, _SLOPE_EPS) instead, i.e. capped at α·_SLOPE_EPS^(α-1) (12.6 for α = 0.8).
_SLOPE_EPS = 1e-6


def _check_fraction(name: str, value: Any, low_open: bool) -> None:
    """Reject out-of-range Python hyper-parameters early (traced values are not checked)."""
    if isinstance(value, (int, float)):
        ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
        if not ok:
            raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def _channel_max(f: jax.Array) -> jax.Array:
    """m_c: per-sample, per-channel max over positions, held constant. [B, *S, C] -> [B, 1.., C]."""
    spatial = tuple(range(1, f.ndim - 1))
    return jax.lax.stop_gradient(jnp.max(f, axis=spatial, keepdims=True))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _enhance(r: jax.Array, alpha: float) -> jax.Array:
    """max(r, 0)^α with exact values and a bounded slope near 0 (see ``_SLOPE_EPS``)."""
    positive = r > 0
    return jnp.where(positive, jnp.where(positive, r, 1) ** alpha, 0)


@_enhance.defjvp
def _enhance_jvp(alpha, primals, tangents):
    (r,), (dr,) = primals, tangents
    slope = alpha * jnp.maximum(r, _SLOPE_EPS) ** (alpha - 1)
    return _enhance(r, alpha), jnp.where(r >= 0, slope, 0) * dr


def suppress_discriminative(f: jax.Array, cr: float = 0.8, alpha: float = 0.8) -> jax.Array:
    """Branch 1: erase the most discriminative responses, enhance the rest.

    With m_c the channel's maximum over positions (stop-gradient) and T = cr·m_c::

        D = T·(F/T)^α   where F <= T
        D = 0           where F > T

    For 0 < α <= 1, D >= F below T and D = F exactly at F = T; α = 1 is the identity up to
    T. (The curve and the zero could both claim the point F = T; keeping it on the curve makes
    D = F exactly at the threshold, and the two choices differ only on that measure-zero set.
    See `docs/layers.md`.)

    Numerical choices: the derivative α·(F/T)^(α-1) is infinite at F = 0 for α < 1, so it
    is evaluated at max(F/T, 1e-6) (forward values stay exact; the gradient at F = 0 is
    α·1e-6^(α-1), finite). Channels with m_c <= 0 (e.g. all zero) give D = 0 with zero
    gradient, as the formula does for m_c = 0. Inputs are meant to be non-negative;
    negative values give D = 0 with zero gradient.

    **Arguments:**

    - `f`: `(B, *spatial, C)` features, 1-3 spatial axes.
    - `cr`: threshold as a fraction of the channel max, in (0, 1].
    - `alpha`: curvature α, in (0, 1].

    **Returns:**

    `D`, same shape and dtype as `f`.
    """
    _check_fraction("cr", cr, low_open=True)
    _check_fraction("alpha", alpha, low_open=True)
    m = _channel_max(f)  # m: [B, 1.., C]
    active = m > 0
    thr = jnp.where(active, cr * m, 1).astype(f.dtype)  # T, 1 where unused to avoid 0/0
    below = active & (f <= thr)  # [B, *S, C]
    return jnp.where(below, thr * _enhance(f / thr, alpha), 0).astype(f.dtype)


def suppress_irrelevant(f: jax.Array, t: float = 0.4) -> jax.Array:
    """Branch 2: erase weak responses.

    With m_c the channel's maximum over positions (stop-gradient)::

        S = F   where F >= t·m_c
        S = 0   otherwise

    The gradient is 1 where F is kept and 0 elsewhere. For t < 1 every negative input is
    erased (whatever the sign of m_c); an all-zero channel gives S = 0.

    **Arguments:**

    - `f`: `(B, *spatial, C)` features, 1-3 spatial axes.
    - `t`: threshold as a fraction of the channel max, in [0, 1].

    **Returns:**

    `S`, same shape and dtype as `f`.
    """
    _check_fraction("t", t, low_open=False)
    m = _channel_max(f)  # m: [B, 1.., C]
    return jnp.where(f >= t * m, f, 0).astype(f.dtype)


class ThresholdSuppression(nn.Module):
    """Dual threshold suppression with learned channel selection (2-D or 3-D).

    ``M = concat([suppress_discriminative(F), suppress_irrelevant(F)])`` (2C channels);
    ``W1 = max over positions of M``; ``W2 = relu(Dense_C(W1))``; ``W3 = Dense_2C(W2)``;
    ``W* = sigmoid(W3)``; ``F* = Conv1x1_C(W* ⊙ M)``. Dense layers and the 1×1 conv have
    biases. Active in training and inference alike (no train flag).

    **Arguments:**

    - `cr`, `alpha`: branch-1 threshold fraction and curvature (see
      ``suppress_discriminative``).
    - `t`: branch-2 threshold fraction (see ``suppress_irrelevant``).
    - `dtype`: computation dtype (None: inferred from inputs and parameters, as Flax does).
    - `param_dtype`: parameter dtype.

    **Call** ``(f)``: `f` is `(B, *spatial, C)`, non-negative (after a ReLU).

    **Returns:**

    `F*`, `(B, *spatial, C)`.
    """

    cr: float = 0.8
    alpha: float = 0.8
    t: float = 0.4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, f: jax.Array) -> jax.Array:
        if self.dtype is not None:
            f = f.astype(self.dtype)
        channels, n_spatial = f.shape[-1], f.ndim - 2
        fused = jnp.concatenate(
            [suppress_discriminative(f, self.cr, self.alpha), suppress_irrelevant(f, self.t)],
            axis=-1,
        )  # M: [B, *S, 2C]
        w1 = jnp.max(fused, axis=tuple(range(1, f.ndim - 1)))  # [B, 2C]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        w2 = nn.relu(dense(channels, name="squeeze")(w1))  # [B, C]
        w3 = dense(2 * channels, name="excite")(w2)  # [B, 2C]
        weights = nn.sigmoid(w3).reshape(w3.shape[0], *(1,) * n_spatial, -1)  # W*: [B, 1.., 2C]
        return Conv(
            channels, (1,) * n_spatial, dtype=self.dtype, param_dtype=self.param_dtype,
            name="project",
        )(weights * fused)  # F*: [B, *S, C]
