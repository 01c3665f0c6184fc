"""Attention thumbnails: a slide with each tile's attention weight drawn as a heat map
(docs/pathology.md)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from jaxmed.data.slide import Slide
from jaxmed.pathology.tiles import _thumbnail_image, _write_atomically

OPACITY = 0.55


def heat_colours(values: np.ndarray) -> np.ndarray:
    """uint8 RGB `(n, 3)` of values in [0, 1] on OpenCV's 'inferno' map (dark = low)."""
    levels = np.clip(np.round(np.asarray(values, np.float64) * 255), 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(levels.reshape(-1, 1), cv2.COLORMAP_INFERNO).reshape(-1, 3)
    return bgr[:, ::-1]


def attention_thumbnail(path: str | os.PathLike, slide: Slide, coords: np.ndarray,
                        tile_size: int, weights: np.ndarray, *, title: str | None = None,
                        max_size: int = 1024) -> Path:
    """Write a PNG of the slide's thumbnail with every tile filled by its attention weight
    (scaled from the least attended tile, darkest, to the most attended, brightest; all
    mid-level when the weights are equal), blended at `OPACITY`, and `title` on a band above,
    atomically.

    **Arguments:** `coords` `(n, 2)` level-0 tile corners; `weights` `(n,)` non-negative
    (e.g. the normalised low-resolution scores `ŵ_L`); `max_size`: the thumbnail's longer
    side at most.

    **Returns:** the path written.
    """
    image = _thumbnail_image(slide, max_size)
    height, width = image.shape[:2]
    scale = np.array([slide.dimensions[0] / width, slide.dimensions[1] / height])
    weights = np.asarray(weights, np.float64)
    low, high = (weights.min(), weights.max()) if weights.size else (0.0, 0.0)
    spread = high - low
    # Min-max over the slide's tiles; equal weights (e.g. untrained gates) show mid-level.
    levels = (weights - low) / spread if spread > 1e-9 * max(high, 1e-30) else \
        np.full(weights.shape, 0.5)
    colours = heat_colours(levels)
    layer = image.copy()
    for (x, y), colour in zip(np.asarray(coords), colours, strict=True):
        x0, y0 = np.round(np.array([x, y]) / scale).astype(int)
        x1, y1 = np.round((np.array([x, y]) + tile_size) / scale).astype(int)
        cv2.rectangle(layer, (x0, y0), (x1 - 1, y1 - 1), tuple(int(c) for c in colour), -1)
    blended = cv2.addWeighted(layer, OPACITY, image, 1 - OPACITY, 0.0)
    if title:
        band = np.full((28, width, 3), 255, np.uint8)
        cv2.putText(band, title[: max(1, width // 8)], (4, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
        blended = np.concatenate([band, blended])
    ok, png = cv2.imencode(".png", cv2.cvtColor(blended, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the thumbnail as PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, lambda temporary: temporary.write_bytes(png.tobytes()))
    return path
