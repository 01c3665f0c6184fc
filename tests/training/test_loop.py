"""`fit` in-process on a toy regression: resume, NaN stop, SIGTERM, logs."""

import functools
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed import training
from jaxmed.training import (
    ArraySource,
    Checkpoints,
    Preempted,
    TrainingDiverged,
    TrainState,
    evaluate,
    fit,
    make_batches,
    make_mesh,
)

TX = optax.adam(0.05)
TRUE_W = np.array([1.0, -2.0, 3.0, 0.5], np.float32)


def _source(n=64):
    x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    return ArraySource(x=x, y=(x @ TRUE_W + 0.1).astype(np.float32))


def _init_state():
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    return TrainState.create(params=params, tx=TX, rng=jax.random.PRNGKey(0))


def _loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


def _train_step(state, batch, nan_at=None):
    loss, grads = jax.value_and_grad(_loss)(state.params, batch)
    # Per-step noise: a resumed run must draw the same numbers.
    grads["w"] = grads["w"] + 0.01 * jax.random.normal(state.step_key(), (4,))
    if nan_at is not None:  # loss of step `nan_at` (1-based) is NaN
        loss = jnp.where(state.step + 1 == nan_at, jnp.nan, loss)
    return state.apply_gradients(TX, grads), {"loss": loss}


def _squared_errors(state, batch):
    return {"error": (batch["x"] @ state.params["w"] + state.params["b"] - batch["y"]) ** 2}


def _eval_fn(mesh):
    arrays = _source().arrays
    return lambda state: {"val_loss": float(evaluate(
        _squared_errors, state, arrays, count=64, batch_size=8, mesh=mesh)["error"].mean())}


def _fit(workdir, num_steps, nan_at=None, source=None, **kwargs):
    mesh = make_mesh()
    options = dict(log_every=2, checkpoint_every=5, keep=2, eval_fn=_eval_fn(mesh),
                   eval_every=5, best_metric="val_loss", best_mode="min")
    options.update(kwargs)
    return fit(workdir=str(workdir), init_state=_init_state, mesh=mesh,
               train_step=functools.partial(_train_step, nan_at=nan_at),
               train_data=make_batches(source or _source(), 8, seed=1),
               num_steps=num_steps, progress=False, **options)


def _assert_same_state(a, b):
    jax.tree.map(np.testing.assert_array_equal, training.fetch(a), training.fetch(b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, _fit(workdir, 12)


def test_run_writes_logs_checkpoints_and_best(reference):
    workdir, result = reference
    records = training.read_metrics(str(workdir))
    assert [r["step"] for r in records] == [2, 4, 5, 6, 8, 10, 12]
    assert {"loss", "steps_per_second"} <= set(records[0])
    assert "val_loss" in records[2] and "loss" not in records[2]  # step 5: eval only
    assert {"loss", "val_loss"} <= set(records[-1])                # step 10/12: both
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "12"]
    assert len(os.listdir(workdir / "best")) == 1
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert result.step == 12 and int(result.state.step) == 12
    assert result.eval_metrics["val_loss"] < records[2]["val_loss"]
    np.testing.assert_allclose(result.metrics["loss"], records[-1]["loss"])


def test_resume_after_stop_equals_uninterrupted_run(reference, tmp_path):
    _fit(tmp_path, 7)
    resumed = _fit(tmp_path, 12)
    _assert_same_state(resumed.state, reference[1].state)
    assert [r["step"] for r in training.read_metrics(str(tmp_path))] == [2, 4, 5, 6, 7, 8, 10, 12]


def test_crash_resume_ignores_newer_logs_and_unfinished_writes(reference, tmp_path):
    """A crash after step 5's checkpoint: later checkpoints lost, an unfinished
    write left behind, metrics logged past the checkpoint (the last one cut
    short). The rerun continues from step 5 and reproduces the uninterrupted run."""
    _fit(tmp_path, 12, keep=3)
    for step in ("10", "12"):
        shutil.rmtree(tmp_path / "checkpoints" / step)
    (tmp_path / "checkpoints" / "11.orbax-checkpoint-tmp-42" / "state").mkdir(parents=True)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "lo')  # a record cut short by the crash
    resumed = _fit(tmp_path, 12)
    _assert_same_state(resumed.state, reference[1].state)
    steps = [r["step"] for r in training.read_metrics(str(tmp_path))]
    assert steps == [2, 4, 5, 6, 8, 10, 12]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged) as stop:
        _fit(tmp_path, 20, nan_at=8, log_every=1, checkpoint_every=3, eval_fn=None,
             best_metric=None)
    message = str(stop.value)
    assert "step 8" in message and "step 6" in message and "checkpoints/6" in message
    assert isinstance(stop.value.code, str)  # SystemExit with a message: status 1
    ckpt = Checkpoints(str(tmp_path), keep=2)
    assert ckpt.latest_step() == 6
    abstract = jax.eval_shape(_init_state)
    state, position = ckpt.restore(6, abstract)
    assert int(state.step) == 6 and np.isfinite(state.params["w"]).all()
    assert position["next_index"] == 6
    ckpt.close()


def test_nan_at_an_unlogged_checkpoint_step_is_never_saved(tmp_path):
    with pytest.raises(TrainingDiverged, match="step 8"):
        _fit(tmp_path, 20, nan_at=8, log_every=100, checkpoint_every=4, eval_fn=None,
             best_metric=None)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


class _SigtermAt:
    """A source that sends this process SIGTERM when example `index` is read."""

    def __init__(self, source, index):
        self.source, self.index = source, index

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i == self.index:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.source[i]


def test_sigterm_saves_current_step_and_resume_matches(reference, tmp_path):
    with pytest.raises(Preempted) as stop:
        _fit(tmp_path, 12, source=_SigtermAt(_source(), index=5))
    assert stop.value.code == 0 and 1 <= stop.value.step < 12
    assert str(stop.value.step) in os.listdir(tmp_path / "checkpoints")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    resumed = _fit(tmp_path, 12)
    _assert_same_state(resumed.state, reference[1].state)


def test_metrics_leave_the_device_only_on_logging_steps(tmp_path, monkeypatch):
    calls = []
    fetch = training._loop.fetch
    monkeypatch.setattr(training._loop, "fetch", lambda t: calls.append(1) or fetch(t))
    _fit(tmp_path, 40, log_every=10, checkpoint_every=40, eval_fn=None, best_metric=None)
    # start (1) + 4 logged steps x (metrics, finite) + final finite check (1)
    assert len(calls) == 10


def test_fit_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="eval_every"):
        _fit(tmp_path, 2, eval_every=0)
    with pytest.raises(TypeError, match="grain"):
        fit(workdir=str(tmp_path), init_state=_init_state, train_step=_train_step,
            train_data=[{"x": np.zeros((8, 4))}], num_steps=1, progress=False)
