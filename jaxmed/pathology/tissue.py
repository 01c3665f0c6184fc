"""Tissue mask of a whole-slide image, found on one low-resolution level.

The recipe (`docs/pathology.md`): RGB -> HSV, the saturation channel, a median blur,
binarisation (Otsu by default, or a fixed saturation threshold), a morphological closing, then
area filters on the pieces of tissue and on the holes inside them, and their contours with
holes. OpenCV does every image operation; nothing here is hand-written morphology.

Conventions:

- A pixel is tissue when its (blurred) saturation is strictly above the threshold.
- Areas are pixel counts at the mask's resolution times the area of one mask pixel: a piece of
  tissue counts its own pixels (8-connected, holes excluded), a hole counts the background
  pixels it encloses (4-connected, not touching the image border). Pieces smaller than the
  tissue minimum are removed, holes smaller than the hole minimum are filled.
- Contours are those of the filtered mask (`cv2.findContours`, `RETR_CCOMP`): outer borders
  of the pieces, and the borders of their holes, as `(k, 2)` arrays of `(x, y)`.
- The median and closing kernels are in mask pixels, so their physical size grows with the
  level the pixel budget picks (as in CLAM).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from jaxmed.data.slide import Slide

# Defaults, chosen for 0.25 um/px (40x) slides tiled at 1152 px (288 um); see docs/pathology.md.
MAX_PIXELS = 4_000_000  # the mask level: ~2000 x 2000, a 100 000^2 slide read at 1/50
# Half a default tile's area: the smallest convex piece that can hold 3 of a tile's corners.
MIN_TISSUE_AREA_UM2 = 40_000.0
# A 100 um square (a few fat cells): smaller gaps are thresholding noise, filled.
MIN_HOLE_AREA_UM2 = 10_000.0
# The same areas in level-0 pixels of a 0.25 um/px slide, used when the slide has no MPP.
MIN_TISSUE_AREA_PX = 640_000.0
MIN_HOLE_AREA_PX = 160_000.0
# Otsu on a blank slide splits glass noise; its threshold is never taken below this
# saturation (CLAM's fixed threshold), so an empty slide gives an empty mask.
OTSU_MIN_SATURATION = 8


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value
class TissueMask:
    """The tissue found on one level of a slide.

    **Fields:**

    - `mask`: bool `(h, w)`, the filtered tissue at the mask level (True = tissue).
    - `level`: the slide level the mask was computed on.
    - `downsample`: level-0 pixels per mask pixel (the level's downsample).
    - `contours`: outer borders of the pieces of tissue, each float64 `(k, 2)` `(x, y)` in
      level-0 coordinates: the centres of the border mask pixels, `(i + 0.5) * downsample`.
    - `holes`: borders of the kept holes, the same way.
    - `hole_parents`: int `(len(holes),)`, the index in `contours` of each hole's piece.
    - `level_contours`, `level_holes`: the same borders as int32 `(k, 2)` mask-pixel indices.
    - `threshold`: the saturation threshold applied (Otsu's, or the fixed one), 0-255.
    """

    mask: np.ndarray
    level: int
    downsample: float
    contours: list[np.ndarray]
    holes: list[np.ndarray]
    hole_parents: np.ndarray
    level_contours: list[np.ndarray]
    level_holes: list[np.ndarray]
    threshold: int

    @property
    def tissue_fraction(self) -> float:
        """The fraction of the slide's area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class _Segmentation:
    mask: np.ndarray
    contours: list[np.ndarray]
    holes: list[np.ndarray]
    hole_parents: np.ndarray
    threshold: int


def mask_from_rgb(
    rgb: np.ndarray,
    *,
    threshold: str | int = "otsu",
    median: int = 7,
    close: int = 4,
    min_tissue_area: float = 0.0,
    min_hole_area: float = 0.0,
    pixel_area: float = 1.0,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The tissue mask of one RGB image (the array-level core of `tissue_mask`).

    **Arguments:**

    - `rgb`: uint8 `(h, w, 3)`.
    - `threshold`: `"otsu"` (Otsu's threshold of the blurred saturation, never below
      `OTSU_MIN_SATURATION`) or a fixed saturation 0-255; tissue is saturation > threshold.
    - `median`: odd median-blur kernel size in pixels (1: no blur).
    - `close`: side of the square closing kernel in pixels (0 or 1: no closing).
    - `min_tissue_area`, `min_hole_area`: pieces of tissue with a smaller area are removed,
      holes with a smaller area are filled; in the unit of `pixel_area`.
    - `pixel_area`: the area of one pixel (e.g. um^2 when the resolution is known); 1 gives
      areas in pixels.

    **Returns:** `(mask, contours, holes)`: bool `(h, w)`, and the outer and hole borders of the
    filtered mask as int32 `(k, 2)` `(x, y)` pixel indices.
    """
    found = _segment(rgb, threshold=threshold, median=median, close=close,
                     min_tissue_area=min_tissue_area, min_hole_area=min_hole_area,
                     pixel_area=pixel_area)
    return found.mask, found.contours, found.holes


def tissue_mask(
    slide: Slide,
    *,
    max_pixels: int = MAX_PIXELS,
    level: int | None = None,
    threshold: str | int = "otsu",
    median: int = 7,
    close: int = 4,
    min_tissue_area_um2: float = MIN_TISSUE_AREA_UM2,
    min_hole_area_um2: float = MIN_HOLE_AREA_UM2,
    min_tissue_area_px: float = MIN_TISSUE_AREA_PX,
    min_hole_area_px: float = MIN_HOLE_AREA_PX,
) -> TissueMask:
    """The tissue mask of a slide, computed on one whole low-resolution level.

    **Arguments:**

    - `slide`: an open `jaxmed.data.slide.Slide`.
    - `max_pixels`: the pixel budget: the finest level with at most this many pixels is read
      (`slide.level_for_pixel_budget`); nothing finer is ever decoded.
    - `level`: read this level instead (overrides `max_pixels`).
    - `threshold`, `median`, `close`: as in `mask_from_rgb` (kernels in mask pixels).
    - `min_tissue_area_um2`, `min_hole_area_um2`: the area filters in um^2, used when the slide
      states its MPP.
    - `min_tissue_area_px`, `min_hole_area_px`: the area filters in level-0 pixels, used when it
      does not (the defaults equal the um^2 ones at 0.25 um/px).

    **Returns:** a `TissueMask`.
    """
    if level is None:
        level = slide.level_for_pixel_budget(max_pixels)
    if not 0 <= level < len(slide.levels):
        raise ValueError(f"{slide.path}: level {level} does not exist "
                         f"(the slide has {len(slide.levels)} levels)")
    downsample = float(slide.levels[level].downsample)
    if slide.mpp is not None:
        pixel_area = slide.mpp[0] * slide.mpp[1] * downsample**2  # um^2 per mask pixel
        min_tissue, min_hole = min_tissue_area_um2, min_hole_area_um2
    else:
        pixel_area = downsample**2  # level-0 pixels per mask pixel
        min_tissue, min_hole = min_tissue_area_px, min_hole_area_px
    rgb = slide.read_level(level)
    found = _segment(rgb, threshold=threshold, median=median, close=close,
                     min_tissue_area=min_tissue, min_hole_area=min_hole, pixel_area=pixel_area)
    return TissueMask(
        mask=found.mask, level=level, downsample=downsample,
        contours=[_to_level0(c, downsample) for c in found.contours],
        holes=[_to_level0(h, downsample) for h in found.holes],
        hole_parents=found.hole_parents,
        level_contours=found.contours, level_holes=found.holes, threshold=found.threshold,
    )


def _to_level0(border: np.ndarray, downsample: float) -> np.ndarray:
    """Mask-pixel indices -> level-0 coordinates of those pixels' centres."""
    return (border.astype(np.float64) + 0.5) * downsample


def _segment(rgb, *, threshold, median, close, min_tissue_area, min_hole_area,
             pixel_area) -> _Segmentation:
    rgb = _check_rgb(rgb)
    _check_options(threshold, median, close, min_tissue_area, min_hole_area, pixel_area)
    saturation = np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1])
    if median > 1:
        saturation = cv2.medianBlur(saturation, median)
    if threshold == "otsu":
        otsu, _ = cv2.threshold(saturation, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(int(otsu), OTSU_MIN_SATURATION)
    tissue = (saturation > threshold).astype(np.uint8)
    if close > 1:
        kernel = np.ones((close, close), np.uint8)
        tissue = cv2.morphologyEx(tissue, cv2.MORPH_CLOSE, kernel)
    tissue = _drop_small_pieces(tissue, min_tissue_area / pixel_area)
    tissue = _fill_small_holes(tissue, min_hole_area / pixel_area)
    contours, holes, parents = _borders(tissue)
    return _Segmentation(tissue.astype(bool), contours, holes, parents, int(threshold))


def _drop_small_pieces(tissue: np.ndarray, min_pixels: float) -> np.ndarray:
    """Remove the 8-connected pieces of fewer than `min_pixels` pixels."""
    if min_pixels <= 0:
        return tissue
    _, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False  # label 0: the background
    return keep[labels].astype(np.uint8)


def _fill_small_holes(tissue: np.ndarray, min_pixels: float) -> np.ndarray:
    """Fill the holes (4-connected background not touching the border) under `min_pixels`."""
    if min_pixels <= 0:
        return tissue
    height, width = tissue.shape
    _, labels, stats, _ = cv2.connectedComponentsWithStats(1 - tissue, connectivity=4)
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    right = left + stats[:, cv2.CC_STAT_WIDTH]
    bottom = top + stats[:, cv2.CC_STAT_HEIGHT]
    outside = (left == 0) | (top == 0) | (right == width) | (bottom == height)
    fill = ~outside & (stats[:, cv2.CC_STAT_AREA] < min_pixels)
    fill[0] = False  # label 0: the tissue itself
    return tissue | fill[labels].astype(np.uint8)


def _borders(tissue: np.ndarray):
    """Outer borders, hole borders and each hole's outer border index (`RETR_CCOMP`)."""
    found, hierarchy = cv2.findContours(tissue, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not found:
        return [], [], np.zeros(0, np.int64)
    parent = hierarchy[0, :, 3]
    outer = np.flatnonzero(parent < 0)
    index_of = {int(i): k for k, i in enumerate(outer)}
    inner = np.flatnonzero(parent >= 0)
    contours = [found[i].reshape(-1, 2).astype(np.int32) for i in outer]
    holes = [found[i].reshape(-1, 2).astype(np.int32) for i in inner]
    parents = np.array([index_of[int(parent[i])] for i in inner], np.int64)
    return contours, holes, parents


def _check_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"an RGB image must be uint8 (h, w, 3), got {rgb.dtype} {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"the RGB image is empty, shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _check_options(threshold, median, close, min_tissue_area, min_hole_area, pixel_area):
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a saturation 0-255, got {threshold!r}")
    elif not isinstance(threshold, int | np.integer) or not 0 <= threshold <= 255:
        raise ValueError(f"threshold must be 'otsu' or a saturation 0-255, got {threshold!r}")
    if not isinstance(median, int | np.integer) or median < 1 or median % 2 == 0:
        raise ValueError(f"median must be an odd kernel size >= 1 (1: no blur), got {median!r}")
    if not isinstance(close, int | np.integer) or close < 0:
        raise ValueError(f"close must be a kernel size >= 0 (0: no closing), got {close!r}")
    if min_tissue_area < 0 or min_hole_area < 0:
        raise ValueError(f"area minimums must be >= 0, got {min_tissue_area}, {min_hole_area}")
    if not pixel_area > 0:
        raise ValueError(f"pixel_area must be positive, got {pixel_area}")
