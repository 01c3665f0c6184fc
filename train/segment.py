"""Medical image segmentation (SPEC.md S4): stem → CBAM → dilated ResNet → CBAM → pyramid
pooling → head, trained with cross-entropy + soft Dice. The seed segments kidney ultrasound
into outside kidney (0), hydronephrosis fluid (1) and kidney tissue (2).

    python -m train.segment                            # synthetic phantoms, runs/segment
    python -m train.segment --images IMGS --masks MASKS --workdir RUN
    python -m train.segment --depth 50 --width 64 --image-size 473   # the seed's network
    python -m train.segment predict --workdir RUN --input a.png b.png --output OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data.augment import augment_pair
from jaxmed.data.letterbox import letterbox
from jaxmed.data.segmentation_folder import load_segmentation_folder, read_pair
from jaxmed.data.synthetic_kidney import make_kidney_phantoms
from jaxmed.errors import InputDataError
from jaxmed.segmentation.figures import segmentation_grid
from jaxmed.segmentation.predict import load_trained, predict_files
from jaxmed.segmentation.steps import IGNORE, MODEL_KEYS, build_segmenter, validation
from jaxmed.training import (ArraySource, add_training_args, fit, fit_options, inference_parser,
                             init_distributed, make_batches, program_main, write_run_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.segment", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Segment images with a trained model: python -m train.segment predict --help")
    d = parser.add_argument_group("data (default: synthetic kidney-ultrasound phantoms)")
    d.add_argument("--images", help="folder of images (PNG/TIFF/JPEG)")
    d.add_argument("--masks", help="folder of label masks matched to the images by name")
    d.add_argument("--mask-suffix", default="", help="mask name = image stem + this suffix "
                                                     "(default: '%(default)s')")
    d.add_argument("--num-classes", type=int, default=3,
                   help="classes, labels 0..N-1 (default: %(default)s)")
    d.add_argument("--image-size", type=int, default=128,
                   help="letterbox size of the model input (seed: 473) (default: %(default)s)")
    d.add_argument("--val-fraction", type=float, default=0.2, help="(default: %(default)s)")
    d.add_argument("--synthetic-images", type=int, default=800,
                   help="synthetic phantoms (default: %(default)s)")
    d.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="flips, small rotations/scales and intensity jitter (default: %(default)s)")
    m = parser.add_argument_group("model")
    m.add_argument("--depth", type=int, choices=(18, 34, 50, 101), default=18,
                   help="ResNet depth (seed: 50) (default: %(default)s)")
    m.add_argument("--width", type=int, default=16,
                   help="base width; every layer scales with it (seed: 64) (default: %(default)s)")
    m.add_argument("--output-stride", type=int, choices=(8, 16), default=8,
                   help="feature stride of layer 4 (seed: 16) (default: %(default)s)")
    m.add_argument("--cbam", action=argparse.BooleanOptionalAction, default=True,
                   help="CBAM after the stem and after layer 4 (default: %(default)s)")
    m.add_argument("--ppm", action=argparse.BooleanOptionalAction, default=True,
                   help="pyramid pooling module (default: %(default)s)")
    m.add_argument("--aux-weight", type=float, default=0.4,
                   help="weight of the auxiliary head's loss on layer 3; 0 = no auxiliary head "
                        "(default: %(default)s)")
    m.add_argument("--dropout", type=float, default=0.1, help="(default: %(default)s)")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="computation dtype; parameters stay float32 (default: %(default)s)")
    o = parser.add_argument_group("loss and optimiser")
    o.add_argument("--ce-weight", type=float, default=1.0, help="(default: %(default)s)")
    o.add_argument("--dice-weight", type=float, default=1.0, help="(default: %(default)s)")
    o.add_argument("--learning-rate", type=float, default=2e-3,
                   help="AdamW peak learning rate, cosine decay (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="(default: %(default)s)")
    o.add_argument("--warmup-steps", type=int, default=30, help="(default: %(default)s)")
    f = parser.add_argument_group("outputs")
    f.add_argument("--figures", type=int, default=6,
                   help="validation images drawn in figures/validation.png (default: %(default)s)")
    add_training_args(parser, workdir="runs/segment", steps=1500, batch_size=8, log_every=25,
                      checkpoint_every=250, eval_every=250, keep=3)
    return parser


def _letterboxed(images, masks, size: int) -> tuple[np.ndarray, np.ndarray]:
    boxed = [letterbox(image, size, order=1)[0] for image in images]
    labels = [letterbox(mask, size, order=0, fill=IGNORE)[0] for mask in masks]
    return np.stack(boxed).astype(np.uint8), np.stack(labels).astype(np.int32)


def _dataset(args) -> tuple[np.ndarray, np.ndarray]:
    """All images and masks letterboxed to the model size: `[N, S, S, 3]` uint8, `[N, S, S]`."""
    if bool(args.images) != bool(args.masks):
        raise InputDataError("give both --images and --masks, or neither (synthetic data)")
    if args.images:
        pairs = load_segmentation_folder(args.images, args.masks, num_classes=args.num_classes,
                                         mask_suffix=args.mask_suffix, check_values=True)
        read = [read_pair(image, mask, args.num_classes) for image, mask in pairs]
        return _letterboxed([r[0] for r in read], [r[1] for r in read], args.image_size)
    images, masks = make_kidney_phantoms(args.synthetic_images, size=args.image_size,
                                         seed=args.seed)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    return images.astype(np.uint8), masks.astype(np.int32)


def _split(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    n_val = max(1, int(round(count * val_fraction)))
    if count - n_val < 1:
        raise InputDataError(f"{count} image(s) are too few to hold out {val_fraction:.0%}")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _augmentation(enabled: bool):
    def transform(example: dict, rng: np.random.Generator) -> dict:
        image, mask = augment_pair(example["image"], example["mask"], rng, mask_fill=IGNORE)
        return {"image": image, "mask": mask}

    return transform if enabled else None


def train(args: argparse.Namespace) -> dict[str, float]:
    init_distributed(args)
    workdir = Path(args.workdir)
    images, masks = _dataset(args)
    train_rows, val_rows = _split(len(images), args.val_fraction, args.seed)
    config = {k: getattr(args, k) for k in MODEL_KEYS}
    config.update(best_metric="val_mean_dice", best_mode="max")
    write_run_config(workdir, config)
    segmenter = build_segmenter(config)
    batches = make_batches(ArraySource(image=images[train_rows], mask=masks[train_rows]),
                           args.batch_size, seed=args.seed, transform=_augmentation(args.augment))
    evaluate = validation(segmenter, images[val_rows], masks[val_rows])
    fit(init_state=lambda: segmenter.init_state(args.seed), train_step=segmenter.train_step,
        train_data=batches, eval_fn=evaluate, best_metric="val_mean_dice", best_mode="max",
        **fit_options(args))
    segmenter, state, _ = load_trained(workdir, "best")
    metrics = evaluate(state)
    if jax.process_index() == 0 and args.figures:
        shown = val_rows[: args.figures]
        predictions = np.argmax(np.asarray(jax.jit(segmenter.logits)(
            state, jnp.asarray(images[shown]))), -1)
        segmentation_grid(images[shown], masks[shown], predictions,
                          workdir / "figures" / "validation.png")
    per_class = "  ".join(f"class {c}: Dice {metrics[f'val_dice_{c}']:.4f} IoU "
                          f"{metrics[f'val_iou_{c}']:.4f}" for c in range(args.num_classes))
    print(f"validation (best checkpoint): mean Dice {metrics['val_mean_dice']:.4f}, "
          f"mean IoU {metrics['val_mean_iou']:.4f}; {per_class}")
    return metrics


def predict_main(argv: list[str]) -> None:
    parser = inference_parser(
        "python -m train.segment predict", "Segment images: <name>_mask.png (class indices at "
        "the image's own size), <name>_colour.png and <name>_overlay.png.", "image files")
    args = parser.parse_args(argv)
    for path in predict_files(args.workdir, args.input, args.output, which=args.checkpoint):
        print(path)


def main(argv: list[str] | None = None) -> None:
    program_main(argv, build_parser=build_parser, train=train, commands={"predict": predict_main})


if __name__ == "__main__":
    main()
