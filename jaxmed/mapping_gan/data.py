"""A mapping-GAN study: two groups of NIfTI volumes, split 4:1, and the per-step batches.

The subjects, their groups and the split are known from the file names and headers; a volume's
voxels are read (normalised to [-1, 1] and padded to the U-Net's multiple) only when something
asks for it, and kept once read (`Volumes`). So a host reads the training volumes its rows of
each step need and its share of the validation subjects, not the whole study. Each training
step's batch is drawn by a generator seeded with (seed, step), so the data order of a resumed
or multi-host run is the uninterrupted single-host one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxmed.data import nifti, synthetic_vagan
from jaxmed.data.split import train_val_split
from jaxmed.data.transforms import pad_to_multiple
from jaxmed.errors import InputDataError


@dataclasses.dataclass(frozen=True, eq=False)
class Volumes:
    """Random access to prepared volumes of a list of files, each read by `read` on first
    access and kept (`cache`, shared by the subsets of one study).

    **Fields:** `paths`: the files; `shape`: every volume's `(*S, C)`; `read`: `path ->
    float32 (*S, C)`; `cache`: `path -> array`.
    """

    paths: tuple[Path | None, ...]
    shape: tuple[int, ...]
    read: Callable[[Path | None], np.ndarray]
    cache: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.paths[index]
        if path not in self.cache:  # threads may read a file twice; both reads are equal
            self.cache[path] = self.read(path)
        return self.cache[path]

    def subset(self, indices: Sequence[int]) -> Volumes:
        """The volumes at `indices`, sharing this one's cache."""
        return dataclasses.replace(self, paths=tuple(self.paths[i] for i in indices))

    def stack(self, rows: slice = slice(None)) -> np.ndarray:
        """`(n, *S, C)`: the volumes at `rows`, read now if not yet."""
        indices = range(len(self))[rows]
        if not len(indices):
            return np.zeros((0, *self.shape), np.float32)
        return np.stack([self[i] for i in indices])

    def load(self, rows: slice = slice(None)) -> None:
        """Read the volumes at `rows` now (e.g. to find bad files before training starts)."""
        for i in range(len(self))[rows]:
            self[i]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One side of the split. `subjects`: the files; `labels`: `(N,)`, 1 = positive; `images`:
    their volumes, float32 `(*S, C)` in [-1, 1], padded so every spatial length divides the
    U-Net's downsampling; `effects`: ground-truth key feature maps `(*S, 1)` (zeros for
    subjects without one), or None when the study has none."""

    subjects: tuple[nifti.Subject, ...]
    labels: np.ndarray
    images: Volumes
    effects: Volumes | None

    def __len__(self) -> int:
        return len(self.subjects)

    def group(self, label: int) -> Volumes:
        """The volumes of one group (`nifti.POSITIVE` or `nifti.NEGATIVE`)."""
        return self.images.subset(np.flatnonzero(self.labels == label))

    def arrays(self, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """`{'image': (n, *S, C), 'label': (n,)[, 'effect': (n, *S, 1)]}` of the subjects at
        `rows`, e.g. this host's `jaxmed.training.host_share`; reads them now."""
        out = {"image": self.images.stack(rows), "label": self.labels[rows]}
        if self.effects is not None:
            out["effect"] = self.effects.stack(rows)
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Study:
    """Train and validation splits plus what is needed to write maps back.

    `crop` undoes the padding (one slice per spatial axis, `jaxmed.data.transforms.crop_back`);
    `spatial_dims` is 2 when the files are single-slice (Z = 1) volumes, which are then handled
    as 2-D images `(X, Y, C)`; `input_shape` is the padded `(*S, C)` the networks see;
    `has_truth`: some subject has a ground-truth map.
    """

    train: Split
    val: Split
    crop: tuple[slice, ...]
    spatial_dims: int
    channels: int
    input_shape: tuple[int, ...]
    has_truth: bool

    def shapes(self) -> dict:
        """The values of `config.json` that come from the data's shape."""
        return dict(spatial_dims=self.spatial_dims, channels=self.channels,
                    input_shape=list(self.input_shape))


# ------------------------------------------------------------------------------ subjects


def find_subjects(positive_dir: str | None, negative_dir: str | None,
                  manifest: str | None) -> list[nifti.Subject]:
    """Subjects from a CSV manifest or from the two group folders (exactly one of the two)."""
    if manifest:
        if positive_dir or negative_dir:
            raise InputDataError(
                f"{manifest}: give either a manifest or the two group folders, not both")
        return nifti.read_manifest(manifest)
    if not (positive_dir and negative_dir):
        raise InputDataError("need both --positive-dir and --negative-dir (or --manifest)")
    return nifti.discover_groups(positive_dir, negative_dir)


def synthetic_subjects(folder: str | Path, *, dims: int, n_subjects: int, seed: int,
                       size: int) -> list[nifti.Subject]:
    """The synthetic VA-GAN study in `folder` (`jaxmed.data.synthetic_vagan.write_dataset`),
    written once by process 0 while the other processes wait (reused when complete)."""
    if jax.process_index() == 0:
        synthetic_vagan.write_dataset(folder, dims=dims, n_subjects=n_subjects, seed=seed,
                                      size=size)
    multihost_utils.sync_global_devices("mapping_gan: synthetic study written")
    return nifti.read_manifest(Path(folder) / "manifest.csv")


# ------------------------------------------------------------------------------- study


def load_study(subjects: Sequence[nifti.Subject], *, downsampling: int,
               val_fraction: float = 0.2, seed: int = 0, normalisation: str = "minmax",
               percentiles: tuple[float, float] = (1.0, 99.0)) -> Study:
    """Checks the subjects' shapes (from the headers) and splits them (stratified, seeded);
    their volumes are read, normalised to [-1, 1] and padded when first used.

    **Raises:** `InputDataError` naming the file for unreadable headers or shapes that differ
    between subjects, and for a group without members or without a validation subject;
    reading a volume raises it for NaN/inf voxels, constant volumes or unreadable data.
    """
    for label, name in ((nifti.POSITIVE, "positive"), (nifti.NEGATIVE, "negative")):
        if not any(s.label == label for s in subjects):
            raise InputDataError(f"the {name} group is empty: nothing to learn the mapping from")
    x, y, z, channels = nifti.check_shapes(subjects)
    spatial_dims = 2 if z == 1 else 3
    spatial = (x, y) if spatial_dims == 2 else (x, y, z)
    # The padding of one volume of the study's shape: every volume is padded alike.
    padded, crop = pad_to_multiple(np.zeros((*spatial, channels), np.float32), downsampling)
    input_shape = padded.shape
    read_image = functools.partial(_read_image, spatial_dims=spatial_dims, multiple=downsampling,
                                   normalisation=normalisation, percentiles=tuple(percentiles))
    read_effect = functools.partial(_read_effect, shape=spatial, spatial_dims=spatial_dims,
                                    multiple=downsampling)
    images = Volumes(tuple(s.path for s in subjects), input_shape, read_image)
    effects = Volumes(tuple(s.effect_path for s in subjects), (*input_shape[:-1], 1), read_effect)
    has_truth = any(s.effect_path for s in subjects)
    labels = np.array([s.label for s in subjects], np.int32)
    train_idx, val_idx = train_val_split(len(labels), val_fraction, seed, labels=labels)
    for label, name in ((nifti.POSITIVE, "positive"), (nifti.NEGATIVE, "negative")):
        if not (labels[val_idx] == label).any():
            raise InputDataError(f"no {name} subject is held out for validation: each group "
                                 "needs at least 2 subjects and --val-fraction above 0")

    def split(idx):
        return Split(tuple(subjects[i] for i in idx), labels[idx], images.subset(idx),
                     effects.subset(idx) if has_truth else None)

    return Study(split(train_idx), split(val_idx), crop[:-1], spatial_dims, channels,
                 input_shape, has_truth)


def _prepared(data: np.ndarray, spatial_dims: int) -> np.ndarray:
    """(X, Y, Z, C) → (X, Y, C) for single-slice studies, unchanged otherwise."""
    return data[:, :, 0, :] if spatial_dims == 2 else data


def _read_image(path: Path, *, spatial_dims: int, multiple: int, normalisation: str,
                percentiles: tuple[float, float]) -> np.ndarray:
    """One subject's volume in [-1, 1], edge-padded to `multiple`."""
    data = _prepared(nifti.read_normalised(path, normalisation, percentiles).data, spatial_dims)
    return pad_to_multiple(data, multiple, mode="edge")[0]


def _read_effect(path: Path | None, *, shape: tuple[int, ...], spatial_dims: int,
                 multiple: int) -> np.ndarray:
    """One subject's ground-truth map `(*S, 1)`, zero-padded to `multiple`; zeros for a subject
    without one (a control)."""
    if path is None:
        data = np.zeros((*shape, 1), np.float32)
    else:
        data = _prepared(nifti.read_volume(path, allow_constant=True).data, spatial_dims)[..., :1]
    return pad_to_multiple(data, multiple, mode="constant")[0]


# ------------------------------------------------------------------------------ batches


def critic_updates(generator_step: int, *, n_critic: int = 5, n_critic_warmup: int = 100,
                   warmup_steps: int = 25, warmup_every: int = 100) -> int:
    """Critic updates before generator update `generator_step` (VA-GAN / WGAN-GP schedule):
    `n_critic_warmup` during the first `warmup_steps` generator steps and every
    `warmup_every`-th, `n_critic` otherwise."""
    warm = generator_step < warmup_steps or (warmup_every and generator_step % warmup_every == 0)
    return n_critic_warmup if warm else n_critic


@dataclasses.dataclass(frozen=True, eq=False)
class StepBatches:
    """Random-access source of per-step batches: element `s` is this host's rows of step s.

    Each step needs `k = critic_updates(s)` critic minibatches and one generator minibatch:
    `{'negative': (b, k, *S, C), 'positive': (b, k + 1, *S, C)}` where b is this host's share
    of the global batch (the critic's k minibatches and the generator's are drawn
    independently, with replacement across steps, without within a minibatch). Every host
    draws the same global batch and reads only the volumes of its own rows.

    **Fields:** `positives`, `negatives`: random-access volumes `(*S, C)` of each group
    (`Volumes` or arrays); `global_batch_size`; `seed`; `schedule`: `critic_updates`' options.
    """

    positives: Volumes | np.ndarray
    negatives: Volumes | np.ndarray
    global_batch_size: int
    seed: int
    schedule: dict

    def __len__(self) -> int:
        return 2**62  # steps are unbounded; fit() decides how many to take

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        k = critic_updates(step, **self.schedule)
        rng = np.random.default_rng([self.seed, step])
        negative = _draw(rng, len(self.negatives), k, self.global_batch_size)
        positive = _draw(rng, len(self.positives), k + 1, self.global_batch_size)
        rows = _host_rows(self.global_batch_size)
        return {"negative": _gather(self.negatives, negative[rows]),
                "positive": _gather(self.positives, positive[rows])}


def _draw(rng: np.random.Generator, group_size: int, minibatches: int, batch: int) -> np.ndarray:
    """Indices `(batch, minibatches)`: each minibatch without replacement (if the group
    allows)."""
    replace = batch > group_size
    return np.stack([rng.choice(group_size, batch, replace=replace)
                     for _ in range(minibatches)], 1)


def _gather(group: Volumes | np.ndarray, indices: np.ndarray) -> np.ndarray:
    """`group[indices]`: `(*indices.shape, *S, C)`."""
    volumes = [group[int(i)] for i in indices.ravel()]
    return np.stack(volumes).reshape(*indices.shape, *volumes[0].shape)


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
    # Element s is a pure function of s, so how far ahead it is read changes nothing.
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    return grain.MapDataset.source(source).to_iter_dataset(options)


def subject_names(subjects: Sequence[nifti.Subject]) -> list[str]:
    return [Path(s.path).name.split(".nii")[0] for s in subjects]


def crop_spatial(x: np.ndarray, crop: tuple[slice, ...]) -> np.ndarray:
    """Undo the padding of one `(*S, C)` array."""
    return x[(*crop, slice(None))]
