"""WSOL folder loader: round trip with the synthetic writer, resizing and box scaling, images
decoded only when indexed, and every input error naming its file (and CSV line)."""

import dataclasses
import re

import numpy as np
import pytest
from PIL import Image

from jaxmed.data import images
from jaxmed.data.images import ImageFiles, write_image
from jaxmed.data.synthetic_wsol import make_wsol_dataset
from jaxmed.data.wsol_folder import load_wsol_folder, write_wsol_folder
from jaxmed.errors import InputDataError

HEADER = "image,x0,y0,x1,y1\n"


@pytest.fixture(scope="module")
def synthetic():
    return make_wsol_dataset(12, image_size=32, num_classes=3, seed=1, objects_per_image=(1, 2),
                             object_scale=(0.12, 0.16))


@pytest.fixture(scope="module")
def written(synthetic, tmp_path_factory):
    root = tmp_path_factory.mktemp("wsol") / "data"
    write_wsol_folder(synthetic, root)
    return root


def _folder(root, sizes=None):
    """Two classes `a` (two images) and `b` (one image) of the given (height, width)."""
    sizes = sizes or {"a/0.png": (10, 8), "a/1.png": (10, 8), "b/0.png": (6, 12)}
    for name, (height, width) in sizes.items():
        write_image(root / name, np.full((height, width, 3), 100, np.uint8))
    return root


def _boxes_file(root, text, name="boxes.csv"):
    path = root / name
    path.write_text(HEADER + text)
    return path


def test_round_trip_same_size(synthetic, written):
    loaded = load_wsol_folder(written, image_size=32)
    assert loaded.class_names == synthetic.class_names
    assert sorted(loaded.paths) == sorted(synthetic.paths)
    assert loaded.masks is None and loaded.parts is None
    order = [synthetic.paths.index(p) for p in loaded.paths]
    np.testing.assert_array_equal(loaded.labels, synthetic.labels[order])
    np.testing.assert_array_equal(loaded.images, synthetic.images[order])
    for got, i in zip(loaded.boxes, order):
        np.testing.assert_array_equal(got, synthetic.boxes[i])
    assert loaded.labels.dtype == np.int32 and loaded.images.dtype == np.uint8


def _reference_scaled(box, old, new):
    """New pixels whose centres, mapped back to the old image, fall inside the old box."""
    x0, y0, x1, y1 = box
    scale_x, scale_y = new / old[1], new / old[0]
    xs = [j for j in range(new) if x0 <= (j + 0.5) / scale_x < x1 + 1]
    ys = [j for j in range(new) if y0 <= (j + 0.5) / scale_y < y1 + 1]
    return [xs[0], ys[0], xs[-1], ys[-1]]


@pytest.mark.parametrize("new", [64, 20, 13])
def test_resize_scales_boxes_by_pixel_centres(synthetic, written, new):
    loaded = load_wsol_folder(written, image_size=new)
    assert loaded.images.shape == (12, new, new, 3)
    order = [synthetic.paths.index(p) for p in loaded.paths]
    for got, i in zip(loaded.boxes, order):
        expected = [_reference_scaled(b, (32, 32), new) for b in synthetic.boxes[i]]
        assert got.tolist() == expected
    first = Image.open(written / loaded.paths[0]).resize((new, new), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(loaded.images[0], np.asarray(first))


def test_non_square_images_and_tiny_box(tmp_path):
    root = _folder(tmp_path)
    _boxes_file(root, "a/0.png,0,0,7,9\nb/0.png,11,5,11,5\nb/0.png,0,0,5,2\n")
    loaded = load_wsol_folder(root, image_size=24)
    boxes = dict(zip(loaded.paths, loaded.boxes))
    assert boxes["a/0.png"].tolist() == [[0, 0, 23, 23]]
    # A 1-pixel box at the corner of a 12 x 6 image: 2 x 4 pixels after resizing to 24 x 24.
    assert boxes["b/0.png"].tolist() == [[22, 20, 23, 23],
                                         _reference_scaled((0, 0, 5, 2), (6, 12), 24)]
    assert boxes["a/1.png"].shape == (0, 4)  # allowed: not evaluated
    assert loaded.class_names == ["a", "b"] and loaded.labels.tolist() == [0, 0, 1]
    shrunk = load_wsol_folder(root, image_size=3)
    box = dict(zip(shrunk.paths, shrunk.boxes))["b/0.png"][0]
    # Thinner than a new pixel: keeps the one holding its centre.
    assert box.tolist() == [2, 2, 2, 2]


def test_boxes_optional_and_explicit_file(tmp_path):
    root = _folder(tmp_path / "data")
    assert load_wsol_folder(root, image_size=8).boxes is None
    elsewhere = _boxes_file(tmp_path, "a/1.png,1,2,3,4\n", name="mine.csv")
    loaded = load_wsol_folder(root, image_size=8, boxes_csv=elsewhere)
    assert [len(b) for b in loaded.boxes] == [0, 1, 0]
    _boxes_file(root, "")  # header only: valid, no boxes
    assert all(len(b) == 0 for b in load_wsol_folder(root, image_size=8).boxes)


def test_round_trip_without_boxes(synthetic, tmp_path):
    boxless = dataclasses.replace(synthetic, boxes=None)
    write_wsol_folder(boxless, tmp_path / "data")
    assert not (tmp_path / "data" / "boxes.csv").exists()
    loaded = load_wsol_folder(tmp_path / "data", image_size=32)
    assert loaded.boxes is None and loaded.subset([1, 0]).boxes is None


def test_images_are_decoded_only_when_indexed(synthetic, written, monkeypatch):
    reads = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda path, **kw: reads.append(path) or real(path))
    loaded = load_wsol_folder(written, image_size=20)
    assert isinstance(loaded.images, ImageFiles) and reads == []  # headers only
    part = loaded.subset([5, 2])
    assert reads == [] and part.images.shape == (2, 20, 20, 3)
    first = part.images[1]
    assert reads == [written / loaded.paths[2]] and first.shape == (20, 20, 3)
    np.testing.assert_array_equal(np.asarray(loaded.images[3:5])[1], loaded.images[4])
    assert len(reads) == 4


def test_damage_past_the_header_names_the_file_when_read(written, tmp_path):
    root = tmp_path / "data"
    write_wsol_folder(make_wsol_dataset(4, image_size=32, num_classes=2, seed=0), root)
    victim = root / "0_navy_solid" / "00000.png"
    victim.write_bytes(victim.read_bytes()[:60])  # a valid header, truncated pixels
    loaded = load_wsol_folder(root, image_size=32)
    with pytest.raises(InputDataError, match=re.escape(str(victim)) + ".*cannot read"):
        loaded.images[loaded.paths.index("0_navy_solid/00000.png")]


def test_writer_refuses_a_non_empty_folder_and_unsorted_names(synthetic, written, tmp_path):
    with pytest.raises(FileExistsError):
        write_wsol_folder(synthetic, written)
    renamed = dataclasses.replace(synthetic, class_names=synthetic.class_names[::-1], paths=None)
    with pytest.raises(ValueError, match="sorted"):
        write_wsol_folder(renamed, tmp_path / "new")


def _raises(match, root, **kwargs):
    with pytest.raises(InputDataError, match=match):
        load_wsol_folder(root, image_size=8, **kwargs)


def test_folder_errors_name_the_folder(tmp_path):
    _raises(re.escape(str(tmp_path / "absent")) + ".*no such folder", tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.png", np.zeros((4, 4, 3), np.uint8))
    _raises(re.escape(str(tmp_path / "flat")) + ".*no class sub-folders", tmp_path / "flat")
    root = _folder(tmp_path / "data")
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("not an image")
    _raises(re.escape(str(root / "c")) + ".*no images", root)


def test_corrupt_image_names_the_file(tmp_path):
    root = _folder(tmp_path)
    (root / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _raises(re.escape(str(root / "b" / "bad.png")) + ".*cannot read", root)


@pytest.mark.parametrize(
    "rows, line, problem",
    [
        ("a/0.png,1,2,3\n", 2, "expected 5 fields"),
        ("a/0.png,1,2,3,4\na/1.png,1,2,3,4,5\n", 3, "expected 5 fields"),
        ("a/0.png,1,two,3,4\n", 2, "y0 = 'two' is not a number"),
        ("a/0.png,1,2,3.5,4\n", 2, "whole pixel index"),
        ("a/0.png,1,2,3,nan\n", 2, "whole pixel index"),
        ("\na/0.png,3,2,1,4\n", 3, "empty box"),
        ("a/0.png,1,5,3,4\n", 2, "empty box"),
        ("a/0.png,0,0,8,9\n", 2, "outside the 8x10 image"),
        ("a/0.png,0,0,7,10\n", 2, "outside"),
        ("a/0.png,-1,0,7,9\n", 2, "outside"),
        ("a/9.png,0,0,1,1\n", 2, "'a/9.png' is not an image of the dataset"),
        ("0.png,0,0,1,1\n", 2, "not an image of the dataset"),
    ],
)
def test_bad_box_rows_name_file_and_line(tmp_path, rows, line, problem):
    root = _folder(tmp_path)
    path = _boxes_file(root, rows)
    _raises(re.escape(f"{path}, line {line}: ") + ".*" + re.escape(problem), root)


def test_bad_box_header_and_missing_file(tmp_path):
    root = _folder(tmp_path)
    path = root / "boxes.csv"
    path.write_text("path,x0,y0,x1,y1\na/0.png,0,0,1,1\n")
    _raises(re.escape(f"{path}, line 1: the header"), root)
    path.write_text("")
    _raises(re.escape(f"{path}, line 1: the header"), root)
    missing = tmp_path / "nothing.csv"
    _raises(re.escape(str(missing)) + ".*no such box file", root, boxes_csv=missing)
