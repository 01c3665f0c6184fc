"""Synthetic cohorts of labelled whole slides: the class in small high-resolution foci, a
distractor at low resolution.

`write_cohort(directory)` writes `slides_per_class` slides of each class as tiled pyramidal TIFFs
(`slide_000.tiff`, ...) with QuPath GeoJSON beside them and `labels.csv` (`slide,label`). The
names say nothing about the class: the label is only in `labels.csv`. The decisions are in
docs/pathology.md; in short, a slide (`cohort_design`) is

- tissue: one island or three (`make_synthetic_slide` shapes, some with a hole; about 35 % or
  25 % of the slide) of a sheet of small cells, unannotated: the "normal" tissue of every slide;
- foci: in a slide of a tumour class, 3-6 blobs of radius 0.3-0.6 `tile` inside the tissue,
  annotated with the class. Their texture is the same cell sheet (the same nuclei, in the same
  places) plus a pattern of 2-pixel period at level 0: coarse chromatin (a checkerboard in the
  nuclei) for adenocarcinoma, keratin fibrils (a cross-hatch in the cytoplasm) for squamous.
  Every 2 x 2 area mean removes the pattern exactly, and the mean intensity is kept, so the
  tile downsampled x0.5 (and every pyramid level) shows a focus as plain normal tissue;
- annotated normal regions: when "normal" is a class, 1-2 blobs of the plain sheet in every
  slide, annotated "normal", drawn without the label (a slide's GeoJSON is never empty);
- a distractor: with `distractor_probability`, whatever the class, one large region
  (radius 1.3-2 `tile`) of dense eosin stroma over the tissue, unannotated, visible at every
  level; foci and normal regions are placed outside it;
- stains: per slide, the stain vectors of `HE_STAINS` with each component scaled by
  `exp(N(0, stain_variation))` (about 4 degrees at 0.1) and each stain's strength by
  `exp(N(0, stain_variation))`.

Everything that does not depend on the class (tissue, stains, distractor, normal regions, focus
places) is drawn from `(seed, index)` alone: slide `index` of any class has the same tissue and
the same distractor, and the foci of an adenocarcinoma slide and of a squamous one lie in the
same places. Which index gets which class is a seeded permutation.
"""

import concurrent.futures
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmed.data.synthetic_slide import (
    CLASS_TEXTURES,
    HE_STAINS,
    Region,
    SyntheticSlide,
    blob_region,
    make_synthetic_slide,
    write_synthetic_slide,
)
from jaxmed.errors import InputDataError

__all__ = ["CohortSlide", "cohort_design", "cohort_labels", "read_labels", "write_cohort"]

MANIFEST = "cohort.json"
LABELS = "labels.csv"
_FORMAT = 1  # the manifest's version: a change of the design makes old cohorts foreign
_TIFF_TILE = 256
_TISSUE_FRACTION = 0.45
_HOLE_PROBABILITY = 0.3
_REACH = 1.3  # a blob of radius r lies within 1.3 r of its centre (roughness 0.25)
_ATTEMPTS = 200
_STREAM_SLIDE, _STREAM_FOCI, _STREAM_LABELS = 0xC0407, 0xF0C1, 0x1ABE1


@dataclasses.dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort: its TIFF, its GeoJSON beside it, and its class."""

    path: Path
    annotations: Path
    label: str


# ---------------------------------------------------------------------------------------------
# One slide's design
# ---------------------------------------------------------------------------------------------


def cohort_design(
    label: str,
    index: int,
    *,
    size: tuple[int, int] = (2048, 2048),
    tile: int = 256,
    class_names: Sequence[str] = CLASS_TEXTURES,
    seed: int = 0,
    distractor_probability: float = 0.5,
    stain_variation: float = 0.1,
    foci: tuple[int, int] = (3, 6),
    focus_radius: tuple[float, float] = (0.3, 0.6),
    distractor_radius: tuple[float, float] = (1.3, 2.0),
) -> SyntheticSlide:
    """The design of slide `index` of class `label` (see the module's doc).

    **Arguments:**

    - `label`: the slide's class, one of `class_names`.
    - `index`: the slide's number in the cohort; with `seed` it decides everything but the
      class's own texture.
    - `size`: `(width, height)` of level 0, pixels.
    - `tile`: the analysis tile (level-0 pixels); foci and distractor are sized in tiles.
    - `class_names`: the cohort's classes, distinct names from `CLASS_TEXTURES`; the design's
      `class_names` are these, with "normal" (the unannotated tissue) appended when absent.
    - `distractor_probability`: chance of the distractor region, the same for every class.
    - `stain_variation`: spread of the per-slide stain vectors and strengths (0: `HE_STAINS`).
    - `foci`: least and most foci of a tumour slide (fewer when they do not fit).
    - `focus_radius`, `distractor_radius`: ranges, in tiles.

    **Returns:** the `SyntheticSlide`; its overlays are the distractor, the normal regions and the
    foci, in that order.
    """
    class_names = _check_classes(class_names)
    if label not in class_names:
        raise ValueError(f"label {label!r} is not one of the classes {class_names}")
    rng = np.random.default_rng([seed, index, _STREAM_SLIDE])
    slide_seed = int(rng.integers(2 ** 31))
    stains = HE_STAINS * np.exp(stain_variation * rng.standard_normal((2, 3)))
    intensity = tuple(float(v) for v in np.exp(stain_variation * rng.standard_normal(2)))
    base = make_synthetic_slide(size, seed=slide_seed, class_names=("normal",), stains=stains,
                                tissue_fraction=_TISSUE_FRACTION, islands=int(rng.choice([1, 3])),
                                hole_probability=_HOLE_PROBABILITY)
    islands = tuple(dataclasses.replace(r, texture="sheet-normal", annotated=False)
                    for r in base.regions)
    occupied = [(h.centre, float(h.radii.max())) for r in islands for h in r.holes]
    overlays = []

    has_distractor = rng.uniform() < distractor_probability
    radius = tile * rng.uniform(*distractor_radius)
    centre = _place(rng, islands, 0.0, [])  # anywhere in the tissue, over an edge or not
    shape_rng = np.random.default_rng([seed, index, _STREAM_SLIDE, 1])
    if has_distractor and centre is not None:
        overlays.append(blob_region("normal", centre, radius, rng=shape_rng, texture="dense-stroma",
                                    annotated=False))
        occupied.append((centre, _REACH * radius))

    normal_regions = int(rng.integers(1, 3)) if "normal" in class_names else 0
    for centre, radius in _place_blobs(rng, islands, occupied, normal_regions,
                                       [1.5 * tile * r for r in focus_radius]):
        overlays.append(blob_region("normal", centre, radius, rng=shape_rng,
                                    texture="sheet-normal"))

    focus_rng = np.random.default_rng([seed, index, _STREAM_FOCI])
    count = int(focus_rng.integers(foci[0], foci[1] + 1)) if label != "normal" else 0
    for centre, radius in _place_blobs(focus_rng, islands, occupied, count,
                                       [tile * r for r in focus_radius]):
        overlays.append(blob_region(label, centre, radius, rng=focus_rng,
                                    texture=f"sheet-{label}"))
    design_classes = class_names + (() if "normal" in class_names else ("normal",))
    return dataclasses.replace(base, regions=islands, class_names=design_classes,
                               overlays=tuple(overlays), intensity=intensity)


def _check_classes(class_names) -> tuple[str, ...]:
    class_names = tuple(class_names)
    if (not class_names or len(set(class_names)) != len(class_names)
            or any(n not in CLASS_TEXTURES for n in class_names)):
        raise ValueError(f"class_names must be distinct names from {CLASS_TEXTURES}, got "
                         f"{class_names}")
    return class_names


def _place_blobs(rng, islands, occupied: list, count: int, radii) -> list:
    """`count` `(centre, radius)` blobs (radius uniform in `radii`, else the least, else half of
    it where none fits), each added to `occupied`; fewer when even those do not fit."""
    placed = []
    for _ in range(count):
        for radius in (rng.uniform(*radii), radii[0], 0.5 * radii[0]):
            centre = _place(rng, islands, radius, occupied)
            if centre is not None:
                placed.append((centre, radius))
                occupied.append((centre, _REACH * radius))
                break
    return placed


def _place(rng, islands: Sequence[Region], radius: float, occupied):
    """A centre for a blob of `radius` inside the tissue (off its holes) and apart from the
    `occupied` `(centre, reach)` discs: the first of `_ATTEMPTS` random points that fits (an
    island drawn by the area of its bounds, a point uniform in them), or None."""
    reach = _REACH * radius
    bounds = np.array([r.bounds() for r in islands])  # bounds: [n, (x0, y0, x1, y1)]
    area = (bounds[:, 2] - bounds[:, 0]) * (bounds[:, 3] - bounds[:, 1])
    pick = rng.choice(len(islands), size=_ATTEMPTS, p=area / area.sum())
    low, high = bounds[pick, :2], bounds[pick, 2:]
    centres = low + (high - low) * rng.uniform(size=(_ATTEMPTS, 2))  # centres: [A, 2]
    fits = np.zeros(_ATTEMPTS, bool)
    for k, island in enumerate(islands):
        fits[pick == k] = _inside(island.outline, centres[pick == k], reach + 4.0)
    for centre, r in occupied:
        fits &= np.hypot(*(centres - centre).T) > reach + r + 4.0
    return tuple(float(v) for v in centres[np.argmax(fits)]) if fits.any() else None


def _inside(outline, centres: np.ndarray, reach: float) -> np.ndarray:
    """Whether each disc of `reach` around `centres` (`[m, 2]`) lies inside the star-shaped
    `outline`: its centre and 32 points of its rim nearer the star's centre than its edges."""
    angles = 2 * np.pi * np.arange(33) / 32
    rim = np.where(np.arange(33) < 32, reach, 0.0)  # the last point is the centre
    px = centres[:, :1] + rim * np.cos(angles) - outline.centre[0]  # px: [m, 33]
    py = centres[:, 1:] + rim * np.sin(angles) - outline.centre[1]
    n = len(outline.radii)
    k = np.floor(np.arctan2(py, px) * (n / (2 * np.pi))).astype(int) % n
    # An edge between vertices k and k + 1 stays beyond the smaller radius times cos(pi / n).
    edge = np.minimum(outline.radii, np.roll(outline.radii, -1)) * math.cos(math.pi / n)
    return np.all(np.hypot(px, py) < edge[k], axis=1)


def cohort_labels(class_names: Sequence[str], slides_per_class: int, seed: int) -> list[str]:
    """The class of each slide index: `slides_per_class` of each, in a seeded order."""
    class_names = _check_classes(class_names)
    labels = [name for name in class_names for _ in range(slides_per_class)]
    order = np.random.default_rng([seed, _STREAM_LABELS]).permutation(len(labels))
    return [labels[i] for i in order]


# ---------------------------------------------------------------------------------------------
# Writing a cohort
# ---------------------------------------------------------------------------------------------


def write_cohort(
    directory: str | os.PathLike,
    *,
    slides_per_class: int = 8,
    size: tuple[int, int] = (2048, 2048),
    tile: int = 256,
    class_names: Sequence[str] = CLASS_TEXTURES,
    seed: int = 0,
    distractor_probability: float = 0.5,
    stain_variation: float = 0.1,
    compression: str = "jpeg",
    quality: int = 90,
    mpp: float = 0.5,
    workers: int = 1,
    foci: tuple[int, int] = (3, 6),
    focus_radius: tuple[float, float] = (0.3, 0.6),
    distractor_radius: tuple[float, float] = (1.3, 2.0),
) -> list[CohortSlide]:
    """Write a labelled cohort into `directory`, or finish one begun with the same options.

    Writes `slide_NNN.tiff` (tiled pyramidal TIFF, 256-pixel tiles) with `slide_NNN.geojson`
    beside it for every slide, `labels.csv` (columns `slide,label`, `slide` the TIFF's file name)
    and `cohort.json` (the options). Every file is written under a temporary name and renamed
    when complete; a slide whose GeoJSON (written after its TIFF) exists is kept, so a killed run
    resumes where it stopped. Deterministic in `seed`.

    **Arguments:**

    - `slides_per_class`: slides of each class.
    - `size`, `tile`, `class_names`, `seed`, `distractor_probability`, `stain_variation`,
      `foci`, `focus_radius`, `distractor_radius`: the design (`cohort_design`).
    - `compression`, `quality`, `mpp`: as `write_slide`'s (JPEG quality 90, 0.5 um per pixel).
    - `workers`: processes writing slides at once (1: in this process).

    **Returns:** the `CohortSlide`s in index order.

    **Raises:** `InputDataError` naming the option when `directory` holds a cohort made with
    other options, or naming the folder when it holds slides without a `cohort.json`.
    """
    directory = Path(directory)
    design = dict(size=[int(s) for s in size], tile=int(tile), class_names=list(class_names),
                  seed=int(seed), distractor_probability=float(distractor_probability),
                  stain_variation=float(stain_variation), foci=[int(f) for f in foci],
                  focus_radius=[float(r) for r in focus_radius],
                  distractor_radius=[float(r) for r in distractor_radius])
    options = dict(format=_FORMAT, slides_per_class=int(slides_per_class), **design,
                   compression=compression, quality=int(quality), mpp=float(mpp))
    labels = cohort_labels(class_names, slides_per_class, seed)
    cohort_design(labels[0], 0, **_design_arguments(design))  # refuse bad options before writing
    directory.mkdir(parents=True, exist_ok=True)
    _claim(directory, options)

    slides = [CohortSlide(directory / f"slide_{i:03d}.tiff", directory / f"slide_{i:03d}.geojson",
                          label) for i, label in enumerate(labels)]
    pending = [(i, s) for i, s in enumerate(slides) if not (s.annotations.is_file()
                                                             and s.path.is_file())]
    jobs = [(str(s.path), s.label, i, design, compression, int(quality), float(mpp))
            for i, s in pending]
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")  # no fork of a process running threads
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)),
                                                    mp_context=context) as pool:
            list(pool.map(_write_one, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            _write_one(*job)
    text = "slide,label\n" + "".join(f"{s.path.name},{s.label}\n" for s in slides)
    if not (directory / LABELS).is_file() or (directory / LABELS).read_text() != text:
        _write_text(directory / LABELS, text)  # a finished cohort is left untouched
    return slides


def _design_arguments(design: dict) -> dict:
    return dict(design, size=tuple(design["size"]), class_names=tuple(design["class_names"]),
                foci=tuple(design["foci"]), focus_radius=tuple(design["focus_radius"]),
                distractor_radius=tuple(design["distractor_radius"]))


def _write_one(path: str, label: str, index: int, design: dict, compression: str, quality: int,
               mpp: float) -> None:
    slide = cohort_design(label, index, **_design_arguments(design))
    write_synthetic_slide(path, slide, tile=_TIFF_TILE, compression=compression, mpp=mpp,
                          quality=quality)


def _claim(directory: Path, options: dict) -> None:
    """Write the manifest of a new cohort, or check that the existing one has these options."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        foreign = sorted(p.name for p in directory.iterdir()
                         if p.suffix in (".tiff", ".geojson") or p.name == LABELS)
        if foreign:
            raise InputDataError(f"{directory}: holds {foreign[0]} but no {MANIFEST}; not a cohort "
                                 "written by write_cohort (use an empty folder)")
        _write_text(manifest, json.dumps(options, indent=1) + "\n")
        return
    try:
        made = json.loads(manifest.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputDataError(f"{manifest}: not a cohort manifest ({error})") from error
    for key, value in options.items():
        if not isinstance(made, dict) or made.get(key) != value:
            was = made.get(key) if isinstance(made, dict) else None
            raise InputDataError(f"{manifest}: the cohort there was made with {key}={was!r}, "
                                 f"not {value!r}; use another folder")


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Reading labels
# ---------------------------------------------------------------------------------------------


def read_labels(path: str | os.PathLike) -> dict[str, str]:
    """Read a `labels.csv` (header `slide,label`, more columns ignored).

    **Returns:** `{slide file name: label}` in file order.

    **Raises:** `InputDataError` naming the file (and the row) for a missing file or column, an
    empty slide name or label, or a slide listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        missing = [c for c in ("slide", "label") if c not in (reader.fieldnames or ())]
        if missing:
            raise InputDataError(f"{path}: no {missing[0]!r} column (the header must name "
                                 f"'slide' and 'label', got {reader.fieldnames})")
        labels = {}
        for row in reader:
            where = f"{path}: row {reader.line_num}"
            slide, label = (row.get("slide") or "").strip(), (row.get("label") or "").strip()
            if not slide:
                raise InputDataError(f"{where}: empty slide name")
            if not label:
                raise InputDataError(f"{where}: slide {slide} has an empty label")
            if slide in labels:
                raise InputDataError(f"{where}: slide {slide} is listed twice")
            labels[slide] = label
    return labels
