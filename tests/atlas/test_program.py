"""`python -m train.feature_atlas` end to end, in subprocesses, on tiny synthetic lesions: the
run's outputs (classifier checkpoints and metrics, the atlas's libraries, index, atlas.json,
generators, report, sheets and movies), resume (more `--generator-steps` continue the
generators, nothing else is redone), the `libraries` and `generators` stages on a trained run
(other nodes, another generator; the classifier untouched), `--help`, and bad input (a window
not smaller than the images, an unknown layer or node, no library big enough) refused with a
clean message and nothing written or damaged.

Phase 1 trains (and runs the usage errors); phase 2 starts what needs a trained run (see
tests/programs.py).
"""

import csv
import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest

from jaxmed.atlas.library import read_libraries
from tests.atlas.runs import GENERATOR_STEPS, STEPS, stage, train_command
from tests.programs import (
    PNG_MAGIC,
    Job,
    assert_help_lists,
    assert_usage_error,
    failure_message,
    metrics_rows,
    once,
    parser_options,
    program_env,
    readme_text,
    snapshot,
)
from train import feature_atlas


def _atlas(workdir) -> dict:
    return json.loads((workdir / "atlas" / "atlas.json").read_text())


def _report(workdir) -> list[dict]:
    with open(workdir / "atlas" / "report.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def followups(tmp, trainings):
    """Phase 2, each on its own copy of the run: resume with more generator steps, the
    libraries stage with nodes of two layers, the generators stage with a VAE; on the run
    itself, stages that must fail and leave it as it was."""
    cache = tmp / "jax_cache"
    copies = ("resumed", "relayered", "revae")
    commands = {
        "resume": train_command(tmp / "resumed", "--generator-steps", str(GENERATOR_STEPS + 2)),
        "libraries": stage("libraries", tmp / "relayered", "--nodes",
                            "block3_conv2:1,block3_conv2:5,fc:0,fc:3", "--min-crops", "1",
                            "--features", "2", "--generator-steps", "3"),
        "generators": stage("generators", tmp / "revae", "--generator", "vae",
                             "--generator-steps", "3", "--generator-batch", "4",
                             "--generator-width", "4", "--check-samples", "4",
                             "--movie-frames", "0"),
        "stage_unknown_layer": stage("libraries", tmp / "run", "--layer", "nope"),
        "stage_big_window": stage("libraries", tmp / "run", "--window", "40"),
        "stage_too_few_crops": stage("libraries", tmp / "run", "--min-crops", "100000",
                                      "--max-crops", "100000"),
        "stage_no_run": stage("generators", tmp / "nowhere"),
    }
    jobs = {name: Job(tmp, name) for name in commands}

    def launch():
        trainings["run"].ok()
        for name in copies:
            shutil.copytree(tmp / "run", tmp / name)
        (tmp / "run_before.json").write_text(json.dumps(snapshot(tmp / "run")))
        for name, args in commands.items():
            jobs[name].start(args, program_env(cache))

    once(tmp, "phase2", launch)
    yield jobs
    for job in jobs.values():
        job.finish()


def test_run_writes_the_atlas(tmp, trainings):
    done = trainings["run"].ok()
    run = tmp / "run"
    assert [r["step"] for r in metrics_rows(run)] == list(range(1, STEPS + 1))
    assert "held-out accuracy" in done.stdout
    atlas = _atlas(run)
    chosen = atlas["chosen"]
    assert 1 <= len(chosen) <= 3 and len(atlas["candidates"]) == 6  # every node of fc
    assert all(c["node"].startswith("fc:") for c in atlas["candidates"])
    overlap = np.asarray(atlas["overlap"])
    assert overlap.shape == (len(chosen), len(chosen))
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    assert [p["node"] for p in atlas["purity"]] == chosen
    # The libraries: PNG crops and one index, read back as arrays of the window's size.
    libraries = read_libraries(run / "atlas" / "libraries")
    assert [lb.node for lb in libraries] == chosen
    for library in libraries:
        assert len(library) == atlas["library_sizes"][library.node] >= 2
        assert library.crops.shape[1:] == (8, 8, 3) and library.crops.dtype == np.uint8
        assert np.all(np.diff(library.score) <= 0)
        assert all(name.startswith("synthetic/") for name in library.source_name)
    # The generators: one resumable run of all chosen nodes.
    generators = run / "atlas" / "generators"
    assert [r["step"] for r in metrics_rows(generators)] == list(range(1, GENERATOR_STEPS + 1))
    assert json.loads((generators / "config.json").read_text())["nodes"] == chosen
    # The report, sheets, movies and the printed lines.
    rows = _report(run)
    assert [r["node"] for r in rows] == chosen
    for row in rows:
        for kind in ("generated", "real", "random"):
            assert 0.0 <= float(row[f"{kind}_rate"]) <= 1.0
        assert row["passes"] in ("True", "False")
        assert row["node"] in done.stdout
        stem = row["node"].replace(":", "_")
        assert (run / "atlas" / "sheets" / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
        frames = iio.imread(run / "atlas" / "movies" / f"{stem}.gif", index=None)
        assert frames.shape[0] == 5 and frames.shape[-1] == 3
        assert (run / "atlas" / "movies" / f"{stem}.mp4").stat().st_size > 0
    assert "activates the node" in done.stdout and "atlas written to" in done.stdout


@pytest.mark.parametrize("name, text", [
    ("big_window", "--window: 32 pixels is not smaller than the images (32 pixels)"),
])
def test_usage_errors_write_nothing(tmp, trainings, name, text):
    assert_usage_error(trainings[name].result(), text)
    assert not (tmp / name).exists()


@pytest.mark.parametrize("name, text", [
    ("unknown_layer", "block9_conv1"),
    ("no_such_node", "node 6 of layer 'fc' does not exist (the layer has 6 nodes)"),
])
def test_bad_nodes_are_refused_before_training(tmp, trainings, name, text):
    assert text in failure_message(trainings[name].result())
    assert not (tmp / name / "checkpoints").exists()


def test_resume_continues_the_generators_only(tmp, trainings, followups):
    done = followups["resume"].ok()
    resumed = tmp / "resumed"
    assert [r["step"] for r in metrics_rows(resumed)] == list(range(1, STEPS + 1))
    rows = metrics_rows(resumed / "atlas" / "generators")
    assert [r["step"] for r in rows] == list(range(1, GENERATOR_STEPS + 3))
    assert f"Resuming from step {GENERATOR_STEPS}" in done.stdout + done.stderr
    # The libraries were current: the same atlas.json (not rebuilt).
    assert _atlas(resumed) == _atlas(tmp / "run")


def test_libraries_stage_takes_other_nodes(tmp, trainings, followups):
    followups["libraries"].ok()
    relayered = tmp / "relayered"
    atlas = _atlas(relayered)
    assert [c["node"] for c in atlas["candidates"]] == [
        "block3_conv2:1", "block3_conv2:5", "fc:0", "fc:3"]
    assert atlas["options"]["nodes"] == ["block3_conv2:1", "block3_conv2:5", "fc:0", "fc:3"]
    assert len(atlas["chosen"]) <= 2
    assert [r["node"] for r in _report(relayered)] == atlas["chosen"]
    generators = json.loads((relayered / "atlas" / "generators" / "config.json").read_text())
    assert generators["nodes"] == atlas["chosen"]
    # The classifier was not retrained.
    assert metrics_rows(relayered) == metrics_rows(tmp / "run")
    def checkpoints(entries):
        return [tuple(e) for e in entries if e[0].startswith("checkpoints")]

    before = checkpoints(json.loads((tmp / "run_before.json").read_text()))
    assert before and checkpoints(snapshot(relayered)) == before  # copytree keeps the times


def test_generators_stage_trains_another_generator(tmp, trainings, followups):
    followups["generators"].ok()
    revae = tmp / "revae"
    config = json.loads((revae / "atlas" / "generators" / "config.json").read_text())
    assert config["generator"] == "vae"
    rows = metrics_rows(revae / "atlas" / "generators")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert _atlas(revae) == _atlas(tmp / "run")  # the same libraries
    assert [r["node"] for r in _report(revae)] == _atlas(revae)["chosen"]


@pytest.mark.parametrize("name, text", [
    ("stage_unknown_layer", "'nope'"),
    ("stage_too_few_crops", "no candidate node has a library of --min-crops 100000 crops"),
    ("stage_no_run", "nowhere"),
])
def test_failed_stages_leave_the_run_as_it_was(tmp, trainings, followups, name, text):
    assert text in failure_message(followups[name].result())
    for job in followups.values():
        job.result()  # every stage on the run has finished
    before = [tuple(e) for e in json.loads((tmp / "run_before.json").read_text())]
    assert snapshot(tmp / "run") == before


def test_stage_window_not_smaller_than_the_images(tmp, trainings, followups):
    assert_usage_error(followups["stage_big_window"].result(),
                       "--window: 40 pixels is not smaller than the images (32 pixels)")


@pytest.mark.parametrize("command", [None, "libraries", "generators", "serve", "movie"])
def test_help_lists_every_option(command):
    section = None
    if command is None:
        parser, section = feature_atlas.build_parser(), "Feature atlas"
    elif command == "serve":
        parser = feature_atlas.serve_parser()
    elif command == "movie":
        parser = feature_atlas.movie_parser()
    else:
        groups = ((feature_atlas.NODES, feature_atlas.LIBRARIES, feature_atlas.GENERATORS,
                   feature_atlas.CHECK) if command == "libraries"
                  else (feature_atlas.GENERATORS, feature_atlas.CHECK))
        parser = feature_atlas.stage_parser(command, "", groups)
    assert_help_lists("train.feature_atlas", parser, command, readme_section=section)
    if command in ("serve", "movie"):  # the README's section describes these commands too
        text = readme_text("Feature atlas")
        assert all(option in text for option in parser_options(parser)), command
