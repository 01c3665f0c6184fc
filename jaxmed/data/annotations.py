"""Region annotations of whole slides as QuPath-style GeoJSON, and their rasterisation.

The format is what QuPath's "Export as GeoJSON" writes (docs/pathology.md):

    {"type": "FeatureCollection", "features": [
      {"type": "Feature",
       "geometry": {"type": "Polygon", "coordinates": [[[x, y], ..., [x, y]], [hole], ...]},
       "properties": {"objectType": "annotation",
                      "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
      ...]}

Coordinates are level-0 pixels, origin at the top-left corner of the slide, `x` to the right;
rings are closed (the last position repeats the first); the first ring of a polygon is its
outline, the others are holes. A `MultiPolygon` holds several such polygons.

Reading (`read_annotations`) accepts, besides a FeatureCollection, a bare list of features
(QuPath's export without "FEATURE_COLLECTION") and a single Feature. The rules it applies:

- Every polygon of a `MultiPolygon` becomes its own `Annotation` with the feature's class.
- Features of another geometry (points, lines: QuPath's counting and line annotations) and
  objects that are not annotations (`objectType` "detection", "cell", "tile") are skipped with
  one `UserWarning` that names the file and counts them; a file left without any polygon
  annotation is refused.
- A feature without a classification (QuPath's unclassified annotations) gets the class
  `UNCLASSIFIED`; `annotation_mask` then refuses it unless that name is among its classes, so an
  unlabelled region is never silently counted as a class.
- The class is `classification.name`, or the parts of a derived class
  (`classification.names`, e.g. `["Tumor", "Positive"]`) joined by ": " as QuPath shows them.
  The colour is read from `classification.color` (`[r, g, b]`) or from older QuPath's
  `classification.colorRGB` (a packed integer).
- Not JSON, no features, a ring with fewer than 3 distinct points, coordinates that are not
  pairs of finite numbers, or a classification without a name: `InputDataError` naming the file
  (and the feature).
"""

import dataclasses
import json
import os
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from jaxmed.errors import InputDataError

__all__ = ["Annotation", "UNCLASSIFIED", "annotation_mask", "class_color", "read_annotations",
           "write_annotations"]

UNCLASSIFIED = "unclassified"
_SHIFT = 8  # fixed-point bits of the vertex coordinates given to OpenCV (1/256 pixel)


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value
class Annotation:
    """One annotated region.

    **Fields:**

    - `polygon`: float64 `(n, 2)` outline vertices `(x, y)` in level-0 pixels, `n >= 3`, the
      ring not closed (the first vertex is not repeated).
    - `holes`: float64 `(m, 2)` rings, the same convention, for the parts of the outline that
      are not in the region.
    - `class_name`: the region's class.
    - `color`: `(r, g, b)` for viewers; `None` writes a colour derived from the class name.
    """

    polygon: np.ndarray
    holes: tuple[np.ndarray, ...] = ()
    class_name: str = UNCLASSIFIED
    color: tuple[int, int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "polygon", _ring(self.polygon, "polygon"))
        object.__setattr__(self, "holes", tuple(_ring(h, "hole") for h in self.holes))
        if not isinstance(self.class_name, str) or not self.class_name:
            raise ValueError(f"class_name must be a non-empty string, got {self.class_name!r}")
        if self.color is not None:
            object.__setattr__(self, "color", tuple(int(c) for c in self.color))


def _ring(points, what: str) -> np.ndarray:
    ring = np.array(points, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 3:
        raise ValueError(f"an annotation {what} must be (n >= 3, 2) points, got {ring.shape}")
    if not np.all(np.isfinite(ring)):
        raise ValueError(f"an annotation {what} has NaN or infinite coordinates")
    return ring


def class_color(class_name: str) -> tuple[int, int, int]:
    """A stable, mid-saturation colour for a class name (the same in every run)."""
    value = zlib.crc32(class_name.encode())
    hue = (value % 360) / 360.0
    rgb = np.clip(np.abs((hue * 6.0 + np.array([0.0, 4.0, 2.0])) % 6.0 - 3.0) - 1.0, 0.0, 1.0)
    return tuple(int(round(40 + 180 * c)) for c in rgb)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_annotations(path: str | os.PathLike, annotations: Iterable[Annotation]) -> Path:
    """Write annotations as a QuPath GeoJSON FeatureCollection, atomically.

    One `Polygon` feature per annotation, rings closed, coordinates as written (level-0 pixels).

    **Returns:** the path written.
    """
    path = Path(path)
    features = [_feature(a) for a in annotations]
    text = json.dumps({"type": "FeatureCollection", "features": features})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def _feature(annotation: Annotation) -> dict:
    rings = [annotation.polygon, *annotation.holes]
    color = annotation.color or class_color(annotation.class_name)
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_closed(r) for r in rings]},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": annotation.class_name, "color": list(color)},
        },
    }


def _closed(ring: np.ndarray) -> list[list[float]]:
    points = [[float(x), float(y)] for x, y in ring]
    return points + [points[0]]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_annotations(path: str | os.PathLike) -> list[Annotation]:
    """Read the polygon annotations of a QuPath GeoJSON file (the rules: this module's doc).

    **Returns:** the annotations in file order (a `MultiPolygon` gives one per polygon).

    **Raises:** `InputDataError` naming the file (and the feature) for a missing file, text that
    is not JSON, no features, no polygon annotation, or a malformed polygon or classification.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputDataError(f"{path}: not a GeoJSON file, the text is not JSON ({error})") \
            from error
    features = _features(document, path)
    annotations, skipped = [], {}
    for index, feature in enumerate(features):
        where = f"{path}: feature {index}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise InputDataError(f"{where} is not a GeoJSON Feature")
        properties = feature.get("properties") or {}
        geometry = feature.get("geometry") or {}
        kind = properties.get("objectType", "annotation")
        geometry_type = geometry.get("type") if isinstance(geometry, dict) else None
        if kind != "annotation" or geometry_type not in ("Polygon", "MultiPolygon"):
            label = _skipped_label(kind, geometry_type)
            skipped[label] = skipped.get(label, 0) + 1
            continue
        class_name, color = _classification(properties, where)
        polygons = geometry.get("coordinates")
        if geometry_type == "Polygon":
            polygons = [polygons]
        if not isinstance(polygons, list) or not polygons:
            raise InputDataError(f"{where}: a {geometry_type} without coordinates")
        for rings in polygons:
            annotations.append(_annotation(rings, class_name, color, where))
    if skipped:
        counts = ", ".join(f"{n} {label}" for label, n in sorted(skipped.items()))
        warnings.warn(f"{path}: skipped {counts}; only polygon annotations are read",
                      stacklevel=2)
    if not annotations:
        raise InputDataError(f"{path}: no polygon annotations among its {len(features)} features")
    return annotations


def _skipped_label(kind, geometry_type) -> str:
    if kind != "annotation":
        return f"{kind} objects"
    return f"{geometry_type} geometries" if geometry_type else "features without geometry"


def _features(document, path: Path) -> list:
    if isinstance(document, list):
        features = document
    elif isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features")
        if not isinstance(features, list):
            raise InputDataError(f"{path}: a FeatureCollection without a 'features' list")
    elif isinstance(document, dict) and document.get("type") == "Feature":
        features = [document]
    else:
        raise InputDataError(
            f"{path}: not QuPath GeoJSON; expected a FeatureCollection, a list of features or "
            f"a Feature"
        )
    if not features:
        raise InputDataError(f"{path}: no features")
    return features


def _classification(properties: dict, where: str) -> tuple[str, tuple[int, int, int] | None]:
    classification = properties.get("classification")
    if classification is None:
        return UNCLASSIFIED, None
    if not isinstance(classification, dict):
        raise InputDataError(f"{where}: the classification is not an object ({classification!r})")
    name, parts = classification.get("name"), classification.get("names")
    if name is None and isinstance(parts, list) and all(isinstance(p, str) for p in parts):
        name = ": ".join(parts)  # a derived class, e.g. ["Tumor", "Positive"]
    if not isinstance(name, str) or not name:
        raise InputDataError(f"{where}: a classification without a name ({classification!r})")
    color = classification.get("color")
    if isinstance(color, list) and len(color) == 3:
        return name, tuple(int(c) for c in color)
    packed = classification.get("colorRGB")
    if isinstance(packed, int):
        return name, ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
    return name, None


def _annotation(rings, class_name: str, color, where: str) -> Annotation:
    if not isinstance(rings, list) or not rings:
        raise InputDataError(f"{where}: a polygon without rings")
    arrays = [_read_ring(ring, where, "outline" if i == 0 else f"hole {i}")
              for i, ring in enumerate(rings)]
    return Annotation(arrays[0], tuple(arrays[1:]), class_name, color)


def _read_ring(ring, where: str, what: str) -> np.ndarray:
    try:
        points = np.array(
            [[float(p[0]), float(p[1])] for p in ring], dtype=np.float64
        ).reshape(-1, 2)
    except (TypeError, ValueError, IndexError, KeyError) as error:
        raise InputDataError(f"{where}: the {what} is not a list of [x, y] positions") \
            from error
    if not np.all(np.isfinite(points)):
        raise InputDataError(f"{where}: the {what} has NaN or infinite coordinates")
    if len(points) > 1 and np.array_equal(points[0], points[-1]):
        points = points[:-1]
    if len(np.unique(points, axis=0)) < 3:
        raise InputDataError(
            f"{where}: the {what} has {len(np.unique(points, axis=0))} distinct points; "
            f"a polygon needs at least 3"
        )
    return points


# ---------------------------------------------------------------------------------------------
# Rasterising
# ---------------------------------------------------------------------------------------------


def annotation_mask(
    annotations: Sequence[Annotation],
    shape: tuple[int, int],
    downsample: float = 1.0,
    class_names: Sequence[str] = (),
    *,
    origin: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Rasterise annotations onto a grid of a slide's level, as a label map.

    Grid pixel `(i, j)` covers level-0 pixels `origin + ([j, j + 1), [i, i + 1)) * downsample`;
    it belongs to an annotation when its centre lies inside the outline and outside every hole,
    by OpenCV's `fillPoly` rule (pixels that the outline passes through count as inside, so a
    region is at most one grid pixel wider than the exact centre test). Classes are drawn in the
    order of `class_names`, so where annotations overlap the later class wins (as QuPath's
    labelled-image export does); a hole clears only its own annotation.

    **Arguments:**

    - `annotations`: the regions, level-0 coordinates.
    - `shape`: `(height, width)` of the grid, in its own pixels.
    - `downsample`: level-0 pixels per grid pixel (a slide level's downsample).
    - `class_names`: the classes to draw; label `k + 1` is `class_names[k]`.
    - `origin`: level-0 `(x, y)` of the grid's top-left corner (a tile's location).

    **Returns:** int32 `(height, width)`: 0 where no annotation lies, else the class label.

    **Raises:** `ValueError` for an annotation whose class is not in `class_names` (a typo or an
    unclassified region is never dropped silently; filter the list to leave classes out).
    """
    height, width = (int(s) for s in shape)
    if height < 0 or width < 0 or downsample <= 0:
        raise ValueError(f"shape must be non-negative and downsample positive, got {shape}, "
                         f"{downsample}")
    labels = {name: k + 1 for k, name in enumerate(class_names)}
    unknown = sorted({a.class_name for a in annotations} - set(labels))
    if unknown:
        raise ValueError(f"annotations of classes {unknown} not in class_names "
                         f"{list(class_names)}")
    mask = np.zeros((height, width), np.int32)
    ordered = sorted(annotations, key=lambda a: labels[a.class_name])  # stable: file order kept
    for annotation in ordered:
        _draw(mask, annotation, labels[annotation.class_name], downsample, origin)
    return mask


def _draw(mask: np.ndarray, annotation: Annotation, label: int, downsample: float, origin):
    """Paint one annotation (outline minus holes) into `mask` with `label`, in place."""
    # Grid coordinates with pixel centres at integers, OpenCV's convention.
    outline = (annotation.polygon - origin) / downsample - 0.5
    low = np.maximum(np.floor(outline.min(axis=0)).astype(int) - 1, 0)
    high = np.minimum(np.ceil(outline.max(axis=0)).astype(int) + 2, mask.shape[::-1])
    if np.any(high <= low):
        return
    box = np.zeros((high[1] - low[1], high[0] - low[0]), np.uint8)
    cv2.fillPoly(box, [_fixed(outline - low)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    for hole in annotation.holes:
        hole = _fixed((hole - origin) / downsample - 0.5 - low)
        cv2.fillPoly(box, [hole], 0, lineType=cv2.LINE_8, shift=_SHIFT)
    window = mask[low[1]:high[1], low[0]:high[0]]
    window[box.astype(bool)] = label


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * (1 << _SHIFT)).astype(np.int32)
