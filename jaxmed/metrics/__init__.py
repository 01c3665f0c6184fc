"""Evaluation metrics.

- `ncc`: normalised cross-correlation of a key feature map with the ground truth (SPEC S0).

Map-level metrics are in jax.numpy, so they run under `jax.jit` and on device.
"""

from jaxmed.metrics._ncc import ncc

__all__ = ["ncc"]
