"""Libraries of a node's image parts (docs/atlas.md): window search on heat maps, crops, the
libraries on disk, the choice of distinct libraries and their purity on known features.

- `window_means`: the mean heat inside every window position (a box filter).
- `select_windows`: per heat map, the `max_windows` best windows by one of two rules, `'peaks'`
  (local maxima of the window mean) or `'mean'` (mean above a minimum, greedy non-maximum
  suppression); fixed-size outputs, so a whole `[n_nodes, B, H, W]` stack is one jitted call.
- `build_libraries`: one `Library` per node, crops (and their heat) of the activated images at
  the selected windows, with an index of where each crop came from.
- `write_libraries` / `read_libraries`: PNG files plus one `index.csv`, written atomically.
- `library_overlap`, `overlap_matrix`, `choose_distinct`: how much two libraries share, and the
  k candidates whose libraries differ most (greedy max–min).
- `library_purity`: the share of a library's crops that fall on one known feature.
- `overlay`: a crop with its heat in the jet colours, for the files here and the figures.

A window is `(y0, x0)` (its top-left pixel) and a square `size`: it covers rows
`y0 .. y0 + size - 1` and columns `x0 .. x0 + size - 1` of the image.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from matplotlib import colormaps

from jaxmed.data.images import read_image, write_image
from jaxmed.errors import InputDataError

__all__ = [
    "INDEX_COLUMNS", "RULES", "Library", "Windows", "build_libraries", "choose_distinct",
    "greedy_max_min", "library_overlap", "library_purity", "overlap_matrix", "overlay",
    "read_libraries", "select_windows", "window_iou", "window_means", "write_libraries",
]

RULES = ("peaks", "mean")
INDEX_COLUMNS = ("node", "file", "source", "source_name", "y0", "x0", "size", "score",
                 "activation")
INDEX_FILE = "index.csv"
MATCH_IOU = 0.5  # two crops are the same image part when their windows overlap this much
_HEAT_LEVELS = 65535  # the heat of a crop is stored as a 16-bit grey PNG


# ----------------------------------------------------------------------------
# Window search
# ----------------------------------------------------------------------------


def _check_window(size: int, height: int, width: int) -> None:
    if size < 1:
        raise ValueError(f"the window size must be a positive number of pixels, got {size}")
    if size > height or size > width:
        raise ValueError(f"the window of {size}×{size} pixels is larger than the "
                         f"{height}×{width} images; choose a window size of at most "
                         f"{min(height, width)}")


def window_means(heat: jax.Array, size: int) -> jax.Array:
    """The mean heat inside every position of a `size × size` window (a box filter).

    `means[..., y0, x0] = Σ heat[..., y0:y0 + size, x0:x0 + size] / size²`, summed as a column
    sum of `size` pixels and then a row sum of `size` column sums (`lax.reduce_window`), so
    windows with equal contents get exactly equal means (a cumulative-sum box filter would
    differ by rounding from one position to the next and turn a plateau into noise).
    Jit-able.

    **Arguments:**

    - `heat`: `[..., H, W]` heat maps (any leading axes).
    - `size`: the window side in pixels, `1 <= size <= min(H, W)`.

    **Returns:** `[..., H - size + 1, W - size + 1]` float32 means; position `(y0, x0)` is the
    window whose top-left pixel is `(y0, x0)`.

    **Raises:** `ValueError` when the window is larger than the maps.
    """
    heat = jnp.asarray(heat, jnp.float32)
    if heat.ndim < 2:
        raise ValueError(f"window_means: expected [..., H, W] heat maps, got shape {heat.shape}")
    _check_window(size, *heat.shape[-2:])
    lead = (1,) * (heat.ndim - 2)
    ones = (1,) * heat.ndim
    columns = lax.reduce_window(heat, 0.0, lax.add, lead + (size, 1), ones, "VALID")
    sums = lax.reduce_window(columns, 0.0, lax.add, lead + (1, size), ones, "VALID")
    return sums / (size * size)


class Windows(NamedTuple):
    """The windows chosen on each heat map: `max_windows` slots, best first; the valid slots are
    a prefix, the others hold zeros.

    - `y0`, `x0`: `[..., K]` int32 top-left pixel of each window.
    - `score`: `[..., K]` float32 mean heat inside it.
    - `valid`: `[..., K]` bool, whether the slot holds a window.
    """

    y0: jax.Array
    x0: jax.Array
    score: jax.Array
    valid: jax.Array


def window_iou(dy, dx, size_a: int | np.ndarray, size_b: int | np.ndarray | None = None):
    """Intersection over union of two square windows whose top-left corners differ by
    `(dy, dx)` pixels, of sides `size_a` and `size_b` (default: equal sides). Broadcasts; works
    on NumPy and JAX arrays alike."""
    size_b = size_a if size_b is None else size_b
    xp = jnp if isinstance(dy, jax.Array) or isinstance(dx, jax.Array) else np
    # a = [0, size_a), b = [d, d + size_b): overlap = min(size_a, d + size_b) - max(0, d)
    overlap_y = xp.clip(xp.minimum(size_a, dy + size_b) - xp.maximum(0, dy), 0, None)
    overlap_x = xp.clip(xp.minimum(size_a, dx + size_b) - xp.maximum(0, dx), 0, None)
    inter = overlap_y * overlap_x
    return inter / (size_a * size_a + size_b * size_b - inter)


def _range_max(scores: jax.Array, axis: int, low: int, high: int) -> jax.Array:
    """`out[i] = max(scores[i + low .. i + high])` along `axis`, −inf for offsets off the grid."""
    config = [(0, 0, 0)] * scores.ndim
    config[axis] = (-low, high, 0)  # a negative low pad crops: offsets may all be positive
    padded = lax.pad(scores, jnp.array(-jnp.inf, scores.dtype), config)
    window = [1] * scores.ndim
    window[axis] = high - low + 1
    return lax.reduce_window(padded, -jnp.inf, lax.max, window, (1,) * scores.ndim, "VALID")


def _peaks(means: jax.Array, radius: int) -> jax.Array:
    """`[P, Q]` bool: the positions whose mean beats every other within `radius` (Chebyshev),
    an earlier one (row-major) strictly and a later one or equal; so of a plateau of equal
    means only its first position in row-major order is kept."""
    if radius == 0:
        return jnp.ones(means.shape, bool)
    rows = _range_max(means, 1, -radius, radius)  # max over dx in [-r, r]
    earlier = jnp.maximum(_range_max(rows, 0, -radius, -1), _range_max(means, 1, -radius, -1))
    later = jnp.maximum(_range_max(rows, 0, 1, radius), _range_max(means, 1, 1, radius))
    return (means > earlier) & (means >= later)


def _take_best(means: jax.Array, available: jax.Array, size: int, max_windows: int,
               max_overlap: jax.Array | None) -> Windows:
    """Greedily `max_windows` times: the available position of highest mean (the first in
    row-major order among equals), then, when `max_overlap` is given, every position whose
    window overlaps it with IoU > `max_overlap` is no longer available."""
    width = means.shape[1]
    iy, ix = jnp.divmod(jnp.arange(means.size), width)  # [P·Q] row and column of each position
    flat = means.reshape(-1)

    def step(free, _):
        best = jnp.argmax(jnp.where(free, flat, -jnp.inf))  # argmax: first among equals
        valid = free[best]
        free = free & (jnp.arange(flat.size) != best)
        if max_overlap is not None:
            free = free & (window_iou(iy - iy[best], ix - ix[best], size) <= max_overlap)
        found = (jnp.where(valid, iy[best], 0), jnp.where(valid, ix[best], 0),
                 jnp.where(valid, flat[best], 0.0), valid)
        return free, found

    _, (y0, x0, score, valid) = lax.scan(step, available.reshape(-1), None, length=max_windows)
    return Windows(y0.astype(jnp.int32), x0.astype(jnp.int32), score, valid)


@functools.partial(jax.jit, static_argnames=("size", "rule", "max_windows", "radius"))
def select_windows(heat: jax.Array, size: int, *, rule: str = "peaks", min_score=0.0,
                   max_windows: int = 4, radius: int | None = None,
                   max_overlap=0.3) -> Windows:
    """The best windows of each heat map by one of two rules, in fixed-size slots.

    With `means = window_means(heat, size)`:

    - `'peaks'` (default): the local maxima of the window mean. A position is a peak when its
      mean is strictly above `min_score` and beats the mean of every other position within
      `radius` in both directions (`|dy| <= radius` and `|dx| <= radius`, a max filter of side
      `2·radius + 1`; default `radius = ⌈size / 2⌉`, so two peaks' windows overlap by IoU
      < 1/3): an earlier position (row-major) must be strictly lower, a later one lower or
      equal, so of a plateau only its first position counts. The `max_windows` peaks of
      highest mean are kept, equal means in row-major order.
    - `'mean'`: every position whose mean is at least `min_score`, taken greedily best first
      (equal means in row-major order) with non-maximum suppression: a window whose IoU with
      an already taken one exceeds `max_overlap` is dropped; at most `max_windows`.

    A map with no window above the minimum gives no windows. Jitted (`size`, `rule`,
    `max_windows` and `radius` are static); the maps are processed by `jax.vmap`, so a whole
    `[n_nodes, B, H, W]` stack is one call.

    **Arguments:**

    - `heat`: `[..., H, W]` heat maps, e.g. `[n_nodes, B, H, W]` in [0, 1].
    - `size`: the window side in pixels.
    - `rule`: `'peaks'` or `'mean'`.
    - `min_score`: the minimum mean heat of a window (see the rules for strict or not).
    - `max_windows`: the number of slots per map, K.
    - `radius`: the neighbourhood of a peak (`'peaks'`), ≥ 0; 0 makes every position a peak.
    - `max_overlap`: the largest IoU of two windows of one map (`'mean'`).

    **Returns:** `Windows` with `[..., K]` fields.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if max_windows < 1:
        raise ValueError(f"max_windows must be positive, got {max_windows}")
    radius = math.ceil(size / 2) if radius is None else radius
    if radius < 0:
        raise ValueError(f"radius must be at least 0, got {radius}")
    heat = jnp.asarray(heat, jnp.float32)
    means = window_means(heat, size)  # [..., P, Q]

    def one(m):  # m: [P, Q]
        if rule == "peaks":
            return _take_best(m, (m > min_score) & _peaks(m, radius), size, max_windows, None)
        return _take_best(m, m >= min_score, size, max_windows, jnp.asarray(max_overlap))

    flat = means.reshape(-1, *means.shape[-2:])  # [maps, P, Q]
    found = jax.vmap(one)(flat)
    return Windows(*(field.reshape(*means.shape[:-2], max_windows) for field in found))


# ----------------------------------------------------------------------------
# Libraries
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Library:
    """The image parts of one node: crops of the images that activate it, with an index.

    Row k of every field describes crop k; crops are in decreasing `score` order.

    - `node`: the node's name, e.g. `'fc:7'`.
    - `crops`: `[n, s, s, 3]` uint8 image crops.
    - `heat`: `[n, s, s]` float32 the node's heat map inside each crop.
    - `source`: `[n]` int index of the image the crop came from.
    - `source_name`: n names of those images (a path, or `'image 12'`).
    - `y0`, `x0`, `size`: `[n]` int the window (top-left pixel and side) in that image.
    - `score`: `[n]` float32 the window's mean heat.
    - `activation`: `[n]` float32 the node's activation on the source image.
    """

    node: str
    crops: np.ndarray
    heat: np.ndarray
    source: np.ndarray
    source_name: list[str]
    y0: np.ndarray
    x0: np.ndarray
    size: np.ndarray
    score: np.ndarray
    activation: np.ndarray

    def __len__(self) -> int:
        return len(self.source)

    @property
    def crop_size(self) -> int:
        """The side of the crops, s."""
        return self.crops.shape[1]

    def take(self, indices) -> Library:
        """The library of the crops at `indices` (an int array or slice), in that order."""
        indices = np.arange(len(self))[indices]
        return Library(self.node, self.crops[indices], self.heat[indices], self.source[indices],
                       [self.source_name[i] for i in indices], self.y0[indices],
                       self.x0[indices], self.size[indices], self.score[indices],
                       self.activation[indices])

    @classmethod
    def empty(cls, node: str, size: int) -> Library:
        """A library with no crops, of crops `size × size`."""
        ints = np.zeros(0, np.int64)
        floats = np.zeros(0, np.float32)
        return cls(node, np.zeros((0, size, size, 3), np.uint8),
                   np.zeros((0, size, size), np.float32), ints, [], ints, ints, ints, floats,
                   floats)


def _gather_windows(arrays: np.ndarray, source: np.ndarray, y0: np.ndarray, x0: np.ndarray,
                    size: int) -> np.ndarray:
    """`[n, size, size, ...]`: `arrays[source[i], y0[i]:y0[i] + size, x0[i]:x0[i] + size]`."""
    offsets = np.arange(size)
    rows = (y0[:, None] + offsets)[:, :, None]  # [n, s, 1]
    cols = (x0[:, None] + offsets)[:, None, :]  # [n, 1, s]
    return arrays[source[:, None, None], rows, cols]


def build_libraries(images: np.ndarray, heat: np.ndarray, activations: np.ndarray,
                    activated: np.ndarray, node_names: Sequence[str], *, size: int,
                    rule: str = "peaks", min_score: float = 0.0, max_windows: int = 4,
                    radius: int | None = None, max_overlap: float = 0.3,
                    max_per_library: int | None = None,
                    image_names: Sequence[str] | None = None) -> list[Library]:
    """One library per node: the crops of the images that activate it, at the windows that
    `select_windows` chooses on its heat maps (one jitted call for all nodes and images).

    Only activated (image, node) pairs contribute crops. A library's crops are sorted by
    decreasing score (equal scores by source image, then slot); `max_per_library` keeps the
    first that many. A library may be empty; the caller decides what to say about it.

    **Arguments:**

    - `images`: `[B, H, W, 3]` uint8.
    - `heat`: `[n_nodes, B, H, W]` float32 heat maps in [0, 1], one per node and image.
    - `activations`: `[B, n_nodes]` the node's activation on each image.
    - `activated`: `[B, n_nodes]` bool, which pairs activate their node.
    - `node_names`: n_nodes names, e.g. `'fc:7'`.
    - `size`, `rule`, `min_score`, `max_windows`, `radius`, `max_overlap`: as
      `select_windows` (`max_windows` per image and node).
    - `max_per_library`: the most crops per library (the best by score), or None for all.
    - `image_names`: B names of the images (default `'image <i>'`).

    **Returns:** a list of n_nodes `Library`, in the order of `node_names`.

    **Raises:** `ValueError` for a window larger than the images or inconsistent shapes.
    """
    images = np.asarray(images)
    heat = np.asarray(heat, np.float32)
    activations = np.asarray(activations, np.float32)
    activated = np.asarray(activated, bool)
    n_nodes, count = len(node_names), len(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    _check_window(size, *images.shape[1:3])
    if heat.shape != (n_nodes, *images.shape[:3]):
        raise ValueError(f"heat must be [n_nodes, B, H, W] = {(n_nodes, *images.shape[:3])}, "
                         f"got {heat.shape}")
    for name, array in (("activations", activations), ("activated", activated)):
        if array.shape != (count, n_nodes):
            raise ValueError(f"{name} must be [B, n_nodes] = {(count, n_nodes)}, "
                             f"got {array.shape}")
    names = [f"image {i}" for i in range(count)] if image_names is None else list(image_names)
    if len(names) != count:
        raise ValueError(f"{len(names)} image names for {count} images")
    if max_per_library is not None and max_per_library < 0:
        raise ValueError(f"max_per_library must be at least 0, got {max_per_library}")

    windows = jax.device_get(select_windows(
        heat, size, rule=rule, min_score=min_score, max_windows=max_windows, radius=radius,
        max_overlap=max_overlap))  # fields: [n_nodes, B, K]
    libraries = []
    for n, node in enumerate(node_names):
        keep = windows.valid[n] & activated[:, n, None]  # [B, K]
        source, slot = np.nonzero(keep)
        y0, x0 = windows.y0[n][keep].astype(np.int64), windows.x0[n][keep].astype(np.int64)
        score = windows.score[n][keep]
        order = np.lexsort((slot, source, -score))[:max_per_library]
        source, y0, x0, score = source[order], y0[order], x0[order], score[order]
        libraries.append(Library(
            node=node, crops=_gather_windows(images, source, y0, x0, size),
            heat=_gather_windows(heat[n], source, y0, x0, size), source=source,
            source_name=[names[i] for i in source], y0=y0, x0=x0,
            size=np.full(len(source), size, np.int64), score=score.astype(np.float32),
            activation=activations[source, n]))
    return libraries


def overlay(crop: np.ndarray, heat: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """The crop with its heat blended in: `(1 − opacity)·crop + opacity·jet(heat)`, rounded.

    The heat is shown on its own scale, [0, 1] (clipped; NaN as 0), not stretched per crop, so
    overlays of different crops compare.

    **Arguments:** `crop` `[..., s, s, 3]` uint8, `heat` `[..., s, s]`.

    **Returns:** `[..., s, s, 3]` uint8 RGB.
    """
    heat = np.clip(np.nan_to_num(np.asarray(heat, np.float64)), 0.0, 1.0)
    colours = colormaps["jet"](heat)[..., :3] * 255.0
    blended = (1.0 - opacity) * np.asarray(crop, np.float64) + opacity * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# On disk
# ----------------------------------------------------------------------------


def node_folder(node: str) -> str:
    """A node's name as a file or folder name: `'fc:7'` -> `'fc_7'`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", node).strip(".") or "node"


def crop_file(node: str, k: int, kind: str = "crop") -> str:
    """The file of crop `k` of `node`'s library, relative to the libraries folder: the crop
    (`kind='crop'`) or the crop with its heat overlaid (`'heat'`)."""
    suffix = {"crop": "", "heat": "_heat"}[kind]
    return f"{node_folder(node)}/{k}{suffix}.png"


def write_libraries(libraries: Sequence[Library], folder: str | os.PathLike) -> Path:
    """Write the libraries as PNG files and one index, replacing what `folder` held.

    Crop k of a library is `folder/<node folder>/<k>.png` (the crop), `<k>_heat.png` (the crop
    with its heat overlaid, `overlay`) and `<k>_heatmap.png` (its heat as a 16-bit grey image,
    heat·65535, so `read_libraries` gets the heat back to 1/65535). The node folder is the
    node's name with every character other than letters, digits, `.`, `_` and `-` replaced by
    `_` (`'fc:7'` -> `fc_7`). `folder/index.csv` has one row per crop with the columns
    `INDEX_COLUMNS` (`file` relative to `folder`); an empty library has one row with only
    `node` and `size` filled, so the index lists every node, in order.

    Atomic: everything is written into a temporary folder beside `folder`, which then replaces
    it; a run that fails midway leaves the previous libraries and index untouched.

    **Returns:** `folder`.

    **Raises:** `ValueError` when two nodes share a folder name; `InputDataError` when `folder`
    exists, is not empty and holds no `index.csv` (it is not a libraries folder, and would be
    deleted).
    """
    folder = Path(folder)
    subfolders = [node_folder(library.node) for library in libraries]
    for i, name in enumerate(subfolders):
        if name in subfolders[:i]:
            other = libraries[subfolders.index(name)].node
            raise ValueError(f"nodes {other!r} and {libraries[i].node!r} would both be written "
                             f"to the folder {name!r}; give them distinct names")
    if folder.exists() and any(folder.iterdir()) and not (folder / INDEX_FILE).is_file():
        raise InputDataError(f"{folder}: exists and holds no {INDEX_FILE}; not overwriting a "
                             f"folder that is not a libraries folder")
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        rows = []
        for library, name in zip(libraries, subfolders):
            (staging / name).mkdir()
            rows += _write_library(library, staging, name)
        with open(staging / INDEX_FILE, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(INDEX_COLUMNS)
            writer.writerows(rows)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = folder.with_name(f".{folder.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        os.replace(folder, previous)
    os.replace(staging, folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def _write_library(library: Library, root: Path, name: str) -> list[list]:
    """Write one library's PNG files under `root/name`; its index rows."""
    if len(library) == 0:
        return [[library.node, "", "", "", "", "", library.crop_size, "", ""]]
    rows = []
    heat_levels = np.round(np.clip(library.heat, 0.0, 1.0) * _HEAT_LEVELS).astype(np.uint16)
    for k in range(len(library)):
        write_image(root / crop_file(library.node, k), library.crops[k])
        write_image(root / crop_file(library.node, k, "heat"),
                    overlay(library.crops[k], library.heat[k]))
        write_image(root / name / f"{k}_heatmap.png", heat_levels[k])
        rows.append([library.node, crop_file(library.node, k), int(library.source[k]),
                     library.source_name[k], int(library.y0[k]), int(library.x0[k]),
                     int(library.size[k]), repr(float(library.score[k])),
                     repr(float(library.activation[k]))])
    return rows


def read_libraries(folder: str | os.PathLike) -> list[Library]:
    """The libraries that `write_libraries` wrote into `folder`, as arrays, in index order.

    The crops are read back exactly; the heat to 1/65535.

    **Raises:** `InputDataError` naming the file for a missing or malformed `index.csv`, a
    missing or unreadable crop or heat file, or a crop whose size is not its row's `size`.
    """
    folder = Path(folder)
    index = folder / INDEX_FILE
    rows = _read_index(index)
    libraries: dict[str, list[tuple[int, dict]]] = {}
    sizes: dict[str, int] = {}
    for line, row in rows:
        libraries.setdefault(row["node"], [])
        sizes.setdefault(row["node"], row["size"])
        if row["file"] is not None:
            libraries[row["node"]].append((line, row))
    return [_read_library(folder, index, node, entries, sizes[node])
            for node, entries in libraries.items()]


def _read_index(index: Path) -> list[tuple[int, dict]]:
    """The rows of an index file, `(line number, {column: parsed value})`; a row of an empty
    library has `file` None."""
    if not index.is_file():
        raise InputDataError(f"{index}: no such file (not a libraries folder, or the libraries "
                             f"were never written)")
    try:
        with open(index, newline="") as file:
            lines = list(csv.reader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputDataError(f"{index}: cannot read the index ({error})") from error
    if not lines or tuple(lines[0]) != INDEX_COLUMNS:
        raise InputDataError(f"{index}: the first line must be the header "
                             f"{','.join(INDEX_COLUMNS)}")
    parsed = []
    for line, fields in enumerate(lines[1:], start=2):
        if len(fields) != len(INDEX_COLUMNS):
            raise InputDataError(f"{index}, line {line}: {len(fields)} fields, expected "
                                 f"{len(INDEX_COLUMNS)}")
        row = dict(zip(INDEX_COLUMNS, fields))
        try:
            size = int(row["size"])
            if size < 1:
                raise ValueError("the size must be positive")
            if row["file"] == "":
                parsed.append((line, {"node": row["node"], "file": None, "size": size}))
                continue
            values = {key: int(row[key]) for key in ("source", "y0", "x0")}
            values.update(score=float(row["score"]), activation=float(row["activation"]))
            if min(values["source"], values["y0"], values["x0"]) < 0:
                raise ValueError("source, y0 and x0 must be at least 0")
        except ValueError as error:
            raise InputDataError(f"{index}, line {line}: bad value ({error})") from error
        parsed.append((line, {**row, **values, "size": size}))
    return parsed


def _read_library(folder: Path, index: Path, node: str, entries: list[tuple[int, dict]],
                  size: int) -> Library:
    if not entries:
        return Library.empty(node, size)
    crops, heat = [], []
    for line, row in entries:
        if row["size"] != size:
            raise InputDataError(f"{index}, line {line}: size {row['size']} differs from the "
                                 f"size {size} of the other crops of node {node!r}")
        path = folder / row["file"]
        crop = read_image(path)
        heat_path = path.with_name(f"{path.stem}_heatmap.png")
        levels = read_image(heat_path, mode="label")
        for file, array, shape in ((path, crop, (size, size, 3)), (heat_path, levels,
                                                                    (size, size))):
            if array.shape != shape:
                raise InputDataError(f"{file}: a {size}×{size} crop was expected ({index}, "
                                     f"line {line}), got an image of shape {array.shape}")
        crops.append(crop)
        heat.append(levels.astype(np.float32) / _HEAT_LEVELS)
    column = lambda key, dtype: np.array([row[key] for _, row in entries], dtype)
    return Library(node=node, crops=np.stack(crops), heat=np.stack(heat),
                   source=column("source", np.int64),
                   source_name=[row["source_name"] for _, row in entries],
                   y0=column("y0", np.int64), x0=column("x0", np.int64),
                   size=column("size", np.int64), score=column("score", np.float32),
                   activation=column("activation", np.float32))


# ----------------------------------------------------------------------------
# Distinct libraries
# ----------------------------------------------------------------------------


def _matches(a: Library, b: Library) -> np.ndarray:
    """`[n_a, n_b]` bool: crop i of `a` and crop j of `b` come from the same image and their
    windows overlap with IoU ≥ `MATCH_IOU`."""
    same = a.source[:, None] == b.source[None, :]
    iou = window_iou(b.y0[None, :] - a.y0[:, None], b.x0[None, :] - a.x0[:, None],
                     a.size[:, None], b.size[None, :])
    return same & (iou >= MATCH_IOU)


def library_overlap(a: Library, b: Library) -> float:
    """The share of the two libraries' crops that have a counterpart in the other one.

    A crop of `a` has a counterpart in `b` when `b` holds a crop of the same source image whose
    window overlaps it with IoU ≥ 0.5; `overlap = (matched_a + matched_b) / (n_a + n_b)`, 1 for
    identical libraries, 0 for libraries with no image part in common, and 0 when both are
    empty. Symmetric.
    """
    if len(a) + len(b) == 0:
        return 0.0
    matches = _matches(a, b)
    matched = np.count_nonzero(matches.any(axis=1)) + np.count_nonzero(matches.any(axis=0))
    return matched / (len(a) + len(b))


def overlap_matrix(libraries: Sequence[Library]) -> np.ndarray:
    """`[k, k]` float64 `library_overlap` of every pair (1 on the diagonal of a non-empty
    library)."""
    k = len(libraries)
    matrix = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            matrix[i, j] = matrix[j, i] = library_overlap(libraries[i], libraries[j])
    return matrix


def greedy_max_min(distance: np.ndarray, sizes: Sequence[int], k: int,
                   candidates: Sequence[int] | None = None) -> list[int]:
    """Greedy max–min selection of `k` items by `distance`.

    The first pick is the largest item (by `sizes`); each next pick maximises its minimum
    distance to those already chosen. Ties: the larger item, then the lower index.

    **Arguments:**

    - `distance`: `[n, n]` symmetric distances.
    - `sizes`: n sizes (the tie-break).
    - `k`: how many to pick; fewer are returned when there are fewer candidates.
    - `candidates`: the indices to pick from (default all).

    **Returns:** the picked indices, in the order picked.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    distance = np.asarray(distance, np.float64)
    sizes = np.asarray(sizes)
    remaining = list(range(len(sizes))) if candidates is None else list(candidates)
    if not remaining:
        return []
    # max over (size, −index); Python compares the tuples exactly
    chosen = [max(remaining, key=lambda i: (sizes[i], -i))]
    remaining.remove(chosen[0])
    while remaining and len(chosen) < k:
        spread = lambda i: (min(distance[i, j] for j in chosen), sizes[i], -i)
        chosen.append(max(remaining, key=spread))
        remaining.remove(chosen[-1])
    return chosen


def choose_distinct(libraries: Sequence[Library], k: int, *, min_size: int = 1,
                    overlap: np.ndarray | None = None) -> list[int]:
    """The `k` libraries that differ most from each other: `greedy_max_min` over the distance
    `1 − library_overlap`, among the libraries of at least `min_size` crops (fewer than `k`
    when fewer qualify; none when none does).

    **Arguments:**

    - `libraries`: the candidates' libraries.
    - `k`: how many to choose.
    - `min_size`: the fewest crops a chosen library may have.
    - `overlap`: `overlap_matrix(libraries)` when already computed.

    **Returns:** indices into `libraries`, in the order chosen (the largest library first).
    """
    overlap = overlap_matrix(libraries) if overlap is None else np.asarray(overlap)
    sizes = [len(library) for library in libraries]
    candidates = [i for i, n in enumerate(sizes) if n >= min_size]
    return greedy_max_min(1.0 - overlap, sizes, k, candidates)


# ----------------------------------------------------------------------------
# Purity on known features
# ----------------------------------------------------------------------------


def library_purity(library: Library, feature_masks: np.ndarray, feature_names: Sequence[str],
                   *, min_cover: float = 0.1) -> tuple[float, str, list[str]]:
    """How purely a library's crops show one known feature.

    Crop i's feature is the known feature with the most mask pixels inside its window (the
    first in `feature_names` among equals) when those pixels cover at least `min_cover` of the
    window's `size²` pixels, else `'none'`. The library's feature is the known feature most
    crops have (the first among equals), and its purity the share of all the library's crops
    that have it; a library without any crop on a known feature has feature `'none'` and purity
    0, an empty library purity NaN.

    **Arguments:**

    - `library`: the library (its `source`, `y0`, `x0`, `size`).
    - `feature_masks`: `[N, F, H, W]` bool, the known features' masks of the source images,
      indexed by `library.source`.
    - `feature_names`: F names.
    - `min_cover`: the least share of a window a feature must cover.

    **Returns:** `(purity, feature, per-crop features)`.
    """
    feature_names = list(feature_names)
    if "none" in feature_names:
        raise ValueError("'none' is reserved for crops on no known feature")
    masks = np.asarray(feature_masks, bool)
    if masks.ndim != 4 or masks.shape[1] != len(feature_names):
        raise ValueError(f"feature_masks must be [N, F, H, W] with F = {len(feature_names)} "
                         f"features, got shape {masks.shape}")
    if len(library) == 0:
        return math.nan, "none", []
    if library.source.max() >= len(masks):
        raise ValueError(f"the library's crops come from image {library.source.max()}, "
                         f"but there are masks for {len(masks)} images")
    height, width = masks.shape[2:]
    if np.any(library.y0 + library.size > height) or np.any(library.x0 + library.size > width):
        raise ValueError(f"the library has windows outside the {height}×{width} masks")
    labels = []
    for s in np.unique(library.size):  # one size per library in practice
        rows = np.flatnonzero(library.size == s)
        windows = _gather_windows(masks.transpose(0, 2, 3, 1), library.source[rows],
                                  library.y0[rows], library.x0[rows], int(s))  # [n, s, s, F]
        counts = windows.sum(axis=(1, 2))  # [n, F]
        best = np.argmax(counts, axis=1)  # argmax: the first among equals
        covered = counts[np.arange(len(rows)), best] >= min_cover * s * s
        labels += [(i, feature_names[f] if ok else "none") for i, f, ok
                   in zip(rows, best, covered)]
    per_crop = [label for _, label in sorted(labels)]
    known = [per_crop.count(name) for name in feature_names]
    if max(known) == 0:
        return 0.0, "none", per_crop
    best = int(np.argmax(known))
    return known[best] / len(per_crop), feature_names[best], per_crop
