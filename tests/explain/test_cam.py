"""CAM, Grad-CAM and map resizing against independent references: OpenCV's resize, the
WSOL evaluation's post-processing written out in NumPy, and Grad-CAM computed by hand with
`jax.grad` on a model split at the explained layer."""

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.explain._cam import cam, grad_cam, resize_maps
from jaxmed.models.vgg_cam import VGGCAM, cam_weights

KEY = jax.random.key(0)
CV2 = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR}


def _rng(seed=0):
    return np.random.default_rng(seed)


# --- NumPy / OpenCV references ---------------------------------------------------------------


def cv2_resize(maps, size, method):
    """2-D: cv2.resize per map; 3-D: cv2 over (h, w) per slice, then over (d, H·W) (cv2 along
    one axis is exact identity along an axis whose size is unchanged)."""
    flag = CV2[method]
    if maps.ndim == 3:
        return np.stack([cv2.resize(m, (size[1], size[0]), interpolation=flag) for m in maps])
    out = []
    for vol in maps:  # vol: [d, h, w]
        planes = np.stack([cv2.resize(p, (size[2], size[1]), interpolation=flag) for p in vol])
        flat = cv2.resize(
            planes.reshape(len(vol), -1), (size[1] * size[2], size[0]), interpolation=flag
        )
        out.append(flat.reshape(size))
    return np.stack(out)


def wsol_normalize(m):
    """wsolevaluation's normalize_scoremap."""
    m = m.astype(np.float64).copy()
    if np.isnan(m).any() or m.min() == m.max():
        return np.zeros_like(m)
    m -= m.min()
    return m / m.max()


def np_grad_cam(a, g):
    """Grad-CAM of one sample from its activation a and gradient g (both (*S, C)), normalised
    as pytorch-grad-cam's scale_cam_image."""
    w = g.reshape(-1, g.shape[-1]).mean(axis=0)
    m = np.maximum((a * w).sum(axis=-1), 0)
    m = m - m.min()
    return m / (1e-7 + m.max())


# --- resize_maps ------------------------------------------------------------------------------

SIZES = [((7, 9), (28, 33)), ((14, 14), (224, 224)), ((20, 17), (6, 5)), ((16, 16), (8, 8)),
         ((30, 30), (7, 7)), ((5, 40), (13, 7)), ((1, 5), (4, 9)), ((9, 11), (9, 11))]


@pytest.mark.parametrize("method", ["cubic", "linear"])
@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_resize_matches_opencv(size_in, size_out, method):
    maps = _rng().normal(size=(2, *size_in)).astype(np.float32)
    got = resize_maps(maps, size_out, method=method)
    assert got.shape == (2, *size_out) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, cv2_resize(maps, size_out, method), atol=2e-6, rtol=0)


@pytest.mark.parametrize("method", ["cubic", "linear"])
def test_resize_3d_is_separable_opencv(method):
    maps = _rng(1).normal(size=(2, 4, 6, 5)).astype(np.float32)
    for size in [(9, 12, 7), (2, 3, 3)]:
        got = resize_maps(maps, size, method=method)
        np.testing.assert_allclose(got, cv2_resize(maps, size, method), atol=2e-6, rtol=0)


def test_resize_jit_int_size_and_errors():
    maps = _rng(2).normal(size=(3, 6, 6)).astype(np.float32)
    jitted = jax.jit(lambda m: resize_maps(m, 10))(maps)
    np.testing.assert_allclose(jitted, cv2_resize(maps, (10, 10), "cubic"), atol=2e-6)
    assert resize_maps(np.ones((1, 4, 4), np.int32), (8, 8)).dtype == jnp.float32
    with pytest.raises(ValueError, match="method"):
        resize_maps(maps, 10, method="area")
    with pytest.raises(ValueError, match="size"):
        resize_maps(maps, (10, 10, 10))


# --- cam --------------------------------------------------------------------------------------


def test_cam_matches_the_wsol_protocol():
    """Σ_k W[k, c] A_k (NumPy einsum), cv2 bicubic to the image, normalize_scoremap."""
    rng = _rng(3)
    feats = np.maximum(rng.normal(size=(3, 7, 7, 10)), 0).astype(np.float32)
    weights = rng.normal(size=(10, 5)).astype(np.float32)
    classes = np.array([4, 0, 2])
    raw = np.einsum("bhwk,kb->bhw", feats, weights[:, classes])
    np.testing.assert_allclose(
        cam(feats, weights, classes, normalize=False), raw, rtol=1e-5, atol=1e-5
    )

    resized = cv2_resize(raw.astype(np.float32), (56, 60), "cubic")
    expected = np.stack([wsol_normalize(m) for m in resized])
    got = cam(feats, weights, classes, image_size=(56, 60))
    assert got.shape == (3, 56, 60) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, atol=2e-5)

    linear = cam(feats, weights, classes, image_size=(56, 60), method="linear")
    np.testing.assert_allclose(
        linear,
        np.stack(
            [wsol_normalize(m) for m in cv2_resize(raw.astype(np.float32), (56, 60), "linear")]
        ),
        atol=2e-5,
    )


def test_cam_degenerate_maps_scalar_class_and_3d():
    rng = _rng(4)
    feats = rng.normal(size=(3, 4, 4, 6)).astype(np.float32)
    feats[1] = 1.0  # constant features -> a constant map
    feats[2, 0, 0, 0] = np.nan
    weights = rng.normal(size=(6, 2)).astype(np.float32)
    got = np.asarray(cam(feats, weights, 1, image_size=(8, 8)))
    assert np.all(got[1] == 0) and np.all(got[2] == 0)
    assert got[0].min() == 0 and got[0].max() == pytest.approx(1)

    vol = rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float32)
    raw = np.einsum("bdhwk,kb->bdhw", vol, weights[:, [1, 0]])
    expected = np.stack(
        [wsol_normalize(m) for m in cv2_resize(raw.astype(np.float32), (6, 8, 10), "linear")]
    )
    got = cam(vol, weights, jnp.array([1, 0]), image_size=(6, 8, 10), method="linear")
    np.testing.assert_allclose(got, expected, atol=2e-5)


# --- grad_cam ---------------------------------------------------------------------------------


def jit_grad_cam(model, variables, x, **kw):
    """grad_cam compiled as one program (faster to compile than its eager op-by-op run)."""
    return jax.jit(lambda v, x: grad_cam(model, v, x, **kw))(variables, x)


class _Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (3,) * (x.ndim - 2), name="conv")(x))


class _Body(nn.Module):
    @nn.compact
    def __call__(self, x):
        n = x.ndim - 2
        x = _Block(4, name="block1")(x)
        x = nn.max_pool(x, (2,) * n, strides=(2,) * n)
        return _Block(6, name="block2")(x)  # A: [B, *S / 2, 6]


class _Head(nn.Module):
    """Non-linear and position-mixing, so Grad-CAM has no closed form here."""

    @nn.compact
    def __call__(self, a):
        h = jnp.tanh(nn.Conv(5, (3,) * (a.ndim - 2), name="conv")(a))
        return nn.Dense(3, name="fc")(jnp.mean(h**2, axis=tuple(range(1, a.ndim - 1))))


class SplitNet(nn.Module):
    def setup(self):
        self.body = _Body()
        self.head = _Head()

    def __call__(self, x):
        return {"logits": self.head(self.body(x)), "aux": jnp.zeros(())}

    def features(self, x):
        return self.body(x)

    def classify(self, a):
        return self.head(a)


@pytest.fixture(scope="module", params=["2d", "3d"])
def split(request):
    shape = (3, 8, 10, 2) if request.param == "2d" else (3, 6, 8, 4, 2)
    x = jnp.asarray(_rng(5).normal(size=shape), jnp.float32)
    model = SplitNet()
    return model, jax.jit(model.init)(KEY, x), x


def _manual(model, variables, x, classes):
    """Activations and d logit_c / dA computed on the model split by hand, one sample at a time."""
    a = model.apply(variables, x, method=SplitNet.features)

    def logit(ai, c):
        return model.apply(variables, ai[None], method=SplitNet.classify)[0, c]

    grads = [jax.grad(logit)(a[i], c) for i, c in enumerate(classes)]
    return np.asarray(a), np.asarray(grads)


def test_grad_cam_matches_manual_split_2d_and_3d(split):
    model, variables, x = split
    classes = np.array([2, 0, 1])
    a, g = _manual(model, variables, x, classes)
    expected = np.stack([np_grad_cam(a[i], g[i]) for i in range(3)])
    got = jit_grad_cam(model, variables, x, layer="body", target=classes, output="logits",
                       image_size=a.shape[1:-1])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # A nested path: the body's last block outputs the same activation.
    nested = jit_grad_cam(model, variables, x, layer="body/block2", target=classes, output="logits",
                          image_size=a.shape[1:-1])
    np.testing.assert_allclose(nested, got, atol=1e-6)

    # Default size: the input's spatial size, by OpenCV-style bilinear resizing.
    full = jit_grad_cam(model, variables, x, layer="body", target=classes, output="logits")
    assert full.shape == (3, *x.shape[1:-1])
    reference = cv2_resize(expected.astype(np.float32), x.shape[1:-1], "linear")
    np.testing.assert_allclose(full, reference, atol=1e-5)


def test_per_sample_targets_and_batch_equal_one_by_one(split):
    model, variables, x = split
    kw = dict(layer="body", output="logits")
    classes = jnp.array([1, 2, 0])
    batched = jit_grad_cam(model, variables, x, target=classes, **kw)
    for i in range(3):  # eager, one image at a time
        single = grad_cam(model, variables, x[i:i + 1], target=int(classes[i]), **kw)
        np.testing.assert_allclose(batched[i:i + 1], single, atol=1e-6)
    as_callable = jit_grad_cam(model, variables, x, target=lambda out, i: out[classes[i]], **kw)
    np.testing.assert_allclose(as_callable, batched, atol=1e-6)
    # A callable sees the whole output when no key is selected.
    on_dict = jit_grad_cam(
        model, variables, x, layer="body", target=lambda out, i: out["logits"][classes[i]]
    )
    np.testing.assert_allclose(on_dict, batched, atol=1e-6)


def test_any_output_node():
    """A callable target: the difference of two logits (its gradient is the difference)."""
    model = SplitNet()
    x = jnp.asarray(_rng(6).normal(size=(2, 8, 8, 2)), jnp.float32)
    variables = model.init(KEY, x)
    a, g0 = _manual(model, variables, x, [0, 0])
    _, g2 = _manual(model, variables, x, [2, 2])
    expected = np.stack([np_grad_cam(a[i], g2[i] - g0[i]) for i in range(2)])
    got = jit_grad_cam(model, variables, x, layer="body", output="logits",
                       target=lambda out, i: out[2] - out[0], image_size=(4, 4))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_grad_cam_is_relu_of_cam_for_a_gap_dense_head():
    """VGG-CAM at conv6 (then GAP + Dense): dy_c/dA_k = W[k, c] / N at every position, so
    Grad-CAM = ReLU(CAM) / N, normalised."""
    model = VGGCAM(3, widths=(2, 2, 4, 4, 4), conv6_width=8)
    x = jnp.asarray(_rng(7).normal(size=(2, 64, 64, 3)), jnp.float32)
    variables = jax.jit(model.init)(KEY, x)
    classes = np.array([2, 1])
    features = np.asarray(model.apply(variables, x)["features"], np.float64)  # [2, 4, 4, 8]
    raw = np.einsum("bhwk,kb->bhw", features, np.asarray(cam_weights(variables))[:, classes])
    n = raw[0].size  # 4 × 4 positions
    expected = np.stack(
        [np_grad_cam(np.maximum(m, 0)[..., None] / n, np.ones((1, 1))) for m in raw]
    )
    got = jit_grad_cam(
        model,
        variables,
        x,
        layer="conv6",
        target=classes,
        output="logits",
        image_size=(4, 4),
        apply_kwargs={"train": False},
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)
    relu_cam = np.maximum(raw, 0)
    assert np.all((np.asarray(got) > 0) == (relu_cam > relu_cam.min(axis=(1, 2), keepdims=True)))


def test_grad_cam_errors(split):
    model, variables, x = split
    with pytest.raises(ValueError, match=r"'nope'.*available: body, body/block1, body/block1/conv"):
        grad_cam(model, variables, x, layer="nope", target=0, output="logits")
    with pytest.raises(ValueError, match="output='<key>'"):
        grad_cam(model, variables, x, layer="body", target=0)
    with pytest.raises(ValueError, match="scalar"):
        grad_cam(model, variables, x, layer="body", target=lambda out, i: out, output="logits")
    with pytest.raises(ValueError, match="target must be"):
        grad_cam(model, variables, x, layer="body", target=0.5, output="logits")

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            block = _Block(2, name="shared")
            return jnp.mean(block(block(x)), axis=(1, 2))

    images = jnp.ones((1, 4, 4, 2))
    with pytest.raises(ValueError, match="called 2 times"):
        grad_cam(Twice(), Twice().init(KEY, images), images, layer="shared", target=0)
