"""Reading and writing 2-D images (PNG, JPEG, TIFF, BMP) with errors that name the file.

Used by the localisation and segmentation systems (docs/wsol.md, docs/segmentation.md).
Pillow does the decoding; what it cannot decode, or what is not a single 2-D image, raises
`InputDataError`. `ImageFiles` reads and resizes images only when they are indexed, so a
training host decodes only the examples it is given.
"""

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxmed.errors import InputDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside `folder`, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputDataError(f"{folder}: not a folder")
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def read_image(path: str | os.PathLike, *, mode: str = "RGB") -> np.ndarray:
    """Read one 2-D image.

    **Arguments:**

    - `path`: the image file.
    - `mode`: `'RGB'` gives `(H, W, 3) uint8` (grey images are repeated over the channels);
      `'L'` gives `(H, W) uint8`; `'label'` gives the stored integer values unchanged, `(H, W)`
      int32, for masks — a colour or multi-page file is refused rather than guessed at.

    **Returns:** the pixel array.

    **Raises:** `InputDataError` naming the file when it is missing, unreadable, truncated, not
    2-D (several frames), or a colour image where a label map was asked for.
    """
    path = Path(path)
    with _single_image(path) as image:
        image.load()
        return _convert(image, path, mode)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """`(height, width)` of an image file, from its header (the pixels are not decoded).

    **Raises:** `InputDataError` as `read_image` for a missing, unidentifiable or multi-frame
    file; damage past the header shows only when the image is read.
    """
    with _single_image(Path(path)) as image:
        return image.height, image.width


@contextlib.contextmanager
def _single_image(path: Path):
    """The opened single-frame image at `path`; Pillow's errors become `InputDataError`."""
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames != 1:
                raise InputDataError(
                    f"{path}: has {frames} frames or pages; a single 2-D image is needed"
                )
            yield image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputDataError(f"{path}: cannot read the image ({error})") from error


def _convert(image: Image.Image, path: Path, mode: str) -> np.ndarray:
    if mode == "label":
        if image.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F"):
            raise InputDataError(
                f"{path}: a label mask must have one channel of integer values, "
                f"got a {image.mode!r} image"
            )
        values = np.asarray(image)
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
                raise InputDataError(f"{path}: a label mask must hold whole numbers")
        return values.astype(np.int32)
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB', 'L' or 'label', got {mode!r}")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float greyscale: rescale to 8 bits rather than clip.
        values = np.asarray(image).astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise InputDataError(f"{path}: the image has NaN or infinite pixels")
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        image = Image.fromarray(np.round(scaled).astype(np.uint8))
    return np.asarray(image.convert(mode))


def write_image(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """Write `(H, W)` or `(H, W, 3)` uint8 pixels atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    Image.fromarray(np.asarray(pixels)).save(temporary, format=_format(path))
    os.replace(temporary, path)


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
            ".bmp": "BMP"}.get(suffix, "PNG")


def resize_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """`(H, W, 3)` uint8 -> `(size, size, 3)` uint8, bilinear (Pillow, pixel centres aligned);
    an image already of that size is returned unchanged."""
    if pixels.shape[:2] == (size, size):
        return pixels
    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


class ImageFiles:
    """RGB image files read and resized to `size x size` only when indexed: a lazy stand-in for
    a uint8 `(N, size, size, 3)` array.

    `files[i]` reads one image (`(size, size, 3)` uint8, `resize_image`); `files[indices]` (a
    slice, sequence or integer array) is an `ImageFiles` of those files, reading nothing;
    `np.asarray(files)` reads them all. A read error raises `InputDataError` naming the file.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, paths: Sequence[str | os.PathLike], size: int):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.paths = [Path(p) for p in paths]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 3)

    def __getitem__(self, index):
        if isinstance(index, int | np.integer):
            return resize_image(read_image(self.paths[index]), self.size)
        if isinstance(index, slice):
            return ImageFiles(self.paths[index], self.size)
        return ImageFiles([self.paths[i] for i in np.asarray(index, dtype=np.intp)], self.size)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = np.empty(self.shape, np.uint8)
        for i in range(len(self)):
            images[i] = self[i]
        return images if dtype is None else images.astype(dtype)
