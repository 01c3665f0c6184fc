"""Localisation quality of threshold suppression against plain CAM, on the synthetic WSOL data.

Three variants of the VGG16-CAM classifier — no module (the CAM baseline), one module after
conv5_3, two modules after conv4_3 and conv5_3 — are each trained with the same data, budget
and seeds by the program itself (`train.wsol.train`, as `python -m train.wsol`), in
WORKDIR/<variant>/seed<k>. For each run the best checkpoint (by validation MaxBoxAccV2, as the
program selects it) is scored on the validation split: top-1 accuracy, MaxBoxAcc at IoU 0.5 and
0.7 (largest contour) and MaxBoxAccV2 (all contours, mean over IoU 0.3/0.5/0.7), all in %.
The table gives mean ± standard deviation over the seeds, and the difference of the means to
the CAM baseline in the same run (the design this system follows reports +1.1 and +3.5 points
at IoU 0.5 for one and two modules on ImageNet-pretrained VGG16; docs/wsol.md).

The data are the program's synthetic cells, whose most discriminative part is a small inclusion
while the whole body carries a weaker class cue, a hue tint (`--synthetic-body-tint`, the
program's default unless given after `--`); suppressing the strongest activations is meant to
make the network use that weaker evidence, so that its CAM spreads over the body.

    python benchmarks/wsol_quality.py                        # 3 variants x 3 seeds
    python benchmarks/wsol_quality.py --seeds 1 --steps 50   # smoke
    python benchmarks/wsol_quality.py -- --image-size 128    # options for every run
    python benchmarks/wsol_quality.py -- --synthetic-body-tint 0   # bodies without class cue
    python benchmarks/wsol_quality.py --pretrain-steps 400 --steps 400   # warm start
    python benchmarks/wsol_quality.py --resume -- --image-size 224   # hours: resumable
    python benchmarks/wsol_quality.py --pretrained vgg16.safetensors --resume   # the original
                                                                   # design's regime

Measured (2026-11-22, 2 CPU cores, `python benchmarks/wsol_quality.py`, 3 seeds, 800 steps,
% on validation; mean ± std): CAM MaxBoxAcc 0.5 30.6 ± 9.5, one module 17.2 ± 3.9, two modules
14.1 ± 5.2; MaxBoxAccV2 36.9 / 24.3 / 20.6. On these data the modules do not beat plain CAM:
erasing each channel's peaks makes the class evidence, and so the CAM, spread around the
object, over a map that already covers more than the cell; and a module after conv4_3 can stall
training from scratch (one seed of three stays at 75 % top-1, two classes merged). Warm-started
(`--pretrain-steps 400 --steps 400`) every network reaches 99.6-99.9 % top-1, and MaxBoxAcc 0.5
is 38.1 ± 1.7 (CAM), 18.3 ± 5.6 (one module), 13.1 ± 4.2 (two). Single-seed trials of other
geometries (`python -m train.wsol`, best checkpoint) agree: at 224×224, the original resolution
(14×14 CAM), 400 steps, CAM 57.9 against 38.8 for two modules (its best checkpoint, step
100 at 83.5 % top-1; 21.3 at step 400, 100 % top-1); at 128×128 with cells of
semi-axis 0.28-0.38 and tint 16, 400 steps, CAM 75.4, one module 69.0, two 54.4; at 96×96 with
cells of semi-axis 0.34-0.44 (box 40 % of the image), tint 16, 800 steps, all three are at
92.7-94.0, a tie (IoU 0.7: 25.8, 24.6, 22.3). In every
one of them plain CAM's box at its best threshold is already 1.14-1.5 times the cell's box
(median), so there is nothing for the modules' spreading to recover.

`--pretrain-steps N` is the original design's regime, which inserts its modules into a
pretrained VGG16: for each seed a plain CAM network is trained for N steps first
(WORKDIR/pretrain/seed<k>), and every variant, the CAM baseline included, is then trained from
it (`--init-from`) for the given steps.

`--pretrained FILE` is the regime the original design reports its gain in: every network starts
conv1_1 ... conv5_3 from torchvision's ImageNet VGG16 (a safetensors file; convert
torchvision's vgg16-397923af.pth once with `python -m jaxmed.weights convert
vgg16-397923af.pth vgg16.safetensors`), at full widths (64,128,256,512,512, conv6 1024),
without BatchNorm (as torchvision's `vgg16`; give `-- --batch-norm` for a `vgg16_bn` file), at
224×224, inputs normalised with ImageNet's mean and std. Options after `--` override these.
With `--pretrain-steps` the plain CAM network starts from the file and the variants from it.
It needs an accelerator to finish in reasonable time (VGG16 at 224×224 is ~15 GFLOPs per
image and step); not measured here.

`--resume` makes a long benchmark survive interruptions (at 224×224 it takes hours on a CPU):
each run's options and, once it has finished, its metrics and time are kept in
WORKDIR/<variant>/seed<k>/benchmark.json. With `--resume` a finished run with the same options
is not trained again, and an unfinished one continues from its last checkpoint (the program
resumes by itself); a run whose options differ is started afresh. Without `--resume` every run
starts afresh. The time of a run resumed mid-way is unknown and left out of "train s".
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import print_table  # noqa: E402
from jaxmed.wsol.config import WsolConfig  # noqa: E402
from train import wsol  # noqa: E402

VARIANTS = {
    "CAM": "none",
    "1 module (conv5_3)": "conv5_3",
    "2 modules (conv4_3, conv5_3)": "conv4_3,conv5_3",
}
RECORD_NAME = "benchmark.json"
COLUMNS = ("val_top1", "val_maxboxacc_50", "val_maxboxacc_70", "val_maxboxacc_v2")
# With --pretrained: the shape of torchvision's VGG16 and the original resolution.
PRETRAINED_REGIME = ("--widths", "64,128,256,512,512", "--conv6-width", "1024",
                     "--no-batch-norm", "--image-size", "224")


def _read_record(path: Path) -> dict | None:
    """A run's `benchmark.json`, or None when it is missing or unreadable (the run is redone)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "options" in record else None


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(path)


def _mean_known(values: list[float | None]) -> float | str:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else "-"


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/bench_wsol_quality")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of every run (default: the program's)")
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="train a plain CAM network this long per seed and start every "
                             "variant from it (default: 0, every run from scratch)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs an earlier invocation with the same options "
                             "finished, and continue the ones it left unfinished")
    parser.add_argument("--pretrained", metavar="FILE.safetensors", default=None,
                        help="start every network from torchvision's ImageNet VGG16 weights, "
                             "at full widths, without BatchNorm, 224x224 (see above)")
    parser.add_argument("extra", nargs="*", help="options passed to every run (after --)")
    args = parser.parse_args()
    regime = PRETRAINED_REGIME if args.pretrained else ()

    def train(workdir: Path, seed: int, modules: str, steps: int | None, *extra: str,
              redo: bool = False):
        # A warm-started run takes the pretrained network's weights and normalisation.
        weights = ("--pretrained", str(Path(args.pretrained).resolve())) \
            if args.pretrained and "--init-from" not in extra else ()
        options = ["--workdir", str(workdir), "--seed", str(seed), "--modules", modules,
                   "--no-progress", *regime, *weights, *args.extra, *extra]
        if steps is not None:
            every = str(max(steps // 4, 1))
            options += ["--steps", str(steps), "--eval-every", every, "--checkpoint-every", every]
        run = wsol.build_parser().parse_args(options)
        record = workdir / RECORD_NAME
        kept = _read_record(record) if args.resume and not redo else None
        if kept is not None and kept["options"] == options and "metrics" in kept:
            print(f"{workdir}: finished earlier with the same options; not trained again")
            return run, kept["metrics"], kept["seconds"], True
        continuing = kept is not None and kept["options"] == options
        if not continuing:
            shutil.rmtree(workdir, ignore_errors=True)
            _write_record(record, {"options": options})
        start = time.perf_counter()
        metrics = {k: float(v) for k, v in wsol.train(run, WsolConfig.from_args(run)).items()}
        seconds = None if continuing else time.perf_counter() - start
        _write_record(record, {"options": options, "metrics": metrics, "seconds": seconds})
        return run, metrics, seconds, False

    pretrained, retrained = {}, set()  # a run warm-started from a retrained network is redone
    if args.pretrain_steps > 0:
        for seed in range(args.seeds):
            pretrained[seed] = Path(args.workdir) / "pretrain" / f"seed{seed}"
            if not train(pretrained[seed], seed, "none", args.pretrain_steps)[3]:
                retrained.add(seed)
    results: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for name, modules in VARIANTS.items():
        for seed in range(args.seeds):
            warm = ("--init-from", str(pretrained[seed])) if pretrained else ()
            workdir = Path(args.workdir) / modules.replace(",", "+") / f"seed{seed}"
            run, metrics, wall, _ = train(workdir, seed, modules, args.steps, *warm,
                                          redo=seed in retrained)
            results.setdefault(name, []).append(metrics)
            seconds.setdefault(name, []).append(wall)

    baseline = {c: statistics.mean(r[c] for r in results["CAM"]) for c in COLUMNS}
    rows = []
    for name, runs in results.items():
        means = {c: statistics.mean(r[c] for r in runs) for c in COLUMNS}
        rows.append([name, *(_mean_std([r[c] for r in runs]) for c in COLUMNS),
                     *(f"{means[c] - baseline[c]:+.2f}" for c in COLUMNS[1:]),
                     _mean_known(seconds[name])])
    print()
    start = (f"from a plain CAM network trained {args.pretrain_steps} steps, "
             if pretrained else "from scratch, ")
    if args.pretrained:
        start = f"ImageNet VGG16 ({args.pretrained}), " + start.replace("from scratch, ", "")
    print(f"synthetic WSOL data, {args.seeds} seed(s), {start}{run.steps} steps of batch "
          f"{run.batch_size}, {run.image_size}x{run.image_size}, body tint "
          f"{run.synthetic_body_tint:g}, cell semi-axis "
          f"{'-'.join(f'{v:g}' for v in run.synthetic_object_scale)} of the side, VGG16 widths "
          f"{','.join(map(str, run.widths))}, conv6 {run.conv6_width}; % on the validation split")
    print_table(["variant", "top-1", "MaxBoxAcc 0.5", "MaxBoxAcc 0.7", "MaxBoxAccV2",
                 "Δ 0.5 vs CAM", "Δ 0.7 vs CAM", "Δ V2 vs CAM", "train s"], rows)


if __name__ == "__main__":
    main()
