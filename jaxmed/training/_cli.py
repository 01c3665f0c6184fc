"""Command-line options shared by every `python -m train.<name>` program."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import Any

import jax

from jaxmed.errors import InputDataError
from jaxmed.training._config import Config, non_negative_int, positive_int
from jaxmed.training._run import ConfigMismatch

# (option, type, help) of the training options; defaults come from the program.
_TRAINING_OPTIONS = (
    ("workdir", str, "work directory: checkpoints, metrics.jsonl, TensorBoard events; "
     "a run resumes from its checkpoints"),
    ("steps", positive_int, "total training steps"),
    ("batch_size", positive_int, "global batch size over all devices and hosts; divisible by "
     "the device count"),
    ("seed", int, "seed of initialisation, data order and augmentation"),
    ("log_every", positive_int, "steps between metric logs"),
    ("checkpoint_every", positive_int, "steps between checkpoints"),
    ("eval_every", non_negative_int, "steps between validations; 0 = only at the end"),
    ("keep", positive_int, "latest checkpoints to keep"),
)

# Training options that may differ when a run resumes: they change how long it runs and how
# often it reports, not what its checkpoints hold.
RESUMABLE_OPTIONS = frozenset({"steps", "log_every", "checkpoint_every", "eval_every", "keep",
                               "progress"})


def add_training_args(parser: argparse.ArgumentParser, *, workdir: str,
                      steps: int, batch_size: int, log_every: int = 50,
                      checkpoint_every: int = 500, eval_every: int = 0,
                      keep: int = 3, seed: int = 0) -> argparse.ArgumentParser:
    """Add the common training and distributed options, with program defaults.

    Training: `--workdir --steps --batch-size --seed --log-every
    --checkpoint-every --eval-every --keep --progress/--no-progress`.
    Distributed: `--coordinator-address --num-processes --process-id`
    (see `init_distributed`).

    **Returns:** `parser`, for chaining.
    """
    defaults = dict(workdir=workdir, steps=steps, batch_size=batch_size, seed=seed,
                    log_every=log_every, checkpoint_every=checkpoint_every,
                    eval_every=eval_every, keep=keep)
    train = parser.add_argument_group("training")
    for name, kind, text in _TRAINING_OPTIONS:
        train.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name],
                           help=text + " (default: %(default)s)")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction,
                       default=True, help="show a progress bar (default: %(default)s)")
    add_distributed_args(parser)
    return parser


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Add `--coordinator-address --num-processes --process-id` (see `init_distributed`)."""
    dist = parser.add_argument_group(
        "distributed", "multi-host runs: start one process per host with the "
        "same options except --process-id")
    dist.add_argument("--coordinator-address", default=None,
                      help="HOST:PORT of process 0, or 'auto' to detect the "
                      "cluster (TPU pod, SLURM, ...); unset = single process")
    dist.add_argument("--num-processes", type=int, default=None,
                      help="number of processes (hosts)")
    dist.add_argument("--process-id", type=int, default=None,
                      help="index of this process, 0 .. num-processes-1")


def init_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` from the parsed options, if requested.

    `program_main` calls it before the program runs; call it yourself only when embedding a
    program's `train` without `program_main`, before anything else touches JAX devices.
    """
    address = args.coordinator_address
    if address is None:
        if args.num_processes not in (None, 1) or args.process_id not in (None, 0):
            raise SystemExit("--num-processes/--process-id need --coordinator-address")
        return
    if address == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(address, args.num_processes, args.process_id)


def fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `fit` keyword arguments that come from the common options."""
    return dict(workdir=args.workdir, num_steps=args.steps,
                log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                eval_every=args.eval_every or args.steps, keep=args.keep,
                progress=args.progress)


def inference_parser(prog: str, description: str, inputs: str) -> argparse.ArgumentParser:
    """The options of a program's apply/localize/predict command: `--workdir --input --output
    --checkpoint`; `inputs` describes the input files in `--help`."""
    parser = one_line_errors(argparse.ArgumentParser(prog=prog, description=description))
    parser.add_argument("--workdir", required=True, help="the training run's work directory")
    parser.add_argument("--input", nargs="+", required=True, help=inputs)
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                        help="which checkpoint to load (default: %(default)s; latest if no best)")
    return parser


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser`, reporting a usage error as the one line `<prog>: error: <message>` (without
    argparse's usage block, which hides the message on a terminal) and exit status 2."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error
    return parser


def program_main(argv: list[str] | None, *, build_parser: Callable[[], argparse.ArgumentParser],
                 train: Callable[..., Any], commands: dict[str, Callable[[list[str]], None]],
                 config: type[Config] | None = None) -> None:
    """The entry point of `python -m train.<name> [command] ...`.

    The first argument selects a command (`commands[name](rest)`, e.g. `apply`); anything else
    trains with `build_parser()`'s options: the options are checked (with `config`, its
    `Config.from_args`, whose contradictions are usage errors), JAX's distributed runtime is
    initialised, the batch size is checked against the device count, and then
    `train(args, config)` runs (`train(args)` without `config`).

    Usage errors (bad option values, contradictory options, options that differ from those of
    the run being resumed) end the process with a one-line message and exit status 2, as
    argparse does; bad input (`InputDataError`) with `error: <message>` and status 1. Neither
    prints a traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in commands:
        with _clean_errors(None):
            commands[argv[0]](argv[1:])
        return
    parser = one_line_errors(build_parser())
    args = parser.parse_args(argv)
    configured = None
    if config is not None:
        try:
            configured = config.from_args(args)
        except ValueError as error:
            parser.error(str(error))
    with _clean_errors(parser):
        init_distributed(args)
        if getattr(args, "batch_size", None) and args.batch_size % jax.device_count():
            parser.error(f"argument --batch-size: {args.batch_size} is not divisible by the "
                         f"{jax.device_count()} devices")
        if config is None:
            train(args)
        else:
            train(args, configured)


@contextlib.contextmanager
def _clean_errors(parser: argparse.ArgumentParser | None):
    """`ConfigMismatch` becomes a usage error (status 2); `InputDataError` `error: ...`
    (status 1)."""
    try:
        yield
    except ConfigMismatch as error:
        if parser is not None:
            parser.error(str(error))
        sys.exit(f"error: {error}")
    except InputDataError as error:
        sys.exit(f"error: {error}")
