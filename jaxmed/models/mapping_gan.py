"""Mapping-GAN networks: the U-Net mapping generator and the tensor-train critic.

The generator maps a positive volume `x` to its key feature map `M(x)` (same shape); the mapped
volume `y = x + M(x)` (`mapped`) should look like a negative one to the critic. The critic is a
Wasserstein critic: an unbounded score per volume, higher for "negative-looking" volumes.

Everything is channels-last and dimension-agnostic: `(B, H, W, C)` or `(B, D, H, W, C)`; a 4-D
NIfTI (X, Y, Z, T) enters as `(B, X, Y, Z, T)` with the T frames as channels. The design and
its decisions: `docs/mapping_gan.md`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers import BlockConvTranspose, Conv, SecondOrderPooling, TTConv, TTDense
from jaxmed.models._util import spatial_dims

Array = jax.Array
_NORMS = ("batch", "layer", None)

__all__ = [
    "Critic",
    "TinyCritic",
    "TinyUNet",
    "UNet",
    "critic_probability",
    "mapped",
    "tt_modes",
]


# ----------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------


def mapped(x: Array, key_feature_map: Array) -> Array:
    """The mapped volume `y = x + M(x)`: a positive volume turned into a negative-looking one."""
    return x + key_feature_map


def critic_probability(score: Array) -> Array:
    """`sigmoid(score)`, for reporting only.

    The original design ends its discriminator with a sigmoid; a Wasserstein critic must output the
    unbounded score (a sigmoid would saturate and kill the gradients the generator learns from),
    so the sigmoid is applied here, outside the loss, when a probability-like number is wanted
    for display. It is not a calibrated probability.
    """
    return jax.nn.sigmoid(score)


def _check_norm(norm: str | None) -> None:
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")


def _normalize(x: Array, norm: str | None, train: bool, name: str, dtype: Any,
               param_dtype: Any) -> Array:
    """Applies the chosen normalisation to `x: [B, *S, C]` (call inside a compact method).

    'batch': BatchNorm over batch and positions (couples the samples of a batch).
    'layer': LayerNorm over all positions and channels of each sample, with a per-channel scale
    and bias (GroupNorm with one group, the layer norm of the WGAN-GP paper): every sample is
    normalised on its own, so a sample's output never depends on the rest of the batch.
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype, name=name)
    if norm == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, **kw)(x)
    if norm == "layer":
        axes = tuple(range(1, x.ndim))
        return nn.LayerNorm(epsilon=1e-5, reduction_axes=axes, feature_axes=-1, **kw)(x)
    return x


@functools.lru_cache(maxsize=None)
def tt_modes(n: int, order: int) -> tuple[int, ...]:
    """Factorises `n` into `order` balanced modes, ascending: `tt_modes(40, 2) == (5, 8)`.

    Among all ways to write `n` as a product of `order` integers, the one with the smallest sum
    (ties: the smallest largest mode). For a fixed product the sum is smallest when the modes are
    equal, and TT parameter counts grow with the modes, so this is the cheapest factorisation.
    A prime `n` can only give `(1, ..., 1, n)`.

    **Arguments:**

    - `n`: positive integer (a channel or feature count).
    - `order`: number of modes `d >= 1`.

    **Returns:** a tuple of `order` ints, non-decreasing, with product `n`.
    """
    if n < 1 or order < 1:
        raise ValueError(f"tt_modes needs n >= 1 and order >= 1, got n={n}, order={order}")

    def search(rest: int, k: int, smallest: int) -> tuple[int, ...] | None:
        if k == 1:
            return (rest,) if rest >= smallest else None
        best = None
        for f in range(smallest, math.isqrt(rest) + 1):
            if rest % f == 0 and f**k <= rest:
                tail = search(rest // f, k - 1, f)
                if tail is not None:
                    cand = (f, *tail)
                    if best is None or (sum(cand), cand[-1]) < (sum(best), best[-1]):
                        best = cand
        return best

    return search(n, order, 1)


# ----------------------------------------------------------------------------
# Mapping generator
# ----------------------------------------------------------------------------


class _ConvBlock(nn.Module):
    """Two (3^n conv -> norm -> ReLU): `[B, *S, C_in] -> [B, *S, features]`."""

    features: int
    norm: str | None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        kernel = (3,) * (x.ndim - 2)
        for i in range(2):
            # Bias is redundant ahead of a norm with its own per-channel bias.
            x = Conv(self.features, kernel, padding="SAME", use_bias=self.norm is None,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i}")(x)
            x = nn.relu(_normalize(x, self.norm, train, f"norm{i}", self.dtype, self.param_dtype))
        return x


def _max_pool_2x(x: Array) -> Array:
    """2^n max pooling, stride 2, of `[B, *S, C]` with even `S`, as a reshape and a max: the
    same values as `nn.max_pool`, and a gradient XLA:CPU computes 4x faster than the
    select-and-scatter of `reduce_window`'s (ties, measure zero here, share the gradient)."""
    b, *spatial, c = x.shape
    split = [n for s in spatial for n in (s // 2, 2)]
    return jnp.max(x.reshape(b, *split, c), axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


class UNet(nn.Module):
    """Mapping generator after VA-GAN: a U-Net returning the key feature map `M(x)`.

    Encoder level `l` (`l = 0 .. depth-1`, `depth = len(features)`): a 2x max-pool (not at level
    0), then two 3^n convolutions with `features[l]` filters, each followed by the norm and a
    ReLU. Decoder, from level `depth-2` up to 0: a stride-2 transposed convolution (kernel 2^n,
    so each output voxel comes from exactly one input voxel: no checkerboard overlap) to
    `features[l]` + norm + ReLU, concatenation with the encoder output of level `l` (skip first),
    and again two conv/norm/ReLU. A final linear 3^n convolution (bias, no norm, no activation)
    returns as many channels as the input has: `M(x)`, unbounded, so `y = x + M(x)` can move a
    voxel anywhere. Use `mapped(x, m)` for `y`.

    Every spatial size must be divisible by `total_downsampling = 2^(depth-1)` (the data code
    pads volumes to a multiple of it).

    **Arguments** (attributes):

    - `features`: filters per level, default `(16, 32, 64, 128)` (VA-GAN: 4 levels, 3 pools).
    - `norm`: `'batch'` (default, as VA-GAN), `'layer'` (per-sample over positions and channels)
      or `None`.
    - `dtype`, `param_dtype`: computation and parameter dtypes.

    **Call** `(x, train=False)`:

    - `x`: `(B, H, W, C)` or `(B, D, H, W, C)`.
    - `train`: BatchNorm uses batch statistics and updates `batch_stats` (pass
      `mutable=["batch_stats"]`); ignored for other norms.

    **Returns:** `M(x)`, the key feature map, with exactly the shape of `x`.
    """

    features: Sequence[int] = (16, 32, 64, 128)
    norm: str | None = "batch"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def total_downsampling(self) -> int:
        """`2^(depth-1)`: every spatial size of the input must be a multiple of this."""
        return 2 ** (len(self.features) - 1)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_norm(self.norm)
        nsp = spatial_dims(x, "UNet")
        factor = self.total_downsampling
        if any(s % factor for s in x.shape[1:-1]):
            raise ValueError(
                f"UNet with {len(self.features)} levels needs spatial sizes divisible by {factor}, "
                f"got input shape {x.shape}; pad the volume to a multiple of {factor}"
            )
        kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
        window = (2,) * nsp
        skips, h = [], x
        for level, f in enumerate(self.features):
            if level:
                h = _max_pool_2x(h)  # [B, *S/2^l, C]
            h = _ConvBlock(f, name=f"down{level}", **kw)(h, train)  # [B, *S/2^l, f_l]
            skips.append(h)
        for level in reversed(range(len(self.features) - 1)):
            f = self.features[level]
            h = BlockConvTranspose(f, window, use_bias=self.norm is None, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=f"up{level}_upsample")(h)
            h = nn.relu(_normalize(h, self.norm, train, f"up{level}_norm", self.dtype,
                                   self.param_dtype))
            h = jnp.concatenate([skips[level], h], axis=-1)  # [B, *S/2^l, 2 f_l]
            h = _ConvBlock(f, name=f"up{level}", **kw)(h, train)  # [B, *S/2^l, f_l]
        return Conv(x.shape[-1], (3,) * nsp, padding="SAME", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="key_feature_map")(h)  # [B, *S, C]


TinyUNet = functools.partial(UNet, features=(4, 8))
"""A two-level UNet for tests and smoke runs (spatial sizes divisible by 2)."""


# ----------------------------------------------------------------------------
# Critic
# ----------------------------------------------------------------------------


class Critic(nn.Module):
    """Wasserstein critic: conv stem, dense blocks of TT convs, GSoP, TT-FC head (the original
    design's layers; `docs/mapping_gan.md`).

    Layers, for an input `(B, *S, C)` (widths `w`, growth `k`, `L_b` layers in block `b`):

    1. Stem: an ordinary 3^n convolution `C -> w[0]`, stride `stem_strides` (always a plain `Conv`:
       a 1-channel input has nothing to factorise).
    2. For each block `b`: if `b > 0`, a transition `norm -> LeakyReLU -> conv w -> w[b]` that
       halves the resolution ('pool': 1^n conv then 2^n average pooling, as DenseNet; 'conv': a
       3^n conv with stride 2). Then a dense block of `L_b` layers, each
       `norm -> LeakyReLU -> 3^n conv (c -> k)` whose output is concatenated to its input, so
       layer `i` sees the concatenation of the block input and all previous layers' outputs
       (`w[b] + i k` channels) and the block ends with `w[b] + L_b k` channels.
    3. `norm -> LeakyReLU -> SecondOrderPooling` (GSoP channel attention, `reduced_channels`,
       same norm as the critic).
    4. Head: flatten `(B, prod(S') C')`, a TT-FC to `head_features`, LeakyReLU, a TT-FC to 1
       (`head_features=None`: a single TT-FC to 1). Flattening keeps where a feature was seen,
       and this large FC is where tensor-train factorisation saves the most.

    `kind='tt'` makes every block/transition conv a `TTConv` and both head layers `TTDense`
    (channel counts factorised by `tt_modes(n, tt_order)`, head features by
    `tt_modes(n, head_tt_order)`, all ranks `tt_rank`, created factorised); `kind='dense'` puts
    `Conv`/`nn.Dense` with exactly the same input/output shapes in their place, for
    comparison. With `kind='tt'` every conv channel count must factorise without a mode of 1
    (choose widths and growth rate as multiples of 4, say), else a ValueError names it.

    Decisions:

    - Normalisation defaults to `'layer'` (per-sample LayerNorm over positions and channels).
      The original design uses BatchNorm, but the gradient penalty needs `d D(x_b) / d x_b` per
      sample; with BatchNorm each score depends on the whole batch, so the penalised gradient is
      not the critic's. `'batch'` stays available (e.g. with weight clipping), as does `None`.
    - LeakyReLU slope 0.2 (`negative_slope`), the usual GAN-critic choice.
    - No sigmoid: the score is unbounded (Wasserstein critic); `critic_probability` gives the
      original design's sigmoid for reporting only.
    - The score is returned in at least float32, so losses on bfloat16 networks accumulate in
      float32.

    Defaults are sized for a `32^3`, one-channel volume on CPU: stem stride 2 -> `16^3`, blocks
    at `16^3`, `8^3`, `4^3` with 16->64, 32->80, 48->96 channels; about 302 k parameters for
    `kind='dense'` and 34 k for `kind='tt'` (of which the unfactorised GSoP, stem and norms are
    11 k). `TinyCritic` is a test-sized variant.

    **Arguments** (attributes): `kind` ('tt' | 'dense'); `widths` (input width of each block,
    its length is the number of blocks); `growth_rate`; `layers_per_block` (int or one per
    block); `stem_strides`; `downsample` ('pool' | 'conv'); `norm` ('layer' | 'batch' |
    None); `reduced_channels` (GSoP `d`); `head_features` (int or None); `tt_rank`; `tt_order`
    (modes per conv channel count); `head_tt_order` (modes per head feature count);
    `tt_forward` (TTConv `forward`: 'auto' | 'cores' | 'kernel'); `negative_slope`; `dtype`;
    `param_dtype`.

    **Call** `(x, train=False)`:

    - `x`: `(B, H, W, C)` or `(B, D, H, W, C)`.
    - `train`: BatchNorm training mode (pass `mutable=["batch_stats"]`); ignored otherwise.

    **Returns:** the critic score, `(B,)`, unbounded.
    """

    kind: str = "tt"
    widths: Sequence[int] = (16, 32, 48)
    growth_rate: int = 16
    layers_per_block: int | Sequence[int] = 3
    stem_strides: int = 2
    downsample: str = "pool"
    norm: str | None = "layer"
    reduced_channels: int = 16
    head_features: int | None = 16
    tt_rank: int = 8
    tt_order: int = 2
    head_tt_order: int = 3
    tt_forward: str = "auto"
    negative_slope: float = 0.2
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _validate(self) -> tuple[int, ...]:
        _check_norm(self.norm)
        if self.kind not in ("tt", "dense"):
            raise ValueError(f"kind must be 'tt' or 'dense', got {self.kind!r}")
        if self.downsample not in ("pool", "conv"):
            raise ValueError(f"downsample must be 'pool' or 'conv', got {self.downsample!r}")
        layers = self.layers_per_block
        layers = (layers,) * len(self.widths) if isinstance(layers, int) else tuple(layers)
        if not self.widths or len(layers) != len(self.widths):
            raise ValueError(f"need one layers_per_block entry per width, got {layers} for "
                             f"{self.widths}")
        if self.kind == "tt":
            counts = {self.growth_rate, *self.widths}
            counts |= {w + i * self.growth_rate
                       for w, n in zip(self.widths, layers) for i in range(1, n + 1)}
            bad = sorted(c for c in counts if min(tt_modes(c, self.tt_order)) == 1 and c > 1)
            if bad:
                raise ValueError(
                    f"channel counts {bad} have no {self.tt_order}-mode factorisation without a "
                    f"mode of 1; choose widths and growth_rate (now {tuple(self.widths)}, "
                    f"{self.growth_rate}) as multiples of 4, or kind='dense'"
                )
        return layers

    def _act(self, x: Array) -> Array:
        return nn.leaky_relu(x, self.negative_slope)

    def _conv(self, x: Array, features: int, size: int, strides: int, name: str) -> Array:
        nsp, kw = x.ndim - 2, dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.kind == "dense":
            return Conv(features, (size,) * nsp, strides=strides, padding="SAME", **kw)(x)
        modes_in = tt_modes(x.shape[-1], self.tt_order)
        modes_out = tt_modes(features, self.tt_order)
        # A 1^n kernel has a single spatial position, so spatial rank r_0 > 1 only adds parameters.
        ranks = self.tt_rank if size > 1 else (1,) + (self.tt_rank,) * (self.tt_order - 1) + (1,)
        return TTConv(modes_in, modes_out, ranks, kernel_size=(size,) * nsp, strides=strides,
                      padding="SAME", forward=self.tt_forward, **kw)(x)

    def _dense(self, x: Array, features: int, name: str) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.kind == "dense":
            return nn.Dense(features, **kw)(x)
        d = self.head_tt_order
        return TTDense(tt_modes(x.shape[-1], d), tt_modes(features, d), self.tt_rank, **kw)(x)

    def _pre_activation(self, x: Array, train: bool, name: str) -> Array:
        return self._act(_normalize(x, self.norm, train, name, self.dtype, self.param_dtype))

    def _dense_block(self, x: Array, layers: int, block: int, train: bool) -> Array:
        """`[B, *S, w] -> [B, *S, w + layers * growth_rate]`, DenseNet connectivity."""
        for i in range(layers):
            name = f"block{block}_layer{i}"
            h = self._pre_activation(x, train, f"{name}_norm")
            h = self._conv(h, self.growth_rate, 3, 1, f"{name}_conv")  # [B, *S, k]
            x = jnp.concatenate([x, h], axis=-1)  # [B, *S, c + k]
        return x

    def _transition(self, x: Array, features: int, block: int, train: bool) -> Array:
        """`[B, *S, c] -> [B, *S/2, features]`."""
        name = f"transition{block}"
        h = self._pre_activation(x, train, f"{name}_norm")
        if self.downsample == "conv":
            return self._conv(h, features, 3, 2, f"{name}_conv")
        h = self._conv(h, features, 1, 1, f"{name}_conv")  # [B, *S, features]
        window = (2,) * (x.ndim - 2)
        return nn.avg_pool(h, window, strides=window)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        nsp = spatial_dims(x, "Critic")
        layers = self._validate()
        h = Conv(self.widths[0], (3,) * nsp, strides=self.stem_strides, padding="SAME",
                 dtype=self.dtype, param_dtype=self.param_dtype, name="stem")(x)  # [B, *S/s, w0]
        for b, (width, n_layers) in enumerate(zip(self.widths, layers)):
            if b:
                h = self._transition(h, width, b, train)  # [B, *S', w_b]
            h = self._dense_block(h, n_layers, b, train)  # [B, *S', w_b + L_b k]
        h = self._pre_activation(h, train, "final_norm")
        h = SecondOrderPooling(self.reduced_channels, norm=self.norm, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="second_order")(h, train=train)
        h = h.reshape(h.shape[0], -1)  # [B, prod(S') C']
        if self.head_features is not None:
            h = self._act(self._dense(h, self.head_features, "head_hidden"))  # [B, head_features]
        score = self._dense(h, 1, "head_score")[:, 0]  # [B]
        return score.astype(jnp.promote_types(score.dtype, jnp.float32))


TinyCritic = functools.partial(
    Critic, widths=(4, 8), growth_rate=4, layers_per_block=2, reduced_channels=4, head_features=4,
    tt_rank=2,
)
"""A two-block critic of a few thousand parameters for tests and smoke runs (inputs of 8^n and
up)."""

