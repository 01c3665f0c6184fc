"""Whole-slide images (docs/pathology.md): two attention ResNet-18s pre-trained on tile labels
from region annotations (network 1 on each tile downsampled, network 2 on its full-resolution
blocks), their attention-weighted features fused into one vector per slide, and a slide
classifier on top.

    python -m train.wsi                                  # synthetic cohort, runs/wsi
    python -m train.wsi --slides DIR --labels DIR/labels.csv --workdir RUN
    python -m train.wsi --pretrained resnet18.safetensors --width 64   # from ImageNet weights
    python -m train.wsi extract --workdir RUN --slides DIR_OR_LIST --output OUT
    python -m train.wsi classify --workdir RUN --input a.svs b.svs --output OUT
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import h5py
import jax
import numpy as np

from jaxmed.pathology.config import PROGRAM, WsiConfig, run_config
from jaxmed.pathology.data import (
    load_slides,
    pretraining_set,
    split_slides,
    stain_normalizer,
    synchronise,
    train_batches,
)
from jaxmed.pathology.extract import extract_slides, list_slides
from jaxmed.pathology.inference import (
    CLASSIFIER_DIR,
    FEATURES_DIR,
    classify_slides,
    draw_attention,
    host_copy,
    load_featurizer,
    slide_features,
    slide_metrics,
    write_predictions,
    write_results,
)
from jaxmed.pathology.steps import (
    NETWORKS,
    WsiFeaturizer,
    build_classifier,
    build_network,
    initial_states,
    slide_vector,
)
from jaxmed.training import (
    RESUMABLE_OPTIONS,
    ArraySource,
    add_distributed_args,
    add_training_args,
    fit,
    fit_options,
    init_distributed,
    make_batches,
    one_line_errors,
    positive_int,
    prepare_run_config,
    program_main,
    read_run_config,
)


def add_extraction_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("extraction")
    group.add_argument("--tile-batch", type=positive_int, default=16,
                       help="tiles per device batch, a multiple of this host's device count "
                            "(default: %(default)s)")
    group.add_argument("--readers", type=positive_int, default=4,
                       help="threads reading and decoding tiles ahead of the devices "
                            "(default: %(default)s)")
    return parser


def remove_stale_features(workdir: Path, featurizer: WsiFeaturizer) -> None:
    """Remove the run's features, and the slide classifier fitted on them, when they were made
    by other networks (a resume with more --steps trained them further): both are made again."""
    fingerprint = featurizer.attributes()["fingerprint"]
    for path in sorted((workdir / FEATURES_DIR).glob("*.h5")):
        try:
            with h5py.File(path, "r") as file:
                stale = file.attrs.get("fingerprint") != fingerprint
        except OSError:
            continue  # unreadable: not complete, so extraction redoes it
        if stale:
            shutil.rmtree(workdir / FEATURES_DIR)
            shutil.rmtree(workdir / CLASSIFIER_DIR, ignore_errors=True)
            return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Extract features: python -m train.wsi extract --help; classify slides: "
               "python -m train.wsi classify --help")
    WsiConfig.add_options(parser)
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--figures", type=int, default=6,
                         help="held-out slides drawn with their attention in figures/ "
                              "(default: %(default)s)")
    add_extraction_args(parser)
    add_training_args(parser, workdir="runs/wsi", steps=400, batch_size=32, log_every=25,
                      checkpoint_every=100)
    return parser


def train(args: argparse.Namespace, config: WsiConfig) -> dict[str, float]:
    workdir = Path(args.workdir)

    # --- data --- (slides and labels, split by slide; the synthetic cohort is written once)
    slides = load_slides(config, workdir)
    train_set, test_set = split_slides(slides, config.test_fraction, config.seed)
    values = run_config(config, list(slides.class_names))
    networks = {which: build_network(values, which) for which in NETWORKS}
    starts = initial_states(networks, config.pretrained)  # a bad file fails before config.json
    prepare_run_config(workdir, values, resumable=config.resumable() | RESUMABLE_OPTIONS,
                       checkpoint_dirs=[workdir / d for d in (*NETWORKS, CLASSIFIER_DIR)])
    normalizer = stain_normalizer(config, workdir)
    pretraining = pretraining_set(config, train_set, workdir, normalizer,
                                  readers=args.readers, progress=args.progress)
    print(f"{len(slides)} slides ({len(train_set)} training, {len(test_set)} held out); "
          f"pre-training images: {int((pretraining.low_labels >= 0).sum())} low-resolution, "
          f"{int((pretraining.high_labels >= 0).sum())} high-resolution")

    # --- pre-train both networks --- (each its own run: workdir/low, workdir/high)
    states = {}
    stains = None if normalizer is None else normalizer.target.stains
    for i, which in enumerate(NETWORKS):
        network = networks[which]
        batches = train_batches(pretraining.source(which), args.batch_size,
                                seed=config.seed + i, augmenting=config.augment, stains=stains)
        print(f"pre-training network {i + 1} ({which} resolution)")
        result = fit(init_state=starts[which], train_step=network.train_step,
                     train_data=batches, **{**fit_options(args), "workdir": str(workdir / which)})
        states[which] = host_copy(result.state)

    # --- features of every slide --- (resumable; this host's share of the slides)
    featurizer = WsiFeaturizer(config, networks, states, normalizer)
    if jax.process_index() == 0:
        remove_stale_features(workdir, featurizer)
    synchronise("wsi-stale-features")
    report = extract_slides(slides.paths, workdir / FEATURES_DIR, featurizer,
                            batch_size=args.tile_batch, readers=args.readers,
                            progress=args.progress)
    synchronise("wsi-features")
    features = slide_features(workdir / FEATURES_DIR, slides.paths)
    missing = [p.name for p in slides.paths if p not in features]
    if missing:
        sys.exit(f"error: features of {len(missing)} slide(s) are missing ({report.failed} "
                 f"failed here): {', '.join(missing[:5])}; see "
                 f"{workdir / FEATURES_DIR / 'index.csv'}")

    # --- slide classifier --- (full batch on the training slides' features)
    classifier = build_classifier(values)
    train_x = np.stack([slide_vector(features[p], config) for p in train_set.paths])
    devices = jax.device_count()
    rows = -(-len(train_x) // devices) * devices
    pad = rows - len(train_x)
    source = ArraySource(
        feature=np.concatenate([train_x, np.zeros((pad, train_x.shape[1]), np.float32)]),
        label=np.concatenate([train_set.labels, np.zeros(pad, np.int32)]),
        weight=np.concatenate([np.ones(len(train_x), np.float32), np.zeros(pad, np.float32)]))
    steps = config.classifier_steps
    result = fit(init_state=lambda: classifier.init_with(train_x),
                 train_step=classifier.train_step,
                 train_data=make_batches(source, rows, seed=config.seed, shuffle=False),
                 workdir=str(workdir / CLASSIFIER_DIR), num_steps=steps,
                 log_every=max(1, min(args.log_every, steps)), checkpoint_every=steps,
                 keep=1, progress=args.progress)

    # --- evaluate on the held-out slides ---
    test_x = np.stack([slide_vector(features[p], config) for p in test_set.paths])
    probabilities = np.asarray(classifier.probabilities(host_copy(result.state), test_x))
    names = list(slides.class_names)
    metrics = slide_metrics(probabilities, test_set.labels, names)

    # --- outputs ---
    if jax.process_index() == 0:
        write_results(workdir, metrics)
        write_predictions(workdir / "predictions.csv", [p.name for p in test_set.paths],
                          probabilities, names, [names[k] for k in test_set.labels])
        for i, path in enumerate(test_set.paths[:args.figures]):
            k = int(np.argmax(probabilities[i]))
            draw_attention(path, features[path], config,
                           workdir / "figures" / f"{path.stem}_attention.png",
                           f"{path.name}: {names[k]} ({probabilities[i, k]:.2f}), "
                           f"label {names[test_set.labels[i]]}")
    print("held-out slides: " + ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items()))
    return metrics


def build_extract_parser() -> argparse.ArgumentParser:
    parser = one_line_errors(argparse.ArgumentParser(
        prog=f"{PROGRAM} extract",
        description="Extract the features of many slides with a trained run: per slide "
                    "<output>/<stem>.h5 (tile coordinates, low- and high-resolution features "
                    "and attention scores, tile features, the slide feature) and "
                    "<output>/index.csv. Resumable; slides are divided among processes; the "
                    "exit status is the number of slides that failed (at most 100)."))
    parser.add_argument("--workdir", required=True, help="the training run's work directory")
    parser.add_argument("--slides", required=True,
                        help="a folder of slides, or a text/CSV file listing them")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--retry-failed", action="store_true",
                        help="extract again the slides that failed in an earlier run")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar (default: %(default)s)")
    add_extraction_args(parser)
    add_distributed_args(parser)
    return parser


def extract_main(argv: list[str]) -> None:
    args = build_extract_parser().parse_args(argv)
    init_distributed(args)
    values = read_run_config(args.workdir, PROGRAM)
    featurizer = load_featurizer(args.workdir, values)
    report = extract_slides(list_slides(args.slides), args.output, featurizer,
                            batch_size=args.tile_batch, readers=args.readers,
                            retry_failed=args.retry_failed, progress=args.progress)
    print(f"{report.done} slides extracted, {report.skipped} already done, {report.failed} "
          f"failed; {report.tiles} tiles in {report.seconds:.1f} s "
          f"(input wait {100 * report.input_wait_seconds / max(report.seconds, 1e-9):.1f} %)")
    if report.failed:
        sys.exit(min(report.failed, 100))


def build_classify_parser() -> argparse.ArgumentParser:
    parser = one_line_errors(argparse.ArgumentParser(
        prog=f"{PROGRAM} classify",
        description="Classify slides with a trained run (its latest checkpoints): "
                    "predictions.csv (class and probabilities per slide), "
                    "<stem>_attention.png (the attention of each tile), and the extracted "
                    "features in <output>/features."))
    parser.add_argument("--workdir", required=True, help="the training run's work directory")
    parser.add_argument("--input", nargs="+", required=True, help="slide files")
    parser.add_argument("--output", required=True, help="output folder")
    add_extraction_args(parser)
    return parser


def classify_main(argv: list[str]) -> None:
    args = build_classify_parser().parse_args(argv)
    written, failed = classify_slides(args.workdir, args.input, args.output,
                                      batch_size=args.tile_batch, readers=args.readers)
    for path in written:
        print(path)
    if failed:
        sys.exit(min(failed, 100))


def main(argv: list[str] | None = None) -> None:
    program_main(argv, build_parser=build_parser, train=train, config=WsiConfig,
                 commands={"extract": extract_main, "classify": classify_main})


if __name__ == "__main__":
    main()
