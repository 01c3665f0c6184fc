"""Segmentation losses (Dice, cross-entropy, CE + Dice) against NumPy float64 references written
from the formulas, and against MONAI / torch when they are installed."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmed.losses import ce_dice_loss, ce_dice_loss_parts, cross_entropy_loss, dice_loss

SHAPES = {"2d": (2, 5, 6, 3), "3d": (2, 3, 4, 5, 4)}  # (B, *spatial, C)
IGNORE = 255


def make_inputs(shape, seed=0, ignore=False):
    """Logits and labels where class 2 is absent from sample 0 (the smooth terms decide there)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=shape).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    labels[0][labels[0] == 2] = 1
    if ignore:
        labels[rng.random(labels.shape) < 0.2] = IGNORE
    return logits, labels


def np_softmax(logits):
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_dice(logits, labels, squared=True, smooth=1e-5, include_background=True, ignore_index=None):
    """Loops over samples and classes; a pixel is used when its label is not ignore_index."""
    probs = np_softmax(logits)
    num_classes = logits.shape[-1]
    losses = []
    for b in range(logits.shape[0]):
        used = np.ones(labels[b].shape, bool) if ignore_index is None else labels[b] != ignore_index
        for c in range(0 if include_background else 1, num_classes):
            p = probs[b, ..., c][used]
            g = (labels[b][used] == c).astype(np.float64)
            size = (p**2).sum() + (g**2).sum() if squared else p.sum() + g.sum()
            losses.append(1.0 - (2.0 * (p * g).sum() + smooth) / (size + smooth))
    return np.mean(losses)


def np_cross_entropy(logits, labels, class_weights=None, ignore_index=None):
    probs = np_softmax(logits).reshape(-1, logits.shape[-1])
    labels = labels.ravel()
    weights = np.ones(logits.shape[-1])
    if class_weights is not None:
        weights = np.asarray(class_weights, np.float64)
    numerator = denominator = 0.0
    for i, y in enumerate(labels):
        if y == ignore_index:
            continue
        numerator += weights[y] * -np.log(probs[i, y])
        denominator += weights[y]
    return numerator / denominator


DICE_CASES = list(itertools.product(SHAPES, [True, False], [True, False], [None, IGNORE]))


@pytest.mark.parametrize("dim,squared,include_background,ignore_index", DICE_CASES)
def test_dice_matches_numpy_formula(dim, squared, include_background, ignore_index):
    logits, labels = make_inputs(SHAPES[dim], ignore=ignore_index is not None)
    kwargs = dict(squared=squared, include_background=include_background, ignore_index=ignore_index)
    got = dice_loss(logits, labels, **kwargs)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), np_dice(logits, labels, **kwargs), rtol=1e-5, atol=1e-6)


def test_absent_class_is_decided_by_smooth():
    # One pixel of class 0, class 1 absent and (almost) never predicted: its Dice loss is
    # 1 - smooth / (sum p^2 + smooth) with sum p^2 ~ e^-40, i.e. ~0; class 0 is predicted right.
    logits = np.array([[[20.0, 0.0]]], np.float32)  # (1, 1, 2)
    labels = np.array([[0]])
    assert float(dice_loss(logits, labels, smooth=1.0)) == pytest.approx(0.0, abs=1e-6)
    # Smoothing so small that it does not rescue the absent class: loss ~1 for class 1.
    got = float(dice_loss(logits, labels, smooth=1e-30))
    assert got == pytest.approx(np_dice(logits, labels, smooth=1e-30), rel=1e-4)
    assert got == pytest.approx(0.5, abs=1e-3)


def test_cross_entropy_and_combined_match_numpy():
    logits, labels = make_inputs(SHAPES["2d"], seed=1, ignore=True)
    weights = np.array([0.2, 1.0, 3.0])
    ce = cross_entropy_loss(logits, labels, class_weights=weights, ignore_index=IGNORE)
    np.testing.assert_allclose(
        float(ce), np_cross_entropy(logits, labels, weights, IGNORE), rtol=1e-5
    )
    plain = cross_entropy_loss(logits[:, 1:], np.clip(labels[:, 1:], 0, 2))
    np.testing.assert_allclose(
        float(plain), np_cross_entropy(logits[:, 1:], np.clip(labels[:, 1:], 0, 2)), rtol=1e-5
    )

    kwargs = dict(
        ce_weight=0.7, dice_weight=1.3, class_weights=weights, ignore_index=IGNORE, squared=False
    )
    total, parts = ce_dice_loss_parts(logits, labels, **kwargs)
    want_dice = np_dice(logits, labels, squared=False, ignore_index=IGNORE)
    np.testing.assert_allclose(float(parts["ce"]), float(ce), rtol=1e-6)
    np.testing.assert_allclose(float(parts["dice"]), want_dice, rtol=1e-5)
    np.testing.assert_allclose(float(total), 0.7 * float(ce) + 1.3 * want_dice, rtol=1e-5)
    assert float(ce_dice_loss(logits, labels, **kwargs)) == float(total)


def test_all_ignored_gives_zero_cross_entropy():
    logits, labels = make_inputs(SHAPES["2d"])
    ce = cross_entropy_loss(logits, np.full_like(labels, IGNORE), ignore_index=IGNORE)
    assert float(ce) == 0.0


@pytest.mark.parametrize("bad", [-1, 3, IGNORE])
def test_out_of_range_labels_make_the_loss_nan(bad):
    logits, labels = make_inputs(SHAPES["2d"])
    labels[0, 0, 0] = bad
    assert np.isnan(float(dice_loss(logits, labels)))
    assert np.isnan(float(cross_entropy_loss(logits, labels)))
    # The same label declared as ignored is fine, and the gradient stays finite either way.
    if bad == IGNORE:
        assert np.isfinite(float(ce_dice_loss(logits, labels, ignore_index=IGNORE)))
    grads = jax.grad(ce_dice_loss)(jnp.asarray(logits), labels)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_bad_shapes_are_rejected():
    logits, labels = make_inputs(SHAPES["2d"])
    with pytest.raises(ValueError, match="labels"):
        dice_loss(logits, labels[..., None])
    with pytest.raises(ValueError, match="2 classes"):
        cross_entropy_loss(logits[..., :1], labels)
    with pytest.raises(ValueError, match="integer"):
        dice_loss(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match="class_weights"):
        cross_entropy_loss(logits, labels, class_weights=np.ones(2))


def test_bfloat16_logits_are_computed_in_float32():
    logits, labels = make_inputs(SHAPES["3d"])
    low = jnp.asarray(logits, jnp.bfloat16)
    rounded = np.asarray(low.astype(jnp.float32))
    for fn in (dice_loss, ce_dice_loss):
        got = fn(low, labels)
        assert got.dtype == jnp.float32 and np.isfinite(float(got))
        np.testing.assert_allclose(float(got), float(fn(rounded, labels)), rtol=1e-6)
    np.testing.assert_allclose(float(dice_loss(low, labels)), np_dice(rounded, labels), rtol=1e-5)


def test_jit_vmap_and_gradients():
    logits, labels = make_inputs(SHAPES["3d"], ignore=True)
    loss = jax.jit(lambda x, y: ce_dice_loss(x, y, ignore_index=IGNORE, include_background=False))
    want = ce_dice_loss(logits, labels, ignore_index=IGNORE, include_background=False)
    np.testing.assert_allclose(float(loss(logits, labels)), float(want), rtol=1e-6)
    # vmap over an outer axis: each slice is a batch of one.
    per_sample = jax.vmap(lambda x, y: dice_loss(x[None], y[None], ignore_index=IGNORE))(
        logits, labels
    )
    want = [np_dice(logits[i : i + 1], labels[i : i + 1], ignore_index=IGNORE) for i in range(2)]
    np.testing.assert_allclose(np.asarray(per_sample), want, rtol=1e-5)
    grads = jax.grad(loss)(jnp.asarray(logits), labels)
    assert grads.shape == logits.shape and np.all(np.isfinite(np.asarray(grads)))
    ignored = labels == IGNORE  # no sum sees those pixels
    assert np.all(np.asarray(grads)[ignored] == 0)


@pytest.mark.parametrize("squared", [True, False])
def test_check_grads(squared):
    logits, labels = make_inputs((2, 3, 2, 3), seed=2, ignore=True)
    with jax.enable_x64(True):
        x = jnp.asarray(logits, jnp.float64)

        @jax.jit
        def loss(z):
            kwargs = dict(
                squared=squared, ignore_index=IGNORE, class_weights=np.array([1.0, 2.0, 0.5])
            )
            return ce_dice_loss(z, labels, **kwargs)

        check_grads(loss, (x,), order=1, modes=("fwd", "rev"))


# ------------------------------------------------------------------------------------------------
# MONAI / torch (not dependencies of jaxmed): same inputs, channels-first on their side.
# ------------------------------------------------------------------------------------------------


def to_torch(logits, labels):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(np.moveaxis(logits, -1, 1).copy())
    y = torch.from_numpy(labels[:, None].astype(np.int64))
    return x, y


@pytest.mark.parametrize("dim,squared,include_background,ignore_index", DICE_CASES)
def test_dice_matches_monai(dim, squared, include_background, ignore_index):
    monai_losses = pytest.importorskip("monai.losses")
    logits, labels = make_inputs(SHAPES[dim], seed=3, ignore=ignore_index is not None)
    reference = monai_losses.DiceLoss(
        softmax=True,
        to_onehot_y=True,
        squared_pred=squared,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        include_background=include_background,
        ignore_index=ignore_index,
    )
    want = float(reference(*to_torch(logits, labels)))
    got = dice_loss(
        logits,
        labels,
        squared=squared,
        include_background=include_background,
        ignore_index=ignore_index,
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", SHAPES)
def test_ce_dice_matches_monai_dice_ce(dim):
    monai_losses = pytest.importorskip("monai.losses")
    logits, labels = make_inputs(SHAPES[dim], seed=4)
    reference = monai_losses.DiceCELoss(
        softmax=True,
        to_onehot_y=True,
        squared_pred=True,
        lambda_ce=0.7,
        lambda_dice=1.3,
        include_background=False,
    )
    want = float(reference(*to_torch(logits, labels)))
    got = ce_dice_loss(logits, labels, ce_weight=0.7, dice_weight=1.3, include_background=False)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_weighted_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    logits, labels = make_inputs(SHAPES["3d"], seed=5, ignore=True)
    weights = np.array([0.2, 1.0, 3.0, 0.7], np.float32)
    x, y = to_torch(logits, labels)
    want = torch.nn.functional.cross_entropy(
        x, y[:, 0], weight=torch.from_numpy(weights), ignore_index=IGNORE
    )
    got = cross_entropy_loss(logits, labels, class_weights=weights, ignore_index=IGNORE)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
