"""Array transforms shared by the data pipelines: padding to a network's multiple and back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def pad_to_multiple(
    x: np.ndarray,
    multiple: int | Sequence[int],
    *,
    spatial_axes: Sequence[int] | None = None,
    mode: str = "edge",
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad spatial axes so each length is divisible by `multiple` (e.g. 2**levels of a U-Net).

    Each axis gets `total // 2` before and the rest after. Edge replication (the default) keeps
    the intensity statistics at the border instead of adding an artificial constant step; any
    `np.pad` mode may be given.

    **Arguments:**

    - `x`: channels-last array, normally a volume `(X, Y, Z, C)`.
    - `multiple`: one int for all spatial axes, or one per spatial axis.
    - `spatial_axes`: the axes to pad; default all but the last (channel) axis.
    - `mode`: `np.pad` mode.

    **Returns:** `(padded, slices)`; `slices` (one per axis of `x`) crops `padded`, or a map of
    the same shape, back to the shape of `x` with `crop_back`.
    """
    x = np.asarray(x)
    if spatial_axes is None:
        axes = tuple(range(x.ndim - 1))
    else:
        axes = tuple(a % x.ndim for a in spatial_axes)
    multiples = (multiple,) * len(axes) if isinstance(multiple, int) else tuple(multiple)
    if len(multiples) != len(axes) or min(multiples) < 1:
        raise ValueError(f"need one positive multiple per spatial axis {axes}, got {multiple}")
    pad = [(0, 0)] * x.ndim
    slices = [slice(None)] * x.ndim
    for axis, m in zip(axes, multiples):
        n = x.shape[axis]
        total = -n % m
        pad[axis] = (total // 2, total - total // 2)
        slices[axis] = slice(total // 2, total // 2 + n)
    return np.pad(x, pad, mode=mode), tuple(slices)


def crop_back(x: Any, slices: tuple[slice, ...]) -> Any:
    """Undo `pad_to_multiple`: `x[..., *slices]`. `x` may carry extra leading (batch) axes and
    may be a numpy or JAX array."""
    return x[(Ellipsis, *slices)]
