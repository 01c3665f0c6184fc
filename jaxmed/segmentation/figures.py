"""PNG figures of segmentations: image, ground truth, prediction, overlay."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.plotting import plt, save_figure

# Class colours (RGB): background transparent/black, then distinct hues.
PALETTE = np.array([[0, 0, 0], [30, 144, 255], [255, 140, 0], [50, 205, 50], [220, 20, 60],
                    [186, 85, 211], [255, 215, 0], [0, 206, 209]], np.uint8)


def colour_mask(mask: np.ndarray) -> np.ndarray:
    """`(H, W)` class indices -> `(H, W, 3)` uint8 colours (ignored/unknown labels: white)."""
    colours = np.concatenate([PALETTE, np.full((256 - len(PALETTE), 3), 255, np.uint8)])
    return colours[np.clip(mask, 0, 255).astype(np.int64)]


def overlay(image: np.ndarray, mask: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """The image with the foreground classes of `mask` blended in colour."""
    image = image if image.ndim == 3 else np.repeat(image[..., None], 3, -1)
    blended = (1 - opacity) * image + opacity * colour_mask(mask)
    return np.where((mask > 0)[..., None], blended, image).round().astype(np.uint8)


def segmentation_grid(images: Sequence[np.ndarray], truths: Sequence[np.ndarray | None],
                      predictions: Sequence[np.ndarray], path: str | os.PathLike,
                      titles: Sequence[str] | None = None) -> Path:
    """One row per image: image, ground truth (if any), prediction, prediction overlaid."""
    columns = 4
    fig, axes = plt.subplots(len(images), columns, figsize=(2.6 * columns, 2.6 * len(images)),
                             squeeze=False)
    for r, (image, truth, prediction) in enumerate(zip(images, truths, predictions)):
        panels = [("image", image), ("truth", None if truth is None else colour_mask(truth)),
                  ("prediction", colour_mask(prediction)), ("overlay", overlay(image, prediction))]
        for ax, (name, picture) in zip(axes[r], panels):
            ax.axis("off")
            if picture is not None:
                ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
                ax.set_title(name if titles is None else f"{titles[r]}: {name}", fontsize=8)
    return save_figure(fig, path)


def validation_figure(segmenter, state, examples: dict[str, np.ndarray],
                      path: str | os.PathLike) -> Path:
    """`segmentation_grid` of held-out `examples` (`{'image': [n, S, S, 3], 'mask': [n, S, S]}`)
    with the argmax of `segmenter.logits` (a `jaxmed.segmentation.steps.Segmenter`)."""
    logits = jax.jit(segmenter.logits)(state, jnp.asarray(examples["image"]))  # [n, S, S, C]
    predictions = np.argmax(np.asarray(logits), axis=-1)
    return segmentation_grid(examples["image"], examples["mask"], predictions, path)
