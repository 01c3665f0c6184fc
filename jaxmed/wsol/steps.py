"""The WSOL classifier's training step, CAMs and validation (SPEC S1).

A VGG16-CAM classifier is trained from image-level labels only (softmax cross-entropy). The
class activation map of a class is the classifier's weights of that class applied to the last
conv features; boxes come from the binarised map, and MaxBoxAcc scores them against the
ground-truth boxes of the validation images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed.explain import cam
from jaxmed.metrics import BoxAccumulator
from jaxmed.models.vgg_cam import VGGCAM
from jaxmed.training import (TrainState, images_to_unit_range, init_supervised_state,
                             supervised_train_step, warmup_cosine_adamw)

# Keys of the run configuration that define the network and its optimiser.
MODEL_KEYS = ("num_classes", "image_size", "widths", "conv6_width", "modules", "batch_norm",
              "cr", "alpha", "t", "dtype", "learning_rate", "weight_decay", "steps",
              "warmup_steps", "seed")


preprocess = images_to_unit_range


@dataclass(frozen=True)
class Wsol:
    """The classifier of a run and the functions of its training program."""

    model: VGGCAM
    tx: optax.GradientTransformation
    image_size: int

    def init_state(self, seed: int) -> TrainState:
        example = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return init_supervised_state(self.model, self.tx, example, seed)

    @property
    def train_step(self):
        return supervised_train_step(self.model, self.tx, _classification_loss,
                                     input_key="image",
                                     preprocess=preprocess)

    def predict(self, state: TrainState, images: jax.Array,
                classes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Class probabilities `[B, classes]` and the CAMs `[B, H, W]` in [0, 1] at the image
        size, of `classes` (`[B]` int; default: the predicted class)."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        outputs = self.model.apply(variables, preprocess(images), train=False)
        logits = outputs["logits"].astype(jnp.float32)
        if classes is None:
            classes = jnp.argmax(logits, axis=-1)
        maps = cam(outputs["features"].astype(jnp.float32),
                   state.params["classifier"]["kernel"], classes,
                   image_size=images.shape[1:3], method="cubic", normalize=True)
        return jax.nn.softmax(logits), maps


def _classification_loss(outputs, batch):
    logits = outputs["logits"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
    return loss, {"accuracy": accuracy}


def build_wsol(config: dict[str, Any]) -> Wsol:
    """The network and optimiser of a run configuration (`MODEL_KEYS`)."""
    dtype = jnp.bfloat16 if config["dtype"] == "bfloat16" else jnp.float32
    model = VGGCAM(num_classes=config["num_classes"], widths=tuple(config["widths"]),
                   conv6_width=config["conv6_width"], modules=tuple(config["modules"]),
                   batch_norm=config["batch_norm"], cr=config["cr"], alpha=config["alpha"],
                   t=config["t"], dtype=dtype)
    tx = warmup_cosine_adamw(config["learning_rate"], config["weight_decay"], config["steps"],
                             config["warmup_steps"])
    return Wsol(model=model, tx=tx, image_size=config["image_size"])


def validation(wsol: Wsol, images: np.ndarray, labels: np.ndarray,
               boxes: Sequence[np.ndarray] | None, *, chunk: int = 64):
    """`state -> metrics` on a held-out split: top-1 accuracy (%) and, when boxes are given,
    MaxBoxAcc at δ 0.5 and 0.7 with their best thresholds and MaxBoxAccV2 (%), each CAM being
    that of the ground-truth class as in the WSOL protocol.

    Images go through one jitted function in chunks of `chunk` (the last one padded, so it
    compiles once); the box metric accumulates on the host.
    """
    predict = jax.jit(wsol.predict)
    count = len(images)

    def evaluate(state) -> dict[str, float]:
        v1, v2 = BoxAccumulator(), BoxAccumulator(iou_thresholds=(0.3, 0.5, 0.7),
                                                 multi_contour=True)
        correct = 0
        for start in range(0, count, chunk):
            rows = np.arange(start, min(start + chunk, count))
            padded = np.resize(rows, chunk)  # repeats rows to fill the chunk; extra rows dropped
            probabilities, maps = predict(state, jnp.asarray(images[padded]),
                                          jnp.asarray(labels[padded]))
            probabilities, maps = np.asarray(probabilities)[: len(rows)], np.asarray(maps)[: len(rows)]
            correct += int(np.sum(np.argmax(probabilities, -1) == labels[rows]))
            if boxes is not None:  # images without a box take no part in localisation
                boxed = [j for j, i in enumerate(rows) if len(boxes[i])]
                if boxed:
                    truth = [boxes[rows[j]] for j in boxed]
                    v1.update(maps[boxed], truth)
                    v2.update(maps[boxed], truth)
        metrics = {"val_top1": 100.0 * correct / count}
        if boxes is not None and any(len(b) for b in boxes):
            first, second = v1.result(), v2.result()
            for delta in (0.5, 0.7):
                metrics[f"val_maxboxacc_{int(delta * 100)}"] = first.accuracy[delta]
                metrics[f"val_threshold_{int(delta * 100)}"] = first.best_threshold[delta]
            metrics["val_maxboxacc_v2"] = second.mean
        return metrics

    return evaluate
