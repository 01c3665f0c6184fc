"""VA-GAN synthetic data: background statistics, planted effects, NIfTI dataset, and the NCC
metric used to score maps against its ground truth."""


import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from jaxmed.data import nifti
from jaxmed.data import synthetic_vagan as sv
from jaxmed.metrics import ncc


@pytest.fixture(scope="module")
def data_2d():
    return sv.vagan_2d(200, seed=0)


@pytest.fixture(scope="module")
def data_3d():
    return sv.vagan_3d(60, seed=0)


@pytest.mark.parametrize("shape, sigma",
                         [((40, 37), 2.5), ((12, 13, 11), 32 * 2.5 / 112), ((9, 10, 8), 1.3)])
def test_gaussian_smooth_matches_scipy(shape, sigma):
    x = np.random.default_rng(0).normal(size=shape)
    expected = scipy.ndimage.gaussian_filter(x, sigma, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(sv.gaussian_smooth(x, sigma), expected, atol=1e-12)


def test_protocol_lengths():
    assert sv.protocol(112) == (20, 32, -5, 4, 2.5)
    assert sv.protocol(32)[:4] == (6, 9, -1, 1)
    assert sv.protocol(32).sigma == pytest.approx(2.5 * 32 / 112)
    with pytest.raises(ValueError):
        sv.protocol(2)


def test_labels_and_shapes(data_2d, data_3d):
    for data, shape in ((data_2d, (200, 112, 112)), (data_3d, (60, 32, 32, 32))):
        assert data.images.shape == data.effects.shape == shape
        assert data.images.dtype == data.effects.dtype == np.float32
        n = len(data.labels)
        np.testing.assert_array_equal(data.labels, [1] * (n - n // 2) + [0] * (n // 2))
    assert sv.vagan_2d(5, seed=0, size=28).labels.tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("which", ["data_2d", "data_3d"])
def test_background_statistics(which, request):
    data = request.getfixturevalue(which)
    backgrounds = (data.images - data.effects).astype(np.float64)
    stds = backgrounds.reshape(len(backgrounds), -1).std(axis=1)
    np.testing.assert_allclose(stds, 50.0, rtol=1e-5)
    assert abs(backgrounds.mean()) < 5.0
    # Controls carry nothing but background.
    assert not data.effects[data.labels == 0].any()


def test_background_is_smoothed_with_sigma_2_5(data_2d):
    # Gaussian-smoothed zero-mean white noise has autocorrelation exp(-d^2 / (4 sigma^2)) at lag
    # d. The true mean (0) is used: subtracting each image's sample mean biases the estimate low.
    # Measured in the interior: within the kernel radius (10 px) of the border the replicated
    # edge makes the field non-stationary.
    x = data_2d.images[data_2d.labels == 0, 10:-10, 10:-10].astype(np.float64)
    for lag in (1, 3):
        measured = np.mean(x[:, lag:, :] * x[:, :-lag, :]) / np.mean(x * x)
        assert measured == pytest.approx(np.exp(-(lag**2) / (4 * 2.5**2)), abs=0.02)


def _planted_boxes(effect, side, centre_start, offset, jitter):
    """Check one positive's effect map against the protocol; return the second box's jitter and
    signs."""
    assert set(np.unique(effect)) == {0.0, 100.0}
    mask = effect == 100.0
    centre = tuple(slice(centre_start, centre_start + side) for _ in effect.shape)
    assert mask[centre].all()
    mask[centre] = False
    # Whatever remains is the second box, complete (the boxes do not overlap at these sizes).
    coords = np.argwhere(mask)
    low, high = coords.min(axis=0), coords.max(axis=0) + 1
    np.testing.assert_array_equal(high - low, side)
    assert mask.sum() == side ** effect.ndim
    shift = low - centre_start
    signs = np.sign(shift)
    jitters = shift - signs * offset
    assert np.all((jitters >= jitter[0]) & (jitters <= jitter[1])), jitters
    return jitters, signs


def test_planted_squares_2d(data_2d):
    found = [_planted_boxes(e, 20, 46, 32, (-5, 4)) for e in data_2d.effects[data_2d.labels == 1]]
    jitters = np.concatenate([j for j, _ in found])
    assert jitters.min() == -5 and jitters.max() == 4
    assert {tuple(s) for _, s in found} == {(-1, -1), (-1, 1), (1, -1), (1, 1)}


def test_planted_cubes_3d(data_3d):
    found = [_planted_boxes(e, 6, 13, 9, (-1, 1)) for e in data_3d.effects[data_3d.labels == 1]]
    assert set(np.concatenate([j for j, _ in found])) == {-1, 0, 1}
    assert len({tuple(s) for _, s in found}) >= 6


def test_deterministic_by_seed():
    a, b = sv.vagan_3d(4, seed=3, size=16), sv.vagan_3d(4, seed=3, size=16)
    c = sv.vagan_3d(4, seed=4, size=16)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, c.images)


# ---------------------------------------------------------------------------- NIfTI dataset


def test_write_dataset_2d(tmp_path):
    manifest = sv.write_dataset(tmp_path / "ds", dims=2, n_subjects=6, seed=1, size=28)
    data = sv.vagan_2d(6, seed=1, size=28)
    subjects = nifti.read_manifest(manifest)
    assert [s.label for s in subjects] == [1, 1, 1, 0, 0, 0]
    found = nifti.discover_groups(tmp_path / "ds" / "positive", tmp_path / "ds" / "negative")
    assert [(s.path.resolve(), s.effect_path and s.effect_path.resolve()) for s in found] == [
        (s.path.resolve(), s.effect_path and s.effect_path.resolve()) for s in subjects
    ]
    assert nifti.check_shapes(subjects) == (28, 28, 1, 1)
    for i, subject in enumerate(subjects):
        volume = nifti.read_volume(subject.path)
        np.testing.assert_array_equal(volume.data[:, :, 0, 0], data.images[i])
        if subject.label == 1:
            truth = nifti.read_volume(subject.effect_path).data[:, :, 0, 0]
            np.testing.assert_array_equal(truth, -data.effects[i])
            assert not np.signbit(truth[truth == 0]).any()
        else:
            assert subject.effect_path is None


def test_write_dataset_3d_reuse_and_regenerate(tmp_path):
    manifest = sv.write_dataset(tmp_path, dims=3, n_subjects=6, seed=0, size=16)
    subjects = nifti.read_manifest(manifest)
    assert nifti.check_shapes(subjects) == (16, 16, 16, 1)
    assert nib.load(subjects[0].path).shape == (16, 16, 16)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert sv.write_dataset(tmp_path, dims=3, n_subjects=6, seed=0, size=16) == manifest
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    # An incomplete dataset (a file lost) is regenerated.
    subjects[1].path.unlink()
    sv.write_dataset(tmp_path, dims=3, n_subjects=6, seed=0, size=16)
    assert subjects[1].path.is_file()
    # Other parameters: fresh files, no stale subjects left for folder discovery.
    sv.write_dataset(tmp_path, dims=3, n_subjects=4, seed=0, size=16)
    assert len(nifti.discover_groups(tmp_path / "positive", tmp_path / "negative")) == 4
    assert len(nifti.read_manifest(manifest)) == 4
    assert not [p for p in tmp_path.rglob(".*")]


def test_ground_truth_scores_one_against_itself(tmp_path):
    data = sv.vagan_3d(4, seed=2, size=16)
    truth = 0.0 - data.effects[:2]
    scores = ncc(truth, truth, axis=(1, 2, 3))
    np.testing.assert_allclose(scores, 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------- NCC


def test_ncc_matches_corrcoef():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 6, 7, 8, 1))
    b = 0.5 * a + rng.normal(size=a.shape)
    batched = np.asarray(jax.jit(ncc, static_argnames="axis")(a, b, axis=(1, 2, 3, 4)))
    expected = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]
    np.testing.assert_allclose(batched, expected, rtol=1e-5)
    np.testing.assert_allclose(ncc(a[0], b[0]), expected[0], rtol=1e-5)
    np.testing.assert_allclose(ncc(jnp.asarray(a[1], jnp.bfloat16), b[1]), expected[1], atol=0.02)
    assert ncc(a[0], -a[0]) == pytest.approx(-1.0, abs=1e-6)


def test_ncc_constant_map_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 10, 10, 10))
    # 0.1 is not exactly representable, so its mean carries rounding noise.
    constant = np.full_like(x, 0.1, dtype=np.float32)
    scores = ncc(constant, x, axis=(1, 2, 3))
    np.testing.assert_array_equal(scores, 0.0)
    assert ncc(x[0], np.zeros_like(x[0])) == 0.0
    mixed = np.stack([x[0], np.zeros_like(x[0])])
    np.testing.assert_allclose(ncc(mixed, np.stack([x[0], x[1]]), axis=(1, 2, 3)), [1.0, 0.0],
                               atol=1e-6)
    with pytest.raises(ValueError):
        ncc(x[0], x[0, :5])
