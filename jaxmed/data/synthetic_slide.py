"""Procedural H&E-like whole slides with known stains and annotated regions of several classes.

A `SyntheticSlide` is a design, not an image: everything about the slide follows from a few
shapes and the slide's `seed`, so `render(downsample, x, y, w, h)` draws any region of any level
directly, tile by tile, without ever building level 0. That is what lets a 100 000 x 100 000
slide be written (`write_synthetic_slide`) in bounded memory. The decisions are in
docs/pathology.md; in short:

- Colour is Beer-Lambert mixing of two stains: per pixel concentrations `C = (h, e)` of
  haematoxylin and eosin give `RGB = 255 exp(-C S)` (`mix_stains`), `S = stains` (default
  `HE_STAINS`). `concentrations(...)` returns `C` itself, the truth for stain estimation, and
  `render(...)` is exactly `mix_stains(concentrations(...), stains)` at every level.
- Glass: a faint, nearly neutral stain film (0.02 of each stain, slowly varying, with a little
  pixel noise): RGB about (251, 247, 250), HSV saturation about 4/255.
- Tissue: "islands", star-shaped polygons whose radius is a sum of a few harmonics of the angle
  (smooth blobs), some with a hole (glass inside the tissue). Each island is one `Region` of one
  class; its outline and holes are the annotation, exactly (the renderer tests pixel centres
  against the same polygon).
- Classes differ in small high-resolution structure, not in mean colour: nuclei are Gaussian
  blobs of haematoxylin (which displaces the eosin, so a nucleus core is pure haematoxylin),
  placed by hashing lattice cells, so any pixel is computed from its coordinates alone.
  "adenocarcinoma": glands, rings of crowded dark nuclei with pink cytoplasm around a clear
  lumen, in fibrous stroma. "squamous": a sheet of large cells, pink cytoplasm paler at the cell
  centres, one large pale nucleus each. "normal": wavy eosin fibres with sparse small nuclei
  and a haematoxylin tinge. Their stain levels are set so that at downsample 8 the classes'
  mean RGB agree within about 1 grey level, while at level 0 their nuclear darkness, nuclear
  area or clear (luminal) area differ about twofold or more (tests/data/test_synthetic_slide.py).
- Overlays and other textures (for `jaxmed.data.synthetic_cohort`): a region may draw another
  texture than its class's (`Region.texture`, one of `TEXTURES`) and be left out of the
  annotations; `SyntheticSlide.overlays` are painted over the tissue in turn. The "sheet-*"
  textures share one coarse structure, a sheet of small cells, and differ only in a pattern of
  2-pixel period at level 0 (a checkerboard of chromatin in the nuclei, a cross-hatch of
  keratin in the cytoplasm) that every 2 x 2 area mean removes, with the mean intensity kept;
  lower levels draw the plain sheet. "dense-stroma" is strong eosin in coarse fibres.
- Pixel noise: tissue concentrations vary by 5 % (relative), glass by 0.004, independently per
  pixel (a pattern repeating every 509 pixels), and by 1/d of that at downsample d, as the mean
  of d x d pixels would.
- Levels: a pixel of the level with downsample `d` is the area mean of the `d x d` level-0
  pixels it covers, approximately but reproducibly. For `d <= 8` every field is evaluated at the
  level's pixel centre with each feature widened by the box it averages over: a Gaussian of
  variance `s^2` becomes one of `s^2 + (d^2 - 1) / 12` with the same mass, a sinusoid is damped
  by the exact mean of its `d` samples, a tissue edge becomes a ramp `d` pixels wide. Coarser
  levels are the exact block means of the downsample-`d'` rendering, `d' <= 8` a divisor of `d`.
  Means are taken of the concentrations (so the Beer-Lambert contract above holds at every
  level); a level rendering differs from the block mean of level 0 by 0.6-1.3 grey levels on
  average (JPEG at quality 90 adds about 2).
- Deterministic: the same design and region give the same pixels whatever the tiling (every
  random number is a hash of the slide's seed and a lattice cell; Gaussians are cut off exactly
  at 4 standard deviations and tissue edges are decided by exact bounds, so no tile sees a term
  that another misses).
- Level-0 pixels are 0.25 um wide by default (40x): nuclei 3-6 um across, glands about 40 um
  apart, squamous cells 10 um.
- Cost (one core): a 256 x 256 tile of level 0 takes about 2 ms on glass, 2.5-6 ms in tissue;
  one of downsample 8 (2048 x 2048 level-0 pixels) 8-18 ms.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmed.data.annotations import Annotation, class_color, write_annotations
from jaxmed.data.slide_writer import write_slide

__all__ = ["CLASS_TEXTURES", "HE_STAINS", "TEXTURES", "Region", "SyntheticSlide", "blob_region",
           "make_synthetic_slide", "mix_stains", "write_synthetic_slide"]

# The reference H&E optical densities (R, G, B) of Macenko et al. 2009, the default target of
# Macenko normalisers (torchstain's HERef), scaled to unit length. Ruifrok & Johnston's
# [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]] is 9 and 30 degrees away; its eosin absorbs almost
# only green and looks magenta.
_MACENKO_HE = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
HE_STAINS = _MACENKO_HE / np.linalg.norm(_MACENKO_HE, axis=1, keepdims=True)
HE_STAINS.setflags(write=False)

CLASS_TEXTURES = ("adenocarcinoma", "squamous", "normal")

_BASE_DOWNSAMPLE = 8  # coarsest downsample rendered directly; coarser ones are block means
_BAND = 32  # rows per matrix product of `_blob_sum`
_CHUNK = 256  # a region is computed in blocks of at most 256 x 256 pixels
_REACH = 4.0  # Gaussians are cut off at this many standard deviations
_VERTICES = 256  # outline vertices of an island (a hole has a third as many)
_GLASS = (0.02, 0.02)  # glass film, (haematoxylin, eosin) concentration
_GLASS_VARIATION = 0.005
_GLASS_NOISE = 0.004  # per level-0 pixel, standard deviation (absolute)
_TISSUE_NOISE = 0.05  # per level-0 pixel, standard deviation (relative)
_NOISE_PERIOD = 509  # the pixel noise repeats every 509 pixels (a prime: never the tile size)


def mix_stains(concentrations, stains=HE_STAINS, background=255) -> np.ndarray:
    """Beer-Lambert colour of stain concentrations: `I = background * exp(-C S)`, rounded.

    Computed in float32 (within 1e-4 grey levels of the exact value; a pixel rounds the other
    way about once in 10^5), which makes it several times faster than float64.

    **Arguments:**

    - `concentrations`: `(..., 2)` haematoxylin and eosin concentrations (optical density per
      unit stain vector), non-negative.
    - `stains`: `(2, 3)` stain optical densities per unit concentration, rows `(R, G, B)`.
    - `background`: the intensity of unstained glass.

    **Returns:** uint8 `(..., 3)` RGB.
    """
    c = np.asarray(concentrations, np.float32)
    s = np.asarray(stains, np.float32)
    intensity = np.empty(c.shape[:-1] + (3,), np.float32)
    for channel in range(3):  # not `c @ s`: OpenBLAS threads are slow on a busy machine
        density = intensity[..., channel]
        np.multiply(c[..., 0], -s[0, channel], out=density)
        density -= c[..., 1] * s[1, channel]
    np.exp(intensity, out=intensity)
    intensity *= background
    return np.clip(np.rint(intensity, out=intensity), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Hash-based random numbers: a pure function of (seed, stream, cell), so tiles agree
# ---------------------------------------------------------------------------------------------


def _mix32(h: np.ndarray) -> np.ndarray:
    """A 32-bit integer mixing function (xor-shift-multiply), elementwise."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def _uniform(seed: int, stream: int, *keys) -> np.ndarray:
    """Uniform numbers in [0, 1), one per element of the (broadcast) integer `keys`."""
    shape = np.broadcast(*keys).shape or (1,)  # never 0-d: numpy scalars warn on wrap-around
    h = np.full(shape, _mix32(np.array([seed & 0xFFFFFFFF], np.uint32))[0], np.uint32)
    h = _mix32(h ^ np.uint32(stream * 0x9E3779B1 & 0xFFFFFFFF))
    for key in keys:
        h = _mix32(h ^ np.asarray(key).astype(np.int64).astype(np.uint32))
    return (h >> np.uint32(8)).astype(np.float64) * 2.0 ** -24


@functools.lru_cache(maxsize=4)
def _noise_table(seed: int) -> np.ndarray:
    """(2P, 2P, 2) float32 standard normal pixel noise of period P, stored twice over in each
    axis so that any window up to P wide is a slice."""
    table = np.random.default_rng([seed, 0x5EED]).standard_normal((_NOISE_PERIOD,) * 2 + (2,))
    table = np.tile(table.astype(np.float32), (2, 2, 1))
    table.setflags(write=False)
    return table


# ---------------------------------------------------------------------------------------------
# Field primitives, evaluated at the level's pixel centres X (w,), Y (h,) in level-0 pixels
# ---------------------------------------------------------------------------------------------


def _widened(sigma, ds: int):
    """Variance of a Gaussian of standard deviation `sigma` averaged over `ds` pixels."""
    return np.square(sigma) + (ds * ds - 1) / 12.0


def _reach(sigma_max: float, ds: int) -> float:
    return _REACH * math.sqrt(_widened(sigma_max, ds))


def _blob_sum(X, Y, x, y, sigma, amplitude, ds: int) -> np.ndarray:
    """Sum of isotropic Gaussians `amplitude exp(-d^2 / 2 sigma^2)` centred at `(x, y)`, each
    averaged over the pixel's `ds x ds` box (widened, mass kept), cut off at 4 deviations.

    Separable, so over a patch of the grid the sum is a matrix product `(rows, n) @ (n, cols)`
    of the `n` blobs that reach the patch. Patches are 32 rows by `max(32, 256 / ds)` columns:
    few blobs each (OpenBLAS stays on one thread), few patches per block. Returns `(h, w)`.
    """
    out = np.zeros((len(Y), len(X)))
    variance = _widened(sigma, ds)
    reach = _REACH * np.sqrt(variance)
    near = ((x + reach >= X[0]) & (x - reach <= X[-1]) & (y + reach >= Y[0])
            & (y - reach <= Y[-1]) & (amplitude != 0))
    if not near.any():
        return out
    order = np.argsort(y[near], kind="stable")
    x, y, variance, reach = (v[near][order] for v in (x, y, variance, reach))
    peak = (amplitude * np.square(sigma))[near][order] / variance
    widest = reach.max()
    columns = max(_BAND, _CHUNK // ds)
    for r in range(0, len(Y), _BAND):
        rows = Y[r:r + _BAND]
        first, last = np.searchsorted(y, (rows[0] - widest, rows[-1] + widest), side="left")
        band = np.arange(first, last)
        band = band[(y[band] + reach[band] >= rows[0]) & (y[band] - reach[band] <= rows[-1])]
        for c in range(0, len(X), columns):
            cols = X[c:c + columns]
            k = band[(x[band] + reach[band] >= cols[0]) & (x[band] - reach[band] <= cols[-1])]
            if len(k):
                down = _profiles(rows, y[k], variance[k], reach[k]) * peak[k][:, None]
                out[r:r + _BAND, c:c + columns] = down.T @ _profiles(cols, x[k], variance[k],
                                                                     reach[k])
    return out


def _profiles(coordinates, centres, variance, reach) -> np.ndarray:
    """`(n, len(coordinates))` Gaussian profiles, exactly 0 beyond `reach`."""
    d = coordinates[None, :] - centres[:, None]
    g = np.exp(-0.5 * d * d / variance[:, None])
    g[np.abs(d) > reach[:, None]] = 0.0
    return g


def _dirichlet(k: float, ds: int) -> float:
    """Mean of `cos(k t)` over `ds` unit-spaced samples centred on 0: how a sinusoid of angular
    frequency `k` (radians per level-0 pixel) is damped by averaging `ds` pixels."""
    half = 0.5 * k
    if ds == 1 or abs(math.sin(half)) < 1e-12:
        return 1.0
    return math.sin(half * ds) / (ds * math.sin(half))


@functools.lru_cache(maxsize=64)
def _waves(seed: int, stream: int, wavelengths: tuple[float, ...]):
    """Directions and phases of a sum of sinusoids (smooth noise), drawn from `(seed, stream)`."""
    rng = np.random.default_rng([seed, stream])
    angles = rng.uniform(0, 2 * np.pi, len(wavelengths))
    phases = rng.uniform(0, 2 * np.pi, len(wavelengths))
    k = 2 * np.pi / np.asarray(wavelengths)
    return tuple(zip(k * np.cos(angles), k * np.sin(angles), phases, strict=True))


def _smooth_noise(X, Y, ds: int, seed: int, stream: int, wavelengths) -> np.ndarray:
    """A sum of sinusoids of the given wavelengths (level-0 pixels), mean 0, about unit range.
    Returns `(h, w)`."""
    total = np.zeros((len(Y), len(X)))
    for kx, ky, phase in _waves(seed, stream, tuple(wavelengths)):
        damping = _dirichlet(kx, ds) * _dirichlet(ky, ds) / len(wavelengths)
        # sin(a + b) = sin a cos b + cos a sin b: two outer products instead of a 2-D sine.
        a, b = ky * Y + phase, kx * X
        total += np.outer(damping * np.sin(a), np.cos(b))
        total += np.outer(damping * np.cos(a), np.sin(b))
    return total


def _fibres(X, Y, ds: int, seed: int, stream: int, wavelength: float) -> np.ndarray:
    """Wavy parallel fibres: `0.5 + 0.5 sin(k u + warp)`, u along one direction. `(h, w)` in
    [0, 1]."""
    angle = 2 * np.pi * _uniform(seed, stream, 0)[0]
    k = 2 * np.pi / wavelength
    kx, ky = k * math.cos(angle), k * math.sin(angle)
    warp = 9.0 * _smooth_noise(X, Y, ds, seed, stream + 1, (230.0, 370.0, 610.0))
    damping = _dirichlet(kx, ds) * _dirichlet(ky, ds)
    return 0.5 + 0.5 * damping * np.sin(ky * Y[:, None] + kx * X[None, :] + warp)


def _occupied(nuclei: np.ndarray, level: float) -> np.ndarray:
    """The fraction of a pixel that nuclei fill: 1 where their haematoxylin reaches `level`."""
    return np.clip(nuclei / level, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Nuclei and glands on hashed lattices
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Lattice:
    """Blobs on a jittered square lattice: each cell holds at most one, at a hashed place."""

    stream: int
    cell: float  # level-0 pixels
    presence: float  # probability that a cell holds a blob
    jitter: float  # the blob centre lies within +-jitter * cell of the cell's centre
    sigma: tuple[float, float]  # uniform range of the standard deviation (level-0 pixels)
    amplitude: tuple[float, float]  # uniform range of the peak concentration

    def blobs(self, seed: int, box):
        """`(x, y, sigma, amplitude, extra)` arrays of the blobs whose cells overlap `box`;
        `extra` is one more uniform number per blob, for what a texture adds."""
        ix, iy = _cells(self.cell, box)
        u = [_uniform(seed, self.stream, ix, iy, j) for j in range(6)]
        keep = u[0] < self.presence
        x = (ix + 0.5 + self.jitter * (2 * u[1] - 1)) * self.cell
        y = (iy + 0.5 + self.jitter * (2 * u[2] - 1)) * self.cell
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[3]
        amplitude = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[4]
        return x[keep], y[keep], sigma[keep], amplitude[keep], u[5][keep]

    def field(self, X, Y, ds: int, seed: int) -> np.ndarray:
        margin = _reach(self.sigma[1], ds)
        box = (X[0] - margin, Y[0] - margin, X[-1] + margin, Y[-1] + margin)
        return _blob_sum(X, Y, *self.blobs(seed, box)[:4], ds)


def _cells(cell: float, box):
    """Integer indices `(ix, iy)` (flat) of the lattice cells overlapping `box`."""
    x0, y0, x1, y1 = box
    ix = np.arange(math.floor(x0 / cell), math.floor(x1 / cell) + 1)
    iy = np.arange(math.floor(y0 / cell), math.floor(y1 / cell) + 1)
    gx, gy = np.meshgrid(ix, iy)
    return gx.ravel(), gy.ravel()


@dataclasses.dataclass(frozen=True)
class _Glands:
    """Glands on a jittered lattice: a clear lumen ringed by crowded nuclei and cytoplasm."""

    stream: int = 30
    cell: float = 160.0
    presence: float = 0.9
    jitter: float = 0.2
    lumen: tuple[float, float] = (18.0, 34.0)  # lumen radius range
    spacing: float = 10.0  # between neighbouring nuclei along the ring
    offset: float = 8.0  # nuclei ring radius = lumen radius + offset
    sigma: tuple[float, float] = (3.5, 4.5)
    amplitude: tuple[float, float] = (1.2, 1.5)
    cytoplasm_sigma: float = 8.0

    def parts(self, seed: int, box):
        """Lumen blobs `(x, y, r)` and ring nuclei `(x, y, sigma, amplitude)` for `box`."""
        ix, iy = _cells(self.cell, box)
        u = [_uniform(seed, self.stream, ix, iy, j) for j in range(5)]
        keep = u[0] < self.presence
        ix, iy, u = ix[keep], iy[keep], [v[keep] for v in u]
        cx = (ix + 0.5 + self.jitter * (2 * u[1] - 1)) * self.cell
        cy = (iy + 0.5 + self.jitter * (2 * u[2] - 1)) * self.cell
        radius = self.lumen[0] + (self.lumen[1] - self.lumen[0]) * u[3]
        ring = radius + self.offset
        count = np.maximum(np.round(2 * np.pi * ring / self.spacing).astype(int), 6)
        owner = np.repeat(np.arange(len(cx)), count)
        index = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
        v = [_uniform(seed, self.stream + 1, ix[owner], iy[owner], index, j) for j in range(4)]
        angle = 2 * np.pi * (u[4][owner] + (index + 0.3 * (v[0] - 0.5)) / count[owner])
        r = ring[owner] + 1.5 * (2 * v[1] - 1)
        nx, ny = cx[owner] + r * np.cos(angle), cy[owner] + r * np.sin(angle)
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * v[2]
        amplitude = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * v[3]
        return (cx, cy, radius), (nx, ny, sigma, amplitude)

    def fields(self, X, Y, ds: int, seed: int):
        """`(lumen, nuclei, cytoplasm)` fields, each `(h, w)`; lumen in [0, 1]."""
        margin = max(self.lumen[1] + self.offset + 2.0 + _reach(self.cytoplasm_sigma, ds),
                     _reach(self.lumen[1], ds))
        box = (X[0] - margin, Y[0] - margin, X[-1] + margin, Y[-1] + margin)
        (cx, cy, radius), nuclei = self.parts(seed, box)
        # The lumen is a Gaussian of deviation `radius` through a ramp: clear inside 0.8 radius,
        # none beyond 1.2 radius (so none under the ring of nuclei).
        disc = _blob_sum(X, Y, cx, cy, radius, np.ones(len(cx)), ds)
        lumen = np.clip((disc - _LUMEN_EDGE[1]) / (_LUMEN_EDGE[0] - _LUMEN_EDGE[1]), 0.0, 1.0)
        cytoplasm = _blob_sum(X, Y, *nuclei[:2], np.full(len(nuclei[0]), self.cytoplasm_sigma),
                              np.full(len(nuclei[0]), 0.12), ds)
        return lumen, _blob_sum(X, Y, *nuclei, ds), cytoplasm


_LUMEN_EDGE = (math.exp(-0.8 ** 2 / 2), math.exp(-1.2 ** 2 / 2))  # Gaussian at 0.8 and 1.2 sigma


# ---------------------------------------------------------------------------------------------
# The class textures: (haematoxylin, eosin) fields of a class over the whole grid
# ---------------------------------------------------------------------------------------------

_STROMA_NUCLEI = _Lattice(stream=20, cell=36.0, presence=0.35, jitter=0.3, sigma=(3.0, 4.0),
                          amplitude=(1.2, 1.5))
_GLAND_STROMA_NUCLEI = _Lattice(stream=21, cell=44.0, presence=0.2, jitter=0.3,
                                sigma=(3.0, 4.0), amplitude=(1.2, 1.5))
_SQUAMOUS_CELLS = _Lattice(stream=40, cell=40.0, presence=1.0, jitter=0.3, sigma=(5.0, 6.5),
                           amplitude=(0.7, 0.9))
_GLANDS = _Glands()


def _normal(X, Y, ds: int, seed: int):
    """Stroma: wavy eosin fibres, sparse small nuclei, a haematoxylin tinge."""
    fibres = _fibres(X, Y, ds, seed, 10, wavelength=14.0)
    nuclei = _STROMA_NUCLEI.field(X, Y, ds, seed)
    eosin = (0.32 + 0.24 * fibres) * (1.0 - _occupied(nuclei, 0.6))
    return 0.107 + nuclei, eosin


def _squamous(X, Y, ds: int, seed: int):
    """A sheet of large cells: pink cytoplasm, paler centres, one large pale nucleus each."""
    margin = _reach(_SQUAMOUS_CELLS.cell * 0.3, ds)
    box = (X[0] - margin, Y[0] - margin, X[-1] + margin, Y[-1] + margin)
    x, y, sigma, amplitude, extra = _SQUAMOUS_CELLS.blobs(seed, box)
    present = extra < 0.9  # some cells are cut without their nucleus
    nuclei = _blob_sum(X, Y, x, y, sigma, amplitude * present, ds)
    bodies = _blob_sum(X, Y, x, y, np.full(len(x), 0.3 * _SQUAMOUS_CELLS.cell),
                       np.ones(len(x)), ds)
    eosin = (0.72 - 0.4 * np.minimum(bodies, 1.0)) * (1.0 - _occupied(nuclei, 0.45))
    return 0.04 + nuclei, eosin


def _adenocarcinoma(X, Y, ds: int, seed: int):
    """Glands (lumen, ring of crowded dark nuclei, cytoplasm) in fibrous stroma."""
    lumen, ring_nuclei, cytoplasm = _GLANDS.fields(X, Y, ds, seed)
    nuclei = ring_nuclei + _GLAND_STROMA_NUCLEI.field(X, Y, ds, seed)
    fibres = _fibres(X, Y, ds, seed, 12, wavelength=14.0)
    eosin = (0.39 + 0.24 * fibres + cytoplasm) * (1.0 - _occupied(nuclei, 0.6))
    haematoxylin = 0.045 + nuclei
    clear = 1.0 - lumen
    return haematoxylin * clear + 0.01 * lumen, eosin * clear + 0.02 * lumen


# The cell-sheet textures: one coarse structure (a sheet of small cells on the same hashed
# lattice), told apart only by a pattern of 2-pixel period at level 0, which every 2 x 2 area mean
# removes exactly; a lower level draws the sheet without it. The pattern adds `a c s` to a
# concentration `c` (`s` in {-1, 0, 1}, the mean of every 2 x 2 block 0) and
# `log cosh(k a c s) / k`, `k` the stain's mean optical density: that keeps the 2 x 2 mean of
# the intensity `exp(-k c)` unchanged, so a x0.5 area mean of the RGB tile sees no difference
# (within a grey level: the stains' channels differ from their mean `k`).
_SHEET_NUCLEI = _Lattice(stream=50, cell=20.0, presence=0.8, jitter=0.3, sigma=(2.4, 3.2),
                         amplitude=(0.9, 1.2))
_DENSE_STROMA_NUCLEI = _Lattice(stream=52, cell=48.0, presence=0.3, jitter=0.35,
                                sigma=(2.2, 3.0), amplitude=(1.0, 1.3))
_CHROMATIN = 0.35  # relative amplitude of the chromatin pattern in the nuclei
_KERATIN = 0.35  # relative amplitude of the fibril pattern in the cytoplasm
_MEAN_DENSITY = HE_STAINS.mean(axis=1)  # (haematoxylin, eosin) channel-mean optical density


def _cell_sheet(X, Y, ds: int, seed: int):
    """`(nuclei, haematoxylin, eosin)` of a sheet of small cells: dense nuclei, pink cytoplasm
    with faint fibres."""
    nuclei = _SHEET_NUCLEI.field(X, Y, ds, seed)
    fibres = _fibres(X, Y, ds, seed, 54, wavelength=18.0)
    eosin = (0.40 + 0.12 * fibres) * (1.0 - _occupied(nuclei, 0.6))
    return nuclei, 0.09 + nuclei, eosin


def _pixel_pattern(X, Y, kind: str) -> np.ndarray:
    """`(h, w)` pattern of 2-pixel period at level-0 pixel centres: "checker" `(-1)^(i + j)`, or
    "cross" `((-1)^i + (-1)^j) / 2`; each 2 x 2 block sums to 0 wherever it starts."""
    sx = 1.0 - 2.0 * (np.floor(X).astype(np.int64) & 1)
    sy = 1.0 - 2.0 * (np.floor(Y).astype(np.int64) & 1)
    if kind == "checker":
        return np.outer(sy, sx)
    return 0.5 * (sy[:, None] + sx[None, :])


def _patterned(c: np.ndarray, amplitude: float, pattern: np.ndarray, density: float):
    """`c + a c s + log cosh(k a c s) / k`: the 2 x 2 mean of `exp(-k c)` kept."""
    delta = amplitude * c * pattern
    return c + delta + np.log(np.cosh(density * delta)) / density


def _sheet_normal(X, Y, ds: int, seed: int):
    """The cell sheet, plain."""
    return _cell_sheet(X, Y, ds, seed)[1:]


def _sheet_adenocarcinoma(X, Y, ds: int, seed: int):
    """The cell sheet with coarse chromatin: a checkerboard of darker and paler nuclear pixels."""
    nuclei, haematoxylin, eosin = _cell_sheet(X, Y, ds, seed)
    if ds > 1:
        return haematoxylin, eosin
    pattern = _pixel_pattern(X, Y, "checker")
    return haematoxylin - nuclei + _patterned(nuclei, _CHROMATIN, pattern, _MEAN_DENSITY[0]), eosin


def _sheet_squamous(X, Y, ds: int, seed: int):
    """The cell sheet with keratin fibrils: a 2-pixel cross-hatch of eosin in the cytoplasm."""
    _, haematoxylin, eosin = _cell_sheet(X, Y, ds, seed)
    if ds > 1:
        return haematoxylin, eosin
    return haematoxylin, _patterned(eosin, _KERATIN, _pixel_pattern(X, Y, "cross"),
                                    _MEAN_DENSITY[1])


def _dense_stroma(X, Y, ds: int, seed: int):
    """Dense collagen: strong eosin in coarse fibres, few nuclei (visible at any level)."""
    fibres = _fibres(X, Y, ds, seed, 56, wavelength=26.0)
    nuclei = _DENSE_STROMA_NUCLEI.field(X, Y, ds, seed)
    eosin = (0.75 + 0.35 * fibres) * (1.0 - _occupied(nuclei, 0.6))
    return 0.05 + nuclei, eosin


_TEXTURES = {"adenocarcinoma": _adenocarcinoma, "squamous": _squamous, "normal": _normal,
             "sheet-normal": _sheet_normal, "sheet-adenocarcinoma": _sheet_adenocarcinoma,
             "sheet-squamous": _sheet_squamous, "dense-stroma": _dense_stroma}
TEXTURES = tuple(_TEXTURES)


# ---------------------------------------------------------------------------------------------
# Regions: star-shaped polygons
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value
class _Star:
    """A polygon whose vertices lie at equal angles around `centre`, at distances `radii`."""

    centre: tuple[float, float]
    radii: np.ndarray

    def __post_init__(self):
        n = len(self.radii)
        angles = 2 * np.pi * np.arange(n) / n
        ax, ay = self.radii * np.cos(angles), self.radii * np.sin(angles)
        bx, by = np.roll(ax, -1), np.roll(ay, -1)
        length = np.hypot(bx - ax, by - ay)
        # Signed distance of p (relative to the centre) from the line of edge k, positive
        # inside: offset_k + ux_k * p_y - uy_k * p_x. The offset is the centre's distance.
        ux, uy = (bx - ax) / length, (by - ay) / length
        offset = (ax * by - ay * bx) / length
        # Along a ray the distance to the edge line shrinks by the cosine between the ray and
        # the edge's normal; its smallest value bounds how far the ramp reaches radially.
        ends = angles + 2 * np.pi / n
        slant = np.minimum(np.cos(angles) * uy - np.sin(angles) * ux,
                           np.cos(ends) * uy - np.sin(ends) * ux)
        if slant.min() < 0.1:
            raise ValueError("the outline is too jagged for its centre")
        vertices = np.stack([self.centre[0] + ax, self.centre[1] + ay], axis=1)
        for name, value in [("_edges", (offset, ux, uy)), ("_slant", float(slant.min())),
                            ("vertices", vertices), ("inner", float(offset.min())),
                            ("bounds", (*vertices.min(axis=0), *vertices.max(axis=0)))]:
            object.__setattr__(self, name, value)

    def coverage(self, X, Y, ds: int) -> np.ndarray | float:
        """Fraction of each pixel inside: a ramp `ds` wide across the edge (0.5 on it).

        Returns `(h, w)`, or a float when every pixel of the grid is inside (1) or outside (0),
        decided by bounds that agree exactly with the per-pixel ramp (so tiles never differ)."""
        margin = ds / (2 * self._slant)
        x0, y0, x1, y1 = self.bounds
        if X[-1] < x0 - margin or X[0] > x1 + margin or Y[-1] < y0 - margin or Y[0] > y1 + margin:
            return 0.0
        px, py = X - self.centre[0], Y - self.centre[1]
        corners = [(px[i], py[j]) for i in (0, -1) for j in (0, -1)]
        farthest = max(math.hypot(cx, cy) for cx, cy in corners)
        nearest = math.hypot(np.clip(0.0, px[0], px[-1]), np.clip(0.0, py[0], py[-1]))
        sectors = self._sectors(corners, nearest)
        offset = self._edges[0][sectors]
        if farthest <= offset.min() - margin:
            return 1.0
        if nearest >= np.maximum(self.radii[sectors], np.roll(self.radii, -1)[sectors]).max() \
                + margin:
            return 0.0
        n = len(self.radii)
        angle = np.arctan2(py[:, None], px[None, :])  # angle: [h, w]
        k = np.floor(angle * (n / (2 * np.pi))).astype(np.int64) % n
        offset, ux, uy = (e[k] for e in self._edges)
        distance = offset + ux * py[:, None] - uy * px[None, :]
        return np.clip(distance / ds + 0.5, 0.0, 1.0)

    def _sectors(self, corners, nearest: float) -> np.ndarray:
        """Indices of the edges whose angular sectors a rectangle (its corners relative to the
        centre) can touch: all of them when it holds the centre."""
        n = len(self.radii)
        if nearest == 0.0:
            return np.arange(n)
        angles = np.array([math.atan2(cy, cx) for cx, cy in corners])
        turn = (angles - angles[0] + np.pi) % (2 * np.pi) - np.pi  # a rectangle spans < pi
        low, high = angles[0] + turn.min(), angles[0] + turn.max()
        first = math.floor(low * n / (2 * np.pi))
        last = math.floor(high * n / (2 * np.pi))
        return np.arange(first, last + 1) % n


@dataclasses.dataclass(frozen=True, eq=False)
class Region:
    """One tissue island of one class: a star-shaped outline with optional holes (glass).

    `texture` names the texture drawn in it when it is not the class's own (`TEXTURES`);
    an `annotated=False` region is tissue without an annotation (not in `annotations()`)."""

    class_name: str
    outline: _Star
    holes: tuple[_Star, ...] = ()
    texture: str = ""
    annotated: bool = True

    @property
    def texture_name(self) -> str:
        """The texture drawn in the region: `texture`, or else the class's own."""
        return self.texture or self.class_name

    @property
    def polygon(self) -> np.ndarray:
        """`(n, 2)` level-0 `(x, y)` outline vertices."""
        return self.outline.vertices

    def annotation(self) -> Annotation:
        """The region as an annotation: outline, holes, class and the class's colour."""
        return Annotation(self.polygon, tuple(h.vertices for h in self.holes), self.class_name,
                          class_color(self.class_name))

    def bounds(self) -> tuple[float, float, float, float]:
        """Level-0 `(x0, y0, x1, y1)` of the outline."""
        return self.outline.bounds

    def coverage(self, X, Y, ds: int) -> np.ndarray | float:
        """Fraction of each pixel (centres `X`, `Y`) in the region: `(h, w)`, or 0.0 / 1.0 for
        the whole grid."""
        inside = self.outline.coverage(X, Y, ds)
        for hole in self.holes:
            if isinstance(inside, float) and inside == 0.0:
                break
            in_hole = hole.coverage(X, Y, ds)
            if not isinstance(in_hole, float) or in_hole:
                inside = inside * (1.0 - in_hole)
        return inside


# ---------------------------------------------------------------------------------------------
# The design
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticSlide:
    """A procedural slide: render any region of any level (see the module's doc).

    **Fields:**

    - `size`: `(width, height)` of level 0, pixels.
    - `regions`: the tissue islands, each of one class, in level-0 pixels.
    - `stains`: `(2, 3)` stain vectors (rows unit length, haematoxylin first).
    - `seed`: every random texture detail follows from it.
    - `class_names`: the classes the regions use; label `k + 1` in `class_map` is
      `class_names[k]`.
    - `overlays`: regions painted over the tissue of `regions`, in order, each replacing the
      texture (and the class) beneath it; they never add tissue on glass.
    - `intensity`: factors of the haematoxylin and eosin of the tissue (staining strength).
    """

    size: tuple[int, int]
    regions: tuple[Region, ...]
    stains: np.ndarray
    seed: int
    class_names: tuple[str, ...]
    overlays: tuple[Region, ...] = ()
    intensity: tuple[float, float] = (1.0, 1.0)

    def render(self, downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 `(h, w, 3)` RGB of the region of the level with this integer downsample;
        `(x, y)` is its top-left corner in that level's pixels. Outside the slide: glass.
        The signature of `slide_writer.write_slide`'s `source`."""
        return mix_stains(self.concentrations(downsample, x, y, w, h), self.stains)

    def concentrations(self, downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """float32 `(h, w, 2)` haematoxylin and eosin concentrations of the region (as
        `render`): the ground truth for stain estimation."""
        ds, x, y, w, h = _region(downsample, x, y, w, h)
        if ds <= _BASE_DOWNSAMPLE:
            return self._direct(ds, x, y, w, h).astype(np.float32)
        factor = next(k for k in range(math.ceil(ds / _BASE_DOWNSAMPLE), ds + 1) if ds % k == 0)
        base = ds // factor
        out = np.empty((h, w, 2), np.float32)
        block = max(1, 512 // factor)  # output pixels per side of a block: 512^2 base pixels
        for r in range(0, h, block):
            for c in range(0, w, block):
                bh, bw = min(block, h - r), min(block, w - c)
                fine = self._direct(base, (x + c) * factor, (y + r) * factor,
                                    bw * factor, bh * factor)
                out[r:r + bh, c:c + bw] = fine.reshape(bh, factor, bw, factor, 2).mean(axis=(1, 3))
        return out

    def class_map(self, downsample: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """int32 `(h, w)` label of each pixel of the region (as `render`): 0 on glass (holes
        included), `k + 1` where the pixel's centre lies in a region of `class_names[k]`."""
        ds, x, y, w, h = _region(downsample, x, y, w, h)
        X, Y = (x + np.arange(w) + 0.5) * ds, (y + np.arange(h) + 0.5) * ds
        labels = np.zeros((h, w), np.int32)
        for region in self.regions:
            inside = np.broadcast_to(region.coverage(X, Y, 1), (h, w)) > 0.5
            labels[inside] = self.class_names.index(region.class_name) + 1
        tissue = labels > 0
        for overlay in self.overlays:
            inside = (np.broadcast_to(overlay.coverage(X, Y, 1), (h, w)) > 0.5) & tissue
            labels[inside] = self.class_names.index(overlay.class_name) + 1
        return labels

    def annotations(self) -> list[Annotation]:
        """The annotated regions and overlays as annotations (outline, holes, class), level-0
        pixels."""
        return [region.annotation() for region in self.regions + self.overlays
                if region.annotated]

    def _direct(self, ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """float64 `(h, w, 2)` concentrations evaluated at the level's pixel centres, computed
        in blocks of at most `_CHUNK` pixels a side."""
        out = np.empty((h, w, 2))
        for r in range(0, h, _CHUNK):
            for c in range(0, w, _CHUNK):
                bh, bw = min(_CHUNK, h - r), min(_CHUNK, w - c)
                out[r:r + bh, c:c + bw] = self._block(ds, x + c, y + r, bw, bh)
        return out

    def _block(self, ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        X, Y = (x + np.arange(w) + 0.5) * ds, (y + np.arange(h) + 0.5) * ds
        shift = (ds * 7919) % _NOISE_PERIOD  # each level its own noise
        row, col = (y + shift) % _NOISE_PERIOD, (x + 2 * shift) % _NOISE_PERIOD
        noise = _noise_table(self.seed)[row:row + h, col:col + w]  # noise: [h, w, 2]
        out = np.zeros((h, w, 2))
        weights, covered = self._texture_weights(X, Y, ds)
        for name, coverage in weights.items():
            if isinstance(coverage, float):
                if coverage == 0.0:
                    continue
                window, weight = np.s_[:, :], coverage
            else:
                rows = np.nonzero(coverage.any(axis=1))[0]
                if not len(rows):
                    continue
                cols = np.nonzero(coverage.any(axis=0))[0]
                window = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
                weight = coverage[window]
            haematoxylin, eosin = _TEXTURES[name](X[window[1]], Y[window[0]], ds, self.seed)
            out[window + (0,)] += weight * haematoxylin
            out[window + (1,)] += weight * eosin
        if self.intensity != (1.0, 1.0):
            out *= np.asarray(self.intensity, np.float64)
        out *= 1.0 + (_TISSUE_NOISE / ds) * noise
        if not (isinstance(covered, float) and covered == 1.0):
            film = _GLASS_VARIATION * _smooth_noise(X, Y, ds, self.seed, 1, (700, 1300, 2100))
            glass = (_GLASS_NOISE / ds) * noise
            glass[..., 0] += _GLASS[0] + film
            glass[..., 1] += _GLASS[1] + film
            out += (1.0 - np.asarray(covered))[..., None] * glass
        return np.maximum(out, 0.0, out=out)

    def _texture_weights(self, X, Y, ds: int):
        """`({texture: fraction of each pixel}, tissue fraction)`: each a float while uniform
        over the grid, else `(h, w)`. The regions' textures in class order, then the overlays
        painted over them in turn (a painter's algorithm inside the tissue)."""
        weights, covered = {}, 0.0
        textures = dict.fromkeys([*self.class_names, *(r.texture_name for r in self.regions)])
        for name in textures:
            parts = [r.coverage(X, Y, ds) for r in self.regions if r.texture_name == name]
            parts = [p for p in parts if not isinstance(p, float) or p > 0]
            if not parts:
                continue
            coverage = sum(parts[1:], start=parts[0])
            if not isinstance(coverage, float) and not coverage.any():
                continue
            weights[name] = coverage
            covered = covered + coverage
        for overlay in self.overlays:
            inside = overlay.coverage(X, Y, ds)
            if isinstance(inside, float) and inside == 0.0:
                continue
            for name in weights:
                weights[name] = weights[name] * (1.0 - inside)
            weights[overlay.texture_name] = weights.get(overlay.texture_name, 0.0) \
                + inside * covered
        return weights, covered


def _region(downsample, x, y, w, h):
    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    if w < 0 or h < 0:
        raise ValueError(f"region size must be non-negative, got {w} x {h}")
    return int(downsample), int(x), int(y), int(w), int(h)


# ---------------------------------------------------------------------------------------------
# Making a design
# ---------------------------------------------------------------------------------------------


def make_synthetic_slide(
    size: tuple[int, int] = (8192, 8192),
    *,
    seed: int = 0,
    class_names: Sequence[str] = CLASS_TEXTURES,
    stains=None,
    tissue_fraction: float = 0.3,
    islands: int | None = None,
    hole_probability: float = 0.5,
) -> SyntheticSlide:
    """A slide design with tissue islands of the given classes.

    **Arguments:**

    - `size`: `(width, height)` of level 0, pixels (each at least 512).
    - `seed`: the design (island shapes and places) and every texture detail.
    - `class_names`: which textures appear (a subset of `CLASS_TEXTURES`, in label order).
    - `stains`: `(2, 3)` stain vectors, haematoxylin first (rows are scaled to unit length);
      default `HE_STAINS`. Different slides with different known stains test normalisation.
    - `tissue_fraction`: about this fraction of the slide is tissue (holes excluded); islands
      shrink when they cannot be placed apart.
    - `islands`: how many tissue islands (default two per class); at least one per class, each
      class getting an equal share (up to one).
    - `hole_probability`: chance that an island has a hole; when positive, the first island
      always has one.

    **Returns:** the `SyntheticSlide`.
    """
    width, height = (int(s) for s in size)
    if width < 512 or height < 512:
        raise ValueError(f"size must be at least 512 x 512, got {size}")
    class_names = tuple(class_names)
    unknown = [n for n in class_names if n not in _TEXTURES]
    if unknown or not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be distinct names from {CLASS_TEXTURES}, got "
                         f"{class_names}")
    islands = 2 * len(class_names) if islands is None else int(islands)
    if islands < len(class_names):
        raise ValueError(f"need at least one island per class ({len(class_names)}), got "
                         f"{islands}")
    if not 0 < tissue_fraction < 0.5:
        raise ValueError(f"tissue_fraction must be in (0, 0.5), got {tissue_fraction}")
    rng = np.random.default_rng([seed, 0x511DE])
    centres, radii = _place_islands(rng, width, height, islands, tissue_fraction)
    names = [class_names[i % len(class_names)] for i in rng.permutation(islands)]
    regions = []
    for i, ((cx, cy), radius) in enumerate(zip(centres, radii, strict=True)):
        outline = _Star((cx, cy), radius * _harmonic_radii(rng, _VERTICES, 0.3))
        holes = ()
        if hole_probability > 0 and (i == 0 or rng.uniform() < hole_probability):
            angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.15) * radius
            hole_radius = rng.uniform(0.12, 0.2) * radius
            holes = (_Star((cx + distance * math.cos(angle), cy + distance * math.sin(angle)),
                           hole_radius * _harmonic_radii(rng, _VERTICES // 3, 0.2)),)
        regions.append(Region(names[i], outline, holes))
    return SyntheticSlide((width, height), tuple(regions), _stain_matrix(stains), int(seed),
                          class_names)


def blob_region(
    class_name: str,
    centre: tuple[float, float],
    radius: float,
    *,
    rng: np.random.Generator,
    roughness: float = 0.25,
    vertices: int = 96,
    texture: str = "",
    annotated: bool = True,
) -> Region:
    """A smooth blob-shaped region without holes, e.g. an overlay of a `SyntheticSlide`.

    **Arguments:**

    - `class_name`, `texture`, `annotated`: as `Region`'s (`texture` one of `TEXTURES`).
    - `centre`, `radius`: level-0 pixels; the outline lies within `radius * (1 +- roughness)`.
    - `rng`: draws the outline's harmonics.
    - `roughness`, `vertices`: how far the outline departs from a circle, and its vertex count.
    """
    if (texture or class_name) not in _TEXTURES:
        raise ValueError(f"unknown texture {texture or class_name!r}; use one of {TEXTURES}")
    radii = radius * _harmonic_radii(rng, vertices, roughness)
    return Region(class_name, _Star((float(centre[0]), float(centre[1])), radii), (), texture,
                  annotated)


def _harmonic_radii(rng, n: int, roughness: float) -> np.ndarray:
    """Relative radii `1 + sum_k a_k cos(k t + phi_k)`, k = 2..7, `sum a_k <= roughness`."""
    orders = np.arange(2, 8)
    amplitudes = rng.uniform(0, 1, len(orders)) / orders
    amplitudes *= roughness / max(roughness, amplitudes.sum())
    phases = rng.uniform(0, 2 * np.pi, len(orders))
    t = 2 * np.pi * np.arange(n) / n
    return 1.0 + (amplitudes[:, None] * np.cos(orders[:, None] * t + phases[:, None])).sum(0)


def _place_islands(rng, width: int, height: int, count: int, fraction: float):
    """Centres and mean radii of `count` islands covering about `fraction` of the slide, at
    least 1.35 radii (their largest extent) from the border and from each other."""
    shares = rng.uniform(0.6, 1.4, count)
    radii = np.sort(np.sqrt(fraction * width * height * shares / shares.sum() / np.pi))[::-1]
    radii = np.minimum(radii, 0.9 * min(width, height) / (2 * 1.35))
    for _ in range(100):
        centres = []
        for radius in radii:
            for _ in range(400):
                reach = 1.35 * radius
                c = rng.uniform((reach, reach), (width - reach, height - reach))
                if all(math.dist(c, p) > 1.35 * (radius + r) + 8
                       for p, r in zip(centres, radii, strict=False)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == count:
            return centres, radii
        radii = radii * 0.93
    raise RuntimeError("could not place the tissue islands")  # unreachable for sane sizes


def _stain_matrix(stains) -> np.ndarray:
    if stains is None:
        return HE_STAINS
    matrix = np.array(stains, np.float64)
    if matrix.shape != (2, 3) or not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise ValueError(f"stains must be a (2, 3) non-negative matrix, got {stains!r}")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("stain vectors must be non-zero")
    matrix = matrix / norms
    if abs(matrix[0] @ matrix[1]) > math.cos(math.radians(5)):
        raise ValueError("the two stain vectors must differ by more than 5 degrees")
    matrix.setflags(write=False)
    return matrix


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_synthetic_slide(
    path: str | os.PathLike,
    design: SyntheticSlide,
    *,
    tile: int = 256,
    compression: str = "jpeg",
    mpp: float = 0.25,
    annotations: bool = True,
    **writer_kwargs,
) -> Path:
    """Write the design as a tiled pyramidal TIFF, tile by tile, and its regions as QuPath
    GeoJSON beside it (`path.with_suffix(".geojson")`).

    **Arguments:**

    - `path`: the slide file (e.g. `slide.tiff`, `slide.svs`).
    - `design`: from `make_synthetic_slide`.
    - `tile`, `compression`, `mpp`, and `writer_kwargs` (`layout`, `levels`, `quality`, ...):
      passed to `slide_writer.write_slide`.
    - `annotations`: also write the GeoJSON.

    **Returns:** the slide's path.
    """
    path = Path(path)
    written = write_slide(path, design.render, size=design.size, tile=tile,
                          compression=compression, mpp=mpp, **writer_kwargs)
    if annotations:
        write_annotations(path.with_suffix(".geojson"), design.annotations())
    return Path(written)
