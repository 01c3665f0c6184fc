"""Losses as pure `jax.numpy` functions; each returns a quantity to minimise (or to log).

- Mapping GAN (`docs/mapping_gan.md`): `wasserstein_estimate`, `critic_loss`, `generator_loss`,
  and the critic's Lipschitz constraints `gradient_penalty` (with `random_interpolates`) and
  `clip_weights`.
- Segmentation (`docs/segmentation.md`): `dice_loss`, `cross_entropy_loss` and their weighted
  sum `ce_dice_loss` (`ce_dice_loss_parts` also returns the parts).
"""

from jaxmed.losses._gan import clip_weights as clip_weights
from jaxmed.losses._gan import critic_loss as critic_loss
from jaxmed.losses._gan import generator_loss as generator_loss
from jaxmed.losses._gan import gradient_penalty as gradient_penalty
from jaxmed.losses._gan import random_interpolates as random_interpolates
from jaxmed.losses._gan import wasserstein_estimate as wasserstein_estimate
from jaxmed.losses._segmentation import ce_dice_loss as ce_dice_loss
from jaxmed.losses._segmentation import ce_dice_loss_parts as ce_dice_loss_parts
from jaxmed.losses._segmentation import cross_entropy_loss as cross_entropy_loss
from jaxmed.losses._segmentation import dice_loss as dice_loss

__all__ = [
    "ce_dice_loss",
    "ce_dice_loss_parts",
    "clip_weights",
    "critic_loss",
    "cross_entropy_loss",
    "dice_loss",
    "generator_loss",
    "gradient_penalty",
    "random_interpolates",
    "wasserstein_estimate",
]
