"""The generic supervised step and the run config / restore helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed.errors import InputDataError
from jaxmed.training import (
    Checkpoints,
    TrainState,
    prepare_run_config,
    read_run_config,
    restore_trained,
    supervised_train_step,
)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
        return {"logits": nn.Dense(2)(x)}


def _loss(outputs, batch):
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], batch["label"])
    return loss.mean(), {"accuracy": jnp.mean(outputs["logits"].argmax(-1) == batch["label"])}


def _setup():
    model, tx = _Net(), optax.adam(3e-2)
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    batch = {"image": x, "label": (x[:, 0] + x[:, 1] > 0).astype(np.int32)}
    variables = model.init(jax.random.PRNGKey(0), x)
    state = TrainState.create(params=variables["params"], tx=tx,
                              batch_stats=variables["batch_stats"], rng=jax.random.PRNGKey(1))
    return model, tx, state, batch


def test_step_learns_updates_batch_stats_and_is_deterministic_per_step():
    model, tx, state, batch = _setup()
    step = jax.jit(supervised_train_step(model, tx, _loss))
    first, metrics = step(state, batch)
    again, _ = step(state, batch)
    # Same state and step: the same dropout mask, so the same update.
    np.testing.assert_array_equal(first.params["Dense_0"]["kernel"],
                                  again.params["Dense_0"]["kernel"])
    assert not np.allclose(first.batch_stats["BatchNorm_0"]["mean"],
                           state.batch_stats["BatchNorm_0"]["mean"])
    assert {"loss", "accuracy", "grad_norm"} <= set(metrics)
    # A later step draws a different dropout mask.
    later, _ = step(state.replace(step=state.step + 1), batch)
    assert not np.allclose(later.params["Dense_0"]["kernel"], first.params["Dense_0"]["kernel"])
    losses = []
    for i in range(40):
        state, metrics = step(state.replace(step=jnp.int32(i)), batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_run_config_round_trip_and_restore(tmp_path):
    model, tx, state, _ = _setup()
    prepare_run_config(tmp_path, {"seed": 3, "widths": [1, 2]})
    assert read_run_config(tmp_path, "prog") == {"seed": 3, "widths": [1, 2]}
    with pytest.raises(InputDataError, match="config.json"):
        read_run_config(tmp_path / "other", "prog")
    with pytest.raises(InputDataError, match="no checkpoint"):
        restore_trained(tmp_path, lambda: state)
    checkpoints = Checkpoints(str(tmp_path), keep=2, best_metric="acc", best_mode="max")
    bumped = state.replace(step=jnp.int32(7))
    checkpoints.save(7, bumped, {"position": 0})
    checkpoints.save_best(5, state, {"acc": 0.5})
    checkpoints.wait()
    checkpoints.close()
    latest = restore_trained(tmp_path, lambda: state, which="latest")
    best = restore_trained(tmp_path, lambda: state, which="best", best_metric="acc")
    assert int(latest.step) == 7 and int(best.step) == 0
    np.testing.assert_array_equal(best.params["Dense_1"]["kernel"],
                                  state.params["Dense_1"]["kernel"])
