"""What a training program leaves for its apply / predict command: the run's configuration
(`config.json`) and the trained state, restored from `best/` or the latest checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxmed.errors import InputDataError
from jaxmed.training._checkpoint import Checkpoints

CONFIG_NAME = "config.json"


class ConfigMismatch(InputDataError):
    """A resumed run was started with options that differ from those its checkpoints were
    trained with. Programs exit with status 2 (a usage error), as argparse does."""


def prepare_run_config(workdir: str | os.PathLike, config: dict[str, Any], *,
                       resumable: Iterable[str] = (),
                       checkpoint_dirs: Iterable[str | os.PathLike] | None = None,
                       defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `workdir/config.json` for a run that is starting or resuming, keeping it consistent
    with the run's checkpoints.

    A work directory without checkpoints gets `config` (a previous configuration there
    belonged to nothing that was kept). A work directory with checkpoints is being resumed:
    every key of `config` not in `resumable` must equal the saved value, else
    `ConfigMismatch` lists each differing option with both values and nothing is written;
    changed `resumable` values (e.g. `steps`) are written, and each change is recorded under
    `"resumed"` with the step it applied from. Only process 0 writes (atomically); every
    process checks. `checkpoint_dirs`: the work directories whose checkpoints this
    configuration made, for a program that trains several models (default: `workdir`).
    `defaults`: option values a saved configuration that lacks the key was trained with (an
    option added after the run was made), so such runs still resume.

    **Returns:** the configuration now in `config.json`.
    """
    path = Path(workdir) / CONFIG_NAME
    steps = [_latest_checkpoint(d) for d in (checkpoint_dirs or [workdir])]
    resumed_at = max((s for s in steps if s is not None), default=None)
    if resumed_at is None or not path.is_file():
        _write_json(path, config)
        return config
    saved = read_run_config(workdir, "this program")
    saved = {**{k: v for k, v in (defaults or {}).items() if k in config}, **saved}
    resumable = set(resumable) | {"resumed"}
    fixed = sorted(k for k in set(config) | set(saved)
                   if k not in resumable and config.get(k) != saved.get(k))
    if fixed:
        lines = "; ".join(f"{_flag(k)}: saved {saved.get(k)!r}, now {config.get(k)!r}"
                          for k in fixed)
        raise ConfigMismatch(
            f"{workdir} holds checkpoints trained with other options ({lines}). Rerun with "
            f"the saved options to resume, or use a new --workdir.")
    changed = {k: [saved.get(k), v] for k, v in config.items()
               if k in resumable and saved.get(k) != v}
    if not changed:
        return saved
    history = [*saved.get("resumed", []), {"step": resumed_at, "changed": changed}]
    updated = {**saved, **config, "resumed": history}
    _write_json(path, updated)
    return updated


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _latest_checkpoint(workdir: str | os.PathLike) -> int | None:
    checkpoints = Checkpoints(str(workdir), keep=1)
    try:
        return checkpoints.latest_step()
    finally:
        checkpoints.close()


def _write_json(path: Path, values: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(values, indent=2))
    os.replace(temporary, path)


def read_run_config(workdir: str | os.PathLike, program: str) -> dict[str, Any]:
    """`workdir/config.json`; `program` names the training program in the error message."""
    path = Path(workdir) / CONFIG_NAME
    if not path.is_file():
        raise InputDataError(f"{path}: not found; is {workdir} a work directory of {program}?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputDataError(f"{path}: not valid JSON ({error})") from error


def restore_trained(workdir: str | os.PathLike, init_state: Callable[[], Any], *,
                    which: str = "best", best_metric: str | None = None,
                    best_mode: str = "max") -> Any:
    """The trained state of a run, on the first local device.

    **Arguments:**

    - `workdir`: the run's work directory.
    - `init_state`: builds a state of the run's structure (traced only, never run).
    - `which`: `'best'` (falling back to the latest checkpoint when no best was kept) or
      `'latest'`.
    - `best_metric`, `best_mode`: as given to `fit`.

    **Raises:** `InputDataError` when the run has no checkpoint.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(init_state))
    checkpoints = Checkpoints(str(workdir), keep=1, best_metric=best_metric, best_mode=best_mode)
    try:
        if which == "best" and best_metric and checkpoints.best_step() is not None:
            return checkpoints.restore_best(abstract)[1]
        if checkpoints.latest_step() is not None:
            return checkpoints.restore(checkpoints.latest_step(), abstract)[0]
        raise InputDataError(f"{workdir}: no checkpoint to use (train first)")
    finally:
        checkpoints.close()


class TrainedRun(NamedTuple):
    """What `load_run` returns: the system built from the run's configuration, its trained
    state (on the first local device) and the configuration dict of `config.json`."""

    system: Any
    state: Any
    config: dict[str, Any]


def load_run(workdir: str | os.PathLike, build: Callable[[dict[str, Any]], Any], *,
             program: str, which: str = "best") -> TrainedRun:
    """A trained run, for an apply / localize / predict command or a warm start.

    **Arguments:**

    - `workdir`: the run's work directory.
    - `build`: `config dict -> system`; the system's `init_state()` builds a state of the
      run's structure (only traced).
    - `program`: the training program, named in the error when `workdir` is not its run.
    - `which`: `'best'` (falling back to the latest checkpoint) or `'latest'`.
    """
    config = read_run_config(workdir, program)
    system = build(config)
    state = restore_trained(workdir, system.init_state, which=which,
                            best_metric=config.get("best_metric"),
                            best_mode=config.get("best_mode", "max"))
    return TrainedRun(system, state, config)


def transfer_matching(target: Any, source: Any, *, source_name: str = "source"
                      ) -> tuple[Any, list[str], list[str]]:
    """Warm start: `target` with every array that `source` has at the same path.

    Both are nested dicts of arrays (e.g. `{'params': ..., 'batch_stats': ...}`). An array
    whose path is only in `target` (a layer the source network lacks, such as an inserted
    module) keeps its value; arrays only in `source` are ignored.

    **Returns:** `(merged, copied, kept)`: the merged tree (same structure as `target`) and
    the '/'-joined paths copied from `source` and kept from `target`.

    **Raises:** `InputDataError` (naming `source_name` and the path) when an array is at the
    same path in both with a different shape, or when no path is shared at all.
    """
    flat_target = traverse_util.flatten_dict(target, keep_empty_nodes=True, sep="/")
    flat_source = traverse_util.flatten_dict(source, sep="/")
    merged, copied, kept = {}, [], []
    for path, value in flat_target.items():
        if value is traverse_util.empty_node:  # e.g. no BatchNorm statistics
            merged[path] = value
            continue
        if path not in flat_source:
            merged[path] = value
            kept.append(path)
            continue
        other = flat_source[path]
        if other.shape != value.shape:
            raise InputDataError(f"{source_name}: {path} has shape {tuple(other.shape)}, the "
                                 f"network being trained needs {tuple(value.shape)}")
        merged[path] = jnp.asarray(other, dtype=value.dtype)
        copied.append(path)
    if not copied:
        raise InputDataError(f"{source_name}: shares no parameter with the network being trained")
    return traverse_util.unflatten_dict(merged, sep="/"), copied, kept
