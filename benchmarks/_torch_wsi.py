"""The PyTorch reference of `benchmarks/wsi_speed.py`: the same attention ResNet-18 in PyTorch
eager, and a CLAM-like tile pipeline around it (OpenSlide reads in a `DataLoader` with worker
processes, stain recolouring in NumPy in the workers, both networks and the tile fusion in the
main process). Imported only when torch is installed; torch is no dependency of jaxmed.

- `TorchAttentionResNet`: layer for layer `jaxmed.models.attention_resnet.AttentionResNet`
  with basic blocks (PyTorch's NCHW layout; `channels_last` memory format as an option), the
  same parameter names so `load_flax_variables` copies a Flax state into it.
- `recolour`: SPCN with fixed source and target profiles, concentrations by least squares
  through the pseudo-inverse of the source stains (torchstain's Macenko way; ours solves the
  non-negative lasso), in NumPy.
- `TileDataset` + `run_pipeline`: what a CLAM-style extraction does per batch of tiles.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PipelineResult", "SlideTiles", "TileDataset", "TorchAttentionResNet",
           "count_parameters", "load_flax_variables", "recolour", "run_pipeline",
           "tile_outputs"]

_WHITE = 255.0


# ---------------------------------------------------------------------------- the network


class SpatialAttention(nn.Module):
    """CBAM spatial gate: `x * sigmoid(BN(conv7([max_c x, mean_c x])))`, maximum first."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(1, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        a = torch.sigmoid(self.norm(self.conv(pooled)))  # a: [B, 1, H, W]
        return x * a, a


class BasicBlock(nn.Module):
    """`relu(N(conv3(relu(N(conv3_s(x))))) + shortcut(x))`, projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.project = stride != 1 or cin != cout
        if self.project:
            self.conv_downsample = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.norm_downsample = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.norm_downsample(self.conv_downsample(x)) if self.project else x
        return F.relu(y + shortcut)


class TorchAttentionResNet(nn.Module):
    """Attention ResNet-18 (`stage_sizes` blocks per layer) of base width `width`, with the
    pre-training head when `num_classes` is given. `forward(x [B, 3, H, W])` returns
    `{"features": [B, 8w], "score": [B]}` (and `"logits"`)."""

    def __init__(self, width: int = 64, num_classes: int | None = None, hidden: int = 256,
                 stage_sizes: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.norm_stem = nn.BatchNorm2d(width, eps=1e-5)
        self.stem_attention = SpatialAttention()
        cin = width
        for i, size in enumerate(stage_sizes):
            cout = width * 2**i
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1)
                      for j in range(size)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.attention = SpatialAttention()
        if num_classes is not None:
            self.hidden = nn.Linear(cin, hidden)
            self.head = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.norm_stem(self.conv_stem(x)))
        h, _ = self.stem_attention(h)
        h = F.max_pool2d(h, 3, 2, 1)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        h, a = self.attention(h)
        features = h.mean(dim=(2, 3))
        out = {"features": features, "score": a.float().mean(dim=(1, 2, 3))}
        if self.num_classes is not None:
            out["logits"] = self.head(F.relu(self.hidden(features)))
        return out


def load_flax_variables(net: TorchAttentionResNet, params: Mapping, batch_stats: Mapping
                        ) -> None:
    """Copies a Flax `AttentionResNet`'s variables into `net` (same names; HWIO kernels to
    OIHW, dense kernels transposed, BatchNorm scale/bias/mean/var to weight/bias/running
    statistics)."""
    renames = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
    state = {}
    for tree in (params, batch_stats):
        for path, leaf in _flatten(tree):
            parts = [p.removeprefix("block") if p.startswith("block") else p for p in path]
            value = np.asarray(leaf, np.float32)
            if path[-1] == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            state[".".join(parts[:-1] + [renames[parts[-1]]])] = torch.from_numpy(value.copy())
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"Flax variables do not match the torch network: missing {missing}, "
                         f"unexpected {unexpected}")


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def count_parameters(net: nn.Module) -> int:
    """Trainable parameters (BatchNorm's running statistics, buffers, not included)."""
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------- normalisation


def recolour(rgb: np.ndarray, source_stains: np.ndarray, source_p99: np.ndarray,
             target_stains: np.ndarray, target_p99: np.ndarray) -> np.ndarray:
    """SPCN with fixed profiles in NumPy: optical density `-ln(max(I, 1) / 255)`,
    concentrations by least squares (`od @ pinv(source_stains)`), scaled by the p99 ratio,
    mixed with the target stains. `(H, W, 3)` uint8 -> `(H, W, 3)` uint8."""
    od = -np.log(np.maximum(rgb.reshape(-1, 3).astype(np.float32), 1.0) / _WHITE)  # [P, 3]
    unmixing = np.linalg.pinv(source_stains.astype(np.float32))  # [3, 2]
    c = (od @ unmixing) * (target_p99 / source_p99)  # [P, 2]
    intensity = _WHITE * np.exp(-(c @ target_stains.astype(np.float32)))  # [P, 3]
    return np.clip(np.round(intensity), 0, 255).astype(np.uint8).reshape(rgb.shape)


# ---------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class SlideTiles:
    """One slide's work: its file, level-0 tile corners `(N, 2)` and stain profiles."""

    path: str
    coords: np.ndarray
    source_stains: np.ndarray
    source_p99: np.ndarray


class TileDataset(torch.utils.data.Dataset):
    """Tiles of several slides read with OpenSlide at level 0 (RGBA -> RGB) and recoloured
    onto the target profile: item `i` is `(slide index, uint8 [T, T, 3])`. Each worker
    process opens each slide once."""

    def __init__(self, slides: Sequence[SlideTiles], tile_size: int,
                 target_stains: np.ndarray, target_p99: np.ndarray):
        self.slides = list(slides)
        self.tile_size = tile_size
        self.target = (np.asarray(target_stains, np.float32),
                       np.asarray(target_p99, np.float32))
        self.items = [(s, i) for s, slide in enumerate(self.slides)
                      for i in range(len(slide.coords))]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        import openslide

        s, i = self.items[index]
        slide = self.slides[s]
        if s not in self._open:
            self._open[s] = openslide.OpenSlide(slide.path)
        x, y = (int(v) for v in slide.coords[i])
        region = self._open[s].read_region((x, y), 0, (self.tile_size, self.tile_size))
        rgb = np.asarray(region)[..., :3]
        tile = recolour(rgb, slide.source_stains, slide.source_p99, *self.target)
        return s, torch.from_numpy(tile)


def tile_outputs(low_net: nn.Module, high_net: nn.Module, tiles: torch.Tensor, *,
                 ratio: float, dtype: torch.dtype, channels_last: bool
                 ) -> dict[str, torch.Tensor]:
    """The per-tile outputs of `jaxmed.pathology.steps.tile_outputs` for uint8 tiles
    `[B, T, T, 3]`: the tile area-downsampled by `ratio` for `low_net`, its `k²` blocks for
    `high_net`, inputs in [-1, 1], tile features `[F_L ; sum_i w_i F_H,i]` with the patch
    scores normalised to sum 1."""
    k = round(1 / ratio)
    b, t = tiles.shape[:2]
    s = t // k
    pixels = tiles.float()
    low = pixels.reshape(b, s, k, s, k, 3).mean(dim=(2, 4))  # [B, s, s, 3]
    high = pixels.reshape(b, k, s, k, s, 3).permute(0, 1, 3, 2, 4, 5).reshape(b * k * k, s, s, 3)

    def network_input(images: torch.Tensor) -> torch.Tensor:
        x = (images / 127.5 - 1.0).to(dtype).permute(0, 3, 1, 2)  # NCHW view, NHWC strides
        return x.contiguous(memory_format=torch.channels_last if channels_last
                            else torch.contiguous_format)

    lo = low_net(network_input(low))
    hi = high_net(network_input(high))
    low_features = lo["features"].float()
    high_features = hi["features"].float().reshape(b, k * k, -1)
    high_scores = hi["score"].reshape(b, k * k)
    weights = high_scores / high_scores.sum(dim=1, keepdim=True)
    tile_features = torch.cat([low_features, torch.einsum("bn,bnd->bd", weights,
                                                          high_features)], dim=1)
    return {"low_features": low_features, "low_scores": lo["score"],
            "high_features": high_features, "high_scores": high_scores,
            "tile_features": tile_features}


@dataclass(frozen=True)
class PipelineResult:
    tiles: int
    seconds: float
    input_wait_seconds: float
    slide_features: list[np.ndarray]


def run_pipeline(slides: Sequence[SlideTiles], low_net: nn.Module, high_net: nn.Module, *,
                 tile_size: int, ratio: float, target_stains: np.ndarray,
                 target_p99: np.ndarray, batch_size: int, workers: int, dtype: torch.dtype,
                 channels_last: bool) -> PipelineResult:
    """Every tile of `slides` through `DataLoader(TileDataset, workers)` -> `tile_outputs`,
    then per slide `F_slide = sum_t w_L,t F_tile,t` (low scores normalised over the slide).

    `seconds` runs from creating the loader (the workers start inside it) to the last slide
    feature; `input_wait_seconds` is the time the main process spent waiting for batches."""
    dataset = TileDataset(slides, tile_size, target_stains, target_p99)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for net in (low_net, high_net):
        net.to(dtype=dtype, memory_format=memory_format).eval()
    per_slide: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         shuffle=False, prefetch_factor=2 if workers else None)
    wait = 0.0
    with torch.inference_mode(), warnings.catch_warnings():
        # The workers are forked (Linux's default, what CLAM gets) from a process with JAX's
        # threads; they only read and recolour tiles, so the warning about it does not apply.
        warnings.filterwarnings("ignore", message=".*fork.*", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        batches = iter(loader)
        while True:
            before = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - before
            if batch is None:
                break
            index, tiles = batch
            out = tile_outputs(low_net, high_net, tiles, ratio=ratio, dtype=dtype,
                               channels_last=channels_last)
            for s in index.unique().tolist():
                rows = index == s
                per_slide.setdefault(s, []).append((out["tile_features"][rows],
                                                    out["low_scores"][rows]))
        features = []
        for s in sorted(per_slide):
            tile_features = torch.cat([f for f, _ in per_slide[s]])
            scores = torch.cat([w for _, w in per_slide[s]])
            features.append(((scores / scores.sum()) @ tile_features).numpy())
    seconds = time.perf_counter() - start
    return PipelineResult(len(dataset), seconds, wait, features)
