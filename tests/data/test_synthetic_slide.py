"""Synthetic slides: Beer-Lambert colour against the formula, tiling invariance, lower levels as
shrunken level 0, the stain truth, classes that differ at high resolution but not in mean colour,
annotations that match the rendered classes, and a written slide read back by OpenSlide and by
jaxmed's reader."""

import json
import math

import numpy as np
import pytest
import scipy.ndimage

from jaxmed.data.annotations import annotation_mask, read_annotations
from jaxmed.data.synthetic_slide import (
    CLASS_TEXTURES,
    HE_STAINS,
    make_synthetic_slide,
    mix_stains,
    write_synthetic_slide,
)

SIZE = (4096, 4096)


@pytest.fixture(scope="module")
def design():
    return make_synthetic_slide(SIZE, seed=0)


def _edge_window(design, region_index, size, align=16):
    """Top-left (level 0, aligned) of a `size` window straddling the right edge of an island."""
    region = design.regions[region_index]
    cx, cy = region.outline.centre
    x = int(cx + region.outline.inner) - size // 2
    y = int(cy) - size // 2
    return x // align * align, y // align * align


def _inner_window(region, limit=640):
    """Top-left and side of a square window inside an island's inscribed circle."""
    half = int(region.outline.inner / math.sqrt(2)) - 8
    cx, cy = (int(v) for v in region.outline.centre)
    side = min(2 * half, limit)
    return cx - side // 2, cy - side // 2, side


def _angle(u, v):
    cosine = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
    return math.degrees(math.acos(min(1.0, cosine)))


# ---------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------


def test_stains_are_unit_rows_haematoxylin_first():
    np.testing.assert_allclose(np.linalg.norm(HE_STAINS, axis=1), 1.0)
    assert HE_STAINS[0, 0] > HE_STAINS[1, 0]  # haematoxylin absorbs more red than eosin
    assert _angle(HE_STAINS[0], HE_STAINS[1]) > 20


def test_mix_stains_is_beer_lambert():
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 2, (5, 7, 2))
    stains = np.array([[0.6, 0.7, 0.4], [0.2, 0.8, 0.55]])
    rgb = mix_stains(c, stains)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        expected = 255 * np.exp(-(c[..., 0] * stains[0, channel] + c[..., 1] * stains[1, channel]))
        np.testing.assert_array_equal(rgb[..., channel], np.round(expected))
    assert np.all(mix_stains(np.zeros((3, 2))) == 255)
    np.testing.assert_array_equal(mix_stains(np.zeros((1, 2)), background=240), [[240] * 3])


def test_render_is_the_mix_of_the_concentrations(design):
    x, y = _edge_window(design, 1, 300)
    for ds in (1, 3, 16):
        c = design.concentrations(ds, x // ds, y // ds, 96, 80)
        assert c.shape == (80, 96, 2) and c.dtype == np.float32 and np.all(c >= 0)
        np.testing.assert_array_equal(design.render(ds, x // ds, y // ds, 96, 80),
                                      mix_stains(c, design.stains))


def test_a_nucleus_core_is_pure_haematoxylin(design):
    region = next(r for r in design.regions if r.class_name == "adenocarcinoma")
    x, y, side = _inner_window(region, 256)
    c = design.concentrations(1, x, y, side, side)
    rgb = design.render(1, x, y, side, side)
    i, j = np.unravel_index(np.argmax(c[..., 0]), c.shape[:2])
    assert c[i, j, 0] > 1.0 and c[i, j, 1] == 0.0
    density = -np.log(rgb[i, j].astype(float) / 255)
    assert _angle(density, HE_STAINS[0]) < 0.5
    assert _angle(density, HE_STAINS[1]) > 20


@pytest.mark.parametrize("stains", [None, [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]])
def test_least_squares_recovers_the_concentrations(stains):
    design = make_synthetic_slide((1024, 1024), seed=2, stains=stains)
    truth = design.stains
    np.testing.assert_allclose(np.linalg.norm(truth, axis=1), 1.0)
    if stains is not None:
        assert _angle(truth[1], np.array(stains[1])) < 1e-6
    region = design.regions[0]
    cx, cy = (int(v) for v in region.outline.centre)
    c = design.concentrations(1, cx - 96, cy - 96, 192, 192).reshape(-1, 2).astype(float)
    rgb = design.render(1, cx - 96, cy - 96, 192, 192).reshape(-1, 3).astype(float)
    density = -np.log(np.maximum(rgb, 1) / 255)
    solve = np.linalg.pinv(truth)  # solve: [3, 2]; density = c @ truth
    recovered = density @ solve
    # Rounding to integers moves each channel's density by at most 0.5 / (I - 0.5).
    rounding = 0.5 / (rgb - 0.5)
    bound = rounding @ np.abs(solve) + 1e-6
    assert np.all(np.abs(recovered - c) <= bound)
    assert np.abs(recovered - c).mean() < 0.005


# ---------------------------------------------------------------------------------------------
# Determinism and levels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ds", [1, 3, 4, 16])
def test_a_region_is_the_crop_of_any_larger_region(design, ds):
    """On an island edge of each class; the larger region spans several internal blocks."""
    for index in range(3):
        x, y = _edge_window(design, index, 300 * ds)
        x, y = x // ds, y // ds
        big = design.render(ds, x, y, 300, 290)
        c_big = design.concentrations(ds, x, y, 300, 290)
        for dx, dy, w, h in [(37, 101, 150, 120), (255, 0, 45, 290), (0, 256, 300, 34),
                             (1, 1, 1, 1)]:
            np.testing.assert_array_equal(design.render(ds, x + dx, y + dy, w, h),
                                          big[dy:dy + h, dx:dx + w])
            np.testing.assert_allclose(design.concentrations(ds, x + dx, y + dy, w, h),
                                       c_big[dy:dy + h, dx:dx + w], rtol=0, atol=1e-6)
    assert design.render(ds, x, y, 0, 5).shape == (5, 0, 3)


def test_the_same_design_renders_the_same_pixels(design):
    again = make_synthetic_slide(SIZE, seed=0)
    other = make_synthetic_slide(SIZE, seed=1)
    np.testing.assert_array_equal(again.render(8, 0, 0, 512, 512), design.render(8, 0, 0, 512, 512))
    assert [r.class_name for r in again.regions] == [r.class_name for r in design.regions]
    assert np.abs(other.render(8, 0, 0, 512, 512).astype(int)
                  - design.render(8, 0, 0, 512, 512)).mean() > 5


@pytest.mark.parametrize("ds, tolerance", [(2, 2.0), (4, 1.5), (8, 1.5)])
def test_lower_levels_are_the_area_mean_of_level_0(design, ds, tolerance):
    """A level pixel against the mean of the ds x ds level-0 pixels it covers, on windows that
    straddle an island edge of each class (measured: mean |error| 0.6-1.2 grey levels)."""
    errors = []
    for index in range(3):
        x, y = _edge_window(design, index, 384)
        level0 = design.render(1, x, y, 384, 384).astype(float)
        shrunk = level0.reshape(384 // ds, ds, 384 // ds, ds, 3).mean(axis=(1, 3))
        level = design.render(ds, x // ds, y // ds, 384 // ds, 384 // ds).astype(float)
        errors.append(np.abs(level - shrunk).mean())
        assert np.abs((level - shrunk).mean(axis=(0, 1))).max() < 1.0  # no colour bias
    assert max(errors) < tolerance, errors


def test_coarse_levels_are_block_means_of_downsample_8(design):
    x, y = 96, 64
    fine = design.concentrations(8, 4 * x, 4 * y, 128, 96).astype(float)
    coarse = design.concentrations(32, x, y, 32, 24)
    np.testing.assert_allclose(coarse, fine.reshape(24, 4, 32, 4, 2).mean(axis=(1, 3)),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Tissue, classes and annotations
# ---------------------------------------------------------------------------------------------


def test_tissue_islands_holes_and_glass(design):
    labels = design.class_map(8, 0, 0, 512, 512)
    rgb = design.render(8, 0, 0, 512, 512)
    tissue = labels > 0
    assert 0.15 < tissue.mean() < 0.35
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert sum(len(r.holes) for r in design.regions) >= 1
    filled = scipy.ndimage.binary_fill_holes(tissue)
    assert (filled & ~tissue).sum() > 100  # glass inside tissue: the holes
    # Glass is near white and nearly grey (HSV saturation well under CLAM's threshold of 8),
    # tissue clearly saturated.
    saturation = (rgb.max(-1).astype(float) - rgb.min(-1)) / rgb.max(-1) * 255
    glass = scipy.ndimage.binary_erosion(~tissue, iterations=2)
    assert rgb[glass].min() > 235 and np.percentile(saturation[glass], 99) < 8
    assert np.median(saturation[scipy.ndimage.binary_erosion(tissue, iterations=2)]) > 40


def test_classes_differ_at_high_resolution_but_not_in_mean_colour(design):
    """Level 0: the 99th percentile of haematoxylin (nuclear darkness), the fraction of nuclear
    pixels (H > 0.5) and of clear pixels (lumina: H + E < 0.15) inside each class. Level 3
    (downsample 8): the mean RGB of each class. Measured on this design: adenocarcinoma
    (1.2, 0.08, 0.05), squamous (0.78, 0.064, 0.0), normal (0.84-1.02, 0.020-0.032, 0.0);
    level-3 means within 1 grey level of each other."""
    labels = design.class_map(8, 0, 0, 512, 512)
    rgb = design.render(8, 0, 0, 512, 512).astype(float)
    means, stats = {}, {}
    for k, name in enumerate(design.class_names, 1):
        inner = scipy.ndimage.binary_erosion(labels == k, iterations=2)
        means[name] = rgb[inner].mean(axis=0)
        haematoxylin, total = [], []
        for region in design.regions:
            if region.class_name == name:
                x, y, side = _inner_window(region, 384)
                c = design.concentrations(1, x, y, side, side)
                inside = design.class_map(1, x, y, side, side) == k
                haematoxylin.append(c[..., 0][inside])
                total.append(c.sum(axis=-1)[inside])
        h, t = np.concatenate(haematoxylin), np.concatenate(total)
        stats[name] = np.array([np.percentile(h, 99), (h > 0.5).mean(), (t < 0.15).mean()])
    print({n: m.round(1) for n, m in means.items()}, {n: s.round(3) for n, s in stats.items()})
    names = list(design.class_names)
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(means[names[a]] - means[names[b]]).max() < 4.0
            ratio = (np.maximum(stats[names[a]], stats[names[b]]) + 1e-3) \
                / (np.minimum(stats[names[a]], stats[names[b]]) + 1e-3)
            assert ratio.max() > 2.0, (names[a], names[b], stats)
    assert stats["adenocarcinoma"][2] > 0.03  # lumina
    assert stats["squamous"][1] > 2 * stats["normal"][1]  # dense against sparse nuclei


def test_annotations_match_the_rendered_classes(design):
    annotations = design.annotations()
    assert [a.class_name for a in annotations] == [r.class_name for r in design.regions]
    assert any(a.holes for a in annotations)
    for ds, shape in [(8, (512, 512)), (32, (128, 128))]:
        labels = design.class_map(ds, 0, 0, shape[1], shape[0])
        mask = annotation_mask(annotations, shape, ds, design.class_names)
        differ = labels != mask
        # Only next to a class boundary (OpenCV also fills the pixels the outline crosses).
        boundary = scipy.ndimage.morphological_gradient(labels, size=3) > 0
        assert np.all(boundary[differ]) and differ.sum() < 0.5 * boundary.sum()
        assert differ.mean() < 0.01 * ds / 8
    # A tile-sized window of level 0, by origin.
    x, y = _edge_window(design, 2, 256)
    window = annotation_mask(annotations, (256, 256), 1, design.class_names, origin=(x, y))
    truth = design.class_map(1, x, y, 256, 256)
    assert (window != truth).mean() < 0.01 and len(np.unique(truth)) == 2


def test_design_options_and_refusals():
    two = make_synthetic_slide((1024, 768), seed=3, class_names=("normal", "squamous"),
                               islands=3, hole_probability=0.0)
    assert two.size == (1024, 768) and two.class_names == ("normal", "squamous")
    assert len(two.regions) == 3 and not any(r.holes for r in two.regions)
    assert {r.class_name for r in two.regions} == {"normal", "squamous"}
    for region in two.regions:  # inside the slide
        x0, y0, x1, y1 = region.bounds()
        assert x0 > 0 and y0 > 0 and x1 < 1024 and y1 < 768
    assert set(CLASS_TEXTURES) == {"adenocarcinoma", "squamous", "normal"}
    bad = [
        dict(class_names=("tumour",)), dict(class_names=()), dict(islands=2),
        dict(stains=np.ones((3, 3))), dict(stains=[[1, 1, 1], [1.01, 1, 1]]),
        dict(stains=[[1, 1, -1], [0, 1, 0]]), dict(tissue_fraction=0.7),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            make_synthetic_slide((1024, 1024), **kwargs)
    with pytest.raises(ValueError, match="at least 512"):
        make_synthetic_slide((256, 1024))
    with pytest.raises(ValueError, match="downsample"):
        two.render(0, 0, 0, 4, 4)
    with pytest.raises(ValueError, match="downsample"):
        two.render(1.5, 0, 0, 4, 4)


# ---------------------------------------------------------------------------------------------
# Written slides
# ---------------------------------------------------------------------------------------------


def test_written_slide_opens_in_openslide_and_in_our_reader(design, tmp_path):
    """A 4096^2 JPEG pyramid (levels 1, 2, 4, 8) with its GeoJSON, read back at every level."""
    openslide = pytest.importorskip("openslide")
    from jaxmed.data.slide import open_slide

    path = write_synthetic_slide(tmp_path / "synthetic.tiff", design)
    assert path == tmp_path / "synthetic.tiff"
    annotations = read_annotations(tmp_path / "synthetic.geojson")
    assert len(annotations) == len(design.regions)
    np.testing.assert_allclose(annotations[0].polygon, design.regions[0].polygon)
    assert json.loads((tmp_path / "synthetic.geojson").read_text())["type"] == "FeatureCollection"

    windows = [(1000, 1200, 300, 200), (3900, 3950, 196, 146), (0, 0, 256, 256)]
    reference = openslide.OpenSlide(str(path))
    try:
        assert reference.properties["openslide.vendor"] == "generic-tiff"
        assert reference.level_count == 4
        assert reference.level_dimensions == ((4096, 4096), (2048, 2048), (1024, 1024),
                                              (512, 512))
        assert float(reference.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        for level, ds in enumerate((1, 2, 4, 8)):
            for x, y, w, h in windows:
                w, h = min(w, 4096 // ds - x // ds), min(h, 4096 // ds - y // ds)
                expected = design.render(ds, x // ds, y // ds, w, h).astype(float)
                got = reference.read_region((x // ds * ds, y // ds * ds), level, (w, h))
                got = np.asarray(got.convert("RGB"), float)
                assert np.abs(got - expected).mean() < 4.0, (level, x, y)
    finally:
        reference.close()

    with open_slide(path) as slide:
        assert [lv.size for lv in slide.levels] == [(4096, 4096), (2048, 2048), (1024, 1024),
                                                    (512, 512)]
        assert slide.mpp == pytest.approx((0.25, 0.25))
        for level, ds in enumerate((1, 2, 4, 8)):
            x, y, w, h = 1000, 1200, 300, 200
            expected = design.render(ds, x // ds, y // ds, w, h).astype(float)
            got = slide.read_region((x // ds * ds, y // ds * ds), level, (w, h)).astype(float)
            assert np.abs(got - expected).mean() < 4.0


def test_lossless_slide_holds_exactly_the_rendered_pixels(tmp_path):
    from jaxmed.data.slide import open_slide

    design = make_synthetic_slide((1024, 768), seed=4)
    path = write_synthetic_slide(tmp_path / "exact.tiff", design, compression="zlib",
                                 annotations=False)
    assert not (tmp_path / "exact.geojson").exists()
    with open_slide(path) as slide:
        assert [lv.size for lv in slide.levels] == [(1024, 768), (512, 384)]
        for level, ds in enumerate((1, 2)):
            np.testing.assert_array_equal(slide.read_region((200, 100), level, (300, 260)),
                                          design.render(ds, 200 // ds, 100 // ds, 300, 260))
