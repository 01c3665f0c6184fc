"""CAM → mask / boxes against OpenCV, the protocol's own tool (OpenCV is a test-only dependency)."""

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxmed.explain._boxes import cam_boxes, cam_mask, normalize_cams, top_level_components


def _cv2_contours(mask: np.ndarray) -> tuple:
    return cv2.findContours(mask.astype(np.uint8) * 255, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]


def _cv2_boxes(mask: np.ndarray, multi_contour: bool) -> list:
    """The protocol, written out: boundingRect → [x, y, min(x + w, W - 1), min(y + h, H - 1)]."""
    height, width = mask.shape
    contours = _cv2_contours(mask)
    if not contours:
        return [(0, 0, 0, 0)]
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
    return sorted(boxes)


def _mask_cam(mask: np.ndarray) -> np.ndarray:
    """A CAM whose mask at τ = 0.5 is `mask` (and which is not constant)."""
    cam = mask.astype(float)
    cam.flat[0] = cam.flat[0] if mask.any() and not mask.all() else 0.25
    return cam


def _check_mask(mask: np.ndarray) -> None:
    cam = _mask_cam(mask)
    binary = cam_mask(cam, 0.5)
    for multi in (False, True):
        ours = sorted(map(tuple, cam_boxes(cam, 0.5, multi_contour=multi).tolist()))
        assert ours == _cv2_boxes(binary, multi), (mask.astype(int), multi)


CRAFTED = {
    "diagonal pixels": ["1000", "0100", "0010", "0001"],
    "anti-diagonal and a pixel": ["00010", "00100", "01000", "00000", "00001"],
    "ring with a hole": ["00000", "01110", "01010", "01110", "00000"],
    "diamond ring (hole and outer border of equal area)": ["00100", "01010", "00100"],
    "nested rings": [
        "111111111",
        "100000001",
        "101111101",
        "101000101",
        "101010101",
        "101000101",
        "101111101",
        "100000001",
        "111111111",
    ],
    "hole touching the edge is no hole": ["1111", "1001", "1000", "1111"],
    "holes split diagonally": ["11111", "10101", "11011", "10101", "11111"],
    "hole reaching out diagonally": ["1111", "1001", "1110", "0000"],
    "single pixels (ties of area 0)": ["10001", "00000", "00100", "00000", "10001"],
    "thin lines": ["1111100", "0000000", "1000001", "1000010", "1000100", "0001000"],
    "equal 2x2 blocks": ["110011", "110011", "000000", "011000", "011000"],
    "equal areas, different shapes": ["1100100", "1100110", "0000111", "0000000", "1110000"],
    "full image": ["111", "111"],
    "one row": ["1101011"],
    "one column": ["1", "0", "1", "1"],
}


@pytest.mark.parametrize("rows", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_masks_match_opencv(rows):
    mask = np.array([[c == "1" for c in r] for r in rows])
    _check_mask(mask)


def test_random_masks_match_opencv():
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = rng.integers(1, 16, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        if rng.random() < 0.5:  # blobs with holes as well as speckle
            mask = ndimage.binary_opening(mask) ^ (rng.random((h, w)) < 0.1)
        _check_mask(mask)


def test_boxes_at_many_thresholds_match_opencv():
    rng = np.random.default_rng(1)
    for _ in range(20):
        smooth = ndimage.gaussian_filter(rng.normal(size=(24, 20)), 1.5)
        cam = smooth + 0.1 * rng.normal(size=(24, 20))
        u = ((cam - cam.min()) / (cam.max() - cam.min()) * 255).astype(np.uint8)
        for tau in rng.uniform(0, 1, 8):
            binary = u > int(tau * 255)
            for multi in (False, True):
                ours = sorted(map(tuple, cam_boxes(cam, tau, multi_contour=multi).tolist()))
                assert ours == _cv2_boxes(binary, multi)


def test_contour_area_formula_matches_opencv():
    """2 · contourArea of each top-level outer border = 2·n4 + n3 of the component, holes filled."""
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(300):
        h, w = rng.integers(2, 20, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.3, 0.8)
        labels, twice_area, first_pixel = top_level_components(mask)
        contours, hierarchy = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE
        )
        for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
            if parent != -1:
                continue  # holes and what lies inside them
            x, y = contour[0, 0]
            k = labels[y, x] - 1
            assert twice_area[k] == 2 * cv2.contourArea(contour)
            assert first_pixel[k] == np.flatnonzero(labels.ravel() == k + 1)[0]
            checked += 1
        top_level = 0 if hierarchy is None else int((hierarchy[0, :, 3] == -1).sum())
        assert labels.max() == top_level
    assert checked > 1000


def test_cam_mask_is_strict_on_the_truncated_map():
    cam = np.array([[0.0, 0.2, 0.5], [0.50196, 0.9, 1.0]])
    u = (cam * 255).astype(np.uint8)  # already in [0, 1] with min 0, max 1: unchanged
    for tau in (0.0, 0.2, 0.5, 0.501, 0.9, 0.999):
        np.testing.assert_array_equal(cam_mask(cam, tau), u > int(tau * 255))
    assert cam_mask(cam, 0.999).sum() == 1  # only the max pixel (255) is above int(0.999 · 255)


def test_no_foreground_gives_the_empty_box():
    for cam in (np.zeros((4, 5)), np.full((4, 5), 3.0), np.where(np.eye(4, 5) > 0, np.nan, 1.0)):
        for multi in (False, True):
            np.testing.assert_array_equal(cam_boxes(cam, 0.3, multi_contour=multi), [[0, 0, 0, 0]])
    cam = np.zeros((4, 5))
    cam[1, 2] = 1.0
    np.testing.assert_array_equal(cam_boxes(cam, 0.5), [[2, 1, 3, 2]])  # x + w, y + h (not - 1)
    cam = np.zeros((4, 5))
    cam[3, 4] = 1.0
    np.testing.assert_array_equal(cam_boxes(cam, 0.5), [[4, 3, 4, 3]])  # clipped to W - 1, H - 1


def test_normalize_cams_formula():
    rng = np.random.default_rng(3)
    cams = rng.normal(size=(3, 5, 6)).astype(np.float32)
    expected = []
    for cam in cams:
        m = cam.astype(np.float64)
        m = m - m.min()
        expected.append(m / m.max())
    out = normalize_cams(cams)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, np.stack(expected))  # bit for bit: same operations
    np.testing.assert_array_equal(normalize_cams(cams[1]), expected[1])
    np.testing.assert_array_equal(normalize_cams(jnp.asarray(cams)), out)
    np.testing.assert_array_equal(normalize_cams(out), out)  # a normalised map is left as is
    assert cams.dtype == np.float32 and not np.array_equal(cams, out)  # input untouched


def test_normalize_cams_degenerate_maps_become_zero():
    cams = np.ones((4, 3, 3))
    cams[1] = np.arange(9).reshape(3, 3)
    cams[2, 0, 0] = np.nan
    cams[3, 1, 1] = np.inf
    out = normalize_cams(cams)
    np.testing.assert_array_equal(out[[0, 2, 3]], 0)
    np.testing.assert_array_equal(out[1], np.arange(9).reshape(3, 3) / 8)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="shape"):
        normalize_cams(np.zeros(5))
    with pytest.raises(ValueError, match="one CAM"):
        cam_boxes(np.zeros((2, 3, 3)), 0.5)
