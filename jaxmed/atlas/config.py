"""The feature atlas's configuration (docs/atlas.md): `ClassifierConfig`, the options of
`python -m train.feature_atlas` that define the classifier run (data, network, optimiser; its
`config.json`), and `AtlasOptions`, the options of the stages that read a trained classifier
(node selection, heat maps, libraries, generators, check, movies; the atlas's `atlas.json`),
which a later command may change without retraining the classifier.
"""

from __future__ import annotations

import argparse
import dataclasses

from jaxmed.training import (
    Config,
    bounded,
    comma_ints,
    fraction,
    non_negative,
    option,
    positive,
    positive_int,
    unit_interval,
)

PROGRAM = "python -m train.feature_atlas"
DATA = "data (default: synthetic lesion images with known local features)"
OPTIMISER = "optimiser"
NODES = "feature nodes"
LIBRARIES = "heat maps and libraries"
GENERATORS = "generators"
CHECK = "activation check and movies"

RULES = ("positive", "percentile", "max")
METHODS = ("grad-cam", "cam", "guided-backprop", "deconvnet", "guided-grad-cam")
WINDOW_RULES = ("peaks", "mean")
GENERATOR_KINDS = ("wgan-gp", "vae")


def node_list(text: str) -> tuple[str, ...]:
    """An option type: `'fc:7,block5_conv2:3'` -> `('fc:7', 'block5_conv2:3')`; empty: none."""
    nodes = tuple(v.strip() for v in text.split(",") if v.strip())
    for node in nodes:
        layer, _, index = node.rpartition(":")
        if not layer or not index.isdigit():
            raise argparse.ArgumentTypeError(
                f"expected LAYER:INDEX entries separated by commas (e.g. fc:7), got {node!r}")
    return nodes


def parse_node(name: str) -> tuple[str, int]:
    """`'fc:7'` -> `('fc', 7)`."""
    layer, _, index = name.rpartition(":")
    return layer, int(index)


def node_name(layer: str, index: int) -> str:
    """`('fc', 7)` -> `'fc:7'`, the name a node has in indexes, folders and reports."""
    return f"{layer}:{index}"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(Config):
    """Data, network and optimiser of the classifier (defaults: the CPU-sized run on 64-pixel
    synthetic images; the original design is `image_size=256`, the same filters)."""

    data_dir: str | None = option(None, "folder with one sub-folder of images per class (no "
                                  "annotations needed)", group=DATA)
    image_size: int = option(64, "images are resized to this square size, a multiple of "
                             "2^(number of blocks) (original design: 256)", group=DATA,
                             type=bounded(int, low=16))
    val_fraction: float = option(0.2, "held-out fraction, stratified by class", group=DATA,
                                 type=fraction)
    synthetic_images: int = option(2000, "synthetic dataset size", group=DATA,
                                   type=positive_int)
    augment: bool = option(True, "random flips and 90-degree rotations", group=DATA)

    filters: tuple[int, ...] = option((8, 16, 32, 64, 64), "filters of each block of two 3x3 "
                                      "convolutions and a 2x2 max-pool", type=comma_ints,
                                      metavar="N,N,...")
    hidden: int = option(16, "units of the fully-connected feature layer 'fc'",
                         type=positive_int)

    learning_rate: float = option(1e-3, "AdamW peak learning rate, cosine decay",
                                  group=OPTIMISER, type=positive)
    weight_decay: float = option(1e-4, "AdamW weight decay", group=OPTIMISER,
                                 type=non_negative)
    warmup_steps: int = option(50, "steps of linear learning-rate warm-up", group=OPTIMISER,
                               type=bounded(int, low=0))

    steps: int = option(1200, "total training steps", cli=False, resumable=True)
    seed: int = option(0, "seed of the data, the initialisation and the augmentation",
                       cli=False)

    def check(self) -> None:
        blocks = 2 ** len(self.filters)
        if self.image_size % blocks:
            raise ValueError(f"argument --image-size: {self.image_size} is not a multiple of "
                             f"2^{len(self.filters)} = {blocks} (one 2x2 max-pool per block "
                             "of --filters)")


@dataclasses.dataclass(frozen=True)
class AtlasOptions(Config):
    """What the atlas is made of: nodes, heat maps, windows, generators and the check."""

    layer: str = option("fc", "layer whose nodes are the candidate features (a module path "
                        "of the classifier: fc, block5_conv2, ...)", group=NODES)
    nodes: tuple[str, ...] = option((), "specific candidate nodes LAYER:INDEX,... in any "
                                    "layers, instead of all nodes of --layer", group=NODES,
                                    type=node_list, metavar="LAYER:I,...")
    rule: str = option("percentile", "when a node counts as activated by an image: its value "
                       "> 0, above --percentile of its values over the images, or the "
                       "largest of its layer", group=NODES, choices=RULES)
    percentile: float = option(90.0, "percentile of the 'percentile' rule", group=NODES,
                               type=bounded(float, low=0.0, high=100.0, high_open=True))
    features: int = option(6, "distinct features kept among the candidate nodes (greedy "
                           "max-min over library overlap)", group=NODES, type=positive_int)
    library_images: int = option(600, "images searched for each node's library (the first "
                                 "of the dataset's images; at most all of them)",
                                 group=NODES, type=positive_int)

    method: str = option("grad-cam", "heat-map method", group=LIBRARIES, choices=METHODS)
    conv_layer: str | None = option(None, "conv layer of Grad-CAM and CAM (default: for "
                                    "fully-connected nodes the deepest blockN_conv2 with at "
                                    "least 8x8 positions, for conv nodes their own layer)",
                                    group=LIBRARIES)
    window: int = option(16, "side of the square window, and of the library's crops, in "
                         "pixels (smaller than the image)", group=LIBRARIES,
                         type=bounded(int, low=4))
    window_rule: str = option("peaks", "windows at local maxima of the heat inside them, or "
                              "every window whose mean heat is above --min-score (best "
                              "first, non-overlapping)", group=LIBRARIES, choices=WINDOW_RULES)
    min_score: float = option(0.3, "least mean heat (heat maps scaled to [0, 1]) inside a "
                              "kept window", group=LIBRARIES, type=unit_interval)
    windows_per_image: int = option(2, "most windows kept per (image, node)",
                                    group=LIBRARIES, type=positive_int)
    max_crops: int = option(300, "most crops per library (the best by score)",
                            group=LIBRARIES, type=positive_int)
    min_crops: int = option(16, "least crops for a node to be a candidate feature",
                            group=LIBRARIES, type=positive_int)

    generator: str = option("wgan-gp", "generative model of each feature", group=GENERATORS,
                            choices=GENERATOR_KINDS)
    latent_dim: int = option(4, "latent dimensions (sliders of the explorer)",
                             group=GENERATORS, type=positive_int)
    generator_width: int = option(16, "base width of the generators", group=GENERATORS,
                                  type=positive_int)
    generator_steps: int = option(900, "training steps of the generators (all features "
                                  "together)", group=GENERATORS, type=positive_int,
                                  resumable=True)
    generator_batch: int = option(16, "crops per feature per step", group=GENERATORS,
                                  type=positive_int)

    check_samples: int = option(64, "generated, real and random crops per feature in the "
                                "activation check", group=CHECK, type=positive_int)
    movie_frames: int = option(72, "frames of each feature's latent random walk (GIF and "
                               "MP4); 0: no movies", group=CHECK, type=bounded(int, low=0))
    walk_step: float = option(0.15, "size of one frame's step of the random walk, in prior "
                              "standard deviations", group=CHECK,
                              type=bounded(float, low=0.0, low_open=True))

    def check(self) -> None:
        if self.min_crops > self.max_crops:
            raise ValueError(f"--min-crops {self.min_crops} is above --max-crops "
                             f"{self.max_crops}")

    def library_values(self) -> dict:
        """The options the libraries depend on (a change rebuilds them and the generators)."""
        names = ("layer", "nodes", "rule", "percentile", "features", "library_images",
                 "method", "conv_layer", "window", "window_rule", "min_score",
                 "windows_per_image", "max_crops", "min_crops")
        values = self.to_dict()
        return {k: values[k] for k in names}

    def generator_values(self) -> dict:
        """The options the generators' checkpoints depend on."""
        names = ("generator", "latent_dim", "generator_width", "generator_batch",
                 "generator_steps")
        values = self.to_dict()
        return {k: values[k] for k in names}


def atlas_options_check(options: AtlasOptions, image_size: int) -> None:
    """Raise `ValueError` when the window does not fit the classifier's images."""
    if options.window >= image_size:
        raise ValueError(f"argument --window: {options.window} pixels is not smaller than the "
                         f"images ({image_size} pixels)")
