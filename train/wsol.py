"""Weakly-supervised object localisation (SPEC.md S1): a VGG16-CAM classifier trained from
image-level labels, with threshold-suppression modules after chosen conv layers; the class
activation map of a class gives the object's mask and box.

    python -m train.wsol                               # synthetic data, runs/wsol
    python -m train.wsol --data-dir ROOT --boxes ROOT/boxes.csv --workdir RUN
    python -m train.wsol localize --workdir RUN --input a.png b.png --output OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data.synthetic_wsol import make_wsol_dataset
from jaxmed.data.wsol_folder import load_wsol_folder, train_val_split
from jaxmed.explain import cam_boxes
from jaxmed.training import (ArraySource, Checkpoints, TrainState, add_training_args, comma_ints,
                             fit, fit_options, inference_parser, init_distributed, make_batches,
                             program_main, transfer_matching, write_run_config)
from jaxmed.wsol.figures import localization_grid
from jaxmed.wsol.localize import THRESHOLDS_NAME, load_trained, localize_files
from jaxmed.wsol.steps import MODEL_KEYS, build_wsol, validation


def _names(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v and v != "none")


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return value


def _scale_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    if not 0.0 < low <= high < 0.5:
        raise argparse.ArgumentTypeError(f"need 0 < LOW <= HIGH < 0.5, got {text}")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.wsol", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Localise with a trained model: python -m train.wsol localize --help")
    d = parser.add_argument_group("data (default: a synthetic dataset generated in memory)")
    d.add_argument("--data-dir", help="folder with one sub-folder of images per class")
    d.add_argument("--boxes", help="CSV image,x0,y0,x1,y1 (paths relative to --data-dir) of "
                                   "ground-truth boxes, for validation only")
    d.add_argument("--image-size", type=int, default=96,
                   help="images are resized to this square size (default: %(default)s)")
    d.add_argument("--val-fraction", type=float, default=0.2,
                   help="held-out fraction, stratified by class (default: %(default)s)")
    d.add_argument("--synthetic-images", type=int, default=2400,
                   help="synthetic dataset size (default: %(default)s)")
    d.add_argument("--synthetic-classes", type=int, default=4,
                   help="synthetic classes (default: %(default)s)")
    d.add_argument("--synthetic-cooccurrence", type=float, default=0.5,
                   help="probability that a distractor rod has the colour paired with the "
                        "image's class (default: %(default)s)")
    d.add_argument("--synthetic-object-scale", type=_scale_range, default=(0.14, 0.22),
                   metavar="LOW,HIGH",
                   help="range of a cell's semi-major axis as a fraction of the image size "
                        "(default: %(default)s)")
    d.add_argument("--synthetic-body-tint", type=_non_negative, default=24.0,
                   help="RGB levels by which a cell body's colour moves along its class's hue "
                        "direction: weak class evidence over the whole body besides the small "
                        "inclusion (per-channel colour jitter is ±20); 0 = the body carries no "
                        "class evidence (default: %(default)s)")
    m = parser.add_argument_group("model")
    m.add_argument("--modules", type=_names, default=("conv4_3", "conv5_3"),
                   help="conv layers followed by a threshold-suppression module, comma-separated; "
                        "'none' = the plain CAM baseline (default: %(default)s)")
    m.add_argument("--widths", type=comma_ints, default=(8, 16, 32, 64, 64),
                   help="VGG16 stage widths (VGG16: 64,128,256,512,512) (default: %(default)s)")
    m.add_argument("--conv6-width", type=int, default=128,
                   help="width of conv6, the CAM features (VGG16-CAM: 1024) (default: %(default)s)")
    m.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm after each conv; training from scratch needs it "
                        "(default: %(default)s)")
    m.add_argument("--cr", type=float, default=0.8,
                   help="suppression of the most discriminative features above cr·max "
                        "(default: %(default)s)")
    m.add_argument("--alpha", type=float, default=0.8,
                   help="curvature of the enhancement below cr·max (default: %(default)s)")
    m.add_argument("--t", type=float, default=0.4,
                   help="features below t·max are irrelevant (default: %(default)s)")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="computation dtype; parameters stay float32 (default: %(default)s)")
    m.add_argument("--init-from", metavar="RUN",
                   help="start from the best checkpoint of an earlier run (e.g. a plain CAM "
                        "run): every layer both networks have is copied, inserted modules keep "
                        "their initialisation; the optimiser and step start afresh")
    o = parser.add_argument_group("optimiser")
    o.add_argument("--learning-rate", type=float, default=2e-3,
                   help="AdamW peak learning rate, cosine decay (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="(default: %(default)s)")
    o.add_argument("--warmup-steps", type=int, default=50,
                   help="linear warm-up of the learning rate (default: %(default)s)")
    f = parser.add_argument_group("outputs")
    f.add_argument("--figures", type=int, default=12,
                   help="validation images drawn in figures/validation.png (default: %(default)s)")
    add_training_args(parser, workdir="runs/wsol", steps=800, batch_size=32, log_every=20,
                      checkpoint_every=200, eval_every=200, keep=3)
    return parser


def _dataset(args):
    if args.data_dir:
        data = load_wsol_folder(args.data_dir, image_size=args.image_size, boxes_csv=args.boxes)
    else:
        data = make_wsol_dataset(args.synthetic_images, image_size=args.image_size,
                                 num_classes=args.synthetic_classes, seed=args.seed,
                                 cooccurrence=args.synthetic_cooccurrence,
                                 body_tint=args.synthetic_body_tint,
                                 object_scale=args.synthetic_object_scale)
    return train_val_split(data, args.val_fraction, seed=args.seed)


def _flip(example: dict, rng: np.random.Generator) -> dict:
    """Host-side augmentation: a random horizontal flip (labels do not move; no boxes in
    training)."""
    if rng.random() < 0.5:
        example = {**example, "image": example["image"][:, ::-1]}
    return example


def train(args: argparse.Namespace) -> dict[str, float]:
    init_distributed(args)
    workdir = Path(args.workdir)
    train_set, val_set = _dataset(args)
    has_boxes = val_set.boxes is not None and any(len(b) for b in val_set.boxes)
    config = {k: getattr(args, k) for k in MODEL_KEYS if hasattr(args, k)}
    config.update(num_classes=len(train_set.class_names), class_names=list(train_set.class_names),
                  best_metric="val_maxboxacc_v2" if has_boxes else "val_top1", best_mode="max",
                  init_from=str(Path(args.init_from).resolve()) if args.init_from else None)
    wsol = build_wsol(config)
    initial_state = _initial_state(wsol, args)  # a bad --init-from fails before any write
    write_run_config(workdir, config)
    batches = make_batches(ArraySource(image=train_set.images, label=train_set.labels),
                           args.batch_size, seed=args.seed, transform=_flip)
    evaluate = validation(wsol, val_set.images, val_set.labels, val_set.boxes)
    fit(init_state=initial_state, train_step=wsol.train_step,
        train_data=batches, eval_fn=evaluate, best_metric=config["best_metric"],
        best_mode="max", **fit_options(args))
    # Report, and keep the thresholds of, the model that localises best on validation.
    wsol, state, _ = load_trained(workdir, "best")
    metrics = evaluate(state)
    if jax.process_index() == 0:
        (workdir / THRESHOLDS_NAME).write_text(json.dumps(
            {"threshold_50": metrics.get("val_threshold_50", 0.2), **metrics}, indent=2))
        _figures(wsol, state, val_set, metrics.get("val_threshold_50", 0.2),
                 workdir / "figures" / "validation.png", args.figures)
    print("validation (best checkpoint): " + ", ".join(
        f"{k} = {v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


def _initial_state(wsol, args):
    """The state to start from: a fresh network (`() -> state`), or with `--init-from` its
    warm start, read only when the run has no checkpoint of its own to resume from."""
    checkpoints = Checkpoints(args.workdir, keep=1)
    resuming = checkpoints.latest_step() is not None
    checkpoints.close()
    if not args.init_from or resuming:
        return lambda: wsol.init_state(args.seed)
    _, source, _ = load_trained(args.init_from, "best")
    state = wsol.init_state(args.seed)
    merged, copied, kept = transfer_matching(
        {"params": state.params, "batch_stats": state.batch_stats},
        {"params": source.params, "batch_stats": source.batch_stats},
        source_name=f"--init-from {args.init_from}")
    if jax.process_index() == 0:
        print(f"initialised {len(copied)} arrays from {args.init_from}; "
              f"{len(kept)} new: {', '.join(kept) or 'none'}")
    return TrainState.create(params=merged["params"], tx=wsol.tx, rng=state.rng,
                             batch_stats=merged["batch_stats"])


def _figures(wsol, state, val_set, threshold: float, path: Path, count: int) -> None:
    count = min(count, len(val_set.images))
    if count == 0:
        return
    images = val_set.images[:count]
    probabilities, cams = jax.jit(wsol.predict)(state, jnp.asarray(images),
                                                jnp.asarray(val_set.labels[:count]))
    cams, predicted = np.asarray(cams), np.argmax(np.asarray(probabilities), -1)
    guesses = [cam_boxes(c, threshold)[:1] for c in cams]
    truths = val_set.boxes[:count] if val_set.boxes is not None else [None] * count
    names = val_set.class_names
    titles = [f"{names[t]} → {names[p]}" for t, p in zip(val_set.labels[:count], predicted)]
    localization_grid(images, cams, guesses, truths, titles, path)


def localize_main(argv: list[str]) -> None:
    parser = inference_parser(
        "python -m train.wsol localize", "Predict the class of each image and localise it: a "
        "CAM overlay with the box (<name>.png), the CAM (<name>_cam.png) and localization.csv.",
        "image files")
    parser.add_argument("--threshold", type=float, default=None,
                        help="CAM threshold in [0, 1) (default: the run's best validation "
                             "threshold at IoU 0.5)")
    args = parser.parse_args(argv)
    for path in localize_files(args.workdir, args.input, args.output, which=args.checkpoint,
                               threshold=args.threshold):
        print(path)


def main(argv: list[str] | None = None) -> None:
    program_main(argv, build_parser=build_parser, train=train, commands={"localize": localize_main})


if __name__ == "__main__":
    main()
