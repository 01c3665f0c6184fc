"""Helpers shared by the networks."""

from __future__ import annotations

import jax


def spatial_dims(x: jax.Array, who: str) -> int:
    """The number of spatial axes of `x`, which `who` needs to be `(B, H, W, C)` or
    `(B, D, H, W, C)`."""
    nsp = x.ndim - 2
    if nsp not in (2, 3):
        raise ValueError(
            f"{who} expects (B, H, W, C) or (B, D, H, W, C) input, got shape {x.shape}")
    return nsp
