"""Tissue mask: thresholds, area filters (pixels and um^2), contours, level choice."""

import dataclasses

import cv2
import numpy as np
import pytest

from jaxmed.pathology.tissue import TissueMask, mask_from_rgb, tissue_mask

BACKGROUND = (236, 236, 240)  # glass: saturation ~4
STAIN = (190, 110, 160)  # H&E-like pink: saturation ~107


def painted_tissue(height=600, width=800, seed=0):
    """A painted low-resolution slide and its truth.

    An ellipse of tissue with a round hole (radius 40 px, ~5000 px^2), a rectangle, and a
    speck (radius 5, ~80 px^2), on noisy glass.

    **Returns:** `(rgb, truth)`: uint8 `(height, width, 3)` and bool `(height, width)`.
    """
    truth = np.zeros((height, width), np.uint8)
    cv2.ellipse(truth, (250, 300), (180, 140), 0, 0, 360, 1, -1)
    cv2.circle(truth, (250, 300), 40, 0, -1)
    cv2.rectangle(truth, (500, 100), (700, 300), 1, -1)
    cv2.circle(truth, (700, 500), 5, 1, -1)
    truth = truth.astype(bool)
    rng = np.random.default_rng(seed)
    rgb = np.where(truth[..., None], STAIN, BACKGROUND).astype(np.float64)
    rgb += rng.normal(0, np.where(truth, 12.0, 2.0)[..., None], rgb.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), truth


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@dataclasses.dataclass(frozen=True)
class FakeLevel:
    size: tuple[int, int]
    downsample: float


class FakeSlide:
    """A slide stand-in: level 0 is `downsample` times the given low level, which alone can be
    read; records which levels were read."""

    def __init__(self, low_rgb, *, downsample=8, mpp=(0.25, 0.25), path="painted.tiff"):
        height, width = low_rgb.shape[:2]
        self.path = path
        self.mpp = mpp
        self.low = low_rgb
        self.levels = (FakeLevel((width * downsample, height * downsample), 1.0),
                       FakeLevel((width * downsample // 2, height * downsample // 2), 2.0),
                       FakeLevel((width, height), float(downsample)))
        self.dimensions = self.levels[0].size
        self.read = []

    def level_for_pixel_budget(self, max_pixels):
        for i, level in enumerate(self.levels):
            if level.size[0] * level.size[1] <= max_pixels:
                return i
        return len(self.levels) - 1

    def read_level(self, level, max_pixels=64_000_000):
        self.read.append(level)
        if level != len(self.levels) - 1:
            raise AssertionError(f"level {level} was read")
        return self.low.copy()


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------

def test_otsu_finds_the_painted_tissue():
    rgb, truth = painted_tissue()
    mask, contours, holes = mask_from_rgb(rgb)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert iou(mask, truth) > 0.95
    # the ellipse, the rectangle and the speck; the ellipse's hole
    assert len(contours) == 3 and len(holes) == 1
    assert all(c.dtype == np.int32 and c.ndim == 2 and c.shape[1] == 2 for c in contours)


def test_fixed_threshold_between_glass_and_stain_agrees_with_otsu():
    rgb, truth = painted_tissue()
    otsu, _, _ = mask_from_rgb(rgb)
    fixed, _, _ = mask_from_rgb(rgb, threshold=30)
    assert iou(fixed, truth) > 0.95
    assert iou(fixed, otsu) > 0.98


def test_fixed_threshold_above_the_stain_finds_nothing():
    rgb, _ = painted_tissue()
    mask, contours, holes = mask_from_rgb(rgb, threshold=200)
    assert not mask.any() and contours == [] and holes == []


def test_threshold_is_strictly_above():
    rgb = np.full((40, 40, 3), BACKGROUND, np.uint8)
    rgb[10:30, 10:30] = (255, 0, 0)  # saturation 255
    assert not mask_from_rgb(rgb, threshold=255, median=1, close=0)[0].any()
    assert mask_from_rgb(rgb, threshold=254, median=1, close=0)[0].sum() == 400


def test_otsu_on_blank_glass_gives_an_empty_mask():
    rng = np.random.default_rng(1)
    glass = np.clip(rng.normal(BACKGROUND, 2.0, (300, 300, 3)), 0, 255).astype(np.uint8)
    mask, contours, _ = mask_from_rgb(glass)
    assert not mask.any() and contours == []


def test_closing_bridges_a_thin_gap():
    rgb = np.full((60, 80, 3), BACKGROUND, np.uint8)
    rgb[10:50, 10:39] = STAIN
    rgb[10:50, 41:70] = STAIN  # a 2-pixel crack
    assert len(mask_from_rgb(rgb, median=1, close=0)[1]) == 2
    assert len(mask_from_rgb(rgb, median=1, close=4)[1]) == 1


# ---------------------------------------------------------------------------------------------
# Area filters
# ---------------------------------------------------------------------------------------------

def test_holes_kept_or_filled_by_area():
    rgb, truth = painted_tissue()
    centre = (300, 250)  # (row, column) of the hole
    kept, _, holes = mask_from_rgb(rgb, min_hole_area=3000)  # the hole has ~5000 px
    assert not kept[centre] and len(holes) == 1
    filled, _, holes = mask_from_rgb(rgb, min_hole_area=8000)
    assert filled[centre] and holes == []
    assert filled[230:370, 180:320].all()


def test_specks_dropped_by_area_in_pixels():
    rgb, truth = painted_tissue()
    kept, contours, _ = mask_from_rgb(rgb, min_tissue_area=40)  # the speck has ~80 px
    assert kept[500, 700] and len(contours) == 3
    dropped, contours, _ = mask_from_rgb(rgb, min_tissue_area=200)
    assert not dropped[495:506, 695:706].any() and len(contours) == 2
    assert iou(dropped, truth & ~_disc(truth.shape, (700, 500), 8)) > 0.95


def test_areas_scale_with_the_pixel_area():
    """The same speck (~80 px) against a 200 um^2 minimum: dropped at 1 um^2 per pixel, kept
    at 4 um^2 per pixel (~320 um^2)."""
    rgb, _ = painted_tissue()
    fine, _, _ = mask_from_rgb(rgb, min_tissue_area=200, pixel_area=1.0)
    coarse, _, _ = mask_from_rgb(rgb, min_tissue_area=200, pixel_area=4.0)
    assert not fine[500, 700] and coarse[500, 700]


def test_a_piece_is_measured_without_its_holes():
    """A ring of 36^2 - 30^2 = 396 pixels around a 900-pixel hole: a 500-pixel minimum drops
    it although its outline encloses 1296 pixels."""
    rgb = np.full((60, 60, 3), BACKGROUND, np.uint8)
    rgb[10:46, 10:46] = STAIN
    rgb[13:43, 13:43] = BACKGROUND
    options = dict(median=1, close=0)
    assert mask_from_rgb(rgb, min_tissue_area=390, **options)[0].sum() == 396
    assert not mask_from_rgb(rgb, min_tissue_area=400, **options)[0].any()
    _, _, holes = mask_from_rgb(rgb, min_hole_area=900, **options)
    assert len(holes) == 1
    filled, _, holes = mask_from_rgb(rgb, min_hole_area=901, **options)
    assert holes == [] and filled.sum() == 36 * 36


def test_background_touching_the_border_is_not_a_hole():
    rgb = np.full((50, 50, 3), BACKGROUND, np.uint8)
    rgb[:, 20:30] = STAIN  # a band across the image: glass on both sides reaches the border
    mask, _, holes = mask_from_rgb(rgb, median=1, close=0, min_hole_area=10**6)
    assert holes == [] and mask.sum() == 500


def _disc(shape, centre, radius):
    disc = np.zeros(shape, np.uint8)
    cv2.circle(disc, centre, radius, 1, -1)
    return disc.astype(bool)


# ---------------------------------------------------------------------------------------------
# Slides
# ---------------------------------------------------------------------------------------------

def test_tissue_mask_reads_only_the_level_within_the_budget():
    rgb, truth = painted_tissue()
    slide = FakeSlide(rgb, downsample=8)
    found = tissue_mask(slide)  # level 0: 30.7 Mpx, level 1: 7.7 Mpx, level 2: 0.48 Mpx
    assert isinstance(found, TissueMask)
    assert slide.read == [2] and found.level == 2 and found.downsample == 8.0
    assert iou(found.mask, truth) > 0.95
    with pytest.raises(AssertionError, match="level 1 was read"):
        tissue_mask(slide, max_pixels=8_000_000)
    with pytest.raises(AssertionError, match="level 0 was read"):
        tissue_mask(slide, level=0)
    with pytest.raises(ValueError, match="level 3 does not exist"):
        tissue_mask(slide, level=3)


def test_contours_are_stored_in_level0_coordinates():
    rgb, _ = painted_tissue()
    found = tissue_mask(FakeSlide(rgb, downsample=8))
    assert len(found.contours) == len(found.level_contours) >= 1
    for level0, level in zip(found.contours + found.holes,
                             found.level_contours + found.level_holes, strict=True):
        np.testing.assert_allclose(level0, (level + 0.5) * 8)
    assert found.hole_parents.tolist() == [_index_of_ellipse(found.level_contours)]
    assert 10 < found.threshold < 100  # between glass (~4) and stain (~107)


def _index_of_ellipse(contours):
    return int(np.argmax([cv2.contourArea(c) for c in contours]))


def test_area_minimums_are_in_um2_when_the_slide_has_an_mpp():
    """The speck: ~80 mask pixels of 8 x 8 level-0 pixels. At 0.25 um/px a mask pixel is 4 um^2
    (speck ~320 um^2); at 1 um/px it is 64 um^2 (~5000 um^2). A 1000 um^2 minimum drops it on
    the first slide only."""
    rgb, _ = painted_tissue()
    areas = dict(min_tissue_area_um2=1000, min_hole_area_um2=0)
    fine = tissue_mask(FakeSlide(rgb, mpp=(0.25, 0.25)), **areas)
    coarse = tissue_mask(FakeSlide(rgb, mpp=(1.0, 1.0)), **areas)
    assert not fine.mask[500, 700] and coarse.mask[500, 700]
    assert len(fine.contours) == 2 and len(coarse.contours) == 3


def test_area_minimums_are_in_level0_pixels_without_an_mpp():
    """The speck is ~80 x 64 ~ 5000 level-0 pixels; the um^2 minimums are ignored."""
    rgb, _ = painted_tissue()
    slide = FakeSlide(rgb, mpp=None)
    kept = tissue_mask(slide, min_tissue_area_px=2000, min_tissue_area_um2=10**9)
    dropped = tissue_mask(slide, min_tissue_area_px=10_000, min_tissue_area_um2=0)
    assert kept.mask[500, 700] and not dropped.mask[500, 700]


def test_default_minimums_drop_debris_and_keep_tissue_at_40x():
    """At 0.25 um/px and downsample 8 (4 um^2 per mask pixel): the speck (~320 um^2) is
    debris; the rectangle (~160 000 um^2) and the ellipse stay, with the hole (~20 000 um^2)."""
    rgb, _ = painted_tissue()
    found = tissue_mask(FakeSlide(rgb))
    assert len(found.contours) == 2 and len(found.holes) == 1
    assert 0.1 < found.tissue_fraction < 0.4


@pytest.mark.parametrize("options, message", [
    (dict(threshold="mean"), "threshold must be 'otsu'"),
    (dict(threshold=256), "threshold must be 'otsu'"),
    (dict(threshold=8.5), "threshold must be 'otsu'"),
    (dict(median=4), "median must be an odd"),
    (dict(median=0), "median must be an odd"),
    (dict(close=-1), "close must be"),
    (dict(min_tissue_area=-1), "area minimums"),
    (dict(pixel_area=0), "pixel_area must be positive"),
])
def test_bad_options_are_refused(options, message):
    rgb, _ = painted_tissue(60, 80)
    with pytest.raises(ValueError, match=message):
        mask_from_rgb(rgb, **options)


@pytest.mark.parametrize("array", [
    np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
    np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8),
])
def test_bad_images_are_refused(array):
    with pytest.raises(ValueError, match="RGB image"):
        mask_from_rgb(array)
