"""Shared training machinery: mesh and shardings, train state, input
pipeline, Orbax checkpoints, logging, and the `fit` loop.

A program (`python -m train.<name>`) typically does::

  parser = add_training_args(argparse.ArgumentParser(), workdir='runs/x',
                             steps=1000, batch_size=32)
  args = parser.parse_args()
  init_distributed(args)
  batches = make_batches(source, args.batch_size, seed=args.seed)
  result = fit(init_state=init_fn, train_step=train_step,
               train_data=batches, **fit_options(args))
"""

from jaxmed.training._checkpoint import Checkpoints as Checkpoints
from jaxmed.training._cli import add_training_args as add_training_args
from jaxmed.training._cli import comma_ints as comma_ints
from jaxmed.training._cli import fit_options as fit_options
from jaxmed.training._cli import inference_parser as inference_parser
from jaxmed.training._cli import init_distributed as init_distributed
from jaxmed.training._cli import program_main as program_main
from jaxmed.training._data import ArraySource as ArraySource
from jaxmed.training._data import RandomAccessSource as RandomAccessSource
from jaxmed.training._data import make_batches as make_batches
from jaxmed.training._logging import MetricsLog as MetricsLog
from jaxmed.training._logging import read_metrics as read_metrics
from jaxmed.training._loop import FitResult as FitResult
from jaxmed.training._loop import Preempted as Preempted
from jaxmed.training._loop import TrainingDiverged as TrainingDiverged
from jaxmed.training._loop import compile_train_step as compile_train_step
from jaxmed.training._loop import evaluate as evaluate
from jaxmed.training._loop import fit as fit
from jaxmed.training._mesh import batch_sharding as batch_sharding
from jaxmed.training._mesh import fetch as fetch
from jaxmed.training._mesh import make_mesh as make_mesh
from jaxmed.training._mesh import replicate as replicate
from jaxmed.training._mesh import replicated_sharding as replicated_sharding
from jaxmed.training._mesh import shard_batch as shard_batch
from jaxmed.training._preemption import PreemptionWatcher as PreemptionWatcher
from jaxmed.training._run import read_run_config as read_run_config
from jaxmed.training._run import restore_trained as restore_trained
from jaxmed.training._run import transfer_matching as transfer_matching
from jaxmed.training._run import write_run_config as write_run_config
from jaxmed.training._state import TrainState as TrainState
from jaxmed.training._supervised import images_to_unit_range as images_to_unit_range
from jaxmed.training._supervised import init_supervised_state as init_supervised_state
from jaxmed.training._supervised import supervised_train_step as supervised_train_step
from jaxmed.training._supervised import warmup_cosine_adamw as warmup_cosine_adamw
