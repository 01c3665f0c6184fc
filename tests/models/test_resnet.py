"""ResNet: torchvision's parameter counts at full size (eval_shape only), residual blocks against
a NumPy reference, dilation, features-only mode, 2-D and 3-D, bfloat16, injected layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmed.models.resnet import (
    RESNET_DEPTHS,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    dilation_schedule,
)

KEY = jax.random.key(0)
BN_EPS = 1e-5


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def inputs(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def num_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_variables(model, x, seed=0):
    """Random params and running statistics (var > 0), so no test passes by symmetry."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, KEY, x)

    def draw(path, leaf):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        if name in ("mean", "bias"):
            return jnp.asarray(0.2 * rng.normal(size=leaf.shape), leaf.dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# ----------------------------------------------------------------------------
# Full size, shapes only
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,torchvision_total",
    [(ResNet18, 11_689_512), (ResNet34, 21_797_672), (ResNet50, 25_557_032),
     (ResNet101, 44_549_160), (ResNet152, 60_192_808)],
)
def test_parameter_count_is_torchvisions(variant, torchvision_total):
    # torchvision's published totals: weights, BN scale and bias, the 1000-way fc; the running
    # statistics are buffers there and `batch_stats` here. Parameters do not depend on the
    # input size, so a small one keeps the trace short.
    variables = jax.eval_shape(variant(num_classes=1000).init, KEY, spec((1, 32, 32, 3)))
    assert num_params(variables["params"]) == torchvision_total


def test_resnet50_trace_at_224():
    model = ResNet50()
    x = spec((1, 224, 224, 3))
    variables = jax.eval_shape(model.init, KEY, x)
    out, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["intermediates"]),
                                variables, x)
    assert out.shape == (1, 7, 7, 2048)
    trace = {k: v[0].shape for k, v in state["intermediates"].items()}
    assert trace == {"stem_features": (1, 112, 112, 64), "layer1_features": (1, 56, 56, 256),
                     "layer2_features": (1, 28, 28, 512), "layer3_features": (1, 14, 14, 1024),
                     "layer4_features": (1, 7, 7, 2048)}
    params = variables["params"]
    assert params["conv_stem"]["kernel"].shape == (7, 7, 3, 64)
    assert set(params) == {"conv_stem", "norm_stem", "layer1", "layer2", "layer3", "layer4"}
    assert set(params["layer3"]) == {f"block{i}" for i in range(6)}


def test_variants_are_the_depth_table():
    for variant, depth in [(ResNet18, 18), (ResNet34, 34), (ResNet50, 50), (ResNet101, 101),
                           (ResNet152, 152)]:
        block, stage_sizes = RESNET_DEPTHS[depth]
        assert variant().block is block and tuple(variant().stage_sizes) == stage_sizes


def test_dilation_schedule_follows_torchvision():
    # torchvision _make_layer: the first block of a dilated layer keeps the previous dilation.
    assert dilation_schedule(32) == ((1, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1))
    assert dilation_schedule(16) == ((1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2))
    assert dilation_schedule(8) == ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4))
    with pytest.raises(ValueError, match="output_stride"):
        dilation_schedule(4)


@pytest.mark.parametrize("output_stride,size", [(32, 2), (16, 4), (8, 8)])
def test_dilation_keeps_the_spatial_size_with_the_same_params(output_stride, size):
    x = spec((1, 64, 64, 3))
    model = ResNet18(width=4, output_stride=output_stride)
    variables = jax.eval_shape(model.init, KEY, x)
    assert jax.eval_shape(model.apply, variables, x).shape == (1, size, size, 32)
    plain = jax.eval_shape(ResNet18(width=4).init, KEY, x)
    assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, plain)


def test_bad_configuration_and_input_raise():
    x = spec((1, 32, 32, 3))
    with pytest.raises(ValueError, match="output_stride"):
        jax.eval_shape(ResNet18(output_stride=4).init, KEY, x)
    with pytest.raises(ValueError, match="stage_sizes"):
        jax.eval_shape(ResNet(stage_sizes=(2, 2, 2), block=BasicBlock).init, KEY, x)
    with pytest.raises(ValueError, match="shape"):
        jax.eval_shape(ResNet18().init, KEY, spec((32, 32, 3)))


# ----------------------------------------------------------------------------
# Residual blocks against NumPy
# ----------------------------------------------------------------------------


def _np_conv(x, w, stride=1, dilation=1):
    """PyTorch Conv2d (no bias, padding = dilation (k - 1) / 2) by summing shifted slices."""
    k = w.shape[0]
    pad = dilation * (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = ((n + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for n in x.shape[1:3])
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(k):
        for j in range(k):
            patch = xp[:, i * dilation::stride, j * dilation::stride][:, :ho, :wo]
            out += np.einsum("bhwc,cd->bhwd", patch, w[i, j])
    return out


def _np_bn(x, p, s):
    return (x - s["mean"]) / np.sqrt(s["var"] + BN_EPS) * p["scale"] + p["bias"]


def _np_block(x, variables, convs):
    """Residual block in eval mode: `convs` lists (name, stride, dilation) of the main branch."""
    p = jax.tree.map(np.asarray, variables["params"])
    s = jax.tree.map(np.asarray, variables["batch_stats"])
    y = x
    for n, (name, stride, dilation) in enumerate(convs):
        y = _np_conv(y, p[f"conv{name}"]["kernel"], stride, dilation)
        y = _np_bn(y, p[f"norm{name}"], s[f"norm{name}"])
        y = np.maximum(y, 0) if n < len(convs) - 1 else y
    shortcut = x
    if "conv_downsample" in p:
        stride = max(c[1] for c in convs)
        shortcut = _np_bn(_np_conv(x, p["conv_downsample"]["kernel"], stride),
                          p["norm_downsample"], s["norm_downsample"])
    return np.maximum(y + shortcut, 0)


@pytest.mark.parametrize(
    "block,cin,strides,dilation",
    [
        (Bottleneck(4, strides=2), 6, 2, 1),  # stride on the 3x3 conv (v1.5), projection
        (Bottleneck(4, dilation=2), 6, 1, 2),  # dilated 3x3, projection for channels only
        (Bottleneck(4, dilation=2), 16, 1, 2),  # identity shortcut
        (BasicBlock(5, strides=2), 3, 2, 1),
        (BasicBlock(5, dilation=2), 5, 1, 2),  # identity shortcut, both 3x3 convs dilated
    ],
)
def test_blocks_match_numpy_reference(block, cin, strides, dilation):
    x = inputs((2, 9, 9, cin))  # odd size: PyTorch padding puts one pixel on each side
    variables = random_variables(block, x, seed=1)
    got = jax.jit(block.apply)(variables, x)
    if isinstance(block, Bottleneck):
        convs = [("1", 1, 1), ("2", strides, dilation), ("3", 1, 1)]
    else:
        convs = [("1", strides, dilation), ("2", 1, dilation)]
    want = _np_block(np.asarray(x, np.float64), variables, convs)
    side = 5 if strides == 2 else 9
    assert got.shape == want.shape == (2, side, side, got.shape[-1])
    assert ("conv_downsample" in variables["params"]) == (strides != 1 or cin != got.shape[-1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_check_grads_bottleneck():
    with jax.enable_x64(True):
        block = Bottleneck(2, strides=2, dilation=1, param_dtype=jnp.float64)
        x = inputs((1, 5, 5, 3), dtype=jnp.float64)
        variables = random_variables(block, x, seed=2)

        @jax.jit
        def f(x, params):
            y, _ = block.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
            return y

        check_grads(f, (x, variables["params"]), order=1, modes=("fwd", "rev"), atol=1e-5,
                    rtol=1e-5)


def test_convolutions_start_he_normal_on_fan_out():
    # As torchvision: std sqrt(2 / fan_out), fan_out = 9 * 32 for a 3x3 conv to 32 channels.
    variables = jax.jit(Bottleneck(32).init)(KEY, jnp.zeros((1, 5, 5, 128)))
    kernel = variables["params"]["conv2"]["kernel"]  # [3, 3, 32, 32]
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * 32)), rtol=0.05)
    np.testing.assert_allclose(np.mean(kernel), 0.0, atol=0.01)


def test_blocks_under_vmap_equal_the_batched_call():
    block = Bottleneck(2, strides=2, dilation=2)
    xs = inputs((3, 1, 7, 7, 4))
    variables = random_variables(block, xs[:, 0])
    per_sample = jax.jit(jax.vmap(lambda x: block.apply(variables, x)))(xs)  # eval: independent
    np.testing.assert_allclose(per_sample[:, 0], block.apply(variables, xs[:, 0]), rtol=1e-5,
                               atol=1e-5)


def test_injected_layers_build_the_blocks():
    # A LayerNorm in place of BatchNorm and Flax's convolution: same names, no batch_stats.
    def layer_norm(use_running_average, **kwargs):  # no running statistics to use
        return nn.LayerNorm(epsilon=1e-6, **kwargs)

    block = BasicBlock(4, strides=2, conv=nn.Conv, norm=layer_norm)
    x = inputs((2, 8, 8, 3))
    variables = jax.jit(block.init)(KEY, x)
    assert set(variables) == {"params"}
    assert set(variables["params"]) == {"conv1", "norm1", "conv2", "norm2", "conv_downsample",
                                        "norm_downsample"}
    assert block.apply(variables, x).shape == (2, 4, 4, 4)


# ----------------------------------------------------------------------------
# Tiny real networks
# ----------------------------------------------------------------------------


# One block per layer keeps the compiled programs small.
TINY = dict(stage_sizes=(1, 1, 1, 1), width=2)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_tiny_classifier_2d_eval_and_train(block):
    model = ResNet(**TINY, block=block, num_classes=3)
    x = inputs((2, 32, 32, 3))
    variables = random_variables(model, x)
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 3) and bool(jnp.isfinite(logits).all())
    assert variables["params"]["head"]["kernel"].shape == (16 * block.expansion, 3)
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    trained, updates = train(variables, x)
    assert trained.shape == (2, 3) and not np.allclose(trained, logits)
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    assert all(jax.tree.leaves(jax.tree.map(lambda p, q: bool(jnp.any(p != q)), old, new)))


def test_tiny_features_only_3d():
    model = ResNet(**TINY, block=BasicBlock, output_stride=8)
    x = inputs((1, 16, 16, 16, 1))
    variables = random_variables(model, x)
    assert variables["params"]["conv_stem"]["kernel"].shape == (7, 7, 7, 1, 2)
    assert "head" not in variables["params"]
    features = jax.jit(model.apply)(variables, x)
    assert features.shape == (1, 2, 2, 2, 16) and bool(jnp.isfinite(features).all())


def test_bfloat16_features_and_parameters():
    x = inputs((2, 32, 32, 3))
    model = ResNet(**TINY, block=BasicBlock, dtype=jnp.bfloat16)
    variables = random_variables(model, x)
    features = jax.jit(model.apply)(variables, x.astype(jnp.bfloat16))
    assert features.dtype == jnp.bfloat16 and features.shape == (2, 1, 1, 16)
    assert bool(jnp.isfinite(features.astype(jnp.float32)).all())
    stored = jax.eval_shape(ResNet18(width=2, param_dtype=jnp.bfloat16).init, KEY, spec(x.shape))
    assert {leaf.dtype for leaf in jax.tree.leaves(stored["params"])} == {jnp.dtype(jnp.bfloat16)}
