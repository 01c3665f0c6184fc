"""Medical image segmentation: stem → CBAM → dilated ResNet → CBAM → pyramid pooling → head,
trained with cross-entropy + soft Dice (docs/segmentation.md). The default data are synthetic
kidney-ultrasound phantoms: outside the kidney (0), hydronephrosis fluid (1), kidney tissue (2).

    python -m train.segment                            # synthetic phantoms, runs/segment
    python -m train.segment --images IMGS --masks MASKS --workdir RUN
    python -m train.segment --depth 50 --width 64 --output-stride 16 --image-size 473
                                                       # the network of the original design
    python -m train.segment --pretrained resnet50.safetensors --stem 7x7 --depth 50 --width 64
                                                       # ResNet-50 from ImageNet weights
    python -m train.segment predict --workdir RUN --input a.png b.png --output OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from jaxmed.segmentation.config import SegmentationConfig
from jaxmed.segmentation.data import augmentation, read_rows, split_sources
from jaxmed.segmentation.figures import validation_figure
from jaxmed.segmentation.inference import PROGRAM, predict_files
from jaxmed.segmentation.steps import build_segmenter, initial_state, validation
from jaxmed.training import (
    RESUMABLE_OPTIONS,
    add_training_args,
    fit,
    fit_options,
    host_share,
    inference_parser,
    load_run,
    make_batches,
    non_negative_int,
    prepare_run_config,
    program_main,
)

BEST = "val_mean_dice"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Segment images with a trained model: python -m train.segment predict --help")
    SegmentationConfig.add_options(parser)
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--figures", type=non_negative_int, default=6,
                         help="validation images drawn in figures/validation.png "
                              "(default: %(default)s)")
    add_training_args(parser, workdir="runs/segment", steps=1500, batch_size=8, log_every=25,
                      checkpoint_every=250, eval_every=250, keep=3)
    return parser


def train(args: argparse.Namespace, config: SegmentationConfig) -> dict[str, float]:
    workdir = Path(args.workdir)

    # --- data --- (a folder is checked whole here, before the work directory is touched)
    train_examples, held_out = split_sources(config)
    batches = make_batches(train_examples, args.batch_size, seed=config.seed,
                           transform=augmentation(config.augment))

    # --- model --- (a bad --pretrained file fails before config.json is written)
    segmenter = build_segmenter(config)
    start = initial_state(segmenter, config.pretrained)
    prepare_run_config(workdir, {**config.to_dict(), "batch_size": args.batch_size,
                                 "best_metric": BEST, "best_mode": "max"},
                       resumable=config.resumable() | RESUMABLE_OPTIONS,
                       defaults=config.defaults())
    validate = validation(segmenter, read_rows(held_out, host_share(len(held_out))),
                          len(held_out))

    # --- fit ---
    fit(init_state=start, train_step=segmenter.train_step, train_data=batches,
        eval_fn=validate, best_metric=BEST, best_mode="max", **fit_options(args))

    # --- evaluate the kept model ---
    kept = load_run(workdir, build_segmenter, program=PROGRAM)
    metrics = validate(kept.state)

    # --- outputs ---
    if jax.process_index() == 0:
        if args.figures:
            validation_figure(kept.system, kept.state, read_rows(held_out, slice(args.figures)),
                              workdir / "figures" / "validation.png")
        print(summary(metrics, config.num_classes))
    return metrics


def summary(metrics: dict[str, float], num_classes: int) -> str:
    """The printed line: mean Dice and IoU, then each class's."""
    per_class = "  ".join(f"class {c}: Dice {metrics[f'val_dice_{c}']:.4f} IoU "
                          f"{metrics[f'val_iou_{c}']:.4f}" for c in range(num_classes))
    return (f"validation (best checkpoint): mean Dice {metrics['val_mean_dice']:.4f}, "
            f"mean IoU {metrics['val_mean_iou']:.4f}; {per_class}")


def predict_main(argv: list[str]) -> None:
    parser = inference_parser(
        f"{PROGRAM} predict", "Segment images: <name>_mask.png (class indices at the image's "
        "own size), <name>_colour.png and <name>_overlay.png.", "image files")
    args = parser.parse_args(argv)
    for path in predict_files(args.workdir, args.input, args.output, which=args.checkpoint):
        print(path)


def main(argv: list[str] | None = None) -> None:
    program_main(argv, build_parser=build_parser, train=train, commands={"predict": predict_main},
                 config=SegmentationConfig)


if __name__ == "__main__":
    main()
