"""Host-side augmentation of image/mask pairs for segmentation, reproducible per step.

`step_rng(seed, step, index)` gives the random stream of example `index` of the batch at
training step `step`; drawing the augmentation from it makes a resumed run augment exactly
as the uninterrupted one would have.

`augment_pair` applies, in this order:

1. Geometry, one map for image and mask: an optional left-right flip, then a rotation by
   an angle in `[-max_rotation, max_rotation]` degrees and a zoom by a factor in
   `scale_range`, both about the image centre (`((H - 1) / 2, (W - 1) / 2)` in pixel-centre
   coordinates; a positive angle turns the picture clockwise as displayed, rows downwards).
   Each output pixel takes the source position that the inverse map gives it: the image is
   sampled bilinearly, the mask at the nearest source pixel, so the two stay aligned.
   Pixels that come from outside the image are `fill` (grey, as the letterbox padding) in
   the image and `mask_fill` in the mask. The default `mask_fill = 0` ("outside the
   kidney") is the truth for those pixels; pass an ignore label instead to keep them out of
   the loss.
2. Intensity, image only, on values scaled to [0, 1]: contrast `x -> m + (1 + c)(x - m)`
   about the image mean `m`, `c` in `[-contrast, contrast]`; brightness `x -> x + b`, `b` in
   `[-brightness, brightness]`; clip to [0, 1]; gamma `x -> x ** exp(g)`, `g` in
   `[-gamma, gamma]`.

Every parameter is drawn on every call, whether its transform is enabled or not, in the
order flip (`rng.random() < 1/2`), angle, zoom, brightness, contrast, gamma (each
`rng.uniform` over its range), so switching one transform off does not change the others.
With `flip=False`, `max_rotation=0`, `scale_range=(1, 1)` and zero intensity ranges the pair
comes back unchanged.
"""

import numpy as np


def step_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The random stream of example `index` at training step `step` (all non-negative ints)."""
    if min(seed, step, index) < 0:
        raise ValueError(f"seed, step and index must be non-negative, got {(seed, step, index)}")
    return np.random.default_rng(np.random.SeedSequence([seed, step, index]))


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    flip: bool = True,
    max_rotation: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    brightness: float = 0.1,
    contrast: float = 0.1,
    gamma: float = 0.1,
    fill: int = 128,
    mask_fill: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly flip, rotate, zoom and intensity-jitter an image and its mask.

    **Arguments:**

    - `image`: uint8 `(H, W)` or `(H, W, C)`.
    - `mask`: integer `(H, W)` label map.
    - `rng`: the random stream (e.g. from `step_rng`).
    - `flip`: flip left-right with probability 1/2.
    - `max_rotation`: largest rotation, in degrees.
    - `scale_range`: `(low, high)` zoom factors (> 1 enlarges).
    - `brightness`, `contrast`, `gamma`: half-widths of the intensity ranges (module docstring).
    - `fill`, `mask_fill`: values for pixels brought in from outside the image.

    **Returns:** `(image, mask)`, new arrays of the input shapes and dtypes.
    """
    image, mask = np.asarray(image), np.asarray(mask)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.shape[:2] != mask.shape:
        raise ValueError(
            f"expected a uint8 (H, W[, C]) image and an (H, W) mask, got {image.dtype} "
            f"{image.shape} and {mask.shape}"
        )
    flipped = rng.random() < 0.5 and flip
    angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
    scale = rng.uniform(*scale_range)
    jitter = tuple(rng.uniform(-r, r) for r in (brightness, contrast, gamma))
    if angle == 0 and scale == 1:
        columns = slice(None, None, -1) if flipped else slice(None)
        image, mask = image[:, columns].copy(), mask[:, columns].copy()
    else:
        rows, cols = _source_positions(mask.shape, angle, scale, flipped)  # each [H, W]
        image = _bilinear(image, rows, cols, fill)
        mask = _nearest(mask, rows, cols, mask_fill)
    if any(jitter):
        image = _intensity(image, *jitter)
    return image, mask


def _source_positions(shape: tuple[int, int], angle: float, scale: float, flipped: bool):
    """Where each output pixel comes from: the inverse of flip, then rotate and zoom about the
    centre."""
    centre_row, centre_col = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    out_rows = np.arange(shape[0], dtype=np.float64)[:, None] - centre_row
    out_cols = np.arange(shape[1], dtype=np.float64)[None, :] - centre_col
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    rows = centre_row + cos * out_rows - sin * out_cols
    cols = sin * out_rows + cos * out_cols
    return rows, (centre_col - cols if flipped else centre_col + cols)


def _bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, fill) -> np.ndarray:
    """Bilinear samples at `(rows, cols)`; outside the image the pixels are `fill`."""
    # A one-pixel border of `fill` makes samples near the edge blend into the fill.
    padded = np.pad(image, [(1, 1), (1, 1)] + [(0, 0)] * (image.ndim - 2), constant_values=fill)
    height, width = padded.shape[:2]
    pixels = padded.reshape(height * width, -1).astype(np.float32)  # pixels: [P, C]
    r = np.clip(rows + 1, 0, height - 1).astype(np.float32)
    c = np.clip(cols + 1, 0, width - 1).astype(np.float32)
    r0 = np.minimum(np.floor(r), height - 2)
    c0 = np.minimum(np.floor(c), width - 2)
    dr, dc = (r - r0)[..., None], (c - c0)[..., None]  # weights: [H, W, 1]
    corner = r0.astype(np.intp) * width + c0.astype(np.intp)  # flat index of the top-left neighbour
    def at(offset):  # np.take gathers rows several times faster than fancy indexing
        return np.take(pixels, corner + offset, axis=0)  # [H, W, C]

    top = at(0)
    top += (at(1) - top) * dc
    bottom = at(width)
    bottom += (at(width + 1) - bottom) * dc
    top += (bottom - top) * dr + 0.5
    out = top.astype(np.uint8)  # a convex mix of 0..255 values, so + 1/2 then truncating rounds
    return out.reshape(image.shape)


def _nearest(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, fill) -> np.ndarray:
    """The mask at the nearest source pixel; `fill` where that lies outside the image."""
    r, c = np.round(rows).astype(np.intp), np.round(cols).astype(np.intp)
    inside = (r >= 0) & (r < mask.shape[0]) & (c >= 0) & (c < mask.shape[1])
    values = mask[np.clip(r, 0, mask.shape[0] - 1), np.clip(c, 0, mask.shape[1] - 1)]
    return np.where(inside, values, np.asarray(fill, mask.dtype))


def _intensity(image: np.ndarray, brightness: float, contrast: float, gamma: float) -> np.ndarray:
    """The module docstring's intensity map, applied through a 256-entry lookup table."""
    mean = image.mean() / 255
    x = np.arange(256) / 255
    x = np.clip(mean + (1 + contrast) * (x - mean) + brightness, 0, 1)
    table = np.round(255 * x ** np.exp(gamma)).astype(np.uint8)
    return table[image]
