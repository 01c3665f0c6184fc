"""Value and both gradients of one convolution, XLA's kernel gradient against the patch product.

The layers are those of the project's networks (VGG16-CAM at batch 4, 224^2; the dilated
ResNet-50 of the segmentation network at batch 2, 256^2, output stride 8; ResNet-18 tiles at
batch 8; the mapping GAN's and small-channel layers). For each: the time of `grad` of
`sum(conv(x, K)^2)` in `x` and `K` under `conv_gradient('xla')` and `conv_gradient('patches')`,
their ratio (XLA over patches: above 1 = the patch product is faster), GFLOP/s and MFU of
each (`benchmarks._timing.achieved`), and the mode
`conv_gradient('auto')` picks for the shape (`jaxmed.layers._conv._patches_pay_off`). Both
modes are timed in the same run, interleaved per layer.

    python benchmarks/conv_gradient.py
    python benchmarks/conv_gradient.py --only vgg --repeats 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import achieved, peak_line, print_table, time_jitted
from jaxmed.layers import conv, conv_gradient
from jaxmed.layers._conv import _patches_pay_off


class Layer(NamedTuple):
    name: str
    batch: int
    size: int
    c_in: int
    c_out: int
    kernel: int
    stride: int = 1
    dilation: int = 1


LAYERS = [
    Layer("vgg conv1_1", 4, 224, 3, 64, 3),
    Layer("vgg conv1_2", 4, 224, 64, 64, 3),
    Layer("vgg conv2_2", 4, 112, 128, 128, 3),
    Layer("vgg conv3", 4, 56, 256, 256, 3),
    Layer("vgg conv4", 4, 28, 512, 512, 3),
    Layer("vgg conv5", 4, 14, 512, 512, 3),
    Layer("vgg conv6", 4, 14, 512, 1024, 3),
    Layer("resnet50 stem", 2, 256, 3, 64, 7, stride=2),
    Layer("resnet50 1x1 64->256", 2, 64, 64, 256, 1),
    Layer("resnet50 1x1 256->64", 2, 64, 256, 64, 1),
    Layer("resnet50 layer1 3x3", 2, 64, 64, 64, 3),
    Layer("resnet50 layer2 3x3/2", 2, 64, 128, 128, 3, stride=2),
    Layer("resnet50 layer2 3x3", 2, 32, 128, 128, 3),
    Layer("resnet50 downsample 1x1/2", 2, 64, 256, 512, 1, stride=2),
    Layer("resnet50 layer3 3x3 d2", 2, 32, 256, 256, 3, dilation=2),
    Layer("resnet50 1x1 1024->256", 2, 32, 1024, 256, 1),
    Layer("resnet50 layer4 3x3 d4", 2, 32, 512, 512, 3, dilation=4),
    Layer("resnet50 1x1 2048->512", 2, 32, 2048, 512, 1),
    Layer("resnet18 layer1 3x3", 8, 56, 64, 64, 3),
    Layer("resnet18 layer2 3x3/2", 8, 56, 64, 128, 3, stride=2),
    Layer("gan 3x3 32", 16, 64, 32, 32, 3),
    Layer("3x3 16", 8, 128, 16, 16, 3),
]


def _grad_fn(layer: Layer):
    def loss(x, kernel):
        return jnp.sum(conv(x, kernel, layer.stride, "SAME", dilation=layer.dilation) ** 2)
    return jax.grad(loss, argnums=(0, 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated substrings of layer names")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per mode (median)")
    args = parser.parse_args(argv)
    wanted = [w for w in args.only.split(",") if w]
    layers = [la for la in LAYERS if not wanted or any(w in la.name for w in wanted)]
    if not layers:
        parser.error(f"--only {args.only!r} matches no layer")
    rows = []
    for layer in layers:
        x = jax.random.normal(jax.random.key(0), (layer.batch, layer.size, layer.size, layer.c_in))
        shape = (layer.kernel, layer.kernel, layer.c_in, layer.c_out)
        kernel = jax.random.normal(jax.random.key(1), shape) / (layer.kernel * layer.c_in ** 0.5)
        times = {}
        for mode in ("xla", "patches"):
            with conv_gradient(mode):  # a new function object per mode: jit traces it afresh
                times[mode] = time_jitted(_grad_fn(layer), x, kernel, repeats=args.repeats)
        window = (layer.kernel - 1) * layer.dilation + 1
        pads = jax.lax.padtype_to_pads((layer.size,) * 2, (window,) * 2, (layer.stride,) * 2,
                                       "SAME")
        auto = _patches_pay_off(x.shape, shape, (layer.stride,) * 2, tuple(pads),
                                (layer.dilation,) * 2, 4)
        xla, patches = times["xla"], times["patches"]
        rates = [*achieved(xla.flops, xla.median_s), *achieved(patches.flops, patches.median_s)]
        rows.append([layer.name,
                     f"{layer.batch}x{layer.size}^2 {layer.c_in}->{layer.c_out} k{layer.kernel}"
                     f" s{layer.stride} d{layer.dilation}",
                     xla.median_s * 1e3, patches.median_s * 1e3, xla.median_s / patches.median_s,
                     *rates, "patches" if auto else "xla"])
    print_table(["layer", "shape", "xla ms", "patches ms", "xla / patches", "xla GFLOP/s",
                 "xla MFU", "patches GFLOP/s", "patches MFU", "auto picks"], rows)
    print(peak_line())


if __name__ == "__main__":
    main()
