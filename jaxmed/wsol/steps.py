"""The localisation system: the VGG16-CAM classifier of a run, its training and evaluation
steps, its validation metrics and its warm start (docs/wsol.md).

The classifier is trained from image-level labels only (softmax cross-entropy). The class
activation map of a class is the classifier's weights of that class applied to the last conv
features; boxes come from the binarised map, and MaxBoxAcc scores them against the ground-truth
boxes of the validation images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed.explain import cam
from jaxmed.metrics import BoxAccumulator
from jaxmed.models.vgg_cam import VGGCAM
from jaxmed.training import (
    Checkpoints,
    SupervisedSystem,
    TrainState,
    evaluate_batches,
    load_run,
    read_run_config,
    transfer_matching,
    warmup_cosine_adamw,
)
from jaxmed.weights import pretrained_loader
from jaxmed.wsol.config import PROGRAM, WsolConfig

# Examples per validation batch over all devices (rounded up to a multiple of the device count).
EVAL_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Wsol(SupervisedSystem):
    """The classifier of a run (`model`: a `VGGCAM` returning logits and CAM features)."""

    def loss(self, outputs, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Softmax cross-entropy on the image labels, and the batch's accuracy."""
        logits = outputs["logits"].astype(jnp.float32)  # [B, classes]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
        return loss, {"accuracy": accuracy}

    def predict(self, state: TrainState, images: jax.Array,
                classes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Class probabilities `[B, classes]` and the CAMs `[B, H, W]` in [0, 1] at the image
        size, of `classes` (`[B]` int; default: the predicted class), for uint8 images
        `[B, H, W, 3]`."""
        outputs = self.outputs(state, images)
        logits = outputs["logits"].astype(jnp.float32)
        if classes is None:
            classes = jnp.argmax(logits, axis=-1)
        maps = cam(outputs["features"].astype(jnp.float32),
                   state.params["classifier"]["kernel"], classes,
                   image_size=images.shape[1:3], method="cubic", normalize=True)
        return jax.nn.softmax(logits), maps

    def eval_step(self, state: TrainState, batch: Mapping[str, jax.Array]
                  ) -> dict[str, jax.Array]:
        """Per example: `'probabilities'` `[B, classes]` and `'cam'` `[B, S, S]`, the CAM of the
        ground-truth class (`batch['label']`), as the WSOL protocol scores it."""
        probabilities, maps = self.predict(state, batch["image"], batch["label"])
        return {"probabilities": probabilities, "cam": maps}


def build_wsol(values: Mapping[str, Any]) -> Wsol:
    """The classifier and optimiser of a run's `config.json` values (`WsolConfig`'s fields,
    `num_classes` and optionally `imagenet_input`, which defaults to `pretrained` being set)."""
    config = WsolConfig.from_dict(dict(values))
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    model = VGGCAM(num_classes=values["num_classes"], widths=config.widths,
                   conv6_width=config.conv6_width, modules=config.modules,
                   batch_norm=config.batch_norm, cr=config.cr, alpha=config.alpha, t=config.t,
                   dtype=dtype)
    tx = warmup_cosine_adamw(config.learning_rate, config.weight_decay, config.steps,
                             config.warmup_steps)
    return Wsol(model=model, tx=tx, image_size=config.image_size, seed=config.seed,
                imagenet_input=bool(values.get("imagenet_input", config.pretrained)))


def initial_state(wsol: Wsol, workdir: str | Path, init_from: str | None,
                  pretrained: str | None = None) -> Callable[[], TrainState] | TrainState:
    """What `fit` starts from: `wsol.init_state`; with `pretrained` (a torchvision VGG16
    safetensors file) the same with conv1_1 ... conv5_3 loaded from it; or with `init_from`
    (an earlier run's work directory) the warm start `warm_start`, built only when `workdir`
    has no checkpoint of its own to resume from. A bad `pretrained` file or an `init_from`
    that is not a run of this program is reported first, before anything is written."""
    if pretrained is not None:
        return wsol.init_state_with(pretrained_loader(pretrained, "vgg16"))
    if init_from is not None:
        read_run_config(init_from, PROGRAM)
    checkpoints = Checkpoints(str(workdir), keep=1)
    resuming = checkpoints.latest_step() is not None
    checkpoints.close()
    if init_from is None or resuming:
        return wsol.init_state
    return warm_start(wsol, init_from)


def warm_start(wsol: Wsol, init_from: str) -> TrainState:
    """A step-0 state of `wsol` holding every array that the best checkpoint of the run in
    `init_from` has at the same path (shared layers); the rest (e.g. inserted modules) keeps its
    initialisation; the optimiser starts afresh.

    **Raises:** `InputDataError` naming the run when it is not a run of this program, or shares
    an array of another shape or no array at all.
    """
    source = load_run(init_from, build_wsol, program=PROGRAM).state
    state = wsol.init_state()
    merged, copied, kept = transfer_matching(
        {"params": state.params, "batch_stats": state.batch_stats},
        {"params": source.params, "batch_stats": source.batch_stats},
        source_name=f"--init-from {init_from}")
    if jax.process_index() == 0:
        print(f"initialised {len(copied)} arrays from {init_from}; "
              f"{len(kept)} new: {', '.join(kept) or 'none'}")
    return TrainState.create(params=merged["params"], tx=wsol.tx, rng=state.rng,
                             batch_stats=merged["batch_stats"])


def eval_batch_size() -> int:
    """`EVAL_BATCH` rounded up to a multiple of the device count."""
    devices = jax.device_count()
    return -(-EVAL_BATCH // devices) * devices


def validation(wsol: Wsol, local: Mapping[str, np.ndarray], labels: np.ndarray,
               boxes: Sequence[np.ndarray] | None) -> Callable[[TrainState], dict[str, float]]:
    """`state -> metrics` on the held-out images: top-1 accuracy (%) and, when boxes are given,
    MaxBoxAcc at δ 0.5 and 0.7 with their best thresholds and MaxBoxAccV2 (%), each CAM being
    that of the ground-truth class as in the WSOL protocol.

    **Arguments:**

    - `local`: this process's share (`training.host_share`) of the held-out examples,
      `{'image': [n, S, S, 3] uint8, 'label': [n]}`.
    - `labels`: `[N]` labels of all held-out examples; `boxes`: their `N` box arrays `(k, 4)`
      (images without a box take no part in localisation), or None.

    The images go through `training.evaluate_batches` (sharded over all devices); each batch's
    outputs update the counts on the host, boxes matched by the examples' global index.
    """
    count = len(labels)
    localising = boxes is not None and any(len(b) for b in boxes)

    def evaluate(state: TrainState) -> dict[str, float]:
        v1 = BoxAccumulator()
        v2 = BoxAccumulator(iou_thresholds=(0.3, 0.5, 0.7), multi_contour=True)
        correct = 0
        for out in evaluate_batches(wsol.eval_step, state, local, count=count,
                                    batch_size=eval_batch_size()):
            rows = out["index"]
            correct += int(np.sum(np.argmax(out["probabilities"], -1) == labels[rows]))
            boxed = [j for j, i in enumerate(rows) if localising and len(boxes[i])]
            if boxed:
                truth = [boxes[rows[j]] for j in boxed]
                v1.update(out["cam"][boxed], truth)
                v2.update(out["cam"][boxed], truth)
        metrics = {"val_top1": 100.0 * correct / count}
        if localising:
            first, second = v1.result(), v2.result()
            for delta in (0.5, 0.7):
                metrics[f"val_maxboxacc_{int(delta * 100)}"] = first.accuracy[delta]
                metrics[f"val_threshold_{int(delta * 100)}"] = first.best_threshold[delta]
            metrics["val_maxboxacc_v2"] = second.mean
        return metrics

    return evaluate
