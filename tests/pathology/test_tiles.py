"""Tile grid (corner rule, tissue fraction), HDF5 coordinates and the thumbnail."""

import h5py
import numpy as np
import pytest
from PIL import Image

from jaxmed.errors import InputDataError
from jaxmed.pathology.tiles import (
    CONTOUR_COLOUR,
    HOLE_COLOUR,
    TileGrid,
    draw_thumbnail,
    read_tiles_h5,
    tile_grid,
    write_tiles_h5,
)
from jaxmed.pathology.tissue import TissueMask, tissue_mask
from tests.pathology.test_tissue import FakeSlide, painted_tissue


def mask_of(mask, downsample=1.0):
    """A TissueMask holding only a hand-made mask."""
    return TissueMask(mask=np.asarray(mask, bool), level=1, downsample=float(downsample),
                      contours=[], holes=[], hole_parents=np.zeros(0, np.int64),
                      level_contours=[], level_holes=[], threshold=0)


def corners_by_loop(mask, downsample, dimensions, tile_size, stride):
    """Reference: each candidate's corner pixels looked up one at a time."""
    height, width = mask.shape
    counts = {}
    for y in range(0, dimensions[1] - tile_size + 1, stride):
        for x in range(0, dimensions[0] - tile_size + 1, stride):
            count = 0
            for cx in (x, x + tile_size - 1):
                for cy in (y, y + tile_size - 1):
                    column = min(int((cx + 0.5) // downsample), width - 1)
                    row = min(int((cy + 0.5) // downsample), height - 1)
                    count += bool(mask[row, column])
            counts[(x, y)] = count
    return counts


def as_set(grid):
    return {tuple(int(v) for v in xy) for xy in grid.coords}


# ---------------------------------------------------------------------------------------------
# The corner rule
# ---------------------------------------------------------------------------------------------

def test_tiles_with_exactly_4_3_2_1_corners_on_tissue():
    """Four 4 x 4 tiles on an 8 x 8 mask at full resolution, with 4, 3, 2 and 1 of their
    corner pixels on tissue (and their interiors on glass)."""
    mask = np.zeros((8, 8), bool)
    mask[[0, 0, 3, 3], [0, 3, 0, 3]] = True  # tile (0, 0): 4 corners
    mask[[0, 0, 3], [4, 7, 4]] = True  # tile (4, 0): 3
    mask[[4, 7], [0, 3]] = True  # tile (0, 4): 2
    mask[7, 7] = True  # tile (4, 4): 1
    tissue = mask_of(mask)
    kept = {n: as_set(tile_grid(tissue, (8, 8), tile_size=4, min_corners=n)) for n in range(5)}
    assert kept[4] == {(0, 0)}
    assert kept[3] == {(0, 0), (4, 0)}
    assert kept[2] == {(0, 0), (4, 0), (0, 4)}
    assert kept[1] == kept[0] == {(0, 0), (4, 0), (0, 4), (4, 4)}
    assert as_set(tile_grid(mask_of(np.zeros((8, 8))), (8, 8), tile_size=4, min_corners=0)) \
        == kept[0]


def test_right_and_bottom_corners_are_the_last_pixels_inside_the_tile():
    """Downsample 4, tile 8: the tile at x = 0 spans level-0 pixels 0-7, mask columns 0-1. Its
    right corner is pixel 7 (column 1), not point 8 (column 2, on glass)."""
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    grid = tile_grid(mask_of(mask, 4), (16, 16), tile_size=8, min_corners=4)
    assert as_set(grid) == {(0, 0)}
    shifted = np.zeros((4, 4), bool)
    shifted[:2, 1:3] = True  # columns 1-2: the tile at 0 has its right corners only
    assert len(tile_grid(mask_of(shifted, 4), (16, 16), tile_size=8, min_corners=3)) == 0


def test_only_windows_inside_the_slide_are_candidates():
    everything = mask_of(np.ones((5, 6), bool), 4)  # covers 24 x 20
    grid = tile_grid(everything, (23, 19), tile_size=8)
    assert sorted(as_set(grid)) == [(x, y) for x in (0, 8) for y in (0, 8)]
    grid = tile_grid(everything, (24, 20), tile_size=8, stride=4)
    assert sorted(as_set(grid)) == [(x, y) for x in (0, 4, 8, 12, 16) for y in (0, 4, 8, 12)]
    assert len(tile_grid(everything, (23, 19), tile_size=20)) == 0


def _multiples(low, high, step):
    """How many multiples of `step` lie in [low, high] (closed form)."""
    first = -(-low // step)  # ceil(low / step)
    return max(0, high // step - first + 1)


@pytest.mark.parametrize("tile_size, stride", [(100, 100), (100, 30), (64, 48), (200, 7)])
def test_tile_count_on_a_rectangle_has_a_closed_form(tile_size, stride):
    """Mask columns [10, 61) and rows [5, 40) at downsample 16: a tile at x has its corner
    columns inside iff 10 * 16 <= x and x + T - 1 < 61 * 16. On a rectangle 3 corners inside
    imply 4, so both rules give nx * ny tiles."""
    mask = np.zeros((50, 80), bool)
    mask[5:40, 10:61] = True
    d, width, height = 16, 80 * 16, 50 * 16
    nx = _multiples(10 * d, min(61 * d - tile_size, width - tile_size), stride)
    ny = _multiples(5 * d, min(40 * d - tile_size, height - tile_size), stride)
    for rule in (3, 4):
        grid = tile_grid(mask_of(mask, d), (width, height), tile_size=tile_size, stride=stride,
                         min_corners=rule)
        assert len(grid) == nx * ny
        xs, ys = np.unique(grid.coords[:, 0]), np.unique(grid.coords[:, 1])
        assert len(xs) == nx and len(ys) == ny
        assert xs.min() >= 160 and xs.max() + tile_size <= 61 * d and np.all(xs % stride == 0)


@pytest.mark.parametrize("downsample, tile_size, stride", [(8, 37, 37), (5.5, 64, 24), (1, 9, 4)])
def test_corner_rule_matches_a_loop_on_a_blobby_mask(downsample, tile_size, stride):
    rng = np.random.default_rng(3)
    mask = rng.random((40, 50)) < 0.6
    dimensions = (int(50 * downsample), int(40 * downsample))
    reference = corners_by_loop(mask, downsample, dimensions, tile_size, stride)
    for rule in range(5):
        grid = tile_grid(mask_of(mask, downsample), dimensions, tile_size=tile_size,
                         stride=stride, min_corners=rule)
        assert as_set(grid) == {xy for xy, count in reference.items() if count >= rule}


def test_coordinates_are_row_major_int64_level0():
    grid = tile_grid(mask_of(np.ones((10, 10), bool), 10), (100, 100), tile_size=30)
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (9, 2)
    assert grid.coords.tolist()[:4] == [[0, 0], [30, 0], [60, 0], [0, 30]]
    assert (grid.tile_size, grid.stride, grid.level, grid.downsample) == (30, 30, 0, 1.0)
    assert (grid.dimensions, grid.mask_level, grid.mask_downsample) == ((100, 100), 1, 10.0)


# ---------------------------------------------------------------------------------------------
# Tissue fraction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("downsample, tile_size, stride", [(4, 6, 5), (4, 16, 16), (3, 10, 7)])
def test_tissue_fraction_is_the_exact_area_fraction(downsample, tile_size, stride):
    """Against the mask blown up to level 0 and averaged over each window, at windows that
    cut mask pixels."""
    rng = np.random.default_rng(4)
    mask = rng.random((12, 15)) < 0.5
    level0 = np.repeat(np.repeat(mask, downsample, axis=0), downsample, axis=1)
    dimensions = (15 * downsample, 12 * downsample)
    fractions = {
        (x, y): level0[y:y + tile_size, x:x + tile_size].mean()
        for y in range(0, dimensions[1] - tile_size + 1, stride)
        for x in range(0, dimensions[0] - tile_size + 1, stride)
    }
    for minimum in (0.25, 0.5, 0.8):
        grid = tile_grid(mask_of(mask, downsample), dimensions, tile_size=tile_size,
                         stride=stride, min_corners=0, min_tissue_fraction=minimum)
        expected = {xy for xy, f in fractions.items() if f >= minimum - 1e-9}
        assert as_set(grid) == expected


def test_both_rules_must_pass_when_both_are_given():
    mask = np.zeros((8, 8), bool)
    mask[[0, 0, 3, 3], [0, 3, 0, 3]] = True  # tile (0, 0): 4 corners, 4/16 of its area
    mask[4:8, 4:8] = True
    mask[4, 4] = mask[7, 7] = False  # tile (4, 4): 2 corners, 14/16 of its area
    tissue = mask_of(mask)
    both = tile_grid(tissue, (8, 8), tile_size=4, min_corners=3, min_tissue_fraction=0.5)
    corners = tile_grid(tissue, (8, 8), tile_size=4, min_corners=3)
    fraction = tile_grid(tissue, (8, 8), tile_size=4, min_corners=0, min_tissue_fraction=0.5)
    assert as_set(corners) == {(0, 0)} and as_set(fraction) == {(4, 4)} and len(both) == 0


def test_a_100k_slide_at_stride_256_is_vectorised():
    """~150 000 candidates on a 2000^2 mask of a 100 000^2 slide (no timing assertion: a
    Python loop here would take seconds; the vectorised grid takes milliseconds)."""
    yy, xx = np.mgrid[:2000, :2000]
    mask = (xx - 1000) ** 2 + (yy - 1000) ** 2 < 800**2
    grid = tile_grid(mask_of(mask, 50), (100_000, 100_000), tile_size=1152, stride=256,
                     min_corners=3, min_tissue_fraction=0.1)
    assert 386**2 > 100_000
    assert 50_000 < len(grid) < 386**2
    x, y = grid.coords.T
    centre = (x + 576 - 50_000) ** 2 + (y + 576 - 50_000) ** 2
    assert np.all(centre < 40_100**2)  # every kept tile centre on the disc (+- a mask pixel)


@pytest.mark.parametrize("options, message", [
    (dict(tile_size=0), "tile_size must be"),
    (dict(stride=0), "stride must be"),
    (dict(min_corners=5), "min_corners must be"),
    (dict(min_tissue_fraction=1.5), "min_tissue_fraction must be"),
])
def test_bad_grid_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        tile_grid(mask_of(np.ones((10, 10)), 10), (100, 100), **options)


def test_dimensions_of_another_slide_are_refused():
    with pytest.raises(ValueError, match="does not cover a slide of 400 x 100"):
        tile_grid(mask_of(np.ones((10, 10)), 10), (400, 100), tile_size=10)


# ---------------------------------------------------------------------------------------------
# HDF5
# ---------------------------------------------------------------------------------------------

def _grid():
    return tile_grid(mask_of(np.ones((10, 12), bool), 10), (120, 100), tile_size=30, stride=20)


def test_h5_round_trip_with_clam_attribute_names(tmp_path):
    grid = _grid()
    path = write_tiles_h5(tmp_path / "out" / "slide_7.h5", grid, tmp_path / "slide_7.svs")
    assert path == tmp_path / "out" / "slide_7.h5"
    assert [p.name for p in path.parent.iterdir()] == ["slide_7.h5"]  # no temporary left
    back = read_tiles_h5(path)
    np.testing.assert_array_equal(back.coords, grid.coords)
    assert (back.tile_size, back.stride, back.level, back.downsample, back.dimensions) == \
        (30, 20, 0, 1.0, (120, 100))
    assert (back.mask_level, back.mask_downsample) == (1, 10.0)
    with h5py.File(path) as file:
        coords = file["coords"]
        assert coords.dtype == np.int64 and coords.shape == (len(grid), 2)
        for attributes in (coords.attrs, file.attrs):
            assert attributes["patch_size"] == 30 and attributes["patch_level"] == 0
            assert attributes["level_dim"].tolist() == [120, 100]
            assert attributes["dimensions"].tolist() == [120, 100]
            assert attributes["tile_size"] == 30 and attributes["downsample"] == 1.0
            assert attributes["name"] == "slide_7"


def test_h5_is_replaced_atomically(tmp_path):
    path = tmp_path / "tiles.h5"
    write_tiles_h5(path, _grid(), "a.tiff")
    empty = TileGrid(coords=np.zeros((0, 2), np.int64), tile_size=30, stride=30,
                     dimensions=(120, 100), mask_level=None, mask_downsample=None)
    write_tiles_h5(path, empty, "a.tiff")
    back = read_tiles_h5(path)
    assert len(back) == 0 and back.mask_level is None
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.h5"]


def test_a_clam_level0_file_is_read(tmp_path):
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as file:
        coords = file.create_dataset("coords", data=np.array([[0, 0], [256, 0]]))
        coords.attrs.update(patch_size=256, patch_level=0, level_dim=(1000, 800))
    back = read_tiles_h5(path)
    assert (back.tile_size, back.stride, back.dimensions) == (256, 256, (1000, 800))


def test_h5_errors_name_the_file(tmp_path):
    with pytest.raises(InputDataError, match="missing.h5: no such file"):
        read_tiles_h5(tmp_path / "missing.h5")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(InputDataError, match="text.h5: not an HDF5 file"):
        read_tiles_h5(text)
    cases = {
        "nocoords.h5": (lambda f: f.create_dataset("features", data=np.zeros(3)),
                        "no 'coords' dataset"),
        "shape.h5": (lambda f: f.create_dataset("coords", data=np.zeros((4, 3), np.int64)),
                     r"integer \(n, 2\)"),
        "floats.h5": (lambda f: f.create_dataset("coords", data=np.zeros((4, 2))),
                      r"integer \(n, 2\)"),
        "noattrs.h5": (lambda f: f.create_dataset("coords", data=np.zeros((4, 2), np.int64)),
                       "no 'tile_size' \\(or 'patch_size'\\)"),
    }
    for name, (fill, message) in cases.items():
        with h5py.File(tmp_path / name, "w") as file:
            fill(file)
        with pytest.raises(InputDataError, match=f"{name}: .*{message}"):
            read_tiles_h5(tmp_path / name)
    with h5py.File(tmp_path / "level1.h5", "w") as file:
        coords = file.create_dataset("coords", data=np.zeros((1, 2), np.int64))
        coords.attrs.update(patch_size=256, patch_level=1, level_dim=(500, 400))
    with pytest.raises(InputDataError, match="level1.h5: tiles of level 1"):
        read_tiles_h5(tmp_path / "level1.h5")


# ---------------------------------------------------------------------------------------------
# Thumbnail
# ---------------------------------------------------------------------------------------------

def test_thumbnail_is_a_png_of_the_low_level_with_contours_and_tiles(tmp_path):
    rgb, _ = painted_tissue()  # level 2 of the fake slide: 800 x 600, downsample 8
    slide = FakeSlide(rgb, downsample=8)
    tissue = tissue_mask(slide)
    grid = tile_grid(tissue, slide.dimensions, tile_size=512)
    path = draw_thumbnail(tmp_path / "thumb.png", slide, tissue, grid, max_size=1000)
    assert [p.name for p in tmp_path.iterdir()] == ["thumb.png"]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 600)
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels == CONTOUR_COLOUR).all(axis=-1).sum() > 500
    assert (pixels == HOLE_COLOUR).all(axis=-1).sum() > 100
    x, y = (grid.coords[0] // 8).tolist()
    assert (pixels[y, x:x + 64] == 0).all()  # the top edge of the first kept tile, black


def test_thumbnail_shrinks_the_coarsest_level_to_max_size(tmp_path):
    rgb, _ = painted_tissue()
    slide = FakeSlide(rgb, downsample=8)
    tissue = tissue_mask(slide)
    path = draw_thumbnail(tmp_path / "small.png", slide, tissue, None, max_size=400)
    with Image.open(path) as image:
        assert image.size == (400, 300)


# ---------------------------------------------------------------------------------------------
# End to end: a written slide -> mask -> grid -> h5 + thumbnail
# ---------------------------------------------------------------------------------------------

def test_written_slide_to_tiles_and_thumbnail(tmp_path, monkeypatch):
    """The painted tissue blown up 3x to a 2400 x 1800 level 0 at 0.5 um/px, written as a
    lossless pyramidal TIFF (downsamples 1, 2, 4, 8), read back by the slide reader."""
    import cv2

    from jaxmed.data.slide import open_slide
    from jaxmed.data.slide_writer import write_slide

    low, low_truth = painted_tissue()
    rgb = cv2.resize(low, (2400, 1800), interpolation=cv2.INTER_NEAREST)
    truth = cv2.resize(low_truth.astype(np.uint8), (2400, 1800),
                       interpolation=cv2.INTER_NEAREST).astype(bool)
    slide_path = write_slide(tmp_path / "painted.tiff", rgb, compression="zlib", mpp=0.5,
                             min_level_size=256)
    with open_slide(slide_path) as slide:
        assert [level.downsample for level in slide.levels] == [1, 2, 4, 8]
        read = []
        original = slide.read_level
        monkeypatch.setattr(slide, "read_level",
                            lambda level, **kw: read.append(level) or original(level, **kw))
        # 600 x 450 = 270 000 pixels at level 2; 2 um/px there, 4 um^2 per mask pixel: the
        # hole (~11 000 um^2) is kept, the speck (~180 um^2) dropped.
        tissue = tissue_mask(slide, max_pixels=300_000, min_hole_area_um2=4000)
        assert read == [2] and (tissue.level, tissue.downsample) == (2, 4.0)
        assert tissue.mask.shape == (450, 600)
        level_truth = truth[2::4, 2::4]
        assert (tissue.mask & level_truth).sum() / (tissue.mask | level_truth).sum() > 0.95
        assert len(tissue.contours) == 2 and len(tissue.holes) == 1
        assert not tissue.mask[500 * 3 // 4, 700 * 3 // 4]  # the speck

        grid = tile_grid(tissue, slide.dimensions, tile_size=256, stride=128)
        expected = tile_grid(mask_of(level_truth, 4), slide.dimensions, tile_size=256,
                             stride=128)
        assert len(grid) > 40
        assert len(as_set(grid) ^ as_set(expected)) <= 2  # the mask's boundary may differ
        # In the slide itself: kept tiles have >= 3 corner pixels on stain (but for a pixel's
        # slack at the boundary); with the fraction rule, at least half their area.
        misses = 0
        for x, y in grid.coords:
            tile = slide.read_region((int(x), int(y)), 0, (256, 256))
            stained = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)[..., 1] > 30
            misses += stained[[0, 0, -1, -1], [0, -1, 0, -1]].sum() < 3
        assert misses <= 2
        half = tile_grid(tissue, slide.dimensions, tile_size=256, stride=128, min_corners=0,
                         min_tissue_fraction=0.5)
        assert len(half) > 40
        for x, y in half.coords:
            tile = slide.read_region((int(x), int(y)), 2, (64, 64))
            assert (cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)[..., 1] > 30).mean() > 0.45

        h5 = write_tiles_h5(tmp_path / "painted.h5", grid, slide)
        back = read_tiles_h5(h5)
        np.testing.assert_array_equal(back.coords, grid.coords)
        assert back.dimensions == (2400, 1800) and (back.mask_level, back.tile_size) == (2, 256)
        with h5py.File(h5) as file:
            assert file["coords"].attrs["name"] == "painted"

        thumbnail = draw_thumbnail(tmp_path / "painted.png", slide, tissue, grid, max_size=1000)
        assert read == [2, 2]  # the finest level within 1000 px: 600 x 450
    with Image.open(thumbnail) as image:
        assert image.format == "PNG" and image.size == (600, 450)
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels == CONTOUR_COLOUR).all(axis=-1).sum() > 500
    assert (pixels == HOLE_COLOUR).all(axis=-1).sum() > 50
