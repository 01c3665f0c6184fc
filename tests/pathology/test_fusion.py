"""Multi-scale attention fusion against the formulas written out in NumPy."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import softmax

from jaxmed.pathology.fusion import (
    AGGREGATIONS,
    attention_weights,
    blocks_per_side,
    fuse_slide,
    fuse_tile,
    kmeans,
    patch_features,
    slide_representation,
    split_tile,
)


@pytest.mark.parametrize("ratio, k", [(0.5, 2), (0.25, 4), (1.0, 1)])
def test_split_tile_blocks_and_area_mean(ratio, k):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    low, high = split_tile(jnp.asarray(tiles), ratio)
    s = 32 // k
    assert low.shape == (3, s, s, 3) and low.dtype == jnp.float32
    assert high.shape == (3, k * k, s, s, 3) and high.dtype == jnp.uint8
    for b in range(3):
        expected = cv2.resize(tiles[b].astype(np.float32), (s, s), interpolation=cv2.INTER_AREA)
        np.testing.assert_allclose(np.asarray(low[b]), expected, rtol=1e-5, atol=1e-3)
        for i in range(k):
            for j in range(k):  # row-major: block (i, j) is number i k + j
                np.testing.assert_array_equal(np.asarray(high[b, i * k + j]),
                                              tiles[b, i * s:(i + 1) * s, j * s:(j + 1) * s])


def test_split_tile_rejects_bad_ratio_and_size():
    with pytest.raises(ValueError, match="1/k"):
        blocks_per_side(0.3)
    with pytest.raises(ValueError, match="divisible by 2"):
        split_tile(jnp.zeros((1, 33, 33, 3)), 0.5)


def test_attention_weights_sum_softmax_and_mask():
    scores = np.array([[0.2, 0.5, 0.3, 0.9], [0.1, 0.1, 0.7, 0.4]], np.float32)
    mask = np.array([[True, True, False, True], [False, False, False, False]])
    np.testing.assert_allclose(attention_weights(scores), scores / scores.sum(1, keepdims=True),
                               rtol=1e-6)
    np.testing.assert_allclose(attention_weights(scores, weighting="softmax", temperature=0.1),
                               softmax(scores / 0.1, axis=1), rtol=1e-5)
    masked = np.asarray(attention_weights(scores, mask))
    kept = scores[0] * mask[0]
    np.testing.assert_allclose(masked[0], kept / kept.sum(), rtol=1e-6)
    np.testing.assert_array_equal(masked[1], 0.0)  # nothing kept: all zero, no NaN
    soft = np.asarray(attention_weights(scores, mask, weighting="softmax"))
    expected = np.where(mask[0], np.exp(scores[0]), 0.0)
    np.testing.assert_allclose(soft[0], expected / expected.sum(), rtol=1e-5)
    np.testing.assert_array_equal(soft[1], 0.0)
    with pytest.raises(ValueError, match="weighting"):
        attention_weights(scores, weighting="max")


def _explicit_tile(low, high, high_scores):
    """sum_i ŵ_i [F_L ; F_H,i], with every concatenation written out."""
    out = []
    for t in range(len(low)):
        w = high_scores[t] / high_scores[t].sum()
        patches = [np.concatenate([low[t], high[t, i]]) for i in range(high.shape[1])]
        out.append(sum(w[i] * patches[i] for i in range(len(patches))))
    return np.stack(out)


def test_fuse_tile_and_slide_match_the_written_out_formulas():
    rng = np.random.default_rng(1)
    low = rng.normal(size=(5, 6)).astype(np.float32)
    high = rng.normal(size=(5, 4, 6)).astype(np.float32)
    high_scores = rng.uniform(0.05, 1, (5, 4)).astype(np.float32)
    low_scores = rng.uniform(0.05, 1, 5).astype(np.float32)
    tiles = _explicit_tile(low, high, high_scores)
    np.testing.assert_allclose(fuse_tile(low, high, high_scores), tiles, rtol=1e-5, atol=1e-6)
    w = low_scores / low_scores.sum()
    slide = sum(w[t] * tiles[t] for t in range(5))
    np.testing.assert_allclose(fuse_slide(tiles, low_scores), slide, rtol=1e-5, atol=1e-6)
    # Jitted, the same.
    jitted = jax.jit(lambda a, b, c, d: fuse_slide(fuse_tile(a, b, c), d))
    np.testing.assert_allclose(jitted(low, high, high_scores, low_scores), slide, rtol=1e-5,
                               atol=1e-6)
    mask = np.array([True, False, True, True, False])
    wm = np.where(mask, low_scores, 0) / low_scores[mask].sum()
    np.testing.assert_allclose(fuse_slide(tiles, low_scores, mask),
                               sum(wm[t] * tiles[t] for t in range(5)), rtol=1e-5, atol=1e-6)


def test_patch_features_concatenate_low_with_each_block():
    low = np.arange(6, dtype=np.float32).reshape(2, 3)
    high = -np.arange(16, dtype=np.float32).reshape(2, 4, 2)
    out = np.asarray(patch_features(low, high))
    assert out.shape == (2, 4, 5)
    np.testing.assert_array_equal(out[1, 2], np.concatenate([low[1], high[1, 2]]))


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(2)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = (30, 12, 8)
    points = np.concatenate([c + rng.normal(0, 0.3, (n, 2)) for c, n in zip(centres, sizes)])
    truth = np.repeat(np.arange(3), sizes)
    found, assignment = kmeans(points, 3, seed=0)
    for j in range(3):  # each true cluster is exactly one found cluster
        assert len(set(assignment[truth == j])) == 1
        np.testing.assert_allclose(found[assignment[truth == j][0]],
                                   points[truth == j].mean(0), atol=1e-9)


def _tiles(rng, t=6, n=4, d=3):
    return {"low_features": rng.normal(size=(t, d)).astype(np.float32),
            "low_scores": rng.uniform(0.1, 1, t).astype(np.float32),
            "high_features": rng.normal(size=(t, n, d)).astype(np.float32),
            "high_scores": rng.uniform(0.1, 1, (t, n)).astype(np.float32)}


def test_slide_representations_against_numpy():
    rng = np.random.default_rng(3)
    tiles = _tiles(rng)
    low, high = tiles["low_features"], tiles["high_features"]
    patches = np.concatenate([np.repeat(low[:, None], 4, 1), high], -1).reshape(-1, 6)
    out = {m: slide_representation(tiles, m, seed=5, clusters=2) for m in AGGREGATIONS}
    w_low = tiles["low_scores"] / tiles["low_scores"].sum()
    np.testing.assert_allclose(out["low"], w_low @ low, rtol=1e-5)
    w_high = tiles["high_scores"].reshape(-1) / tiles["high_scores"].sum()
    np.testing.assert_allclose(out["high"], w_high @ high.reshape(-1, 3), rtol=1e-5)
    np.testing.assert_allclose(out["mean"], patches.mean(0), rtol=1e-5, atol=1e-7)
    assert any(np.allclose(out["random"], p) for p in patches)
    assert any(np.allclose(out["representative"], p) for p in patches)
    tile_features = _explicit_tile(low, high, tiles["high_scores"])
    np.testing.assert_allclose(out["attention"], w_low @ tile_features, rtol=1e-5, atol=1e-6)
    assert {v.shape for k, v in out.items() if k in ("low", "high")} == {(3,)}
    with pytest.raises(ValueError, match="method"):
        slide_representation(tiles, "max")


def test_representative_patch_is_nearest_the_largest_cluster_centre():
    rng = np.random.default_rng(4)
    t, d = 10, 2
    tiles = _tiles(rng, t=t, n=4, d=d)
    # Low features identical, high features in two groups: 32 patches near (5, 5), 8 near
    # (-5, -5); the representative is the patch nearest the big group's mean.
    tiles["low_features"][:] = 0.0
    high = np.where(np.arange(t)[:, None, None] < 8, 5.0, -5.0) + rng.normal(0, 0.5, (t, 4, d))
    tiles["high_features"] = high.astype(np.float32)
    out = slide_representation(tiles, "representative", clusters=2)
    big = tiles["high_features"][:8].reshape(-1, d)
    nearest = big[np.argmin(((big - big.mean(0)) ** 2).sum(1))]
    np.testing.assert_allclose(out, np.concatenate([[0.0, 0.0], nearest]), rtol=1e-6)
