"""Mapping-GAN feature visualisation: learn M(x) that turns a positive volume into a plausible
negative one, y = x + M(x); M(x) is the key feature map (see docs/mapping_gan.md).

    python -m train.mapping_gan                      # synthetic 3-D study in runs/mapping_gan
    python -m train.mapping_gan --positive-dir P --negative-dir N --workdir RUN
    python -m train.mapping_gan apply --workdir RUN --input a.nii.gz --output OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from jaxmed.mapping_gan import data
from jaxmed.mapping_gan.config import DATA_GROUP, DECAY_KEYS, MappingGanConfig
from jaxmed.mapping_gan.figures import validation_figures
from jaxmed.mapping_gan.inference import PROGRAM, apply_to_files
from jaxmed.mapping_gan.steps import MappingGan, build_mapping_gan, validation_metrics
from jaxmed.models.mapping_gan import UNet
from jaxmed.training import (
    Checkpoints,
    add_training_args,
    bounded,
    evaluate,
    fetch,
    fit,
    fit_options,
    host_share,
    inference_parser,
    make_mesh,
    non_negative_int,
    positive_int,
    prepare_run_config,
    program_main,
    replicated_sharding,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Apply a trained model: {PROGRAM} apply --help")
    data_options = parser.add_argument_group(DATA_GROUP)  # MappingGanConfig's data options join
    MappingGanConfig.add_options(parser)
    data_options.add_argument(
        "--percentiles", type=bounded(float, low=0.0, high=100.0), nargs=2, default=(1.0, 99.0),
        metavar=("LOW", "HIGH"),
        help="clipping percentiles for --normalisation percentile (default: %(default)s)")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--figures", type=non_negative_int, default=4,
                         help="validation subjects drawn as PNG (default: %(default)s)")
    outputs.add_argument("--val-chunk", type=positive_int, default=16,
                         help="validation subjects per jitted call, rounded up to a multiple of "
                         "the device count (default: %(default)s)")
    add_training_args(parser, workdir="runs/mapping_gan", steps=400, batch_size=4,
                      log_every=25, checkpoint_every=50, eval_every=50, keep=3)
    return parser


def apply_parser() -> argparse.ArgumentParser:
    return inference_parser(
        f"{PROGRAM} apply", "Write M(x) and y = x + M(x) as NIfTI (the input's affine and "
        "header, intensities in the normalised [-1, 1] units) and a PNG per input.",
        "NIfTI volumes to map")


def train(args: argparse.Namespace, config: MappingGanConfig) -> dict[str, float]:
    workdir = Path(args.workdir)

    # --- data ---
    if config.positive_dir or config.manifest:
        subjects = data.find_subjects(config.positive_dir, config.negative_dir, config.manifest)
    else:
        subjects = data.synthetic_subjects(
            workdir / "data", dims=config.synthetic_dims, n_subjects=config.synthetic_subjects,
            seed=config.seed, size=config.synthetic_size)
    study = data.load_study(
        subjects, downsampling=UNet(features=config.generator_features).total_downsampling,
        val_fraction=config.val_fraction, seed=config.seed, normalisation=config.normalisation,
        percentiles=config.percentiles)
    study.train.images.load(host_share(len(study.train)))  # bad files fail before training
    held_out = study.val.arrays(host_share(len(study.val)))  # only this host's subjects
    batches = data.step_batches(study.train, args.batch_size, config.seed,
                                **config.critic_schedule())

    # --- model ---
    best = dict(best_metric="val_ncc", best_mode="max") if study.has_truth else dict(
        best_metric="val_wasserstein", best_mode="min")
    run_config = prepare_run_config(
        workdir, {**config.to_dict(), **config.decay_window(), **best, **study.shapes()},
        resumable=config.resumable() | DECAY_KEYS)
    gan = build_mapping_gan(run_config, crop=study.crop)
    eval_batch = -(-args.val_chunk // jax.device_count()) * jax.device_count()

    def validate(state) -> dict[str, float]:
        outputs = evaluate(gan.eval_step, state, held_out, count=len(study.val),
                           batch_size=eval_batch)
        return validation_metrics(outputs)

    # --- fit ---
    result = fit(init_state=gan.init_state, train_step=gan.train_step, train_data=batches,
                 eval_fn=validate, **best, **fit_options(args))

    # --- evaluate the kept model ---
    latest = result.eval_metrics or validate(result.state)
    _report(f"validation after {result.step} steps (latest): {_summary(latest)}")
    best_step, kept = _best_checkpoint(workdir, gan, best)
    if best_step is None:  # no finite validation metric: nothing was kept as best
        kept = result.state
    else:
        _report(f"validation (best checkpoint, step {best_step}): {_summary(validate(kept))}")

    # --- outputs ---
    if jax.process_index() == 0:  # the model `apply` uses: the best checkpoint
        validation_figures(gan, fetch(kept), study.val, study.crop, workdir / "figures",
                           args.figures)
    return latest


def _best_checkpoint(workdir: Path, gan: MappingGan, best: dict):
    """`(step, state)` of the best checkpoint, replicated over the devices; `(None, None)`
    when none was kept."""
    sharding = replicated_sharding(make_mesh())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            jax.eval_shape(gan.init_state))
    checkpoints = Checkpoints(str(workdir), keep=1, **best)
    try:
        if checkpoints.best_step() is None:
            return None, None
        return checkpoints.restore_best(abstract)
    finally:
        checkpoints.close()


def _report(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def _summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items()))


def apply_main(argv: list[str]) -> None:
    args = apply_parser().parse_args(argv)
    for path in apply_to_files(args.workdir, args.input, args.output, args.checkpoint):
        print(path)


def main(argv: list[str] | None = None) -> None:
    program_main(argv, build_parser=build_parser, train=train, commands={"apply": apply_main},
                 config=MappingGanConfig)


if __name__ == "__main__":
    main()
