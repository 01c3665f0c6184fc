"""Class activation maps (CAM), Grad-CAM for any named layer, and OpenCV-exact map resizing.

- `cam`: CAM = Σ_k W[k, c] A_k over the last conv features, resized and min–max normalised
  exactly as the WSOL evaluation protocol (clovaai/wsolevaluation) does before MaxBoxAcc.
- `grad_cam`: Grad-CAM (Selvaraju et al., ICCV 2017) at any submodule of a Flax Linen model,
  for any output node, batched with `jax.vmap`; post-processed as pytorch-grad-cam does.
- `resize_maps`: separable resizing with OpenCV's `INTER_LINEAR` / `INTER_CUBIC` semantics.

Everything is traceable: wrap the calls in `jax.jit` (with the model, layer and target
closed over) to compile them once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.layers import resample

__all__ = ["cam", "grad_cam", "resize_maps"]

_CUBIC_A = -0.75  # OpenCV's Keys-kernel parameter (PIL and scikit-image use -0.5)
_METHODS = ("linear", "cubic")
_GRAD_CAM_EPS = 1e-7  # pytorch-grad-cam: (cam - min) / (max + 1e-7)


# ----------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------


def _source_coordinates(length_in: int, length_out: int) -> np.ndarray:
    """Half-pixel centres: output o samples input coordinate (o + 0.5)·L_in/L_out − 0.5."""
    return (np.arange(length_out) + 0.5) * (length_in / length_out) - 0.5


def _interpolation_matrix(taps: np.ndarray, weights: np.ndarray, length_in: int) -> np.ndarray:
    """(L_out, L_in) matrix from per-output taps and weights; taps clamped (border replicate)."""
    mat = np.zeros((taps.shape[0], length_in))
    rows = np.repeat(np.arange(taps.shape[0])[:, None], taps.shape[1], axis=1)
    np.add.at(mat, (rows, np.clip(taps, 0, length_in - 1)), weights)
    return mat


def _linear_matrix(length_in: int, length_out: int) -> np.ndarray:
    """OpenCV INTER_LINEAR along one axis (no antialiasing when shrinking)."""
    src = _source_coordinates(length_in, length_out)
    low = np.floor(src).astype(np.int64)
    frac = src - low
    taps = np.stack([low, low + 1], axis=1)  # [L_out, 2]
    return _interpolation_matrix(taps, np.stack([1 - frac, frac], axis=1), length_in)


def _cubic_matrix(length_in: int, length_out: int) -> np.ndarray:
    """OpenCV INTER_CUBIC along one axis: Keys kernel with a = −0.75 over 4 taps."""
    src = _source_coordinates(length_in, length_out)
    low = np.floor(src).astype(np.int64)
    frac = src - low
    dist = np.stack([1 + frac, frac, 1 - frac, 2 - frac], axis=1)  # |tap − src|: [L_out, 4]
    a = _CUBIC_A
    near = ((a + 2) * dist - (a + 3)) * dist**2 + 1  # |d| <= 1
    far = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a  # 1 < |d| < 2
    weights = np.where(dist <= 1, near, far)
    taps = low[:, None] + np.arange(-1, 3)[None, :]
    return _interpolation_matrix(taps, weights, length_in)


def resize_maps(maps: jax.Array, size: int | Sequence[int], *, method: str = "cubic") -> jax.Array:
    """Resizes a batch of maps with OpenCV ``cv2.resize`` semantics, axis by axis.

    `'cubic'` is ``INTER_CUBIC`` (Keys kernel, a = −0.75), `'linear'` is ``INTER_LINEAR``;
    both use half-pixel centres (output o samples input coordinate (o + 0.5)·L_in/L_out − 0.5)
    and replicate the border, and neither antialiases when shrinking (as OpenCV). Each axis is
    resampled by an (L_out, L_in) matrix built with NumPy at trace time, so the call is
    jit-able and costs one small matrix product per axis. For 2-D maps this equals
    ``cv2.resize(m, (W, H), interpolation=...)`` on float32 input; 3-D maps are resampled
    separably with the same 1-D rules (OpenCV has no 3-D resize).

    **Arguments:**

    - `maps`: `(B, *spatial)` with 1–3 spatial axes (e.g. `(B, h, w)` or `(B, d, h, w)`).
    - `size`: the output spatial size: an int (every axis) or one int per spatial axis
      (`(H, W)`, not OpenCV's `(W, H)`).
    - `method`: `'cubic'` or `'linear'`.

    **Returns:**

    `(B, *size)`, float (integer inputs become float32).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    maps = jnp.asarray(maps)
    if maps.ndim < 2:
        raise ValueError(f"resize_maps: expected (B, *spatial) maps, got shape {maps.shape}")
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        maps = maps.astype(jnp.float32)
    matrix = _cubic_matrix if method == "cubic" else _linear_matrix
    return resample(maps[..., None], size, matrix, "resize_maps")[..., 0]  # [B, *size]


# ----------------------------------------------------------------------------
# CAM
# ----------------------------------------------------------------------------


def _degenerate(maps: jax.Array) -> jax.Array:
    """Per map `[B, 1..]`: True when it is constant or holds a NaN or ±inf."""
    axes = tuple(range(1, maps.ndim))
    finite = jnp.all(jnp.isfinite(maps), axis=axes, keepdims=True)
    constant = jnp.min(maps, axis=axes, keepdims=True) == jnp.max(maps, axis=axes, keepdims=True)
    return ~finite | constant


def _normalize_scoremap(maps: jax.Array) -> jax.Array:
    """Per-map min–max to [0, 1]; a degenerate map (`_degenerate`) becomes all zeros."""
    axes = tuple(range(1, maps.ndim))
    bad = _degenerate(maps)
    safe = jnp.where(bad, 0.0, maps)
    low = jnp.min(safe, axis=axes, keepdims=True)
    span = jnp.max(safe, axis=axes, keepdims=True) - low
    return jnp.where(bad, 0.0, (safe - low) / jnp.where(bad, 1.0, span))


def cam(
    features: jax.Array,
    class_weights: jax.Array,
    classes: jax.Array | int,
    *,
    image_size: int | Sequence[int] | None = None,
    method: str = "cubic",
    normalize: bool = True,
) -> jax.Array:
    """Class activation maps, post-processed as the WSOL evaluation protocol does.

    ``CAM_b = Σ_k class_weights[k, classes[b]] · features[b, ..., k]``, with no ReLU
    (wsolevaluation has none). wsolevaluation averages over k instead of summing (a factor
    1/K); min–max normalisation removes it, and the unnormalised map here is the plain sum, so
    that ``mean over positions of CAM + bias = logit`` for a GAP + Dense head. When
    `image_size` is given the map is resized to it (OpenCV bicubic by default, as
    wsolevaluation), then — if `normalize` — min–max normalised per map to [0, 1], with a
    constant map or a map holding a NaN or ±inf set to zeros. A map that is constant before
    resizing is zeroed too (wsolevaluation would normalise the rounding noise of the resize
    up to [0, 1]). Computed in float32.

    **Arguments:**

    - `features`: `(B, *spatial, K)` last conv features (e.g. `VGGCAM(...)['features']`).
    - `class_weights`: `(K, num_classes)` classifier kernel (e.g. `vgg_cam.cam_weights`).
    - `classes`: `(B,)` int class per map, or one int for all.
    - `image_size`: output spatial size (int or per axis), or None to keep the feature size.
    - `method`: resizing method of `resize_maps` (`'cubic'` or `'linear'`).
    - `normalize`: min–max normalise each map.

    **Returns:**

    `(B, *image_size)` (or `(B, *spatial)`) float32 maps.
    """
    features = jnp.asarray(features, jnp.float32)
    weights = jnp.asarray(class_weights, jnp.float32)
    classes = jnp.broadcast_to(jnp.asarray(classes), features.shape[:1])
    per_sample = jnp.take(weights, classes, axis=1).T  # w: [B, K]
    # HIGHEST: a bfloat16 pass on TPU would shift maps by ~0.4%, more than one threshold step.
    maps = jnp.einsum("b...k,bk->b...", features, per_sample, precision=jax.lax.Precision.HIGHEST)
    # Resizing leaves a constant map constant only up to rounding (OpenCV's too), and min–max
    # would blow that noise up to [0, 1]: maps constant before resizing are zeroed as well.
    constant = _degenerate(maps).reshape(-1)  # [B]
    if image_size is not None:
        maps = resize_maps(maps, image_size, method=method)  # [B, *image_size]
    if not normalize:
        return maps
    return jnp.where(constant.reshape(-1, *(1,) * (maps.ndim - 1)), 0.0, _normalize_scoremap(maps))


# ----------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------


def _module_path(module: nn.Module) -> str:
    return "/".join(module.scope.path) if module.scope is not None else ""


def _probe_layer(model: nn.Module, variables: Any, image: jax.Array, layer: str,
                 apply_kwargs: dict):
    """Shape-only pass: the output shape/dtype of `layer` (must be called exactly once)."""
    paths, found = [], []

    def record(next_fun, args, kwargs, context):
        path = _module_path(context.module) if context.method_name == "__call__" else ""
        if path and path not in paths:
            paths.append(path)  # before the call: parents are listed before their children
        out = next_fun(*args, **kwargs)
        if path == layer:  # keep only the shape: `out` is a tracer of the shape pass
            is_array = isinstance(out, jax.Array)
            found.append(jax.ShapeDtypeStruct(out.shape, out.dtype) if is_array else out)
        return out

    def run(v, x):
        with nn.intercept_methods(record):
            model.apply(v, x, **apply_kwargs)

    jax.eval_shape(run, variables, image)
    if not found:
        raise ValueError(f"layer {layer!r} is not a submodule called by the model; available: "
                         f"{', '.join(paths)}")
    if len(found) > 1:
        raise ValueError(f"layer {layer!r} is called {len(found)} times; Grad-CAM needs a single "
                         "activation")
    out = found[0]
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim < 3:
        raise ValueError(f"layer {layer!r} must output one (B, *spatial, C) array, got {out}")
    return out


def _select_output(out: Any, output: str | int | None) -> Any:
    if output is not None:
        return out[output]
    return out


def _drop_batch_of_one(leaf: Any) -> Any:
    """A single-sample output leaf without its batch axis (leaves without one pass as they are)."""
    return leaf[0] if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == 1 else leaf


def _index_score(out_i: jax.Array, index: jax.Array) -> jax.Array:
    """Integer target: the output node `index` of the last axis, summed over any other axes."""
    if not isinstance(out_i, jax.Array):
        raise ValueError(
            f"an integer target needs an array output; the model returns {type(out_i).__name__}, "
            "select one with output='<key>'"
        )
    return jnp.sum(out_i[..., index])


def _targets(target: Any, batch: int) -> tuple[Callable, jax.Array]:
    """Normalises `target` to a scoring function score(out_i, index_i) and per-sample indices."""
    if callable(target):
        return target, jnp.arange(batch)
    index = jnp.asarray(target)
    if not jnp.issubdtype(index.dtype, jnp.integer) or index.ndim > 1:
        raise ValueError(f"target must be an int, a (B,) int array or a callable, got {target!r}")
    return _index_score, jnp.broadcast_to(index, (batch,))


def grad_cam(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    layer: str,
    target: int | jax.Array | Callable[[Any, jax.Array], jax.Array],
    apply_kwargs: dict | None = None,
    output: str | int | None = None,
    image_size: int | Sequence[int] | None = None,
    method: str = "linear",
    normalize: bool = True,
) -> jax.Array:
    """Grad-CAM of any output node at any named submodule of a Flax Linen model.

    For each sample, with A the output of submodule `layer` (`(*S, C)`) and y the target score,
    ``w_c = mean over positions of ∂y/∂A_c`` and ``cam = ReLU(Σ_c w_c A_c)``. As
    pytorch-grad-cam: ``cam = (cam − min) / (max − min + 1e-7)`` when `normalize`, then a
    resize to `image_size` (OpenCV bilinear by default, see `resize_maps`).

    The model is not changed: ``flax.linen.intercept_methods`` adds a zero perturbation δ to
    the layer's output during `model.apply`, and ∂y/∂δ at δ = 0 is ∂y/∂A. Samples are
    processed by `jax.vmap` over single-sample applications (each sees a batch of one, so
    batch-coupled layers act per sample, as one-by-one calls would).

    **Arguments:**

    - `model`, `variables`: a Linen module and its variables (`model.apply(variables, x)`).
    - `images`: `(B, *spatial, C_in)` inputs, 2-D or 3-D.
    - `layer`: the submodule's path, '/'-separated scope names such as `'conv5_3'` or
      `'encoder/block2'`; its `__call__` must run exactly once per forward pass and return
      one `(1, *S, C)` array. Unknown names raise `ValueError` listing the available paths.
    - `target`: which output to explain.
      - an int `c`, or a `(B,)` int array of per-sample `c`: ``y = sum(out_i[..., c])``
        (the logit c of a classifier; for a dense-prediction output, the class-c logits
        summed over positions);
      - a callable ``target(out_i, i) -> scalar``: `out_i` is sample i's (selected) model
        output with the batch axis removed (a pytree if the model returns one and `output`
        is None; leaves whose leading axis is not of length 1, such as scalars, are passed
        as they are), `i` its index in the batch (a traced int, for indexing per-sample
        data).
    - `apply_kwargs`: extra keyword arguments of `model.apply` (e.g. `{'train': False}`).
    - `output`: key or index selecting one entry of a dict/tuple model output (e.g.
      `'logits'`); None uses the output as is.
    - `image_size`: size of the returned maps; None: the spatial size of `images`.
    - `method`: `'linear'` (pytorch-grad-cam's ``cv2.resize`` default) or `'cubic'`.
    - `normalize`: min–max normalise each map before resizing.

    **Returns:**

    `(B, *image_size)` float32 maps.
    """
    apply_kwargs = dict(apply_kwargs or {})
    images = jnp.asarray(images)
    batch = images.shape[0]
    act = _probe_layer(model, variables, images[:1], layer, apply_kwargs)  # [1, *S', C]
    score_fn, indices = _targets(target, batch)

    def score(delta, image, index):
        """Target score of one sample, with δ added to the layer's output; aux: the activation."""
        seen = []

        def perturb(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and _module_path(context.module) == layer:
                seen.append(out)
                out = out + delta.astype(out.dtype)
            return out

        with nn.intercept_methods(perturb):
            out = _select_output(model.apply(variables, image[None], **apply_kwargs), output)
        y = score_fn(jax.tree.map(_drop_batch_of_one, out), index)
        if jnp.shape(y) != ():
            raise ValueError("the target score of one sample must be a scalar, got shape "
                             f"{jnp.shape(y)}")
        return jnp.asarray(y, jnp.float32), seen[0]

    def one_sample(image, index):
        grads, a = jax.grad(score, has_aux=True)(jnp.zeros(act.shape, jnp.float32), image, index)
        a, grads = a[0].astype(jnp.float32), grads[0]  # [*S', C]
        weights = jnp.mean(grads, axis=tuple(range(grads.ndim - 1)))  # w: [C]
        return nn.relu(jnp.einsum("...c,c->...", a, weights, precision=jax.lax.Precision.HIGHEST))

    maps = jax.vmap(one_sample)(images, indices)  # [B, *S']
    if normalize:
        axes = tuple(range(1, maps.ndim))
        maps = maps - jnp.min(maps, axis=axes, keepdims=True)
        maps = maps / (jnp.max(maps, axis=axes, keepdims=True) + _GRAD_CAM_EPS)
    size = images.shape[1:-1] if image_size is None else image_size
    return resize_maps(maps, size, method=method)
