"""Against PyTorch: torchvision-shaped networks with random weights and BatchNorm statistics,
saved as safetensors, loaded into ours; the same images give the same outputs (eval mode).

torchvision itself is not needed: the torch modules below have its module names (so its
state-dict keys), shapes, strides and paddings (ResNet v1.5: the bottleneck's stride on its
3x3 conv).
"""

from functools import partial

import jax
import numpy as np
import pytest

from jaxmed.models.attention_resnet import AttentionResNet18
from jaxmed.models.resnet import ResNet18, ResNet50
from jaxmed.models.segmentation import SegmentationNet
from jaxmed.models.vgg_cam import VGGCAM
from jaxmed.weights import load_torchvision

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn

TOLERANCE = 1e-4


def _vgg16_features(batch_norm: bool) -> "nn.Sequential":
    layers, channels = [], 3
    for stage, (convs, width) in enumerate(zip((2, 2, 3, 3, 3), (64, 128, 256, 512, 512))):
        if stage:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers.append(nn.Conv2d(channels, width, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
    return nn.Sequential(*layers, nn.MaxPool2d(2, 2))  # pool5: VGG16-CAM drops it


class _VGG16(nn.Module):
    def __init__(self, batch_norm: bool):
        super().__init__()
        self.features = _vgg16_features(batch_norm)
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 16), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(16, 16), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(16, 10))  # unused by ours: listed


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(inplanes, planes, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = _projection(inplanes, 4 * planes, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def _projection(inplanes, out, stride):
    if stride == 1 and inplanes == out:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))


class _ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, blocks in enumerate(layers):
            planes = 64 * 2**i
            stage = []
            for j in range(blocks):
                stage.append(block(inplanes, planes, 2 if i and not j else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(inplanes, num_classes)

    def features(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _randomise(module, seed: int):
    """Random weights and running statistics everywhere (a fresh BatchNorm is the identity in
    eval mode and would hide a mix-up of its arrays)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape,
                                                       generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
            elif isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator)
                               * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
    return module.eval()


def _save(module, path):
    safetensors_torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                                str(path))
    return path


def _images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def _torch_run(fn, images):
    with torch.no_grad():
        out = fn(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    out = out.numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def _relative(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def _shapes(model, size):
    """The network's variables as shapes only (initialising ResNet-50's 25 M parameters with
    JAX's generator takes seconds; every array the file has is loaded anyway)."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          np.zeros((1, size, size, 3), np.float32))


def _filled(variables):
    """The arrays that the file lacks (and so are still shapes) filled: BatchNorm scales and
    variances 1, the rest small random numbers."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if path[-1].key in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        return (0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, variables)


@pytest.mark.parametrize("batch_norm", [False, True], ids=["vgg16", "vgg16_bn"])
def test_vgg16_features_match_torch(tmp_path, batch_norm):
    torch_net = _randomise(_VGG16(batch_norm), seed=1)
    path = _save(torch_net, tmp_path / "vgg16.safetensors")
    images = _images(32)
    model = VGGCAM(num_classes=3, batch_norm=batch_norm)
    loaded = load_torchvision(_shapes(model, 32), path, "vgg16")
    _, inter = jax.jit(partial(model.apply, capture_intermediates=True))(
        _filled(loaded.variables), images)
    ours = inter["intermediates"]["conv5_3"]["__call__"][0]  # [B, 2, 2, 512], after ReLU
    theirs = _torch_run(torch_net.features[:-1], images)  # without pool5
    assert ours.shape == theirs.shape
    assert _relative(ours, theirs) <= TOLERANCE
    assert all(p.split("/")[1] in ("conv6", "classifier") for p in loaded.kept)
    assert loaded.unused == [f"classifier.{i}.{w}" for i in (0, 3, 6) for w in ("bias", "weight")]


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_logits_match_torch(tmp_path, depth):
    block, layers, ours_model = {18: (_Basic, (2, 2, 2, 2), ResNet18),
                                 50: (_Bottleneck, (3, 4, 6, 3), ResNet50)}[depth]
    torch_net = _randomise(_ResNet(block, layers), seed=depth)
    path = _save(torch_net, tmp_path / f"resnet{depth}.safetensors")
    images = _images(64)
    model = ours_model(num_classes=1000)
    loaded = load_torchvision(_shapes(model, 64), path, "resnet", fc="head")
    assert loaded.kept == [] and loaded.unused == []
    assert _relative(jax.jit(model.apply)(loaded.variables, images),
                     _torch_run(torch_net, images)) <= TOLERANCE


def test_attention_resnet18_and_segmentation_take_the_resnet(tmp_path):
    """The whole-slide extractor and the segmentation backbone (7x7 stem) load every ResNet
    array; their own modules (spatial attention, CBAM, pyramid pooling, heads) are kept."""
    torch_net = _randomise(_ResNet(_Basic, (2, 2, 2, 2)), seed=3)
    path = _save(torch_net, tmp_path / "resnet18.safetensors")
    images = _images(64)
    theirs = _torch_run(torch_net.features, images)  # layer 4: [B, 2, 2, 512]

    extractor = AttentionResNet18(num_classes=2)
    loaded = load_torchvision(_shapes(extractor, 64), path, "resnet")
    assert {p.split("/")[1] for p in loaded.kept} == {"stem_attention", "attention", "hidden",
                                                      "head"}
    assert loaded.unused == ["fc.bias", "fc.weight"]
    # With both attention gates open (their BatchNorm scale starts at 0, so a large bias
    # gives sigmoid = 1 everywhere) the extractor is the ResNet.
    variables = _filled(loaded.variables)
    for gate in ("stem_attention", "attention"):
        variables["params"][gate]["norm"] = {"scale": np.zeros(1, np.float32),
                                             "bias": np.full(1, 50.0, np.float32)}
    features = jax.jit(extractor.apply)(variables, images)["features"]
    assert _relative(features, theirs.mean(axis=(1, 2))) <= TOLERANCE

    segmenter = SegmentationNet(depth=18, width=64, stem="7x7", output_stride=32)
    loaded = load_torchvision(_shapes(segmenter, 64), path, "resnet")
    assert {p.split("/")[1] for p in loaded.kept} >= {"cbam", "cbam_stem", "ppm", "head"}
    assert not any(p.split("/")[1].startswith(("layer", "conv_stem", "norm_stem"))
                   for p in loaded.kept)
    _, inter = jax.jit(partial(segmenter.apply, mutable=["intermediates"]))(
        _filled(loaded.variables), images)
    # Layer 1 follows CBAM; layer 4 of the same input as torch's needs CBAM to be the
    # identity, so compare the stem (before CBAM) instead, and check layer 4's shape.
    stem = _torch_run(lambda x: torch.relu(torch_net.bn1(torch_net.conv1(x))), images)
    assert _relative(inter["intermediates"]["stem_features"][0], stem) <= TOLERANCE
    assert inter["intermediates"]["layer4_features"][0].shape == theirs.shape


def test_converter_round_trip_and_refusals(tmp_path):
    from jaxmed.errors import InputDataError
    from jaxmed.weights import convert, read_state_dict

    torch_net = _randomise(_ResNet(_Basic, (1, 1, 1, 1), num_classes=4), seed=5)
    source = tmp_path / "resnet.pth"
    torch.save(torch_net.state_dict(), source)
    assert convert(source, tmp_path / "resnet.safetensors") == len(torch_net.state_dict())
    read = read_state_dict(tmp_path / "resnet.safetensors")
    for key, tensor in torch_net.state_dict().items():
        np.testing.assert_array_equal(read[key], tensor.numpy())

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"net": _Basic(4, 4, 1)}, unsafe)  # a pickled module: weights_only refuses it
    with pytest.raises(InputDataError, match="weights_only=True"):
        convert(unsafe, tmp_path / "unsafe.safetensors")
    assert not (tmp_path / "unsafe.safetensors").exists()
