"""The localisation system's data: a class-folder dataset or the synthetic cells, split into
training and validation, as the training batches and this host's share of the held-out images
(docs/wsol.md).

A folder's images are decoded when they are used (`jaxmed.data.images.ImageFiles`): each host
reads only its rows of every training batch and its share of the validation images. The
synthetic dataset is generated in memory, whole, on every host (the same on each).
"""

from __future__ import annotations

import grain
import numpy as np

from jaxmed.data.split import train_val_split
from jaxmed.data.synthetic_wsol import make_wsol_dataset
from jaxmed.data.wsol_folder import WsolDataset, load_wsol_folder
from jaxmed.errors import InputDataError
from jaxmed.training import ArraySource, host_share, make_batches
from jaxmed.wsol.config import WsolConfig


def load_dataset(config: WsolConfig) -> WsolDataset:
    """The folder at `config.data_dir` (images resized to `config.image_size`; ground-truth
    boxes from `config.boxes`, default `data_dir/boxes.csv` if present), or without it the
    synthetic dataset of `config`'s `synthetic_*` options, drawn from `config.seed`."""
    if config.data_dir:
        return load_wsol_folder(config.data_dir, image_size=config.image_size,
                                boxes_csv=config.boxes)
    return make_wsol_dataset(config.synthetic_images, image_size=config.image_size,
                             num_classes=config.synthetic_classes, seed=config.seed,
                             cooccurrence=config.synthetic_cooccurrence,
                             body_tint=config.synthetic_body_tint,
                             object_scale=config.synthetic_object_scale)


def split_dataset(dataset: WsolDataset, val_fraction: float = 0.2, seed: int = 0
                  ) -> tuple[WsolDataset, WsolDataset]:
    """`(train, val)`: `jaxmed.data.split.train_val_split` stratified by class (each class
    sends `round(n * val_fraction)` images to validation, at least 1 and at most `n - 1`); both
    parts keep the dataset's order.

    **Raises:** `InputDataError` when no class has the 2 images needed to hold one out.
    """
    train_idx, val_idx = train_val_split(len(dataset), val_fraction, seed,
                                         labels=dataset.labels)
    if len(val_idx) == 0:
        raise InputDataError(f"no class has 2 images ({len(dataset)} images, "
                             f"{len(dataset.class_names)} classes): nothing to validate on")
    return dataset.subset(train_idx), dataset.subset(val_idx)


def has_boxes(dataset: WsolDataset) -> bool:
    """Whether any image of `dataset` has a ground-truth box (localisation can be scored)."""
    return dataset.boxes is not None and any(len(b) for b in dataset.boxes)


def flip(example: dict, rng: np.random.Generator) -> dict:
    """The training augmentation: a random horizontal flip (labels do not move; training uses
    no boxes)."""
    if rng.random() < 0.5:
        example = {**example, "image": example["image"][:, ::-1]}
    return example


def train_batches(train_set: WsolDataset, batch_size: int, *, seed: int) -> grain.IterDataset:
    """This host's rows of every global training batch, `{'image': [B/P, S, S, 3] uint8,
    'label': [B/P] int32}`, shuffled each epoch and flipped (`flip`), in an order that does not
    depend on the process count."""
    source = ArraySource(image=train_set.images, label=train_set.labels)
    return make_batches(source, batch_size, seed=seed, transform=flip)


def held_out_share(val_set: WsolDataset) -> dict[str, np.ndarray]:
    """This process's share (`training.host_share`) of the validation images, decoded:
    `{'image': [n, S, S, 3] uint8, 'label': [n] int32}`."""
    share = host_share(len(val_set))
    return {"image": np.asarray(val_set.images[share]), "label": val_set.labels[share]}
