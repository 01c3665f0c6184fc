"""Synthetic lesion images whose classes are combinations of known local features, each with a
ground-truth mask (docs/atlas.md): data on which a library of crops that activate a classifier
node can be scored (which feature does a crop fall on, how pure is the library).

Every image shows, on a textured pale "tissue" background, two or three small lesions. A
lesion is a mottled, slightly elliptical body darker than the tissue (semi-major axis
`lesion_scale * image_size`, 9.5-11.5 % of the side by default; aspect 0.85-1, any rotation)
that carries at most one of five local features (`FEATURES`), each a distinct pattern:

- `spiculated margin` (0): 7-11 dark spicules radiating from the margin out to 1.35-1.55 times
  the body's radius at roughly even angles, tapering towards the tip.
- `calcification specks` (1): 3-4 bright white specks (radius about 3 % of the side) around
  the body's centre, about half-way to the margin, at roughly even angles.
- `dark rim` (2): a very dark band, a quarter to a third of the radius wide, along 65-100 % of
  the body's margin.
- `lobulated contour` (3): 3-5 round lobes of the body's colour (radius 0.45-0.6 of the body's)
  centred on the margin, so the outline is a cluster of bumps.
- `internal septa` (4): 2-3 light lines crossing the body's interior at spread-out angles,
  stopping short of the margin.

Lines (spicules, septa) are 2.8 % of the side wide, at least 1 px. Colours, counts, sizes,
orientations and positions vary per lesion, and the spicules and the rim are both dark, the
specks and the septa both light: colour alone does not tell the features apart, their shape
does. Every length scales with `image_size` (32 and up; at 32 the patterns are a few pixels).

Classes: with `K = num_classes` (3 to 5) the dataset uses the first `K` features, and class `k`
is made of features `{k, (k + 1) mod K}` (`LesionDataset.class_features`). Every feature
appears in exactly two classes and no single feature decides a class, so a classifier has to
detect the features themselves. An image of class `k` has one lesion with feature `k`, one with
feature `k + 1 mod K`, and `plain_lesions` featureless ones (0 or 1 by default), so neither the
number of lesions nor their bodies carry the class. Labels are balanced (counts differ by at
most 1) and in random order.

Layout: each lesion's reach (its body plus spicules or lobes) keeps a gap of at least 3 % of the
side (2 px) from every other lesion's and stays inside the image, so the lesions of different
features never overlap and a window of a quarter of the side can fall on one feature. A
feature's site spans about 1/5 (specks, rim, septa) to 1/3 (spicules, lobes) of the side.

Masks: `features[i, f]` (bool `[N, F, S, S]`, `F = K`) marks the pixels where feature `f` is
visible in image `i`: the spicules and the lobes outside the body, the specks, the rim band, the
septa, each where the pattern covers at least half the pixel (drawing is anti-aliased). It is
empty for the features image `i` does not have and never empty for the two it has.
`sites[i, f]` is the whole lesion carrying the feature (its body and the pattern), `lesions[i]`
every lesion of the image, plain ones included.

Background: one tissue colour (jittered by up to 12 levels per channel per image) shaded by a
low-frequency field (cubic-spline interpolation of a random 4 x 4 grid, standard deviation
7 %) and a fine texture (5 %); the whole image then gets multiplicative speckle
(4 %), additive noise (2 levels) and a brightness jitter (0.93-1.06). Lesion bodies take the
same texture.

Deterministic: the labels come from `seed`, image `i` from the `i`-th generator spawned from
`seed`, which in turn spawns one generator for the tissue (background and noise) and one for the
lesions. `neutral_backgrounds(n, seed=s)[i]` is therefore image `i` of
`make_lesion_dataset(..., seed=s)` without its lesions: away from the lesions (one pixel past
their anti-aliased edges) the two are equal pixel for pixel; another seed gives unrelated tissue
of the same statistics. About 1.5 ms per 64 x 64 image (NumPy on the pixels around each
lesion); the masks take `(2 F + 1) N S^2` bytes.

`write_lesion_folder` writes the class-folder layout that `jaxmed.data.wsol_folder` reads, plus
`features.npz` with the masks; `load_lesion_folder` reads both back.
"""

import dataclasses
import functools
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.ndimage

from jaxmed.data.images import read_image
from jaxmed.data.wsol_folder import WsolDataset, write_wsol_folder
from jaxmed.errors import InputDataError

__all__ = [
    "FEATURES", "FEATURES_NPZ", "MAX_CLASSES", "MIN_CLASSES", "MIN_IMAGE_SIZE", "LesionDataset",
    "class_features", "load_lesion_folder", "make_lesion_dataset", "neutral_backgrounds",
    "write_lesion_folder",
]

FEATURES = (
    "spiculated margin", "calcification specks", "dark rim", "lobulated contour",
    "internal septa",
)
_SHORT_NAMES = ("spiculated", "specks", "rim", "lobulated", "septa")  # for class names
_SPICULATED, _SPECKS, _RIM, _LOBULATED, _SEPTA = range(len(FEATURES))
_PLAIN = -1  # a lesion without a feature
MIN_CLASSES, MAX_CLASSES = 3, len(FEATURES)
MIN_IMAGE_SIZE = 32
FEATURES_NPZ = "features.npz"

# A lesion's reach (how far its pattern extends) in units of its body's semi-major axis.
_REACH = {_SPICULATED: 1.55, _LOBULATED: 1.7}
_TISSUE = np.array([218.0, 192.0, 205.0])
_BODY = np.array([165.0, 115.0, 148.0])
_RIM_COLOUR = np.array([72.0, 44.0, 68.0])
_SPECK = np.array([255.0, 252.0, 246.0])
_SEPTUM = np.array([246.0, 236.0, 240.0])
_SPICULE_SHADE = 0.55  # spicules: the body's colour, much darker


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value
class LesionDataset:
    """Lesion images with their labels and the ground-truth masks of their features.

    **Fields:**

    - `images`: uint8 `[N, S, S, 3]`.
    - `labels`: int32 `[N]`, indices into `class_names`.
    - `features`: bool `[N, F, S, S]`: where each feature is visible in each image (empty for
      the features an image does not have).
    - `sites`: bool `[N, F, S, S]`: the whole lesion carrying each feature (body and pattern).
    - `lesions`: bool `[N, S, S]`: every lesion of the image, featureless ones included.
    - `feature_names`: `F` names, index = feature axis.
    - `class_names`: `K` names, index = label; sorted, so class folders keep the labels.
    - `class_features`: per class, the indices of the features that make it.
    """

    images: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    sites: np.ndarray
    lesions: np.ndarray
    feature_names: list[str]
    class_names: list[str]
    class_features: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "LesionDataset":
        """The images at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.intp)
        return dataclasses.replace(
            self, images=self.images[indices], labels=self.labels[indices],
            features=self.features[indices], sites=self.sites[indices],
            lesions=self.lesions[indices],
        )


def class_features(num_classes: int) -> list[tuple[int, int]]:
    """The features of each class: `(k, (k + 1) mod num_classes)` for class `k`."""
    _check_classes(num_classes)
    return [(k, (k + 1) % num_classes) for k in range(num_classes)]


def _class_names(num_classes: int) -> list[str]:
    """`'<label>_<feature>_<feature>'`, e.g. `'0_spiculated_specks'`: sorted by label."""
    return [f"{k}_{_SHORT_NAMES[a]}_{_SHORT_NAMES[b]}"
            for k, (a, b) in enumerate(class_features(num_classes))]


# ---------------------------------------------------------------------------- tissue


class _Tissue(NamedTuple):
    """An image's background and the noise that finishes it, all drawn before any lesion."""

    canvas: np.ndarray  # [S, S, 3] float colour
    texture: np.ndarray  # [S, S] unit-variance fine texture, shared by the lesions
    speckle: np.ndarray  # [S, S, 1] multiplicative
    noise: np.ndarray  # [S, S, 3] additive, levels
    brightness: float


@functools.lru_cache(maxsize=8)
def _spline_upsampling(size: int, cells: int) -> np.ndarray:
    """[S, cells] matrix: periodic cubic-spline interpolation of `cells` values onto `size`
    pixels (`scipy.ndimage.zoom` of each unit vector; the 2-D zoom is separable)."""
    return scipy.ndimage.zoom(np.eye(cells), (size / cells, 1), order=3, mode="grid-wrap")


def _smooth_field(rng, size: int, cells: int = 4) -> np.ndarray:
    """Unit-variance field varying over `cells` grid cells per side: random values on a
    `cells x cells` grid interpolated by cubic splines (periodic)."""
    upsampling = _spline_upsampling(size, cells)  # [S, cells]
    field = upsampling @ rng.standard_normal(size=(cells, cells)) @ upsampling.T  # [S, S]
    return (field - field.mean()) / field.std()


def _tissue(rng, size: int) -> _Tissue:
    texture = scipy.ndimage.gaussian_filter(
        rng.standard_normal(size=(size, size)), 0.018 * size, mode="wrap")
    texture /= texture.std()  # [S, S]
    colour = _TISSUE + rng.uniform(-12.0, 12.0, size=3)
    shade = (1.0 + 0.07 * _smooth_field(rng, size)) * (1.0 + 0.05 * texture)  # [S, S]
    return _Tissue(
        canvas=shade[..., None] * colour,
        texture=texture,
        speckle=1.0 + 0.04 * rng.standard_normal(size=(size, size, 1)),
        noise=2.0 * rng.standard_normal(size=(size, size, 3)),
        brightness=float(rng.uniform(0.93, 1.06)),
    )


def _finish(tissue: _Tissue, canvas: np.ndarray) -> np.ndarray:
    noisy = canvas * tissue.speckle * tissue.brightness + tissue.noise  # [S, S, 3]
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- lesion geometry


class _Lesion(NamedTuple):
    cx: float  # centre, px (column)
    cy: float  # row
    a: float  # semi-major axis of the body, px
    b: float  # semi-minor axis
    angle: float  # of the major axis, radians
    feature: int  # index into FEATURES, or _PLAIN


class _Frame(NamedTuple):
    """The pixels around one lesion, in the lesion's own coordinates."""

    region: tuple[slice, slice]  # (rows, columns) of the image
    u: np.ndarray  # [h, w] px along the major axis (pixel centres)
    v: np.ndarray  # [h, w] px along the minor axis
    a: float
    b: float


def _reach(feature: int) -> float:
    return _REACH.get(feature, 1.0)


def _frame(lesion: _Lesion, size: int) -> _Frame:
    extent = lesion.a * _reach(lesion.feature) + 1.5
    x0, y0 = (max(int(c - extent), 0) for c in (lesion.cx, lesion.cy))
    x1, y1 = (min(int(math.ceil(c + extent)) + 1, size) for c in (lesion.cx, lesion.cy))
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] - lesion.cx  # [1, w]
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] - lesion.cy  # [h, 1]
    c, s = math.cos(lesion.angle), math.sin(lesion.angle)
    return _Frame((slice(y0, y1), slice(x0, x1)), dx * c + dy * s, -dx * s + dy * c,
                  lesion.a, lesion.b)


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased share of each pixel inside a shape, from its signed distance (px, negative
    inside): 1 deep inside, 0.5 on the outline, 0 a pixel out."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _ellipse_distance(frame: _Frame, scale: float = 1.0) -> np.ndarray:
    """Approximate signed distance (px) to the body's outline shrunk by `scale`."""
    a, b = scale * frame.a, scale * frame.b
    rho = np.sqrt((frame.u / a) ** 2 + (frame.v / b) ** 2)  # [h, w], 1 on the outline
    return (rho - 1.0) * math.sqrt(a * b)


def _boundary_radius(frame: _Frame, theta: np.ndarray) -> np.ndarray:
    """Distance from the centre to the body's outline in the local directions `theta`."""
    return frame.a * frame.b / np.hypot(frame.b * np.cos(theta), frame.a * np.sin(theta))


def _discs(frame: _Frame, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Coverage [h, w] of the union of discs at local `centres` [K, 2] with `radii` [K]."""
    du = frame.u[None] - centres[:, 0, None, None]  # [K, h, w]
    dv = frame.v[None] - centres[:, 1, None, None]
    return _coverage(np.hypot(du, dv) - radii[:, None, None]).max(axis=0)


def _line_width(size: int) -> float:
    return max(1.0, 0.028 * size)


def _spicules(rng, frame: _Frame, size: int) -> np.ndarray:
    """Tapered dark lines from inside the body out to 1.4-1.7 times its radius."""
    count = int(rng.integers(7, 11, endpoint=True))
    theta = rng.uniform(0, 2 * math.pi) + (np.arange(count) + rng.uniform(-0.25, 0.25, count)) \
        * 2 * math.pi / count  # [K]
    direction = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # [K, 2]
    radius = _boundary_radius(frame, theta)[:, None]
    start, end = 0.6 * radius * direction, rng.uniform(1.35, 1.55, (count, 1)) * radius * direction
    step = end - start  # [K, 2]
    du = frame.u[None] - start[:, 0, None, None]  # [K, h, w]
    dv = frame.v[None] - start[:, 1, None, None]
    along = (du * step[:, 0, None, None] + dv * step[:, 1, None, None]) \
        / (step**2).sum(axis=1)[:, None, None]
    along = np.clip(along, 0.0, 1.0)  # [K, h, w] 0 at the base, 1 at the tip
    distance = np.hypot(du - along * step[:, 0, None, None], dv - along * step[:, 1, None, None])
    # Tapering to half the width, but never under half a pixel: a line stays connected.
    half_width = np.maximum(0.5 * _line_width(size) * (1.0 - 0.5 * along), 0.5)
    return _coverage(distance - half_width).max(axis=0)


def _specks(rng, frame: _Frame, size: int) -> np.ndarray:
    """3-4 small bright discs around the body's centre, at roughly even angles."""
    count = int(rng.integers(3, 4, endpoint=True))
    theta = rng.uniform(0, 2 * math.pi) + (np.arange(count) + rng.uniform(-0.1, 0.1, count)) \
        * 2 * math.pi / count  # [K]
    distance = rng.uniform(0.45, 0.58, count)  # of the way to the outline
    centres = np.stack([distance * frame.a * np.cos(theta), distance * frame.b * np.sin(theta)],
                       axis=1)  # [K, 2]
    radius = max(0.75, 0.03 * size) * rng.uniform(0.95, 1.15)
    return _discs(frame, centres, np.full(count, radius))


def _rim(rng, frame: _Frame, body: np.ndarray) -> np.ndarray:
    """A dark band inside the body's outline along an arc of 65-100 % of it."""
    width = max(1.3, rng.uniform(0.25, 0.35) * frame.a)
    band = body * _coverage(-_ellipse_distance(frame, 1.0 - width / frame.a))  # [h, w]
    start, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.65, 1.0) * 2 * math.pi
    angle = np.arctan2(frame.v / frame.b, frame.u / frame.a)  # [h, w]
    return band * (np.mod(angle - start, 2 * math.pi) <= length)


def _lobes(rng, frame: _Frame) -> np.ndarray:
    """3-5 discs centred on the outline at roughly even angles."""
    count = int(rng.integers(3, 5, endpoint=True))
    theta = rng.uniform(0, 2 * math.pi) + (np.arange(count) + rng.uniform(-0.2, 0.2, count)) \
        * 2 * math.pi / count  # [K]
    distance = _boundary_radius(frame, theta) * rng.uniform(1.0, 1.1, count)
    centres = np.stack([distance * np.cos(theta), distance * np.sin(theta)], axis=1)  # [K, 2]
    return _discs(frame, centres, rng.uniform(0.45, 0.6, count) * frame.a)


def _septa(rng, frame: _Frame, size: int) -> np.ndarray:
    """2-3 straight light lines across the body, ending inside 80 % of its outline."""
    count = int(rng.integers(2, 3, endpoint=True))
    phi = rng.uniform(0, math.pi) + (np.arange(count) + rng.uniform(-0.15, 0.15, count)) \
        * math.pi / count  # [K] directions, spread out
    offset = rng.uniform(-0.35, 0.35, count) * frame.b
    across = -frame.u[None] * np.sin(phi)[:, None, None] + frame.v[None] * np.cos(phi)[:, None,
                                                                                        None]
    lines = _coverage(np.abs(across - offset[:, None, None]) - 0.5 * _line_width(size))
    return lines.max(axis=0) * _coverage(_ellipse_distance(frame, 0.8))  # [h, w]


class _Painted(NamedTuple):
    """One lesion drawn into its frame."""

    layers: list[tuple[np.ndarray, np.ndarray]]  # (coverage [h, w], colour [3] or [h, w, 3])
    pattern: np.ndarray  # [h, w] bool, where the feature is visible
    site: np.ndarray  # [h, w] bool, the whole lesion


_OVERLAY_COLOURS = {_SPECKS: _SPECK, _RIM: _RIM_COLOUR, _SEPTA: _SEPTUM}  # drawn over the body


def _pattern(rng, frame: _Frame, feature: int, body: np.ndarray, size: int) -> np.ndarray:
    """Coverage [h, w] of the feature's pattern."""
    if feature == _SPICULATED:
        return _spicules(rng, frame, size)
    if feature == _SPECKS:
        return _specks(rng, frame, size)
    if feature == _RIM:
        return _rim(rng, frame, body)
    if feature == _LOBULATED:
        return _lobes(rng, frame)
    return _septa(rng, frame, size)


def _paint(rng, frame: _Frame, feature: int, texture: np.ndarray, size: int) -> _Painted:
    body = _coverage(_ellipse_distance(frame))  # [h, w]
    colour = (_BODY + rng.uniform(-15.0, 15.0, size=3)) * (1.0 + 0.08 * texture)[..., None]
    tint = rng.uniform(-10.0, 10.0, size=3)  # the feature's colour jitter
    inside = body >= 0.5
    if feature == _PLAIN:
        return _Painted([(body, colour)], np.zeros_like(inside), inside)
    pattern = _pattern(rng, frame, feature, body, size)
    if feature == _SPICULATED:  # spicules under the body: only their outer part shows
        layers = [(pattern, _SPICULE_SHADE * colour), (body, colour)]
    elif feature == _LOBULATED:  # lobes of the body's own colour
        layers = [(np.maximum(body, pattern), colour)]
    else:
        layers = [(body, colour), (pattern, _OVERLAY_COLOURS[feature] + tint)]
    visible = pattern >= 0.5
    if feature in (_SPICULATED, _LOBULATED):
        visible &= ~inside  # the part outside the body
    return _Painted(layers, visible, inside | visible)


def _place(rng, size: int, reach: float, placed: list[tuple[float, float, float]], gap: float):
    """A centre keeping a lesion of `reach` inside the image and `gap` clear of the `placed`
    `(cx, cy, reach)`, or None."""
    low, high = reach + 1.0, size - 2.0 - reach
    for _ in range(50):
        cx, cy = rng.uniform(low, high, size=2)
        if all(math.hypot(cx - x, cy - y) >= reach + r + gap for x, y, r in placed):
            return cx, cy
    return None


def _layout(rng, size: int, features: list[int], scale: tuple[float, float]) -> list[_Lesion]:
    """Lesions with the given features, their reaches clear of each other and of the edges."""
    gap = max(2.0, 0.03 * size)
    for _ in range(100):
        axes = rng.uniform(*scale, size=len(features)) * size
        reaches = [a * _reach(f) for a, f in zip(axes, features)]
        centres, placed = {}, []
        for i in np.argsort(reaches)[::-1]:  # the largest first
            centre = _place(rng, size, reaches[i], placed, gap)
            if centre is None:
                break
            centres[i] = centre
            placed.append((*centre, reaches[i]))
        else:
            return [_Lesion(*centres[i], a, a * rng.uniform(0.85, 1.0), rng.uniform(0, math.pi), f)
                    for i, (a, f) in enumerate(zip(axes.tolist(), features))]
    raise ValueError(f"cannot fit {len(features)} lesions of scale {scale} into {size} px; "
                     "use fewer plain_lesions or a smaller lesion_scale")


# ---------------------------------------------------------------------------- images


def _draw(rng, size: int, tissue: _Tissue, features: list[int], num_features: int, scale):
    """Paint lesions on a copy of the tissue: (canvas, feature masks [F, S, S], sites, lesions)."""
    canvas = tissue.canvas.copy()
    patterns, sites = np.zeros((2, num_features, size, size), bool)
    lesions = np.zeros((size, size), bool)
    for lesion in _layout(rng, size, features, scale):
        frame = _frame(lesion, size)
        painted = _paint(rng, frame, lesion.feature, tissue.texture[frame.region], size)
        view = canvas[frame.region]  # a view: painting writes through
        for coverage, colour in painted.layers:
            view += coverage[..., None] * (colour - view)
        lesions[frame.region] |= painted.site
        if lesion.feature != _PLAIN:
            patterns[lesion.feature][frame.region] |= painted.pattern
            sites[lesion.feature][frame.region] |= painted.site
    return canvas, patterns, sites, lesions


def _image(sequence: np.random.SeedSequence, label: int, size: int, options: dict):
    """One image of class `label`: (pixels, feature masks, sites, lesions)."""
    tissue_sequence, lesion_sequence = sequence.spawn(2)
    tissue = _tissue(np.random.default_rng(tissue_sequence), size)
    rng = np.random.default_rng(lesion_sequence)
    low, high = options["plain_lesions"]
    own = list(options["class_features"][label])
    for _ in range(20):  # a pattern too small to cover half a pixel: draw the lesions again
        features = own + [_PLAIN] * int(rng.integers(low, high, endpoint=True))
        canvas, patterns, sites, lesions = _draw(rng, size, tissue, features,
                                                 options["num_features"], options["scale"])
        if all(patterns[f].any() for f in own):
            return _finish(tissue, canvas), patterns, sites, lesions
    raise ValueError(f"cannot draw visible features at image_size {size}; use a larger one")


def _check_classes(num_classes: int) -> None:
    if not MIN_CLASSES <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"num_classes must be in {MIN_CLASSES}..{MAX_CLASSES} (class k has features k and "
            f"k + 1 mod num_classes), got {num_classes}")


def _check_sizes(num_images: int, image_size: int) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")


def make_lesion_dataset(
    num_images: int,
    *,
    image_size: int = 64,
    num_classes: int = 5,
    seed: int = 0,
    plain_lesions: int | tuple[int, int] = (0, 1),
    lesion_scale: tuple[float, float] = (0.095, 0.115),
) -> LesionDataset:
    """Generate the synthetic lesion dataset (design in the module docstring).

    **Arguments:**

    - `num_images`: N, at least 1.
    - `image_size`: S, at least 32; every length scales with it.
    - `num_classes`: K, 3 to 5: the dataset uses the first K features, class `k` has features
      `k` and `k + 1 mod K`. Labels are balanced (counts differ by at most 1), in random order.
    - `seed`: the same seed gives the same dataset.
    - `plain_lesions`: featureless lesions per image, an int or an inclusive range.
    - `lesion_scale`: range of a lesion body's semi-major axis as a fraction of S.

    **Returns:** a `LesionDataset`: images uint8 `[N, S, S, 3]`, labels int32 `[N]`, feature
    masks and sites bool `[N, K, S, S]`, lesions bool `[N, S, S]`.

    **Raises:** `ValueError` for an argument outside the ranges above, or lesions that cannot
    fit (too many plain lesions, too large a scale).
    """
    _check_sizes(num_images, image_size)
    _check_classes(num_classes)
    plain = (plain_lesions, plain_lesions) if isinstance(plain_lesions, int) else plain_lesions
    if not 0 <= plain[0] <= plain[1]:
        raise ValueError(
            f"plain_lesions must be a non-negative count or range, got {plain_lesions}")
    if not 0.0 < lesion_scale[0] <= lesion_scale[1] <= 0.2:
        raise ValueError(f"lesion_scale must be a range inside (0, 0.2], got {lesion_scale}")
    options = dict(class_features=class_features(num_classes), num_features=num_classes,
                   plain_lesions=tuple(plain), scale=tuple(lesion_scale))
    sequence = np.random.SeedSequence(seed)
    labels = np.random.default_rng(sequence).permutation(np.arange(num_images) % num_classes)
    labels = labels.astype(np.int32)
    drawn = [_image(child, int(label), image_size, options)
             for child, label in zip(sequence.spawn(num_images), labels)]
    images, patterns, sites, lesions = (np.stack(parts) for parts in zip(*drawn))
    return LesionDataset(
        images=images, labels=labels, features=patterns, sites=sites, lesions=lesions,
        feature_names=list(FEATURES[:num_classes]), class_names=_class_names(num_classes),
        class_features=[tuple(f) for f in options["class_features"]],
    )


def neutral_backgrounds(num_images: int, *, image_size: int = 64, seed: int = 0) -> np.ndarray:
    """Tissue without any lesion, of the dataset's background statistics: the canvas to paste
    crops into.

    With the seed of a `make_lesion_dataset` call, image `i` is that dataset's image `i` with
    its lesions removed (the same tissue and noise); another seed gives unrelated tissue.

    **Returns:** uint8 `[N, S, S, 3]`.
    """
    _check_sizes(num_images, image_size)
    images = []
    for child in np.random.SeedSequence(seed).spawn(num_images):
        tissue = _tissue(np.random.default_rng(child.spawn(2)[0]), image_size)
        images.append(_finish(tissue, tissue.canvas))
    return np.stack(images)


# ---------------------------------------------------------------------------- folders


def _paths(dataset: LesionDataset) -> list[str]:
    return [f"{dataset.class_names[label]}/{i:05d}.png" for i, label in enumerate(dataset.labels)]


def write_lesion_folder(dataset: LesionDataset, root: str | os.PathLike) -> Path:
    """Write `dataset` as class sub-folders of PNGs (`root/<class>/<index>.png`, the layout
    `jaxmed.data.wsol_folder.load_wsol_folder` reads) and `root/features.npz`, written last.

    `features.npz` holds, in the dataset's order: `paths` (each image's path relative to
    `root`, so masks can be matched to a folder loaded in another order), `labels`, `features`,
    `sites`, `lesions`, `feature_names`, `class_names` and `class_features` (int `[K, 2]`).
    `root` must be absent or empty.

    **Returns:** the path of `features.npz`.
    """
    root, paths = Path(root), _paths(dataset)
    write_wsol_folder(WsolDataset(images=dataset.images, labels=dataset.labels, boxes=None,
                                  class_names=list(dataset.class_names), paths=paths), root)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, paths=np.array(paths), labels=dataset.labels, features=dataset.features,
        sites=dataset.sites, lesions=dataset.lesions,
        feature_names=np.array(dataset.feature_names), class_names=np.array(dataset.class_names),
        class_features=np.array(dataset.class_features, dtype=np.int32),
    )
    target = root / FEATURES_NPZ
    temporary = target.with_name(f".{target.name}.partial")
    temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, target)
    return target


_NPZ_KEYS = ("paths", "labels", "features", "sites", "lesions", "feature_names", "class_names",
             "class_features")


def load_lesion_folder(root: str | os.PathLike) -> LesionDataset:
    """Read a folder written by `write_lesion_folder` back, in the dataset's order.

    **Raises:** `InputDataError` naming the file: no or an unreadable `features.npz`, a missing
    key, an image that is missing, unreadable or not of the masks' size.
    """
    root = Path(root)
    npz_path = root / FEATURES_NPZ
    if not npz_path.is_file():
        raise InputDataError(f"{npz_path}: no such file (write_lesion_folder writes it)")
    try:
        with np.load(npz_path, allow_pickle=False) as stored:
            missing = [key for key in _NPZ_KEYS if key not in stored]
            if missing:
                raise InputDataError(f"{npz_path}: missing {', '.join(missing)}")
            arrays = {key: stored[key] for key in _NPZ_KEYS}
    except (OSError, ValueError) as error:
        if isinstance(error, InputDataError):
            raise
        raise InputDataError(f"{npz_path}: cannot read the masks ({error})") from error
    size = arrays["lesions"].shape[-1]
    images = np.empty((len(arrays["paths"]), size, size, 3), np.uint8)
    for i, name in enumerate(arrays["paths"]):
        pixels = read_image(root / str(name))
        if pixels.shape != (size, size, 3):
            raise InputDataError(f"{root / str(name)}: {pixels.shape[1]}x{pixels.shape[0]} "
                                 f"image, the masks in {npz_path} are {size}x{size}")
        images[i] = pixels
    return LesionDataset(
        images=images, labels=arrays["labels"].astype(np.int32), features=arrays["features"],
        sites=arrays["sites"], lesions=arrays["lesions"],
        feature_names=[str(n) for n in arrays["feature_names"]],
        class_names=[str(n) for n in arrays["class_names"]],
        class_features=[tuple(int(f) for f in row) for row in arrays["class_features"]],
    )
