"""Segmentation metrics from hard predictions (`docs/segmentation.md`): a confusion matrix on
device, then per-class Dice and IoU from it.

Accumulate over a dataset by summing the per-batch matrices (counts add), then score once:

    confusion = jnp.zeros((C, C), jnp.int32)
    for images, labels in batches:
        predictions = jnp.argmax(model(images), axis=-1)  # [B, *S]
        confusion += confusion_matrix(predictions, labels, C, ignore_index=255)
    scores = segmentation_scores(confusion)

This gives the dataset-level scores (pixels pooled over all images), not a mean of per-image
scores.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = Any


def _raise_if_invalid(num_invalid: Array, *, num_classes: int) -> None:
    if int(num_invalid) > 0:
        raise ValueError(
            f"confusion_matrix: {int(num_invalid)} pixel(s) with a label or prediction outside "
            f"[0, {num_classes}) (and not ignore_index); map or ignore them before scoring"
        )


def confusion_matrix(predictions: Array, labels: Array, num_classes: int, *,
                     ignore_index: int | None = None) -> Array:
    """Pixel counts per (true class, predicted class).

    `confusion[t, p]` = number of pixels with label `t` and prediction `p`; pixels whose label is
    `ignore_index` are not counted. Works under `jax.jit` and `jax.vmap` (one scatter-add over
    `C * C` bins, no loop over pixels or classes).

    A label (other than `ignore_index`) or a prediction outside `[0, num_classes)` is an error,
    not a silently dropped pixel: a `jax.debug.callback` raises `ValueError` with the count. Called
    eagerly this is a plain `ValueError`; under `jax.jit` it surfaces as a `JaxRuntimeError` whose
    message contains it, when the result is computed.

    **Arguments:**

    - `predictions`: `(B, *spatial)` integer predicted classes (e.g. `argmax` of the logits).
    - `labels`: `(B, *spatial)` integer true classes (any matching shape works).
    - `num_classes`: `C`, a Python int.
    - `ignore_index`: label of pixels to leave out (e.g. 255 for unlabelled borders).

    **Returns:** `(C, C)` int32, rows = truth, columns = prediction.
    """
    predictions, labels = jnp.asarray(predictions), jnp.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must have "
                         "one shape")
    for name, x in (("predictions", predictions), ("labels", labels)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer class indices, got dtype {x.dtype}")
    counted = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index

    def in_range(x):
        return (x >= 0) & (x < num_classes)

    valid = counted & in_range(labels) & in_range(predictions)
    jax.debug.callback(functools.partial(_raise_if_invalid, num_classes=num_classes),
                       jnp.sum(counted & ~valid))
    # Uncounted pixels go to bin 0 with weight 0; int32 counts are exact.
    bins = jnp.where(valid, labels.astype(jnp.int32) * num_classes + predictions.astype(jnp.int32),
                     0)
    counts = jax.ops.segment_sum(valid.astype(jnp.int32).ravel(), bins.ravel(),
                                 num_segments=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion: Array, *, include_background: bool = True) -> dict[str, Array]:
    """Per-class Dice and IoU from a confusion matrix, and their means over classes.

    With `TP = confusion[c, c]`, `FN` = rest of row `c`, `FP` = rest of column `c`:
    `dice_c = 2 TP / (2 TP + FP + FN)`, `iou_c = TP / (TP + FP + FN)`. A class absent from both
    truth and prediction has no score: NaN in the per-class arrays, and left out of the means
    (`nanmean`; the mean is NaN only when no class has a score). Computed in at least float32.

    **Arguments:**

    - `confusion`: `(C, C)` counts, rows = truth, columns = prediction (e.g. a sum of
      `confusion_matrix` over batches).
    - `include_background`: False leaves class 0 out of the means (the per-class arrays keep it).

    **Returns:** a dict with `"dice"` and `"iou"` `(C,)`, `"mean_dice"` and `"mean_iou"` scalars,
    and `"accuracy"`, the fraction of counted pixels predicted correctly (scalar).
    """
    confusion = jnp.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got shape {confusion.shape}")
    dtype = jnp.promote_types(jnp.result_type(float), jnp.float32)
    confusion = confusion.astype(dtype)
    true_positive = jnp.diagonal(confusion)  # [C]
    # wrong: FP + FN, [C]
    wrong = jnp.sum(confusion, axis=0) + jnp.sum(confusion, axis=1) - 2 * true_positive
    present = (true_positive + wrong) > 0

    def ratio(numerator, denominator):
        return jnp.where(present, numerator / jnp.where(present, denominator, 1.0), jnp.nan)

    dice = ratio(2 * true_positive, 2 * true_positive + wrong)  # [C]
    iou = ratio(true_positive, true_positive + wrong)  # [C]
    first = 0 if include_background else 1
    total = jnp.sum(confusion)
    return {
        "dice": dice,
        "iou": iou,
        "mean_dice": jnp.nanmean(dice[first:]),
        "mean_iou": jnp.nanmean(iou[first:]),
        "accuracy": jnp.sum(true_positive) / jnp.where(total > 0, total, jnp.nan),
    }
