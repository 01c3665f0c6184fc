"""Feature nodes of a Linen model: their values and per-node heat maps over images.

A node is ``(layer, index)``: `layer` a module path of the model ('/'-joined scope names, as
in `grad_cam`, e.g. `'fc'` or `'block5_conv2'`), `index` a unit / channel of that module's
output (its last axis). A node's value is its module's output (for `FeatureClassifier`, the
pre-activation one); for a module with spatial axes, its maximum over positions: the node
"fires somewhere" in the image.

- `layer_outputs`: named modules' outputs for a batch, in one forward pass.
- `node_values`: `[B, n_nodes]` node values.
- `node_heatmaps`: `[n_nodes, B, *S]` heat maps of every (node, image) pair, by Grad-CAM,
  CAM, guided back-propagation, deconvnet or guided Grad-CAM (`METHODS`), all pairs in one
  traceable call: `jax.vmap` over the images and over the nodes of each layer.
- `guided_relu`, `deconvnet_relu`: ReLUs whose backward pass follows guided back-propagation
  and the deconvnet, swapped into a model through its `activation` field.

Design decisions (default conv layer, where CAM applies, normalisation) are in
`docs/atlas.md`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.explain._cam import _module_path, resize_maps

__all__ = [
    "METHODS", "deconvnet_relu", "guided_relu", "layer_outputs", "node_heatmaps", "node_values",
]

METHODS = ("grad-cam", "cam", "guided-backprop", "deconvnet", "guided-grad-cam")
_EPS = 1e-7  # normalisation: map / (max + 1e-7), so an all-zero map stays zero

Node = tuple[str, int]


# ----------------------------------------------------------------------------
# Rectifiers with a modified backward pass
# ----------------------------------------------------------------------------


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
    """ReLU whose backward pass is guided back-propagation's: ``g · [x > 0] · [g > 0]``.

    Forward ``max(x, 0)``; the gradient passes where the input was positive (the ReLU's own
    rule) AND the incoming gradient is positive (the deconvnet's rule).
    """
    return jnp.maximum(x, 0)


def _guided_forward(x):
    return jnp.maximum(x, 0), x


def _guided_backward(x, g):
    return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_forward, _guided_backward)


@jax.custom_vjp
def deconvnet_relu(x: jax.Array) -> jax.Array:
    """ReLU whose backward pass is the deconvnet's: ``g · [g > 0]``, whatever the input's sign.

    Forward ``max(x, 0)``; backward the ReLU applied to the signal travelling back
    (Zeiler & Fergus 2014).
    """
    return jnp.maximum(x, 0)


def _deconvnet_forward(x):
    return jnp.maximum(x, 0), None


def _deconvnet_backward(_, g):
    return (jnp.maximum(g, 0),)


deconvnet_relu.defvjp(_deconvnet_forward, _deconvnet_backward)

_RECTIFIERS = {"guided-backprop": guided_relu, "guided-grad-cam": guided_relu,
               "deconvnet": deconvnet_relu}


# ----------------------------------------------------------------------------
# The model's submodule calls (a shape-only probe)
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """One submodule's `__call__` in a forward pass: `start` / `end` count entries and exits in
    call order (a call nested in another starts after it and ends before it)."""

    path: str
    start: int
    end: int = -1
    times: int = 1
    output: Any = None  # jax.ShapeDtypeStruct for one array output
    input: Any = None  # the first positional argument's ShapeDtypeStruct, if an array
    dense: bool = False  # an nn.Dense

    @property
    def spatial(self) -> bool:
        """Outputs one `[1, *S, C]` array with at least one spatial axis."""
        return isinstance(self.output, jax.ShapeDtypeStruct) and self.output.ndim >= 3


def _shape(x: Any) -> Any:
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x


def _probe_calls(model: nn.Module, variables: Any, image: jax.Array,
                 apply_kwargs: dict) -> dict[str, _Call]:
    """Every submodule call of one forward pass of `image` `[1, *S, C_in]`, by path, in the
    order they start (shape-only: nothing is computed)."""
    calls: dict[str, _Call] = {}
    clock = itertools.count()

    def record(next_fun, args, kwargs, context):
        path = _module_path(context.module) if context.method_name == "__call__" else ""
        if not path:
            return next_fun(*args, **kwargs)
        if path in calls:
            calls[path].times += 1
            return next_fun(*args, **kwargs)
        call = calls[path] = _Call(path, start=next(clock), input=_shape(args[0]) if args else None,
                                   dense=isinstance(context.module, nn.Dense))
        out = next_fun(*args, **kwargs)
        call.end, call.output = next(clock), _shape(out)
        return out

    def run(v, x):
        with nn.intercept_methods(record):
            model.apply(v, x, **apply_kwargs)

    jax.eval_shape(run, variables, image)
    return calls


def _layer_call(calls: dict[str, _Call], layer: str) -> _Call:
    """The call of `layer`, which must run once and return one array."""
    if layer not in calls:
        raise ValueError(f"layer {layer!r} is not a submodule called by the model; available: "
                         f"{', '.join(calls)}")
    call = calls[layer]
    if call.times > 1:
        raise ValueError(f"layer {layer!r} is called {call.times} times in one forward pass; a "
                         "node needs a single output")
    if not isinstance(call.output, jax.ShapeDtypeStruct) or call.output.ndim < 2:
        raise ValueError(f"layer {layer!r} must output one [B, ..., C] array, got {call.output}")
    return call


def _check_nodes(calls: dict[str, _Call], nodes: Sequence[Node]) -> list[Node]:
    """`nodes` as `(layer, int)` pairs, each layer known and each index within its width."""
    if len(nodes) == 0:
        raise ValueError("no nodes given: pass (layer, index) pairs such as ('fc', 7)")
    checked = []
    for node in nodes:
        if not (isinstance(node, Sequence) and len(node) == 2 and isinstance(node[0], str)):
            raise ValueError(f"a node is a (layer, index) pair such as ('fc', 7), got {node!r}")
        if isinstance(node[1], bool) or not isinstance(node[1], (int, np.integer)):
            raise ValueError(f"node {node!r}: the index must be an int")
        layer, index = node[0], int(node[1])
        width = _layer_call(calls, layer).output.shape[-1]
        if not 0 <= index < width:
            raise ValueError(f"node ({layer!r}, {index}) is out of range: layer {layer!r} has "
                             f"{width} units (indices 0 … {width - 1})")
        checked.append((layer, index))
    return checked


def _by_layer(nodes: list[Node]) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """The nodes grouped by layer (first appearance order) as `(layer, indices)`, and the
    permutation that puts the groups' concatenation back in the given order."""
    layers = list(dict.fromkeys(layer for layer, _ in nodes))
    groups, positions = [], []
    for layer in layers:
        members = [i for i, (name, _) in enumerate(nodes) if name == layer]
        groups.append((layer, np.asarray([nodes[i][1] for i in members])))
        positions.extend(members)
    return groups, np.argsort(np.asarray(positions))


def _values(out: jax.Array, indices: np.ndarray) -> jax.Array:
    """`[B, n]` values of units `indices` of one layer output `[B, *S, C]`: max over `S`."""
    chosen = jnp.asarray(out, jnp.float32)[..., indices]  # [B, *S, n]
    return jnp.max(chosen, axis=tuple(range(1, chosen.ndim - 1)))


# ----------------------------------------------------------------------------
# Layer outputs and node values
# ----------------------------------------------------------------------------


def _capture(model, variables, images, layers, apply_kwargs) -> dict[str, jax.Array]:
    outputs = {}

    def keep(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and _module_path(context.module) in layers:
            outputs[_module_path(context.module)] = out
        return out

    with nn.intercept_methods(keep):
        model.apply(variables, images, **apply_kwargs)
    return outputs


def layer_outputs(model: nn.Module, variables: Any, images: jax.Array, layers: Sequence[str], *,
                  apply_kwargs: dict | None = None) -> dict[str, jax.Array]:
    """The outputs of named submodules for a batch, from one forward pass.

    **Arguments:**

    - `model`, `variables`: a Linen module and its variables (`model.apply(variables, x)`).
    - `images`: `[B, *S, C_in]` model inputs.
    - `layers`: module paths ('/'-joined scope names, e.g. `'fc'`, `'block5_conv2'`); each must
      run once per forward pass and return one array. Unknown names raise `ValueError` listing
      the available paths.
    - `apply_kwargs`: extra keyword arguments of `model.apply` (e.g. `{'train': False}`).

    **Returns:**

    `{layer: output}` in the order of `layers`, e.g. `{'fc': [B, 16]}` (the module's output as
    it returns it: pre-activation for `FeatureClassifier`).
    """
    apply_kwargs = dict(apply_kwargs or {})
    images = jnp.asarray(images)
    calls = _probe_calls(model, variables, images[:1], apply_kwargs)
    for layer in layers:
        _layer_call(calls, layer)
    outputs = _capture(model, variables, images, set(layers), apply_kwargs)
    return {layer: outputs[layer] for layer in layers}


def node_values(model: nn.Module, variables: Any, images: jax.Array, nodes: Sequence[Node], *,
                apply_kwargs: dict | None = None) -> jax.Array:
    """The values of feature nodes for a batch, from one forward pass.

    Node `(layer, k)`'s value is unit k of the layer's output (pre-activation for
    `FeatureClassifier`); for a layer with spatial axes (a conv channel), its maximum over
    positions: the value says whether the feature fires somewhere in the image.

    **Arguments:**

    - `model`, `variables`, `images`, `apply_kwargs`: as in `layer_outputs`.
    - `nodes`: `(layer, index)` pairs, layers in any order and mixed. An index outside the
      layer's width raises `ValueError` naming the node and the width.

    **Returns:**

    `[B, n_nodes]` float32, columns in the order of `nodes`.
    """
    apply_kwargs = dict(apply_kwargs or {})
    images = jnp.asarray(images)
    calls = _probe_calls(model, variables, images[:1], apply_kwargs)
    groups, order = _by_layer(_check_nodes(calls, nodes))
    outputs = _capture(model, variables, images, {layer for layer, _ in groups}, apply_kwargs)
    values = [_values(outputs[layer], indices) for layer, indices in groups]  # [B, n_l] each
    return jnp.concatenate(values, axis=1)[:, order]


# ----------------------------------------------------------------------------
# Which conv features a node's map is drawn on
# ----------------------------------------------------------------------------


def _conv_layer(calls: dict[str, _Call], node: _Call, conv_layer: str | None) -> _Call:
    """The conv features of Grad-CAM / CAM for the nodes of `node`'s layer: `conv_layer`, or by
    default the node's own layer when it has spatial axes, else the last submodule with a
    spatial output that finishes before the node's layer starts ('block5_conv2' for 'fc')."""
    if conv_layer is None:
        if node.spatial:
            return node
        before = [c for c in calls.values() if c.spatial and c.end < node.start]
        if not before:
            raise ValueError(f"no submodule with a [B, *S, C] output runs before layer "
                             f"{node.path!r}; pass conv_layer")
        return max(before, key=lambda c: c.end)
    conv = _layer_call(calls, conv_layer)
    if not conv.spatial:
        raise ValueError(f"conv_layer {conv_layer!r} must output [B, *S, C] features, got "
                         f"{conv.output}")
    if conv.end > node.end:
        raise ValueError(f"conv_layer {conv_layer!r} runs after layer {node.path!r}: the layer's "
                         "nodes do not depend on it")
    return conv


def _cam_features(calls: dict[str, _Call], node: _Call, conv: _Call) -> tuple[int, ...]:
    """The `(*s, c)` shape of the features a CAM node's Dense reads, flattened row-major: the
    conv layer's output, max-pooled by one factor along every axis."""
    hint = ("CAM needs a dense node on the last conv features (a Dense applied directly to the "
            "flattened, possibly pooled, conv output, such as FeatureClassifier's 'fc'); use "
            "method='grad-cam'")
    between = [c for c in calls.values() if conv.end < c.end < node.start]
    if not node.dense or node.input is None or node.input.ndim != 2:
        raise ValueError(f"{hint}: layer {node.path!r} is not a Dense on [B, F] features")
    if between:
        raise ValueError(f"{hint}: {between[-1].path!r} runs between conv layer {conv.path!r} "
                         f"and layer {node.path!r}")
    spatial, channels = conv.output.shape[1:-1], conv.output.shape[-1]
    width = node.input.shape[-1]
    cells = width // channels if width % channels == 0 else 0
    ratio = math.prod(spatial) / cells if cells else 0.0
    factor = round(ratio ** (1 / len(spatial))) if ratio >= 1 else 0
    if not factor or factor ** len(spatial) * cells != math.prod(spatial) or any(
            s % factor for s in spatial):
        raise ValueError(f"{hint}: the {width} inputs of layer {node.path!r} are not the "
                         f"{conv.output.shape[1:]} features of {conv.path!r}, flattened or "
                         "pooled")
    return (*(s // factor for s in spatial), channels)


# ----------------------------------------------------------------------------
# Heat maps of one image for the nodes of one layer
# ----------------------------------------------------------------------------


def _forward(model, variables, image, apply_kwargs, layer, shift=None):
    """`layer`'s output for one image `[*S, C_in]` (run as a batch of one), and the tensor that
    `shift = (path, 'input' | 'output', δ)` perturbs: δ is added to that module's first input
    or to its output, and the unperturbed tensor is returned beside the layer's output."""
    seen, node = [], []

    def intercept(next_fun, args, kwargs, context):
        path = _module_path(context.module) if context.method_name == "__call__" else None
        hit = shift is not None and path == shift[0]
        if hit and shift[1] == "input":
            seen.append(args[0])
            args = (args[0] + shift[2].astype(args[0].dtype), *args[1:])
        out = next_fun(*args, **kwargs)
        if hit and shift[1] == "output":
            seen.append(out)
            out = out + shift[2].astype(out.dtype)
        if path == layer:
            node.append(out)
        return out

    with nn.intercept_methods(intercept):
        model.apply(variables, image[None], **apply_kwargs)
    return node[0], (seen[0] if seen else None)


def _value_gradients(values_fn, primal: jax.Array, n: int):
    """∂v_i/∂primal for the `n` values of `values_fn(primal) -> ([n], aux)`: one forward pass,
    the backward pass vmapped over the nodes. Returns `([n, *primal.shape], aux)`."""
    _, vjp, aux = jax.vjp(values_fn, primal, has_aux=True)
    (grads,) = jax.vmap(vjp)(jnp.eye(n, dtype=jnp.float32))
    return grads, aux


def _grad_cam_maps(model, variables, image, apply_kwargs, layer, indices, conv):
    """Grad-CAM of the nodes at `conv`: ``ReLU(Σ_c w_c A_c)``, ``w = mean_p ∂value/∂A_p``.
    Returns `[n, *s]` at the conv layer's resolution."""

    def values(delta):
        out, features = _forward(model, variables, image, apply_kwargs, layer,
                                 (conv.path, "output", delta))
        return _values(out, indices)[0], features

    zero = jnp.zeros(conv.output.shape, jnp.float32)  # δ: [1, *s, C]
    grads, features = _value_gradients(values, zero, len(indices))  # [n, 1, *s, C]
    grads, features = grads[:, 0], features[0].astype(jnp.float32)  # [n, *s, C], [*s, C]
    weights = jnp.mean(grads, axis=tuple(range(1, grads.ndim - 1)))  # w: [n, C]
    return nn.relu(jnp.einsum("...c,nc->n...", features, weights,
                              precision=jax.lax.Precision.HIGHEST))


def _cam_maps(model, variables, image, apply_kwargs, layer, indices, feature_shape):
    """CAM of Dense nodes on flattened features x: ``ReLU(Σ_k x[p, k] ∂value/∂x[p, k])`` =
    ``ReLU(Σ_k W[p, k, j] x[p, k])`` (exact: the value is linear in x). `[n, *s]`."""

    def values(delta):
        out, x = _forward(model, variables, image, apply_kwargs, layer, (layer, "input", delta))
        return _values(out, indices)[0], x

    width = math.prod(feature_shape)
    grads, x = _value_gradients(values, jnp.zeros((1, width), jnp.float32), len(indices))
    contributions = grads[:, 0] * x[0].astype(jnp.float32)  # [n, F]
    return nn.relu(contributions.reshape(len(indices), *feature_shape).sum(-1))  # [n, *s]


def _guided_maps(model, variables, image, apply_kwargs, layer, indices, rectifier):
    """Max over colour channels of |∂value/∂image| with every activation replaced by
    `rectifier` (guided back-propagation or deconvnet). `[n, *S]` at the image's size."""
    swapped = model.clone(activation=rectifier)

    def values(x):
        out, _ = _forward(swapped, variables, x, apply_kwargs, layer)
        return _values(out, indices)[0], None

    grads, _ = _value_gradients(values, image.astype(jnp.float32), len(indices))  # [n, *S, C]
    return jnp.max(jnp.abs(grads), axis=-1)


def _resize(maps: jax.Array, size: tuple[int, ...]) -> jax.Array:
    """`[n, B, *s]` → `[n, B, *size]` (OpenCV bilinear, see `resize_maps`)."""
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    flat = resize_maps(maps.reshape(-1, *maps.shape[2:]), size, method="linear")
    return flat.reshape(*maps.shape[:2], *size)


def _layer_maps(model, variables, apply_kwargs, calls, images, layer, indices, method,
                conv_layer, size) -> jax.Array:
    """`[n, B, *size]` non-negative maps of the nodes `indices` of `layer` over `images`."""
    node = calls[layer]
    maps = None
    if method == "cam":
        shape = _cam_features(calls, node, _conv_layer(calls, node, conv_layer))
        maps = jax.vmap(lambda x: _cam_maps(model, variables, x, apply_kwargs, layer, indices,
                                            shape))(images)  # [B, n, *s']
    elif method in ("grad-cam", "guided-grad-cam"):
        conv = _conv_layer(calls, node, conv_layer)
        maps = jax.vmap(lambda x: _grad_cam_maps(model, variables, x, apply_kwargs, layer,
                                                 indices, conv))(images)  # [B, n, *s]
    if maps is not None:
        maps = _resize(jnp.moveaxis(maps, 0, 1), size)  # [n, B, *size]
    if method in _RECTIFIERS:
        rule = _RECTIFIERS[method]
        guided = jax.vmap(lambda x: _guided_maps(model, variables, x, apply_kwargs, layer,
                                                 indices, rule))(images)  # [B, n, *S]
        guided = _resize(jnp.moveaxis(guided, 0, 1), size)  # [n, B, *size]
        maps = guided if maps is None else guided * maps
    return maps


def _check_method(model: nn.Module, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown heat-map method {method!r}; choose one of {', '.join(METHODS)}")
    if method in _RECTIFIERS and "activation" not in {f.name for f in dataclasses.fields(model)}:
        raise ValueError(
            f"method {method!r} replaces the model's activation function, so the model needs an "
            f"`activation` field applied at every nonlinearity (as FeatureClassifier has); "
            f"{type(model).__name__} has none: use method='grad-cam' or 'cam'")


# ----------------------------------------------------------------------------
# node_heatmaps
# ----------------------------------------------------------------------------


def node_heatmaps(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    nodes: Sequence[Node],
    *,
    method: str = "grad-cam",
    conv_layer: str | None = None,
    apply_kwargs: dict | None = None,
    image_size: int | Sequence[int] | None = None,
    normalize: bool = True,
) -> jax.Array:
    """Heat maps of feature nodes over images: where in each image each node's value comes from.

    The value v of a node is as in `node_values` (its layer's output at the node's unit; the
    maximum over positions for a spatial layer), a function of one image. With A the output
    `[*s, C]` of the conv layer (`conv_layer`; by default the node's own layer when it has
    spatial axes, else the last submodule with a spatial output that finishes before the
    node's layer starts: `'block5_conv2'` for `FeatureClassifier`'s `'fc'`):

    - `'grad-cam'` (Selvaraju et al. 2017): ``w_c = mean over positions p of ∂v/∂A[p, c]``,
      ``map = ReLU(Σ_c w_c A_c)``, resized bilinearly to the image. The node's value is taken
      at its own layer (an intermediate of the model, not its output).
    - `'cam'` (Zhou et al. 2016), only where v is linear in the conv features: a Dense node
      applied directly to the flattened (possibly pooled) conv output x `[*s', C]`,
      ``v = Σ_{p,k} W[p, k] x[p, k] + b``; ``map(p) = ReLU(Σ_k W[p, k] x[p, k])`` (before the
      ReLU the map sums to v − b), resized to the image. x is what the Dense receives (after
      the activation and the pool); other nodes raise `ValueError`.
    - `'guided-backprop'` (Springenberg et al. 2015): ``map = max over colour channels of
      |∂v/∂image|`` with every activation replaced by `guided_relu` (backward
      ``g · [x > 0] · [g > 0]``).
    - `'deconvnet'` (Zeiler & Fergus 2014): the same with `deconvnet_relu` (backward
      ``g · [g > 0]``); max-pooling routes the signal through its forward switches.
    - `'guided-grad-cam'` (Selvaraju et al. 2017): the guided-backprop map times the Grad-CAM
      map resized to the image.

    The guided methods swap the activation by ``model.clone(activation=...)``, so the model
    needs an `activation` field used at every nonlinearity (as `FeatureClassifier`). Grad-CAM
    and CAM leave the model as it is: a zero perturbation δ is added to the conv layer's output
    (CAM: the Dense's input) by ``flax.linen.intercept_methods``, and ∂v/∂δ at δ = 0 is ∂v/∂A.

    All (node, image) pairs come from one traceable computation: `jax.vmap` over the images
    (each run as a batch of one) and, per image, one forward pass with the backward pass
    vmapped over the nodes of each layer (a Python loop runs over the distinct layers, at
    trace time only). Jit it with the model and the nodes closed over, e.g.
    ``jax.jit(functools.partial(node_heatmaps, model, nodes=nodes))(variables, images)``.
    2-D and 3-D inputs work for every method.

    **Arguments:**

    - `model`, `variables`: a Linen module and its variables (`model.apply(variables, x)`).
    - `images`: `[B, *S, C_in]` model inputs (float; e.g. in [-1, 1] for `FeatureClassifier`).
    - `nodes`: `(layer, index)` pairs, layers in any order and mixed; unknown layers and
      indices out of range raise `ValueError`.
    - `method`: one of `METHODS`.
    - `conv_layer`: the conv layer of `'grad-cam'`, `'cam'` and `'guided-grad-cam'` (a module
      path with a `[B, *s, C]` output that runs before the nodes' layers); None: the default
      above.
    - `apply_kwargs`: extra keyword arguments of `model.apply` (e.g. `{'train': False}`).
    - `image_size`: the maps' spatial size (int or per axis); None: that of `images`.
    - `normalize`: divide each map by its maximum + 1e-7, so maps lie in [0, 1] (an all-zero
      map stays zero).

    **Returns:**

    `[n_nodes, B, *image_size]` float32 maps, >= 0, nodes in the order of `nodes`.
    """
    apply_kwargs = dict(apply_kwargs or {})
    _check_method(model, method)
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    size = tuple(images.shape[1:-1]) if image_size is None else image_size
    size = (size,) * (images.ndim - 2) if isinstance(size, int) else tuple(size)
    calls = _probe_calls(model, variables, images[:1], apply_kwargs)
    groups, order = _by_layer(_check_nodes(calls, nodes))
    context = (model, variables, apply_kwargs, calls)
    # trace time: one block of maps per distinct layer, [n_layer, B, *size] each
    blocks = [_layer_maps(*context, images, layer, indices, method, conv_layer, size)
              for layer, indices in groups]
    maps = jnp.concatenate(blocks, axis=0)[order]  # [n_nodes, B, *size]
    if normalize:
        axes = tuple(range(2, maps.ndim))
        maps = maps / (jnp.max(maps, axis=axes, keepdims=True) + _EPS)
    return maps.astype(jnp.float32)
