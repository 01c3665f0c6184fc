"""Segment image files with a trained network: masks at each image's own size, and overlays."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data.images import read_image, write_image
from jaxmed.data.letterbox import letterbox, unletterbox
from jaxmed.segmentation.figures import colour_mask, overlay
from jaxmed.segmentation.steps import build_segmenter
from jaxmed.training import load_run

PROGRAM = "python -m train.segment"


def predict_files(workdir: str | os.PathLike, inputs: Sequence[str], output: str | os.PathLike,
                  *, which: str = "best") -> list[Path]:
    """For each image write `<name>_mask.png` (class indices, the image's size),
    `<name>_colour.png` and `<name>_overlay.png`.

    The image is letterboxed to the model's size; the class scores are mapped back through
    the exact inverse of the letterbox (crop, bilinear resize) before the argmax, so the mask
    has the image's own size and is not a resized label map.

    **Returns:** the written paths.
    """
    segmenter, state, _ = load_run(workdir, build_segmenter, program=PROGRAM, which=which)
    scores = jax.jit(segmenter.logits)
    out = Path(output)
    written = []
    for path in inputs:
        image = read_image(path)
        boxed, box = letterbox(image, segmenter.image_size, order=1)
        logits = np.asarray(scores(state, jnp.asarray(boxed[None])))[0]
        mask = np.argmax(unletterbox(logits, box, order=1), axis=-1).astype(np.uint8)
        stem = Path(path).name.rsplit(".", 1)[0]
        for suffix, pixels in (("mask", mask), ("colour", colour_mask(mask)),
                               ("overlay", overlay(image, mask))):
            write_image(out / f"{stem}_{suffix}.png", pixels)
            written.append(out / f"{stem}_{suffix}.png")
    return written
