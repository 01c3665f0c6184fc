"""Letterboxing: aspect-preserving resize into a fixed canvas, and its inverse.

The segmentation network sees every image at one size (473 x 473 in the original design,
128 x 128 in `python -m train.segment` by default). `letterbox` scales an image so that it
fits the canvas with its aspect ratio kept, centres it and pads the rest with grey;
`unletterbox` crops the padding off a prediction and resizes it back to the original image,
so that masks and metrics are in the user's pixels.

Conventions (chosen so that the inverse is exact where it can be):

- Pixel centres: output pixel `j` of a resize from `n_in` to `n_out` samples looks at the
  input position `(j + 1/2) * n_in / n_out - 1/2` (the half-pixel convention of Pillow,
  OpenCV `INTER_LINEAR`/`INTER_NEAREST_EXACT` and `jax.image.resize`).
- Nearest (`order=0`, label maps): input index `floor((j + 1/2) * n_in / n_out)`, computed
  in integers. Enlarging then shrinking back with it is the identity (each output pixel of
  the shrink lands inside the block that its own source pixel became), so a label map that
  is letterboxed up (scale >= 1) and unletterboxed comes back unchanged. Shrinking loses
  thin structures, so the round trip then only agrees away from boundaries.
- Bilinear (`order=1`, images and per-class scores): Pillow's `BILINEAR` filter, a
  triangle kernel that is widened by the shrink factor when shrinking, so a shrink averages
  instead of aliasing. Channels are resampled independently (float scores in float32).
- The resized size along each axis is `round(n * scale)` (at least 1, at most the canvas),
  with `scale = min(canvas_h / H, canvas_w / W)`; the resize uses the exact per-axis ratio of
  those integer sizes, so the longer side fills the canvas exactly. The image is centred:
  the padding before it is `(canvas - resized) // 2` (an odd remainder goes after it).
"""

from typing import NamedTuple

import numpy as np
from PIL import Image

DEFAULT_FILL = 128


class Letterbox(NamedTuple):
    """Where an image went inside the canvas; all sizes `(height, width)` in pixels.

    - `original_shape`: the image's size before letterboxing.
    - `padded_shape`: the canvas size (the letterboxed array's size).
    - `resized_shape`: the size the image was resized to (its region in the canvas).
    - `offset`: `(top, left)` of that region in the canvas.
    - `scale`: the aspect-preserving factor, `min(canvas_h / H, canvas_w / W)`; > 1 enlarges.
    """

    original_shape: tuple[int, int]
    padded_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    offset: tuple[int, int]
    scale: float


def fit_letterbox(shape: tuple[int, ...], size: int | tuple[int, int]) -> Letterbox:
    """The letterbox geometry of an image of `shape[:2] = (H, W)` in a canvas of `size`.

    **Arguments:**

    - `shape`: the image's shape; only `(H, W)` (the first two entries) is used.
    - `size`: the canvas, `S` (square, `S x S`) or `(height, width)`.

    **Returns:** a `Letterbox`.
    """
    height, width = int(shape[0]), int(shape[1])
    canvas = (size, size) if np.isscalar(size) else tuple(int(n) for n in size)
    if height < 1 or width < 1 or min(canvas) < 1:
        raise ValueError(f"image {height}x{width} and canvas {canvas} must be non-empty")
    scale = min(canvas[0] / height, canvas[1] / width)
    resized = tuple(min(limit, max(1, int(np.floor(n * scale + 0.5))))
                    for n, limit in zip((height, width), canvas))
    offset = tuple((limit - n) // 2 for n, limit in zip(resized, canvas))
    return Letterbox((height, width), canvas, resized, offset, float(scale))


def letterbox(
    image: np.ndarray, size: int | tuple[int, int], *, fill: float = DEFAULT_FILL, order: int = 1
) -> tuple[np.ndarray, Letterbox]:
    """Resize `image` to fit the canvas `size` with its aspect kept, centred, padded with `fill`.

    **Arguments:**

    - `image`: `(H, W)` or `(H, W, C)` array. With `order=1` it must be uint8 or float.
    - `size`: the canvas, `S` or `(height, width)`.
    - `fill`: the padding value (grey 128 for images; for label maps pass the background
      class or an ignore label).
    - `order`: 0 = nearest (label maps), 1 = bilinear (images).

    **Returns:** `(padded, box)`: `padded` of shape `(*canvas, C?)` and the dtype of `image`
    (float32 for float input with `order=1`), and the `Letterbox` that `unletterbox` inverts.
    """
    image = np.asarray(image)
    box = fit_letterbox(image.shape, size)
    resized = resize(image, box.resized_shape, order=order)
    padded = np.full(box.padded_shape + image.shape[2:], fill, dtype=resized.dtype)
    (top, left), (height, width) = box.offset, box.resized_shape
    padded[top:top + height, left:left + width] = resized
    return padded, box


def unletterbox(prediction: np.ndarray, box: Letterbox, *, order: int) -> np.ndarray:
    """Crop the padding off a canvas-sized `prediction` and resize it to the original image.

    **Arguments:**

    - `prediction`: `(*box.padded_shape)` label map (`order=0`) or `(*box.padded_shape, C)`
      per-class scores or logits (`order=1`; take the argmax afterwards).
    - `box`: the `Letterbox` returned with the letterboxed input.
    - `order`: 0 = nearest, 1 = bilinear.

    **Returns:** `(*box.original_shape)` or `(*box.original_shape, C)`.
    """
    prediction = np.asarray(prediction)
    if prediction.shape[:2] != tuple(box.padded_shape):
        raise ValueError(
            f"prediction of shape {prediction.shape} does not match the letterbox canvas "
            f"{tuple(box.padded_shape)}"
        )
    (top, left), (height, width) = box.offset, box.resized_shape
    crop = prediction[top:top + height, left:left + width]
    return resize(crop, box.original_shape, order=order)


def resize(image: np.ndarray, shape: tuple[int, int], *, order: int) -> np.ndarray:
    """Resize the first two axes of `image` to `shape` with the module's conventions.

    **Arguments:**

    - `image`: `(H, W)` or `(H, W, C)`.
    - `shape`: `(height, width)` of the result.
    - `order`: 0 = nearest (any dtype, values copied), 1 = bilinear (uint8 or float).

    **Returns:** `(*shape)` or `(*shape, C)`; uint8 stays uint8, float becomes float32.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {image.shape}")
    if order == 0:
        rows, cols = (_nearest_source(n_in, n_out) for n_in, n_out in zip(image.shape, shape))
        return image[rows[:, None], cols[None, :]]
    if order == 1:
        return _resize_bilinear(image, tuple(shape))
    raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")


def _nearest_source(n_in: int, n_out: int) -> np.ndarray:
    """Input index of each output pixel: `floor((j + 1/2) * n_in / n_out)`, exactly."""
    return ((2 * np.arange(n_out) + 1) * n_in) // (2 * n_out)


def _resize_bilinear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.dtype != np.uint8 and image.dtype.kind != "f":
        raise ValueError(f"bilinear resampling needs uint8 or float pixels, got {image.dtype}")
    if image.shape[:2] == shape:
        return image.copy() if image.dtype == np.uint8 else image.astype(np.float32)
    pil_size = (shape[1], shape[0])  # Pillow sizes are (width, height)
    # Pillow infers the mode from the array: L or RGB for uint8, F for 2-D float32.
    if image.dtype == np.uint8 and (image.ndim == 2 or image.shape[2] == 3):
        return np.asarray(Image.fromarray(image).resize(pil_size, Image.BILINEAR))
    dtype = np.uint8 if image.dtype == np.uint8 else np.float32
    channels = image[..., None] if image.ndim == 2 else image
    out = np.stack(
        [
            np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., c], dtype))
                       .resize(pil_size, Image.BILINEAR))
            for c in range(channels.shape[2])
        ],
        axis=-1,
    )  # out: [h, w, C]
    return out[..., 0] if image.ndim == 2 else out
