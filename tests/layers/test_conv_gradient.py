"""The patch-product kernel gradient of `jaxmed.layers.conv` (`conv_gradient`).

Reference: `lax.conv_general_dilated` and JAX's own autodiff of it (`_native`), for values,
first and second derivatives, 1-D to 3-D, strides, dilations and padding modes, float32 and
bfloat16, under jit and vmap. `'patches'` forces the patch product on every shape, so every
geometry is checked, not only those `'auto'` picks.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmed.layers import Conv, _conv, conv, conv_gradient
from jaxmed.layers._conv import _native, _patches_pay_off

CASES = [
    # spatial, kernel, strides, padding, dilation
    ((9, 10), (3, 3), (1, 1), "SAME", (1, 1)),
    ((9, 10), (3, 2), (2, 2), "VALID", (1, 1)),
    ((11, 10), (3, 3), (2, 1), ((1, 2), (0, 1)), (2, 3)),
    ((9, 10), (3, 3), (1, 1), ((-1, 2), (1, -1)), (1, 1)),
    ((8, 8), (1, 1), (2, 2), "SAME", (1, 1)),
    ((11,), (5,), (3,), "SAME", (2,)),
    ((6, 7, 8), (3, 3, 3), (2, 1, 1), "SAME", (1, 1, 2)),
    ((5, 6, 4), (1, 1, 1), (1, 1, 1), "VALID", (1, 1, 1)),
]


def _data(spatial, kernel, dtype=jnp.float32, c_in=3, c_out=4, batch=2):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *spatial, c_in)), dtype)
    k = jnp.asarray(rng.normal(size=(*kernel, c_in, c_out)) / np.sqrt(np.prod(kernel) * c_in),
                    dtype)
    return x, k


def _pads(x, kernel, strides, padding, dilation):
    if not isinstance(padding, str):
        return tuple(padding)
    window = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:-2], dilation)]
    return tuple(jax.lax.padtype_to_pads(x.shape[1:-1], window, strides, padding))


def _loss(conv_fn):
    """A non-linear scalar of the convolution, so that gradients see every output."""
    return lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k)).astype(jnp.float32) ** 2)


@pytest.mark.parametrize("spatial, kernel, strides, padding, dilation", CASES)
def test_patch_gradient_equals_xla_autodiff(spatial, kernel, strides, padding, dilation):
    x, k = _data(spatial, kernel)
    pads = _pads(x, k, strides, padding, dilation)
    reference = jax.jit(jax.grad(_loss(lambda x, k: _native(x, k, strides, pads, dilation, None)),
                                 (0, 1)))(x, k)
    with conv_gradient("patches"):
        value = jax.jit(lambda x, k: conv(x, k, strides, padding, dilation))(x, k)
        grads = jax.jit(jax.grad(_loss(lambda x, k: conv(x, k, strides, padding, dilation)),
                                 (0, 1)))(x, k)
    np.testing.assert_allclose(value, _native(x, k, strides, pads, dilation, None),
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[6]])
def test_numerical_gradients_forward_and_reverse_to_second_order(case):
    """`check_grads` against finite differences: forward mode, reverse mode, second order."""
    spatial, kernel, strides, padding, dilation = case
    x, k = _data(spatial, kernel, dtype=jnp.float64 if jax.config.x64_enabled else jnp.float32)
    with conv_gradient("patches"):
        check_grads(lambda x, k: conv(x, k, strides, padding, dilation), (x, k), order=2,
                    modes=("fwd", "rev"), atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("chunk_rows", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_blocked_kernel_gradient_with_many_chunks_per_image(case, chunk_rows, monkeypatch):
    """The kernel gradient's loop over chunks of output rows, with chunks of 1 and of 3 rows
    (the last one partly past the output) instead of the ~4 MiB of a real layer."""
    spatial, kernel, strides, padding, dilation = case
    x, k = _data(spatial, kernel)
    pads = _pads(x, k, strides, padding, dilation)
    native = functools.partial(_native, strides=strides, pads=pads, dilation=dilation,
                               precision=None)
    out = jax.eval_shape(native, x, k).shape
    # One row of `P` of the 2-D convolution `_kernel_gradient` sees (3-D: depth-folded).
    rest = out[2:-1] if len(spatial) < 3 else out[3:-1]
    monkeypatch.setattr(_conv, "_CHUNK_BYTES", chunk_rows * math.prod(rest) * k[..., 0].size * 4)
    monkeypatch.setattr(_conv, "_WHOLE_P_BYTES", 0)
    reference = jax.grad(_loss(native), 1)(x, k)
    with conv_gradient("patches"):
        got = jax.jit(jax.grad(_loss(lambda x, k: conv(x, k, strides, padding, dilation)), 1))(x, k)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)


def test_gradient_penalty_grad_of_grad_equals_xla():
    """The WGAN-GP shape: the gradient of the input gradient's norm with respect to the kernel."""
    x, k = _data((8, 8), (3, 3))

    def penalty(k, x):
        input_grad = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, k, 2, "SAME")) ** 2))(x)
        return jnp.sum((jnp.sqrt(jnp.sum(input_grad ** 2, axis=(1, 2, 3))) - 1.0) ** 2)

    results = {}
    for mode in ("xla", "patches"):
        with conv_gradient(mode):
            results[mode] = jax.jit(jax.grad(penalty))(k, x)
    np.testing.assert_allclose(results["patches"], results["xla"], rtol=1e-4, atol=1e-6)


def test_vmap_over_kernels_and_inputs():
    x, k = _data((7, 6), (3, 3))
    xs, ks = jnp.stack([x, 2 * x, -x]), jnp.stack([k, -k, 0.5 * k])

    def grads(x, k):
        return jax.grad(_loss(lambda x, k: conv(x, k, 1, "SAME")), (0, 1))(x, k)

    with conv_gradient("patches"):
        batched = jax.jit(jax.vmap(grads))(xs, ks)
    for i in range(3):
        want = jax.grad(_loss(lambda x, k: _native(x, k, (1, 1), ((1, 1), (1, 1)), (1, 1), None)),
                        (0, 1))(xs[i], ks[i])
        for got, ref in zip(batched, want):
            np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=1e-5)


def test_bfloat16_gradient_matches_float32_within_bfloat16_rounding():
    x, k = _data((9, 10), (3, 3), c_in=8, c_out=8)
    with conv_gradient("patches"):
        low = jax.jit(jax.grad(_loss(lambda x, k: conv(x, k)), (0, 1)))(
            x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    want = jax.grad(_loss(lambda x, k: conv(x, k)), (0, 1))(x, k)
    for got, ref in zip(low, want):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=0.05 * scale)


def test_module_training_gradient_equals_flax_conv():
    """`Conv` under every mode gives Flax's `nn.Conv` gradients for the same parameters."""
    x, _ = _data((10, 9), (3, 3))
    flax_conv = nn.Conv(5, (3, 3), strides=2, padding="SAME")
    params = flax_conv.init(jax.random.PRNGKey(0), x)

    def loss(module):
        return lambda p: jnp.sum(jnp.tanh(module.apply(p, x)) ** 2)

    want = jax.grad(loss(flax_conv))(params)
    for mode in ("auto", "xla", "patches"):
        with conv_gradient(mode):
            got = jax.jit(jax.grad(loss(Conv(5, (3, 3), strides=2, padding="SAME"))))(params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     got, want)


def test_auto_uses_the_patch_product_only_where_measured_faster():
    # `benchmarks/conv_gradient.py`'s layers: where its table shows the patch product faster,
    # and where it shows XLA's gradient faster or even.
    def picks(x_shape, kernel_shape, strides=(1, 1), dilation=(1, 1)):
        window = [(k - 1) * d + 1 for k, d in zip(kernel_shape[:2], dilation)]
        pads = jax.lax.padtype_to_pads(x_shape[1:3], window, strides, "SAME")
        return _patches_pay_off(x_shape, kernel_shape, strides, tuple(pads), dilation, 4)

    assert picks((2, 64, 64, 256), (1, 1, 256, 64))  # ResNet-50 bottleneck 1x1
    assert picks((2, 64, 64, 256), (1, 1, 256, 512), strides=(2, 2))  # downsampling 1x1
    assert picks((4, 56, 56, 256), (3, 3, 256, 256))  # VGG16 conv3
    assert picks((2, 32, 32, 512), (3, 3, 512, 512), dilation=(4, 4))  # dilated layer4
    assert picks((4, 224, 224, 64), (3, 3, 64, 64))  # VGG16 conv1_2
    assert picks((8, 56, 56, 64), (3, 3, 64, 64))  # ResNet-18 layer1 on tiles
    assert picks((64, 512, 512, 64), (1, 1, 64, 64))  # P is x: no size limit
    assert not picks((2, 32, 32, 128), (3, 3, 128, 128))  # too little work: XLA is as fast
    assert not picks((2, 64, 64, 64), (3, 3, 64, 64))
    assert not picks((4, 14, 14, 512), (3, 3, 512, 512))  # 784 positions
    assert not picks((4, 224, 224, 3), (3, 3, 3, 64))  # RGB input layer
    assert not picks((16, 64, 64, 32), (3, 3, 32, 32))  # few channels: 0.6x


def test_the_patch_product_is_in_the_compiled_gradient_only_on_request():
    x, k = _data((8, 8), (1, 1), c_in=16, c_out=16)
    grad = jax.grad(_loss(lambda x, k: conv(x, k)), 1)
    texts = {}
    for mode in ("xla", "auto"):
        with conv_gradient(mode):
            texts[mode] = jax.jit(lambda x, k: grad(x, k)).lower(x, k).as_text()
    # XLA's kernel gradient is a second convolution; the patch product is a dot instead.
    assert texts["xla"].count("stablehlo.convolution") == 2
    assert "dot_general" not in texts["xla"]
    assert texts["auto"].count("stablehlo.convolution") == 1
    assert "stablehlo.dot_general" in texts["auto"]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="conv_gradient mode"):
        with conv_gradient("fast"):
            pass
