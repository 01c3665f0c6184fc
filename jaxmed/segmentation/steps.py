"""The segmentation network's training step and validation (SPEC S4).

Loss: cross-entropy + soft Dice on the main head, plus `aux_weight` times the same on the
auxiliary head (layer 3) when it is enabled. Validation accumulates one confusion matrix over
the held-out images on the device and derives per-class Dice and IoU from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed.losses import ce_dice_loss
from jaxmed.metrics import confusion_matrix, segmentation_scores
from jaxmed.models.segmentation import SegmentationNet
from jaxmed.training import (TrainState, images_to_unit_range, init_supervised_state,
                             supervised_train_step, warmup_cosine_adamw)

# Pixels of this label (the letterbox padding) take no part in the loss or the metrics.
IGNORE = 255

MODEL_KEYS = ("num_classes", "image_size", "depth", "width", "output_stride", "cbam", "ppm",
              "aux_weight", "dropout", "dtype", "learning_rate", "weight_decay", "steps",
              "warmup_steps", "ce_weight", "dice_weight", "seed")


preprocess = images_to_unit_range


@dataclass(frozen=True)
class Segmenter:
    """The network of a run, its optimiser and loss weights."""

    model: SegmentationNet
    tx: optax.GradientTransformation
    image_size: int
    num_classes: int
    aux_weight: float
    ce_weight: float
    dice_weight: float

    def init_state(self, seed: int) -> TrainState:
        example = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return init_supervised_state(self.model, self.tx, example, seed)

    def loss(self, outputs, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        def part(logits):
            return ce_dice_loss(logits.astype(jnp.float32), batch["mask"],
                                ce_weight=self.ce_weight, dice_weight=self.dice_weight,
                                ignore_index=IGNORE)

        main = part(outputs["logits"])
        metrics = {"main_loss": main}
        total = main
        if "aux_logits" in outputs:
            metrics["aux_loss"] = part(outputs["aux_logits"])
            total = total + self.aux_weight * metrics["aux_loss"]
        return total, metrics

    @property
    def train_step(self):
        return supervised_train_step(self.model, self.tx, self.loss, input_key="image",
                                     preprocess=preprocess)

    def logits(self, state: TrainState, images: jax.Array) -> jax.Array:
        """Class scores `[B, H, W, classes]` (float32) of uint8 images."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return self.model.apply(variables, preprocess(images), train=False)["logits"].astype(
            jnp.float32)


def build_segmenter(config: dict[str, Any]) -> Segmenter:
    """The network and optimiser of a run configuration (`MODEL_KEYS`)."""
    dtype = jnp.bfloat16 if config["dtype"] == "bfloat16" else jnp.float32
    model = SegmentationNet(num_classes=config["num_classes"], depth=config["depth"],
                            width=config["width"], output_stride=config["output_stride"],
                            use_cbam=config["cbam"], use_ppm=config["ppm"],
                            aux_head=config["aux_weight"] > 0, dropout_rate=config["dropout"],
                            dtype=dtype)
    tx = warmup_cosine_adamw(config["learning_rate"], config["weight_decay"], config["steps"],
                             config["warmup_steps"])
    return Segmenter(model=model, tx=tx, image_size=config["image_size"],
                     num_classes=config["num_classes"], aux_weight=config["aux_weight"],
                     ce_weight=config["ce_weight"], dice_weight=config["dice_weight"])


def validation(segmenter: Segmenter, images: np.ndarray, masks: np.ndarray, *, chunk: int = 16):
    """`state -> metrics` on held-out letterboxed images: Dice and IoU per class and their means
    over classes, from one confusion matrix summed over chunks on the device (the last chunk
    is padded with ignored pixels, so it compiles once)."""
    count = len(images)

    @jax.jit
    def chunk_confusion(state, x, y):
        predictions = jnp.argmax(segmenter.logits(state, x), axis=-1)
        return confusion_matrix(predictions, y, segmenter.num_classes, ignore_index=IGNORE)

    def evaluate(state) -> dict[str, float]:
        total = jnp.zeros((segmenter.num_classes, segmenter.num_classes), jnp.int32)
        for start in range(0, count, chunk):
            rows = np.arange(start, min(start + chunk, count))
            x = images[np.resize(rows, chunk)]
            y = masks[np.resize(rows, chunk)].copy()
            y[len(rows):] = IGNORE
            total = total + chunk_confusion(state, jnp.asarray(x), jnp.asarray(y))
        return flat_scores(segmentation_scores(total), prefix="val_")

    return evaluate


def flat_scores(scores: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{'dice': [C], 'iou': [C], 'mean_dice', 'mean_iou'}` -> flat floats, e.g. `val_dice_1`."""
    flat = {}
    for name, value in scores.items():
        value = np.asarray(value)
        if value.ndim == 0:
            flat[f"{prefix}{name}"] = float(value)
        else:
            flat.update({f"{prefix}{name}_{c}": float(v) for c, v in enumerate(value)})
    return flat
