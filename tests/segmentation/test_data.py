"""The segmentation run's sources: the split, lazily read folder pairs, this host's share."""

import numpy as np
import pytest
from PIL import Image

from jaxmed.data import segmentation_folder
from jaxmed.data.split import train_val_split
from jaxmed.data.synthetic_kidney import make_kidney_phantoms
from jaxmed.errors import InputDataError
from jaxmed.segmentation import data
from jaxmed.segmentation.config import SegmentationConfig
from jaxmed.segmentation.data import IGNORE, augmentation, read_rows, split_sources
from jaxmed.training import host_share


def _folder(root, count=6):
    images, masks = make_kidney_phantoms(count, size=40, seed=2)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(image[:, 5:35]).save(root / "images" / f"c{i}.png")  # 40 x 30
        Image.fromarray(mask[:, 5:35].astype(np.uint8)).save(root / "masks" / f"c{i}.png")
    return images[:, :, 5:35], masks[:, :, 5:35]


def test_synthetic_split_is_the_seeded_permutation_split():
    config = SegmentationConfig(image_size=32, synthetic_images=10, val_fraction=0.3, seed=4)
    train, held_out = split_sources(config)
    images, masks = make_kidney_phantoms(10, size=32, seed=4)
    train_rows, val_rows = train_val_split(10, 0.3, 4)
    np.testing.assert_array_equal(read_rows(train, slice(None))["image"], images[train_rows])
    np.testing.assert_array_equal(read_rows(held_out, slice(None))["mask"], masks[val_rows])
    assert read_rows(held_out, slice(None))["mask"].dtype == np.int32


def test_folder_pairs_are_read_and_letterboxed_when_asked(tmp_path, monkeypatch):
    images, masks = _folder(tmp_path)
    config = SegmentationConfig(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                                image_size=20, val_fraction=0.34)
    train, held_out = split_sources(config)
    assert (len(train), len(held_out)) == (4, 2)
    reads = []
    original = segmentation_folder.read_pair
    monkeypatch.setattr(data, "read_pair", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    share = read_rows(held_out, host_share(2, process_index=1, process_count=2))
    row = int(held_out.rows[1])
    assert reads == [held_out.source.pairs[row].image]  # nothing else decoded
    assert share["image"].shape == (1, 20, 20, 3) and share["image"].dtype == np.uint8
    expected = data.letterboxed_pair(images[row], masks[row], 20)
    np.testing.assert_array_equal(share["mask"][0], expected["mask"])
    assert (share["mask"][0][:, :2] == IGNORE).all()  # 40 x 30 in 20 x 20: padded left/right


def test_an_empty_share_keeps_the_shapes():
    config = SegmentationConfig(image_size=32, synthetic_images=5)
    _, held_out = split_sources(config)
    empty = read_rows(held_out, slice(1, 1))
    assert empty["image"].shape == (0, 32, 32, 3) and empty["mask"].shape == (0, 32, 32)


def test_augmentation_keeps_shapes_and_ignores_pixels_from_outside():
    assert augmentation(False) is None
    images, masks = make_kidney_phantoms(1, size=32, seed=0)
    example = {"image": images[0], "mask": masks[0]}
    transformed = [augmentation(True)(example, np.random.default_rng(i)) for i in range(8)]
    assert all(t["image"].shape == (32, 32, 3) and t["mask"].shape == (32, 32)
               for t in transformed)
    assert any((t["mask"] == IGNORE).any() for t in transformed)


def test_a_bad_mask_in_the_folder_stops_before_training(tmp_path):
    _folder(tmp_path)
    Image.fromarray(np.full((40, 30), 7, np.uint8)).save(tmp_path / "masks" / "c3.png")
    config = SegmentationConfig(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"))
    with pytest.raises(InputDataError, match="c3.png"):
        split_sources(config)
