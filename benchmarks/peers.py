"""Our networks against the same networks in PyTorch eager, on this machine: images/s of a
training step and of inference, in one process, and the achieved FLOP/s and MFU of ours.

Cases (`--only`, comma-separated):

- `seg-train`: `SegmentationNet(depth=50, width=64, output_stride=8)` (3x3 stem, CBAM, dilated
  ResNet-50, CBAM, pyramid pooling, PSPNet head; no auxiliary head), 3 classes, batch 2, 256^2,
  `supervised_train_step` with pixel cross-entropy and SGD (lr 0.01, momentum 0.9).
- `seg-infer`: the same network, batch 1, 473^2, inference mode.
- `vgg-train`: `VGGCAM(200)`, batch 4, 224^2, cross-entropy, SGD momentum.
- `vgg-infer`: the same, batch 8, 224^2.
- `gan-step`: one generator step of the mapping GAN (k critic updates with the WGAN-GP gradient
  penalty, then the generator update and its moving average), the program's default
  configuration (`train/mapping_gan.py`: 3-D 32^3, batch 4, k = 5, U-Net 8,16,32) with the
  DENSE critic (`--critic dense`): the PyTorch side has no tensor-train layers, so both sides
  run the critic of the same layer shapes as ordinary convolutions and dense layers. Built as
  `benchmarks/mapping_gan_speed.py` builds it; images/s counts volumes, B (2k + 1) per step.
- `unet-train`: the mapping GAN's generator (`UNet(8,16,32)`, BatchNorm, 3-D) on its own, batch
  4, 32^3, MSE to a random target, SGD momentum.
- `unet-infer`: the same, batch 4, inference mode.

The PyTorch networks (`benchmarks/_torch_peers.py`) are written after our Flax modules and have
exactly our parameter counts (printed under the table). PyTorch runs float32 eager with
`torch.set_num_threads` = the CPUs this process may use (JAX's CPU client uses them all),
`model.train()` for training steps (BatchNorm batch statistics and dropout on both sides) and
`model.eval()` + `torch.inference_mode()` for inference; the same loss and optimiser as ours.
Its memory format is tried both ways (contiguous and channels-last) during warm-up and the
faster kept (`--torch-format`); the table says which. Ours: jitted with the state donated,
`jax.block_until_ready` after each call.

Each case builds its three implementations and then times them in interleaved rounds: round
r times one call (or, for calls shorter than `--round-s`, as many consecutive calls as fill it,
the same number every round) of jaxmed with XLA's own convolution gradient
(`jaxmed.layers.conv_gradient("xla")` in place while the step is traced and compiled: the
state before issue 19), then jaxmed's default (`"auto"`), then PyTorch, `--rounds` times; the
table reports each implementation's median seconds per call. Compilation and `--warmup`
untimed calls come first.

Columns: `torch`, `jaxmed xla`, `jaxmed` are images/s; `jaxmed/torch` and `before` (jaxmed
xla / torch) their ratios (above 1: ours is faster); `GFLOP/s` is XLA's flop count of the
compiled default step (`compiled.cost_analysis()`) over its median time, `MFU` that over the
float32 matmul rate measured on the same device in the same run (`_timing.matmul_peak_flops`),
so the same table reads as model-FLOP utilisation on a GPU or TPU.

Defaults finish in about 15-20 minutes on a 2-core CPU:

    pip install -e '.[peers]'        # PyTorch, for this benchmark only
    python benchmarks/peers.py
    python benchmarks/peers.py --only seg-train,vgg-train --rounds 5 --json peers.json
    python benchmarks/peers.py --cases-small --rounds 1    # tiny networks, a check of the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import (
    achieved,
    compiled_flops,
    matmul_peak_flops,
    peak_line,
    print_table,
)

CASES = ("seg-train", "seg-infer", "vgg-train", "vgg-infer", "gan-step", "unet-train",
         "unet-infer")
IMPLEMENTATIONS = ("xla", "auto", "torch")
FORMATS = ("auto", "contiguous", "channels_last")
LEARNING_RATE, MOMENTUM = 0.01, 0.9


def conv_gradient_available() -> bool:
    from jaxmed import layers

    return hasattr(layers, "conv_gradient")


def conv_mode(mode: str):
    """`jaxmed.layers.conv_gradient(mode)`, or no context where the library has none (then
    both jaxmed columns are XLA's gradient)."""
    from jaxmed import layers

    if not hasattr(layers, "conv_gradient"):
        return contextlib.nullcontext()
    return layers.conv_gradient(mode)


def count_params(tree: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


# ------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Sizes:
    """The networks and inputs of every case (`--cases-small` shrinks them)."""

    seg_width: int = 64
    seg_train: tuple[int, int] = (2, 256)  # batch, edge
    seg_infer: tuple[int, int] = (1, 473)
    vgg_widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    vgg_conv6: int = 1024
    vgg_classes: int = 200
    vgg_train: tuple[int, int] = (4, 224)
    vgg_infer: tuple[int, int] = (8, 224)
    volume: int | None = None  # None: the mapping GAN program's default edge
    volume_batch: int | None = None


SMALL = Sizes(seg_width=8, seg_train=(2, 64), seg_infer=(1, 65), vgg_widths=(8, 16, 32, 64, 64),
              vgg_conv6=128, vgg_train=(4, 64), vgg_infer=(8, 64), volume=16, volume_batch=2)


@dataclass
class Case:
    """One row: how to build our compiled call (per conv mode) and PyTorch's."""

    name: str
    setup: str
    images: int  # images (or volumes) per call
    ours: Callable[[str], tuple[Callable[[], Any], float | None]]  # mode -> (run, flops)
    torch: Callable[[str], Callable[[], Any]]  # memory format -> run
    params: tuple[int, int]  # ours, torch
    formats: tuple[str, ...] = ("contiguous", "channels_last")
    notes: list[str] = field(default_factory=list)


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _donated_runner(step, state, *args) -> tuple[Callable[[], Any], float | None]:
    """Compiles `step(state, *args)` with the state donated (in the current conv mode) and
    returns a `run()` that feeds each call the state the previous call returned."""
    # A new function object per mode: jit caches traces per function, not per conv mode.
    compiled = jax.jit(lambda *a: step(*a), donate_argnums=0).lower(state, *args).compile()
    holder = [state]

    def run():
        holder[0] = compiled(holder[0], *args)[0]
        return holder[0]

    return run, compiled_flops(compiled)


def _inference_runner(apply, variables, x) -> tuple[Callable[[], Any], float | None]:
    compiled = jax.jit(lambda *a: apply(*a)).lower(variables, x).compile()
    return (lambda: compiled(variables, x)), compiled_flops(compiled)


def _supervised(model, tx, loss_fn, x, batch, seed: int = 0):
    """`mode -> (run, flops)` of `supervised_train_step`, every mode from the same state."""
    from jaxmed.training import init_supervised_state, supervised_train_step

    state = jax.jit(lambda e: init_supervised_state(model, tx, e, seed))(x[:1])
    step = supervised_train_step(model, tx, loss_fn)

    def build(mode: str):
        with conv_mode(mode):
            return _donated_runner(step, _copy(state), batch)

    return build, count_params(state.params)


def _inference(model, x, pick: Callable[[Any], Any], seed: int = 0):
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), x[:1])

    def apply(v, images):
        return pick(model.apply(v, images, train=False))

    def build(mode: str):
        with conv_mode(mode):
            return _inference_runner(apply, variables, x)

    return build, count_params(variables["params"])


# ------------------------------------------------------------------ PyTorch runners


def _torch():
    import torch

    return torch


def _to_format(tensor, fmt: str):
    torch = _torch()
    if fmt == "contiguous":
        return tensor.contiguous()
    return tensor.to(memory_format=torch.channels_last if tensor.ndim == 4
                     else torch.channels_last_3d)


def _torch_model(make: Callable[[], Any], fmt: str):
    torch = _torch()
    torch.manual_seed(0)
    model = make()
    if fmt != "contiguous":
        model = model.to(memory_format=torch.channels_last if _ndim(model) == 4
                         else torch.channels_last_3d)
    return model


def _ndim(model) -> int:
    torch = _torch()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv3d):
            return 5
    return 4


def torch_supervised(make, x_shape, loss: Callable[[Any], Any]):
    """`fmt -> run` of one SGD-momentum training step of `make()` on random inputs."""
    torch = _torch()

    def build(fmt: str):
        model = _torch_model(make, fmt)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        x = _to_format(torch.randn(*x_shape), fmt)

        def run():
            opt.zero_grad(set_to_none=True)
            value = loss(model(x))
            value.backward()
            opt.step()
            return value

        return run

    return build


def torch_inference(make, x_shape, pick: Callable[[Any], Any]):
    torch = _torch()

    def build(fmt: str):
        model = _torch_model(make, fmt)
        model.eval()
        x = _to_format(torch.randn(*x_shape), fmt)

        def run():
            with torch.inference_mode():
                return pick(model(x))

        return run

    return build


# ------------------------------------------------------------------ the cases


def _ce(outputs, batch):
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], batch["label"])
    return jnp.mean(loss), {}


def segmentation_case(name: str, sizes: Sizes, train: bool) -> Case:
    from benchmarks import _torch_peers as tp
    from jaxmed.models.segmentation import SegmentationNet

    torch = _torch()
    F = torch.nn.functional
    kw = dict(num_classes=3, depth=50, width=sizes.seg_width, output_stride=8)
    model = SegmentationNet(**kw)
    make = lambda: tp.segmentation_net(**kw)
    batch, edge = sizes.seg_train if train else sizes.seg_infer
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (batch, edge, edge, 3), jnp.float32)
    setup = (f"SegmentationNet R50 w{sizes.seg_width} os8, {'train' if train else 'infer'} "
             f"b{batch} {edge}^2 f32")
    if train:
        labels = jax.random.randint(key, (batch, edge, edge), 0, 3)
        ours, n_ours = _supervised(model, optax.sgd(LEARNING_RATE, MOMENTUM), _ce, x,
                                   {"image": x, "label": labels})
        target = torch.randint(0, 3, (batch, edge, edge))
        peer = torch_supervised(make, (batch, 3, edge, edge),
                                lambda out: F.cross_entropy(out["logits"], target))
    else:
        ours, n_ours = _inference(model, x, lambda out: out["logits"])
        peer = torch_inference(make, (batch, 3, edge, edge), lambda out: out["logits"])
    return Case(name, setup, batch, ours, peer, (n_ours, tp.count_params(make())))


def vgg_case(name: str, sizes: Sizes, train: bool) -> Case:
    from benchmarks import _torch_peers as tp
    from jaxmed.models.vgg_cam import VGGCAM

    torch = _torch()
    F = torch.nn.functional
    classes = sizes.vgg_classes
    model = VGGCAM(classes, widths=sizes.vgg_widths, conv6_width=sizes.vgg_conv6)
    make = lambda: tp.vgg_cam(num_classes=classes, widths=sizes.vgg_widths,
                              conv6_width=sizes.vgg_conv6)
    batch, edge = sizes.vgg_train if train else sizes.vgg_infer
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (batch, edge, edge, 3), jnp.float32)
    setup = f"VGGCAM({classes}), {'train' if train else 'infer'} b{batch} {edge}^2 f32"
    if train:
        labels = jax.random.randint(key, (batch,), 0, classes)
        ours, n_ours = _supervised(model, optax.sgd(LEARNING_RATE, MOMENTUM), _ce, x,
                                   {"image": x, "label": labels})
        target = torch.randint(0, classes, (batch,))
        peer = torch_supervised(make, (batch, 3, edge, edge),
                                lambda out: F.cross_entropy(out["logits"], target))
    else:
        ours, n_ours = _inference(model, x, lambda out: out["logits"])
        peer = torch_inference(make, (batch, 3, edge, edge), lambda out: out["logits"])
    return Case(name, setup, batch, ours, peer, (n_ours, tp.count_params(make())))


def _gan_setting(sizes: Sizes):
    """The mapping GAN program's defaults (with the dense critic), as mapping_gan_speed."""
    from benchmarks.mapping_gan_speed import program_defaults

    base, args = program_defaults()
    size = sizes.volume or args.synthetic_size
    batch = sizes.volume_batch or args.batch_size
    return {**base, "critic": "dense"}, args, size, batch


def unet_case(name: str, sizes: Sizes, train: bool) -> Case:
    from benchmarks import _torch_peers as tp
    from jaxmed.models.mapping_gan import UNet

    torch = _torch()
    config, args, size, batch = _gan_setting(sizes)
    features = tuple(config["generator_features"])
    nsp = args.synthetic_dims
    model = UNet(features=features, norm="batch")
    make = lambda: tp.unet(features=features, nsp=nsp)
    key = jax.random.PRNGKey(0)
    spatial = (size,) * nsp
    x = jax.random.normal(key, (batch, *spatial, 1), jnp.float32)
    setup = (f"UNet {','.join(map(str, features))} {nsp}-D, {'train' if train else 'infer'} "
             f"b{batch} {size}^{nsp} f32")
    if train:
        target = jax.random.normal(jax.random.PRNGKey(1), x.shape, jnp.float32)

        def mse(outputs, b):
            return jnp.mean(jnp.square(outputs - b["target"])), {}

        ours, n_ours = _supervised(model, optax.sgd(LEARNING_RATE, MOMENTUM), mse, x,
                                   {"image": x, "target": target})
        t_target = torch.randn(batch, 1, *spatial)
        peer = torch_supervised(make, (batch, 1, *spatial),
                                lambda out: torch.mean(torch.square(out - t_target)))
    else:
        ours, n_ours = _inference(model, x, lambda out: out)
        peer = torch_inference(make, (batch, 1, *spatial), lambda out: out)
    return Case(name, setup, batch, ours, peer, (n_ours, tp.count_params(make())))


def torch_gan_step(config: dict, size: int, nsp: int, batch: int, k: int):
    """`fmt -> run` of one mapping-GAN generator step in PyTorch: `k` critic updates (WGAN
    loss + gradient penalty through `torch.autograd.grad(create_graph=True)`), then the
    generator update (`-mean D(x + M(x)) + l1 mean|M|`) and the generator's moving average;
    Adam (beta1 0, beta2 0.9) for both, as ours."""
    from benchmarks import _torch_peers as tp

    torch = _torch()
    spatial = (size,) * nsp

    def make_critic():
        return tp.dense_critic(widths=tuple(config["critic_widths"]),
                               growth_rate=config["critic_growth"],
                               layers_per_block=config["critic_layers"],
                               reduced_channels=config["critic_pooling_channels"],
                               head_features=config["critic_head"], input_size=spatial)

    def make_generator():
        return tp.unet(features=tuple(config["generator_features"]), nsp=nsp)

    def build(fmt: str):
        generator = _torch_model(make_generator, fmt)
        critic = _torch_model(make_critic, fmt)
        average = _torch_model(make_generator, fmt)
        average.load_state_dict(generator.state_dict())
        generator.train()
        lr, betas = config["learning_rate"], (0.0, 0.9)
        g_opt = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
        d_opt = torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
        negative = [_to_format(torch.rand(batch, 1, *spatial) * 2 - 1, fmt) for _ in range(k)]
        positive = [_to_format(torch.rand(batch, 1, *spatial) * 2 - 1, fmt)
                    for _ in range(k + 1)]
        gp_weight, l1_weight = config["gp_weight"], config["l1_weight"]
        decay = config.get("generator_ema", 0.0)

        def run():
            with torch.no_grad():
                fakes = [p + generator(p) for p in positive[:-1]]
            for neg, fake in zip(negative, fakes):
                d_opt.zero_grad(set_to_none=True)
                w = critic(neg).mean() - critic(fake).mean()
                eps = torch.rand(batch, *(1,) * (nsp + 1))
                x_hat = (eps * neg + (1 - eps) * fake).requires_grad_(True)
                (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
                gp = gp_weight * torch.mean(torch.square(grad.flatten(1).norm(dim=1) - 1.0))
                (gp - w).backward()
                d_opt.step()
            for p in critic.parameters():
                p.requires_grad_(False)
            g_opt.zero_grad(set_to_none=True)
            m = generator(positive[-1])
            loss = -critic(positive[-1] + m).mean() + l1_weight * m.abs().mean()
            loss.backward()
            g_opt.step()
            for p in critic.parameters():
                p.requires_grad_(True)
            if decay:
                with torch.no_grad():
                    for a, p in zip(average.parameters(), generator.parameters()):
                        a.mul_(decay).add_(p, alpha=1.0 - decay)
            return loss

        return run

    counts = tp.count_params(make_generator()) + tp.count_params(make_critic())
    return build, counts


def gan_case(name: str, sizes: Sizes) -> Case:
    from benchmarks.mapping_gan_speed import build, random_batch

    config, args, size, batch = _gan_setting(sizes)
    k, nsp = args.n_critic, args.synthetic_dims
    gan = build(config, size, argparse.Namespace(dims=nsp, seed=args.seed))
    data = random_batch(jax.random.key(args.seed), batch, k, (size,) * nsp)
    state = jax.jit(gan.init_state)()

    def ours(mode: str):
        with conv_mode(mode):
            return _donated_runner(gan.train_step, _copy(state), data)

    n_ours = count_params(state.params["generator"]) + count_params(state.params["critic"])
    peer, n_torch = torch_gan_step(config, size, nsp, batch, k)
    features = ",".join(map(str, config["generator_features"]))
    setup = f"mapping GAN G {features} + dense D, b{batch} {size}^{nsp} k={k} f32"
    return Case(name, setup, batch * (2 * k + 1), ours, peer, (n_ours, n_torch),
                notes=["params: generator + critic (the moving average not counted)"])


def make_case(name: str, sizes: Sizes) -> Case:
    if name.startswith("seg-"):
        return segmentation_case(name, sizes, name == "seg-train")
    if name.startswith("vgg-"):
        return vgg_case(name, sizes, name == "vgg-train")
    if name.startswith("unet-"):
        return unet_case(name, sizes, name == "unet-train")
    return gan_case(name, sizes)


# ------------------------------------------------------------------ measurement


def _timed(run: Callable[[], Any], is_torch: bool, calls: int = 1) -> float:
    """Seconds per call of `calls` consecutive calls (each blocked until ready)."""
    start = time.perf_counter()
    for _ in range(calls):
        out = run()
        if not is_torch:
            jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def _calls(seconds: float, round_s: float) -> int:
    """Calls per round so that a round of one implementation lasts about `round_s`."""
    return max(1, min(50, round(round_s / max(seconds, 1e-6))))


def _pick_format(case: Case, args: argparse.Namespace) -> tuple[str, Callable[[], Any]]:
    """The PyTorch memory format: the given one, or the faster of both after warm-up."""
    if args.torch_format != "auto":
        run = case.torch(args.torch_format)
        for _ in range(args.warmup):
            run()
        return args.torch_format, run
    best = None
    for fmt in case.formats:
        run = case.torch(fmt)
        for _ in range(args.warmup):
            run()
        t = _timed(run, True)
        print(f"  torch {fmt}: {t:.3g} s", file=sys.stderr, flush=True)
        if best is None or t < best[0]:
            best = (t, fmt, run)
    return best[1], best[2]


def measure(case: Case, args: argparse.Namespace, modes: tuple[str, ...]) -> dict[str, Any]:
    runs, flops, compile_s = {}, {}, {}
    for mode in modes:
        start = time.perf_counter()
        runs[mode], flops[mode] = case.ours(mode)
        compile_s[mode] = time.perf_counter() - start
        print(f"  jaxmed {mode}: compiled in {compile_s[mode]:.1f} s", file=sys.stderr,
              flush=True)
        for _ in range(args.warmup):
            jax.block_until_ready(runs[mode]())
    fmt, runs["torch"] = _pick_format(case, args)
    calls = {impl: _calls(_timed(run, impl == "torch"), args.round_s)
             for impl, run in runs.items()}
    times: dict[str, list[float]] = {impl: [] for impl in runs}
    for r in range(args.rounds):
        for impl, run in runs.items():
            times[impl].append(_timed(run, impl == "torch", calls[impl]))
        print(f"  round {r + 1}: " + ", ".join(f"{i} {t[-1]:.3g} s" for i, t in times.items()),
              file=sys.stderr, flush=True)
    seconds = {impl: statistics.median(t) for impl, t in times.items()}
    if "xla" not in seconds:  # the library has one convolution gradient only
        seconds["xla"], flops["xla"], compile_s["xla"] = (seconds["auto"], flops["auto"],
                                                          compile_s["auto"])
    return dict(seconds=seconds, flops=flops, compile_s=compile_s, torch_format=fmt,
                times=times, calls_per_round=calls)


def row(case: Case, m: dict[str, Any]) -> list[Any]:
    rate = {impl: case.images / s for impl, s in m["seconds"].items()}
    gflops, mfu = achieved(m["flops"]["auto"], m["seconds"]["auto"])
    return [case.name, case.setup, m["torch_format"], rate["torch"], rate["xla"], rate["auto"],
            rate["auto"] / rate["torch"], rate["xla"] / rate["torch"], gflops, mfu]


HEADERS = ["case", "configuration", "torch format", "torch img/s", "jaxmed xla img/s",
           "jaxmed img/s", "jaxmed/torch", "before", "GFLOP/s", "MFU"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CASES),
                        help=f"comma-separated cases, of {', '.join(CASES)} (default: all)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timed rounds; the median is reported "
                             "(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls of each implementation after compilation "
                             "(default: %(default)s)")
    parser.add_argument("--round-s", type=float, default=1.0,
                        help="an implementation's part of a round repeats its call to last about "
                             "this many seconds (fast cases; default: %(default)s)")
    parser.add_argument("--cases-small", action="store_true",
                        help="tiny networks and images: a quick check of the script")
    parser.add_argument("--torch-format", choices=FORMATS, default="auto",
                        help="PyTorch memory format; auto tries both and keeps the faster "
                             "(default: %(default)s)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: the CPUs this process may use)")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        sys.exit(f"error: unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    try:
        import torch
    except ImportError:
        print("benchmarks/peers.py needs PyTorch: pip install -e '.[peers]' (or pip install "
              "torch)", file=sys.stderr)
        sys.exit(2)
    threads = args.torch_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    sizes = SMALL if args.cases_small else Sizes()
    modes = ("xla", "auto") if conv_gradient_available() else ("auto",)
    peak = matmul_peak_flops()
    rows, results, notes = [], [], []
    for name in chosen:
        print(f"{name}: building ...", file=sys.stderr, flush=True)
        case = make_case(name, sizes)
        m = measure(case, args, modes)
        rows.append(row(case, m))
        results.append(dict(case=name, setup=case.setup, images_per_call=case.images,
                            params_jaxmed=case.params[0], params_torch=case.params[1],
                            **{k: v for k, v in m.items()}))
        notes.append(f"  {name}: parameters jaxmed {case.params[0]:,}, torch "
                     f"{case.params[1]:,}" + "".join(f"; {n}" for n in case.notes))
        del case, m
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"with {threads} threads; median of {args.rounds} interleaved rounds (>= "
          f"{args.round_s:g} s or one call per implementation) after {args.warmup} warm-up "
          "call(s)")
    if len(modes) == 1:
        print("jaxmed.layers.conv_gradient is not available: the 'jaxmed xla' column repeats "
              "the one gradient the library has")
    print_table(HEADERS, rows)
    print(peak_line())
    print("\n".join(["parameters (same networks on both sides):", *notes]))
    if args.json:
        Path(args.json).write_text(json.dumps(
            dict(jax=jax.__version__, torch=torch.__version__, threads=threads,
                 rounds=args.rounds, warmup=args.warmup, peak_flops=peak,
                 conv_gradient=len(modes) == 2, headers=HEADERS, rows=rows,
                 results=results), indent=1, default=str))


if __name__ == "__main__":
    main()
