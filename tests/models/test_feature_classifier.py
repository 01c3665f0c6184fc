"""FeatureClassifier: the full-size layout (flatten 8·8·64 = 4096), layer names, a forward pass
against one written with `lax` primitives, the activation at every nonlinearity, bad sizes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.models.feature_classifier import FeatureClassifier

KEY = jax.random.key(0)


def test_full_size_layout_and_parameters():
    model = FeatureClassifier()
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(KEY, jnp.zeros((2, 256, 256, 3))))
    assert out["logits"].shape == (2, 5) and out["logits"].dtype == jnp.float32
    params = variables["params"]
    names = [f"block{b}_conv{i}" for b in range(1, 6) for i in (1, 2)] + ["fc", "logits"]
    assert sorted(params) == sorted(names)
    widths, c_in = (8, 16, 32, 64, 64), 3
    for b, width in enumerate(widths, start=1):
        assert params[f"block{b}_conv1"]["kernel"].shape == (3, 3, c_in, width)
        assert params[f"block{b}_conv2"]["kernel"].shape == (3, 3, width, width)
        c_in = width
    assert params["fc"]["kernel"].shape == (8 * 8 * 64, 16) == (4096, 16)
    assert params["logits"]["kernel"].shape == (16, 5)
    convs = sum(9 * a * b + b for a, b in zip((3, 8, 8, 16, 16, 32, 32, 64, 64, 64),
                                              (8, 8, 16, 16, 32, 32, 64, 64, 64, 64)))
    total = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    assert total == convs + (4096 * 16 + 16) + (16 * 5 + 5)


def _reference(params, x, activation, blocks):
    """The forward pass with `lax` convolutions and reduce-window pools."""
    for b in range(1, blocks + 1):
        for i in (1, 2):
            p = params[f"block{b}_conv{i}"]
            x = jax.lax.conv_general_dilated(
                x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=jax.lax.Precision.HIGHEST) + p["bias"]
            x = activation(x)
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = activation(x.reshape(x.shape[0], -1) @ params["fc"]["kernel"] + params["fc"]["bias"])
    return x @ params["logits"]["kernel"] + params["logits"]["bias"]


def test_forward_uses_the_activation_at_every_nonlinearity():
    calls = []

    def counted_tanh(x):  # a nonlinearity whose misplacement would change every output
        calls.append(x.shape)
        return jnp.tanh(x)

    filters = (2, 3, 4)
    model = FeatureClassifier(filters=filters, hidden=5, num_classes=3, activation=counted_tanh)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    variables = model.init(KEY, x)
    calls.clear()
    logits = model.apply(variables, x, train=True)["logits"]
    assert len(calls) == 2 * len(filters) + 1  # after every conv and after fc
    assert calls[-1] == (2, 5)  # the fc's pre-activation output
    want = _reference(variables["params"], x, jnp.tanh, len(filters))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    # the default ReLU network is another function of the same parameters
    relu_model = FeatureClassifier(filters=filters, hidden=5, num_classes=3)
    relu_logits = relu_model.apply(variables, x)["logits"]
    relu_want = _reference(variables["params"], x, jax.nn.relu, len(filters))
    np.testing.assert_allclose(relu_logits, relu_want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(relu_logits, logits)


def test_bad_input_sizes_and_other_inputs():
    model = FeatureClassifier(filters=(2, 2, 2))
    with pytest.raises(ValueError, match=r"\(30, 30\) must be divisible by 2\*\*3 = 8"):
        jax.eval_shape(model.init, KEY, jnp.zeros((1, 30, 30, 3)))
    with pytest.raises(ValueError, match=r"expects \[B, S, S, C\]"):
        jax.eval_shape(model.init, KEY, jnp.zeros((32, 32, 3)))
    # 3-D volumes and bfloat16 computation; logits stay float32
    out = jax.eval_shape(lambda: FeatureClassifier(filters=(2, 2), dtype=jnp.bfloat16)
                         .init_with_output(KEY, jnp.zeros((1, 8, 12, 16, 1))))[0]["logits"]
    assert out.shape == (1, 5) and out.dtype == jnp.float32
