"""Synthetic lesion data: shapes, determinism, balanced classes made of two features each, masks
that are non-empty exactly for a class's features and never overlap, each feature's pattern
visible in its mask against the lesion-free tissue, neutral backgrounds of the same statistics,
subsets, the class-folder round trip, scaling with the image size and bad arguments."""

import numpy as np
import pytest
import scipy.ndimage

from jaxmed.data.synthetic_lesions import (
    FEATURES,
    FEATURES_NPZ,
    class_features,
    load_lesion_folder,
    make_lesion_dataset,
    neutral_backgrounds,
    write_lesion_folder,
)
from jaxmed.data.wsol_folder import load_wsol_folder
from jaxmed.errors import InputDataError

SIZE, COUNT, SEED = 48, 60, 3
SPICULATED, SPECKS, RIM, LOBULATED, SEPTA = range(5)


@pytest.fixture(scope="module")
def data():
    return make_lesion_dataset(COUNT, image_size=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def neutral():
    return neutral_backgrounds(COUNT, image_size=SIZE, seed=SEED)


def _luminance(images):
    return images.astype(float).mean(axis=-1)  # [..., H, W]


def test_shapes_and_dtypes(data):
    assert len(data) == COUNT
    assert data.images.shape == (COUNT, SIZE, SIZE, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (COUNT,) and data.labels.dtype == np.int32
    for masks in (data.features, data.sites):
        assert masks.shape == (COUNT, 5, SIZE, SIZE) and masks.dtype == bool
    assert data.lesions.shape == (COUNT, SIZE, SIZE) and data.lesions.dtype == bool
    assert data.feature_names == list(FEATURES) and len(set(FEATURES)) == 5
    assert data.class_features == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]
    assert data.class_names == sorted(data.class_names) and len(set(data.class_names)) == 5


def test_every_feature_in_two_classes_and_no_feature_decides_a_class():
    for k in (3, 4, 5):
        pairs = class_features(k)
        assert len(set(map(frozenset, pairs))) == k and all(a != b for a, b in pairs)
        uses = np.bincount([f for pair in pairs for f in pair], minlength=k)
        assert np.all(uses == 2)


def test_deterministic_by_seed():
    a, b = (make_lesion_dataset(6, image_size=32, seed=7) for _ in range(2))
    c = make_lesion_dataset(6, image_size=32, seed=8)
    for name in ("images", "labels", "features", "sites", "lesions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.images, c.images)
    np.testing.assert_array_equal(neutral_backgrounds(3, image_size=32, seed=7),
                                  neutral_backgrounds(3, image_size=32, seed=7))


def test_labels_balanced_and_shuffled(data):
    labels = make_lesion_dataset(23, image_size=32, num_classes=4, seed=1).labels
    counts = np.bincount(labels, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 23
    assert np.all(np.bincount(data.labels) == COUNT // 5)
    assert not np.array_equal(data.labels, np.sort(data.labels))


def test_masks_present_exactly_for_the_class_features(data):
    present = data.features.any(axis=(2, 3))  # [N, F]
    expected = np.zeros_like(present)
    for i, label in enumerate(data.labels):
        expected[i, list(data.class_features[label])] = True
    np.testing.assert_array_equal(present, expected)
    np.testing.assert_array_equal(data.sites.any(axis=(2, 3)), expected)
    assert not np.any(data.features & ~data.sites)  # a pattern lies in its site
    assert not np.any(data.sites.any(axis=1) & ~data.lesions)
    # Some images have a plain lesion: lesion pixels outside every feature site.
    plain = (data.lesions & ~data.sites.any(axis=1)).sum(axis=(1, 2))
    assert 0.2 * COUNT <= np.sum(plain > 10) <= 0.8 * COUNT


def test_sites_of_different_features_are_apart(data):
    for sites in data.sites:
        grown = np.stack([scipy.ndimage.binary_dilation(s) for s in sites])  # 1 px more
        assert grown.sum(axis=0).max() <= 1


def test_sites_are_compact(data):
    """A site spans roughly 1/5 to 1/3 of the side and is one connected piece."""
    for sites in data.sites:
        for site in sites[sites.any(axis=(1, 2))]:
            rows, cols = np.flatnonzero(site.any(axis=1)), np.flatnonzero(site.any(axis=0))
            extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
            assert 0.15 * SIZE <= extent <= 0.4 * SIZE
            assert scipy.ndimage.label(site, np.ones((3, 3)))[1] == 1


def test_image_is_the_neutral_tissue_away_from_the_lesions(data, neutral):
    away = ~np.stack([scipy.ndimage.binary_dilation(m, iterations=2) for m in data.lesions])
    np.testing.assert_array_equal(data.images[away], neutral[away])
    assert away.mean() > 0.6


def _mean_in(values, masks):
    return values[masks].mean()


def test_each_pattern_is_visible_in_its_mask(data, neutral):
    light, tissue = _luminance(data.images), _luminance(neutral)  # [N, H, W]
    for f in range(5):
        mask, site = data.features[:, f], data.sites[:, f]
        body = site & ~mask
        change = np.abs(data.images.astype(float) - neutral)[mask].mean()
        assert change > 15, (FEATURES[f], change)  # versus the same pixels without lesions
        pattern, around = _mean_in(light, mask), _mean_in(light, body)
        if f in (SPECKS, SEPTA):  # light patterns on the darker body
            assert pattern > around + 30, FEATURES[f]
        elif f == RIM:
            assert pattern < around - 40
        elif f == SPICULATED:  # dark lines outside the body, darker than the tissue there
            assert pattern < _mean_in(tissue, mask) - 50
        else:  # lobes: the body's colour, outside the body
            assert abs(pattern - around) < 15 and pattern < _mean_in(tissue, mask) - 30


def test_spicules_and_lobes_are_marked_outside_the_body(data):
    """Measured from the body's centre, their masks start where the body ends: beyond 0.45 of
    the site's reach (the body is at least 0.85 / 1.7 of it; the spicules begin at 0.6 of the
    body's radius, under it)."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    for f in (SPICULATED, LOBULATED):
        for mask, site in zip(data.features[:, f], data.sites[:, f]):
            if not mask.any():
                continue
            body = site & ~mask
            centre_row, centre_col = rows[body].mean(), cols[body].mean()
            distance = np.hypot(rows - centre_row, cols - centre_col)  # [H, W]
            assert distance[mask].min() > 0.45 * distance[site].max(), FEATURES[f]


def test_masks_are_patterns_not_boxes(data):
    """Rims, spicules, lobes and septa fill little of their box; the specks are small blobs,
    several apart in most images (neighbours may touch)."""
    blobs = []
    for image_masks, image_sites, label in zip(data.features, data.sites, data.labels):
        for f in data.class_features[label]:
            mask = image_masks[f]
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            fill = mask.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
            if f == SPECKS:
                blobs.append(scipy.ndimage.label(mask)[1])
                assert mask.sum() < 0.6 * image_sites[f].sum()
            else:
                assert fill < 0.7, FEATURES[f]
    assert np.mean(np.array(blobs) >= 2) >= 0.7 and max(blobs) >= 3


def test_neutral_backgrounds_have_the_tissue_statistics_and_no_lesion(data, neutral):
    assert neutral.shape == (COUNT, SIZE, SIZE, 3) and neutral.dtype == np.uint8
    tissue = ~np.stack([scipy.ndimage.binary_dilation(m, iterations=2) for m in data.lesions])
    image_tissue = data.images[tissue].astype(float)  # [P, 3]
    np.testing.assert_allclose(neutral.reshape(-1, 3).mean(axis=0), image_tissue.mean(axis=0),
                               atol=3.0)
    np.testing.assert_allclose(neutral.reshape(-1, 3).std(axis=0), image_tissue.std(axis=0),
                               rtol=0.15)
    # Lesions are dark blobs: smoothed luminance far below the image's median.
    def dark_share(images):
        smooth = scipy.ndimage.uniform_filter(_luminance(images), size=(1, 3, 3))
        return np.mean(smooth < np.median(smooth, axis=(1, 2), keepdims=True) - 50)

    assert dark_share(neutral) < 0.002
    assert dark_share(data.images) > 0.03
    other = neutral_backgrounds(COUNT, image_size=SIZE, seed=SEED + 1)
    assert np.abs(other.astype(float) - neutral).mean() > 5  # unrelated tissue


def test_background_varies_between_images(neutral):
    means = neutral.reshape(COUNT, -1, 3).mean(axis=1)  # [N, 3]
    assert np.all(means.std(axis=0) > 3)  # colour jitter and brightness
    low = scipy.ndimage.uniform_filter(_luminance(neutral), size=(1, 9, 9))
    assert np.mean(low.max(axis=(1, 2)) - low.min(axis=(1, 2))) > 15  # low-frequency shading


def test_subset(data):
    part = data.subset([5, 0, 5])
    assert len(part) == 3
    np.testing.assert_array_equal(part.images, data.images[[5, 0, 5]])
    np.testing.assert_array_equal(part.labels, data.labels[[5, 0, 5]])
    np.testing.assert_array_equal(part.features[1], data.features[0])
    np.testing.assert_array_equal(part.sites[2], data.sites[5])
    np.testing.assert_array_equal(part.lesions[0], data.lesions[5])
    assert part.class_names == data.class_names and part.class_features == data.class_features


def test_folder_round_trip(tmp_path):
    data = make_lesion_dataset(10, image_size=32, seed=4)
    npz = write_lesion_folder(data, tmp_path / "lesions")
    assert npz == tmp_path / "lesions" / FEATURES_NPZ and npz.is_file()
    loaded = load_wsol_folder(tmp_path / "lesions", image_size=32)
    assert loaded.class_names == data.class_names and loaded.boxes is None
    order = [int(p.split("/")[1].split(".")[0]) for p in loaded.paths]  # <class>/<index>.png
    np.testing.assert_array_equal(loaded.labels, data.labels[order])
    np.testing.assert_array_equal(np.asarray(loaded.images), data.images[order])
    back = load_lesion_folder(tmp_path / "lesions")
    for name in ("images", "labels", "features", "sites", "lesions"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
    assert back.labels.dtype == np.int32
    assert (back.feature_names, back.class_names, back.class_features) == (
        data.feature_names, data.class_names, data.class_features)
    with pytest.raises(FileExistsError):
        write_lesion_folder(data, tmp_path / "lesions")


def test_load_lesion_folder_errors(tmp_path):
    with pytest.raises(InputDataError, match=FEATURES_NPZ):
        load_lesion_folder(tmp_path)
    (tmp_path / FEATURES_NPZ).write_bytes(b"not a zip")
    with pytest.raises(InputDataError, match="cannot read"):
        load_lesion_folder(tmp_path)
    data = make_lesion_dataset(3, image_size=32, seed=0)
    write_lesion_folder(data, tmp_path / "run")
    next((tmp_path / "run").glob("*/*.png")).unlink()
    with pytest.raises(InputDataError, match="no such file"):
        load_lesion_folder(tmp_path / "run")


@pytest.mark.parametrize("size", [32, 128])
def test_scales_with_the_image(size):
    data = make_lesion_dataset(5, image_size=size, seed=2)
    assert data.images.shape == (5, size, size, 3) and data.features.shape[-1] == size
    assert np.all(data.features.any(axis=(2, 3)).sum(axis=1) == 2)
    for sites in data.sites:
        for site in sites[sites.any(axis=(1, 2))]:
            rows, cols = np.flatnonzero(site.any(axis=1)), np.flatnonzero(site.any(axis=0))
            extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
            assert 0.15 * size <= extent <= 0.4 * size
    assert neutral_backgrounds(2, image_size=size).shape == (2, size, size, 3)


def test_fewer_classes_use_the_first_features():
    data = make_lesion_dataset(6, image_size=32, num_classes=3, seed=0)
    assert data.feature_names == list(FEATURES[:3]) and data.features.shape[1] == 3
    assert data.class_features == [(0, 1), (1, 2), (2, 0)]
    assert np.all(data.features.any(axis=(2, 3)).sum(axis=1) == 2)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_images=0), dict(image_size=31), dict(num_classes=2), dict(num_classes=6),
     dict(plain_lesions=-1), dict(plain_lesions=(2, 1)), dict(lesion_scale=(0.1, 0.05)),
     dict(lesion_scale=(0.0, 0.1)), dict(lesion_scale=(0.1, 0.3))],
)
def test_bad_arguments(kwargs):
    kwargs = dict(num_images=2) | kwargs
    with pytest.raises(ValueError):
        make_lesion_dataset(kwargs.pop("num_images"), **kwargs)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        make_lesion_dataset(2, num_classes=7)
    with pytest.raises(ValueError, match="image_size"):
        neutral_backgrounds(2, image_size=16)
    with pytest.raises(ValueError, match="num_images"):
        neutral_backgrounds(0)
    with pytest.raises(ValueError, match="cannot fit"):
        make_lesion_dataset(2, image_size=32, plain_lesions=12, lesion_scale=(0.2, 0.2))
