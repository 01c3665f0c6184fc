"""The segmentation system: its network and optimiser, loss, training step and validation.

Loss: cross-entropy + soft Dice on the main head, plus `aux_weight` times the same on the
auxiliary head (layer 3) when it is enabled. Validation counts one confusion matrix per
held-out image (`eval_step`, on the devices), sums them on the host and derives per-class
Dice and IoU from the sum: pixels pooled over the images, integer counts, so the scores do not
depend on how the images are batched or spread over hosts. See docs/segmentation.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.losses import ce_dice_loss
from jaxmed.metrics import confusion_matrix, segmentation_scores
from jaxmed.models.segmentation import SegmentationNet
from jaxmed.segmentation.config import SegmentationConfig
from jaxmed.segmentation.data import IGNORE
from jaxmed.training import SupervisedSystem, TrainState, evaluate, warmup_cosine_adamw
from jaxmed.weights import pretrained_loader

# Held-out images per evaluation batch (rounded up to a multiple of the device count).
EVAL_BATCH = 16


@dataclasses.dataclass(frozen=True)
class Segmenter(SupervisedSystem):
    """The network of a run (`SupervisedSystem`: `init_state`, `train_step`), with its
    class count and loss weights."""

    num_classes: int
    aux_weight: float
    ce_weight: float
    dice_weight: float

    def loss(self, outputs, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`(total, {'main_loss', 'aux_loss'?})` of the heads' logits `[B, H, W, C]` against
        `batch['mask']` `[B, H, W]` (pixels `IGNORE` left out)."""

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

    def logits(self, state: TrainState, images: jax.Array) -> jax.Array:
        """Class scores `[B, H, W, classes]` (float32) of uint8 images `[B, H, W, 3]`."""
        return self.outputs(state, images)["logits"].astype(jnp.float32)

    def eval_step(self, state: TrainState, batch: Mapping[str, jax.Array]
                  ) -> dict[str, jax.Array]:
        """`{'confusion': [B, C, C]}` int32: per image, pixel counts per (true class,
        predicted class) of the argmax; padded rows (`batch['index'] < 0`) count nothing."""
        predictions = jnp.argmax(self.logits(state, batch["image"]), axis=-1)  # [B, H, W]
        valid = (batch["index"] >= 0)[:, None, None]
        labels = jnp.where(valid, batch["mask"], IGNORE)  # [B, H, W]
        per_image = jax.vmap(lambda p, t: confusion_matrix(p, t, self.num_classes,
                                                           ignore_index=IGNORE))
        return {"confusion": per_image(predictions, labels)}


def build_segmenter(config: SegmentationConfig | Mapping[str, Any]) -> Segmenter:
    """The network and optimiser of a configuration (or of a run's `config.json` dict)."""
    if not isinstance(config, SegmentationConfig):
        config = SegmentationConfig.from_dict(dict(config))
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    model = SegmentationNet(num_classes=config.num_classes, depth=config.depth,
                            width=config.width, output_stride=config.output_stride,
                            stem=config.stem, use_cbam=config.cbam, use_ppm=config.ppm,
                            aux_head=config.aux_weight > 0, dropout_rate=config.dropout,
                            dtype=dtype)
    tx = warmup_cosine_adamw(config.learning_rate, config.weight_decay, config.steps,
                             config.warmup_steps)
    return Segmenter(model=model, tx=tx, image_size=config.image_size, seed=config.seed,
                     num_classes=config.num_classes, aux_weight=config.aux_weight,
                     ce_weight=config.ce_weight, dice_weight=config.dice_weight,
                     imagenet_input=config.pretrained is not None)


def initial_state(segmenter: Segmenter, pretrained: str | None
                  ) -> Callable[[], TrainState]:
    """What `fit` starts from: `segmenter.init_state`, or with `pretrained` (a torchvision
    ResNet safetensors file) the same with the stem and layers 1-4 loaded from it; a bad file
    is refused here, before anything is written."""
    if pretrained is None:
        return segmenter.init_state
    return segmenter.init_state_with(pretrained_loader(pretrained, "resnet"))


def eval_batch_size(devices: int | None = None) -> int:
    """`EVAL_BATCH` rounded up to a multiple of the device count (all processes)."""
    devices = jax.device_count() if devices is None else devices
    return -(-EVAL_BATCH // devices) * devices


def validation(segmenter: Segmenter, local: Mapping[str, np.ndarray], count: int
               ) -> Callable[[TrainState], dict[str, float]]:
    """`state -> metrics` over the held-out images: `val_dice_<c>`, `val_iou_<c>`,
    `val_mean_dice`, `val_mean_iou`, `val_accuracy`.

    **Arguments:**

    - `segmenter`: the system.
    - `local`: this host's share (`training.host_share(count)`) of the held-out examples,
      `{'image': [n, S, S, 3] uint8, 'mask': [n, S, S] int}`.
    - `count`: the number of held-out examples over all hosts.
    """
    batch_size = eval_batch_size()

    def scores(state: TrainState) -> dict[str, float]:
        outputs = evaluate(segmenter.eval_step, state, local, count=count,
                           batch_size=batch_size)
        confusion = outputs["confusion"].sum(axis=0, dtype=np.int64)  # [C, C]
        return flat_scores(segmentation_scores(confusion), prefix="val_")

    return scores


def flat_scores(scores: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{'dice': [C], 'iou': [C], 'mean_dice', ...}` -> flat floats, e.g. `val_dice_1`."""
    flat = {}
    for name, value in scores.items():
        value = np.asarray(value)
        if value.ndim == 0:
            flat[f"{prefix}{name}"] = float(value)
        else:
            flat.update({f"{prefix}{name}_{c}": float(v) for c, v in enumerate(value)})
    return flat
