"""The whole-slide system's networks and steps (docs/pathology.md): the two attention
ResNets pre-trained on tile labels (network 1 on low-resolution tiles, network 2 on
high-resolution blocks), the featurizer that the extraction runs over every tile (stain
normalisation, both networks, tile fusion), and the slide classifier on slide features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmed.data.slide import Slide
from jaxmed.models.attention_resnet import AttentionResNet18
from jaxmed.pathology.config import WsiConfig
from jaxmed.pathology.fusion import fuse_slide, fuse_tile, slide_representation, split_tile
from jaxmed.pathology.stain import StainNormalizer, recolour
from jaxmed.pathology.tiles import TileGrid
from jaxmed.training import (
    SupervisedSystem,
    TrainState,
    init_supervised_state,
    supervised_train_step,
    warmup_cosine_adamw,
)
from jaxmed.weights import pretrained_loader

NETWORKS = ("low", "high")


# ---------------------------------------------------------------------------- tile networks


@dataclasses.dataclass(frozen=True)
class TileNetwork(SupervisedSystem):
    """One feature network with its pre-training head (`model`: an `AttentionResNet18` with
    `num_classes`), trained with cross-entropy on image labels."""

    label_smoothing: float = 0.0

    def loss(self, outputs, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Softmax cross-entropy (optionally label-smoothed) and the batch's accuracy."""
        logits = outputs["logits"].astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]),
                                      self.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": accuracy}

    def eval_step(self, state: TrainState, batch: Mapping[str, jax.Array]
                  ) -> dict[str, jax.Array]:
        """Per image: class probabilities and the attention score."""
        outputs = self.outputs(state, batch["image"])
        return {"probabilities": jax.nn.softmax(outputs["logits"].astype(jnp.float32)),
                "score": outputs["score"]}


def compute_dtype(config: WsiConfig):
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def build_network(values: Mapping[str, Any], which: str) -> TileNetwork:
    """Network `which` (`'low'` or `'high'`, the same architecture) of a run's `config.json`
    values (`WsiConfig`'s fields and `num_classes`); the seed differs per network."""
    config = WsiConfig.from_dict(dict(values))
    model = AttentionResNet18(width=config.width, num_classes=values["num_classes"],
                              hidden=config.hidden, dtype=compute_dtype(config))
    tx = warmup_cosine_adamw(config.learning_rate, config.weight_decay, config.steps,
                             config.warmup_steps)
    return TileNetwork(model=model, tx=tx, image_size=config.block_size,
                       seed=config.seed + NETWORKS.index(which),
                       label_smoothing=config.label_smoothing,
                       imagenet_input=config.pretrained is not None)


def initial_states(networks: Mapping[str, TileNetwork], pretrained: str | None
                   ) -> dict[str, Callable[[], TrainState]]:
    """What `fit` starts each network from: its `init_state`, or with `pretrained` (a
    torchvision ResNet-18 safetensors file, read once for both) the same with the stem and
    layers 1-4 loaded from it; a bad file is refused here, before anything is written."""
    if pretrained is None:
        return {which: net.init_state for which, net in networks.items()}
    load = pretrained_loader(pretrained, "resnet")
    return {which: net.init_state_with(load) for which, net in networks.items()}


# ---------------------------------------------------------------------------- featurizer


def tile_outputs(low_net: TileNetwork, high_net: TileNetwork, low_state: TrainState,
                 high_state: TrainState, tiles: jax.Array, *, ratio: float,
                 weighting: str = "sum", temperature: float = 1.0) -> dict[str, jax.Array]:
    """Everything extraction keeps per tile, for uint8 tiles `[B, T, T, 3]` (already
    normalised): `low_features [B, D]`, `low_scores [B]`, `high_features [B, n, D]`,
    `high_scores [B, n]`, `tile_features [B, 2D]` (`fusion.fuse_tile`), all float32."""
    low, high = split_tile(tiles, ratio)  # low: [B, s, s, 3] float; high: [B, n, s, s, 3]
    b, n = high.shape[:2]
    lo = low_net.model.apply({"params": low_state.params, "batch_stats": low_state.batch_stats},
                             low_net.preprocess(low), train=False)
    hi = high_net.model.apply(
        {"params": high_state.params, "batch_stats": high_state.batch_stats},
        high_net.preprocess(high.reshape(b * n, *high.shape[2:])), train=False)
    high_features = hi["features"].astype(jnp.float32).reshape(b, n, -1)
    high_scores = hi["score"].reshape(b, n)
    low_features = lo["features"].astype(jnp.float32)
    return {"low_features": low_features, "low_scores": lo["score"],
            "high_features": high_features, "high_scores": high_scores,
            "tile_features": fuse_tile(low_features, high_features, high_scores,
                                       weighting=weighting, temperature=temperature)}


class WsiFeaturizer:
    """The device work of extraction (`jaxmed.pathology.extract.Featurizer`): per slide a
    stain source estimate (`prepare`), per batch of tiles SPCN recolouring onto the run's
    target, both networks and the tile fusion (`apply`, jitted, replicated parameters on this
    host's devices), per slide the fused slide feature (`summarize`).

    **Arguments:** the run's `config` (a `WsiConfig`), the two networks and their trained
    states, and the run's `normalizer` (None: tiles are used as read).
    """

    def __init__(self, config: WsiConfig, networks: Mapping[str, TileNetwork],
                 states: Mapping[str, TrainState], normalizer: StainNormalizer | None):
        self.config = config
        self.tile_size = config.tile_size
        self.normalizer = normalizer
        mesh = Mesh(np.array(jax.local_devices()), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        self._states = jax.device_put({k: states[k] for k in NETWORKS}, replicated)
        self._fingerprint = _fingerprint(config, states)
        target = normalizer.target if normalizer is not None else None
        lam = normalizer.estimator.concentration_lam if normalizer is not None else 0.0

        def apply(states, tiles, source):
            if target is not None:
                tiles = recolour(tiles, source[0], source[1], target.stains, target.p99,
                                 lam=lam)
            return tile_outputs(networks["low"], networks["high"], states["low"],
                                states["high"], tiles, ratio=config.ratio,
                                weighting=config.weighting, temperature=config.temperature)

        self._apply = jax.jit(apply)

    def prepare(self, slide: Slide, grid: TileGrid):
        """The slide's stain profile, estimated from tiles sampled on its grid."""
        if self.normalizer is None:
            return (np.zeros((2, 3), np.float32), np.ones(2, np.float32))
        self.normalizer.fit_source_slide(slide, tiles=grid)
        source = self.normalizer.source
        return (source.stains, source.p99)

    def apply(self, tiles: jax.Array, context) -> dict[str, jax.Array]:
        return self._apply(self._states, tiles, context)

    def summarize(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The slide feature `F_slide` (`fusion.fuse_slide`)."""
        feature = fuse_slide(outputs["tile_features"], outputs["low_scores"],
                             weighting=self.config.weighting,
                             temperature=self.config.temperature)
        return {"slide_feature": np.asarray(feature)}

    def attributes(self) -> dict[str, Any]:
        keys = ("ratio", "stain", "weighting", "temperature", "width", "dtype")
        return {"fingerprint": self._fingerprint, **{k: getattr(self.config, k) for k in keys}}


def _fingerprint(config: WsiConfig, states: Mapping[str, TrainState]) -> str:
    """A hash of what decides the features: the tiling/normalisation/fusion options and the
    parameters and statistics of both networks."""
    digest = hashlib.sha256()
    keys = ("tile_size", "ratio", "stain", "stain_target", "weighting", "temperature",
            "width", "hidden", "dtype", "min_corners")
    digest.update(json.dumps({k: getattr(config, k) for k in keys}, sort_keys=True).encode())
    for which in NETWORKS:
        for leaf in jax.tree.leaves((states[which].params, states[which].batch_stats)):
            digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- slide classifier


class SlideClassifierNet(nn.Module):
    """A linear classifier on standardised slide features: `Dense((x - mean) * scale)`; the
    training slides' mean and inverse standard deviation are fixed variables
    (`'batch_stats'`, set by `SlideClassifier.init_with`)."""

    num_classes: int
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,))
        scale = self.variable("batch_stats", "scale", jnp.ones, (self.features,))
        z = (x.astype(jnp.float32) - mean.value) * scale.value
        return {"logits": nn.Dense(self.num_classes, name="head")(z)}


@dataclasses.dataclass(frozen=True)
class SlideClassifier:
    """The slide classifier of a run, trained full-batch on the training slides' features
    with a weighted cross-entropy (`batch['weight']` 0 on padding rows)."""

    model: SlideClassifierNet
    tx: optax.GradientTransformation
    seed: int

    def init_state(self) -> TrainState:
        example = jnp.zeros((1, self.model.features), jnp.float32)
        return init_supervised_state(self.model, self.tx, example, self.seed)

    def init_with(self, features: np.ndarray) -> TrainState:
        """The step-0 state standardising by the mean and standard deviation of `features`
        `(N, F)` (the training slides)."""
        state = self.init_state()
        mean = features.mean(axis=0)
        scale = 1.0 / np.maximum(features.std(axis=0), 1e-6)
        return state.replace(batch_stats={"mean": jnp.asarray(mean, jnp.float32),
                                          "scale": jnp.asarray(scale, jnp.float32)})

    def loss(self, outputs, batch):
        logits = outputs["logits"].astype(jnp.float32)
        weight = batch["weight"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        loss = jnp.sum(weight * ce) / jnp.maximum(jnp.sum(weight), 1.0)
        correct = (jnp.argmax(logits, -1) == batch["label"]) * weight
        return loss, {"accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(weight), 1.0)}

    @property
    def train_step(self):
        return supervised_train_step(self.model, self.tx, self.loss, input_key="feature")

    def probabilities(self, state: TrainState, features: jax.Array) -> jax.Array:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return jax.nn.softmax(self.model.apply(variables, features)["logits"])


def feature_size(config: WsiConfig, aggregation: str | None = None) -> int:
    """Length of the slide representation: `8 w` for the single-scale ones, `16 w` else."""
    aggregation = aggregation or config.aggregation
    return 8 * config.width * (1 if aggregation in ("low", "high") else 2)


def build_classifier(values: Mapping[str, Any]) -> SlideClassifier:
    """The slide classifier of a run's `config.json` values."""
    config = WsiConfig.from_dict(dict(values))
    model = SlideClassifierNet(values["num_classes"], feature_size(config))
    tx = optax.adamw(config.classifier_learning_rate,
                     weight_decay=config.classifier_weight_decay)
    return SlideClassifier(model=model, tx=tx, seed=config.seed + 7)


def slide_vector(features: Mapping[str, np.ndarray], config: WsiConfig,
                 aggregation: str | None = None, *, seed: int = 0) -> np.ndarray:
    """A slide's representation for the classifier from its extracted per-tile arrays
    (`fusion.slide_representation` with the run's options); the fused one is the stored
    `slide_feature`."""
    aggregation = aggregation or config.aggregation
    if aggregation == "attention" and "slide_feature" in features:
        return np.asarray(features["slide_feature"], np.float32)
    return slide_representation(features, aggregation, weighting=config.weighting,
                                temperature=config.temperature, clusters=config.clusters,
                                seed=seed)
