"""PNG figures of localisation: the image, its CAM overlaid, predicted and true boxes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxmed.explain import cam_boxes
from jaxmed.plotting import plt, save_figure


def _draw_boxes(ax, boxes: np.ndarray | None, colour: str, label: str) -> None:
    if boxes is None:
        return
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).reshape(-1, 4)):
        # Boxes hold inclusive pixel indices; the rectangle runs along the pixel edges.
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                                   edgecolor=colour, linewidth=1.5,
                                   label=label if i == 0 else None))


def localization_figure(image: np.ndarray, cam: np.ndarray, path: str | os.PathLike, *,
                        title: str = "", predicted: np.ndarray | None = None,
                        truth: np.ndarray | None = None) -> Path:
    """Write a PNG: the image, and the image with the CAM overlaid and the boxes drawn.

    **Arguments:**

    - `image`: `(H, W, 3)` uint8; `cam`: `(H, W)` in [0, 1].
    - `predicted`, `truth`: boxes `(k, 4)` `[x0, y0, x1, y1]` (inclusive pixels), drawn red and
      green.
    """
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.8))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image)
    shown = axes[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    _draw_boxes(axes[1], truth, "lime", "truth")
    _draw_boxes(axes[1], predicted, "red", "predicted")
    if truth is not None or predicted is not None:
        axes[1].legend(loc="lower right", fontsize=7)
    axes[1].set_title("CAM", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1], shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def localization_grid(images: Sequence[np.ndarray], cams: Sequence[np.ndarray],
                      predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray],
                      titles: Sequence[str], path: str | os.PathLike, columns: int = 4) -> Path:
    """Write one PNG with a CAM overlay per image (boxes: predicted red, truth green)."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, cam, guess, true, title in zip(axes.ravel(), images, cams, predicted, truth,
                                                  titles):
        ax.imshow(image)
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        _draw_boxes(ax, true, "lime", "truth")
        _draw_boxes(ax, guess, "red", "predicted")
        ax.set_title(title, fontsize=8)
    return save_figure(fig, path)


def validation_figure(wsol, state, images: np.ndarray, labels: np.ndarray,
                      boxes: Sequence[np.ndarray] | None, class_names: Sequence[str],
                      threshold: float, path: str | os.PathLike) -> Path | None:
    """Write `localization_grid` of validation images: the CAM of each image's true class, its
    box at `threshold` (red), the true boxes (green), titled `true → predicted` class.

    **Arguments:**

    - `wsol`, `state`: the trained system (`jaxmed.wsol.steps.Wsol`) and its state, on one
      device.
    - `images`: uint8 `[n, S, S, 3]`; `labels`: `[n]`; `boxes`: their boxes, or None.

    **Returns:** the PNG's path, or None when there is no image.
    """
    if len(images) == 0:
        return None
    probabilities, cams = jax.jit(wsol.predict)(state, images, labels)
    cams, predicted = np.asarray(cams), np.argmax(np.asarray(probabilities), -1)
    guesses = [cam_boxes(c, threshold)[:1] for c in cams]
    truths = boxes if boxes is not None else [None] * len(images)
    titles = [f"{class_names[t]} → {class_names[p]}" for t, p in zip(labels, predicted)]
    return localization_grid(images, cams, guesses, truths, titles, path)
