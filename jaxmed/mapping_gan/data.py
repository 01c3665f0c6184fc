"""A mapping-GAN study: two groups of volumes in memory, split 4:1, and per-step batches.

Volumes are small enough (tens of MB for hundreds of 32³ subjects) to hold in host memory;
each training step's batch is drawn from them by a generator seeded with (seed, step), so the
data order of a resumed or multi-host run is the uninterrupted single-host one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import grain
import jax
import numpy as np

from jaxmed.data import nifti
from jaxmed.data.split import train_val_split
from jaxmed.data.transforms import pad_to_multiple
from jaxmed.errors import InputDataError


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One side of the split. `images`: float32 `(N, *S, C)` in [-1, 1], padded so every
    spatial length divides the U-Net's downsampling; `labels`: `(N,)`, 1 = positive;
    `effects`: ground-truth key feature maps `(N, *S, 1)` (zeros for controls) or None when
    the study has none; `subjects`: the files."""

    images: np.ndarray
    labels: np.ndarray
    effects: np.ndarray | None
    subjects: tuple[nifti.Subject, ...]

    def group(self, label: int) -> np.ndarray:
        return self.images[self.labels == label]


@dataclasses.dataclass(frozen=True, eq=False)
class Study:
    """Train and validation splits plus what is needed to write maps back.

    `crop` undoes the padding (`jaxmed.data.transforms.crop_back`); `spatial_dims` is 2 when the files are
    single-slice (Z = 1) volumes, which are then handled as 2-D images `(X, Y, C)`.
    """

    train: Split
    val: Split
    crop: tuple[slice, ...]
    spatial_dims: int
    channels: int


def find_subjects(positive_dir: str | None, negative_dir: str | None,
                  manifest: str | None) -> list[nifti.Subject]:
    """Subjects from a CSV manifest or from the two group folders (exactly one of the two)."""
    if manifest:
        if positive_dir or negative_dir:
            raise InputDataError(f"{manifest}: give either a manifest or the two group folders, not both")
        return nifti.read_manifest(manifest)
    if not (positive_dir and negative_dir):
        raise InputDataError("need both --positive-dir and --negative-dir (or --manifest)")
    return nifti.discover_groups(positive_dir, negative_dir)


def load_study(subjects: Sequence[nifti.Subject], *, downsampling: int, val_fraction: float = 0.2,
               seed: int = 0, normalisation: str = "minmax",
               percentiles: tuple[float, float] = (1.0, 99.0)) -> Study:
    """Reads, normalises to [-1, 1], pads and splits (stratified, seeded) all subjects.

    **Raises:** `InputDataError` naming the file for unreadable files, NaN/inf voxels, constant
    volumes, shapes that differ between subjects, or a group without members.
    """
    for label, name in ((nifti.POSITIVE, "positive"), (nifti.NEGATIVE, "negative")):
        if not any(s.label == label for s in subjects):
            raise InputDataError(f"the {name} group is empty: nothing to learn the mapping from")
    x, y, z, channels = nifti.check_shapes(subjects)
    spatial_dims = 2 if z == 1 else 3
    images = np.stack([_prepared(nifti.read_normalised(s.path, normalisation, percentiles).data,
                                 spatial_dims) for s in subjects])
    effects = _effects(subjects, spatial_dims)
    padded, crop = _pad(images, downsampling)
    if effects is not None:
        effects, _ = _pad(effects, downsampling, mode="constant")
    labels = np.array([s.label for s in subjects], np.int32)
    train_idx, val_idx = train_val_split(len(labels), val_fraction, seed, labels=labels)

    def split(idx):
        return Split(padded[idx], labels[idx], None if effects is None else effects[idx],
                     tuple(subjects[i] for i in idx))

    return Study(split(train_idx), split(val_idx), crop, spatial_dims, channels)


def _prepared(data: np.ndarray, spatial_dims: int) -> np.ndarray:
    """(X, Y, Z, C) → (X, Y, C) for single-slice studies, unchanged otherwise."""
    return data[:, :, 0, :] if spatial_dims == 2 else data


def _effects(subjects: Sequence[nifti.Subject], spatial_dims: int) -> np.ndarray | None:
    """Ground-truth maps `(N, *S, 1)`; zeros for subjects without one (controls); None when no
    subject of the study has one."""
    if not any(s.effect_path for s in subjects):
        return None
    shape = None
    maps = []
    for s in subjects:
        if s.effect_path is None:
            maps.append(None)
            continue
        data = _prepared(nifti.read_volume(s.effect_path, allow_constant=True).data, spatial_dims)
        maps.append(data[..., :1])
        shape = data[..., :1].shape
    return np.stack([np.zeros(shape, np.float32) if m is None else m for m in maps])


def _pad(batch: np.ndarray, multiple: int, mode: str = "edge") -> tuple[np.ndarray, tuple[slice, ...]]:
    padded, crop = pad_to_multiple(batch, multiple, spatial_axes=range(1, batch.ndim - 1), mode=mode)
    return padded, crop[1:-1]  # spatial axes only


# ------------------------------------------------------------------------------ batches


def critic_updates(generator_step: int, *, n_critic: int = 5, n_critic_warmup: int = 100,
                   warmup_steps: int = 25, warmup_every: int = 100) -> int:
    """Critic updates before generator update `generator_step` (VA-GAN / WGAN-GP schedule):
    `n_critic_warmup` during the first `warmup_steps` generator steps and every
    `warmup_every`-th, `n_critic` otherwise."""
    warm = generator_step < warmup_steps or (warmup_every and generator_step % warmup_every == 0)
    return n_critic_warmup if warm else n_critic


@dataclasses.dataclass(frozen=True)
class StepBatches:
    """Random-access source of per-step batches: element `s` is this host's rows of step s.

    Each step needs `k = critic_updates(s)` critic minibatches and one generator minibatch:
    `{'negative': (b, k, *S, C), 'positive': (b, k + 1, *S, C)}` where b is this host's share
    of the global batch (the critic's k minibatches and the generator's are drawn
    independently, with replacement across steps, without within a minibatch).
    """

    positives: np.ndarray
    negatives: np.ndarray
    global_batch_size: int
    seed: int
    schedule: dict

    def __len__(self) -> int:
        return 2**62  # steps are unbounded; fit() decides how many to take

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        k = critic_updates(step, **self.schedule)
        rng = np.random.default_rng([self.seed, step])
        negative = _draw(rng, self.negatives, k, self.global_batch_size)
        positive = _draw(rng, self.positives, k + 1, self.global_batch_size)
        rows = _host_rows(self.global_batch_size)
        return {"negative": negative[rows], "positive": positive[rows]}


def _draw(rng: np.random.Generator, group: np.ndarray, minibatches: int, batch: int) -> np.ndarray:
    """(batch, minibatches, *S, C): each minibatch without replacement (if the group allows)."""
    replace = batch > len(group)
    idx = np.stack([rng.choice(len(group), batch, replace=replace) for _ in range(minibatches)], 1)
    return group[idx]


def _host_rows(global_batch: int) -> slice:
    count, index = jax.process_count(), jax.process_index()
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} is not divisible by {count} processes")
    per_host = global_batch // count
    return slice(index * per_host, (index + 1) * per_host)


def step_batches(split: Split, global_batch_size: int, seed: int, **schedule) -> grain.IterDataset:
    """Checkpointable stream of `StepBatches` elements, starting at step 0."""
    source = StepBatches(split.group(nifti.POSITIVE), split.group(nifti.NEGATIVE),
                         global_batch_size, seed, schedule)
    return grain.MapDataset.source(source).to_iter_dataset()


def validation_arrays(split: Split, max_subjects: int | None = None) -> dict[str, np.ndarray]:
    """Validation positives (with their ground truth if any) and negatives."""
    pos = split.labels == nifti.POSITIVE
    out = {"positive": split.images[pos][:max_subjects], "negative": split.group(nifti.NEGATIVE)[:max_subjects]}
    if split.effects is not None:
        out["effect"] = split.effects[pos][:max_subjects]
    return out


def subject_names(subjects: Sequence[nifti.Subject]) -> list[str]:
    return [Path(s.path).name.split(".nii")[0] for s in subjects]


def crop_spatial(x: np.ndarray, crop: tuple[slice, ...]) -> np.ndarray:
    """Undo the padding of one `(*S, C)` array."""
    return x[(*crop, slice(None))]
