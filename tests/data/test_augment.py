"""Augmentation: reproducible per (seed, step, index), aligned image/mask geometry against
OpenCV, intensity against its formula, label set preserved."""

import cv2
import numpy as np
import pytest

from jaxmed.data.augment import augment_pair, step_rng

OFF = dict(flip=False, max_rotation=0.0, scale_range=(1.0, 1.0), brightness=0.0, contrast=0.0,
           gamma=0.0)


def _pair(shape=(40, 52), channels=3, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=shape + ((channels,) if channels else ()), dtype=np.uint8)
    mask = rng.integers(0, 3, size=shape).astype(np.int32)
    return image, mask


def _square(shape=(61, 80)):
    mask = np.zeros(shape, np.int32)
    mask[18:44, 25:55] = 1
    image = np.where(mask[..., None] == 1, 230, 20).astype(np.uint8).repeat(3, axis=-1)
    return image, mask


def _drawn(seed, max_rotation, scale_range):
    """The geometry `augment_pair` draws from `step_rng(seed, 0, 0)`, in its documented order."""
    rng = step_rng(seed, 0, 0)
    flipped = rng.random() < 0.5
    return flipped, rng.uniform(-max_rotation, max_rotation), rng.uniform(*scale_range)


def test_same_seed_step_index_same_augmentation():
    image, mask = _pair()
    a = augment_pair(image, mask, step_rng(7, 120, 3))
    b = augment_pair(image, mask, step_rng(7, 120, 3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for other in (step_rng(7, 121, 3), step_rng(7, 120, 4), step_rng(8, 120, 3)):
        assert not np.array_equal(augment_pair(image, mask, other)[0], a[0])
    with pytest.raises(ValueError):
        step_rng(0, -1, 0)


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_identity_when_everything_is_off(channels):
    image, mask = _pair(channels=channels)
    out_image, out_mask = augment_pair(image, mask, step_rng(0, 0, 0), **OFF)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)
    assert out_image.dtype == np.uint8 and out_mask.dtype == np.int32
    assert out_image is not image and out_mask is not mask


def test_flip_flips_both():
    image, mask = _pair()
    flipped = []
    for seed in range(20):
        out_image, out_mask = augment_pair(image, mask, step_rng(seed, 0, 0),
                                           **{**OFF, "flip": True})
        flipped.append(not np.array_equal(out_mask, mask))
        expected = (image[:, ::-1], mask[:, ::-1]) if flipped[-1] else (image, mask)
        np.testing.assert_array_equal(out_image, expected[0])
        np.testing.assert_array_equal(out_mask, expected[1])
        assert flipped[-1] == _drawn(seed, 0, (1, 1))[0]
    assert 3 < sum(flipped) < 17


def test_labels_stay_in_the_label_set():
    image, mask = _pair(shape=(30, 30))
    for seed in range(30):
        _, out = augment_pair(image, mask, step_rng(seed, 1, 2), max_rotation=45,
                              scale_range=(0.6, 1.4), mask_fill=9)
        assert set(np.unique(out)) <= {0, 1, 2, 9}


@pytest.mark.parametrize("seed", range(6))
def test_rotated_mask_matches_rotated_bright_region(seed):
    image, mask = _square()
    out_image, out_mask = augment_pair(image, mask, step_rng(seed, 0, 0), max_rotation=40,
                                       scale_range=(0.7, 1.3), brightness=0, contrast=0, gamma=0)
    bright = out_image[..., 0] > 180  # between the fill (128) and the square (230)
    disagree = bright != (out_mask == 1)
    assert disagree.mean() < 0.01
    # Disagreements only on the square's edge: every one has both labels within one pixel.
    padded = np.pad(out_mask, 1)
    neighbours = np.stack([padded[1 + dy: 1 + dy + mask.shape[0], 1 + dx: 1 + dx + mask.shape[1]]
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    on_edge = neighbours.min(0) != neighbours.max(0)
    assert np.all(on_edge[disagree])


@pytest.mark.parametrize("seed", range(4))
def test_geometry_matches_opencv(seed):
    image, mask = _square()
    mask[30:, 40:] += 2  # more than one edge direction
    kwargs = dict(max_rotation=30.0, scale_range=(0.8, 1.25))
    out_image, out_mask = augment_pair(image, mask, step_rng(seed, 0, 0), brightness=0,
                                       contrast=0, gamma=0, fill=128, mask_fill=0, **kwargs)
    flipped, angle, scale = _drawn(seed, **kwargs)
    height, width = mask.shape
    # Our positive angle turns the picture clockwise on screen; OpenCV's turns it anticlockwise.
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), -angle, scale)
    source_image, source_mask = (image[:, ::-1], mask[:, ::-1]) if flipped else (image, mask)
    border = dict(borderMode=cv2.BORDER_CONSTANT)
    expected_mask = cv2.warpAffine(source_mask.astype(np.float32), matrix, (width, height),
                                   flags=cv2.INTER_NEAREST, borderValue=0, **border)
    expected_image = cv2.warpAffine(np.ascontiguousarray(source_image), matrix, (width, height),
                                    flags=cv2.INTER_LINEAR, borderValue=(128,) * 3, **border)
    # Ties at exactly half a pixel may round apart; OpenCV uses 1/32-pixel weights.
    assert np.mean(out_mask == expected_mask) > 0.995
    assert np.abs(out_image.astype(int) - expected_image).max() <= 3


def test_intensity_formula_and_mask_untouched():
    image, mask = _pair()
    ranges = dict(brightness=0.2, contrast=0.3, gamma=0.4)
    out_image, out_mask = augment_pair(image, mask, step_rng(5, 0, 0), **{**OFF, **ranges})
    rng = step_rng(5, 0, 0)
    rng.random(), rng.uniform(0, 0), rng.uniform(1, 1)  # flip, angle, scale: drawn even when off
    b, c, g = (rng.uniform(-r, r) for r in ranges.values())
    x = image / 255.0
    expected = np.clip(x.mean() + (1 + c) * (x - x.mean()) + b, 0, 1) ** np.exp(g) * 255
    assert np.abs(out_image - expected).max() <= 0.51
    np.testing.assert_array_equal(out_mask, mask)


def test_turning_one_transform_off_keeps_the_others():
    image, mask = _pair()
    with_jitter = augment_pair(image, mask, step_rng(3, 0, 0), max_rotation=20)
    without = augment_pair(image, mask, step_rng(3, 0, 0), max_rotation=20, brightness=0,
                           contrast=0, gamma=0)
    np.testing.assert_array_equal(with_jitter[1], without[1])


def test_bad_inputs():
    image, mask = _pair()
    with pytest.raises(ValueError):
        augment_pair(image.astype(np.float32), mask, step_rng(0, 0, 0))
    with pytest.raises(ValueError):
        augment_pair(image, mask[:-1], step_rng(0, 0, 0))
