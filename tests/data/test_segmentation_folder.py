"""Image/mask folder loading: matching by name, up-front checks, and errors that name the file."""

import numpy as np
import pytest
from PIL import Image

from jaxmed.data.images import write_image
from jaxmed.data.segmentation_folder import (
    SegmentationPair,
    check_mask_values,
    load_segmentation_folder,
    read_pair,
)
from jaxmed.data.synthetic_kidney import make_kidney_phantoms, write_segmentation_folder
from jaxmed.errors import InputDataError


def _image(shape=(12, 10), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def _mask(shape=(12, 10), classes=3, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=shape).astype(np.uint8)


def _folders(tmp_path, names, mask_names=None, mask_suffix=""):
    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    for i, name in enumerate(names):
        write_image(images_dir / name, _image(seed=i))
    for i, name in enumerate(mask_names if mask_names is not None else names):
        stem, suffix = name.rsplit(".", 1)
        write_image(masks_dir / f"{stem}{mask_suffix}.{suffix}", _mask(seed=i))
    return images_dir, masks_dir


def test_pairs_matched_by_name_across_extensions(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["b.png", "a.jpg", "c.tif"],
                                     ["a.png", "b.tif", "c.png"])
    pairs = load_segmentation_folder(images_dir, masks_dir, num_classes=3)
    assert pairs == [
        SegmentationPair(images_dir / "a.jpg", masks_dir / "a.png"),
        SegmentationPair(images_dir / "b.png", masks_dir / "b.tif"),
        SegmentationPair(images_dir / "c.tif", masks_dir / "c.png"),
    ]
    image, mask = read_pair(*pairs[1], num_classes=3)
    assert image.shape == (12, 10, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, _image(seed=0))
    assert mask.dtype == np.int32
    np.testing.assert_array_equal(mask, _mask(seed=1))


def test_mask_suffix_and_shared_folder(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["x.png", "y.png"], mask_suffix="_mask")
    pairs = load_segmentation_folder(images_dir, masks_dir, num_classes=3, mask_suffix="_mask")
    assert [p.mask.name for p in pairs] == ["x_mask.png", "y_mask.png"]
    shared = tmp_path / "shared"
    for i, stem in enumerate(["x", "y"]):
        write_image(shared / f"{stem}.png", _image(seed=i))
        write_image(shared / f"{stem}_mask.png", _mask(seed=i))
    pairs = load_segmentation_folder(shared, shared, num_classes=3, mask_suffix="_mask")
    assert [(p.image.name, p.mask.name) for p in pairs] == [("x.png", "x_mask.png"),
                                                            ("y.png", "y_mask.png")]
    with pytest.raises(InputDataError, match="suffix"):
        load_segmentation_folder(shared, shared, num_classes=3)


def test_phantom_folder_round_trip(tmp_path):
    images, masks = make_kidney_phantoms(4, size=40, seed=2)
    write_segmentation_folder(images, masks, tmp_path)
    pairs = load_segmentation_folder(
        tmp_path / "images", tmp_path / "masks", num_classes=3, check_values=True
    )
    assert len(pairs) == 4
    for i, pair in enumerate(pairs):
        image, mask = read_pair(*pair, num_classes=3)
        np.testing.assert_array_equal(image, images[i])
        np.testing.assert_array_equal(mask, masks[i])


def test_missing_mask_names_the_image(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["a.png", "b.png"], ["a.png"])
    with pytest.raises(InputDataError, match=r"b\.png.*no mask"):
        load_segmentation_folder(images_dir, masks_dir, num_classes=3)


def test_mask_without_image_warns(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["a.png"], ["a.png", "z.png"])
    with pytest.warns(UserWarning, match=r"z\.png"):
        pairs = load_segmentation_folder(images_dir, masks_dir, num_classes=3)
    assert len(pairs) == 1


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(InputDataError, match="no images"):
        load_segmentation_folder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    with pytest.raises(InputDataError, match="nowhere"):
        load_segmentation_folder(tmp_path / "nowhere", tmp_path / "masks", num_classes=2)


def test_ambiguous_names(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["a.png"], ["a.png"])
    write_image(masks_dir / "a.tif", _mask())
    with pytest.raises(InputDataError, match=r"a\.png and a\.tif"):
        load_segmentation_folder(images_dir, masks_dir, num_classes=3)


def test_size_mismatch_names_the_mask(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["a.png"], [])
    write_image(masks_dir / "a.png", _mask(shape=(12, 11)))
    with pytest.raises(InputDataError, match=r"masks/a\.png: mask is 12x11"):
        load_segmentation_folder(images_dir, masks_dir, num_classes=3)
    with pytest.raises(InputDataError, match=r"masks/a\.png: mask is 12x11"):
        read_pair(images_dir / "a.png", masks_dir / "a.png", 3)


def test_unreadable_files(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["a.png", "b.png"])
    (images_dir / "b.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(InputDataError, match=r"images/b\.png: cannot read"):
        load_segmentation_folder(images_dir, masks_dir, num_classes=3)
    (images_dir / "b.png").unlink()
    (masks_dir / "b.png").unlink()
    full = (masks_dir / "a.png").read_bytes()
    (masks_dir / "a.png").write_bytes(full[: len(full) // 2])  # truncated: the header is fine
    pairs = load_segmentation_folder(images_dir, masks_dir, num_classes=3)
    with pytest.raises(InputDataError, match=r"masks/a\.png"):
        read_pair(*pairs[0], num_classes=3)


def test_lossy_or_colour_masks_refused(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["a.png"], [])
    write_image(masks_dir / "a.jpg", _mask())
    with pytest.raises(InputDataError, match=r"a\.jpg.*losslessly"):
        load_segmentation_folder(images_dir, masks_dir, num_classes=3)
    (masks_dir / "a.jpg").unlink()
    write_image(masks_dir / "a.png", np.repeat(_mask()[..., None], 3, axis=-1))
    with pytest.raises(InputDataError, match=r"a\.png.*one channel"):
        load_segmentation_folder(images_dir, masks_dir, num_classes=3)


def test_mask_values_checked(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["a.png"], [])
    bad = _mask(classes=3)
    bad[0, :3] = [3, 7, 255]
    write_image(masks_dir / "a.png", bad)
    pairs = load_segmentation_folder(images_dir, masks_dir, num_classes=3)  # headers only: passes
    with pytest.raises(InputDataError, match=r"masks/a\.png: mask values 3, 7, 255 in 3 pixels"):
        read_pair(*pairs[0], num_classes=3)
    with pytest.raises(InputDataError, match=r"masks/a\.png"):
        load_segmentation_folder(images_dir, masks_dir, num_classes=3, check_values=True)
    bad[0, :3] = 255
    write_image(masks_dir / "a.png", bad)
    with pytest.raises(InputDataError, match="255"):
        read_pair(*pairs[0], num_classes=3)
    _, mask = read_pair(*pairs[0], num_classes=3, ignore_index=255)
    assert np.all(mask[0, :3] == 255)


def test_binary_255_mask_hint():
    mask = np.zeros((4, 4), np.int32)
    mask[1:3, 1:3] = 255
    with pytest.raises(InputDataError, match="0/255 binary"):
        check_mask_values(mask, "m.png", num_classes=2)
    check_mask_values(np.array([[0, 1], [1, 0]]), "m.png", num_classes=2)


def test_16_bit_and_palette_masks(tmp_path):
    images_dir, masks_dir = _folders(tmp_path, ["a.png", "b.png"], [])
    masks_dir.mkdir()
    Image.fromarray(_mask(seed=0).astype(np.uint16)).save(masks_dir / "a.png")
    palette = Image.fromarray(_mask(seed=1)).convert("P")
    palette.save(masks_dir / "b.png")
    pairs = load_segmentation_folder(images_dir, masks_dir, num_classes=3, check_values=True)
    np.testing.assert_array_equal(read_pair(*pairs[0], num_classes=3)[1], _mask(seed=0))
    np.testing.assert_array_equal(read_pair(*pairs[1], num_classes=3)[1], _mask(seed=1))
