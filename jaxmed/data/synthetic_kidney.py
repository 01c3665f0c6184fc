"""Synthetic kidney-ultrasound phantoms with exact masks, the segmentation default.

Each phantom is a B-mode image of a kidney seen through a convex probe, with its label map:
0 = outside the kidney (including outside the field of view), 1 = hydronephrosis fluid,
2 = kidney tissue. Fluid always lies inside the kidney, with a rim of tissue around it.

How an image is made (lengths are fractions of the image height `H`):

1. Probe: a sector (fan) with its apex above the image, half-angle 28-36 degrees, a curved
   top edge (the convex footprint) and a curved bottom edge; pixels outside are black. Wide
   sectors are clipped by the image sides, as on a scanner's screen.
2. Anatomy, drawn as analytic shapes so that the mask is exact at every pixel centre:
   - the kidney: an ellipse with long semi-axis 0.20-0.32 H, aspect 0.45-0.62, rotated
     +-30 degrees from horizontal, its boundary radius perturbed by harmonics 2-5 and indented
     at the hilum (a bean);
   - the renal sinus (bright fat around the collecting system) and, in normal-looking
     kidneys, darker medullary pyramids between sinus and cortex;
   - fluid (class 1), by grade: none (12 %), mild (28 %, a dilated pelvis), moderate (30 %,
     pelvis and calyces joined by infundibula) or severe (30 %, ballooned pelvis and calyces
     up to a thin cortex) - a lobulated, branching shape cut to the inner 82-88 % of the
     kidney's radius;
   - around it: perirenal fat (a rim from barely visible to bright, patchy), parenchyma
     with smooth texture, skin/fat/muscle layers near the probe, 0-2 anechoic vessels,
     sometimes a rib (bright band near the top, 30 %) and sometimes a kidney stone (a bright
     dot in the sinus, 25 %).
   Echo levels (amplitude, dB below the brightest reflector): parenchyma -22..-17 (+-2 dB
   texture), cortex 2-6 dB darker, pyramids 6-10 dB darker than cortex, sinus and
   perirenal fat -16..-5, fluid and vessels -60..-55, rib and stone +2.
3. Physics on a polar grid (depth x beam angle, about one sample per pixel): the
   reflectivity map is smoothed by a small point-spread function; along each beam the
   signal is attenuated by what lies in front of it relative to the time-gain-compensated
   tissue, so ribs and stones cast dark acoustic shadows and fluid gives posterior
   enhancement; a random residual depth gain and a lateral fall-off remain.
4. Speckle: complex scatter smoothed by an anisotropic point-spread function (longer across
   the beam); its magnitude is Rayleigh-distributed multiplicative noise (see `_speckle`).
   A -50 dB electronic noise floor is added, then the image is log-compressed over a
   45-55 dB dynamic range.
5. Scan conversion: the polar image is resampled (bilinear) onto the Cartesian pixel grid.

Images are returned as uint8 `(N, H, W, 3)` with the grey value repeated over the three
channels: the same layout as `jaxmed.data.segmentation_folder.read_pair` gives for a real
image, so the training program treats both sources alike. Phantom `i` depends only on
`(seed, i, size)`, so a shorter run is a prefix of a longer one. A phantom of 128 x 128 takes
about 5 ms of one core (NumPy, float32, only the kidney's bounding box evaluated in detail).
"""

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.ndimage

from jaxmed.data.images import write_image
from jaxmed.data.letterbox import resize

OUTSIDE, FLUID, TISSUE = 0, 1, 2
CLASS_NAMES = ("outside kidney", "hydronephrosis fluid", "kidney tissue")
NUM_CLASSES = 3
_GRADE_PROBABILITIES = (0.12, 0.28, 0.30, 0.30)  # none, mild, moderate, severe
_SAMPLES_PER_PIXEL = 1.0


class _Probe(NamedTuple):
    apex_y: float
    apex_x: float
    r_min: float
    r_max: float
    half_angle: float


class _Kidney(NamedTuple):
    """A kidney in its own frame: `u` along the long axis, `v` across, origin at its centre."""

    centre: tuple[float, float]  # (y, x) in pixels
    axes: tuple[float, float]  # long and short semi-axes in pixels
    angle: float
    hilum: float  # +1 or -1: the side (sign of v) of the hilum
    harmonics: np.ndarray  # (4, 2): amplitude and phase of harmonics 2..5
    dent: tuple[float, float]  # depth and angular width of the hilum indentation
    sinus: np.ndarray  # (4,): u, v, semi-axes of the sinus ellipse
    pelvis: np.ndarray  # (4,): u, v, semi-axes of the pelvis ellipse (zero size = no fluid)
    calyces: np.ndarray  # (M, 4): u, v, radius, infundibulum half-width
    fluid_limit: float  # fluid stays inside this fraction of the kidney's radius


class _Extras(NamedTuple):
    """Structures outside the kidney model, in image pixels."""

    vessels: np.ndarray  # (V, 4): y, x, semi-axes
    rib: np.ndarray | None  # (4,): depth, thickness, angle from, angle to
    stone: np.ndarray | None  # (3,): y, x, radius
    layers: np.ndarray  # (4,): depths below the probe face where fat, muscle, fascia, muscle end


def make_kidney_phantoms(
    num_images: int, *, size: int | tuple[int, int] = 128, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic B-mode kidney ultrasound images and their exact label maps.

    **Arguments:**

    - `num_images`: how many phantoms.
    - `size`: `S` (square) or `(H, W)`; at least 32 pixels each way.
    - `seed`: phantom `i` depends only on `(seed, i, size)`.

    **Returns:** `(images, masks)`: uint8 `(N, H, W, 3)` (grey repeated over 3 channels) and
    int32 `(N, H, W)` with 0 = outside kidney, 1 = hydronephrosis fluid, 2 = kidney tissue.
    """
    shape = (size, size) if np.isscalar(size) else tuple(int(n) for n in size)
    if min(shape) < 32:
        raise ValueError(f"phantoms need at least 32 x 32 pixels, got {shape}")
    images = np.empty((num_images, *shape, 3), np.uint8)
    masks = np.empty((num_images, *shape), np.int32)
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(num_images)):
        grey, masks[i] = _phantom(np.random.default_rng(child), shape)
        images[i] = grey[..., None]
    return images, masks


def write_segmentation_folder(images: np.ndarray, masks: np.ndarray, root: str | Path) -> None:
    """Write images and masks as `root/images/NNNNN.png` and `root/masks/NNNNN.png`.

    The layout `jaxmed.data.segmentation_folder.load_segmentation_folder` reads. Images whose
    channels are all equal are stored as one-channel grey PNG (read back as RGB they are
    the same pixels); masks as 8-bit grey PNG holding the class numbers.

    **Arguments:**

    - `images`: uint8 `(N, H, W)` or `(N, H, W, 3)`.
    - `masks`: integer `(N, H, W)` with values in 0..255.
    """
    images, masks = np.asarray(images), np.asarray(masks)
    if images.shape[:3] != masks.shape or masks.ndim != 3:
        raise ValueError(f"images {images.shape} and masks {masks.shape} do not pair up")
    if masks.size and (masks.min() < 0 or masks.max() > 255):
        raise ValueError("mask values must fit in 8 bits (0..255)")
    root = Path(root)
    digits = max(5, len(str(len(images) - 1)))
    for i, (image, mask) in enumerate(zip(images, masks)):
        if image.ndim == 3 and np.all(image == image[..., :1]):
            image = image[..., 0]
        write_image(root / "images" / f"{i:0{digits}d}.png", image.astype(np.uint8))
        write_image(root / "masks" / f"{i:0{digits}d}.png", mask.astype(np.uint8))


# ---------------------------------------------------------------------------- one phantom


def _phantom(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One `(H, W)` uint8 image and its `(H, W)` int32 label map."""
    probe = _draw_probe(rng, shape)
    kidney = _draw_kidney(rng, probe, shape)
    extras = _draw_extras(rng, probe, kidney, shape)
    depth, angle = _polar_axes(probe, shape)  # depth: [R, 1], angle: [1, A]
    reflectivity, excess_attenuation = _acoustics(rng, probe, kidney, extras, depth, angle)
    polar = _bmode(rng, probe, reflectivity, excess_attenuation, depth, angle)  # [R, A] in [0, 1]
    image, in_view = _scan_convert(polar, probe, shape)
    labels = _label_map(kidney, shape) * in_view
    return np.round(image * 255).astype(np.uint8), labels


def _draw_probe(rng: np.random.Generator, shape: tuple[int, int]) -> _Probe:
    height, width = shape
    radius = rng.uniform(0.2, 0.3) * height  # convex footprint radius
    apex_y = -radius + rng.uniform(0.0, 0.03) * height
    return _Probe(
        apex_y=apex_y,
        apex_x=(width - 1) / 2 + rng.uniform(-0.03, 0.03) * width,
        r_min=radius,
        r_max=(height - 1) - apex_y - rng.uniform(0.0, 0.04) * height,
        half_angle=math.radians(rng.uniform(28, 36)),
    )


def _draw_kidney(rng: np.random.Generator, probe: _Probe, shape: tuple[int, int]) -> _Kidney:
    long_axis = rng.uniform(0.20, 0.32) * shape[0]
    short_axis = long_axis * rng.uniform(0.45, 0.62)
    depth = probe.r_min + rng.uniform(0.38, 0.6) * (probe.r_max - probe.r_min)
    beam = rng.uniform(-0.35, 0.35) * probe.half_angle
    centre = (probe.apex_y + depth * math.cos(beam), probe.apex_x + depth * math.sin(beam))
    hilum = float(rng.choice([-1.0, 1.0]))
    harmonics = np.stack([rng.uniform(0, 0.06, 4) / np.arange(1, 5),
                          rng.uniform(0, 2 * np.pi, 4)], 1)
    sinus = np.array([rng.uniform(-0.08, 0.08) * long_axis,
                      hilum * rng.uniform(0.1, 0.25) * short_axis,
                      rng.uniform(0.5, 0.65) * long_axis, rng.uniform(0.3, 0.42) * short_axis])
    pelvis, calyces, limit = _draw_fluid(rng, sinus[:2], (long_axis, short_axis), hilum)
    return _Kidney(centre, (long_axis, short_axis), np.deg2rad(rng.uniform(-30, 30)), hilum,
                   harmonics, (rng.uniform(0.1, 0.22), rng.uniform(0.3, 0.45)), sinus, pelvis,
                   calyces, limit)


def _draw_fluid(rng, sinus_centre, axes, hilum):
    """Pelvis ellipse `(u, v, a, b)`, calyces `(M, 4)` and the radius limit, by grade."""
    long_axis, short_axis = axes
    grade = rng.choice(4, p=_GRADE_PROBABILITIES)
    pelvis_size = [(0, 0), (0.12, 0.22), (0.18, 0.3), (0.28, 0.45)][grade]
    calyx_size = [(0, 0), (0, 0), (0.07, 0.11), (0.12, 0.19)][grade]
    pelvis = np.array([*sinus_centre, *(rng.uniform(*pelvis_size, 2) * axes)])
    count = rng.integers(3, 6)
    # Calyces fan out away from the hilum, from pole to pole (angles in the unit-circle frame).
    spread = np.linspace(-1, 1, count) * rng.uniform(1.2, 1.6) + rng.uniform(-0.2, 0.2, count)
    theta = -hilum * np.pi / 2 + spread
    reach = rng.uniform(0.45, 0.62, count)
    radius = rng.uniform(*calyx_size, count) * long_axis
    calyces = np.stack([reach * np.cos(theta) * long_axis, reach * np.sin(theta) * short_axis,
                        radius, radius * rng.uniform(0.35, 0.55, count)], 1)
    return pelvis, calyces, 0.88 if grade == 3 else 0.82


def _draw_extras(rng, probe: _Probe, kidney: _Kidney, shape) -> _Extras:
    height = shape[0]
    vessels = []
    for _ in range(rng.integers(0, 3)):
        depth = probe.r_min + rng.uniform(0.15, 0.9) * (probe.r_max - probe.r_min)
        beam = rng.uniform(-0.8, 0.8) * probe.half_angle
        vessels.append([probe.apex_y + depth * np.cos(beam), probe.apex_x + depth * np.sin(beam),
                        *rng.uniform(0.015, 0.045, 2) * height])
    rib = None
    if rng.random() < 0.3:
        start = rng.uniform(-1, 0.6) * probe.half_angle
        rib = np.array([rng.uniform(0.06, 0.2) * height, rng.uniform(0.02, 0.035) * height,
                        start, start + rng.uniform(0.15, 0.4) * probe.half_angle])
    stone = None
    if rng.random() < 0.25:
        u, v = kidney.sinus[:2] + rng.uniform(-0.5, 0.5, 2) * kidney.sinus[2:]
        stone = np.array([*_to_image(kidney, u, v), rng.uniform(0.012, 0.025) * height])
    layers = np.cumsum(rng.uniform([0.015, 0.02, 0.008], [0.03, 0.05, 0.015])) * height
    layers = np.append(layers, layers[-1] + rng.uniform(0.03, 0.07) * height)
    return _Extras(np.array(vessels).reshape(-1, 4), rib, stone, layers)


# ---------------------------------------------------------------------------- anatomy


def _to_kidney_frame(kidney: _Kidney, y, x):
    dy, dx = y - kidney.centre[0], x - kidney.centre[1]
    # Python floats keep float32 grids float32.
    c, s = math.cos(kidney.angle), math.sin(kidney.angle)
    return dx * c + dy * s, -dx * s + dy * c


def _to_image(kidney: _Kidney, u, v):
    c, s = np.cos(kidney.angle), np.sin(kidney.angle)
    return kidney.centre[0] + u * s + v * c, kidney.centre[1] + u * c - v * s


def _reach(kidney: _Kidney, margin: float) -> float:
    """Radius (pixels) of a disc about the centre holding `relative < margin`."""
    return margin * kidney.axes[0] * (1.0 + kidney.harmonics[:, 0].sum()) + 1.0


def _kidney_regions(kidney: _Kidney, y, x):
    """Boolean kidney and fluid masks at points `(y, x)`, and the normalised radius (1 = edge).

    The boundary radius in the unit-circle frame is `1 + sum_k a_k cos(k t + p_k)` minus the
    hilum indentation `d exp((cos(t - t_hilum) - 1) / w^2)` (a Gaussian bump of width `w` in
    angle); the cosines of `k t` come from a recurrence, so no arctangent is needed.
    """
    u, v = _to_kidney_frame(kidney, y, x)
    un, vn = u / kidney.axes[0], v / kidney.axes[1]
    rho = np.hypot(un, vn) + 1e-9
    cos_t, sin_t = un / rho, vn / rho
    cos_k, sin_k = cos_t, sin_t
    boundary = 1.0
    for amp, phase in kidney.harmonics.tolist():  # harmonics 2..5
        cos_k, sin_k = cos_k * cos_t - sin_k * sin_t, sin_k * cos_t + cos_k * sin_t
        boundary = boundary + amp * (cos_k * math.cos(phase) - sin_k * math.sin(phase))
    depth, width = kidney.dent
    boundary = boundary - depth * np.exp((kidney.hilum * sin_t - 1.0) / width ** 2)
    relative = rho / boundary
    fluid = _fluid(kidney, u, v) & (relative < kidney.fluid_limit)
    return relative < 1.0, fluid, relative


def _fluid(kidney: _Kidney, u, v):
    """Union of the pelvis ellipse, calyx discs and the infundibula joining them."""
    pu, pv, pa, pb = kidney.pelvis.tolist()
    if pa <= 0:
        return np.zeros(np.broadcast_shapes(np.shape(u), np.shape(v)), bool)
    fluid = _ellipse(u, v, pu, pv, pa, pb)
    for cu, cv, radius, width in kidney.calyces.tolist():
        if radius <= 0:
            continue
        du, dv = cu - pu, cv - pv
        along = np.clip(((u - pu) * du + (v - pv) * dv) / (du * du + dv * dv), 0, 1)
        to_axis = np.hypot(u - pu - along * du, v - pv - along * dv)
        fluid |= (np.hypot(u - cu, v - cv) < radius) | (to_axis < width)
    return fluid


def _ellipse(a, b, centre_a, centre_b, semi_a, semi_b):
    return ((a - centre_a) / semi_a) ** 2 + ((b - centre_b) / semi_b) ** 2 < 1.0


def _label_map(kidney: _Kidney, shape) -> np.ndarray:
    """The exact `(H, W)` int32 label map at the pixel centres (only the kidney's box is
    evaluated)."""
    labels = np.zeros(shape, np.int32)
    reach = _reach(kidney, 1.0)
    (r0, r1), (c0, c1) = (
        (int(np.clip(np.floor(c - reach), 0, n)), int(np.clip(np.ceil(c + reach) + 1, 0, n)))
        for c, n in zip(kidney.centre, shape)
    )
    y = np.arange(r0, r1, dtype=np.float32)[:, None]
    x = np.arange(c0, c1, dtype=np.float32)[None, :]
    kidney_mask, fluid, _ = _kidney_regions(kidney, y, x)
    labels[r0:r1, c0:c1] = np.where(fluid, FLUID, np.where(kidney_mask, TISSUE, OUTSIDE))
    return labels


# ---------------------------------------------------------------------------- acoustics


def _polar_axes(probe: _Probe, shape):
    """Sample depths `[R, 1]` and beam angles `[1, A]` (float32), about one per pixel."""
    n_depth = int(np.ceil(_SAMPLES_PER_PIXEL * (probe.r_max - probe.r_min)))
    n_beams = int(np.ceil(_SAMPLES_PER_PIXEL
                          * min(2 * probe.half_angle * probe.r_max, 1.6 * shape[1])))
    depth = np.linspace(probe.r_min, probe.r_max, n_depth, dtype=np.float32)[:, None]
    angle = np.linspace(-probe.half_angle, probe.half_angle, n_beams, dtype=np.float32)[None, :]
    return depth, angle


def _acoustics(rng, probe: _Probe, kidney: _Kidney, extras: _Extras, depth, angle):
    """Amplitude reflectivity and attenuation in excess of the gain-compensated tissue, `[R, A]`."""
    y = probe.apex_y + depth * np.cos(angle)  # y, x: [R, A] image positions of the samples
    x = probe.apex_x + depth * np.sin(angle)
    texture = _smooth_texture(rng, y.shape)
    parenchyma = rng.uniform(-22, -17)
    reflectivity = _amplitude(parenchyma + 2.0 * texture)
    for y0, x0, sy, sx in extras.vessels.tolist():
        reflectivity[_ellipse(y, x, y0, x0, sy, sx)] = _amplitude(-55)
    reflectivity = _near_field(rng, reflectivity, depth - probe.r_min, extras.layers)
    excess = np.zeros_like(reflectivity)
    blockers = np.zeros(y.shape, bool)
    if extras.rib is not None:
        rib_depth, thickness, start, stop = extras.rib
        at_rib_depth = np.abs(depth - probe.r_min - rib_depth) < thickness / 2  # [R, 1]
        blockers |= at_rib_depth & (angle > start) & (angle < stop)
    window = _polar_window(probe, kidney, depth[:, 0], angle[0])
    _draw_kidney_echoes(rng, probe, kidney, extras, reflectivity[window], excess[window],
                        blockers[window], y[window], x[window], parenchyma + texture[window])
    reflectivity[blockers] = _amplitude(2)
    excess[blockers] = np.log(30.0) / (0.02 * (probe.r_max - probe.apex_y))
    return reflectivity, excess


def _draw_kidney_echoes(rng, probe, kidney, extras, reflectivity, excess, blockers, y, x,
                        parenchyma):
    """Write the kidney, its perirenal fat and any stone into the window views, in place.

    `parenchyma` is the surrounding tissue's level in dB (with its texture); the cortex is a
    little darker, pyramids darker still, sinus and perirenal fat bright, fluid anechoic.
    """
    kidney_mask, fluid, relative = _kidney_regions(kidney, y, x)
    u, v = _to_kidney_frame(kidney, y, x)
    fat = (relative >= 1.0) & (relative < rng.uniform(1.04, 1.2))
    # Perirenal fat: from barely brighter than the surroundings to bright, patchy along the edge.
    reflectivity[fat] = _amplitude(rng.uniform(-16, -5)
                                   + 4.0 * (parenchyma[fat] - parenchyma.mean()))
    cortex_db = parenchyma - rng.uniform(2, 6)
    sinus = _ellipse(u, v, *kidney.sinus.tolist()) & (relative < 0.78)
    pyramids = _pyramids(kidney, u, v) & (relative < 0.9) & ~sinus
    inside_db = np.where(sinus, rng.uniform(-10, -5),
                         cortex_db - np.where(pyramids, rng.uniform(6, 10), 0))
    reflectivity[...] = np.where(kidney_mask, _amplitude(np.where(fluid, -60, inside_db)),
                                 reflectivity)
    # Fluid attenuates less than the tissue the gain compensates for: posterior enhancement.
    excess[kidney_mask & fluid] = -np.log(1.8) / (0.2 * (probe.r_max - probe.apex_y))
    if extras.stone is not None:
        blockers |= np.hypot(y - extras.stone[0], x - extras.stone[1]) < extras.stone[2]


def _polar_window(probe: _Probe, kidney: _Kidney, depth, angle):
    """Index slices of the polar grid covering the kidney and its perirenal fat."""
    reach = _reach(kidney, 1.25)
    centre_depth = np.hypot(kidney.centre[0] - probe.apex_y, kidney.centre[1] - probe.apex_x)
    centre_angle = np.arctan2(kidney.centre[1] - probe.apex_x, kidney.centre[0] - probe.apex_y)
    half = np.arcsin(min(1.0, reach / centre_depth))
    rows = np.searchsorted(depth, [centre_depth - reach, centre_depth + reach])
    cols = np.searchsorted(angle, [centre_angle - half, centre_angle + half])
    return slice(max(rows[0] - 1, 0), rows[1] + 1), slice(max(cols[0] - 1, 0), cols[1] + 1)


def _smooth_texture(rng, shape):
    """Unit-variance smooth noise (correlation length about 4 samples), drawn at a quarter scale."""
    coarse = scipy.ndimage.gaussian_filter(
        rng.standard_normal((shape[0] // 4 + 3, shape[1] // 4 + 3), dtype=np.float32), 1.0)
    texture = resize(coarse, shape, order=1)
    return texture / (texture.std() + 1e-6)


def _pyramids(kidney: _Kidney, u, v):
    """Medullary pyramids: small discs just outside the (undilated) calyces."""
    pyramids = np.zeros(np.broadcast_shapes(np.shape(u), np.shape(v)), bool)
    if kidney.calyces[:, 2].max(initial=0) > 0.1 * kidney.axes[0]:
        return pyramids  # effaced by severe dilation
    size = 0.1 * kidney.axes[0]
    for cu, cv, _, _ in kidney.calyces.tolist():
        pyramids |= np.hypot(u - 1.2 * cu, v - 1.2 * cv) < size
    return pyramids


def _near_field(rng, reflectivity, below_face, layers):
    """Skin, subcutaneous fat, fascia and muscle bands under the probe face (`below_face`:
    [R, 1])."""
    profile = np.full(below_face.shape, np.nan, np.float32)
    muscle = ((below_face >= layers[0]) & (below_face < layers[1])) | (
        (below_face >= layers[2]) & (below_face < layers[3]))
    profile[muscle] = _amplitude(rng.uniform(-24, -18))
    profile[(below_face < layers[0])] = _amplitude(rng.uniform(-28, -22))  # subcutaneous fat
    skin_and_fascia = (below_face < 0.4 * layers[0]) | (
        (below_face >= layers[1]) & (below_face < layers[2]))
    profile[skin_and_fascia] = _amplitude(rng.uniform(-8, -4))
    return np.where(np.isnan(profile), reflectivity, profile)


def _bmode(rng, probe: _Probe, reflectivity, excess, depth, angle):
    """Log-compressed B-mode image in [0, 1] on the polar grid (all arrays [R, A] float32)."""
    step = (probe.r_max - probe.r_min) / max(reflectivity.shape[0] - 1, 1)  # pixels per sample
    path = np.cumsum(excess, axis=0) - excess  # attenuation by what lies in front
    relative_depth = (depth - probe.r_min) / (probe.r_max - probe.r_min)
    gain = np.exp(rng.uniform(-0.7, 0.2) * relative_depth - path * step)
    gain *= 1 - 0.2 * (angle / probe.half_angle) ** 2
    echo = scipy.ndimage.gaussian_filter(reflectivity, 0.6, truncate=2.5) * gain + _amplitude(-50)
    decibels = 20 * np.log10(echo * _speckle(rng, echo.shape) + 1e-6)
    dynamic_range = rng.uniform(45, 55)
    return np.clip((decibels + rng.uniform(-2, 2) + dynamic_range) / dynamic_range, 0, 1)


def _speckle(rng, shape):
    """Rayleigh-distributed multiplicative speckle with unit mean square, `[R, A]` float32.

    The magnitude of complex scatter smoothed by the point-spread function (sigma 0.8 samples
    along the beam, 1.5 across). Each smoothed value sums many uniform draws, so it is close to
    Gaussian (uniform draws are cheaper than normal ones) and its magnitude close to Rayleigh.
    """
    scatter = rng.random((2, *shape), dtype=np.float32) - 0.5
    scatter = [scipy.ndimage.gaussian_filter(part, (0.8, 1.5), truncate=3.0) for part in scatter]
    speckle = np.hypot(*scatter)
    return speckle / np.sqrt(np.mean(speckle ** 2))


def _amplitude(decibels):
    """Echo amplitude of a level in dB (0 dB = the brightest reflector)."""
    return np.float32(10.0) ** (np.asarray(decibels, np.float32) / 20)


def _scan_convert(polar, probe: _Probe, shape):
    """Bilinear resampling of the polar image onto the pixel grid, and the field-of-view mask."""
    rows = np.arange(shape[0], dtype=np.float32)[:, None] - probe.apex_y
    cols = np.arange(shape[1], dtype=np.float32)[None, :] - probe.apex_x
    i = (np.hypot(rows, cols) - probe.r_min) * ((polar.shape[0] - 1) / (probe.r_max - probe.r_min))
    j = ((np.arctan2(cols, rows) + probe.half_angle)
         * ((polar.shape[1] - 1) / (2 * probe.half_angle)))
    in_view = (i >= 0) & (i <= polar.shape[0] - 1) & (j >= 0) & (j <= polar.shape[1] - 1)
    i_low = np.clip(np.floor(i), 0, polar.shape[0] - 2)
    j_low = np.clip(np.floor(j), 0, polar.shape[1] - 2)
    di, dj = np.clip(i - i_low, 0, 1), np.clip(j - j_low, 0, 1)  # float32 weights
    i0, j0 = i_low.astype(np.intp), j_low.astype(np.intp)
    top = polar[i0, j0] * (1 - dj) + polar[i0, j0 + 1] * dj
    bottom = polar[i0 + 1, j0] * (1 - dj) + polar[i0 + 1, j0 + 1] * dj
    return (top * (1 - di) + bottom * di) * in_view, in_view
