"""The mapping GAN as a system: its state, its fused training step and its validation step.

One jitted step runs all critic updates of a generator step (a `lax.scan`, unrolled by
default) followed by the generator update, on a batch that carries the data for all of them
(see `jaxmed.mapping_gan.data.StepBatches`). Validation returns per-subject outputs
(`MappingGan.eval_step`, run by `jaxmed.training.evaluate`) that `validation_metrics` reduces
on the host. The losses and the schedule are described in `docs/mapping_gan.md`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import losses
from jaxmed.data import nifti
from jaxmed.metrics import ncc
from jaxmed.models.mapping_gan import Critic, UNet, mapped
from jaxmed.training import TrainState


@dataclasses.dataclass(frozen=True)
class GanConfig:
    """What the step needs besides the networks.

    - `l1_weight`: λ of the generator's λ·mean|M(x)|.
    - `lipschitz`: 'gradient-penalty' (default) or 'clip'.
    - `gp_weight`: weight of the gradient penalty; `clip`: the weight-clipping bound, applied to
      every critic parameter as in the original WGAN. For a TT critic each core is clipped, so
      the effective kernel entries are bounded by about clip^(number of cores): 0.01 flattens
      such a critic (measured score spread ~1e-18 at initialisation); use 0.1-0.5 there, or
      the gradient penalty (the default).
    - `learning_rate`, `b1`, `b2`: Adam for both networks (VA-GAN paper: 1e-3, 0, 0.9; its
      code: 1e-4, which learns several times slower on the synthetic protocol).
    - `decay_start`, `decay_end`: generator steps between which both learning rates fall
      linearly to zero (CycleGAN's schedule); `decay_end=None` keeps them constant. The critic
      updates of a generator step all use that step's rate.
    - `ema`: decay of an exponential moving average of the generator's parameters (Yazıcı et
      al., ICLR 2019), kept as `params['generator_ema']` and used for every inference-mode map
      (validation, figures, apply); 0 disables it. At generator step t the decay used is
      `min(ema, (1 + t) / (10 + t))`, so the average does not stay anchored at the
      initialisation in short runs. The GAN's maps oscillate from step to step (measured on
      the 2-D protocol: validation NCC 0.03 one evaluation after 0.78); the average does not.
    """

    l1_weight: float = 100.0
    lipschitz: str = "gradient-penalty"
    gp_weight: float = 10.0
    clip: float = 0.01
    learning_rate: float = 1e-3
    b1: float = 0.0
    b2: float = 0.9
    decay_start: int = 0
    decay_end: int | None = None
    ema: float = 0.0

    def __post_init__(self):
        if self.lipschitz not in ("gradient-penalty", "clip"):
            raise ValueError("lipschitz must be 'gradient-penalty' or 'clip', "
                             f"got {self.lipschitz!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.decay_end is not None and not 0 <= self.decay_start < self.decay_end:
            raise ValueError("need 0 <= decay_start < decay_end, "
                             f"got {self.decay_start}, {self.decay_end}")

    def rate(self, step: jax.Array | int) -> jax.Array:
        """The learning rate at generator step `step`."""
        if self.decay_end is None:
            return jnp.asarray(self.learning_rate, jnp.float32)
        left = ((self.decay_end - jnp.asarray(step, jnp.float32))
                / (self.decay_end - self.decay_start))
        return self.learning_rate * jnp.clip(left, 0.0, 1.0)

    def ema_decay(self, step: jax.Array | int) -> jax.Array:
        """The averaging decay at generator step `step` (see `ema`)."""
        t = jnp.asarray(step, jnp.float32)
        return jnp.minimum(self.ema, (1.0 + t) / (10.0 + t))

    def optimizer(self, step: jax.Array | int = 0) -> optax.GradientTransformation:
        """Adam at the rate of generator step `step`; its state does not depend on the rate, so
        one state serves every step."""
        return optax.adam(self.rate(step), b1=self.b1, b2=self.b2)


@dataclasses.dataclass(frozen=True)
class MappingGan:
    """The generator, the critic and the step/validation functions built from them."""

    generator: UNet
    critic: Critic
    config: GanConfig
    input_shape: tuple[int, ...]
    """`(*S, C)` of one (padded) input volume; the critic's head depends on it."""
    seed: int = 0
    """Seed of the initial parameters and of the steps' random numbers."""
    crop: tuple[tuple[int, int], ...] = ()
    """`(start, stop)` per spatial axis: where the data lies inside the padded input;
    validation NCC is taken there (empty: the whole input)."""
    unroll_critic: int | bool = 5
    """Critic updates per iteration of the step's `lax.scan` (True: all, no loop). XLA:CPU runs
    convolutions inside a loop up to 8x slower, and compiles unrolled updates slowly (k = 25
    fully unrolled at 4x32^3: 388 s). The default unrolls the ordinary step (k = n_critic = 5)
    completely and loops over chunks of 5 in warm-up steps."""

    # ------------------------------------------------------------------ state

    def init_state(self) -> TrainState:
        """A step-0 state for inputs of `input_shape` (jit-compatible)."""
        example = jnp.zeros((1, *self.input_shape), jnp.float32)
        key = jax.random.key_data(jax.random.key(self.seed))
        g_key, d_key, rng = jax.random.split(jax.random.wrap_key_data(key), 3)
        g_vars = self.generator.init(g_key, example)
        d_vars = self.critic.init(d_key, example)
        tx = self.config.optimizer()
        params = {"generator": g_vars["params"], "critic": d_vars["params"]}
        if self.config.ema:
            params["generator_ema"] = g_vars["params"]  # averaged, never optimised
        return TrainState.create(
            params=params,
            tx={"generator": tx, "critic": tx}, rng=jax.random.key_data(rng),
            batch_stats={"generator": g_vars.get("batch_stats", {}),
                         "critic": d_vars.get("batch_stats", {})})

    # ---------------------------------------------------------- network calls

    def key_feature_map(self, state: TrainState, x: jax.Array, train: bool = False):
        """M(x) `(B, *S, C)`; in training mode also the generator's new BatchNorm statistics.

        Inference mode uses the averaged parameters when the GAN keeps them (`GanConfig.ema`),
        with the live generator's running statistics.
        """
        params = state.params["generator"]
        if not train:
            params = state.params.get("generator_ema", params)
        variables = {"params": params, "batch_stats": state.batch_stats["generator"]}
        if not train:
            return self.generator.apply(variables, x, train=False)
        return self.generator.apply(variables, x, train=True, mutable=["batch_stats"])

    def _critic_fn(self, params, batch_stats, train: bool):
        """`volumes (B, *S, C) -> scores (B,)` for fixed critic variables (statistics discarded)."""

        def score(v):
            variables = {"params": params, "batch_stats": batch_stats}
            if train and batch_stats:
                return self.critic.apply(variables, v, train=True, mutable=["batch_stats"])[0]
            return self.critic.apply(variables, v, train=train)

        return score

    # ------------------------------------------------------------------- step

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]):
        """All critic updates of one generator step, then the generator update.

        **Arguments:** `batch = {'negative': (B, k, *S, C), 'positive': (B, k + 1, *S, C)}`.

        **Returns:** `(state, metrics)`; `metrics['loss']` is the generator's loss.
        """
        negative = jnp.moveaxis(batch["negative"], 1, 0)  # [k, B, *S, C]
        positive = jnp.moveaxis(batch["positive"], 1, 0)  # [k + 1, B, *S, C]
        keys = jax.random.split(state.step_key(), negative.shape[0])
        tx = self.config.optimizer(state.step)

        # The generator is fixed during the critic updates, so all k minibatches are mapped
        # up front, each with its own BatchNorm statistics (their updates are discarded: only
        # the generator update keeps them). Separate calls, not one vmap over k: XLA:CPU runs
        # the vmapped 3-D U-Net 2x slower (655 vs 334 ms for k = 5 at 4x32^3).
        fakes = jnp.stack([mapped(pos, self.key_feature_map(state, pos, train=True)[0])
                           for pos in positive[:-1]])
        fakes = jax.lax.stop_gradient(fakes)  # [k, B, *S, C]
        critic_stats = state.batch_stats["critic"]

        def critic_update(carry, inputs):
            params, opt_state = carry
            neg, fake, key = inputs
            (_, parts), grads = jax.value_and_grad(self._critic_loss, has_aux=True)(
                params, critic_stats, neg, fake, key)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if self.config.lipschitz == "clip":
                params = losses.clip_weights(params, self.config.clip)
            return (params, opt_state), parts

        # Only the critic's parameters and optimiser state travel through the loop. Unrolled
        # (`unroll_critic`): XLA:CPU runs convolutions inside a while loop up to 8x slower than
        # the same ones in straight-line code (3.1 s vs 0.40 s for 5 updates at 4x32^3).
        (critic, critic_opt), critic_parts = jax.lax.scan(
            critic_update, (state.params["critic"], state.opt_state["critic"]),
            (negative, fakes, keys), unroll=self.unroll_critic)
        state = state.replace(params={**state.params, "critic": critic},
                              opt_state={**state.opt_state, "critic": critic_opt})
        generator_objective = jax.value_and_grad(self._generator_loss, has_aux=True)
        (g_loss, (g_parts, g_stats)), g_grads = generator_objective(
            state.params["generator"], state, positive[-1])
        state = state.apply_gradients(tx, g_grads, network="generator")
        state = state.replace(batch_stats={**state.batch_stats, "generator": g_stats})
        state = self.average_generator(state)
        metrics = {"loss": g_loss, "learning_rate": self.config.rate(state.step),
                   **{f"generator_{k}": v for k, v in g_parts.items()},
                   **{k: v[-1] for k, v in critic_parts.items()}}
        return state, metrics

    def average_generator(self, state: TrainState) -> TrainState:
        """Moves the generator's average towards its current parameters (no-op without one)."""
        if "generator_ema" not in state.params:
            return state
        decay = self.config.ema_decay(state.step)
        average = jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p,
                               state.params["generator_ema"], state.params["generator"])
        return state.replace(params={**state.params, "generator_ema": average})

    def _critic_loss(self, critic_params, critic_stats, negative, fake, key):
        score = self._critic_fn(critic_params, critic_stats, train=True)
        w = losses.wasserstein_estimate(score(negative), score(fake))
        loss = -w
        parts = {"critic_loss": loss, "wasserstein": w}
        if self.config.lipschitz == "gradient-penalty":
            gp = losses.gradient_penalty(score, negative, fake, key, self.config.gp_weight)
            loss = loss + gp
            parts = {**parts, "critic_loss": loss, "gradient_penalty": gp}
        return loss, parts

    def _generator_loss(self, generator_params, state: TrainState, positive):
        state = state.replace(params={**state.params, "generator": generator_params})
        m, updates = self.key_feature_map(state, positive, train=True)
        score = self._critic_fn(state.params["critic"], state.batch_stats["critic"], train=False)
        loss, parts = losses.generator_loss(score(mapped(positive, m)), m, self.config.l1_weight)
        return loss, (parts, updates["batch_stats"])


    # ------------------------------------------------------------- validation

    def eval_step(self, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-subject validation outputs (for `jaxmed.training.evaluate`).

        **Arguments:** `batch = {'image': (B, *S, C), 'label': (B,)}` (1 = positive), with
        `'effect': (B, *S, 1)`, the ground-truth maps, when the study has them.

        **Returns:** `critic_score` `(B,)`: D(x + M(x)) of a positive, D(x) of a negative (the
        critic sees what the mapping makes of each group); `l1` `(B,)`: mean |M(x)|; with
        ground truth `ncc` `(B,)`: NCC of M(x) (channels summed) against it inside `crop`;
        `label`, passed through. `validation_metrics` reduces them.
        """
        x, label = batch["image"], batch["label"]
        m = self.key_feature_map(state, x)  # M(x): [B, *S, C]
        is_positive = (label == nifti.POSITIVE).reshape(-1, *(1,) * (x.ndim - 1))
        score = self._critic_fn(state.params["critic"], state.batch_stats["critic"], train=False)
        out = {"critic_score": score(jnp.where(is_positive, mapped(x, m), x)),
               "l1": jnp.mean(jnp.abs(m), axis=tuple(range(1, m.ndim))), "label": label}
        if "effect" in batch:
            region = (Ellipsis, *(slice(start, stop) for start, stop in self.crop), slice(None))
            m_c, truth = m[region], batch["effect"][region]  # [B, *S', C], [B, *S', 1]
            spatial = tuple(range(1, truth.ndim - 1))
            out["ncc"] = ncc(jnp.sum(m_c, -1), truth[..., 0], axis=spatial)
        return out


def validation_metrics(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """The validation metrics from `MappingGan.eval_step`'s outputs over all subjects:
    `val_wasserstein = mean_neg D(x) - mean_pos D(x + M(x))`, `val_l1` = mean over positives
    of mean |M(x)| and, with ground truth, `val_ncc` = mean over positives of the NCC."""
    positive = outputs["label"] == nifti.POSITIVE

    def mean(name: str, rows: np.ndarray) -> float:
        return float(np.mean(outputs[name][rows], dtype=np.float64))

    metrics = {"val_wasserstein": mean("critic_score", ~positive) - mean("critic_score", positive),
               "val_l1": mean("l1", positive)}
    if "ncc" in outputs:
        metrics["val_ncc"] = mean("ncc", positive)
    return metrics


# ----------------------------------------------------------------- configuration


def _norm(name: str | None) -> str | None:
    return None if name in (None, "none") else name


def build_mapping_gan(config: Mapping[str, Any], crop: Sequence[slice] = ()) -> MappingGan:
    """The networks and steps from a run's configuration: `MappingGanConfig.to_dict()` with
    the values derived from the data (`input_shape`, `lr_decay_start`/`_end`), as in
    `config.json`. `crop`: the data's region inside the padded input (`Study.crop`), where
    validation NCC is taken; the whole input by default."""
    dtype = jnp.dtype(config["dtype"])
    generator = UNet(features=tuple(config["generator_features"]),
                     norm=_norm(config["generator_norm"]), dtype=dtype)
    critic = Critic(kind=config["critic"], widths=tuple(config["critic_widths"]),
                    growth_rate=config["critic_growth"], layers_per_block=config["critic_layers"],
                    norm=_norm(config["critic_norm"]),
                    reduced_channels=config["critic_pooling_channels"],
                    head_features=config["critic_head"], tt_rank=config["tt_rank"], dtype=dtype)
    gan_config = GanConfig(l1_weight=config["l1_weight"], lipschitz=config["lipschitz"],
                           gp_weight=config["gp_weight"], clip=config["clip"],
                           learning_rate=config["learning_rate"],
                           decay_start=config.get("lr_decay_start", 0),
                           decay_end=config.get("lr_decay_end"),
                           ema=config.get("generator_ema", 0.0))
    input_shape = tuple(config["input_shape"])
    region = tuple((s.start or 0, n if s.stop is None else s.stop)
                   for s, n in zip(crop, input_shape))
    return MappingGan(generator, critic, gan_config, input_shape=input_shape,
                      seed=config["seed"], crop=region,
                      unroll_critic=config.get("n_critic", 5))
