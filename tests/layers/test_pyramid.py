"""Pyramid pooling: adaptive pooling and align-corners resizing against loop-based NumPy
references written from the formulas, and the PSPNet module against a NumPy re-computation
from its own parameters."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmed.layers import PyramidPooling, adaptive_avg_pool, resample, resize_align_corners

BN_EPS = 1e-5


# ---------------------------------------------------------------- NumPy references (loops)


def ref_adaptive_avg_pool(x, out_size):
    """PyTorch rule, one output cell at a time: bin i covers [floor(iL/n), ceil((i+1)L/n))."""
    spatial = x.shape[1:-1]
    out = np.zeros((x.shape[0], *out_size, x.shape[-1]))
    for idx in itertools.product(*(range(n) for n in out_size)):
        window = tuple(
            slice(math.floor(i * L / n), math.ceil((i + 1) * L / n))
            for i, L, n in zip(idx, spatial, out_size)
        )
        out[(slice(None), *idx)] = x[(slice(None), *window)].mean(
            axis=tuple(range(1, len(spatial) + 1))
        )
    return out


def ref_resize_align_corners(x, out_size):
    """Multilinear interpolation, one output cell at a time, summing over the 2^d corners."""
    spatial = x.shape[1:-1]
    out = np.zeros((x.shape[0], *out_size, x.shape[-1]))
    for idx in itertools.product(*(range(n) for n in out_size)):
        per_axis = []
        for o, L_in, L_out in zip(idx, spatial, out_size):
            src = o * (L_in - 1) / (L_out - 1) if L_out > 1 else 0.0
            lo = min(int(math.floor(src)), L_in - 1)
            hi = min(lo + 1, L_in - 1)
            w = src - lo
            per_axis.append(((lo, 1.0 - w), (hi, w)))
        for corner in itertools.product(*per_axis):
            weight = np.prod([w for _, w in corner])
            out[(slice(None), *idx)] += weight * x[(slice(None), *(i for i, _ in corner))]
    return out


def ref_pyramid_pooling(x, variables, bins, batch_stats_from_input=False):
    """Recompute the PPM from its parameters; returns (output, {branch: (batch_mean,
    batch_var)})."""
    params = variables["params"]
    branches, stats = [x], {}
    for i, b in enumerate(bins):
        y = ref_adaptive_avg_pool(x, (b,) * (x.ndim - 2))
        y = y @ np.asarray(params[f"bin{i}_conv"]["kernel"]).reshape(x.shape[-1], -1)
        axes = tuple(range(y.ndim - 1))
        if batch_stats_from_input:
            mean, var = y.mean(axis=axes), y.var(axis=axes)
        else:
            mean = np.asarray(variables["batch_stats"][f"bin{i}_norm"]["mean"])
            var = np.asarray(variables["batch_stats"][f"bin{i}_norm"]["var"])
        stats[i] = (y.mean(axis=axes), y.var(axis=axes))
        norm = params[f"bin{i}_norm"]
        scale, bias = np.asarray(norm["scale"]), np.asarray(norm["bias"])
        y = (y - mean) / np.sqrt(var + BN_EPS) * scale + bias
        branches.append(ref_resize_align_corners(np.maximum(y, 0), x.shape[1:-1]))
    return np.concatenate(branches, axis=-1), stats


def random_variables(model, x, seed):
    """Random params and running stats (var > 0) of the right shapes, so the test cannot pass
    by symmetry; shapes come from ``eval_shape``, which compiles nothing."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def draw(leaf):
        return jnp.asarray(
            rng.uniform(0.2, 1.5, leaf.shape) * rng.choice([-1, 1], leaf.shape), leaf.dtype
        )

    out = jax.tree.map(draw, shapes)
    if "batch_stats" in out:
        out["batch_stats"] = jax.tree.map(jnp.abs, out["batch_stats"])
    return out


def apply(model, variables, x, **kwargs):
    return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def rand(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# ---------------------------------------------------------------- adaptive_avg_pool


@pytest.mark.parametrize(
    "shape,out_size",
    [
        ((2, 7, 10, 3), (3, 6)),  # bins overlap: 7 -> 3, 10 -> 6
        ((2, 10, 7, 3), (6, 3)),
        ((1, 5, 5, 2), (6, 6)),  # more bins than inputs
        ((1, 6, 4, 2), (6, 4)),  # identity
        ((2, 5, 7, 4, 3), (2, 3, 3)),  # 3-D
        ((1, 3, 4, 5, 2), (6, 1, 4)),  # 3-D, mixed up/down
    ],
)
def test_adaptive_avg_pool_matches_loop_reference(shape, out_size):
    x = rand(shape)
    got = adaptive_avg_pool(x, out_size)
    assert got.shape == (shape[0], *out_size, shape[-1])
    np.testing.assert_allclose(
        got, ref_adaptive_avg_pool(np.asarray(x, np.float64), out_size), rtol=1e-5, atol=1e-6
    )


def test_adaptive_avg_pool_known_values_and_int_size():
    # 5 -> 3 bins cover [0, 2), [1, 4), [3, 5): means 0.5, 2, 3.5 (PyTorch AdaptiveAvgPool).
    x = jnp.arange(5.0).reshape(1, 5, 1, 1) + jnp.zeros((1, 5, 3, 1))
    got = adaptive_avg_pool(x, 3)
    np.testing.assert_allclose(got[0, :, 0, 0], [0.5, 2.0, 3.5], rtol=1e-6)
    np.testing.assert_allclose(adaptive_avg_pool(x, 1)[0, 0, 0, 0], 2.0, rtol=1e-6)


def test_adaptive_avg_pool_rejects_bad_sizes():
    with pytest.raises(ValueError):
        adaptive_avg_pool(jnp.zeros((1, 4, 4, 2)), (2, 2, 2))
    with pytest.raises(ValueError):
        adaptive_avg_pool(jnp.zeros((1, 4, 4, 2)), 0)


# ---------------------------------------------------------------- resize_align_corners


@pytest.mark.parametrize(
    "shape,out_size",
    [
        ((2, 4, 5, 3), (7, 9)),  # upsampling
        ((2, 9, 7, 3), (4, 3)),  # downsampling, no antialiasing
        ((1, 5, 6, 2), (1, 1)),  # to a single cell: samples input (0, 0)
        ((1, 1, 1, 2), (4, 5)),  # from a single cell: broadcast
        ((1, 1, 3, 2), (3, 1)),
        ((2, 3, 4, 5, 2), (5, 2, 7)),  # 3-D
        ((1, 2, 1, 3, 2), (1, 4, 6)),  # 3-D with size-1 axes
    ],
)
def test_resize_align_corners_matches_loop_reference(shape, out_size):
    x = rand(shape, seed=1)
    got = resize_align_corners(x, out_size)
    assert got.shape == (shape[0], *out_size, shape[-1])
    np.testing.assert_allclose(
        got, ref_resize_align_corners(np.asarray(x, np.float64), out_size), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "shape,out_size",
    [((2, 4, 5, 3), (7, 13)), ((2, 9, 7, 3), (4, 3)), ((1, 3, 4, 5, 2), (6, 7, 2))],
)
def test_resize_align_corners_preserves_corners_exactly(shape, out_size):
    x = rand(shape, seed=2)
    got = np.asarray(resize_align_corners(x, out_size))
    x = np.asarray(x)
    for corner in itertools.product((0, -1), repeat=len(out_size)):
        np.testing.assert_array_equal(got[(slice(None), *corner)], x[(slice(None), *corner)])


def test_resize_align_corners_known_values_and_single_output():
    x = jnp.array([0.0, 1.0, 2.0]).reshape(1, 3, 1)
    np.testing.assert_allclose(resize_align_corners(x, 5)[0, :, 0], [0, 0.5, 1, 1.5, 2], atol=1e-7)
    # L_out == 1 samples coordinate 0 (not the centre).
    np.testing.assert_array_equal(resize_align_corners(x, 1)[0, :, 0], [0.0])


def test_resample_applies_any_matrix_axis_by_axis():
    def nearest(length_in, length_out):  # output o copies input floor(o L_in / L_out)
        return np.eye(length_in)[np.arange(length_out) * length_in // length_out]

    x = jnp.arange(2 * 3 * 2 * 1, dtype=jnp.float32).reshape(2, 3, 2, 1)
    got = resample(x, (6, 2), nearest)  # the second axis keeps its size: left as it is
    np.testing.assert_array_equal(got, np.repeat(np.asarray(x), 2, axis=1))
    mean = resample(x, 1, lambda length_in, length_out: np.full((1, length_in), 1 / length_in))
    np.testing.assert_allclose(mean, np.asarray(x).mean(axis=(1, 2), keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="my_resize"):
        resample(x, (2, 2, 2), nearest, "my_resize")


def test_resize_align_corners_is_linear_in_coordinates():
    # A linear ramp is reproduced exactly by linear interpolation, at any size.
    rows, cols = jnp.linspace(-1.0, 3.0, 6), jnp.linspace(0.0, 2.0, 4)
    ramp = rows.reshape(1, 6, 1, 1) + cols.reshape(1, 1, 4, 1)
    rows, cols = jnp.linspace(-1.0, 3.0, 11), jnp.linspace(0.0, 2.0, 3)
    want = rows.reshape(1, 11, 1, 1) + cols.reshape(1, 1, 3, 1)
    np.testing.assert_allclose(resize_align_corners(ramp, (11, 3)), want, atol=1e-6)


# ---------------------------------------------------------------- PyramidPooling


def test_pyramid_pooling_eval_matches_reference_2d():
    x = rand((2, 7, 10, 8), seed=3)
    bins = (1, 2, 3, 6)
    model = PyramidPooling(bins=bins)
    variables = random_variables(model, x, seed=4)
    got = apply(model, variables, x)
    assert got.shape == (2, 7, 10, 8 + 4 * 2)  # default R = C // len(bins)
    want, _ = ref_pyramid_pooling(np.asarray(x, np.float64), variables, bins)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[..., :8], x)  # the input is passed through untouched


def test_pyramid_pooling_eval_matches_reference_3d():
    x = rand((2, 5, 4, 7, 6), seed=5)
    bins = (1, 2, 3)
    model = PyramidPooling(bins=bins, reduction_channels=3)
    variables = random_variables(model, x, seed=6)
    got = apply(model, variables, x)
    assert got.shape == (2, 5, 4, 7, 6 + 3 * 3)
    want, _ = ref_pyramid_pooling(np.asarray(x, np.float64), variables, bins)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_pyramid_pooling_train_uses_batch_stats_and_updates_running_stats():
    x = rand((3, 7, 6, 4), seed=7)
    bins = (1, 2, 3)
    model = PyramidPooling(bins=bins, reduction_channels=2)
    variables = random_variables(model, x, seed=8)
    got, updates = apply(model, variables, x, train=True, mutable=["batch_stats"])
    want, stats = ref_pyramid_pooling(
        np.asarray(x, np.float64), variables, bins, batch_stats_from_input=True
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for i, (mean, var) in stats.items():
        old = variables["batch_stats"][f"bin{i}_norm"]
        new = updates["batch_stats"][f"bin{i}_norm"]
        np.testing.assert_allclose(
            new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * mean, rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            new["var"], 0.9 * np.asarray(old["var"]) + 0.1 * var, rtol=1e-4, atol=1e-5
        )


def test_pyramid_pooling_without_norm_uses_biased_conv():
    x = rand((1, 6, 6, 4), seed=9)
    model = PyramidPooling(bins=(1, 3), use_norm=False)
    variables = random_variables(model, x, seed=0)
    assert "batch_stats" not in variables
    assert set(variables["params"]["bin1_conv"]) == {"kernel", "bias"}
    kernel = np.asarray(variables["params"]["bin1_conv"]["kernel"]).reshape(4, 2)
    bias = np.asarray(variables["params"]["bin1_conv"]["bias"])
    pooled = ref_adaptive_avg_pool(np.asarray(x, np.float64), (3, 3))
    want = ref_resize_align_corners(np.maximum(pooled @ kernel + bias, 0), (6, 6))
    np.testing.assert_allclose(apply(model, variables, x)[..., -2:], want, rtol=1e-4, atol=1e-5)


def test_pyramid_pooling_channel_counts():
    x = jnp.zeros((1, 6, 6, 12))
    for bins, reduction, channels in [
        ((1, 2, 3, 6), None, 12 + 4 * 3),
        ((1, 2), 5, 12 + 2 * 5),
        ((2,), None, 24),
    ]:
        model = PyramidPooling(bins=bins, reduction_channels=reduction)
        out, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
        assert out.shape == (1, 6, 6, channels)


# ---------------------------------------------------------------- gradients, dtypes, transforms


def test_check_grads_resampling_functions():
    with jax.enable_x64(True):
        x2 = rand((2, 7, 5, 3), seed=10, dtype=jnp.float64)
        x3 = rand((1, 5, 3, 4, 2), seed=11, dtype=jnp.float64)
        for fn, x in [
            (lambda x: adaptive_avg_pool(x, (3, 6)), x2),
            (lambda x: adaptive_avg_pool(x, (2, 3, 3)), x3),
            (lambda x: resize_align_corners(x, (11, 4)), x2),
            (lambda x: resize_align_corners(x, (7, 1, 6)), x3),
        ]:
            check_grads(jax.jit(fn), (x,), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize(
    "shape,train", [((2, 6, 5, 4), False), ((2, 6, 5, 4), True), ((2, 4, 3, 5, 4), False)]
)
def test_check_grads_pyramid_pooling(shape, train):
    with jax.enable_x64(True):
        x = rand(shape, seed=12, dtype=jnp.float64)
        bins = (1, 2, 3) if len(shape) == 4 else (1, 2)
        model = PyramidPooling(bins=bins, reduction_channels=2, param_dtype=jnp.float64)
        variables = random_variables(model, x, seed=13)
        params, stats = variables["params"], variables["batch_stats"]

        def f(params, x):
            out = model.apply(
                {"params": params, "batch_stats": stats}, x, train=train, mutable=["batch_stats"]
            )
            return out[0]

        check_grads(jax.jit(f), (params, x), order=1, modes=("fwd", "rev"))


def test_bfloat16_forward_is_finite():
    x = rand((2, 7, 9, 8), seed=14)
    model = PyramidPooling(bins=(1, 2, 3, 6), reduction_channels=2, dtype=jnp.bfloat16)
    variables = random_variables(model, x, seed=0)
    y = apply(model, variables, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 7, 9, 16)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    y_ref = apply(model.clone(dtype=None), variables, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=5e-2, atol=5e-2)
    xb = x.astype(jnp.bfloat16)
    for out in (adaptive_avg_pool(xb, (3, 4)), resize_align_corners(xb, (11, 4))):
        assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_jit_and_vmap():
    x = rand((3, 2, 6, 5, 4), seed=15)  # vmap axis of 3, each a (2, 6, 5, 4) batch
    model = PyramidPooling(bins=(1, 3))
    variables = random_variables(model, x[0], seed=16)
    jitted = np.stack([jax.jit(model.apply)(variables, xi) for xi in x])
    vmapped = jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))(variables, x)
    np.testing.assert_allclose(vmapped, jitted, rtol=1e-5, atol=1e-6)
    pooled = jax.vmap(lambda xi: resize_align_corners(adaptive_avg_pool(xi, 3), (6, 5)))(x)
    assert pooled.shape == x.shape
