"""GSoP second-order pooling against NumPy references written from Gao et al. (CVPR 2019)."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmed.layers import SecondOrderPooling
from tests.layers.test_attention import (
    EPS,
    np_batch_norm,
    np_dense,
    np_sigmoid,
    randomise_variables,
)

D = 3  # reduced channels
SHAPES = {"2d": (3, 4, 5, 6), "3d": (2, 2, 3, 4, 6)}
CASES = list(itertools.product(["batch", "layer", None], [False, True]))  # (norm, train)


def np_layer_norm(z, params, feature_axis):
    """LayerNorm over the last axis, scale and bias indexed by `feature_axis`."""
    shape = [1] * z.ndim
    shape[feature_axis] = z.shape[feature_axis]
    mean, var = z.mean(axis=-1, keepdims=True), z.var(axis=-1, keepdims=True)
    scale, bias = (np.asarray(params[k], np.float64).reshape(shape) for k in ("scale", "bias"))
    return (z - mean) / np.sqrt(var + EPS) * scale + bias


def np_norm(z, norm, params, stats, train, feature_axis):
    if norm == "batch":
        return np_batch_norm(z, params, stats, train, feature_axis)
    if norm == "layer":
        return np_layer_norm(z, params, feature_axis)
    return z


def np_reduced(x, v, norm, train):
    """ReLU(norm(1x1 conv C -> d)), flattened to (B, N, d)."""
    p, s = v["params"], v.get("batch_stats", {})
    z = np_norm(
        np_dense(x, p["reduce"]), norm, p.get("reduce_norm"), s.get("reduce_norm"), train, -1
    )
    return np.maximum(z, 0.0).reshape(x.shape[0], -1, z.shape[-1])


def np_gsop(x, v, norm, train, activation=lambda t: t):
    """The whole GSoP channel branch, Σ = X Ī Xᵀ with the N x N matrix Ī built explicitly."""
    p, s = v["params"], v.get("batch_stats", {})
    z = np_reduced(x, v, norm, train)  # (B, N, d)
    n = z.shape[1]
    i_bar = (np.eye(n) - np.ones((n, n)) / n) / n
    cov = np.einsum("bnd,nm,bmk->bdk", z, i_bar, z)  # X Ī Xᵀ, X = z[b].T of shape d x N
    cov = np_norm(cov, norm, p.get("row_norm"), s.get("row_norm"), train, 1)
    w, b = (np.asarray(p["row_conv"][k], np.float64) for k in ("kernel", "bias"))
    # rows: (B, d, 4)
    rows = np.stack([cov[:, i, :] @ w[i].T + b[i] for i in range(cov.shape[1])], axis=1)
    weight = np_sigmoid(np_dense(activation(rows.reshape(x.shape[0], -1)), p["expand"]))  # (B, C)
    return x * weight.reshape(x.shape[0], *(1,) * (x.ndim - 2), -1), weight


def _x(shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _setup(norm, dims, **kw):
    x = _x(SHAPES[dims])
    module = SecondOrderPooling(reduced_channels=D, norm=norm, **kw)
    return x, module, randomise_variables(module.init(jax.random.key(0), x))


def _apply(module, v, x, train, mutable=(), **kw):
    """Apply returning (outputs, updated collections) in either mode."""
    mutable = list(mutable) + (["batch_stats"] if train else [])
    return module.apply(v, x, train=train, mutable=mutable, **kw)


@pytest.mark.parametrize("norm,train", CASES)
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_covariance_and_forward_match_numpy(norm, train, dims):
    x, module, v = _setup(norm, dims)
    (y, weight), state = _apply(
        module, v, x, train, mutable=["intermediates"], return_attention=True
    )
    # Σ is the biased covariance of the reduced features over all positions.
    (cov,) = state["intermediates"]["covariance"]
    assert cov.shape == (x.shape[0], D, D) and cov.dtype == jnp.float32
    z = np_reduced(x.astype(np.float64), v, norm, train)
    for b in range(x.shape[0]):
        np.testing.assert_allclose(cov[b], np.cov(z[b].T, bias=True), rtol=1e-4, atol=1e-6)
    # The whole branch and the gating.
    y_ref, w_ref = np_gsop(x.astype(np.float64), v, norm, train)
    np.testing.assert_allclose(weight, w_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-6)
    assert y.shape == x.shape and weight.shape == (x.shape[0], x.shape[-1])


def test_batch_norm_running_statistics_update():
    x, module, v = _setup("batch", "2d")
    _, state = _apply(module, v, x, True)
    z = np_dense(x.astype(np.float64), v["params"]["reduce"])
    old, new = v["batch_stats"]["reduce_norm"], state["batch_stats"]["reduce_norm"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * z.mean(axis=(0, 1, 2)), rtol=1e-5
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * old["var"] + 0.1 * z.var(axis=(0, 1, 2)), rtol=1e-5
    )
    assert new["mean"].shape == (D,) and state["batch_stats"]["row_norm"]["mean"].shape == (D,)


def test_row_wise_conv_equals_grouped_convolution():
    # The GSoP row-wise conv is a grouped conv (d groups, kernel (d, 1), d -> 4d) on Σ viewed as a
    # (B, d, d, 1) NCHW image; its output channel 4i + q must equal our feature 4i + q.
    x, module, v = _setup(None, "2d")
    _, state = module.apply(v, x, mutable=["intermediates"], capture_intermediates=True)
    cov = state["intermediates"]["covariance"][0]
    rows = state["intermediates"]["row_conv"]["__call__"][0]
    w, b = v["params"]["row_conv"]["kernel"], v["params"]["row_conv"]["bias"]  # (d, 4, d), (d, 4)
    grouped = jax.lax.conv_general_dilated(
        cov[:, :, :, None],
        w.reshape(4 * D, 1, D, 1),
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=D,
        precision=jax.lax.Precision.HIGHEST,
    )  # (B, 4d, 1, 1)
    np.testing.assert_allclose(rows, grouped[:, :, 0, 0] + b.reshape(-1), rtol=1e-5, atol=1e-6)
    assert rows.shape == (x.shape[0], 4 * D)


def test_hidden_activation_is_applied_between_row_conv_and_expand():
    x, module, v = _setup("layer", "3d")
    module = module.clone(hidden_activation=nn.relu)
    y = module.apply(v, x)
    y_ref, _ = np_gsop(
        x.astype(np.float64), v, "layer", False, activation=lambda t: np.maximum(t, 0.0)
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-6)
    y_linear, _ = np_gsop(x.astype(np.float64), v, "layer", False)
    assert np.abs(np.asarray(y) - y_linear).max() > 1e-3


def test_layer_and_no_norm_are_per_example():
    # Valid for a gradient-penalty critic: an example's output does not depend on the others.
    for norm in ("layer", None):
        x, module, v = _setup(norm, "2d")
        together, _ = _apply(module, v, x, True)
        alone = np.concatenate([_apply(module, v, x[i : i + 1], True)[0] for i in range(len(x))])
        np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert set(v) == {"params"}


def test_parameter_shapes():
    x = jnp.ones((1, 4, 4, 10))
    v = jax.eval_shape(SecondOrderPooling(reduced_channels=5).init, jax.random.key(0), x)
    p = v["params"]
    assert p["reduce"]["kernel"].shape == (10, 5)
    assert p["row_conv"]["kernel"].shape == (5, 4, 5) and p["row_conv"]["bias"].shape == (5, 4)
    assert p["expand"]["kernel"].shape == (20, 10) and p["expand"]["bias"].shape == (10,)
    assert p["row_norm"]["scale"].shape == (5,)


def test_invalid_norm_and_rank_are_rejected():
    with pytest.raises(ValueError, match="norm"):
        SecondOrderPooling(4, norm="group").init(jax.random.key(0), jnp.ones((1, 3, 3, 4)))
    with pytest.raises(ValueError, match="spatial"):
        SecondOrderPooling(4).init(jax.random.key(0), jnp.ones((2, 4)))


@pytest.mark.parametrize("norm,train", CASES)
def test_check_grads_wrt_input_and_params(norm, train):
    with jax.enable_x64(True):
        x = jnp.asarray(_x((2, 3, 4, 5)), jnp.float64)
        module = SecondOrderPooling(reduced_channels=D, norm=norm, param_dtype=jnp.float64)
        v = randomise_variables(module.init(jax.random.key(0), x))
        stats = {k: val for k, val in v.items() if k != "params"}

        def f(x, params):
            return _apply(module, {"params": params, **stats}, x, train)[0]

        check_grads(f, (x, v["params"]), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "layer", None])
@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_bfloat16_forward_is_finite_with_float32_covariance(norm, dims):
    x = jnp.asarray(_x(SHAPES[dims])).astype(jnp.bfloat16)
    module = SecondOrderPooling(reduced_channels=D, norm=norm, dtype=jnp.bfloat16)
    v = module.init(jax.random.key(0), x)
    y, state = module.apply(v, x, mutable=["intermediates"])
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    assert state["intermediates"]["covariance"][0].dtype == jnp.float32
    v16 = jax.tree.map(lambda t: t.astype(jnp.bfloat16), v)
    assert np.all(
        np.isfinite(np.asarray(module.clone(param_dtype=jnp.bfloat16).apply(v16, x), np.float32))
    )


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_jit_and_vmap_agree_with_eager(dims):
    x = jnp.asarray(_x((2,) + SHAPES[dims]))  # an extra leading axis to vmap over
    module = SecondOrderPooling(reduced_channels=D)
    v = randomise_variables(module.init(jax.random.key(0), x[0]))
    eager = np.stack([module.apply(v, xi) for xi in x])
    np.testing.assert_allclose(jax.jit(module.apply)(v, x[0]), eager[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(lambda xi: module.apply(v, xi))(x), eager, rtol=1e-5, atol=1e-6
    )
    step = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
    y, state = step(v, x[0])
    assert y.shape == x[0].shape and set(state["batch_stats"]) == {"reduce_norm", "row_norm"}


@pytest.mark.parametrize("shape", [(2, 9, 4), (1, 6, 7, 5), (2, 3, 4, 5, 6)])
def test_output_shape_equals_input_shape(shape):
    x = jnp.asarray(_x(shape))
    module = SecondOrderPooling(reduced_channels=2)
    assert module.apply(module.init(jax.random.key(0), x), x).shape == shape
