"""The whole-slide system's steps: shapes at the original design's sizes, the featurizer's
device function against its parts, tile labels from annotations, augmentation, the slide
classifier's standardisation, and the slide metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from jaxmed.data.annotations import Annotation
from jaxmed.errors import InputDataError
from jaxmed.pathology.config import WsiConfig, run_config
from jaxmed.pathology.data import augment, image_labels
from jaxmed.pathology.fusion import fuse_tile, split_tile
from jaxmed.pathology.inference import slide_metrics
from jaxmed.pathology.stain import REFERENCE_STAINS, StainNormalizer, recolour
from jaxmed.pathology.steps import (
    NETWORKS,
    WsiFeaturizer,
    build_classifier,
    build_network,
    feature_size,
    tile_outputs,
)
from jaxmed.training import images_to_unit_range

CLASSES = ["adenocarcinoma", "squamous", "normal"]


def test_tile_outputs_at_the_original_sizes_by_eval_shape():
    values = run_config(WsiConfig(tile_size=1152, width=64), CLASSES)
    nets = {w: build_network(values, w) for w in NETWORKS}
    states = {w: jax.eval_shape(nets[w].init_state) for w in NETWORKS}
    assert nets["low"].image_size == 576
    tiles = jax.ShapeDtypeStruct((2, 1152, 1152, 3), jnp.uint8)
    out = jax.eval_shape(lambda a, b, t: tile_outputs(nets["low"], nets["high"], a, b, t,
                                                      ratio=0.5), states["low"], states["high"],
                         tiles)
    assert out["low_features"].shape == (2, 512)
    assert out["low_scores"].shape == (2,)
    assert out["high_features"].shape == (2, 4, 512)
    assert out["high_scores"].shape == (2, 4)
    assert out["tile_features"].shape == (2, 1024)
    assert feature_size(WsiConfig(width=64)) == 1024
    assert feature_size(WsiConfig(width=64), "low") == 512
    classifier = build_classifier(values)
    assert jax.eval_shape(classifier.init_state).params["head"]["kernel"].shape == (1024, 3)


def _tiny():
    config = WsiConfig(tile_size=64, width=2, hidden=4, stain="macenko")
    values = run_config(config, CLASSES)
    nets = {w: build_network(values, w) for w in NETWORKS}
    states = {w: nets[w].init_state() for w in NETWORKS}
    # Move the attention gates off their uniform start so that the scores differ.
    for w in NETWORKS:
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: v + 2.0 if "attention" in jax.tree_util.keystr(p)
            and "scale" in jax.tree_util.keystr(p) else v, states[w].params)
        states[w] = states[w].replace(params=params)
    return config, nets, states


def test_featurizer_applies_recolour_both_networks_and_fusion():
    config, nets, states = _tiny()
    normalizer = StainNormalizer.default("macenko")
    featurizer = WsiFeaturizer(config, nets, states, normalizer)
    rng = np.random.default_rng(0)
    tiles = rng.integers(60, 250, (3, 64, 64, 3)).astype(np.uint8)
    source = (np.asarray(REFERENCE_STAINS[::-1] * 0 + REFERENCE_STAINS, np.float32),
              np.array([1.2, 0.9], np.float32))
    out = featurizer.apply(jnp.asarray(tiles), source)
    # The same computation from its parts, one step at a time.
    target = normalizer.target
    normalised = recolour(tiles, source[0], source[1], target.stains, target.p99,
                          lam=normalizer.estimator.concentration_lam)
    low, high = split_tile(normalised, 0.5)

    def run(which, images):
        s = states[which]
        return nets[which].model.apply({"params": s.params, "batch_stats": s.batch_stats},
                                       images_to_unit_range(images))

    lo = run("low", low)
    hi = run("high", high.reshape(12, 32, 32, 3))
    np.testing.assert_allclose(out["low_features"], lo["features"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["high_scores"], hi["score"].reshape(3, 4), rtol=1e-5)
    expected = fuse_tile(lo["features"], hi["features"].reshape(3, 4, -1),
                         hi["score"].reshape(3, 4))
    np.testing.assert_allclose(out["tile_features"], expected, rtol=1e-4, atol=1e-5)
    assert np.asarray(out["high_scores"]).std() > 0
    summary = featurizer.summarize({k: np.asarray(v) for k, v in out.items()})
    w = np.asarray(out["low_scores"]) / np.asarray(out["low_scores"]).sum()
    np.testing.assert_allclose(summary["slide_feature"], w @ np.asarray(out["tile_features"]),
                               rtol=1e-5, atol=1e-6)
    attributes = featurizer.attributes()
    assert len(attributes["fingerprint"]) == 16 and attributes["stain"] == "macenko"
    # Other parameters, another fingerprint.
    moved = {**states, "high": states["high"].replace(
        params=jax.tree.map(lambda v: v * 1.01, states["high"].params))}
    assert WsiFeaturizer(config, nets, moved, normalizer).attributes()["fingerprint"] != \
        attributes["fingerprint"]


def _square(x0, y0, x1, y1, name):
    return Annotation(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float), (), name)


def test_image_labels_follow_the_majority_of_the_tissue():
    tiles = np.full((2, 64, 64, 3), 255, np.uint8)  # glass
    tiles[0] = 120  # tile 0: all tissue
    tiles[1, :32, :] = 120  # tile 1: tissue in the top half only
    coords = np.array([[0, 0], [1000, 1000]])
    # Tile 0: squamous covers its top-left block and a bit more (the block's majority, but
    # only 35 % of the tile); the rest is unannotated. Tile 1: adenocarcinoma covers the
    # bottom half, which is glass, and a sliver of the tissue.
    annotations = [_square(0, 0, 38, 38, "squamous"),
                   _square(1000, 1028, 1064, 1064, "adenocarcinoma")]
    low, high = image_labels(tiles, annotations, coords, 64, 0.5, CLASSES, "normal")
    assert low.tolist() == [2, 2]
    assert high[0].tolist() == [1, 2, 2, 2]
    assert high[1].tolist() == [2, 2, -1, -1]  # the bottom blocks hold no tissue
    low, high = image_labels(tiles, annotations, coords, 64, 0.5, CLASSES, "exclude")
    assert low.tolist() == [1, 0]  # only annotated tissue counts
    assert high[0].tolist() == [1, 1, 1, 1]  # a sliver of annotation is all that counts
    with pytest.raises(InputDataError, match="not a class"):
        image_labels(tiles, annotations, coords, 64, 0.5, CLASSES, "stroma")


def test_augment_is_a_dihedral_transform_and_jitters_stains():
    image = np.random.default_rng(1).integers(30, 250, (8, 8, 3)).astype(np.uint8)
    variants = [np.rot90(image, k) for k in range(4)]
    variants += [v[:, ::-1] for v in variants]
    seen = set()
    for seed in range(40):
        out = augment({"image": image, "label": 1}, np.random.default_rng(seed))["image"]
        index = next(i for i, v in enumerate(variants) if np.array_equal(out, v))
        seen.add(index)
    assert seen == set(range(8))
    stains = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=1, keepdims=True)
    jittered = augment({"image": image, "label": 1}, np.random.default_rng(0), stains,
                       jitter=0.05)["image"]
    plain = augment({"image": image, "label": 1}, np.random.default_rng(0))["image"]
    difference = np.abs(jittered.astype(int) - plain.astype(int))
    assert 0 < difference.mean() < 20
    untouched = augment({"image": image, "label": 1}, np.random.default_rng(0), stains,
                        jitter=0.0)["image"]
    np.testing.assert_array_equal(untouched, plain)


def test_slide_classifier_standardises_with_the_training_features():
    values = run_config(WsiConfig(width=2), CLASSES)
    classifier = build_classifier(values)
    x = np.random.default_rng(2).normal(3.0, 2.0, (10, 32)).astype(np.float32)
    state = classifier.init_with(x)
    np.testing.assert_allclose(state.batch_stats["mean"], x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(state.batch_stats["scale"], 1 / x.std(0), rtol=1e-4)
    probabilities = np.asarray(classifier.probabilities(state, jnp.asarray(x)))
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)


def test_slide_metrics_against_mann_whitney():
    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    logits = rng.normal(size=(10, 3)) + 1.5 * np.eye(3)[labels]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    metrics = slide_metrics(p, labels, CLASSES)
    assert metrics["slide_accuracy"] == pytest.approx(100 * np.mean(p.argmax(1) == labels))
    aucs = [mannwhitneyu(p[labels == k, k], p[labels != k, k]).statistic
            / ((labels == k).sum() * (labels != k).sum()) for k in range(3)]
    assert metrics["macro_auc"] == pytest.approx(np.mean(aucs))
    assert metrics["accuracy_normal"] == pytest.approx(
        100 * np.mean(p[labels == 2].argmax(1) == 2))
