"""The feature atlas's data (docs/atlas.md): synthetic lesion images whose local features are
known (so a library can be scored), or a folder of class sub-folders of real images (the
layout `python -m train.wsol` reads; no annotations needed), split into training and held-out
images, as the classifier's training batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from jaxmed.atlas.config import ClassifierConfig
from jaxmed.data.split import train_val_split
from jaxmed.data.synthetic_lesions import make_lesion_dataset, neutral_backgrounds
from jaxmed.data.wsol_folder import load_wsol_folder
from jaxmed.errors import InputDataError
from jaxmed.training import ArraySource, make_batches


@dataclasses.dataclass(frozen=True, eq=False)
class AtlasData:
    """The images of a run.

    - `images`: uint8 `[N, S, S, 3]` (an array, or `ImageFiles` that decode when indexed).
    - `labels`: int32 `[N]`, indices into `class_names`.
    - `names`: `N` image names (the path relative to the folder, or `synthetic/<i>`).
    - `features`: bool `[N, F, S, S]` where each known feature shows (synthetic data only).
    - `feature_names`: the `F` known features (synthetic data only).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    names: list[str]
    features: np.ndarray | None = None
    feature_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "AtlasData":
        """The images at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.intp)
        return AtlasData(
            images=self.images[indices], labels=self.labels[indices],
            class_names=list(self.class_names), names=[self.names[i] for i in indices],
            features=None if self.features is None else self.features[indices],
            feature_names=self.feature_names)


def load_data(config: ClassifierConfig) -> AtlasData:
    """The folder at `config.data_dir` (images resized to `config.image_size`), or without it
    `config.synthetic_images` synthetic lesion images drawn from `config.seed`."""
    if config.data_dir:
        folder = load_wsol_folder(config.data_dir, image_size=config.image_size)
        return AtlasData(images=folder.images, labels=folder.labels,
                         class_names=list(folder.class_names), names=list(folder.paths))
    lesions = make_lesion_dataset(config.synthetic_images, image_size=config.image_size,
                                  seed=config.seed)
    return AtlasData(images=lesions.images, labels=lesions.labels,
                     class_names=list(lesions.class_names),
                     names=[f"synthetic/{i}" for i in range(len(lesions))],
                     features=lesions.features, feature_names=list(lesions.feature_names))


def backgrounds(count: int, image_size: int, seed: int) -> np.ndarray:
    """uint8 `[count, S, S, 3]` images without any feature, to paste crops into: the synthetic
    data's background (for folders too: a neutral tissue-like texture)."""
    return neutral_backgrounds(count, image_size=image_size, seed=seed + 7919)


def split_data(data: AtlasData, val_fraction: float, seed: int) -> tuple[AtlasData, AtlasData]:
    """`(train, held_out)`, stratified by class (`jaxmed.data.split.train_val_split`).

    **Raises:** `InputDataError` when no class has the 2 images needed to hold one out.
    """
    train_idx, val_idx = train_val_split(len(data), val_fraction, seed, labels=data.labels)
    if len(val_idx) == 0:
        raise InputDataError(f"no class has 2 images ({len(data)} images, "
                             f"{len(data.class_names)} classes): nothing to validate on")
    return data.subset(train_idx), data.subset(val_idx)


def dihedral(example: dict, rng: np.random.Generator) -> dict:
    """The training augmentation: a random flip and rotation by a multiple of 90 degrees (the
    label does not change with the orientation of a lesion's features)."""
    image = np.rot90(example["image"], k=int(rng.integers(4)))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return {**example, "image": np.ascontiguousarray(image)}


def train_batches(train_set: AtlasData, batch_size: int, *, seed: int,
                  augment: bool) -> grain.IterDataset:
    """This host's rows of every global batch, `{'image': [B/P, S, S, 3] uint8, 'label':
    [B/P] int32}`, shuffled each epoch (and augmented by `dihedral`)."""
    source = ArraySource(image=train_set.images, label=train_set.labels)
    return make_batches(source, batch_size, seed=seed, transform=dihedral if augment else None)
