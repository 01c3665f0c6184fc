"""Fixtures of the atlas's program and explorer tests: phase 1, the tiny training run and the
runs refused before training, started once for the whole session."""

import pytest

from tests.atlas.runs import train_command
from tests.programs import Job, once, program_env, session_folder


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return session_folder(tmp_path_factory, "atlas_program")


@pytest.fixture(scope="module")
def trainings(tmp):
    """Phase 1: the run, and runs refused before training (a window as large as the images,
    an unknown layer, a node past its layer's width)."""
    cache = tmp / "jax_cache"
    commands = {"run": train_command(tmp / "run"),
                "big_window": train_command(tmp / "big_window", "--window", "32"),
                "unknown_layer": train_command(tmp / "unknown_layer", "--layer", "block9_conv1"),
                "no_such_node": train_command(tmp / "no_such_node", "--nodes", "fc:2,fc:6")}
    jobs = {name: Job(tmp, name) for name in commands}

    def launch():
        for name, args in commands.items():
            jobs[name].start(args, program_env(cache))

    once(tmp, "phase1", launch)
    yield jobs
    for job in jobs.values():
        job.finish()


def run_copy(tmp, trainings, name: str):
    """A copy `tmp/name` of the trained run (made once per session), for tests that write into
    their run."""
    import shutil

    def copy():
        trainings["run"].ok()
        shutil.copytree(tmp / "run", tmp / name)

    once(tmp, f"copy_{name}", copy)
    return tmp / name
