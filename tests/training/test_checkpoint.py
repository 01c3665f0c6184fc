"""Orbax checkpoints: latest-N and best-by-metric retention, atomicity."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed.training import Checkpoints, TrainState, make_mesh, replicated_sharding


def _state(value: float) -> TrainState:
    params = {"w": jnp.full((3,), value), "b": jnp.array(value)}
    return TrainState.create(params=params, tx=optax.adam(1e-3), rng=jax.random.PRNGKey(0))


def _abstract():
    sharding = replicated_sharding(make_mesh())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        jax.eval_shape(lambda: _state(0.0)))


def _steps(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_latest_n_are_kept_and_restore_with_data_position(tmp_path):
    ckpt = Checkpoints(str(tmp_path), keep=2)
    for step in range(1, 6):
        ckpt.save(step, _state(float(step)), {"next_index": step * 10})
    ckpt.close()
    assert _steps(tmp_path / "checkpoints") == [4, 5]
    reopened = Checkpoints(str(tmp_path), keep=2)
    assert reopened.latest_step() == 5
    state, position = reopened.restore(5, _abstract())
    np.testing.assert_array_equal(state.params["w"], np.full(3, 5.0, np.float32))
    assert position == {"next_index": 50}
    assert state.params["w"].sharding.is_fully_replicated
    reopened.close()


@pytest.mark.parametrize("mode, values, best", [
    ("max", [0.2, 0.5, 0.4, 0.7, 0.6], (0.7, 4)),
    ("min", [0.2, 0.5, 0.1, 0.7, float("nan")], (0.1, 3)),
])
def test_only_the_best_by_metric_is_kept(tmp_path, mode, values, best):
    ckpt = Checkpoints(str(tmp_path), keep=1, best_metric="val_ncc", best_mode=mode)
    saved = [ckpt.save_best(step, _state(v), {"val_ncc": v, "other": 0.0})
             for step, v in enumerate(values, start=1)]
    ckpt.close()
    assert saved[0] and not saved[-1]  # NaN or a worse value is never saved
    assert _steps(tmp_path / "best") == [best[1]]
    reopened = Checkpoints(str(tmp_path), keep=1, best_metric="val_ncc", best_mode=mode)
    assert reopened.best_value() == pytest.approx(best[0])
    assert not reopened.is_better(best[0])
    step, state = reopened.restore_best(_abstract())
    assert step == best[1]
    np.testing.assert_allclose(state.params["b"], best[0])
    reopened.close()


def test_best_metric_missing_from_eval_is_an_error(tmp_path):
    ckpt = Checkpoints(str(tmp_path), keep=1, best_metric="val_ncc")
    with pytest.raises(KeyError, match="val_ncc"):
        ckpt.save_best(1, _state(0.0), {"val_loss": 1.0})
    ckpt.close()


def test_unfinalised_write_is_not_taken_as_latest(tmp_path):
    """A write interrupted before Orbax's rename leaves `<step>.orbax-checkpoint-
    tmp-<n>`; reopening ignores (and removes) it."""
    ckpt = Checkpoints(str(tmp_path), keep=3)
    ckpt.save(4, _state(4.0), {"next_index": 4})
    ckpt.close()
    half = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"
    (half / "state").mkdir(parents=True)
    (half / "state" / "partial").write_bytes(b"\0" * 10)
    reopened = Checkpoints(str(tmp_path), keep=3)
    assert reopened.latest_step() == 4
    state, _ = reopened.restore(4, _abstract())
    assert float(state.params["b"]) == 4.0
    reopened.close()
    assert not half.exists()
