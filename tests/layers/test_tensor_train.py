"""TTDense / TTConv: reconstruction, forward maths, parameter count, init scale, grads.

References are independent of the module: tensorly's TT-matrix reconstruction,
the TT formula evaluated entry by entry, and a NumPy convolution written from
its definition.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from tensorly.tt_matrix import tt_matrix_to_tensor

from jaxmed.layers import TTConv, TTDense, tt_full_weight, tt_num_params
from jaxmed.layers._tensor_train import _choose_forward


def _param_shapes(module, x):
    # eval_shape traces init without compiling or running it.
    return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def _random_params(module, x, seed=0):
    """Random cores and bias of the module's shapes (the init scale is tested separately)."""
    rng = np.random.default_rng(seed)
    shapes = _param_shapes(module, x)
    return {
        "params": {
            name: jnp.asarray(rng.normal(size=s.shape), s.dtype) for name, s in shapes.items()
        }
    }


def _apply(module, variables, x):
    return jax.jit(module.apply)(variables, x)


def _mean_square_full_weight(layer, x, seeds):
    """Mean of W**2 over the full weights of `seeds` independent initialisations."""
    init = jax.jit(layer.init)  # compiled once, run per seed
    weights = [tt_full_weight(init(jax.random.key(seed), x)) for seed in range(seeds)]
    return float(np.mean([np.mean(np.square(w)) for w in weights]))


def _channel_cores(params):
    d = sum(name.startswith("core_") for name in params)
    return [np.asarray(params[f"core_{k}"], np.float64) for k in range(d)]


# ----------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------


def tensorly_dense(params, n_in, n_out):
    return tt_matrix_to_tensor(_channel_cores(params)).reshape(n_in, n_out)


def tensorly_kernel(params, kernel_size, c_in, c_out):
    # G_0 as a TT-matrix core with one row mode (the flattened kernel offset)
    # and a unit column mode: [1, vol, 1, r_0].
    g0 = np.asarray(params["spatial_core"], np.float64)
    g0 = g0.reshape(1, -1, 1, g0.shape[-1])
    full = tt_matrix_to_tensor([g0] + _channel_cores(params))  # [vol, n_1..n_d, 1, m_1..m_d]
    return full.reshape(*kernel_size, c_in, c_out)


def formula_dense(cores, in_modes, out_modes):
    """W[i, j] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :], row-major i, j."""
    w = np.zeros((math.prod(in_modes), math.prod(out_modes)))
    for ii in np.ndindex(*in_modes):
        for jj in np.ndindex(*out_modes):
            prod = np.eye(1)
            for core, i, j in zip(cores, ii, jj):
                prod = prod @ core[:, i, j, :]
            w[np.ravel_multi_index(ii, in_modes), np.ravel_multi_index(jj, out_modes)] = prod[0, 0]
    return w


def numpy_conv(x, kernel, strides, padding, dilation):
    """Cross-correlation y[b, *o, s] = sum_{t, c} x_pad[b, *(o*stride + t*dil), c] K[*t, c, s]."""
    ks, spatial = kernel.shape[:-2], x.shape[1:-1]
    dk = [(k - 1) * dl + 1 for k, dl in zip(ks, dilation)]
    if padding == "VALID":
        pads = [(0, 0)] * len(ks)
    elif padding == "SAME":
        pads = []
        for n, k, s in zip(spatial, dk, strides):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = padding
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(n - k) // s + 1 for n, k, s in zip(xp.shape[1:-1], dk, strides)]
    y = np.zeros((x.shape[0], *out, kernel.shape[-1]))
    for t in np.ndindex(*ks):
        window = tuple(
            slice(ti * dl, ti * dl + (o - 1) * s + 1, s)
            for ti, dl, o, s in zip(t, dilation, out, strides)
        )
        y += xp[(slice(None), *window)] @ kernel[t]
    return y


def _reference_output(layer, params, x):
    """NumPy float64 output of a TTDense or (default strides/padding) TTConv layer."""
    c_in, c_out = math.prod(layer.in_modes), math.prod(layer.out_modes)
    if isinstance(layer, TTDense):
        y = x @ tensorly_dense(params, c_in, c_out)
    else:
        nsp = len(layer.kernel_size)
        kernel = tensorly_kernel(params, layer.kernel_size, c_in, c_out)
        y = numpy_conv(x, kernel, (1,) * nsp, "SAME", (1,) * nsp)
    return y + np.asarray(params["bias"], np.float64)


# ----------------------------------------------------------------------------
# TTDense
# ----------------------------------------------------------------------------

DENSE_CASES = [
    ((2, 3), (4, 2), 3),
    ((3, 2), (2, 5), (1, 4, 1)),
    ((2, 3, 2), (3, 2, 2), (1, 2, 3, 1)),
    ((2, 2, 4), (4, 3, 1), 5),
]


@pytest.mark.parametrize("in_modes,out_modes,ranks", DENSE_CASES)
def test_dense_weight_and_forward_match_tensorly(in_modes, out_modes, ranks):
    n_in, n_out = math.prod(in_modes), math.prod(out_modes)
    x = jax.random.normal(jax.random.key(1), (3, 2, n_in))
    layer = TTDense(in_modes, out_modes, ranks)
    variables = _random_params(layer, x)
    params = variables["params"]
    w_ref = tensorly_dense(params, n_in, n_out)
    np.testing.assert_allclose(tt_full_weight(params), w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        w_ref, formula_dense(_channel_cores(params), in_modes, out_modes), atol=1e-12
    )
    y_ref = np.asarray(x, np.float64) @ w_ref + np.asarray(params["bias"])
    y = _apply(layer, variables, x)
    assert y.shape == (3, 2, n_out)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_modes,out_modes,ranks", DENSE_CASES)
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_param_count(in_modes, out_modes, ranks, use_bias):
    x = jnp.ones((1, math.prod(in_modes)))
    params = _param_shapes(TTDense(in_modes, out_modes, ranks, use_bias=use_bias), x)
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    assert count == tt_num_params(in_modes, out_modes, ranks, use_bias=use_bias)
    r = (1, *(ranks,) * (len(in_modes) - 1), 1) if isinstance(ranks, int) else ranks
    assert count == sum(
        r[k] * n * m * r[k + 1] for k, (n, m) in enumerate(zip(in_modes, out_modes))
    ) + (math.prod(out_modes) if use_bias else 0)


@pytest.mark.parametrize("init_target", ["glorot", "he"])
def test_dense_init_std(init_target):
    in_modes, out_modes = (8, 8, 8), (4, 8, 8)
    n_in, n_out = 512, 256
    target = math.sqrt(2 / (n_in + n_out)) if init_target == "glorot" else math.sqrt(2 / n_in)
    layer = TTDense(in_modes, out_modes, (1, 8, 8, 1), init_target=init_target)
    x = jnp.ones((1, n_in))
    mean_sq = _mean_square_full_weight(layer, x, seeds=4)
    assert abs(math.sqrt(mean_sq) / target - 1) < 0.1


# ----------------------------------------------------------------------------
# TTConv
# ----------------------------------------------------------------------------

CONV_KERNEL_CASES = [
    ((3, 3), (2, 3), (3, 2), 2),
    ((3, 2), (2, 2, 2), (2, 1, 3), (3, 2, 4, 1)),
    ((2, 3, 2), (2, 3), (2, 2), (4, 3, 1)),
    ((3, 3, 3), (2, 1, 2), (1, 3, 2), 2),
]


@pytest.mark.parametrize("kernel_size,in_modes,out_modes,ranks", CONV_KERNEL_CASES)
def test_conv_kernel_matches_tensorly_and_formula(kernel_size, in_modes, out_modes, ranks):
    c_in, c_out = math.prod(in_modes), math.prod(out_modes)
    x = jnp.ones((1, *(5,) * len(kernel_size), c_in))
    layer = TTConv(in_modes, out_modes, ranks, kernel_size=kernel_size)
    params = _random_params(layer, x)["params"]
    k_ref = tensorly_kernel(params, kernel_size, c_in, c_out)
    np.testing.assert_allclose(tt_full_weight(params), k_ref, rtol=1e-5, atol=1e-6)
    # K[*t, c, s] = G_0[*t, :] @ (G_1 ... G_d)[:, c, s] from the formula, entry by entry.
    g0 = np.asarray(params["spatial_core"], np.float64)
    cores = _channel_cores(params)
    r0 = g0.shape[-1]
    channel = np.stack(
        [formula_dense([cores[0][a : a + 1]] + cores[1:], in_modes, out_modes) for a in range(r0)]
    )  # [r_0, C_in, C_out]
    np.testing.assert_allclose(k_ref, np.einsum("...a,aio->...io", g0, channel), atol=1e-12)


CONV_FORWARD_CASES = [
    (kernel_size, forward, strides, padding)
    for kernel_size in [(3, 3), (3, 3, 3)]
    for forward in ["cores", "kernel"]
    for strides in [1, 2]
    for padding in ["SAME", "VALID", "explicit"]
]


@pytest.mark.parametrize("kernel_size,forward,strides,padding", CONV_FORWARD_CASES)
def test_conv_forward_matches_numpy_conv(kernel_size, forward, strides, padding):
    nsp = len(kernel_size)
    in_modes, out_modes, ranks = (2, 3), (3, 2), (3, 2, 1)
    if padding == "explicit":
        padding = [(1, 2), (0, 1), (2, 0)][:nsp]
    x = jax.random.normal(jax.random.key(3), (2, *(7, 6, 5)[:nsp], 6))
    layer = TTConv(
        in_modes,
        out_modes,
        ranks,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        forward=forward,
    )
    variables = _random_params(layer, x)
    params = variables["params"]
    kernel = tensorly_kernel(params, kernel_size, 6, 6)
    y_ref = numpy_conv(np.asarray(x, np.float64), kernel, (strides,) * nsp, padding, (1,) * nsp)
    y_ref += np.asarray(params["bias"])
    y = _apply(layer, variables, x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("forward", ["cores", "kernel", "auto"])
def test_conv_dilation_and_int_padding(forward):
    x = jax.random.normal(jax.random.key(4), (1, 9, 8, 4))
    layer = TTConv(
        (2, 2),
        (2, 2),
        2,
        kernel_size=(3, 2),
        kernel_dilation=(2, 1),
        padding=1,
        strides=(1, 2),
        forward=forward,
    )
    variables = _random_params(layer, x)
    kernel = tensorly_kernel(variables["params"], (3, 2), 4, 4)
    y_ref = numpy_conv(np.asarray(x, np.float64), kernel, (1, 2), [(1, 1), (1, 1)], (2, 1))
    y_ref += np.asarray(variables["params"]["bias"])
    np.testing.assert_allclose(_apply(layer, variables, x), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size,in_modes,out_modes,ranks", CONV_KERNEL_CASES)
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_param_count(kernel_size, in_modes, out_modes, ranks, use_bias):
    x = jnp.ones((1, *(4,) * len(kernel_size), math.prod(in_modes)))
    layer = TTConv(in_modes, out_modes, ranks, kernel_size=kernel_size, use_bias=use_bias)
    params = _param_shapes(layer, x)
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    assert count == tt_num_params(
        in_modes, out_modes, ranks, kernel_size=kernel_size, use_bias=use_bias
    )
    r = (*(ranks,) * len(in_modes), 1) if isinstance(ranks, int) else ranks
    expected = math.prod(kernel_size) * r[0] + sum(
        r[k] * n * m * r[k + 1] for k, (n, m) in enumerate(zip(in_modes, out_modes))
    )
    assert count == expected + (math.prod(out_modes) if use_bias else 0)


@pytest.mark.parametrize("init_target", ["he", "glorot"])
def test_conv_init_std(init_target):
    kernel_size, in_modes, out_modes = (3, 3, 3), (4, 4, 4), (4, 4, 2)
    fan_in, fan_out = 27 * 64, 27 * 32
    target = math.sqrt(2 / fan_in) if init_target == "he" else math.sqrt(2 / (fan_in + fan_out))
    layer = TTConv(in_modes, out_modes, 16, kernel_size=kernel_size, init_target=init_target)
    x = jnp.ones((1, 3, 3, 3, 64))
    mean_sq = _mean_square_full_weight(layer, x, seeds=8)
    assert abs(math.sqrt(mean_sq) / target - 1) < 0.1


# ----------------------------------------------------------------------------
# Gradients, dtypes, transformations, validation
# ----------------------------------------------------------------------------


def _grad_check(layer, x):
    with jax.enable_x64(True):
        x = jnp.asarray(x, jnp.float64)
        variables = _random_params(layer, x)
        check_grads(jax.jit(layer.apply), (variables, x), order=1, modes=("fwd", "rev"))


def test_dense_grads():
    layer = TTDense((2, 3), (3, 2), 2, param_dtype=jnp.float64)
    _grad_check(layer, np.random.default_rng(0).normal(size=(2, 6)))


@pytest.mark.parametrize("forward", ["cores", "kernel"])
@pytest.mark.parametrize("kernel_size", [(3, 3), (2, 2, 2)])
def test_conv_grads(forward, kernel_size):
    layer = TTConv(
        (2, 2),
        (2, 2),
        (2, 2, 1),
        kernel_size=kernel_size,
        strides=2,
        forward=forward,
        param_dtype=jnp.float64,
    )
    x = np.random.default_rng(1).normal(size=(1, *(4,) * len(kernel_size), 4))
    _grad_check(layer, x)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (TTDense((4, 4), (2, 4), 3), (2, 5, 16)),
        (TTConv((4, 4), (2, 4), 3, kernel_size=(3, 3), forward="cores"), (2, 8, 8, 16)),
        (TTConv((4, 4), (2, 4), 3, kernel_size=(3, 3, 3), forward="kernel"), (1, 4, 4, 4, 16)),
        (TTConv((4, 4), (2, 4), 3, kernel_size=(3, 3, 3), forward="cores"), (1, 4, 4, 4, 16)),
    ],
)
def test_bfloat16_forward_is_finite(layer, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    bf16_params = _param_shapes(layer.clone(param_dtype=jnp.bfloat16), x)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(bf16_params))
    # Mixed precision as in Flax: float32 parameters, bfloat16 computation.
    bf16 = layer.clone(dtype=jnp.bfloat16)
    variables = jax.tree.map(lambda p: 0.5 * p, _random_params(layer, x))
    y = _apply(bf16, variables, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    y = np.asarray(y, np.float32)
    assert np.all(np.isfinite(y))
    y_ref = _reference_output(layer, variables["params"], np.asarray(x, np.float64))
    np.testing.assert_allclose(y, y_ref, atol=0.05 * np.abs(y_ref).max())


@pytest.mark.parametrize(
    "layer,shape",
    [
        (TTDense((2, 3), (3, 2), 2), (3, 6)),
        (TTConv((2, 2), (2, 2), 2, kernel_size=(3, 3), forward="cores"), (3, 5, 5, 4)),
        (TTConv((2, 2), (2, 2), 2, kernel_size=(3, 3, 3), forward="kernel"), (3, 4, 4, 4, 4)),
    ],
)
def test_jit_and_vmap(layer, shape):
    x = jax.random.normal(jax.random.key(5), (2, *shape))
    variables = _random_params(layer, x[0])
    y_ref = np.stack(
        [_reference_output(layer, variables["params"], np.asarray(xi, np.float64)) for xi in x]
    )
    np.testing.assert_allclose(
        jax.jit(layer.apply)(variables, x[0]), y_ref[0], rtol=1e-5, atol=1e-4
    )
    # Nested vmap: over an extra leading axis, then over the batch axis, so the
    # layer itself sees single unbatched examples.
    per_example = jax.vmap(jax.vmap(layer.apply, in_axes=(None, 0)), in_axes=(None, 0))
    np.testing.assert_allclose(jax.jit(per_example)(variables, x), y_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "modes,ranks,kernel_size,expected_path",
    [
        ((4, 4), 4, (3, 3), "kernel"),
        ((4, 4, 4, 4), 1, (3, 3), "cores"),
        ((8, 8), 1, (3, 3, 3), "cores"),
    ],
)
def test_conv_auto(modes, ranks, kernel_size, expected_path):
    # 'auto' picks by the multiply-add ratio (see the TTConv docstring) and is exact either way.
    layer = TTConv(modes, modes, ranks, kernel_size=kernel_size)
    full_ranks = (*(ranks,) * len(modes), 1)
    assert _choose_forward(kernel_size, full_ranks, modes, modes) == expected_path
    x = jax.random.normal(jax.random.key(6), (1, *(4,) * len(kernel_size), math.prod(modes)))
    variables = jax.tree.map(lambda p: 0.5 * p, _random_params(layer, x))
    y_ref = _reference_output(layer, variables["params"], np.asarray(x, np.float64))
    np.testing.assert_allclose(
        _apply(layer, variables, x), y_ref, rtol=1e-5, atol=1e-4 * np.abs(y_ref).max()
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: TTDense((2, 3), (3, 2), (2, 2, 1)),  # must start with 1
        lambda: TTDense((2, 3), (3, 2), (1, 2, 2)),  # must end with 1
        lambda: TTDense((2, 3), (3, 2), (1, 2, 2, 1)),  # wrong length
        lambda: TTDense((2, 3), (3,), 2),  # mode lists of different length
        lambda: TTConv((2, 3), (3, 2), (2, 2), kernel_size=(3, 3)),  # must end with 1
        lambda: TTConv((2, 3), (3, 2), (2, 1), kernel_size=(3, 3)),  # wrong length
        lambda: TTConv((2, 3), (3, 2), (2, 0, 1), kernel_size=(3, 3)),  # non-positive rank
    ],
)
def test_rank_validation(make):
    layer = make()
    n_in = math.prod(layer.in_modes)
    x = jnp.ones((1, n_in)) if isinstance(layer, TTDense) else jnp.ones((1, 4, 4, n_in))
    with pytest.raises(ValueError, match="ranks|modes"):
        _param_shapes(layer, x)
    with pytest.raises(ValueError):
        tt_num_params(
            layer.in_modes, layer.out_modes, layer.ranks, getattr(layer, "kernel_size", None)
        )


def test_int_ranks_meaning():
    dense = _param_shapes(TTDense((2, 2, 2), (2, 2, 2), 3), jnp.ones((1, 8)))
    assert [dense[f"core_{k}"].shape for k in range(3)] == [
        (1, 2, 2, 3),
        (3, 2, 2, 3),
        (3, 2, 2, 1),
    ]
    conv = _param_shapes(TTConv((2, 2), (2, 2), 3, kernel_size=(3, 3)), jnp.ones((1, 4, 4, 4)))
    assert conv["spatial_core"].shape == (3, 3, 3)
    assert [conv[f"core_{k}"].shape for k in range(2)] == [(3, 2, 2, 3), (3, 2, 2, 1)]
