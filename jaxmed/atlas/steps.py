"""The feature atlas's classifier as a system: its network and optimiser, its training step
(softmax cross-entropy on the image labels) and its held-out accuracy (docs/atlas.md).

The atlas reads the trained classifier's feature nodes; it never changes the classifier.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed.atlas.config import ClassifierConfig
from jaxmed.models.feature_classifier import FeatureClassifier
from jaxmed.training import (
    SupervisedSystem,
    TrainState,
    evaluate,
    images_to_unit_range,
    warmup_cosine_adamw,
)

# Held-out images per evaluation batch (rounded up to a multiple of the device count).
EVAL_BATCH = 64


@dataclasses.dataclass(frozen=True)
class AtlasClassifier(SupervisedSystem):
    """The classifier of a run (`model`: a `FeatureClassifier` returning logits)."""

    def loss(self, outputs, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Softmax cross-entropy on the image labels, and the batch's accuracy."""
        logits = outputs["logits"].astype(jnp.float32)  # [B, classes]
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"accuracy": accuracy}

    def eval_step(self, state: TrainState, batch: Mapping[str, jax.Array]
                  ) -> dict[str, jax.Array]:
        """`{'probabilities': [B, classes]}` of uint8 images `batch['image']`."""
        logits = self.outputs(state, batch["image"])["logits"].astype(jnp.float32)
        return {"probabilities": jax.nn.softmax(logits)}

    def variables(self, state: TrainState) -> dict[str, Any]:
        """The model's variables in `state` (what `model.apply` takes)."""
        return {"params": state.params}

    @staticmethod
    def preprocess(images: jax.Array) -> jax.Array:
        """uint8 images -> the network's input (float32 in [-1, 1])."""
        return images_to_unit_range(images)


def build_classifier(values: ClassifierConfig | Mapping[str, Any]) -> AtlasClassifier:
    """The classifier and optimiser of a configuration, or of a run's `config.json` values
    (`ClassifierConfig`'s fields and `num_classes`)."""
    values = values.to_dict() if isinstance(values, ClassifierConfig) else dict(values)
    config = ClassifierConfig.from_dict(values)
    model = FeatureClassifier(filters=config.filters, hidden=config.hidden,
                              num_classes=values["num_classes"])
    tx = warmup_cosine_adamw(config.learning_rate, config.weight_decay, config.steps,
                             config.warmup_steps)
    return AtlasClassifier(model=model, tx=tx, image_size=config.image_size, seed=config.seed)


def eval_batch_size() -> int:
    """`EVAL_BATCH` rounded up to a multiple of the device count."""
    devices = jax.device_count()
    return -(-EVAL_BATCH // devices) * devices


def validation(classifier: AtlasClassifier, local: Mapping[str, np.ndarray],
               labels: np.ndarray) -> Callable[[TrainState], dict[str, float]]:
    """`state -> {'val_accuracy': %}` on the held-out images.

    **Arguments:**

    - `local`: this process's share (`training.host_share`) of the held-out images,
      `{'image': [n, S, S, 3] uint8}`.
    - `labels`: `[N]` labels of all held-out images.
    """

    def scores(state: TrainState) -> dict[str, float]:
        out = evaluate(classifier.eval_step, state, local, count=len(labels),
                       batch_size=eval_batch_size())
        predicted = np.argmax(out["probabilities"], axis=-1)
        return {"val_accuracy": 100.0 * float(np.mean(predicted == labels))}

    return scores
