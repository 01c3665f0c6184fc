"""The mapping GAN's fused training step and its validation.

One jitted step runs all critic updates of a generator step (a `lax.scan`, unrolled by
default) followed by the generator update, on a batch that carries the data for all of them (see
`jaxmed.mapping_gan.data.StepBatches`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxmed import losses
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
            raise ValueError(f"lipschitz must be 'gradient-penalty' or 'clip', got {self.lipschitz!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.decay_end is not None and not 0 <= self.decay_start < self.decay_end:
            raise ValueError(f"need 0 <= decay_start < decay_end, got {self.decay_start}, {self.decay_end}")

    def rate(self, step: jax.Array | int) -> jax.Array:
        """The learning rate at generator step `step`."""
        if self.decay_end is None:
            return jnp.asarray(self.learning_rate, jnp.float32)
        left = (self.decay_end - jnp.asarray(step, jnp.float32)) / (self.decay_end - self.decay_start)
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
    unroll_critic: int | bool = 5
    """Critic updates per iteration of the step's `lax.scan` (True: all, no loop). XLA:CPU runs
    convolutions inside a loop up to 8x slower, and compiles unrolled updates slowly (k = 25
    fully unrolled at 4x32^3: 388 s). The default unrolls the ordinary step (k = n_critic = 5)
    completely and loops over chunks of 5 in warm-up steps."""

    # ------------------------------------------------------------------ state

    def init_state(self, example: jax.Array, seed: int) -> TrainState:
        """A step-0 state for inputs shaped like `example` `(B, *S, C)` (jit-compatible)."""
        key = jax.random.key_data(jax.random.key(seed))
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
        fakes = jnp.stack([mapped(pos, self.key_feature_map(state, pos, train=True)[0]) for pos in positive[:-1]])
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
            critic_update, (state.params["critic"], state.opt_state["critic"]), (negative, fakes, keys),
            unroll=self.unroll_critic)
        state = state.replace(params={**state.params, "critic": critic},
                              opt_state={**state.opt_state, "critic": critic_opt})
        (g_loss, (g_parts, g_stats)), g_grads = jax.value_and_grad(self._generator_loss, has_aux=True)(
            state.params["generator"], state, positive[-1])
        state = state.apply_gradients(tx, g_grads, network="generator")
        state = state.replace(batch_stats={**state.batch_stats, "generator": g_stats})
        state = self.average_generator(state)
        metrics = {"loss": g_loss, "learning_rate": self.config.rate(state.step), **{f"generator_{k}": v for k, v in g_parts.items()},
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

    def validation_sums(self, state: TrainState, data: dict[str, jax.Array],
                        crop: tuple[slice, ...] = ()) -> dict[str, jax.Array]:
        """Per-group sums over the subjects in `data` (either group may be absent), so that
        chunks of different sizes and unequal groups combine exactly (`combine_validation`).

        `positive` (and `effect`): Σ D(x + M(x)), Σ mean|M(x)| and, with ground truth, Σ NCC
        of M(x) (channels summed, padding cropped) against the one-channel ground truth.
        `negative`: Σ D(x).
        """
        score = self._critic_fn(state.params["critic"], state.batch_stats["critic"], train=False)
        out = {}
        if "negative" in data:
            out["negative_score"] = jnp.sum(score(data["negative"]))
        if "positive" in data:
            positive = data["positive"]
            m = self.key_feature_map(state, positive)
            per_subject = tuple(range(1, m.ndim))
            out["mapped_score"] = jnp.sum(score(mapped(positive, m)))
            out["l1"] = jnp.sum(jnp.mean(jnp.abs(m), axis=per_subject))
            if "effect" in data:
                m_c, gt = m[(Ellipsis, *crop, slice(None))], data["effect"][(Ellipsis, *crop, slice(None))]
                out["ncc"] = jnp.sum(ncc(jnp.sum(m_c, -1), gt[..., 0], axis=tuple(range(1, gt.ndim - 1))))
        return out

    def validation_metrics(self, state: TrainState, data: dict[str, jax.Array],
                           crop: tuple[slice, ...] = ()) -> dict[str, jax.Array]:
        """Validation Wasserstein estimate, mean |M(x)| and, with ground truth, mean NCC of M(x)."""
        sums = self.validation_sums(state, data, crop)
        return combine_validation(sums, len(data["positive"]), len(data["negative"]))


def combine_validation(sums: dict, positives: int, negatives: int) -> dict:
    """Means from `MappingGan.validation_sums` totals over `positives` and `negatives` subjects."""
    out = {"val_wasserstein": sums["negative_score"] / negatives - sums["mapped_score"] / positives,
           "val_l1": sums["l1"] / positives}
    if "ncc" in sums:
        out["val_ncc"] = sums["ncc"] / positives
    return out


# ----------------------------------------------------------------- configuration


def build_mapping_gan(config: dict) -> MappingGan:
    """The networks and step from a run's saved configuration (see `train/mapping_gan.py`)."""
    dtype = jnp.dtype(config["dtype"])
    generator = UNet(features=tuple(config["generator_features"]), norm=config["generator_norm"], dtype=dtype)
    critic = Critic(kind=config["critic"], widths=tuple(config["critic_widths"]),
                    growth_rate=config["critic_growth"], layers_per_block=config["critic_layers"],
                    norm=config["critic_norm"], reduced_channels=config["critic_pooling_channels"],
                    head_features=config["critic_head"], tt_rank=config["tt_rank"], dtype=dtype)
    gan_config = GanConfig(l1_weight=config["l1_weight"], lipschitz=config["lipschitz"],
                           gp_weight=config["gp_weight"], clip=config["clip"],
                           learning_rate=config["learning_rate"],
                           decay_start=config.get("lr_decay_start", 0), decay_end=config.get("lr_decay_end"),
                           ema=config.get("generator_ema", 0.0))
    return MappingGan(generator, critic, gan_config, unroll_critic=config.get("n_critic", 5))


def chunked_validation(gan: MappingGan, data: dict, crop: tuple[slice, ...], chunk: int):
    """`state -> metrics` over all validation subjects, each group in chunks of at most `chunk`
    subjects (one jitted call each), so memory stays bounded for large validation sets."""
    sums_fn = jax.jit(lambda state, part: gan.validation_sums(state, part, crop))
    groups = {"positive": [k for k in ("positive", "effect") if k in data], "negative": ["negative"]}
    counts = {g: len(data[g]) for g in groups}

    def evaluate(state):
        totals = {}
        for group, keys in groups.items():
            for s in range(0, counts[group], chunk):
                for name, value in sums_fn(state, {k: data[k][s:s + chunk] for k in keys}).items():
                    totals[name] = totals.get(name, 0.0) + value
        return combine_validation(totals, counts["positive"], counts["negative"])

    return evaluate
