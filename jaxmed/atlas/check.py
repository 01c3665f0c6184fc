"""Do generated crops still trigger their feature node? The activation check (docs/atlas.md).

A crop is judged in context: it is pasted, in place of the window it covers, into `C` images —
source images of the node's library at the windows their real crops came from, and neutral
backgrounds (no feature at all) at the same windows — and the node is read from the
classifier on each. A crop's *activation rate* is the share of its contexts in which the node
counts as activated by the atlas's rule. Three kinds of crop go through the same contexts:

- `generated`: drawn from the node's generator (latents from its prior);
- `real`: the node's library crops;
- `random`: windows at uniformly random positions of the same source images.

The report per node: the mean rate of each kind, the median rate of the real crops, and
`passes` = generated mean rate ≥ median real rate (generated crops activate their node at least
as often as the median real crop does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("generated", "real", "random")


def paste(images: jax.Array, crops: jax.Array, y0: jax.Array, x0: jax.Array) -> jax.Array:
    """`images` `[M, S, S, 3]` with `crops` `[M, s, s, 3]` written over the windows whose top-left
    corners are `(y0, x0)` `[M]` (clipped into the image, as `lax.dynamic_update_slice`)."""

    def one(image, crop, y, x):
        return jax.lax.dynamic_update_slice(image, crop.astype(image.dtype), (y, x, 0))

    return jax.vmap(one)(images, crops, y0, x0)


@dataclasses.dataclass(frozen=True)
class Contexts:
    """The `C` images a node's crops are pasted into, and where: `images` uint8 `[C, S, S, 3]`,
    `y0`, `x0` int32 `[C]` (top-left corners of the window of side `size`)."""

    images: np.ndarray
    y0: np.ndarray
    x0: np.ndarray


def contexts(sources: np.ndarray, windows: np.ndarray, backgrounds: np.ndarray, count: int,
             rng: np.random.Generator) -> Contexts:
    """`count` contexts: half (rounded up) library source images at their windows, the rest
    neutral backgrounds at library windows.

    **Arguments:**

    - `sources`: uint8 `[n, S, S, 3]` the source image of each library crop.
    - `windows`: int `[n, 2]` the `(y0, x0)` of each library crop.
    - `backgrounds`: uint8 `[m, S, S, 3]` images without any feature.
    - `count`: `C`.
    """
    in_source = -(-count // 2)
    pick = rng.choice(len(sources), size=in_source, replace=len(sources) < in_source)
    on_ground = rng.choice(len(windows), size=count - in_source)
    ground = rng.choice(len(backgrounds), size=count - in_source)
    images = np.concatenate([sources[pick], backgrounds[ground]])
    where = np.concatenate([windows[pick], windows[on_ground]]).astype(np.int32)
    return Contexts(images=images, y0=where[:, 0], x0=where[:, 1])


def random_crops(sources: np.ndarray, size: int, count: int, rng: np.random.Generator
                 ) -> np.ndarray:
    """uint8 `[count, size, size, 3]` windows at uniformly random positions of random
    `sources` images."""
    side = sources.shape[1]
    pick = rng.integers(len(sources), size=count)
    y0 = rng.integers(side - size + 1, size=count)
    x0 = rng.integers(side - size + 1, size=count)
    return np.stack([sources[i, y:y + size, x:x + size] for i, y, x in zip(pick, y0, x0)])


def activation_rates(activated: Callable[[jax.Array], jax.Array], crops: np.ndarray,
                     where: Contexts, *, batch: int = 256) -> np.ndarray:
    """float `[K]`: for each crop, the share of the `C` contexts in which it activates the
    node; `activated(images uint8 [B, S, S, 3]) -> bool [B]` reads the node."""
    k, c = len(crops), len(where.images)
    crop_index, context_index = np.divmod(np.arange(k * c), c)
    hits = np.zeros(k * c, bool)
    for start in range(0, k * c, batch):
        rows = slice(start, start + batch)
        ci = context_index[rows]
        pasted = paste(jnp.asarray(where.images[ci]), jnp.asarray(crops[crop_index[rows]]),
                       jnp.asarray(where.y0[ci]), jnp.asarray(where.x0[ci]))
        hits[rows] = np.asarray(activated(pasted))
    return hits.reshape(k, c).mean(axis=1)


@dataclasses.dataclass(frozen=True)
class NodeCheck:
    """The check of one node: mean activation rate per kind of crop, and the real crops'
    median rate."""

    node: str
    rates: dict[str, float]
    real_median: float

    @property
    def passes(self) -> bool:
        """Generated crops activate the node at least as often as the median real crop."""
        return self.rates["generated"] >= self.real_median

    def row(self) -> dict:
        return {"node": self.node, **{f"{k}_rate": v for k, v in self.rates.items()},
                "real_median_rate": self.real_median, "passes": self.passes}


def check_node(node: str, activated: Callable[[jax.Array], jax.Array],
               crops: dict[str, np.ndarray], where: Contexts) -> NodeCheck:
    """The check of one node from its crops of each kind in `KINDS` (uint8
    `[K, s, s, 3]` each) pasted into `where`."""
    rates = {kind: activation_rates(activated, crops[kind], where) for kind in KINDS}
    return NodeCheck(node=node, rates={k: float(r.mean()) for k, r in rates.items()},
                     real_median=float(np.median(rates["real"])))
