"""Image/mask folder pairs for segmentation, checked before training starts.

Layout: one folder of images and one of masks. The mask of `images/case7.png` is the file
in the masks folder named `case7` + `mask_suffix` with any image extension, so
`masks/case7.tif` or, with `mask_suffix='_mask'`, `masks/case7_mask.png`. A mask holds one
class number per pixel (8- or 16-bit grey or palette PNG/TIFF/BMP); JPEG masks are refused,
since lossy compression changes class numbers at edges. Images are read as 8-bit RGB.

Images and masks may share one folder when `mask_suffix` is set: a file whose name is another
image's name + the suffix is then that image's mask, not an image.

What `load_segmentation_folder` checks up front, reading only the file headers (about a
millisecond per file, so every problem in the folder surfaces before training starts):
an empty or missing folder; two images (or two masks) sharing a name; an image without a
mask; a file that cannot be opened; a JPEG or multi-channel mask; image/mask size mismatch.
Masks without an image are not an error (cases are often excluded by deleting their images):
they are reported in one `UserWarning`. The pixel values (class numbers within `[0, num_classes)`
or `ignore_index`) need the whole mask decoded, so they are checked by `read_pair` when a
pair is read, or up front for every mask with `check_values=True`.

Every problem raises `InputDataError` naming the file.
"""

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxmed.data.images import list_images, read_image
from jaxmed.errors import InputDataError

_LOSSY = (".jpg", ".jpeg")
_LISTED = 5  # how many file names an error or warning lists before "and N more"


class SegmentationPair(NamedTuple):
    """An image file and its mask file."""

    image: Path
    mask: Path


def load_segmentation_folder(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    *,
    num_classes: int,
    mask_suffix: str = "",
    ignore_index: int | None = None,
    check_values: bool = False,
) -> list[SegmentationPair]:
    """The image/mask pairs of two folders, matched by name and checked.

    **Arguments:**

    - `images_dir`, `masks_dir`: the two folders (only files directly inside are used).
    - `num_classes`: mask values must lie in `[0, num_classes)` ...
    - `ignore_index`: ... or equal this label (pixels left out of the loss), if given.
    - `mask_suffix`: the mask's name is the image's name (without extension) + this.
    - `check_values`: also decode every mask now and check its values (slower: reads the
      whole folder once), instead of when each pair is read.

    **Returns:** the pairs sorted by image file name.

    **Raises:** `InputDataError` naming the file, for the problems listed in the module
    docstring.
    """
    images = _by_stem(list_images(images_dir), images_dir, "images")
    masks = _by_stem(list_images(masks_dir), masks_dir, "masks")
    if Path(images_dir).resolve() == Path(masks_dir).resolve():
        if not mask_suffix:
            raise InputDataError(f"{images_dir}: images and masks in one folder need a mask suffix")
        images = {stem: path for stem, path in images.items()
                  if not (stem.endswith(mask_suffix) and stem[: -len(mask_suffix)] in images)}
    if not images:
        raise InputDataError(f"{images_dir}: no images (PNG, JPEG, TIFF or BMP) in this folder")
    missing = [path for stem, path in images.items() if stem + mask_suffix not in masks]
    if missing:
        raise InputDataError(
            f"{_names(missing)}: no mask named <image name>{mask_suffix}.<png|tif|...> in "
            f"{masks_dir}"
        )
    pairs = [SegmentationPair(path, masks[stem + mask_suffix])
             for stem, path in sorted(images.items())]
    orphans = sorted(set(masks.values()) - {path for pair in pairs for path in pair})
    if orphans:
        warnings.warn(f"{_names(orphans)}: mask without an image in {images_dir}; not used",
                      UserWarning, stacklevel=2)
    for pair in pairs:
        _check_headers(pair)
        if check_values:
            check_mask_values(read_image(pair.mask, mode="label"), pair.mask, num_classes,
                              ignore_index)
    return pairs


def read_pair(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    num_classes: int,
    *,
    ignore_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its mask, checking that they match and the mask's class numbers.

    **Returns:** `(image, mask)`: uint8 `(H, W, 3)` (grey images repeated over the channels)
    and int32 `(H, W)`.

    **Raises:** `InputDataError` naming the file: unreadable, colour mask, size mismatch,
    or mask values outside `[0, num_classes)` other than `ignore_index`.
    """
    image = read_image(image_path, mode="RGB")
    mask = read_image(mask_path, mode="label")
    if image.shape[:2] != mask.shape:
        raise InputDataError(
            f"{mask_path}: mask is {_size(mask.shape)} but its image {image_path} is "
            f"{_size(image.shape)}"
        )
    check_mask_values(mask, mask_path, num_classes, ignore_index)
    return image, mask


def check_mask_values(
    mask: np.ndarray, path: str | os.PathLike, num_classes: int, ignore_index: int | None = None
) -> None:
    """Raise `InputDataError` naming `path` if `mask` has values outside `[0, num_classes)`
    other than `ignore_index`."""
    bad = (mask < 0) | (mask >= num_classes)
    if ignore_index is not None:
        bad &= mask != ignore_index
    if not bad.any():
        return
    values = np.unique(mask[bad])
    ignored = f" or {ignore_index} (ignored)" if ignore_index is not None else ""
    allowed = f"0..{num_classes - 1}{ignored}"
    hint = ""
    if values.max() == 255 and np.isin(np.unique(mask), [0, 255]).all():
        hint = "; it looks like a 0/255 binary image: store the class numbers 0/1 instead"
    raise InputDataError(
        f"{path}: mask values {_listed(values.tolist())} in {int(bad.sum())} pixels are not "
        f"class numbers {allowed}{hint}"
    )


def _by_stem(paths: list[Path], folder, kind: str) -> dict[str, Path]:
    """Files by name without extension; two files with one name are ambiguous."""
    by_stem: dict[str, Path] = {}
    for path in paths:
        if path.stem in by_stem:
            raise InputDataError(
                f"{folder}: {by_stem[path.stem].name} and {path.name} have the same name; "
                f"keep one of them, the {kind} are matched by name"
            )
        by_stem[path.stem] = path
    return by_stem


def _check_headers(pair: SegmentationPair) -> None:
    """Open both files' headers (no pixel decoding) and compare sizes."""
    if pair.mask.suffix.lower() in _LOSSY:
        raise InputDataError(
            f"{pair.mask}: masks must be stored losslessly (PNG, TIFF, BMP); JPEG changes class "
            f"numbers at edges"
        )
    (image_size, _), (mask_size, bands) = _header(pair.image), _header(pair.mask)
    if len(bands) != 1:
        raise InputDataError(
            f"{pair.mask}: a mask must have one channel of class numbers, got a "
            f"{''.join(bands)} image"
        )
    if image_size != mask_size:
        raise InputDataError(
            f"{pair.mask}: mask is {mask_size[1]}x{mask_size[0]} (HxW) but its image "
            f"{pair.image} is {image_size[1]}x{image_size[0]}"
        )


def _header(path: Path) -> tuple[tuple[int, int], tuple[str, ...]]:
    """`(width, height)` and the channel names, from the file header."""
    try:
        with Image.open(path) as image:
            return image.size, image.getbands()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputDataError(f"{path}: cannot read the image ({error})") from error


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]} (HxW)"


def _names(paths: list[Path]) -> str:
    return _listed([str(p) for p in paths])


def _listed(items: list) -> str:
    shown = ", ".join(str(item) for item in items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")
