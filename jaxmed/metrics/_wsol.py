"""MaxBoxAcc and MaxBoxAccV2 (Choe et al., CVPR 2020, clovaai/wsolevaluation), exact and fast.

The protocol (box conventions in `jaxmed.explain`, `docs/wsol.md`): each CAM is min–max
normalised, truncated to uint8 ``u`` and binarised at every τ in ``arange(0, 1, interval)`` with
``u > int(τ · 255)``; the boxes of the binary map's OpenCV contours (V1: the largest contour
only; V2: all contours) are compared with the image's ground-truth boxes. An image is correct at
(τ, δ) when the best IoU over (estimated × ground-truth boxes) is ``>= δ``; the accuracy at δ is
the best over τ of the percentage of correct images. The numbers (curves included) equal the
per-image, per-threshold OpenCV reference's (`benchmarks/_wsol_reference.py`) exactly.

How, without tracing contours 1 000 times per image:

- The cut ``int(τ · 255)`` takes at most 255 values, and as it falls the foreground components
  only grow and merge. One sweep over the grey levels builds all of them at every cut: the
  component tree of `jaxmed.metrics._component_tree`. A second sweep, upwards over the
  background with 4-connectivity, gives the holes (background components off the image edge).
- Each node's box is aggregated after the sweep; its IoU is computed once and spread over the
  cuts where the node exists with a sparse-table range maximum.
- V1's largest contour is the top-level component of largest filled area (holes filled; ties
  go to the component whose first pixel comes last in raster order, OpenCV's order). Its area,
  ``n4 + n3 / 2`` over 2×2 windows, is a per-pixel weight summed over the component: a window
  adds ½ as its third corner joins the filled set and ½ with its fourth.

All images of a chunk are swept together as one tiled array, so the only Python loop in the hot
path is over the 255 grey levels — not thresholds, images or pixels. Host-side NumPy/SciPy;
OpenCV is not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxmed.explain import EMPTY_BOX, cam_levels, contour_boxes, threshold_level
from jaxmed.metrics._component_tree import N_STEPS, Tree, component_tree, node_values, pad_frame

__all__ = ["BoxAccumulator", "MaxBoxAcc", "box_hits", "max_box_acc"]

_N_CUTS = N_STEPS  # int(τ · 255) for τ in [0, 1) takes the values 0..254: one sweep step each
_N_LEVELS = 256  # cut 255 (τ rounding up to 1) leaves no foreground: the empty box
_CHUNK_PIXELS = 1 << 21  # padded pixels swept together (~40 CAMs of 224²): ~120 bytes each


# ----------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MaxBoxAcc:
    """MaxBoxAcc results, in percent as the reference reports them.

    **Fields:**

    - `accuracy`: ``{δ: best over τ of the % of images correct at (τ, δ)}``.
    - `best_threshold`: ``{δ: the first τ reaching that best}``.
    - `curve`: `(n_δ, n_τ)` float64 % of images correct at each (δ, τ).
    - `thresholds`: `(n_τ,)` the CAM thresholds τ.
    - `num_images`: number of images scored.

    `mean` is the average of `accuracy` over δ (MaxBoxAccV2 with δ = 0.3, 0.5, 0.7).
    """

    accuracy: dict[float, float]
    best_threshold: dict[float, float]
    curve: np.ndarray
    thresholds: np.ndarray
    num_images: int

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.accuracy.values())))

    @classmethod
    def from_hits(cls, hits: np.ndarray, num_images: int, iou_thresholds: Sequence[float],
                  thresholds: np.ndarray) -> MaxBoxAcc:
        """Builds the result from `(n_δ, n_τ)` counts of correct images out of `num_images`."""
        if num_images <= 0:
            raise ValueError("MaxBoxAcc of zero images: call update() with at least one CAM first")
        curve = np.asarray(hits) * 100.0 / float(num_images)
        best = curve.argmax(axis=1)
        deltas = [float(d) for d in iou_thresholds]
        return cls(
            accuracy={d: float(curve[i].max()) for i, d in enumerate(deltas)},
            best_threshold={d: float(thresholds[best[i]]) for i, d in enumerate(deltas)},
            curve=curve,
            thresholds=np.asarray(thresholds),
            num_images=int(num_images),
        )


# ----------------------------------------------------------------------------
# Ground truth and IoU
# ----------------------------------------------------------------------------


def _gt_array(gt_boxes: Any, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """`(N, K, 4)` boxes and `(N, K)` validity from a padded array or a list of `(k_i, 4)`."""
    if not isinstance(gt_boxes, (list, tuple)):
        boxes = np.asarray(gt_boxes)
        boxes = boxes[:, None] if boxes.ndim == 2 else boxes  # (N, 4): one box per image
    else:
        per_image = [np.asarray(b).reshape(-1, 4) for b in gt_boxes]
        width = max([len(b) for b in per_image] + [1])
        boxes = np.full((len(per_image), width, 4), -1, np.result_type(*per_image, np.int64))
        for i, b in enumerate(per_image):
            boxes[i, : len(b)] = b
    if boxes.ndim != 3 or boxes.shape[0] != num_images or boxes.shape[2] != 4:
        raise ValueError(f"gt_boxes must give (k_i, 4) boxes for each of the {num_images} CAMs, "
                         f"got {boxes.shape}")
    boxes = boxes.astype(np.int64 if np.issubdtype(boxes.dtype, np.integer) else np.float64)
    valid = ~(boxes == -1).all(axis=2)
    _check_gt(boxes, valid)
    return boxes, valid


def _check_gt(boxes: np.ndarray, valid: np.ndarray) -> None:
    """The reference's checks: every image has a box; boxes are x0y0x1y1, non-negative."""
    empty = np.flatnonzero(~valid.any(axis=1))
    if empty.size:
        raise ValueError(f"image {empty[0]} has no ground-truth box (rows of -1 are padding)")
    reversed_corners = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    bad = valid & ((boxes < 0).any(axis=2) | reversed_corners)
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise ValueError(f"image {i}, ground-truth box {k} = {boxes[i, k].tolist()} is not "
                         "[x0, y0, x1, y1] with 0 <= x0 <= x1, 0 <= y0 <= y1")


def _best_iou(boxes: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Best IoU of each box over its image's ground-truth boxes, on inclusive pixels (+1).

    **Arguments:**

    - `boxes`: `(S, 4)` estimated ``[x0, y0, x1, y1]``.
    - `gt`: `(S, K, 4)` the ground-truth boxes of each box's image; `valid`: `(S, K)`.

    **Returns:**

    `(S,)` float64, the reference's arithmetic (0 where the union is not positive).
    """
    box = boxes[:, None, :]  # [S, 1, 4]
    lo, hi = np.maximum(box[..., :2], gt[..., :2]), np.minimum(box[..., 2:], gt[..., 2:])
    width = np.maximum(0, hi[..., 0] - lo[..., 0] + 1)
    height = np.maximum(0, hi[..., 1] - lo[..., 1] + 1)
    inter = width * height  # [S, K]
    area_box = (box[..., 2] - box[..., 0] + 1) * (box[..., 3] - box[..., 1] + 1)
    area_gt = (gt[..., 2] - gt[..., 0] + 1) * (gt[..., 3] - gt[..., 1] + 1)
    union = area_box + area_gt - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return np.where(valid, iou, -np.inf).max(axis=1)


# ----------------------------------------------------------------------------
# The CAM's components at every cut
# ----------------------------------------------------------------------------


_BOX = ("x0", "y0", "x1", "y1")  # the node values that make a contour's pixel extent


def _foreground_tree(levels: np.ndarray) -> tuple[Tree, np.ndarray, np.ndarray]:
    """8-connected components of ``{levels > cut}`` as the cut falls from 254 to 0.

    **Returns:** the tree and each node's cuts `(lo, hi)`: it is a component for lo <= cut <= hi.
    """
    step = _N_CUTS - pad_frame(levels, 0)  # u joins at cut u - 1, i.e. step 255 - u; 0 never (255)
    tree = component_tree(step, 8)
    lo, hi = _N_CUTS - tree.death, _N_CUTS - 1 - tree.birth
    return tree, lo.astype(np.int64), hi.astype(np.int64)


def _background_tree(levels: np.ndarray) -> Tree:
    """4-connected components of ``{levels <= cut}`` as the cut rises from 0 to 254."""
    return component_tree(pad_frame(levels, _N_CUTS), 4)  # u joins at step u; 255 never


def _padded_shape(levels: np.ndarray) -> tuple[int, int, int]:
    n, h, w = levels.shape
    return n, h + 2, w + 2


def _fill_levels(levels: np.ndarray, background: Tree) -> np.ndarray:
    """Hole-filled levels g: ``{g > cut}`` is ``{levels > cut}`` with its holes filled.

    A pixel leaves the filled set at the first cut at which its background component reaches
    the image edge: the birth of the first edge-touching node on its path to the root.
    """
    at_edge = node_values(background, _padded_shape(levels), ["at_edge"])["at_edge"] > 0
    # Roots point to themselves.
    jump = np.where(at_edge, np.arange(at_edge.size), background.parent)
    while True:
        further = jump[jump]
        if np.array_equal(further, jump):
            break
        jump = further
    leaves_at = np.where(at_edge[jump], background.birth[jump], _N_CUTS)
    entry = background.entry_node.reshape(levels.shape[0], levels.shape[1] + 2, -1)[:, 1:-1, 1:-1]
    return np.where(entry >= 0, leaves_at[np.maximum(entry, 0)], _N_CUTS).astype(np.int16)


def _area_weights(filled: np.ndarray) -> np.ndarray:
    """Per pixel, how many 2×2 windows it completes as third or fourth corner.

    Summed over a filled component at a cut this is ``2 · n4 + n3`` = twice its contour area.
    Corners join the filled set in decreasing order of `filled`, so a window's third and fourth
    corners are its two lowest (ties broken by corner order: tied corners join together).

    **Arguments:** `filled`: `(n, H, W)` hole-filled levels.

    **Returns:** `(n, H + 2, W + 2)` int64, framed by zeros like the sweep's arrays.
    """
    low, high = slice(None, -1), slice(1, None)
    corners = [(low, low), (low, high), (high, low), (high, high)]  # TL TR BL BR
    v = [filled[:, rows, cols] for rows, cols in corners]
    # before[(a, b)]: corner a precedes corner b.
    before = {(a, b): (v[a] <= v[b]).view(np.uint8) for a in range(4) for b in range(a + 1, 4)}
    rank = [sum(before[(a, c)] if a < c else 1 - before[(c, a)] for a in range(4) if a != c)
            for c in range(4)]
    n, h, w = filled.shape
    weights = np.zeros((n, h + 2, w + 2), np.int64)
    inner = weights[:, 1:-1, 1:-1]
    for c, (rows, cols) in enumerate(corners):
        inner[:, rows, cols] += rank[c] <= 1  # among the window's two lowest corners
    return weights


# ----------------------------------------------------------------------------
# Per-cut results
# ----------------------------------------------------------------------------


def _range_max(row: np.ndarray, lo: np.ndarray, hi: np.ndarray, value: np.ndarray, n_rows: int,
               fill: float) -> np.ndarray:
    """``table[r, c]`` = max of `value[i]` over items with ``row[i] == r`` and
    ``lo[i] <= c <= hi[i]``.

    Sparse table: each interval is covered by two power-of-two blocks; block maxima are pushed
    down to single cuts. `(n_rows, _N_LEVELS)`, `fill` where no item covers a cell.
    """
    depth = int(np.log2(_N_LEVELS))
    block = np.floor(np.log2(hi - lo + 1)).astype(np.int64)  # two blocks of 2**block cover [lo, hi]
    table = np.full((depth + 1) * n_rows * _N_LEVELS, fill, dtype=np.result_type(value, type(fill)))
    base = (block * n_rows + row) * _N_LEVELS
    np.maximum.at(table, base + lo, value)
    np.maximum.at(table, base + hi - (1 << block) + 1, value)
    table = table.reshape(depth + 1, n_rows, _N_LEVELS)
    for j in range(depth, 0, -1):
        starts = _N_LEVELS - (1 << j) + 1
        half = 1 << (j - 1)
        np.maximum(table[j - 1, :, :starts], table[j, :, :starts], out=table[j - 1, :, :starts])
        second = table[j - 1, :, half : half + starts]
        np.maximum(second, table[j, :, :starts], out=second)
    return table[0]


def _largest_contour_iou(levels: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """V1: `(n, _N_LEVELS)` IoU of the largest contour's box at each cut (-1: no contour)."""
    n, h, w = levels.shape
    filled = _fill_levels(levels, _background_tree(levels))
    tree, lo, hi = _foreground_tree(filled)
    values = node_values(tree, _padded_shape(levels), [*_BOX, "first_pixel", "weight"],
                         _area_weights(filled))
    # Rank nodes by image, then area, then first pixel: the max rank alive is OpenCV's choice.
    order = np.lexsort((values["first_pixel"], values["weight"], tree.image))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    winner = _range_max(tree.image, lo, hi, rank, n, -1)
    boxes = contour_boxes(*[values[k] for k in _BOX], h, w)
    iou = _best_iou(boxes, gt[tree.image], valid[tree.image])
    return np.where(winner >= 0, iou[order[np.maximum(winner, 0)]] if order.size else -1.0, -1.0)


def _all_contours_iou(levels: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """V2: `(n, _N_LEVELS)` best IoU over every contour's box at each cut (-1: no contour)."""
    n, h, w = levels.shape
    fg, fg_lo, fg_hi = _foreground_tree(levels)
    bg = _background_tree(levels)
    fg_values = node_values(fg, _padded_shape(levels), _BOX)
    bg_values = node_values(bg, _padded_shape(levels), [*_BOX, "at_edge"])
    hole = bg_values["at_edge"] == 0
    x0, y0, x1, y1 = [bg_values[k][hole] for k in _BOX]
    boxes = np.concatenate([
        contour_boxes(*[fg_values[k] for k in _BOX], h, w),
        contour_boxes(x0 - 1, y0 - 1, x1 + 1, y1 + 1, h, w),  # a hole's border runs one pixel out
    ])  # fmt: skip
    image = np.concatenate([fg.image, bg.image[hole]])
    # A hole exists at cuts birth .. death - 1.
    lo = np.concatenate([fg_lo, bg.birth[hole].astype(np.int64)])
    hi = np.concatenate([fg_hi, bg.death[hole].astype(np.int64) - 1])
    return _range_max(image, lo, hi, _best_iou(boxes, gt[image], valid[image]), n, -1.0)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def _thresholds(cam_curve_interval: float) -> np.ndarray:
    if not 0 < cam_curve_interval < 1:
        raise ValueError(f"cam_curve_interval must be in (0, 1), got {cam_curve_interval}")
    return np.arange(0, 1, cam_curve_interval)


def _deltas(iou_thresholds: Sequence[float]) -> np.ndarray:
    deltas = np.asarray(iou_thresholds, np.float64).reshape(-1)
    if deltas.size == 0 or ((deltas <= 0) | (deltas > 1)).any():
        raise ValueError("iou_thresholds must be fractions in (0, 1] (0.5, not 50), got "
                         f"{iou_thresholds}")
    return deltas


def box_hits(
    cams: Any,
    gt_boxes: Any,
    *,
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    cam_curve_interval: float = 0.001,
    multi_contour: bool = False,
) -> np.ndarray:
    """Number of images localised correctly at each (δ, τ): the additive part of MaxBoxAcc.

    Sum it over the batches of a dataset, then `MaxBoxAcc.from_hits` (or use `BoxAccumulator`).

    **Arguments:**

    - `cams`: `(N, H, W)` real CAMs at image resolution (NumPy or JAX; normalised here as
      `jaxmed.explain.normalize_cams` does).
    - `gt_boxes`: a sequence of `N` arrays `(k_i, 4)`, or an `(N, K, 4)` array padded with rows of
      -1, or `(N, 4)` for one box each: ``[x0, y0, x1, y1]`` in pixels, inclusive, at least one
      per image.
    - `iou_thresholds`: the δ values, as fractions.
    - `cam_curve_interval`: τ runs over ``np.arange(0, 1, cam_curve_interval)``.
    - `multi_contour`: False for MaxBoxAcc (largest contour), True for MaxBoxAccV2 (all contours).

    **Returns:**

    `(n_δ, n_τ)` int64 counts of images whose best IoU at τ is ``>= δ``.
    """
    levels, peak = cam_levels(cams)
    if levels.ndim != 3:
        raise ValueError(f"cams must have shape (N, H, W), got {levels.shape}")
    n, h, w = levels.shape
    gt, valid = _gt_array(gt_boxes, n)
    thresholds, deltas = _thresholds(cam_curve_interval), _deltas(iou_thresholds)
    hits = np.zeros((deltas.size, thresholds.size), np.int64)
    per_chunk = max(1, _CHUNK_PIXELS // ((h + 2) * (w + 2)))
    for start in range(0, n, per_chunk):
        part = slice(start, start + per_chunk)
        best = _best_iou_per_cut(levels[part], gt[part], valid[part], multi_contour)  # [c, 256]
        cut = threshold_level(thresholds[None, :], peak[part, None])  # [c, n_τ]
        at_tau = np.take_along_axis(best, cut, axis=1)  # [c, n_τ]
        hits += (at_tau[None] >= deltas[:, None, None]).sum(axis=1)
    return hits


def _best_iou_per_cut(levels: np.ndarray, gt: np.ndarray, valid: np.ndarray,
                      multi_contour: bool) -> np.ndarray:
    """`(n, _N_LEVELS)` best IoU of the estimated boxes at each cut, the empty box where none."""
    per_cut = (_all_contours_iou if multi_contour else _largest_contour_iou)(levels, gt, valid)
    empty = _best_iou(np.repeat(EMPTY_BOX, len(levels), axis=0), gt, valid)  # [n]
    return np.where(per_cut >= 0, per_cut, empty[:, None])


class BoxAccumulator:
    """MaxBoxAcc over a dataset evaluated batch by batch.

        acc = BoxAccumulator(iou_thresholds=(0.3, 0.5, 0.7), multi_contour=True)  # V2
        for cams, boxes in batches:
            acc.update(cams, boxes)
        result = acc.result()  # result.accuracy, result.mean

    **Arguments:** as `box_hits`.
    """

    def __init__(self, *, iou_thresholds: Sequence[float] = (0.5, 0.7),
                 cam_curve_interval: float = 0.001, multi_contour: bool = False):
        self.iou_thresholds = tuple(float(d) for d in _deltas(iou_thresholds))
        self.cam_curve_interval = cam_curve_interval
        self.multi_contour = multi_contour
        self.thresholds = _thresholds(cam_curve_interval)
        self.hits = np.zeros((len(self.iou_thresholds), self.thresholds.size), np.int64)
        self.num_images = 0

    def update(self, cams: Any, gt_boxes: Any) -> None:
        """Adds a batch: `cams` `(B, H, W)` and its ground-truth boxes (see `box_hits`)."""
        self.hits += box_hits(
            cams, gt_boxes, iou_thresholds=self.iou_thresholds,
            cam_curve_interval=self.cam_curve_interval, multi_contour=self.multi_contour,
        )  # fmt: skip
        self.num_images += int(np.shape(cams)[0])

    def result(self) -> MaxBoxAcc:
        """The MaxBoxAcc of every image added so far."""
        return MaxBoxAcc.from_hits(self.hits, self.num_images, self.iou_thresholds, self.thresholds)


def max_box_acc(
    cams: Any,
    gt_boxes: Any,
    *,
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    cam_curve_interval: float = 0.001,
    multi_contour: bool = False,
) -> MaxBoxAcc:
    """MaxBoxAcc (``multi_contour=False``) or MaxBoxAccV2 (``True``) of a set of CAMs.

    Equal to the reference protocol's numbers (clovaai/wsolevaluation `BoxEvaluator`); V2 as
    published uses ``iou_thresholds=(0.3, 0.5, 0.7)`` and reports `MaxBoxAcc.mean`.

    **Arguments:** as `box_hits`.

    **Returns:**

    `MaxBoxAcc`: accuracy (%) and best τ per δ, and the `(n_δ, n_τ)` curve.
    """
    acc = BoxAccumulator(iou_thresholds=iou_thresholds, cam_curve_interval=cam_curve_interval,
                         multi_contour=multi_contour)
    acc.update(cams, gt_boxes)
    return acc.result()
