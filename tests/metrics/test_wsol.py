"""MaxBoxAcc / MaxBoxAccV2 against the per-image, per-threshold OpenCV reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from benchmarks._wsol_reference import reference_max_box_acc
from jaxmed.metrics._wsol import BoxAccumulator, MaxBoxAcc, box_hits, max_box_acc

# Many δ: the curve then records, per τ, how many images reach each IoU band, so a wrong box
# for one image at one cut shows up even when it does not change the accuracy.
FINE_DELTAS = tuple(np.round(np.arange(0.05, 1.0001, 0.05), 2))
V1 = dict(multi_contour=False)
V2 = dict(multi_contour=True)


def _assert_same(cams, gt, **kwargs):
    ours = max_box_acc(cams, gt, **kwargs)
    ref = reference_max_box_acc(cams, gt, **kwargs)
    np.testing.assert_array_equal(ours.curve, ref.curve)
    assert ours.accuracy == ref.accuracy
    assert ours.best_threshold == ref.best_threshold
    np.testing.assert_array_equal(ours.thresholds, ref.thresholds)
    return ours


def _cam(rows: list[str]) -> np.ndarray:
    return np.array([[int(c) for c in r] for r in rows], float)


# Level maps (digits): components appear, nest and merge as the threshold falls.
CRAFTED = {
    "diagonal pixels": ["9000", "0800", "0090", "0007"],
    "ring with a hole and a peak": ["000000", "055550", "050050", "050950", "055550", "000000"],
    "diamond ring": ["00000", "00500", "05050", "00500", "00000"],
    "nested rings": ["3333333", "3000003", "3055503", "3050503", "3055503", "3000003", "3333333"],
    "holes split diagonally": ["77777", "70707", "77077", "70707", "77777"],
    "single pixels, equal levels": ["50005", "00000", "00500", "00000", "50005"],
    "thin lines": ["6666600", "0000000", "6000007", "6000070", "6000700", "0007000"],
    "equal blocks": ["440044", "440044", "000000", "044000", "044000"],
    "equal areas, different shapes": ["4400400", "4400440", "0000444", "0000000", "4440000"],
    "plateaus and a merge": ["2222222", "2555252", "2525552", "2222222"],
    "touching the edges": ["9900", "9000", "0003", "0033"],
}


@pytest.mark.parametrize("rows", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_maps_match_reference(rows):
    cam = _cam(rows)
    h, w = cam.shape
    # Ground truth: each single pixel and a few boxes, so every estimated box is scored.
    gts = [np.array([[x, y, x, y]]) for y in range(h) for x in range(w)]
    gts += [np.array([[0, 0, w - 1, h - 1]]), np.array([[1, 1, w - 2, h - 2], [0, 0, 1, 1]])]
    cams = np.repeat(cam[None], len(gts), axis=0)
    for kwargs in (V1, V2):  # τ step 0.01 still crosses every level of a digit map
        _assert_same(cams, gts, iou_thresholds=FINE_DELTAS, cam_curve_interval=0.01, **kwargs)


def _random_cams(rng, n, size, noise):
    cams = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), (0, size / 12, size / 12))
    cams += noise * cams.std() * rng.normal(size=cams.shape)
    gts = []
    for _ in range(n):
        boxes = []
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.integers(0, size, 2)
            boxes.append([x0, y0, rng.integers(x0, size), rng.integers(y0, size)])
        gts.append(np.array(boxes))
    return cams, gts


def test_random_maps_match_reference():
    rng = np.random.default_rng(0)
    smooth, gt_smooth = _random_cams(rng, 25, 32, noise=0.02)
    noisy, gt_noisy = _random_cams(rng, 25, 32, noise=0.5)
    cams, gts = np.concatenate([smooth, noisy]), gt_smooth + gt_noisy
    for kwargs in (V1, V2):
        _assert_same(cams, gts, iou_thresholds=FINE_DELTAS, **kwargs)


def test_larger_and_quantised_maps_match_reference():
    rng = np.random.default_rng(1)
    cams, gts = _random_cams(rng, 4, 64, noise=0.2)
    quantised = np.round(cams * 3 / cams.std())  # few levels: plateaus, ties, thin structures
    for kwargs in (V1, V2):
        _assert_same(
            np.concatenate([cams, quantised]), gts + gts, iou_thresholds=FINE_DELTAS, **kwargs
        )


def test_non_square_maps_and_coarse_interval_match_reference():
    rng = np.random.default_rng(2)
    smooth = ndimage.gaussian_filter(rng.normal(size=(6, 20, 45)), (0, 2, 3))
    cams = smooth + 0.05 * rng.normal(size=(6, 20, 45))
    gts = [
        np.array([[3, 2, 30, 15]]),
        np.array([[0, 0, 44, 19]]),
        np.array([[40, 0, 44, 4], [0, 15, 8, 19]]),
    ] * 2
    for kwargs in (V1, V2):
        _assert_same(cams, gts, iou_thresholds=(0.3, 0.5, 0.7), cam_curve_interval=0.01, **kwargs)
        _assert_same(cams, gts, iou_thresholds=(0.5,), cam_curve_interval=0.137, **kwargs)


def test_degenerate_maps_use_the_empty_box():
    cams = np.zeros((3, 8, 8))
    cams[1] = 2.5  # constant
    cams[2, 3, 3] = np.nan
    gts = [np.array([[0, 0, 0, 0]]), np.array([[0, 0, 1, 0]]), np.array([[2, 2, 5, 5]])]
    for kwargs in (V1, V2):
        result = _assert_same(cams, gts, iou_thresholds=(0.5, 0.7), **kwargs)
        # [0,0,0,0] vs itself: IoU 1; vs [0,0,1,0]: 1/2 (>= 0.5); vs a far box: 0.
        np.testing.assert_array_equal(
            result.curve, [np.full(1000, 200 / 3), np.full(1000, 100 / 3)]
        )


def _iou(a, b):
    """IoU on inclusive pixels, as an exact fraction (numerator, denominator)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return iw * ih, area(a) + area(b) - iw * ih


def test_iou_exactly_at_delta_counts_as_correct():
    cam = np.zeros((12, 12))
    cam[2:6, 2:8] = 1.0  # one block: its box is [2, 2, 8, 6] (x + w, y + h)
    estimated = (2, 2, 8, 6)
    candidates = [
        (x0, y0, x1, y1)
        for x0 in range(12)
        for y0 in range(12)
        for x1 in range(x0, 12)
        for y1 in range(y0, 12)
    ]
    at_half = [g for g in candidates if 2 * _iou(estimated, g)[0] == _iou(estimated, g)[1]]
    at_07 = [g for g in candidates if 10 * _iou(estimated, g)[0] == 7 * _iou(estimated, g)[1]]
    below = [g for g in candidates if 2 * _iou(estimated, g)[0] == _iou(estimated, g)[1] - 1]
    assert at_half and at_07 and below
    gts = [
        np.array([at_half[0]]),
        np.array([at_07[0]]),
        np.array([below[0]]),
        np.array([below[0], at_07[-1]]),
    ]
    cams = np.repeat(cam[None], len(gts), axis=0)
    for kwargs in (V1, V2):
        result = _assert_same(cams, gts, iou_thresholds=(0.5, 0.7), **kwargs)
        assert result.accuracy == {0.5: 75.0, 0.7: 50.0}  # >= δ: the exact ones count


def test_several_gt_boxes_take_the_best_match():
    cam = np.zeros((10, 10))
    cam[1:3, 1:3] = 1.0
    far, near = [6, 6, 9, 9], [1, 1, 3, 3]
    one = max_box_acc(cam[None], [np.array([far])])
    both = max_box_acc(cam[None], [np.array([far, near])])
    assert one.accuracy[0.5] == 0.0 and both.accuracy[0.5] == 100.0


def test_accumulator_over_batches_equals_one_call():
    rng = np.random.default_rng(3)
    cams, gts = _random_cams(rng, 10, 24, noise=0.3)
    for kwargs in (V1, V2):
        acc = BoxAccumulator(iou_thresholds=(0.3, 0.5, 0.7), **kwargs)
        acc.update(cams[:4], gts[:4])
        acc.update(jnp.asarray(cams[4:]), gts[4:])
        split = acc.result()
        whole = max_box_acc(cams, gts, iou_thresholds=(0.3, 0.5, 0.7), **kwargs)
        np.testing.assert_array_equal(split.curve, whole.curve)
        assert split.accuracy == whole.accuracy and split.num_images == 10
        hits = box_hits(cams[:4], gts[:4], iou_thresholds=(0.3, 0.5, 0.7), **kwargs)
        hits += box_hits(cams[4:], gts[4:], iou_thresholds=(0.3, 0.5, 0.7), **kwargs)
        np.testing.assert_array_equal(hits, acc.hits)


def test_result_fields():
    rng = np.random.default_rng(4)
    cams, gts = _random_cams(rng, 6, 16, noise=0.1)
    result = max_box_acc(cams, gts, iou_thresholds=(0.3, 0.5, 0.7), multi_contour=True)
    assert isinstance(result, MaxBoxAcc) and result.curve.shape == (3, 1000)
    assert result.mean == pytest.approx(np.mean([result.accuracy[d] for d in (0.3, 0.5, 0.7)]))
    for i, d in enumerate((0.3, 0.5, 0.7)):
        first_best = int(np.argmax(result.curve[i]))
        assert result.best_threshold[d] == result.thresholds[first_best]
        assert result.accuracy[d] == result.curve[i, first_best]
    np.testing.assert_array_equal(result.thresholds, np.arange(0, 1, 0.001))


def test_gt_formats_agree():
    rng = np.random.default_rng(5)
    cams, _ = _random_cams(rng, 3, 16, noise=0.1)
    listed = [
        np.array([[1, 2, 8, 9]]),
        np.array([[0, 0, 5, 5], [6, 6, 15, 15]]),
        np.array([[3, 3, 4, 4]]),
    ]
    padded = np.full((3, 2, 4), -1)
    for i, b in enumerate(listed):
        padded[i, : len(b)] = b
    one_each = np.array([[1, 2, 8, 9], [0, 0, 5, 5], [3, 3, 4, 4]])
    lists_of_lists = [b.tolist() for b in listed]
    first = box_hits(cams, listed)
    np.testing.assert_array_equal(first, box_hits(cams, padded))
    np.testing.assert_array_equal(first, box_hits(cams, jnp.asarray(padded)))
    np.testing.assert_array_equal(first, box_hits(cams, lists_of_lists))
    expected = box_hits(cams, [b[:1] for b in listed])
    np.testing.assert_array_equal(expected, box_hits(cams, one_each))


@pytest.mark.parametrize(
    ("gt", "message"),
    [
        ([[[1, 1, 2, 2]], np.zeros((0, 4))], "image 1 has no ground-truth box"),
        ([[[1, 1, 2, 2]], [[3, 3, 2, 5]]], "image 1, ground-truth box 0"),
        ([[[1, 1, 2, 2]], [[-2, 0, 2, 5]]], "image 1, ground-truth box 0"),
        ([[[1, 1, 2, 2]]], "each of the 2 CAMs"),
    ],
)
def test_bad_ground_truth_is_an_error(gt, message):
    with pytest.raises(ValueError, match=message):
        box_hits(np.zeros((2, 6, 6)), gt)


def test_bad_arguments_are_errors():
    cams, gt = np.zeros((1, 6, 6)), [np.array([[0, 0, 1, 1]])]
    with pytest.raises(ValueError, match="fractions"):
        box_hits(cams, gt, iou_thresholds=(50,))
    with pytest.raises(ValueError, match="cam_curve_interval"):
        box_hits(cams, gt, cam_curve_interval=0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        box_hits(np.zeros((6, 6)), gt)
    with pytest.raises(ValueError, match="zero images"):
        BoxAccumulator().result()


def test_chunks_of_a_batch_give_the_same_counts(monkeypatch):
    import jaxmed.metrics._wsol as wsol

    rng = np.random.default_rng(6)
    cams, gts = _random_cams(rng, 7, 20, noise=0.3)
    whole = [box_hits(cams, gts, multi_contour=m) for m in (False, True)]
    monkeypatch.setattr(wsol, "_CHUNK_PIXELS", 2 * 22 * 22)  # two CAMs per sweep
    for multi_contour, expected in zip((False, True), whole):
        np.testing.assert_array_equal(box_hits(cams, gts, multi_contour=multi_contour), expected)
