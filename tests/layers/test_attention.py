"""CBAM gates against NumPy references written from the formulas of Woo et al. (ECCV 2018)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmed.layers import CBAM, ChannelAttention, SpatialAttention

EPS = 1e-5  # BatchNorm epsilon of the layer conventions
SHAPES = {"2d": (2, 5, 6, 8), "3d": (2, 3, 4, 5, 8)}


# --- NumPy references (float64), shared with test_second_order --------------------------------


def randomise_variables(variables, seed=0):
    """Replace every parameter and batch statistic by a random value (variances positive)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        shape, dtype = np.shape(leaf), np.asarray(leaf).dtype
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, shape), dtype)
        return jnp.asarray(rng.normal(0.0, 0.7, shape), dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def np_batch_norm(z, params, stats, train, feature_axis=-1):
    """BatchNorm: batch statistics (biased variance) in training, running statistics otherwise."""
    axes = tuple(a for a in range(z.ndim) if a != feature_axis % z.ndim)
    shape = [1] * z.ndim
    shape[feature_axis] = z.shape[feature_axis]
    if train:
        mean, var = z.mean(axis=axes, keepdims=True), z.var(axis=axes, keepdims=True)
    else:
        mean, var = (np.asarray(stats[k], np.float64).reshape(shape) for k in ("mean", "var"))
    scale, bias = (np.asarray(params[k], np.float64).reshape(shape) for k in ("scale", "bias"))
    return (z - mean) / np.sqrt(var + EPS) * scale + bias


def np_sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


def np_dense(t, params):
    return t @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)


def np_conv_same(x, kernel):
    """Cross-correlation with SAME zero padding, stride 1: x (B, *S, I), kernel (*K, I, O)."""
    ks = kernel.shape[:-2]
    spatial = x.shape[1:-1]
    pads = [(0, 0)] + [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks] + [(0, 0)]
    xp = np.pad(x, pads)
    out = np.zeros(x.shape[:-1] + (kernel.shape[-1],))
    for offset in itertools.product(*(range(k) for k in ks)):
        window = xp[(slice(None),) + tuple(slice(o, o + s) for o, s in zip(offset, spatial))]
        out += window @ kernel[offset]
    return out


def np_channel_attention(x, p):
    axes = tuple(range(1, x.ndim - 1))

    def mlp(v):
        return np_dense(np.maximum(np_dense(v, p["hidden"]), 0.0), p["out"])

    a = np_sigmoid(mlp(x.mean(axis=axes)) + mlp(x.max(axis=axes)))  # (B, C)
    return x * a.reshape(a.shape[0], *(1,) * len(axes), -1), a


def np_spatial_attention(x, p, stats, train, use_norm=True, max_first=True):
    pools = [x.max(axis=-1, keepdims=True), x.mean(axis=-1, keepdims=True)]
    pooled = np.concatenate(pools if max_first else pools[::-1], axis=-1)
    logits = np_conv_same(pooled, np.asarray(p["conv"]["kernel"], np.float64))
    if use_norm:
        logits = np_batch_norm(logits, p["norm"], stats and stats["norm"], train)
    a = np_sigmoid(logits)  # (B, *S, 1)
    return x * a, a


def _x(shape, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def init(module, x):
    return module.init(jax.random.key(0), x)


def _run(module, variables, x, train, **kw):
    """Apply in train (returning updated batch statistics too) or eval mode."""
    if train:
        return module.apply(variables, x, train=True, mutable=["batch_stats"], **kw)
    return module.apply(variables, x, **kw), None


# --- ChannelAttention ---------------------------------------------------------------------------


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_channel_attention_matches_numpy(dims):
    x = _x(SHAPES[dims])
    module = ChannelAttention(reduction=4)
    v = randomise_variables(init(module, x))
    y, a = module.apply(v, x, return_attention=True)
    y_ref, a_ref = np_channel_attention(x.astype(np.float64), v["params"])
    np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    assert y.shape == x.shape and a.shape == (x.shape[0], x.shape[-1])


@pytest.mark.parametrize("channels,reduction,hidden", [(8, 16, 1), (32, 4, 8), (33, 16, 2)])
def test_channel_attention_hidden_width_is_c_over_r_at_least_one(channels, reduction, hidden):
    x = jnp.ones((1, 3, 3, channels))
    v = jax.eval_shape(ChannelAttention(reduction).init, jax.random.key(0), x)
    assert v["params"]["hidden"]["kernel"].shape == (channels, hidden)
    assert v["params"]["out"]["kernel"].shape == (hidden, channels)


# --- SpatialAttention ---------------------------------------------------------------------------


@pytest.mark.parametrize("dims,train", list(itertools.product(["2d", "3d"], [False, True])))
def test_spatial_attention_matches_numpy(dims, train):
    x = _x(SHAPES[dims])
    module = SpatialAttention(kernel_size=3)
    v = randomise_variables(init(module, x))
    (y, a), updates = _run(module, v, x, train, return_attention=True)
    y_ref, a_ref = np_spatial_attention(x.astype(np.float64), v["params"], v["batch_stats"], train)
    np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    if train:  # running statistics move 10 % towards the batch statistics (biased variance)
        logits = np_conv_same(
            np.concatenate([x.max(-1, keepdims=True), x.mean(-1, keepdims=True)],
                           -1).astype(np.float64),
            np.asarray(v["params"]["conv"]["kernel"], np.float64),
        )
        old = v["batch_stats"]["norm"]
        new = updates["batch_stats"]["norm"]
        np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * logits.mean(), rtol=1e-5)
        np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * logits.var(), rtol=1e-5)


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_spatial_attention_without_norm_matches_numpy_and_has_no_bias(dims):
    x = _x(SHAPES[dims])
    module = SpatialAttention(kernel_size=5, use_norm=False)
    v = randomise_variables(init(module, x))
    assert (
        set(v) == {"params"}
        and set(v["params"]) == {"conv"}
        and set(v["params"]["conv"]) == {"kernel"}
    )
    y = module.apply(v, x)
    y_ref, _ = np_spatial_attention(x.astype(np.float64), v["params"], None, False, use_norm=False)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)


def test_spatial_attention_pools_max_first():
    # A kernel that reads only the centre tap of input channel 0 makes a = sigmoid(channel 0),
    # which must be the channel maximum; a mean-first layer would give sigmoid(channel mean).
    x = _x(SHAPES["2d"])
    module = SpatialAttention(kernel_size=3, use_norm=False)
    v = init(module, x)
    kernel = np.zeros((3, 3, 2, 1), np.float32)
    kernel[1, 1, 0, 0] = 1.0
    v = {"params": {"conv": {"kernel": jnp.asarray(kernel)}}}
    _, a = module.apply(v, x, return_attention=True)
    np.testing.assert_allclose(a, np_sigmoid(x.max(-1, keepdims=True)), rtol=1e-6)
    assert np.abs(np.asarray(a) - np_sigmoid(x.mean(-1, keepdims=True))).max() > 0.1

    # And with random weights, the swapped reference is far from the output.
    v = randomise_variables(init(module, x))
    _, a = module.apply(v, x, return_attention=True)
    _, a_swapped = np_spatial_attention(
        x.astype(np.float64), v["params"], None, False, False, max_first=False
    )
    assert np.abs(np.asarray(a) - a_swapped).max() > 0.05


def test_spatial_attention_zero_init_norm_gives_uniform_half_gate():
    x = _x(SHAPES["3d"])
    module = SpatialAttention(kernel_size=3)
    v = init(module, x)
    np.testing.assert_array_equal(v["params"]["norm"]["scale"], 0.0)
    y, a = module.apply(v, x, return_attention=True)
    np.testing.assert_array_equal(a, 0.5)
    np.testing.assert_allclose(y, 0.5 * x)
    v1 = init(SpatialAttention(kernel_size=3, zero_init_norm=False), x)
    np.testing.assert_array_equal(v1["params"]["norm"]["scale"], 1.0)


def test_spatial_attention_return_attention_shape_and_score():
    x = _x((3, 7, 6, 4))
    module = SpatialAttention()  # default 7 x 7
    v = randomise_variables(init(module, x))
    assert v["params"]["conv"]["kernel"].shape == (7, 7, 2, 1)
    y, a = module.apply(v, x, return_attention=True)
    assert a.shape == (3, 7, 6, 1)
    assert np.all((np.asarray(a) > 0) & (np.asarray(a) < 1))
    np.testing.assert_allclose(y, x * np.asarray(a), rtol=1e-6)
    _, a_ref = np_spatial_attention(x.astype(np.float64), v["params"], v["batch_stats"], False)
    np.testing.assert_allclose(a.mean(axis=(1, 2, 3)), a_ref.mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_array_equal(module.apply(v, x), y)


def test_spatial_attention_per_axis_kernel_size():
    x = _x(SHAPES["3d"])
    module = SpatialAttention(kernel_size=(1, 3, 5), use_norm=False)
    v = randomise_variables(init(module, x))
    assert v["params"]["conv"]["kernel"].shape == (1, 3, 5, 2, 1)
    y_ref, _ = np_spatial_attention(x.astype(np.float64), v["params"], None, False, use_norm=False)
    np.testing.assert_allclose(module.apply(v, x), y_ref, rtol=1e-5, atol=1e-6)


# --- CBAM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims,train", list(itertools.product(["2d", "3d"], [False, True])))
def test_cbam_is_channel_then_spatial(dims, train):
    x = _x(SHAPES[dims]).astype(np.float32)
    module = CBAM(reduction=4, kernel_size=3)
    v = randomise_variables(init(module, x))
    p, s = v["params"], v["batch_stats"]
    (y, att), _ = _run(module, v, x, train, return_attention=True)
    x64 = x.astype(np.float64)
    after_channel, a_channel = np_channel_attention(x64, p["channel"])
    y_ref, a_spatial = np_spatial_attention(after_channel, p["spatial"], s["spatial"], train)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att["channel"], a_channel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att["spatial"], a_spatial, rtol=1e-5, atol=1e-6)
    assert att["spatial"].shape == x.shape[:-1] + (1,)
    # The other order (spatial first) is far from the output.
    y_swapped, _ = np_channel_attention(
        np_spatial_attention(x64, p["spatial"], s["spatial"], train)[0], p["channel"]
    )
    assert np.abs(np.asarray(y) - y_swapped).max() > 1e-2


# --- gradients, dtypes, transformations, shapes -------------------------------------------------

MODULES = {
    "channel": lambda dt: ChannelAttention(reduction=4, param_dtype=dt),
    "spatial": lambda dt: SpatialAttention(kernel_size=3, param_dtype=dt),
    "spatial_no_norm": lambda dt: SpatialAttention(kernel_size=3, use_norm=False, param_dtype=dt),
    "cbam": lambda dt: CBAM(reduction=4, kernel_size=3, param_dtype=dt),
}


@pytest.mark.parametrize(
    "name,train", [(n, t) for n in MODULES for t in (False, True) if t is False or n != "channel"]
)
def test_check_grads_wrt_input_and_params(name, train):
    with jax.enable_x64(True):
        x = jnp.asarray(_x((2, 4, 3, 4), dtype=np.float64))
        module = MODULES[name](jnp.float64)
        v = randomise_variables(init(module, x))
        stats = {k: val for k, val in v.items() if k != "params"}

        def f(x, params):
            if train:
                return module.apply(
                    {"params": params, **stats}, x, train=True, mutable=["batch_stats"]
                )[0]
            return module.apply({"params": params, **stats}, x)

        check_grads(f, (x, v["params"]), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,dims", list(itertools.product(MODULES, ["2d", "3d"])))
def test_bfloat16_forward_is_finite(name, dims):
    x = jnp.asarray(_x(SHAPES[dims])).astype(jnp.bfloat16)
    module = MODULES[name](jnp.float32).clone(dtype=jnp.bfloat16)
    v = init(module, x)
    y = module.apply(v, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    # bfloat16 parameters too, and the dtype=None promotion of a bfloat16 input.
    v16 = jax.tree.map(lambda t: t.astype(jnp.bfloat16), v)
    assert np.all(np.isfinite(np.asarray(MODULES[name](jnp.bfloat16).apply(v16, x), np.float32)))
    assert MODULES[name](jnp.float32).apply(v, x).dtype == jnp.float32


@pytest.mark.parametrize("name,dims", list(itertools.product(MODULES, ["2d", "3d"])))
def test_jit_and_vmap_agree_with_eager(name, dims):
    x = jnp.asarray(_x((3,) + SHAPES[dims]))  # an extra leading axis to vmap over
    module = MODULES[name](jnp.float32)
    v = randomise_variables(init(module, x[0]))
    eager = np.stack([module.apply(v, xi) for xi in x])
    jitted = jax.jit(module.apply)(v, x[0])
    vmapped = jax.vmap(lambda xi: module.apply(v, xi))(x)
    np.testing.assert_allclose(jitted, eager[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vmapped, eager, rtol=1e-5, atol=1e-6)
    if name in ("spatial", "cbam"):  # a jitted training step returns updated statistics
        train = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
        y, upd = train(v, x[0])
        assert y.shape == x[0].shape and set(upd) == {"batch_stats"}


@pytest.mark.parametrize("shape", [(2, 9, 4), (1, 6, 7, 5), (2, 3, 4, 5, 6)])
@pytest.mark.parametrize("name", MODULES)
def test_output_shape_equals_input_shape(name, shape):
    x = jnp.asarray(_x(shape))
    module = MODULES[name](jnp.float32)
    assert module.apply(init(module, x), x).shape == shape


@pytest.mark.parametrize("name", MODULES)
def test_input_without_spatial_axis_is_rejected(name):
    with pytest.raises(ValueError, match="spatial"):
        MODULES[name](jnp.float32).init(jax.random.key(0), jnp.ones((2, 8)))
