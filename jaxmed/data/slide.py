"""Whole-slide images: lazy, thread-safe region reads from tiled (pyramidal) TIFF files.

`open_slide(path)` returns a `Slide` built on tifffile (the TIFF structure: pages, pyramid
levels, tile offsets, vendor metadata) and imagecodecs (the JPEG, JPEG 2000, deflate, LZW...
codecs, through tifffile's per-page decoder). A region read decodes only the tiles it touches;
level 0 is never loaded whole. The interface follows OpenSlide's, so users' habits carry over:

- `Slide.levels[k]` has `size = (width, height)` in that level's pixels and `downsample` =
  level-0 pixels per level pixel, computed as OpenSlide does (the mean of the width and height
  ratios).
- `read_region((x, y), level, (w, h))`: `(x, y)` is the top-left corner in **level-0** pixels,
  `(w, h)` the size in the **level's** pixels; the result is uint8 RGB `(h, w, 3)`. The
  region starts at level pixel `floor(x / downsample), floor(y / downsample)`: the level pixel
  that holds level-0 pixel `(x, y)`. (Where that quotient is not a whole number, OpenSlide
  instead resamples the level bilinearly at the fractional position; at whole-number positions,
  and always at level 0, the two agree exactly.) Pixels outside the slide are `FILL` (255,
  white: what tissue pipelines take as background; OpenSlide returns transparent pixels there).

Layouts (`Slide.layout`):

- `"generic-tiff"`: a tiled TIFF whose pyramid levels are top-level pages (what OpenSlide opens
  as generic tiled TIFF): every tiled RGB page is a level, ordered by size; MPP from the
  `XResolution`/`YResolution` tags (centimetre or inch).
- `"svs"`: Aperio SVS (JPEG or JPEG 2000 tiles). Only the pyramid is read as levels: the
  thumbnail (page 1), label and macro pages are not. MPP and objective power from the
  description's `MPP = ...` and `AppMag = ...` fields.
- `"ome-tiff"`: OME-TIFF with the pyramid in SubIFDs; MPP from `PhysicalSizeX/Y`, objective
  power from the objective's `NominalMagnification`.
- `"single-level"`: a tiled image without a stored pyramid. Levels at powers of 2 (down to
  about 512 pixels on the longer side) are computed when a region of them is read: each pixel
  is the mean of its `d x d` block of level 0 (the part inside the slide at the edges), rounded
  half up. Only the level-0 region under the request is decoded, in bands of bounded size.

Untiled (stripped) TIFFs, images that are not 8-bit RGB, missing, truncated and non-TIFF files
raise `SlideError` naming the file and the problem; a tile that cannot be decoded raises it
naming the tile, its level and where it lies.

Thread safety: one `Slide` may be read from many threads at once. Each tile's bytes are read
under tifffile's file-handle lock (a seek and a read); decoding runs outside it in the calling
thread, so threads decode in parallel. Decoded tiles are kept in a per-slide LRU cache bounded
in bytes (`cache_bytes`, default 64 MiB). The layout decisions are in `docs/pathology.md`.
"""

import collections
import dataclasses
import logging
import math
import os
import re
import struct
import threading
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import tifffile

from jaxmed.errors import InputDataError

FILL = 255
LAYOUTS = ("generic-tiff", "svs", "ome-tiff", "single-level")
DEFAULT_CACHE_BYTES = 64 * 2**20
MIN_LEVEL_SIZE = 512  # computed levels stop when the longer side would fall below this
CONVERT_HINT = (
    "convert it to a tiled pyramidal TIFF, e.g. `vips tiffsave IN.tif OUT.tif --tile "
    "--pyramid --compression jpeg --tile-width 256 --tile-height 256`"
)
_BAND_BYTES = 32 * 2**20  # level-0 pixels decoded at once for a computed level
_MICROMETRES = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4,
                "m": 1e6}
# What tifffile logs when the chain of pages (IFDs) breaks off: a truncated or damaged file.
_BROKEN_CHAIN = re.compile(
    "corrupted tag list|invalid offset to page|invalid page offset|circular reference"
)
# What tifffile and the codecs raise for damaged files and tiles (imagecodecs' codec errors
# are RuntimeErrors).
_READ_ERRORS = (tifffile.TiffFileError, OSError, EOFError, ValueError, KeyError, IndexError,
                RuntimeError, MemoryError, TypeError, struct.error)


class SlideError(InputDataError):
    """A slide file that cannot be read; the message names the file (and the tile) and says
    what is wrong."""


@dataclasses.dataclass(frozen=True)
class Level:
    """One pyramid level: `size = (width, height)` in its own pixels; `downsample` = level-0
    pixels per pixel of this level (OpenSlide's `level_downsamples`)."""

    size: tuple[int, int]
    downsample: float


def level_size(size: tuple[int, int], downsample: int) -> tuple[int, int]:
    """`(w, h)` of the level with integer `downsample` of a level-0 `size = (W, H)`: ceil."""
    return math.ceil(size[0] / downsample), math.ceil(size[1] / downsample)


def default_levels(size: tuple[int, int], min_level_size: int = MIN_LEVEL_SIZE) -> tuple[int, ...]:
    """Downsamples 1, 2, 4, ... while the level's longer side stays >= `min_level_size`."""
    levels = [1]
    while math.ceil(max(size) / (2 * levels[-1])) >= min_level_size:
        levels.append(2 * levels[-1])
    return tuple(levels)


def open_slide(path: str | os.PathLike, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> "Slide":
    """Open a whole-slide TIFF for lazy region reads.

    **Arguments:**

    - `path`: a tiled TIFF: generic pyramidal TIFF, Aperio SVS, OME-TIFF, or a tiled TIFF
      without a pyramid.
    - `cache_bytes`: bound of the decoded-tile cache (0 disables it).

    **Returns:** a `Slide` (close it, or use it as a context manager).

    **Raises:** `SlideError` naming the file when it is missing, not a TIFF, truncated,
    untiled, or not 8-bit RGB.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: slide file not found")
    if not path.is_file():
        raise SlideError(f"{path}: not a regular file")
    try:
        tif, logged = _open_tiff(path)
    except _READ_ERRORS as error:
        raise SlideError(
            f"{path}: cannot read as a TIFF slide; the file is not a TIFF, or its header is "
            f"damaged ({_describe(error)})"
        ) from error
    try:
        return Slide._from_tiff(path, tif, logged, cache_bytes)
    except BaseException:
        tif.close()
        raise


class Slide:
    """A whole-slide image opened by `open_slide`; see the module docstring for conventions.
    Safe to read from many threads at once; a context manager (or call `close`).

    **Fields:** `path`; `levels` (level 0 first, decreasing resolution); `dimensions` (level 0's
    `(width, height)`); `mpp` (`(x, y)` micrometres per level-0 pixel, or None when the file
    does not say); `objective_power` (or None); `layout` (one of `LAYOUTS`).
    """

    path: Path
    levels: tuple[Level, ...]
    dimensions: tuple[int, int]
    mpp: tuple[float, float] | None
    objective_power: float | None
    layout: str

    def __init__(self, path, tif, readers, levels, layout, mpp, objective_power):
        self.path = path
        self.levels = tuple(levels)
        self.dimensions = self.levels[0].size
        self.mpp = mpp
        self.objective_power = objective_power
        self.layout = layout
        self._tif = tif
        self._readers = readers
        self._closed = False

    # ------------------------------------------------------------------------ reading

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """The pixels of a rectangle of one level.

        **Arguments:**

        - `location`: `(x, y)` of the top-left corner in level-0 pixels (may lie outside).
        - `level`: index into `levels`.
        - `size`: `(w, h)` in the level's pixels.

        **Returns:** C-contiguous uint8 `(h, w, 3)` RGB, starting at level pixel
        `floor(x / downsample), floor(y / downsample)`; pixels outside the slide are `FILL`.
        Only the tiles the region touches are decoded.

        **Raises:** `ValueError` for a bad level or size or a closed slide; `SlideError` naming
        the file, level and tile when a tile cannot be decoded.
        """
        self._check_open()
        level = self._check_level(level)
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        if w < 0 or h < 0:
            raise ValueError(f"region size must be non-negative, got {(w, h)}")
        downsample = self.levels[level].downsample
        left, top = _to_level(x, downsample), _to_level(y, downsample)
        width, height = self.levels[level].size
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + w, width), min(top + h, height)
        if x0 >= x1 or y0 >= y1:
            return np.full((h, w, 3), FILL, np.uint8)
        pixels = self._readers[level].read(x0, y0, x1, y1)
        if (x0, y0, x1, y1) == (left, top, left + w, top + h):
            return np.ascontiguousarray(pixels)
        out = np.full((h, w, 3), FILL, np.uint8)
        out[y0 - top:y1 - top, x0 - left:x1 - left] = pixels
        return out

    def read_level(self, level: int, max_pixels: int = 64_000_000) -> np.ndarray:
        """A whole level as uint8 `(h, w, 3)`; refuses a level of more than `max_pixels` pixels
        (`ValueError`; pick a level with `level_for_pixel_budget`)."""
        level = self._check_level(level)
        width, height = self.levels[level].size
        if width * height > max_pixels:
            raise ValueError(
                f"{self.path}: level {level} has {width} x {height} = {width * height} pixels, "
                f"more than max_pixels={max_pixels}; read a coarser level "
                "(level_for_pixel_budget) or regions of this one"
            )
        return self.read_region((0, 0), level, (width, height))

    def best_level_for_downsample(self, downsample: float) -> int:
        """OpenSlide's rule: the coarsest level whose downsample is <= `downsample` (level 0 when
        `downsample` is below every level's)."""
        best = 0
        for index, level in enumerate(self.levels):
            if level.downsample <= downsample:
                best = index
        return best

    def level_for_pixel_budget(self, max_pixels: int) -> int:
        """The finest level with `width * height <= max_pixels`, else the coarsest level."""
        for index, level in enumerate(self.levels):
            if level.size[0] * level.size[1] <= max_pixels:
                return index
        return len(self.levels) - 1

    # ------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._tif.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __reduce__(self):
        # A slide sent to another process (e.g. a multiprocessing worker) is reopened there.
        return (open_slide, (self.path,))

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, layout={self.layout!r}, dimensions={self.dimensions}, "
            f"levels={len(self.levels)}, mpp={self.mpp})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the slide is closed")

    def _check_level(self, level: int) -> int:
        if not 0 <= int(level) < len(self.levels):
            raise ValueError(
                f"{self.path}: level {level} does not exist; the slide has levels "
                f"0..{len(self.levels) - 1}"
            )
        return int(level)

    # ------------------------------------------------------------------------ opening

    @classmethod
    def _from_tiff(cls, path: Path, tif, logged: list[str], cache_bytes: int) -> "Slide":
        try:
            series = tif.series[0] if tif.series else None
        except _READ_ERRORS as error:
            raise SlideError(
                f"{path}: cannot parse the TIFF's images ({_describe(error)})"
            ) from error
        if series is None:
            raise SlideError(f"{path}: the TIFF holds no image")
        pyramid = _pyramid(tif, series)
        for index, stored in enumerate(pyramid):
            _check_pixels(path, stored, index)
        _check_complete(path, tif, pyramid, logged)

        description = tif.pages.first.description or ""
        fields = _description_fields(description)
        if tif.is_ome:
            mpp, objective_power = _ome_physical(tif.ome_metadata)
            layout = "ome-tiff"
        else:
            mpp = _fields_mpp(fields) if tif.is_svs else None
            mpp = mpp or _resolution_mpp(pyramid[0].keyframe)
            objective_power = _float_or_none(fields.get("AppMag"))
            layout = "svs" if tif.is_svs else "generic-tiff"

        cache = _TileCache(cache_bytes)
        tif.filehandle.set_lock(True)  # tile reads from several threads share the file
        readers = [_StoredLevel(path, stored, index, cache, tif.filehandle)
                   for index, stored in enumerate(pyramid)]
        sizes = [(r.shape[1], r.shape[0]) for r in readers]
        width, height = sizes[0]
        if len(readers) == 1:
            layout = "single-level"
            downsamples = default_levels(sizes[0])
            levels = [Level(level_size(sizes[0], d), float(d)) for d in downsamples]
            readers += [_ComputedLevel(readers[0], d) for d in downsamples[1:]]
        else:
            # OpenSlide's level downsample: the mean of the width and height ratios.
            levels = [Level((w, h), (width / w + height / h) / 2) for w, h in sizes]
        return cls(path, tif, readers, levels, layout, mpp, objective_power)


def _pyramid(tif, series) -> list:
    """The stored levels (tifffile series), finest first.

    tifffile's series hold the SVS and OME pyramids as their vendors define them. In a generic
    TIFF it groups reduced pages into levels only while they shrink by one constant factor;
    OpenSlide takes every tiled page as a level, so the other tiled RGB pages smaller than level
    0 are added here too.
    """
    levels = list(series.levels)
    if tif.is_svs or tif.is_ome:
        return levels
    first = levels[0]
    for other in tif.series[1:]:
        for level in other.levels:
            page = level.keyframe
            if (page.is_tiled and not page.is_subifd and level.shape[2:] == first.shape[2:]
                    and level.dtype == first.dtype and len(level.shape) == len(first.shape)
                    and level.shape[0] < first.shape[0] and level.shape[1] < first.shape[1]):
                levels.append(level)
    return sorted(levels, key=lambda level: -level.shape[1])


# ---------------------------------------------------------------------------- levels


class _StoredLevel:
    """One stored pyramid level, read a tile at a time.

    Tile bytes are read under the file handle's lock (one seek + read); decoding runs outside
    it, in the calling thread, so threads decode in parallel. Decoded tiles go to the slide's
    `_TileCache`. A tile the file does not store (offset or byte count 0) reads as `FILL`.
    """

    def __init__(self, path: Path, stored, index: int, cache: "_TileCache", filehandle):
        keyframe, page = stored.keyframe, stored.pages[0]  # geometry, and where the data is
        self.path = path
        self.index = index
        self.shape = (keyframe.imagelength, keyframe.imagewidth)
        self.tile = (keyframe.tilelength, keyframe.tilewidth)
        self.columns = -(-keyframe.imagewidth // keyframe.tilewidth)
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.counts = np.asarray(page.databytecounts, np.int64)
        self._decode = keyframe.decode  # tifffile's codec for this page (imagecodecs)
        self._decode_args = {"jpegtables": keyframe.jpegtables,
                             "jpegheader": keyframe.jpegheader, "_fullsize": True}
        self._cache = cache
        self._file = filehandle

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level pixels `[y0:y1, x0:x1]` (inside the level) as uint8 `(y1 - y0, x1 - x0, 3)`."""
        th, tw = self.tile
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for column in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(row, column)
                top, left = row * th, column * tw
                ya, yb = max(y0, top), min(y1, top + th)
                xa, xb = max(x0, left), min(x1, left + tw)
                out[ya - y0:yb - y0, xa - x0:xb - x0] = tile[ya - top:yb - top, xa - left:xb - left]
        return out

    def _tile(self, row: int, column: int) -> np.ndarray:
        key = (self.index, row, column)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        index = row * self.columns + column
        offset, count = int(self.offsets[index]), int(self.counts[index])
        if offset == 0 or count == 0:
            return np.full((*self.tile, 3), FILL, np.uint8)
        with self._file.lock:
            self._file.seek(offset)
            data = self._file.read(count)
        try:
            if len(data) != count:
                raise EOFError(f"{len(data)} of its {count} bytes are in the file")
            decoded = self._decode(data, index, **self._decode_args)[0]
            tile = decoded.reshape(*self.tile, 3)
        except _READ_ERRORS as error:
            th, tw = self.tile
            ty, tx = row * th, column * tw
            raise SlideError(
                f"{self.path}: tile (column {column}, row {row}) of level {self.index} (level "
                f"pixels x {tx}-{tx + tw - 1}, y {ty}-{ty + th - 1}) cannot be decoded; the file "
                f"is damaged ({_describe(error)})"
            ) from error
        tile.flags.writeable = False  # shared through the cache
        self._cache.put(key, tile, tile.nbytes)
        return tile


class _ComputedLevel:
    """A level of a pyramid-less slide: `d x d` block means of level 0, computed on demand."""

    def __init__(self, base: _StoredLevel, downsample: int):
        self.base = base
        self.downsample = downsample
        height, width = base.shape
        self.shape = (math.ceil(height / downsample), math.ceil(width / downsample))

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        d = self.downsample
        height, width = self.base.shape
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        # Level-0 rows are decoded in bands of whole blocks, so memory stays bounded whatever
        # the request.
        band = max(1, _BAND_BYTES // (3 * d * d * (x1 - x0)))
        columns = _block_counts(x0, x1, d, width)  # level-0 pixels per block column
        for top in range(y0, y1, band):
            bottom = min(top + band, y1)
            source = self.base.read(x0 * d, top * d, min(x1 * d, width), min(bottom * d, height))
            out[top - y0:bottom - y0] = _block_mean(
                source, d, _block_counts(top, bottom, d, height), columns
            )
        return out


def _block_counts(first: int, last: int, d: int, extent: int) -> np.ndarray:
    """Level-0 pixels in each of the blocks `first..last-1` of size `d` along an axis."""
    starts = np.arange(first, last) * d
    return np.minimum(starts + d, extent) - starts


def _block_mean(source: np.ndarray, d: int, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Means of the `d x d` blocks of `source` (partial blocks at the far edges), half up."""
    h, w = len(rows), len(columns)
    padded = np.zeros((h * d, w * d, 3), np.uint32)
    padded[:source.shape[0], :source.shape[1]] = source
    sums = padded.reshape(h, d, w, d, 3).sum(axis=(1, 3))
    counts = (rows[:, None] * columns[None, :])[..., None].astype(np.uint32)
    return ((sums + counts // 2) // counts).astype(np.uint8)


def _to_level(coordinate: int, downsample: float) -> int:
    """The level pixel holding level-0 `coordinate`: floor, robust to float rounding."""
    quotient = coordinate / downsample
    nearest = round(quotient)
    return nearest if abs(quotient - nearest) < 1e-6 else math.floor(quotient)


# ---------------------------------------------------------------------------- tile cache


class _TileCache:
    """A thread-safe LRU of decoded tiles bounded in bytes (0 = no caching)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        """The cached value, or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


# ---------------------------------------------------------------------------- checks


def _open_tiff(path: Path):
    """`tifffile.TiffFile(path)` with its pages loaded, and the errors tifffile logged meanwhile
    (it logs an error, rather than raising, when the chain of pages is cut short)."""
    records: list[str] = []
    handler = _ThreadRecords(records)
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        tif = tifffile.TiffFile(path)
        try:
            len(tif.pages)  # walks the chain of pages, so a cut chain shows now
            tif.series  # noqa: B018 - parse the series (and log its errors) here
        except BaseException:
            tif.close()
            raise
    finally:
        logger.removeHandler(handler)
    return tif, records


class _ThreadRecords(logging.Handler):
    """Collects the messages logged by the creating thread (other threads open other files)."""

    def __init__(self, records: list[str]):
        super().__init__(logging.ERROR)
        self.records = records
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record.getMessage())


def _check_pixels(path: Path, stored, index: int) -> None:
    """8-bit RGB, chunky, tiled — or a SlideError saying what the image is instead."""
    page = stored.keyframe
    samples = page.samplesperpixel
    problem = None
    if samples != 3:
        problem = f"has {samples} sample{'s' if samples != 1 else ''} per pixel"
    elif page.dtype != np.uint8:
        problem = f"has {page.dtype} samples ({page.bitspersample} bits)"
    elif page.photometric not in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
        problem = f"has photometric interpretation {page.photometric.name}"
    elif page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
        problem = "stores the colour channels as separate planes"
    elif len(stored.shape) != 3:
        problem = f"has image shape {stored.shape} (axes {stored.axes}), not one (H, W, 3) plane"
    if problem:
        raise SlideError(
            f"{path}: level {index} {problem}; only 8-bit RGB slides are supported"
        )
    if not page.is_tiled:
        raise SlideError(
            f"{path}: level {index} is not tiled: it is stored in strips, which cannot be read "
            f"a region at a time; {CONVERT_HINT}"
        )


def _check_complete(path: Path, tif, pyramid, errors: list[str]) -> None:
    """Refuse a truncated file: its chain of pages is cut, or tile data lies past its end."""
    cut = [e for e in errors if _BROKEN_CHAIN.search(e)]
    if cut:
        raise SlideError(
            f"{path}: the file is truncated or damaged: its chain of pages breaks off ({cut[0]})"
        )
    file_size = path.stat().st_size
    for index, stored in enumerate(pyramid):
        for page in stored.pages:
            if page is None:
                continue
            offsets = np.asarray(page.dataoffsets, np.int64)
            ends = offsets + np.asarray(page.databytecounts, np.int64)
            if len(ends) and int(ends.max()) > file_size:
                raise SlideError(
                    f"{path}: the file is truncated: level {index}'s tile data runs to byte "
                    f"{int(ends.max())} but the file has {file_size} bytes"
                )


# ---------------------------------------------------------------------------- metadata


def _description_fields(description: str) -> dict[str, str]:
    """`key = value` fields of an Aperio-style `|`-separated description."""
    fields = {}
    for part in description.split("|"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _float_or_none(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _fields_mpp(fields: dict[str, str]) -> tuple[float, float] | None:
    mpp = _float_or_none(fields.get("MPP"))
    return None if mpp is None else (mpp, mpp)


def _resolution_mpp(page) -> tuple[float, float] | None:
    """Micrometres per pixel from XResolution/YResolution (pixels per centimetre or inch)."""
    micrometres_per_unit = {
        tifffile.RESUNIT.CENTIMETER: 1e4, tifffile.RESUNIT.INCH: 25_400.0
    }.get(page.resolutionunit)
    if micrometres_per_unit is None or "XResolution" not in page.tags:
        return None
    x, y = page.resolution
    if not (x > 0 and y > 0):
        return None
    return micrometres_per_unit / x, micrometres_per_unit / y


def _ome_physical(xml: str | None) -> tuple[tuple[float, float] | None, float | None]:
    """(MPP, objective power) of the first image of OME-XML."""
    if not xml:
        return None, None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None, None

    def named(element, name):
        return [e for e in element.iter() if re.sub(r"^\{.*\}", "", e.tag) == name]

    images = named(root, "Image")
    pixels = named(images[0], "Pixels") if images else []
    mpp = None
    if pixels:
        sizes = []
        for axis in ("X", "Y"):
            value = _float_or_none(pixels[0].get(f"PhysicalSize{axis}"))
            scale = _MICROMETRES.get(pixels[0].get(f"PhysicalSize{axis}Unit", "µm"))
            sizes.append(None if value is None or scale is None else value * scale)
        mpp = tuple(sizes) if None not in sizes else None
    settings = named(images[0], "ObjectiveSettings") if images else []
    objectives = named(root, "Objective")
    if settings:
        chosen = [o for o in objectives if o.get("ID") == settings[0].get("ID")]
        objectives = chosen or objectives
    powers = [_float_or_none(o.get("NominalMagnification")) for o in objectives]
    powers = [p for p in powers if p is not None]
    return mpp, (powers[0] if powers else None)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
