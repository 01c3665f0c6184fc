"""The localisation system's configuration: the command-line options that define the network,
its optimiser and the synthetic data, and the run's `config.json` (docs/wsol.md).

The number of classes and their names come from the data; `run_config` adds them (and the
metric that selects the best checkpoint) to these fields for `config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxmed.data.synthetic_wsol import MAX_CLASSES
from jaxmed.models.vgg_cam import CONV_NAMES
from jaxmed.training import (
    Config,
    bounded,
    comma_ints,
    comma_names,
    non_negative,
    non_negative_int,
    open_unit_interval,
    option,
    positive_int,
    read_run_config,
    unit_interval,
)

PROGRAM = "python -m train.wsol"
DATA = "data (default: a synthetic dataset generated in memory)"

# The threshold-suppression layer's ranges (jaxmed/layers/_threshold.py): cr and alpha in
# (0, 1], t in [0, 1].
_open_low_fraction = bounded(float, low=0.0, high=1.0, low_open=True)


def conv_layer_names(text: str) -> tuple[str, ...]:
    """An option type: comma-separated VGG16 conv layer names (`'none'` = none)."""
    names = comma_names(text)
    unknown = [n for n in names if n not in CONV_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown conv layer(s) {', '.join(unknown)}; valid: {', '.join(CONV_NAMES)}")
    return names


def scale_range(text: str) -> tuple[float, float]:
    """An option type: `LOW,HIGH` with `0 < LOW <= HIGH < 0.5`."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    if not 0.0 < low <= high < 0.5:
        raise argparse.ArgumentTypeError(f"need 0 < LOW <= HIGH < 0.5, got {text}")
    return low, high


def run_path(text: str) -> str:
    """An option type: a run's work directory (or a file), recorded as an absolute path."""
    return str(Path(text).resolve())


@dataclasses.dataclass(frozen=True)
class WsolConfig(Config):
    """The options of `python -m train.wsol` that define its checkpoints."""

    # The data a run trains on is part of its configuration, so a resume with other data is
    # refused instead of silently mixing two datasets in one set of checkpoints.
    data_dir: str | None = option(None, "folder with one sub-folder of images per class",
                                  group=DATA)
    boxes: str | None = option(None, "CSV image,x0,y0,x1,y1 (paths relative to --data-dir) of "
                               "ground-truth boxes, for validation only", group=DATA)
    val_fraction: float = option(0.2, "held-out fraction, stratified by class", group=DATA,
                                 type=open_unit_interval)
    image_size: int = option(
        96, "images are resized to this square size; the CAM features are 1/16 of it",
        group=DATA, type=bounded(int, low=32))
    synthetic_images: int = option(2400, "synthetic dataset size", group=DATA, type=positive_int)
    synthetic_classes: int = option(4, "synthetic classes", group=DATA,
                                    type=bounded(int, low=1, high=MAX_CLASSES))
    synthetic_cooccurrence: float = option(
        0.5, "probability that a distractor rod has the colour paired with the image's class",
        group=DATA, type=unit_interval)
    synthetic_object_scale: tuple[float, float] = option(
        (0.14, 0.22), "range of a cell's semi-major axis as a fraction of the image size",
        group=DATA, type=scale_range, metavar="LOW,HIGH")
    synthetic_body_tint: float = option(
        24.0, "RGB levels by which a cell body's colour moves along its class's hue direction: "
        "weak class evidence over the whole body besides the small inclusion (per-channel "
        "colour jitter is ±20); 0 = the body carries no class evidence",
        group=DATA, type=non_negative)

    modules: tuple[str, ...] = option(
        ("conv4_3", "conv5_3"), "conv layers followed by a threshold-suppression module, "
        "comma-separated; 'none' = the plain CAM baseline", type=conv_layer_names)
    widths: tuple[int, ...] = option((8, 16, 32, 64, 64),
                                     "VGG16 stage widths (VGG16: 64,128,256,512,512)",
                                     type=comma_ints)
    conv6_width: int = option(128, "width of conv6, the CAM features (VGG16-CAM: 1024)",
                              type=positive_int)
    batch_norm: bool = option(True, "BatchNorm after each conv; training from scratch needs it")
    cr: float = option(0.8, "suppression of the most discriminative features above cr·max, "
                       "in (0, 1]", type=_open_low_fraction)
    alpha: float = option(0.8, "curvature of the enhancement below cr·max, in (0, 1]",
                          type=_open_low_fraction)
    t: float = option(0.4, "features below t·max are irrelevant, in [0, 1]", type=unit_interval)
    dtype: str = option("float32", "computation dtype; parameters stay float32",
                        choices=("float32", "bfloat16"))
    init_from: str | None = option(
        None, "start from the best checkpoint of an earlier run (e.g. a plain CAM run): every "
        "layer both networks have is copied, inserted modules keep their initialisation; the "
        "optimiser and step start afresh", type=run_path, metavar="RUN")
    pretrained: str | None = option(
        None, "start conv1_1 ... conv5_3 from torchvision's ImageNet VGG16 weights in a "
        "safetensors file (vgg16, or vgg16_bn with --batch-norm; a .pth converts with python "
        "-m jaxmed.weights convert); needs --widths 64,128,256,512,512; conv6, the "
        "suppression modules and the classifier keep their initialisation; input images are "
        "then normalised with ImageNet's mean and std instead of mapped to [-1, 1]",
        type=run_path, metavar="FILE.safetensors")

    learning_rate: float = option(2e-3, "AdamW peak learning rate, cosine decay",
                                  group="optimiser", type=non_negative)
    weight_decay: float = option(1e-4, "AdamW weight decay", group="optimiser",
                                 type=non_negative)
    warmup_steps: int = option(50, "linear warm-up of the learning rate", group="optimiser",
                               type=non_negative_int)

    steps: int = option(800, "total training steps", cli=False, resumable=True)
    seed: int = option(0, "seed of the data, the initialisation and the augmentation", cli=False)

    def check(self) -> None:
        if len(self.widths) != 5:
            raise ValueError(f"argument --widths: VGG16 has 5 stages, got {len(self.widths)} "
                             f"widths {','.join(map(str, self.widths))}")
        if self.pretrained and self.init_from:
            raise ValueError("give --pretrained or --init-from, not both")


def run_config(config: WsolConfig, class_names: Sequence[str], has_boxes: bool
               ) -> dict[str, Any]:
    """`config.json` of a run: `config`, the classes found in the data (index = label), the
    validation metric that selects the best checkpoint (MaxBoxAccV2, or top-1 accuracy when the
    validation images have no boxes) and, when images are normalised with ImageNet's
    statistics as pretrained weights need (`--pretrained`, or an `--init-from` run that had
    them), `imagenet_input: true`.

    **Raises:** `InputDataError` when `init_from` is not a run of this program."""
    imagenet = config.pretrained is not None or (
        config.init_from is not None
        and bool(read_run_config(config.init_from, PROGRAM).get("imagenet_input", False)))
    return {**config.to_dict(), "num_classes": len(class_names),
            "class_names": list(class_names),
            "best_metric": "val_maxboxacc_v2" if has_boxes else "val_top1", "best_mode": "max",
            # only when set, so that runs from before the option resume unchanged
            **({"imagenet_input": True} if imagenet else {})}
