"""Mapping-GAN networks: shapes at full size (eval_shape), tiny real forwards, TT/dense parity,
per-sample independence of the critic, and finite gradients of the losses."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.layers import Conv, TTConv, TTDense
from jaxmed.losses import critic_loss, generator_loss, gradient_penalty
from jaxmed.models.mapping_gan import (
    Critic,
    TinyCritic,
    TinyUNet,
    UNet,
    _max_pool_2x,
    critic_probability,
    mapped,
    tt_modes,
)

KEY = jax.random.key(0)


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape), jnp.float32)


def _random_variables(model, x, seed=0):
    """Variables of `model`'s shapes filled from NumPy (no initialiser compiles: tests stay fast).

    Kernels and TT cores get std 1/sqrt(fan-in) (a TT core's fan-in: all but its last axis), norm
    scales 1, biases small; `test_critic_and_unet_initialise` covers the real initialisers.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)
        fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, KEY, x))


def _num_params(variables):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


# ----------------------------------------------------------------------------
# tt_modes
# ----------------------------------------------------------------------------


def _brute_force_modes(n, d):
    """All non-decreasing d-tuples of divisors with product n; smallest sum, then smallest max."""
    divisors = [f for f in range(1, n + 1) if n % f == 0]
    cands = [c for c in itertools.combinations_with_replacement(divisors, d) if np.prod(c) == n]
    return min(cands, key=lambda c: (sum(c), c[-1]))


def test_tt_modes_examples_and_brute_force():
    assert tt_modes(40, 2) == (5, 8)
    assert tt_modes(48, 3) == (3, 4, 4)
    assert tt_modes(17, 2) == (1, 17)
    for n, d in itertools.product(range(1, 130), (1, 2, 3)):
        assert tt_modes(n, d) == _brute_force_modes(n, d), (n, d)


# ----------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 112, 112, 1), (2, 32, 32, 32, 1), (2, 32, 32, 32, 2)])
def test_unet_full_size_output_has_input_shape(shape):
    model = UNet(features=(16, 32, 64, 128))
    variables = jax.eval_shape(model.init, KEY, _spec(shape))
    out = jax.eval_shape(model.apply, variables, _spec(shape))
    assert out.shape == shape and out.dtype == jnp.float32
    p = variables["params"]
    nsp, c = len(shape) - 2, shape[-1]
    # Encoder level 0, transposed conv up to level 0, skip concatenation (16 + 16), output conv.
    assert p["down0"]["conv0"]["kernel"].shape == (3,) * nsp + (c, 16)
    assert p["down3"]["conv1"]["kernel"].shape == (3,) * nsp + (128, 128)
    assert p["up2_upsample"]["kernel"].shape == (2,) * nsp + (128, 64)
    assert p["up0"]["conv0"]["kernel"].shape == (3,) * nsp + (32, 16)
    assert p["key_feature_map"]["kernel"].shape == (3,) * nsp + (16, c)


def test_unet_total_downsampling_and_bad_size():
    assert UNet().total_downsampling == 8
    assert UNet(features=(4, 8, 16)).total_downsampling == 4
    with pytest.raises(ValueError, match="divisible by 8"):
        jax.eval_shape(UNet().init, KEY, _spec((1, 36, 32, 32, 1)))
    with pytest.raises(ValueError, match="norm"):
        jax.eval_shape(UNet(norm="group").init, KEY, _spec((1, 8, 8, 1)))


@pytest.mark.parametrize(
    "norm,shape", [("batch", (2, 8, 8, 1)), ("layer", (2, 4, 4, 4, 2)), (None, (2, 4, 8, 1))]
)
def test_unet_tiny_forward(norm, shape):
    model, x = TinyUNet(norm=norm), _x(shape)
    variables = _random_variables(model, x)
    m = jax.jit(model.apply)(variables, x)
    assert m.shape == x.shape and np.all(np.isfinite(m))
    np.testing.assert_array_equal(mapped(x, m), np.asarray(x) + np.asarray(m))
    if norm == "batch":
        m_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        assert m_train.shape == x.shape and np.all(np.isfinite(m_train))
        old, new = variables["batch_stats"], updates["batch_stats"]
        assert jax.tree.structure(new) == jax.tree.structure(old)
    m16 = model.apply(variables, x.astype(jnp.bfloat16))
    assert np.all(np.isfinite(np.asarray(m16, np.float32)))
    m16 = TinyUNet(norm=norm, dtype=jnp.bfloat16).apply(variables, x)
    assert m16.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(m16, np.float32)))


def _np_conv_same(x, kernel, bias):
    """2-D 'SAME' 3x3 convolution from its definition (cross-correlation, as lax).

    x: (B, H, W, C)."""
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i, j in itertools.product(range(3), range(3)):
        out += np.einsum("bhwc,co->bhwo", xp[:, i : i + h, j : j + w], kernel[i, j])
    return out + bias


def test_unet_single_level_is_three_convolutions():
    """Depth 1, no norm: M = conv(relu(conv(relu(conv(x))))), checked against NumPy."""
    model, x = UNet(features=(3,), norm=None), _x((2, 5, 6, 2), seed=3)
    variables = _random_variables(model, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = np.asarray(x, np.float64)
    for conv in (p["down0"]["conv0"], p["down0"]["conv1"]):
        h = np.maximum(_np_conv_same(h, conv["kernel"], conv["bias"]), 0)
    expected = _np_conv_same(h, p["key_feature_map"]["kernel"], p["key_feature_map"]["bias"])
    np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Critic
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 112, 112, 1), (2, 32, 32, 32, 1)])
def test_critic_full_size_scores_and_parameter_counts(shape):
    counts = {}
    for kind in ("tt", "dense"):
        model = Critic(kind=kind)
        variables = jax.eval_shape(model.init, KEY, _spec(shape))
        score = jax.eval_shape(model.apply, variables, _spec(shape))
        assert score.shape == (shape[0],) and score.dtype == jnp.float32
        counts[kind] = _num_params(variables)
    assert counts["tt"] < counts["dense"] / 4
    if len(shape) == 5:
        assert counts["dense"] < 400_000  # sized for a 32^3 volume on CPU


@pytest.mark.parametrize("kind,downsample,forward,shape", [
    ("tt", "conv", "cores", (3, 8, 8, 1)), ("dense", "pool", "auto", (3, 8, 8, 1)),
    ("tt", "pool", "auto", (2, 8, 8, 8, 2)), ("dense", "conv", "auto", (2, 8, 8, 8, 2)),
])
def test_tiny_critic_forward(kind, downsample, forward, shape):
    model, x = TinyCritic(kind=kind, downsample=downsample, tt_forward=forward), _x(shape)
    variables = _random_variables(model, x)
    score = jax.jit(model.apply)(variables, x)
    assert score.shape == (shape[0],) and np.all(np.isfinite(score))
    if kind == "tt":
        s16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(
            variables, x.astype(jnp.bfloat16))
        assert s16.dtype == jnp.float32 and np.all(np.isfinite(s16))


def _layer_shapes(model, x):
    """{module path: (module type, input shape, output shape)} of every conv/dense-like layer."""
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        layer_types = (TTConv, TTDense, Conv, nn.Conv, nn.Dense)
        if context.method_name == "__call__" and isinstance(context.module, layer_types):
            path = "/".join(context.module.scope.path)
            seen[path] = (type(context.module), args[0].shape, out.shape)
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(model.init, KEY, x)
    return seen


@pytest.mark.parametrize(
    "model_fn,shape", [(Critic, (2, 32, 32, 32, 1)), (TinyCritic, (2, 8, 8, 1))]
)
def test_tt_layers_have_the_shapes_of_their_dense_counterparts(model_fn, shape):
    tt = _layer_shapes(model_fn(kind="tt"), _spec(shape))
    dense = _layer_shapes(model_fn(kind="dense"), _spec(shape))
    assert tt.keys() == dense.keys()
    factorised = [k for k, (t, _, _) in tt.items() if t in (TTConv, TTDense)]
    # Every dense-block / transition conv and both head layers are TT; stem and GSoP are not.
    assert sorted(factorised) == sorted(
        k for k in tt if k.endswith("_conv") or k.startswith("head_")
    )
    assert "head_hidden" in factorised and "head_score" in factorised
    for name in tt:
        assert tt[name][1:] == dense[name][1:], name
        expected = {TTConv: Conv, TTDense: nn.Dense}.get(tt[name][0], tt[name][0])
        assert dense[name][0] is expected, name


def test_layer_norm_critic_scores_each_sample_alone():
    x = _x((4, 8, 8, 1), seed=5)
    # Same batch size throughout (one compile): sample 0 with different companions, and a
    # permutation.
    others = jnp.stack([x[0], 5.0 * x[1], -x[3], x[2]])
    for kind in ("tt", "dense"):
        model = TinyCritic(kind=kind, norm="layer")
        variables = _random_variables(model, x)
        apply = jax.jit(model.apply)
        scores, scores_other = apply(variables, x), apply(variables, others)
        np.testing.assert_allclose(
            scores_other[jnp.array([0, 3])], scores[jnp.array([0, 2])], rtol=1e-5, atol=1e-6
        )
    # Contrast: training-mode BatchNorm mixes the batch (why it is not the default).
    model = TinyCritic(norm="batch")
    variables = _random_variables(model, x)
    apply = jax.jit(lambda b: model.apply(variables, b, train=True, mutable=["batch_stats"]))
    (scores, updates), (scores_other, _) = apply(x), apply(others)
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree.structure(new) == jax.tree.structure(old)
    assert abs(float(scores[0]) - float(scores_other[0])) > 1e-4


def test_critic_rejects_unfactorisable_channels():
    with pytest.raises(ValueError, match="factorisation"):
        jax.eval_shape(TinyCritic(growth_rate=5).init, KEY, _spec((1, 8, 8, 1)))
    jax.eval_shape(TinyCritic(growth_rate=5, kind="dense").init, KEY, _spec((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="kind"):
        jax.eval_shape(TinyCritic(kind="cp").init, KEY, _spec((1, 8, 8, 1)))


def test_critic_probability_is_sigmoid_for_reporting():
    s = jnp.array([-3.0, 0.0, 2.5])
    np.testing.assert_allclose(critic_probability(s), 1 / (1 + np.exp(-np.asarray(s))), rtol=1e-6)


def test_loss_gradients_wrt_both_networks_are_finite():
    pos, neg = _x((2, 8, 8, 1), seed=1), _x((2, 8, 8, 1), seed=2)
    # Fewer ops: double-backward compiles are slow.
    gen, critic = TinyUNet(), TinyCritic(layers_per_block=1)
    g_vars, c_vars = _random_variables(gen, pos), _random_variables(critic, neg, seed=1)

    def critic_objective(c_params):
        score = lambda v: critic.apply({"params": c_params}, v)  # noqa: E731
        y = mapped(pos, gen.apply(g_vars, pos))
        penalty = gradient_penalty(score, neg, y, jax.random.key(2))
        return critic_loss(score(neg), score(y)) + penalty

    def generator_objective(g_params):
        m, _ = gen.apply({**g_vars, "params": g_params}, pos, train=True, mutable=["batch_stats"])
        return generator_loss(critic.apply(c_vars, mapped(pos, m)), m, l1_weight=100.0)[0]

    for objective, params in (
        (critic_objective, c_vars["params"]),
        (generator_objective, g_vars["params"]),
    ):
        grads = jax.jit(jax.grad(objective))(params)
        leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
        assert all(np.all(np.isfinite(g)) for g in leaves)
        assert sum(float(np.abs(g).sum()) for g in leaves) > 0


def test_critic_and_unet_initialise():
    """The real initialisers (the other tests fill parameters from NumPy): shapes and finite
    forward."""
    for model, x in ((TinyCritic(), _x((2, 8, 8, 1))), (TinyUNet(), _x((2, 4, 4, 1)))):
        variables = jax.jit(model.init)(KEY, x)
        shapes = jax.eval_shape(model.init, KEY, x)
        assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, shapes)
        out = jax.jit(model.apply)(variables, x)
        assert np.all(np.isfinite(out)) and float(np.std(out)) > 0


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (2, 4, 2, 6, 3)])
def test_unet_max_pool_equals_flax(shape):
    x = _x(shape, seed=3)
    window = (2,) * (len(shape) - 2)
    np.testing.assert_array_equal(
        np.asarray(_max_pool_2x(x)), np.asarray(nn.max_pool(x, window, strides=window))
    )
