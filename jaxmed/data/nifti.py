"""NIfTI volumes for the mapping GAN: reading, checking, normalising, group discovery, writing.

Free of JAX (numpy + nibabel only), so data preparation never touches an accelerator.

Conventions:

- A volume is a float32 array `(X, Y, Z, C)`. 3-D files get `C = 1`; in 4-D files the 4th axis
  (e.g. fMRI time points) is the channel axis; files with more axes are accepted only when the
  extra trailing axes all have length 1 (they are squeezed). 2-D images are stored as
  `(X, Y, 1)` volumes, so they read as `(X, Y, 1, C)`.
- Group labels: `1` = positive (e.g. drug), `0` = negative (e.g. saline / control).
- Ground-truth key feature maps (optional, e.g. for synthetic data): `<name>_effect.nii[.gz]`
  beside `<name>.nii[.gz]`. They hold the map M(x) that turns the positive volume into a
  negative one, `y = x + M(x)`, in the raw (un-normalised) intensity units of the volume. A
  negative subject without a map has ground truth zero. Folder discovery never treats
  `*_effect` files as subjects; a map without its volume is ignored.
- Hidden files (name starting with ".") are ignored, which also hides the temporary files of
  interrupted atomic writes.
- Every problem with the user's files raises `jaxmed.errors.InputDataError` naming the file.
"""

import csv
import dataclasses
import io
import os
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from jaxmed.errors import InputDataError

POSITIVE = 1
NEGATIVE = 0
EFFECT_TAG = "_effect"
_GROUP_NAMES = {POSITIVE: "positive", NEGATIVE: "negative"}
# What nibabel raises for missing, foreign, truncated or corrupt files.
_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error)


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value
class Volume:
    """One loaded NIfTI volume.

    **Fields:**

    - `data`: float32 `(X, Y, Z, C)` in the file's intensity units (scaling applied).
    - `affine`: `(4, 4)` voxel-to-world matrix.
    - `header`: a copy of the file's NIfTI header (reused when maps are written back).
    - `path`: the file it came from.
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any
    path: Path

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self.data.shape[:3]

    @property
    def channels(self) -> int:
        return self.data.shape[3]


@dataclasses.dataclass(frozen=True)
class Subject:
    """One input file of a group: `label` 1 = positive, 0 = negative; `effect_path` = its
    ground-truth key feature map, if any."""

    path: Path
    label: int
    effect_path: Path | None = None


# ---------------------------------------------------------------------------- reading


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _load_image(path: str | os.PathLike) -> Any:
    """`nib.load` (header only, data stays on disk) with user-facing errors."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"{path}: file not found")
    if not path.is_file():
        raise InputDataError(f"{path}: not a regular file")
    try:
        return nib.load(path)
    except _READ_ERRORS as e:
        raise InputDataError(
            f"{path}: cannot read as NIfTI, the file is corrupt or not NIfTI ({_describe(e)})"
        ) from e


def _xyzc_shape(shape: Sequence[int], path: Path) -> tuple[int, int, int, int]:
    """The `(X, Y, Z, C)` shape of a file of shape `shape`, or InputDataError."""
    squeezed = tuple(int(n) for n in shape)
    while len(squeezed) > 4 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) == 3:
        return (*squeezed, 1)
    if len(squeezed) == 4:
        return squeezed
    raise InputDataError(
        f"{path}: unsupported {len(shape)}-D volume of shape {tuple(shape)}; expected 3-D "
        "(X, Y, Z) or "
        "4-D (X, Y, Z, C) (store 2-D images as (X, Y, 1))"
    )


def _check_finite(data: np.ndarray, path: Path) -> None:
    n_bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if n_bad:
        n_nan = int(np.count_nonzero(np.isnan(data)))
        raise InputDataError(
            f"{path}: {n_bad} of {data.size} voxels are not finite ({n_nan} NaN, "
            f"{n_bad - n_nan} infinite)"
        )


def read_volume(path: str | os.PathLike, *, allow_constant: bool = False) -> Volume:
    """Read one NIfTI file as a float32 `(X, Y, Z, C)` volume.

    **Arguments:**

    - `path`: a `.nii` or `.nii.gz` file.
    - `allow_constant`: accept a constant volume (for ground-truth maps, which may be all zero).

    **Returns:** a `Volume` (raw intensities; see `normalise`).

    **Raises:** `InputDataError` naming the file when it is missing, unreadable, corrupt or
    truncated, not 3-D/4-D, contains NaN/inf voxels (with their count), or is constant.
    """
    path = Path(path)
    image = _load_image(path)
    shape = _xyzc_shape(image.shape, path)
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    except _READ_ERRORS as e:
        raise InputDataError(
            f"{path}: cannot read the voxel data, the file is truncated or corrupt ({_describe(e)})"
        ) from e
    _check_finite(data, path)
    if not allow_constant and data.min() == data.max():
        raise InputDataError(
            f"{path}: constant volume (every voxel is {data.flat[0]:g}); it cannot be min-max "
            "normalised"
        )
    affine = np.array(image.affine, dtype=np.float64)
    return Volume(data=data, affine=affine, header=image.header.copy(), path=path)


def normalise(
    x: np.ndarray, method: str = "minmax", percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Map one volume's intensities to [-1, 1].

    `minmax`: `2 (x - min) / (max - min) - 1` over all voxels and channels. `percentile` (robust
    to outliers): clip to the `percentiles` (low, high) of the volume first, then map the clipped
    range to [-1, 1] the same way.

    **Arguments:**

    - `x`: one volume, any shape (normally `(X, Y, Z, C)`).
    - `method`: `"minmax"` or `"percentile"`.
    - `percentiles`: `(low, high)` in percent, `0 <= low < high <= 100`.

    **Returns:** float32 array of the shape of `x` with minimum -1 and maximum 1.

    **Raises:** `ValueError` when the intensity range to map is empty (constant volume, or the
    two percentiles coincide); `read_normalised` turns this into an `InputDataError`.
    """
    x = np.asarray(x, dtype=np.float64)
    if method == "minmax":
        low, high = x.min(), x.max()
    elif method == "percentile":
        p_low, p_high = percentiles
        if not 0.0 <= p_low < p_high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
        low, high = np.percentile(x, [p_low, p_high])
        x = np.clip(x, low, high)
    else:
        raise ValueError(f"unknown normalisation method {method!r}; use 'minmax' or 'percentile'")
    if not high > low:
        raise ValueError(f"cannot normalise: the intensity range [{low:g}, {high:g}] is empty")
    return (2.0 * (x - low) / (high - low) - 1.0).astype(np.float32)


def read_normalised(
    path: str | os.PathLike, method: str = "minmax", percentiles: tuple[float, float] = (1.0, 99.0)
) -> Volume:
    """`read_volume` followed by `normalise`; the returned `Volume.data` lies in [-1, 1]."""
    volume = read_volume(path)
    try:
        data = normalise(volume.data, method, percentiles)
    except ValueError as e:
        raise InputDataError(
            f"{volume.path}: {e} (normalisation {method!r}, percentiles {percentiles})"
        ) from e
    return dataclasses.replace(volume, data=data)


# ---------------------------------------------------------------------------- groups


def _is_nifti_name(name: str) -> bool:
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _stem(name: str) -> str:
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def _discover_group(folder: str | os.PathLike, label: int) -> list[Subject]:
    folder = Path(folder)
    group = _GROUP_NAMES[label]
    if not folder.is_dir():
        raise InputDataError(f"{folder}: folder of the {group} group not found")
    visible = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    names = {p.name for p in visible if _is_nifti_name(p.name)}
    subjects = []
    for name in sorted(names):
        stem = _stem(name)
        if stem.endswith(EFFECT_TAG):
            continue
        effects = [stem + EFFECT_TAG + suffix for suffix in (".nii.gz", ".nii")]
        effect = next((folder / e for e in effects if e in names), None)
        subjects.append(Subject(path=folder / name, label=label, effect_path=effect))
    if not subjects:
        raise InputDataError(
            f"{folder}: no {group} volumes found (*.nii, *.nii.gz; *{EFFECT_TAG} maps excluded)"
        )
    return subjects


def discover_groups(positive_dir: str | os.PathLike,
                    negative_dir: str | os.PathLike) -> list[Subject]:
    """Subjects from two folders, positives first, each folder sorted by file name.

    Takes `*.nii` and `*.nii.gz` files; `<name>_effect.nii[.gz]` files are the ground-truth
    maps of `<name>` (see the module docstring), not subjects.

    **Raises:** `InputDataError` naming the folder when it is missing or holds no volumes.
    """
    return _discover_group(positive_dir, POSITIVE) + _discover_group(negative_dir, NEGATIVE)


def _manifest_file(csv_path: Path, line: int, value: str, column: str) -> Path:
    if not value:
        raise InputDataError(f"{csv_path} line {line}: empty {column}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else csv_path.parent / path
    if not path.is_file():
        raise InputDataError(f"{csv_path} line {line}: {column} file not found: {path}")
    return path


def _manifest_row(csv_path: Path, line: int, columns: list[str], row: list[str]) -> Subject:
    if len(row) != len(columns):
        raise InputDataError(
            f"{csv_path} line {line}: expected {len(columns)} fields ({', '.join(columns)}), "
            f"got {len(row)}"
        )
    fields = dict(zip(columns, (cell.strip() for cell in row)))
    if fields["label"] not in ("0", "1"):
        raise InputDataError(
            f"{csv_path} line {line}: label must be 1 (positive) or 0 (negative), "
            f"got {fields['label']!r}"
        )
    effect = fields.get("effect_path", "")
    return Subject(
        path=_manifest_file(csv_path, line, fields["path"], "path"),
        label=int(fields["label"]),
        effect_path=_manifest_file(csv_path, line, effect, "effect_path") if effect else None,
    )


def read_manifest(csv_path: str | os.PathLike) -> list[Subject]:
    """Subjects listed in a CSV manifest, in file order.

    The first row is a header with the columns `path` and `label` (1 = positive, 0 = negative)
    and optionally `effect_path` (may be empty per row); other columns are ignored. Relative
    paths are resolved against the CSV's folder. Blank lines are skipped.

    **Raises:** `InputDataError` naming the CSV (and the line) for a missing CSV, missing
    columns, malformed rows, files that do not exist, or a group without subjects.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputDataError(f"{csv_path}: manifest not found")
    try:
        reader = csv.reader(io.StringIO(csv_path.read_text(encoding="utf-8-sig"), newline=""))
        columns = [c.strip().lower() for c in next(reader, [])]
        missing = {"path", "label"} - set(columns)
        if missing or len(set(columns)) != len(columns):
            raise InputDataError(
                f"{csv_path} line 1: the header must name the columns path, label"
                "[, effect_path] once each, "
                f"got {columns}"
            )
        rows = (row for row in reader if any(cell.strip() for cell in row))
        subjects = [_manifest_row(csv_path, reader.line_num, columns, row) for row in rows]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputDataError(f"{csv_path}: cannot parse the manifest ({_describe(e)})") from e
    for label, group in _GROUP_NAMES.items():
        if not any(s.label == label for s in subjects):
            raise InputDataError(f"{csv_path}: no {group} subjects (label {label})")
    return subjects


def _file_shape(path: Path) -> tuple[int, int, int, int]:
    return _xyzc_shape(_load_image(path).shape, path)


def check_shapes(subjects: Sequence[Subject]) -> tuple[int, int, int, int]:
    """Check from the file headers (no voxel data read) that all subjects share one shape.

    Every volume must have the `(X, Y, Z, C)` of the first subject; every ground-truth map its
    subject's `(X, Y, Z)` and 1 or `C` channels.

    **Returns:** the common `(X, Y, Z, C)`.

    **Raises:** `InputDataError` naming the first file that differs (and the first subject).
    """
    if not subjects:
        raise ValueError("check_shapes needs at least one subject")
    first = subjects[0].path
    expected = _file_shape(first)
    for subject in subjects:
        shape = _file_shape(subject.path)
        if shape != expected:
            raise InputDataError(
                f"{subject.path}: shape (X, Y, Z, C) = {shape} differs from {expected} of the "
                "first subject "
                f"{first}; all volumes must have the same spatial shape and channels"
            )
        if subject.effect_path is not None:
            effect = _file_shape(subject.effect_path)
            if effect[:3] != shape[:3] or effect[3] not in (1, shape[3]):
                raise InputDataError(
                    f"{subject.effect_path}: ground-truth map of shape {effect} does not fit "
                    "its volume "
                    f"{subject.path} of shape {shape}"
                )
    return expected


# ---------------------------------------------------------------------------- writing


def _output_header(header: Any) -> Any:
    if header is None:
        out = nib.Nifti1Header()
        out.set_xyzt_units("mm")
    elif isinstance(header, nib.Nifti1Header):  # Nifti2Header is a subclass
        out = header.copy()
    else:
        out = nib.Nifti1Header.from_header(header)
    # The reference's display window suits its own intensities, not those of a map.
    out["cal_min"] = out["cal_max"] = 0
    return out


def write_volume(
    array: Any, path: str | os.PathLike, affine: np.ndarray | None = None, header: Any = None
) -> Path:
    """Write a float32 NIfTI atomically (temporary file in the same folder, then `os.replace`),
    so a failed or killed run never leaves a half-written file under `path`.

    **Arguments:**

    - `array`: `(X, Y, Z)` or `(X, Y, Z, C)`; one channel is written as a 3-D volume.
    - `path`: output `.nii` or `.nii.gz` file; missing folders are created.
    - `affine`: `(4, 4)` voxel-to-world matrix (default identity, 1 mm voxels).
    - `header`: NIfTI header to copy (dims, data type and scaling are set from `array`).

    **Returns:** `path`.
    """
    path = Path(path)
    if not _is_nifti_name(path.name):
        raise InputDataError(f"{path}: output file name must end in .nii or .nii.gz")
    data = np.asarray(array, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise ValueError(f"expected an (X, Y, Z) or (X, Y, Z, C) array for {path}, "
                         f"got shape {data.shape}")
    header = _output_header(header)
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, np.eye(4) if affine is None else np.asarray(affine), header)
    image.set_data_dtype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{_stem(path.name)}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_like(reference: Volume, array: Any, path: str | os.PathLike) -> Path:
    """Write `array` (e.g. a key feature map) with `reference`'s affine and header, so it
    overlays the input in any NIfTI viewer; float32, 3-D if one channel, atomic (`write_volume`).

    **Arguments:**

    - `reference`: the `Volume` the map belongs to.
    - `array`: `(X, Y, Z)` or `(X, Y, Z, C)` with the reference's spatial shape.
    - `path`: output `.nii` or `.nii.gz` file.

    **Returns:** `path`.
    """
    shape = np.shape(array)
    if tuple(shape[:3]) != tuple(reference.spatial_shape):
        raise ValueError(
            f"array of shape {shape} does not match the spatial shape {reference.spatial_shape} "
            f"of {reference.path}"
        )
    return write_volume(array, path, reference.affine, reference.header)
