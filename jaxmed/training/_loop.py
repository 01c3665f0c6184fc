"""The training loop every `python -m train.<name>` program calls: `fit`.

Reading order: compile the step (shardings, donation) → start or resume →
the loop (step, delayed metric fetch, evaluation, checkpoint, preemption).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxmed.training._checkpoint import Checkpoints
from jaxmed.training._logging import MetricsLog
from jaxmed.training._mesh import (
    batch_sharding,
    fetch,
    make_mesh,
    replicate,
    replicated_sharding,
    shard_batch,
)
from jaxmed.training._preemption import PreemptionWatcher

TrainStep = Callable[[Any, Any], tuple[Any, Mapping[str, jax.Array]]]
EvalFn = Callable[[Any], Mapping[str, Any]]


class Preempted(SystemExit):
    """Raised by `fit` after a SIGTERM, once the checkpoint is saved.

    A `SystemExit` with code 0, so `python -m train.<name>` exits cleanly
    without per-program code; catch it by type when embedding `fit`.
    """

    def __init__(self, step: int, checkpoint: str):
        super().__init__(0)
        self.step, self.checkpoint = step, checkpoint


class TrainingDiverged(SystemExit):
    """Raised by `fit` on a NaN/inf loss (or parameters); nothing is saved.

    A `SystemExit` whose code is the message, so the program prints it and
    exits with status 1.
    """

    def __init__(self, step: int, loss: float, last_good: str):
        super().__init__(
            f"Training stopped: non-finite loss ({loss}) or parameters at step "
            f"{step}. Last good checkpoint: {last_good}. Lower the learning rate "
            "or check the data, then rerun the same command to resume from it.")
        self.step, self.loss, self.last_good = step, loss, last_good


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    - `state`: the final train state (replicated global arrays).
    - `step`: number of completed steps.
    - `metrics`: the last logged training metrics.
    - `eval_metrics`: the last evaluation's metrics (empty without `eval_fn`).
    """

    state: Any
    step: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]


def compile_train_step(train_step: TrainStep, mesh: Mesh):
    """Jit `train_step` for data parallelism over `mesh`.

    The state is replicated and donated, the batch is split along its leading
    axis; the step counter is advanced here. Besides the state and metrics,
    the compiled step returns a bool `[]`: the loss and the new parameters are
    all finite.

    **Arguments:**

    - `train_step`: `(state, batch) -> (state, metrics)`; `metrics` is a dict
      of scalars that includes `'loss'`.
    """
    replicated = replicated_sharding(mesh)

    def step(state, batch):
        new_state, metrics = train_step(state, batch)
        new_state = new_state.replace(step=state.step + 1)
        finite = jnp.isfinite(metrics["loss"]) & _all_finite(new_state.params)
        return new_state, dict(metrics), finite

    return jax.jit(step, in_shardings=(replicated, batch_sharding(mesh)),
                   out_shardings=replicated, donate_argnums=0)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def fit(*, workdir: str, init_state: Any | Callable[[], Any],
        train_step: TrainStep, train_data: Iterable, num_steps: int,
        log_every: int = 50, checkpoint_every: int = 500, keep: int = 3,
        eval_fn: EvalFn | None = None, eval_every: int | None = None,
        best_metric: str | None = None, best_mode: str = "max",
        mesh: Mesh | None = None, progress: bool = True) -> FitResult:
    """Train `num_steps` steps with checkpoints, logs and automatic resume.

    If `workdir/checkpoints` holds a checkpoint, the run continues from the
    newest one (state and data position); otherwise it starts from
    `init_state`. Metrics go to the progress bar, `workdir/metrics.jsonl` and
    TensorBoard events every `log_every` steps; they are fetched one step late
    so the host never waits for the device. Checkpoints are written every
    `checkpoint_every` steps and at the end, after checking the loss and
    parameters are finite.

    **Arguments:**

    - `workdir`: work directory (checkpoints, best, metrics, TensorBoard).
    - `init_state`: a `TrainState` (or any pytree with `step` and `params`
      fields and `replace`), or a jit-compatible function returning one; a
      function is not run when resuming.
    - `train_step`: `(state, batch) -> (state, metrics)`, pure; `batch` holds
      global arrays `[B, ...]`; `metrics` holds scalars incl. `'loss'`.
    - `train_data`: grain dataset of host-local batches (`make_batches`).
    - `num_steps`: total steps, counting those of a resumed run.
    - `log_every`, `checkpoint_every`: intervals in steps.
    - `keep`: number of latest checkpoints kept.
    - `eval_fn`: `state -> {name: scalar}`, run every `eval_every` steps and at
      the end, on every process.
    - `best_metric`, `best_mode`: keep the best checkpoint by this `eval_fn`
      metric (`'max'` or `'min'`) in `workdir/best`.
    - `mesh`: defaults to `make_mesh()`.
    - `progress`: show the progress bar.

    **Returns:** a `FitResult`.

    **Raises:** `Preempted` (exit code 0) after SIGTERM: the current step is
    finished and saved first. `TrainingDiverged` (exit code 1) on a non-finite
    loss; the last good checkpoint is left as the newest.
    """
    if eval_fn is not None and not eval_every:
        raise ValueError("eval_fn needs eval_every > 0")
    if best_metric is not None and eval_fn is None:
        raise ValueError("best_metric needs an eval_fn that returns it")
    mesh = make_mesh() if mesh is None else mesh
    checkpoints = Checkpoints(workdir, keep=keep, best_metric=best_metric,
                              best_mode=best_mode)
    run = _Run(mesh=mesh, checkpoints=checkpoints, eval_fn=eval_fn,
               step_fn=compile_train_step(train_step, mesh), num_steps=num_steps,
               log_every=log_every, checkpoint_every=checkpoint_every,
               eval_every=eval_every or 0)
    try:
        state, position = run.start(init_state)
        batches = _resumable_iterator(train_data, position)
        run.log = MetricsLog(workdir, start_step=run.start_step,
                             num_steps=num_steps, progress=progress)
        with PreemptionWatcher() as watcher:
            state = run.loop(state, batches, watcher)
        return FitResult(state, run.done, run.last_metrics, run.last_eval)
    finally:
        checkpoints.close()
        if run.log is not None:
            run.log.close()


@dataclasses.dataclass
class _Run:
    """Bookkeeping of one `fit` call (kept out of the function for length)."""

    mesh: Mesh
    checkpoints: Checkpoints
    eval_fn: EvalFn | None
    step_fn: Callable
    num_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    log: MetricsLog | None = None
    start_step: int = 0
    done: int = 0
    last_metrics: dict = dataclasses.field(default_factory=dict)
    last_eval: dict = dataclasses.field(default_factory=dict)
    _clock: tuple[int, float] = (0, 0.0)

    def start(self, init_state) -> tuple[Any, Any]:
        """Resume from the newest checkpoint, else build the initial state."""
        step = self.checkpoints.latest_step()
        if step is None:
            state = _place_initial_state(init_state, self.mesh)
            position = None
        else:
            abstract = _abstract_state(init_state, self.mesh)
            state, position = self.checkpoints.restore(step, abstract)
        self.start_step = self.done = int(fetch(state.step))
        return state, position

    def loop(self, state, batches, watcher: PreemptionWatcher):
        if self.done >= self.num_steps:
            self.log.message(f"Already trained {self.done} of {self.num_steps} steps.")
        elif self.done:
            self.log.message(f"Resuming from step {self.done} "
                             f"({self.checkpoints.step_path(self.done)}).")
        pending = None  # (step, metrics, finite) of a logging step not yet fetched
        for step in range(self.start_step, self.num_steps):
            local_batch = next(batches)
            position = batches.get_state()
            state, metrics, finite = self.step_fn(state, shard_batch(local_batch, self.mesh))
            self.done = step + 1
            self.log.advance()
            if step == self.start_step:  # throughput excludes compilation
                self._clock = (self.done, time.perf_counter())
            if pending is not None:  # step `done` is queued: fetch the previous one
                self._write(*pending)
                pending = None
            if self.done % self.log_every == 0:
                pending = (self.done, metrics, finite)
            stop = watcher.should_stop(self.done) and self.done < self.num_steps
            if self._evaluating() or self._checkpointing() or stop:
                self._check_finite(metrics, finite)
                self._sync_point(state, position, pending, stop)
                pending = None
            if stop:
                self.log.message(f"Preempted (SIGTERM): saved step {self.done} to "
                                 f"{self.checkpoints.step_path(self.done)}; rerun the "
                                 "same command to resume.")
                raise Preempted(self.done, self.checkpoints.step_path(self.done))
        if pending is not None:
            self._write(*pending)
        return state

    def _evaluating(self) -> bool:
        return self.eval_fn is not None and (
            self.done % self.eval_every == 0 or self.done == self.num_steps)

    def _checkpointing(self) -> bool:
        return self.done % self.checkpoint_every == 0 or self.done == self.num_steps

    def _sync_point(self, state, position, pending, stop: bool) -> None:
        """Evaluate, log and save at a step where the host waits anyway."""
        record = self._train_record(*pending) if pending is not None else {}
        if self._evaluating():
            self.last_eval = {k: float(v) for k, v in fetch(dict(self.eval_fn(state))).items()}
            record.update(self.last_eval)
            if self.checkpoints.save_best(self.done, state, self.last_eval):
                self.log.message(f"New best {self.checkpoints.best_metric} = "
                                 f"{self.last_eval[self.checkpoints.best_metric]:.5g} "
                                 f"at step {self.done}.")
        if record:
            self.log.write(self.done, record)
        if self._checkpointing() or stop:
            self.checkpoints.save(self.done, state, _jsonable(position))

    def _write(self, step: int, metrics, finite) -> None:
        self.log.write(step, self._train_record(step, metrics, finite))

    def _train_record(self, step: int, metrics, finite) -> dict[str, float]:
        values = {k: float(v) for k, v in fetch(metrics).items()}
        if not bool(fetch(finite)):
            raise self._diverged(step, values["loss"])
        last_step, last_time = self._clock
        now = time.perf_counter()
        if step > last_step:
            values["steps_per_second"] = (step - last_step) / max(now - last_time, 1e-9)
            self._clock = (step, now)
        self.last_metrics = values
        return values

    def _check_finite(self, metrics, finite) -> None:
        if not bool(fetch(finite)):
            raise self._diverged(self.done, float(fetch(metrics["loss"])))

    def _diverged(self, step: int, loss: float) -> TrainingDiverged:
        self.checkpoints.wait()
        last = self.checkpoints.latest_step()
        where = "none" if last is None else (
            f"step {last} ({self.checkpoints.step_path(last)})")
        return TrainingDiverged(step, loss, where)


def _place_initial_state(init_state, mesh: Mesh):
    if callable(init_state):
        return jax.jit(init_state, out_shardings=replicated_sharding(mesh))()
    return replicate(init_state, mesh)


def _abstract_state(init_state, mesh: Mesh):
    """Shapes, dtypes and (replicated) shardings, without running init."""
    shapes = jax.eval_shape(init_state if callable(init_state) else lambda: init_state)
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        shapes)


def _resumable_iterator(train_data: Iterable, position):
    batches = iter(train_data)
    if not (hasattr(batches, "get_state") and hasattr(batches, "set_state")):
        raise TypeError("train_data must be a grain dataset (its iterators need "
                        "get_state/set_state so a resumed run continues the data "
                        f"order); got {type(train_data).__name__}")
    if position is not None:
        batches.set_state(position["data_loader_state"].encode()
                          if "data_loader_state" in position else position)
    return batches


def _jsonable(position):
    """grain's DataLoader gives bytes, its datasets a dict; store both as JSON."""
    if isinstance(position, bytes):
        return {"data_loader_state": position.decode()}
    return position
