"""The segmentation program's loss, step and validation on a tiny network."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data.synthetic_kidney import make_kidney_phantoms
from jaxmed.losses import ce_dice_loss
from jaxmed.segmentation.steps import IGNORE, build_segmenter, validation

CONFIG = dict(num_classes=3, image_size=32, depth=18, width=4, output_stride=8, cbam=True,
              ppm=True, aux_weight=0.4, dropout=0.0, dtype="float32", learning_rate=1e-2,
              weight_decay=0.0, steps=40, warmup_steps=1, ce_weight=1.0, dice_weight=1.0, seed=0)


def _data(n=8):
    images, masks = make_kidney_phantoms(n, size=32, seed=1)
    return images, masks.astype(np.int32)


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
    state = segmenter.init_state(0)
    step = jax.jit(segmenter.train_step)
    batch = {"image": jnp.asarray(images), "mask": jnp.asarray(masks)}
    for i in range(CONFIG["steps"]):
        state, metrics = step(state.replace(step=jnp.int32(i)), batch)
    assert float(metrics["main_loss"]) < 1.0
    predicted = np.argmax(np.asarray(segmenter.logits(state, jnp.asarray(images))), -1)
    accuracy = np.mean(predicted == masks)
    assert accuracy > 0.85, accuracy
    assert len(np.unique(predicted)) > 1


def test_validation_equals_dice_of_the_argmax():
    segmenter = build_segmenter(CONFIG)
    images, masks = _data(5)
    state = segmenter.init_state(0)
    metrics = validation(segmenter, images, masks, chunk=2)(state)  # 3 chunks, last padded
    predicted = np.argmax(np.asarray(segmenter.logits(state, jnp.asarray(images))), -1)
    for c in range(3):
        p, g = predicted == c, masks == c
        if p.sum() + g.sum():
            expected = 2 * np.sum(p & g) / (p.sum() + g.sum())
            np.testing.assert_allclose(metrics[f"val_dice_{c}"], expected, rtol=1e-5)
