"""Global second-order pooling (GSoP) channel attention (Gao et al., CVPR 2019, GSoP-Net1).

Channels-last and dimension-agnostic: an input `(B, *spatial, C)` may have one, two or three
spatial axes. Runs in float32 and bfloat16, under `jax.jit`, `jax.vmap` and `jax.grad`.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.layers._util import apply_gate, spatial_axes

Array = Any
_NORMS = ("batch", "layer", None)


def _biased_covariance(z: Array) -> Array:
    """`Σ = X Ī Xᵀ` per example, for `X` the `d x N` matrix of `d` channels over `N` positions.

    `Ī = (1/N)(I − (1/N)11ᵀ)` is `1/N` times the centring projector, so `Σ = (1/N) Xc Xcᵀ` with
    `Xc` the channel-centred features: the N x N matrix is never built. Centring before the
    product (two passes) avoids the cancellation of `E[xxᵀ] − μμᵀ`. At least float32 (float64
    stays float64), and at HIGHEST precision so TPUs do not round the float32 matmul through
    bfloat16.

    `z`: `(B, *spatial, d)` -> `(B, d, d)`, float32 for float32/bfloat16 inputs.
    """
    batch, d = z.shape[0], z.shape[-1]
    z = z.reshape(batch, -1, d).astype(jnp.promote_types(z.dtype, jnp.float32))  # [B, N, d]
    centred = z - jnp.mean(z, axis=1, keepdims=True)  # [B, N, d]
    # gram: [B, d, d]
    gram = jnp.einsum("bni,bnk->bik", centred, centred, precision=jax.lax.Precision.HIGHEST)
    return gram / z.shape[1]


class _RowWiseConv(nn.Module):
    """GSoP row-wise convolution: a grouped conv with `d` groups and a `(d, 1)` kernel on Σ.

    Row `i` of Σ (the covariances of reduced channel `i` with all `d` channels) is mapped by its
    own `expansion x d` weights: `out[b, i, q] = Σ_k W[i, q, k] Σ[b, i, k] + bias[i, q]`.
    Features are flattened group-major (`i * expansion + q`), the order of a grouped conv.

    `cov`: `(B, d, d)` -> `(B, expansion * d)`.
    """

    expansion: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cov: Array) -> Array:
        d = cov.shape[-1]
        # Variance 1/d: fan-in of each group is one row of length d; rows are independent groups.
        init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2, batch_axis=(0,))
        kernel = self.param("kernel", init, (d, self.expansion, d), self.param_dtype)  # [d, q, d]
        # bias: [d, q]
        bias = self.param("bias", nn.initializers.zeros, (d, self.expansion), self.param_dtype)
        cov, kernel, bias = nn.dtypes.promote_dtype(cov, kernel, bias, dtype=self.dtype)
        out = jnp.einsum("bik,iqk->biq", cov, kernel) + bias  # [B, d, q]
        return out.reshape(out.shape[0], d * self.expansion)  # [B, q*d]


class SecondOrderPooling(nn.Module):
    """GSoP channel attention: channel weights from the covariance between channels.

    1. Reduce: `z = ReLU(norm(x W_r + b_r))`, a 1x1 (1x1x1) convolution `C -> d`.
    2. Covariance over all `N` positions: `Σ = Z Ī Zᵀ`, `Ī = (1/N)(I − (1/N)11ᵀ)`, i.e. the
       biased (divide by `N`) covariance of the `d` reduced channels, `(B, d, d)`.
    3. Row normalisation of Σ (each row `i` is one feature of the norm).
    4. Row-wise convolution: grouped conv, `d` groups, kernel `(d, 1)`, `d -> 4d` features.
    5. Optional `hidden_activation`, then a 1x1 convolution `4d -> C` with bias, sigmoid.
    6. `y = x * weight`, the `(B, C)` weight broadcast over all positions.

    Decisions (documented here because the sources leave them open):

    - Normalisation (`norm`). `"batch"` (default) is GSoP's: BatchNorm on the reduced channels
      and BatchNorm over the rows of Σ (statistics of row `i` over the batch and the `d`
      columns, as PyTorch `BatchNorm2d(d)` on the `(B, d, d, 1)` tensor). BatchNorm couples the
      examples of a batch, which breaks a gradient-penalty (WGAN-GP) critic, so `"layer"` is
      the per-example alternative: LayerNorm over the reduced channels at each position, and
      LayerNorm along each row of Σ (its `d` columns) with a per-row scale and bias. `None`
      uses no normalisation (reduce is then just the biased 1x1 conv and a ReLU).
    - Non-linearity between the row-wise conv and the `4d -> C` conv: the official GSoP channel
      branch (`chan_att` in the authors' code) applies none, matching the paper's
      `sigmoid(W RC(Cov(Conv(X))))`; its spatial branch uses a ReLU there. Default `None`
      follows the channel branch; pass e.g. `nn.relu` or `nn.leaky_relu` to add one.
    - The official block applies a ReLU to its (pre-activation) input before the reduction;
      this layer uses its input as given.
    - Σ is accumulated in float32 (at HIGHEST matmul precision) even for bfloat16 inputs and
      `dtype=bfloat16`: a covariance over thousands of positions loses too much in bfloat16.
      The later layers compute in `dtype`.

    **Arguments** (attributes):

    - `reduced_channels`: `d`, channels of the reduced features (128 in GSoP).
    - `norm`: `"batch"`, `"layer"` or `None`, see above.
    - `hidden_activation`: callable applied to the `4d` row-wise features, or `None`.
    - `row_expansion`: row-wise conv outputs per row (4 in GSoP).
    - `dtype`: computation dtype (None = infer like Flax).
    - `param_dtype`: parameter dtype.

    **Call** `(x, train=False, return_attention=False)`:

    - `x`: `(B, *spatial, C)`, 1 to 3 spatial axes (with one position Σ is 0).
    - `train`: BatchNorm in training mode (pass `mutable=["batch_stats"]`); ignored otherwise.
    - `return_attention`: also return the channel weights.

    **Returns:** `y` of the shape of `x`; with `return_attention`, `(y, weight)` where `weight`
    has shape `(B, C)` with values in (0, 1). The covariance is also sown as
    `intermediates/covariance`, `(B, d, d)` (read it with `mutable=["intermediates"]`).
    """

    reduced_channels: int = 128
    norm: str | None = "batch"
    hidden_activation: Callable[[Array], Array] | None = None
    row_expansion: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _make_norm(self, name: str, train: bool, rows: bool) -> Callable[[Array], Array]:
        """Norm over channels (`rows=False`, input `(B, *S, d)`) or over Σ's rows (`(B, d, d)`)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.norm == "batch":
            # axis=1 on Σ: one feature per row i, statistics over the batch and columns k.
            axis = 1 if rows else -1
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                axis=axis, **kw)
        if self.norm == "layer":
            # feature_axes=1 on Σ: per-row scale and bias, statistics over the columns k only.
            features = 1 if rows else -1
            return nn.LayerNorm(epsilon=1e-5, reduction_axes=-1, feature_axes=features, **kw)
        return lambda t: t

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_attention: bool = False):
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        spatial_axes(x)  # raises unless x is (B, *spatial, C)
        channels = x.shape[-1]
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        z = nn.Dense(self.reduced_channels, name="reduce", **dense)(x)  # [B, *S, d]
        z = nn.relu(self._make_norm("reduce_norm", train, rows=False)(z))  # [B, *S, d]
        cov = _biased_covariance(z)  # [B, d, d], at least float32
        self.sow("intermediates", "covariance", cov)
        cov = self._make_norm("row_norm", train, rows=True)(cov)  # [B, d, d]
        rows = _RowWiseConv(self.row_expansion, name="row_conv", **dense)(cov)  # [B, 4d]
        if self.hidden_activation is not None:
            rows = self.hidden_activation(rows)
        weight = nn.sigmoid(nn.Dense(channels, name="expand", **dense)(rows))  # [B, C]
        gate = weight.reshape(weight.shape[0], *(1,) * (x.ndim - 2), channels)  # [B, 1.., C]
        y = apply_gate(x, gate, self.dtype)
        return (y, weight) if return_attention else y
