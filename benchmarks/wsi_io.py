"""Whole-slide input speed and memory: tissue mask + tile grid, region reads against OpenSlide,
and stain normalisation against torchstain, on one generated slide, in one run.

The slide is a synthetic H&E slide (`jaxmed.data.synthetic_slide`) written as a JPEG-tiled
pyramidal TIFF that OpenSlide opens as generic-tiff; it is generated once into `--cache`
(about 15-25 minutes and ~2 GB for 100 000², rendered tile by tile) and reused.

1. Tissue mask + tile grid (1152 px tiles, 3 of 4 corners) + the HDF5 coordinates and the
   thumbnail, in a fresh subprocess: wall time and that process's peak RSS, against the goals
   (30 s, 1 GB).
2. Region reads at level 0, 256² and 1152², random (tissue tiles in a seeded order) and
   sequential (consecutive windows along rows of tissue), ours (`open_slide(...).read_region`,
   uint8 RGB) and OpenSlide's (`read_region`, RGBA as a NumPy array) on the same regions,
   each reader opened fresh for each case (empty tile caches) after one untimed pass over the
   regions has put the file's bytes in the OS cache for both; `ratio` = our reads/s over
   OpenSlide's (goal >= 1). With `--threads 2` also both readers from 2 threads.
3. Stain normalisation of 1152² tissue tiles onto the default target: ours (Macenko and
   Vahadane, the source estimated per tile; and with one source per slide, `fit_source_slide`)
   against torchstain's NumPy Macenko (`normalize`, per tile) on the same tiles; `ratio` =
   our tiles/s over torchstain's. Compile time is excluded (one warm-up tile).

    python benchmarks/wsi_io.py                      # the 100 000² slide
    python benchmarks/wsi_io.py --size 20000 --reads 50 --stain-tiles 4    # a quick look

Needs `pip install -e '.[test,bench]'` (OpenSlide and torchstain).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._memory import peak_rss_bytes
from benchmarks._timing import print_table
from jaxmed.data.slide import open_slide
from jaxmed.data.synthetic_slide import make_synthetic_slide, write_synthetic_slide

TILE = 1152
GOAL_SECONDS, GOAL_RSS_MB = 30.0, 1024.0




def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000,
                        help="edge of the square slide in level-0 pixels (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "jaxmed",
                        help="folder of the generated slide, reused (default: %(default)s)")
    parser.add_argument("--reads", type=int, default=200,
                        help="regions read per case and reader (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="also read from this many threads when > 1 (default: %(default)s)")
    parser.add_argument("--stain-tiles", type=int, default=8,
                        help="1152² tiles normalised per method (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="slide design and read order")
    parser.add_argument("--mask-only", type=Path, help=argparse.SUPPRESS)  # the subprocess
    return parser.parse_args(argv)


def the_slide(args: argparse.Namespace) -> Path:
    """The cached benchmark slide, generated when missing."""
    path = args.cache / f"synthetic_he_{args.size}_seed{args.seed}.tiff"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"generating {path} (once) ...", flush=True)
        start = time.perf_counter()
        design = make_synthetic_slide((args.size, args.size), seed=args.seed)
        write_synthetic_slide(path, design)
        print(f"  written in {time.perf_counter() - start:.0f} s, "
              f"{path.stat().st_size / 2**30:.2f} GiB", flush=True)
    return path


# ----------------------------------------------------------------------- mask + grid


def mask_and_grid(slide_path: Path, out: Path) -> dict:
    """Run in a fresh process: what a tiling job does per slide, timed from opening."""
    from jaxmed.pathology.tiles import draw_thumbnail, tile_grid, write_tiles_h5
    from jaxmed.pathology.tissue import tissue_mask

    start = time.perf_counter()
    with open_slide(slide_path) as slide:
        tissue = tissue_mask(slide)
        grid = tile_grid(tissue, slide.dimensions, tile_size=TILE)
        write_tiles_h5(out / "tiles.h5", grid, slide)
        draw_thumbnail(out / "thumbnail.png", slide, tissue, grid)
        level = tissue.level
    seconds = time.perf_counter() - start
    rss_mb = peak_rss_bytes() / 2**20
    return dict(seconds=seconds, rss_mb=rss_mb, tiles=len(grid), mask_level=level,
                coords=np.asarray(grid.coords).tolist())


def run_mask_subprocess(slide_path: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--mask-only", str(out), "--cache",
                           str(slide_path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the mask subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- reads


def read_cases(coords: np.ndarray, size: int, count: int, rng: np.random.Generator,
               dimensions: tuple[int, int]) -> dict[str, list[tuple[int, int]]]:
    """Level-0 top-left corners of `count` regions of `size`²: random (a random tissue tile,
    shifted by a random offset of up to half a tile, kept inside the slide), and consecutive
    windows along rows starting at tissue tiles."""
    width, height = dimensions
    picks = coords[rng.permutation(len(coords))]
    chosen = coords[rng.integers(0, len(coords), count)]
    shifted = chosen + rng.integers(-TILE // 2, TILE // 2 + 1, (count, 2))
    shifted = np.clip(shifted, 0, [width - size, height - size])
    random = [(int(x), int(y)) for x, y in shifted]
    sequential, per_row = [], max(1, TILE // size) * 8
    for x, y in picks:
        for i in range(per_row):
            if x + (i + 1) * size <= width and y + size <= height:
                sequential.append((int(x + i * size), int(y)))
        if len(sequential) >= count:
            break
    return {"random": random, "sequential": sequential[:count]}


def time_reads(read, locations: list[tuple[int, int]], threads: int) -> float:
    """Reads per second of `read(location)` over `locations` (after 5 warm-up reads)."""
    for location in locations[-5:]:
        read(location)
    start = time.perf_counter()
    if threads == 1:
        for location in locations:
            read(location)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, locations))
    return len(locations) / (time.perf_counter() - start)


def reads_table(slide_path: Path, coords: np.ndarray, args: argparse.Namespace) -> list[list]:
    import openslide

    rng = np.random.default_rng(args.seed)
    with open_slide(slide_path) as slide:
        dimensions = slide.dimensions
    rows = []
    thread_counts = [1] if args.threads <= 1 else [1, args.threads]
    for size in (256, TILE):
        cases = read_cases(coords, size, args.reads, rng, dimensions)
        for pattern, locations in cases.items():
            with open_slide(slide_path) as warm:  # the OS's file cache, the same for both
                for location in locations:
                    warm.read_region(location, 0, (size, size))
            for threads in thread_counts:
                ours_slide, reference = open_slide(slide_path), openslide.OpenSlide(slide_path)
                try:
                    ours = time_reads(lambda at: ours_slide.read_region(at, 0, (size, size)),
                                      locations, threads)
                    theirs = time_reads(
                        lambda at: np.asarray(reference.read_region(at, 0, (size, size))),
                        locations, threads)
                finally:
                    ours_slide.close()
                    reference.close()
                rows.append([f"{size}²", pattern, threads, len(locations), ours, theirs,
                             ours / theirs])
    return rows


# ----------------------------------------------------------------------------- stain


def stain_table(slide_path: Path, coords: np.ndarray, args: argparse.Namespace) -> list[list]:
    import jax
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    from jaxmed.pathology.stain import REFERENCE_P99, REFERENCE_STAINS, StainNormalizer

    rng = np.random.default_rng(args.seed + 1)
    with open_slide(slide_path) as slide:
        picks = coords[rng.permutation(len(coords))[:args.stain_tiles + 1]]
        tiles = [slide.read_region((int(x), int(y)), 0, (TILE, TILE)) for x, y in picks]
        ours = {
            "ours, Macenko, source per tile": StainNormalizer.default("macenko"),
            "ours, Vahadane, source per tile": StainNormalizer.default("vahadane"),
            "ours, Vahadane, one source per slide":
                StainNormalizer.default("vahadane").fit_source_slide(slide),
        }
    reference = NumpyMacenkoNormalizer()
    # torchstain's target: the same reference H&E appearance as our default.
    reference.HERef, reference.maxCRef = REFERENCE_STAINS.T.copy(), REFERENCE_P99.copy()

    def rate(normalize) -> float:
        normalize(tiles[0])  # compile / warm up
        start = time.perf_counter()
        for tile in tiles[1:]:
            normalize(tile)
        return (len(tiles) - 1) / (time.perf_counter() - start)

    theirs = rate(lambda tile: reference.normalize(tile, stains=False))
    rows = []
    for name, normalizer in ours.items():
        ours_rate = rate(lambda tile: jax.block_until_ready(normalizer.transform(tile)))
        rows.append([name, len(tiles) - 1, ours_rate, theirs, ours_rate / theirs])
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mask_only:  # the subprocess of part 1: --cache holds the slide's path
        print(json.dumps(mask_and_grid(args.cache, args.mask_only)))
        return
    slide_path = the_slide(args)
    with open_slide(slide_path) as slide:
        width, height = slide.dimensions
        levels = len(slide.levels)
    print(f"slide: {slide_path} ({width} x {height}, {levels} levels, "
          f"{slide_path.stat().st_size / 2**30:.2f} GiB)\n")

    with tempfile.TemporaryDirectory() as out:
        mask = run_mask_subprocess(slide_path, Path(out))
    coords = np.asarray(mask["coords"], np.int64).reshape(-1, 2)
    print("tissue mask + tile grid + HDF5 + thumbnail (fresh process)")
    print_table(["slide", "mask level", "tiles kept", "wall s", "goal s", "peak RSS MB",
                 "goal MB"],
                [[f"{width}²", mask["mask_level"], mask["tiles"], mask["seconds"], GOAL_SECONDS,
                  mask["rss_mb"], GOAL_RSS_MB]])
    if len(coords) == 0:
        raise SystemExit("no tissue tiles: nothing to read")

    print("\nlevel-0 region reads per second: ours vs OpenSlide on the same regions")
    print_table(["region", "pattern", "threads", "reads", "ours /s", "OpenSlide /s", "ratio"],
                reads_table(slide_path, coords, args))

    print("\nstain normalisation of 1152² tiles onto the default target: ours vs torchstain "
          "(NumPy Macenko)")
    print_table(["method", "tiles", "ours tiles/s", "torchstain tiles/s", "ratio"],
                stain_table(slide_path, coords, args))


if __name__ == "__main__":
    main()
