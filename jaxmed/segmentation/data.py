"""The training and validation sources of a segmentation run.

Examples are `{'image': [S, S, 3] uint8, 'mask': [S, S] int32}`, letterboxed to the model size
`S` (aspect kept, grey padding; the mask's padding is `IGNORE`). The synthetic phantoms are
generated whole, in memory, on every host (no files). A folder of image/mask pairs is checked
up front on every host (file headers and the masks' class numbers, so a bad file stops every
host before the run touches its work directory) and then read lazily: `PairSource[i]` decodes
and letterboxes one pair when a batch asks for it, so each host decodes only the images of its
own rows. The split is `jaxmed.data.split.train_val_split` (seeded, not stratified).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from jaxmed.data.augment import augment_pair
from jaxmed.data.letterbox import letterbox
from jaxmed.data.segmentation_folder import SegmentationPair, load_segmentation_folder, read_pair
from jaxmed.data.split import train_val_split
from jaxmed.data.synthetic_kidney import make_kidney_phantoms
from jaxmed.segmentation.config import SegmentationConfig
from jaxmed.training import ArraySource, RandomAccessSource

Example = dict[str, np.ndarray]

# Pixels of this label (the letterbox padding) take no part in the loss or the metrics.
IGNORE = 255


def letterboxed_pair(image: np.ndarray, mask: np.ndarray, size: int) -> Example:
    """An image `[H, W, 3]` and its mask `[H, W]` letterboxed to `[S, S, 3]` uint8 (bilinear,
    grey padding) and `[S, S]` int32 (nearest, `IGNORE` padding)."""
    boxed = letterbox(image, size, order=1)[0]
    label = letterbox(mask, size, order=0, fill=IGNORE)[0]
    return {"image": boxed.astype(np.uint8), "mask": label.astype(np.int32)}


class PairSource:
    """Random access to image/mask file pairs, read and letterboxed when asked.

    **Arguments:**

    - `pairs`: the files, e.g. from `load_segmentation_folder`.
    - `num_classes`: mask values must be class numbers below it (checked on reading).
    - `size`: the model size `S`.
    """

    def __init__(self, pairs: Sequence[SegmentationPair], num_classes: int, size: int):
        self.pairs, self.num_classes, self.size = list(pairs), num_classes, size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        image, mask = read_pair(*self.pairs[index], self.num_classes)
        return letterboxed_pair(image, mask, self.size)


class Subset:
    """The examples `rows` of `source`, in that order (`subset[i] = source[rows[i]]`)."""

    def __init__(self, source: RandomAccessSource, rows: np.ndarray):
        self.source, self.rows = source, np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        return self.source[int(self.rows[index])]


def all_examples(config: SegmentationConfig) -> RandomAccessSource:
    """Every example of the run, before the split: the folder's pairs (lazily read) or
    `config.synthetic_images` phantoms of `config.image_size` (in memory)."""
    if config.images:
        pairs = load_segmentation_folder(config.images, config.masks,
                                         num_classes=config.num_classes,
                                         mask_suffix=config.mask_suffix, check_values=True)
        return PairSource(pairs, config.num_classes, config.image_size)
    images, masks = make_kidney_phantoms(config.synthetic_images, size=config.image_size,
                                         seed=config.seed)
    return ArraySource(image=images.astype(np.uint8), mask=masks.astype(np.int32))


def split_sources(config: SegmentationConfig) -> tuple[Subset, Subset]:
    """`(train, held_out)`: the run's examples split by `config.val_fraction` and `seed`."""
    examples = all_examples(config)
    train_rows, val_rows = train_val_split(len(examples), config.val_fraction, config.seed)
    return Subset(examples, train_rows), Subset(examples, val_rows)


def read_rows(source: RandomAccessSource, rows: slice) -> dict[str, np.ndarray]:
    """`source[i]` for each `i` in `rows`, stacked: `{'image': [n, S, S, 3], 'mask': [n, S, S]}`
    (e.g. this host's share of the held-out examples, `training.host_share`)."""
    indices = range(len(source))[rows]
    examples = [source[i] for i in indices] or [source[0]]  # an empty share keeps the shapes
    return {k: np.stack([e[k] for e in examples])[: len(indices)] for k in examples[0]}


def augmentation(enabled: bool
                 ) -> Callable[[Example, np.random.Generator], Example] | None:
    """The training transform (`make_batches`' `transform`): `augment_pair`'s flips, small
    rotations and zooms and intensity jitter, pixels from outside the image `IGNORE`d;
    None when `enabled` is False."""

    def transform(example: Example, rng: np.random.Generator) -> Example:
        image, mask = augment_pair(example["image"], example["mask"], rng, mask_fill=IGNORE)
        return {"image": image, "mask": mask}

    return transform if enabled else None
