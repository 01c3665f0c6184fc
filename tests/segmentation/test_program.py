"""`python -m train.segment` end to end, in subprocesses: training outputs (metrics with Dice
per class, checkpoints, figures), resume (a changed `--steps` is recorded, a changed model
option refused), a folder dataset of non-square images on 2 simulated devices and the same run
as two processes, `predict` at the images' own sizes, bad option values and bad inputs that
fail without touching an existing work directory.

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
from tests.programs import (
    PNG_MAGIC,
    Job,
    assert_help_lists,
    assert_resumed,
    assert_runs_match,
    assert_usage_error,
    failure_message,
    metrics_rows,
    once,
    program_env,
    session_folder,
    snapshot,
    start_two_processes,
)
from train import segment

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


def _folder_run(workdir: pathlib.Path, folder: pathlib.Path) -> list[str]:
    return _train(workdir, "--steps", "2", "--images", str(folder / "images"), "--masks",
                  str(folder / "masks"), "--no-cbam", "--no-ppm", "--aux-weight", "0")


@pytest.fixture(scope="module")
def trainings(tmp):
    """Phase 1: the synthetic run; the folder run on 2 devices of one process, and as two
    processes of one device each (the same global batch on the same device count); an odd
    batch on 2 devices."""
    cache = tmp / "jax_cache"
    folder = tmp / "folder_data"
    commands = {
        "synthetic": (_train(tmp / "run", "--steps", "4"), 1),
        "folder": (_folder_run(tmp / "folder_run", folder), 2),
        "odd_batch": (_train(tmp / "odd_batch", "--batch-size", "3"), 2),
    }
    jobs = {name: Job(tmp, name) for name in commands}
    two = [Job(tmp, f"two_processes.{i}") for i in range(2)]

    def launch():
        _write_folder(folder)
        for name, (args, devices) in commands.items():
            jobs[name].start(args, program_env(cache, devices))
        two[:] = start_two_processes(tmp, "two_processes", _folder_run(tmp / "two_run", folder),
                                     program_env(cache))

    once(tmp, "phase1", launch)
    jobs.update({job.name: job for job in two})
    yield jobs
    for job in jobs.values():
        job.finish()


@pytest.fixture(scope="module")
def followups(tmp, trainings):
    run, cache = tmp / "run", tmp / "jax_cache"
    inputs = [tmp / "inputs" / "tall.png", tmp / "inputs" / "wide.tif"]
    bad = _bad_cases(tmp / "bad")
    commands = {"resume": _train(tmp / "resumed", "--steps", "6"),
                "predict": _predict(run, tmp / "predicted", *inputs),
                "other_width": _train(run, "--steps", "4", "--width", "8")}
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


def test_folder_dataset_two_devices_and_ablation_flags(tmp, trainings):
    done = trainings["folder"].ok()
    assert "mean Dice" in done.stdout
    config = json.loads((tmp / "folder_run" / "config.json").read_text())
    assert (config["cbam"], config["ppm"], config["aux_weight"]) == (False, False, 0.0)
    assert config["images"] == str(tmp / "folder_data" / "images")
    assert "aux_loss" not in metrics_rows(tmp / "folder_run")[0]
    assert sorted(os.listdir(tmp / "folder_run" / "checkpoints")) == ["2"]


def test_two_processes_train_as_one_process_with_two_devices(tmp, trainings):
    """Each process reads only its rows of every batch and its share of the held-out images;
    the parameters and the validation scores match the one-process run's."""
    first = trainings["two_processes.0"].ok()
    trainings["two_processes.1"].ok()
    single = trainings["folder"].ok()
    assert_runs_match(tmp / "two_run", tmp / "folder_run",
                      ["val_mean_dice", "val_dice_0", "val_dice_1", "val_dice_2", "val_accuracy"])
    line = [t for t in single.stdout.splitlines() if t.startswith("validation (best")]
    assert line and line[0] in first.stdout


def test_batch_not_divisible_by_the_devices_is_a_usage_error(trainings):
    assert_usage_error(trainings["odd_batch"].result(), "--batch-size")


@pytest.mark.parametrize("option, value", [("--val-fraction", "1.5"), ("--batch-size", "0"),
                                           ("--depth", "19"), ("--dropout", "1.5"),
                                           ("--num-classes", "1"), ("--dtype", "float16"),
                                           ("--image-size", "16"), ("--images", "folder")])
def test_bad_option_values_are_one_line_usage_errors(capsys, option, value):
    """Checked before JAX starts: exit status 2, one line naming the option."""
    with pytest.raises(SystemExit) as exit_:
        segment.main([option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and option in err, err


def test_help_lists_every_option():
    assert_help_lists("train.segment", segment.build_parser(), readme_section="Segmentation")


def test_resume_continues_and_records_the_new_step_count(tmp, followups):
    assert_resumed(followups["jobs"]["resume"], tmp / "resumed", saved_step=4, steps=6)
    config = json.loads((tmp / "resumed" / "config.json").read_text())
    assert config["steps"] == 6
    assert config["resumed"] == [{"step": 4, "changed": {"steps": [4, 6]}}]


def test_resume_with_another_model_option_is_refused(followups):
    assert_usage_error(followups["jobs"]["other_width"].result(), "--width: saved 4, now 8")


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
    for case in [*followups["bad"], "other_width"]:
        assert followups["jobs"][case].result().returncode != 0
    followups["jobs"]["predict"].result()
    assert snapshot(tmp / "run") == followups["before"]
