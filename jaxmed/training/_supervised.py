"""The training step of a supervised network: one loss, one optimiser, BatchNorm and dropout."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
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
