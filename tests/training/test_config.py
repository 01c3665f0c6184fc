"""The configuration dataclass, option types, `program_main`'s usage errors and the run
configuration's resume check."""

import argparse
import dataclasses
import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed import training
from jaxmed.errors import InputDataError
from jaxmed.training import (
    Checkpoints,
    Config,
    ConfigMismatch,
    TrainState,
    load_run,
    option,
    prepare_run_config,
)
from tests.programs import ROOT


@dataclasses.dataclass(frozen=True)
class _Toy(Config):
    width: int = option(16, "base width", type=training.positive_int)
    widths: tuple[int, ...] = option((8, 16), "stage widths", type=training.comma_ints)
    norm: str = option("batch", "normalisation", choices=("batch", "layer", "none"))
    cbam: bool = option(True, "attention")
    val_fraction: float = option(0.2, "held out", type=training.fraction, group="data")
    steps: int = option(10, "steps", cli=False, resumable=True)

    def check(self) -> None:
        if self.norm == "batch" and self.width == 1:
            raise ValueError("--norm batch needs --width > 1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    _Toy.add_options(parser)
    return training.add_training_args(parser, workdir="w", steps=5, batch_size=2)


def test_options_come_from_the_fields_with_their_types_groups_and_defaults():
    parser = _parser()
    args = parser.parse_args(["--widths", "4,8,12", "--no-cbam", "--norm", "layer"])
    config = _Toy.from_args(args)
    assert config == _Toy(width=16, widths=(4, 8, 12), norm="layer", cbam=False,
                          val_fraction=0.2, steps=5)  # steps from --steps, not the field
    titles = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert titles["model"] == ["width", "widths", "norm", "cbam"]
    assert titles["data"] == ["val_fraction"]
    assert "stage widths (default: (8, 16))" in parser.format_help().replace("\n", " ")
    assert _Toy.resumable() == {"steps"}


def test_json_round_trip_keeps_tuples_and_ignores_derived_keys():
    config = _Toy(widths=(1, 2, 3))
    stored = json.loads(json.dumps({**config.to_dict(), "class_names": ["a", "b"]}))
    assert stored["widths"] == [1, 2, 3]
    assert _Toy.from_dict(stored) == config


@pytest.mark.parametrize("kind, low, high, low_open, high_open, good, bad", [
    (int, 1, None, False, False, ["1", "7"], ["0", "-3", "1.5", "x"]),
    (float, 0.0, 1.0, False, True, ["0", "0.5"], ["1", "1.5", "-0.1", "nan"]),
    (float, 0.0, 1.0, True, True, ["0.5"], ["0", "1"]),
])
def test_bounded_accepts_the_interval_and_names_it_otherwise(kind, low, high, low_open,
                                                             high_open, good, bad):
    parse = training.bounded(kind, low=low, high=high, low_open=low_open, high_open=high_open)
    for text in good:
        assert parse(text) == kind(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="must be in|expected"):
            parse(text)


def test_comma_separated_types():
    assert training.comma_ints("8, 16,32") == (8, 16, 32)
    for text in ("", "8,0", "8,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            training.comma_ints(text)
    assert training.comma_names("conv4_3,conv5_3") == ("conv4_3", "conv5_3")
    assert training.comma_names("none") == ()


_PROGRAM = textwrap.dedent("""
    import sys
    from tests.training.test_config import _Toy, _parser
    from jaxmed import training
    def train(args, config):
        print("trained", config.width, config.steps)
    training.program_main(sys.argv[1:], build_parser=_parser, train=train, commands={},
                          config=_Toy)
""")


def _run(*argv, devices=1):
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-c", _PROGRAM, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, words", [
    (["--val-fraction", "1.5"], "argument --val-fraction: must be in [0.0, 1.0), got 1.5"),
    (["--batch-size", "0"], "argument --batch-size: must be in [1, inf], got 0"),
    (["--width", "wide"], "argument --width: expected an integer, got 'wide'"),
    (["--norm", "btach"], "argument --norm: invalid choice: 'btach'"),
    (["--width", "1"], "--norm batch needs --width > 1"),
    (["--batch-size", "3"], "argument --batch-size: 3 is not divisible by the 2 devices"),
])
def test_bad_options_give_one_line_and_status_2(argv, words):
    done = _run(*argv, devices=2)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("toy: error: ") and words in lines[0], lines
    assert "Traceback" not in done.stderr and "trained" not in done.stdout


def test_good_options_train():
    done = _run("--width", "4", "--steps", "9", devices=2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["trained", "4", "9"]


# ------------------------------------------------------------------ resume check


def _state(width: int = 2) -> TrainState:
    params = {"w": jnp.ones((width,))}
    return TrainState.create(params=params, tx=optax.sgd(0.1), rng=jnp.zeros((2,), jnp.uint32))


def _save_checkpoint(workdir, state, step=3):
    checkpoints = Checkpoints(str(workdir), keep=1)
    checkpoints.save(step, state, {"position": 0})
    checkpoints.wait()
    checkpoints.close()


def test_a_fresh_workdir_takes_any_configuration(tmp_path):
    prepare_run_config(tmp_path, {"width": 2, "steps": 5})
    # No checkpoint was kept: nothing to be inconsistent with.
    prepare_run_config(tmp_path, {"width": 4, "steps": 5})
    assert json.loads((tmp_path / "config.json").read_text()) == {"width": 4, "steps": 5}


def test_resuming_with_other_model_options_stops_and_writes_nothing(tmp_path):
    prepare_run_config(tmp_path, {"width": 2, "widths": [1, 2], "steps": 5})
    _save_checkpoint(tmp_path, _state())
    before = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ConfigMismatch) as caught:
        prepare_run_config(tmp_path, {"width": 4, "widths": [1, 3], "steps": 9},
                           resumable={"steps"})
    message = str(caught.value)
    assert "--width: saved 2, now 4" in message and "--widths: saved [1, 2], now [1, 3]" in message
    assert "--steps" not in message
    assert (tmp_path / "config.json").read_bytes() == before


def test_resuming_with_resumable_changes_records_them(tmp_path):
    prepare_run_config(tmp_path, {"width": 2, "steps": 5})
    _save_checkpoint(tmp_path, _state(), step=5)
    same = prepare_run_config(tmp_path, {"width": 2, "steps": 5}, resumable={"steps"})
    assert same == {"width": 2, "steps": 5}
    updated = prepare_run_config(tmp_path, {"width": 2, "steps": 8}, resumable={"steps"})
    again = prepare_run_config(tmp_path, {"width": 2, "steps": 12}, resumable={"steps"})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert updated["steps"] == 8 and saved == again
    assert saved["steps"] == 12
    assert saved["resumed"] == [{"step": 5, "changed": {"steps": [5, 8]}},
                                {"step": 5, "changed": {"steps": [8, 12]}}]


def test_an_option_added_after_a_run_resumes_it_at_its_default_only(tmp_path):
    prepare_run_config(tmp_path, {"width": 2, "steps": 5})  # made before "stem" existed
    _save_checkpoint(tmp_path, _state())
    defaults = {"stem": "3x3", "width": 16}
    resumed = prepare_run_config(tmp_path, {"width": 2, "steps": 5, "stem": "3x3"},
                                 defaults=defaults)
    assert resumed["stem"] == "3x3" and resumed["width"] == 2
    with pytest.raises(ConfigMismatch, match="--stem: saved '3x3', now '7x7'"):
        prepare_run_config(tmp_path, {"width": 2, "steps": 5, "stem": "7x7"},
                           defaults=defaults)
    with pytest.raises(ConfigMismatch, match="--stem: saved None, now '3x3'"):
        prepare_run_config(tmp_path, {"width": 2, "steps": 5, "stem": "3x3"})


# ------------------------------------------------------------------ load_run


@dataclasses.dataclass(frozen=True)
class _System:
    width: int

    def init_state(self):
        return _state(self.width)


def test_load_run_builds_the_system_from_config_and_restores_its_state(tmp_path):
    prepare_run_config(tmp_path, {"width": 3})
    trained = _state(3).replace(params={"w": jnp.arange(3.0)})
    _save_checkpoint(tmp_path, trained)
    run = load_run(tmp_path, lambda config: _System(config["width"]), program="toy")
    assert run.system == _System(3) and run.config == {"width": 3}
    np.testing.assert_array_equal(run.state.params["w"], [0.0, 1.0, 2.0])
    with pytest.raises(InputDataError, match="is .* a work directory of toy"):
        load_run(tmp_path / "missing", lambda config: _System(1), program="toy")
