"""`python -m train.segment` end to end, in subprocesses: training outputs (metrics with Dice
per class, checkpoints, figures), resume, a folder dataset of non-square images, 8 simulated
devices, `predict` at the images' own sizes, and bad inputs that fail naming the file without
touching an existing work directory.

Phase 1 trains; phase 2 starts what needs a trained run (see tests/programs.py).
"""

import json
import math
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from jaxmed.data.synthetic_kidney import make_kidney_phantoms
from tests.programs import (PNG_MAGIC, Job, assert_help_lists, assert_resumed, failure_message,
                            metrics_rows, once, program_env, session_folder, snapshot)

TINY = ["--image-size", "32", "--synthetic-images", "24", "--depth", "18", "--width", "4",
        "--batch-size", "4", "--eval-every", "2", "--checkpoint-every", "2", "--log-every", "1",
        "--warmup-steps", "1", "--figures", "2", "--no-progress"]


def _train(workdir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.segment", "--workdir", str(workdir), *TINY, *extra]


def _predict(workdir: pathlib.Path, output: pathlib.Path, *inputs: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "train.segment", "predict", "--workdir", str(workdir),
            "--input", *map(str, inputs), "--output", str(output)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return session_folder(tmp_path_factory, "segment_program")


def _write_folder(root: pathlib.Path, count: int = 8, seed: int = 3) -> pathlib.Path:
    """Non-square image/mask pairs (PNG images, TIFF masks) in root/images and root/masks."""
    images, masks = make_kidney_phantoms(count, size=40, seed=seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i, (image, mask) in enumerate(zip(images, masks)):
        image, mask = image[:, 4:34], mask[:, 4:34]  # 40 x 30
        Image.fromarray(image).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"case{i}.tif")
    return root


def _bad_cases(root: pathlib.Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Bad folders: {case: (the path the message must name, words in it)}."""
    return {"missing": (str(root / "missing" / "images" / "case2.png"), ("mask",)),
            "size": (str(root / "size" / "masks" / "case1.tif"), ("size",)),
            "labels": (str(root / "labels" / "masks" / "case3.tif"), ("7",)),
            "corrupt": (str(root / "corrupt" / "images" / "case0.png"), ("cannot read",)),
            "empty": (str(root / "empty" / "images"), ())}


def _write_bad_cases(root: pathlib.Path) -> None:
    for case in ("missing", "size", "labels", "corrupt"):
        _write_folder(root / case)
    (root / "missing" / "masks" / "case2.tif").unlink()
    Image.fromarray(np.zeros((12, 9), np.uint8)).save(root / "size" / "masks" / "case1.tif")
    Image.fromarray(np.full((40, 30), 7, np.uint8)).save(root / "labels" / "masks" / "case3.tif")
    (root / "corrupt" / "images" / "case0.png").write_bytes(b"garbage")
    (root / "empty" / "images").mkdir(parents=True)
    (root / "empty" / "masks").mkdir()


@pytest.fixture(scope="module")
def trainings(tmp):
    cache = tmp / "jax_cache"
    folder = tmp / "folder_data"
    commands = {
        "synthetic": (_train(tmp / "run", "--steps", "4"), 1),
        "folder": (_train(tmp / "folder_run", "--steps", "2", "--images", str(folder / "images"),
                          "--masks", str(folder / "masks"), "--no-cbam", "--no-ppm",
                          "--aux-weight", "0"), 1),
        "8dev": (_train(tmp / "run8", "--steps", "2", "--batch-size", "8"), 8),
    }
    jobs = {name: Job(tmp, name) for name in commands}

    def launch():
        _write_folder(folder)
        for name, (args, devices) in commands.items():
            jobs[name].start(args, program_env(cache, devices))

    once(tmp, "phase1", launch)
    yield jobs
    for job in jobs.values():
        job.finish()


@pytest.fixture(scope="module")
def followups(tmp, trainings):
    run, cache = tmp / "run", tmp / "jax_cache"
    inputs = [tmp / "inputs" / "tall.png", tmp / "inputs" / "wide.tif"]
    bad = _bad_cases(tmp / "bad")
    commands = {"resume": _train(tmp / "resumed", "--steps", "6"),
                "predict": _predict(run, tmp / "predicted", *inputs)}
    for case in bad:
        folder = tmp / "bad" / case
        commands[case] = _train(run, "--steps", "4", "--images", str(folder / "images"),
                                "--masks", str(folder / "masks"))
    jobs = {name: Job(tmp, name) for name in commands}

    def launch():
        trainings["synthetic"].ok()
        (tmp / "run_before.json").write_text(json.dumps(snapshot(run)))
        shutil.copytree(run, tmp / "resumed", symlinks=True)
        _write_bad_cases(tmp / "bad")
        images, _ = make_kidney_phantoms(2, size=48, seed=11)
        inputs[0].parent.mkdir(exist_ok=True)
        Image.fromarray(images[0][:, 10:31]).save(inputs[0])   # 48 x 21
        Image.fromarray(images[1][5:22]).save(inputs[1])       # 17 x 48
        for name, args in commands.items():
            jobs[name].start(args, program_env(cache))

    once(tmp, "phase2", launch)
    before = [tuple(entry) for entry in json.loads((tmp / "run_before.json").read_text())]
    yield dict(jobs=jobs, bad=bad, before=before)
    for job in jobs.values():
        job.finish()


def test_training_writes_every_output(tmp, trainings):
    done = trainings["synthetic"].ok()
    assert "mean Dice" in done.stdout and "class 2: Dice" in done.stdout
    run = tmp / "run"
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["aux_loss"]) for r in rows)
    assert len({round(r["loss"], 6) for r in rows}) > 1
    evaluated = [r for r in rows if "val_mean_dice" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    for row in evaluated:
        for c in range(3):
            assert 0 <= row[f"val_dice_{c}"] <= 1 or math.isnan(row[f"val_dice_{c}"])
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    assert len(os.listdir(run / "best")) == 1
    assert (run / "figures" / "validation.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((run / "config.json").read_text())["best_metric"] == "val_mean_dice"


def test_folder_dataset_and_ablation_flags(tmp, trainings):
    done = trainings["folder"].ok()
    assert "mean Dice" in done.stdout
    config = json.loads((tmp / "folder_run" / "config.json").read_text())
    assert (config["cbam"], config["ppm"], config["aux_weight"]) == (False, False, 0.0)
    assert "aux_loss" not in metrics_rows(tmp / "folder_run")[0]


def test_eight_devices(tmp, trainings):
    trainings["8dev"].ok()
    assert sorted(os.listdir(tmp / "run8" / "checkpoints")) == ["2"]


def test_help_lists_every_option():
    assert_help_lists("train.segment", (
        "--images", "--masks", "--mask-suffix", "--num-classes", "--image-size", "--val-fraction",
        "--synthetic-images", "--augment", "--depth", "--width", "--output-stride", "--cbam",
        "--ppm", "--aux-weight", "--dropout", "--dtype", "--ce-weight", "--dice-weight",
        "--learning-rate", "--weight-decay", "--warmup-steps", "--figures", "--steps",
        "--batch-size", "--workdir"))


def test_resume_continues(tmp, followups):
    assert_resumed(followups["jobs"]["resume"], tmp / "resumed", saved_step=4, steps=6)


def test_predict_writes_masks_at_the_image_size(tmp, followups):
    followups["jobs"]["predict"].ok()
    out = tmp / "predicted"
    for stem, shape in (("tall", (48, 21)), ("wide", (17, 48))):
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == shape and mask.max() < 3
        for suffix in ("colour", "overlay"):
            picture = Image.open(out / f"{stem}_{suffix}.png")
            assert picture.size == (shape[1], shape[0])


@pytest.mark.parametrize("case", ["missing", "size", "labels", "corrupt", "empty"])
def test_bad_input_fails_naming_the_file(followups, case):
    path, words = followups["bad"][case]
    message = failure_message(followups["jobs"][case].result())
    assert path in message, message
    for word in words:
        assert word in message.lower(), message


def test_failed_runs_leave_the_work_directory_untouched(tmp, followups):
    for case in followups["bad"]:
        assert followups["jobs"][case].result().returncode != 0
    followups["jobs"]["predict"].result()
    assert snapshot(tmp / "run") == followups["before"]
