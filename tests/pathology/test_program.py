"""`python -m train.wsi` end to end, in subprocesses, on a tiny synthetic cohort: training
outputs (checkpoints and metrics of both networks and the slide classifier, one HDF5 file per
slide whose slide feature is the fusion of its stored tile arrays, held-out results,
predictions, attention figures), resume (more `--steps` continue both networks and make the
features and the classifier again; a changed model option is refused), the `extract` command
(bad slides recorded while the run goes on, exit status = failures, rerun skips, the same
arrays as training's, two `jax.distributed` processes equal one), `classify`, `--help`, and
bad input.

Phase 1 trains (and runs the bad-input cases); phase 2 starts what needs a trained run (see
tests/programs.py).
"""

import csv
import json
import math
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from jaxmed.data.split import train_val_split
from jaxmed.pathology.fusion import slide_representation
from tests.programs import (
    PNG_MAGIC,
    ROOT,
    TIMEOUT,
    Job,
    assert_help_lists,
    assert_usage_error,
    failure_message,
    metrics_rows,
    once,
    program_env,
    session_folder,
    snapshot,
    start_two_processes,
)
from train import wsi

WIDTH = 4
TINY = ["--cohort-slides-per-class", "3", "--cohort-size", "2048", "--tile-size", "128",
        "--width", str(WIDTH), "--hidden", "8", "--batch-size", "8", "--classifier-steps", "8",
        "--log-every", "1", "--checkpoint-every", "3", "--stain", "macenko", "--no-progress"]
DATASETS = ("coords", "low_features", "low_scores", "high_features", "high_scores",
            "tile_features", "slide_feature")
GOOD = ("slide_000.tiff", "slide_001.tiff", "slide_002.tiff")  # of the run's cohort


def _train(workdir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.wsi", "--workdir", str(workdir), *TINY, "--steps", "3",
            *extra]


def _extract(workdir, slides, output) -> list[str]:
    return [sys.executable, "-m", "train.wsi", "extract", "--workdir", str(workdir),
            "--slides", str(slides), "--output", str(output), "--no-progress"]


def _classify(workdir, output, *inputs) -> list[str]:
    return [sys.executable, "-m", "train.wsi", "classify", "--workdir", str(workdir),
            "--input", *map(str, inputs), "--output", str(output)]


def _behind(args: list[str]) -> list[str]:
    """`args` at a lower CPU priority: phase 2's other jobs yield to the resume, the longest."""
    return ["nice", "-n", "10", *args]


def _arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        return {name: file[name][()] for name in file}


def _index(folder) -> list[dict]:
    with open(folder / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_features(folder, other, stems) -> None:
    for stem in stems:
        a, b = _arrays(folder / f"{stem}.h5"), _arrays(other / f"{stem}.h5")
        assert sorted(a) == sorted(b)
        np.testing.assert_array_equal(a["coords"], b["coords"])
        for name in DATASETS[1:]:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{stem}: {name}")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return session_folder(tmp_path_factory, "wsi_program")


@pytest.fixture(scope="module")
def trainings(tmp):
    """Phase 1: the synthetic run, and two runs on bad slide folders (an empty one; one whose
    labels.csv lacks a slide), which stop before reading a slide."""
    cache = tmp / "jax_cache"
    commands = {"run": _train(tmp / "run"),
                "empty": _train(tmp / "empty_run", "--slides", str(tmp / "empty")),
                "unlabelled": _train(tmp / "unlabelled_run", "--slides",
                                     str(tmp / "unlabelled"))}
    jobs = {name: Job(tmp, name) for name in commands}

    def launch():
        (tmp / "empty").mkdir()
        (tmp / "unlabelled").mkdir()
        for name in ("a.tiff", "b.tiff"):
            (tmp / "unlabelled" / name).write_bytes(b"not read")
        (tmp / "unlabelled" / "labels.csv").write_text("slide,label\na.tiff,normal\n")
        for name, args in commands.items():
            jobs[name].start(args, program_env(cache))

    once(tmp, "phase1", launch)
    yield jobs
    for job in jobs.values():
        job.finish()


@pytest.fixture(scope="module")
def followups(tmp, trainings):
    """Phase 2: resume with more steps (a copy of the run), a changed width (refused, on the
    run), `extract` of good and bad slides in one process and of the good ones in two,
    `classify` of two held-out slides."""
    run, cache = tmp / "run", tmp / "jax_cache"
    cohort = run / "cohort"
    listed, good = tmp / "slides.txt", tmp / "good.txt"
    bad = [tmp / "bad" / "corrupt.tiff", tmp / "bad" / "missing.tiff"]
    held_out = tmp / "held_out.json"
    commands = {"resume": _train(tmp / "resumed", "--steps", "5"),
                "other_width": _behind(_train(run, "--width", str(2 * WIDTH))),
                "extract": _behind(_extract(run, listed, tmp / "extracted"))}
    jobs = {name: Job(tmp, name) for name in commands}
    two = [Job(tmp, f"two_extract.{i}") for i in range(2)]

    def launch():
        trainings["run"].ok()
        (tmp / "run_before.json").write_text(json.dumps(snapshot(run)))
        shutil.copytree(run, tmp / "resumed", symlinks=True)
        bad[0].parent.mkdir()
        bad[0].write_bytes(b"II*\x00" + bytes(range(256)) * 4)  # a TIFF header, then garbage
        good_paths = [str(cohort / name) for name in GOOD]
        listed.write_text("\n".join([*good_paths, *map(str, bad)]) + "\n")
        good.write_text("# the run's first slides\n" + "\n".join(good_paths) + "\n")
        with open(run / "predictions.csv", newline="") as f:
            names = [row["slide"] for row in csv.DictReader(f)][:2]
        held_out.write_text(json.dumps(names))
        jobs["classify"] = Job(tmp, "classify")
        commands["classify"] = _behind(_classify(run, tmp / "classified",
                                                 *(cohort / n for n in names)))
        for name, args in commands.items():
            jobs[name].start(args, program_env(cache))
        two[:] = start_two_processes(tmp, "two_extract",
                                     _behind(_extract(run, good, tmp / "two")),
                                     program_env(cache))

    once(tmp, "phase2", launch)
    jobs.setdefault("classify", Job(tmp, "classify"))
    jobs.update({job.name: job for job in two})
    before = [tuple(entry) for entry in json.loads((tmp / "run_before.json").read_text())]
    yield dict(jobs=jobs, bad=bad, before=before,
               held_out=json.loads(held_out.read_text()))
    for job in jobs.values():
        job.finish()


def test_training_writes_every_output(tmp, trainings):
    done = trainings["run"].ok()
    assert "held-out slides:" in done.stdout
    run = tmp / "run"
    config = json.loads((run / "config.json").read_text())
    names = config["class_names"]
    assert names == ["adenocarcinoma", "squamous", "normal"]
    for which, steps in (("low", 3), ("high", 3), ("classifier", 8)):
        rows = metrics_rows(run / which)
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), which
        assert all(math.isfinite(r["loss"]) for r in rows), which
        assert len({round(r["loss"], 6) for r in rows}) > 1, which
        assert [p.name for p in (run / which / "checkpoints").iterdir()
                if p.name.isdigit()] == [str(steps)], which

    with open(run / "cohort" / "labels.csv", newline="") as f:
        labels = {row["slide"]: row["label"] for row in csv.DictReader(f)}
    slides = sorted(labels)
    assert len(slides) == 9
    index = _index(run / "features")
    assert sorted(r["slide"] for r in index) == [str(run / "cohort" / s) for s in slides]
    assert all(r["status"] == "ok" and int(r["tiles"]) > 0 for r in index), index
    tiles = {r["slide"].rsplit("/", 1)[1]: int(r["tiles"]) for r in index}
    for slide in slides:
        arrays = _arrays(run / "features" / slide.replace(".tiff", ".h5"))
        assert sorted(arrays) == sorted(DATASETS)
        n, d = tiles[slide], 8 * WIDTH
        shapes = {name: arrays[name].shape for name in DATASETS}
        assert shapes == {"coords": (n, 2), "low_features": (n, d), "low_scores": (n,),
                          "high_features": (n, 4, d), "high_scores": (n, 4),
                          "tile_features": (n, 2 * d), "slide_feature": (2 * d,)}, shapes
        assert all(np.isfinite(arrays[k]).all() for k in DATASETS)
        # The stored fusion against the stored per-tile arrays: the library's formula ...
        expected = slide_representation(arrays, "attention", weighting=config["weighting"],
                                        temperature=config["temperature"])
        np.testing.assert_allclose(arrays["slide_feature"], expected, rtol=1e-5, atol=1e-6)
        # ... and the same in NumPy (weights = scores / their sum, the default)
        high_w = arrays["high_scores"] / arrays["high_scores"].sum(1, keepdims=True)
        tile = np.concatenate([arrays["low_features"],
                               np.einsum("tn,tnd->td", high_w, arrays["high_features"])], 1)
        np.testing.assert_allclose(arrays["tile_features"], tile, rtol=1e-4, atol=1e-5)
        low_w = arrays["low_scores"] / arrays["low_scores"].sum()
        np.testing.assert_allclose(arrays["slide_feature"], low_w @ tile, rtol=1e-4, atol=1e-5)

    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["slide_accuracy"] <= 100 and 0 <= results["macro_auc"] <= 1
    # The held-out slides: the stratified split of the sorted slides by their labels.
    _, test = train_val_split(len(slides), config["test_fraction"], config["seed"],
                              labels=np.array([names.index(labels[s]) for s in slides]))
    with open(run / "predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    assert sorted(r["slide"] for r in predictions) == sorted(slides[i] for i in test)
    for row in predictions:
        p = np.array([float(row[f"p_{c}"]) for c in names])
        assert row["label"] == labels[row["slide"]]
        assert abs(p.sum() - 1) < 1e-3 and row["predicted"] == names[int(np.argmax(p))]
    figures = sorted((run / "figures").iterdir())
    assert [p.name for p in figures] == sorted(
        r["slide"].replace(".tiff", "_attention.png") for r in predictions)
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in figures)


def test_resume_continues_both_networks_and_makes_the_features_again(tmp, followups):
    done = followups["jobs"]["resume"].ok()
    resumed = tmp / "resumed"
    assert done.stdout.count("Resuming from step 3") == 2, done.stdout
    for which in ("low", "high"):
        assert [r["step"] for r in metrics_rows(resumed / which)] == [1, 2, 3, 4, 5], which
    config = json.loads((resumed / "config.json").read_text())
    assert config["steps"] == 5
    assert [entry["changed"] for entry in config["resumed"]] == [{"steps": [3, 5]}]
    # The features of the networks trained further, and the classifier fitted on them anew.
    assert [r["step"] for r in metrics_rows(resumed / "classifier")] == list(range(1, 9))
    for stem in ("slide_000", "slide_004"):
        with h5py.File(resumed / "features" / f"{stem}.h5") as new, \
                h5py.File(tmp / "run" / "features" / f"{stem}.h5") as old:
            assert new.attrs["fingerprint"] != old.attrs["fingerprint"]
            assert not np.allclose(new["slide_feature"][()], old["slide_feature"][()])
    assert all(r["status"] == "ok" for r in _index(resumed / "features"))


def test_resume_with_another_model_option_is_refused(tmp, followups):
    assert_usage_error(followups["jobs"]["other_width"].result(), "--width: saved 4, now 8")


def test_extract_records_bad_slides_and_goes_on(tmp, followups):
    done = followups["jobs"]["extract"].result()
    assert done.returncode == 2, done.stderr[-3000:]  # the number of failed slides
    out = tmp / "extracted"
    assert "3 slides extracted, 0 already done, 2 failed" in done.stdout, done.stdout
    rows = {r["slide"]: r for r in _index(out)}
    cohort = tmp / "run" / "cohort"
    assert sorted(rows) == sorted([*(str(cohort / n) for n in GOOD),
                                   *map(str, followups["bad"])])
    for name in GOOD:
        assert rows[str(cohort / name)]["status"] == "ok"
    for path in followups["bad"]:
        row = rows[str(path)]
        assert row["status"] == "failed" and row["tiles"] == "0" and str(path) in row["error"]
    assert sorted(p.name for p in out.glob("*.h5")) == [n.replace(".tiff", ".h5") for n in GOOD]
    # The same model on the same slides gives the arrays training wrote.
    _assert_same_features(out, tmp / "run" / "features", [n[:-5] for n in GOOD])

    again = subprocess.run(done.args, cwd=ROOT, env=program_env(tmp / "jax_cache"),
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "0 slides extracted, 3 already done, 2 failed" in again.stdout, again.stdout
    assert {r["slide"]: r["status"] for r in _index(out)} == {
        k: r["status"] for k, r in rows.items()}


def test_extract_as_two_processes_equals_one(tmp, followups):
    """Slides divided among the processes (0 and 2 to process 0, 1 to process 1), one index."""
    first = followups["jobs"]["two_extract.0"].ok()
    second = followups["jobs"]["two_extract.1"].ok()
    assert "2 slides extracted" in first.stdout and "1 slides extracted" in second.stdout
    rows = _index(tmp / "two")
    cohort = tmp / "run" / "cohort"
    assert sorted(r["slide"] for r in rows) == [str(cohort / n) for n in GOOD]
    assert all(r["status"] == "ok" for r in rows)
    followups["jobs"]["extract"].result()
    _assert_same_features(tmp / "two", tmp / "extracted", [n[:-5] for n in GOOD])


def test_classify_writes_predictions_and_attention(tmp, followups):
    followups["jobs"]["classify"].ok()
    out = tmp / "classified"
    names = json.loads((tmp / "run" / "config.json").read_text())["class_names"]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["slide"] for r in rows) == sorted(followups["held_out"])
    with open(tmp / "run" / "predictions.csv", newline="") as f:
        trained = {r["slide"]: r for r in csv.DictReader(f)}
    for row in rows:
        p = np.array([float(row[f"p_{c}"]) for c in names])
        assert abs(p.sum() - 1) < 1e-3 and row["predicted"] == names[int(np.argmax(p))]
        # The run's classifier on the same slides' features: training's held-out probabilities.
        expected = [float(trained[row["slide"]][f"p_{c}"]) for c in names]
        np.testing.assert_allclose(p, expected, atol=2e-4)
        picture = out / row["slide"].replace(".tiff", "_attention.png")
        assert picture.read_bytes()[:8] == PNG_MAGIC


def test_commands_leave_the_run_untouched(tmp, followups):
    for name in ("other_width", "extract", "classify", "two_extract.0", "two_extract.1"):
        followups["jobs"][name].result()
    assert snapshot(tmp / "run") == followups["before"]


def test_help_lists_every_option():
    section = "Whole-slide images"
    assert_help_lists("train.wsi", wsi.build_parser(), readme_section=section)
    assert_help_lists("train.wsi", wsi.build_extract_parser(), "extract", readme_section=section)
    assert_help_lists("train.wsi", wsi.build_classify_parser(), "classify",
                      readme_section=section)


@pytest.mark.parametrize("case, named", [("empty", "empty"), ("unlabelled", "b.tiff")])
def test_bad_slide_folders_fail_naming_the_problem(tmp, trainings, case, named):
    done = trainings[case].result()
    assert done.returncode == 1, done.stderr[-3000:]
    message = failure_message(done)
    assert str(tmp / case) in message and named in message, message
    assert not (tmp / f"{case}_run" / "config.json").exists()


@pytest.mark.parametrize("options", [["--tile-size", "99"], ["--tile-size", "48"],
                                     ["--ratio", "0.3"], ["--stain", "reinhard"],
                                     ["--labels", "labels.csv"]])
def test_bad_option_values_are_one_line_usage_errors(capsys, options):
    """Checked before JAX starts: exit status 2, one line naming the option."""
    with pytest.raises(SystemExit) as exit_:
        wsi.main(options)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and options[0] in err, err
