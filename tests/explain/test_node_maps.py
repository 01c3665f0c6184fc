"""Node values and per-node heat maps against an independent NumPy reference: a tiny
FeatureClassifier's forward and backward passes written out by hand (convs as sums over the
kernel taps, ReLU masks and their guided / deconvnet variants, max-pool switches, dense
layers), OpenCV's bilinear resize; CAM's sum rule; vmap against a loop; jit against eager;
bad inputs."""

import functools

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.explain import (
    METHODS,
    deconvnet_relu,
    guided_relu,
    layer_outputs,
    node_heatmaps,
    node_values,
)
from jaxmed.models.feature_classifier import FeatureClassifier

SIZE = 8
MODEL = FeatureClassifier(filters=(2, 3), hidden=4, num_classes=3)
# Dense nodes of both dense layers and spatial nodes of two conv layers, deliberately mixed.
NODES = [("fc", 2), ("block2_conv1", 1), ("fc", 0), ("logits", 1), ("fc", 3)]
FC_NODES = [("fc", 3), ("fc", 0), ("fc", 1)]


@pytest.fixture(scope="module")
def tiny():
    images = np.random.default_rng(0).uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    variables = jax.jit(MODEL.init)(jax.random.key(1), images[:1])
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), variables["params"])
    return variables, jnp.asarray(images), Reference(params), images.astype(np.float64)


def jitted(nodes, **kw):
    """node_heatmaps of the tiny model, jitted once per configuration."""
    return _jitted(tuple(nodes), tuple(sorted(kw.items())))


@functools.cache
def _jitted(nodes, kw):
    return jax.jit(functools.partial(node_heatmaps, MODEL, nodes=list(nodes), **dict(kw)))


# --- NumPy reference ------------------------------------------------------------------------


class Reference:
    """The tiny network in NumPy: `tensors[i]` is the input of op i (`tensors[0]` the image);
    `out_index[name]` is where a named module's (pre-activation) output sits."""

    def __init__(self, params):
        self.params = params
        self.ops = []
        for block in (1, 2):
            for i in (1, 2):
                self.ops += [("conv", f"block{block}_conv{i}"), ("act", None)]
            self.ops.append(("pool", None))
        self.ops += [("flatten", None), ("dense", "fc"), ("act", None), ("dense", "logits")]
        self.out_index = {name: i + 1 for i, (_, name) in enumerate(self.ops) if name}

    def forward(self, image):
        tensors = [image]
        for kind, name in self.ops:
            x = tensors[-1]
            if kind == "conv":
                kernel, bias = self.params[name]["kernel"], self.params[name]["bias"]
                padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
                y = np.zeros((*x.shape[:2], kernel.shape[-1])) + bias
                for di in range(3):
                    for dj in range(3):
                        y += padded[di:di + x.shape[0], dj:dj + x.shape[1]] @ kernel[di, dj]
            elif kind == "act":
                y = np.maximum(x, 0)
            elif kind == "pool":
                h, w, c = x.shape
                y = x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))
            elif kind == "flatten":
                y = x.reshape(-1)
            else:
                y = x @ self.params[name]["kernel"] + self.params[name]["bias"]
            tensors.append(y)
        return tensors

    def backward(self, tensors, grad, start, stop, rule):
        """The gradient at `tensors[stop]` from `grad` at `tensors[start]`; `rule` is the
        activation's backward: 'relu', 'guided' or 'deconvnet'."""
        for i in range(start - 1, stop - 1, -1):
            kind, name = self.ops[i]
            x = tensors[i]
            if kind == "conv":
                kernel = self.params[name]["kernel"]
                padded = np.zeros((x.shape[0] + 2, x.shape[1] + 2, x.shape[2]))
                for di in range(3):
                    for dj in range(3):
                        padded[di:di + x.shape[0], dj:dj + x.shape[1]] += grad @ kernel[di, dj].T
                grad = padded[1:-1, 1:-1]
            elif kind == "act":
                passes = {"relu": x > 0, "guided": (x > 0) & (grad > 0), "deconvnet": grad > 0}
                grad = grad * passes[rule]
            elif kind == "pool":  # the switch: the window's first maximum in row-major order
                back = np.zeros_like(x)
                for a in range(grad.shape[0]):
                    for b in range(grad.shape[1]):
                        for c in range(grad.shape[2]):
                            window = x[2 * a:2 * a + 2, 2 * b:2 * b + 2, c]
                            da, db = np.unravel_index(np.argmax(window), (2, 2))
                            back[2 * a + da, 2 * b + db, c] = grad[a, b, c]
                grad = back
            elif kind == "flatten":
                grad = grad.reshape(x.shape)
            else:
                grad = self.params[name]["kernel"] @ grad
        return grad

    def value_and_seed(self, tensors, layer, index):
        """A node's value and ∂value/∂(its layer's output)."""
        out = tensors[self.out_index[layer]]
        seed = np.zeros_like(out)
        if out.ndim == 1:
            seed[index] = 1
            return out[index], seed
        position = np.unravel_index(np.argmax(out[..., index]), out.shape[:-1])
        seed[(*position, index)] = 1
        return out[(*position, index)], seed

    def gradient(self, image, node, stop_layer=None, rule="relu"):
        tensors = self.forward(image)
        _, seed = self.value_and_seed(tensors, *node)
        stop = 0 if stop_layer is None else self.out_index[stop_layer]
        return self.backward(tensors, seed, self.out_index[node[0]], stop, rule), tensors

    def grad_cam(self, image, node, conv):
        grad, tensors = self.gradient(image, node, conv)
        features = tensors[self.out_index[conv]]
        return upsample(np.maximum(features @ grad.mean(axis=(0, 1)), 0))

    def cam(self, image, node):
        tensors = self.forward(image)
        x = tensors[self.out_index["fc"] - 1]  # what the Dense reads: [2·2·3]
        contributions = x * self.params["fc"]["kernel"][:, node[1]]
        return contributions.reshape(2, 2, 3).sum(-1)  # before the ReLU

    def guided(self, image, node, rule):
        grad, _ = self.gradient(image, node, rule=rule)
        return np.abs(grad).max(axis=-1)


def upsample(m):
    return cv2.resize(m.astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)


def normalized(m):
    return m / (m.max() + 1e-7)


def default_conv(layer):
    return layer if "conv" in layer else "block2_conv2"


def reference_maps(ref, images, nodes, method):
    """`[n, B, H, W]` maps of `method`, normalised, from the NumPy reference."""
    def one(image, node):
        if method == "grad-cam":
            return ref.grad_cam(image, node, default_conv(node[0]))
        if method == "cam":
            return upsample(np.maximum(ref.cam(image, node), 0))
        if method == "guided-grad-cam":
            gc = ref.grad_cam(image, node, default_conv(node[0]))
            return ref.guided(image, node, "guided") * gc
        return ref.guided(image, node, {"guided-backprop": "guided", "deconvnet": "deconvnet"}[
            method])

    return np.stack([[normalized(one(image, node)) for image in images] for node in nodes])


# --- against the reference ------------------------------------------------------------------


def test_layer_outputs_and_node_values(tiny):
    variables, images, ref, images64 = tiny
    outs = jax.jit(lambda v, x: layer_outputs(MODEL, v, x, ["fc", "block2_conv1"]))(
        variables, images)
    assert set(outs) == {"fc", "block2_conv1"}
    assert outs["fc"].shape == (3, 4) and outs["block2_conv1"].shape == (3, 4, 4, 3)
    values = jax.jit(lambda v, x: node_values(MODEL, v, x, NODES))(variables, images)
    assert values.shape == (3, len(NODES)) and values.dtype == jnp.float32
    for b, image in enumerate(images64):
        tensors = ref.forward(image)
        np.testing.assert_allclose(outs["fc"][b], tensors[ref.out_index["fc"]], atol=1e-5)
        want = [ref.value_and_seed(tensors, *node)[0] for node in NODES]
        np.testing.assert_allclose(values[b], want, rtol=1e-5, atol=1e-5)
    # the reference itself: its logits are the model's
    logits = MODEL.apply(variables, images)["logits"]
    np.testing.assert_allclose(logits[0], ref.forward(images64[0])[-1], atol=1e-5)


@pytest.mark.parametrize("method", ["grad-cam", "guided-backprop", "deconvnet",
                                    "guided-grad-cam"])
def test_heatmaps_equal_the_numpy_reference(tiny, method):
    variables, images, ref, images64 = tiny
    maps = jitted(NODES, method=method)(variables, images)
    assert maps.shape == (len(NODES), 3, SIZE, SIZE) and maps.dtype == jnp.float32
    want = reference_maps(ref, images64, NODES, method)
    # not a comparison of zeros (a guided signal can die out: its map is then zero)
    assert np.mean(want.max(axis=(2, 3)) > 0.5) > 0.5
    np.testing.assert_allclose(maps, want, atol=1e-5)


def test_cam_equals_the_reference_and_sums_to_value_minus_bias(tiny):
    variables, images, ref, images64 = tiny
    raw_cam = jitted(FC_NODES, method="cam", normalize=False, image_size=2)  # the 2×2 features
    want = [[np.maximum(ref.cam(image, node), 0) for image in images64] for node in FC_NODES]
    np.testing.assert_allclose(raw_cam(variables, images), want, atol=1e-5)
    # the reference's unrectified map sums to the value minus the bias (random signed kernel)
    value, _ = ref.value_and_seed(ref.forward(images64[0]), "fc", 1)
    np.testing.assert_allclose(ref.cam(images64[0], ("fc", 1)).sum(),
                               value - ref.params["fc"]["bias"][1], atol=1e-10)
    # With a non-negative fc kernel every contribution W[p, k] x[p, k] is >= 0 (x is after a
    # ReLU), the map's ReLU does nothing and the map sums to v − b.
    params = dict(variables["params"])
    params["fc"] = {**params["fc"], "kernel": jnp.abs(params["fc"]["kernel"])}
    positive = {"params": params}
    values = node_values(MODEL, positive, images, FC_NODES)  # [B, n]
    bias = params["fc"]["bias"][np.array([j for _, j in FC_NODES])]
    assert np.all(values - bias > 0)
    np.testing.assert_allclose(raw_cam(positive, images).sum(axis=(2, 3)).T, values - bias,
                               rtol=1e-5, atol=1e-6)


def test_grad_cam_at_a_chosen_conv_layer(tiny):
    variables, images, ref, images64 = tiny
    maps = jitted(FC_NODES, conv_layer="block1_conv2")(variables, images)
    want = np.stack([[normalized(ref.grad_cam(image, node, "block1_conv2"))
                      for image in images64] for node in FC_NODES])
    np.testing.assert_allclose(maps, want, atol=1e-5)


# --- vectorisation, jit ---------------------------------------------------------------------


def test_vmap_over_nodes_equals_a_loop_and_jit_equals_eager(tiny):
    variables, images, _, _ = tiny
    together = jitted(NODES, method="grad-cam")(variables, images)
    for i in (0, 1, 3):  # one node of each layer
        alone = jitted([NODES[i]], method="grad-cam")(variables, images)
        np.testing.assert_allclose(together[i:i + 1], alone, atol=1e-6)
    eager = node_heatmaps(MODEL, variables, images[:1], NODES[:1], method="grad-cam")
    np.testing.assert_allclose(eager, together[:1, :1], atol=1e-6)


def test_three_dimensional_inputs():
    model = FeatureClassifier(filters=(2, 2), hidden=3, num_classes=2)
    x = jax.ShapeDtypeStruct((2, 4, 8, 8, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    for method in ("grad-cam", "cam", "guided-grad-cam"):  # every code path
        nodes = [("fc", 0), ("fc", 2)] if method == "cam" else [("fc", 0), ("block2_conv2", 1)]
        maps = jax.eval_shape(functools.partial(node_heatmaps, model, nodes=nodes,
                                                method=method), variables, x)
        assert maps.shape == (2, 2, 4, 8, 8), method


# --- the rectifiers -------------------------------------------------------------------------


def test_rectifiers_forward_is_relu_and_backward_follows_their_rules():
    x = jnp.array([-2.0, -1.0, 0.5, 1.5, 3.0, -0.5])
    g = jnp.array([1.0, -1.0, 2.0, -3.0, 0.5, 0.0])
    for rectifier, want in ((guided_relu, [0.0, 0.0, 2.0, 0.0, 0.5, 0.0]),
                            (deconvnet_relu, [1.0, 0.0, 2.0, 0.0, 0.5, 0.0])):
        out, vjp = jax.vjp(rectifier, x)
        np.testing.assert_array_equal(out, nn.relu(x))
        np.testing.assert_array_equal(vjp(g)[0], want)
        np.testing.assert_array_equal(jax.jit(rectifier)(x), nn.relu(x))


# --- bad inputs -----------------------------------------------------------------------------


class NoActivation(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(2, (3, 3), name="conv")(x))
        return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


def test_bad_inputs_raise_clear_errors(tiny):
    variables, images, _, _ = tiny
    shape = functools.partial(jax.eval_shape)

    def maps(nodes, model=MODEL, v=variables, **kw):
        return shape(functools.partial(node_heatmaps, model, nodes=nodes, **kw), v, images)

    with pytest.raises(ValueError, match=r"'fc9' is not a submodule.*available: block1_conv1"):
        maps([("fc9", 0)])
    with pytest.raises(ValueError, match=r"'fc9' is not a submodule"):
        layer_outputs(MODEL, variables, images, ["fc", "fc9"])
    with pytest.raises(ValueError, match=r"node \('fc', 4\) is out of range.*4 units"):
        node_values(MODEL, variables, images, [("fc", 0), ("fc", 4)])
    with pytest.raises(ValueError, match=r"node \('block2_conv1', -1\) is out of range"):
        maps([("block2_conv1", -1)])
    with pytest.raises(ValueError, match="unknown heat-map method 'lrp'; choose one of "
                       + ", ".join(METHODS)):
        maps([("fc", 0)], method="lrp")
    with pytest.raises(ValueError, match="CAM needs a dense node.*grad-cam.*'fc' runs between"):
        maps([("logits", 0)], method="cam")
    with pytest.raises(ValueError, match="CAM needs a dense node.*'block2_conv1' is not a Dense"):
        maps([("block2_conv1", 0)], method="cam")
    with pytest.raises(ValueError, match="conv_layer 'fc' must output"):
        maps([("logits", 0)], conv_layer="fc")
    with pytest.raises(ValueError, match="conv_layer 'block2_conv2' runs after layer"):
        maps([("block1_conv2", 0)], conv_layer="block2_conv2")
    with pytest.raises(ValueError, match="no nodes"):
        maps([])
    plain = NoActivation()
    plain_variables = jax.eval_shape(plain.init, jax.random.key(0), images[:1])
    for method in ("guided-backprop", "deconvnet", "guided-grad-cam"):
        with pytest.raises(ValueError, match="needs an `activation` field.*NoActivation"):
            maps([("head", 0)], model=plain, v=plain_variables, method=method)
    # Grad-CAM and CAM do not need one
    assert maps([("head", 1)], model=plain, v=plain_variables, method="cam").shape == (
        1, 3, SIZE, SIZE)
