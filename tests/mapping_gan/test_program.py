"""`python -m train.mapping_gan` end to end, in subprocesses: training outputs, resume, 8
simulated devices, `apply` (3-D and 2-D), and bad inputs that must fail with a message naming
the file without touching an existing work directory.

Phase 1 trains (3-D, 2-D, 8 devices); phase 2 starts everything that needs a trained work
directory (see tests/programs.py).
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA

from tests.programs import (ROOT, TIMEOUT, Job, failure_message, metrics_rows, once, program_env,
                            session_folder, snapshot)

ANATOMICAL = pathlib.Path(NIBABEL_DATA) / "anatomical.nii"  # (33, 41, 25), 2 mm, flipped x
# Critic updates are 2 in every step (warm-up or not), so all steps share one compiled shape.
TINY = ["--synthetic-subjects", "40", "--synthetic-size", "16", "--eval-every", "2",
        "--checkpoint-every", "2", "--log-every", "1", "--n-critic-warmup", "2", "--warmup-steps", "1",
        "--n-critic", "2", "--batch-size", "4", "--no-progress", "--generator-features", "4,8",
        "--critic-widths", "4,8", "--critic-growth", "4", "--critic-layers", "1", "--critic-head", "4",
        "--critic-pooling-channels", "4", "--figures", "2"]
GAN_METRICS = ("loss", "critic_loss", "wasserstein", "gradient_penalty")


def _train(workdir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.mapping_gan", "--workdir", str(workdir), *TINY, *extra]


def _apply(workdir: pathlib.Path, output: pathlib.Path, *inputs: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "train.mapping_gan", "apply", "--workdir", str(workdir),
            "--input", *map(str, inputs), "--output", str(output)]


# ------------------------------------------------------------------------ bad-input folders


def _save(path: pathlib.Path, data: np.ndarray) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
    return path


def _groups(root: pathlib.Path, seed: int) -> tuple[pathlib.Path, pathlib.Path]:
    """Two folders of three good 8³ volumes each."""
    rng = np.random.default_rng(seed)
    pos, neg = root / "positive", root / "negative"
    for i in range(3):
        _save(pos / f"p{i}.nii.gz", rng.normal(size=(8, 8, 8)))
        _save(neg / f"n{i}.nii.gz", rng.normal(size=(8, 8, 8)))
    return pos, neg


_BAD_FILES = {"corrupt": ("positive", "x.nii.gz"), "shapes": ("negative", "n9.nii.gz"),
              "nan": ("positive", "p_nan.nii.gz"), "inf": ("negative", "n_inf.nii.gz"),
              "empty": ("positive", ""), "constant": ("negative", "n_constant.nii.gz")}


def _bad_case_paths(root: pathlib.Path, case: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(positive dir, negative dir, the path the error must name) of one bad-input case."""
    pos, neg = root / case / "positive", root / case / "negative"
    group, name = _BAD_FILES[case]
    folder = pos if group == "positive" else neg
    return pos, neg, (folder / name if name else folder)


def _write_bad_case(root: pathlib.Path, case: str) -> None:
    """Three good volumes per group plus the bad one (or an empty positive group)."""
    pos, neg, bad = _bad_case_paths(root, case)
    _groups(root / case, seed=len(case))
    rng = np.random.default_rng(1)
    if case == "corrupt":
        bad.write_bytes(rng.integers(0, 256, size=4000, dtype=np.uint8).tobytes())
    elif case == "shapes":
        _save(bad, rng.normal(size=(8, 8, 6)))
    elif case in ("nan", "inf"):
        data = rng.normal(size=(8, 8, 8))
        data[1, 2, 3] = np.nan if case == "nan" else np.inf
        _save(bad, data)
    elif case == "empty":
        shutil.rmtree(pos)
        pos.mkdir()
    elif case == "constant":
        _save(bad, np.full((8, 8, 8), 5.0))


# Words (lower case) the message must contain besides the file name.
BAD_TRAINING = {"corrupt": ("corrupt",), "shapes": ("shape", "differs"), "nan": ("1 nan", "not finite"),
                "inf": ("1 infinite", "not finite"), "empty": ("no positive volumes",),
                "constant": ("constant",)}
BAD_APPLY = {"apply_channels": ("2 channel", "trained on 1"), "apply_3d_to_2d": ("3-d", "2-d")}


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return session_folder(tmp_path_factory, "mapping_gan_program")


@pytest.fixture(scope="module")
def trainings(tmp):
    """Phase 1, started together: the 3-D run, a 2-D run (dense critic), an 8-device run."""
    cache = tmp / "jax_cache"
    commands = {
        "3d": (_train(tmp / "run3d", "--steps", "2"), 1),
        "2d": (_train(tmp / "run2d", "--steps", "2", "--synthetic-dims", "2", "--synthetic-size", "32",
                      "--critic", "dense"), 1),
        "8dev": (_train(tmp / "run8", "--steps", "2", "--batch-size", "8"), 8),
    }
    jobs = {name: Job(tmp, name) for name in commands}

    def launch():
        for name, (args, devices) in commands.items():
            jobs[name].start(args, program_env(cache, devices))

    once(tmp, "phase1", launch)
    yield jobs
    for job in jobs.values():
        job.finish()


@pytest.fixture(scope="module")
def followups(tmp, trainings):
    """Phase 2, started together once the 3-D and 2-D runs are done: resume (in a copy of the 3-D
    work directory), an uninterrupted run of the resumed length, `apply`, and the bad inputs
    (training ones with the 3-D run's work directory, which must stay untouched)."""
    run3d, run2d, cache = tmp / "run3d", tmp / "run2d", tmp / "jax_cache"
    two_channels = tmp / "inputs" / "two_channels.nii.gz"
    commands = {
        "resume": _train(tmp / "resumed", "--steps", "4"),
        "fresh4": _train(tmp / "fresh4", "--steps", "4"),
        "apply3d": _apply(run3d, tmp / "out3d", ANATOMICAL),
        "apply2d": _apply(run2d, tmp / "out2d", run2d / "data" / "positive" / "sub-0000.nii.gz"),
        "apply_channels": _apply(run3d, tmp / "out_bad", two_channels),
        "apply_3d_to_2d": _apply(run2d, tmp / "out_bad", ANATOMICAL),
    }
    named = {"apply_channels": str(two_channels), "apply_3d_to_2d": str(ANATOMICAL)}
    for case in BAD_TRAINING:
        pos, neg, bad = _bad_case_paths(tmp / "bad", case)
        named[case] = str(bad)
        commands[case] = _train(run3d, "--steps", "2", "--positive-dir", str(pos), "--negative-dir", str(neg))
    jobs = {name: Job(tmp, name) for name in commands}

    def launch():
        trainings["3d"].ok()
        trainings["2d"].ok()
        (tmp / "run3d_before.json").write_text(json.dumps(snapshot(run3d)))
        shutil.copytree(run3d, tmp / "resumed", symlinks=True)
        _save(two_channels, np.random.default_rng(2).normal(size=(16, 16, 16, 2)))
        for case in BAD_TRAINING:
            _write_bad_case(tmp / "bad", case)
        for name, args in commands.items():
            jobs[name].start(args, program_env(cache))

    once(tmp, "phase2", launch)
    before = [tuple(entry) for entry in json.loads((tmp / "run3d_before.json").read_text())]
    yield dict(jobs=jobs, named=named, before=before)
    for job in jobs.values():
        job.finish()


# ---------------------------------------------------------------------------------- tests


def test_training_writes_every_output(tmp, trainings):
    done = trainings["3d"].ok()
    workdir = tmp / "run3d"
    assert "val_ncc" in done.stdout
    assert os.listdir(workdir / "checkpoints") == ["2"]
    assert os.listdir(workdir / "best") == ["2"]
    assert any(p.stat().st_size > 0 for p in (workdir / "tensorboard").glob("events.out.tfevents.*"))

    rows = metrics_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name in GAN_METRICS:
            assert math.isfinite(row[name]), (name, row)
    assert {"val_ncc", "val_wasserstein", "val_l1"} <= rows[-1].keys()

    config = json.loads((workdir / "config.json").read_text())
    assert config["input_shape"] == [16, 16, 16, 1]
    assert (config["spatial_dims"], config["channels"]) == (3, 1)
    assert (config["best_metric"], config["best_mode"]) == ("val_ncc", "max")
    assert config["generator_features"] == [4, 8] and config["critic"] == "tt"
    assert (config["lr_decay_start"], config["lr_decay_end"]) == (1, 2)  # --steps 2, --lr-decay 0.5
    assert rows[0]["learning_rate"] == pytest.approx(config["learning_rate"])  # step 1 ran at rate(0)

    figures = sorted((workdir / "figures").glob("*.png"))
    assert len(figures) == 2  # --figures 2
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # Figures are of validation positives, which have ground-truth maps beside them.
        assert (workdir / "data" / "positive" / f"{figure.stem}_effect.nii.gz").is_file()


def test_help_lists_every_option():
    done = subprocess.run([sys.executable, "-m", "train.mapping_gan", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    for option in ("--workdir", "--positive-dir", "--negative-dir", "--manifest", "--normalisation",
                   "--percentiles", "--val-fraction", "--synthetic-dims", "--synthetic-size",
                   "--synthetic-subjects", "--generator-features", "--generator-norm", "--critic",
                   "--critic-widths", "--critic-growth", "--critic-layers", "--critic-norm",
                   "--critic-pooling-channels", "--critic-head", "--tt-rank", "--dtype", "--l1-weight",
                   "--lipschitz", "--gp-weight", "--clip", "--learning-rate", "--lr-decay", "--n-critic",
                   "--n-critic-warmup", "--warmup-steps", "--warmup-every", "--figures", "--val-chunk",
                   "--steps", "--batch-size", "--seed", "--log-every", "--checkpoint-every",
                   "--eval-every", "--keep", "--no-progress", "--coordinator-address"):
        assert option in done.stdout, option
    done = subprocess.run([sys.executable, "-m", "train.mapping_gan", "apply", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    for option in ("--workdir", "--input", "--output", "--checkpoint"):
        assert option in done.stdout, option


def test_eight_devices(tmp, trainings):
    done = trainings["8dev"].ok()
    assert "validation after 2 steps" in done.stdout
    assert os.listdir(tmp / "run8" / "checkpoints") == ["2"]
    assert all(math.isfinite(r["loss"]) for r in metrics_rows(tmp / "run8"))


def test_resume_continues_from_the_saved_step(tmp, followups):
    done = followups["jobs"]["resume"].ok()
    assert "Resuming from step 2" in done.stdout + done.stderr
    assert [r["step"] for r in metrics_rows(tmp / "resumed")] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp / "resumed" / "checkpoints")) == ["2", "4"]
    # Same data order, keys and parameters as a run that was never interrupted.
    followups["jobs"]["fresh4"].ok()
    resumed, fresh = metrics_rows(tmp / "resumed"), metrics_rows(tmp / "fresh4")
    for got, expected in zip(resumed[2:], fresh[2:]):
        for name in GAN_METRICS:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, err_msg=(got["step"], name))


def _assert_written_like(output: pathlib.Path, source: pathlib.Path) -> None:
    """`<name>_map` and `<name>_mapped` have the input's shape and affine; mapped - map is the
    input min-max normalised to [-1, 1]; a PNG beside them."""
    name = source.name.split(".nii")[0]
    image = nib.load(source)
    x = np.asarray(image.get_fdata(), np.float64)
    x = 2 * (x - x.min()) / (x.max() - x.min()) - 1
    maps = {}
    for kind in ("map", "mapped"):
        written = nib.load(output / f"{name}_{kind}.nii.gz")
        assert written.shape == image.shape, kind
        np.testing.assert_allclose(written.affine, image.affine, atol=1e-6, err_msg=kind)
        maps[kind] = np.asarray(written.get_fdata(), np.float64)
        assert np.isfinite(maps[kind]).all()
    assert np.abs(maps["map"]).max() > 0
    np.testing.assert_allclose(maps["mapped"] - maps["map"], x, atol=1e-5)
    assert (output / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_apply_3d_keeps_shape_and_affine(tmp, followups):
    done = followups["jobs"]["apply3d"].ok()
    assert "anatomical_map.nii.gz" in done.stdout
    _assert_written_like(tmp / "out3d", ANATOMICAL)


def test_apply_2d_model_round_trips_its_own_file(tmp, followups):
    followups["jobs"]["apply2d"].ok()
    source = tmp / "run2d" / "data" / "positive" / "sub-0000.nii.gz"
    assert nib.load(source).shape == (32, 32, 1)
    assert json.loads((tmp / "run2d" / "config.json").read_text())["spatial_dims"] == 2
    _assert_written_like(tmp / "out2d", source)


@pytest.mark.parametrize("case", [*BAD_TRAINING, *BAD_APPLY])
def test_bad_input_fails_naming_the_file(followups, case):
    message = failure_message(followups["jobs"][case].result())
    assert str(followups["named"][case]) in message, message
    for words in (BAD_TRAINING | BAD_APPLY)[case]:
        assert words in message.lower(), message


def test_failed_runs_leave_the_work_directory_untouched(tmp, followups):
    for case in BAD_TRAINING:  # each used the 3-D run's work directory
        assert followups["jobs"][case].result().returncode != 0
    for job in followups["jobs"].values():  # `apply` reads it too
        job.result()
    after = snapshot(tmp / "run3d")
    assert after == followups["before"]
    assert os.listdir(tmp / "run3d" / "checkpoints") == ["2"]
