"""VGG16-CAM: layout and parameter count from the architecture's formula, module insertion,
the CAM identity of the GAP head, training, bfloat16, 3-D."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed.layers import ThresholdSuppression
from jaxmed.models.vgg_cam import CONV_NAMES, VGGCAM, cam_weights

KEY = jax.random.key(0)
TINY = dict(widths=(4, 4, 8, 8, 8), conv6_width=64)
TWO = ("conv4_3", "conv5_3")


@pytest.fixture(scope="module")
def tiny():
    """A tiny two-module model and its variables, initialised once (jitted: eager init compiles
    every initialiser separately)."""
    model = VGGCAM(3, modules=TWO, **TINY)
    return model, jax.jit(model.init)(KEY, jnp.zeros((1, 32, 32, 3)))


def _images(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _vgg16_cam_params(num_classes, widths=(64, 128, 256, 512, 512), k6=1024, suppressed=()):
    """Parameters of VGG16-CAM written out: 3×3 convs with bias, conv6, FC, and per
    suppression module (C channels) two FCs 2C→C, C→2C and a 1×1 conv 2C→C, all with bias."""
    convs = [2, 2, 3, 3, 3]
    total, c_in = 0, 3
    for n, w in zip(convs, widths):
        for _ in range(n):
            total += 9 * c_in * w + w
            c_in = w
    total += 9 * c_in * k6 + k6 + k6 * num_classes + num_classes
    for c in suppressed:
        total += (2 * c * c + c) + (c * 2 * c + 2 * c) + (2 * c * c + c)
    return total


def test_full_width_shapes_and_parameter_count():
    model = VGGCAM(num_classes=200)
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(KEY, jnp.zeros((2, 224, 224, 3))))
    assert out["logits"].shape == (2, 200)
    assert out["features"].shape == (2, 14, 14, 1024)
    assert _count(variables["params"]) == _vgg16_cam_params(200)
    # Torchvision's VGG16 convs (14,714,688) + conv6 + FC: the published CAM variant's size.
    assert _vgg16_cam_params(200) == 14_714_688 + (9 * 512 * 1024 + 1024) + (1024 * 200 + 200)

    two = VGGCAM(num_classes=200, modules=("conv4_3", "conv5_3"))
    variables = jax.eval_shape(two.init, KEY, jnp.zeros((1, 224, 224, 3)))
    assert _count(variables["params"]) == _vgg16_cam_params(200, suppressed=(512, 512))


def test_layer_names_and_pool_positions():
    """Named conv blocks, 2×2 pools between stages only (224 -> 14), he-normal fan-out init."""
    shapes = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and len(context.module.scope.path) == 1:
            shapes[context.module.scope.path[0]] = out.shape
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(VGGCAM(10).init, KEY, jnp.zeros((1, 224, 224, 3)))
    side = {1: 224, 2: 112, 3: 56, 4: 28, 5: 14, 6: 14}
    for name in CONV_NAMES:
        stage = int(name[4])
        assert shapes[name][1:3] == (side[stage], side[stage]), name
    assert shapes["conv6"] == (1, 14, 14, 1024)
    assert list(shapes) == [*CONV_NAMES, "classifier"]


def test_initialisation_follows_wsolevaluation(tiny):
    _, variables = tiny
    kernel = np.asarray(variables["params"]["conv6"]["conv"]["kernel"])  # [3, 3, 8, 64]
    assert abs(kernel.std() / math.sqrt(2 / (9 * 64)) - 1) < 0.06  # He normal over fan_out
    assert np.all(np.asarray(variables["params"]["conv6"]["conv"]["bias"]) == 0)
    fc = np.asarray(variables["params"]["classifier"]["kernel"])  # [64, 3]
    assert abs(fc.std() / 0.01 - 1) < 0.2


def test_logits_are_the_mean_of_the_cam_plus_bias(tiny):
    """GAP + Dense head: logit_c = mean over positions of Σ_k W[k, c] A_k + b_c."""
    model, variables = tiny
    out = model.apply(variables, _images((2, 32, 32, 3), seed=1))
    a = np.asarray(out["features"], np.float64)  # [B, 2, 2, K]
    w = np.asarray(cam_weights(variables), np.float64)
    assert w.shape == (64, 3)
    maps = np.einsum("bhwk,kc->bchw", a, w)
    expected = maps.mean(axis=(2, 3)) + np.asarray(variables["params"]["classifier"]["bias"])
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)
    assert np.all(a >= 0)


def test_modules_inserted_after_the_named_convs(tiny):
    model, variables = tiny
    x = _images((2, 32, 32, 3), seed=2)
    params = variables["params"]
    assert {k for k in params if k.endswith("_suppression")} == {
        "conv4_3_suppression",
        "conv5_3_suppression",
    }
    assert params["conv4_3_suppression"]["project"]["kernel"].shape == (1, 1, 16, 8)

    # The module consumes the named conv's rectified output, before the pool of stage 4.
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            seen["/".join(context.module.scope.path)] = (args[0], out)
        return out

    with nn.intercept_methods(record):
        model.apply(variables, x)
    for name in ("conv4_3", "conv5_3"):
        np.testing.assert_array_equal(seen[f"{name}_suppression"][0], seen[name][1])
    assert seen["conv4_3_suppression"][1].shape == (2, 4, 4, 8)
    pooled = nn.max_pool(seen["conv4_3_suppression"][1], (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(seen["conv5_1"][0], pooled)

    # Same conv weights without the modules: a different network output.
    baseline = {"params": {k: v for k, v in params.items() if not k.endswith("_suppression")}}
    plain = VGGCAM(3, **TINY).apply(baseline, x)
    assert not np.allclose(plain["features"], model.apply(variables, x)["features"])


def test_suppression_parameters_are_passed_through(tiny):
    _, variables = tiny
    model = VGGCAM(3, modules=TWO, cr=0.6, alpha=0.5, t=0.2, **TINY)
    modules = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, ThresholdSuppression):
            modules.append(context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, jnp.ones((1, 32, 32, 3)))
    assert [(m.cr, m.alpha, m.t) for m in modules] == [(0.6, 0.5, 0.2)] * 2


def test_bad_module_name_raises():
    with pytest.raises(ValueError, match="conv4_4.*valid names: conv1_1, conv1_2"):
        jax.eval_shape(VGGCAM(3, modules=("conv4_4",), **TINY).init, KEY, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="5 stage widths"):
        jax.eval_shape(VGGCAM(3, widths=(4, 4), conv6_width=8).init, KEY, jnp.zeros((1, 32, 32, 3)))


def _toy_batch(rng, n=16, size=32):
    """Class 0: a bright square in the left half; class 1: in the right half."""
    x = rng.normal(0, 0.1, size=(n, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        r, c = rng.integers(0, size - 8), rng.integers(0, size // 2 - 8) + y[i] * size // 2
        x[i, r:r + 8, c:c + 8] += 1.0
    return jnp.asarray(x), jnp.asarray(y)


def test_tiny_model_trains():
    model = VGGCAM(2, modules=("conv5_3",), widths=(4, 4, 8, 8, 8), conv6_width=8)
    x, y = _toy_batch(np.random.default_rng(0))
    params = jax.jit(model.init)(KEY, x)["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt = carry
            def loss_fn(p):
                logits = model.apply({"params": p}, x, train=True)["logits"]
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), loss

        return jax.lax.scan(step, (params, tx.init(params)), length=25)[1]

    losses = np.asarray(train(params))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses


def test_bfloat16_forward_is_finite(tiny):
    _, variables = tiny  # parameters stay float32 whatever the computation dtype
    model = VGGCAM(3, modules=TWO, dtype=jnp.bfloat16, **TINY)
    out = model.apply(variables, _images((2, 32, 32, 3), seed=3, dtype=jnp.bfloat16))
    assert out["logits"].dtype == jnp.bfloat16 and out["features"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out["logits"], np.float32)))


def test_3d_batch_norm_jit_and_vmap():
    model = VGGCAM(2, modules=("conv5_3",), batch_norm=True, widths=(4, 4, 8, 8, 8), conv6_width=8)
    x = _images((2, 16, 16, 16, 1), seed=4)
    variables = jax.jit(model.init)(KEY, x)
    assert "bias" not in variables["params"]["conv1_1"]["conv"]  # BN supplies the shift

    @jax.jit
    def run(variables, x):  # one compilation for the three uses
        per_sample = jax.vmap(lambda xi: model.apply(variables, xi[None])["logits"][0])(x)
        _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply(variables, x), per_sample, state

    out, per_sample, state = run(variables, x)
    assert out["features"].shape == (2, 1, 1, 1, 8) and out["logits"].shape == (2, 2)
    np.testing.assert_allclose(per_sample, out["logits"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(state["batch_stats"]["conv1_1"]["bn"]["mean"], 0)
