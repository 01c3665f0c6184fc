"""`python -m train.wsol` end to end, in subprocesses: training outputs (metrics, checkpoints,
figures, thresholds), resume (a changed `--steps` is recorded, a changed model option refused),
a folder dataset with boxes on 2 simulated devices and the same run as two processes, the warm
start, `localize` on images of other sizes, bad option values, and bad inputs that fail naming
the file without touching an existing work directory.

Phase 1 trains on synthetic data and on a folder; phase 2 starts what needs a trained run
(see tests/programs.py).
"""

import csv
import json
import math
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from jaxmed.data.synthetic_wsol import make_wsol_dataset, write_wsol_folder
from jaxmed.training import load_run
from jaxmed.wsol.config import PROGRAM
from jaxmed.wsol.steps import build_wsol
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
from train import wsol

TINY = ["--image-size", "32", "--synthetic-images", "48", "--synthetic-classes", "3",
        "--widths", "4,4,8,8,8", "--conv6-width", "8", "--batch-size", "8", "--eval-every", "2",
        "--checkpoint-every", "2", "--log-every", "1", "--warmup-steps", "1", "--figures", "4",
        "--no-progress"]


def _train(workdir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.wsol", "--workdir", str(workdir), *TINY, *extra]


def _localize(workdir: pathlib.Path, output: pathlib.Path, *inputs: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "train.wsol", "localize", "--workdir", str(workdir),
            "--input", *map(str, inputs), "--output", str(output)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return session_folder(tmp_path_factory, "wsol_program")


def _folder_dataset(root: pathlib.Path) -> pathlib.Path:
    write_wsol_folder(make_wsol_dataset(30, image_size=40, num_classes=3, seed=5), root)
    return root


def _bad_cases(root: pathlib.Path) -> dict[str, tuple[list[str], str, tuple[str, ...]]]:
    """Bad folders: (extra training options, the path the message must name, words in it)."""
    corrupt, boxes, empty = root / "corrupt", root / "boxes", root / "empty"
    return {
        "corrupt": (["--data-dir", str(corrupt)], str(corrupt / "0_navy_solid" / "00001.png"),
                    ("cannot read",)),
        "boxes": (["--data-dir", str(boxes), "--boxes", str(boxes / "boxes.csv")],
                  str(boxes / "boxes.csv"), ("line",)),
        "empty": (["--data-dir", str(empty)], str(empty / "a"), ("no image",)),
    }


def _write_bad_cases(root: pathlib.Path) -> None:
    cases = _bad_cases(root)
    _folder_dataset(root / "corrupt")
    victim = pathlib.Path(cases["corrupt"][1])
    assert victim.is_file(), sorted(p.name for p in victim.parent.iterdir())
    victim.write_bytes(b"not a png at all")
    _folder_dataset(root / "boxes")
    with open(root / "boxes" / "boxes.csv", "a") as f:
        f.write("no/such.png,1,2,3\n")
    (root / "empty" / "a").mkdir(parents=True)
    (root / "empty" / "b").mkdir()


def _folder_run(workdir: pathlib.Path, folder: pathlib.Path) -> list[str]:
    return _train(workdir, "--steps", "2", "--data-dir", str(folder),
                  "--boxes", str(folder / "boxes.csv"), "--modules", "none")


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
        _folder_dataset(folder)
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
    inputs = [tmp / "inputs" / "wide.png", tmp / "inputs" / "grey.png"]
    bad = _bad_cases(tmp / "bad")
    plain = str(tmp / "folder_run")
    commands = {"resume": _train(tmp / "resumed", "--steps", "6"),
                "other_width": _train(run, "--steps", "4", "--conv6-width", "16"),
                "warm": _train(tmp / "warm", "--steps", "2", "--learning-rate", "0",
                               "--init-from", plain),
                "warm_shape": _train(tmp / "warm_shape", "--steps", "2", "--widths", "4,4,8,8,16",
                                     "--init-from", plain),
                "warm_missing": _train(tmp / "warm_missing", "--steps", "2",
                                       "--init-from", str(tmp / "no_run")),
                "localize": _localize(run, tmp / "localized", *inputs),
                "localize_missing": _localize(run, tmp / "localized_bad",
                                              tmp / "inputs" / "nope.png")}
    for case, (extra, _, _) in bad.items():
        commands[case] = _train(run, "--steps", "4", *extra)
    jobs = {name: Job(tmp, name) for name in commands}

    def launch():
        trainings["synthetic"].ok()
        trainings["folder"].ok()
        (tmp / "run_before.json").write_text(json.dumps(snapshot(run)))
        shutil.copytree(run, tmp / "resumed", symlinks=True)
        _write_bad_cases(tmp / "bad")
        images = make_wsol_dataset(2, image_size=48, num_classes=3, seed=9).images
        inputs[0].parent.mkdir(exist_ok=True)
        Image.fromarray(images[0]).resize((70, 45)).save(inputs[0])
        Image.fromarray(images[1]).convert("L").save(inputs[1])
        for name, args in commands.items():
            jobs[name].start(args, program_env(cache))

    once(tmp, "phase2", launch)
    before = [tuple(entry) for entry in json.loads((tmp / "run_before.json").read_text())]
    yield dict(jobs=jobs, bad=bad, before=before)
    for job in jobs.values():
        job.finish()


def test_training_writes_every_output(tmp, trainings):
    done = trainings["synthetic"].ok()
    run = tmp / "run"
    for name in ("val_top1", "val_maxboxacc_50", "val_maxboxacc_70", "val_maxboxacc_v2"):
        assert name in done.stdout, done.stdout[-2000:]
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert len({round(r["loss"], 6) for r in rows}) > 1  # the loss moves
    evaluated = [r for r in rows if "val_maxboxacc_50" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    for row in evaluated:
        assert 0 <= row["val_top1"] <= 100 and 0 <= row["val_maxboxacc_v2"] <= 100
        assert 0 <= row["val_threshold_50"] < 1
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    assert len(os.listdir(run / "best")) == 1
    config = json.loads((run / "config.json").read_text())
    assert config["modules"] == ["conv4_3", "conv5_3"] and config["num_classes"] == 3
    assert config["best_metric"] == "val_maxboxacc_v2"
    thresholds = json.loads((run / "localization.json").read_text())
    assert 0 <= thresholds["threshold_50"] < 1
    assert (run / "figures" / "validation.png").read_bytes()[:8] == PNG_MAGIC


def test_folder_dataset_with_boxes_and_baseline_on_two_devices(tmp, trainings):
    done = trainings["folder"].ok()
    assert "val_maxboxacc_50" in done.stdout
    config = json.loads((tmp / "folder_run" / "config.json").read_text())
    assert config["modules"] == [] and len(config["class_names"]) == 3
    assert sorted(os.listdir(tmp / "folder_run" / "checkpoints")) == ["2"]


def test_two_processes_train_as_one_process_with_two_devices(tmp, trainings):
    """Each process decodes only its rows of every batch and its share of the held-out images;
    the parameters and the validation scores match the one-process run's."""
    first = trainings["two_processes.0"].ok()
    trainings["two_processes.1"].ok()
    single = trainings["folder"].ok()
    assert_runs_match(tmp / "two_run", tmp / "folder_run",
                      ["val_maxboxacc_v2", "val_maxboxacc_50", "val_maxboxacc_70", "val_top1"])
    final = [t for t in single.stdout.splitlines() if t.startswith("validation (best")]
    assert final and final[0] in first.stdout


def test_batch_not_divisible_by_the_devices_is_a_usage_error(tmp, trainings):
    assert_usage_error(trainings["odd_batch"].result(), "--batch-size")
    assert not (tmp / "odd_batch").exists()


@pytest.mark.parametrize("option, value", [
    ("--val-fraction", "1.5"), ("--cr", "2"), ("--alpha", "0"), ("--t", "1.5"),
    ("--batch-size", "0"), ("--modules", "conv9_9"), ("--modules", "conv4_3,pool4"),
    ("--dtype", "float16"), ("--widths", "8,16,32"), ("--image-size", "16"),
    ("--synthetic-classes", "9"), ("--synthetic-object-scale", "0.3,0.2")])
def test_bad_option_values_are_one_line_usage_errors(capsys, option, value):
    """Checked before JAX starts: exit status 2, one line naming the option."""
    with pytest.raises(SystemExit) as exit_:
        wsol.main([option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and option in err, err


def test_bad_localize_threshold_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        wsol.main(["localize", "--workdir", "w", "--input", "a.png", "--output", "o",
                   "--threshold", "1.5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--threshold" in err, err


def test_help_lists_every_option():
    section = "Weakly-supervised localisation"
    assert_help_lists("train.wsol", wsol.build_parser(), readme_section=section)
    assert_help_lists("train.wsol", wsol.build_localize_parser(), "localize",
                      readme_section=section)


def test_object_scale_option_checks_its_range():
    parse = wsol.build_parser().parse_args
    assert parse(["--synthetic-object-scale", "0.28,0.38"]).synthetic_object_scale == (0.28, 0.38)
    assert parse([]).synthetic_object_scale == (0.14, 0.22)
    for bad in ("0.3", "0.4,0.3", "0,0.2", "0.2,0.5", "a,b"):
        with pytest.raises(SystemExit):
            parse(["--synthetic-object-scale", bad])


def test_resume_continues_and_records_the_new_step_count(tmp, followups):
    assert_resumed(followups["jobs"]["resume"], tmp / "resumed", saved_step=4, steps=6)
    config = json.loads((tmp / "resumed" / "config.json").read_text())
    assert config["steps"] == 6
    assert config["resumed"] == [{"step": 4, "changed": {"steps": [4, 6]}}]


def test_resume_with_another_model_option_is_refused(followups):
    assert_usage_error(followups["jobs"]["other_width"].result(), "--conv6-width: saved 8, now 16")


def test_init_from_copies_the_shared_layers_and_initialises_the_modules(tmp, followups):
    """A two-module network warm-started from a plain CAM run (learning rate 0, so the
    parameters stay where they started): every conv and the classifier are the source run's,
    the modules are new; config.json records the source."""
    from flax import traverse_util

    out = followups["jobs"]["warm"].ok()
    assert "12 new: params/conv4_3_suppression/" in out.stdout, out.stdout
    config = json.loads((tmp / "warm" / "config.json").read_text())
    assert config["init_from"] == str((tmp / "folder_run").resolve())
    source = load_run(tmp / "folder_run", build_wsol, program=PROGRAM).state
    warm = load_run(tmp / "warm", build_wsol, program=PROGRAM, which="latest").state
    assert int(warm.step) == 2
    source_params = traverse_util.flatten_dict(source.params, sep="/")
    warm_params = traverse_util.flatten_dict(warm.params, sep="/")
    new = sorted(k for k in warm_params if k not in source_params)
    assert new and all("_suppression/" in k for k in new), new
    for path, value in source_params.items():
        np.testing.assert_array_equal(np.asarray(warm_params[path]), np.asarray(value),
                                      err_msg=path)


def test_bad_init_from_fails_before_writing(tmp, followups):
    message = failure_message(followups["jobs"]["warm_shape"].result())
    assert str(tmp / "folder_run") in message and "shape" in message, message
    message = failure_message(followups["jobs"]["warm_missing"].result())
    assert str(tmp / "no_run" / "config.json") in message, message
    for name in ("warm_shape", "warm_missing"):
        assert not (tmp / name / "config.json").exists()


def test_localize_writes_class_box_and_cam_at_the_image_size(tmp, followups):
    followups["jobs"]["localize"].ok()
    out = tmp / "localized"
    with open(out / "localization.csv") as f:
        rows = list(csv.DictReader(f))
    assert [pathlib.Path(r["image"]).name for r in rows] == ["wide.png", "grey.png"]
    classes = json.loads((tmp / "run" / "config.json").read_text())["class_names"]
    for row, (width, height) in zip(rows, [(70, 45), (48, 48)]):
        assert row["class"] in classes and 0 < float(row["probability"]) <= 1
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        stem = pathlib.Path(row["image"]).stem
        cam = np.asarray(Image.open(out / f"{stem}_cam.png"))
        assert cam.shape == (height, width) and cam.max() == 255
        assert (out / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("case", ["corrupt", "boxes", "empty"])
def test_bad_input_fails_naming_the_file(followups, case):
    _, path, words = followups["bad"][case]
    message = failure_message(followups["jobs"][case].result())
    assert path in message, message
    for word in words:
        assert word in message.lower(), message


def test_localize_missing_file(tmp, followups):
    message = failure_message(followups["jobs"]["localize_missing"].result())
    assert str(tmp / "inputs" / "nope.png") in message


def test_failed_runs_leave_the_work_directory_untouched(tmp, followups):
    for case in [*followups["bad"], "other_width"]:
        assert followups["jobs"][case].result().returncode != 0
    followups["jobs"]["localize"].result()
    assert snapshot(tmp / "run") == followups["before"]
