"""The training step of a supervised network: one loss, one optimiser, BatchNorm and dropout."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxmed.training._state import TrainState

# (model outputs, batch) -> (scalar loss, {name: scalar})
LossFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def supervised_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_fn: LossFn,
                          *, input_key: str = "image",
                          preprocess: Callable[[jax.Array], jax.Array] | None = None):
    """`(state, batch) -> (state, metrics)` for `fit`: one gradient step on `loss_fn`.

    The model is called as `model.apply(variables, batch[input_key], train=True)` with its
    BatchNorm statistics updated and a `'dropout'` key drawn from `state.step_key()`, so a
    resumed run draws the same dropout masks.

    **Arguments:**

    - `model`: a Linen module whose `__call__` takes `train`.
    - `tx`: the optimiser of `state.opt_state`.
    - `loss_fn`: `(outputs, batch) -> (loss, metrics)`, `loss` a scalar; `metrics` scalars
      reported beside it.
    - `input_key`: the batch entry fed to the model.
    - `preprocess`: applied to `batch[input_key]` on the device first (e.g. uint8 -> float);
      use the same function at inference.
    """

    def train_step(state: TrainState, batch):
        inputs = batch[input_key] if preprocess is None else preprocess(batch[input_key])

        def objective(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            outputs, updates = model.apply(variables, inputs, train=True,
                                           rngs={"dropout": state.step_key()},
                                           mutable=["batch_stats"])
            loss, metrics = loss_fn(outputs, batch)
            return loss, (metrics, updates)

        (loss, (metrics, updates)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params)
        state = state.apply_gradients(tx, grads)
        state = state.replace(batch_stats=updates.get("batch_stats", state.batch_stats))
        return state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}

    return train_step


def images_to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 images `[B, H, W, 3]` -> float32 in [-1, 1], the programs' network input."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def init_supervised_state(model: nn.Module, tx: optax.GradientTransformation,
                          example: jax.Array, seed: int) -> TrainState:
    """A step-0 state of `model` for inputs shaped like `example` (parameters, BatchNorm
    statistics if any, optimiser state; the step keys' base is derived from `seed`)."""
    variables = model.init(jax.random.PRNGKey(seed), example)
    return TrainState.create(params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}),
                             rng=jax.random.PRNGKey(seed + 1))


def warmup_cosine_adamw(learning_rate: float, weight_decay: float, steps: int,
                        warmup_steps: int) -> optax.GradientTransformation:
    """AdamW with a linear warm-up to `learning_rate` and a cosine decay to 0 at `steps`."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=min(warmup_steps, steps - 1), decay_steps=max(steps, 2))
    return optax.adamw(schedule, weight_decay=weight_decay)


@dataclasses.dataclass(frozen=True)
class SupervisedSystem:
    """A network trained with one loss and one optimiser on uint8 images: what the
    segmentation and localisation systems share. A subclass defines `loss` and `eval_step`.

    - `model`: a Linen module taking `(x, train=...)` and returning a dict of outputs.
    - `tx`: its optimiser.
    - `image_size`: the square input size; inputs are `[B, S, S, 3]` uint8 images under the
      batch key `'image'`, mapped to [-1, 1] on the device (`images_to_unit_range`).
    - `seed`: seed of the initialisation and of the step keys.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    image_size: int
    seed: int

    def init_state(self) -> TrainState:
        """The step-0 state (parameters, BatchNorm statistics, optimiser state)."""
        example = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return init_supervised_state(self.model, self.tx, example, self.seed)

    def loss(self, outputs, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`(model outputs, batch) -> (scalar loss, {name: scalar})`."""
        raise NotImplementedError

    @property
    def train_step(self):
        """`(state, batch) -> (state, metrics)` for `fit`."""
        return supervised_train_step(self.model, self.tx, self.loss, input_key="image",
                                     preprocess=images_to_unit_range)

    def outputs(self, state: TrainState, images: jax.Array) -> dict[str, jax.Array]:
        """The model's outputs in inference mode for uint8 images `[B, S, S, 3]`."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return self.model.apply(variables, images_to_unit_range(images), train=False)
