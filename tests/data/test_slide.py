"""Slide reader: levels, MPP and regions equal OpenSlide's on the same files; every layout; every
bad file named; thread-safe; bounded memory on a 40 000² slide."""

import json
import math
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from jaxmed.data import slide as slide_module
from jaxmed.data.slide import FILL, Level, SlideError, open_slide
from jaxmed.data.slide_writer import write_slide
from jaxmed.errors import InputDataError
from tests.data.test_slide_writer import textured

TILE = 256


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Slides written once for the module: name -> path."""
    folder = tmp_path_factory.mktemp("slides")
    even = textured(2048, 1536)  # every level's downsample is a whole number
    odd = textured(2100, 1700, seed=1)  # OpenSlide's last downsample is 7.983...
    specs = {
        "generic_zlib": (even, "generic-tiff", "zlib"),
        "generic_jpeg": (even, "generic-tiff", "jpeg"),
        "svs_zlib": (even, "svs", "zlib"),
        "svs_jpeg": (even, "svs", "jpeg"),
        "svs_jpeg2000": (even, "svs", "jpeg2000"),
        "odd_zlib": (odd, "generic-tiff", "zlib"),
        "uneven_zlib": (even, "generic-tiff", "zlib", (1, 2, 8)),
        "ome_zlib": (odd, "ome-tiff", "zlib"),
        "single_zlib": (odd, "single-level", "zlib"),
        "single_jpeg": (odd, "single-level", "jpeg"),
        "stripped": (odd[:300, :400], "stripped", "zlib"),
    }
    paths = {}
    for name, (image, layout, compression, *levels) in specs.items():
        paths[name] = write_slide(
            folder / f"{name}.tif", image, layout=layout, compression=compression,
            levels=levels[0] if levels else None,
            mpp=(0.25, 0.25) if layout != "ome-tiff" else (0.25, 0.26), objective_power=40,
            min_level_size=256,
        )
    paths["folder"] = folder
    return paths


def openslide_rgb(reference, location, level, size):
    """OpenSlide's region as RGB plus the mask of its fully opaque pixels."""
    rgba = np.asarray(reference.read_region(location, level, size))
    return rgba[..., :3], rgba[..., 3] == 255, rgba[..., 3] == 0


def locations(downsample):
    """Level-0 corners (multiples of the downsample) straddling tiles and the slide's border."""
    level_points = [(0, 0), (250, 250), (TILE - 7, 3 * TILE - 9), (201, 333), (-40, -25),
                    (900, 700), (1900, 1450), (5000, 5000)]
    return [(x * downsample, y * downsample) for x, y in level_points]


# ---------------------------------------------------------------------------- against OpenSlide


@pytest.mark.parametrize("name", ["generic_zlib", "svs_zlib", "odd_zlib", "svs_jpeg",
                                  "uneven_zlib"])
def test_levels_and_mpp_equal_openslide(files, name):
    """uneven_zlib stores downsamples 1, 2, 8: still every tiled page is a level, as in
    OpenSlide."""
    reference = openslide.OpenSlide(files[name])
    with open_slide(files[name]) as slide:
        assert [level.size for level in slide.levels] == list(reference.level_dimensions)
        assert [level.downsample for level in slide.levels] == pytest.approx(
            reference.level_downsamples, rel=1e-12
        )
        assert slide.dimensions == reference.dimensions
        properties = reference.properties
        assert slide.mpp == pytest.approx(
            (float(properties["openslide.mpp-x"]), float(properties["openslide.mpp-y"]))
        )
        assert slide.objective_power == 40
        if name.startswith("svs"):
            assert slide.layout == "svs"
            assert float(properties["openslide.objective-power"]) == slide.objective_power
        else:
            assert slide.layout == "generic-tiff"


@pytest.mark.parametrize("name", ["generic_zlib", "svs_zlib", "generic_jpeg", "svs_jpeg",
                                  "svs_jpeg2000", "uneven_zlib"])
def test_regions_equal_openslide_at_every_level(files, name):
    """Inside the slide our pixels are OpenSlide's exactly: the lossless files trivially, and the
    JPEG and JPEG 2000 files because both decode the same codestreams with the same libraries
    (libjpeg-turbo, OpenJPEG). Outside, ours are FILL where OpenSlide's are transparent."""
    reference = openslide.OpenSlide(files[name])
    with open_slide(files[name]) as slide:
        for level, downsample in enumerate(reference.level_downsamples):
            assert downsample == int(downsample)
            for location in locations(int(downsample)):
                for size in ((300, 200), (TILE, TILE), (1, 1)):
                    ours = slide.read_region(location, level, size)
                    assert ours.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
                    assert ours.flags["C_CONTIGUOUS"]
                    theirs, opaque, transparent = openslide_rgb(reference, location, level, size)
                    np.testing.assert_array_equal(ours[opaque], theirs[opaque])
                    assert (ours[transparent] == FILL).all()


def test_level_zero_at_any_location_and_odd_downsample_origin(files):
    """Level 0 needs no rounding: every location is exact. A level whose downsample is not a whole
    number (7.983 on a 2100 x 1700 slide) is exact where the location maps to a whole level
    pixel (the origin)."""
    reference = openslide.OpenSlide(files["odd_zlib"])
    with open_slide(files["odd_zlib"]) as slide:
        assert slide.levels[-1].downsample != int(slide.levels[-1].downsample)
        for location in [(1, 1), (257, 255), (2099 - 150, 1699 - 50), (13, 1650), (-3, 5)]:
            theirs, opaque, transparent = openslide_rgb(reference, location, 0, (300, 100))
            ours = slide.read_region(location, 0, (300, 100))
            np.testing.assert_array_equal(ours[opaque], theirs[opaque])
            assert (ours[transparent] == FILL).all()
        last = len(slide.levels) - 1
        theirs, opaque, _ = openslide_rgb(reference, (0, 0), last, slide.levels[last].size)
        np.testing.assert_array_equal(slide.read_level(last)[opaque], theirs[opaque])


def test_unaligned_locations_start_at_the_floor_pixel(files):
    """Where the location is not a multiple of the downsample, OpenSlide resamples the level
    bilinearly at the fractional position (`location / downsample`); we return the level's own
    pixels from `floor(location / downsample)`. So ours equal the aligned read at the floor
    pixel, and OpenSlide's value lies between the four level pixels around it (within the
    rounding of its fixed-point interpolation)."""
    reference = openslide.OpenSlide(files["odd_zlib"])
    with open_slide(files["odd_zlib"]) as slide:
        for level in range(1, len(slide.levels)):
            downsample = slide.levels[level].downsample
            for x, y in [(3, 5), (333, 517), (1001, 999), (1531, 1023)]:
                fx, fy = int(np.floor(x / downsample)), int(np.floor(y / downsample))
                ours = slide.read_region((x, y), level, (41, 31))
                grid = slide._readers[level].read(fx, fy, fx + 41, fy + 31)
                np.testing.assert_array_equal(ours, grid)
                wider = slide._readers[level].read(fx, fy, fx + 42, fy + 32).astype(int)
                corners = np.stack([wider[:-1, :-1], wider[:-1, 1:], wider[1:, :-1],
                                    wider[1:, 1:]])
                theirs, opaque, _ = openslide_rgb(reference, (x, y), level, (41, 31))
                low, high = corners.min(0)[opaque] - 1, corners.max(0)[opaque] + 1
                inside = theirs[opaque].astype(int)
                assert ((inside >= low) & (inside <= high)).all()
                # ...while the pixel one to the right would not do.
                assert not np.array_equal(ours, wider[:-1, 1:])


def test_best_level_for_downsample_is_openslides(files):
    reference = openslide.OpenSlide(files["odd_zlib"])
    with open_slide(files["odd_zlib"]) as slide:
        for downsample in [0.25, 1, 1.5, 1.999, 2, 2.01, 3.99, 4, 7.98, 7.983005765900855, 8,
                           100]:
            assert slide.best_level_for_downsample(downsample) == (
                reference.get_best_level_for_downsample(downsample)
            ), downsample


def test_level_for_pixel_budget_and_read_level_limit(files):
    with open_slide(files["odd_zlib"]) as slide:
        areas = [w * h for w, h in (level.size for level in slide.levels)]
        assert slide.level_for_pixel_budget(areas[0]) == 0
        assert slide.level_for_pixel_budget(areas[1]) == 1
        assert slide.level_for_pixel_budget(areas[1] - 1) == 2
        assert slide.level_for_pixel_budget(1) == len(areas) - 1  # nothing fits: the coarsest
        with pytest.raises(ValueError, match="max_pixels"):
            slide.read_level(0, max_pixels=areas[0] - 1)
        assert slide.read_level(1).shape == (*slide.levels[1].size[::-1], 3)


# ---------------------------------------------------------------------------- other layouts


def test_ome_tiff_levels_equal_tifffile(files):
    path = files["ome_zlib"]
    with tifffile.TiffFile(path) as tif:
        expected = [level.asarray() for level in tif.series[0].levels]
    with open_slide(path) as slide:
        assert slide.layout == "ome-tiff"
        assert slide.mpp == pytest.approx((0.25, 0.26))
        assert slide.objective_power == 40
        assert len(slide.levels) == len(expected) == 4
        for level, array in enumerate(expected):
            assert slide.levels[level].size == (array.shape[1], array.shape[0])
            np.testing.assert_array_equal(slide.read_level(level), array)
            # The smallest level-0 location inside level pixel (100, 50).
            x, y = (math.ceil(v * slide.levels[level].downsample) for v in (100, 50))
            np.testing.assert_array_equal(slide.read_region((x, y), level, (60, 40)),
                                          array[50:90, 100:160])


@pytest.mark.parametrize(
    "resolution, unit, expected",
    [((40_000, 20_000), "CENTIMETER", (0.25, 0.5)), ((50_800, 50_800), "INCH", (0.5, 0.5)),
     (None, None, None)],
)
def test_mpp_from_resolution_tags(tmp_path, resolution, unit, expected):
    path = tmp_path / "plain.tif"
    options = {"resolution": resolution, "resolutionunit": unit} if resolution else {}
    tifffile.imwrite(path, textured(300, 200), tile=(64, 64), photometric="rgb",
                     metadata=None, **options)
    with open_slide(path) as slide:
        assert slide.mpp == (pytest.approx(expected) if expected else None)
        assert slide.objective_power is None


def test_ome_units_are_converted_to_micrometres(tmp_path):
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(path, textured(300, 200), tile=(64, 64), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 0.0003, "PhysicalSizeYUnit": "mm"})
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx((0.25, 0.3))
        assert slide.layout == "single-level"  # no stored pyramid, whatever the metadata


def block_mean(image, d):
    """Reference, by an integral image: the mean of each d x d block (partial at the far edges),
    rounded half up."""
    height, width = image.shape[:2]
    integral = np.zeros((height + 1, width + 1, 3))
    integral[1:, 1:] = image.astype(float).cumsum(0).cumsum(1)
    rows = np.append(np.arange(0, height, d), height)
    columns = np.append(np.arange(0, width, d), width)
    sums = (integral[rows[1:]][:, columns[1:]] - integral[rows[:-1]][:, columns[1:]]
            - integral[rows[1:]][:, columns[:-1]] + integral[rows[:-1]][:, columns[:-1]])
    counts = np.diff(rows)[:, None, None] * np.diff(columns)[None, :, None]
    return np.floor(sums / counts + 0.5).astype(np.uint8)


def test_single_level_computes_lower_levels_by_block_means(files, monkeypatch):
    path = files["single_zlib"]
    level0 = tifffile.imread(path)
    # Small bands, so one region is assembled from several decoded strips of level 0.
    monkeypatch.setattr(slide_module, "_BAND_BYTES", 100_000)
    with open_slide(path) as slide:
        assert slide.layout == "single-level"
        assert slide.mpp == pytest.approx((0.25, 0.25)) and slide.objective_power == 40
        # Powers of 2 while the longer side stays >= 512: 2100 -> 1050 -> 525.
        assert slide.levels == (Level((2100, 1700), 1.0), Level((1050, 850), 2.0),
                                Level((525, 425), 4.0))
        for level, d in ((1, 2), (2, 4)):
            expected = block_mean(level0, d)
            np.testing.assert_array_equal(slide.read_level(level), expected)
            # A region crossing the right and bottom edges: partial blocks, then FILL.
            x, y = (expected.shape[1] - 20) * d, (expected.shape[0] - 10) * d
            region = slide.read_region((x, y), level, (30, 25))
            np.testing.assert_array_equal(region[:10, :20], expected[-10:, -20:])
            assert (region[10:] == FILL).all() and (region[:, 20:] == FILL).all()
        np.testing.assert_array_equal(slide.read_region((5, 7), 0, (64, 32)),
                                      level0[7:39, 5:69])


def test_single_level_jpeg_decodes_only_the_region(files):
    """A computed region decodes only the level-0 tiles under it: the cache holds those."""
    with open_slide(files["single_jpeg"]) as slide:
        region = slide.read_region((512, 512), 2, (64, 64))  # level-0 512..768: one tile
        assert region.shape == (64, 64, 3)
        cache = slide._readers[0]._cache
        assert len(cache._items) == 1


# ---------------------------------------------------------------------------- bad files


def raises_naming(path, match, fn, *args):
    with pytest.raises(SlideError, match=match) as info:
        fn(*args)
    assert Path(path).name in str(info.value), str(info.value)
    assert isinstance(info.value, InputDataError)
    return str(info.value)


def test_missing_file(tmp_path):
    raises_naming(tmp_path / "absent.svs", "not found", open_slide, tmp_path / "absent.svs")


@pytest.mark.parametrize("content", [b"", b"just some text, not an image\n" * 20,
                                     b"\x89PNG\r\n\x1a\n" + bytes(200)])
def test_not_a_tiff(tmp_path, content):
    path = tmp_path / "notes.tif"
    path.write_bytes(content)
    raises_naming(path, "not a TIFF", open_slide, path)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_truncated_file(files, tmp_path, fraction):
    data = files["generic_jpeg"].read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: int(len(data) * fraction)])
    raises_naming(path, "truncated", open_slide, path)


def test_stripped_tiff_is_refused_with_a_conversion_hint(files):
    message = raises_naming(files["stripped"], "is not tiled", open_slide, files["stripped"])
    assert "vips tiffsave" in message


@pytest.mark.parametrize(
    "image, photometric, match",
    [
        (np.zeros((512, 512), np.uint8), "minisblack", "1 sample per pixel"),
        (np.zeros((512, 512, 3), np.uint16), "rgb", "uint16"),
        (np.zeros((512, 512, 4), np.uint8), "rgb", "4 samples per pixel"),
        (np.zeros((512, 512, 3), np.float32), "rgb", "float32"),
    ],
    ids=["grey", "16-bit", "rgba", "float"],
)
def test_not_8_bit_rgb(tmp_path, image, photometric, match):
    path = tmp_path / "odd_pixels.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric=photometric, metadata=None)
    message = raises_naming(path, match, open_slide, path)
    assert "only 8-bit RGB" in message


@pytest.mark.parametrize("name, damage", [("generic_jpeg", "header"), ("generic_zlib", "body"),
                                          ("svs_jpeg2000", "header")])
def test_corrupt_tile_names_tile_and_level(files, tmp_path, name, damage):
    path = tmp_path / f"damaged_{name}.tif"
    path.write_bytes(files[name].read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        columns = -(-page.imagewidth // TILE)
        index = 1 * columns + 5  # row 1, column 5
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as file:
        file.seek(offset if damage == "header" else offset + 8)
        file.write(bytes(64) if damage == "header" else np.random.default_rng(0).bytes(count - 8))
    with open_slide(path) as slide:
        message = raises_naming(path, "cannot be decoded", slide.read_region,
                                (5 * TILE - 100, TILE - 50), 0, (300, 100))
        assert "tile (column 5, row 1) of level 0" in message
        assert "x 1280-1535, y 256-511" in message
        # The rest of the slide still reads, and equals the undamaged file.
        with open_slide(files[name]) as intact:
            for location in [(0, 0), (6 * TILE, TILE), (5 * TILE, 0), (5 * TILE, 2 * TILE)]:
                np.testing.assert_array_equal(slide.read_region(location, 0, (TILE, TILE)),
                                              intact.read_region(location, 0, (TILE, TILE)))


def test_bad_arguments_and_closed_slide(files):
    slide = open_slide(files["generic_zlib"])
    with pytest.raises(ValueError, match="level 9 does not exist"):
        slide.read_region((0, 0), 9, (10, 10))
    with pytest.raises(ValueError, match="non-negative"):
        slide.read_region((0, 0), 0, (-1, 10))
    assert slide.read_region((0, 0), 0, (0, 0)).shape == (0, 0, 3)
    slide.close()
    with pytest.raises(ValueError, match="closed"):
        slide.read_region((0, 0), 0, (10, 10))


def test_pickled_slide_reopens(files):
    with open_slide(files["svs_jpeg"]) as slide:
        copy = pickle.loads(pickle.dumps(slide))
        with copy:
            assert copy.levels == slide.levels
            np.testing.assert_array_equal(copy.read_region((100, 200), 1, (64, 64)),
                                          slide.read_region((100, 200), 1, (64, 64)))


# ---------------------------------------------------------------------------- threads and memory


def test_many_threads_read_the_right_pixels(files):
    """8 threads x 200 reads on one Slide, with a cache small enough to evict all the time."""
    rng = np.random.default_rng(3)
    with open_slide(files["svs_jpeg"], cache_bytes=1_000_000) as slide:
        jobs = []
        for _ in range(200):
            level = int(rng.integers(len(slide.levels)))
            x, y = (int(v) for v in rng.integers(-100, 2048, 2))
            w, h = (int(v) for v in rng.integers(1, 400, 2))
            jobs.append(((x, y), level, (w, h)))
        expected = [slide.read_region(*job) for job in jobs]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda job: slide.read_region(*job), jobs))
        cache = slide._readers[0]._cache
        assert cache._bytes <= cache.max_bytes
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_tile_cache_is_bounded_and_serves_repeats(files):
    with open_slide(files["generic_jpeg"], cache_bytes=5 * TILE * TILE * 3) as slide:
        cache = slide._readers[0]._cache
        slide.read_region((0, 0), 0, (2 * TILE, 2 * TILE))
        assert len(cache._items) == 4
        first = dict(cache._items)
        slide.read_region((10, 10), 0, (100, 100))  # the same tile again: no new entry
        assert dict(cache._items).keys() == first.keys()
        slide.read_region((0, 0), 0, (2048, 1536))  # 48 tiles through a 5-tile cache
        assert len(cache._items) <= 5 and cache._bytes <= cache.max_bytes


RSS_CHECK = Path(__file__).with_name("slide_rss_check.py")


def test_reading_a_40k_slide_keeps_memory_far_below_level_0(tmp_path):
    """A 40 000 x 40 000 JPEG slide (4.8 GB of level-0 pixels): a subprocess opens it, reads 50
    random 1024² regions of level 0 and some of every lower level, checks their pixels, and
    reports its peak RSS."""
    result = subprocess.run(
        [sys.executable, str(RSS_CHECK), str(tmp_path / "big.tif")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    level0_bytes = 40_000 * 40_000 * 3
    assert report["peak_rss_bytes"] < level0_bytes / 4, report
    assert report["max_error"] < 4, report  # mean |JPEG error| of each region
    print(report)
