"""Speed of every jaxmed layer: forward and forward+backward time, compile time and parameters.

Tensor-train layers are compared with the dense `nn.Dense` / `nn.Conv` of the same input and output
shape, and jaxmed's `Conv` / `BlockConvTranspose` with Flax's `nn.Conv` / `nn.ConvTranspose` they
replace, measured in the same run; the `ratio` columns are time / reference time (below 1 = faster).
`GFLOP/s` is XLA's flop count of the compiled call (`cost_analysis()`) over its time, forward and
forward+backward, and `MFU` that over the float32 matmul rate of the device measured in the same
run (`benchmarks._timing.matmul_peak_flops`, printed under the table).

    python benchmarks/layers.py                 # 2-D, float32
    python benchmarks/layers.py --dims 3 --dtype bfloat16
    python benchmarks/layers.py --dims 3 --only "Conv (jaxmed),BlockConvTranspose"
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import achieved, peak_line, print_table, time_jitted
from jaxmed import layers as L


@dataclass(frozen=True)
class Case:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    dense_reference: str | None = None  # name of the case this one is compared against


def build_cases(args: argparse.Namespace, dtype: Any) -> list[Case]:
    b, s, c = args.batch, args.size, args.channels
    spatial = (s,) * args.dims
    kernel = (3,) * args.dims
    fmap = (b, *spatial, c)
    modes = _two_modes(c)
    dense_in = args.dense_features
    dense_modes = _two_modes(dense_in)
    common = dict(dtype=dtype)
    up = (2,) * args.dims

    def tt_conv(**kwargs):
        return L.TTConv(modes, modes, ranks=args.rank, kernel_size=kernel, **kwargs, **common)

    return [
        Case("Dense", nn.Dense(dense_in, **common), (b * 16, dense_in)),
        Case(f"TTDense r={args.rank}",
             L.TTDense(dense_modes, dense_modes, ranks=args.rank, **common),
             (b * 16, dense_in), "Dense"),
        Case("Conv", nn.Conv(c, kernel, **common), fmap),
        Case("Conv (jaxmed)", L.Conv(c, kernel, **common), fmap, "Conv"),
        Case("ConvTranspose 2x", nn.ConvTranspose(c, up, strides=up, **common), fmap),
        Case("BlockConvTranspose 2x", L.BlockConvTranspose(c, up, **common), fmap,
             "ConvTranspose 2x"),
        Case(f"TTConv r={args.rank} cores", tt_conv(forward="cores"), fmap, "Conv"),
        Case(f"TTConv r={args.rank} kernel", tt_conv(forward="kernel"), fmap, "Conv"),
        Case(f"TTConv r={args.rank} auto", tt_conv(), fmap, "Conv"),
        Case("SecondOrderPooling d=32", L.SecondOrderPooling(reduced_channels=32, **common), fmap),
        Case("ChannelAttention", L.ChannelAttention(reduction=16, **common), fmap),
        Case("SpatialAttention", L.SpatialAttention(kernel_size=7, **common), fmap),
        Case("CBAM", L.CBAM(reduction=16, kernel_size=7, **common), fmap),
        Case("PyramidPooling", L.PyramidPooling(bins=(1, 2, 3, 6), **common), fmap),
        Case("ThresholdSuppression", L.ThresholdSuppression(**common), fmap),
    ]


def _two_modes(n: int) -> tuple[int, int]:
    """Splits n into two factors as close to each other as possible (n = a * b, a <= b)."""
    a = int(np.sqrt(n))
    while n % a:
        a -= 1
    return a, n // a


def _takes_train_flag(module: nn.Module) -> bool:
    return any(isinstance(module, t) for t in (L.SpatialAttention, L.CBAM, L.SecondOrderPooling,
                                               L.PyramidPooling))


def measure(case: Case, dtype: Any, warmup: int, repeats: int) -> dict[str, Any]:
    x = jax.random.normal(jax.random.key(0), case.input_shape, dtype)
    module = case.module
    variables = module.init(jax.random.key(1), x)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    train_kwargs = {"train": True} if _takes_train_flag(module) else {}

    def forward(params, x):
        return module.apply({"params": params, **state}, x)

    def loss(params, x):
        if state:  # BatchNorm in training mode: batch statistics, updates discarded
            y, _ = module.apply({"params": params, **state}, x, mutable=list(state), **train_kwargs)
        else:
            y = module.apply({"params": params}, x, **train_kwargs)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    fwd = time_jitted(forward, params, x, warmup=warmup, repeats=repeats)
    bwd = time_jitted(jax.grad(loss, argnums=(0, 1)), params, x, warmup=warmup, repeats=repeats)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return dict(fwd=fwd, bwd=bwd, params=n_params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2,
                        help="spatial dimensions of the inputs")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="computation dtype")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--size", type=int, default=None,
                        help="spatial size per axis (default 32 in 2-D, 16 in 3-D)")
    parser.add_argument("--channels", type=int, default=64, help="feature channels of the inputs")
    parser.add_argument("--dense-features", type=int, default=4096,
                        help="input = output features of the Dense / TTDense pair")
    parser.add_argument("--rank", type=int, default=8, help="tensor-train rank of the TT layers")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed calls; the median is reported")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings: run only matching cases")
    args = parser.parse_args()
    if args.size is None:
        args.size = 32 if args.dims == 2 else 16
    dtype = jnp.dtype(args.dtype)

    cases = build_cases(args, dtype)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        keep = {c.name for c in cases if any(w in c.name for w in wanted)}
        keep |= {c.dense_reference for c in cases if c.name in keep and c.dense_reference}
        cases = [c for c in cases if c.name in keep]

    results = {c.name: measure(c, dtype, args.warmup, args.repeats) for c in cases}
    rows = []
    for c in cases:
        r = results[c.name]
        ref = results.get(c.dense_reference) if c.dense_reference else None
        rows.append([
            c.name, "x".join(map(str, c.input_shape)), r["params"],
            r["fwd"].median_s * 1e3, r["bwd"].median_s * 1e3,
            r["fwd"].compile_s + r["bwd"].compile_s,
            r["fwd"].median_s / ref["fwd"].median_s if ref else "",
            r["bwd"].median_s / ref["bwd"].median_s if ref else "",
            r["params"] / ref["params"] if ref else "",
            *achieved(r["fwd"].flops, r["fwd"].median_s),
            *achieved(r["bwd"].flops, r["bwd"].median_s),
        ])
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{args.dims}-D, {args.dtype}, batch {args.batch}, median of {args.repeats}")
    print_table(["layer", "input", "params", "fwd ms", "fwd+bwd ms", "compile s",
                 "fwd ratio", "fwd+bwd ratio", "param ratio", "fwd GFLOP/s", "fwd MFU",
                 "fwd+bwd GFLOP/s", "fwd+bwd MFU"], rows)
    print(peak_line())


if __name__ == "__main__":
    main()
