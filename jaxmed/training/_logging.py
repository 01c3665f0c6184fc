"""Run log: progress bar, `metrics.jsonl` and TensorBoard events (process 0)."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Writes scalar metrics of logged steps; a no-op on processes other than 0.

    Files in `workdir`: `metrics.jsonl` (one JSON object per line: `step` plus
    the metric values) and TensorBoard event files in `tensorboard/`. A resumed
    run first drops records newer than the step it resumes from, so the log
    reads as one uninterrupted run.

    **Arguments:**

    - `workdir`: the run's work directory.
    - `start_step`: step the run starts (or resumes) from.
    - `num_steps`: total steps of the run (for the progress bar).
    - `progress`: show the tqdm progress bar.
    """

    def __init__(self, workdir: str, *, start_step: int, num_steps: int,
                 progress: bool = True):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        _drop_records_after(self.path, start_step)
        # purge_step hides events a crashed run wrote after the resumed checkpoint.
        self.events = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                    purge_step=start_step + 1)
        self.bar = tqdm.tqdm(total=num_steps, initial=start_step, unit="step",
                             disable=not progress, dynamic_ncols=True)

    def advance(self) -> None:
        """One more step done."""
        if self.active:
            self.bar.update(1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record scalar `metrics` of `step` in all three outputs."""
        if not self.active:
            return
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        record = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            self.events.add_scalar(name, value, step)
        self.events.flush()
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.active:
            self.bar.write(text)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.events.close()


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


def _drop_records_after(path: str, step: int) -> None:
    """Keep the records up to `step` (and drop a line cut short by a crash)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line.rstrip("\n") for line in f if _record_step(line) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(line + "\n" for line in kept)
    os.replace(tmp, path)


def _record_step(line: str) -> float:
    """The record's step; infinity for a blank or unreadable line."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl`, in order."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
