"""Weakly-supervised object localisation (docs/wsol.md): a VGG16-CAM classifier trained from
image-level labels, with threshold-suppression modules after chosen conv layers; the class
activation map of a class gives the object's mask and box.

    python -m train.wsol                               # synthetic data, runs/wsol
    python -m train.wsol --data-dir ROOT --boxes ROOT/boxes.csv --workdir RUN
    python -m train.wsol --pretrained vgg16.safetensors --widths 64,128,256,512,512 \
        --no-batch-norm --conv6-width 1024 --image-size 224    # from ImageNet's VGG16
    python -m train.wsol localize --workdir RUN --input a.png b.png --output OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from jaxmed.training import (
    RESUMABLE_OPTIONS,
    add_training_args,
    fit,
    fit_options,
    fraction,
    inference_parser,
    load_run,
    make_mesh,
    non_negative_int,
    prepare_run_config,
    program_main,
    replicate,
)
from jaxmed.wsol.config import PROGRAM, WsolConfig, run_config
from jaxmed.wsol.data import (
    has_boxes,
    held_out_share,
    load_dataset,
    split_dataset,
    train_batches,
)
from jaxmed.wsol.figures import validation_figure
from jaxmed.wsol.inference import DEFAULT_THRESHOLD, localize_files, write_thresholds
from jaxmed.wsol.steps import build_wsol, initial_state, validation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Localise with a trained model: python -m train.wsol localize --help")
    WsolConfig.add_options(parser)
    f = parser.add_argument_group("outputs")
    f.add_argument("--figures", type=non_negative_int, default=12,
                   help="validation images drawn in figures/validation.png (default: %(default)s)")
    add_training_args(parser, workdir="runs/wsol", steps=800, batch_size=32, log_every=20,
                      checkpoint_every=200, eval_every=200, keep=3)
    return parser


def train(args: argparse.Namespace, config: WsolConfig) -> dict[str, float]:
    workdir = Path(args.workdir)

    # --- data --- (a folder's images are decoded when used: this host's rows and share only)
    dataset = load_dataset(config)
    train_set, val_set = split_dataset(dataset, config.val_fraction, seed=config.seed)
    batches = train_batches(train_set, args.batch_size, seed=config.seed)
    held_out = held_out_share(val_set)

    # --- model --- (a bad --init-from or --pretrained fails before config.json is written)
    values = run_config(config, dataset.class_names, has_boxes(val_set))
    wsol = build_wsol(values)
    start = initial_state(wsol, workdir, config.init_from, config.pretrained)
    prepare_run_config(workdir, values, resumable=config.resumable() | RESUMABLE_OPTIONS)

    # --- fit ---
    evaluate = validation(wsol, held_out, val_set.labels, val_set.boxes)
    fit(init_state=start, train_step=wsol.train_step, train_data=batches, eval_fn=evaluate,
        best_metric=values["best_metric"], best_mode="max", **fit_options(args))

    # --- evaluate the kept model --- (the best checkpoint, which `localize` uses)
    best = load_run(workdir, build_wsol, program=PROGRAM)
    metrics = evaluate(replicate(best.state, make_mesh()))

    # --- outputs ---
    if jax.process_index() == 0:
        write_thresholds(workdir, metrics)
        count = min(args.figures, len(held_out["label"]))  # process 0's share starts at 0
        validation_figure(best.system, best.state, held_out["image"][:count],
                          held_out["label"][:count],
                          None if val_set.boxes is None else val_set.boxes[:count],
                          dataset.class_names,
                          metrics.get("val_threshold_50", DEFAULT_THRESHOLD),
                          workdir / "figures" / "validation.png")
    print("validation (best checkpoint): " + ", ".join(
        f"{k} = {v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


def build_localize_parser() -> argparse.ArgumentParser:
    parser = inference_parser(
        f"{PROGRAM} localize", "Predict the class of each image and localise it: a CAM "
        "overlay with the box (<name>.png), the CAM (<name>_cam.png) and localization.csv.",
        "image files")
    parser.add_argument("--threshold", type=fraction, default=None,
                        help="CAM threshold in [0, 1) (default: the run's best validation "
                             "threshold at IoU 0.5)")
    return parser


def localize_main(argv: list[str]) -> None:
    args = build_localize_parser().parse_args(argv)
    for path in localize_files(args.workdir, args.input, args.output, which=args.checkpoint,
                               threshold=args.threshold):
        print(path)


def main(argv: list[str] | None = None) -> None:
    program_main(argv, build_parser=build_parser, train=train, config=WsolConfig,
                 commands={"localize": localize_main})


if __name__ == "__main__":
    main()
