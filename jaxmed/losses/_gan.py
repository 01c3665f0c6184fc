"""The Wasserstein losses of the mapping GAN (VA-GAN, Baumgartner et al., CVPR 2018), as pure
`jax.numpy` functions; `docs/mapping_gan.md` gives the training procedure around them.

Notation: `D` the critic, `M` the mapping generator, "negative" volumes `x ~ neg` (the target
group, e.g. saline), "positive" volumes `x ~ pos` mapped to `y = x + M(x)`. The objective is

    L_GAN(M, D) = E_neg[D(x)] - E_pos[D(x + M(x))]

which the critic maximises under a 1-Lipschitz constraint (it then estimates the Wasserstein-1
distance between the negative and the mapped distributions) and the generator minimises together
with `lambda * ||M(x)||_1`. Every function returns a quantity to MINIMISE (or to log).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "clip_weights",
    "critic_loss",
    "generator_loss",
    "gradient_penalty",
    "random_interpolates",
    "wasserstein_estimate",
]


def wasserstein_estimate(score_negative: Array, score_mapped: Array) -> Array:
    """`L_GAN = mean(D(neg)) - mean(D(x + M(x)))`, the critic's Wasserstein-1 estimate (to log).

    **Arguments:** `score_negative` `(B_neg,)`, `score_mapped` `(B_pos,)` critic scores.

    **Returns:** a scalar; larger means the critic still tells the groups apart.
    """
    return jnp.mean(score_negative) - jnp.mean(score_mapped)


def critic_loss(score_negative: Array, score_mapped: Array) -> Array:
    """The critic's loss, `mean(D(x + M(x))) - mean(D(neg)) = -L_GAN`.

    The critic MAXIMISES `L_GAN`, so its loss to minimise is the negative. Add the Lipschitz term
    (`gradient_penalty`) or clip the weights after the update (`clip_weights`).

    **Arguments:** `score_negative` `(B_neg,)`, `score_mapped` `(B_pos,)`.

    **Returns:** a scalar.
    """
    return -wasserstein_estimate(score_negative, score_mapped)


def generator_loss(score_mapped: Array, key_feature_map: Array,
                   l1_weight: float) -> tuple[Array, dict[str, Array]]:
    """The generator's loss, `-mean(D(x + M(x))) + l1_weight * mean(|M(x)|)`.

    The generator minimises `L_GAN + lambda ||M||_1`; only the second term of `L_GAN` depends on
    it. `||M||_1` is the mean absolute value over all voxels, channels and samples, so
    `l1_weight` does not depend on the volume size (VA-GAN uses 100 with its mean).

    **Arguments:**

    - `score_mapped`: `(B,)` critic scores of the mapped volumes `x + M(x)`.
    - `key_feature_map`: `M(x)`, `(B, *spatial, C)`.
    - `l1_weight`: `lambda`.

    **Returns:** `(loss, parts)` with `parts = {"adversarial": -mean(D(y)), "l1": mean|M|}`
    (unweighted) for logging.
    """
    adversarial = -jnp.mean(score_mapped)
    l1 = jnp.mean(jnp.abs(key_feature_map))
    return adversarial + l1_weight * l1, {"adversarial": adversarial, "l1": l1}


def random_interpolates(real: Array, fake: Array, key: Array) -> Array:
    """`x_hat = eps * real + (1 - eps) * fake` with one `eps ~ U(0, 1)` per sample.

    `eps = jax.random.uniform(key, (B,) + (1,) * (real.ndim - 1), real.dtype)`, broadcast over
    the sample's positions and channels (a single scalar `eps` for the whole batch was a known
    VA-GAN bug, fixed in 2018).

    **Arguments:** `real`, `fake` of one shape `(B, *spatial, C)`; `key` a PRNG key.

    **Returns:** `x_hat`, the shape of `real`.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have one shape, got {real.shape} and {fake.shape}")
    per_sample = (real.shape[0],) + (1,) * (real.ndim - 1)
    eps = jax.random.uniform(key, per_sample, real.dtype)  # [B, 1, ...]
    return eps * real + (1 - eps) * fake


def _safe_norm(g: Array) -> Array:
    """Euclidean norm over all but the batch axis, with a finite (zero) gradient at `g = 0`.

    The plain `sqrt` has an infinite derivative at 0, which would turn the penalty's parameter
    gradient into NaN for a critic that is flat at some `x_hat`; the double `where` keeps the
    value exact and uses the subgradient 0 there.
    """
    sq = jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=-1)  # [B]
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def gradient_penalty(
    critic_fn: Callable[[Array], Array], real: Array, fake: Array, key: Array, weight: float = 10.0
) -> Array:
    """WGAN-GP penalty `weight * mean_b (||grad_x D(x_hat)_b||_2 - 1)^2` (Gulrajani et al. 2017).

    `x_hat` comes from `random_interpolates(real, fake, key)` (one `eps` per sample). The
    per-sample gradients `d D(x_hat)_b / d x_hat_b` are taken as the gradient of
    `sum_b D(x_hat)_b` (one backward pass instead of B): this equals the per-sample gradients only
    when each score depends on its own sample alone, i.e. a critic without BatchNorm in training
    mode (`Critic(norm='layer')` or `None`). The norm is over all positions and channels of a
    sample, computed in at least float32.

    **Arguments:**

    - `critic_fn`: maps a batch `(B, *spatial, C)` to scores `(B,)` (e.g.
      `lambda v: critic.apply(params, v)`); differentiated twice when the result is.
    - `real`, `fake`: `(B, *spatial, C)`, e.g. negative volumes and mapped positive volumes.
    - `key`: PRNG key for `eps`.
    - `weight`: penalty weight (10 in WGAN-GP and VA-GAN).

    **Returns:** a scalar to add to `critic_loss`.
    """
    x_hat = random_interpolates(real, fake, key)
    grads = jax.grad(lambda v: jnp.sum(critic_fn(v)))(x_hat)  # [B, *S, C]
    norms = _safe_norm(grads.astype(jnp.promote_types(grads.dtype, jnp.float32)))  # [B]
    return weight * jnp.mean(jnp.square(norms - 1.0))


def clip_weights(params: Any, clip: float = 0.01) -> Any:
    """Clips every leaf of `params` to `[-clip, clip]` (the original WGAN's Lipschitz constraint).

    Apply to all critic parameters after each critic update; it replaces the gradient penalty.

    **Arguments:** `params` any pytree of arrays; `clip` > 0.

    **Returns:** the clipped pytree, same structure and dtypes.
    """
    return jax.tree.map(lambda p: jnp.clip(p, -clip, clip), params)
