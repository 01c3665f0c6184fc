"""Synthetic weakly-supervised localisation data (docs/wsol.md): cells whose most discriminative
part is a small inclusion.

Every image shows, on a textured pale-pink "tissue" background, one cell of its class (or
several, `objects_per_image`) plus co-occurring distractors. What makes it a WSOL benchmark:

- Cell body: a rotated ellipse with a darker membrane rim and a granular texture. Its size
  (semi-major axis `object_scale * image_size`), aspect (`b / a` in 0.6-1.0), rotation, position
  and colour jitter (uniform +-20 levels per RGB channel, about 11.5 levels standard deviation
  in any colour direction) have the same distribution for every class.
- Weak body cue (`body_tint`, levels): the body colour of a cell of class k is shifted by
  `body_tint` along the hue direction at angle `2 pi k / num_classes` in the plane of RGB
  orthogonal to grey, so the classes' body colours sit evenly on a circle of that radius around
  the common body colour. This is weaker class evidence than the inclusion, spread over the whole
  body, as a bird's body is to its head. The mean body colour of an image gives its class (of 4)
  in about 40 / 65 / 82 / 96 % of images at `body_tint` 8 / 16 / 24 / 32 (a nearest-centroid
  classifier; chance 25 %), the inclusion's colour in about 100 %; `python -m train.wsol` uses
  24. With `body_tint = 0` (the function's default) the body says nothing about the class, and
  the pixels are exactly those of the generator before the option existed (the tint draws no
  random numbers). With one class the tint is a constant shift.
- Class part: one small inclusion inside each cell, a disc at a uniformly random place in the
  body whose area is a fraction `part_fraction` (default 5-15 %, checked on the rasterised
  masks) of the body's area. Its colour and pattern (solid, ring, striped, quartered) are
  the class's (`class_names`); nothing else in the image is class-specific except the body
  tint above and the distractors' correlation below. Without the tint a classifier's CAM
  therefore fires on the inclusion, about a tenth of the box, while the ground truth is the
  whole cell; with it the body is weaker evidence that a CAM can spread over.
- Distractors: rod-shaped "fibres" (thin ellipses, a different body shape, never a cell), 1-2
  per image by default. Each rod has one of `num_classes` colours; with probability
  `cooccurrence` (default 0.8) its colour is the one paired with the image's class, otherwise
  one of the others. They never overlap a cell, so their pixels lie outside the ground-truth
  mask, but they are class evidence a network may attend to.
- Decoys (optional, `decoy_probability`): an extra cell body without an inclusion and without
  the body tint; not part of the ground truth.
- Background: two colours mixed by low-frequency smooth noise, mid-frequency texture; the
  whole image then gets multiplicative speckle, additive noise and a global brightness jitter.

Ground truth per image: one box per cell of the class, the tight bounds of that cell's mask
(inclusive pixel indices `[x0, y0, x1, y1]`, `x` = column), the union of the cells' masks
(`masks`), of their inclusions (`parts`) and of the distractors (`distractors`).

Deterministic: the labels come from `seed`, image `i` from its own generator spawned from
`seed`. About 1.5 ms per 96 x 96 image (NumPy on coordinate grids).
"""

import math
from typing import NamedTuple

import numpy as np
import scipy.ndimage

from jaxmed.data.wsol_folder import WsolDataset, write_wsol_folder

__all__ = ["WsolDataset", "class_names", "make_wsol_dataset", "write_wsol_folder", "MAX_CLASSES"]

# Class k: inclusion colour _MARK_COLOURS[k], pattern _PATTERNS[k % 4], paired rod colour
# _ROD_COLOURS[k].
_MARK_COLOURS = (
    ("navy", (35, 45, 150)), ("green", (20, 115, 45)), ("brown", (160, 80, 15)),
    ("black", (25, 25, 25)), ("teal", (0, 120, 125)), ("maroon", (115, 10, 40)),
    ("olive", (105, 110, 0)), ("indigo", (70, 0, 130)),
)
_PATTERNS = ("solid", "ring", "striped", "quartered")
_ROD_COLOURS = (
    (205, 40, 60), (225, 185, 50), (90, 170, 225), (135, 135, 135),
    (150, 210, 70), (240, 130, 110), (190, 160, 110), (80, 100, 120),
)
MAX_CLASSES = len(_MARK_COLOURS)
_BODY = np.array([200.0, 150.0, 195.0])
_BACKGROUND_LIGHT = np.array([240.0, 225.0, 234.0])
_BACKGROUND_DARK = np.array([222.0, 196.0, 218.0])
_GAP = 2.0  # px between the bounding circles of any two shapes
_ROD_SCALE = (0.10, 0.17)
_ROD_ASPECT = (0.22, 0.32)
_BODY_ASPECT = (0.6, 1.0)


class _Ellipse(NamedTuple):
    cx: float
    cy: float
    a: float  # semi-major axis, px (also the bounding-circle radius)
    b: float
    angle: float


def class_names(num_classes: int) -> list[str]:
    """`'<label>_<colour>_<pattern>'` of each class's inclusion, e.g. `'0_navy_solid'`; the label
    prefix makes the sorted folder names of `write_wsol_folder` keep the labels."""
    return [f"{k}_{_MARK_COLOURS[k][0]}_{_PATTERNS[k % len(_PATTERNS)]}"
            for k in range(num_classes)]


class _Patch(NamedTuple):
    """The square of the image around one shape: drawing touches only these pixels."""

    region: tuple[slice, slice]  # (rows, columns)
    x: np.ndarray  # [1, w] column index of each pixel centre
    y: np.ndarray  # [h, 1] row index


def _patch(shape: _Ellipse, size: int) -> _Patch:
    reach = shape.a + 1.0
    x0, y0 = (max(int(c - reach), 0) for c in (shape.cx, shape.cy))
    x1, y1 = (min(int(math.ceil(c + reach)) + 1, size) for c in (shape.cx, shape.cy))
    columns, rows = np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32)
    return _Patch((slice(y0, y1), slice(x0, x1)), columns[None, :], rows[:, None])


def _local(patch: _Patch, cx: float, cy: float, angle: float):
    """Pixel-centre coordinates rotated into a frame at (cx, cy) turned by `angle`."""
    dx, dy = patch.x - cx, patch.y - cy  # [1, w], [h, 1]
    c, s = math.cos(angle), math.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c  # [h, w] each


def _inside(patch: _Patch, shape: _Ellipse) -> np.ndarray:
    """`rho^2` of every pixel of the patch: `<= 1` inside the ellipse."""
    u, v = _local(patch, shape.cx, shape.cy, shape.angle)
    return (u / shape.a) ** 2 + (v / shape.b) ** 2  # [h, w]


def _place(rng, size: int, radius: float, placed: list[_Ellipse]) -> tuple[float, float] | None:
    """A centre keeping the circle inside the image and clear of `placed`, or None."""
    low, high = radius + 1.0, size - 2.0 - radius
    for _ in range(50):
        cx, cy = rng.uniform(low, high, size=2)
        if all(math.hypot(cx - p.cx, cy - p.cy) >= radius + p.a + _GAP for p in placed):
            return cx, cy
    return None


def _layout(rng, size: int, axes: list[tuple[float, float]]) -> list[_Ellipse] | None:
    """Non-overlapping ellipses with the given (a, b), largest placed first; None if stuck."""
    placed: list[_Ellipse | None] = [None] * len(axes)
    for i in sorted(range(len(axes)), key=lambda i: -axes[i][0]):
        centre = _place(rng, size, axes[i][0], [p for p in placed if p is not None])
        if centre is None:
            return None
        placed[i] = _Ellipse(*centre, *axes[i], rng.uniform(0.0, math.pi))
    return placed


def _smooth_noise(rng, size: int, sigma: float) -> np.ndarray:
    noise = rng.standard_normal(size=(size, size), dtype=np.float32)
    field = scipy.ndimage.gaussian_filter(noise, sigma, mode="wrap", truncate=3.0)
    return field / field.std()  # [H, W], unit variance


def _low_frequency(rng, size: int, waves: int = 8, max_cycles: int = 3) -> np.ndarray:
    """Unit-variance sum of `waves` random plane waves of at most `max_cycles` per image side.

    Much cheaper than smoothing white noise with a kernel a tenth of the image wide; each wave
    cos(kx x + ky y + phase) is expanded into outer products of 1-D cosines and sines.
    """
    k = rng.integers(-max_cycles, max_cycles, endpoint=True, size=(waves, 2))
    k[np.all(k == 0, axis=1), 0] = 1  # no constant wave
    phase = rng.uniform(0.0, 2 * np.pi, size=(waves, 2))
    line = 2 * np.pi * np.arange(size) / size
    along_x = k[:, :1] * line + phase[:, :1]  # [waves, W]
    along_y = k[:, 1:] * line + phase[:, 1:]  # [waves, H]
    field = np.cos(along_y).T @ np.cos(along_x) - np.sin(along_y).T @ np.sin(along_x)  # [H, W]
    return field / field.std()


def _background(rng, size: int, texture: np.ndarray) -> np.ndarray:
    mix = 1.0 / (1.0 + np.exp(-1.5 * _low_frequency(rng, size)))  # [H, W] in (0, 1)
    colour = _BACKGROUND_LIGHT + mix[..., None] * (_BACKGROUND_DARK - _BACKGROUND_LIGHT)
    return (colour * (1.0 + 0.03 * texture)[..., None]).astype(np.float32)  # [H, W, 3]


def _tint(label: int, num_classes: int, strength: float) -> np.ndarray:
    """Class `label`'s body-colour shift: `strength` levels along the hue direction at angle
    2 pi label / num_classes, in the plane orthogonal to grey (1, 1, 1)."""
    red_green = np.array([1.0, -1.0, 0.0]) / math.sqrt(2.0)
    blue_yellow = np.array([1.0, 1.0, -2.0]) / math.sqrt(6.0)  # both unit, orthogonal to grey
    angle = 2.0 * math.pi * label / num_classes
    return strength * (math.cos(angle) * red_green + math.sin(angle) * blue_yellow)  # [3]


def _paint_body(rng, canvas, patch, shape: _Ellipse, texture, tint) -> np.ndarray:
    """Draw a cell body of base colour `_BODY + tint` into the patch's `canvas` [h, w, 3];
    returns its mask [h, w]."""
    rho2 = _inside(patch, shape)
    mask = rho2 <= 1.0
    colour = _BODY + tint + rng.uniform(-20.0, 20.0, size=3)
    shade = (1.0 + 0.07 * texture) * np.where(rho2 > 0.8**2, 0.82, 1.0)  # membrane rim darker
    canvas[mask] = (shade[..., None] * colour)[mask]
    return mask


def _paint_rod(rng, canvas, patch, shape: _Ellipse, colour, texture) -> np.ndarray:
    mask = _inside(patch, shape) <= 1.0
    tint = np.asarray(colour, float) + rng.uniform(-15.0, 15.0, size=3)
    canvas[mask] = ((1.0 + 0.07 * texture)[..., None] * tint)[mask]
    return mask


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Strength of the inclusion's colour (1 full, 0.3 faint) in its rotated frame (u, v)."""
    faint = 0.3
    if kind == "solid":
        return np.ones_like(u)
    if kind == "ring":
        return np.where(u**2 + v**2 >= (0.5 * radius) ** 2, 1.0, faint)
    if kind == "striped":
        return np.where(np.floor(u / (0.5 * radius)) % 2 == 0, 1.0, faint)
    return np.where((u > 0) == (v > 0), 1.0, faint)  # quartered


def _part_mask(rng, patch, body: _Ellipse, body_mask, fraction: tuple[float, float]):
    """A disc inside the body with area fraction in `fraction`; returns (mask, centre, radius)."""
    low, high = fraction
    area = body_mask.sum()
    target = rng.uniform(low + 0.2 * (high - low), high - 0.2 * (high - low))
    radius = math.sqrt(target * area / math.pi)
    # Uniform in the body shrunk by the radius (plus 1 px), so the disc stays inside.
    s, t = rng.normal(size=2)
    spread = math.sqrt(rng.uniform()) / math.hypot(s, t)
    u, v = s * spread * max(body.a - radius - 1, 0), t * spread * max(body.b - radius - 1, 0)
    c, n = math.cos(body.angle), math.sin(body.angle)
    cx, cy = body.cx + u * c - v * n, body.cy + u * n + v * c
    distance2 = (patch.x - cx) ** 2 + (patch.y - cy) ** 2  # [h, w]
    for _ in range(20):
        mask = (distance2 <= radius**2) & body_mask
        got = mask.sum() / area
        if low <= got <= high:
            return mask, (cx, cy), radius
        radius *= math.sqrt(target / max(got, 0.5 / area))
    raise ValueError(
        f"cannot draw an inclusion of area fraction {fraction}; use a larger image_size")


def _paint_part(rng, canvas, patch, part, centre, radius, label: int) -> None:
    u, v = _local(patch, *centre, rng.uniform(0.0, 2 * math.pi))
    strength = _pattern(_PATTERNS[label % len(_PATTERNS)], u, v, radius)  # [h, w]
    colour = np.asarray(_MARK_COLOURS[label][1], float) + rng.uniform(-12.0, 12.0, size=3)
    mixed = canvas + strength[..., None] * (colour - canvas)  # [h, w, 3]
    canvas[part] = mixed[part]


def _count(rng, value: int | tuple[int, int]) -> int:
    low, high = (value, value) if isinstance(value, int) else value
    return int(rng.integers(low, high, endpoint=True))


def _finish(rng, canvas: np.ndarray) -> np.ndarray:
    size = canvas.shape[0]
    speckle = 1.0 + 0.06 * rng.standard_normal(size=(size, size, 1), dtype=np.float32)
    noisy = canvas * speckle * rng.uniform(0.92, 1.05)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _tight_box(mask: np.ndarray, patch: _Patch) -> np.ndarray:
    """`[x0, y0, x1, y1]` image pixels bounding a patch mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = patch.region[1].start, patch.region[0].start
    return np.array([xs.min() + x0, ys.min() + y0, xs.max() + x0, ys.max() + y0], dtype=np.int32)


def _rod_colour(rng, label: int, num_classes: int, cooccurrence: float) -> tuple:
    if num_classes == 1 or rng.uniform() < cooccurrence:
        return _ROD_COLOURS[label]
    others = [k for k in range(num_classes) if k != label]
    return _ROD_COLOURS[others[rng.integers(len(others))]]


def _shapes(rng, size: int, n_objects: int, n_decoys: int, n_rods: int, scale) -> list[_Ellipse]:
    for _ in range(100):
        bodies = [rng.uniform(*scale) * size for _ in range(n_objects + n_decoys)]
        rods = [rng.uniform(*_ROD_SCALE) * size for _ in range(n_rods)]
        axes = [(a, a * rng.uniform(*_BODY_ASPECT)) for a in bodies]
        axes += [(a, a * rng.uniform(*_ROD_ASPECT)) for a in rods]
        shapes = _layout(rng, size, axes)
        if shapes is not None:
            return shapes
    raise ValueError(f"cannot fit {n_objects + n_decoys} cells and {n_rods} rods into {size} px")


def _image(rng, label: int, size: int, options: dict):
    """One image: (pixels, boxes, object mask, part mask, distractor mask)."""
    n_objects = _count(rng, options["objects_per_image"])
    n_decoys = int(rng.uniform() < options["decoy_probability"])
    n_rods = _count(rng, options["distractors_per_image"])
    shapes = _shapes(rng, size, n_objects, n_decoys, n_rods, options["object_scale"])
    texture = _smooth_noise(rng, size, 1.2)  # shared by background and objects
    canvas = _background(rng, size, texture)  # [H, W, 3] float
    objects, parts, rods = np.zeros((3, size, size), bool)
    boxes = []
    for i, shape in enumerate(shapes):
        patch = _patch(shape, size)
        view, grain = canvas[patch.region], texture[patch.region]  # views: painting writes through
        if i >= n_objects + n_decoys:
            colour = _rod_colour(rng, label, options["num_classes"], options["cooccurrence"])
            rods[patch.region] |= _paint_rod(rng, view, patch, shape, colour, grain)
            continue
        decoy = i >= n_objects
        tint = 0.0 if decoy else _tint(label, options["num_classes"], options["body_tint"])
        body = _paint_body(rng, view, patch, shape, grain, tint)
        if decoy:
            continue  # decoy: a cell without inclusion
        part, centre, radius = _part_mask(rng, patch, shape, body, options["part_fraction"])
        _paint_part(rng, view, patch, part, centre, radius, label)
        objects[patch.region] |= body
        parts[patch.region] |= part
        boxes.append(_tight_box(body, patch))
    return _finish(rng, canvas), np.stack(boxes), objects, parts, rods


def make_wsol_dataset(
    num_images: int,
    *,
    image_size: int = 96,
    num_classes: int = 4,
    seed: int = 0,
    objects_per_image: int | tuple[int, int] = 1,
    distractors_per_image: int | tuple[int, int] = (1, 2),
    cooccurrence: float = 0.8,
    decoy_probability: float = 0.0,
    part_fraction: tuple[float, float] = (0.05, 0.15),
    object_scale: tuple[float, float] = (0.14, 0.22),
    body_tint: float = 0.0,
) -> WsolDataset:
    """Generate the synthetic localisation dataset (design in the module docstring).

    **Arguments:**

    - `num_images`: N.
    - `image_size`: S, at least 32.
    - `num_classes`: 1 to `MAX_CLASSES` (8); labels are balanced (counts differ by at most 1),
      in random order.
    - `seed`: the same seed gives the same dataset.
    - `objects_per_image`: cells of the class per image, an int or an inclusive range; each gets
      a ground-truth box. For several cells lower `object_scale` (e.g. 0.10-0.15) so they fit;
      an impossible layout raises `ValueError`.
    - `distractors_per_image`: rods per image, an int or an inclusive range.
    - `cooccurrence`: probability that a rod has its class's paired colour.
    - `decoy_probability`: probability of one extra cell without an inclusion.
    - `part_fraction`: range of the inclusion's area over its cell's area.
    - `object_scale`: range of a cell's semi-major axis as a fraction of S.
    - `body_tint`: non-negative; RGB levels by which a cell body's colour is shifted along its
      class's hue direction, a weak class cue spread over the body (the per-channel colour
      jitter is +-20 levels). 0 = the body carries no class evidence.

    **Returns:** a `WsolDataset` with images uint8 `(N, S, S, 3)`, labels int32 `(N,)`, boxes
    (one int32 `(k, 4)` array per image), `masks`, `parts`, `distractors` bool `(N, S, S)`, and
    `paths` = `<class>/<index>.png`.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if min(np.atleast_1d(objects_per_image)) < 1 or min(np.atleast_1d(distractors_per_image)) < 0:
        raise ValueError("need at least one object per image and no negative distractor count")
    if not 0.0 < part_fraction[0] <= part_fraction[1] < 1.0:
        raise ValueError(f"part_fraction must be a range inside (0, 1), got {part_fraction}")
    if not body_tint >= 0.0:  # also rejects NaN
        raise ValueError(f"body_tint must be non-negative, got {body_tint}")
    options = dict(
        num_classes=num_classes, objects_per_image=objects_per_image,
        distractors_per_image=distractors_per_image, cooccurrence=cooccurrence,
        decoy_probability=decoy_probability, part_fraction=part_fraction, object_scale=object_scale,
        body_tint=float(body_tint),
    )
    sequence = np.random.SeedSequence(seed)
    labels = np.random.default_rng(sequence).permutation(np.arange(num_images) % num_classes)
    labels = labels.astype(np.int32)
    drawn = [
        _image(np.random.default_rng(child), int(label), image_size, options)
        for child, label in zip(sequence.spawn(num_images), labels)
    ]
    images, boxes, masks, parts, rods = zip(*drawn)
    names = class_names(num_classes)
    return WsolDataset(
        images=np.stack(images),
        labels=labels,
        boxes=list(boxes),
        class_names=names,
        masks=np.stack(masks),
        parts=np.stack(parts),
        distractors=np.stack(rods),
        paths=[f"{names[label]}/{i:05d}.png" for i, label in enumerate(labels)],
    )
