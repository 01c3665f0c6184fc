"""Dual threshold suppression: the two branch formulas, their gradients (stop-gradient of the
channel max, finite at zero), and the full module against a NumPy re-computation from its
parameters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmed.layers import ThresholdSuppression, suppress_discriminative, suppress_irrelevant

# ---------------------------------------------------------------- NumPy references


def spatial_axes(f):
    return tuple(range(1, f.ndim - 1))


def ref_discriminative(f, cr, alpha):
    """D = T (F/T)^alpha where F <= T, else 0; T = cr * (per sample/channel max)."""
    thr = cr * f.max(axis=spatial_axes(f), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        enhanced = thr * (np.maximum(f, 0) / thr) ** alpha
    return np.where((thr > 0) & (f <= thr), enhanced, 0.0)


def ref_irrelevant(f, t):
    """S = F where F >= t * (per sample/channel max), else 0."""
    return np.where(f >= t * f.max(axis=spatial_axes(f), keepdims=True), f, 0.0)


def ref_module(f, params, cr, alpha, t):
    """F* = Conv1x1(sigmoid(Dense(relu(Dense(maxpool(M))))) * M), M = [D, S]."""
    m = np.concatenate([ref_discriminative(f, cr, alpha), ref_irrelevant(f, t)], axis=-1)
    w1 = m.max(axis=spatial_axes(f))
    w2 = np.maximum(
        w1 @ np.asarray(params["squeeze"]["kernel"]) + np.asarray(params["squeeze"]["bias"]), 0
    )
    w3 = w2 @ np.asarray(params["excite"]["kernel"]) + np.asarray(params["excite"]["bias"])
    weights = 1.0 / (1.0 + np.exp(-w3))
    mw = m * weights.reshape(w3.shape[0], *(1,) * (f.ndim - 2), -1)
    kernel = np.asarray(params["project"]["kernel"]).reshape(m.shape[-1], f.shape[-1])
    return mw @ kernel + np.asarray(params["project"]["bias"])


# ---------------------------------------------------------------- inputs


def relu_features(shape, seed=0, scales=None):
    """Non-negative features with ~30 % exact zeros; optional per (sample, channel) scale."""
    rng = np.random.default_rng(seed)
    f = np.maximum(rng.normal(size=shape), 0) * rng.uniform(0.5, 2.0, size=shape)
    if scales is not None:
        f = f * np.asarray(scales).reshape(shape[0], *(1,) * (len(shape) - 2), shape[-1])
    return f.astype(np.float32)


def away_from_thresholds(shape, seed, cr=0.8, t=0.4, margin=0.03):
    """Split input (free, anchor): ``free`` holds values whose ratio to the channel max avoids
    0 and the discontinuities at t and cr (by ``margin``); ``anchor`` is one extra position per
    (sample, channel) holding the max. Numerical differentiation perturbs only ``free``, so the
    max stays fixed, which is exactly what the stop-gradient in the layer promises."""
    rng = np.random.default_rng(seed)
    intervals = np.array([[0.05, t - margin], [t + margin, cr - margin], [cr + margin, 0.95]])
    pick = intervals[rng.integers(0, 3, size=shape)]
    ratio = rng.uniform(pick[..., 0], pick[..., 1])
    peak = rng.uniform(0.5, 3.0, size=(shape[0], *(1,) * (len(shape) - 2), shape[-1]))
    anchor_shape = (shape[0], 1, *shape[2:])
    return ratio * peak, np.broadcast_to(peak, anchor_shape).copy()


def with_anchor(free, anchor):
    return jnp.concatenate([free, anchor], axis=1)


def random_params(model, x, seed):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.7, s.dtype), shapes)


# ---------------------------------------------------------------- branch 1: suppress_discriminative


@pytest.mark.parametrize("alpha", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("shape", [(2, 6, 7, 3), (2, 3, 4, 5, 3)])
def test_discriminative_matches_formula(shape, alpha):
    f = relu_features(shape, seed=1)
    got = suppress_discriminative(jnp.asarray(f), cr=0.7, alpha=alpha)
    np.testing.assert_allclose(
        got, ref_discriminative(f.astype(np.float64), 0.7, alpha), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_discriminative_enhances_below_and_erases_above_threshold(alpha):
    f = relu_features((3, 8, 8, 4), seed=2)
    thr = 0.8 * f.max(axis=(1, 2), keepdims=True)
    d = np.asarray(suppress_discriminative(jnp.asarray(f), cr=0.8, alpha=alpha))
    below, above = f < thr, f > thr
    assert below.any() and above.any()
    assert np.all(d[below] >= f[below])  # non-linear enhancement
    assert np.all(d[below & (f > 0)] > f[below & (f > 0)])  # strictly, for α < 1 and 0 < F < T
    assert np.all(d[above] == 0)


def test_discriminative_meets_identity_at_threshold():
    # Channel max 1 and cr = 0.5 make T = 0.5 exactly representable.
    f = jnp.array([0.0, 0.5 * (1 - 1e-4), 0.5, 0.75, 1.0]).reshape(1, 5, 1, 1)
    d = np.asarray(suppress_discriminative(f, cr=0.5, alpha=0.6))[0, :, 0, 0]
    # Just below T the curve T (F/T)^α meets D = F (relative gap ≈ (1 - α)·1e-4)...
    np.testing.assert_allclose(d[1], float(f[0, 1, 0, 0]), rtol=1e-4)
    # ...F = T itself stays on the curve, D = F exactly, and everything above T is erased.
    assert d[2] == 0.5
    np.testing.assert_array_equal(d[3:], [0.0, 0.0])
    assert d[0] == 0.0


def test_discriminative_alpha_one_is_identity_below_threshold():
    f = relu_features((2, 7, 6, 3), seed=3)
    thr = 0.8 * f.max(axis=(1, 2), keepdims=True)
    d = np.asarray(suppress_discriminative(jnp.asarray(f), cr=0.8, alpha=1.0))
    np.testing.assert_allclose(d, np.where(f <= thr, f, 0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fn", [
    functools.partial(suppress_discriminative, cr=0.8, alpha=0.8),
    functools.partial(suppress_irrelevant, t=0.4),
])
def test_thresholds_are_per_sample_and_per_channel(fn):
    # One spatial pattern, scaled by very different maxima per (sample, channel): both branches
    # are positively homogeneous per channel, so every slice must be the scaled pattern's
    # result; a threshold shared across samples or channels would break this.
    pattern = relu_features((1, 6, 5, 1), seed=4)
    scales = np.array([[1.0, 50.0, 0.02], [7.0, 0.3, 1000.0]], np.float32)
    f = pattern * scales.reshape(2, 1, 1, 3)
    got = np.asarray(fn(jnp.asarray(f)))
    base = np.asarray(fn(jnp.asarray(pattern)))[0, ..., 0]
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(
                got[b, ..., c], scales[b, c] * base, rtol=1e-5, atol=1e-7 * scales[b, c]
            )


def test_discriminative_gradient_holds_max_constant():
    f = relu_features((2, 5, 6, 3), seed=5)
    w = np.random.default_rng(6).normal(size=f.shape).astype(np.float32)
    alpha, cr = 0.7, 0.8
    grad = np.asarray(
        jax.grad(lambda x: jnp.sum(w * suppress_discriminative(x, cr, alpha)))(jnp.asarray(f))
    )
    m = f.max(axis=(1, 2), keepdims=True)
    thr = cr * m
    # d/dF [T (F/T)^α] with T constant, for 0 < F < T; zero where D = 0 (F >= T, incl. the max).
    inside = (f > 0) & (f < thr)
    want = np.where(inside, w * alpha * (np.where(inside, f, 1) / thr) ** (alpha - 1), 0)
    np.testing.assert_allclose(np.where(f > 0, grad, 0), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(grad[f == m], 0.0)  # no gradient through m_c into the max


def test_discriminative_gradient_finite_at_zero_and_all_zero_channel():
    f = relu_features((2, 5, 5, 3), seed=7)
    f[1, ..., 2] = 0.0  # an all-zero channel: m_c = 0
    f[0, :2, :, 0] = 0.0
    assert (f == 0).sum() > 10
    for alpha in (0.1, 0.5, 0.8):
        def total(x):
            return jnp.sum(suppress_discriminative(x, 0.8, alpha))

        value, grad = jax.value_and_grad(total)(jnp.asarray(f))
        grad = np.asarray(grad)
        assert np.isfinite(value) and np.all(np.isfinite(grad))
        assert np.all(grad[f == 0] >= 0)
        np.testing.assert_array_equal(grad[1, ..., 2], 0.0)
        np.testing.assert_array_equal(
            np.asarray(suppress_discriminative(jnp.asarray(f), 0.8, alpha))[1, ..., 2], 0.0
        )
    zeros = jnp.zeros((1, 4, 4, 2))
    assert np.all(
        np.isfinite(np.asarray(jax.grad(lambda x: suppress_discriminative(x).sum())(zeros)))
    )


def test_negative_inputs_are_zeroed():
    f = jnp.array([-2.0, -0.5, 0.2, 1.0]).reshape(1, 4, 1, 1)
    all_negative = jnp.array([-2.0, -0.5, -0.1, -1.0]).reshape(1, 4, 1, 1)
    for x in (f, all_negative):
        d = np.asarray(suppress_discriminative(x))[0, :, 0, 0]
        s = np.asarray(suppress_irrelevant(x))[0, :, 0, 0]
        neg = np.asarray(x)[0, :, 0, 0] < 0
        np.testing.assert_array_equal(d[neg], 0.0)
        np.testing.assert_array_equal(s[neg], 0.0)
        assert np.all(
            np.isfinite(np.asarray(jax.grad(lambda v: suppress_discriminative(v).sum())(x)))
        )


def test_hyper_parameters_are_validated():
    f = jnp.ones((1, 2, 2, 1))
    for bad in (dict(cr=0.0), dict(cr=1.5), dict(alpha=0.0), dict(alpha=2.0)):
        with pytest.raises(ValueError):
            suppress_discriminative(f, **bad)
    with pytest.raises(ValueError):
        suppress_irrelevant(f, t=-0.1)


# ---------------------------------------------------------------- branch 2: suppress_irrelevant


@pytest.mark.parametrize("shape", [(2, 6, 7, 3), (2, 3, 4, 5, 3)])
def test_irrelevant_matches_formula_and_properties(shape):
    f = relu_features(shape, seed=8)
    s = np.asarray(suppress_irrelevant(jnp.asarray(f), t=0.4))
    np.testing.assert_array_equal(s, ref_irrelevant(f, 0.4))
    thr = 0.4 * f.max(axis=spatial_axes(f), keepdims=True)
    assert np.all(s[f < thr] == 0) and np.all(s[f >= thr] == f[f >= thr])


def test_irrelevant_gradient_is_the_keep_mask():
    f = relu_features((2, 5, 6, 3), seed=9)
    w = np.random.default_rng(10).normal(size=f.shape).astype(np.float32)
    grad = np.asarray(jax.grad(lambda x: jnp.sum(w * suppress_irrelevant(x, 0.4)))(jnp.asarray(f)))
    keep = f >= 0.4 * f.max(axis=(1, 2), keepdims=True)
    np.testing.assert_array_equal(grad, np.where(keep, w, 0))
    f[0, ..., 1] = 0.0  # all-zero channel: finite, output 0
    value, grad = jax.value_and_grad(lambda x: jnp.sum(suppress_irrelevant(x)))(jnp.asarray(f))
    assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------- module


@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (2, 3, 4, 5, 3)])
def test_module_matches_reference(shape):
    f = relu_features(shape, seed=11)
    model = ThresholdSuppression(cr=0.7, alpha=0.6, t=0.3)
    params = random_params(model, f, seed=12)
    got = jax.jit(model.apply)(params, jnp.asarray(f))
    assert got.shape == f.shape
    want = ref_module(f.astype(np.float64), params["params"], 0.7, 0.6, 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_module_parameter_shapes():
    model = ThresholdSuppression()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 6)))["params"]
    assert shapes["squeeze"]["kernel"].shape == (12, 6)
    assert shapes["excite"]["kernel"].shape == (6, 12)
    assert shapes["project"]["kernel"].shape == (1, 1, 12, 6)


# ---------------------------------------------------------------- check_grads


def test_check_grads_branch_functions():
    with jax.enable_x64(True):
        for shape in [(2, 4, 5, 3), (1, 3, 3, 4, 2)]:
            free, anchor = away_from_thresholds(shape, seed=13, cr=0.8, t=0.4)
            for fn in (
                lambda x: suppress_discriminative(x, 0.8, 0.8),
                lambda x: suppress_irrelevant(x, 0.4),
            ):
                check_grads(
                    jax.jit(lambda z: fn(with_anchor(z, anchor))),
                    (jnp.asarray(free),),
                    order=1,
                    modes=("fwd", "rev"),
                )


@pytest.mark.parametrize("shape", [(2, 4, 5, 3), (1, 3, 3, 4, 2)])
def test_check_grads_module(shape):
    with jax.enable_x64(True):
        free, anchor = away_from_thresholds(shape, seed=14, cr=0.8, t=0.4)
        model = ThresholdSuppression(param_dtype=jnp.float64)
        params = random_params(model, with_anchor(free, anchor), seed=15)
        fn = jax.jit(lambda p, z: model.apply(p, with_anchor(z, anchor)))
        check_grads(fn, (params, jnp.asarray(free)), order=1, modes=("fwd", "rev"))


# ---------------------------------------------------------------- dtypes and transforms


@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (1, 3, 4, 5, 4)])
def test_bfloat16_forward_is_finite(shape):
    f = relu_features(shape, seed=16)
    model = ThresholdSuppression(dtype=jnp.bfloat16)
    params = random_params(model, f, seed=17)
    y = jax.jit(model.apply)(params, jnp.asarray(f))
    assert y.dtype == jnp.bfloat16 and y.shape == f.shape
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    y32 = jax.jit(model.clone(dtype=None).apply)(params, jnp.asarray(f))
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=5e-2, atol=5e-2)
    fb = jnp.asarray(f, jnp.bfloat16)
    for out in (suppress_discriminative(fb), suppress_irrelevant(fb)):
        assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_jit_and_vmap():
    f = relu_features((3, 2, 5, 4, 3), seed=18)  # vmap axis of 3, each a (2, 5, 4, 3) batch
    model = ThresholdSuppression()
    params = random_params(model, f[0], seed=19)
    per_slice = np.stack([jax.jit(model.apply)(params, jnp.asarray(fi)) for fi in f])
    np.testing.assert_allclose(
        model.apply(params, jnp.asarray(f[0])), per_slice[0], rtol=1e-5, atol=1e-6
    )  # eager
    vmapped = jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))(params, jnp.asarray(f))
    np.testing.assert_allclose(vmapped, per_slice, rtol=1e-5, atol=1e-6)
    both = jax.vmap(lambda x: suppress_discriminative(x) + suppress_irrelevant(x))
    branches = both(jnp.asarray(f))
    want = np.stack(
        [ref_discriminative(fi, 0.8, 0.8) + ref_irrelevant(fi, 0.4) for fi in f.astype(np.float64)]
    )
    np.testing.assert_allclose(branches, want, rtol=1e-5, atol=1e-6)
