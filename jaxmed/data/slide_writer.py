"""Writing tiled pyramidal TIFF slides, tile by tile, in the layouts whole-slide readers expect.

`write_slide` writes an RGB image, either a small array or a callable that renders any region
of any level, as one of:

- `"generic-tiff"`: every level a top-level tiled page, the reduced levels marked
  `subfiletype=1`, no tifffile metadata, the MPP as `XResolution`/`YResolution` in
  centimetres. This is what OpenSlide opens as a "generic tiled TIFF".
- `"svs"`: the Aperio layout. Page 0 is level 0 with the Aperio description
  (`Aperio ... |AppMag = ...|MPP = ...`), page 1 a stripped thumbnail, then the reduced levels
  as tiled pages, then a label and a macro image (stripped, `subfiletype` 1 and 9). OpenSlide
  opens it as `aperio`; JPEG 2000 tiles use Aperio's RGB JPEG 2000 compression (33005).
- `"ome-tiff"`: OME-XML on page 0 (physical pixel size in µm, the objective's nominal
  magnification), the reduced levels in SubIFDs of page 0.
- `"single-level"`: one tiled page without a pyramid (readers compute lower levels).
- `"stripped"`: one untiled page (what the slide reader refuses; for tests of that error).

Sizes and coordinates are `(width, height)` and `(x, y)`, as OpenSlide uses them. The level with
downsample `d` has `ceil(W / d) x ceil(H / d)` pixels. A level is never held in memory when the
source is a callable: each tile of each level is rendered, encoded and written in turn. The
file is written under a temporary name in the destination folder and renamed when complete,
so `path` never holds a half-written slide. The layout decisions are in `docs/pathology.md`.
"""

import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import tifffile

from jaxmed.data.slide import default_levels, level_size

LAYOUTS = ("generic-tiff", "svs", "ome-tiff", "single-level", "stripped")
COMPRESSIONS = ("jpeg", "jpeg2000", "zlib", "none")
THUMBNAIL_SIZE = 1024  # the longer side of an SVS thumbnail is at most this
_APERIO_JPEG2000_RGB = 33005  # Aperio's RGB JPEG 2000 tile compression (OpenSlide decodes it)
_STRIP_ROWS = 64

RegionSource = Callable[[int, int, int, int, int], np.ndarray]


def write_slide(
    path: str | os.PathLike,
    source: np.ndarray | RegionSource,
    *,
    size: tuple[int, int] | None = None,
    layout: str = "generic-tiff",
    tile: int = 256,
    levels: Sequence[int] | None = None,
    min_level_size: int = 512,
    compression: str = "jpeg",
    quality: int = 90,
    mpp: float | tuple[float, float] | None = None,
    objective_power: float | None = None,
    description_extra: str | Mapping[str, object] | None = None,
) -> Path:
    """Write an RGB slide as a tiled (pyramidal) TIFF.

    **Arguments:**

    - `path`: the file to write (its folder must exist); replaced atomically when complete.
    - `source`: a uint8 `(H, W, 3)` array, or a callable
      `source(downsample, x, y, w, h) -> uint8 (h, w, 3)` rendering the region of the level with
      that integer downsample (`x, y, w, h` in that level's pixels, always inside the level).
      With an array, each reduced level is the 2x2 mean of the one before (rounded), so
      `levels` must then be powers of 2.
    - `size`: `(W, H)` of level 0; required with a callable source, checked with an array.
    - `layout`: one of `LAYOUTS` (see the module docstring).
    - `tile`: tile width and height in pixels, a multiple of 16.
    - `levels`: the downsample factors to store, increasing integers starting at 1; by default
      powers of 2 while the longer side of the level stays >= `min_level_size`
      (`jaxmed.data.slide.default_levels`).
      `"single-level"` and `"stripped"` store level 0 only.
    - `compression`: `"jpeg"` (YCbCr, 2x2 chroma subsampling, `quality` 1-100), `"jpeg2000"`
      (lossless when `quality >= 100`, else `quality` is OpenJPEG's target PSNR in dB),
      `"zlib"` (lossless deflate) or `"none"`.
    - `mpp`: micrometres per level-0 pixel, one number or `(x, y)`; `"svs"` needs x == y.
    - `objective_power`: the scanner objective (e.g. 20 or 40). Stored as `AppMag` in the
      Aperio description, as the OME objective's `NominalMagnification`, and in the other
      layouts as `AppMag = ...` in the ImageDescription (TIFF has no tag for it).
    - `description_extra`: more `key = value` fields (a mapping, or a `|`-separated string)
      appended to the Aperio description, or written as the ImageDescription of the other
      non-OME layouts.

    **Returns:** `path` as a `Path`.

    **Raises:** `ValueError` for an unknown layout or compression, bad levels, tile or size, or a
    source that returns a region of the wrong shape or dtype.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown slide layout {layout!r}; use one of {LAYOUTS}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    render, size = _region_source(source, size)
    if layout in ("single-level", "stripped"):
        if levels is not None and tuple(levels) != (1,):
            raise ValueError(f"layout {layout!r} stores level 0 only, got levels {levels}")
        levels = (1,)
    levels = _check_levels(levels, size, min_level_size, power_of_two=not callable(source))
    mpp_xy = _mpp_pair(mpp, layout)

    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tifffile.TiffWriter(temporary, bigtiff=_needs_bigtiff(size)) as tif:
            writer = _LevelWriter(tif, render, size, tile, compression, quality, mpp_xy)
            if layout == "svs":
                _write_svs(writer, levels, objective_power, description_extra)
            elif layout == "ome-tiff":
                _write_ome(writer, levels, objective_power)
            else:
                description = _fields_text(
                    {"AppMag": f"{objective_power:g}"} if objective_power is not None else {},
                    description_extra,
                ) or None
                for index, downsample in enumerate(levels):
                    writer.write(
                        downsample,
                        tiled=layout != "stripped",
                        subfiletype=1 if index else 0,
                        description=description if index == 0 else None,
                    )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------- sources


def _region_source(
    source: np.ndarray | RegionSource, size: tuple[int, int] | None
) -> tuple[RegionSource, tuple[int, int]]:
    """The callable form of `source` and the level-0 `(W, H)`."""
    if callable(source):
        if size is None:
            raise ValueError("size=(width, height) of level 0 is required with a callable source")
        size = (int(size[0]), int(size[1]))
        if min(size) < 1:
            raise ValueError(f"slide size must be positive, got {size}")
        return source, size
    array = np.asarray(source)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"an array source must be uint8 (H, W, 3), got {array.dtype} {array.shape}"
        )
    array_size = (array.shape[1], array.shape[0])
    if size is not None and tuple(size) != array_size:
        raise ValueError(f"size {tuple(size)} does not match the array's (W, H) {array_size}")
    return _ArrayPyramid(array), array_size


class _ArrayPyramid:
    """An array as a region source: level `2^k` is the 2x2 mean of level `2^(k-1)`, rounded."""

    def __init__(self, level0: np.ndarray):
        self._levels = {1: level0}

    def __call__(self, downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._level(downsample)[y:y + h, x:x + w]

    def _level(self, downsample: int) -> np.ndarray:
        if downsample not in self._levels:
            self._levels[downsample] = _half(self._level(downsample // 2))
        return self._levels[downsample]


def _half(image: np.ndarray) -> np.ndarray:
    """2x2 means (half-up rounding); an odd last row or column averages the pixels it has."""
    padded = np.pad(image, ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)), "edge")
    total = padded.astype(np.uint16).reshape(
        padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 3
    ).sum(axis=(1, 3))
    return ((total + 2) // 4).astype(np.uint8)


def _check_levels(
    levels: Sequence[int] | None, size: tuple[int, int], min_level_size: int, power_of_two: bool
) -> tuple[int, ...]:
    if levels is None:
        return default_levels(size, min_level_size)
    levels = tuple(int(d) for d in levels)
    if not levels or levels[0] != 1 or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must be increasing integers starting at 1, got {levels}")
    if power_of_two and any(d & (d - 1) for d in levels):
        raise ValueError(f"with an array source, levels must be powers of 2, got {levels}")
    if max(level_size(size, levels[-1])) < 1:
        raise ValueError(f"level {levels[-1]} of a {size} slide is empty")
    return levels


def _mpp_pair(mpp: float | tuple[float, float] | None, layout: str) -> tuple[float, float] | None:
    if mpp is None:
        return None
    pair = (float(mpp), float(mpp)) if np.isscalar(mpp) else (float(mpp[0]), float(mpp[1]))
    if not all(math.isfinite(m) and m > 0 for m in pair):
        raise ValueError(f"mpp must be positive, got {mpp}")
    if layout == "svs" and pair[0] != pair[1]:
        raise ValueError(f"the Aperio description holds one MPP for x and y, got {pair}")
    return pair


def _needs_bigtiff(size: tuple[int, int]) -> bool:
    # Uncompressed level-0 bytes are an upper bound on the file; over ~3.5 GB a classic TIFF's
    # 32-bit offsets may overflow.
    return size[0] * size[1] * 3 * 4 // 3 > 3_500_000_000


# ---------------------------------------------------------------------------- pages


class _LevelWriter:
    """Writes one level of a slide as one TIFF page, rendering it tile by tile."""

    def __init__(self, tif, render, size, tile, compression, quality, mpp_xy):
        self.tif = tif
        self.render = render
        self.size = size
        self.tile = tile
        self.compression = compression
        self.quality = quality
        self.mpp_xy = mpp_xy

    def write(
        self,
        downsample: int,
        *,
        tiled: bool = True,
        subfiletype: int = 0,
        description: str | bytes | None = None,
        compression: str | int | None = None,
        **options,
    ) -> None:
        w, h = level_size(self.size, downsample)
        compression = self.compression if compression is None else compression
        codec = _codec(compression, self.quality)
        resolution = {}
        if self.mpp_xy is not None:
            resolution = {
                "resolution": tuple(1e4 / (m * downsample) for m in self.mpp_xy),
                "resolutionunit": "CENTIMETER",
            }
        if tiled:
            data = self._tiles(downsample, w, h)
            layout = {"tile": (self.tile, self.tile)}
        else:
            data = self._rows(downsample, w, h)
            layout = {"rowsperstrip": _STRIP_ROWS}
        self.tif.write(
            data,
            shape=(h, w, 3),
            dtype=np.uint8,
            photometric="rgb",
            subfiletype=subfiletype,
            description=description,
            metadata=None,
            software=False,
            **layout,
            **codec,
            **resolution,
            **options,
        )

    def _region(self, downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        region = np.asarray(self.render(downsample, x, y, w, h))
        if region.shape != (h, w, 3) or region.dtype != np.uint8:
            raise ValueError(
                f"the slide source returned {region.dtype} {region.shape} for the region "
                f"(downsample={downsample}, x={x}, y={y}, w={w}, h={h}); uint8 {(h, w, 3)} "
                "was expected"
            )
        return region

    def _tiles(self, downsample: int, w: int, h: int) -> Iterator[np.ndarray]:
        t = self.tile
        for y in range(0, h, t):
            for x in range(0, w, t):
                region = self._region(downsample, x, y, min(t, w - x), min(t, h - y))
                if region.shape[:2] != (t, t):
                    # Edge tiles are padded by repeating the border: unlike zeros, this adds
                    # no sharp edge for JPEG to ring on inside the visible part.
                    region = np.pad(
                        region, ((0, t - region.shape[0]), (0, t - region.shape[1]), (0, 0)),
                        "edge",
                    )
                yield region

    def _rows(self, downsample: int, w: int, h: int) -> np.ndarray:
        # tifffile takes a stripped page as one array, so a stripped page is assembled in
        # memory (used for small images only: thumbnails, the stripped test layout).
        return np.concatenate([
            self._region(downsample, 0, y, w, min(_STRIP_ROWS, h - y))
            for y in range(0, h, _STRIP_ROWS)
        ])


def _codec(compression: str | int, quality: int) -> dict:
    if compression == "jpeg":
        return {"compression": "jpeg", "compressionargs": {"level": int(quality)}}
    if compression in ("jpeg2000", _APERIO_JPEG2000_RGB):
        tag = "jpeg2000" if compression == "jpeg2000" else _APERIO_JPEG2000_RGB
        args = {} if quality >= 100 else {"level": float(quality)}
        return {"compression": tag, "compressionargs": args}
    if compression == "zlib":
        return {"compression": "zlib", "compressionargs": {"level": 6}}
    return {"compression": None}


def _fields_text(fields: Mapping[str, object], extra: str | Mapping[str, object] | None) -> str:
    """`key = value` fields joined by `|`, as in an Aperio description."""
    parts = [f"{key} = {value}" for key, value in fields.items()]
    if isinstance(extra, Mapping):
        parts += [f"{key} = {value}" for key, value in extra.items()]
    elif extra:
        parts.append(str(extra))
    return "|".join(parts)


# ---------------------------------------------------------------------------- layouts


def _write_svs(writer: _LevelWriter, levels, objective_power, description_extra) -> None:
    w, h = writer.size
    t = writer.tile
    codec = "JPEG/RGB" if writer.compression == "jpeg" else f"{writer.compression.upper()}/RGB"
    head = (
        f"Aperio Image Library jaxmed\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) {codec} "
        f"Q={writer.quality}"
    )
    fields = {}
    if objective_power is not None:
        fields["AppMag"] = f"{objective_power:g}"
    if writer.mpp_xy is not None:
        fields["MPP"] = f"{writer.mpp_xy[0]:.6g}"
    fields_text = _fields_text(fields, description_extra)
    tile_codec = _APERIO_JPEG2000_RGB if writer.compression == "jpeg2000" else None
    writer.write(1, description="|".join(filter(None, [head, fields_text])), compression=tile_codec)

    # Aperio's page 1: a stripped thumbnail (not a pyramid level).
    thumb = _thumbnail_downsample(writer.size)
    tw, th = level_size(writer.size, thumb)
    strip_codec = "jpeg" if writer.compression in ("jpeg", "jpeg2000") else writer.compression
    writer.write(
        thumb, tiled=False, compression=strip_codec,
        description=f"Aperio Image Library jaxmed\r\n{w}x{h} -> {tw}x{th} - |{fields_text}",
    )
    for downsample in levels[1:]:
        lw, lh = level_size(writer.size, downsample)
        # Aperio marks its reduced levels subfiletype 0; readers tell them from the label and
        # macro (subfiletype 1 and 9) by that.
        writer.write(
            downsample, compression=tile_codec,
            description=f"Aperio Image Library jaxmed\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) -> "
            f"{lw}x{lh} {codec} Q={writer.quality}",
        )
    for name, subfiletype, shape in (("label", 1, (256, 256)), ("macro", 9, (256, 640))):
        image = _associated_image(shape)
        writer.tif.write(
            image, photometric="rgb", subfiletype=subfiletype, rowsperstrip=_STRIP_ROWS,
            compression="zlib", metadata=None, software=False,
            description=f"Aperio Image Library jaxmed\r\n{name} {shape[1]}x{shape[0]}",
        )


def _thumbnail_downsample(size: tuple[int, int]) -> int:
    downsample = 1
    while max(level_size(size, downsample)) > THUMBNAIL_SIZE:
        downsample *= 2
    return downsample


def _associated_image(shape: tuple[int, int]) -> np.ndarray:
    """A stand-in label/macro picture: light grey with a dark diagonal band."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    grey = np.where(np.abs(x - y) < 12, 40, 220).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _write_ome(writer: _LevelWriter, levels, objective_power) -> None:
    writer.write(
        1, description=_ome_xml(writer.size, writer.mpp_xy, objective_power).encode(),
        subifds=len(levels) - 1,
    )
    for downsample in levels[1:]:
        writer.write(downsample, subfiletype=1)


def _ome_xml(
    size: tuple[int, int], mpp_xy: tuple[float, float] | None, objective_power: float | None
) -> str:
    w, h = size
    instrument = objective_settings = ""
    if objective_power is not None:
        instrument = (
            '<Instrument ID="Instrument:0"><Objective ID="Objective:0" '
            f'NominalMagnification="{objective_power:g}"/></Instrument>'
        )
        objective_settings = (
            '<InstrumentRef ID="Instrument:0"/><ObjectiveSettings ID="Objective:0"/>'
        )
    physical = ""
    if mpp_xy is not None:
        physical = (
            f' PhysicalSizeX="{mpp_xy[0]:.9g}" PhysicalSizeXUnit="µm"'
            f' PhysicalSizeY="{mpp_xy[1]:.9g}" PhysicalSizeYUnit="µm"'
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
        'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd">'
        f"{instrument}"
        f'<Image ID="Image:0" Name="slide">{objective_settings}'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="{w}" SizeY="{h}" '
        f'SizeC="3" SizeZ="1" SizeT="1" Interleaved="true"{physical}>'
        '<Channel ID="Channel:0:0" SamplesPerPixel="3"/>'
        '<TiffData IFD="0" PlaneCount="1"/>'
        "</Pixels></Image></OME>"
    )
