"""The segmentation system's loss, step and validation on a tiny network."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data.synthetic_kidney import make_kidney_phantoms
from jaxmed.losses import ce_dice_loss
from jaxmed.metrics import confusion_matrix, segmentation_scores
from jaxmed.segmentation.config import SegmentationConfig
from jaxmed.segmentation.data import IGNORE
from jaxmed.segmentation.steps import build_segmenter, eval_batch_size, flat_scores, validation
from jaxmed.training import SupervisedSystem, read_run_config

CONFIG = SegmentationConfig(image_size=32, width=4, dropout=0.0, learning_rate=1e-2,
                            weight_decay=0.0, steps=40, warmup_steps=1)


def _data(n=8):
    images, masks = make_kidney_phantoms(n, size=32, seed=1)
    return images, masks.astype(np.int32)


def test_builds_a_supervised_system_from_the_config_or_its_json(tmp_path):
    segmenter = build_segmenter(CONFIG)
    assert isinstance(segmenter, SupervisedSystem)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    again = build_segmenter(read_run_config(tmp_path, "test"))
    assert (again.model, again.image_size, again.seed) == (segmenter.model, 32, 0)


def test_loss_adds_the_weighted_auxiliary_term():
    segmenter = build_segmenter(CONFIG)
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    aux = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    mask = rng.integers(0, 3, size=(2, 8, 8)).astype(np.int32)
    mask[0, :2] = IGNORE
    total, parts = segmenter.loss({"logits": logits, "aux_logits": aux}, {"mask": mask})
    main = ce_dice_loss(logits, mask, ignore_index=IGNORE)
    second = ce_dice_loss(aux, mask, ignore_index=IGNORE)
    np.testing.assert_allclose(parts["main_loss"], main, rtol=1e-6)
    np.testing.assert_allclose(total, main + 0.4 * second, rtol=1e-6)


def test_training_then_inference_mode_agree():
    """Inference uses BatchNorm's running statistics, so they must be those of the inputs the
    network trains on (the same preprocessing in both modes)."""
    segmenter = build_segmenter(CONFIG)
    images, masks = _data()
    state = segmenter.init_state()
    step = jax.jit(segmenter.train_step)
    batch = {"image": jnp.asarray(images), "mask": jnp.asarray(masks)}
    for i in range(CONFIG.steps):
        state, metrics = step(state.replace(step=jnp.int32(i)), batch)
    assert float(metrics["main_loss"]) < 1.0
    predicted = np.argmax(np.asarray(segmenter.logits(state, jnp.asarray(images))), -1)
    accuracy = np.mean(predicted == masks)
    assert accuracy > 0.85, accuracy
    assert len(np.unique(predicted)) > 1


def test_eval_step_counts_each_image_and_nothing_of_padded_rows():
    segmenter = build_segmenter(CONFIG)
    images, masks = _data(3)
    masks[0, :4] = IGNORE
    state = segmenter.init_state()
    batch = {"image": images, "mask": masks, "index": np.array([0, 1, -1], np.int32)}
    confusion = np.asarray(segmenter.eval_step(state, batch)["confusion"])  # [3, C, C]
    predicted = np.argmax(np.asarray(segmenter.logits(state, jnp.asarray(images))), -1)
    for i in range(2):
        expected = confusion_matrix(predicted[i], masks[i], 3, ignore_index=IGNORE)
        np.testing.assert_array_equal(confusion[i], expected)
    assert confusion[0].sum() == 32 * 32 - 4 * 32
    assert confusion[2].sum() == 0


def test_validation_equals_dice_of_the_argmax():
    segmenter = build_segmenter(CONFIG)
    count = eval_batch_size() + 5  # two batches, the last padded
    images, masks = _data(count)
    state = segmenter.init_state()
    metrics = validation(segmenter, {"image": images, "mask": masks}, count)(state)
    # The argmax of batches shaped as evaluate's (the last one padded with its last image).
    batches = np.minimum(np.arange(2 * eval_batch_size()), count - 1).reshape(2, -1)
    predicted = np.concatenate([np.argmax(np.asarray(
        segmenter.logits(state, jnp.asarray(images[rows]))), -1) for rows in batches])[:count]
    expected = flat_scores(segmentation_scores(confusion_matrix(predicted, masks, 3)), "val_")
    assert sorted(metrics) == sorted(expected)
    assert {"val_mean_dice", "val_dice_2", "val_iou_0", "val_accuracy"} <= set(metrics)
    np.testing.assert_array_equal([metrics[k] for k in sorted(metrics)],
                                  [expected[k] for k in sorted(metrics)])
    for c in range(3):
        p, g = predicted == c, masks == c
        if p.sum() + g.sum():
            np.testing.assert_allclose(metrics[f"val_dice_{c}"],
                                       2 * np.sum(p & g) / (p.sum() + g.sum()), rtol=1e-5)
