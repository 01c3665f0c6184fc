"""The localisation system's data: the stratified split, the flip, and a host decoding only its
share of a folder's validation images and its rows of the training batches."""

import numpy as np
import pytest

from jaxmed.data import images
from jaxmed.data.synthetic_wsol import make_wsol_dataset, write_wsol_folder
from jaxmed.errors import InputDataError
from jaxmed.training import ArraySource, host_share
from jaxmed.wsol import data
from jaxmed.wsol.config import WsolConfig


def test_split_is_stratified_and_keeps_every_field():
    dataset = make_wsol_dataset(40, image_size=32, num_classes=4, seed=0)
    train, val = data.split_dataset(dataset, 0.2, seed=3)
    assert np.all(np.bincount(val.labels) == 2) and np.all(np.bincount(train.labels) == 8)
    assert sorted(train.paths + val.paths) == sorted(dataset.paths)
    again, _ = data.split_dataset(dataset, 0.2, seed=3)
    assert again.paths == train.paths
    i = dataset.paths.index(val.paths[0])
    np.testing.assert_array_equal(val.images[0], dataset.images[i])
    np.testing.assert_array_equal(val.masks[0], dataset.masks[i])
    np.testing.assert_array_equal(val.boxes[0], dataset.boxes[i])


def test_flip_mirrors_the_image_only():
    example = {"image": np.arange(2 * 3 * 3).reshape(2, 3, 3), "label": np.int32(1)}
    flips = [data.flip(example, np.random.default_rng(s)) for s in range(20)]
    mirrored = [f for f in flips if not np.array_equal(f["image"], example["image"])]
    assert 0 < len(mirrored) < 20
    for f in mirrored:
        np.testing.assert_array_equal(f["image"], example["image"][:, ::-1])
        assert f["label"] == 1


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    """A folder dataset loaded through the program's path, and the list of files it decodes."""
    write_wsol_folder(make_wsol_dataset(12, image_size=32, num_classes=2, seed=4), tmp_path)
    reads = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda path, **kw: reads.append(path) or real(path))
    config = WsolConfig(data_dir=str(tmp_path), image_size=32)
    return data.load_dataset(config), reads


def test_a_host_decodes_only_its_share_of_the_validation_images(folder, monkeypatch):
    dataset, reads = folder
    _, val = data.split_dataset(dataset, 0.5, seed=0)
    assert reads == [] and dataset.boxes is not None and data.has_boxes(val)
    monkeypatch.setattr("jax.process_count", lambda: 2)
    monkeypatch.setattr("jax.process_index", lambda: 1)
    local = data.held_out_share(val)
    share = host_share(len(val), 1, 2)
    assert sorted(map(str, reads)) == sorted(str(p) for p in val.images.paths[share])
    assert local["image"].shape == (share.stop - share.start, 32, 32, 3)
    np.testing.assert_array_equal(local["label"], val.labels[share])


def test_training_examples_are_decoded_one_by_one(folder):
    """`make_batches` asks the source for this host's rows only (tests/training/test_data.py);
    the source decodes the one image it is asked for."""
    dataset, reads = folder
    train, _ = data.split_dataset(dataset, 0.5, seed=0)
    source = ArraySource(image=train.images, label=train.labels)
    example = source[3]
    assert reads == [train.images.paths[3]] and example["image"].shape == (32, 32, 3)
    batch = next(iter(data.train_batches(train, 4, seed=0)))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32


def test_a_split_without_validation_images_names_the_problem():
    dataset = make_wsol_dataset(2, image_size=32, num_classes=2, seed=0)  # one image per class
    with pytest.raises(InputDataError, match="no class has 2 images"):
        data.split_dataset(dataset, 0.5)
