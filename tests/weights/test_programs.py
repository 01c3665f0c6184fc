"""`--pretrained` in the programs, in process: the option is in `--help`, a tiny NumPy-written
torchvision file is accepted, recorded in `config.json` and loaded into the state that training
starts from, with ImageNet input normalisation; a bad file stops the program with one line
before `config.json` is written. Training itself is stopped where `fit` would start (the
programs' own tests train)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import train.segment
import train.wsi
import train.wsol
from jaxmed.pathology.config import WsiConfig
from jaxmed.pathology.data import SlideSet
from jaxmed.pathology.steps import build_network, initial_states
from jaxmed.segmentation.steps import build_segmenter
from jaxmed.training import images_to_imagenet
from jaxmed.wsol.config import WsolConfig, run_config
from jaxmed.wsol.steps import build_wsol
from tests.weights.test_mapping import resnet_state_dict, vgg16_state_dict


class _FitReached(Exception):
    """Raised by the stand-in for `fit`, with the state training would start from."""


def _stop_at_fit(monkeypatch, program):
    def fake_fit(*, init_state, **_):  # jitted: initialising op by op takes seconds
        raise _FitReached(jax.jit(init_state)())

    monkeypatch.setattr(program, "fit", fake_fit)


def _write(path, state):
    safetensors.numpy.save_file(state, str(path))
    return path


def _kernel(state, key):
    return state[key].transpose(2, 3, 1, 0)


def _refused(main, argv, workdir, match):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code != 0 and match in str(stop.value.code)
    assert not (workdir / "config.json").exists()


WSOL = ["--image-size", "32", "--synthetic-images", "24", "--synthetic-classes", "2",
        "--widths", "4,5,6,7,8", "--conv6-width", "8", "--no-batch-norm", "--no-progress"]


def test_wsol_pretrained(tmp_path, monkeypatch):
    state = vgg16_state_dict()
    weights = _write(tmp_path / "vgg16.safetensors", state)
    _stop_at_fit(monkeypatch, train.wsol)
    workdir = tmp_path / "run"
    with pytest.raises(_FitReached) as reached:
        train.wsol.main(["--workdir", str(workdir), *WSOL, "--pretrained", str(weights)])
    values = json.loads((workdir / "config.json").read_text())
    assert values["pretrained"] == str(weights.resolve())
    start = reached.value.args[0]
    np.testing.assert_array_equal(start.params["conv5_3"]["conv"]["kernel"],
                                  _kernel(state, "features.28.weight"))
    wsol = build_wsol(values)
    images = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
    np.testing.assert_allclose(wsol.preprocess(images), images_to_imagenet(images))
    assert values["imagenet_input"]
    assert not build_wsol({**values, "pretrained": None, "imagenet_input": False}).imagenet_input

    # A run warm-started from this one keeps its input normalisation.
    assert run_config(WsolConfig(init_from=str(workdir)), ["a", "b"], True)["imagenet_input"]
    assert "imagenet_input" not in run_config(WsolConfig(), ["a", "b"], True)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    _refused(train.wsol.main, ["--workdir", str(tmp_path / "bad"), *WSOL, "--pretrained",
                               str(bad)], tmp_path / "bad", "not a safetensors file")
    wrong = _write(tmp_path / "resnet.safetensors", resnet_state_dict(18))
    _refused(train.wsol.main, ["--workdir", str(tmp_path / "wrong"), *WSOL, "--pretrained",
                               str(wrong)], tmp_path / "wrong", "holds no array")
    _refused(train.wsol.main, ["--workdir", str(tmp_path / "none"), *WSOL, "--pretrained",
                               str(tmp_path / "absent.safetensors")], tmp_path / "none",
             "not found")


SEGMENT = ["--image-size", "32", "--synthetic-images", "8", "--depth", "18", "--width", "4",
           "--no-progress"]


def test_segment_pretrained(tmp_path, monkeypatch):
    state = resnet_state_dict(18)
    weights = _write(tmp_path / "resnet18.safetensors", state)
    _stop_at_fit(monkeypatch, train.segment)
    workdir = tmp_path / "run"
    with pytest.raises(_FitReached) as reached:
        train.segment.main(["--workdir", str(workdir), *SEGMENT, "--stem", "7x7",
                            "--pretrained", str(weights)])
    values = json.loads((workdir / "config.json").read_text())
    assert values["pretrained"] == str(weights.resolve()) and values["stem"] == "7x7"
    start = reached.value.args[0]
    np.testing.assert_array_equal(start.params["conv_stem"]["kernel"],
                                  _kernel(state, "conv1.weight"))
    np.testing.assert_array_equal(start.batch_stats["layer3"]["block0"]["norm1"]["mean"],
                                  state["layer3.0.bn1.running_mean"])
    assert build_segmenter(values).imagenet_input

    with pytest.raises(SystemExit) as stop:  # the design's stem cannot take the weights
        train.segment.main(["--workdir", str(tmp_path / "stem"), *SEGMENT, "--pretrained",
                            str(weights)])
    assert stop.value.code == 2
    wide = _write(tmp_path / "wide.safetensors", resnet_state_dict(18, width=8))
    _refused(train.segment.main, ["--workdir", str(tmp_path / "wide"), *SEGMENT, "--stem",
                                  "7x7", "--pretrained", str(wide)], tmp_path / "wide",
             "needs (4, 3, 7, 7)")


def _fake_slides(tmp_path):
    paths = tuple(tmp_path / f"slide{i}.tiff" for i in range(4))
    return SlideSet(paths, np.array([0, 0, 1, 1]), (None,) * 4, ("normal", "tumour"))


def test_wsi_pretrained(tmp_path, monkeypatch):
    state = resnet_state_dict(18)
    weights = _write(tmp_path / "resnet18.safetensors", state)
    monkeypatch.setattr(train.wsi, "load_slides", lambda config, workdir: _fake_slides(tmp_path))

    def stop(config, workdir):  # the first step after config.json
        raise _FitReached()

    monkeypatch.setattr(train.wsi, "stain_normalizer", stop)
    workdir = tmp_path / "run"
    argv = ["--width", "4", "--hidden", "8", "--no-progress"]
    with pytest.raises(_FitReached):
        train.wsi.main(["--workdir", str(workdir), *argv, "--pretrained", str(weights)])
    values = json.loads((workdir / "config.json").read_text())
    assert values["pretrained"] == str(weights.resolve())
    networks = {which: build_network(values, which) for which in ("low", "high")}
    assert all(net.imagenet_input for net in networks.values())
    starts = initial_states(networks, values["pretrained"])
    for which in ("low", "high"):
        start = jax.jit(starts[which])()
        np.testing.assert_array_equal(start.params["layer4"]["block1"]["conv2"]["kernel"],
                                      _kernel(state, "layer4.1.conv2.weight"))

    wide = _write(tmp_path / "wide.safetensors", resnet_state_dict(18, width=8))
    _refused(train.wsi.main, ["--workdir", str(tmp_path / "wide"), *argv, "--pretrained",
                              str(wide)], tmp_path / "wide", "needs (4, 3, 7, 7)")


@pytest.mark.parametrize("program", [train.wsol, train.segment, train.wsi])
def test_help_says_imagenet_normalisation(program, capsys):
    with pytest.raises(SystemExit):
        program.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--pretrained FILE.safetensors" in text
    assert "ImageNet's mean and std" in text


def test_wsi_config_records_the_file_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = train.wsi.build_parser()
    config = WsiConfig.from_args(parser.parse_args(["--pretrained", "w.safetensors"]))
    assert config.pretrained == str(tmp_path / "w.safetensors")
