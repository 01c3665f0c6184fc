"""The whole-slide run's configuration: the options of `python -m train.wsi` that define what
its checkpoints and features hold (slides, tiling, stain normalisation, the two feature
networks, the fusion and the slide classifier), and its `config.json` (docs/pathology.md).

The class names come from the slide labels; `run_config` adds them to these fields.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from jaxmed.training import (
    Config,
    bounded,
    non_negative,
    non_negative_int,
    open_unit_interval,
    option,
    positive,
    positive_int,
    unit_interval,
)

PROGRAM = "python -m train.wsi"
DATA = "slides (default: a synthetic cohort generated in the work directory)"
TILES = "tiles and stain normalisation"
FUSION = "fusion and slide classifier"
OPTIMISER = "optimiser"

STAIN_METHODS = ("vahadane", "macenko", "none")
AGGREGATION_CHOICES = ("attention", "mean", "random", "representative", "low", "high")
EXCLUDE = "exclude"


def run_path(text: str) -> str:
    """An option type: a file or folder, recorded as an absolute path."""
    return str(Path(text).resolve())


def ratio(text: str) -> float:
    """An option type: `1/k` for an integer `k >= 2`, written as a decimal (0.5, 0.25)."""
    value = bounded(float, low=0.0, high=1.0, low_open=True, high_open=True)(text)
    k = round(1.0 / value)
    if abs(k * value - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected 1/k for an integer k (0.5, 0.25, ...), "
                                         f"got {text}")
    return 1.0 / k


@dataclasses.dataclass(frozen=True)
class WsiConfig(Config):
    """Slides, tiling, networks, fusion and optimiser of a whole-slide run. Defaults: the
    CPU-sized run (256-pixel tiles, width 16); the original design is `tile_size=1152,
    width=64`."""

    slides: str | None = option(
        None, "training and test slides: a folder, or a text/CSV file listing them; each "
        "slide's region annotations are the QuPath GeoJSON beside it (<slide>.geojson)",
        group=DATA, type=run_path)
    labels: str | None = option(
        None, "CSV with columns slide,label: the class of each slide (default: labels.csv in "
        "the slides folder)", group=DATA, type=run_path)
    test_fraction: float = option(0.34, "fraction of the slides held out for testing, "
                                  "stratified by class", group=DATA, type=open_unit_interval)
    cohort_slides_per_class: int = option(10, "synthetic slides per class", group=DATA,
                                          type=bounded(int, low=2))
    cohort_size: int = option(2048, "side of a synthetic slide in level-0 pixels", group=DATA,
                              type=bounded(int, low=512))
    unannotated: str = option(
        "normal", "class of tissue that no annotation covers, or 'exclude' to leave tiles "
        "whose tissue is mostly unannotated out of pre-training", group=DATA)

    tile_size: int = option(256, "tile side in level-0 pixels (original design: 1152)",
                            group=TILES, type=bounded(int, low=32))
    ratio: float = option(0.5, "downsampling of the tile for network 1, 1/k; network 2 sees "
                          "the k^2 full-resolution blocks of the same size", group=TILES,
                          type=ratio)
    min_corners: int = option(3, "a tile is kept when this many of its corners lie on tissue",
                              group=TILES, type=bounded(int, low=0, high=4))
    stain: str = option("vahadane", "stain normalisation (SPCN with Vahadane's stain "
                        "estimate, or Macenko's), one source estimate per slide",
                        group=TILES, choices=STAIN_METHODS)
    stain_target: str | None = option(
        None, "slide whose stain appearance all slides are normalised to (default: the "
        "reference H&E appearance)", group=TILES, type=run_path)
    max_tiles_per_slide: int = option(
        0, "pre-training tiles drawn from each training slide; 0 = all", group=TILES,
        type=non_negative_int)

    width: int = option(16, "base width of both ResNet-18 networks; every layer scales with "
                        "it (original design: 64, a 512-d feature)", type=positive_int)
    pretrained: str | None = option(
        None, "start both networks' ResNet-18 (stem and layers 1-4) from torchvision's "
        "ImageNet resnet18 weights in a safetensors file (a .pth converts with python -m "
        "jaxmed.weights convert); needs --width 64; the spatial attention and the head keep "
        "their initialisation; tiles are then normalised with ImageNet's mean and std instead "
        "of mapped to [-1, 1]", type=run_path, metavar="FILE.safetensors")
    hidden: int = option(256, "width of the pre-training head's first dense layer",
                         type=positive_int)
    dtype: str = option("float32", "computation dtype; parameters stay float32",
                        choices=("float32", "bfloat16"))
    augment: bool = option(True, "pre-training augmentation: flips, 90-degree rotations and "
                           "stain jitter")

    weighting: str = option("sum", "attention weights: scores divided by their sum, or a "
                            "softmax of scores / temperature", group=FUSION,
                            choices=("sum", "softmax"))
    temperature: float = option(0.1, "softmax temperature (with --weighting softmax)",
                                group=FUSION, type=positive)
    aggregation: str = option(
        "attention", "slide feature the classifier is trained on: the multi-scale attention "
        "fusion, or a baseline (mean of patch features, a random patch, the k-means "
        "representative patch, low- or high-resolution attention only)", group=FUSION,
        choices=AGGREGATION_CHOICES)
    clusters: int = option(4, "k-means clusters of the representative baseline",
                           group=FUSION, type=positive_int)
    classifier_steps: int = option(400, "full-batch steps of the slide classifier",
                                   group=FUSION, type=positive_int)
    classifier_learning_rate: float = option(1e-2, "AdamW learning rate of the slide "
                                             "classifier", group=FUSION, type=positive)
    classifier_weight_decay: float = option(1e-2, "AdamW weight decay of the slide "
                                            "classifier", group=FUSION, type=non_negative)

    learning_rate: float = option(2e-3, "AdamW peak learning rate of the networks, cosine "
                                  "decay", group=OPTIMISER, type=positive)
    weight_decay: float = option(1e-4, "AdamW weight decay", group=OPTIMISER,
                                 type=non_negative)
    warmup_steps: int = option(30, "steps of linear learning-rate warm-up", group=OPTIMISER,
                               type=non_negative_int)
    label_smoothing: float = option(0.0, "label smoothing of the pre-training cross-entropy",
                                    group=OPTIMISER, type=unit_interval)

    steps: int = option(400, "pre-training steps of each network", cli=False, resumable=True)
    seed: int = option(0, "seed of the cohort, split, initialisation and augmentation",
                       cli=False)

    def check(self) -> None:
        side = round(self.tile_size * self.ratio)
        if abs(side / self.ratio - self.tile_size) > 1e-6 or side < 32:
            raise ValueError(f"argument --tile-size: {self.tile_size} must be divisible by "
                             f"1/ratio = {round(1 / self.ratio)} and give blocks of at least "
                             f"32 pixels")
        if self.labels and not self.slides:
            raise ValueError("argument --labels needs --slides")

    @property
    def block_size(self) -> int:
        """Side of the low-resolution image and of each high-resolution block."""
        return round(self.tile_size * self.ratio)


def run_config(config: WsiConfig, class_names: list[str]) -> dict:
    """`config.json` of a run: `config` and the slide classes (index = label)."""
    return {**config.to_dict(), "class_names": list(class_names),
            "num_classes": len(class_names)}
