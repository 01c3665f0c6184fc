"""Synthetic WSOL data: determinism, geometry of boxes/masks/parts/distractors, that the class is
carried by the small part alone (no body tint) and that the body tint is a weak class cue of the
specified size."""

import numpy as np
import pytest
import scipy.ndimage

from jaxmed.data.synthetic_wsol import MAX_CLASSES, class_names, make_wsol_dataset

SIZE = 64


@pytest.fixture(scope="module")
def data():
    return make_wsol_dataset(160, image_size=SIZE, num_classes=4, seed=3)


@pytest.fixture(scope="module")
def multi():
    return make_wsol_dataset(
        40, image_size=SIZE, seed=5, objects_per_image=(1, 3), decoy_probability=0.5,
        object_scale=(0.1, 0.15),
    )


def _components(mask):
    """Connected pieces of a mask (4-connectivity) as a list of bool arrays."""
    labelled, count = scipy.ndimage.label(mask)
    return [labelled == k for k in range(1, count + 1)]


def _tight(mask):
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    y = np.flatnonzero(rows)
    x = np.flatnonzero(cols)
    return [x[0], y[0], x[-1], y[-1]]


def _box_mask(box, size):
    x0, y0, x1, y1 = box
    inside = np.zeros((size, size), bool)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    return inside


def test_shapes_and_dtypes(data):
    n = len(data)
    assert n == 160
    assert data.images.shape == (n, SIZE, SIZE, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (n,) and data.labels.dtype == np.int32
    for mask in (data.masks, data.parts, data.distractors):
        assert mask.shape == (n, SIZE, SIZE) and mask.dtype == bool
    assert len(data.boxes) == n
    assert all(b.shape == (1, 4) and b.dtype == np.int32 for b in data.boxes)
    assert data.class_names == class_names(4) and len(set(data.class_names)) == 4
    assert len(set(data.paths)) == n
    assert all(p.split("/")[0] == data.class_names[y] for p, y in zip(data.paths, data.labels))


def test_deterministic_by_seed():
    a = make_wsol_dataset(12, image_size=32, seed=7)
    b = make_wsol_dataset(12, image_size=32, seed=7)
    c = make_wsol_dataset(12, image_size=32, seed=8)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(np.stack(a.boxes), np.stack(b.boxes))
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)


def test_labels_balanced(data):
    labels = make_wsol_dataset(37, image_size=32, num_classes=5, seed=1).labels
    counts = np.bincount(labels, minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 37
    assert np.all(np.bincount(data.labels) == 40)
    assert not np.array_equal(data.labels, np.sort(data.labels))  # shuffled, not grouped


def test_box_is_tight_bounds_of_mask(data):
    for mask, boxes in zip(data.masks, data.boxes):
        assert mask.any()
        assert list(boxes[0]) == _tight(mask)


def test_part_small_and_inside_box(data):
    for mask, part, boxes in zip(data.masks, data.parts, data.boxes):
        assert part.any()
        assert not np.any(part & ~mask)
        assert not np.any(part & ~_box_mask(boxes[0], SIZE))
        fraction = part.sum() / mask.sum()
        assert 0.05 <= fraction <= 0.15


def test_distractors_present_and_outside_object(data):
    for mask, distractor in zip(data.masks, data.distractors):
        assert distractor.any()
        assert not np.any(distractor & mask)
    no_rods = make_wsol_dataset(8, image_size=32, seed=0, distractors_per_image=0)
    assert not no_rods.distractors.any()


def _mean_colours(images, masks):
    weights = masks[..., None].astype(float)  # [N, H, W, 1]
    return (images * weights).sum(axis=(1, 2)) / weights.sum(axis=(1, 2))  # [N, 3]


def _nearest_centroid_accuracy(features, labels):
    """Fit class centroids on the even images, score on the odd ones."""
    fit, score = slice(0, None, 2), slice(1, None, 2)
    centroids = np.stack([features[fit][labels[fit] == k].mean(axis=0) for k in np.unique(labels)])
    distance = ((features[score][:, None, :] - centroids[None]) ** 2).sum(-1)
    return np.mean(np.argmin(distance, axis=1) == labels[score])


def test_class_is_decidable_from_the_part_only(data):
    images = data.images.astype(float)
    part_colour = _mean_colours(images, data.parts)
    body_colour = _mean_colours(images, data.masks & ~data.parts)
    assert _nearest_centroid_accuracy(part_colour, data.labels) >= 0.97
    assert _nearest_centroid_accuracy(body_colour, data.labels) <= 0.45  # chance is 0.25
    # The body's size says nothing either: mean cell area is the same for every class.
    areas = data.masks.sum(axis=(1, 2))
    per_class = np.array([areas[data.labels == k].mean() for k in range(4)])
    assert per_class.std() / areas.mean() < 0.1


def test_distractor_colour_cooccurs_with_class(data):
    images = data.images.astype(float)
    rod_colour = _mean_colours(images, data.distractors)
    loose = _nearest_centroid_accuracy(rod_colour, data.labels)
    assert 0.4 <= loose <= 0.95  # informative (chance 0.25) but not decisive at cooccurrence 0.8
    strict = make_wsol_dataset(40, image_size=32, seed=2, cooccurrence=1.0, distractors_per_image=1)
    rod_colour = _mean_colours(strict.images.astype(float), strict.distractors)
    assert _nearest_centroid_accuracy(rod_colour, strict.labels) == 1.0


def test_several_objects_give_several_boxes(multi):
    counts = [len(b) for b in multi.boxes]
    assert min(counts) >= 1 and max(counts) >= 2
    for mask, part, boxes in zip(multi.masks, multi.parts, multi.boxes):
        cells = _components(mask)
        assert sorted(map(tuple, boxes.tolist())) == sorted(tuple(_tight(c)) for c in cells)
        for cell in cells:
            assert 0.05 <= (part & cell).sum() / cell.sum() <= 0.15


def _cells_outside_ground_truth(data):
    """Per image, the count of large blobs far from the background colour outside the mask."""
    counts = []
    for image, mask in zip(data.images.astype(float), data.masks):
        smooth = scipy.ndimage.uniform_filter(image, size=(3, 3, 1))  # [H, W, 3], speckle averaged
        background = np.median(smooth[~mask], axis=0)
        far = np.abs(smooth - background).sum(-1) > 90
        outside = far & ~scipy.ndimage.binary_dilation(mask, iterations=2)
        counts.append(sum(c.sum() >= 30 for c in _components(outside)))
    return np.array(counts)


def test_decoy_cells_are_not_ground_truth():
    kwargs = dict(image_size=48, seed=4, distractors_per_image=0)
    plain = make_wsol_dataset(8, **kwargs)
    decoys = make_wsol_dataset(8, decoy_probability=1.0, **kwargs)
    assert all(len(b) == 1 for b in decoys.boxes)
    assert np.all(_cells_outside_ground_truth(plain) == 0)
    assert np.all(_cells_outside_ground_truth(decoys) == 1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(image_size=16), dict(num_classes=0), dict(num_classes=MAX_CLASSES + 1),
     dict(part_fraction=(0.2, 0.1)), dict(objects_per_image=0),
     dict(distractors_per_image=(-1, 1)), dict(body_tint=-1.0), dict(body_tint=float("nan"))],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_wsol_dataset(4, **kwargs)


def test_impossible_layout_is_reported():
    with pytest.raises(ValueError, match="cannot fit"):
        make_wsol_dataset(2, image_size=32, objects_per_image=6, object_scale=(0.3, 0.3))


# Generated before `body_tint` existed: make_wsol_dataset(6, image_size=40, num_classes=3, seed=11,
# decoy_probability=0.5). Labels and boxes are exact; per-image mean pixel values to 0.01.
_BEFORE_TINT_LABELS = [0, 1, 1, 2, 2, 0]
_BEFORE_TINT_BOXES = [[10, 19, 22, 32], [16, 10, 29, 20], [23, 4, 32, 13], [3, 18, 13, 29],
                      [8, 8, 23, 22], [5, 3, 18, 17]]
_BEFORE_TINT_MEANS = [[211.76, 186.02, 205.34], [212.77, 191.67, 202.25], [208.2, 184.42, 200.14],
                      [228.77, 204.1, 223.12], [208.87, 184.12, 204.76], [218.82, 192.47, 212.06]]


def test_no_tint_reproduces_the_data_from_before_the_option():
    kwargs = dict(image_size=40, num_classes=3, seed=11, decoy_probability=0.5)
    default, zero = make_wsol_dataset(6, **kwargs), make_wsol_dataset(6, body_tint=0.0, **kwargs)
    np.testing.assert_array_equal(default.images, zero.images)
    np.testing.assert_array_equal(default.masks, zero.masks)
    assert default.labels.tolist() == _BEFORE_TINT_LABELS
    assert [b[0].tolist() for b in default.boxes] == _BEFORE_TINT_BOXES
    means = default.images.reshape(6, -1, 3).astype(float).mean(axis=1)
    np.testing.assert_allclose(means, _BEFORE_TINT_MEANS, atol=0.02)


def test_tint_changes_only_the_cell_bodies():
    """The tint draws no random numbers: geometry, labels, background, rods and decoys are the
    untinted dataset's, pixel for pixel (inclusions show some body colour in their faint parts)."""
    kwargs = dict(image_size=48, seed=6, decoy_probability=0.5)
    plain, tinted = make_wsol_dataset(12, **kwargs), make_wsol_dataset(12, body_tint=20.0, **kwargs)
    np.testing.assert_array_equal(plain.labels, tinted.labels)
    for name in ("masks", "parts", "distractors"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(tinted, name))
    np.testing.assert_array_equal(plain.images[~plain.masks], tinted.images[~plain.masks])
    body = plain.masks & ~plain.parts
    assert np.abs(plain.images[body].astype(int) - tinted.images[body]).mean() > 5


def _class_body_colours(data, num_classes):
    """Mean colour [K, 3] over each class's cell bodies (cell mask minus inclusion)."""
    colours = _mean_colours(data.images.astype(float), data.masks & ~data.parts)  # [N, 3]
    return np.stack([colours[data.labels == k].mean(axis=0) for k in range(num_classes)])


@pytest.mark.parametrize("num_classes", [3, 4])
def test_tint_separates_the_class_body_colours_by_the_specified_amount(num_classes):
    tint = 30.0
    kwargs = dict(image_size=48, num_classes=num_classes, seed=9)
    plain = _class_body_colours(make_wsol_dataset(30 * num_classes, **kwargs), num_classes)
    tinted = _class_body_colours(make_wsol_dataset(30 * num_classes, body_tint=tint, **kwargs),
                                 num_classes)
    # The same cells, so the colour jitter cancels: the shift is the tint times the mean shading
    # of a body (rim 0.82, brightness 0.92-1.05: between 0.85 and 1).
    shift = tinted - plain  # [K, 3]
    np.testing.assert_allclose(shift.sum(axis=1), 0.0, atol=1.5)  # orthogonal to grey: a hue
    size = np.linalg.norm(shift, axis=1)
    assert np.all((0.85 * tint <= size) & (size <= tint))
    # Evenly spaced on a circle: class j and k apart by 2 tint sin(pi |j - k| / K).
    j, k = np.triu_indices(num_classes, 1)
    expected = 2 * np.sin(np.pi * (k - j) / num_classes) * size.mean()
    np.testing.assert_allclose(np.linalg.norm(shift[j] - shift[k], axis=1), expected, rtol=0.05)
    # Without the tint the class means differ only by the jitter's sampling noise.
    spread = np.linalg.norm(plain - plain.mean(axis=0), axis=1)
    assert spread.max() < 0.25 * tint


def test_tint_is_a_weak_cue_and_the_inclusion_stays_decisive():
    data = make_wsol_dataset(240, image_size=48, seed=2, body_tint=16.0)
    images = data.images.astype(float)
    body = _nearest_centroid_accuracy(_mean_colours(images, data.masks & ~data.parts), data.labels)
    part = _nearest_centroid_accuracy(_mean_colours(images, data.parts), data.labels)
    assert 0.45 <= body <= 0.85  # chance is 0.25
    assert part >= 0.97
    for mask, part_mask in zip(data.masks, data.parts):
        assert 0.05 <= part_mask.sum() / mask.sum() <= 0.15 and not np.any(part_mask & ~mask)
