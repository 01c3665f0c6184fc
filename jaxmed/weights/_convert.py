"""`.pth` -> `.safetensors`: the one place that touches torch (and only its safe loader)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from jaxmed.errors import InputDataError

__all__ = ["convert"]


def convert(source: str | os.PathLike, target: str | os.PathLike) -> int:
    """Write the state dict of a PyTorch file `source` to the safetensors file `target`.

    `source` is read with `torch.load(..., weights_only=True)`, which refuses anything but
    tensors and plain containers; it holds a state dict `{key: tensor}` (as torchvision's
    downloads do) or `{'state_dict': {...}}`. Floating-point tensors are written as float32,
    others (e.g. `num_batches_tracked`) as they are. `target` is written only when everything
    was read.

    **Returns:** the number of arrays written.

    **Raises:** `RuntimeError` when torch is not installed; `InputDataError` naming `source`
    when it is missing, not loadable or holds no tensors.
    """
    try:
        import torch
    except ImportError:
        raise RuntimeError("converting a .pth file needs PyTorch (pip install torch); reading "
                           "the .safetensors file it writes does not") from None
    if not Path(source).is_file():
        raise InputDataError(f"{source}: not found")
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a bad or unsafe file
        raise InputDataError(f"{source}: not a PyTorch state dict that loads with "
                             f"weights_only=True ({type(error).__name__}: {error})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)} \
        if isinstance(loaded, Mapping) else {}
    if not tensors:
        raise InputDataError(f"{source}: holds no tensors (expected a state dict)")
    arrays = {k: _numpy(v, torch) for k, v in tensors.items()}
    target = Path(target)
    temporary = target.with_name(f".{target.name}.tmp")
    safetensors.numpy.save_file(arrays, str(temporary))
    os.replace(temporary, target)
    return len(arrays)


def _numpy(tensor, torch) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return np.ascontiguousarray(tensor.numpy())
