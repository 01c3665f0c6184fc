"""Letterbox geometry, resampling against formulas and OpenCV, and the round trip back."""

import time

import cv2
import numpy as np
import pytest
import scipy.ndimage

from jaxmed.data.letterbox import Letterbox, fit_letterbox, letterbox, resize, unletterbox

SHAPES = [(1, 1), (5, 7), (7, 5), (31, 17), (17, 31), (64, 64), (99, 12), (12, 99), (100, 101)]


def _labels(shape, seed=0, classes=4):
    return np.random.default_rng(seed).integers(0, classes, size=shape).astype(np.int32)


def _blobs(shape, seed=0, sigma=12.0):
    """Label map of smooth blobs: smoothed noise cut at its terciles into 0, 1, 2."""
    field = scipy.ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
    return np.digitize(field, np.quantile(field, [1 / 3, 2 / 3])).astype(np.int32)


def _pillow_triangle_weights(n_in, n_out):
    """(n_out, n_in) weights of Pillow's BILINEAR filter, written from its definition: a
    triangle of support `max(1, n_in / n_out)` input pixels around each half-pixel centre."""
    ratio = n_in / n_out
    support = max(ratio, 1.0)
    weights = np.zeros((n_out, n_in))
    for j in range(n_out):
        centre = (j + 0.5) * ratio
        low, high = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        x = np.arange(low, high)
        w = np.clip(1 - np.abs((x + 0.5 - centre) / support), 0, None)
        weights[j, low:high] = w / w.sum()
    return weights


@pytest.mark.parametrize(
    "shape, size, resized, offset",
    [
        ((600, 800), 473, (355, 473), (59, 0)),
        ((800, 600), 473, (473, 355), (0, 59)),
        ((100, 100), 473, (473, 473), (0, 0)),
        ((10, 30), (20, 40), (13, 40), (3, 0)),  # odd remainder of 7 rows: 3 before, 4 after
        ((3, 1000), 100, (1, 100), (49, 0)),  # never thinner than one pixel
    ],
)
def test_geometry(shape, size, resized, offset):
    box = fit_letterbox(shape, size)
    canvas = (size, size) if np.isscalar(size) else size
    scale = min(canvas[0] / shape[0], canvas[1] / shape[1])
    assert box == Letterbox(shape, canvas, resized, offset, scale)


@pytest.mark.parametrize("shape", [(64, 48), (64, 48, 3), (48, 64, 5)])
def test_letterbox_places_and_pads(shape):
    image = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    padded, box = letterbox(image, (100, 90), fill=7)
    assert padded.shape == (100, 90) + shape[2:] and padded.dtype == np.uint8
    (top, left), (h, w) = box.offset, box.resized_shape
    inside = np.zeros((100, 90), bool)
    inside[top:top + h, left:left + w] = True
    assert np.all(padded[~inside] == 7)
    np.testing.assert_array_equal(padded[inside].reshape((h, w) + shape[2:]),
                                  resize(image, (h, w), order=1))


@pytest.mark.parametrize("n_in, n_out", [(5, 13), (13, 5), (7, 7), (10, 3), (3, 10), (473, 128)])
def test_nearest_is_half_pixel_floor(n_in, n_out):
    image = np.arange(n_in * 3).reshape(n_in, 3)
    expected_rows = np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int)
    np.testing.assert_array_equal(resize(image, (n_out, 3), order=0), image[expected_rows])


def test_nearest_matches_opencv_exact():
    image = _labels((37, 23), classes=200).astype(np.uint8)
    for shape in [(80, 50), (11, 9), (37, 60)]:
        reference = cv2.resize(image, shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
        np.testing.assert_array_equal(resize(image, shape, order=0), reference)


@pytest.mark.parametrize("channels", [None, 3, 6])
def test_bilinear_enlarging_matches_opencv(channels):
    shape = (37, 23) if channels is None else (37, 23, channels)
    image = np.random.default_rng(2).random(shape).astype(np.float32)
    out = resize(image, (80, 51), order=1)
    reference = cv2.resize(image, (51, 80), interpolation=cv2.INTER_LINEAR)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize(
    "in_shape, out_shape", [((90, 70), (31, 29)), ((40, 40), (13, 40)), ((12, 30), (30, 12))]
)
def test_bilinear_matches_triangle_filter(in_shape, out_shape):
    image = np.random.default_rng(3).normal(size=in_shape + (2,)).astype(np.float32)
    rows, cols = (_pillow_triangle_weights(i, o) for i, o in zip(in_shape, out_shape))
    expected = np.einsum("ai,bj,ijc->abc", rows, cols, image.astype(np.float64))
    np.testing.assert_allclose(resize(image, out_shape, order=1), expected, atol=1e-5)


def test_bilinear_uint8_close_to_float():
    image = np.random.default_rng(4).integers(0, 256, size=(50, 41, 3), dtype=np.uint8)
    for shape in [(120, 99), (20, 17)]:
        as_uint8 = resize(image, shape, order=1)
        as_float = resize(image.astype(np.float32), shape, order=1)
        assert as_uint8.dtype == np.uint8
        assert np.abs(as_uint8 - as_float).max() <= 1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [128, (101, 131)])
def test_label_round_trip_exact_when_enlarging(shape, size):
    labels = _labels(shape)
    padded, box = letterbox(labels, size, fill=-1, order=0)
    assert box.scale >= 1 and padded.dtype == np.int32
    np.testing.assert_array_equal(unletterbox(padded, box, order=0), labels)


def _ellipses(shape):
    """A kidney-like label map: an ellipse of class 2 holding a smaller ellipse of class 1."""
    y, x = np.mgrid[: shape[0], : shape[1]] / np.array(shape)[:, None, None]
    labels = np.zeros(shape, np.int32)
    labels[((y - 0.5) / 0.3) ** 2 + ((x - 0.45) / 0.35) ** 2 < 1] = 2
    labels[((y - 0.55) / 0.12) ** 2 + ((x - 0.5) / 0.1) ** 2 < 1] = 1
    return labels


@pytest.mark.parametrize("shape", [(900, 700), (700, 901), (500, 500), (1201, 333)])
def test_label_round_trip_when_shrinking_loses_only_boundaries(shape):
    padded, box = letterbox(_ellipses(shape), 473, fill=0, order=0)
    agreement = np.mean(unletterbox(padded, box, order=0) == _ellipses(shape))
    assert agreement >= 0.99, agreement
    # On busier maps the errors grow with the boundary length, but every disagreement stays
    # within one canvas pixel (1 / scale original pixels) of a boundary.
    labels = _blobs(shape, sigma=min(shape) / 25)
    padded, box = letterbox(labels, 473, fill=0, order=0)
    back = unletterbox(padded, box, order=0)
    assert back.shape == shape
    width = 2 * int(np.ceil(1 / box.scale)) + 1
    boundary = scipy.ndimage.morphological_gradient(labels, size=width) > 0
    assert np.all(boundary[back != labels])


@pytest.mark.parametrize("shape", [(60, 40), (41, 77)])
def test_logits_round_trip_then_argmax(shape):
    labels = _blobs(shape, sigma=4.0)
    logits = np.eye(3, dtype=np.float32)[labels] * 5.0  # logits: [H, W, 3]
    padded, box = letterbox(logits, 160, fill=0.0, order=1)
    back = unletterbox(padded, box, order=1)
    assert back.shape == shape + (3,) and back.dtype == np.float32
    assert np.mean(back.argmax(-1) == labels) >= 0.99
    noise = np.random.default_rng(5).normal(size=shape)
    smooth = scipy.ndimage.gaussian_filter(noise, 6.0).astype(np.float32)
    padded, box = letterbox(smooth, 160, order=1)
    assert np.abs(unletterbox(padded, box, order=1) - smooth).max() < 0.05 * np.abs(smooth).max()


def test_bad_arguments():
    image = np.zeros((10, 20), np.uint8)
    padded, box = letterbox(image, 32)
    with pytest.raises(ValueError, match="canvas"):
        unletterbox(padded[:-1], box, order=0)
    with pytest.raises(ValueError, match="order"):
        letterbox(image, 32, order=3)
    with pytest.raises(ValueError, match="uint8 or float"):
        letterbox(image.astype(np.int32), 32, order=1)
    with pytest.raises(ValueError):
        letterbox(np.zeros((2, 3, 4, 5)), 32)


def test_fast_enough_at_473():
    image = np.random.default_rng(6).integers(0, 256, size=(600, 800, 3), dtype=np.uint8)
    letterbox(image, 473)
    start = time.perf_counter()
    for _ in range(10):
        letterbox(image, 473)
    assert (time.perf_counter() - start) / 10 < 0.05
