"""The mapping-GAN study: files are read only when used, each host reads only its rows, and what
is read equals the volumes read, normalised and padded as a whole.

- `load_study` splits from the headers without reading voxels; `Split.arrays` of a host's
  share reads only those subjects; images are min-max normalised and edge-padded, effects
  zero-padded, controls' effects zero.
- `StepBatches` on two simulated processes: each gets its rows of the one global batch and
  reads only their volumes.
- `synthetic_subjects` writes the study on process 0 only.
"""

import nibabel as nib
import numpy as np
import pytest

from jaxmed.data import nifti
from jaxmed.data.transforms import pad_to_multiple
from jaxmed.errors import InputDataError
from jaxmed.mapping_gan import data
from jaxmed.training import host_share

SCHEDULE = dict(n_critic=2, n_critic_warmup=4, warmup_steps=1, warmup_every=100)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), path)


@pytest.fixture
def study_files(tmp_path):
    """6 positives with ground truth and 5 negatives, 6x5x3 volumes (padded to 8x8x4)."""
    rng = np.random.default_rng(0)
    for i in range(6):
        _save(tmp_path / "pos" / f"p{i}.nii.gz", rng.normal(size=(6, 5, 3)) * 10 + i)
        _save(tmp_path / "pos" / f"p{i}_effect.nii.gz", rng.normal(size=(6, 5, 3)))
    for i in range(5):
        _save(tmp_path / "neg" / f"n{i}.nii.gz", rng.normal(size=(6, 5, 3)))
    return nifti.discover_groups(tmp_path / "pos", tmp_path / "neg")


@pytest.fixture
def reads(monkeypatch):
    """The paths whose voxels were read, in order."""
    paths = []
    read_volume = nifti.read_volume

    def counting(path, **kwargs):
        paths.append(str(path))
        return read_volume(path, **kwargs)

    monkeypatch.setattr(nifti, "read_volume", counting)
    return paths


def test_study_reads_only_what_is_asked_for(study_files, reads):
    study = data.load_study(study_files, downsampling=4, val_fraction=0.4, seed=1)
    assert reads == []  # shapes from the headers, split from the labels
    assert study.input_shape == (8, 8, 4, 1) and study.crop == (slice(1, 7), slice(1, 6),
                                                                 slice(0, 3))
    assert study.shapes() == dict(spatial_dims=3, channels=1, input_shape=[8, 8, 4, 1])
    assert study.has_truth and len(study.train) + len(study.val) == 11
    assert sorted(np.bincount(study.val.labels)) == [2, 2]

    share = host_share(len(study.val), 1, 2)  # the second of two hosts
    local = study.val.arrays(share)
    wanted = study.val.subjects[share]
    assert sorted(set(reads)) == sorted({str(p) for s in wanted for p in (s.path, s.effect_path)
                                         if p is not None})
    assert local["image"].shape == (len(wanted), 8, 8, 4, 1)
    assert local["effect"].shape == (len(wanted), 8, 8, 4, 1)
    np.testing.assert_array_equal(local["label"], [s.label for s in wanted])

    before = len(reads)
    study.val.arrays(share)  # kept: not read again
    assert len(reads) == before


def test_volumes_are_normalised_and_padded_like_the_whole_study(study_files):
    study = data.load_study(study_files, downsampling=4, val_fraction=0.4, seed=1)
    arrays = study.train.arrays()
    raw = np.stack([nifti.read_volume(s.path).data for s in study.train.subjects])
    low = raw.min(axis=(1, 2, 3, 4), keepdims=True)
    high = raw.max(axis=(1, 2, 3, 4), keepdims=True)
    expected, _ = pad_to_multiple(2 * (raw - low) / (high - low) - 1, 4,
                                  spatial_axes=(1, 2, 3))
    np.testing.assert_allclose(arrays["image"], expected, atol=1e-6)
    for subject, effect in zip(study.train.subjects, arrays["effect"]):
        if subject.effect_path is None:  # a control: ground truth zero
            assert not effect.any()
        else:
            truth = nifti.read_volume(subject.effect_path, allow_constant=True).data
            np.testing.assert_array_equal(data.crop_spatial(effect, study.crop), truth)
            assert not effect[0].any()  # zero padding


def test_empty_share_keeps_the_shapes(study_files):
    study = data.load_study(study_files, downsampling=4, val_fraction=0.4, seed=1)
    local = study.val.arrays(slice(0, 0))
    assert local["image"].shape == (0, 8, 8, 4, 1) and local["effect"].shape == (0, 8, 8, 4, 1)


def test_a_group_without_validation_subjects_is_an_input_error(study_files):
    with pytest.raises(InputDataError, match="held out for validation"):
        data.load_study(study_files, downsampling=4, val_fraction=0.0)


def _constant_volumes(n, offset):
    """Volumes `(4, 4, 1)` constant at `offset + i`, read through a counting reader."""
    read = []

    def reader(i):
        read.append(i)
        return np.full((4, 4, 1), offset + i, np.float32)

    return data.Volumes(tuple(range(n)), (4, 4, 1), reader), read


def test_each_host_gets_its_rows_and_reads_only_their_volumes(monkeypatch):
    def group(n, offset):
        return np.stack([np.full((4, 4, 1), offset + i, np.float32) for i in range(n)])

    whole = data.StepBatches(group(6, 100.0), group(5, -1.0), 4, seed=5, schedule=SCHEDULE)[0]
    monkeypatch.setattr(data.jax, "process_count", lambda: 2)
    for process in (0, 1):
        monkeypatch.setattr(data.jax, "process_index", lambda p=process: p)
        positives, read_pos = _constant_volumes(6, 100.0)
        negatives, read_neg = _constant_volumes(5, -1.0)
        got = data.StepBatches(positives, negatives, 4, seed=5, schedule=SCHEDULE)[0]
        rows = slice(2 * process, 2 * process + 2)
        for name, read, offset in (("positive", read_pos, 100.0), ("negative", read_neg, -1.0)):
            np.testing.assert_array_equal(got[name], whole[name][rows])
            used = {int(round(abs(v - offset))) for v in got[name][..., 0, 0, 0].ravel()}
            assert set(read) == used  # nothing but this host's rows was read


def test_synthetic_study_is_written_by_process_zero_only(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(data.multihost_utils, "sync_global_devices", synced.append)
    monkeypatch.setattr(data.jax, "process_index", lambda: 1)
    with pytest.raises(InputDataError, match="manifest not found"):
        data.synthetic_subjects(tmp_path / "d", dims=2, n_subjects=4, seed=0, size=32)
    assert not (tmp_path / "d").exists() and len(synced) == 1  # waited, wrote nothing
    monkeypatch.setattr(data.jax, "process_index", lambda: 0)
    subjects = data.synthetic_subjects(tmp_path / "d", dims=2, n_subjects=4, seed=0, size=32)
    assert [s.label for s in subjects] == [1, 1, 0, 0] and len(synced) == 2
