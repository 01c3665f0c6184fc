"""Segmentation network (SPEC S4): the seed's trace at full size (eval_shape only), ResNet
parameter counts against torchvision's published totals, residual blocks against a NumPy
reference, and tiny real forwards, ablations and a few optimisation steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxmed.models.segmentation import BasicBlock, Bottleneck, SegmentationNet, dilation_schedule

KEY = jax.random.key(0)
BN_EPS = 1e-5
TINY = dict(depth=18, width=4, num_classes=2)


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _trace(model, shape):
    """Output and sown intermediate shapes of `model` on `shape`, without computing anything."""
    x = _spec(shape)
    variables = jax.eval_shape(model.init, KEY, x)
    out, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, x)
    shapes = {k: v[0].shape for k, v in state["intermediates"].items()}
    return variables, {k: v.shape for k, v in out.items()}, shapes


def _num_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _random_variables(model, x, seed=0):
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

SEED_TRACE = {
    "stem_features": (1, 237, 237, 128),
    "pool_features": (1, 119, 119, 128),
    "layer1_features": (1, 119, 119, 256),
    "layer2_features": (1, 60, 60, 512),
    "layer3_features": (1, 30, 30, 1024),
    "layer4_features": (1, 30, 30, 2048),
    "cbam_stem_attention": (1, 119, 119, 1),
    "cbam_attention": (1, 30, 30, 1),
}


def test_seed_configuration_reproduces_the_seed_trace():
    model = SegmentationNet(aux_head=True)
    assert (model.depth, model.width, model.output_stride, model.num_classes) == (50, 64, 16, 3)
    variables, out, trace = _trace(model, (1, 473, 473, 3))
    assert out == {"logits": (1, 473, 473, 3), "aux_logits": (1, 473, 473, 3)}
    assert trace == SEED_TRACE
    params = variables["params"]
    # PPM: 2048 -> 4 x 512 branches concatenated (4096); head 3x3 4096 -> 512; aux 3x3 1024 -> 256.
    assert params["ppm"]["bin0_conv"]["kernel"].shape == (1, 1, 2048, 512)
    assert params["head"]["conv"]["kernel"].shape == (3, 3, 4096, 512)
    assert params["head"]["classifier"]["kernel"].shape == (1, 1, 512, 3)
    assert params["aux_head"]["conv"]["kernel"].shape == (3, 3, 1024, 256)
    assert params["stem"]["conv1"]["kernel"].shape == (3, 3, 3, 64)
    assert params["stem"]["conv2"]["kernel"].shape == (3, 3, 64, 128)


def test_output_stride_8_keeps_layers_3_and_4_at_60():
    _, out, trace = _trace(SegmentationNet(output_stride=8), (1, 473, 473, 3))
    assert out["logits"] == (1, 473, 473, 3)
    assert trace["layer2_features"] == (1, 60, 60, 512)
    assert trace["layer3_features"] == (1, 60, 60, 1024)
    assert trace["layer4_features"] == (1, 60, 60, 2048)


def test_resnet18_trace_and_widths():
    variables, out, trace = _trace(SegmentationNet(depth=18), (1, 473, 473, 3))
    assert out["logits"] == (1, 473, 473, 3)
    assert [trace[f"layer{i}_features"] for i in range(1, 5)] == [
        (1, 119, 119, 64), (1, 60, 60, 128), (1, 30, 30, 256), (1, 30, 30, 512)]
    assert variables["params"]["head"]["conv"]["kernel"].shape == (3, 3, 1024, 512)


def test_width_scales_every_width():
    variables, _, trace = _trace(SegmentationNet(width=16, aux_head=True), (1, 65, 65, 3))
    assert trace["stem_features"][-1] == 32
    assert [trace[f"layer{i}_features"][-1] for i in range(1, 5)] == [64, 128, 256, 512]
    assert variables["params"]["head"]["conv"]["kernel"].shape[-1] == 128
    assert variables["params"]["aux_head"]["conv"]["kernel"].shape[-1] == 64


def test_dilation_schedule_follows_torchvision():
    # torchvision _make_layer: the first block of a dilated layer keeps the previous dilation.
    assert dilation_schedule(32) == ((1, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1))
    assert dilation_schedule(16) == ((1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2))
    assert dilation_schedule(8) == ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4))
    with pytest.raises(ValueError, match="output_stride"):
        dilation_schedule(4)


# Independent parameter counts (weights + BN scale/bias; running stats are buffers, not params).
def _bottleneck_params(cin, width, projection):
    out = 4 * width
    n = cin * width + 2 * width + 9 * width * width + 2 * width + width * out + 2 * out
    return n + (cin * out + 2 * out if projection else 0)


def _basic_params(cin, width, projection):
    n = 9 * cin * width + 2 * width + 9 * width * width + 2 * width
    return n + (cin * width + 2 * width if projection else 0)


def _layers_params(cin, blocks, bottleneck):
    total = 0
    for i, n_blocks in enumerate(blocks):
        width = 64 * 2**i
        out = 4 * width if bottleneck else width
        for b in range(n_blocks):
            count = _bottleneck_params if bottleneck else _basic_params
            total += count(cin, width, projection=b == 0 and (i > 0 or cin != out))
            cin = out
    return total


@pytest.mark.parametrize(
    "depth,blocks,bottleneck,torchvision_total",
    [(50, (3, 4, 6, 3), True, 25_557_032), (18, (2, 2, 2, 2), False, 11_689_512)],
)
def test_resnet_layers_have_torchvision_parameter_count(depth, blocks, bottleneck, torchvision_total):
    # The formula reproduces torchvision's published totals (7x7 stem with BN and the 1000-way fc
    # added), so it counts ResNet layers 1-4 exactly.
    final = 2048 if bottleneck else 512
    stem_and_fc = 7 * 7 * 3 * 64 + 2 * 64 + final * 1000 + 1000
    assert _layers_params(64, blocks, bottleneck) + stem_and_fc == torchvision_total
    variables = jax.eval_shape(SegmentationNet(depth=depth).init, KEY, _spec((1, 33, 33, 3)))
    ours = sum(_num_params(variables["params"][f"layer{i}"]) for i in range(1, 5))
    # Our two-conv stem gives layer 1 128 input channels instead of torchvision's 64.
    assert ours == _layers_params(128, blocks, bottleneck)
    if bottleneck:
        assert ours - _layers_params(64, blocks, bottleneck) == 64 * 64 + 64 * 256


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
        y = _np_bn(_np_conv(y, p[f"conv{name}"]["kernel"], stride, dilation), p[f"norm{name}"], s[f"norm{name}"])
        y = np.maximum(y, 0) if n < len(convs) - 1 else y
    shortcut = x
    if "conv_downsample" in p:
        stride = max(c[1] for c in convs)
        shortcut = _np_bn(_np_conv(x, p["conv_downsample"]["kernel"], stride), p["norm_downsample"],
                          s["norm_downsample"])
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
    x = _x((2, 9, 9, cin))  # odd size: PyTorch padding puts one pixel on each side
    variables = _random_variables(block, x, seed=1)
    got = jax.jit(block.apply)(variables, x)
    if isinstance(block, Bottleneck):
        convs = [("1", 1, 1), ("2", strides, dilation), ("3", 1, 1)]
    else:
        convs = [("1", strides, dilation), ("2", 1, dilation)]
    want = _np_block(np.asarray(x, np.float64), variables, convs)
    assert got.shape == want.shape == (2, 5 if strides == 2 else 9, 5 if strides == 2 else 9, got.shape[-1])
    assert ("conv_downsample" in variables["params"]) == (strides != 1 or cin != got.shape[-1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_check_grads_bottleneck():
    with jax.enable_x64(True):
        block = Bottleneck(2, strides=2, dilation=1, param_dtype=jnp.float64)
        x = _x((1, 5, 5, 3), dtype=jnp.float64)
        variables = _random_variables(block, x, seed=2)

        @jax.jit
        def f(x, params):
            y, _ = block.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return y

        check_grads(f, (x, variables["params"]), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_convolutions_start_he_normal_on_fan_out():
    # As torchvision: std sqrt(2 / fan_out), fan_out = 9 * 32 for a 3x3 conv to 32 channels.
    variables = jax.jit(Bottleneck(32).init)(KEY, jnp.zeros((1, 5, 5, 128)))
    kernel = variables["params"]["conv2"]["kernel"]  # [3, 3, 32, 32]
    np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * 32)), rtol=0.05)
    np.testing.assert_allclose(np.mean(kernel), 0.0, atol=0.01)


def test_blocks_under_vmap_equal_the_batched_call():
    block = Bottleneck(2, strides=2, dilation=2)
    xs = _x((3, 1, 7, 7, 4))
    variables = _random_variables(block, xs[:, 0])
    per_sample = jax.jit(jax.vmap(lambda x: block.apply(variables, x)))(xs)  # eval mode: independent
    np.testing.assert_allclose(per_sample[:, 0], block.apply(variables, xs[:, 0]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Tiny real networks (random variables from eval_shape; one compiled program per configuration)
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tiny(**overrides):
    """A tiny model (32 x 32 inputs) and random variables of its shapes, cached per configuration."""
    model = SegmentationNet(**{**TINY, **overrides})
    return model, _random_variables(model, _spec((2, 32, 32, 3)))


@functools.lru_cache(maxsize=None)
def _eval_fn(**overrides):
    """Jitted eval-mode apply returning (outputs, intermediates incl. the head's low-res logits)."""
    model, _ = _tiny(**overrides)
    capture = lambda module, method: module.name == "head"  # noqa: E731
    return jax.jit(functools.partial(model.apply, mutable=["intermediates"], capture_intermediates=capture))


def test_tiny_forward_eval_and_train_with_dropout():
    model, variables = _tiny(aux_head=True)
    x = _x((2, 32, 32, 3))
    out, _ = _eval_fn(aux_head=True)(variables, x)
    assert out["logits"].shape == out["aux_logits"].shape == (2, 32, 32, 2)
    assert all(bool(jnp.isfinite(v).all()) for v in out.values())

    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    a, updates = train(variables, x, rngs={"dropout": jax.random.key(1)})
    b, _ = train(variables, x, rngs={"dropout": jax.random.key(2)})
    c, _ = train(variables, x, rngs={"dropout": jax.random.key(1)})
    assert a["logits"].shape == a["aux_logits"].shape == (2, 32, 32, 2)
    assert all(bool(jnp.isfinite(v).all()) for v in a.values())
    assert not np.allclose(out["logits"], a["logits"])  # batch statistics, not running averages
    # Train mode moves every running average.
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    assert all(jax.tree.leaves(jax.tree.map(lambda p, q: bool(jnp.any(p != q)), old, new)))
    # Dropout draws from the 'dropout' rng in both heads, and only from it.
    assert not np.allclose(a["logits"], b["logits"]) and not np.allclose(a["aux_logits"], b["aux_logits"])
    np.testing.assert_array_equal(a["logits"], c["logits"])
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, x)


def test_logits_are_align_corners_upsampling_of_the_head():
    _, variables = _tiny(aux_head=True)
    out, state = _eval_fn(aux_head=True)(variables, _x((2, 32, 32, 3)))
    low = np.asarray(state["intermediates"]["head"]["__call__"][0], np.float64)
    assert low.shape == (2, 2, 2, 2)  # 32 / output stride 16

    def axis_matrix(n_in, n_out):  # align_corners=True: output o samples o (n_in - 1) / (n_out - 1)
        src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
        return np.maximum(0, 1 - np.abs(src[:, None] - np.arange(n_in)[None, :]))

    m = axis_matrix(2, 32)
    np.testing.assert_allclose(out["logits"], np.einsum("ih,jw,bhwc->bijc", m, m, low), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["logits"][:, -1, -1], low[:, -1, -1], rtol=1e-6, atol=1e-6)


def test_dilation_changes_layer4_size_with_the_same_params():
    _, variables = _tiny(aux_head=True)
    x = _x((2, 32, 32, 3))
    sizes = {}
    for os in (16, 8):
        # Dilation adds no parameters: the output-stride-16 variables fit output stride 8.
        out, state = _eval_fn(aux_head=True, output_stride=os)(variables, x)
        assert out["logits"].shape == (2, 32, 32, 2) and bool(jnp.isfinite(out["logits"]).all())
        feats = state["intermediates"]
        sizes[os] = [feats[f"layer{i}_features"][0].shape[1:3] for i in (2, 3, 4)]
    assert sizes == {16: [(4, 4), (2, 2), (2, 2)], 8: [(4, 4), (4, 4), (4, 4)]}


def test_ablation_flags_change_the_param_tree():
    trees = {}
    for flags in [dict(), dict(use_cbam=False), dict(use_ppm=False), dict(aux_head=True)]:
        variables = jax.eval_shape(SegmentationNet(**TINY, **flags).init, KEY, _spec((1, 32, 32, 3)))
        trees[tuple(flags)] = variables["params"]
    full = trees[()]
    assert {"stem", "cbam_stem", "layer1", "layer2", "layer3", "layer4", "cbam", "ppm", "head"} == set(full)
    assert set(trees[("use_cbam",)]) == set(full) - {"cbam_stem", "cbam"}
    assert set(trees[("use_ppm",)]) == set(full) - {"ppm"}
    assert set(trees[("aux_head",)]) == set(full) | {"aux_head"}
    # Without PPM the head reads layer 4 (32 channels) instead of the 64-channel concatenation.
    assert full["head"]["conv"]["kernel"].shape == (3, 3, 64, 32)
    assert trees[("use_ppm",)]["head"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    assert trees[("aux_head",)]["aux_head"]["conv"]["kernel"].shape == (3, 3, 16, 16)


def test_ablated_model_runs_and_sows_no_attention():
    _, variables = _tiny(use_cbam=False, use_ppm=False)
    out, state = _eval_fn(use_cbam=False, use_ppm=False)(variables, _x((2, 32, 32, 3)))
    assert out["logits"].shape == (2, 32, 32, 2) and bool(jnp.isfinite(out["logits"]).all())
    assert not any("attention" in k for k in state["intermediates"])


def test_bfloat16_forward_is_finite():
    model = SegmentationNet(**TINY, aux_head=True, dtype=jnp.bfloat16)
    _, variables = _tiny(aux_head=True)
    out = jax.jit(model.apply)(variables, _x((2, 32, 32, 3), dtype=jnp.bfloat16))
    assert out["logits"].dtype == out["aux_logits"].dtype == jnp.bfloat16
    assert all(bool(jnp.isfinite(v.astype(jnp.float32)).all()) for v in out.values())
    stored = jax.eval_shape(SegmentationNet(**TINY, param_dtype=jnp.bfloat16).init, KEY, _spec((1, 32, 32, 3)))
    assert {leaf.dtype for leaf in jax.tree.leaves(stored["params"])} == {jnp.dtype(jnp.bfloat16)}


def test_volumes_3d():
    model = SegmentationNet(depth=18, width=2, num_classes=2)
    x = _x((1, 8, 8, 8, 1))
    variables = _random_variables(model, x)
    assert variables["params"]["stem"]["conv1"]["kernel"].shape == (3, 3, 3, 1, 2)
    out = jax.jit(model.apply)(variables, x)
    assert out["logits"].shape == (1, 8, 8, 8, 2) and bool(jnp.isfinite(out["logits"]).all())


def test_bad_configuration_and_input_raise():
    x = _spec((1, 32, 32, 3))
    with pytest.raises(ValueError, match="depth"):
        jax.eval_shape(SegmentationNet(depth=42).init, KEY, x)
    with pytest.raises(ValueError, match="output_stride"):
        jax.eval_shape(SegmentationNet(output_stride=4).init, KEY, x)
    with pytest.raises(ValueError, match="shape"):
        jax.eval_shape(SegmentationNet(**TINY).init, KEY, _spec((32, 32, 3)))


def test_a_few_steps_reduce_the_loss_on_a_toy_problem():
    # Two classes: bright discs (1) on a dark noisy background (0), at random positions.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    centres = rng.uniform(8, 24, size=(4, 2))
    labels = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < 36 for cy, cx in centres]).astype(np.int32)
    images = jnp.asarray(labels[..., None] + 0.3 * rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(labels)

    model, variables = _tiny()
    optimizer = optax.adam(3e-3)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))

    @jax.jit
    def step(state, key):
        params, stats, opt = state

        def loss_fn(params):
            out, updates = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                                       mutable=["batch_stats"], rngs={"dropout": key})
            ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean()
            return ce, updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = optimizer.update(grads, opt, params)
        return (optax.apply_updates(params, updates), stats, opt), loss

    losses = []
    for i in range(12):
        state, loss = step(state, jax.random.fold_in(KEY, i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
