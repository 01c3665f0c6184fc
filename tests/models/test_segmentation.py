"""Segmentation network: the original design's trace at full size (eval_shape only), its ResNet
layers' parameter counts against torchvision's, and tiny real forwards, ablations and a few
optimisation steps. The ResNet blocks themselves are tested in `test_resnet.py`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed.models.segmentation import SegmentationNet
from tests.models.test_resnet import inputs, num_params, random_variables, spec

KEY = jax.random.key(0)
TINY = dict(depth=18, width=4, num_classes=2)


def _trace(model, shape):
    """Output and sown intermediate shapes of `model` on `shape`, without computing anything."""
    x = spec(shape)
    variables = jax.eval_shape(model.init, KEY, x)
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, x
    )
    shapes = {k: v[0].shape for k, v in state["intermediates"].items()}
    return variables, {k: v.shape for k, v in out.items()}, shapes


# ----------------------------------------------------------------------------
# Full size, shapes only
# ----------------------------------------------------------------------------

ORIGINAL_TRACE = {
    "stem_features": (1, 237, 237, 128),
    "pool_features": (1, 119, 119, 128),
    "layer1_features": (1, 119, 119, 256),
    "layer2_features": (1, 60, 60, 512),
    "layer3_features": (1, 30, 30, 1024),
    "layer4_features": (1, 30, 30, 2048),
    "cbam_stem_attention": (1, 119, 119, 1),
    "cbam_attention": (1, 30, 30, 1),
}


def test_default_configuration_reproduces_the_original_trace():
    model = SegmentationNet(aux_head=True)
    assert (model.depth, model.width, model.output_stride, model.num_classes) == (50, 64, 16, 3)
    variables, out, trace = _trace(model, (1, 473, 473, 3))
    assert out == {"logits": (1, 473, 473, 3), "aux_logits": (1, 473, 473, 3)}
    assert trace == ORIGINAL_TRACE
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
def test_resnet_layers_have_torchvision_parameter_count(
    depth, blocks, bottleneck, torchvision_total
):
    # The formula reproduces torchvision's published totals (7x7 stem with BN and the 1000-way fc
    # added), so it counts ResNet layers 1-4 exactly.
    final = 2048 if bottleneck else 512
    stem_and_fc = 7 * 7 * 3 * 64 + 2 * 64 + final * 1000 + 1000
    assert _layers_params(64, blocks, bottleneck) + stem_and_fc == torchvision_total
    variables = jax.eval_shape(SegmentationNet(depth=depth).init, KEY, spec((1, 33, 33, 3)))
    ours = sum(num_params(variables["params"][f"layer{i}"]) for i in range(1, 5))
    # Our two-conv stem gives layer 1 128 input channels instead of torchvision's 64.
    assert ours == _layers_params(128, blocks, bottleneck)
    if bottleneck:
        assert ours - _layers_params(64, blocks, bottleneck) == 64 * 64 + 64 * 256


# ----------------------------------------------------------------------------
# Tiny real networks (random variables from eval_shape; one compiled program per configuration)
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tiny(**overrides):
    """A tiny model (32 x 32 inputs) and random variables of its shapes, cached per
    configuration."""
    model = SegmentationNet(**{**TINY, **overrides})
    return model, random_variables(model, spec((2, 32, 32, 3)))


@functools.lru_cache(maxsize=None)
def _eval_fn(**overrides):
    """Jitted eval-mode apply returning (outputs, intermediates incl. the head's low-res logits)."""
    model, _ = _tiny(**overrides)
    capture = lambda module, method: module.name == "head"  # noqa: E731
    return jax.jit(
        functools.partial(model.apply, mutable=["intermediates"], capture_intermediates=capture)
    )


def test_tiny_forward_eval_and_train_with_dropout():
    model, variables = _tiny(aux_head=True)
    x = inputs((2, 32, 32, 3))
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
    assert not np.allclose(a["logits"], b["logits"])
    assert not np.allclose(a["aux_logits"], b["aux_logits"])
    np.testing.assert_array_equal(a["logits"], c["logits"])
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(
            functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, x
        )


def test_logits_are_align_corners_upsampling_of_the_head():
    _, variables = _tiny(aux_head=True)
    out, state = _eval_fn(aux_head=True)(variables, inputs((2, 32, 32, 3)))
    low = np.asarray(state["intermediates"]["head"]["__call__"][0], np.float64)
    assert low.shape == (2, 2, 2, 2)  # 32 / output stride 16

    def axis_matrix(n_in, n_out):  # align_corners=True: output o samples o (n_in - 1) / (n_out - 1)
        src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
        return np.maximum(0, 1 - np.abs(src[:, None] - np.arange(n_in)[None, :]))

    m = axis_matrix(2, 32)
    np.testing.assert_allclose(
        out["logits"], np.einsum("ih,jw,bhwc->bijc", m, m, low), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(out["logits"][:, -1, -1], low[:, -1, -1], rtol=1e-6, atol=1e-6)


def test_dilation_changes_layer4_size_with_the_same_params():
    _, variables = _tiny(aux_head=True)
    x = inputs((2, 32, 32, 3))
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
        variables = jax.eval_shape(SegmentationNet(**TINY, **flags).init, KEY, spec((1, 32, 32, 3)))
        trees[tuple(flags)] = variables["params"]
    full = trees[()]
    parts = {"stem", "cbam_stem", "layer1", "layer2", "layer3", "layer4", "cbam", "ppm", "head"}
    assert set(full) == parts
    assert set(trees[("use_cbam",)]) == set(full) - {"cbam_stem", "cbam"}
    assert set(trees[("use_ppm",)]) == set(full) - {"ppm"}
    assert set(trees[("aux_head",)]) == set(full) | {"aux_head"}
    # Without PPM the head reads layer 4 (32 channels) instead of the 64-channel concatenation.
    assert full["head"]["conv"]["kernel"].shape == (3, 3, 64, 32)
    assert trees[("use_ppm",)]["head"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    assert trees[("aux_head",)]["aux_head"]["conv"]["kernel"].shape == (3, 3, 16, 16)


def test_ablated_model_runs_and_sows_no_attention():
    _, variables = _tiny(use_cbam=False, use_ppm=False)
    out, state = _eval_fn(use_cbam=False, use_ppm=False)(variables, inputs((2, 32, 32, 3)))
    assert out["logits"].shape == (2, 32, 32, 2) and bool(jnp.isfinite(out["logits"]).all())
    assert not any("attention" in k for k in state["intermediates"])


def test_bfloat16_forward_is_finite():
    model = SegmentationNet(**TINY, aux_head=True, dtype=jnp.bfloat16)
    _, variables = _tiny(aux_head=True)
    out = jax.jit(model.apply)(variables, inputs((2, 32, 32, 3), dtype=jnp.bfloat16))
    assert out["logits"].dtype == out["aux_logits"].dtype == jnp.bfloat16
    assert all(bool(jnp.isfinite(v.astype(jnp.float32)).all()) for v in out.values())
    stored = jax.eval_shape(
        SegmentationNet(**TINY, param_dtype=jnp.bfloat16).init, KEY, spec((1, 32, 32, 3))
    )
    assert {leaf.dtype for leaf in jax.tree.leaves(stored["params"])} == {jnp.dtype(jnp.bfloat16)}


def test_volumes_3d():
    model = SegmentationNet(depth=18, width=2, num_classes=2)
    x = inputs((1, 8, 8, 8, 1))
    variables = random_variables(model, x)
    assert variables["params"]["stem"]["conv1"]["kernel"].shape == (3, 3, 3, 1, 2)
    out = jax.jit(model.apply)(variables, x)
    assert out["logits"].shape == (1, 8, 8, 8, 2) and bool(jnp.isfinite(out["logits"]).all())


def test_bad_configuration_and_input_raise():
    x = spec((1, 32, 32, 3))
    with pytest.raises(ValueError, match="depth"):
        jax.eval_shape(SegmentationNet(depth=42).init, KEY, x)
    with pytest.raises(ValueError, match="output_stride"):
        jax.eval_shape(SegmentationNet(output_stride=4).init, KEY, x)
    with pytest.raises(ValueError, match="shape"):
        jax.eval_shape(SegmentationNet(**TINY).init, KEY, spec((32, 32, 3)))


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
