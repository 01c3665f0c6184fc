"""The whole-slide system's data (docs/pathology.md): the slides and their labels (a folder or
list, or a synthetic cohort written into the run), the train/test split by slide, and the
pre-training images: the low-resolution image and the high-resolution blocks of every tile of
the training slides, stain-normalised, labelled from the region annotations and cached in the
run as `.npy` files that training reads row by row.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxmed.data.annotations import annotation_mask, read_annotations
from jaxmed.data.slide import open_slide
from jaxmed.data.split import train_val_split
from jaxmed.data.synthetic_cohort import read_labels, write_cohort
from jaxmed.data.synthetic_slide import CLASS_TEXTURES
from jaxmed.errors import InputDataError
from jaxmed.pathology.config import EXCLUDE, WsiConfig
from jaxmed.pathology.extract import list_slides
from jaxmed.pathology.fusion import split_tile
from jaxmed.pathology.stain import StainNormalizer, StainProfile, optical_density
from jaxmed.pathology.tiles import tile_grid
from jaxmed.pathology.tissue import tissue_mask
from jaxmed.training import ArraySource, make_batches

COHORT_DIR = "cohort"
PRETRAIN_DIR = "pretrain"
STAIN_TARGET_NAME = "stain_target.json"
# Tile pixels whose optical density reaches this in some channel count as tissue for labels.
LABEL_TISSUE_OD = 0.15
LABEL_GRID = 32  # tissue and annotations are compared on a 32 x 32 grid per image


@dataclasses.dataclass(frozen=True)
class SlideSet:
    """Slides with their class labels. `paths[i]` has label `labels[i]` (an index into
    `class_names`); `annotations[i]` is its GeoJSON or None."""

    paths: tuple[Path, ...]
    labels: np.ndarray
    annotations: tuple[Path | None, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: Sequence[int]) -> SlideSet:
        rows = [int(r) for r in rows]
        return SlideSet(tuple(self.paths[r] for r in rows), self.labels[rows],
                        tuple(self.annotations[r] for r in rows), self.class_names)


def synchronise(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def load_slides(config: WsiConfig, workdir: str | os.PathLike) -> SlideSet:
    """The slides of a run: `config.slides` with `config.labels` (default `labels.csv` in the
    slides folder), or a synthetic cohort written once into `workdir/cohort` (by process 0;
    the others wait). Classes are ordered as `WsiConfig`'s default cohort for synthetic data
    and alphabetically otherwise.

    **Raises:** `InputDataError` for a missing labels file, a slide without a label, a label
    without a slide, or a class with fewer than 2 slides.
    """
    if config.slides is None:
        directory = Path(workdir) / COHORT_DIR
        if jax.process_index() == 0:
            write_cohort(directory, slides_per_class=config.cohort_slides_per_class,
                         size=(config.cohort_size, config.cohort_size),
                         tile=config.tile_size, seed=config.seed)
        synchronise("wsi-cohort")
        paths = list_slides(directory)
        labels_path = directory / "labels.csv"
    else:
        paths = list_slides(config.slides)
        base = Path(config.slides)
        labels_path = Path(config.labels) if config.labels else (
            (base if base.is_dir() else base.parent) / "labels.csv")
    if not labels_path.is_file():
        raise InputDataError(f"{labels_path}: not found; give the slide labels with --labels "
                             f"(CSV with columns slide,label)")
    labels = read_labels(labels_path)
    missing = [p.name for p in paths if p.name not in labels]
    if missing:
        raise InputDataError(f"{labels_path}: no label for {len(missing)} slide(s): "
                             f"{', '.join(missing[:5])}")
    unused = sorted(set(labels) - {p.name for p in paths})
    if unused:
        raise InputDataError(f"{labels_path}: {len(unused)} labelled slide(s) not found: "
                             f"{', '.join(unused[:5])}")
    present = sorted(set(labels.values()))
    names = [c for c in CLASS_TEXTURES if c in present] + [c for c in present
                                                           if c not in CLASS_TEXTURES]
    index = np.array([names.index(labels[p.name]) for p in paths], np.int32)
    counts = np.bincount(index, minlength=len(names))
    if len(names) < 2 or counts.min() < 2:
        raise InputDataError(f"{labels_path}: need at least 2 classes with 2 slides each to "
                             f"train and test, got {dict(zip(names, counts.tolist()))}")
    geojson = tuple(p.with_suffix(".geojson") if p.with_suffix(".geojson").is_file()
                    else None for p in paths)
    return SlideSet(tuple(paths), index, geojson, tuple(names))


def split_slides(slides: SlideSet, test_fraction: float, seed: int
                 ) -> tuple[SlideSet, SlideSet]:
    """`(train, test)` by slide, stratified by class (`train_val_split`)."""
    train, test = train_val_split(len(slides), test_fraction, seed, labels=slides.labels)
    return slides.subset(train), slides.subset(test)


# ---------------------------------------------------------------------------- stain target


def stain_normalizer(config: WsiConfig, workdir: str | os.PathLike) -> StainNormalizer | None:
    """The run's normaliser (None with `--stain none`). Its target, fitted once from
    `--stain-target` (or the reference appearance), is kept in `workdir/stain_target.json`
    so that every later command normalises to exactly the same target."""
    if config.stain == "none":
        return None
    path = Path(workdir) / STAIN_TARGET_NAME
    if path.is_file():
        saved = json.loads(path.read_text())
        return StainNormalizer(config.stain, target=StainProfile(np.array(saved["stains"]),
                                                                 np.array(saved["p99"])))
    if config.stain_target is None:
        normalizer = StainNormalizer.default(config.stain)
    else:
        with open_slide(config.stain_target) as slide:
            normalizer = StainNormalizer(config.stain).fit_slide(slide)
    if jax.process_index() == 0:
        values = {"method": config.stain, "source": config.stain_target or "reference",
                  "stains": normalizer.target.stains.tolist(),
                  "p99": normalizer.target.p99.tolist()}
        temporary = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(values, indent=2))
        os.replace(temporary, path)
    return normalizer


# ---------------------------------------------------------------------------- tile labels


def image_labels(tiles: np.ndarray, annotations, coords: np.ndarray, tile_size: int,
                 ratio: float, class_names: Sequence[str], unannotated: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The labels of each tile's low-resolution image and of its high-resolution blocks.

    An image's label is the class covering most of its tissue (pixels whose optical density
    reaches `LABEL_TISSUE_OD` in some channel), compared on a `LABEL_GRID`² grid per image:
    annotated tissue counts for its annotation's class, unannotated tissue for
    `unannotated` (a class name), or not at all with `unannotated='exclude'`. An image with no
    counted tissue gets -1 (left out of pre-training).

    **Arguments:** `tiles` uint8 `(T, S, S, 3)` at level 0; `annotations`, the slide's
    regions; `coords` `(T, 2)` level-0 corners; `ratio`: `1/k`, the blocks per side.

    **Returns:** `(low (T,), high (T, k^2))` int32.
    """
    k = round(1 / ratio)
    grid = LABEL_GRID * k
    step = tile_size // grid
    classes = list(class_names)
    if unannotated != EXCLUDE and unannotated not in classes:
        raise InputDataError(f"--unannotated {unannotated!r} is not a class of the slides "
                             f"({', '.join(classes)}) nor {EXCLUDE!r}")
    known = [a for a in annotations if a.class_name in classes]
    fill = -1 if unannotated == EXCLUDE else classes.index(unannotated)
    count = len(tiles)
    low = np.full(count, -1, np.int32)
    high = np.full((count, k * k), -1, np.int32)
    for t in range(count):
        small = tiles[t, : grid * step, : grid * step].reshape(grid, step, grid, step, 3)
        small = small.mean(axis=(1, 3))  # small: [G, G, 3]
        tissue = np.asarray(optical_density(small)).max(axis=-1) >= LABEL_TISSUE_OD
        regions = annotation_mask(known, (grid, grid), tile_size / grid, classes,
                                  origin=tuple(float(v) for v in coords[t])) - 1
        regions = np.where(regions >= 0, regions, fill)  # -1: not counted
        counted = tissue & (regions >= 0)
        low[t] = _majority(regions[counted], len(classes))
        blocks = (regions.reshape(k, LABEL_GRID, k, LABEL_GRID).transpose(0, 2, 1, 3)
                  .reshape(k * k, -1))
        kept = counted.reshape(k, LABEL_GRID, k, LABEL_GRID).transpose(0, 2, 1, 3)
        kept = kept.reshape(k * k, -1)
        for b in range(k * k):
            high[t, b] = _majority(blocks[b][kept[b]], len(classes))
    return low, high


def _majority(labels: np.ndarray, classes: int) -> int:
    return int(np.argmax(np.bincount(labels, minlength=classes))) if labels.size else -1


# ---------------------------------------------------------------------------- pre-training


@dataclasses.dataclass(frozen=True)
class PretrainingSet:
    """The cached pre-training images of a run (`.npy`, memory-mapped).

    - `low_images` uint8 `(T, s, s, 3)`, `low_labels` `(T,)`: one image per tile.
    - `high_images` uint8 `(T k^2, s, s, 3)`, `high_labels` `(T k^2,)`: the blocks.
    Labels are class indices, -1 for images left out.
    """

    low_images: np.ndarray
    low_labels: np.ndarray
    high_images: np.ndarray
    high_labels: np.ndarray

    def source(self, which: str) -> ArraySource:
        """The labelled images of network `which` (`'low'` or `'high'`) for `make_batches`."""
        images, labels = ((self.low_images, self.low_labels) if which == "low"
                          else (self.high_images, self.high_labels))
        return _Rows(images, labels, np.flatnonzero(labels >= 0))


class _Rows(ArraySource):
    """`ArraySource` over chosen rows of memory-mapped arrays, read when indexed."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray):
        self.images, self.labels, self.rows = images, labels, rows
        self._length = len(rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = self.rows[index]
        return {"image": np.asarray(self.images[row]), "label": self.labels[row]}


def _manifest(config: WsiConfig, train: SlideSet, workdir: Path) -> dict:
    # Slides inside the run (the synthetic cohort) are recorded relative to it, so a copied or
    # moved run keeps its cache.
    paths = [Path(p).resolve() for p in train.paths]
    slides = [os.path.relpath(p, workdir) if p.is_relative_to(workdir) else str(p)
              for p in paths]
    return {"slides": slides, "tile_size": config.tile_size,
            "ratio": config.ratio, "min_corners": config.min_corners, "stain": config.stain,
            "stain_target": config.stain_target, "unannotated": config.unannotated,
            "max_tiles_per_slide": config.max_tiles_per_slide, "seed": config.seed,
            "class_names": list(train.class_names)}


def pretraining_set(config: WsiConfig, train: SlideSet, workdir: str | os.PathLike,
                    normalizer: StainNormalizer | None, *, readers: int = 4,
                    progress: bool = True) -> PretrainingSet:
    """The pre-training images of the training slides, built once into `workdir/pretrain`
    (by process 0, atomically: a killed run leaves no half cache; the others wait) and
    memory-mapped. A cache built with other tiling options is rebuilt.

    Per slide: tissue mask, the tile grid (`config.tile_size`, `config.min_corners`), at most
    `config.max_tiles_per_slide` tiles drawn with the run's seed, each read at level 0,
    normalised with the slide's own source estimate, cut into the low image and the blocks
    (`fusion.split_tile`) and labelled (`image_labels`).
    """
    directory = Path(workdir) / PRETRAIN_DIR
    manifest = _manifest(config, train, Path(workdir).resolve())
    if jax.process_index() == 0 and _read_manifest(directory) != manifest:
        _build_pretraining(directory, manifest, config, train, normalizer, readers, progress)
    synchronise("wsi-pretrain")
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r")
              for name in ("low_images", "low_labels", "high_images", "high_labels")}
    return PretrainingSet(**arrays)


def _read_manifest(directory: Path) -> dict | None:
    path = directory / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _build_pretraining(directory: Path, manifest: dict, config: WsiConfig, train: SlideSet,
                       normalizer, readers: int, progress: bool) -> None:
    rng = np.random.default_rng([config.seed, 0x7117E])
    plans = []
    for path, geojson in zip(train.paths, train.annotations, strict=True):
        with open_slide(path) as slide:
            grid = tile_grid(tissue_mask(slide), slide.dimensions, tile_size=config.tile_size,
                             min_corners=config.min_corners)
        coords = grid.coords
        if config.max_tiles_per_slide and len(coords) > config.max_tiles_per_slide:
            coords = coords[np.sort(rng.choice(len(coords), config.max_tiles_per_slide,
                                               replace=False))]
        plans.append((path, geojson, coords))
    total = sum(len(c) for _, _, c in plans)
    if total == 0:
        raise InputDataError("the training slides have no tissue tiles to pre-train on")
    k = round(1 / config.ratio)
    s = config.block_size
    temporary = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    out = {
        "low_images": np.lib.format.open_memmap(temporary / "low_images.npy", "w+",
                                                np.uint8, (total, s, s, 3)),
        "high_images": np.lib.format.open_memmap(temporary / "high_images.npy", "w+",
                                                 np.uint8, (total * k * k, s, s, 3)),
    }
    low_labels = np.full(total, -1, np.int32)
    high_labels = np.full(total * k * k, -1, np.int32)
    start = 0
    bar = _progress(progress, total)
    with concurrent.futures.ThreadPoolExecutor(readers) as pool:
        for path, geojson, coords in plans:
            if not len(coords):
                continue
            annotations = read_annotations(geojson) if geojson is not None else []
            with open_slide(path) as slide:
                tiles = np.stack(list(pool.map(
                    lambda c: slide.read_region((int(c[0]), int(c[1])), 0,
                                                (config.tile_size,) * 2), coords)))
                if normalizer is not None:
                    normalizer.fit_source_slide(slide, tiles=coords,
                                                tile_size=config.tile_size)
                    tiles = np.asarray(normalizer.transform(tiles))
            low, high = split_tile(tiles, config.ratio)
            stop = start + len(tiles)
            out["low_images"][start:stop] = np.round(np.asarray(low)).astype(np.uint8)
            out["high_images"][start * k * k:stop * k * k] = np.asarray(high).reshape(
                -1, s, s, 3)
            low_labels[start:stop], blocks = image_labels(
                tiles, annotations, coords, config.tile_size, config.ratio, train.class_names,
                config.unannotated)
            high_labels[start * k * k:stop * k * k] = blocks.reshape(-1)
            start = stop
            bar.update(len(tiles))
    bar.close()
    for memmap in out.values():
        memmap.flush()
    np.save(temporary / "low_labels.npy", low_labels)
    np.save(temporary / "high_labels.npy", high_labels)
    if (low_labels >= 0).sum() == 0 or (high_labels >= 0).sum() == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        raise InputDataError("no pre-training image has labelled tissue; check the "
                             "annotations and --unannotated")
    (temporary / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(temporary, directory)


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pre-training tiles", unit="tile", disable=not enabled,
                dynamic_ncols=True)


# ---------------------------------------------------------------------------- augmentation


def augment(example: dict, rng: np.random.Generator, stains: np.ndarray | None = None,
            jitter: float = 0.05) -> dict:
    """Pre-training augmentation of one image: one of the 8 flips/rotations by 90 degrees,
    and stain jitter: optical densities decomposed on `stains` (the normalisation target,
    `(2, 3)`; default: no jitter), each stain's concentration scaled by `1 + U(-j, j)` and
    shifted by `U(-j, j)`, recomposed (the residual off the stain plane kept)."""
    image = np.rot90(example["image"], k=int(rng.integers(4)))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if stains is not None and jitter > 0:
        od = -np.log(np.maximum(image.astype(np.float32), 1.0) / 255.0)  # [s, s, 3]
        pinv = np.linalg.pinv(stains)  # [3, 2]
        c = od @ pinv  # [s, s, 2]
        residual = od - c @ stains
        scale = 1.0 + rng.uniform(-jitter, jitter, 2)
        shift = rng.uniform(-jitter, jitter, 2)
        od = (c * scale + shift * (c > 0.05)) @ stains + residual
        image = np.clip(255.0 * np.exp(-od), 0, 255).round().astype(np.uint8)
    return {**example, "image": np.ascontiguousarray(image)}


def train_batches(source: ArraySource, batch_size: int, *, seed: int, augmenting: bool,
                  stains: np.ndarray | None) -> grain.IterDataset:
    """This host's rows of every global pre-training batch, `{'image': [B/P, s, s, 3] uint8,
    'label': [B/P] int32}`, shuffled each epoch, augmented when `augmenting`."""
    if not augmenting:
        return make_batches(source, batch_size, seed=seed)
    return make_batches(source, batch_size, seed=seed,
                        transform=lambda ex, rng: augment(ex, rng, stains))
