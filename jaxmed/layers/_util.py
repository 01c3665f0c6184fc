"""Helpers shared by the layer modules: per-axis arguments, spatial axes, biases, gating."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import numpy as np

Array = Any


def per_axis(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """`value` for each of `n` axes: an int repeated `n` times, or a sequence as ints."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * n
    return tuple(int(v) for v in value)


def spatial_axes(x: Array) -> tuple[int, ...]:
    """Axes of the spatial positions of a channels-last batch `(B, *spatial, C)`."""
    if x.ndim < 3:
        raise ValueError("expected input of shape (B, *spatial, C) with at least one spatial "
                         f"axis, got {x.shape}")
    return tuple(range(1, x.ndim - 1))


def bias_param(module: nn.Module, features: int) -> Array | None:
    """`module`'s `bias` `(features,)` from its `bias_init` and `param_dtype`; None without
    `use_bias`. Call it inside the module's compact method."""
    if not module.use_bias:
        return None
    return module.param("bias", module.bias_init, (features,), module.param_dtype)


def apply_gate(x: Array, gate: Array, dtype: Any) -> Array:
    """`x * gate` in the Flax-promoted computation dtype; `gate` broadcasts against `x`."""
    x, gate = nn.dtypes.promote_dtype(x, gate, dtype=dtype)
    return x * gate
