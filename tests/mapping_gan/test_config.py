"""`MappingGanConfig`: the program's model options, their checks and what `config.json` holds.

Bad option values and contradictory options are usage errors of `python -m train.mapping_gan`
(exit status 2, one line naming the option, no traceback); they are rejected before JAX does
anything, so they run here in-process through the program's `main`.
"""

import pytest

from jaxmed.mapping_gan.config import DECAY_KEYS, MappingGanConfig
from jaxmed.mapping_gan.steps import build_mapping_gan
from train import mapping_gan as program


def _parse(*argv: str) -> MappingGanConfig:
    return MappingGanConfig.from_args(program.build_parser().parse_args(list(argv)))


def test_defaults_are_the_programs_and_round_trip_through_config_json():
    config = _parse()
    assert config == MappingGanConfig()
    assert (config.generator_features, config.critic_norm, config.steps) == ((8, 16, 32), "layer",
                                                                             400)
    assert (config.positive_dir, config.synthetic_size, config.val_fraction) == (None, 32, 0.2)
    values = config.to_dict()
    assert values["generator_features"] == [8, 16, 32] and values["percentiles"] == [1.0, 99.0]
    assert MappingGanConfig.from_dict({**values, "input_shape": [8, 8, 1]}) == config
    assert MappingGanConfig.resumable() == {"steps"}


def test_options_reach_the_config_and_the_networks():
    config = _parse("--generator-features", "4,8", "--generator-norm", "none", "--critic",
                    "dense", "--critic-widths", "4,8", "--seed", "3", "--steps", "10",
                    "--percentiles", "2", "98", "--normalisation", "percentile")
    assert config.generator_features == (4, 8) and config.seed == 3 and config.steps == 10
    assert config.percentiles == (2.0, 98.0) and config.normalisation == "percentile"
    gan = build_mapping_gan({**config.to_dict(), **config.decay_window(),
                             "input_shape": [8, 8, 1]})
    assert gan.generator.norm is None and gan.generator.features == (4, 8)
    assert gan.critic.kind == "dense" and gan.seed == 3 and gan.input_shape == (8, 8, 1)
    assert (gan.config.decay_start, gan.config.decay_end) == (5, 10)


@pytest.mark.parametrize("steps, decay, window", [
    (400, 0.5, dict(lr_decay_start=200, lr_decay_end=400)),
    (2, 0.5, dict(lr_decay_start=1, lr_decay_end=2)),
    (10, 0.01, dict(lr_decay_start=9, lr_decay_end=10)),  # at least one step of decay
    (10, 0.0, {}),
])
def test_decay_window_follows_steps(steps, decay, window):
    config = MappingGanConfig(steps=steps, lr_decay=decay)
    assert config.decay_window() == window
    assert set(window) <= DECAY_KEYS


BAD_VALUES = {
    "--val-fraction 1.5": "--val-fraction",
    "--batch-size 0": "--batch-size",
    "--generator-norm btach": "--generator-norm",
    "--critic-norm batch": "--critic-norm",  # with the default gradient penalty
    "--generator-ema 1": "--generator-ema",
    "--lr-decay 1.5": "--lr-decay",
    "--critic-widths 8,x": "--critic-widths",
    "--percentiles 99 1": "--percentiles",
    "--synthetic-size 2": "--synthetic-size",  # too small for the protocol's two boxes
    "--synthetic-subjects 3": "--synthetic-subjects",
    "--positive-dir p": "--positive-dir",  # without --negative-dir
    "--manifest m.csv --negative-dir n": "--manifest",
}


@pytest.mark.parametrize("argv", BAD_VALUES)
def test_bad_values_are_one_line_usage_errors(argv, capsys, monkeypatch):
    def accepted(args, config):
        raise AssertionError(f"{argv} was accepted")

    monkeypatch.setattr(program, "train", accepted)
    with pytest.raises(SystemExit) as stopped:
        program.main(argv.split())
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert BAD_VALUES[argv] in err and "error:" in err and "Traceback" not in err


def test_batch_norm_critic_is_fine_with_weight_clipping():
    config = _parse("--critic-norm", "batch", "--lipschitz", "clip")
    assert (config.critic_norm, config.lipschitz) == ("batch", "clip")
    with pytest.raises(ValueError, match="--critic-norm"):
        MappingGanConfig(critic_norm="batch").check()


def test_every_field_is_an_option_or_a_training_option():
    parser = program.build_parser()
    flags = {o for action in parser._actions for o in action.option_strings}
    for name in MappingGanConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in flags, name
