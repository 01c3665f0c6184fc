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


# torchvision's ImageNet statistics of RGB in [0, 1], which its pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_imagenet(images: jax.Array) -> jax.Array:
    """uint8 RGB images `[B, H, W, 3]` -> float32 `(x / 255 - mean) / std` per channel with
    ImageNet's mean and std: the input of networks started from ImageNet weights."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


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
      batch key `'image'`, mapped on the device by `preprocess`.
    - `seed`: seed of the initialisation and of the step keys.
    - `imagenet_input` (keyword): `preprocess` standardises with ImageNet's mean and std
      (`images_to_imagenet`, for pretrained weights) instead of mapping to [-1, 1]
      (`images_to_unit_range`).
    """

    model: nn.Module
    tx: optax.GradientTransformation
    image_size: int
    seed: int
    imagenet_input: bool = dataclasses.field(default=False, kw_only=True)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """uint8 images `[B, S, S, 3]` -> the network's float32 input."""
        return (images_to_imagenet if self.imagenet_input else images_to_unit_range)(images)

    def init_state(self) -> TrainState:
        """The step-0 state (parameters, BatchNorm statistics, optimiser state)."""
        example = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return init_supervised_state(self.model, self.tx, example, self.seed)

    def init_state_with(self, load: Callable[[dict[str, Any]], dict[str, Any]]
                        ) -> Callable[[], TrainState]:
        """`init_state` with the step-0 variables `{'params', 'batch_stats'}` passed through
        `load` (e.g. pretrained weights put in place; the optimiser state is made for the
        result). `load` runs once here on the variables' shapes, so a bad weights file is
        refused before a run writes anything; the returned function does the real work when
        `fit` starts afresh (not when it resumes)."""
        shapes = jax.eval_shape(self.init_state)
        load({"params": shapes.params, "batch_stats": shapes.batch_stats})

        def init() -> TrainState:
            state = self.init_state()
            variables = jax.tree.map(jnp.asarray, load({"params": state.params,
                                                        "batch_stats": state.batch_stats}))
            return TrainState.create(params=variables["params"], tx=self.tx, rng=state.rng,
                                     batch_stats=variables["batch_stats"])

        return init

    def loss(self, outputs, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`(model outputs, batch) -> (scalar loss, {name: scalar})`."""
        raise NotImplementedError

    @property
    def train_step(self):
        """`(state, batch) -> (state, metrics)` for `fit`."""
        return supervised_train_step(self.model, self.tx, self.loss, input_key="image",
                                     preprocess=self.preprocess)

    def outputs(self, state: TrainState, images: jax.Array) -> dict[str, jax.Array]:
        """The model's outputs in inference mode for uint8 images `[B, S, S, 3]`."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return self.model.apply(variables, self.preprocess(images), train=False)
