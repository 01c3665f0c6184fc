"""Multi-scale attention fusion: one feature vector per tile, then one per slide
(`docs/pathology.md`), and the slide representations it is compared with.

A tile of side `T` gives one low-resolution image (the tile area-downsampled by `ratio`, side
`s = ratio T`) and `n = (1 / ratio)^2` high-resolution patches (the tile cut into blocks of
side `s`). Network 1 gives the low image a feature `F_L` and a score `w_L`; network 2 gives
each patch a feature `F_H,i` and a score `w_H,i` (scores: the mean of each network's last
spatial attention map, in (0, 1)). Then

    F_patch,i = [F_L ; F_H,i]                                 (2D each, i = 1..n)
    F_tile    = sum_i  ŵ_H,i F_patch,i,   ŵ_H = normalise(w_H over the tile's n patches)
    F_slide   = sum_t  ŵ_L,t F_tile,t,    ŵ_L = normalise(w_L over the slide's tiles)

`normalise` is `w / sum(w)` (weights proportional to the scores; the default) or
`softmax(w / temperature)`. As the weights sum to 1, `F_tile = [F_L ; sum_i ŵ_H,i F_H,i]`.

Slide representations besides the fused one (`AGGREGATIONS`, same per-tile arrays):
`"mean"` of all patch features, a `"random"` patch's feature, the `"representative"` patch
(the one nearest the centre of the largest k-means cluster of patch features), and the
single-scale `"low"` (attention-weighted low features) and `"high"` (attention-weighted
patch features over all the slide's patches).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTINGS = ("sum", "softmax")
AGGREGATIONS = ("attention", "mean", "random", "representative", "low", "high")

__all__ = [
    "AGGREGATIONS",
    "WEIGHTINGS",
    "attention_weights",
    "blocks_per_side",
    "fuse_slide",
    "fuse_tile",
    "kmeans",
    "patch_features",
    "slide_representation",
    "split_tile",
]


def blocks_per_side(ratio: float) -> int:
    """`k = 1 / ratio`, which must be a positive integer: the tile gives `k^2` patches."""
    k = round(1.0 / ratio) if ratio > 0 else 0
    if k < 1 or abs(k * ratio - 1.0) > 1e-9:
        raise ValueError(f"ratio must be 1/k for an integer k >= 1 (0.5, 0.25, ...), got {ratio}")
    return k


def split_tile(tiles: jax.Array, ratio: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """The low-resolution image and the high-resolution patches of each tile.

    **Arguments:**

    - `tiles`: `(B, T, T, C)`, any dtype; `T` divisible by `k = 1 / ratio`.
    - `ratio`: `1 / k` for an integer `k` (0.5: the seed-sized 1152 tile gives a 576 image
      and four 576 patches).

    **Returns:** `(low, high)`: `low` float32 `(B, T/k, T/k, C)`, the mean of each `k x k`
    block of pixels (an exact area downsampling); `high` `(B, k^2, T/k, T/k, C)` of the input
    dtype, the blocks in row-major order (top-left, top-right, bottom-left, bottom-right for
    `k = 2`).
    """
    k = blocks_per_side(ratio)
    b, height, width, c = tiles.shape
    if height != width or height % k:
        raise ValueError(f"tiles must be square with a side divisible by {k}, got shape "
                         f"{tiles.shape}")
    s = height // k
    grid = tiles.reshape(b, k, s, k, s, c)
    high = grid.transpose(0, 1, 3, 2, 4, 5).reshape(b, k * k, s, s, c)  # [B, k², s, s, C]
    pixels = tiles.astype(jnp.float32).reshape(b, s, k, s, k, c)
    low = pixels.mean(axis=(2, 4))  # [B, s, s, C]
    return low, high


def attention_weights(scores: jax.Array, mask: jax.Array | None = None, *,
                      weighting: str = "sum", temperature: float = 1.0) -> jax.Array:
    """Weights over the last axis of `scores`, summing to 1 where any entry is kept.

    `"sum"`: `w_i = s_i / sum_j s_j` (scores are positive: attention means); `"softmax"`:
    `softmax(s / temperature)`. Entries with `mask` False get weight 0 and take no part in the
    normalisation; a row with no kept entry gets all zeros.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    scores = jnp.asarray(scores, jnp.float32)
    keep = jnp.ones(scores.shape, bool) if mask is None else jnp.broadcast_to(mask, scores.shape)
    if weighting == "sum":
        raw = jnp.where(keep, scores, 0.0)
    else:
        logits = jnp.where(keep, scores / temperature, -jnp.inf)
        top = jnp.max(logits, axis=-1, keepdims=True)
        raw = jnp.where(keep, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = jnp.sum(raw, axis=-1, keepdims=True)
    return jnp.where(total > 0, raw / jnp.where(total > 0, total, 1.0), 0.0)


def patch_features(low_features: jax.Array, high_features: jax.Array) -> jax.Array:
    """`F_patch,i = [F_L ; F_H,i]`: `(T, D)` and `(T, n, D')` -> `(T, n, D + D')`."""
    low = jnp.broadcast_to(low_features[:, None, :],
                           high_features.shape[:2] + low_features.shape[-1:])
    return jnp.concatenate([low, high_features], axis=-1)


def fuse_tile(low_features: jax.Array, high_features: jax.Array, high_scores: jax.Array, *,
              weighting: str = "sum", temperature: float = 1.0) -> jax.Array:
    """Tile features `sum_i ŵ_H,i [F_L ; F_H,i]`, `ŵ_H` the patch scores normalised over each
    tile's patches (`attention_weights`).

    **Arguments:** `low_features` `(T, D)`, `high_features` `(T, n, D')`, `high_scores`
    `(T, n)`. **Returns:** `(T, D + D')` float32.
    """
    weights = attention_weights(high_scores, weighting=weighting, temperature=temperature)
    high = jnp.einsum("tn,tnd->td", weights, high_features.astype(jnp.float32))
    # The weights sum to 1, so the low half of every weighted patch feature adds up to F_L.
    return jnp.concatenate([low_features.astype(jnp.float32), high], axis=-1)


def fuse_slide(tile_features: jax.Array, low_scores: jax.Array, mask: jax.Array | None = None,
               *, weighting: str = "sum", temperature: float = 1.0) -> jax.Array:
    """The slide feature `sum_t ŵ_L,t F_tile,t`, `ŵ_L` the low-resolution scores normalised
    over the slide's tiles (those with `mask` True). `(T, F)`, `(T,)` -> `(F,)` float32."""
    weights = attention_weights(low_scores, mask, weighting=weighting, temperature=temperature)
    return weights @ tile_features.astype(jnp.float32)


def kmeans(points: np.ndarray, clusters: int, *, seed: int = 0, iterations: int = 50
           ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding, in NumPy (float64).

    **Returns:** `(centres (k, D), assignment (N,))`, `k = min(clusters, N)`.
    """
    x = np.asarray(points, np.float64)
    n = len(x)
    k = max(1, min(int(clusters), n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: the next centre drawn proportionally to d²
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centres.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
    centres = np.asarray(centres)
    assignment = np.full(n, -1)
    for _ in range(iterations):
        d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        new = np.argmin(d2, axis=1)
        if np.array_equal(new, assignment):
            break
        assignment = new
        for j in range(k):
            if np.any(assignment == j):
                centres[j] = x[assignment == j].mean(axis=0)
    return centres, assignment


def slide_representation(tiles: Mapping[str, np.ndarray], method: str = "attention", *,
                         weighting: str = "sum", temperature: float = 1.0, clusters: int = 4,
                         seed: int = 0) -> np.ndarray:
    """One vector for a slide from its per-tile arrays, by one of `AGGREGATIONS`.

    **Arguments:**

    - `tiles`: `"low_features"` `(T, D)`, `"low_scores"` `(T,)`, `"high_features"`
      `(T, n, D)`, `"high_scores"` `(T, n)` (what extraction writes per slide).
    - `method`: `"attention"` (the fused `F_slide`, 2D), `"mean"` (mean of the `T n` patch
      features, 2D), `"random"` (one patch feature drawn with `seed`, 2D),
      `"representative"` (the patch feature nearest the centre of the largest of `clusters`
      k-means clusters, 2D), `"low"` (`sum_t ŵ_L,t F_L,t`, D), `"high"` (`sum ŵ F_H` over
      all patches, weights normalised over the slide, D).
    - `weighting`, `temperature`: see `attention_weights`.

    **Returns:** float32 vector.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"method must be one of {AGGREGATIONS}, got {method!r}")
    low = jnp.asarray(tiles["low_features"], jnp.float32)
    high = jnp.asarray(tiles["high_features"], jnp.float32)
    low_scores = jnp.asarray(tiles["low_scores"])
    high_scores = jnp.asarray(tiles["high_scores"])
    options = dict(weighting=weighting, temperature=temperature)
    if method == "attention":
        out = fuse_slide(fuse_tile(low, high, high_scores, **options), low_scores, **options)
    elif method == "low":
        out = fuse_slide(low, low_scores, **options)
    elif method == "high":
        out = fuse_slide(high.reshape(-1, high.shape[-1]), high_scores.reshape(-1), **options)
    else:
        patches = np.asarray(patch_features(low, high)).reshape(-1, low.shape[-1]
                                                                + high.shape[-1])
        if method == "mean":
            out = patches.mean(axis=0)
        elif method == "random":
            out = patches[np.random.default_rng(seed).integers(len(patches))]
        else:
            centres, assignment = kmeans(patches, clusters, seed=seed)
            largest = np.argmax(np.bincount(assignment, minlength=len(centres)))
            members = np.flatnonzero(assignment == largest)
            nearest = np.argmin(((patches[members] - centres[largest]) ** 2).sum(-1))
            out = patches[members[nearest]]
    return np.asarray(out, np.float32)
