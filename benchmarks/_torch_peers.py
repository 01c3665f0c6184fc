"""PyTorch equivalents of jaxmed's networks, for the peer benchmark (`benchmarks/peers.py`).

Written from the structure of our Flax modules, layer for layer, so that both sides hold the
same parameters (the tests compare the counts) and compute the same layer shapes. PyTorch is
channels-first: images `(B, C, H, W)`, volumes `(B, C, D, H, W)`. Importing this module needs
torch (the `peers` extra); nothing in `jaxmed` imports it.

- `segmentation_net`: `jaxmed.models.segmentation.SegmentationNet` (two-conv 3x3 stem, CBAM,
  dilated ResNet, CBAM, pyramid pooling, PSPNet head, optional auxiliary head).
- `vgg_cam`: `jaxmed.models.vgg_cam.VGGCAM` without suppression modules or BatchNorm.
- `unet`: `jaxmed.models.mapping_gan.UNet` (2-D or 3-D, BatchNorm).
- `dense_critic`: `jaxmed.models.mapping_gan.Critic(kind='dense', norm='layer')` (its
  LayerNorm over positions and channels is `GroupNorm(1, C)`; GSoP with per-row LayerNorm).

Differences that cannot matter for speed but are there: Flax's SAME padding of a stride-2
convolution on an even input pads one pixel on the high side only, PyTorch's `padding=1` one on
each side (same output size, sampling grid shifted by one pixel: the critic's stem); the
critic's flattened head input is taken channels-last, as ours, so the head's weights line up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_BOTTLENECK_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_BASIC_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _conv_cls(nsp: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[nsp]


def _bn_cls(nsp: int):
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nsp]


def count_params(module: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())


def _bn(channels: int, nsp: int = 2) -> nn.Module:
    # Flax momentum 0.9 (weight of the old statistics) is PyTorch's momentum 0.1.
    return _bn_cls(nsp)(channels, eps=1e-5, momentum=0.1)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
             nsp: int = 2) -> nn.Sequential:
    """Bias-free conv with padding `dilation (k - 1) / 2` on both sides, then BatchNorm
    (`jaxmed.models.resnet.conv_norm`)."""
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(_conv_cls(nsp)(cin, cout, kernel, stride, pad, dilation, bias=False),
                         _bn(cout, nsp))


# ----------------------------------------------------------------------------
# ResNet blocks (jaxmed.models.resnet)
# ----------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, features: int, stride: int, dilation: int):
        super().__init__()
        out = features * self.expansion
        self.branch = nn.Sequential(
            _conv_bn(cin, features, 1), nn.ReLU(inplace=True),
            _conv_bn(features, features, 3, stride, dilation), nn.ReLU(inplace=True),
            _conv_bn(features, out, 1))
        self.shortcut = (None if stride == 1 and cin == out
                         else _conv_bn(cin, out, 1, stride))

    def forward(self, x):
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.branch(x) + s)


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, features: int, stride: int, dilation: int):
        super().__init__()
        self.branch = nn.Sequential(
            _conv_bn(cin, features, 3, stride, dilation), nn.ReLU(inplace=True),
            _conv_bn(features, features, 3, 1, dilation))
        self.shortcut = (None if stride == 1 and cin == features
                         else _conv_bn(cin, features, 1, stride))

    def forward(self, x):
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.branch(x) + s)


def _dilation_schedule(output_stride: int):
    """`(stride, first_dilation, dilation)` of layers 1-4, as `dilation_schedule`."""
    dilated = {32: (False, False, False), 16: (False, False, True),
               8: (False, True, True)}[output_stride]
    schedule, dilation = [(1, 1, 1)], 1
    for d in dilated:
        previous = dilation
        dilation = dilation * 2 if d else dilation
        schedule.append((1 if d else 2, previous, dilation))
    return schedule


def _resnet_layers(cin: int, width: int, depth: int, output_stride: int):
    if depth in _BOTTLENECK_DEPTHS:
        block, sizes = _Bottleneck, _BOTTLENECK_DEPTHS[depth]
    else:
        block, sizes = _Basic, _BASIC_DEPTHS[depth]
    layers = []
    for i, (stride, first_dilation, dilation) in enumerate(_dilation_schedule(output_stride)):
        blocks = []
        for j in range(sizes[i]):
            blocks.append(block(cin, width * 2**i, stride if j == 0 else 1,
                                first_dilation if j == 0 else dilation))
            cin = width * 2**i * block.expansion
        layers.append(nn.Sequential(*blocks))
    return nn.ModuleList(layers), cin


# ----------------------------------------------------------------------------
# CBAM, pyramid pooling, heads, the segmentation network
# ----------------------------------------------------------------------------


class _CBAM(nn.Module):
    """Channel gate (shared MLP with biases on mean and max) then spatial gate (7x7 conv of
    [max, mean], no bias, BatchNorm with zero-initialised scale, sigmoid)."""

    def __init__(self, channels: int, reduction: int = 16, kernel: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.hidden = nn.Linear(channels, hidden)
        self.out = nn.Linear(hidden, channels)
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)
        self.norm = _bn(1)
        nn.init.zeros_(self.norm.weight)

    def forward(self, x):
        pooled = torch.stack([x.mean((2, 3)), x.amax((2, 3))])  # [2, B, C]
        logits = self.out(F.relu(self.hidden(pooled))).sum(0)  # [B, C]
        x = x * torch.sigmoid(logits)[:, :, None, None]
        maps = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)  # [B, 2, H, W]
        return x * torch.sigmoid(self.norm(self.conv(maps)))


class _PyramidPooling(nn.Module):
    def __init__(self, channels: int, reduced: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, reduced, 1, bias=False), _bn(reduced),
                          nn.ReLU(inplace=True)) for _ in self.bins)

    def forward(self, x):
        size = x.shape[2:]
        out = [x]
        for b, branch in zip(self.bins, self.branches):
            y = branch(F.adaptive_avg_pool2d(x, b))
            out.append(F.interpolate(y, size, mode="bilinear", align_corners=True))
        return torch.cat(out, 1)


class _Head(nn.Module):
    def __init__(self, cin: int, hidden: int, classes: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, hidden, 3), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Conv2d(hidden, classes, 1))

    def forward(self, x):
        return self.body(x)


class SegmentationNet(nn.Module):
    """`jaxmed.models.segmentation.SegmentationNet` with the 3x3 stem, 2-D."""

    def __init__(self, num_classes: int = 3, depth: int = 50, width: int = 64,
                 output_stride: int = 16, use_cbam: bool = True, use_ppm: bool = True,
                 aux_head: bool = False, cbam_reduction: int = 16, dropout: float = 0.1,
                 in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn(in_channels, width, 3, 2), nn.ReLU(inplace=True),
            _conv_bn(width, 2 * width, 3), nn.ReLU(inplace=True))
        self.cbam_stem = _CBAM(2 * width, cbam_reduction) if use_cbam else nn.Identity()
        self.layers, channels = _resnet_layers(2 * width, width, depth, output_stride)
        self.cbam = _CBAM(channels, cbam_reduction) if use_cbam else nn.Identity()
        self.ppm = _PyramidPooling(channels, channels // 4) if use_ppm else None
        head_in = 2 * channels if use_ppm else channels
        self.head = _Head(head_in, 8 * width, num_classes, dropout)
        layer3 = self.layers[2][-1]
        layer3_out = (layer3.branch[-1][0].out_channels)
        self.aux = _Head(layer3_out, 4 * width, num_classes, dropout) if aux_head else None

    def forward(self, x):
        size = x.shape[2:]
        h = F.max_pool2d(self.stem(x), 3, 2, 1)
        h = self.cbam_stem(h)
        features = []
        for layer in self.layers:
            h = layer(h)
            features.append(h)
        h = self.cbam(h)
        if self.ppm is not None:
            h = self.ppm(h)
        out = {"logits": F.interpolate(self.head(h), size, mode="bilinear", align_corners=True)}
        if self.aux is not None:
            out["aux_logits"] = F.interpolate(self.aux(features[2]), size, mode="bilinear",
                                              align_corners=True)
        return out


def segmentation_net(**kwargs) -> SegmentationNet:
    return SegmentationNet(**kwargs)


# ----------------------------------------------------------------------------
# VGG16-CAM
# ----------------------------------------------------------------------------


class VGGCAM(nn.Module):
    """`jaxmed.models.vgg_cam.VGGCAM` without suppression modules or BatchNorm: VGG16's 13
    3x3 convs (bias, ReLU), 2x2 max-pools between stages (pool5 removed), conv6 3x3 + ReLU,
    global average pooling, a linear classifier."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (64, 128, 256, 512, 512),
                 conv6_width: int = 1024, in_channels: int = 3):
        super().__init__()
        layers, cin = [], in_channels
        for stage, (n, w) in enumerate(zip((2, 2, 3, 3, 3), widths)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(n):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True)]
                cin = w
        layers += [nn.Conv2d(cin, conv6_width, 3, padding=1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(conv6_width, num_classes)

    def forward(self, x):
        features = self.features(x)
        return {"logits": self.classifier(features.mean((2, 3))), "features": features}


def vgg_cam(**kwargs) -> VGGCAM:
    return VGGCAM(**kwargs)


# ----------------------------------------------------------------------------
# Mapping GAN: U-Net generator and dense critic
# ----------------------------------------------------------------------------


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, features: int, nsp: int):
        super().__init__()
        conv = _conv_cls(nsp)
        self.body = nn.Sequential(
            conv(cin, features, 3, padding=1, bias=False), _bn(features, nsp),
            nn.ReLU(inplace=True),
            conv(features, features, 3, padding=1, bias=False), _bn(features, nsp),
            nn.ReLU(inplace=True))

    def forward(self, x):
        return self.body(x)


class UNet(nn.Module):
    """`jaxmed.models.mapping_gan.UNet` with BatchNorm: returns `M(x)`, the shape of `x`."""

    def __init__(self, features: Sequence[int] = (16, 32, 64, 128), in_channels: int = 1,
                 nsp: int = 3):
        super().__init__()
        self.nsp = nsp
        features = tuple(features)
        self.down = nn.ModuleList()
        cin = in_channels
        for f in features:
            self.down.append(_ConvBlock(cin, f, nsp))
            cin = f
        transpose = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nsp]
        self.upsample, self.up = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(features) - 1)):
            f = features[level]
            self.upsample.append(nn.Sequential(transpose(cin, f, 2, 2, bias=False), _bn(f, nsp),
                                               nn.ReLU(inplace=True)))
            self.up.append(_ConvBlock(2 * f, f, nsp))
            cin = f
        self.out = _conv_cls(nsp)(cin, in_channels, 3, padding=1)

    def forward(self, x):
        pool = {2: F.max_pool2d, 3: F.max_pool3d}[self.nsp]
        skips, h = [], x
        for level, block in enumerate(self.down):
            if level:
                h = pool(h, 2)
            h = block(h)
            skips.append(h)
        for i, (upsample, block) in enumerate(zip(self.upsample, self.up)):
            skip = skips[len(skips) - 2 - i]
            h = block(torch.cat([skip, upsample(h)], 1))
        return self.out(h)


def unet(**kwargs) -> UNet:
    return UNet(**kwargs)


class _LayerNorm(nn.Module):
    """LayerNorm over all positions and channels of a sample with a per-channel scale and bias
    (our critic's 'layer' norm): `GroupNorm` with one group."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels, eps=1e-5)

    def forward(self, x):
        return self.norm(x)


class _SecondOrderPooling(nn.Module):
    """GSoP channel attention with 'layer' norms (`jaxmed.layers.SecondOrderPooling`)."""

    def __init__(self, channels: int, reduced: int, expansion: int = 4):
        super().__init__()
        self.reduce = nn.Linear(channels, reduced)
        self.reduce_norm = nn.LayerNorm(reduced, eps=1e-5)
        self.row_scale = nn.Parameter(torch.ones(reduced))
        self.row_bias = nn.Parameter(torch.zeros(reduced))
        self.row_kernel = nn.Parameter(torch.randn(reduced, expansion, reduced) / reduced**0.5)
        self.row_conv_bias = nn.Parameter(torch.zeros(reduced, expansion))
        self.expand = nn.Linear(reduced * expansion, channels)

    def forward(self, x):
        b, c = x.shape[:2]
        z = x.reshape(b, c, -1).transpose(1, 2)  # [B, N, C]
        z = F.relu(self.reduce_norm(self.reduce(z)))  # [B, N, d]
        centred = z - z.mean(1, keepdim=True)
        cov = centred.transpose(1, 2) @ centred / z.shape[1]  # [B, d, d]
        cov = F.layer_norm(cov, cov.shape[-1:], eps=1e-5)
        cov = cov * self.row_scale[:, None] + self.row_bias[:, None]
        rows = torch.einsum("bik,iqk->biq", cov, self.row_kernel) + self.row_conv_bias
        weight = torch.sigmoid(self.expand(rows.reshape(b, -1)))  # [B, C]
        return x * weight.reshape(b, c, *(1,) * (x.ndim - 2))


class DenseCritic(nn.Module):
    """`jaxmed.models.mapping_gan.Critic(kind='dense', norm='layer', downsample='pool')`."""

    def __init__(self, widths: Sequence[int] = (16, 32, 48), growth_rate: int = 16,
                 layers_per_block: int = 3, stem_strides: int = 2, reduced_channels: int = 16,
                 head_features: int | None = 16, negative_slope: float = 0.2,
                 in_channels: int = 1, input_size: Sequence[int] = (32, 32, 32)):
        super().__init__()
        nsp = len(input_size)
        self.nsp, self.slope = nsp, negative_slope
        conv = _conv_cls(nsp)
        self.stem = conv(in_channels, widths[0], 3, stem_strides, 1)
        size = [-(-s // stem_strides) for s in input_size]
        self.stages = nn.ModuleList()
        c = widths[0]
        for b, w in enumerate(widths):
            stage = nn.ModuleDict()
            if b:
                stage["transition_norm"] = _LayerNorm(c)
                stage["transition_conv"] = conv(c, w, 1)
                c = w
                size = [s // 2 for s in size]
            stage["norms"] = nn.ModuleList()
            stage["convs"] = nn.ModuleList()
            for _ in range(layers_per_block):
                stage["norms"].append(_LayerNorm(c))
                stage["convs"].append(conv(c, growth_rate, 3, padding=1))
                c += growth_rate
            self.stages.append(stage)
        self.final_norm = _LayerNorm(c)
        self.second_order = _SecondOrderPooling(c, reduced_channels)
        flat = c
        for s in size:
            flat *= s
        if head_features is None:
            self.head = nn.Linear(flat, 1)
        else:
            self.head = nn.Sequential(nn.Linear(flat, head_features),
                                      nn.LeakyReLU(negative_slope), nn.Linear(head_features, 1))

    def _act(self, x):
        return F.leaky_relu(x, self.slope)

    def forward(self, x):
        pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[self.nsp]
        h = self.stem(x)
        for b, stage in enumerate(self.stages):
            if b:
                h = pool(stage["transition_conv"](self._act(stage["transition_norm"](h))), 2)
            for norm, conv in zip(stage["norms"], stage["convs"]):
                h = torch.cat([h, conv(self._act(norm(h)))], 1)
        h = self.second_order(self._act(self.final_norm(h)))
        h = torch.movedim(h, 1, -1).reshape(h.shape[0], -1)  # channels-last, as ours
        return self.head(h)[:, 0]


def dense_critic(**kwargs) -> DenseCritic:
    return DenseCritic(**kwargs)
