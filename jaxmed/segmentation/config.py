"""The segmentation run's configuration: the command-line options of `python -m train.segment`
that define what its checkpoints hold (data, network, loss and optimiser), and its
`config.json`. See docs/segmentation.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxmed.models.segmentation import STEMS
from jaxmed.training import (
    Config,
    bounded,
    fraction,
    non_negative,
    non_negative_int,
    option,
    positive,
    positive_int,
)

DATA = "data (default: synthetic kidney-ultrasound phantoms)"
OPTIMISER = "loss and optimiser"

# The smallest phantom `make_kidney_phantoms` draws.
SYNTHETIC_MIN_SIZE = 32


def file_path(text: str) -> str:
    """An option type: a file, recorded as an absolute path."""
    return str(Path(text).resolve())


@dataclasses.dataclass(frozen=True)
class SegmentationConfig(Config):
    """Data, network, loss and optimiser of a segmentation run (defaults: the CPU-sized
    network on synthetic phantoms; the original design is `depth=50, width=64,
    output_stride=16, image_size=473`)."""

    # The data a run trains on is part of its configuration, so a resume with other data is
    # refused instead of silently mixing two datasets in one set of checkpoints.
    images: str | None = option(None, "folder of images (PNG/TIFF/JPEG)", group=DATA)
    masks: str | None = option(None, "folder of label masks matched to the images by name",
                               group=DATA)
    mask_suffix: str = option("", "mask name = image stem + this suffix (e.g. _mask; empty: the "
                             "same name)", group=DATA)
    num_classes: int = option(3, "classes, labels 0..N-1", group=DATA, type=bounded(int, low=2))
    image_size: int = option(128, "letterbox size of the model input (original design: 473)",
                             group=DATA, type=positive_int)
    val_fraction: float = option(0.2, "fraction of the images held out for validation",
                                 group=DATA, type=fraction)
    synthetic_images: int = option(800, "synthetic phantoms", group=DATA, type=positive_int)
    augment: bool = option(True, "flips, small rotations/scales and intensity jitter",
                           group=DATA)

    depth: int = option(18, "ResNet depth (original design: 50)", choices=(18, 34, 50, 101))
    width: int = option(16, "base width; every layer scales with it (original design: 64)",
                        type=positive_int)
    output_stride: int = option(8, "feature stride of layer 4 (original design: 16)",
                                choices=(8, 16))
    stem: str = option("3x3", "stem: two 3x3 convs to 2w channels (original design), or "
                       "ResNet's 7x7/2 conv to w channels (needed by --pretrained)",
                       choices=STEMS)
    pretrained: str | None = option(
        None, "start the ResNet (stem and layers 1-4) from torchvision's ImageNet weights in a "
        "safetensors file (e.g. resnet50; a .pth converts with python -m jaxmed.weights "
        "convert); needs --stem 7x7 and the file's --depth with --width 64; CBAM, pyramid "
        "pooling and the heads keep their initialisation; input images are then normalised "
        "with ImageNet's mean and std instead of mapped to [-1, 1]", type=file_path,
        metavar="FILE.safetensors")
    cbam: bool = option(True, "CBAM after the stem and after layer 4")
    ppm: bool = option(True, "pyramid pooling module")
    aux_weight: float = option(0.4, "weight of the auxiliary head's loss on layer 3; 0 = no "
                               "auxiliary head", type=non_negative)
    dropout: float = option(0.1, "dropout rate of the heads", type=fraction)
    dtype: str = option("float32", "computation dtype; parameters stay float32",
                        choices=("float32", "bfloat16"))

    ce_weight: float = option(1.0, "weight of the cross-entropy", group=OPTIMISER,
                              type=non_negative)
    dice_weight: float = option(1.0, "weight of the soft Dice loss", group=OPTIMISER,
                                type=non_negative)
    learning_rate: float = option(2e-3, "AdamW peak learning rate, cosine decay",
                                  group=OPTIMISER, type=positive)
    weight_decay: float = option(1e-4, "AdamW weight decay", group=OPTIMISER, type=non_negative)
    warmup_steps: int = option(30, "steps of linear learning-rate warm-up", group=OPTIMISER,
                               type=non_negative_int)

    steps: int = option(1500, "total training steps", cli=False, resumable=True)
    seed: int = option(0, "seed of initialisation, data, split and augmentation", cli=False)

    def check(self) -> None:
        if bool(self.images) != bool(self.masks):
            raise ValueError("give both --images and --masks, or neither (synthetic data)")
        if not self.images and self.image_size < SYNTHETIC_MIN_SIZE:
            raise ValueError(f"argument --image-size: synthetic phantoms need at least "
                             f"{SYNTHETIC_MIN_SIZE} pixels, got {self.image_size}")
        if self.pretrained and self.stem != "7x7":
            raise ValueError("--pretrained needs --stem 7x7 (torchvision's ResNet stem)")
        if self.ce_weight == 0 and self.dice_weight == 0:
            raise ValueError("--ce-weight and --dice-weight are both 0: nothing to train on")
