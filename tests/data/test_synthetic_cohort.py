"""Synthetic cohorts: files, labels and manifest written atomically and resumed, annotations that
match the rendered foci, class evidence only at the finest scale (measured against a x0.5 area
mean), and a distractor drawn without the label."""

import hashlib
import json

import numpy as np
import pytest
import scipy.ndimage

from jaxmed.data import synthetic_cohort
from jaxmed.data.annotations import annotation_mask, read_annotations
from jaxmed.data.slide import open_slide
from jaxmed.data.synthetic_cohort import (
    CohortSlide,
    cohort_design,
    cohort_labels,
    read_labels,
    write_cohort,
)
from jaxmed.data.synthetic_slide import HE_STAINS, blob_region
from jaxmed.errors import InputDataError

SIZE, TILE = (1024, 1024), 128
SIZE_TILE = dict(size=SIZE, tile=TILE)
SMALL = dict(slides_per_class=2, **SIZE_TILE)
CLASSES = ("adenocarcinoma", "squamous", "normal")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cohort")
    return directory, write_cohort(directory, **SMALL)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _foci(design, label):
    return [o for o in design.overlays if o.class_name == label and o.annotated]


def _detail_energy(rgb):
    """log mean energy of the 2 x 2 Hadamard details of the mean optical density: (checker,
    row + column stripes) -- exactly what a 2 x 2 area mean discards."""
    density = -np.log((rgb.astype(float) + 1) / 256).mean(axis=-1)
    h, w = density.shape
    b = density[:h // 2 * 2, :w // 2 * 2].reshape(h // 2, 2, w // 2, 2)
    a, c, d, e = b[:, 0, :, 0], b[:, 0, :, 1], b[:, 1, :, 0], b[:, 1, :, 1]
    checker = ((a - c - d + e) / 4) ** 2
    stripes = ((a - c + d - e) / 4) ** 2 + ((a + c - d - e) / 4) ** 2
    return np.log([checker.mean(), stripes.mean()])


def _focus_window(focus, side):
    cx, cy = (int(v) // 2 * 2 for v in focus.outline.centre)
    return cx - side // 2, cy - side // 2


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_writes_slides_annotations_labels_and_manifest(cohort):
    directory, slides = cohort
    assert len(slides) == 6 and all(isinstance(s, CohortSlide) for s in slides)
    assert [s.path.name for s in slides] == [f"slide_{i:03d}.tiff" for i in range(6)]
    assert all(s.annotations == s.path.with_suffix(".geojson") for s in slides)
    labels = read_labels(directory / "labels.csv")
    assert labels == {s.path.name: s.label for s in slides}
    assert sorted(labels.values()) == sorted(CLASSES * 2)  # balanced
    assert labels != {f"slide_{i:03d}.tiff": CLASSES[i % 3] for i in range(6)}  # shuffled
    manifest = json.loads((directory / "cohort.json").read_text())
    assert manifest["slides_per_class"] == 2 and manifest["tile"] == TILE
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["cohort.json", "labels.csv"] + [f"slide_{i:03d}.{e}" for i in range(6)
                                         for e in ("tiff", "geojson")])
    for slide in slides:
        annotations = read_annotations(slide.annotations)  # never empty: normal regions
        names = {a.class_name for a in annotations}
        assert names <= {slide.label, "normal"} and "normal" in names
        assert names == ({"normal"} if slide.label == "normal" else {slide.label, "normal"})


def test_slides_open_in_openslide_and_our_reader_and_keep_the_fine_pattern(cohort):
    openslide = pytest.importorskip("openslide")
    directory, slides = cohort
    reference = openslide.OpenSlide(str(slides[0].path))
    try:
        assert reference.level_dimensions == ((1024, 1024), (512, 512))
        assert float(reference.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    finally:
        reference.close()
    # JPEG at quality 90 keeps the foci's 2-pixel pattern: its detail energy at a focus is
    # e^2 (measured e^2.5-e^4) above the same place rendered without the focus.
    for index, slide in enumerate(slides):
        if slide.label == "normal":
            continue
        design = cohort_design(slide.label, index, **SIZE_TILE)
        plain = cohort_design("normal", index, **SIZE_TILE)
        focus = _foci(design, slide.label)[0]
        x, y = _focus_window(focus, 40)
        with open_slide(slide.path) as reader:
            assert reader.mpp == pytest.approx((0.5, 0.5))
            read = reader.read_region((x, y), 0, (40, 40))
        expected = design.render(1, x, y, 40, 40).astype(float)
        assert np.abs(read - expected).mean() < 4.0
        pattern = 0 if slide.label == "adenocarcinoma" else 1
        gain = _detail_energy(read) - _detail_energy(plain.render(1, x, y, 40, 40))
        assert gain[pattern] > 2.0, (slide.label, gain)



def test_deterministic_and_complete_slides_are_kept(cohort, tmp_path):
    directory, slides = cohort
    before = {p.name: (p.stat().st_mtime_ns, _digest(p)) for p in directory.iterdir()}
    again = write_cohort(directory, **SMALL)
    assert again == slides
    after = {p.name: (p.stat().st_mtime_ns, _digest(p)) for p in directory.iterdir()}
    assert {n: v for n, v in after.items() if n != "labels.csv"} \
        == {n: v for n, v in before.items() if n != "labels.csv"}
    # Another folder, the same seed, two processes: the same bytes.
    other = write_cohort(tmp_path / "other", workers=2, **SMALL)
    assert [s.label for s in other] == [s.label for s in slides] == cohort_labels(CLASSES, 2, 0)
    assert [_digest(s.path) for s in other] == [_digest(s.path) for s in slides]
    assert [_digest(s.annotations) for s in other] == [_digest(s.annotations) for s in slides]
    first = cohort_design(other[0].label, 0, **SIZE_TILE)
    np.testing.assert_array_equal(first.render(4, 0, 0, 256, 256),
                                  cohort_design(other[0].label, 0, **SIZE_TILE).render(
                                      4, 0, 0, 256, 256))
    seeded = cohort_design(other[0].label, 0, seed=1, **SIZE_TILE)
    assert np.abs(seeded.render(4, 0, 0, 256, 256).astype(int)
                  - first.render(4, 0, 0, 256, 256)).mean() > 5


def test_a_killed_run_resumes_and_leaves_no_half_files(tmp_path, monkeypatch):
    written = []
    real = synthetic_cohort.write_synthetic_slide

    def killed_after_two(path, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(synthetic_cohort, "write_synthetic_slide", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        write_cohort(tmp_path, slides_per_class=1, size=SIZE, tile=TILE)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cohort.json", "slide_000.geojson", "slide_000.tiff", "slide_001.geojson",
                     "slide_001.tiff"]  # no labels.csv, no temporary file
    digests = [_digest(tmp_path / n) for n in names[1:]]
    monkeypatch.setattr(synthetic_cohort, "write_synthetic_slide", real)
    slides = write_cohort(tmp_path, slides_per_class=1, size=SIZE, tile=TILE)
    assert [_digest(tmp_path / n) for n in names[1:]] == digests  # kept, not rewritten
    assert len(read_labels(tmp_path / "labels.csv")) == 3 and slides[2].annotations.is_file()


def test_other_options_and_foreign_folders_are_refused(cohort, tmp_path):
    directory, _ = cohort
    for option, value in [("seed", 1), ("slides_per_class", 3), ("quality", 95),
                          ("distractor_probability", 0.2)]:
        arguments = dict(SMALL, **{option: value})
        with pytest.raises(InputDataError, match=f"{option}="):
            write_cohort(directory, **arguments)
    (tmp_path / "mine.tiff").write_bytes(b"")
    with pytest.raises(InputDataError, match="cohort.json"):
        write_cohort(tmp_path, **SMALL)
    with pytest.raises(ValueError, match="class_names"):
        write_cohort(tmp_path / "bad", class_names=("tumour",), **SIZE_TILE)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("text, message", [
    ("slide,grade\na.tiff,1\n", "no 'label' column"),
    ("name,label\na.tiff,normal\n", "no 'slide' column"),
    ("slide,label\na.tiff,normal\nb.tiff,\n", "row 3: slide b.tiff has an empty label"),
    ("slide,label\na.tiff,normal\n,squamous\n", "row 3: empty slide name"),
    ("slide,label\na.tiff,normal\na.tiff,squamous\n", "row 3: slide a.tiff is listed twice"),
    ("", "no 'slide' column"),
])
def test_bad_labels_files_name_the_file_and_row(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(InputDataError, match=message) as error:
        read_labels(path)
    assert str(path) in str(error.value)
    with pytest.raises(InputDataError, match="no such file"):
        read_labels(tmp_path / "missing.csv")
    path.write_text("slide,label,extra\n a.tiff , normal ,x\n")
    assert read_labels(path) == {"a.tiff": "normal"}


# ---------------------------------------------------------------------------------------------
# Designs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", CLASSES)
def test_annotations_match_the_rendered_foci(label):
    for index in range(3):
        design = cohort_design(label, index, **SIZE_TILE)
        foci = _foci(design, label) if label != "normal" else []
        assert (3 <= len(foci) <= 6) == (label != "normal")
        annotations = design.annotations()
        assert {a.class_name for a in annotations} <= {label, "normal"}
        labels = design.class_map(4, 0, 0, 256, 256)
        mask = annotation_mask(annotations, (256, 256), 4, design.class_names)
        annotated = labels.copy()
        annotated[mask == 0] = 0  # unannotated tissue is "normal" in the class map
        differ = annotated != mask
        boundary = scipy.ndimage.morphological_gradient(labels, size=3) > 0
        boundary |= scipy.ndimage.morphological_gradient(mask, size=3) > 0
        assert np.all(boundary[differ])
        k = design.class_names.index(label) + 1
        if label != "normal":
            assert (mask == k).sum() > 0 and np.all(labels[scipy.ndimage.binary_erosion(
                mask == k)] == k)
            for focus in foci:  # inside the tissue, off the distractor
                x, y = (int(v) for v in focus.outline.centre)
                assert design.class_map(1, x, y, 1, 1)[0, 0] == k


def test_foci_show_only_at_the_finest_scale():
    """Windows inside foci (normal: the same places without foci), eight slides per class. The
    detail energy of level 0 separates every pair of classes by many within-class deviations
    (measured 9.6-11.2); the same statistic after a x0.5 area mean by 0.2-0.7, the mean colour
    by 0.5-1.9 (the slides' own stains: paired with the same place without the focus, the
    colour differs by under 0.25 grey levels, `test_a_focus_is_plain_tissue_...`)."""
    data = {}
    for c, label in enumerate(CLASSES):
        fine, coarse, colour = [], [], []
        for index in range(8 * c, 8 * c + 8):
            design = cohort_design(label, index, **SIZE_TILE)
            places = cohort_design("adenocarcinoma", index, **SIZE_TILE)
            for focus in _foci(places, "adenocarcinoma"):
                x, y = _focus_window(focus, 40)
                rgb = design.render(1, x, y, 40, 40)
                low = rgb.reshape(20, 2, 20, 2, 3).mean(axis=(1, 3))
                fine.append(_detail_energy(rgb))
                coarse.append(_detail_energy(low))
                colour.append(low.mean(axis=(0, 1)))
        data[label] = [np.array(v) for v in (fine, coarse, colour)]

    def separation(a, b):
        return np.max(np.abs(a.mean(0) - b.mean(0)) / np.sqrt(0.5 * (a.var(0) + b.var(0))))

    for i, a in enumerate(CLASSES):
        for b in CLASSES[i + 1:]:
            fine, coarse, colour = (separation(data[a][k], data[b][k]) for k in range(3))
            print(a, b, round(fine, 2), round(coarse, 2), round(colour, 2))
            assert fine > 8.0 and coarse < 0.15 * fine and colour < 0.3 * fine


def test_a_focus_is_plain_tissue_after_a_2x2_area_mean():
    for label in ("adenocarcinoma", "squamous"):
        design = cohort_design(label, 1, stain_variation=0.0, **SIZE_TILE)
        plain = cohort_design("normal", 1, stain_variation=0.0, **SIZE_TILE)
        x, y = _focus_window(_foci(design, label)[0], 48)
        rgb, base = (d.render(1, x, y, 48, 48).astype(float) for d in (design, plain))
        assert np.abs(rgb - base).mean() > 1.0 and np.abs(rgb - base).max() > 20
        low, base_low = (v.reshape(24, 2, 24, 2, 3).mean(axis=(1, 3)) for v in (rgb, base))
        assert np.abs(low - base_low).mean() < 0.5
        assert np.abs((low - base_low).mean(axis=(0, 1))).max() < 0.3
        # Every pyramid level draws the focus as the plain tissue.
        np.testing.assert_allclose(design.concentrations(2, x // 2, y // 2, 24, 24),
                                   plain.concentrations(2, x // 2, y // 2, 24, 24), atol=1e-5)


def test_the_distractor_is_drawn_without_the_label():
    labels = cohort_labels(CLASSES, 30, seed=0)
    present = {c: [] for c in CLASSES}
    for index, label in enumerate(labels):
        has = [any(o.texture_name == "dense-stroma" for o in cohort_design(c, index,
                                                                            **SIZE_TILE).overlays)
               for c in CLASSES]
        assert len(set(has)) == 1  # the same for any class of this index
        present[label].append(has[0])
    rates = {c: np.mean(v) for c, v in present.items()}
    assert all(0.2 < r < 0.8 for r in rates.values()), rates  # 30 slides each, p = 0.5
    assert not any(o.texture_name == "dense-stroma" for o in cohort_design(
        "squamous", 0, distractor_probability=0.0, **SIZE_TILE).overlays)
    design = cohort_design("squamous", 0, distractor_probability=1.0, **SIZE_TILE)
    distractor = design.overlays[0]
    assert distractor.texture_name == "dense-stroma" and not distractor.annotated
    # An overlay never adds tissue: where it covers glass, glass stays.
    labels = design.class_map(8, 0, 0, 128, 128)
    X = (np.arange(128) + 0.5) * 8
    glass = scipy.ndimage.binary_erosion(labels == 0, iterations=2)  # off the edge ramps
    over_glass = (distractor.coverage(X, X, 8) == 1.0) & glass
    assert over_glass.sum() > 20
    assert design.render(8, 0, 0, 128, 128)[over_glass].min() > 235
    with pytest.raises(ValueError, match="texture"):
        blob_region("normal", (10, 10), 5, rng=np.random.default_rng(0), texture="fold")
    # Visible at low resolution: much pinker than the tissue around it.
    x, y = (int(v) // 8 for v in distractor.outline.centre)
    rgb = design.render(8, x - 4, y - 4, 8, 8).astype(float).mean(axis=(0, 1))
    tissue = design.render(8, 0, 0, 128, 128)[design.class_map(8, 0, 0, 128, 128) > 0]
    assert rgb[1] < tissue[:, 1].astype(float).mean() - 15


def test_stains_vary_per_slide_and_class_subsets_work():
    angles = []
    for index in range(8):
        design = cohort_design("normal", index, **SIZE_TILE)
        cosine = np.sum(design.stains * HE_STAINS, axis=1)
        angles.append(np.degrees(np.arccos(np.minimum(cosine, 1.0))))
        assert all(0.7 < f < 1.4 for f in design.intensity)
    assert 1.0 < np.mean(angles) < 10.0
    fixed = cohort_design("normal", 0, stain_variation=0.0, **SIZE_TILE)
    np.testing.assert_allclose(fixed.stains, HE_STAINS)
    assert fixed.intensity == (1.0, 1.0)

    two = ("adenocarcinoma", "squamous")
    design = cohort_design("squamous", 2, class_names=two, **SIZE_TILE)
    assert design.class_names == two + ("normal",)
    assert {a.class_name for a in design.annotations()} == {"squamous"}
    assert sorted(cohort_labels(two, 3, 0)) == ["adenocarcinoma"] * 3 + ["squamous"] * 3
    with pytest.raises(ValueError, match="label"):
        cohort_design("normal", 0, class_names=two)
    with pytest.raises(ValueError, match="class_names"):
        cohort_design("normal", 0, class_names=("normal", "normal"))
