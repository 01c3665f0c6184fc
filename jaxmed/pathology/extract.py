"""Batch feature extraction over many slides: one HDF5 file per slide and an `index.csv`.

Per slide: open it, find the tissue (`tissue.tissue_mask`) and the tiles on it
(`tiles.tile_grid`), let the featurizer prepare (e.g. fit the slide's stain profile), read the
tiles at level 0 in batches, run the featurizer's device function on each batch, and write
`<output>/<stem>.h5`. The engine is generic over the device work: a `Featurizer` supplies it.

How the work overlaps (so the devices rarely wait for tiles, the usual complaint about CLAM):

- One background thread prepares slides in order (open, mask, grid, `Featurizer.prepare`),
  up to two slides ahead of the slide whose tiles are being read.
- A feeder thread cuts each prepared slide into batches of `batch_size` tiles and hands the
  tile reads to a pool of `readers` threads (`Slide.read_region` is thread-safe, and the
  codecs release the GIL while decoding); at most `prefetch_batches` assembled batches wait.
- The main thread places each batch on this host's devices (sharded along the batch), calls
  `Featurizer.apply` (asynchronous), and only then fetches the previous batch's outputs, so
  the host's copying and writing overlap the device's compute. The time it blocks waiting for
  a batch is `ExtractionReport.input_wait_seconds`.

Conventions (`docs/pathology.md`):

- The last batch of a slide is padded to `batch_size` by repeating its last tile, so every
  batch has one shape and `apply` compiles once; the padding rows' outputs are dropped.
- Files are written to a hidden temporary name in `output` and renamed, and one small record
  per slide (`output/.records/<stem>.json`) is written the same way; `index.csv` is rebuilt
  from all records after every slide. A killed run loses at most the slides in progress.
- Resume: a slide whose HDF5 file is complete is skipped; a failed slide is retried only with
  `retry_failed`. Files made by another featurizer (its `fingerprint`) or with other tiling
  options are refused before any work.
- Several processes (hosts): slide `i` of the sorted list belongs to process
  `i % process_count`; each batches tiles to its own devices only, so hosts never wait for one
  another inside a device computation.
- A bad slide (missing, corrupt or untiled file, no tissue tile, an error in `prepare`) is
  recorded as `failed` with a one-line message naming the file, and the run goes on.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import h5py
import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmed.data.slide import Slide, SlideError, open_slide
from jaxmed.errors import InputDataError
from jaxmed.pathology import tissue
from jaxmed.pathology.tiles import TileGrid, _write_atomically, tile_grid

SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".svs", ".ndpi")
INDEX_COLUMNS = ("slide", "status", "tiles", "seconds", "error")
RECORDS = ".records"
# What makes a slide fail (recorded, the run goes on); any other exception is a bug and
# propagates.
SLIDE_ERRORS = (SlideError, InputDataError, ValueError, OSError)
# Attributes every HDF5 file gets from the engine; a featurizer's attributes may not use them.
RESERVED_ATTRIBUTES = frozenset({
    "slide", "stem", "tile_size", "stride", "dimensions", "mpp", "mask_level",
    "mask_downsample", "tiles", "seconds", "prepare_seconds", "complete", "tiling",
    "json_attributes",
})
_EXPECTED = "features made by another model; use a new --output"


class Featurizer(Protocol):
    """The device work of an extraction, supplied by the caller.

    - `tile_size`: level-0 pixels per tile side.
    - `prepare(slide, grid)`: per-slide host work before the slide's tiles are processed
      (e.g. fit its stain profile); runs in a background thread. Raising `SlideError`,
      `InputDataError`, `ValueError` or `OSError` fails the slide. Its result is passed to
      `apply` as `context`.
    - `apply(tiles, context)`: `tiles` uint8 `[B, T, T, 3]` on this host's devices, sharded
      along `B`; returns `{name: [B, ...]}`. Asynchronous (jitted): it should not block.
    - `summarize(outputs)`: slide-level arrays from all of a slide's per-tile outputs
      (`{name: [n, ...]}` numpy).
    - `attributes()`: a JSON-able description written into every HDF5 file; its
      `"fingerprint"` (a string naming the model and configuration) guards resumption.
    """

    tile_size: int

    def prepare(self, slide: Slide, grid: TileGrid) -> Any: ...

    def apply(self, tiles: jax.Array, context: Any) -> dict[str, jax.Array]: ...

    def summarize(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def attributes(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class TilingOptions:
    """How tiles are found: `tiles.tile_grid`'s `stride`, `min_corners`, `min_tissue_fraction`
    and `tissue.tissue_mask`'s `max_pixels` (the defaults are theirs)."""

    stride: int | None = None
    min_corners: int = 3
    min_tissue_fraction: float | None = None
    mask_max_pixels: int = tissue.MAX_PIXELS


@dataclasses.dataclass
class ExtractionReport:
    """What one process did.

    **Fields:** `done` (slides extracted now), `skipped` (slides already complete), `failed`
    (slides whose row is `failed`: failed now, or earlier and not retried), `tiles` (tiles
    extracted now), `seconds` (the whole call), `input_wait_seconds` (the time the device loop
    waited for tiles), `records` (this process's index rows, in slide order).
    """

    done: int
    skipped: int
    failed: int
    tiles: int
    seconds: float
    input_wait_seconds: float
    records: list[dict]


# ---------------------------------------------------------------------------------------------
# Which slides
# ---------------------------------------------------------------------------------------------

def slide_stem(path: str | os.PathLike) -> str:
    """The slide's name without its slide suffix (`a.ome.tiff` -> `a`): its output's name."""
    name = Path(path).name
    for suffix in SLIDE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return Path(name).stem


def list_slides(spec: str | os.PathLike | Sequence) -> list[Path]:
    """The slides named by `spec`.

    **Arguments:**

    - `spec`: a folder (its `*.tif *.tiff *.svs *.ome.tif *.ome.tiff *.ndpi` files, sorted);
      a text file with one path per line (`#` starts a comment line; relative paths are
      relative to the file's folder); a CSV file (`.csv`) with a `slide` or `path` column
      (relative paths likewise); a single slide file; or a list of paths.

    **Returns:** the slide paths. Slides that are listed but missing are not refused here:
    extraction records them as failed.

    **Raises:** `InputDataError` naming the folder or file when it is missing, holds no slide,
    lacks the CSV column, or two slides share a stem (their outputs would collide).
    """
    if isinstance(spec, str | os.PathLike):
        slides = _slides_of(Path(spec))
    else:
        slides = [Path(p) for p in spec]
        if not slides:
            raise InputDataError("the list of slides is empty")
    _check_stems(slides)
    return slides


def _check_stems(slides: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in slides:
        stem = slide_stem(path)
        if stem in seen:
            raise InputDataError(
                f"{seen[stem]} and {path}: two slides with the stem {stem!r}; their outputs "
                f"would both be {stem}.h5 (rename one, or extract them into different outputs)"
            )
        seen[stem] = path


def _slides_of(spec: Path) -> list[Path]:
    if spec.is_dir():
        slides = sorted(p for p in spec.iterdir() if p.is_file() and not p.name.startswith(".")
                        and p.name.lower().endswith(SLIDE_SUFFIXES))
        if not slides:
            raise InputDataError(f"{spec}: the folder holds no slide "
                                 f"({', '.join('*' + s for s in SLIDE_SUFFIXES)})")
        return slides
    if not spec.exists():
        raise InputDataError(f"{spec}: no such folder or file of slides")
    if spec.name.lower().endswith(SLIDE_SUFFIXES):
        return [spec]
    try:
        text = spec.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputDataError(f"{spec}: cannot read the list of slides ({error})") from error
    if spec.suffix.lower() == ".csv":
        rows = csv.DictReader(io.StringIO(text))
        column = next((c for c in ("slide", "path") if c in (rows.fieldnames or ())), None)
        if column is None:
            raise InputDataError(f"{spec}: the CSV has no 'slide' or 'path' column "
                                 f"(columns: {rows.fieldnames})")
        names = [row[column].strip() for row in rows if (row[column] or "").strip()]
    else:
        names = [line.strip() for line in text.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise InputDataError(f"{spec}: lists no slide")
    return [spec.parent / name for name in names]  # an absolute name stays absolute


# ---------------------------------------------------------------------------------------------
# Reading results back
# ---------------------------------------------------------------------------------------------

def read_features(path: str | os.PathLike) -> dict[str, Any]:
    """One slide's HDF5 file: every dataset as a numpy array, and `"attributes"`: the file's
    attributes (JSON-encoded ones decoded).

    **Raises:** `InputDataError` naming the file when it is missing or not readable HDF5.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as file:
            out: dict[str, Any] = {name: file[name][()] for name in file
                                   if isinstance(file[name], h5py.Dataset)}
            out["attributes"] = _decoded_attributes(file.attrs)
    except OSError as error:
        raise InputDataError(f"{path}: cannot read the HDF5 file ({error})") from error
    return out


def _decoded_attributes(attrs) -> dict[str, Any]:
    raw = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
    for key in json.loads(raw.get("json_attributes", "[]")):
        raw[key] = json.loads(raw[key])
    raw.pop("json_attributes", None)
    return raw


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

def extract_slides(
    slides: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    featurizer: Featurizer,
    *,
    batch_size: int = 32,
    tiling: TilingOptions = TilingOptions(),
    readers: int = 4,
    prefetch_batches: int = 4,
    retry_failed: bool = False,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> ExtractionReport:
    """Extract features of every slide this process owns into `output`.

    **Arguments:**

    - `slides`: slide paths (e.g. from `list_slides`); taken in sorted order, every process
      must pass the same list. Stems must be distinct.
    - `output`: the folder of `<stem>.h5` files, `index.csv` and `.records/` (created).
    - `featurizer`: the device work (`Featurizer`).
    - `batch_size`: tiles per device call, a multiple of this host's device count.
    - `tiling`: how tiles are found (`TilingOptions`).
    - `readers`: tile-reading threads; `prefetch_batches`: assembled batches kept ready.
    - `retry_failed`: also redo slides recorded as failed.
    - `progress`: a progress bar (slides, with tiles/s).
    - `process_index`, `process_count`: this process's share of the slides (slide `i` goes to
      process `i % process_count`); default `jax.process_index()`, `jax.process_count()`.

    **Returns:** an `ExtractionReport` of this process's slides.

    **Raises:** `InputDataError` before any work when `output` holds files made by another
    featurizer or with other tiling options; `ValueError` for bad options.
    """
    start = time.perf_counter()
    output = Path(output)
    slides = sorted((Path(p) for p in slides), key=str)
    _check_stems(slides)
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    attributes = _check_options(featurizer, batch_size, readers, prefetch_batches,
                                process_index, process_count)
    tiling_attributes = _tiling_attributes(featurizer, tiling)
    for path in slides:
        _check_existing(output / f"{slide_stem(path)}.h5", attributes, tiling_attributes)
    output.mkdir(parents=True, exist_ok=True)
    (output / RECORDS).mkdir(exist_ok=True)

    index = _Index(output)
    mine = slides[process_index::process_count]
    todo, skipped = _plan(mine, output, index, retry_failed)
    index.write()

    engine = _Engine(featurizer, attributes, tiling, tiling_attributes, output, index,
                     batch_size, readers, prefetch_batches)
    bar = tqdm.tqdm(total=len(mine), initial=len(mine) - len(todo), unit="slide",
                    disable=not progress, dynamic_ncols=True)
    try:
        engine.run(todo, bar)
    finally:
        bar.close()

    if jax.process_count() > 1:  # the last rewrite of the index sees every process's records
        multihost_utils.sync_global_devices("jaxmed.pathology.extract: all slides done")
    if process_index == 0:
        index.write()
    records = [index.own(slide_stem(p)) for p in mine]
    return ExtractionReport(
        done=engine.done, skipped=skipped,
        failed=sum(r is not None and r["status"] == "failed" for r in records),
        tiles=engine.tiles, seconds=time.perf_counter() - start,
        input_wait_seconds=engine.input_wait, records=[r for r in records if r is not None])


def _plan(mine: list[Path], output: Path, index: "_Index",
          retry_failed: bool) -> tuple[list[Path], int]:
    """The slides to extract now, and how many are skipped as complete. Clears the temporary
    files a killed run left for these slides (only their owner ever writes them)."""
    todo, skipped = [], 0
    for path in mine:
        stem = slide_stem(path)
        _remove_partial_files(output, stem)
        record = index.own(stem)
        if _is_complete(output / f"{stem}.h5"):
            if record is None or record["status"] != "ok":  # e.g. records deleted
                index.put(stem, _record_from_file(output / f"{stem}.h5", path))
            skipped += 1
        elif record is None or record["status"] != "failed" or retry_failed:
            todo.append(path)
    return todo, skipped


def _check_options(featurizer, batch_size, readers, prefetch_batches, process_index,
                   process_count) -> dict[str, Any]:
    devices = jax.local_device_count()
    if not isinstance(batch_size, int | np.integer) or batch_size < 1 or batch_size % devices:
        raise ValueError(f"batch_size must be a positive multiple of this host's {devices} "
                         f"devices, got {batch_size!r}")
    if readers < 1 or prefetch_batches < 1:
        raise ValueError(f"readers and prefetch_batches must be >= 1, got {readers}, "
                         f"{prefetch_batches}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    tile_size = featurizer.tile_size
    if not isinstance(tile_size, int | np.integer) or tile_size < 1:
        raise ValueError(f"featurizer.tile_size must be a positive int, got {tile_size!r}")
    attributes = dict(featurizer.attributes())
    if not isinstance(attributes.get("fingerprint"), str):
        raise ValueError("featurizer.attributes() must hold a 'fingerprint' string naming the "
                         "model and its configuration")
    clash = sorted(RESERVED_ATTRIBUTES & set(attributes))
    if clash:
        raise ValueError(f"featurizer.attributes() uses names the engine writes: {clash}")
    json.dumps(attributes)  # JSON-able, or TypeError now rather than after the first slide
    return attributes


def _tiling_attributes(featurizer, tiling: TilingOptions) -> dict[str, Any]:
    return {"tile_size": int(featurizer.tile_size), **dataclasses.asdict(tiling)}


def _check_existing(path: Path, attributes: dict, tiling_attributes: dict) -> None:
    """Refuse an existing output made by another featurizer or other tiling options."""
    if not path.is_file():
        return
    try:
        with h5py.File(path, "r") as file:
            found = _decoded_attributes(file.attrs)
    except OSError:
        return  # unreadable: not complete, so it is redone
    if found.get("fingerprint") != attributes["fingerprint"]:
        raise InputDataError(
            f"{path}: {_EXPECTED} (its fingerprint {found.get('fingerprint')!r}, this "
            f"featurizer's {attributes['fingerprint']!r})")
    if found.get("tiling") != tiling_attributes:
        raise InputDataError(
            f"{path}: tiles found with other options ({found.get('tiling')}, now "
            f"{tiling_attributes}); use a new --output")


def _is_complete(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as file:
            return bool(file.attrs.get("complete", False))
    except OSError:
        return False


def _remove_partial_files(output: Path, stem: str) -> None:
    for folder, name in ((output, f"{stem}.h5"), (output / RECORDS, f"{stem}.json")):
        for partial in folder.glob(f".{name}.*.partial"):
            partial.unlink(missing_ok=True)


def _record_from_file(path: Path, slide: Path) -> dict:
    with h5py.File(path, "r") as file:
        tiles, seconds = int(file.attrs["tiles"]), float(file.attrs["seconds"])
    return _record(slide, "ok", tiles, seconds, "")


def _record(slide: Path, status: str, tiles: int, seconds: float, error: str) -> dict:
    return {"slide": str(slide), "status": status, "tiles": int(tiles),
            "seconds": round(float(seconds), 3), "error": error}


class _Index:
    """The per-slide records in `output/.records` and the `index.csv` built from all of them
    (other processes' too: their records are re-read when their files change)."""

    def __init__(self, output: Path):
        self.output = output
        self.folder = output / RECORDS
        self._seen: dict[str, tuple[int, dict]] = {}  # file name -> (mtime_ns, record)

    def own(self, stem: str) -> dict | None:
        return self._load(self.folder / f"{stem}.json")

    def put(self, stem: str, record: dict) -> None:
        path = self.folder / f"{stem}.json"
        _write_atomically(path, lambda t: t.write_text(json.dumps(record)))
        self._seen[path.name] = (path.stat().st_mtime_ns, record)

    def write(self) -> None:
        records = [r for p in sorted(self.folder.glob("*.json")) if (r := self._load(p))]
        records.sort(key=lambda r: r["slide"])

        def write(temporary: Path) -> None:
            with open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, INDEX_COLUMNS)
                writer.writeheader()
                writer.writerows(records)

        _write_atomically(self.output / "index.csv", write)

    def _load(self, path: Path) -> dict | None:
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        cached = self._seen.get(path.name)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # replaced while read: the next rebuild sees it
        self._seen[path.name] = (mtime, record)
        return record


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _SlideWork:
    """One slide in flight: prepared in the background, read by the pool, finished by the
    device loop. The slide file is closed when the feeder is done with it and its last tile
    read has ended (`hold`/`release`), so no read ever meets a closed file."""

    path: Path
    slide: Slide | None = None
    grid: TileGrid | None = None
    context: Any = None
    error: str | None = None  # set once the slide has failed
    recorded: bool = False
    prepare_seconds: float = 0.0
    batches: int = 0
    started: float | None = None
    outputs: list = dataclasses.field(default_factory=list)
    _holders: int = 1  # the feeder
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.close()

    def close(self) -> None:
        if self.slide is not None:
            self.slide.close()


@dataclasses.dataclass(eq=False)
class _Batch:
    work: _SlideWork
    number: int
    rows: int  # valid rows; the rest is padding
    tiles: np.ndarray  # tiles: uint8 [B, T, T, 3]
    reads: list  # futures of the tile-reading chunks


_END = object()


class _Engine:
    """The three stages of one process's extraction: prepare (a thread), feed the tile readers
    (a thread and a pool), compute and write (the calling thread)."""

    def __init__(self, featurizer, attributes, tiling, tiling_attributes, output, index,
                 batch_size, readers, prefetch_batches):
        self.featurizer, self.attributes = featurizer, attributes
        self.tiling, self.tiling_attributes = tiling, tiling_attributes
        self.output, self.index = output, index
        self.batch_size, self.readers = batch_size, readers
        self.prefetch_batches = prefetch_batches
        # This host's devices only: hosts work on different slides and never wait for each other.
        mesh = Mesh(np.array(jax.local_devices()), ("data",))
        self.sharding = NamedSharding(mesh, P("data"))
        self.done = self.tiles = 0
        self.input_wait = 0.0
        self._stop = threading.Event()
        # Slides opened and not yet finished (weakly held, so a long run keeps no grids).
        self._works: weakref.WeakSet[_SlideWork] = weakref.WeakSet()

    # ---- the device loop

    def run(self, todo: list[Path], bar) -> None:
        if not todo:
            return
        prepared: queue.Queue = queue.Queue(maxsize=1)
        batches: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        pool = concurrent.futures.ThreadPoolExecutor(self.readers, "extract-read")
        threads = [threading.Thread(target=self._guarded, daemon=True,
                                    args=(self._prepare_all, (todo, prepared), batches)),
                   threading.Thread(target=self._guarded, daemon=True,
                                    args=(self._feed, (prepared, batches, pool), batches))]
        for thread in threads:
            thread.start()
        rate = _Rate(bar)
        pending = None  # (batch, its outputs on the devices), fetched after the next dispatch
        try:
            while True:
                try:
                    item = batches.get_nowait()
                except queue.Empty:
                    if pending is not None:  # nothing to dispatch yet: finish what is in flight
                        self._collect(*pending, bar)
                        pending = None
                    waited = time.perf_counter()
                    item = batches.get()
                    self.input_wait += time.perf_counter() - waited
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _SlideWork):  # failed before its first batch
                    self._record_failure(item, bar)
                    continue
                work = item.work
                if work.started is None:
                    work.started = time.perf_counter()
                tiles = self._wait_for_tiles(item)
                if work.error is not None:
                    self._record_failure(work, bar)
                    continue
                outputs = self.featurizer.apply(jax.device_put(tiles, self.sharding),
                                                work.context)
                if pending is not None:
                    self._collect(*pending, bar)
                pending = (item, outputs)
                rate.add(item.rows)
            if pending is not None:
                self._collect(*pending, bar)
        finally:
            self._stop.set()
            _drain(prepared)  # unblock the threads' puts
            _drain(batches)
            for thread in threads:
                thread.join()
            pool.shutdown(wait=True, cancel_futures=True)
            for work in list(self._works):  # after an interruption some are still open
                work.close()

    def _wait_for_tiles(self, batch: _Batch) -> np.ndarray | None:
        """The batch's tiles once read (input wait); None, and the slide failed, on an error."""
        waited = time.perf_counter()
        try:
            for read in batch.reads:
                read.result()
        except SLIDE_ERRORS as error:
            if batch.work.error is None:
                batch.work.error = _one_line(error, batch.work.path)
        finally:
            self.input_wait += time.perf_counter() - waited
        return None if batch.work.error is not None else batch.tiles

    def _collect(self, batch: _Batch, outputs: dict, bar) -> None:
        """Fetch one batch's outputs (padding dropped); after a slide's last batch, write it."""
        work = batch.work
        if work.error is not None:  # the slide failed on a later batch
            return
        host = {}
        for name, value in outputs.items():
            value = np.asarray(value)
            if value.ndim == 0 or value.shape[0] != self.batch_size:
                raise ValueError(f"featurizer.apply returned {name!r} of shape {value.shape}; "
                                 f"per-tile outputs need the leading batch axis "
                                 f"{self.batch_size}")
            host[name] = value[:batch.rows]
        work.outputs.append(host)
        if batch.number == work.batches - 1:
            self._finish(work, bar)

    def _finish(self, work: _SlideWork, bar) -> None:
        per_tile = {name: np.concatenate([part[name] for part in work.outputs])
                    for name in work.outputs[0]}
        work.outputs = []
        slide_level = {name: np.asarray(value)
                       for name, value in self.featurizer.summarize(per_tile).items()}
        reused = sorted((set(per_tile) & set(slide_level)) | ({"coords"} & (
            set(per_tile) | set(slide_level))))
        if reused:
            raise ValueError(f"featurizer outputs reuse the dataset names {reused}")
        seconds = time.perf_counter() - work.started
        stem = slide_stem(work.path)
        self._write_h5(self.output / f"{stem}.h5", work, per_tile, slide_level, seconds)
        self.index.put(stem, _record(work.path, "ok", len(work.grid), seconds, ""))
        self.index.write()
        self.done += 1
        self.tiles += len(work.grid)
        bar.update(1)

    def _record_failure(self, work: _SlideWork, bar) -> None:
        if work.recorded:  # later batches of a slide that already failed
            return
        work.recorded = True
        seconds = work.prepare_seconds + (
            0.0 if work.started is None else time.perf_counter() - work.started)
        self.index.put(slide_stem(work.path),
                       _record(work.path, "failed", 0, seconds, work.error))
        self.index.write()
        bar.update(1)

    def _write_h5(self, path: Path, work: _SlideWork, per_tile: dict, slide_level: dict,
                  seconds: float) -> None:
        slide, grid = work.slide, work.grid
        described, encoded = {}, []
        for key, value in self.attributes.items():
            if isinstance(value, bool | int | str) or (isinstance(value, float)
                                                        and math.isfinite(value)):
                described[key] = value
            else:
                described[key] = json.dumps(value)
                encoded.append(key)
        engine = {
            "slide": str(work.path), "stem": slide_stem(work.path),
            "tile_size": grid.tile_size, "stride": grid.stride,
            "dimensions": np.asarray(slide.dimensions, np.int64),
            "mask_level": grid.mask_level, "mask_downsample": grid.mask_downsample,
            "tiles": len(grid), "seconds": seconds, "prepare_seconds": work.prepare_seconds,
            "tiling": json.dumps(self.tiling_attributes),
            "json_attributes": json.dumps([*encoded, "tiling"]), "complete": True,
        }
        if slide.mpp is not None:  # absent when the slide does not say
            engine["mpp"] = np.asarray(slide.mpp, np.float64)

        def write(temporary: Path) -> None:
            with h5py.File(temporary, "w") as file:
                coords = file.create_dataset("coords", data=np.asarray(grid.coords, np.int64))
                coords.attrs["patch_size"] = grid.tile_size  # CLAM's names
                coords.attrs["patch_level"] = 0
                for name, value in {**per_tile, **slide_level}.items():
                    file.create_dataset(name, data=value)
                for name, value in {**described, **engine}.items():
                    file.attrs[name] = value

        _write_atomically(path, write)

    # ---- the background threads

    def _guarded(self, target, args: tuple, batches: queue.Queue) -> None:
        """Run a thread's work; an unexpected exception (a bug) is raised in the device loop."""
        try:
            target(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised by the device loop
            self._put(batches, error)

    def _put(self, q: queue.Queue, item) -> bool:
        """Put, unless the run stops first (then False)."""
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _prepare_all(self, todo: list[Path], prepared: queue.Queue) -> None:
        for path in todo:
            work = _SlideWork(path)
            self._works.add(work)
            begun = time.perf_counter()
            try:
                self._prepare(work)
            except SLIDE_ERRORS as error:
                work.error = _one_line(error, path)
                work.close()
            work.prepare_seconds = time.perf_counter() - begun
            if not self._put(prepared, work):
                return
        self._put(prepared, _END)

    def _prepare(self, work: _SlideWork) -> None:
        work.slide = open_slide(work.path)
        mask = tissue.tissue_mask(work.slide, max_pixels=self.tiling.mask_max_pixels)
        work.grid = tile_grid(mask, work.slide.dimensions, tile_size=self.featurizer.tile_size,
                              stride=self.tiling.stride, min_corners=self.tiling.min_corners,
                              min_tissue_fraction=self.tiling.min_tissue_fraction)
        if len(work.grid) == 0:
            raise ValueError(f"{work.path}: no tissue tiles (tissue covers "
                             f"{100 * mask.tissue_fraction:.1f} % of the mask; no "
                             f"{self.featurizer.tile_size}-pixel tile passes the tiling rule)")
        work.context = self.featurizer.prepare(work.slide, work.grid)
        work.batches = -(-len(work.grid) // self.batch_size)

    def _feed(self, prepared: queue.Queue, batches: queue.Queue, pool) -> None:
        while not self._stop.is_set():
            try:
                work = prepared.get(timeout=0.1)
            except queue.Empty:
                continue
            if work is _END:
                self._put(batches, _END)
                return
            if work.error is not None:  # failed in preparation
                if not self._put(batches, work):
                    return
                continue
            try:
                for number in range(work.batches):
                    if work.error is not None or not self._put(batches,
                                                               self._submit(work, number, pool)):
                        break
            finally:
                work.release()

    def _submit(self, work: _SlideWork, number: int, pool) -> _Batch:
        """Start reading one batch's tiles, in `readers` chunks; the chunk with the last tile
        also pads the batch by repeating it."""
        size = self.featurizer.tile_size
        coords = work.grid.coords[number * self.batch_size:(number + 1) * self.batch_size]
        tiles = np.empty((self.batch_size, size, size, 3), np.uint8)  # tiles: [B, T, T, 3]
        chunk = -(-len(coords) // self.readers)

        def read(first: int) -> None:
            try:
                for row in range(first, min(first + chunk, len(coords))):
                    x, y = coords[row]
                    tiles[row] = work.slide.read_region((int(x), int(y)), 0, (size, size))
            finally:
                work.release()
            if first + chunk >= len(coords):
                tiles[len(coords):] = tiles[len(coords) - 1]

        reads = []
        for first in range(0, len(coords), chunk):
            work.hold()
            reads.append(pool.submit(read, first))
        return _Batch(work, number, len(coords), tiles, reads)


class _Rate:
    """Tiles per second on the progress bar."""

    def __init__(self, bar):
        self.bar, self.tiles, self.start = bar, 0, time.perf_counter()

    def add(self, tiles: int) -> None:
        self.tiles += tiles
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{self.tiles / max(elapsed, 1e-9):.1f} tiles/s", refresh=False)


def _one_line(error: BaseException, path: Path) -> str:
    """The error's message on one line, naming the slide file."""
    message = " ".join(str(error).split()) or type(error).__name__
    return message if str(path) in message else f"{path}: {message}"


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
