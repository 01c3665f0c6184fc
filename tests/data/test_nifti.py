"""NIfTI data layer: every bad input names its file; real files read; maps round-trip."""

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxmed.data import nifti
from jaxmed.errors import InputDataError

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _save(array, path, affine=None):
    """Write a test file with plain nibabel (not the module under test)."""
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return path


def _noise(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _raises_naming(path, match, fn, *args, **kwargs):
    with pytest.raises(InputDataError, match=match) as info:
        fn(*args, **kwargs)
    assert Path(path).name in str(info.value), str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    path = tmp_path / "absent.nii.gz"
    _raises_naming(path, "not found", nifti.read_volume, path)


@pytest.mark.parametrize("name", ["random.nii", "random.nii.gz"])
def test_random_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(1).bytes(2000))
    _raises_naming(path, "corrupt", nifti.read_volume, path)


def test_truncated_gzip(tmp_path):
    path = _save(_noise((16, 16, 16)), tmp_path / "cut.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises_naming(path, "truncated or corrupt", nifti.read_volume, path)


def test_truncated_uncompressed(tmp_path):
    path = _save(_noise((16, 16, 16)), tmp_path / "cut.nii")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises_naming(path, "truncated or corrupt", nifti.read_volume, path)


@pytest.mark.parametrize("bad, word", [(np.nan, "3 NaN, 0 infinite"),
                                       (np.inf, "0 NaN, 3 infinite")])
def test_non_finite_voxels(tmp_path, bad, word):
    data = _noise((6, 6, 6))
    data.flat[[0, 5, 17]] = bad
    path = _save(data, tmp_path / "holes.nii.gz")
    message = _raises_naming(path, "3 of 216 voxels are not finite", nifti.read_volume, path)
    assert word in message


def test_constant_volume(tmp_path):
    path = _save(np.full((5, 5, 5), 7.0, np.float32), tmp_path / "flat.nii.gz")
    _raises_naming(path, "constant", nifti.read_volume, path)
    assert nifti.read_volume(path, allow_constant=True).data.shape == (5, 5, 5, 1)


@pytest.mark.parametrize("shape", [(8, 8), (4, 4, 4, 2, 3)])
def test_wrong_dimensionality(tmp_path, shape):
    path = _save(_noise(shape), tmp_path / "oddshape.nii.gz")
    _raises_naming(path, "unsupported", nifti.read_volume, path)


def test_trailing_singleton_axes_are_squeezed(tmp_path):
    data = _noise((4, 5, 6, 2, 1))
    volume = nifti.read_volume(_save(data, tmp_path / "five.nii.gz"))
    np.testing.assert_array_equal(volume.data, data[..., 0])


def test_directory_is_not_a_file(tmp_path):
    folder = tmp_path / "adir.nii"
    folder.mkdir()
    _raises_naming(folder, "not a regular file", nifti.read_volume, folder)


# ---------------------------------------------------------------------------- real files


def test_reads_nibabel_example_files():
    four_d = nifti.read_volume(NIBABEL_DATA / "example4d.nii.gz")
    assert four_d.data.shape == (128, 96, 24, 2) and four_d.channels == 2
    assert four_d.data.dtype == np.float32
    reference = nib.load(NIBABEL_DATA / "example4d.nii.gz")
    np.testing.assert_array_equal(four_d.data, reference.get_fdata())
    np.testing.assert_array_equal(four_d.affine, reference.affine)
    anatomy = nifti.read_volume(NIBABEL_DATA / "anatomical.nii")
    assert anatomy.data.shape == (33, 41, 25, 1) and anatomy.spatial_shape == (33, 41, 25)


def test_write_like_round_trip(tmp_path):
    reference = nifti.read_volume(NIBABEL_DATA / "example4d.nii.gz")
    key_map = _noise((*reference.spatial_shape, 1))
    out = nifti.write_like(reference, key_map, tmp_path / "map.nii.gz")
    back = nib.load(out)
    assert back.shape == reference.spatial_shape and back.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.affine, reference.affine, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(back.get_fdata(), key_map[..., 0])
    # All channels, into an uncompressed file.
    out4 = nifti.write_like(reference, reference.data, tmp_path / "copy.nii")
    back4 = nifti.read_volume(out4)
    np.testing.assert_array_equal(back4.data, reference.data)
    np.testing.assert_allclose(back4.affine, reference.affine, rtol=0, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["copy.nii", "map.nii.gz"]


def test_write_like_resets_scaling_of_integer_reference(tmp_path):
    data = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 7).astype(np.int16)
    image = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    image.header.set_slope_inter(2.0, 10.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    reference = nifti.read_volume(tmp_path / "scaled.nii.gz")
    np.testing.assert_array_equal(reference.data[..., 0], 2.0 * data + 10.0)
    values = _noise((4, 5, 6))
    back = nib.load(nifti.write_like(reference, values, tmp_path / "out.nii.gz"))
    np.testing.assert_array_equal(back.get_fdata(), values)


def test_write_is_atomic(tmp_path, monkeypatch):
    reference = nifti.read_volume(NIBABEL_DATA / "anatomical.nii")
    target = tmp_path / "map.nii.gz"
    target.write_bytes(b"previous result")

    def broken_save(image, filename):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        nifti.write_like(reference, reference.data, target)
    assert target.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["map.nii.gz"]


def test_write_rejects_bad_output_name(tmp_path):
    reference = nifti.read_volume(NIBABEL_DATA / "anatomical.nii")
    target = tmp_path / "map.png"
    _raises_naming(target, "must end in", nifti.write_like, reference, reference.data, target)


# ---------------------------------------------------------------------------- normalisation


def test_minmax_normalise():
    x = _noise((5, 6, 7, 2)) * 30 + 4
    y = nifti.normalise(x)
    assert y.dtype == np.float32 and y.min() == -1.0 and y.max() == 1.0
    expected = 2 * (x.astype(np.float64) - x.min()) / (x.max() - x.min()) - 1
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_percentile_normalise_clips():
    x = _noise((10, 10, 10)).astype(np.float64)
    x.flat[0], x.flat[1] = 1e6, -1e6  # outliers that would squash a min-max map
    y = nifti.normalise(x, "percentile", (2.0, 98.0))
    xs = np.sort(x.ravel())
    # numpy's default percentile: linear interpolation between order statistics.
    def pct(p):
        rank = p / 100 * (xs.size - 1)
        low = int(np.floor(rank))
        return xs[low] + (rank - low) * (xs[low + 1] - xs[low])

    lo, hi = pct(2.0), pct(98.0)
    expected = 2 * (np.clip(x, lo, hi) - lo) / (hi - lo) - 1
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert y.min() == -1.0 and y.max() == 1.0
    assert np.mean(y == 1.0) >= 0.02 and np.mean(y == -1.0) >= 0.02


def test_normalise_errors(tmp_path):
    with pytest.raises(ValueError):
        nifti.normalise(np.ones((3, 3, 3)))
    with pytest.raises(ValueError):
        nifti.normalise(_noise((3, 3, 3)), "zscore")
    mostly_zero = np.zeros((10, 10, 10), np.float32)
    mostly_zero.flat[:3] = 1.0
    path = _save(mostly_zero, tmp_path / "sparse.nii.gz")
    assert nifti.read_normalised(path).data.max() == 1.0
    _raises_naming(path, "empty", nifti.read_normalised, path, "percentile", (1.0, 99.0))


# ---------------------------------------------------------------------------- groups


def _group_folder(folder, names, shape=(4, 4, 4)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        _save(_noise(shape, seed=i), folder / name)
    return folder


def test_discover_groups(tmp_path):
    pos = _group_folder(tmp_path / "pos",
                        ["b.nii.gz", "a.nii", "a_effect.nii.gz", "c_effect.nii.gz"])
    (pos / "notes.txt").write_text("not a volume")
    (pos / ".hidden.nii.gz").write_bytes(b"")
    neg = _group_folder(tmp_path / "neg", ["z.nii.gz", "y.nii.gz"])
    subjects = nifti.discover_groups(pos, neg)
    found = [(s.path.name, s.label) for s in subjects]
    assert found == [("a.nii", 1), ("b.nii.gz", 1), ("y.nii.gz", 0), ("z.nii.gz", 0)]
    assert subjects[0].effect_path == pos / "a_effect.nii.gz"
    assert all(s.effect_path is None for s in subjects[1:])


def test_empty_and_missing_group_folders(tmp_path):
    pos = _group_folder(tmp_path / "pos", ["a.nii.gz"])
    empty = _group_folder(tmp_path / "empty_group", ["only_effect.nii.gz"])
    _raises_naming(empty, "no negative volumes", nifti.discover_groups, pos, empty)
    _raises_naming("nowhere", "not found", nifti.discover_groups, pos, tmp_path / "nowhere")


def _manifest(tmp_path, text):
    path = tmp_path / "study.csv"
    path.write_text(text)
    return path


def test_read_manifest(tmp_path):
    _group_folder(tmp_path / "d", ["p.nii.gz", "p_effect.nii.gz", "n.nii.gz"])
    absolute = tmp_path / "d" / "n.nii.gz"
    text = f"label, path ,effect_path,age\n1,d/p.nii.gz,d/p_effect.nii.gz,3\n\n0,{absolute},,4\n"
    path = _manifest(tmp_path, text)
    subjects = nifti.read_manifest(path)
    assert subjects == [
        nifti.Subject(tmp_path / "d" / "p.nii.gz", 1, tmp_path / "d" / "p_effect.nii.gz"),
        nifti.Subject(absolute, 0, None),
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("path,group\nd/p.nii.gz,1\n", "line 1: the header"),
        ("path,label\nd/p.nii.gz,1\nd/n.nii.gz,yes\n", "line 3: label must be"),
        ("path,label\nd/p.nii.gz,1\nd/n.nii.gz,0,extra\n", "line 3: expected 2 fields"),
        ("path,label\nd/p.nii.gz\n", "line 2: expected 2 fields"),
        ("path,label\n,1\nd/n.nii.gz,0\n", "line 2: empty path"),
        ("path,label\nd/p.nii.gz,1\nd/gone.nii.gz,0\n",
         "line 3: path file not found: .*gone.nii.gz"),
        ("path,label,effect_path\nd/p.nii.gz,1,d/gone.nii.gz\n",
         "line 2: effect_path file not found"),
        ("path,label\nd/p.nii.gz,1\n", "no negative subjects"),
        ("", "line 1: the header"),
    ],
)
def test_malformed_manifest(tmp_path, text, match):
    _group_folder(tmp_path / "d", ["p.nii.gz", "n.nii.gz"])
    path = _manifest(tmp_path, text)
    _raises_naming(path, match, nifti.read_manifest, path)


def test_missing_manifest(tmp_path):
    _raises_naming("nothing.csv", "not found", nifti.read_manifest, tmp_path / "nothing.csv")


def test_check_shapes(tmp_path):
    folder = _group_folder(tmp_path / "g", ["a.nii.gz", "b.nii.gz"], shape=(4, 5, 6))
    _group_folder(folder, ["c.nii.gz"], shape=(4, 5, 7))
    _group_folder(folder, ["d.nii.gz"], shape=(4, 5, 6, 2))
    same = [nifti.Subject(folder / n, 1) for n in ("a.nii.gz", "b.nii.gz")]
    assert nifti.check_shapes(same) == (4, 5, 6, 1)
    bad_space = same + [nifti.Subject(folder / "c.nii.gz", 0)]
    message = _raises_naming(folder / "c.nii.gz", r"\(4, 5, 7, 1\) differs", nifti.check_shapes,
                             bad_space)
    assert "a.nii.gz" in message
    bad_channels = same + [nifti.Subject(folder / "d.nii.gz", 0)]
    _raises_naming(folder / "d.nii.gz", "differs", nifti.check_shapes, bad_channels)
    bad_effect = [nifti.Subject(folder / "a.nii.gz", 1, folder / "c.nii.gz")]
    _raises_naming(folder / "c.nii.gz", "does not fit", nifti.check_shapes, bad_effect)
