"""Kidney-ultrasound phantoms: layout, determinism, anatomy of the masks, echo statistics."""

import numpy as np
import pytest
import scipy.ndimage

from jaxmed.data import synthetic_kidney as sk
from jaxmed.data.images import read_image


@pytest.fixture(scope="module")
def phantoms():
    return sk.make_kidney_phantoms(120, size=96, seed=3)


def test_layout(phantoms):
    images, masks = phantoms
    assert images.shape == (120, 96, 96, 3) and images.dtype == np.uint8
    assert masks.shape == (120, 96, 96) and masks.dtype == np.int32
    assert set(np.unique(masks)) == {sk.OUTSIDE, sk.FLUID, sk.TISSUE}
    np.testing.assert_array_equal(images[..., 1], images[..., 0])
    np.testing.assert_array_equal(images[..., 2], images[..., 0])


def test_non_square_and_too_small():
    images, masks = sk.make_kidney_phantoms(2, size=(64, 100), seed=0)
    assert images.shape == (2, 64, 100, 3) and masks.shape == (2, 64, 100)
    assert np.all((masks == sk.TISSUE).any(axis=(1, 2)))
    with pytest.raises(ValueError):
        sk.make_kidney_phantoms(1, size=16)


def test_deterministic_and_prefix_stable():
    a_images, a_masks = sk.make_kidney_phantoms(6, size=64, seed=11)
    b_images, b_masks = sk.make_kidney_phantoms(3, size=64, seed=11)
    np.testing.assert_array_equal(a_images[:3], b_images)
    np.testing.assert_array_equal(a_masks[:3], b_masks)
    c_images, _ = sk.make_kidney_phantoms(3, size=64, seed=12)
    assert not np.array_equal(c_images, b_images)


def test_fluid_lies_inside_kidney_tissue(phantoms):
    _, masks = phantoms
    for mask in masks:
        assert (mask == sk.TISSUE).any()
        # A rim of tissue: fluid grown by one pixel (8-neighbourhood) never reaches outside.
        grown = scipy.ndimage.binary_dilation(mask == sk.FLUID, structure=np.ones((3, 3)))
        assert not np.any(grown & (mask == sk.OUTSIDE))
        # One kidney: the kidney (tissue + fluid) is one connected region.
        assert scipy.ndimage.label(mask > 0)[1] == 1


def test_fluid_grades_vary(phantoms):
    _, masks = phantoms
    fluid_fraction = (masks == sk.FLUID).sum(axis=(1, 2)) / (masks > 0).sum(axis=(1, 2))
    no_fluid = np.mean(fluid_fraction == 0)
    assert 0.03 < no_fluid < 0.25  # 12 % by design
    present = fluid_fraction[fluid_fraction > 0]
    assert present.min() < 0.05 and present.max() > 0.25  # mild to severe
    kidney_fraction = (masks > 0).mean(axis=(1, 2))
    assert 0.03 < kidney_fraction.min() and kidney_fraction.max() < 0.35


def test_outside_the_sector_is_black_and_unlabelled(phantoms):
    images, masks = phantoms
    # The apex is above the image and the sector at most 36 degrees wide: the top corners
    # are outside every field of view.
    assert np.all(images[:, :4, :4] == 0) and np.all(images[:, :4, -4:] == 0)
    assert np.all(masks[:, :4, :4] == 0) and np.all(masks[:, :4, -4:] == 0)


def test_echo_levels(phantoms):
    images, masks = phantoms
    grey = images[..., 0].astype(np.float64)
    fluid_means, tissue_means, surround_means = [], [], []
    for image, mask in zip(grey, masks):
        surround = (scipy.ndimage.binary_dilation(mask > 0, iterations=8)
                    & ~scipy.ndimage.binary_dilation(mask > 0, iterations=3))
        if (mask == sk.FLUID).sum() > 30:
            fluid_means.append(image[mask == sk.FLUID].mean())
        tissue_means.append(image[mask == sk.TISSUE].mean())
        surround_means.append(image[surround].mean())
    # Fluid is anechoic, far darker than the kidney tissue and the tissue around it.
    assert np.median(fluid_means) < 0.35 * np.median(tissue_means)
    assert np.median(fluid_means) < 0.35 * np.median(surround_means)


def test_speckle_is_rayleigh():
    speckle = sk._speckle(np.random.default_rng(0), (256, 256)).astype(np.float64)
    assert np.mean(speckle ** 2) == pytest.approx(1.0, abs=1e-4)
    # Rayleigh with E[s^2] = 1: mean sqrt(pi) / 2, P(s > t) = exp(-t^2).
    assert speckle.mean() == pytest.approx(np.sqrt(np.pi) / 2, abs=0.01)
    for t in (0.5, 1.0, 1.5, 2.0):
        assert np.mean(speckle > t) == pytest.approx(np.exp(-t * t), abs=0.012)


def test_speckle_is_visible_in_homogeneous_tissue(phantoms):
    images, masks = phantoms
    grey = images[..., 0].astype(np.float64)
    # A 9x9 patch of tissue below the kidney's centre-line: local variation well above 8-bit
    # rounding, as speckle gives (a smooth image would have a tiny local standard deviation).
    local_mean = scipy.ndimage.uniform_filter(grey, (1, 9, 9))
    local_square = scipy.ndimage.uniform_filter(grey ** 2, (1, 9, 9))
    local_std = np.sqrt(np.maximum(local_square - local_mean ** 2, 0))
    in_tissue = scipy.ndimage.binary_erosion(masks == sk.TISSUE, structure=np.ones((1, 9, 9)))
    assert np.median(local_std[in_tissue]) > 8


def test_write_segmentation_folder_round_trip(tmp_path):
    images, masks = sk.make_kidney_phantoms(3, size=48, seed=1)
    sk.write_segmentation_folder(images, masks, tmp_path / "data")
    names = sorted(p.name for p in (tmp_path / "data" / "images").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
    for i, name in enumerate(names):
        np.testing.assert_array_equal(read_image(tmp_path / "data" / "images" / name), images[i])
        mask = read_image(tmp_path / "data" / "masks" / name, mode="label")
        np.testing.assert_array_equal(mask, masks[i])
    with pytest.raises(ValueError):
        sk.write_segmentation_folder(images, masks[:2], tmp_path / "other")
