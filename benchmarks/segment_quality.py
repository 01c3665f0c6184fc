"""Segmentation quality on the synthetic kidney-ultrasound phantoms: the full model against its
ablations, with one training budget.

Each variant is a run of the program itself (`train.segment.train`, the same data, split, seed,
steps and evaluation as `python -m train.segment`), in WORKDIR/<variant> (earlier outputs there
are deleted first). The table gives the validation Dice per class (0 outside kidney, 1 fluid,
2 kidney tissue), the mean Dice and IoU over classes of the best checkpoint (selected by
validation mean Dice, as the program does), the parameter count and the wall time, and the
difference to the full model in the same run.

    python benchmarks/segment_quality.py                      # 3 variants x the program default
    python benchmarks/segment_quality.py --steps 100 --variants full   # smoke
    python benchmarks/segment_quality.py -- --depth 34 --width 32      # options for every run

Target (issue 5): mean Dice >= 0.9 for the full model on the phantoms.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import print_table  # noqa: E402
from jaxmed.segmentation.config import SegmentationConfig  # noqa: E402
from jaxmed.segmentation.inference import PROGRAM  # noqa: E402
from jaxmed.segmentation.steps import build_segmenter  # noqa: E402
from jaxmed.training import load_run  # noqa: E402
from train import segment  # noqa: E402

VARIANTS = {
    "full": [],
    "no CBAM": ["--no-cbam"],
    "no PPM": ["--no-ppm"],
}


def _parameters(workdir: Path) -> int:
    state = load_run(workdir, build_segmenter, program=PROGRAM).state
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/bench_segment_quality")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of every run (default: the program's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="options passed to every run (after --)")
    args = parser.parse_args()

    rows, full = [], None
    for name in args.variants.split(","):
        workdir = Path(args.workdir) / name.replace(" ", "_")
        shutil.rmtree(workdir, ignore_errors=True)
        options = ["--workdir", str(workdir), "--seed", str(args.seed), "--no-progress",
                   *VARIANTS[name], *args.extra]
        if args.steps is not None:
            options += ["--steps", str(args.steps), "--eval-every", str(max(args.steps // 4, 1)),
                        "--checkpoint-every", str(max(args.steps // 4, 1))]
        run = segment.build_parser().parse_args(options)
        start = time.perf_counter()
        metrics = segment.train(run, SegmentationConfig.from_args(run))
        seconds = time.perf_counter() - start
        if name == "full":
            full = metrics["val_mean_dice"]
        rows.append([name, *(metrics[f"val_dice_{c}"] for c in range(run.num_classes)),
                     metrics["val_mean_dice"], metrics["val_mean_iou"],
                     metrics["val_mean_dice"] - full if full is not None else math.nan,
                     _parameters(workdir), seconds])

    print()
    print(f"synthetic kidney phantoms, {run.steps} steps of batch {run.batch_size}, "
          f"{run.image_size}x{run.image_size}, ResNet-{run.depth} width {run.width}, "
          f"output stride {run.output_stride}, seed {args.seed}")
    classes = [f"Dice {c}" for c in range(run.num_classes)]
    print_table(["variant", *classes, "mean Dice", "mean IoU", "Δ mean Dice vs full",
                 "params", "train s"], rows)
    if full is not None:
        print(f"target mean Dice >= 0.9 (full model): {'met' if full >= 0.9 else 'NOT met'} "
              f"({full:.4f})")


if __name__ == "__main__":
    main()
