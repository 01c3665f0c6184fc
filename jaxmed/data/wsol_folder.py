"""Weakly-supervised localisation data (docs/wsol.md): the dataset container and the folder
format.

Folder layout (read by `load_wsol_folder`, written by `write_wsol_folder`):

    root/
      <class name>/<image>.png|jpg|tif|bmp   one sub-folder per class, images directly inside
      boxes.csv                              optional ground-truth boxes

Class names are the sorted sub-folder names (hidden folders skipped) and the label of an image
is the index of its folder in that order. `boxes.csv` has the header `image,x0,y0,x1,y1`; `image`
is the path relative to `root` with `/` separators (e.g. `classA/img001.png`); an image with
several objects has several rows.

Box convention: inclusive pixel indices in the image as stored, `x` = column, `y` = row, so
`x1` is the last column of the object and a one-pixel box has `x0 == x1`; values must be whole
numbers (`12` or `12.0`) inside the image. Pixel `i` covers `[i, i + 1)`; when an image is
resized by `s = new / old` the box covers `[x0 * s, (x1 + 1) * s)` and keeps the new pixels whose
centres fall inside it (the pixel-centre alignment of Pillow's resize), at least one pixel. At
`s = 1` a box is unchanged.

Images that have no row in a given `boxes.csv` are allowed (their box array is empty, shape
`(0, 4)`): box files often cover only the evaluation images. Localisation metrics skip them.
A box file with only its header is valid and gives no boxes; without a box file the dataset's
`boxes` is `None`.

Boxes are for evaluation only; training uses `images` and `labels`. Every problem with the
user's files raises `jaxmed.errors.InputDataError` naming the file (and the CSV line). Loading
reads only the images' headers (their sizes place the boxes); the pixels are decoded and resized
when an image is indexed (`jaxmed.data.images.ImageFiles`), so each training host decodes only
the images it uses.
"""

import csv
import dataclasses
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from jaxmed.data.images import ImageFiles, list_images, read_image_size, write_image
from jaxmed.errors import InputDataError

BOXES_CSV = "boxes.csv"
BOX_COLUMNS = ("image", "x0", "y0", "x1", "y1")


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value
class WsolDataset:
    """Images with image-level labels and hidden ground-truth boxes.

    **Fields:**

    - `images`: uint8 `(N, S, S, 3)`: an array, or `ImageFiles` that read each image when it is
      indexed (folders); `images[indices]` and `np.asarray(images)` work for both.
    - `labels`: int32 `(N,)`, indices into `class_names`.
    - `boxes`: `N` int32 arrays `(k, 4)` of `[x0, y0, x1, y1]`, inclusive pixel indices
      (`k = 0` when an image has no box), or `None` when the dataset has no box file at all.
      For evaluation only.
    - `class_names`: the class names, index = label.
    - `masks`: bool `(N, S, S)` ground-truth object masks (synthetic data only, else `None`).
    - `parts`: bool `(N, S, S)` the small class-specific parts (synthetic only).
    - `distractors`: bool `(N, S, S)` the co-occurring distractor objects (synthetic only).
    - `paths`: `N` image paths relative to the dataset folder (`class/name.png`), or `None`.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: list[np.ndarray] | None
    class_names: list[str]
    masks: np.ndarray | None = None
    parts: np.ndarray | None = None
    distractors: np.ndarray | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "WsolDataset":
        """The images at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.intp)

        def take(array):
            return None if array is None else array[indices]

        return WsolDataset(
            images=self.images[indices],
            labels=self.labels[indices],
            boxes=None if self.boxes is None else [self.boxes[i] for i in indices],
            class_names=list(self.class_names),
            masks=take(self.masks),
            parts=take(self.parts),
            distractors=take(self.distractors),
            paths=None if self.paths is None else [self.paths[i] for i in indices],
        )


# ---------------------------------------------------------------------------- reading


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputDataError(f"{root}: no such folder (the dataset root)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputDataError(
            f"{root}: no class sub-folders (expected one folder of images per class)")
    return folders


def scale_boxes(boxes: np.ndarray, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
    """Inclusive pixel boxes `(k, 4)` of an `old_hw` image mapped onto the same image resized to
    `new_hw` (pixel-centre convention, see the module docstring)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale_x, scale_y = new_hw[1] / old_hw[1], new_hw[0] / old_hw[0]
    scale = np.array([scale_x, scale_y])
    # Covered interval [start, stop) in new pixel units; keep pixels j with start <= j + 0.5 < stop.
    first = np.ceil(boxes[:, :2] * scale - 0.5)
    last = np.ceil((boxes[:, 2:] + 1) * scale - 0.5) - 1
    # A box thinner than a new pixel keeps the pixel holding its centre.
    centre = np.floor((boxes[:, :2] + boxes[:, 2:] + 1) / 2 * scale)
    empty = last < first
    first = np.where(empty, centre, first)
    last = np.where(empty, centre, last)
    limit = np.array([new_hw[1] - 1, new_hw[0] - 1])
    first, last = np.clip(first, 0, limit), np.clip(last, 0, limit)
    return np.concatenate([first, last], axis=1).astype(np.int32)


def _box_value(csv_path: Path, line: int, column: str, text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise InputDataError(
            f"{csv_path}, line {line}: {column} = {text!r} is not a number") from None
    if not math.isfinite(value) or value != round(value):
        raise InputDataError(
            f"{csv_path}, line {line}: {column} = {text!r} must be a whole pixel index"
        )
    return int(value)


def _box_row(csv_path: Path, line: int, row: list[str], sizes: dict[str, tuple[int, int]]):
    if len(row) != len(BOX_COLUMNS):
        raise InputDataError(
            f"{csv_path}, line {line}: expected {len(BOX_COLUMNS)} fields "
            f"({','.join(BOX_COLUMNS)}), got {len(row)}"
        )
    name = PurePosixPath(row[0].strip().replace("\\", "/")).as_posix()
    if name not in sizes:
        raise InputDataError(
            f"{csv_path}, line {line}: image {row[0]!r} is not an image of the dataset "
            f"(expected a path relative to the dataset root, e.g. 'class/image.png')"
        )
    x0, y0, x1, y1 = (_box_value(csv_path, line, c, t.strip())
                      for c, t in zip(BOX_COLUMNS[1:], row[1:]))
    if x1 < x0 or y1 < y0:
        raise InputDataError(f"{csv_path}, line {line}: empty box (need x0 <= x1 and y0 <= y1)")
    height, width = sizes[name]
    if x0 < 0 or y0 < 0 or x1 >= width or y1 >= height:
        raise InputDataError(
            f"{csv_path}, line {line}: box ({x0}, {y0}, {x1}, {y1}) lies outside the "
            f"{width}x{height} image {name}"
        )
    return name, (x0, y0, x1, y1)


def read_boxes(csv_path: str | os.PathLike,
               sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Read a box file; `sizes` maps each dataset image path to its `(height, width)`.

    **Returns:** image path → int32 `(k, 4)` boxes in stored-image pixels, for the images that
    have rows.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputDataError(f"{csv_path}: no such box file")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputDataError(f"{csv_path}: cannot read the box file ({error})") from error
    rows = list(csv.reader(io.StringIO(text)))
    header = [field.strip() for field in rows[0]] if rows else []
    if header != list(BOX_COLUMNS):
        raise InputDataError(f"{csv_path}, line 1: the header must be {','.join(BOX_COLUMNS)}")
    boxes: dict[str, list] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(field.strip() for field in row):
            continue  # blank line
        name, box = _box_row(csv_path, line, row, sizes)
        boxes.setdefault(name, []).append(box)
    return {name: np.array(rows, dtype=np.int32) for name, rows in boxes.items()}


def load_wsol_folder(
    root: str | os.PathLike, *, image_size: int, boxes_csv: str | os.PathLike | None = None
) -> WsolDataset:
    """Load a folder of class sub-folders (layout in the module docstring).

    **Arguments:**

    - `root`: the dataset folder.
    - `image_size`: every image is resized to `image_size x image_size` (bilinear, Pillow)
      when it is read; boxes are mapped onto the resized images.
    - `boxes_csv`: the box file; `None` uses `root/boxes.csv` when it exists, otherwise the
      dataset has `boxes = None`.

    **Returns:** a `WsolDataset` ordered by class, then file name, whose `images` are
    `ImageFiles` (decoded when indexed); `paths` set, no masks.

    **Raises:** `InputDataError` naming the folder or file: missing root, no class sub-folder, a
    class folder without images, an image whose header cannot be read (damage further in shows
    when the image is read), a malformed box file or row (with its line).
    """
    root = Path(root)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    folders = _class_folders(root)
    paths, labels, files, sizes = [], [], [], {}
    for label, folder in enumerate(folders):
        found = list_images(folder)
        if not found:
            raise InputDataError(f"{folder}: the class folder holds no images")
        for file in found:
            name = f"{folder.name}/{file.name}"
            sizes[name] = read_image_size(file)  # (h, w) of the stored image
            paths.append(name)
            labels.append(label)
            files.append(file)
    if boxes_csv is None and (root / BOXES_CSV).is_file():
        boxes_csv = root / BOXES_CSV
    boxes = None
    if boxes_csv is not None:
        stored, new_hw = read_boxes(boxes_csv, sizes), (image_size, image_size)
        boxes = [
            scale_boxes(stored[name], sizes[name], new_hw) if name in stored
            else np.zeros((0, 4), np.int32)
            for name in paths
        ]
    return WsolDataset(
        images=ImageFiles(files, image_size),
        labels=np.array(labels, dtype=np.int32),
        boxes=boxes,
        class_names=[folder.name for folder in folders],
        paths=paths,
    )


# ---------------------------------------------------------------------------- writing


def _default_paths(dataset: WsolDataset) -> list[str]:
    return [f"{dataset.class_names[label]}/{i:05d}.png" for i, label in enumerate(dataset.labels)]


def _write_boxes(path: Path, paths: list[str], boxes: list[np.ndarray]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(BOX_COLUMNS)
    for name, image_boxes in zip(paths, boxes):
        writer.writerows([name, *map(int, box)] for box in image_boxes)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text.getvalue())
    os.replace(temporary, path)


def write_wsol_folder(dataset: WsolDataset, root: str | os.PathLike) -> Path:
    """Write `dataset` in the folder layout that `load_wsol_folder` reads.

    Images go to `root/<class>/<name>.png` (`dataset.paths` when set, else `<index>.png` with a
    5-digit index); boxes, unless `dataset.boxes` is `None`, to `root/boxes.csv`, written last
    so that its presence marks a complete folder. Masks are not written. Every class gets a
    folder, so a class without images makes a folder that `load_wsol_folder` refuses. `root`
    must be absent or empty (nothing is overwritten or deleted), and `class_names` sorted (the
    loader labels folders in sorted order).

    **Returns:** the path of `boxes.csv` (not written when the dataset has no boxes).
    """
    if list(dataset.class_names) != sorted(dataset.class_names):
        raise ValueError(
            f"class names must be sorted, or loading the folder would change the labels: "
            f"{dataset.class_names}"
        )
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: exists and is not an empty folder")
    paths = dataset.paths if dataset.paths is not None else _default_paths(dataset)
    for name in dataset.class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for pixels, name in zip(dataset.images, paths):
        write_image(root / name, pixels)
    if dataset.boxes is not None:
        _write_boxes(root / BOXES_CSV, paths, dataset.boxes)
    return root / BOXES_CSV
