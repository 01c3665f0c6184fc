"""torchvision state dicts (read from safetensors files) mapped onto our parameter trees.

A torchvision state dict names each array after its module (`features.0.weight`,
`layer1.0.bn2.running_var`) and stores it in PyTorch's layout. Our trees name arrays after our
modules (`conv1_1/conv/kernel`, `layer1/block0/norm2/var`) in Flax's layout. The mapping is one
rule per array of our tree: which file key it comes from and how the layout changes:

- convolution kernels: `(O, I, *S)` (OIHW) -> `(*S, I, O)` (HWIO);
- dense kernels: `(out, in)` -> `(in, out)`;
- BatchNorm: `weight`/`bias` -> `scale`/`bias` (params), `running_mean`/`running_var` ->
  `mean`/`var` (batch_stats); `num_batches_tracked` is ignored;
- VGG16 with BatchNorm (`vgg16_bn`): torchvision's convs have a bias before the BatchNorm,
  ours none; `BN(x + b)` with running statistics is `BN(x)` with the mean lowered by `b`, so
  the bias goes into the running mean (exact in inference; in training batch statistics
  absorb any constant bias anyway).

Arrays of our tree that no rule covers (conv6, threshold suppression, CBAM, pyramid pooling,
heads, spatial attention) keep their values and are listed; file keys that no rule reads are
listed too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import safetensors
import safetensors.numpy

from jaxmed.errors import InputDataError

__all__ = ["ARCHITECTURES", "Loaded", "load_torchvision", "pretrained_loader", "read_state_dict"]

ARCHITECTURES = ("vgg16", "resnet")

# VGG16's conv layers per stage (conv1_1 ... conv5_3).
_VGG_STAGES = (2, 2, 3, 3, 3)
_CONVERT = "python -m jaxmed.weights convert IN.pth OUT.safetensors"


class Loaded(NamedTuple):
    """What `load_torchvision` returns.

    - `variables`: the tree given, with every array a rule covers replaced from the file.
    - `loaded`: our '/'-joined paths (`params/conv1_1/conv/kernel`) taken from the file.
    - `kept`: our paths no rule covers, which keep their values (e.g. `params/conv6/...`).
    - `unused`: file keys no rule read (e.g. VGG's `classifier.0.weight`), sorted.
    """

    variables: dict[str, Any]
    loaded: list[str]
    kept: list[str]
    unused: list[str]


class _Rule(NamedTuple):
    keys: tuple[str, ...]          # file keys read; keys[0] is the array named in errors
    layout: str                    # "conv", "dense" or "vector": how keys[0]'s layout changes
    combine: Callable[..., np.ndarray] | None = None  # arrays of keys (torch layout) -> one


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file, as NumPy arrays (no pickle, no torch).

    **Raises:** `InputDataError` naming the file when it is missing or not a safetensors file.
    """
    try:
        return dict(safetensors.numpy.load_file(os.fspath(path)))
    except FileNotFoundError:
        raise InputDataError(f"{path}: not found") from None
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise InputDataError(f"{path}: not a safetensors file ({error}); a PyTorch .pth file "
                             f"converts with {_CONVERT}") from None


def load_torchvision(variables: Mapping[str, Any], weights: str | os.PathLike | Mapping,
                     architecture: str, *, fc: str | None = None, strict: bool = True,
                     name: str | None = None) -> Loaded:
    """Our `variables` with the arrays of a torchvision state dict in their place.

    **Arguments:**

    - `variables`: `{'params': ..., 'batch_stats': ...}` of the network (nested dicts of
      arrays; from `init`, or shapes only from `jax.eval_shape` when every array is loaded).
    - `weights`: a safetensors file, or a state dict `{key: array}` in torchvision's layout.
    - `architecture`: `'vgg16'`: `VGGCAM`'s `conv1_1 ... conv5_3` from `features.N` (`vgg16`
      or, when the network has BatchNorm, `vgg16_bn`); `'resnet'`: the stem `conv_stem` /
      `norm_stem` from `conv1` / `bn1` and `layerK/block{i}/{conv,norm}{j}`,
      `conv_downsample`, `norm_downsample` from `layerK.i.{conv,bn}{j}`, `downsample.0/1`, at
      the root of the tree (`ResNet`, `AttentionResNet`, `SegmentationNet` with the 7x7 stem).
    - `fc`: the root dense layer that takes torchvision's `fc` (`ResNet`'s `'head'`), if any.
    - `strict`: raise when the file lacks an array a rule needs (else it keeps its value and
      is listed in `kept`).
    - `name`: the file named in errors when `weights` is a state dict.

    **Returns:** `Loaded` (variables, loaded, kept, unused).

    **Raises:** `InputDataError` naming the file when it cannot be read, when an array has
    another shape than our parameter needs (both shapes in torch layout, and ours), when it
    lacks arrays (`strict`), or when nothing at all matches (another architecture).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if isinstance(weights, str | os.PathLike):
        name = name or os.fspath(weights)
    name = name or "the state dict"
    state = read_state_dict(weights) if isinstance(weights, str | os.PathLike) else dict(weights)
    flat = _flatten(variables)
    if architecture == "vgg16":
        rules = _vgg_rules(flat, state, name)
    else:
        rules = {path: rule for path in flat if (rule := _resnet_rule(path, fc)) is not None}

    out, loaded, missing = dict(flat), [], []
    for path, rule in rules.items():
        if any(k not in state for k in rule.keys):
            missing.extend(k for k in rule.keys if k not in state)
            continue
        out[path] = _convert(path, flat[path], rule, state, name)
        loaded.append(path)
    if not loaded:
        raise InputDataError(f"{name}: holds no array of a torchvision {architecture} network "
                             f"that fits this network (keys: {_sample(state)})")
    if missing and strict:
        missing = sorted(set(missing))
        raise InputDataError(f"{name}: lacks {len(missing)} array(s) of the network's "
                             f"{architecture} layers: {_sample(missing)}")
    used = {k for path in loaded for k in rules[path].keys}
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    kept = [p for p in flat if p not in loaded]
    tree = _unflatten(out)
    for collection in variables:  # an empty collection (no BatchNorm) has no path
        tree.setdefault(collection, {})
    return Loaded(tree, loaded, kept, unused)


# ----------------------------------------------------------------------------- rules


def _resnet_rule(path: str, fc: str | None) -> _Rule | None:
    """The rule of one array of a ResNet-shaped tree, or None when torchvision has none."""
    collection, *modules, leaf = path.split("/")
    *parents, module = modules
    if module in ("conv_stem", "norm_stem") and not parents:
        return _leaf_rule("conv1" if module == "conv_stem" else "bn1", module, leaf)
    if fc is not None and module == fc and not parents:
        return _Rule((f"fc.{_TORCH_LEAF['dense'][leaf]}",), "dense" if leaf == "kernel"
                     else "vector")
    if len(parents) != 2 or not parents[0].startswith("layer") or \
            not parents[1].startswith("block"):
        return None
    if not (module.startswith("conv") or module.startswith("norm")):
        return None
    prefix = f"{parents[0]}.{parents[1].removeprefix('block')}."
    torch_module = {"conv_downsample": "downsample.0", "norm_downsample": "downsample.1"}.get(
        module, module.replace("norm", "bn"))
    return _leaf_rule(prefix + torch_module, module, leaf)


_TORCH_LEAF = {
    "conv": {"kernel": "weight", "bias": "bias"},
    "dense": {"kernel": "weight", "bias": "bias"},
    "norm": {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"},
}


def _leaf_rule(torch_module: str, module: str, leaf: str) -> _Rule | None:
    kind = "conv" if module.startswith("conv") else "norm"
    if leaf not in _TORCH_LEAF[kind]:
        return None
    layout = "conv" if kind == "conv" and leaf == "kernel" else "vector"
    return _Rule((f"{torch_module}.{_TORCH_LEAF[kind][leaf]}",), layout)


def _vgg_rules(flat: Mapping[str, Any], state: Mapping[str, Any], name: str
               ) -> dict[str, _Rule]:
    """Rules of `VGGCAM`'s conv1_1 ... conv5_3 from torchvision's `features.N` (the index
    counts conv, [BatchNorm,] ReLU modules and a max-pool between stages)."""
    batch_norm = any(p.startswith("params/conv1_1/bn/") for p in flat)
    file_bn = any(k.startswith("features.1.running_") for k in state)
    if any(k.startswith("features.") for k in state) and batch_norm != file_bn:
        with_ = {True: "with", False: "without"}
        raise InputDataError(
            f"{name}: holds VGG16 {with_[file_bn]} BatchNorm (torchvision's "
            f"{'vgg16_bn' if file_bn else 'vgg16'}), the network is {with_[batch_norm]}; "
            f"train with {'--batch-norm' if file_bn else '--no-batch-norm'}")
    rules, index = {}, 0
    for stage, convs in enumerate(_VGG_STAGES, start=1):
        if stage > 1:
            index += 1  # max-pool
        for i in range(1, convs + 1):
            conv, layer = f"features.{index}", f"conv{stage}_{i}"
            rules[f"params/{layer}/conv/kernel"] = _Rule((f"{conv}.weight",), "conv")
            if batch_norm:
                bn = f"features.{index + 1}"
                rules[f"params/{layer}/bn/scale"] = _Rule((f"{bn}.weight",), "vector")
                rules[f"params/{layer}/bn/bias"] = _Rule((f"{bn}.bias",), "vector")
                rules[f"batch_stats/{layer}/bn/mean"] = _Rule(
                    (f"{bn}.running_mean", f"{conv}.bias"), "vector", np.subtract)
                rules[f"batch_stats/{layer}/bn/var"] = _Rule((f"{bn}.running_var",), "vector")
            else:
                rules[f"params/{layer}/conv/bias"] = _Rule((f"{conv}.bias",), "vector")
            index += 3 if batch_norm else 2
    return {p: r for p, r in rules.items() if p in flat}


# ----------------------------------------------------------------------------- layout


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The torch-layout shape of our array's shape."""
    if layout == "conv":  # (*S, I, O) -> (O, I, *S)
        return (shape[-1], shape[-2], *shape[:-2])
    if layout == "dense":
        return tuple(reversed(shape))
    return tuple(shape)


def _from_torch(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":  # (O, I, *S) -> (*S, I, O)
        return np.transpose(array, (*range(2, array.ndim), 1, 0))
    if layout == "dense":
        return array.T
    return array


def _convert(path: str, target: Any, rule: _Rule, state: Mapping[str, np.ndarray],
             name: str) -> np.ndarray:
    shape = tuple(target.shape)
    need = _torch_shape(shape, rule.layout)
    arrays = [np.asarray(state[k]) for k in rule.keys]
    for key, array in zip(rule.keys, arrays):
        if tuple(array.shape) != need:
            raise InputDataError(
                f"{name}: {key} has shape {tuple(array.shape)}, the network's {path} needs "
                f"{need} (torch layout; {shape} in ours)")
    array = rule.combine(*arrays) if rule.combine is not None else arrays[0]
    return np.ascontiguousarray(_from_torch(array, rule.layout)).astype(target.dtype)


def _sample(keys, count: int = 6) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def pretrained_loader(path: str | os.PathLike, architecture: str, *, fc: str | None = None
                      ) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """`variables -> variables` with the file's arrays in place (`load_torchvision`, strict),
    for a program's `--pretrained`: the file is read once, at the first call, and that call
    prints what was loaded, which of our arrays keep their initialisation and which file
    arrays were not used.

    **Raises** (at each call): `InputDataError` as `load_torchvision`.
    """
    state: dict[str, np.ndarray] = {}
    printed = []

    def load(variables: Mapping[str, Any]) -> dict[str, Any]:
        if not state:
            state.update(read_state_dict(path))
        loaded = load_torchvision(variables, state, architecture, fc=fc, name=os.fspath(path))
        if not printed and jax.process_index() == 0:
            kept = sorted({p.split("/")[1] for p in loaded.kept})  # our top-level modules
            print(f"--pretrained {path}: {len(loaded.loaded)} arrays loaded; initialised "
                  f"here: {', '.join(kept) or 'none'}; not used from the file: "
                  f"{_sample(loaded.unused) or 'none'}")
            printed.append(True)
        return loaded.variables

    return load
