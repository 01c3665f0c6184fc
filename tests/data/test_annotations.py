"""QuPath GeoJSON annotations: round trip, a hand-written QuPath-like file, the other shapes QuPath
exports (bare list, single Feature), the documented skips and refusals, and rasterisation."""

import json

import numpy as np
import pytest
import scipy.ndimage

from jaxmed.data.annotations import (
    UNCLASSIFIED,
    Annotation,
    annotation_mask,
    read_annotations,
    write_annotations,
)
from jaxmed.errors import InputDataError

SQUARE = [[10, 10], [50, 10], [50, 50], [10, 50]]

# What QuPath 0.4's File > Export objects as GeoJSON writes (FeatureCollection), written by hand
# from the format: an annotation with a hole, a MultiPolygon, an unclassified annotation, a
# point annotation (counting), a derived class, a feature without geometry, a detected cell,
# and an older "colorRGB" colour.
QUPATH_SAMPLE = """
{"type": "FeatureCollection", "features": [
  {"type": "Feature", "id": "8d1f0c1e-1",
   "geometry": {"type": "Polygon", "coordinates": [
      [[100.0, 100.0], [400.0, 100.0], [400.0, 300.0], [100.0, 300.0], [100.0, 100.0]],
      [[200.0, 150.0], [250.0, 150.0], [250.0, 200.0], [200.0, 150.0]]]},
   "properties": {"objectType": "annotation", "isLocked": false,
                  "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
  {"type": "Feature", "id": "8d1f0c1e-2",
   "geometry": {"type": "MultiPolygon", "coordinates": [
      [[[0, 0], [20, 0], [20, 20], [0, 20], [0, 0]]],
      [[[30, 30], [40, 30], [35, 40], [30, 30]]]]},
   "properties": {"objectType": "annotation",
                  "classification": {"name": "Stroma", "colorRGB": -6895466}}},
  {"type": "Feature", "id": "8d1f0c1e-3",
   "geometry": {"type": "Polygon", "coordinates": [[[5, 5], [9, 5], [9, 9], [5, 5]]]},
   "properties": {"objectType": "annotation"}},
  {"type": "Feature", "id": "8d1f0c1e-4",
   "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
   "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
  {"type": "Feature", "id": "8d1f0c1e-6",
   "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
   "properties": {"objectType": "annotation",
                  "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}}},
  {"type": "Feature", "id": "8d1f0c1e-7", "geometry": null,
   "properties": {"objectType": "annotation"}},
  {"type": "Feature", "id": "8d1f0c1e-5",
   "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2], [1, 1]]]},
   "properties": {"objectType": "cell", "classification": {"name": "Tumor"}}}
]}
"""


def _write(tmp_path, text, name="a.geojson"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_round_trip_keeps_polygons_holes_classes_and_colours(tmp_path):
    rng = np.random.default_rng(0)
    outline = rng.uniform(0, 1e5, (40, 2))
    hole = rng.uniform(0, 1e5, (5, 2))
    written = [
        Annotation(outline, (hole,), "adenocarcinoma", (10, 20, 30)),
        Annotation(np.array(SQUARE, float), (), "normal"),
    ]
    path = write_annotations(tmp_path / "sub" / "slide.geojson", written)
    document = json.loads(path.read_text())
    assert document["type"] == "FeatureCollection"
    feature = document["features"][0]
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"] == {"name": "adenocarcinoma",
                                                        "color": [10, 20, 30]}
    rings = feature["geometry"]["coordinates"]
    assert len(rings) == 2 and all(r[0] == r[-1] for r in rings)  # closed rings
    read = read_annotations(path)
    assert len(read) == 2
    for a, b in zip(written, read, strict=True):
        np.testing.assert_array_equal(a.polygon, b.polygon)  # JSON floats round-trip exactly
        assert len(a.holes) == len(b.holes)
        for ha, hb in zip(a.holes, b.holes, strict=True):
            np.testing.assert_array_equal(ha, hb)
        assert a.class_name == b.class_name
    assert read[0].color == (10, 20, 30)
    assert len(read[1].color) == 3  # a colour derived from the name was written
    assert not list(tmp_path.glob("sub/.*partial"))


def test_reads_a_qupath_feature_collection(tmp_path):
    path = _write(tmp_path, QUPATH_SAMPLE)
    with pytest.warns(UserWarning, match=r"a\.geojson: skipped 1 MultiPoint geometries, 1 cell "
                      r"objects, 1 features without geometry"):
        annotations = read_annotations(path)
    assert [a.class_name for a in annotations] == ["Tumor", "Stroma", "Stroma", UNCLASSIFIED,
                                                   "Tumor: Positive"]
    tumour = annotations[0]
    np.testing.assert_array_equal(tumour.polygon, [[100, 100], [400, 100], [400, 300], [100, 300]])
    assert len(tumour.holes) == 1 and tumour.holes[0].shape == (3, 2)
    assert tumour.color == (200, 0, 0)
    # colorRGB is a packed signed ARGB integer: -6895466 = 0xFF96C896.
    assert annotations[1].color == (0x96, 0xC8, 0x96)
    np.testing.assert_array_equal(annotations[2].polygon, [[30, 30], [40, 30], [35, 40]])
    assert annotations[3].color is None


def test_reads_a_bare_list_and_a_single_feature(tmp_path):
    feature = {"type": "Feature",
               "geometry": {"type": "Polygon", "coordinates": [SQUARE + [SQUARE[0]]]},
               "properties": {"classification": {"name": "Tumor"}}}
    listed = read_annotations(_write(tmp_path, json.dumps([feature, feature]), "list.json"))
    single = read_annotations(_write(tmp_path, json.dumps(feature), "one.json"))
    assert len(listed) == 2 and len(single) == 1
    np.testing.assert_array_equal(single[0].polygon, SQUARE)
    # An unclosed ring is accepted as the same polygon.
    feature["geometry"]["coordinates"] = [SQUARE]
    np.testing.assert_array_equal(
        read_annotations(_write(tmp_path, json.dumps(feature), "open.json"))[0].polygon, SQUARE)


def _feature(coordinates, properties=None, kind="Polygon"):
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coordinates},
            "properties": {"objectType": "annotation",
                           "classification": {"name": "Tumor"}} if properties is None
            else properties}


@pytest.mark.parametrize("text, message", [
    ("{not json", "not JSON"),
    ('{"type": "FeatureCollection", "features": []}', "no features"),
    ("[]", "no features"),
    ('{"type": "Topology"}', "not QuPath GeoJSON"),
    (json.dumps([_feature([[[0, 0], [1, 1], [0, 0]]])]), "feature 0: the outline has 2 distinct"),
    (json.dumps([_feature([SQUARE, [[0, 0], [1, 0]]])]), "feature 0: the hole 1 has 2 distinct"),
    (json.dumps([_feature([[["a", 0], [1, 1], [2, 0]]])]), "not a list of \\[x, y\\]"),
    (json.dumps([_feature([SQUARE], {"classification": {"color": [1, 2, 3]}})]),
     "classification without a name"),
    (json.dumps([_feature([SQUARE], {"classification": "Tumor"})]), "not an object"),
    (json.dumps([_feature([SQUARE]), {"type": "Polygon"}]), "feature 1 is not a GeoJSON Feature"),
])
def test_refuses_bad_files_naming_the_file(tmp_path, text, message):
    path = _write(tmp_path, text, "bad.geojson")
    with pytest.raises(InputDataError, match=message) as error:
        read_annotations(path)
    assert str(path) in str(error.value)


def test_refuses_a_file_with_no_polygon_annotation(tmp_path):
    text = json.dumps([_feature([1, 2], kind="Point")])
    with pytest.warns(UserWarning, match="skipped 1 Point"):
        with pytest.raises(InputDataError, match="no polygon annotations"):
            read_annotations(_write(tmp_path, text))
    with pytest.raises(InputDataError, match="no such file"):
        read_annotations(tmp_path / "missing.geojson")


def test_annotation_checks_its_rings():
    with pytest.raises(ValueError, match="n >= 3"):
        Annotation(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        Annotation(np.array([[0, 0], [1, np.nan], [1, 1]]))
    with pytest.raises(ValueError, match="class_name"):
        Annotation(np.array(SQUARE), (), "")


# ---------------------------------------------------------------------------------------------
# Rasterisation
# ---------------------------------------------------------------------------------------------


def _centre_inside(polygon, shape, downsample, origin=(0, 0)):
    """Reference: grid pixels whose level-0 centre lies inside an axis-aligned rectangle."""
    (x0, y0), (x1, y1) = np.min(polygon, 0), np.max(polygon, 0)
    ys = origin[1] + (np.arange(shape[0]) + 0.5) * downsample
    xs = origin[0] + (np.arange(shape[1]) + 0.5) * downsample
    return ((ys[:, None] > y0) & (ys[:, None] < y1)) & ((xs[None, :] > x0) & (xs[None, :] < x1))


def test_mask_of_a_rectangle_is_the_centre_test_up_to_the_outline():
    rectangle = np.array([[10.3, 20.6], [70.2, 20.6], [70.2, 55.4], [10.3, 55.4]])
    for downsample, origin in [(1, (0, 0)), (4, (0, 0)), (2.5, (6, 12)), (1, (30, 30))]:
        shape = (70, 80)
        mask = annotation_mask([Annotation(rectangle, (), "a")], shape, downsample, ["a"],
                               origin=origin)
        exact = _centre_inside(rectangle, shape, downsample, origin)
        assert mask.dtype == np.int32 and set(np.unique(mask)) <= {0, 1}
        assert np.all(mask[exact] == 1)  # every pixel whose centre is inside
        # ... and at most one grid pixel more (OpenCV counts the pixels the outline crosses).
        grown = scipy.ndimage.binary_dilation(exact, np.ones((3, 3), bool))
        assert np.all(grown[mask == 1])
        assert (mask == 1).sum() < exact.sum() + 2 * (exact.shape[0] + exact.shape[1])


def test_mask_clears_holes_and_draws_classes_in_order():
    outer = np.array([[0, 0], [100, 0], [100, 100], [0, 100]], float)
    hole = np.array([[40, 40], [60, 40], [60, 60], [40, 60]], float)
    inner = np.array([[45, 45], [55, 45], [55, 55], [45, 55]], float)  # inside the hole
    over = np.array([[80, 80], [120, 80], [120, 120], [80, 120]], float)
    annotations = [Annotation(outer, (hole,), "tumour"), Annotation(inner, (), "stroma"),
                   Annotation(over, (), "stroma")]
    mask = annotation_mask(annotations, (120, 120), 1, ["tumour", "stroma"])
    assert mask[10, 10] == 1
    assert mask[42, 42] == 0  # the hole
    assert mask[50, 50] == 2  # another annotation inside the hole is kept
    assert mask[90, 90] == 2  # the later class wins where they overlap
    assert mask[110, 110] == 2 and mask[110, 10] == 0
    # With the class order reversed, tumour is drawn last and wins the overlap.
    assert annotation_mask(annotations, (120, 120), 1, ["stroma", "tumour"])[90, 90] == 2
    assert annotation_mask(annotations, (120, 120), 1, ["stroma", "tumour"])[50, 50] == 1


def test_mask_refuses_classes_it_was_not_given_and_handles_far_coordinates():
    square = Annotation(np.array(SQUARE, float), (), "tumour")
    with pytest.raises(ValueError, match="tumour"):
        annotation_mask([square], (8, 8), 1, ["stroma"])
    # A slide-sized polygon seen through a small window far from the origin.
    big = Annotation(np.array([[0, 0], [1e5, 0], [1e5, 1e5], [0, 1e5]]), (), "tumour")
    window = annotation_mask([big], (16, 16), 1, ["tumour"], origin=(99_990, 50_000))
    assert np.all(window[:, :10] == 1) and np.all(window[:, 11:] == 0)
    assert annotation_mask([square], (0, 5), 1, ["tumour"]).shape == (0, 5)
