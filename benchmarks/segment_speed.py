"""Speed of the segmentation program (train/segment.py): images/s of its training step and of
inference, per configuration, computation dtype and batch size, on random uint8 images and masks.

What is timed is exactly what `python -m train.segment` runs: `build_segmenter(config)`, then
`segmenter.train_step` jitted with the state donated (one AdamW step on cross-entropy + Dice,
auxiliary head included, BatchNorm statistics and dropout in training mode), and
`jax.jit(segmenter.logits)` (uint8 images -> float32 class scores at input resolution).

- `seed`: the original design's network: ResNet-50, width 64, 473 x 473, output stride 16,
  CBAM + pyramid pooling, auxiliary head (loss weight 0.4), 3 classes.
- `cpu`: the program's defaults, read from `train.segment.build_parser().parse_args([])` (at the
  time of writing ResNet-18, width 16, 128 x 128, output stride 8, same modules and heads).

Both dtypes keep float32 parameters (the program's `--dtype`); both start from the same float32
initial state. Compile time (`lower` + `compile`) is apart from the step time, the median of
`--repeats` timed calls after `--warmup` untimed ones, each blocked until the device is done.

Ratios, all measured in the same run (images/s over images/s, above 1 = faster):

- `bf16/f32`: bfloat16 over float32, same configuration, mode and batch.
- `/batch 1`: batching efficiency, over the smallest batch measured (1 by default; the header
  names it) of the same configuration, mode and dtype.
- `seed/cpu`: the `seed` configuration over the CPU default, same mode, dtype and batch.

Memory. `XLA MB` is the compiled executable's `memory_analysis()`: argument + output - alias +
temp sizes, i.e. the buffers XLA assigns for one call (the state, the batch, the results, and
the peak of its temporaries; a donated state's outputs alias its inputs, so count once). On
CPU this is the meaningful per-call figure: the CPU client has no allocator statistics
(`device.memory_stats()` is None), and the process's resident set, reported once under the
table as `peak RSS` (`resource.getrusage`, the maximum over the whole run), also holds the
compiler, the other configurations' states and library scratch space outside XLA's buffers.
`GFLOP/s` is XLA's flop count of the compiled call (`cost_analysis()`) over the step time,
`MFU` that over the float32 matmul rate of the device measured in the same run
(`benchmarks._timing.matmul_peak_flops`, printed under the table).

Defaults are chosen so that a run finishes within about a quarter of an hour on a 2-core CPU,
where a `seed` training step takes ~10 s per image and compiling a training step ~30 s: the `seed`
configuration runs batches 1 and 4 with no warm-up and 2 timed calls (at seconds per call the
first call costs no more than the others), the CPU default batches 1, 4 and 8 with 2 warm-up
and 5 timed calls. `--batches`, `--warmup` and `--repeats` override both; on a GPU or TPU run
the full grid:

    python benchmarks/segment_speed.py
    python benchmarks/segment_speed.py --batches 1,4,8 --warmup 2 --repeats 10
    python benchmarks/segment_speed.py --configs cpu --dtypes float32 --mode infer
    python benchmarks/segment_speed.py --quick        # tiny networks, a check of the script
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import (
    Timing,
    achieved,
    compiled_flops,
    peak_line,
    print_table,
    time_jitted,
)
from jaxmed.segmentation.config import SegmentationConfig
from jaxmed.segmentation.steps import Segmenter, build_segmenter
from train import segment as program

CONFIGS = ("seed", "cpu")
DTYPES = ("float32", "bfloat16")
MODES = ("train", "infer")

SEED_NETWORK = dict(depth=50, width=64, image_size=473, output_stride=16, cbam=True, ppm=True,
                    aux_weight=0.4, num_classes=3)
# --quick: both networks shrunk (ResNet-18, width 4, ~32^2) to check the script; compiling the
# training step still takes ~10 s per measurement on 2 cores.
QUICK_NETWORKS = {"seed": dict(depth=18, width=4, image_size=33),
                  "cpu": dict(depth=18, width=4, image_size=32)}


@dataclass(frozen=True)
class Plan:
    """How one configuration is measured: batch sizes, untimed and timed calls per measurement."""

    batches: tuple[int, ...]
    warmup: int
    repeats: int


DEFAULT_PLANS = {"seed": Plan((1, 4), warmup=0, repeats=2),
                 "cpu": Plan((1, 4, 8), warmup=2, repeats=5)}
QUICK_PLAN = Plan((1, 2), warmup=1, repeats=1)


@dataclass(frozen=True)
class Measurement:
    """Compile and median step seconds, XLA's buffer bytes and flop count of one compiled call."""

    timing: Timing
    xla_bytes: float
    flops: float


def configurations(quick: bool) -> dict[str, dict]:
    """The configuration dicts (`SegmentationConfig`) of `seed` and `cpu`; the latter is what
    `python -m train.segment` uses without arguments."""
    cpu = SegmentationConfig.from_args(program.build_parser().parse_args([])).to_dict()
    configs = {"seed": {**cpu, **SEED_NETWORK}, "cpu": cpu}
    if quick:
        configs = {name: {**config, **QUICK_NETWORKS[name]} for name, config in configs.items()}
    return configs


def describe(config: dict) -> str:
    modules = [m for m in ("cbam", "ppm") if config[m]]
    aux = f"aux head {config['aux_weight']:g}" if config["aux_weight"] > 0 else "no aux head"
    return (f"ResNet-{config['depth']} width {config['width']}, {config['image_size']}^2, "
            f"output stride {config['output_stride']}, "
            f"{'+'.join(modules).upper() or 'no CBAM/PPM'}, {aux}, {config['num_classes']} classes")


# ------------------------------------------------------------------ data and compiled facts


def random_batch(key: jax.Array, batch: int, size: int, classes: int) -> dict[str, jax.Array]:
    """`{'image': uint8 [B, S, S, 3], 'mask': int32 [B, S, S]}`, uniform random."""
    image_key, mask_key = jax.random.split(key)
    images = jax.random.randint(image_key, (batch, size, size, 3), 0, 256).astype(jnp.uint8)
    return {"image": images, "mask": jax.random.randint(mask_key, (batch, size, size), 0, classes)}


def xla_bytes(compiled) -> float:
    """Argument + output - alias + temp bytes of a compiled call (nan where not reported)."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)


def xla_flops(compiled) -> float:
    flops = compiled_flops(compiled)
    return float("nan") if flops is None else flops


def count_params(tree: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


# ------------------------------------------------------------------ measurement


def measure_training(segmenter: Segmenter, state, batch: dict[str, jax.Array],
                     plan: Plan) -> Measurement:
    """The program's training step, jitted with the state donated: each call consumes the state
    the previous one returned, as in `fit`."""
    state = jax.tree.map(jnp.copy, state)  # donation would delete the shared initial state
    start = time.perf_counter()
    compiled = jax.jit(segmenter.train_step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times = []
    for call in range(plan.warmup + plan.repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if call >= plan.warmup:
            times.append(time.perf_counter() - start)
    return Measurement(Timing(compile_s, statistics.median(times)), xla_bytes(compiled),
                       xla_flops(compiled))


def measure_inference(segmenter: Segmenter, state, images: jax.Array, plan: Plan) -> Measurement:
    """`jax.jit(segmenter.logits)`; compiled once more (untimed) for its memory and flop counts."""
    timing = time_jitted(segmenter.logits, state, images, warmup=plan.warmup, repeats=plan.repeats)
    compiled = jax.jit(segmenter.logits).lower(state, images).compile()
    return Measurement(timing, xla_bytes(compiled), xla_flops(compiled))


def measure_config(config: dict, plan: Plan, dtypes: list[str], modes: list[str],
                   results: dict[tuple, Measurement]) -> int:
    """Measures one configuration over dtypes x batches x modes into `results`, keyed
    `(mode, dtype, batch)`; returns its parameter count."""
    # Parameters are float32 whatever the computation dtype, so one initial state serves both.
    initial = jax.jit(lambda: build_segmenter({**config, "dtype": "float32"}).init_state())()
    for dtype in dtypes:
        segmenter = build_segmenter({**config, "dtype": dtype})
        for batch_size in plan.batches:
            batch = random_batch(jax.random.key(config["seed"]), batch_size, config["image_size"],
                                 config["num_classes"])
            for mode in modes:
                _progress(f"  {mode} {dtype} batch {batch_size} ...")
                if mode == "train":
                    m = measure_training(segmenter, initial, batch, plan)
                else:
                    m = measure_inference(segmenter, initial, batch["image"], plan)
                results[mode, dtype, batch_size] = m
                _progress(f"    compile {m.timing.compile_s:.1f} s, step {m.timing.median_s:.3g} s")
    return count_params(initial.params)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ table


def table_rows(results: dict[str, dict[tuple, Measurement]]) -> list[list[Any]]:
    """One row per configuration x mode x dtype x batch, with the three ratios of the docstring."""
    def ips(name, mode, dtype, batch):
        m = results.get(name, {}).get((mode, dtype, batch))
        return None if m is None else batch / m.timing.median_s

    def ratio(a, b):
        return a / b if a is not None and b is not None else ""

    rows = []
    for name, measured in results.items():
        order = sorted(measured, key=lambda k: (MODES.index(k[0]), DTYPES.index(k[1]), k[2]))
        for mode, dtype, batch in order:
            m = measured[mode, dtype, batch]
            smallest = min(b for (md, dt, b) in measured if md == mode and dt == dtype)
            own = ips(name, mode, dtype, batch)
            rows.append([
                name, mode, dtype, batch, m.timing.compile_s, m.timing.median_s, own,
                *_rate(m), m.xla_bytes / 2**20,
                ratio(own, ips(name, mode, "float32", batch)) if dtype != "float32" else "",
                ratio(own, ips(name, mode, dtype, smallest)) if batch != smallest else "",
                ratio(own, ips("cpu", mode, dtype, batch)) if name == "seed" else "",
            ])
    return rows


def _rate(m: Measurement) -> tuple[Any, Any]:
    """`(GFLOP/s, MFU)` of a measurement (empty cells without a flop count)."""
    return achieved(None if np.isnan(m.flops) else m.flops, m.timing.median_s)


# ------------------------------------------------------------------ command line


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=lambda s: _names(s, CONFIGS, "configuration(s)"),
                        default=list(CONFIGS),
                        help="comma-separated, of seed, cpu (default: both)")
    parser.add_argument("--dtypes", type=lambda s: _names(s, DTYPES, "dtype(s)"),
                        default=list(DTYPES),
                        help="comma-separated computation dtypes (default: float32,bfloat16)")
    parser.add_argument("--mode", type=lambda s: _names(s, MODES, "mode(s)"), default=list(MODES),
                        help="comma-separated, of train, infer (default: both)")
    parser.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")),
                        help="batch sizes of every configuration (default: seed 1,4; cpu 1,4,8)")
    parser.add_argument("--warmup", type=int,
                        help="untimed calls after compiling (default: seed 0, cpu 2)")
    parser.add_argument("--repeats", type=int,
                        help="timed calls, the median is reported (default: seed 2, cpu 5)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks (width 4, ~32^2), batches 1,2, 1 warm-up, 1 timed call")
    return parser


def plan_for(name: str, args: argparse.Namespace) -> Plan:
    plan = QUICK_PLAN if args.quick else DEFAULT_PLANS[name]
    return Plan(batches=args.batches or plan.batches,
                warmup=plan.warmup if args.warmup is None else args.warmup,
                repeats=plan.repeats if args.repeats is None else args.repeats)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configs = configurations(args.quick)
    load_start, start = os.getloadavg(), time.perf_counter()
    results, headers = {}, []
    for name in args.configs:
        plan = plan_for(name, args)
        _progress(f"measuring {name}: {describe(configs[name])}")
        results[name] = {}
        params = measure_config(configs[name], plan, args.dtypes, args.mode, results[name])
        headers.append(f"{name}: {describe(configs[name])}; {params / 1e6:.2f} M parameters; "
                       f"median of {plan.repeats} after {plan.warmup} warm-up")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()} "
          f"({os.cpu_count()} CPUs); parameters float32")
    for line in headers:
        print(line)
    smallest = min(batch for measured in results.values() for (_, _, batch) in measured)
    print_table(["config", "mode", "dtype", "batch", "compile s", "step s", "images/s", "GFLOP/s",
                 "MFU", "XLA MB", "bf16/f32", f"/batch {smallest}", "seed/cpu"],
                table_rows(results))
    print(peak_line())
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"peak RSS {peak_rss:.0f} MB; load average (1 min) {load_start[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
