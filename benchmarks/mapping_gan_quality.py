"""Quality of the mapping GAN's key feature maps on the VA-GAN synthetic protocol, against Grad-CAM.

For each protocol (2-D: the VA-GAN images, 112x112; 3-D: the program's no-argument run, 32^3) it

1. generates the synthetic study into WORKDIR/<protocol>/gan/data, then trains the mapping GAN by
   running `python -m train.mapping_gan` on it (a subprocess; WORKDIR/<protocol>/gan is its work
   directory, earlier run outputs there are deleted first so the run starts from step 0);
2. generates an independent test set (WORKDIR/<protocol>/test: seed `--seed` + 1, as many
   subjects as the validation split unless `--test-subjects`), which no run sees: VA-GAN's
   protocol splits train/validation/test 64/16/20;
3. for the latest and the best checkpoint computes, per test positive, the NCC of M(x)
   (channels summed) against the ground truth;
4. trains the baseline, a small CNN classifier (positive vs negative) on the program's training
   split (the same call and seed as the program), by default for as many training images as the
   GAN draws in its ordinary steps (steps x batch x (2 n_critic + 1)), and computes Grad-CAM of
   the positive class at its last conv layer for the same test positives (see
   benchmarks/_gradcam_baseline.py);
5. prints one table.

NCC is the Pearson correlation over all pixels/voxels of one subject (`jaxmed.metrics.ncc`);
the table gives mean ± std over the test positives.

Signs, so that both methods are scored fairly: the stored ground truth is minus the planted
effect (M(x) must remove the squares, y = x + M(x)), and the mapping GAN's NCC is taken against
it exactly as the program reports `val_ncc`: a map with the wrong sign scores negative. Grad-CAM
is non-negative by construction and carries no sign, so its NCC is taken against the ABSOLUTE
effect map (the planted squares, +100); since the ground truth is <= 0 everywhere this equals
minus its NCC against the stored map, i.e. Grad-CAM is scored by |NCC|.

Rows "mapping GAN (latest)" use the final generator (its moving average, as the program's
inference does; no selection); "mapping GAN (best)" use the
checkpoint the program kept as best by validation NCC, the one `python -m train.mapping_gan
apply` uses (VA-GAN, too, keeps the best model on validation). Both are scored on the test set,
so the selection is not scored on the subjects it was made on. The target (mapping-GAN NCC >= 0.8
on the 2-D protocol, docs/mapping_gan.md) is judged on both and printed.

    python benchmarks/mapping_gan_quality.py --protocols 2d --steps-2d 5 --subjects-2d 64  # smoke
    python benchmarks/mapping_gan_quality.py                                               # ~50 min
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _gradcam_baseline as baseline
from benchmarks._timing import print_table
from jaxmed import training
from jaxmed.data import nifti, synthetic_vagan
from jaxmed.mapping_gan import data
from jaxmed.mapping_gan.config import MappingGanConfig
from jaxmed.mapping_gan.inference import PROGRAM as GAN_PROGRAM
from jaxmed.mapping_gan.steps import build_mapping_gan
from jaxmed.metrics import ncc
from jaxmed.models.mapping_gan import UNet
from train.mapping_gan import build_parser as program_parser

REPO = Path(__file__).resolve().parents[1]
PROGRAM = program_parser().parse_args([])  # the program's defaults
# 2-D: the VA-GAN protocol at its size and number of images (10 000: with 1 000 the GAN
# overfits, as the VA-GAN repository warns; validation NCC then fell from 0.83 at step 500 to
# 0.79 at step 1 000) with a critic small enough for a CPU run of about fifteen minutes; 3-D:
# exactly what `python -m train.mapping_gan` does with no arguments.
PROTOCOLS = {
    "2d": dict(dims=2, label="2-D VA-GAN 112²", size=synthetic_vagan.REFERENCE_SIZE,
               subjects=synthetic_vagan.REFERENCE_SUBJECTS, steps=1000,
               options=("--critic-widths", "4,8,12", "--critic-growth", "4",
                        "--n-critic-warmup", "20", "--warmup-steps", "10")),
    "3d": dict(dims=3, label=f"3-D {PROGRAM.synthetic_size}³ (program default)",
               size=PROGRAM.synthetic_size, subjects=PROGRAM.synthetic_subjects,
               steps=PROGRAM.steps, options=()),
}
# Files and folders a mapping-GAN run writes into its work directory (data/ is kept and reused).
_RUN_OUTPUTS = ("checkpoints", "best", "metrics.jsonl", "tensorboard", "config.json", "figures")
TARGET_NCC = 0.8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/mapping_gan_quality.py",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocols", default="2d,3d",
                   help="comma-separated subset of 2d,3d (default: %(default)s)")
    p.add_argument("--workdir", default="runs/mapping_gan_quality",
                   help="root of the runs' work directories (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="data, split and initialisation seed (default: %(default)s)")
    b = p.add_argument_group("budget per protocol (the GAN's steps are generator steps)")
    b.add_argument("--steps", type=int,
                   help="GAN steps for every protocol (overrides --steps-2d/-3d)")
    b.add_argument("--subjects", type=int,
                   help="subjects for every protocol (overrides --subjects-2d/-3d)")
    for protocol, spec in PROTOCOLS.items():
        b.add_argument(f"--steps-{protocol}", type=int, default=spec["steps"],
                       help=f"GAN steps, {protocol} (default: %(default)s)")
        b.add_argument(f"--subjects-{protocol}", type=int, default=spec["subjects"],
                       help=f"synthetic subjects, half positive, {protocol} "
                       "(default: %(default)s)")
        b.add_argument(f"--size-{protocol}", type=int, default=spec["size"],
                       help=f"image/volume side, {protocol} (default: %(default)s)")
    b.add_argument("--test-subjects", type=int, default=None,
                   help="independent test subjects per protocol (default: as many as the "
                   "validation split)")
    b.add_argument("--evals", type=int, default=10,
                   help="validations per GAN run (evenly spaced; also at the end) "
                   "(default: %(default)s)")
    g = p.add_argument_group("mapping GAN (python -m train.mapping_gan: its defaults, and for 2-D "
                             + " ".join(PROTOCOLS["2d"]["options"]) + ")")
    g.add_argument("--batch-size", type=int, default=PROGRAM.batch_size,
                   help="GAN batch size (default: %(default)s)")
    g.add_argument("--gan-args", default="",
                   help="further program options for every run, one string: "
                   "--gan-args='--l1-weight 10'")
    c = p.add_argument_group("Grad-CAM baseline classifier")
    c.add_argument("--cnn-widths", default="8,16,32",
                   help="conv widths per level (default: %(default)s)")
    c.add_argument("--cnn-steps-2d", type=int, default=None,
                   help="classifier steps, 2-D (default: as many training images as the GAN "
                   "draws: GAN steps x batch x (2 n_critic + 1) / classifier batch)")
    c.add_argument("--cnn-steps-3d", type=int, default=None,
                   help="classifier steps, 3-D (default: likewise)")
    c.add_argument("--cnn-batch-size", type=int, default=16,
                   help="classifier batch size (default: %(default)s)")
    c.add_argument("--cnn-learning-rate", type=float, default=1e-3,
                   help="Adam lr (default: %(default)s)")
    return p


def _per(args, name: str, protocol: str):
    """A per-protocol option, `--steps`/`--subjects` overriding theirs."""
    shared = getattr(args, name, None)
    return shared if shared is not None else getattr(args, f"{name}_{protocol}")


# ------------------------------------------------------------------------------ mapping GAN


def _clean_run(workdir: Path) -> None:
    """Deletes a previous run's outputs (not its data) so the program starts from step 0."""
    for name in _RUN_OUTPUTS:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def gan_command(args, protocol: str, workdir: Path) -> list[str]:
    steps = _per(args, "steps", protocol)
    every = max(1, math.ceil(steps / max(args.evals, 1)))
    return [sys.executable, "-m", "train.mapping_gan", "--workdir", str(workdir),
            "--synthetic-dims", str(PROTOCOLS[protocol]["dims"]),
            "--synthetic-size", str(_per(args, "size", protocol)),
            "--synthetic-subjects", str(_per(args, "subjects", protocol)),
            "--seed", str(args.seed), "--steps", str(steps), "--batch-size", str(args.batch_size),
            "--eval-every", str(every), "--checkpoint-every", str(every),
            "--log-every", str(every), *PROTOCOLS[protocol]["options"], "--figures", "0",
            "--no-progress", *shlex.split(args.gan_args)]


def _program_options(args, protocol: str, workdir: Path) -> argparse.Namespace:
    """The program's options, parsed from the command it is given."""
    return program_parser().parse_args(gan_command(args, protocol, workdir)[3:])


def run_gan(args, protocol: str, workdir: Path) -> float:
    """Generates the data the program would, then runs the program; returns its wall time."""
    synthetic_vagan.write_dataset(workdir / "data", dims=PROTOCOLS[protocol]["dims"],
                                  n_subjects=_per(args, "subjects", protocol), seed=args.seed,
                                  size=_per(args, "size", protocol))
    _clean_run(workdir)
    command = gan_command(args, protocol, workdir)
    print("$ python " + shlex.join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - start


def _read_as_program(args, protocol: str, workdir: Path, manifest: Path,
                     val_fraction: float | None = None, seed: int | None = None) -> data.Study:
    """A study read as the program reads its data: with its options, parsed from the command it
    was given; `val_fraction`/`seed` default to the program's split."""
    options = _program_options(args, protocol, workdir)
    config = MappingGanConfig.from_args(options)
    return data.load_study(
        nifti.read_manifest(manifest),
        downsampling=UNet(features=config.generator_features).total_downsampling,
        val_fraction=options.val_fraction if val_fraction is None else val_fraction,
        seed=config.seed if seed is None else seed, normalisation=config.normalisation,
        percentiles=config.percentiles)


def load_program_study(args, protocol: str, workdir: Path) -> data.Study:
    """The program's study and its train/validation split."""
    return _read_as_program(args, protocol, workdir, workdir / "data" / "manifest.csv")


def load_test_set(args, protocol: str, workdir: Path,
                  study: data.Study) -> dict[str, np.ndarray]:
    """`{'image', 'label', 'effect'}` of the positives of a fresh synthetic set (both halves of
    its split)."""
    n = args.test_subjects or len(study.val)
    manifest = synthetic_vagan.write_dataset(workdir.parent / "test",
                                             dims=PROTOCOLS[protocol]["dims"], n_subjects=n,
                                             seed=args.seed + 1,
                                             size=_per(args, "size", protocol))
    test = _read_as_program(args, protocol, workdir, manifest, val_fraction=0.5, seed=0)
    halves = [split.arrays() for split in (test.train, test.val)]
    positive = np.concatenate([h["label"] for h in halves]) == nifti.POSITIVE
    return {key: np.concatenate([h[key] for h in halves])[positive]
            for key in ("image", "label", "effect")}


def gan_ncc(workdir: Path, which: str, study: data.Study, test: dict,
            batch_size: int = 16) -> np.ndarray:
    """Per test positive: NCC of M(x) (channels summed, padding cropped) vs the ground truth,
    the program's validation step (`MappingGan.eval_step`) on the test set."""
    run = training.load_run(workdir, build_mapping_gan, program=GAN_PROGRAM, which=which)
    gan = build_mapping_gan(run.config, crop=study.crop)
    outputs = training.evaluate(gan.eval_step, run.state, test, count=len(test["label"]),
                                batch_size=batch_size)
    return outputs["ncc"]


def program_ncc(workdir: Path) -> tuple[float, float]:
    """(final, best) `val_ncc` as the program logged them in metrics.jsonl."""
    values = [r["val_ncc"] for r in training.read_metrics(str(workdir)) if "val_ncc" in r]
    return values[-1], max(values)


# ------------------------------------------------------------------------------ Grad-CAM


def classifier_steps(args, protocol: str, workdir: Path) -> int:
    """`--cnn-steps-*`, else the steps that draw as many training images as the GAN's critic
    and generator minibatches of its ordinary (not warm-up) steps."""
    if _per(args, "cnn_steps", protocol):
        return _per(args, "cnn_steps", protocol)
    options = _program_options(args, protocol, workdir)
    images = options.steps * options.batch_size * (2 * options.n_critic + 1)
    return max(1, math.ceil(images / args.cnn_batch_size))


def gradcam_ncc(args, protocol: str, study: data.Study, test: dict,
                steps: int) -> tuple[np.ndarray, dict]:
    """Trains the classifier on the training split; |NCC| of its Grad-CAM per test positive."""
    widths = tuple(int(v) for v in args.cnn_widths.split(","))
    train, val = study.train.arrays(), study.val.arrays()
    model, params, seconds = baseline.train_classifier(
        train["image"], train["label"], widths=widths, steps=steps,
        batch_size=args.cnn_batch_size, learning_rate=args.cnn_learning_rate, seed=args.seed)
    predicted = baseline.predict(model, params, val["image"]) > 0
    accuracy = float(np.mean(predicted == (val["label"] == 1)))
    crop = (Ellipsis, *study.crop)
    cams = baseline.grad_cam_batches(model, params, test["image"])[crop]  # [N, *S]
    truth = np.abs(test["effect"][..., 0])[crop]  # |ground truth| = the planted squares
    scores = np.asarray(ncc(cams, truth, axis=tuple(range(1, truth.ndim))))
    return scores, dict(steps=steps, seconds=seconds, accuracy=accuracy)


# ------------------------------------------------------------------------------ main


def evaluate(args, protocol: str) -> list[dict]:
    workdir = Path(args.workdir) / protocol / "gan"
    seconds = run_gan(args, protocol, workdir)
    final, best = program_ncc(workdir)
    study = load_program_study(args, protocol, workdir)
    test = load_test_set(args, protocol, workdir, study)
    subjects = f"{len(study.train)}/{len(study.val)}/{2 * len(test['label'])}"
    steps = _per(args, "steps", protocol)
    rows = []
    for which, logged in (("latest", final), ("best", best)):
        scores = gan_ncc(workdir, which, study, test)
        note = f"program val_ncc {logged:.4f}" + (", selected on val" if which == "best" else "")
        rows.append(dict(protocol=protocol, method=f"mapping GAN ({which})", scores=scores,
                         steps=steps, batch=args.batch_size, subjects=subjects, seconds=seconds,
                         note=note))
    scores, info = gradcam_ncc(args, protocol, study, test,
                               classifier_steps(args, protocol, workdir))
    rows.append(dict(protocol=protocol, method="Grad-CAM (|NCC|)", scores=scores,
                     steps=info["steps"], batch=args.cnn_batch_size, subjects=subjects,
                     seconds=info["seconds"],
                     note=f"classifier val accuracy {info['accuracy']:.3f}"))
    return rows


def report(rows: list[dict], command: str) -> None:
    print(f"\n$ {command}")
    headers = ["protocol", "method", "NCC mean ± std", "n", "steps", "batch",
               "subjects train/val/test", "wall s", "note"]
    print_table(headers, [[PROTOCOLS[r["protocol"]]["label"], r["method"],
                           f"{r['scores'].mean():+.3f} ± {r['scores'].std():.3f}",
                           len(r["scores"]), r["steps"], r["batch"], r["subjects"],
                           f"{r['seconds']:.0f}", r["note"]] for r in rows])
    for r in rows:
        if r["protocol"] == "2d" and r["method"].startswith("mapping GAN"):
            met = "met" if r["scores"].mean() >= TARGET_NCC else "NOT met"
            print(f"target mapping-GAN NCC >= {TARGET_NCC} on 2-D, {r['method']}: "
                  f"{r['scores'].mean():.3f} -> {met}")
    print("GAN wall s: the whole program run (start-up, compilation, validation, checkpoints); "
          "Grad-CAM wall s: classifier training only.")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise SystemExit(f"--protocols: choose from {sorted(PROTOCOLS)}, got {args.protocols!r}")
    start = time.perf_counter()
    rows = [row for protocol in protocols for row in evaluate(args, protocol)]
    report(rows, shlex.join(["python", "benchmarks/mapping_gan_quality.py", *argv]))
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
