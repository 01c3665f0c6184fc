"""Stain estimation and normalisation for H&E images: Macenko, Vahadane (SPCN), in JAX.

Conventions (those of StainTools and TIAToolbox, so results compare; decisions in
`docs/pathology.md`):

- optical density per channel `OD = -ln(max(I, 1) / 255)`; back to RGB by
  `I = 255 * exp(-OD)`, rounded and clipped to uint8;
- tissue pixels (those the stains are estimated from) have an 8-bit CIE L* (OpenCV's
  `L * 255 / 100`, divided by 255) below `luminosity` = 0.8; or, with `od_threshold`, an
  optical density of at least that in every channel (torchstain's rule);
- a stain matrix is `(2, 3)`: one row per stain, haematoxylin first (the row with the larger
  red optical density), rows unit length with a positive sum (Vahadane's are non-negative;
  Macenko's can dip just below 0 in a channel);
- concentrations `C (..., 2)` solve the non-negative lasso
  `min_C ½‖OD - C·S‖² + lam·ΣC`, `C >= 0`, exactly (two unknowns: `unmix`).

`StainNormalizer` (SPCN, Vahadane et al. 2016): the source's concentrations, scaled per stain
by the ratio of the target's 99th percentile to the source's, recomposed with the target's
stain matrix. Every pixel is recomposed (as SPCN does); near-white background has near-zero
concentrations and stays near white. Percentiles are over tissue pixels only.

Every function of arrays here is jit-able and vmap-able (`sample_slide_tiles`, which reads a
slide, is not). Called outside `jax.jit`, the estimators refuse an image without tissue with a
`ValueError`; traced, that check cannot run and such an image gives NaN.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmed.errors import InputDataError

# The reference H&E stain matrix and 99th-percentile concentrations of Macenko et al.'s
# normalisation, as torchstain (`HERef`, `maxCRef`) took them from the method's reference
# implementation; rows here are stains. torchstain computes its concentrations by least
# squares over all pixels with a light intensity of 240, so as a target these are close to,
# not exactly, what `StainNormalizer.fit` would measure on the image they came from.
REFERENCE_STAINS = np.array([[0.5626, 0.7201, 0.4062],
                             [0.2159, 0.8012, 0.5581]], np.float32)
REFERENCE_P99 = np.array([1.9705, 1.0308], np.float32)

METHODS = ("vahadane", "macenko")
STAIN_NAMES = ("haematoxylin", "eosin")  # the rows of a stain matrix
MIN_TISSUE_PIXELS = 2  # a covariance needs two pixels
_WHITE = 255.0


# XLA:CPU runs a matrix product with an inner size of 2 or 3 over a million pixels some 20x
# slower than the same sums written out, which fuse with their neighbours; these write them out.


def _per_pixel(x, matrix):
    """`x (..., a) @ matrix (a, b)` for small static `a`, as explicit sums."""
    return sum(x[..., i:i + 1] * matrix[i] for i in range(matrix.shape[0]))


def _pixel_sums(a, b):
    """`a.T @ b` for `a (P, m)`, `b (P, n)` with small `m`, `n`: `(m, n)` sums over pixels."""
    return jnp.stack([jnp.stack([jnp.sum(a[:, i] * b[:, j]) for j in range(b.shape[1])])
                      for i in range(a.shape[1])])


# ----------------------------------------------------------------------------- pixels


def optical_density(rgb) -> jax.Array:
    """Optical density per channel, `-ln(max(I, 1) / 255)`.

    **Arguments:** `rgb`: `(..., 3)` intensities 0..255 (uint8 or float).

    **Returns:** `(..., 3)` float32, 0 for white, at most `ln 255` ≈ 5.54.
    """
    intensity = jnp.maximum(jnp.asarray(rgb, jnp.float32), 1.0)
    return -jnp.log(intensity / _WHITE)


def rgb_from_od(od) -> jax.Array:
    """The inverse of `optical_density`: `255 * exp(-od)` rounded and clipped to uint8.

    **Arguments:** `od`: `(..., 3)` optical densities (e.g. `C @ stains` for concentrations
    `C (..., 2)`: Beer–Lambert mixing).

    **Returns:** `(..., 3)` uint8.
    """
    intensity = _WHITE * jnp.exp(-jnp.asarray(od, jnp.float32))
    return jnp.clip(jnp.round(intensity), 0, 255).astype(jnp.uint8)


def luminosity(rgb) -> jax.Array:
    """CIE L* of sRGB pixels (D65) as OpenCV's 8-bit Lab gives it, divided by 255 (0..1).

    L* = 116·Y^(1/3) − 16 (903.3·Y in the dark), Y from linearised sRGB, then rounded to the
    8-bit level `L* · 255 / 100` as `cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)` does (what StainTools
    thresholds). OpenCV computes in fixed point: over all 2²⁴ colours this equals its level
    for 87 %, is one level off for the rest but one colour (two), and falls on the other side
    of 0.8 for 0.1 %. Computed here, it is jit-able and the same on every device.

    **Arguments:** `rgb`: `(..., 3)` intensities 0..255.

    **Returns:** `(...,)` float32 in [0, 1].
    """
    x = jnp.asarray(rgb, jnp.float32) / _WHITE
    linear = jnp.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    y = _per_pixel(linear, jnp.array([[0.212671], [0.715160], [0.072169]], jnp.float32))[..., 0]
    lightness = jnp.where(y > 0.008856, 116.0 * jnp.cbrt(y) - 16.0, 903.3 * y)  # 0..100
    return jnp.round(lightness * (255.0 / 100.0)) / 255.0


def tissue_pixels(rgb, luminosity: float = 0.8, *, od_threshold: float | None = None):
    """Which pixels are tissue (the ones stains are estimated from).

    **Arguments:**

    - `rgb`: `(..., 3)` intensities 0..255.
    - `luminosity`: tissue is darker than this (`luminosity(rgb) < luminosity`).
    - `od_threshold`: if given, tissue is instead every pixel whose optical density is at
      least this in all three channels (torchstain's and Macenko's rule, with 0.15), and
      `luminosity` is not used.

    **Returns:** `(...,)` bool.
    """
    if od_threshold is not None:
        return jnp.all(optical_density(rgb) >= od_threshold, axis=-1)
    return _luminosity(rgb) < luminosity


_luminosity = luminosity  # `tissue_pixels`'s argument of that name hides the function there


# ----------------------------------------------------------------------------- concentrations


def unmix(od, stains, *, lam: float = 0.01) -> jax.Array:
    """Stain concentrations of optical densities: the exact non-negative lasso solution.

    Each pixel solves `min_c ½‖od - c·S‖² + lam·(c₁ + c₂)` with `c >= 0`. With two unknowns
    the minimiser is, on one of the four supports (both, first, second, none), the
    unconstrained minimiser there: both stains if that is non-negative, else the better single
    stain (zero included).

    **Arguments:**

    - `od`: `(..., 3)` optical densities.
    - `stains`: `(2, 3)` stain matrix (rows need not be unit length).
    - `lam`: the L1 weight; 0 gives non-negative least squares.

    **Returns:** `(..., 2)` float32 concentrations.
    """
    od = jnp.asarray(od, jnp.float32)
    stains = jnp.asarray(stains, jnp.float32)
    gram = stains @ stains.T                                   # M: (2, 2)
    b = _per_pixel(od, stains.T) - lam                         # (..., 2)
    m00, m01, m11 = gram[0, 0], gram[0, 1], gram[1, 1]
    det = m00 * m11 - m01 * m01
    safe_det = jnp.where(det > 1e-8 * m00 * m11, det, 1.0)
    both = jnp.stack([m11 * b[..., 0] - m01 * b[..., 1],
                      m00 * b[..., 1] - m01 * b[..., 0]], axis=-1) / safe_det
    both_valid = (det > 1e-8 * m00 * m11) & jnp.all(both >= 0, axis=-1)
    first = jnp.maximum(b[..., 0], 0.0) / m00
    second = jnp.maximum(b[..., 1], 0.0) / m11
    # On a one-stain support the objective (less its constant) is -½·c²·M_jj.
    first_better = first * first * m00 >= second * second * m11
    zero = jnp.zeros_like(first)
    single = jnp.where(first_better[..., None],
                       jnp.stack([first, zero], axis=-1), jnp.stack([zero, second], axis=-1))
    return jnp.where(both_valid[..., None], both, single)


def stain_concentrations(rgb, stains, *, lam: float = 0.01) -> jax.Array:
    """`unmix(optical_density(rgb), stains, lam=lam)`: `(..., 3)` RGB -> `(..., 2)` float32."""
    return unmix(optical_density(rgb), stains, lam=lam)


# ----------------------------------------------------------------------------- percentiles


def _masked_percentile(values, mask, q: float):
    """`np.percentile(values[mask], q)` (linear interpolation) for 1-D `values`, jit-able.

    Only the tail beyond `q` is ordered (`lax.top_k`), far cheaper than a sort on CPU.
    """
    upper = q >= 50.0
    x = values if upper else -values
    tail = (100.0 - q if upper else q) / 100.0                 # fraction above the percentile
    total = values.shape[0]
    k = min(total, math.ceil((total - 1) * tail) + 2)
    top = lax.top_k(jnp.where(mask, x, -jnp.inf), k)[0]       # descending
    n = jnp.sum(mask)
    # Ascending position q·(n-1) is position t = tail·(n-1) counted from the top.
    t = (n - 1).astype(jnp.float32) * tail
    j = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, k - 1)
    g = t - j
    a, b = top[j], top[jnp.minimum(j + 1, k - 1)]
    result = a + g * (b - a)
    result = jnp.where(g > 0, result, a)                       # b may be -inf when g == 0
    return result if upper else -result


# ----------------------------------------------------------------------------- estimators


def _ordered(stains):
    """Rows unit length, signs making each row's sum positive, haematoxylin (more red) first."""
    stains = stains * jnp.where(jnp.sum(stains, axis=1, keepdims=True) < 0, -1.0, 1.0)
    stains = stains / jnp.linalg.norm(stains, axis=1, keepdims=True)
    swap = stains[1, 0] > stains[0, 0]
    return jnp.where(swap, stains[::-1], stains)


def _macenko(od, mask, percentile: float):
    """Macenko's stain matrix from `od (P, 3)` over the pixels where `mask (P,)`."""
    weight = mask.astype(jnp.float32)
    n = jnp.sum(weight)
    mean = _pixel_sums(weight[:, None], od)[0] / n
    centred = (od - mean) * weight[:, None]
    covariance = _pixel_sums(centred, centred) / (n - 1)       # np.cov of the tissue pixels
    _, vectors = jnp.linalg.eigh(covariance)                   # eigenvalues ascending
    plane = vectors[:, ::-1][:, :2]                            # (3, 2): the top two
    # Signs: each eigenvector with a positive sum. Projections of the (non-negative) optical
    # densities on the first are then positive, so their angles never wrap around ±π.
    plane = plane * jnp.where(jnp.sum(plane, axis=0) < 0, -1.0, 1.0)
    projected = _per_pixel(od, plane)                          # (P, 2)
    angle = jnp.arctan2(projected[:, 1], projected[:, 0])
    low = _masked_percentile(angle, mask, percentile)
    high = _masked_percentile(angle, mask, 100.0 - percentile)
    directions = jnp.stack([jnp.cos(jnp.stack([low, high])),
                            jnp.sin(jnp.stack([low, high]))], axis=1)   # (2, 2)
    return _ordered(directions @ plane.T)


def _sample(mask, count: int, seed: int):
    """Weights `(count,)` and indices of up to `count` tissue pixels, uniformly without
    replacement (random keys, the `count` largest); weight 0 pads when fewer are tissue."""
    keys = jax.random.uniform(jax.random.PRNGKey(seed), mask.shape)
    chosen, index = lax.top_k(jnp.where(mask, keys, -1.0), count)
    return (chosen >= 0).astype(jnp.float32), index


def _project_rows(stains):
    """Each row onto {s >= 0, ‖s‖ <= 1} (the orthant, then the ball: exact for their meet)."""
    stains = jnp.maximum(stains, 0.0)
    return stains / jnp.maximum(1.0, jnp.linalg.norm(stains, axis=1, keepdims=True))


def _update_stains(stains, gram, cross, sweeps: int = 5):
    """Exact block-coordinate minimisation of ½‖V - C·S‖² over each row of S in turn.

    `gram = CᵀWC (2, 2)`, `cross = CᵀWV (2, 3)`: in row j the objective is
    ½·G_jj·‖s_j - u‖² + const with `u = s_j + (B_j - G_j·S) / G_jj`, so its constrained
    minimiser is the projection of `u`. An unused stain (G_jj = 0) is kept.
    """
    def sweep(_, s):
        for j in range(2):
            g = gram[j, j]
            u = s[j] + (cross[j] - gram[j] @ s) / jnp.where(g > 0, g, 1.0)
            row = _project_rows(u[None])[0]
            s = s.at[j].set(jnp.where(g > 0, row, s[j]))
        return s
    return lax.fori_loop(0, sweeps, sweep, stains)


def _vahadane(od, mask, *, percentile, lam, max_samples, seed, max_iterations, tolerance):
    """Sparse non-negative dictionary learning, two atoms, from Macenko's estimate.

    Minimises ½‖V - C·S‖² + lam·‖C‖₁ over C >= 0 and S >= 0 with rows ‖s‖ <= 1 (active at the
    optimum for lam > 0) by alternating exact steps: C by `unmix`, then S by `_update_stains`.
    The objective never increases; stops when no entry of S moves more than `tolerance`.
    """
    initial = _project_rows(_macenko(od, mask, percentile))
    if od.shape[0] > max_samples:
        weight, index = _sample(mask, max_samples, seed)
        od = od[index]
    else:
        weight = mask.astype(jnp.float32)

    def step(stains):
        c = unmix(od, stains, lam=lam) * weight[:, None]       # (P, 2); padding rows zero
        return _update_stains(stains, _pixel_sums(c, c), _pixel_sums(c, od))

    def not_done(state):
        i, stains, change = state
        return (i < max_iterations) & (change > tolerance)

    def body(state):
        i, stains, _ = state
        updated = step(stains)
        return i + 1, updated, jnp.max(jnp.abs(updated - stains))

    _, stains, _ = lax.while_loop(not_done, body, (0, initial, jnp.float32(jnp.inf)))
    return _ordered(stains)


@dataclasses.dataclass(frozen=True)
class _Estimator:
    """Everything that decides an estimate: hashable, a static argument of the jitted code."""
    method: str = "vahadane"
    luminosity: float = 0.8
    od_threshold: float | None = None
    percentile: float = 1.0
    lam: float = 0.1
    concentration_lam: float = 0.01
    max_samples: int = 100_000
    seed: int = 0
    max_iterations: int = 300
    tolerance: float = 1e-6

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.luminosity <= 1:
            raise ValueError(f"luminosity must be in (0, 1], got {self.luminosity}")
        if not 0 <= self.percentile < 50:
            raise ValueError(f"percentile must be in [0, 50), got {self.percentile}")
        if self.lam < 0 or self.concentration_lam < 0:
            raise ValueError("lam and concentration_lam must be non-negative")
        if self.max_samples < 2:
            raise ValueError(f"max_samples must be at least 2, got {self.max_samples}")

    def stains(self, pixels):
        """`(P, 3)` RGB -> the `(2, 3)` stain matrix, the number of tissue pixels, and which
        they are `(P,)`."""
        od = optical_density(pixels)
        mask = tissue_pixels(pixels, self.luminosity, od_threshold=self.od_threshold)
        if self.method == "macenko":
            stains = _macenko(od, mask, self.percentile)
        else:
            stains = _vahadane(od, mask, percentile=self.percentile, lam=self.lam,
                               max_samples=self.max_samples, seed=self.seed,
                               max_iterations=self.max_iterations, tolerance=self.tolerance)
        return stains, jnp.sum(mask), mask

    def profile(self, pixels):
        """`(P, 3)` RGB -> stains `(2, 3)`, tissue p99 concentrations `(2,)`, tissue count,
        and the concentrations `(P, 2)`."""
        stains, count, mask = self.stains(pixels)
        c = stain_concentrations(pixels, stains, lam=self.concentration_lam)
        p99 = jnp.stack([_masked_percentile(c[:, j], mask, 99.0) for j in range(2)])
        return stains, p99, count, c

    def normalise(self, pixels, target_stains, target_p99):
        """`(P, 3)` RGB -> `(P, 3)` uint8 recomposed with the target (the source estimated
        here), and the tissue count."""
        _, p99, count, c = self.profile(pixels)
        return _recompose(c, p99, target_stains, target_p99), count

    def describe_tissue(self) -> str:
        if self.od_threshold is not None:
            return f"with optical density >= {self.od_threshold} in every channel"
        return f"with luminosity below {self.luminosity}"


@functools.partial(jax.jit, static_argnames="estimator")
def _profiles_jit(images, estimator):
    return jax.vmap(lambda pixels: estimator.profile(pixels)[:3])(images)


@functools.partial(jax.jit, static_argnames="estimator")
def _normalise_jit(images, target_stains, target_p99, estimator):
    return jax.vmap(estimator.normalise, in_axes=(0, None, None))(images, target_stains,
                                                                   target_p99)


def _pixels(rgb) -> jax.Array:
    """`(..., 3)` -> `(P, 3)`, refusing anything that is not RGB."""
    rgb = jnp.asarray(rgb)
    if rgb.ndim < 2 or rgb.shape[-1] != 3:
        raise ValueError(f"expected RGB pixels of shape (..., 3), got shape {rgb.shape}")
    return rgb.reshape(-1, 3)


def _require_tissue(count, total: int, estimator: _Estimator, where: str = "the image"):
    """A `ValueError` when fewer than `MIN_TISSUE_PIXELS` pixels are tissue (not when traced)."""
    if isinstance(count, jax.core.Tracer):
        return
    count = int(count)
    if count < MIN_TISSUE_PIXELS:
        raise ValueError(
            f"no tissue found in {where}: {count} of {total} pixels {estimator.describe_tissue()}"
            f" (at least {MIN_TISSUE_PIXELS} needed to estimate stains)"
        )


def _estimate_stains(rgb, estimator: _Estimator) -> jax.Array:
    pixels = _pixels(rgb)
    stains, _, count = _profiles_jit(pixels[None], estimator)  # compiled once with `estimate`
    _require_tissue(count[0], pixels.shape[0], estimator)
    return stains[0]


def macenko_stain_matrix(rgb, *, luminosity: float = 0.8, percentile: float = 1.0,
                         od_threshold: float | None = None) -> jax.Array:
    """Macenko et al.'s stain matrix of an H&E image.

    The optical densities of the tissue pixels; the plane of the two leading eigenvectors of
    their covariance; each pixel's angle in that plane; the directions at the `percentile`
    and `100 - percentile` angle percentiles are the two stains.

    **Arguments:**

    - `rgb`: `(..., 3)` RGB, 0..255: one image, or several pooled.
    - `luminosity`, `od_threshold`: which pixels are tissue (`tissue_pixels`).
    - `percentile`: the angle percentile (1 → percentiles 1 and 99).

    **Returns:** `(2, 3)` float32, haematoxylin first, rows unit length.

    **Raises:** `ValueError` if fewer than two pixels are tissue.
    """
    estimator = _Estimator("macenko", luminosity, od_threshold, percentile)
    return _estimate_stains(rgb, estimator)


def vahadane_stain_matrix(rgb, *, luminosity: float = 0.8, lam: float = 0.1,
                          od_threshold: float | None = None, percentile: float = 1.0,
                          max_samples: int = 100_000, seed: int = 0, max_iterations: int = 300,
                          tolerance: float = 1e-6) -> jax.Array:
    """Vahadane et al.'s (SPCN) stain matrix: sparse non-negative dictionary learning.

    Minimises `½‖V - C·S‖² + lam·‖C‖₁` over concentrations `C >= 0` and stains `S >= 0`
    (rows of norm at most 1, unit at the optimum) for the optical densities `V` of the
    tissue pixels, by alternating exact minimisation over C (`unmix`) and over each row of
    S, starting from Macenko's estimate (so the two methods agree on which stain is which).

    **Arguments:**

    - `rgb`: `(..., 3)` RGB, 0..255.
    - `luminosity`, `od_threshold`: which pixels are tissue (`tissue_pixels`).
    - `lam`: the sparsity weight on the concentrations (0.1, as StainTools).
    - `percentile`: of the Macenko start.
    - `max_samples`: images with more pixels are learnt from this many tissue pixels drawn
      at random (without replacement) with `seed`.
    - `max_iterations`, `tolerance`: stop after this many alternations, or once no entry of
      the stain matrix moves more than `tolerance`.

    **Returns:** `(2, 3)` float32, haematoxylin first, rows unit length.

    **Raises:** `ValueError` if fewer than two pixels are tissue.
    """
    estimator = _Estimator("vahadane", luminosity, od_threshold, percentile, lam,
                           max_samples=max_samples, seed=seed, max_iterations=max_iterations,
                           tolerance=tolerance)
    return _estimate_stains(rgb, estimator)


# ----------------------------------------------------------------------------- normaliser


@dataclasses.dataclass(frozen=True)
class StainProfile:
    """The stain appearance of an image or slide.

    - `stains`: `(2, 3)` stain matrix, haematoxylin first.
    - `p99`: `(2,)` the 99th percentile of each stain's concentration over tissue pixels.
    """
    stains: np.ndarray
    p99: np.ndarray

    def __post_init__(self):
        stains = np.asarray(self.stains, np.float32)
        p99 = np.asarray(self.p99, np.float32)
        if stains.shape != (2, 3) or p99.shape != (2,):
            raise ValueError(
                f"a stain profile needs stains (2, 3) and p99 (2,), got {stains.shape} and "
                f"{p99.shape}"
            )
        if not np.all(p99 > 0):
            raise ValueError(f"the p99 concentrations must be positive, got {p99}")
        object.__setattr__(self, "stains", stains)
        object.__setattr__(self, "p99", p99)


def _recompose(c, source_p99, target_stains, target_p99):
    """SPCN: concentrations `(P, 2)` scaled by the p99 ratio, mixed with the target's stains
    -> `(P, 3)` uint8."""
    # A stain the source lacks (p99 0) has no concentration to scale.
    c = c * jnp.where(source_p99 > 0, target_p99 / source_p99, 1.0)
    return rgb_from_od(_per_pixel(c, target_stains))


def recolour(rgb, source_stains, source_p99, target_stains, target_p99, *,
             lam: float = 0.01) -> jax.Array:
    """SPCN with fixed profiles, as a pure function to use inside `jax.jit`: the
    concentrations of `rgb` under the source stains, scaled by the ratio of the 99th
    percentiles, mixed with the target stains.

    **Arguments:** `rgb` `(..., 3)` 0..255; `source_stains`, `target_stains` `(2, 3)`;
    `source_p99`, `target_p99` `(2,)` (a `StainProfile`'s fields); `lam`: the concentrations'
    lasso weight. **Returns:** uint8 of the shape of `rgb`.
    """
    rgb = jnp.asarray(rgb)
    pixels = rgb.reshape(-1, 3)
    c = stain_concentrations(pixels, source_stains, lam=lam)
    return _recompose(c, source_p99, target_stains, target_p99).reshape(rgb.shape)


@functools.partial(jax.jit, static_argnames="lam")
def _recolour_jit(images, source_stains, source_p99, target_stains, target_p99, lam):
    """`(N, P, 3)` with one fixed source profile -> `(N, P, 3)` uint8."""
    return recolour(images, source_stains, source_p99, target_stains, target_p99, lam=lam)


class StainNormalizer:
    """Stain normalisation onto a target's appearance (SPCN; Macenko as an option).

    ```python
    normalizer = StainNormalizer("vahadane").fit(target_rgb)   # or .fit_slide(slide)
    normalizer.fit_source_slide(slide)                         # optional: one source per slide
    tile = normalizer.transform(tile_rgb)                      # (H, W, 3) or (N, H, W, 3)
    ```

    **Arguments:**

    - `method`: `"vahadane"` (sparse dictionary learning; SPCN) or `"macenko"`.
    - `luminosity`, `od_threshold`: which pixels are tissue (`tissue_pixels`).
    - `percentile`: Macenko's angle percentile (also the Vahadane start).
    - `lam`: Vahadane's sparsity weight; `concentration_lam`: the concentrations' lasso weight.
    - `max_samples`, `seed`, `max_iterations`, `tolerance`: Vahadane's learning
      (`vahadane_stain_matrix`).
    - `target`, `source`: `StainProfile`s to start from (else `fit` / `fit_source`).

    The target is fitted once (`fit`, `fit_slide`, or `StainNormalizer.default()`). The source
    is estimated per image by `transform`, unless fixed by `fit_source` / `fit_source_slide`
    (one estimate for a whole slide: faster, and tiles of a slide get the same treatment).
    """

    def __init__(self, method: str = "vahadane", *, luminosity: float = 0.8,
                 od_threshold: float | None = None, percentile: float = 1.0, lam: float = 0.1,
                 concentration_lam: float = 0.01, max_samples: int = 100_000, seed: int = 0,
                 max_iterations: int = 300, tolerance: float = 1e-6,
                 target: StainProfile | None = None, source: StainProfile | None = None):
        self.estimator = _Estimator(method, luminosity, od_threshold, percentile, lam,
                                    concentration_lam, max_samples, seed, max_iterations,
                                    tolerance)
        self.target = target
        self.source = source

    @classmethod
    def default(cls, method: str = "vahadane", **options) -> "StainNormalizer":
        """A normaliser whose target is the reference H&E appearance of Macenko et al.
        (`REFERENCE_STAINS`, `REFERENCE_P99`): no image needed."""
        return cls(method, target=StainProfile(REFERENCE_STAINS, REFERENCE_P99), **options)

    @property
    def method(self) -> str:
        return self.estimator.method

    # ------------------------------------------------------------------ estimation

    def estimate(self, rgb, *, where: str = "the image") -> StainProfile:
        """The `StainProfile` of `(..., 3)` RGB pixels (one image, or several pooled).

        **Raises:** `ValueError` if fewer than two pixels are tissue, or a stain is absent.
        """
        pixels = _pixels(rgb)
        stains, p99, count = _profiles_jit(pixels[None], self.estimator)
        _require_tissue(count[0], pixels.shape[0], self.estimator, where)
        p99 = np.asarray(p99[0])
        for name, value in zip(STAIN_NAMES, p99):
            if not value > 0:
                raise ValueError(f"no {name} found in {where}: the 99th percentile of its "
                                 f"concentration over the tissue pixels is {value}")
        return StainProfile(np.asarray(stains[0]), p99)

    def fit(self, target_rgb) -> "StainNormalizer":
        """Take the target appearance from `(..., 3)` RGB (one image or several pooled)."""
        self.target = self.estimate(target_rgb, where="the target image")
        return self

    def fit_source(self, source_rgb) -> "StainNormalizer":
        """Fix the source appearance from `(..., 3)` RGB, for every later `transform`;
        `fit_source(None)` returns to estimating it per image."""
        self.source = None if source_rgb is None else self.estimate(
            source_rgb, where="the source image")
        return self

    def fit_slide(self, slide, **sampling) -> "StainNormalizer":
        """Take the target appearance from a slide's tissue: tiles drawn by
        `sample_slide_tiles(slide, **sampling)`, pooled."""
        self.target = self._estimate_slide(slide, sampling)
        return self

    def fit_source_slide(self, slide, **sampling) -> "StainNormalizer":
        """Fix the source appearance from a slide's tissue (tiles drawn by
        `sample_slide_tiles(slide, **sampling)`, pooled), to `transform` every tile of that
        slide the same way."""
        self.source = self._estimate_slide(slide, sampling)
        return self

    def _estimate_slide(self, slide, sampling) -> StainProfile:
        sampling.setdefault("luminosity", self.estimator.luminosity)
        regions = sample_slide_tiles(slide, **sampling)
        try:
            return self.estimate(regions, where=f"{len(regions)} tiles sampled from the slide")
        except ValueError as error:
            raise InputDataError(f"{slide.path}: {error}") from error

    # ------------------------------------------------------------------ transform

    def transform(self, rgb) -> jax.Array:
        """Normalise one `(H, W, 3)` image or a batch `(N, H, W, 3)`; returns the same shape,
        uint8. Each image gets its own source estimate unless `fit_source*` fixed one.

        **Raises:** `ValueError` when the normaliser has no target yet, or (estimating per
        image) an image has fewer than two tissue pixels; the message names the images.
        """
        if self.target is None:
            raise ValueError("the normaliser has no target: call fit, fit_slide or use "
                             "StainNormalizer.default()")
        rgb = jnp.asarray(rgb)
        if rgb.ndim not in (3, 4) or rgb.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) image or an (N, H, W, 3) batch, got shape "
                             f"{rgb.shape}")
        images = rgb.reshape(-1 if rgb.ndim == 4 else 1, rgb.shape[-3] * rgb.shape[-2], 3)
        if self.source is None:
            out, count = _normalise_jit(images, self.target.stains, self.target.p99,
                                        self.estimator)
            self._require_tissue_in_each(count, images.shape[1], rgb.ndim == 4)
        else:
            out = _recolour_jit(images, self.source.stains, self.source.p99,
                                self.target.stains, self.target.p99,
                                self.estimator.concentration_lam)
        return out.reshape(rgb.shape)

    def _require_tissue_in_each(self, count, total: int, batch: bool):
        if isinstance(count, jax.core.Tracer):
            return
        empty = np.flatnonzero(np.asarray(count) < MIN_TISSUE_PIXELS)
        if empty.size:
            where = f"images {empty.tolist()} of the batch" if batch else "the image"
            raise ValueError(
                f"no tissue found in {where}: fewer than {MIN_TISSUE_PIXELS} pixels "
                f"{self.estimator.describe_tissue()}; fix the source with fit_source_slide "
                f"or leave such tiles out"
            )


# ----------------------------------------------------------------------------- slides


def sample_slide_tiles(slide, *, tiles=None, tile_size: int | None = None, level: int | None = None,
                       downsample: float = 1.0, samples: int = 16, max_pixels: int = 4_000_000,
                       seed: int = 0, luminosity: float = 0.8, min_tissue_fraction: float = 0.5,
                       thumbnail_pixels: int = 4_000_000) -> np.ndarray:
    """Pixels of a slide's tissue tiles, for one stain estimate per slide.

    The tiles are found at low resolution and only the chosen ones are read (never a whole
    level 0): candidates come from `tiles` or from a thumbnail (the finest level within
    `thumbnail_pixels`); `samples` of them are drawn at random and read through
    `slide.read_region`, each cropped about its centre so that all together hold at most
    `max_pixels` pixels. They are read at level 0 by default, the resolution tiles are
    normalised at: area averaging at coarser levels mixes nuclei with their surroundings
    and tilts the haematoxylin estimate (3–5.5° at 2× and 11° at 4× on a synthetic slide,
    against 1–1.5° at level 0).

    **Arguments:**

    - `slide`: an open `jaxmed.data.slide.Slide`.
    - `tiles`: candidate tiles: a `TileGrid` (its `coords` and `tile_size`) or `(n, 2)` level-0
      top-left `(x, y)`. Without it, the cells of a `tile_size` grid whose fraction of tissue
      pixels (`luminosity`) on the thumbnail is at least `min_tissue_fraction` (or the
      richest cells, if none is).
    - `tile_size`: level-0 pixels per tile side (default: the grid's, else 1152).
    - `level`: the level to read; default `slide.best_level_for_downsample(downsample)`.
    - `samples`, `max_pixels`, `seed`: how many tiles, how many pixels in all, which.

    **Returns:** `(m, s, s, 3)` uint8, `m <= samples` crops of `s` pixels of the level read.

    **Raises:** `InputDataError` naming the slide when it shows no tissue.
    """
    if tiles is not None and hasattr(tiles, "coords"):
        tile_size = tile_size or int(tiles.tile_size)
        tiles = tiles.coords
    tile_size = tile_size or 1152
    if samples < 1 or tile_size < 1 or max_pixels < 1:
        raise ValueError(f"samples, tile_size and max_pixels must be positive, got {samples}, "
                         f"{tile_size}, {max_pixels}")
    if tiles is None:
        candidates = _tissue_cells(slide, tile_size, luminosity, min_tissue_fraction,
                                   samples, thumbnail_pixels)
    else:
        candidates = np.asarray(tiles, np.int64).reshape(-1, 2)
        if len(candidates) == 0:
            raise InputDataError(f"{slide.path}: no tiles given to sample the stains from")
    rng = np.random.default_rng(seed)
    chosen = candidates[np.sort(rng.choice(len(candidates), min(samples, len(candidates)),
                                           replace=False))]
    if level is None:
        level = slide.best_level_for_downsample(downsample)
    scale = slide.levels[level].downsample
    side = max(1, round(tile_size / scale))
    crop = max(1, min(side, math.isqrt(max_pixels // len(chosen))))
    margin = round((side - crop) / 2 * scale)                 # level-0 pixels
    return np.stack([slide.read_region((int(x) + margin, int(y) + margin), level, (crop, crop))
                     for x, y in chosen])


def _tissue_cells(slide, tile_size, luminosity, min_fraction, samples, thumbnail_pixels):
    """Level-0 top-left corners of the grid cells of `tile_size` rich in tissue pixels, as
    seen on a thumbnail."""
    level = slide.level_for_pixel_budget(thumbnail_pixels)
    thumbnail = slide.read_level(level, max_pixels=thumbnail_pixels)
    scale = slide.levels[level].downsample
    tissue = np.asarray(tissue_pixels(thumbnail, luminosity), np.float64)
    # Integral image: each cell's tissue fraction in O(1).
    integral = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    width, height = slide.dimensions
    xs, ys = np.arange(0, width, tile_size), np.arange(0, height, tile_size)  # border cells too
    x, y = (a.ravel() for a in np.meshgrid(xs, ys))
    rows, cols = tissue.shape

    def edge(v, limit):
        return np.clip(np.round(v / scale).astype(np.int64), 0, limit)

    x0, x1 = edge(x, cols), edge(x + tile_size, cols)
    y0, y1 = edge(y, rows), edge(y + tile_size, rows)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, cols)), np.maximum(y1, np.minimum(y0 + 1, rows))
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    fraction = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
    rich = fraction >= min_fraction
    if not rich.any():
        order = np.argsort(-fraction, kind="stable")[:samples]
        rich = np.zeros_like(rich)
        rich[order[fraction[order] > 0]] = True
    if not rich.any():
        raise InputDataError(
            f"{slide.path}: no tissue found: no pixel of the level-{level} thumbnail has "
            f"luminosity below {luminosity}"
        )
    return np.stack([x[rich], y[rich]], axis=1)
