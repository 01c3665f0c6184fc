"""Stain estimation and normalisation, checked against the truth of synthetic mixtures and
against independent references (NumPy re-derivations, SciPy, OpenCV, torchstain)."""

import dataclasses
import pathlib

import cv2
import jax
import numpy as np
import pytest
import scipy.ndimage
import scipy.optimize

from jaxmed.data.slide import open_slide
from jaxmed.data.synthetic_slide import make_synthetic_slide, write_synthetic_slide
from jaxmed.errors import InputDataError
from jaxmed.pathology import stain

RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])


# ----------------------------------------------------------------------------- synthetic tissue


def _unit(rows):
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _rotation(axis, degrees):
    """Rodrigues' rotation matrix about `axis`."""
    axis = _unit(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _stain_variants():
    """Ruifrok's H&E, Macenko's reference, and the reference turned about four axes."""
    variants = [_unit(RUIFROK), _unit(stain.REFERENCE_STAINS)]
    for axis, degrees in [((1, 1, 1), 12), ((1, 1, 1), -12), ((0, 0, 1), 8), ((1, 0, 0), -8)]:
        variants.append(_unit(stain.REFERENCE_STAINS @ _rotation(axis, degrees).T))
    assert all((s > 0).all() for s in variants)
    return variants


STAINS = _stain_variants()


def _concentrations(shape, seed):
    """`(h, w, 2)` sparse non-negative concentrations: nuclei of haematoxylin (half with a
    trace of eosin), eosin stroma, some mixed pixels, and bare glass."""
    rng = np.random.default_rng(seed)

    def blobs(sigma, above):
        field = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
        return (field - field.mean()) / field.std() > above

    nuclei, stroma, glass = blobs(2.0, 1.0), blobs(5.0, -0.3), blobs(6.0, 1.3)
    c = np.zeros(shape + (2,))
    c[..., 1] = np.where(stroma, 0.25 + 0.6 * rng.random(shape), 0.0)
    c[nuclei, 0] = 0.5 + 0.8 * rng.random(nuclei.sum())
    c[nuclei, 1] *= 0.2 * (rng.random(nuclei.sum()) < 0.5)
    mixed = (rng.random(shape) < 0.1) & stroma & ~nuclei
    c[mixed, 0] = 0.1 + 0.3 * rng.random(mixed.sum())
    c[glass] = 0.0
    return c


def _mix(c, stains):
    """Beer–Lambert, written here independently of the module: `255·exp(-C·S)` as uint8."""
    return np.clip(np.round(255 * np.exp(-c @ np.asarray(stains, np.float64))), 0, 255
                   ).astype(np.uint8)


def _angles(found, truth):
    """Degrees between corresponding rows."""
    cosine = np.sum(_unit(found) * _unit(truth), axis=-1)
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


def _od(rgb):
    return -np.log(np.maximum(np.asarray(rgb, np.float64), 1) / 255)


# ----------------------------------------------------------------------------- pixels


def test_optical_density_formula_and_inverse():
    levels = np.arange(256, dtype=np.uint8).reshape(-1, 1).repeat(3, axis=1)
    od = np.asarray(stain.optical_density(levels))
    assert od.dtype == np.float32
    np.testing.assert_allclose(od, _od(levels), rtol=1e-6, atol=1e-6)
    assert od[0, 0] == od[1, 0] and od[255, 0] == 0            # max(I, 1); white is 0
    back = np.asarray(stain.rgb_from_od(od))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back[1:], levels[1:])         # exact round trip
    assert back[0, 0] == 1
    np.testing.assert_array_equal(stain.rgb_from_od(np.array([[-1.0, 0.0, 9.0]])), [[255, 255, 0]])


def test_luminosity_is_opencv_8bit_lab_lightness():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    colours[0, :256] = np.arange(256)[:, None]                   # every grey level
    opencv = cv2.cvtColor(colours, cv2.COLOR_RGB2LAB)[..., 0].astype(int)
    ours = np.round(np.asarray(stain.luminosity(colours)) * 255).astype(int)
    difference = ours - opencv
    assert np.abs(difference).max() <= 2
    assert np.mean(difference == 0) > 0.85
    assert np.abs(difference[0, :256]).max() <= 1
    disagree = np.mean(np.asarray(stain.tissue_pixels(colours)) != (opencv / 255 < 0.8))
    assert disagree < 0.002


def test_tissue_by_optical_density_threshold():
    rgb = np.array([[200, 200, 200], [220, 100, 100], [100, 100, 100]], np.uint8)
    od = _od(rgb)
    np.testing.assert_array_equal(stain.tissue_pixels(rgb, od_threshold=0.15),
                                  np.all(od >= 0.15, axis=1))
    np.testing.assert_array_equal(stain.tissue_pixels(rgb, od_threshold=0.15), [True, False, True])


# ----------------------------------------------------------------------------- concentrations


def test_unmix_without_penalty_is_nnls():
    rng = np.random.default_rng(1)
    stains = rng.random((2, 3)) + 0.1                           # rows not unit length
    od = rng.normal(0.5, 0.6, (400, 3))                         # inside and outside the cone
    ours = np.asarray(stain.unmix(od, stains, lam=0.0))
    reference = np.array([scipy.optimize.nnls(stains.T, v)[0] for v in od])
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    assert (ours == 0).any() and (ours > 0).all(axis=1).any()   # every support was met


@pytest.mark.parametrize("lam", [0.01, 0.1, 0.5])
def test_unmix_lasso_is_the_minimiser(lam):
    rng = np.random.default_rng(2)
    stains = _unit(RUIFROK)
    od = np.abs(rng.normal(0.4, 0.4, (300, 3)))
    c = np.asarray(stain.unmix(od, stains, lam=lam), np.float64)

    def objective(ci, v):
        return 0.5 * np.sum((v - ci @ stains) ** 2) + lam * np.sum(ci)

    # KKT conditions of the non-negative lasso: gradient zero where c > 0, >= 0 where c = 0.
    gradient = (c @ stains - od) @ stains.T + lam
    assert (c >= 0).all()
    assert np.abs(gradient[c > 0]).max() < 1e-5
    assert gradient[c == 0].min() > -1e-5
    for ci, v in zip(c[:50], od[:50]):
        other = scipy.optimize.minimize(objective, np.full(2, 0.3), args=(v,),
                                        bounds=[(0, None)] * 2, method="L-BFGS-B",
                                        options={"ftol": 1e-14, "gtol": 1e-12})
        assert objective(ci, v) <= other.fun + 1e-7


def test_unmix_with_parallel_stains_is_finite():
    stains = _unit([[0.6, 0.7, 0.3], [0.6, 0.7, 0.3]])
    c = np.asarray(stain.unmix(np.array([[0.6, 0.7, 0.3], [0.0, 0.0, 0.0]]), stains, lam=0.0))
    assert np.isfinite(c).all()
    np.testing.assert_allclose(c @ stains, [[0.6, 0.7, 0.3], [0, 0, 0]], atol=1e-6)


# ----------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("q", [0.0, 1.0, 37.5, 50.0, 99.0, 100.0])
@pytest.mark.parametrize("size,kept", [(1000, 0.6), (7, 0.3), (5000, 1.0)])
def test_masked_percentile_is_numpys(q, size, kept):
    rng = np.random.default_rng(size)
    values = rng.normal(size=size).astype(np.float32)
    mask = rng.random(size) < kept
    mask[:2] = True
    ours = float(stain._masked_percentile(values, mask, q))
    assert ours == pytest.approx(np.percentile(values[mask].astype(np.float64), q), abs=1e-5)


def _numpy_macenko(rgb, mask, percentile):
    """Macenko's method written from its definition in float64, with this module's sign and
    ordering conventions (eigenvectors and stains with positive sums; more red first)."""
    od = _od(rgb).reshape(-1, 3)
    tissue = od[mask.reshape(-1)]
    _, vectors = np.linalg.eigh(np.cov(tissue, rowvar=False))
    plane = vectors[:, [2, 1]]
    plane *= np.where(plane.sum(axis=0) < 0, -1, 1)
    projected = tissue @ plane
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    found = [plane @ [np.cos(a), np.sin(a)]
             for a in np.percentile(angle, [percentile, 100 - percentile])]
    found = _unit([v * (1 if v.sum() >= 0 else -1) for v in found])
    return found if found[0, 0] >= found[1, 0] else found[::-1]


@pytest.mark.parametrize("percentile", [1.0, 5.0])
def test_macenko_matches_a_numpy_derivation(percentile):
    rgb = _mix(_concentrations((96, 96), 3), STAINS[2])
    rgb = np.clip(rgb + np.random.default_rng(3).normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)
    mask = np.asarray(stain.tissue_pixels(rgb))
    ours = np.asarray(stain.macenko_stain_matrix(rgb, percentile=percentile))
    np.testing.assert_allclose(ours, _numpy_macenko(rgb, mask, percentile), atol=2e-4)


@pytest.mark.parametrize("index", range(len(STAINS)))
def test_both_methods_recover_known_stains(index):
    truth = STAINS[index]
    rgb = _mix(_concentrations((128, 128), index), truth)
    macenko = np.asarray(stain.macenko_stain_matrix(rgb))
    vahadane = np.asarray(stain.vahadane_stain_matrix(rgb))
    assert _angles(macenko, truth).max() < 1.0
    assert _angles(vahadane, truth).max() < 1.5
    for found in (macenko, vahadane):
        np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1, atol=1e-6)
        assert found[0, 0] > found[1, 0] and (found >= 0).all()


def _dictionary_objective(od, stains, lam):
    c = np.asarray(stain.unmix(od, stains, lam=lam), np.float64)
    return 0.5 * np.sum((od - c @ stains) ** 2) + lam * c.sum()


def test_vahadane_reaches_a_minimum_of_its_objective():
    truth = STAINS[1]
    rgb = _mix(_concentrations((96, 96), 7), truth)
    od = _od(rgb)[np.asarray(stain.tissue_pixels(rgb))]
    found = np.asarray(stain.vahadane_stain_matrix(rgb), np.float64)
    start = np.asarray(stain.macenko_stain_matrix(rgb), np.float64)
    best = _dictionary_objective(od, found, 0.1)
    assert best <= _dictionary_objective(od, truth, 0.1)
    assert best <= _dictionary_objective(od, start, 0.1)
    rng = np.random.default_rng(0)
    for _ in range(20):                                         # feasible nearby matrices
        nearby = _unit(np.maximum(found + rng.normal(0, 2e-3, found.shape), 0))
        assert best <= _dictionary_objective(od, nearby, 0.1) + 1e-6 * best


def test_vahadane_subsample_is_seeded_and_close_to_the_full_estimate():
    rgb = _mix(_concentrations((128, 128), 4), STAINS[3])
    full = np.asarray(stain.vahadane_stain_matrix(rgb))
    sampled = np.asarray(stain.vahadane_stain_matrix(rgb, max_samples=4000))
    again = np.asarray(stain.vahadane_stain_matrix(rgb, max_samples=4000))
    other = np.asarray(stain.vahadane_stain_matrix(rgb, max_samples=4000, seed=1))
    np.testing.assert_array_equal(sampled, again)
    assert not np.array_equal(sampled, other)
    assert _angles(sampled, full).max() < 0.5 and _angles(other, full).max() < 0.5


def test_macenko_agrees_with_torchstain():
    normalizers = pytest.importorskip("torchstain.numpy.normalizers")
    rng = np.random.default_rng(5)
    # Macenko's reference stains: every channel of a pure stain passes the 0.15 rule. (Ruifrok's
    # eosin has a red optical density of 0.07 per unit: that rule drops its pure pixels.)
    truth = STAINS[1]
    rgb = _mix(_concentrations((128, 128), 5), truth)
    rgb = np.clip(rgb + rng.normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)
    reference = normalizers.NumpyMacenkoNormalizer()
    reference.fit(rgb)                                          # alpha 1, beta 0.15, Io 240
    theirs = reference.HERef.T                                  # columns are stains
    ours = np.asarray(stain.macenko_stain_matrix(rgb, od_threshold=0.15))
    assert _angles(ours, theirs).max() < 3.0
    assert _angles(ours, truth).max() < 2.5


def test_estimators_run_under_jit_and_vmap():
    batch = np.stack([_mix(_concentrations((48, 48), i), STAINS[i]) for i in range(3)])
    for estimate in (stain.macenko_stain_matrix, stain.vahadane_stain_matrix):
        one_by_one = np.stack([estimate(image) for image in batch])
        np.testing.assert_allclose(jax.jit(jax.vmap(estimate))(batch), one_by_one, atol=1e-5)


# ----------------------------------------------------------------------------- normaliser


def _ssim(a, b, sigma=1.5):
    """Mean SSIM (Wang et al. 2004) of two greyscale 0..255 images, Gaussian window."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x):
        return scipy.ndimage.gaussian_filter(x, sigma, truncate=3.5, mode="reflect")

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
            / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return ssim.mean()


def _lightness(rgb):
    return cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2LAB)[..., 0]


def test_ssim_on_trivial_cases():
    x = np.random.default_rng(0).integers(0, 256, (40, 40)).astype(np.float64)
    assert _ssim(x, x) == pytest.approx(1.0)
    c1 = (0.01 * 255) ** 2
    assert _ssim(np.full((9, 9), 100.0), np.full((9, 9), 60.0)) == pytest.approx(
        (2 * 100 * 60 + c1) / (100 ** 2 + 60 ** 2 + c1))
    assert _ssim(x, 255 - x) < 0


@pytest.mark.parametrize("method", stain.METHODS)
def test_normalising_an_image_to_itself_is_near_identity(method):
    rgb = _mix(_concentrations((128, 128), 8), STAINS[1])
    normalizer = stain.StainNormalizer(method).fit(rgb)
    out = np.asarray(normalizer.transform(rgb))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    tissue = np.asarray(stain.tissue_pixels(rgb))
    error = np.abs(out.astype(int) - rgb)[tissue]
    assert error.mean() < 1.5
    assert np.abs(out.astype(int) - rgb)[~tissue].mean() < 1.5


@pytest.mark.parametrize("method", stain.METHODS)
def test_normaliser_maps_source_stains_onto_the_target(method):
    source_stains, target_stains = STAINS[3], STAINS[0]
    source = _mix(_concentrations((128, 128), 9) * [1.4, 0.7], source_stains)
    target = _mix(_concentrations((128, 128), 10), target_stains)
    normalizer = stain.StainNormalizer(method).fit(target)
    assert _angles(normalizer.target.stains, target_stains).max() < 1.5
    out = np.asarray(normalizer.transform(source))
    after = normalizer.estimate(out)
    assert _angles(after.stains, normalizer.target.stains).max() < 1.0   # what it recomposes with
    assert _angles(after.stains, target_stains).max() < 2.5
    np.testing.assert_allclose(after.p99, normalizer.target.p99, rtol=0.03)
    assert _angles(normalizer.estimate(source).stains, target_stains).min() > 5   # it moved
    assert _ssim(_lightness(source), _lightness(out)) > 0.9


@pytest.mark.parametrize("method", stain.METHODS)
def test_transform_is_the_same_under_jit_and_in_batches(method):
    batch = np.stack([_mix(_concentrations((64, 64), 20 + i), STAINS[i]) for i in range(3)])
    normalizer = stain.StainNormalizer(method).fit(_mix(_concentrations((64, 64), 11), STAINS[0]))
    together = np.asarray(normalizer.transform(batch))
    assert together.shape == batch.shape
    one_by_one = np.stack([normalizer.transform(image) for image in batch])
    assert np.abs(together.astype(int) - one_by_one).max() <= 1
    with jax.disable_jit():
        eager = np.asarray(normalizer.transform(batch[0]))
    assert np.abs(eager.astype(int) - one_by_one[0]).max() <= 1
    assert np.mean(eager != one_by_one[0]) < 0.01


def test_fixed_source_is_used_for_every_tile():
    source = _mix(_concentrations((128, 128), 12), STAINS[4])
    normalizer = stain.StainNormalizer("macenko").fit(_mix(_concentrations((64, 64), 13),
                                                           STAINS[0]))
    profile = normalizer.estimate(source)
    normalizer.fit_source(source)
    assert np.array_equal(normalizer.source.stains, profile.stains)
    tile = source[:32, :32]
    c = np.asarray(stain.stain_concentrations(tile, profile.stains))
    expected = _mix(c * normalizer.target.p99 / profile.p99, normalizer.target.stains)
    assert np.abs(np.asarray(normalizer.transform(tile)).astype(int) - expected).max() <= 1
    normalizer.fit_source(None)
    assert normalizer.source is None


def test_default_target_is_macenkos_reference():
    normalizer = stain.StainNormalizer.default()
    np.testing.assert_array_equal(normalizer.target.stains, stain.REFERENCE_STAINS)
    np.testing.assert_allclose(normalizer.target.p99, [1.9705, 1.0308], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(stain.REFERENCE_STAINS, axis=1), 1, atol=1e-4)
    out = normalizer.transform(_mix(_concentrations((96, 96), 14), STAINS[0]))
    assert _angles(normalizer.estimate(out).stains, stain.REFERENCE_STAINS).max() < 1.5


def test_no_tissue_is_a_clear_error():
    white = np.full((64, 64, 3), 250, np.uint8)
    for estimate in (stain.macenko_stain_matrix, stain.vahadane_stain_matrix):
        with pytest.raises(ValueError, match="no tissue found in the image: 0 of 4096 pixels "
                                             "with luminosity below 0.8"):
            estimate(white)
    with pytest.raises(ValueError, match="optical density >= 0.15"):
        stain.macenko_stain_matrix(white, od_threshold=0.15)
    with pytest.raises(ValueError, match="target image"):
        stain.StainNormalizer("macenko").fit(white)
    normalizer = stain.StainNormalizer.default("macenko")
    tissue = _mix(_concentrations((64, 64), 15), STAINS[0])
    with pytest.raises(ValueError, match=r"images \[1\] of the batch"):
        normalizer.transform(np.stack([tissue, white]))
    with pytest.raises(ValueError, match="no target"):
        stain.StainNormalizer().transform(tissue)


def test_a_single_colour_shows_no_second_stain():
    flat = np.full((64, 64, 3), 255, np.uint8)
    flat[:32] = _mix(np.array([0.8, 0.0]), STAINS[0])         # one colour: both rows alike
    with pytest.raises(ValueError, match="no eosin found in the target image"):
        stain.StainNormalizer("macenko").fit(flat)
    out = np.asarray(stain.StainNormalizer.default("macenko").transform(flat))
    assert (out[32:] == 255).all()                               # not NaN: glass stays glass


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="method"):
        stain.StainNormalizer("reinhard")
    with pytest.raises(ValueError, match="percentile"):
        stain.StainNormalizer(percentile=60)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        stain.StainNormalizer.default().transform(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        stain.macenko_stain_matrix(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="p99"):
        stain.StainProfile(np.eye(2, 3), np.array([1.0, 0.0]))


# ----------------------------------------------------------------------------- slides


@dataclasses.dataclass(frozen=True)
class _Level:
    size: tuple[int, int]
    downsample: float


class _MemorySlide:
    """The `Slide` interface over an in-memory pyramid, recording every read."""

    def __init__(self, rgb, downsamples=(1, 4, 16), path="memory.tiff"):
        self.path = pathlib.Path(path)
        self.pyramid = [rgb if d == 1 else cv2.resize(
            rgb, (rgb.shape[1] // d, rgb.shape[0] // d), interpolation=cv2.INTER_AREA)
            for d in downsamples]
        self.levels = tuple(_Level((p.shape[1], p.shape[0]), float(d))
                            for p, d in zip(self.pyramid, downsamples))
        self.dimensions = self.levels[0].size
        self.reads = []

    def read_region(self, location, level, size):
        self.reads.append(("region", location, level, size))
        d = self.levels[level].downsample
        x, y = round(location[0] / d), round(location[1] / d)
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        part = self.pyramid[level][y:y + size[1], x:x + size[0]]
        out[:part.shape[0], :part.shape[1]] = part
        return out

    def read_level(self, level, max_pixels=64_000_000):
        w, h = self.levels[level].size
        assert w * h <= max_pixels
        self.reads.append(("level", level))
        return self.pyramid[level]

    def best_level_for_downsample(self, downsample):
        fits = [i for i, lv in enumerate(self.levels) if lv.downsample <= downsample + 1e-9]
        return fits[-1] if fits else 0

    def level_for_pixel_budget(self, max_pixels):
        for i, lv in enumerate(self.levels):
            if lv.size[0] * lv.size[1] <= max_pixels:
                return i
        return len(self.levels) - 1


def _slide_with_tissue_in_one_corner(stains, seed=16):
    rgb = np.full((1024, 1024, 3), 245, np.uint8)
    rgb[:512, 512:] = _mix(_concentrations((512, 512), seed), stains)
    return _MemorySlide(rgb)


def test_slide_tiles_are_found_at_low_resolution_and_read_where_the_tissue_is():
    slide = _slide_with_tissue_in_one_corner(STAINS[2])
    regions = stain.sample_slide_tiles(slide, tile_size=128, samples=6, thumbnail_pixels=5000)
    assert regions.shape == (6, 128, 128, 3)
    assert slide.reads[0] == ("level", 2)                      # the 64 x 64 thumbnail
    region_reads = slide.reads[1:]
    assert len(region_reads) == 6 and all(r[0] == "region" for r in region_reads)
    assert all(r[2] == 0 and r[3] == (128, 128) for r in region_reads)
    assert all(512 <= r[1][0] < 1024 and r[1][1] < 512 for r in region_reads)
    assert all(r[1][0] % 128 == 0 and r[1][1] % 128 == 0 for r in region_reads)
    for region, read in zip(regions, region_reads):
        (x, y), _, (w, h) = read[1:]
        np.testing.assert_array_equal(region, slide.pyramid[0][y:y + h, x:x + w])

    slide.reads.clear()                                         # a pixel budget: centre crops
    cropped = stain.sample_slide_tiles(slide, tile_size=128, samples=6, thumbnail_pixels=5000,
                                       max_pixels=6 * 64 * 64)
    assert cropped.shape == (6, 64, 64, 3)
    np.testing.assert_array_equal(cropped, regions[:, 32:96, 32:96])
    coarse = stain.sample_slide_tiles(slide, tile_size=128, samples=6, thumbnail_pixels=5000,
                                      downsample=4)
    assert coarse.shape == (6, 32, 32, 3) and slide.reads[-1][2] == 1

    tiles = np.array([[0, 0], [512, 0], [640, 128]])
    regions = stain.sample_slide_tiles(slide, tiles=tiles, tile_size=256, samples=2, seed=3)
    assert regions.shape == (2, 256, 256, 3)
    assert ("level", 0) not in slide.reads


def test_slide_level_fit_estimates_the_slides_stains():
    slide = _slide_with_tissue_in_one_corner(STAINS[2])
    normalizer = stain.StainNormalizer("vahadane").fit(_mix(_concentrations((64, 64), 17),
                                                            STAINS[0]))
    normalizer.fit_source_slide(slide, tile_size=128, samples=8, thumbnail_pixels=5000)
    assert _angles(normalizer.source.stains, STAINS[2]).max() < 1.5
    tile = slide.read_region((512, 0), 0, (256, 256))
    out = np.asarray(normalizer.transform(tile))
    assert _angles(normalizer.estimate(out).stains, normalizer.target.stains).max() < 1.5
    target = stain.StainNormalizer("macenko").fit_slide(slide, tile_size=128, samples=8,
                                                        thumbnail_pixels=5000)
    assert _angles(target.target.stains, STAINS[2]).max() < 1.0


def test_slide_level_fit_on_a_written_pyramidal_tiff(tmp_path):
    """JPEG tiles and a glass film: looser than on exact mixtures. Vahadane's eosin leans
    3-4.5 degrees towards haematoxylin here, from the whole slide too (its sparsity prior
    assigns eosin pixels' traces of haematoxylin to eosin)."""
    design = make_synthetic_slide((2048, 2048), seed=1, stains=STAINS[3])
    path = write_synthetic_slide(tmp_path / "slide.tiff", design, annotations=False)
    with open_slide(path) as slide:
        whole = slide.read_region((0, 0), 0, slide.dimensions)  # small enough here
        for method, tolerance in (("macenko", 3.5), ("vahadane", 5.0)):
            normalizer = stain.StainNormalizer(method).fit_source_slide(slide, tile_size=512,
                                                                         samples=8)
            assert _angles(normalizer.source.stains, design.stains).max() < tolerance
            assert _angles(normalizer.source.stains, normalizer.estimate(whole).stains
                           ).max() < 3.0
            sampled = normalizer.estimate(stain.sample_slide_tiles(slide, tile_size=512,
                                                                   samples=8))
            np.testing.assert_array_equal(normalizer.source.p99, sampled.p99)


def test_a_slide_without_tissue_names_the_file():
    slide = _MemorySlide(np.full((512, 512, 3), 250, np.uint8), path="blank.svs")
    with pytest.raises(InputDataError, match="blank.svs: no tissue found"):
        stain.StainNormalizer.default("macenko").fit_source_slide(slide, tile_size=128)
    with pytest.raises(InputDataError, match="blank.svs: no tissue found"):
        stain.StainNormalizer("macenko").fit_slide(slide, tiles=np.array([[0, 0]]),
                                                   tile_size=128)
