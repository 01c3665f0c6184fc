"""`python -m train.mapping_gan` end to end, in subprocesses: training outputs (the latest and
the best checkpoint's validation printed), resume (a changed `--steps` is recorded, a changed
model option refused), 2 simulated devices and the same run as two processes, an odd batch on
2 devices, `apply` (3-D and 2-D, through `load_run`), and bad inputs that must fail with a
message naming the file without touching an existing work directory.

Phase 1 trains (3-D, 2-D, 2 devices, two processes); phase 2 starts everything that needs a
trained work directory (see tests/programs.py).
"""

import json
import math
import os
import pathlib
import re
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
from flax import traverse_util
from nibabel.testing import data_path as NIBABEL_DATA

from jaxmed.mapping_gan.inference import PROGRAM
from jaxmed.mapping_gan.steps import build_mapping_gan
from jaxmed.training import load_run
from tests.programs import (
    PNG_MAGIC,
    Job,
    assert_help_lists,
    assert_runs_match,
    assert_usage_error,
    checkpoint_arrays,
    failure_message,
    metrics_rows,
    once,
    program_env,
    session_folder,
    snapshot,
    start_two_processes,
)
from train import mapping_gan

ANATOMICAL = pathlib.Path(NIBABEL_DATA) / "anatomical.nii"  # (33, 41, 25), 2 mm, flipped x
# Critic updates are 2 in every step (warm-up or not), so all steps share one compiled shape.
TINY = ["--synthetic-subjects", "40", "--synthetic-size", "16", "--eval-every", "2",
        "--checkpoint-every", "2", "--log-every", "1", "--n-critic-warmup", "2",
        "--warmup-steps", "1", "--n-critic", "2", "--batch-size", "4", "--no-progress",
        "--generator-features", "4,8", "--critic-widths", "4,8", "--critic-growth", "4",
        "--critic-layers", "1", "--critic-head", "4", "--critic-pooling-channels", "4",
        "--figures", "2"]
VAL_METRICS = ["val_ncc", "val_wasserstein", "val_l1"]
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


def _bad_case_paths(root: pathlib.Path,
                    case: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
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
BAD_TRAINING = {"corrupt": ("corrupt",), "shapes": ("shape", "differs"),
                "nan": ("1 nan", "not finite"), "inf": ("1 infinite", "not finite"),
                "empty": ("no positive volumes",), "constant": ("constant",)}
BAD_APPLY = {"apply_channels": ("2 channel", "trained on 1"), "apply_3d_to_2d": ("3-d", "2-d")}


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return session_folder(tmp_path_factory, "mapping_gan_program")


@pytest.fixture(scope="module")
def trainings(tmp):
    """Phase 1, started together: the 3-D run; a 2-D run (dense critic); the 3-D run on 2
    devices of one process, and as two processes of one device each (the same global batch on
    the same device count); an odd batch on 2 devices."""
    cache = tmp / "jax_cache"
    commands = {
        "3d": (_train(tmp / "run3d", "--steps", "2"), 1),
        "2d": (_train(tmp / "run2d", "--steps", "2", "--synthetic-dims", "2",
                      "--synthetic-size", "32", "--critic", "dense"), 1),
        "2dev": (_train(tmp / "run2dev", "--steps", "2"), 2),
        "odd_batch": (_train(tmp / "odd_batch", "--steps", "2", "--batch-size", "3"), 2),
    }
    jobs = {name: Job(tmp, name) for name in commands}
    two = [Job(tmp, f"two_processes.{i}") for i in range(2)]

    def launch():
        for name, (args, devices) in commands.items():
            jobs[name].start(args, program_env(cache, devices))
        two[:] = start_two_processes(tmp, "two_processes",
                                     _train(tmp / "run2proc", "--steps", "2"), program_env(cache))

    once(tmp, "phase1", launch)
    jobs.update({job.name: job for job in two})
    yield jobs
    for job in jobs.values():
        job.finish()


@pytest.fixture(scope="module")
def followups(tmp, trainings):
    """Phase 2, started together once the 3-D and 2-D runs are done: resume with a new
    `--steps` (in a copy of the 3-D work directory), an uninterrupted run of the resumed
    length, `apply`, a resume with another `--critic-widths` and the bad inputs (both with the
    3-D run's work directory, which must stay untouched)."""
    run3d, run2d, cache = tmp / "run3d", tmp / "run2d", tmp / "jax_cache"
    two_channels = tmp / "inputs" / "two_channels.nii.gz"
    commands = {
        "resume": _train(tmp / "resumed", "--steps", "4"),
        "fresh4": _train(tmp / "fresh4", "--steps", "4"),
        "apply3d": _apply(run3d, tmp / "out3d", ANATOMICAL),
        "apply2d": _apply(run2d, tmp / "out2d", run2d / "data" / "positive" / "sub-0000.nii.gz"),
        "apply_channels": _apply(run3d, tmp / "out_bad", two_channels),
        "apply_3d_to_2d": _apply(run2d, tmp / "out_bad", ANATOMICAL),
        "other_widths": _train(run3d, "--steps", "4", "--critic-widths", "4,12"),
    }
    named = {"apply_channels": str(two_channels), "apply_3d_to_2d": str(ANATOMICAL)}
    for case in BAD_TRAINING:
        pos, neg, bad = _bad_case_paths(tmp / "bad", case)
        named[case] = str(bad)
        commands[case] = _train(run3d, "--steps", "2", "--positive-dir", str(pos),
                                "--negative-dir", str(neg))
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


def _printed(stdout: str, kind: str) -> tuple[int, dict[str, float]]:
    """(step, metrics) of the program's `validation after N steps (latest): ...` line
    (`kind='latest'`) or its `validation (best checkpoint, step K): ...` line (`'best'`)."""
    pattern = {"latest": r"validation after (\d+) steps \(latest\): (.*)",
               "best": r"validation \(best checkpoint, step (\d+)\): (.*)"}[kind]
    found = re.findall(pattern, stdout)
    assert len(found) == 1, stdout[-2000:]
    step, values = found[0]
    return int(step), {k: float(v) for k, v in re.findall(r"(\w+) = (-?[\d.]+)", values)}


def test_training_writes_every_output(tmp, trainings):
    done = trainings["3d"].ok()
    workdir = tmp / "run3d"
    assert os.listdir(workdir / "checkpoints") == ["2"]
    assert os.listdir(workdir / "best") == ["2"]
    events = (workdir / "tensorboard").glob("events.out.tfevents.*")
    assert any(p.stat().st_size > 0 for p in events)

    rows = metrics_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name in GAN_METRICS:
            assert math.isfinite(row[name]), (name, row)
    assert set(VAL_METRICS) <= rows[-1].keys()
    for kind in ("latest", "best"):  # one evaluation: the best checkpoint is the latest
        step, printed = _printed(done.stdout, kind)
        assert step == 2 and printed.keys() == set(VAL_METRICS)
        for name, value in printed.items():
            assert value == pytest.approx(rows[-1][name], abs=1e-4), (kind, name)

    config = json.loads((workdir / "config.json").read_text())
    assert config["input_shape"] == [16, 16, 16, 1]
    assert (config["spatial_dims"], config["channels"]) == (3, 1)
    assert (config["best_metric"], config["best_mode"]) == ("val_ncc", "max")
    assert config["generator_features"] == [4, 8] and config["critic"] == "tt"
    assert (config["steps"], config["synthetic_size"], config["positive_dir"]) == (2, 16, None)
    # --steps 2, --lr-decay 0.5
    assert (config["lr_decay_start"], config["lr_decay_end"]) == (1, 2)
    # step 1 ran at rate(0)
    assert rows[0]["learning_rate"] == pytest.approx(config["learning_rate"])

    figures = sorted((workdir / "figures").glob("*.png"))
    assert len(figures) == 2  # --figures 2
    for figure in figures:
        assert figure.read_bytes()[:8] == PNG_MAGIC
        # Figures are of validation positives, which have ground-truth maps beside them.
        assert (workdir / "data" / "positive" / f"{figure.stem}_effect.nii.gz").is_file()


def test_help_lists_every_option():
    assert_help_lists("train.mapping_gan", mapping_gan.build_parser(),
                      readme_section="Mapping GAN")
    assert_help_lists("train.mapping_gan", mapping_gan.apply_parser(), command="apply")


def test_two_processes_train_as_one_process_with_two_devices(tmp, trainings):
    """Each process reads only its rows of every batch and its share of the validation
    subjects; the parameters and the validation metrics match the one-process run's."""
    first = trainings["two_processes.0"].ok()
    second = trainings["two_processes.1"].ok()
    single = trainings["2dev"].ok()
    assert_runs_match(tmp / "run2proc", tmp / "run2dev", VAL_METRICS)
    for kind in ("latest", "best"):
        assert _printed(first.stdout, kind) == _printed(single.stdout, kind)
    assert "validation" not in second.stdout  # process 0 reports
    assert sorted(os.listdir(tmp / "run2proc" / "checkpoints")) == ["2"]


def test_batch_not_divisible_by_the_devices_is_a_usage_error(trainings):
    assert_usage_error(trainings["odd_batch"].result(), "--batch-size")


def test_resume_continues_and_records_the_new_step_count(tmp, followups):
    done = followups["jobs"]["resume"].ok()
    resumed = tmp / "resumed"
    assert "Resuming from step 2" in done.stdout + done.stderr
    assert [r["step"] for r in metrics_rows(resumed)] == [1, 2, 3, 4]
    assert sorted(os.listdir(resumed / "checkpoints")) == ["2", "4"]
    config = json.loads((resumed / "config.json").read_text())
    assert (config["steps"], config["lr_decay_start"], config["lr_decay_end"]) == (4, 2, 4)
    assert config["resumed"] == [{"step": 2, "changed": {"steps": [2, 4],
                                                         "lr_decay_start": [1, 2],
                                                         "lr_decay_end": [2, 4]}}]
    # Same data order, keys and parameters as a run that was never interrupted (its decay
    # window, too: the first two steps ran at the full rate in both).
    followups["jobs"]["fresh4"].ok()
    for got, expected in zip(metrics_rows(resumed)[2:], metrics_rows(tmp / "fresh4")[2:]):
        for name in GAN_METRICS:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6,
                                       err_msg=(got["step"], name))


def test_resume_reports_the_latest_and_the_best_checkpoint(tmp, followups):
    """Validations at steps 2 and 4: the latest line is step 4's, the best line the best
    step's, re-evaluated from the checkpoint `apply` loads."""
    done = followups["jobs"]["resume"].ok()
    rows = {r["step"]: r for r in metrics_rows(tmp / "resumed") if "val_ncc" in r}
    assert sorted(rows) == [2, 4]
    best = max(rows, key=lambda step: rows[step]["val_ncc"])
    assert os.listdir(tmp / "resumed" / "best") == [str(best)]
    for kind, step in (("latest", 4), ("best", best)):
        printed_step, printed = _printed(done.stdout, kind)
        assert printed_step == step
        for name in VAL_METRICS:
            assert printed[name] == pytest.approx(rows[step][name], abs=1e-4), (kind, name)


def test_resume_with_another_model_option_is_refused(tmp, followups):
    message = assert_usage_error(followups["jobs"]["other_widths"].result(), "--critic-widths")
    assert "[4, 8]" in message and "[4, 12]" in message and "--steps" not in message
    # config.json and the checkpoints: test_failed_runs_leave_the_work_directory_untouched


def test_apply_loads_the_run_through_load_run(tmp, trainings):
    trainings["3d"].ok()
    run = load_run(tmp / "run3d", build_mapping_gan, program=PROGRAM, which="best")
    assert run.system.input_shape == (16, 16, 16, 1) and run.config["best_metric"] == "val_ncc"
    saved = checkpoint_arrays(tmp / "run3d", "best")
    params = traverse_util.flatten_dict(run.state.params, sep="/")
    assert len(params) > 10
    for path, value in params.items():
        np.testing.assert_array_equal(np.asarray(value), saved[f"params/{path}"], err_msg=path)


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
    assert (output / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


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
    for case in [*BAD_TRAINING, "other_widths"]:  # each used the 3-D run's work directory
        assert followups["jobs"][case].result().returncode != 0
    for job in followups["jobs"].values():  # `apply` reads it too
        job.result()
    after = snapshot(tmp / "run3d")
    assert after == followups["before"]
    assert os.listdir(tmp / "run3d" / "checkpoints") == ["2"]
