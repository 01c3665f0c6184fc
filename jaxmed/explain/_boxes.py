"""Masks and boxes from class activation maps, with the conventions of the WSOL evaluation
protocol (clovaai/wsolevaluation, `evaluation.py`), so a box drawn for an image is the box that
`jaxmed.metrics` MaxBoxAcc scores at the same threshold.

The protocol, for one map at threshold τ ∈ [0, 1):

1. `normalize_cams`: min–max normalise in float64 (a constant map, or one holding a NaN or an
   infinity, becomes all zeros).
2. Truncate to uint8: ``u = (map * 255).astype(uint8)``; binarise with ``u > int(τ · max(u))``
   (strict; ``max(u)`` is 255 for any non-constant map, 0 for an all-zero one).
3. OpenCV ``findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``. Its contours are, exactly:
   one outer border per 8-connected foreground component (nested ones included) and one hole
   border per 4-connected background component that does not reach the image edge.
4. A contour's box is ``cv2.boundingRect`` → ``(x, y, x + w, y + h)``, with ``x + w`` clipped to
   ``W - 1`` and ``y + h`` to ``H - 1``. For a component, that is one past its last column/row;
   a hole border runs through the foreground pixels around the hole, one pixel outside it.
5. MaxBoxAcc (V1) keeps the contour of largest ``cv2.contourArea`` (first in OpenCV's order on a
   tie); MaxBoxAccV2 keeps every contour. With no contour the box is ``[0, 0, 0, 0]``.

The largest contour is always an outer border of a top-level component (a hole border or a
component inside a hole never has a larger area than the component around it, which OpenCV
lists first). Its area is the polygon area through the centres of its boundary pixels, which
for the component with its holes filled is ``n4 + n3 / 2``, where ``n4`` / ``n3`` count the 2×2
pixel windows with all four / exactly three corners in it. OpenCV lists top-level components in
reverse raster order of their first pixel, so among equal areas the component whose first pixel
(topmost row, then leftmost) comes last wins.

Everything here runs on the host in NumPy/SciPy; OpenCV is not needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["EMPTY_BOX", "cam_boxes", "cam_levels", "cam_mask", "contour_boxes", "normalize_cams",
           "threshold_level"]

CONNECTIVITY_8 = np.ones((3, 3), bool)  # foreground components (outer borders)
CONNECTIVITY_4 = ndimage.generate_binary_structure(2, 1)  # background components (holes)
EMPTY_BOX = np.zeros((1, 4), np.int64)  # the protocol's box when nothing is above threshold


def normalize_cams(cams: Any) -> np.ndarray:
    """Min–max normalises each map to [0, 1] as the WSOL protocol does.

    Computed in float64 (the protocol's score maps are float64), in the protocol's order of
    operations (``m -= m.min(); m /= m.max()``), so the uint8 truncation that follows matches it
    bit for bit. A map already in [0, 1] with min 0 and max 1 is returned unchanged. A map that
    is constant, or holds a NaN (or an infinity, where the protocol would fail), becomes all
    zeros.

    **Arguments:**

    - `cams`: `(H, W)` or `(N, H, W)` real maps (NumPy or JAX), already at image resolution.

    **Returns:**

    A new float64 array of the same shape.
    """
    maps = np.array(cams, dtype=np.float64)  # a copy: normalised in place below
    if maps.ndim not in (2, 3) or maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise ValueError(f"CAMs must have shape (H, W) or (N, H, W) with H, W >= 1, got "
                         f"{maps.shape}")
    axes = (-2, -1)
    finite = np.isfinite(maps).all(axis=axes, keepdims=True)
    if not finite.all():
        maps = np.where(finite, maps, 0.0)
    maps -= maps.min(axis=axes, keepdims=True)
    span = maps.max(axis=axes, keepdims=True)  # 0 exactly when the map is constant
    maps /= np.where(span > 0, span, 1.0)
    return maps


def cam_levels(cams: Any) -> tuple[np.ndarray, np.ndarray]:
    """uint8 maps ``(normalised · 255)`` truncated, and each map's maximum (255, or 0 if all zero).

    **Arguments:**

    - `cams`: `(H, W)` or `(N, H, W)` maps; see `normalize_cams`.

    **Returns:**

    `(levels, peak)`: uint8 array of the input's shape and uint8 `()` or `(N,)` maxima.
    """
    levels = (normalize_cams(cams) * 255).astype(np.uint8)
    return levels, levels.max(axis=(-2, -1))


def threshold_level(threshold: Any, peak: Any) -> np.ndarray:
    """The protocol's integer cut ``int(τ · max(u))``: pixels with ``u >`` it are foreground.

    **Arguments:**

    - `threshold`: τ, scalar or array, in [0, 1).
    - `peak`: the uint8 map maximum from `cam_levels` (broadcasts against `threshold`).

    **Returns:**

    int64 array of the broadcast shape.
    """
    product = np.asarray(threshold, np.float64) * np.asarray(peak, np.float64)
    return np.trunc(product).astype(np.int64)


def contour_boxes(x0: Any, y0: Any, x1: Any, y1: Any, height: int, width: int) -> np.ndarray:
    """Protocol boxes of contours whose pixels span columns x0..x1 and rows y0..y1 (inclusive).

    ``cv2.boundingRect`` gives ``(x0, y0, x1 - x0 + 1, y1 - y0 + 1)``; the protocol turns it into
    ``[x0, y0, x + w, y + h]`` and clips the last two to ``W - 1`` / ``H - 1``.

    **Arguments:**

    - `x0`, `y0`, `x1`, `y1`: `(k,)` integer pixel extents of each contour.
    - `height`, `width`: the map size.

    **Returns:**

    `(k, 4)` int64 ``[x0, y0, x1, y1]`` boxes.
    """
    return np.stack(
        [
            np.asarray(x0, np.int64),
            np.asarray(y0, np.int64),
            np.minimum(np.asarray(x1, np.int64) + 1, width - 1),
            np.minimum(np.asarray(y1, np.int64) + 1, height - 1),
        ],
        axis=-1,
    ).reshape(-1, 4)


def _as_single_map(cam: Any) -> np.ndarray:
    cam = np.asarray(cam)
    if cam.ndim != 2:
        raise ValueError(f"expected one CAM of shape (H, W), got {cam.shape}")
    return cam


def cam_mask(cam: Any, threshold: float) -> np.ndarray:
    """The binarised CAM the protocol traces at threshold τ.

    **Arguments:**

    - `cam`: `(H, W)` map at image resolution (any real values; normalised here).
    - `threshold`: τ in [0, 1).

    **Returns:**

    `(H, W)` bool mask, ``u > int(τ · max(u))`` with ``u`` the uint8 normalised map.
    """
    levels, peak = cam_levels(_as_single_map(cam))
    return levels > threshold_level(threshold, peak)


def _extents(slices: list) -> np.ndarray:
    """`(k, 4)` inclusive ``[x0, y0, x1, y1]`` pixel extents from `ndimage.find_objects` slices."""
    rows = [(s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1) for s in slices if s is not None]
    return np.asarray(rows, np.int64).reshape(-1, 4)


def _component_boxes(mask: np.ndarray) -> np.ndarray:
    """Boxes of every outer border: one per 8-connected component."""
    labels, _ = ndimage.label(mask, CONNECTIVITY_8)
    ext = _extents(ndimage.find_objects(labels))
    return contour_boxes(*ext.T, *mask.shape)


def _hole_boxes(mask: np.ndarray) -> np.ndarray:
    """Boxes of every hole border: one per 4-connected background component off the edge.

    The hole border runs through the foreground pixels 4-adjacent to the hole, so its pixel
    extent is the hole's, grown by one pixel on each side.
    """
    labels, _ = ndimage.label(~mask, CONNECTIVITY_4)
    edge = set(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).tolist())
    holes = [s for i, s in enumerate(ndimage.find_objects(labels), start=1) if i not in edge]
    ext = _extents(holes) + np.array([-1, -1, 1, 1])
    return contour_boxes(*ext.T, *mask.shape)


def top_level_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The components OpenCV's largest contour is chosen from, with their contour areas.

    **Arguments:**

    - `mask`: `(H, W)` bool foreground.

    **Returns:**

    `(labels, twice_area, first_pixel)`: `(H, W)` int labels 1..K of the 8-connected components
    of the mask with its holes filled (0: outside), and per component (index k - 1) twice its
    outer contour's ``cv2.contourArea`` (``2 · n4 + n3``, an integer) and the raster index of its
    first pixel.
    """
    filled = ndimage.binary_fill_holes(mask)  # default structure: holes are 4-connected
    labels, count = ndimage.label(filled, CONNECTIVITY_8)
    corners = np.stack([labels[:-1, :-1], labels[:-1, 1:], labels[1:, :-1], labels[1:, 1:]])
    inside = (corners > 0).sum(axis=0)  # filled corners per 2×2 window: [H-1, W-1]
    # Corners of one window that are in the filled set are 8-adjacent, so share one label.
    per_window = (2 * (inside == 4) + (inside == 3)).ravel()
    twice_area = np.bincount(corners.max(axis=0).ravel(), weights=per_window,
                             minlength=count + 1)[1:]
    raster = np.arange(labels.size).reshape(labels.shape)
    first_pixel = ndimage.minimum(raster, labels, index=np.arange(1, count + 1))
    return labels, twice_area.astype(np.int64), np.asarray(first_pixel, np.int64).reshape(-1)


def largest_contour_box(mask: np.ndarray) -> np.ndarray:
    """Box of the contour OpenCV's ``max(contours, key=contourArea)`` returns (see module doc).

    **Arguments:**

    - `mask`: `(H, W)` bool foreground with at least one pixel.

    **Returns:**

    `(1, 4)` int64 box.
    """
    labels, twice_area, first_pixel = top_level_components(mask)
    best = np.lexsort((first_pixel, twice_area))[-1]  # largest area, then latest first pixel
    ext = _extents(ndimage.find_objects(labels))[best]
    return contour_boxes(*ext, *mask.shape)


def cam_boxes(cam: Any, threshold: float, *, multi_contour: bool = False) -> np.ndarray:
    """The boxes MaxBoxAcc estimates for one CAM at threshold τ (see the module doc).

    **Arguments:**

    - `cam`: `(H, W)` map at image resolution (any real values; normalised here).
    - `threshold`: τ in [0, 1).
    - `multi_contour`: False for MaxBoxAcc (the largest contour's box only), True for
      MaxBoxAccV2 (a box per contour: components first, then holes).

    **Returns:**

    `(k, 4)` int64 ``[x0, y0, x1, y1]`` boxes in pixels; ``[[0, 0, 0, 0]]`` when no pixel is
    above the threshold.
    """
    mask = cam_mask(cam, threshold)
    if not mask.any():
        return EMPTY_BOX.copy()
    if not multi_contour:
        return largest_contour_box(mask)
    return np.concatenate([_component_boxes(mask), _hole_boxes(mask)])
