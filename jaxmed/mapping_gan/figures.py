"""PNG figures of key feature maps: orthogonal slices of the input with M(x) overlaid."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from jaxmed.data import nifti
from jaxmed.mapping_gan.data import Split, crop_spatial, subject_names
from jaxmed.mapping_gan.steps import MappingGan
from jaxmed.plotting import plt, save_figure
from jaxmed.training import TrainState


def _slices(volume: np.ndarray, centre: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    """The three orthogonal slices through `centre` of an (X, Y, Z) volume; a 2-D image as is."""
    if volume.ndim == 2:
        return [("image", volume.T)]
    x, y, z = centre
    return [("sagittal (x)", volume[x].T), ("coronal (y)", volume[:, y].T),
            ("axial (z)", volume[:, :, z].T)]


def key_feature_figure(image: np.ndarray, key_feature_map: np.ndarray, path: str | os.PathLike,
                       title: str = "", effect: np.ndarray | None = None) -> Path:
    """Writes a PNG: orthogonal slices of `image` with `key_feature_map` overlaid (diverging
    colours, symmetric range, colour bar); a row with the ground truth when `effect` is given.

    **Arguments:** `image`, `key_feature_map`, `effect`: `(X, Y)` or `(X, Y, Z)` arrays (one
    channel); slices pass through the voxel where |M(x)| is largest.
    """
    centre = np.unravel_index(np.argmax(np.abs(key_feature_map)), key_feature_map.shape)
    rows = [("M(x)", key_feature_map)] + ([("ground truth", effect)] if effect is not None else [])
    panels = len(_slices(image, centre))
    fig, axes = plt.subplots(len(rows), panels, figsize=(3.2 * panels + 1, 3.2 * len(rows)),
                             squeeze=False)
    for r, (name, overlay) in enumerate(rows):
        limit = float(np.abs(overlay).max()) or 1.0
        views = zip(_slices(image, centre), _slices(overlay, centre))
        for c, ((view, anatomy), (_, over)) in enumerate(views):
            ax = axes[r, c]
            ax.imshow(anatomy, cmap="gray", origin="lower")
            shown = ax.imshow(np.ma.masked_where(np.abs(over) < 0.05 * limit, over),
                              cmap="coolwarm", vmin=-limit, vmax=limit, alpha=0.8, origin="lower")
            ax.set_title(f"{name}: {view}", fontsize=9)
            ax.axis("off")
        fig.colorbar(shown, ax=axes[r].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def validation_figures(gan: MappingGan, state: TrainState, split: Split, crop: tuple[slice, ...],
                       folder: Path, count: int) -> list[Path]:
    """A `key_feature_figure` of M(x) for each of the first `count` positives of `split`
    (the ground truth beside it if known), `folder/<subject>.png`.

    **Arguments:** `state`: a state on this host (e.g. `jaxmed.training.fetch`ed), so that one
    process can draw alone; `crop`: the data's region in the padded volumes (`Study.crop`).
    """
    positives = np.flatnonzero(split.labels == nifti.POSITIVE)[:count]
    if not len(positives):
        return []
    images = split.images.subset(positives).stack()
    maps = np.asarray(jax.jit(gan.key_feature_map)(state, images), np.float32)
    effects = None if split.effects is None else split.effects.subset(positives).stack()
    written = []
    for i, name in enumerate(subject_names([split.subjects[p] for p in positives])):
        effect = None if effects is None else crop_spatial(effects[i], crop)[..., 0]
        written.append(key_feature_figure(
            crop_spatial(images[i], crop)[..., 0], crop_spatial(maps[i], crop).sum(-1),
            folder / f"{name}.png", title=f"{name}: key feature map M(x)", effect=effect))
    return written
