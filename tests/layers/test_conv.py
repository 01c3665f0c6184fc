"""`jaxmed.layers.conv` / `Conv`: the depth-folded 3-D convolution equals the definition.

References: a NumPy float64 convolution written from its definition (`numpy_conv`), XLA's own
3-D convolution, and `flax.linen.Conv` for the module.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmed.layers import BlockConvTranspose, Conv, conv
from jaxmed.layers._conv import _depth_folded, _native
from tests.layers.test_tensor_train import numpy_conv

CASES = [
    # spatial, kernel, strides, padding, dilation
    ((6, 5, 7), (3, 3, 3), (1, 1, 1), "SAME", (1, 1, 1)),
    ((6, 5, 7), (3, 3, 3), (2, 2, 2), "SAME", (1, 1, 1)),
    ((7, 6, 5), (3, 1, 2), (2, 1, 1), "VALID", (1, 1, 1)),
    ((8, 5, 6), (2, 3, 3), (1, 2, 1), ((1, 2), (0, 1), (2, 0)), (1, 1, 1)),
    ((9, 6, 6), (3, 3, 3), (1, 1, 1), "SAME", (2, 1, 2)),
    ((5, 4, 4), (1, 1, 1), (1, 1, 1), "SAME", (1, 1, 1)),
    ((6, 7), (3, 3), (2, 1), "SAME", (1, 1)),
    ((9,), (3,), (2,), "VALID", (1,)),
]


def _data(spatial, kernel, c_in=3, c_out=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, *spatial, c_in)).astype(np.float32)
    k = rng.normal(size=(*kernel, c_in, c_out)).astype(np.float32)
    return x, k


@pytest.mark.parametrize("spatial, kernel, strides, padding, dilation", CASES)
def test_conv_equals_definition(spatial, kernel, strides, padding, dilation):
    x, k = _data(spatial, kernel)
    expected = numpy_conv(x.astype(np.float64), k.astype(np.float64), strides, padding, dilation)
    got = jax.jit(lambda x, k: conv(x, k, strides, padding, dilation))(x, k)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "spatial, kernel, strides, padding, dilation", [c for c in CASES if len(c[0]) == 3]
)
def test_folded_and_native_paths_agree(spatial, kernel, strides, padding, dilation):
    """Both branches of the platform choice, called directly, whatever platform runs the test."""
    x, k = _data(spatial, kernel)
    nsp = len(spatial)
    window = [(n - 1) * d + 1 for n, d in zip(kernel, dilation)]
    pads = (
        padding
        if not isinstance(padding, str)
        else jax.lax.padtype_to_pads(spatial, window, strides, padding)
    )
    args = dict(strides=strides, pads=tuple(map(tuple, pads)), dilation=dilation, precision=None)
    folded, native = _depth_folded(x, k, **args), _native(x, k, **args)
    assert folded.shape == native.shape == (2, *folded.shape[1:nsp + 1], 4)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(native), rtol=1e-4, atol=1e-4)


def _convolution_ranks(hlo: str) -> set[int]:
    """Spatial ranks of the convolutions in StableHLO text (`dim_numbers = [b, 0, 1, f]x...`)."""
    ranks = set()
    for part in hlo.split("dim_numbers = [")[1:]:
        ranks.add(sum(tok.strip().isdigit() for tok in part.split("]", 1)[0].split(",")))
    return ranks


def test_cpu_lowering_has_only_2d_convolutions():
    x, k = _data((4, 4, 4), (3, 3, 3))
    forward = jax.jit(lambda x, k: conv(x, k)).lower(x, k).as_text()
    backward = (
        jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), (0, 1))).lower(x, k).as_text()
    )
    native = (
        jax.jit(lambda x, k: _native(x, k, (1,) * 3, ((1, 1),) * 3, (1,) * 3, None))
        .lower(x, k)
        .as_text()
    )
    assert _convolution_ranks(native) == {3}  # the parser sees 3-D convolutions when they are there
    assert _convolution_ranks(forward) == {2}
    assert _convolution_ranks(backward) == {2}


def test_gradients_3d():
    """Second order too: the gradient penalty differentiates through the critic's convolutions."""
    x, k = _data((4, 3, 5), (3, 2, 3), c_in=2, c_out=2)
    with jax.enable_x64(True):
        x, k = jnp.asarray(x, jnp.float64), jnp.asarray(k, jnp.float64)
        check_grads(jax.jit(lambda x, k: jnp.tanh(conv(x, k, (2, 1, 1), "SAME"))), (x, k), order=2,
                    modes=("fwd", "rev"))


def test_bad_kernel_is_rejected():
    x, k = _data((4, 4, 4), (3, 3), c_in=3)
    with pytest.raises(ValueError, match="does not fit input"):
        conv(x, k)


@pytest.mark.parametrize(
    "spatial, kernel, strides, padding",
    [
        ((6, 5, 4), (3, 3, 3), 1, "SAME"),
        ((6, 5, 4), (3, 3, 1), (2, 1, 1), "VALID"),
        ((6, 5), (3, 3), 2, "SAME"),
    ],
)
def test_module_is_a_drop_in_for_flax_conv(spatial, kernel, strides, padding):
    x, _ = _data(spatial, kernel)
    ours = Conv(5, kernel, strides=strides, padding=padding)
    theirs = nn.Conv(5, kernel, strides=strides, padding=padding)
    variables = theirs.init(jax.random.key(0), x)
    mine = ours.init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, mine) == jax.tree.map(np.shape, variables)
    jax.tree.map(np.testing.assert_array_equal, mine, variables)  # same initialisers, same values
    np.testing.assert_allclose(
        np.asarray(ours.apply(variables, x)),
        np.asarray(theirs.apply(variables, x)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_module_dtypes():
    x, _ = _data((4, 4, 4), (3, 3, 3))
    layer = Conv(4, (3, 3, 3), use_bias=False, dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    assert "bias" not in variables["params"]
    assert variables["params"]["kernel"].dtype == jnp.float32
    y = layer.apply(variables, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 4, 4, 4, 4)
    assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize(
    "spatial, factors", [((3, 4, 2), (2, 2, 2)), ((3, 5), (2, 3)), ((4,), (3,))]
)
@pytest.mark.parametrize("use_bias", [True, False])
def test_block_conv_transpose_equals_flax(spatial, factors, use_bias):
    x, _ = _data(spatial, factors)
    ours = BlockConvTranspose(5, factors, use_bias=use_bias)
    theirs = nn.ConvTranspose(5, factors, strides=factors, padding="SAME", use_bias=use_bias)
    variables = theirs.init(jax.random.key(0), x)
    mine = ours.init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, mine) == jax.tree.map(np.shape, variables)
    variables = jax.tree.map(
        lambda v: v + jnp.asarray(np.random.default_rng(1).normal(size=v.shape), v.dtype), variables
    )  # bias non-zero too
    got = ours.apply(variables, x)
    assert got.shape == (2, *(n * f for n, f in zip(spatial, factors)), 5)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(theirs.apply(variables, x)), rtol=1e-4, atol=1e-4
    )


def test_block_conv_transpose_definition():
    """Output voxel s i + a is x[i] @ kernel[s - 1 - a], written out with loops."""
    x, _ = _data((2, 3), (2, 2), c_in=3)
    layer = BlockConvTranspose(4, (2, 3), use_bias=False)
    variables = layer.init(jax.random.key(1), x)
    k = np.asarray(variables["params"]["kernel"], np.float64)
    expected = np.zeros((2, 4, 9, 4))
    for i, j, a, b in np.ndindex(2, 3, 2, 3):
        expected[:, 2 * i + a, 3 * j + b] = x[:, i, j].astype(np.float64) @ k[1 - a, 2 - b]
    np.testing.assert_allclose(
        np.asarray(layer.apply(variables, x)), expected, rtol=1e-5, atol=1e-5
    )
