"""Slide writer: OpenSlide opens what it writes; pixels and the 2x2-mean pyramid round-trip;
callable sources are asked for each tile once; writes are atomic."""

import numpy as np
import openslide
import pytest
import tifffile

from jaxmed.data.slide import default_levels, level_size
from jaxmed.data.slide_writer import write_slide


def textured(width, height, seed=0):
    """Gradients, a checker of blocks and noise: a one-pixel shift changes most pixels."""
    y, x = np.mgrid[:height, :width]
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 3))
    rgb = np.stack([x * 200 // width, y * 200 // height, ((x // 37 + y // 23) % 5) * 40], -1)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def half(image):
    """Reference 2x2 mean: each output pixel averages the 1, 2 or 4 input pixels it covers."""
    height, width = image.shape[:2]
    out = np.zeros((-(-height // 2), -(-width // 2), 3))
    counts = np.zeros(out.shape[:2] + (1,))
    for dy in (0, 1):
        for dx in (0, 1):
            part = image[dy::2, dx::2].astype(float)
            out[:part.shape[0], :part.shape[1]] += part
            counts[:part.shape[0], :part.shape[1]] += 1
    return np.floor(out / counts + 0.5).astype(np.uint8)


@pytest.mark.parametrize(
    "layout, compression, vendor",
    # OpenSlide's generic TIFF reader goes through libtiff, which has no JPEG 2000.
    [("generic-tiff", "jpeg", "generic-tiff"), ("generic-tiff", "zlib", "generic-tiff"),
     ("svs", "jpeg", "aperio"), ("svs", "jpeg2000", "aperio")],
)
def test_openslide_opens_generic_tiff_and_svs(tmp_path, layout, compression, vendor):
    path = write_slide(tmp_path / "slide.tif", textured(1500, 1100), layout=layout,
                       compression=compression, mpp=0.5, objective_power=20, min_level_size=300)
    reference = openslide.OpenSlide(path)
    properties = reference.properties
    assert properties["openslide.vendor"] == vendor
    assert reference.level_count == 3  # 1500 -> 750 -> 375 (>= 300)
    assert reference.level_dimensions == ((1500, 1100), (750, 550), (375, 275))
    assert float(properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert float(properties["openslide.mpp-y"]) == pytest.approx(0.5)
    if layout == "svs":
        assert float(properties["openslide.objective-power"]) == 20
        assert set(reference.associated_images) == {"thumbnail", "label", "macro"}


def test_lossless_pyramid_is_repeated_2x2_means(tmp_path):
    image = textured(1031, 777)  # odd sizes: partial blocks at the edges of every level
    path = write_slide(tmp_path / "slide.tif", image, compression="zlib", levels=(1, 2, 8))
    with tifffile.TiffFile(path) as tif:
        pages = tif.pages
        stored = [page.asarray() for page in pages]
        assert [page.subfiletype for page in pages] == [0, 1, 1]
        assert all(page.is_tiled and page.tilewidth == 256 for page in pages)
    expected = [image, half(image), half(half(half(image)))]
    for got, want in zip(stored, expected):
        np.testing.assert_array_equal(got, want)


def test_jpeg_error_is_small(tmp_path):
    y, x = np.mgrid[:600, :700]
    image = np.stack([x * 200 // 700, y * 200 // 600, ((x // 37 + y // 23) % 5) * 40], -1)
    image = image.astype(np.uint8)
    path = write_slide(tmp_path / "slide.tif", image, compression="jpeg", quality=90)
    error = np.abs(tifffile.imread(path).astype(int) - image).mean()
    assert 0 < error < 3


def test_callable_source_is_asked_each_tile_once_and_matches_the_array(tmp_path):
    image = textured(1000, 600)
    pyramid = {1: image, 2: half(image), 4: half(half(image))}
    calls = []

    def source(downsample, x, y, w, h):
        calls.append((downsample, x, y, w, h))
        return pyramid[downsample][y:y + h, x:x + w]

    from_callable = write_slide(tmp_path / "callable.tif", source, size=(1000, 600),
                                compression="zlib", tile=256, levels=(1, 2, 4))
    from_array = write_slide(tmp_path / "array.tif", image, compression="zlib", tile=256,
                             levels=(1, 2, 4))
    for d in (1, 2, 4):
        w, h = level_size((1000, 600), d)
        asked = [c for c in calls if c[0] == d]
        assert len(asked) == len(set(asked)) == -(-w // 256) * -(-h // 256)
        covered = np.zeros((h, w), int)
        for _, x, y, cw, ch in asked:
            assert x % 256 == 0 and y % 256 == 0 and x + cw <= w and y + ch <= h
            covered[y:y + ch, x:x + cw] += 1
        assert (covered == 1).all()
    for level in range(3):
        np.testing.assert_array_equal(tifffile.imread(from_callable, level=level),
                                      tifffile.imread(from_array, level=level))


def test_layouts_as_stored(tmp_path):
    image = textured(800, 600)
    ome = write_slide(tmp_path / "ome.tif", image, layout="ome-tiff", compression="zlib",
                      mpp=(0.25, 0.3), objective_power=40, min_level_size=200)
    with tifffile.TiffFile(ome) as tif:
        assert tif.is_ome and len(tif.pages) == 1 and len(tif.pages[0].subifds) == 2
        assert [level.shape for level in tif.series[0].levels] == [
            (600, 800, 3), (300, 400, 3), (150, 200, 3)
        ]
        assert 'NominalMagnification="40"' in tif.ome_metadata
        assert 'PhysicalSizeY="0.3"' in tif.ome_metadata
    single = write_slide(tmp_path / "single.tif", image, layout="single-level")
    stripped = write_slide(tmp_path / "stripped.tif", image, layout="stripped",
                           compression="zlib", description_extra={"Scanner": "test"})
    with tifffile.TiffFile(single) as tif:
        assert len(tif.pages) == 1 and tif.pages[0].is_tiled
    with tifffile.TiffFile(stripped) as tif:
        assert len(tif.pages) == 1 and not tif.pages[0].is_tiled
        assert tif.pages[0].description == "Scanner = test"
        np.testing.assert_array_equal(tif.asarray(), image)
    svs = write_slide(tmp_path / "slide.svs", image, layout="svs", mpp=0.25,
                      description_extra="Filename = x", min_level_size=200)
    with tifffile.TiffFile(svs) as tif:
        description = tif.pages[0].description
        assert description.startswith("Aperio") and "|MPP = 0.25|Filename = x" in description
        # page 1 is the stripped thumbnail; the reduced levels (800 -> 400 -> 200) follow it,
        # then the label and the macro
        assert [p.is_tiled for p in tif.pages] == [True, False, True, True, False, False]
        assert [p.subfiletype for p in tif.pages] == [0, 0, 0, 0, 1, 9]
        assert [p.shape[:2] for p in tif.pages[2:4]] == [(300, 400), (150, 200)]


def test_resolution_tags_in_centimetres(tmp_path):
    path = write_slide(tmp_path / "slide.tif", textured(600, 600), mpp=(0.25, 0.5),
                       min_level_size=300)
    with tifffile.TiffFile(path) as tif:
        for page, d in zip(tif.pages, (1, 2)):
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            assert page.resolution == pytest.approx((1e4 / (0.25 * d), 1e4 / (0.5 * d)))


def test_default_levels_stop_at_min_level_size():
    assert default_levels((3000, 1000)) == (1, 2, 4)  # 750 >= 512 > 375
    assert default_levels((100_000, 80_000)) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert default_levels((400, 300)) == (1,)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "slide.tif"
    path.write_bytes(b"previous")

    def failing(downsample, x, y, w, h):
        if downsample == 2:
            raise RuntimeError("renderer broke")
        return np.zeros((h, w, 3), np.uint8)

    with pytest.raises(RuntimeError, match="renderer broke"):
        write_slide(path, failing, size=(1200, 1200))
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.tif"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layout": "ndpi"}, "unknown slide layout"),
        ({"compression": "lzma"}, "unknown compression"),
        ({"tile": 100}, "multiple of 16"),
        ({"levels": (2, 4)}, "starting at 1"),
        ({"levels": (1, 3)}, "powers of 2"),
        ({"layout": "svs", "mpp": (0.25, 0.3)}, "one MPP"),
        ({"layout": "single-level", "levels": (1, 2)}, "level 0 only"),
        ({"size": (10, 10)}, "does not match"),
        ({"mpp": -1.0}, "positive"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_slide(tmp_path / "slide.tif", textured(64, 64), **kwargs)
    assert not list(tmp_path.iterdir())


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_slide(tmp_path / "a.tif", np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="size="):
        write_slide(tmp_path / "a.tif", lambda d, x, y, w, h: None)
    with pytest.raises(ValueError, match="returned"):
        write_slide(tmp_path / "a.tif", lambda d, x, y, w, h: np.zeros((h, w), np.uint8),
                    size=(64, 64))
    assert not list(tmp_path.iterdir())
