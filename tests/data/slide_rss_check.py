"""Peak memory of region reads from a 40 000² slide; run by tests/data/test_slide.py.

`python slide_rss_check.py PATH` writes the slide (if PATH does not exist yet) in a child
process, then opens it, reads 50 random 1024² regions of level 0 and a few of every lower
level, compares them with the pattern they were written from, and prints one JSON line:
`peak_rss_bytes` (this process's peak RSS, `peak_rss_bytes()`), `max_error` (the largest mean
absolute JPEG error of a region) and timings.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks._memory import peak_rss_bytes  # noqa: E402

SIZE = 40_000
TILE = 256
_STEP = np.arange(TILE) // 16
# Eight smooth tiles (a flat colour with gentle ramps): cheap to render and to JPEG-encode.
_COLOURS = np.random.default_rng(0).integers(40, 200, (8, 3))
_BASES = np.clip(
    _COLOURS[:, None, None, :]
    + np.stack(np.broadcast_arrays(_STEP[None, :], _STEP[:, None], (_STEP[None, :] + _STEP[:, None])
                                   // 2), -1)[None],
    0, 255,
).astype(np.uint8)  # (8, TILE, TILE, 3)




def pattern(downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The slide's pixels: tile (column, row) of a level shows base tile
    `(7 column + 3 row + downsample) mod 8`. A write_slide source."""
    if x % TILE == 0 and y % TILE == 0 and w <= TILE and h <= TILE:
        return _BASES[(7 * (x // TILE) + 3 * (y // TILE) + downsample) % 8, :h, :w]
    rows, columns = np.arange(y, y + h)[:, None], np.arange(x, x + w)[None, :]
    base = (7 * (columns // TILE) + 3 * (rows // TILE) + downsample) % 8
    return _BASES[base, rows % TILE, columns % TILE]


def write(path: str) -> None:
    from jaxmed.data.slide_writer import write_slide

    write_slide(path, pattern, size=(SIZE, SIZE), compression="jpeg", quality=80, mpp=0.25)


def main(path: str) -> None:
    started = time.perf_counter()
    if not Path(path).exists():
        # In a child process, so the writer's memory does not count here.
        subprocess.run([sys.executable, __file__, "--write", path], check=True)
    written = time.perf_counter()

    from jaxmed.data.slide import open_slide

    rng = np.random.default_rng(1)
    max_error = 0.0
    with open_slide(path) as slide:
        reads = [(0, (int(x), int(y)), 1024) for x, y in rng.integers(0, SIZE - 1024, (50, 2))]
        for level in range(1, len(slide.levels)):
            for _ in range(3):
                d = int(slide.levels[level].downsample)
                width, height = slide.levels[level].size
                side = min(1024, width, height)
                x, y = (int(v) for v in rng.integers(0, min(width, height) - side + 1, 2))
                reads.append((level, (x * d, y * d), side))
        for level, (x, y), side in reads:
            d = int(slide.levels[level].downsample)
            region = slide.read_region((x, y), level, (side, side))
            expected = pattern(d, x // d, y // d, side, side)
            error = float(np.abs(region.astype(np.int16) - expected).mean())
            max_error = max(max_error, error)
    peak = peak_rss_bytes()
    print(json.dumps({
        "peak_rss_bytes": peak, "max_error": max_error, "regions": len(reads),
        "write_s": round(written - started, 2),
        "read_s": round(time.perf_counter() - written, 2),
    }))


if __name__ == "__main__":
    if sys.argv[1] == "--write":
        write(sys.argv[2])
    else:
        main(sys.argv[1])
