"""Synthetic two-group data after the VA-GAN protocol (Baumgartner et al., CVPR 2018), 2-D and 3-D.

Every subject has a background of white Gaussian noise N(0, 50^2), Gaussian-smoothed
(sigma = 2.5 px, edges replicated as in VA-GAN's `skimage.filters.gaussian`) and rescaled to
standard deviation 50. Positive subjects also carry two planted squares (cubes in 3-D) of
intensity +100 (`EFFECT_SIZE`): one at the centre and one offset by `offset` px along every axis
with a random sign per axis, the offset jittered per axis by a uniform integer in
`[jitter_low, jitter_high]`. Controls have no effect. The effect map (returned by the
generators) is the planted squares (+100 inside, 0 elsewhere; overlapping squares are not
added). Intensities are raw: min-max scaling to [-1, 1] is the reader's job
(`jaxmed.data.nifti.normalise`).

Lengths at the reference size 112 are side 20, offset 32, jitter -5..+4, sigma 2.5. For any
other `size` (and in 3-D) every length is scaled by `size / 112` (rounded half up; sigma not
rounded), so the image looks the same at a coarser resolution: at 32 the cube side is 6, the
offset 9, the jitter -1..+1 and sigma 0.714 px. The VA-GAN code puts the second square on the
two diagonal directions only; here the sign is drawn per axis (4 positions in 2-D, 8 in 3-D;
see docs/mapping_gan.md).

`write_dataset` stores a dataset as NIfTI files readable by `jaxmed.data.nifti`.
"""

import csv
import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxmed.data.nifti import EFFECT_TAG, POSITIVE, write_volume

EFFECT_SIZE = 100.0
BACKGROUND_STD = 50.0
REFERENCE_SIZE = 112
REFERENCE_SUBJECTS = 10_000  # the VA-GAN protocol's dataset (5 000 controls)
DEFAULT_SUBJECTS = 1000
_REFERENCE = dict(side=20, offset=32, jitter_low=-5, jitter_high=4, sigma=2.5)
_PARAMS_FILE = "synthetic_vagan.json"
_FORMAT_VERSION = 1


class Protocol(NamedTuple):
    """Lengths (pixels/voxels) of the protocol at one image size."""

    side: int
    offset: int
    jitter_low: int
    jitter_high: int
    sigma: float


class SyntheticData(NamedTuple):
    """`images`, `effects`: float32 `(N, *spatial)`; `labels`: int32 `(N,)`, 1 = positive."""

    images: np.ndarray
    labels: np.ndarray
    effects: np.ndarray


def protocol(size: int) -> Protocol:
    """The protocol's lengths scaled from the reference size 112 to `size`."""
    scale = size / REFERENCE_SIZE

    def scaled(n: int) -> int:
        return int(np.floor(n * scale + 0.5))

    lengths = Protocol(
        side=max(scaled(_REFERENCE["side"]), 1),
        offset=scaled(_REFERENCE["offset"]),
        jitter_low=scaled(_REFERENCE["jitter_low"]),
        jitter_high=scaled(_REFERENCE["jitter_high"]),
        sigma=_REFERENCE["sigma"] * scale,
    )
    start = size // 2 - lengths.side // 2
    lowest = start - lengths.offset + lengths.jitter_low
    highest = start + lengths.offset + lengths.jitter_high + lengths.side
    fits = lowest >= 0 and highest <= size
    if not fits or lengths.offset + lengths.jitter_low < lengths.side:
        raise ValueError(f"size {size} is too small for two separate boxes inside the image: "
                         f"{lengths}")
    return lengths


def gaussian_smooth(x: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Separable Gaussian filter over all axes of `x`, edges replicated ('nearest').

    The kernel is the sampled Gaussian `exp(-k^2 / (2 sigma^2))`, `|k| <= round(truncate *
    sigma)`, normalised to sum 1 (the same definition as `scipy.ndimage.gaussian_filter`).
    """
    radius = int(truncate * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(x, dtype=np.float64)
    for axis in range(out.ndim):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        before = (slice(None),) * axis
        # Correlation as a sum over the 2 * radius + 1 taps of shifted views of the padded array.
        out = sum(w * padded[(*before, slice(k, k + n))] for k, w in enumerate(kernel))
    return out


def _background(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    smooth = gaussian_smooth(rng.normal(0.0, BACKGROUND_STD, size=shape), sigma)
    return smooth * (BACKGROUND_STD / smooth.std())


def _effect(rng: np.random.Generator, shape: tuple[int, ...], lengths: Protocol) -> np.ndarray:
    """The two planted squares/cubes of one positive subject."""
    ndim = len(shape)
    centre = np.array([n // 2 - lengths.side // 2 for n in shape])
    signs = rng.choice([-1, 1], size=ndim)
    jitter = rng.integers(lengths.jitter_low, lengths.jitter_high, endpoint=True, size=ndim)
    effect = np.zeros(shape)
    for start in (centre, centre + signs * lengths.offset + jitter):
        effect[tuple(slice(s, s + lengths.side) for s in start)] = EFFECT_SIZE
    return effect


def _labels(n_subjects: int) -> np.ndarray:
    """Positives first, then `n_subjects // 2` controls."""
    return (np.arange(n_subjects) < n_subjects - n_subjects // 2).astype(np.int32)


def _subjects(
    n_subjects: int, seed: int, size: int, ndim: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield `(label, image, effect)` one subject at a time (float32 `(size,) * ndim` arrays)."""
    lengths = protocol(size)
    shape = (size,) * ndim
    # One independent stream per subject: subject i does not depend on how many come after it.
    children = np.random.SeedSequence(seed).spawn(n_subjects)
    for label, child in zip(_labels(n_subjects), children):
        rng = np.random.default_rng(child)
        background = _background(rng, shape, lengths.sigma)
        effect = _effect(rng, shape, lengths) if label == POSITIVE else np.zeros(shape)
        yield int(label), (background + effect).astype(np.float32), effect.astype(np.float32)


def _generate(n_subjects: int, seed: int, size: int, ndim: int) -> SyntheticData:
    shape = (n_subjects, *(size,) * ndim)
    images, effects = np.empty(shape, np.float32), np.empty(shape, np.float32)
    for i, (_, image, effect) in enumerate(_subjects(n_subjects, seed, size, ndim)):
        images[i], effects[i] = image, effect
    return SyntheticData(images=images, labels=_labels(n_subjects), effects=effects)


def vagan_2d(n_subjects: int, seed: int, size: int = REFERENCE_SIZE) -> SyntheticData:
    """2-D VA-GAN data: `n_subjects - n_subjects // 2` positives first, then the controls.

    **Returns:** `SyntheticData` with `images`, `effects` of shape `(N, size, size)`.
    """
    return _generate(n_subjects, seed, size, ndim=2)


def vagan_3d(n_subjects: int, seed: int, size: int = 32) -> SyntheticData:
    """3-D analogue of `vagan_2d` (cubes; lengths scaled by `size / 112`).

    **Returns:** `SyntheticData` with `images`, `effects` of shape `(N, size, size, size)`.
    """
    return _generate(n_subjects, seed, size, ndim=3)


# ---------------------------------------------------------------------------- NIfTI dataset


def _subject_files(index: int, label: int) -> tuple[str, str]:
    """Paths (relative to the dataset folder) of a subject's volume and ground-truth map."""
    folder = "positive" if label == POSITIVE else "negative"
    return f"{folder}/sub-{index:04d}.nii.gz", f"{folder}/sub-{index:04d}{EFFECT_TAG}.nii.gz"


def _manifest_rows(labels: np.ndarray) -> list[tuple[str, int, str]]:
    rows = []
    for i, label in enumerate(labels):
        volume, effect = _subject_files(i, int(label))
        rows.append((volume, int(label), effect if label == POSITIVE else ""))
    return rows


def _is_complete(directory: Path, params: dict) -> bool:
    try:
        recorded = json.loads((directory / _PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return False
    if recorded != params:
        return False
    rows = _manifest_rows(_labels(params["n_subjects"]))
    files = ["manifest.csv"] + [f for volume, _, effect in rows for f in (volume, effect) if f]
    return all((directory / f).is_file() for f in files)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # a name of its own writer
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dataset(
    directory: str | os.PathLike,
    dims: int = 3,
    n_subjects: int = DEFAULT_SUBJECTS,
    seed: int = 0,
    size: int | None = None,
) -> Path:
    """Generate a VA-GAN dataset as NIfTI files (or reuse an identical complete one).

    Layout: `positive/sub-XXXX.nii.gz` with `positive/sub-XXXX_effect.nii.gz` beside it,
    `negative/sub-XXXX.nii.gz`, `manifest.csv` (columns path, label, effect_path; relative
    paths) and `synthetic_vagan.json` (the parameters, written last as the completion mark).
    Volumes are float32 raw intensities, identity affine (1 mm voxels); 2-D images are stored as
    `(size, size, 1)` volumes.

    Sign convention of the ground truth: the key feature map M(x) turns a positive into a
    negative, `y = x + M(x)`, so the stored map is minus the planted effect (-100 inside the
    squares). Controls' ground truth is zero and is not written (empty `effect_path`).

    If the folder holds a dataset with other parameters, its `sub-*.nii.gz` files in
    `positive/` and `negative/` are deleted before the new one is written; other files are kept.
    Meant for one writer at a time: a multi-process program lets one process write while the
    others wait (`jaxmed.mapping_gan.data.synthetic_subjects`).

    **Arguments:**

    - `directory`: dataset folder (created if needed).
    - `dims`: 2 or 3.
    - `n_subjects`: total count, half of them controls.
    - `seed`: generator seed.
    - `size`: image side; default 112 in 2-D, 32 in 3-D.

    **Returns:** the path of `manifest.csv`.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if n_subjects < 2:
        raise ValueError(f"need at least 2 subjects (one per group), got {n_subjects}")
    size = (REFERENCE_SIZE if dims == 2 else 32) if size is None else size
    directory = Path(directory)
    params = dict(
        protocol="vagan", version=_FORMAT_VERSION, dims=dims, n_subjects=n_subjects, seed=seed,
        size=size,
    )
    manifest = directory / "manifest.csv"
    if _is_complete(directory, params):
        return manifest
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _PARAMS_FILE).unlink(missing_ok=True)
    for folder in ("positive", "negative"):
        for stale in (directory / folder).glob("sub-*.nii.gz"):
            stale.unlink()
    rows = _manifest_rows(_labels(n_subjects))
    volume_shape = (size, size, 1) if dims == 2 else (size,) * 3
    # Streamed one subject at a time: a large dataset never sits in memory whole.
    subjects = _subjects(n_subjects, seed, size, dims)
    for (volume, label, effect), (_, image, planted) in zip(rows, subjects):
        write_volume(image.reshape(volume_shape), directory / volume)
        if label == POSITIVE:
            key_feature_map = 0.0 - planted  # 0.0 - x: no negative zeros
            write_volume(key_feature_map.reshape(volume_shape), directory / effect)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([("path", "label", "effect_path"), *rows])
    _write_text_atomic(manifest, text.getvalue())
    _write_text_atomic(directory / _PARAMS_FILE, json.dumps(params, indent=1) + "\n")
    return manifest
