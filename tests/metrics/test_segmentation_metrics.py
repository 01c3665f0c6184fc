"""Confusion matrix and Dice / IoU scores against NumPy references written from the definitions."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.metrics._segmentation import confusion_matrix, segmentation_scores

IGNORE = 255


def np_confusion(predictions, labels, num_classes, ignore_index=None):
    """One pixel at a time."""
    out = np.zeros((num_classes, num_classes), np.int64)
    for t, p in zip(labels.ravel(), predictions.ravel()):
        if t != ignore_index:
            out[t, p] += 1
    return out


def np_scores(confusion):
    """Per class from the set sizes: |T|, |P|, |T and P|; no score when both sets are empty."""
    dice, iou = [], []
    for c in range(confusion.shape[0]):
        both, truth, predicted = confusion[c, c], confusion[c].sum(), confusion[:, c].sum()
        union = truth + predicted - both
        dice.append(2 * both / (truth + predicted) if union else np.nan)
        iou.append(both / union if union else np.nan)
    return np.array(dice), np.array(iou)


def make_batch(shape, num_classes=4, seed=0, ignore=False):
    """Labels and noisy predictions; class 3 never occurs in either."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes - 1, size=shape)
    predictions = np.where(
        rng.random(shape) < 0.7, labels, rng.integers(0, num_classes - 1, size=shape)
    )
    if ignore:
        labels[rng.random(shape) < 0.2] = IGNORE
    return predictions, labels


@pytest.mark.parametrize("shape", [(2, 7, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("ignore", [False, True])
def test_confusion_matrix_matches_pixel_loop(shape, ignore):
    ignore_index = IGNORE if ignore else None
    predictions, labels = make_batch(shape, ignore=ignore)
    want = np_confusion(predictions, labels, 4, ignore_index)
    got = confusion_matrix(predictions, labels, 4, ignore_index=ignore_index)
    assert got.shape == (4, 4) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)
    jitted = jax.jit(confusion_matrix, static_argnums=2, static_argnames="ignore_index")
    np.testing.assert_array_equal(
        np.asarray(jitted(predictions, labels, 4, ignore_index=ignore_index)), want
    )
    if ignore:
        assert want.sum() == np.sum(labels != IGNORE)


def test_uint8_masks_with_ignore_label():
    predictions, labels = make_batch((2, 6, 6), ignore=True)
    got = confusion_matrix(
        predictions.astype(np.uint8), labels.astype(np.uint8), 4, ignore_index=IGNORE
    )
    np.testing.assert_array_equal(np.asarray(got), np_confusion(predictions, labels, 4, IGNORE))


def test_vmap_gives_one_matrix_per_sample():
    predictions, labels = make_batch((3, 4, 5))
    got = jax.vmap(lambda p, t: confusion_matrix(p, t, 4))(predictions, labels)
    for i in range(3):
        np.testing.assert_array_equal(
            np.asarray(got[i]), np_confusion(predictions[i], labels[i], 4)
        )


@pytest.mark.parametrize("where,value", [("labels", IGNORE), ("labels", -1), ("predictions", 4)])
def test_out_of_range_values_raise(where, value):
    predictions, labels = make_batch((2, 4, 4))
    (labels if where == "labels" else predictions)[0, 1, 2] = value
    with pytest.raises(ValueError, match="1 pixel"):
        confusion_matrix(predictions, labels, 4)
    # Under jit the check runs in a host callback and surfaces when the result is computed.
    jitted = jax.jit(confusion_matrix, static_argnums=2)
    with pytest.raises(Exception, match="outside"):
        jax.block_until_ready(jitted(predictions, labels, 4))


def test_scores_match_definitions_and_skip_absent_class():
    predictions, labels = make_batch((2, 9, 8), seed=1)
    confusion = np_confusion(predictions, labels, 4)
    want_dice, want_iou = np_scores(confusion)
    assert np.isnan(want_dice[3]) and np.isnan(want_iou[3])  # class 3 is never present
    got = segmentation_scores(confusion)
    np.testing.assert_allclose(np.asarray(got["dice"]), want_dice, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got["iou"]), want_iou, rtol=1e-6)
    np.testing.assert_allclose(float(got["mean_dice"]), np.mean(want_dice[:3]), rtol=1e-6)
    np.testing.assert_allclose(float(got["mean_iou"]), np.mean(want_iou[:3]), rtol=1e-6)
    np.testing.assert_allclose(float(got["accuracy"]), np.mean(predictions == labels), rtol=1e-6)
    foreground = segmentation_scores(confusion, include_background=False)
    np.testing.assert_allclose(float(foreground["mean_dice"]), np.mean(want_dice[1:3]), rtol=1e-6)


def test_scores_by_hand():
    # Truth 0 0 0 1 1, prediction 0 1 2 1 1. Class 0: |T| 3, |P| 1, TP 1 -> Dice 2/4, IoU 1/3.
    # Class 1: |T| 2, |P| 3, TP 2 -> 4/5, 2/3. Class 2 predicted but absent: 0 (not NaN).
    # Class 3 absent from both: NaN, left out of the mean.
    confusion = np.array([[1, 1, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    got = segmentation_scores(confusion)
    np.testing.assert_allclose(np.asarray(got["dice"])[:3], [1 / 2, 4 / 5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got["iou"])[:3], [1 / 3, 2 / 3, 0.0], rtol=1e-6)
    assert np.isnan(np.asarray(got["dice"])[3]) and np.isnan(np.asarray(got["iou"])[3])
    np.testing.assert_allclose(float(got["mean_dice"]), (1 / 2 + 4 / 5) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(got["accuracy"]), 3 / 5, rtol=1e-6)


def test_empty_matrix_gives_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = segmentation_scores(jnp.zeros((3, 3), jnp.int32))
    assert all(np.all(np.isnan(np.asarray(v))) for v in got.values())


def test_accumulating_batches_equals_concatenation():
    batches = [make_batch((2, 5, 6), seed=s, ignore=True) for s in range(3)]
    step = jax.jit(lambda p, t: confusion_matrix(p, t, 4, ignore_index=IGNORE))
    total = jnp.zeros((4, 4), jnp.int32)
    for predictions, labels in batches:
        total = total + step(predictions, labels)
    all_predictions = np.concatenate([b[0] for b in batches])
    all_labels = np.concatenate([b[1] for b in batches])
    whole = confusion_matrix(all_predictions, all_labels, 4, ignore_index=IGNORE)
    np.testing.assert_array_equal(np.asarray(total), np.asarray(whole))
    accumulated, concatenated = segmentation_scores(total), segmentation_scores(whole)
    for key in accumulated:
        np.testing.assert_array_equal(np.asarray(accumulated[key]), np.asarray(concatenated[key]))
    want_dice, _ = np_scores(np_confusion(all_predictions, all_labels, 4, IGNORE))
    np.testing.assert_allclose(np.asarray(accumulated["dice"]), want_dice, rtol=1e-6)


def test_bad_inputs_are_rejected():
    predictions, labels = make_batch((2, 4, 4))
    with pytest.raises(ValueError, match="one shape"):
        confusion_matrix(predictions[:1], labels, 4)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(predictions.astype(np.float32), labels, 4)
    with pytest.raises(ValueError, match="square"):
        segmentation_scores(np.zeros((3, 4)))
