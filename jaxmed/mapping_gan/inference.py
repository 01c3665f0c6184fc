"""Apply a trained mapping generator to NIfTI files: M(x), y = x + M(x) and a figure per input
(`python -m train.mapping_gan apply`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data import nifti
from jaxmed.data.transforms import crop_back, pad_to_multiple
from jaxmed.errors import InputDataError
from jaxmed.mapping_gan.figures import key_feature_figure
from jaxmed.mapping_gan.steps import build_mapping_gan
from jaxmed.training import load_run

PROGRAM = "python -m train.mapping_gan"


def _prepared(volume: nifti.Volume, config: dict, path: str) -> np.ndarray:
    """(X, Y, Z, C) → the model's layout, checking channels and dimensionality."""
    if volume.channels != config["channels"]:
        raise InputDataError(f"{path}: has {volume.channels} channel(s), the model was trained "
                             f"on {config['channels']}")
    if config["spatial_dims"] == 2:
        if volume.spatial_shape[2] != 1:
            raise InputDataError(f"{path}: a 3-D volume, but the model is 2-D")
        return volume.data[:, :, 0, :]
    return volume.data


def apply_to_files(workdir: str, inputs: Sequence[str], output: str,
                   which: str = "best") -> list[Path]:
    """For each input writes `<name>_map.nii.gz` (M(x)), `<name>_mapped.nii.gz` (y) with the
    input's affine and header, and `<name>.png`. Values are in the normalised [-1, 1] units
    the model works in. Returns the written paths."""
    gan, state, config = load_run(workdir, build_mapping_gan, program=PROGRAM, which=which)
    generator = jax.jit(gan.key_feature_map)
    out = Path(output)
    written = []
    for path in inputs:
        volume = nifti.read_normalised(path, config["normalisation"], tuple(config["percentiles"]))
        x = _prepared(volume, config, path)
        padded, crop = pad_to_multiple(x, gan.generator.total_downsampling)
        m = generator(state, jnp.asarray(padded[None]))[0]  # M(x): [*S, C], padded
        m = crop_back(np.asarray(m, np.float32), crop)
        y = x + m
        if config["spatial_dims"] == 2:  # back to the file's (X, Y, 1, C) layout
            m, y = m[:, :, None], y[:, :, None]
        name = Path(path).name.split(".nii")[0]
        written.append(nifti.write_like(volume, m, out / f"{name}_map.nii.gz"))
        written.append(nifti.write_like(volume, y, out / f"{name}_mapped.nii.gz"))
        anatomy, key_map = volume.data[..., 0], m.sum(-1)
        if config["spatial_dims"] == 2:
            anatomy, key_map = anatomy[:, :, 0], key_map[:, :, 0]
        written.append(key_feature_figure(anatomy, key_map, out / f"{name}.png",
                                          title=f"{name}: M(x)"))
    return written
