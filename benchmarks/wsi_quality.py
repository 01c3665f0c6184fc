"""Slide classification from one feature vector per slide: the multi-scale attention fusion
against the slide representations it is meant to beat, on held-out synthetic slides.

For each seed the program itself (`python -m train.wsi`, its CPU defaults unless options are
given after `--`) generates a synthetic cohort (3 classes, 10 slides each: tumour classes show
only as small foci whose texture differs in 2-pixel detail that a x0.5 area downsampling
removes, beside a label-independent stroma distractor visible at every resolution;
docs/pathology.md), pre-trains both networks, extracts every slide's per-tile features and
trains its slide classifier, in WORKDIR/seed<k>. Then, on the same extracted features and the
same train/test split, one slide classifier per representation is trained exactly as the
program trains its own (`build_classifier`, full batch, `--classifier-steps`) and scored on the
held-out slides:

- `attention`: the fused feature, `sum_t ŵ_L,t [F_L,t ; sum_i ŵ_H,i F_H,t,i]`;
- `mean`: the mean of all patch features `[F_L ; F_H,i]`;
- `random`: one random patch's feature (drawn with the seed);
- `representative`: the patch nearest the centre of the largest k-means cluster (k = 4);
- `low`, `high`: single-scale attention pooling (low-resolution only, high-resolution only).

The table gives slide accuracy and macro one-vs-rest AUC (mean ± standard deviation over the
seeds) and each method's difference to the fused feature's mean. The program's own accuracy
(results.json, trained with `fit` and checkpoints) is checked against the `attention` row.

    python benchmarks/wsi_quality.py                      # 3 seeds, the program's defaults
    python benchmarks/wsi_quality.py --seeds 0            # one seed
    python benchmarks/wsi_quality.py -- --stain macenko   # options for every run
    python benchmarks/wsi_quality.py --fresh              # retrain (runs are kept and resumed)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/wsi_quality.py` from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_WORKDIR = Path.home() / ".cache" / "jaxmed" / "wsi_quality"
METHODS = ("attention", "mean", "random", "representative", "low", "high")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds, one cohort and run each "
                             "(default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="where the runs are kept (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete earlier runs first (else they are resumed or reused)")
    parser.add_argument("program_args", nargs="*",
                        help="options for every `python -m train.wsi` run, after `--`")
    return parser.parse_args(argv)


def run_program(workdir: Path, seed: int, extra: list[str]) -> float:
    """Train (or resume) one run; returns its wall time in seconds."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "train.wsi", "--workdir", str(workdir), "--seed",
               str(seed), "--no-progress", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return time.perf_counter() - start


def evaluate_run(workdir: Path) -> dict[str, dict[str, float]]:
    """Every representation's held-out metrics for one finished run."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmed.pathology.config import PROGRAM, WsiConfig
    from jaxmed.pathology.data import load_slides, split_slides
    from jaxmed.pathology.inference import FEATURES_DIR, slide_features, slide_metrics
    from jaxmed.pathology.steps import build_classifier, slide_vector
    from jaxmed.training import read_run_config

    values = read_run_config(workdir, PROGRAM)
    config = WsiConfig.from_dict(values)
    slides = load_slides(config, workdir)
    train, test = split_slides(slides, config.test_fraction, config.seed)
    features = slide_features(workdir / FEATURES_DIR, slides.paths)
    results = {}
    for method in METHODS:
        x_train = np.stack([slide_vector(features[p], config, method, seed=config.seed)
                            for p in train.paths])
        x_test = np.stack([slide_vector(features[p], config, method, seed=config.seed)
                           for p in test.paths])
        classifier = build_classifier({**values, "aggregation": method})
        state = classifier.init_with(x_train)
        step = jax.jit(classifier.train_step)
        batch = {"feature": jnp.asarray(x_train), "label": jnp.asarray(train.labels),
                 "weight": jnp.ones(len(x_train), jnp.float32)}
        for _ in range(config.classifier_steps):
            state, _ = step(state, batch)
        probabilities = np.asarray(classifier.probabilities(state, jnp.asarray(x_test)))
        results[method] = slide_metrics(probabilities, test.labels, list(slides.class_names))
    results["program"] = json.loads((workdir / "results.json").read_text())
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    per_seed, seconds = {}, {}
    for seed in seeds:
        workdir = args.workdir / f"seed{seed}"
        seconds[seed] = run_program(workdir, seed, args.program_args)
        per_seed[seed] = evaluate_run(workdir)
        print(f"seed {seed}: run {seconds[seed]:.0f} s; " + ", ".join(
            f"{m} {per_seed[seed][m]['slide_accuracy']:.1f} %" for m in METHODS), flush=True)

    from benchmarks._timing import print_table

    def stats(method: str, key: str) -> tuple[float, float, list[float]]:
        values = [per_seed[s][method].get(key, float("nan")) for s in seeds]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.mean(values), spread, values

    base_acc = stats("attention", "slide_accuracy")[0]
    rows = []
    for method in METHODS:
        acc, acc_sd, values = stats(method, "slide_accuracy")
        auc, auc_sd, _ = stats(method, "macro_auc")
        rows.append([method, f"{acc:.1f} ± {acc_sd:.1f}", f"{acc - base_acc:+.1f}",
                     f"{auc:.3f} ± {auc_sd:.3f}", " ".join(f"{v:.0f}" for v in values)])
    options = " ".join(args.program_args) or "the program's defaults"
    print(f"\nheld-out slide classification, {len(seeds)} seed(s) ({options}); "
          f"accuracy in %, mean ± std over seeds")
    print_table(["representation", "accuracy", "vs attention", "macro AUC", "per seed"], rows)
    for seed in seeds:
        program = per_seed[seed]["program"]["slide_accuracy"]
        ours = per_seed[seed]["attention"]["slide_accuracy"]
        agree = "agrees" if abs(program - ours) < 1e-6 else "DIFFERS"
        print(f"seed {seed}: the program's own accuracy {program:.1f} % {agree} with the "
              f"attention row ({ours:.1f} %)")


if __name__ == "__main__":
    main()
