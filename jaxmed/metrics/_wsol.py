"""MaxBoxAcc and MaxBoxAccV2 (Choe et al., CVPR 2020, clovaai/wsolevaluation), exact and fast.

The protocol (box conventions in `jaxmed.explain._boxes`): each CAM is min–max normalised,
truncated to uint8 ``u`` and binarised at every τ in ``arange(0, 1, interval)`` with
``u > int(τ · 255)``; the boxes of the binary map's OpenCV contours (V1: the largest contour
only; V2: all contours) are compared with the image's ground-truth boxes. An image is correct at
(τ, δ) when the best IoU over (estimated × ground-truth boxes) is ``>= δ``; the accuracy at δ is
the best over τ of the percentage of correct images. The numbers (curves included) equal the
per-image, per-threshold OpenCV reference's (`benchmarks/_wsol_reference.py`) exactly.

How, without tracing contours 1 000 times per image:

- The cut ``int(τ · 255)`` takes at most 255 values, and as it falls the foreground components
  only grow and merge. One sweep over the grey levels with a union–find builds all of them at
  every cut (a max-tree): each step adds the pixels of one grey level, and every component that
  gains pixels becomes a new tree node. A second sweep, upwards over the background with
  4-connectivity, gives the holes (background components off the image edge).
- A joining pixel needs one union per group of connected earlier neighbours, not one per
  neighbour (`_ring_links`), so a step costs about one edge per joining pixel.
- Each node's box is aggregated after the sweep; its IoU is computed once and spread over the
  cuts where the node exists with a sparse-table range maximum.
- V1's largest contour is the top-level component of largest filled area (holes filled; ties
  go to the component whose first pixel comes last in raster order, OpenCV's order). Its area,
  ``n4 + n3 / 2`` over 2×2 windows, is a per-pixel weight summed over the component: a window
  adds ½ as its third corner joins the filled set and ½ with its fourth.

All images of a chunk are swept together as one tiled array (one pixel of frame apart), so the
only Python loop in the hot path is over the 255 grey levels — not thresholds, images or pixels.
Host-side NumPy/SciPy; OpenCV is not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from jaxmed.explain._boxes import EMPTY_BOX, cam_levels, contour_boxes, threshold_level

__all__ = ["BoxAccumulator", "MaxBoxAcc", "box_hits", "max_box_acc"]

_N_CUTS = 255  # int(τ · 255) for τ in [0, 1) takes the values 0..254
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
    def from_hits(cls, hits: np.ndarray, num_images: int, iou_thresholds: Sequence[float], thresholds: np.ndarray) -> MaxBoxAcc:
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
        raise ValueError(f"gt_boxes must give (k_i, 4) boxes for each of the {num_images} CAMs, got {boxes.shape}")
    boxes = boxes.astype(np.int64 if np.issubdtype(boxes.dtype, np.integer) else np.float64)
    valid = ~(boxes == -1).all(axis=2)
    _check_gt(boxes, valid)
    return boxes, valid


def _check_gt(boxes: np.ndarray, valid: np.ndarray) -> None:
    """The reference's checks: every image has a box; boxes are x0y0x1y1, non-negative."""
    empty = np.flatnonzero(~valid.any(axis=1))
    if empty.size:
        raise ValueError(f"image {empty[0]} has no ground-truth box (rows of -1 are padding)")
    bad = valid & ((boxes < 0).any(axis=2) | (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1]))
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise ValueError(f"image {i}, ground-truth box {k} = {boxes[i, k].tolist()} is not [x0, y0, x1, y1] with 0 <= x0 <= x1, 0 <= y0 <= y1")


def _best_iou(boxes: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Best IoU of each box over its image's ground-truth boxes, on inclusive pixels (+1).

    **Arguments:**

    - `boxes`: `(S, 4)` estimated ``[x0, y0, x1, y1]``.
    - `gt`: `(S, K, 4)` the ground-truth boxes of each box's image; `valid`: `(S, K)`.

    **Returns:**

    `(S,)` float64, the reference's arithmetic (0 where the union is not positive).
    """
    box = boxes[:, None, :]  # [S, 1, 4]
    width = np.maximum(0, np.minimum(box[..., 2], gt[..., 2]) - np.maximum(box[..., 0], gt[..., 0]) + 1)
    height = np.maximum(0, np.minimum(box[..., 3], gt[..., 3]) - np.maximum(box[..., 1], gt[..., 1]) + 1)
    inter = width * height  # [S, K]
    area_box = (box[..., 2] - box[..., 0] + 1) * (box[..., 3] - box[..., 1] + 1)
    area_gt = (gt[..., 2] - gt[..., 0] + 1) * (gt[..., 3] - gt[..., 1] + 1)
    union = area_box + area_gt - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return np.where(valid, iou, -np.inf).max(axis=1)


# ----------------------------------------------------------------------------
# Component trees: one union–find sweep over the grey levels
# ----------------------------------------------------------------------------


class _Tree(NamedTuple):
    """Nodes of a component tree: one per (component, sweep step at which it last changed).

    A node is born at step `birth` and exists until the step `death` at which it merges into a
    larger node (`_N_CUTS` if it never does). Nodes are numbered in order of birth.
    """

    image: np.ndarray
    birth: np.ndarray
    death: np.ndarray
    parent: np.ndarray  # the node it merged into (itself if it never did)
    entry_node: np.ndarray  # per padded pixel: the node it joined (-1: never)


def _pad(values: np.ndarray, fill: int) -> np.ndarray:
    """`(n, H, W)` → `(n, H + 2, W + 2)` uint8 framed by `fill`: no pixel neighbours another image."""
    n, h, w = values.shape
    out = np.full((n, h + 2, w + 2), fill, np.uint8)
    out[:, 1:-1, 1:-1] = values
    return out


def _find_roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Roots of `nodes`; every node walked through is then pointed at its root (path compression)."""
    roots = nodes.copy()
    pending = np.arange(nodes.size)
    walked, walked_by = [], []
    while pending.size:
        current = roots[pending]
        up = parent[current]
        moving = up != current
        pending, current = pending[moving], current[moving]
        walked.append(current)
        walked_by.append(pending)
        roots[pending] = up[moving]
    for node, by in zip(walked, walked_by):
        parent[node] = roots[by]
    return roots


# The 8 pixels around a pixel, in cyclic order.
_RING = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]


def _ring_links(connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of the 256 subsets of the ring, one ring position per group of subset pixels
    certainly connected to each other through the subset.

    A pixel joining the sweep only needs one edge to each such group among its neighbours that
    joined before it: the other edges would link pixels already in one component. Under
    4-connectivity the corner pixels only connect groups; they take no edge.

    **Returns:** `(count, position)`: `(256,)` number of edges and `(256, 4)` ring positions.
    """

    def linked(a: int, b: int) -> bool:
        dy, dx = abs(_RING[a][0] - _RING[b][0]), abs(_RING[a][1] - _RING[b][1])
        return dy + dx == 1 if connectivity == 4 else max(dy, dx) == 1

    takes_edge = [connectivity == 8 or abs(dy) + abs(dx) == 1 for dy, dx in _RING]
    count, position = np.zeros(256, np.int64), np.zeros((256, 4), np.int64)
    for subset in range(256):
        group = {i: i for i in range(8) if subset >> i & 1}
        for i in group:  # tiny union–find over at most 8 ring pixels
            for j in group:
                if linked(i, j) and group[i] != group[j]:
                    old, new = group[j], group[i]
                    group = {m: new if g == old else g for m, g in group.items()}
        edges = sorted({min(m for m in group if group[m] == g and takes_edge[m]) for g in set(group.values()) if any(takes_edge[m] for m in group if group[m] == g)})
        count[subset] = len(edges)
        position[subset, : len(edges)] = edges
    return count, position


_LINKS = {4: _ring_links(4), 8: _ring_links(8)}


class _Edges(NamedTuple):
    """The edges to process when each pixel joins the sweep (pixels in sweep order).

    Every pixel has at most one "first" edge (`first_target`, where `has_first`); the few
    pixels with more get the rest as `extra_pixel` (position in the order) → `extra_target`,
    sorted by position.
    """

    has_first: np.ndarray
    first_target: np.ndarray
    extra_pixel: np.ndarray
    extra_target: np.ndarray


def _sweep_edges(step: np.ndarray, order: np.ndarray, connectivity: int) -> _Edges:
    """Edges ``(p, q)`` to process when pixel p joins: q a neighbour that joined before it.

    "Before" is an earlier step, or the same step and a smaller flat index. One edge per group
    of such neighbours (`_ring_links`): about one edge per pixel instead of one per neighbour.
    """
    _, frame_w = step.shape[1:]
    flat = step.ravel()
    shifts = np.array([dy * frame_w + dx for dy, dx in _RING])
    inner = slice(frame_w + 1, flat.size - frame_w - 1)  # pixels whose ring is inside the array
    centre = flat[inner]
    pattern = np.zeros(flat.size, np.uint8)
    for i, shift in enumerate(shifts):
        other = flat[frame_w + 1 + shift : flat.size - frame_w - 1 + shift]
        before = (other < centre) if shift > 0 else (other <= centre)  # ties: smaller index first
        pattern[inner] |= before.view(np.uint8) << i
    count, position = _LINKS[connectivity]
    pattern = pattern[order]
    n_links = count[pattern]
    link_shift = shifts[position]  # [256, 4] flat offsets of each subset's links
    extra_pixel, extra_target = [], []
    for nth in range(1, 4):
        more = np.flatnonzero(n_links > nth)
        extra_pixel.append(more)
        extra_target.append(order[more] + link_shift[pattern[more], nth])
    extra_pixel, extra_target = np.concatenate(extra_pixel), np.concatenate(extra_target)
    by_pixel = np.argsort(extra_pixel, kind="stable")
    return _Edges(n_links > 0, order + link_shift[pattern, 0], extra_pixel[by_pixel], extra_target[by_pixel])


class _Sweep:
    """Union–find over the pixels of a chunk, one step at a time (see `_component_tree`).

    Every step, each component that gains pixels becomes a new tree node; the nodes it was made
    of "die" into it. The union–find itself works on component ids (a component keeps its id
    while it grows; a merge keeps one of the ids), so its paths only lengthen at merges.
    """

    def __init__(self, n_nodes: int, n_pixels: int):
        self.count = 0
        self.component_parent = np.arange(n_nodes)  # union–find over component ids (= birth nodes)
        self.current_node = np.arange(n_nodes)  # a component id's latest node
        self.merged_into = np.arange(n_nodes)  # the tree: the node each node merged into
        self.birth = np.zeros(n_nodes, np.int16)
        self.death = np.full(n_nodes, _N_CUTS, np.int16)
        self.label = np.full(n_pixels, -1, np.int64)  # a pixel's component id (maybe merged since)
        self.entry_node = np.full(n_pixels, -1, np.int64)
        self.slot = np.zeros(n_nodes, np.int64)  # scratch: a component's index in one step's graph

    def merge(self, step: int, new: np.ndarray, has_first: np.ndarray, first_target: np.ndarray, extra_local: np.ndarray, extra_target: np.ndarray) -> None:
        """Adds the pixels `new` joining at `step`, with their edges (see `_Edges`; local indices)."""
        k = new.size
        self.label[new] = -2 - np.arange(k)  # marks pixels joining now by their local index
        targets = np.concatenate([first_target[has_first], extra_target])
        there = self.label[targets]
        old = there >= 0
        roots = _find_roots(self.component_parent, there[old])
        serial = np.arange(roots.size)
        self.slot[roots] = serial  # deduplicate without sorting
        unique_roots = roots[self.slot[roots] == serial]
        m = unique_roots.size
        self.slot[unique_roots] = k + serial[:m]
        target_node = -2 - there  # graph nodes: pixels joining now, the components they touch,
        target_node[old] = self.slot[roots]  # then one node per extra edge, linking its two ends
        n_extra = extra_target.size
        n_first = targets.size - n_extra
        indices = np.concatenate([target_node[:n_first], np.stack([extra_local, target_node[n_first:]], axis=1).ravel()])
        row_length = np.concatenate([has_first, np.zeros(m, np.int64), np.full(n_extra, 2)])
        n = k + m + n_extra
        graph = sparse.csr_matrix((np.ones(indices.size), indices, np.concatenate([[0], np.cumsum(row_length)])), shape=(n, n))
        # Components are numbered by their lowest node, and an extra-edge node's component holds
        # a pixel joining now: the first k + m nodes already use every number.
        n_new, component = csgraph.connected_components(graph, directed=False)
        component = component[: k + m]
        nodes = self.count + np.arange(n_new)
        survivor = nodes.copy()  # a new component's id is its first node
        survivor[component[k:]] = unique_roots  # a growing one keeps (one of) its ids
        self.birth[nodes] = step
        old_nodes = self.current_node[unique_roots]
        self.merged_into[old_nodes] = nodes[component[k:]]
        self.death[old_nodes] = step
        self.component_parent[unique_roots] = survivor[component[k:]]
        self.current_node[survivor] = nodes
        self.label[new] = survivor[component[:k]]
        self.entry_node[new] = nodes[component[:k]]
        self.count += n_new


def _component_tree(step: np.ndarray, connectivity: int) -> _Tree:
    """Component tree of the growing sets ``{step <= s}``, s = 0 .. `_N_CUTS` - 1.

    **Arguments:**

    - `step`: `(n, H + 2, W + 2)` uint8, the sweep step at which each pixel joins (255: never;
      the frame must be 255).
    - `connectivity`: 4 or 8.

    **Returns:**

    The `_Tree`.
    """
    flat = step.ravel()
    order = np.argsort(flat, kind="stable")  # a one-pass radix sort on uint8
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=_N_CUTS + 1)[:_N_CUTS])])
    order = order[: bounds[-1]]  # the pixels that join, by step
    edges = _sweep_edges(step, order, connectivity)
    extra_bounds = np.searchsorted(edges.extra_pixel, bounds)
    sweep = _Sweep(order.size, flat.size)
    for s in range(_N_CUTS):
        if bounds[s + 1] > bounds[s]:
            span, extra = slice(bounds[s], bounds[s + 1]), slice(extra_bounds[s], extra_bounds[s + 1])
            extra_local = edges.extra_pixel[extra] - bounds[s]
            sweep.merge(s, order[span], edges.has_first[span], edges.first_target[span], extra_local, edges.extra_target[extra])
    c = sweep.count
    image = np.empty(c, np.int64)
    image[sweep.entry_node[order]] = order // (step.shape[1] * step.shape[2])  # every node has pixels of its own
    return _Tree(image, sweep.birth[:c], sweep.death[:c], sweep.merged_into[:c], sweep.entry_node)


# Per-node aggregates: how values combine (over a node's own pixels and the nodes merged into it).
_COMBINE = {"x0": np.minimum, "y0": np.minimum, "x1": np.maximum, "y1": np.maximum,
            "first_pixel": np.minimum, "weight": np.add, "at_edge": np.maximum}  # fmt: skip
_BOX = ("x0", "y0", "x1", "y1")


def _node_values(tree: _Tree, shape: tuple[int, int, int], names: Sequence[str], weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Aggregates over each node's pixels: extents, first pixel, weight sum, touching the edge.

    A node's pixels are those that joined it plus those of the nodes that merged into it, so
    each node first takes its own pixels (one scatter over all pixels), then the nodes dying at
    each step are folded into their parents, in step order.

    **Arguments:**

    - `tree`: from `_component_tree` on a `shape` = `(n, H + 2, W + 2)` padded array.
    - `names`: keys of `_COMBINE`; `weight`: `shape` integer pixel weights, for "weight".

    **Returns:**

    `{name: (n_nodes,) array}`; extents in unpadded pixel coordinates.
    """
    n, frame_h, frame_w = shape
    grid = {"x": np.arange(frame_w) - 1, "y": (np.arange(frame_h) - 1)[:, None]}
    height, width = frame_h - 2, frame_w - 2
    pixel = {
        "x0": lambda: grid["x"], "x1": lambda: grid["x"], "y0": lambda: grid["y"], "y1": lambda: grid["y"],
        "first_pixel": lambda: np.arange(n * frame_h * frame_w).reshape(shape),
        "weight": lambda: np.reshape(weight, shape),
        "at_edge": lambda: (grid["x"] == 0) | (grid["x"] == width - 1) | (grid["y"] == 0) | (grid["y"] == height - 1),
    }  # fmt: skip
    n_nodes = tree.birth.size
    slot = np.where(tree.entry_node >= 0, tree.entry_node, n_nodes)  # pixels never in: a spare slot
    values = {}
    for name in names:
        own = np.broadcast_to(pixel[name](), shape).ravel().astype(np.int64)
        combine = _COMBINE[name]
        start = {np.minimum: np.iinfo(np.int64).max, np.maximum: np.iinfo(np.int64).min, np.add: 0}[combine]
        values[name] = np.full(n_nodes + 1, start, np.int64)
        combine.at(values[name], slot, own)
    dying = np.argsort(tree.death, kind="stable")
    died = np.concatenate([[0], np.cumsum(np.bincount(tree.death, minlength=_N_CUTS + 1))])
    for s in range(_N_CUTS):
        children = dying[died[s] : died[s + 1]]
        if children.size:
            for name in names:
                _COMBINE[name].at(values[name], tree.parent[children], values[name][children])
    return {name: v[:n_nodes] for name, v in values.items()}


def _foreground_tree(levels: np.ndarray) -> tuple[_Tree, np.ndarray, np.ndarray]:
    """8-connected components of ``{levels > cut}`` as the cut falls from 254 to 0.

    **Returns:** the tree and each node's cuts `(lo, hi)`: it is a component for lo <= cut <= hi.
    """
    step = _N_CUTS - _pad(levels, 0)  # u joins at cut u - 1, i.e. step 255 - u; 0 never (255)
    tree = _component_tree(step, 8)
    return tree, (_N_CUTS - tree.death).astype(np.int64), (_N_CUTS - 1 - tree.birth).astype(np.int64)


def _background_tree(levels: np.ndarray) -> _Tree:
    """4-connected components of ``{levels <= cut}`` as the cut rises from 0 to 254."""
    return _component_tree(_pad(levels, _N_CUTS), 4)  # u joins at step u; 255 never


def _padded_shape(levels: np.ndarray) -> tuple[int, int, int]:
    n, h, w = levels.shape
    return n, h + 2, w + 2


def _fill_levels(levels: np.ndarray, background: _Tree) -> np.ndarray:
    """Hole-filled levels g: ``{g > cut}`` is ``{levels > cut}`` with its holes filled.

    A pixel leaves the filled set at the first cut at which its background component reaches
    the image edge: the birth of the first edge-touching node on its path to the root.
    """
    at_edge = _node_values(background, _padded_shape(levels), ["at_edge"])["at_edge"] > 0
    jump = np.where(at_edge, np.arange(at_edge.size), background.parent)  # roots point to themselves
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
    v = [filled[:, :-1, :-1], filled[:, :-1, 1:], filled[:, 1:, :-1], filled[:, 1:, 1:]]  # TL TR BL BR
    before = {(a, b): (v[a] <= v[b]).view(np.uint8) for a in range(4) for b in range(a + 1, 4)}  # a precedes b
    rank = [sum(before[(a, c)] if a < c else 1 - before[(c, a)] for a in range(4) if a != c) for c in range(4)]
    n, h, w = filled.shape
    weights = np.zeros((n, h + 2, w + 2), np.int64)
    inner = weights[:, 1:-1, 1:-1]
    for c, (rows, cols) in enumerate([(slice(None, -1), slice(None, -1)), (slice(None, -1), slice(1, None)),
                                      (slice(1, None), slice(None, -1)), (slice(1, None), slice(1, None))]):  # fmt: skip
        inner[:, rows, cols] += rank[c] <= 1  # among the window's two lowest corners
    return weights


# ----------------------------------------------------------------------------
# Per-cut results
# ----------------------------------------------------------------------------


def _range_max(row: np.ndarray, lo: np.ndarray, hi: np.ndarray, value: np.ndarray, n_rows: int, fill: float) -> np.ndarray:
    """``table[r, c]`` = max of `value[i]` over items with ``row[i] == r`` and ``lo[i] <= c <= hi[i]``.

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
        np.maximum(table[j - 1, :, half : half + starts], table[j, :, :starts], out=table[j - 1, :, half : half + starts])
    return table[0]


def _largest_contour_iou(levels: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """V1: `(n, _N_LEVELS)` IoU of the largest contour's box at each cut (-1: no contour)."""
    n, h, w = levels.shape
    filled = _fill_levels(levels, _background_tree(levels))
    tree, lo, hi = _foreground_tree(filled)
    values = _node_values(tree, _padded_shape(levels), [*_BOX, "first_pixel", "weight"], _area_weights(filled))
    # Rank nodes by image, then area, then first pixel: the max rank alive is OpenCV's choice.
    order = np.lexsort((values["first_pixel"], values["weight"], tree.image))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    winner = _range_max(tree.image, lo, hi, rank, n, -1)
    iou = _best_iou(contour_boxes(*[values[k] for k in _BOX], h, w), gt[tree.image], valid[tree.image])
    return np.where(winner >= 0, iou[order[np.maximum(winner, 0)]] if order.size else -1.0, -1.0)


def _all_contours_iou(levels: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """V2: `(n, _N_LEVELS)` best IoU over every contour's box at each cut (-1: no contour)."""
    n, h, w = levels.shape
    fg, fg_lo, fg_hi = _foreground_tree(levels)
    bg = _background_tree(levels)
    fg_values = _node_values(fg, _padded_shape(levels), _BOX)
    bg_values = _node_values(bg, _padded_shape(levels), [*_BOX, "at_edge"])
    hole = bg_values["at_edge"] == 0
    x0, y0, x1, y1 = [bg_values[k][hole] for k in _BOX]
    boxes = np.concatenate([
        contour_boxes(*[fg_values[k] for k in _BOX], h, w),
        contour_boxes(x0 - 1, y0 - 1, x1 + 1, y1 + 1, h, w),  # a hole's border runs one pixel out
    ])  # fmt: skip
    image = np.concatenate([fg.image, bg.image[hole]])
    lo = np.concatenate([fg_lo, bg.birth[hole].astype(np.int64)])  # a hole exists at cuts birth..death-1
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
        raise ValueError(f"iou_thresholds must be fractions in (0, 1] (0.5, not 50), got {iou_thresholds}")
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
      `jaxmed.explain._boxes.normalize_cams` does).
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


def _best_iou_per_cut(levels: np.ndarray, gt: np.ndarray, valid: np.ndarray, multi_contour: bool) -> np.ndarray:
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

    def __init__(self, *, iou_thresholds: Sequence[float] = (0.5, 0.7), cam_curve_interval: float = 0.001, multi_contour: bool = False):
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
    acc = BoxAccumulator(iou_thresholds=iou_thresholds, cam_curve_interval=cam_curve_interval, multi_contour=multi_contour)
    acc.update(cams, gt_boxes)
    return acc.result()
