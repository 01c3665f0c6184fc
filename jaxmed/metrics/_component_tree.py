"""Component trees of a grey-level sweep: the connected components of the growing sets
``{step <= s}`` for every s at once, by one union–find sweep.

Each sweep step adds the pixels of one grey level, and every component that gains pixels
becomes a new tree node (a max-tree when the steps are falling grey levels). A joining pixel
needs one union per group of connected earlier neighbours, not one per neighbour
(`_ring_links`), so a step costs about one edge per joining pixel. Aggregates over each node's
pixels (extents, first pixel, weight sums, touching the edge) come after the sweep
(`node_values`).

Many images are swept together as one tiled array, each framed by one pixel that never joins
(`pad_frame`), so the only Python loop in the hot path is over the 255 steps. Host-side
NumPy/SciPy. `jaxmed.metrics._wsol` builds MaxBoxAcc on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

N_STEPS = 255  # sweep steps 0..254 of uint8 step arrays; a pixel at step 255 never joins


class Tree(NamedTuple):
    """Nodes of a component tree: one per (component, sweep step at which it last changed).

    A node is born at step `birth` and exists until the step `death` at which it merges into a
    larger node (`N_STEPS` if it never does). Nodes are numbered in order of birth.
    """

    image: np.ndarray
    birth: np.ndarray
    death: np.ndarray
    parent: np.ndarray  # the node it merged into (itself if it never did)
    entry_node: np.ndarray  # per padded pixel: the node it joined (-1: never)


def pad_frame(values: np.ndarray, fill: int) -> np.ndarray:
    """`(n, H, W)` → `(n, H + 2, W + 2)` uint8 framed by `fill`: no pixel neighbours another
    image."""
    n, h, w = values.shape
    out = np.full((n, h + 2, w + 2), fill, np.uint8)
    out[:, 1:-1, 1:-1] = values
    return out


def _find_roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Roots of `nodes`; every node walked through is then pointed at its root (path
    compression)."""
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
        # One edge per group that has an edge-taking pixel: to its lowest ring position.
        members = {g: [m for m in group if group[m] == g and takes_edge[m]]
                   for g in set(group.values())}
        edges = sorted({min(m) for m in members.values() if m})
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
    return _Edges(n_links > 0, order + link_shift[pattern, 0], extra_pixel[by_pixel],
                  extra_target[by_pixel])


class _Sweep:
    """Union–find over the pixels of a chunk, one step at a time (see `component_tree`).

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
        self.death = np.full(n_nodes, N_STEPS, np.int16)
        self.label = np.full(n_pixels, -1, np.int64)  # a pixel's component id (maybe merged since)
        self.entry_node = np.full(n_pixels, -1, np.int64)
        self.slot = np.zeros(n_nodes, np.int64)  # scratch: a component's index in one step's graph

    def merge(self, step: int, new: np.ndarray, has_first: np.ndarray, first_target: np.ndarray,
              extra_local: np.ndarray, extra_target: np.ndarray) -> None:
        """Adds the pixels `new` joining at `step`, with their edges (see `_Edges`; local
        indices)."""
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
        extra_ends = np.stack([extra_local, target_node[n_first:]], axis=1)  # [n_extra, 2]
        indices = np.concatenate([target_node[:n_first], extra_ends.ravel()])
        row_length = np.concatenate([has_first, np.zeros(m, np.int64), np.full(n_extra, 2)])
        n = k + m + n_extra
        row_start = np.concatenate([[0], np.cumsum(row_length)])
        graph = sparse.csr_matrix((np.ones(indices.size), indices, row_start), shape=(n, n))
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


def component_tree(step: np.ndarray, connectivity: int) -> Tree:
    """Component tree of the growing sets ``{step <= s}``, s = 0 .. `N_STEPS` - 1.

    **Arguments:**

    - `step`: `(n, H + 2, W + 2)` uint8, the sweep step at which each pixel joins (255: never;
      the frame must be 255).
    - `connectivity`: 4 or 8.

    **Returns:**

    The `Tree`.
    """
    flat = step.ravel()
    order = np.argsort(flat, kind="stable")  # a one-pass radix sort on uint8
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=N_STEPS + 1)[:N_STEPS])])
    order = order[: bounds[-1]]  # the pixels that join, by step
    edges = _sweep_edges(step, order, connectivity)
    extra_bounds = np.searchsorted(edges.extra_pixel, bounds)
    sweep = _Sweep(order.size, flat.size)
    for s in range(N_STEPS):
        if bounds[s + 1] > bounds[s]:
            span = slice(bounds[s], bounds[s + 1])
            extra = slice(extra_bounds[s], extra_bounds[s + 1])
            extra_local = edges.extra_pixel[extra] - bounds[s]
            sweep.merge(s, order[span], edges.has_first[span], edges.first_target[span],
                        extra_local, edges.extra_target[extra])
    c = sweep.count
    image = np.empty(c, np.int64)
    # Every node has pixels of its own.
    image[sweep.entry_node[order]] = order // (step.shape[1] * step.shape[2])
    return Tree(image, sweep.birth[:c], sweep.death[:c], sweep.merged_into[:c], sweep.entry_node)


# Per-node aggregates: how values combine (over a node's own pixels and the nodes merged into it).
COMBINE = {"x0": np.minimum, "y0": np.minimum, "x1": np.maximum, "y1": np.maximum,
            "first_pixel": np.minimum, "weight": np.add, "at_edge": np.maximum}  # fmt: skip


def node_values(tree: Tree, shape: tuple[int, int, int], names: Sequence[str],
                weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Aggregates over each node's pixels: extents, first pixel, weight sum, touching the edge.

    A node's pixels are those that joined it plus those of the nodes that merged into it, so
    each node first takes its own pixels (one scatter over all pixels), then the nodes dying at
    each step are folded into their parents, in step order.

    **Arguments:**

    - `tree`: from `component_tree` on a `shape` = `(n, H + 2, W + 2)` padded array.
    - `names`: keys of `COMBINE`; `weight`: `shape` integer pixel weights, for "weight".

    **Returns:**

    `{name: (n_nodes,) array}`; extents in unpadded pixel coordinates.
    """
    n, frame_h, frame_w = shape
    grid = {"x": np.arange(frame_w) - 1, "y": (np.arange(frame_h) - 1)[:, None]}
    height, width = frame_h - 2, frame_w - 2
    pixel = {
        "x0": lambda: grid["x"], "x1": lambda: grid["x"],
        "y0": lambda: grid["y"], "y1": lambda: grid["y"],
        "first_pixel": lambda: np.arange(n * frame_h * frame_w).reshape(shape),
        "weight": lambda: np.reshape(weight, shape),
        "at_edge": lambda: ((grid["x"] == 0) | (grid["x"] == width - 1)
                            | (grid["y"] == 0) | (grid["y"] == height - 1)),
    }  # fmt: skip
    n_nodes = tree.birth.size
    slot = np.where(tree.entry_node >= 0, tree.entry_node, n_nodes)  # pixels never in: a spare slot
    values = {}
    for name in names:
        own = np.broadcast_to(pixel[name](), shape).ravel().astype(np.int64)
        combine = COMBINE[name]
        start = {np.minimum: np.iinfo(np.int64).max, np.maximum: np.iinfo(np.int64).min,
                 np.add: 0}[combine]
        values[name] = np.full(n_nodes + 1, start, np.int64)
        combine.at(values[name], slot, own)
    dying = np.argsort(tree.death, kind="stable")
    died = np.concatenate([[0], np.cumsum(np.bincount(tree.death, minlength=N_STEPS + 1))])
    for s in range(N_STEPS):
        children = dying[died[s] : died[s + 1]]
        if children.size:
            for name in names:
                COMBINE[name].at(values[name], tree.parent[children], values[name][children])
    return {name: v[:n_nodes] for name, v in values.items()}
