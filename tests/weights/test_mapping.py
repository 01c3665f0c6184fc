"""torchvision-layout safetensors files written by NumPy (no torch) land in our trees with the
right transposes: a convolution of our loaded layer equals the convolution that the file's
OIHW kernel defines, computed here by its definition; and what is missing, extra or of the
wrong shape is reported."""

import sys
from functools import partial

import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxmed.errors import InputDataError
from jaxmed.models.resnet import ResNet18, ResNet50
from jaxmed.models.vgg_cam import VGGCAM
from jaxmed.weights import load_torchvision, read_state_dict
from jaxmed.weights.__main__ import main as weights_main

RNG = np.random.default_rng(0)
VGG_WIDTHS = (4, 5, 6, 7, 8)


def _normal(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def vgg16_state_dict(widths=VGG_WIDTHS, batch_norm=False):
    """torchvision's `vgg16` / `vgg16_bn` `features` keys with narrow widths."""
    state, index, channels = {}, 0, 3
    for stage, (convs, width) in enumerate(zip((2, 2, 3, 3, 3), widths)):
        index += 1 if stage else 0  # max-pool
        for _ in range(convs):
            state[f"features.{index}.weight"] = _normal(width, channels, 3, 3)
            state[f"features.{index}.bias"] = _normal(width)
            if batch_norm:
                bn = f"features.{index + 1}"
                state.update({f"{bn}.weight": _normal(width), f"{bn}.bias": _normal(width),
                              f"{bn}.running_mean": _normal(width),
                              f"{bn}.running_var": 1 + np.abs(_normal(width)),
                              f"{bn}.num_batches_tracked": np.array(7, np.int64)})
            index += 3 if batch_norm else 2
            channels = width
    state["classifier.0.weight"] = _normal(3, widths[-1])
    return state


def _bn(state, name, width):
    state.update({f"{name}.weight": 1 + 0.1 * _normal(width), f"{name}.bias": 0.1 * _normal(width),
                  f"{name}.running_mean": 0.1 * _normal(width),
                  f"{name}.running_var": 1 + 0.1 * np.abs(_normal(width)),
                  f"{name}.num_batches_tracked": np.array(3, np.int64)})


def resnet_state_dict(depth, width=4, classes=5):
    """torchvision's ResNet-18 / ResNet-50 keys and shapes with base width `width`."""
    stages, bottleneck = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}[depth]
    state = {"conv1.weight": _normal(width, 3, 7, 7)}
    _bn(state, "bn1", width)
    inplanes = width
    for i, blocks in enumerate(stages):
        planes = width * 2**i
        out = 4 * planes if bottleneck else planes
        for j in range(blocks):
            p = f"layer{i + 1}.{j}"
            shapes = ([(planes, inplanes, 1, 1), (planes, planes, 3, 3), (out, planes, 1, 1)]
                      if bottleneck else [(planes, inplanes, 3, 3), (planes, planes, 3, 3)])
            for k, shape in enumerate(shapes, start=1):
                state[f"{p}.conv{k}.weight"] = _normal(*shape) * np.float32(
                    (2 / np.prod(shape[1:])) ** .5)
                _bn(state, f"{p}.bn{k}", shape[0])
            if j == 0 and (i > 0 or inplanes != out):
                state[f"{p}.downsample.0.weight"] = _normal(out, inplanes, 1, 1)
                _bn(state, f"{p}.downsample.1", out)
            inplanes = out
    state["fc.weight"] = _normal(classes, inplanes)
    state["fc.bias"] = _normal(classes)
    return state


def _write(tmp_path, state, name="weights.safetensors"):
    path = tmp_path / name
    safetensors.numpy.save_file(state, str(path))
    return path


def _shapes(model, size):
    """The network's variables as shapes only (initialising takes seconds on these CPUs): a
    loaded array replaces its shape; the loader needs nothing more."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          np.zeros((1, size, size, 3), np.float32))


def _zeros_for_shapes(variables):
    """The arrays the file did not provide (still shapes) as zeros, to run the network."""
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype)
                        if isinstance(a, jax.ShapeDtypeStruct) else a, variables)


def conv_by_definition(x, weight, bias=None, stride=1, pad=0):
    """`out[b, y, x, o] = sum_{i,h,w} x_pad[b, s y + h, s x + w, i] weight[o, i, h, w]`:
    PyTorch's Conv2d (cross-correlation, OIHW kernel) on channels-last images."""
    out_c, _, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, out_c))
    for b in range(x.shape[0]):
        for y in range(ho):
            for xx in range(wo):
                window = xp[b, y * stride:y * stride + kh, xx * stride:xx * stride + kw]
                out[b, y, xx] = np.einsum("hwi,oihw->o", window, weight)
    return out if bias is None else out + bias


def test_vgg_kernel_lands_where_the_convolution_says(tmp_path):
    state = vgg16_state_dict()
    state["features.0.weight"][:] = 0
    state["features.0.weight"][1, 2, 0, 2] = 1.0  # output 1 <- input channel 2, top right
    model = VGGCAM(num_classes=3, widths=VGG_WIDTHS, conv6_width=6)
    loaded = load_torchvision(_shapes(model, 16), _write(tmp_path, state), "vgg16")
    images = _normal(2, 16, 16, 3)
    _, inter = jax.jit(partial(model.apply, capture_intermediates=True))(
        _zeros_for_shapes(loaded.variables), images)
    for layer, key, x in (("conv1_1", "features.0", images),
                          ("conv1_2", "features.2", inter["intermediates"]["conv1_1"]
                           ["__call__"][0])):
        ours = inter["intermediates"][layer]["__call__"][0]
        expected = np.maximum(conv_by_definition(np.asarray(x), state[f"{key}.weight"],
                                                 state[f"{key}.bias"], pad=1), 0)
        np.testing.assert_allclose(ours, expected, atol=1e-5)
    # The one-hot kernel: output channel 1 at (y, x) is input channel 2 at (y - 1, x + 1).
    ours = inter["intermediates"]["conv1_1"]["__call__"][0]
    np.testing.assert_allclose(ours[:, 1:, :-1, 1], np.maximum(
        images[:, :-1, 1:, 2] + state["features.0.bias"][1], 0), atol=1e-6)
    assert sorted(p for p in loaded.kept if p.startswith("params/")) == [
        "params/classifier/bias", "params/classifier/kernel", "params/conv6/conv/bias",
        "params/conv6/conv/kernel"]
    assert loaded.unused == ["classifier.0.weight"]


def test_vgg16_bn_folds_the_conv_bias_into_the_running_mean(tmp_path):
    state = vgg16_state_dict(batch_norm=True)
    model = VGGCAM(num_classes=3, widths=VGG_WIDTHS, conv6_width=6, batch_norm=True)
    loaded = load_torchvision(_shapes(model, 32), _write(tmp_path, state), "vgg16")
    stats, params = loaded.variables["batch_stats"], loaded.variables["params"]
    np.testing.assert_allclose(stats["conv2_1"]["bn"]["mean"],
                               state["features.8.running_mean"] - state["features.7.bias"])
    np.testing.assert_array_equal(stats["conv5_3"]["bn"]["var"], state["features.41.running_var"])
    np.testing.assert_array_equal(params["conv1_2"]["bn"]["scale"], state["features.4.weight"])
    np.testing.assert_array_equal(params["conv1_2"]["conv"]["kernel"],
                                  state["features.3.weight"].transpose(2, 3, 1, 0))
    assert loaded.unused == ["classifier.0.weight"]  # num_batches_tracked is not listed


def test_resnet_stem_and_head_land_where_the_definitions_say(tmp_path):
    state = resnet_state_dict(18)
    model = ResNet18(width=4, num_classes=5)
    loaded = load_torchvision(_shapes(model, 32), _write(tmp_path, state), "resnet", fc="head")
    assert loaded.kept == [] and loaded.unused == []
    images = _normal(2, 32, 32, 3)
    logits, inter = jax.jit(partial(model.apply, capture_intermediates=True,
                                    mutable=["intermediates"]))(loaded.variables, images)
    stem = inter["intermediates"]["conv_stem"]["__call__"][0]  # torchvision: conv 7x7/2, pad 3
    np.testing.assert_allclose(stem, conv_by_definition(images, state["conv1.weight"], stride=2,
                                                        pad=3), atol=1e-4)
    layer4 = np.asarray(inter["intermediates"]["layer4_features"][0]).mean(axis=(1, 2))
    np.testing.assert_allclose(logits, layer4 @ state["fc.weight"].T + state["fc.bias"],
                               rtol=1e-5, atol=1e-5)
    norm = loaded.variables["batch_stats"]["layer2"]["block0"]["norm_downsample"]
    np.testing.assert_array_equal(norm["var"], state["layer2.0.downsample.1.running_var"])


def test_bottleneck_downsample_and_stride_placement(tmp_path):
    """ResNet-50 v1.5: the 3x3 conv (conv2) has the stride, so a file's conv2 is a 3x3."""
    state = resnet_state_dict(50)
    model = ResNet50(width=4)  # no classifier: fc is left over
    loaded = load_torchvision(_shapes(model, 32), _write(tmp_path, state), "resnet")
    params = loaded.variables["params"]["layer3"]["block0"]
    assert params["conv2"]["kernel"].shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(params["conv_downsample"]["kernel"],
                                  state["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    assert loaded.unused == ["fc.bias", "fc.weight"] and loaded.kept == []


def test_missing_and_extra_keys_are_listed(tmp_path):
    state = resnet_state_dict(18)
    del state["layer4.1.conv2.weight"]
    state["extra.weight"] = _normal(3)
    path = _write(tmp_path, state)
    variables = _shapes(ResNet18(width=4, num_classes=5), 32)
    with pytest.raises(InputDataError, match=r"lacks 1 array.*layer4\.1\.conv2\.weight"):
        load_torchvision(variables, path, "resnet", fc="head")
    loaded = load_torchvision(variables, path, "resnet", fc="head", strict=False)
    assert loaded.kept == ["params/layer4/block1/conv2/kernel"]
    assert loaded.unused == ["extra.weight"]
    kept = ("params", "layer4", "block1", "conv2", "kernel")  # untouched: still its shape
    assert _at(loaded.variables, kept) is _at(variables, kept)
    assert isinstance(_at(loaded.variables, ("params", "layer4", "block1", "conv1", "kernel")),
                      np.ndarray)


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_shape_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    state = resnet_state_dict(18)
    state["conv1.weight"] = _normal(8, 3, 7, 7)
    path = _write(tmp_path, state)
    with pytest.raises(InputDataError) as error:
        load_torchvision(_shapes(ResNet18(width=4), 32), path, "resnet")
    message = str(error.value)
    assert "conv1.weight has shape (8, 3, 7, 7)" in message
    assert "conv_stem/kernel needs (4, 3, 7, 7)" in message and "(7, 7, 3, 4) in ours" in message


@pytest.mark.parametrize("case", ["another architecture", "vgg batch norm", "not safetensors",
                                  "missing"])
def test_bad_files_are_refused(tmp_path, case):
    vgg = partial(VGGCAM, num_classes=3, widths=VGG_WIDTHS, conv6_width=6)
    if case == "another architecture":
        target, path, arch = _shapes(vgg(), 32), _write(tmp_path, resnet_state_dict(18)), "vgg16"
        match = "holds no array of a torchvision vgg16"
    elif case == "vgg batch norm":
        target, arch = _shapes(vgg(), 32), "vgg16"
        path = _write(tmp_path, vgg16_state_dict(batch_norm=True))
        match = "holds VGG16 with BatchNorm.*--batch-norm"
    elif case == "not safetensors":
        path = tmp_path / "weights.pth"
        path.write_bytes(b"PK\x03\x04" + bytes(200))
        target, arch, match = _shapes(vgg(), 32), "vgg16", "not a safetensors file.*convert"
    else:
        target, arch, match = {}, "resnet", "not found"
        path = tmp_path / "absent.safetensors"
    with pytest.raises(InputDataError, match=match):
        load_torchvision(target, path, arch)


def test_read_state_dict_is_numpy(tmp_path):
    state = resnet_state_dict(18)
    read = read_state_dict(_write(tmp_path, state))
    assert set(read) == set(state) and isinstance(read["conv1.weight"], np.ndarray)


def test_converter_without_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    source = tmp_path / "in.pth"
    source.write_bytes(b"x")
    with pytest.raises(SystemExit) as stop:
        weights_main(["convert", str(source), str(tmp_path / "out.safetensors")])
    assert "needs PyTorch" in str(stop.value.code)
    assert not (tmp_path / "out.safetensors").exists()
