"""The README's whole-slide example runs as written, on a synthetic slide, and writes what it
says."""

import os
import pathlib
import re

import numpy as np

from jaxmed.data.synthetic_slide import make_synthetic_slide, write_synthetic_slide
from jaxmed.pathology.tiles import read_tiles_h5

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_whole_slide_example_runs(tmp_path, monkeypatch):
    section = README.read_text().split("## Whole-slide data", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    design = make_synthetic_slide((6144, 6144), seed=2)  # 3 tiles of 1152
    write_synthetic_slide(tmp_path / "slide.svs", design)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, str(README), "exec"), scope)
    grid = read_tiles_h5(tmp_path / "slide.h5")
    assert len(grid) > 0 and grid.tile_size == 1152
    assert (tmp_path / "slide.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tile = np.asarray(scope["tile"])
    assert tile.shape == (1152, 1152, 3) and tile.dtype == np.uint8
    assert os.path.getsize(tmp_path / "slide.svs") > 0
