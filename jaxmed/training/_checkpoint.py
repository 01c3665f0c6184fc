"""Orbax checkpoints: the latest N for resuming, the best one for using.

Two managers in two directories, because Orbax's best-metric retention keeps
the N *best* steps, not "latest N plus best":

- `WORKDIR/checkpoints/<step>/`: `state` (the train state) and `data` (the
  input iterator position, JSON), the last `keep` steps; resuming reads the
  newest.
- `WORKDIR/best/<step>/`: `state` of the step with the best validation
  metric so far, with that metric in Orbax's metrics file.

Orbax writes each step into `<step>.orbax-checkpoint-tmp-<n>` and renames it
when complete (commit file on object stores), so an interrupted write is never
listed as a step; leftovers are deleted when the managers open.
"""

from __future__ import annotations

import math
import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class Checkpoints:
    """Latest-N and best-by-metric checkpoints of one work directory.

    **Arguments:**

    - `workdir`: the run's work directory.
    - `keep`: how many of the latest checkpoints to keep.
    - `best_metric`: name of the validation metric that ranks the best
      checkpoint (e.g. `'val_ncc'`), or None for no best checkpoint.
    - `best_mode`: `'max'` or `'min'`: which direction is better.
    """

    def __init__(self, workdir: str, *, keep: int, best_metric: str | None = None,
                 best_mode: str = "max"):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.best_metric, self.best_mode = best_metric, best_mode
        self.latest = _manager(os.path.join(workdir, "checkpoints"),
                               policies.LatestN(n=keep))
        self.best = self._best = None
        if best_metric is not None:
            score = lambda metrics: metrics[best_metric]
            rank = policies.BestN(get_metric_fn=score, reverse=best_mode == "min",
                                  n=1, keep_checkpoints_without_metrics=False)
            # best_fn as well: without it Orbax does not write the metrics file.
            # Own barrier names: both managers may save the same step at once, and
            # multi-process saves synchronise on barriers named after the step.
            self.best = _manager(
                os.path.join(workdir, "best"), rank, best_fn=score, best_mode=best_mode,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix="best"))
            self._best = self._best_on_disk()  # (value, step): saves are async

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self.latest.latest_step()

    def step_path(self, step: int | None) -> str:
        """Directory of a latest-N checkpoint (for messages)."""
        if step is None:
            return "none"
        return str(self.latest.directory / str(step))

    def save(self, step: int, state: Any, data_state: Any) -> None:
        """Save the train state and the input iterator position at `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state))
        self.latest.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """Train state and iterator position saved at `step`.

        **Arguments:**

        - `abstract_state`: pytree of `jax.ShapeDtypeStruct` with shardings, the
          layout to restore into.

        **Returns:** `(state, data_state)`.
        """
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore())
        restored = self.latest.restore(step, args=args)
        return restored["state"], restored["data"]

    def _best_on_disk(self) -> tuple[float, int] | None:
        """(value, step) of the best finalised checkpoint, or None."""
        scored = []
        for step in self.best.all_steps():
            metrics = self.best.metrics(step)
            if metrics is not None and self.best_metric in metrics:
                scored.append((metrics[self.best_metric], step))
        if not scored:
            return None
        return max(scored) if self.best_mode == "max" else min(scored)

    def best_step(self) -> int | None:
        """Step of the best checkpoint, or None."""
        return None if self._best is None else self._best[1]

    def best_value(self) -> float | None:
        """The best metric value saved so far, or None."""
        return None if self._best is None else self._best[0]

    def is_better(self, value: float) -> bool:
        """True if `value` beats the best saved value (NaN never does)."""
        if not math.isfinite(value):
            return False
        best = self.best_value()
        if best is None:
            return True
        return value > best if self.best_mode == "max" else value < best

    def save_best(self, step: int, state: Any, metrics: dict[str, float]) -> bool:
        """Save `state` as the best checkpoint if its metric improved.

        **Returns:** True if it was saved.
        """
        if self.best is None:
            return False
        if self.best_metric not in metrics:
            raise KeyError(f"eval_fn returned {sorted(metrics)}, without the best "
                           f"metric {self.best_metric!r}")
        value = float(metrics[self.best_metric])
        if not self.is_better(value) or step in self.best.all_steps():
            return False
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                       metrics={self.best_metric: value}, force=True)
        self._best = (value, step)
        return True

    def restore_best(self, abstract_state: Any) -> tuple[int, Any]:
        """`(step, state)` of the best checkpoint."""
        best_step = self.best_step()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return best_step, self.best.restore(best_step, args=args)["state"]

    def wait(self) -> None:
        """Block until asynchronous writes have been finalised."""
        for manager in (self.latest, self.best):
            if manager is not None:
                manager.wait_until_finished()

    def close(self) -> None:
        """Finish writes and release the managers."""
        for manager in (self.latest, self.best):
            if manager is not None:
                manager.close()


def _manager(directory: str, preservation, **options) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, create=True,
        cleanup_tmp_directories=True, **options)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)
