"""Tiles on the tissue: a level-0 grid, kept by a corner rule, saved as CLAM-style HDF5.

Conventions (`docs/pathology.md`):

- Candidate tiles are `tile_size` x `tile_size` level-0 windows whose top-left corners lie on
  a grid with step `stride` starting at `(0, 0)`. Only windows fully inside the slide are
  candidates: the last partial row and column are dropped.
- The corner rule: a tile is kept when at least `min_corners` of its 4 true corners fall on
  tissue. A corner is the tile's own corner pixel: level-0 pixels `(x, y)`, `(x + T - 1, y)`,
  `(x, y + T - 1)`, `(x + T - 1, y + T - 1)` for a tile at `(x, y)` of size `T`, looked up in
  the mask pixel that contains that pixel's centre. The right and bottom corners are thus the
  last pixels inside the tile, never the first pixel of the next one.
- CLAM tests four points at the tile centre +- tile/4 instead, keeping a tile when any
  ("four_pt") or all ("four_pt_hard") are on tissue; those points sit a quarter of a tile
  inside, so CLAM keeps tiles whose true corners are on glass. The rule here keeps a tile
  whose true corners are mostly on tissue.
- Optionally, `min_tissue_fraction`: the tile's tissue fraction (the exact area fraction of
  the mask under the window, from the mask's summed-area table) must reach this value.
- Coordinates are int64 `(x, y)` level-0 top-left corners in row-major order (y, then x).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import h5py
import numpy as np

from jaxmed.errors import InputDataError
from jaxmed.pathology.tissue import TissueMask

if TYPE_CHECKING:
    from jaxmed.data.slide import Slide

TILE_SIZE = 1152
CONTOUR_COLOUR = (0, 255, 0)  # RGB: green
HOLE_COLOUR = (0, 0, 255)  # blue
TILE_COLOUR = (0, 0, 0)  # black


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value
class TileGrid:
    """The kept tiles of one slide.

    **Fields:**

    - `coords`: int64 `(n, 2)`, level-0 `(x, y)` of each tile's top-left corner.
    - `tile_size`: the tile side in level-0 pixels.
    - `stride`: the grid step in level-0 pixels.
    - `dimensions`: the slide's level-0 `(width, height)`.
    - `mask_level`, `mask_downsample`: the tissue mask's level and downsample (None when read
      from a file that does not say).
    - `level`, `downsample`: the level the tiles are cut from: always 0 and 1.0.
    """

    coords: np.ndarray
    tile_size: int
    stride: int
    dimensions: tuple[int, int]
    mask_level: int | None
    mask_downsample: float | None
    level: int = 0
    downsample: float = 1.0

    def __len__(self) -> int:
        return len(self.coords)


def tile_grid(
    tissue: TissueMask,
    dimensions: tuple[int, int],
    *,
    tile_size: int = TILE_SIZE,
    stride: int | None = None,
    min_corners: int = 3,
    min_tissue_fraction: float | None = None,
) -> TileGrid:
    """The grid of tiles on the tissue.

    **Arguments:**

    - `tissue`: the slide's `TissueMask`.
    - `dimensions`: the slide's level-0 `(width, height)`.
    - `tile_size`, `stride`: in level-0 pixels; `stride=None` means `tile_size` (no overlap).
    - `min_corners`: 0-4; tiles with fewer true corners on tissue are dropped (0: no corner
      test).
    - `min_tissue_fraction`: None, or 0-1: tiles with a smaller tissue fraction are dropped.
      When both are given a tile must pass both.

    **Returns:** a `TileGrid`. Vectorised: ~150 000 candidates take milliseconds.
    """
    stride = tile_size if stride is None else stride
    width, height = _check_grid_options(tissue, dimensions, tile_size, stride, min_corners,
                                        min_tissue_fraction)
    xs = np.arange(0, width - tile_size + 1, stride, dtype=np.int64)  # xs: [nx]
    ys = np.arange(0, height - tile_size + 1, stride, dtype=np.int64)  # ys: [ny]
    keep = np.ones((len(ys), len(xs)), bool)  # keep: [ny, nx]
    if min_corners > 0:
        keep &= _corners_on_tissue(tissue, xs, ys, tile_size) >= min_corners
    if min_tissue_fraction is not None:
        keep &= _tissue_fraction(tissue, xs, ys, tile_size) >= min_tissue_fraction
    rows, columns = np.nonzero(keep)
    coords = np.stack([xs[columns], ys[rows]], axis=1).reshape(-1, 2)
    return TileGrid(coords=coords, tile_size=int(tile_size), stride=int(stride),
                    dimensions=(width, height), mask_level=tissue.level,
                    mask_downsample=tissue.downsample)


def _mask_index(level0: np.ndarray, downsample: float, size: int) -> np.ndarray:
    """The mask pixel containing the centre of each level-0 pixel, clipped to the mask."""
    index = np.floor((level0 + 0.5) / downsample).astype(np.int64)
    return np.clip(index, 0, size - 1)


def _corners_on_tissue(tissue, xs, ys, tile_size) -> np.ndarray:
    """int `(ny, nx)`: how many of each tile's 4 corner pixels lie on tissue."""
    mask = tissue.mask
    height, width = mask.shape
    left = _mask_index(xs, tissue.downsample, width)
    right = _mask_index(xs + tile_size - 1, tissue.downsample, width)
    top = _mask_index(ys, tissue.downsample, height)
    bottom = _mask_index(ys + tile_size - 1, tissue.downsample, height)
    count = np.zeros((len(ys), len(xs)), np.int8)
    for rows in (top, bottom):
        for columns in (left, right):
            count += mask[np.ix_(rows, columns)]
    return count


def _tissue_fraction(tissue, xs, ys, tile_size) -> np.ndarray:
    """float `(ny, nx)`: the exact fraction of each tile's area that the mask covers.

    The integral of a pixel-wise constant mask is bilinear inside every pixel, so bilinear
    interpolation of the summed-area table gives the covered area of any window exactly.
    """
    mask = tissue.mask
    height, width = mask.shape
    table = cv2.integral(mask.astype(np.uint8))  # table: int32 [h+1, w+1]
    scale = 1.0 / tissue.downsample
    u = np.clip(np.concatenate([xs, xs + tile_size]) * scale, 0, width)  # u: [2 nx]
    v = np.clip(np.concatenate([ys, ys + tile_size]) * scale, 0, height)  # v: [2 ny]
    at = _interpolate(_interpolate(table, u, axis=1), v, axis=0)  # at: [2 ny, 2 nx]
    nx, ny = len(xs), len(ys)
    covered = at[ny:, nx:] - at[ny:, :nx] - at[:ny, nx:] + at[:ny, :nx]
    window = np.outer(v[ny:] - v[:ny], u[nx:] - u[:nx])
    return covered / np.maximum(window, 1e-12)


def _interpolate(table: np.ndarray, at: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `table` along `axis` at fractional indices `at`."""
    low = np.clip(np.floor(at).astype(np.int64), 0, table.shape[axis] - 2)
    weight = at - low
    shape = [1, 1]
    shape[axis] = -1
    weight = weight.reshape(shape)
    lower = np.take(table, low, axis=axis)
    upper = np.take(table, low + 1, axis=axis)
    return lower * (1 - weight) + upper * weight


def _check_grid_options(tissue, dimensions, tile_size, stride, min_corners,
                        min_tissue_fraction) -> tuple[int, int]:
    width, height = (int(d) for d in dimensions)
    if width < 1 or height < 1:
        raise ValueError(f"dimensions must be positive (width, height), got {dimensions}")
    if not isinstance(tile_size, int | np.integer) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size!r}")
    if not isinstance(stride, int | np.integer) or stride < 1:
        raise ValueError(f"stride must be a positive number of pixels, got {stride!r}")
    if not isinstance(min_corners, int | np.integer) or not 0 <= min_corners <= 4:
        raise ValueError(f"min_corners must be 0, 1, 2, 3 or 4, got {min_corners!r}")
    if min_tissue_fraction is not None and not 0 <= min_tissue_fraction <= 1:
        raise ValueError(f"min_tissue_fraction must be None or in [0, 1], "
                         f"got {min_tissue_fraction!r}")
    mask_height, mask_width = tissue.mask.shape
    d = tissue.downsample
    if abs(mask_width * d - width) > d + 1 or abs(mask_height * d - height) > d + 1:
        raise ValueError(
            f"the tissue mask ({mask_width} x {mask_height} pixels at downsample {d:g}) does "
            f"not cover a slide of {width} x {height} pixels: dimensions of another slide?"
        )
    return width, height


# ---------------------------------------------------------------------------------------------
# HDF5 coordinates (the layout CLAM users know)
# ---------------------------------------------------------------------------------------------

def write_tiles_h5(path: str | os.PathLike, grid: TileGrid,
                   slide: Slide | str | os.PathLike) -> Path:
    """Write the grid to an HDF5 file, atomically (temporary file, then rename).

    The dataset `coords` (int64 `(n, 2)`, level-0 top-left `(x, y)`) carries the attributes
    `tile_size`, `stride`, `level`, `downsample`, `dimensions` (level-0 width, height),
    `mask_level`, `mask_downsample` (when known), and CLAM's names for the same facts
    (`patch_size`, `patch_level`, `level_dim`, `downsampled_level_dim`, `level_downsample`,
    `name`: the slide file's name without its suffix), so CLAM's loaders read it; the file's
    root carries the same attributes. `slide`: the `Slide` or its path (for `name`).

    **Returns:** the path written.
    """
    path = Path(path)
    slide_path = Path(getattr(slide, "path", slide))
    attributes = {
        "tile_size": grid.tile_size, "stride": grid.stride, "level": grid.level,
        "downsample": grid.downsample, "dimensions": np.asarray(grid.dimensions, np.int64),
        "patch_size": grid.tile_size, "patch_level": grid.level,
        "level_dim": np.asarray(grid.dimensions, np.int64),
        "downsampled_level_dim": np.asarray(grid.dimensions, np.int64),
        "level_downsample": np.asarray([grid.downsample, grid.downsample]),
        "name": slide_path.stem,
    }
    if grid.mask_level is not None:
        attributes["mask_level"] = grid.mask_level
        attributes["mask_downsample"] = grid.mask_downsample

    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w") as file:
            coords = file.create_dataset("coords", data=np.asarray(grid.coords, np.int64))
            for name, value in attributes.items():
                coords.attrs[name] = value
                file.attrs[name] = value

    _write_atomically(path, write)
    return path


def read_tiles_h5(path: str | os.PathLike) -> TileGrid:
    """Read a grid written by `write_tiles_h5` (or a level-0 CLAM `.h5`).

    **Raises:** `InputDataError` naming the file when it is missing, not HDF5, lacks the
    `coords` dataset or its attributes, holds coordinates that are not integer `(n, 2)`, or
    describes tiles cut from a level other than 0.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise InputDataError(f"{path}: not an HDF5 file (a tile-coordinate .h5 is expected)")
    try:
        with h5py.File(path, "r") as file:
            if "coords" not in file or not isinstance(file["coords"], h5py.Dataset):
                raise InputDataError(f"{path}: has no 'coords' dataset of tile coordinates")
            coords = file["coords"][()]
            attributes = {**file.attrs, **file["coords"].attrs}
    except OSError as error:
        raise InputDataError(f"{path}: cannot read the HDF5 file ({error})") from error
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype.kind not in "iu":
        raise InputDataError(f"{path}: 'coords' must be integer (n, 2) (x, y), "
                             f"got {coords.dtype} {coords.shape}")
    tile_size = _attribute(path, attributes, "tile_size", "patch_size")
    dimensions = _attribute(path, attributes, "dimensions", "level_dim")
    level = int(attributes.get("level", attributes.get("patch_level", 0)))
    if level != 0:
        raise InputDataError(f"{path}: tiles of level {level}; only level-0 grids are read")
    mask_level = attributes.get("mask_level")
    mask_downsample = attributes.get("mask_downsample")
    return TileGrid(
        coords=coords.astype(np.int64), tile_size=int(tile_size),
        stride=int(attributes.get("stride", tile_size)),
        dimensions=(int(dimensions[0]), int(dimensions[1])),
        mask_level=None if mask_level is None else int(mask_level),
        mask_downsample=None if mask_downsample is None else float(mask_downsample),
    )


def _attribute(path: Path, attributes: dict, name: str, clam_name: str):
    if name in attributes:
        return attributes[name]
    if clam_name in attributes:
        return attributes[clam_name]
    raise InputDataError(f"{path}: the 'coords' dataset has no '{name}' (or '{clam_name}') "
                         f"attribute")


# ---------------------------------------------------------------------------------------------
# Thumbnail
# ---------------------------------------------------------------------------------------------

def draw_thumbnail(path: str | os.PathLike, slide: Slide, tissue: TissueMask,
                   grid: TileGrid | None = None, *, max_size: int = 2048) -> Path:
    """Write a PNG of the slide with the tissue contours (green), holes (blue) and kept tiles
    (black rectangles) drawn, atomically.

    The image is the finest level whose longer side is at most `max_size` (the coarsest level,
    shrunk to fit, when none is), so its longer side is at most `max_size`.

    **Returns:** the path written.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    image = _thumbnail_image(slide, max_size)
    height, width = image.shape[:2]
    scale = np.array([slide.dimensions[0] / width, slide.dimensions[1] / height])
    thickness = max(1, round(max(width, height) / 1000))
    if grid is not None and len(grid):
        corners = np.array([[0, 0], [1, 0], [1, 1], [0, 1]]) * grid.tile_size  # corners: [4, 2]
        rectangles = (grid.coords[:, None, :] + corners) / scale  # rectangles: [n, 4, 2]
        cv2.polylines(image, np.round(rectangles).astype(np.int32), True, TILE_COLOUR,
                      thickness)
    for borders, colour in ((tissue.contours, CONTOUR_COLOUR), (tissue.holes, HOLE_COLOUR)):
        points = [np.round(b / scale - 0.5).astype(np.int32) for b in borders]
        if points:
            cv2.polylines(image, points, True, colour, thickness)
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the thumbnail as PNG")
    path = Path(path)
    _write_atomically(path, lambda temporary: temporary.write_bytes(png.tobytes()))
    return path


def _thumbnail_image(slide: Slide, max_size: int) -> np.ndarray:
    fitting = [i for i, level in enumerate(slide.levels) if max(level.size) <= max_size]
    level = fitting[0] if fitting else len(slide.levels) - 1
    image = np.ascontiguousarray(slide.read_level(level))
    height, width = image.shape[:2]
    if max(width, height) > max_size:
        factor = max_size / max(width, height)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


def _write_atomically(path: Path, write) -> None:
    """Call `write(temporary)` on a hidden file beside `path`, then rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
