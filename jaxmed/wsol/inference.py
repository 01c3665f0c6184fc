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
from PIL import Image

from jaxmed.data.images import read_image, write_image
from jaxmed.explain import cam_boxes, normalize_cams, resize_maps
from jaxmed.training import read_run_config, restore_trained
from jaxmed.wsol.figures import localization_figure
from jaxmed.wsol.steps import Wsol, build_wsol

PROGRAM = "python -m train.wsol"
THRESHOLDS_NAME = "localization.json"
# Used when the run had no validation boxes to choose a threshold with.
DEFAULT_THRESHOLD = 0.2


def load_trained(workdir: str | os.PathLike, which: str = "best"):
    """`(wsol, state, config)` of a training run."""
    config = read_run_config(workdir, PROGRAM)
    wsol = build_wsol(config)
    state = restore_trained(workdir, lambda: wsol.init_state(config["seed"]), which=which,
                            best_metric=config["best_metric"], best_mode=config["best_mode"])
    return wsol, state, config


def saved_threshold(workdir: str | os.PathLike) -> float:
    """The CAM threshold that gave the best MaxBoxAcc at δ = 0.5 on the run's validation split."""
    path = Path(workdir) / THRESHOLDS_NAME
    if not path.is_file():
        return DEFAULT_THRESHOLD
    return float(json.loads(path.read_text())["threshold_50"])


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """`(H, W, 3)` uint8 -> `(size, size, 3)` uint8, bilinear (the loaders' convention)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


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
    wsol, state, config = load_trained(workdir, which)
    threshold = saved_threshold(workdir) if threshold is None else threshold
    predict = jax.jit(wsol.predict)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rows, written = [], []
    for path in inputs:
        image = read_image(path)
        probabilities, maps = predict(state, jnp.asarray(resize_image(image, wsol.image_size)[None]))
        full = normalize_cams(np.asarray(resize_maps(maps, image.shape[:2], method="cubic")))[0]
        label = int(np.argmax(probabilities[0]))
        box = cam_boxes(full, threshold)[:1]
        name = config["class_names"][label]
        stem = Path(path).name.rsplit(".", 1)[0]
        written.append(localization_figure(
            image, full, out / f"{stem}.png", predicted=box,
            title=f"{Path(path).name}: {name} ({float(probabilities[0, label]):.2f}), τ = {threshold:.3f}"))
        write_image(out / f"{stem}_cam.png", np.round(full * 255).astype(np.uint8))
        written.append(out / f"{stem}_cam.png")
        rows.append([str(path), name, f"{float(probabilities[0, label]):.4f}", *map(int, box[0])])
    table = out / "localization.csv"
    temporary = table.with_name(f".{table.name}.tmp")
    with open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "class", "probability", "x0", "y0", "x1", "y1"])
        writer.writerows(rows)
    os.replace(temporary, table)
    return written + [table]


__all__ = ["Wsol", "load_trained", "localize_files", "saved_threshold", "resize_image"]
