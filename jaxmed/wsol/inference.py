"""Localise objects in image files with a trained WSOL classifier: class, box, CAM overlay."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data.images import read_image, resize_image, write_image
from jaxmed.explain import cam_boxes, normalize_cams, resize_maps
from jaxmed.training import load_run
from jaxmed.wsol.config import PROGRAM
from jaxmed.wsol.figures import localization_figure
from jaxmed.wsol.steps import build_wsol

THRESHOLDS_NAME = "localization.json"
# Used when the run had no validation boxes to choose a threshold with.
DEFAULT_THRESHOLD = 0.2


def write_thresholds(workdir: str | os.PathLike, metrics: dict[str, float]) -> Path:
    """Keep the validation metrics of the model that `localize` uses, and the CAM threshold
    that gave its best MaxBoxAcc at δ = 0.5 (`DEFAULT_THRESHOLD` without validation boxes), in
    `workdir/localization.json`."""
    path = Path(workdir) / THRESHOLDS_NAME
    values = {"threshold_50": metrics.get("val_threshold_50", DEFAULT_THRESHOLD), **metrics}
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(values, indent=2))
    os.replace(temporary, path)
    return path


def saved_threshold(workdir: str | os.PathLike) -> float:
    """The CAM threshold that gave the best MaxBoxAcc at δ = 0.5 on the run's validation split."""
    path = Path(workdir) / THRESHOLDS_NAME
    if not path.is_file():
        return DEFAULT_THRESHOLD
    return float(json.loads(path.read_text())["threshold_50"])


def localize_files(workdir: str | os.PathLike, inputs: Sequence[str], output: str | os.PathLike,
                   *, which: str = "best", threshold: float | None = None) -> list[Path]:
    """For each input image write `<name>.png` (CAM overlay with the predicted box) and
    `<name>_cam.png` (the CAM as 8-bit grey at the image's size), and one `localization.csv`
    with the predicted class, its probability and the box in the image's pixels (inclusive).

    The CAM is that of the predicted class, resized from the model's input size to the
    image's size, and binarised at `threshold` (default: the run's best validation threshold
    at δ = 0.5); the box is that of the largest contour, as in MaxBoxAcc.

    **Returns:** the written paths.
    """
    wsol, state, config = load_run(workdir, build_wsol, program=PROGRAM, which=which)
    threshold = saved_threshold(workdir) if threshold is None else threshold
    predict = jax.jit(wsol.predict)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rows, written = [], []
    for path in inputs:
        image = read_image(path)
        resized = resize_image(image, wsol.image_size)[None]  # [1, S, S, 3]
        probabilities, maps = predict(state, jnp.asarray(resized))
        full = normalize_cams(np.asarray(resize_maps(maps, image.shape[:2], method="cubic")))[0]
        label = int(np.argmax(probabilities[0]))
        box = cam_boxes(full, threshold)[:1]
        name = config["class_names"][label]
        stem = Path(path).name.rsplit(".", 1)[0]
        probability = float(probabilities[0, label])
        written.append(localization_figure(
            image, full, out / f"{stem}.png", predicted=box,
            title=f"{Path(path).name}: {name} ({probability:.2f}), τ = {threshold:.3f}"))
        write_image(out / f"{stem}_cam.png", np.round(full * 255).astype(np.uint8))
        written.append(out / f"{stem}_cam.png")
        rows.append([str(path), name, f"{probability:.4f}", *map(int, box[0])])
    table = out / "localization.csv"
    temporary = table.with_name(f".{table.name}.tmp")
    with open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "class", "probability", "x0", "y0", "x1", "y1"])
        writer.writerows(rows)
    os.replace(temporary, table)
    return written + [table]
