"""Shared training machinery: mesh and shardings, train state, input
pipeline, Orbax checkpoints, logging, and the `fit` loop.

A program (`python -m train.<name>`) typically does::

  parser = MyConfig.add_options(argparse.ArgumentParser())   # a `Config` dataclass
  add_training_args(parser, workdir='runs/x', steps=1000, batch_size=32)

  def train(args, config):                                   # via `program_main`
      prepare_run_config(args.workdir, config.to_dict(), resumable=...)
      batches = make_batches(source, args.batch_size, seed=args.seed)
      result = fit(init_state=system.init_state, train_step=system.train_step,
                   train_data=batches, **fit_options(args))
      outputs = evaluate(system.eval_step, result.state, held_out, count=n, batch_size=b)

  program_main(argv, build_parser=..., train=train, commands={...}, config=MyConfig)

and its apply/predict command rebuilds the trained system with `load_run(workdir, build)`.
"""

from jaxmed.training._checkpoint import Checkpoints as Checkpoints
from jaxmed.training._cli import RESUMABLE_OPTIONS as RESUMABLE_OPTIONS
from jaxmed.training._cli import add_distributed_args as add_distributed_args
from jaxmed.training._cli import add_training_args as add_training_args
from jaxmed.training._cli import fit_options as fit_options
from jaxmed.training._cli import inference_parser as inference_parser
from jaxmed.training._cli import init_distributed as init_distributed
from jaxmed.training._cli import one_line_errors as one_line_errors
from jaxmed.training._cli import program_main as program_main
from jaxmed.training._config import Config as Config
from jaxmed.training._config import bounded as bounded
from jaxmed.training._config import comma_ints as comma_ints
from jaxmed.training._config import comma_names as comma_names
from jaxmed.training._config import fraction as fraction
from jaxmed.training._config import non_negative as non_negative
from jaxmed.training._config import non_negative_int as non_negative_int
from jaxmed.training._config import open_unit_interval as open_unit_interval
from jaxmed.training._config import option as option
from jaxmed.training._config import positive as positive
from jaxmed.training._config import positive_int as positive_int
from jaxmed.training._config import unit_interval as unit_interval
from jaxmed.training._data import ArraySource as ArraySource
from jaxmed.training._data import RandomAccessSource as RandomAccessSource
from jaxmed.training._data import make_batches as make_batches
from jaxmed.training._evaluate import evaluate as evaluate
from jaxmed.training._evaluate import evaluate_batches as evaluate_batches
from jaxmed.training._evaluate import host_share as host_share
from jaxmed.training._logging import MetricsLog as MetricsLog
from jaxmed.training._logging import read_metrics as read_metrics
from jaxmed.training._loop import FitResult as FitResult
from jaxmed.training._loop import Preempted as Preempted
from jaxmed.training._loop import TrainingDiverged as TrainingDiverged
from jaxmed.training._loop import compile_train_step as compile_train_step
from jaxmed.training._loop import fit as fit
from jaxmed.training._mesh import batch_sharding as batch_sharding
from jaxmed.training._mesh import fetch as fetch
from jaxmed.training._mesh import make_mesh as make_mesh
from jaxmed.training._mesh import replicate as replicate
from jaxmed.training._mesh import replicated_sharding as replicated_sharding
from jaxmed.training._mesh import shard_batch as shard_batch
from jaxmed.training._preemption import PreemptionWatcher as PreemptionWatcher
from jaxmed.training._run import ConfigMismatch as ConfigMismatch
from jaxmed.training._run import TrainedRun as TrainedRun
from jaxmed.training._run import load_run as load_run
from jaxmed.training._run import prepare_run_config as prepare_run_config
from jaxmed.training._run import read_run_config as read_run_config
from jaxmed.training._run import restore_trained as restore_trained
from jaxmed.training._run import transfer_matching as transfer_matching
from jaxmed.training._state import TrainState as TrainState
from jaxmed.training._supervised import IMAGENET_MEAN as IMAGENET_MEAN
from jaxmed.training._supervised import IMAGENET_STD as IMAGENET_STD
from jaxmed.training._supervised import SupervisedSystem as SupervisedSystem
from jaxmed.training._supervised import images_to_imagenet as images_to_imagenet
from jaxmed.training._supervised import images_to_unit_range as images_to_unit_range
from jaxmed.training._supervised import init_supervised_state as init_supervised_state
from jaxmed.training._supervised import supervised_train_step as supervised_train_step
from jaxmed.training._supervised import warmup_cosine_adamw as warmup_cosine_adamw
