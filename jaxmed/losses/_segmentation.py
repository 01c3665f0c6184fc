"""Segmentation losses as pure `jax.numpy` functions: soft Dice, cross-entropy and their sum
(the loss of `docs/segmentation.md`).

Logits `(B, *spatial, C)` channels-last, integer labels `(B, *spatial)`. `dice_loss` and
`ce_dice_loss` agree with MONAI's `DiceLoss(softmax=True, to_onehot_y=True, ...)` and
`DiceCELoss` on the same inputs (MONAI is channels-first with labels `(B, 1, *spatial)`).
Every function returns a quantity to MINIMISE.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["ce_dice_loss", "ce_dice_loss_parts", "cross_entropy_loss", "dice_loss"]


def _check_segmentation_inputs(logits: Array, labels: Array) -> None:
    if logits.ndim < 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            "expected logits (B, *spatial, C) and labels (B, *spatial) with the same B and spatial "
            f"shape, got logits {logits.shape} and labels {labels.shape}"
        )
    if logits.shape[-1] < 2:
        raise ValueError(f"softmax losses need at least 2 classes, got logits {logits.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")


def _label_masks(labels: Array, num_classes: int, ignore_index: int | None) -> tuple[Array, Array]:
    """`(counted, invalid)`, boolean `(B, *spatial)`: pixels that enter the sums, and non-ignored
    pixels whose label is outside `[0, num_classes)`."""
    counted = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    return counted, counted & ~in_range


def _nan_if_any(invalid: Array, dtype: Any) -> Array:
    """0, or NaN when any pixel is invalid: a wrong label must not train quietly. The term is a
    constant in the logits, so gradients stay finite; the loss value shows the problem."""
    return jnp.where(jnp.any(invalid), jnp.nan, 0.0).astype(dtype)


def dice_loss(
    logits: Array,
    labels: Array,
    *,
    squared: bool = True,
    smooth: float = 1e-5,
    include_background: bool = True,
    ignore_index: int | None = None,
) -> Array:
    """Soft Dice loss of softmax probabilities against one-hot labels, mean over batch and classes.

    With `p = softmax(logits)` and `g = one_hot(labels)`, per sample `b` and class `c` (sums over
    the spatial axes):

        squared:      1 - (2 sum p g + smooth) / (sum p^2 + sum g^2 + smooth)
        not squared:  1 - (2 sum p g + smooth) / (sum p + sum g + smooth)

    then the mean over `b` and `c`. This equals MONAI's `DiceLoss(softmax=True, to_onehot_y=True,
    squared_pred=squared, smooth_nr=smooth, smooth_dr=smooth, include_background=...,
    ignore_index=...)`. A class absent from a sample's labels scores `1 - smooth / (sum p^2 +
    smooth)`: about 1 when it is predicted anywhere, 0 when it is predicted nowhere. Computed in
    at least float32 (bfloat16 logits are upcast).

    **Arguments:**

    - `logits`: `(B, *spatial, C)`, `C >= 2`, any number of spatial axes (2-D, 3-D).
    - `labels`: `(B, *spatial)` integer classes in `[0, C)`.
    - `squared`: square `p` and `g` in the denominator (the segmentation program's Dice, MONAI
      `squared_pred`).
    - `smooth`: added to numerator and denominator (MONAI `smooth_nr = smooth_dr`).
    - `include_background`: False drops class 0 from the mean (softmax still over all classes).
    - `ignore_index`: pixels with this label enter no sum (neither `p` nor `g`). Usually a value
      outside `[0, C)` such as 255; a class index in range makes that class's sums zero, so it
      adds loss 0 to the mean, as in MONAI.

    **Returns:** a scalar, float32 (float64 for float64 logits). NaN when a label that is not
    `ignore_index` lies outside `[0, C)`, so that a training loop stopping on NaN catches a
    wrongly encoded mask (e.g. 0/255 masks without a mapping).
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_segmentation_inputs(logits, labels)
    num_classes = logits.shape[-1]
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    counted, invalid = _label_masks(labels, num_classes, ignore_index)
    weight = counted[..., None].astype(dtype)  # [B, *S, 1]
    probs = jax.nn.softmax(logits.astype(dtype), axis=-1) * weight  # [B, *S, C]
    targets = jax.nn.one_hot(labels, num_classes, dtype=dtype) * weight  # [B, *S, C]
    if not include_background:
        probs, targets = probs[..., 1:], targets[..., 1:]
    spatial = tuple(range(1, logits.ndim - 1))
    overlap = jnp.sum(probs * targets, axis=spatial)  # [B, C]
    if squared:
        size = jnp.sum(probs * probs, axis=spatial) + jnp.sum(targets * targets, axis=spatial)
    else:
        size = jnp.sum(probs, axis=spatial) + jnp.sum(targets, axis=spatial)  # [B, C]
    loss = 1.0 - (2.0 * overlap + smooth) / (size + smooth)  # [B, C]
    return jnp.mean(loss) + _nan_if_any(invalid, dtype)


def cross_entropy_loss(
    logits: Array,
    labels: Array,
    *,
    class_weights: Array | None = None,
    ignore_index: int | None = None,
) -> Array:
    """Softmax cross-entropy on logits, averaged over the non-ignored pixels of the batch.

    `sum_i w_{y_i} * (-log softmax(logits_i)[y_i]) / sum_i w_{y_i}` over the pixels `i` whose
    label is not `ignore_index`, with `w = 1` without `class_weights`: torch's
    `cross_entropy(weight=class_weights, ignore_index=ignore_index)` with mean reduction.
    Computed in at least float32.

    **Arguments:**

    - `logits`: `(B, *spatial, C)`, `C >= 2`.
    - `labels`: `(B, *spatial)` integer classes in `[0, C)`.
    - `class_weights`: optional `(C,)` non-negative weights per true class.
    - `ignore_index`: label of pixels left out of both sums.

    **Returns:** a scalar. 0 when no pixel counts (every label ignored; torch gives NaN there,
    which would stop training on a fully padded batch). NaN when a non-ignored label lies outside
    `[0, C)`.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_segmentation_inputs(logits, labels)
    num_classes = logits.shape[-1]
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    counted, invalid = _label_masks(labels, num_classes, ignore_index)
    # Ignored and invalid pixels get class 0 for the gather only; their weight or the NaN term
    # takes care of them.
    safe_labels = jnp.where(counted & ~invalid, labels, 0).astype(jnp.int32)  # [B, *S]
    log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)  # [B, *S, C]
    nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]  # [B, *S]
    if class_weights is None:
        weight = counted.astype(dtype)
    else:
        class_weights = jnp.asarray(class_weights, dtype)
        if class_weights.shape != (num_classes,):
            raise ValueError(f"class_weights must have shape ({num_classes},), got "
                             f"{class_weights.shape}")
        weight = class_weights[safe_labels] * counted  # [B, *S]
    total = jnp.sum(weight)
    mean = jnp.sum(weight * nll) / jnp.where(total > 0, total, 1.0)
    return mean + _nan_if_any(invalid, dtype)


def ce_dice_loss_parts(
    logits: Array,
    labels: Array,
    *,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    class_weights: Array | None = None,
    ignore_index: int | None = None,
    squared: bool = True,
    smooth: float = 1e-5,
    include_background: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """`ce_weight * cross_entropy_loss + dice_weight * dice_loss`, with the unweighted parts.

    The segmentation program's loss; MONAI's `DiceCELoss(lambda_ce=ce_weight,
    lambda_dice=dice_weight, ...)` for `class_weights=None`. `class_weights` weight the
    cross-entropy only (MONAI's `weight` also weights the Dice classes); `ignore_index` applies
    to both terms. See `cross_entropy_loss` and `dice_loss` for the arguments.

    **Returns:** `(total, {"ce": ce, "dice": dice})`, scalars; the parts unweighted, for logging.
    """
    ce = cross_entropy_loss(logits, labels, class_weights=class_weights, ignore_index=ignore_index)
    dice = dice_loss(
        logits, labels, squared=squared, smooth=smooth, include_background=include_background,
        ignore_index=ignore_index,
    )
    return ce_weight * ce + dice_weight * dice, {"ce": ce, "dice": dice}


def ce_dice_loss(logits: Array, labels: Array, **kwargs: Any) -> Array:
    """The scalar total of `ce_dice_loss_parts(logits, labels, **kwargs)` (same keywords:
    `ce_weight`, `dice_weight`, `class_weights`, `ignore_index`, `squared`, `smooth`,
    `include_background`), for use directly as a loss function.

    **Returns:** a scalar.
    """
    return ce_dice_loss_parts(logits, labels, **kwargs)[0]
