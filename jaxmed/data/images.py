"""Reading and writing 2-D images (PNG, JPEG, TIFF, BMP) with errors that name the file.

Used by the localisation (SPEC S1) and segmentation (SPEC S4) systems. Pillow does the
decoding; what it cannot decode, or what is not a single 2-D image, raises `InputDataError`.
"""

import os
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
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames != 1:
                raise InputDataError(
                    f"{path}: has {frames} frames or pages; a single 2-D image is needed"
                )
            image.load()
            return _convert(image, path, mode)
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
