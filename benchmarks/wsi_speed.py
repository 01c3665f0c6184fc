"""Whole-slide feature extraction speed, end to end: tiles per second from a tiled TIFF to tile
features, ours against a CLAM-like PyTorch pipeline on the same slides, tiles and weights.

What one tile goes through: read at level 0, stain normalisation (SPCN onto the reference
H&E appearance with the slide's source profile), split into the low-resolution image (the
tile area-downsampled by `ratio`) and its `(1/ratio)^2` full-resolution blocks, network 1 on
the low image and network 2 on the blocks (both attention ResNet-18s, randomly initialised:
speed does not depend on training), and the tile fusion; per slide, the slide feature.

- ours: `jaxmed.pathology.extract.extract_slides` with the program's `WsiFeaturizer` (the
  jitted device function: recolour, both networks, fusion), the engine's prefetching reader
  (`--readers` threads) and per-slide HDF5 output. Its time is the whole call: it also opens
  each slide, masks the tissue, lays the tile grid and fits the slide's stain profile
  (`prepare`, Macenko by default), in a background thread one slide ahead; the first slide's
  preparation is waited for and counts as input wait. Compilation is done before: one call of
  the device function on a batch of the same shape, and `prepare` on every slide (the
  profiles the PyTorch side is given).
- PyTorch: `benchmarks/_torch_wsi.py`. The same network in PyTorch eager (CPU,
  `torch.inference_mode`, channels-last memory format, which is faster here; float32, or the
  networks and inputs cast to bfloat16), with the SAME weights (copied from our states; the
  parameter counts are printed). Tiles come as CLAM's feature step reads them: a `DataLoader`
  with `--torch-workers` worker processes over a dataset that reads each tile with
  `openslide.OpenSlide.read_region` at level 0 (RGBA -> RGB) and recolours it in NumPy (SPCN
  with the same source and target profiles; concentrations by least squares through the
  pseudo-inverse, torchstain's way, where ours solves the non-negative lasso); split, both
  networks, tile and slide fusion in the main process. Like CLAM, which tiles in a separate
  step before extracting, its timed part starts from given tile coordinates and profiles (ours
  computes them inside its time).

Columns: `tiles/s` end to end; `input wait %`: the time the compute loop waited for tiles
over the total (ours: `ExtractionReport.input_wait_seconds / seconds`; PyTorch: the time spent
in the loader's `next`); `ours/torch`: our tiles/s over PyTorch's, same configuration and
dtype, same run (goal >= 1, with input wait < 10 %); `network tiles/s`, `network images/s`:
both networks and the fusion alone on a fixed batch of tiles already in memory (ours:
`time_jitted` of `steps.tile_outputs`; PyTorch: the median of as many timed calls), i.e. what
the pipeline would reach if input were free; images = tiles x (1 + blocks). `network GFLOP/s`
is XLA's flop count of our compiled network-only call (`cost_analysis()`) over its time (for
the PyTorch row, the same count over PyTorch's time: the same networks do the same work), `MFU`
that over the float32 matmul rate of the device measured in the same run
(`benchmarks._timing.matmul_peak_flops`, printed under the table). The end-to-end columns have
no FLOP/s: their time is mostly reading, decoding and recolouring tiles, not XLA's work.

Configurations (`--configs`): `seed`, the original design (1152-pixel tiles, ratio 0.5: a
576^2 low image and four 576^2 blocks, width 64: 512-d features), and `cpu`, the program's
defaults (`WsiConfig()`: 256-pixel tiles, 128^2 images, width 16). Slides are synthetic H&E
slides (`jaxmed.data.synthetic_slide`), JPEG-tiled pyramidal TIFFs that OpenSlide opens,
generated once into `--cache` and reused, sized to give about `--tiles` tiles per
configuration over `--slides` slides.

    python benchmarks/wsi_speed.py                        # ~10 minutes on 2 cores
    python benchmarks/wsi_speed.py --configs cpu --dtypes float32
    python benchmarks/wsi_speed.py --quick                # a check of the script

PyTorch is optional (`pip install torch==2.13.0`); without it only ours is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks._timing import achieved, peak_line, print_table, time_jitted
from jaxmed.data.slide import open_slide
from jaxmed.data.synthetic_slide import make_synthetic_slide, write_synthetic_slide
from jaxmed.pathology import tissue
from jaxmed.pathology.config import WsiConfig
from jaxmed.pathology.extract import extract_slides, read_features, slide_stem
from jaxmed.pathology.stain import StainNormalizer
from jaxmed.pathology.steps import (
    NETWORKS,
    WsiFeaturizer,
    build_network,
    tile_outputs,
)
from jaxmed.pathology.tiles import tile_grid

CONFIGS = ("seed", "cpu")
DTYPES = ("float32", "bfloat16")
NUM_CLASSES = 3  # the pre-training head (adenocarcinoma, squamous, normal); unused in extraction
# One island of tissue (a single texture) over 45 % of the slide: about a fifth of the grid's
# cells keep 3 of 4 corners on tissue (more with small tiles, fewer with 1152).
TISSUE_FRACTION = 0.45
KEPT_CELLS = 0.2


@dataclass(frozen=True)
class Plan:
    """One configuration: tile side, network width, tiles wanted, tiles per batch, timed
    calls of the network-only measurement."""

    tile_size: int
    width: int
    tiles: int
    batch: int
    repeats: int


def plans(args: argparse.Namespace) -> dict[str, Plan]:
    cpu = WsiConfig()
    full = {"seed": Plan(1152, 64, 16, 4, 3), "cpu": Plan(cpu.tile_size, cpu.width, 256, 16, 5)}
    if args.quick:  # the seed-sized tiles with a thin network, few tiles
        full = {"seed": Plan(1152, 8, 8, 4, 1), "cpu": Plan(cpu.tile_size, 4, 32, 16, 2)}
    out = {}
    for name in args.configs:
        plan = full[name]
        tiles = args.tiles if args.tiles else plan.tiles
        batch = args.batch if args.batch else plan.batch
        out[name] = Plan(plan.tile_size, plan.width, tiles, batch, plan.repeats)
    return out


# ---------------------------------------------------------------------------- slides


@dataclass(frozen=True)
class BenchSlide:
    path: Path
    coords: np.ndarray  # coords: [N, 2] level-0 corners, as extraction finds them


def the_slides(plan: Plan, args: argparse.Namespace) -> list[BenchSlide]:
    """`--slides` cached synthetic slides of `cells` tiles a side, with their tile grids."""
    per_slide = math.ceil(plan.tiles / args.slides)
    cells = max(3, math.ceil(math.sqrt(per_slide / KEPT_CELLS)))
    side = cells * plan.tile_size
    slides = []
    for i in range(args.slides):
        path = args.cache / f"wsi_speed_{side}_seed{i}.tiff"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _progress(f"generating {path} (once) ...")
            design = make_synthetic_slide((side, side), seed=i, class_names=("normal",),
                                          tissue_fraction=TISSUE_FRACTION, islands=1,
                                          hole_probability=0.0)
            write_synthetic_slide(path, design, annotations=False)
        with open_slide(path) as slide:
            grid = tile_grid(tissue.tissue_mask(slide), slide.dimensions,
                             tile_size=plan.tile_size)
        slides.append(BenchSlide(path, np.asarray(grid.coords, np.int64)))
    return slides


def fixed_batch(slide: BenchSlide, plan: Plan) -> np.ndarray:
    """The first `batch` tiles of a slide (repeated if fewer): uint8 `[B, T, T, 3]`."""
    with open_slide(slide.path) as opened:
        tiles = [opened.read_region(tuple(int(v) for v in slide.coords[i % len(slide.coords)]),
                                    0, (plan.tile_size, plan.tile_size))
                 for i in range(plan.batch)]
    return np.stack(tiles)


# ---------------------------------------------------------------------------- ours


@dataclass(frozen=True)
class Result:
    tiles: int
    seconds: float
    input_wait_seconds: float
    network_tiles_per_second: float
    slide_features: list[np.ndarray]
    prepare_seconds: float = float("nan")
    network_flops: float | None = None  # XLA's count for one batch of the network-only call


def run_config(plan: Plan, dtype: str, args: argparse.Namespace) -> WsiConfig:
    return WsiConfig(tile_size=plan.tile_size, width=plan.width, dtype=dtype, stain=args.stain)


def network_states(plan: Plan, args: argparse.Namespace):
    """Both networks' randomly initialised states (float32 parameters: the same for both
    dtypes)."""
    values = {**run_config(plan, "float32", args).to_dict(), "num_classes": NUM_CLASSES}
    return {which: jax.jit(build_network(values, which).init_state)() for which in NETWORKS}


def measure_ours(plan: Plan, dtype: str, states, slides: list[BenchSlide],
                 tiles: np.ndarray, args: argparse.Namespace) -> tuple[Result, list]:
    config = run_config(plan, dtype, args)
    values = {**config.to_dict(), "num_classes": NUM_CLASSES}
    networks = {which: build_network(values, which) for which in NETWORKS}
    normalizer = StainNormalizer.default(args.stain)
    featurizer = WsiFeaturizer(config, networks, states, normalizer)
    profiles = []
    for slide in slides:  # also compiles the stain estimate; the profiles serve PyTorch
        with open_slide(slide.path) as opened:
            grid = tile_grid(tissue.tissue_mask(opened), opened.dimensions,
                             tile_size=plan.tile_size)
            profiles.append(tuple(np.asarray(a) for a in featurizer.prepare(opened, grid)))
    sharding = NamedSharding(Mesh(np.array(jax.local_devices()), ("data",)),
                             PartitionSpec("data"))
    jax.block_until_ready(featurizer.apply(jax.device_put(tiles, sharding), profiles[0]))

    with tempfile.TemporaryDirectory() as out:
        report = extract_slides([s.path for s in slides], out, featurizer,
                                batch_size=plan.batch, readers=args.readers, progress=False)
        if report.failed or report.tiles != sum(len(s.coords) for s in slides):
            raise SystemExit(f"extraction failed or tiled differently: {report}")
        files = [read_features(Path(out) / f"{slide_stem(s.path)}.h5") for s in slides]

    def device_work(states, tiles):
        return tile_outputs(networks["low"], networks["high"], states["low"], states["high"],
                            tiles, ratio=config.ratio)

    timing = time_jitted(device_work, states, jnp.asarray(tiles), warmup=1,
                         repeats=plan.repeats)
    result = Result(report.tiles, report.seconds, report.input_wait_seconds,
                    plan.batch / timing.median_s, [f["slide_feature"] for f in files],
                    sum(f["attributes"]["prepare_seconds"] for f in files),
                    network_flops=timing.flops)
    return result, profiles


# ---------------------------------------------------------------------------- PyTorch


def torch_networks(plan: Plan, states):
    from benchmarks import _torch_wsi

    nets = {}
    for which in NETWORKS:
        net = _torch_wsi.TorchAttentionResNet(width=plan.width, num_classes=NUM_CLASSES,
                                              hidden=WsiConfig().hidden)
        state = jax.device_get(states[which])
        _torch_wsi.load_flax_variables(net, state.params, state.batch_stats)
        nets[which] = net.eval()
    return nets


def measure_torch(plan: Plan, dtype: str, states, slides: list[BenchSlide], profiles,
                  tiles: np.ndarray, args: argparse.Namespace) -> Result:
    import torch

    from benchmarks import _torch_wsi

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    channels_last = args.torch_memory_format == "channels_last"
    nets = torch_networks(plan, states)
    target = StainNormalizer.default(args.stain).target
    work = [_torch_wsi.SlideTiles(str(s.path), s.coords, *profile)
            for s, profile in zip(slides, profiles)]
    options = dict(ratio=WsiConfig().ratio, dtype=torch_dtype, channels_last=channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for net in nets.values():
        net.to(dtype=torch_dtype, memory_format=memory_format)
    batch = torch.from_numpy(tiles)
    times = []
    with torch.inference_mode():
        _torch_wsi.tile_outputs(nets["low"], nets["high"], batch, **options)  # warm-up
        for _ in range(plan.repeats):
            start = time.perf_counter()
            _torch_wsi.tile_outputs(nets["low"], nets["high"], batch, **options)
            times.append(time.perf_counter() - start)
    result = _torch_wsi.run_pipeline(
        work, nets["low"], nets["high"], tile_size=plan.tile_size, target_stains=target.stains,
        target_p99=target.p99, batch_size=plan.batch, workers=args.torch_workers, **options)
    return Result(result.tiles, result.seconds, result.input_wait_seconds,
                  plan.batch / statistics.median(times), result.slide_features)


# ---------------------------------------------------------------------------- table


def rows_of(name: str, plan: Plan, dtype: str, ours: Result, theirs: Result | None) -> list:
    images = 1 + round(1 / WsiConfig().ratio) ** 2

    def row(label: str, r: Result, ratio) -> list:
        # The network-only call processes one batch: its flops over its time per batch.
        rate = achieved(ours.network_flops, plan.batch / r.network_tiles_per_second)
        return [f"{name} ({plan.tile_size}, w{plan.width})", dtype, label, r.tiles,
                r.tiles / r.seconds, 100 * r.input_wait_seconds / r.seconds, ratio,
                r.network_tiles_per_second, images * r.network_tiles_per_second, *rate]

    if theirs is None:
        return [row("ours", ours, "torch absent")]
    return [row("ours", ours, (ours.tiles / ours.seconds) / (theirs.tiles / theirs.seconds)),
            row("PyTorch", theirs, "")]


def feature_difference(ours: Result, theirs: Result) -> float:
    """Largest relative difference of the slide features of the two pipelines."""
    return max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
               for a, b in zip(ours.slide_features, theirs.slide_features))


# ---------------------------------------------------------------------------- command line


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=lambda t: _names(t, CONFIGS, "configurations"),
                        default=list(CONFIGS),
                        help="comma-separated, from seed,cpu (default: both)")
    parser.add_argument("--dtypes", type=lambda t: _names(t, DTYPES, "dtypes"),
                        default=list(DTYPES),
                        help="comma-separated, from float32,bfloat16 (default: both)")
    parser.add_argument("--tiles", type=int, default=0,
                        help="tiles per configuration, about (default: 16 for seed, 256 for "
                             "cpu); the slides are sized for it")
    parser.add_argument("--slides", type=int, default=2,
                        help="slides per configuration (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=0,
                        help="tiles per device call, both pipelines (default: 4 for seed, "
                             "16 for cpu, the program's --tile-batch)")
    parser.add_argument("--readers", type=int, default=4,
                        help="our tile-reading threads (default: %(default)s, the program's)")
    parser.add_argument("--torch-workers", type=int, default=2,
                        help="PyTorch DataLoader worker processes (default: %(default)s)")
    parser.add_argument("--torch-memory-format", choices=("channels_last", "contiguous"),
                        default="channels_last",
                        help="PyTorch's memory format (default: %(default)s, faster here)")
    parser.add_argument("--stain", choices=("macenko", "vahadane"), default="macenko",
                        help="the per-slide stain estimate of ours (its device recolouring "
                             "is the same either way) (default: %(default)s)")
    parser.add_argument("--no-torch", action="store_true",
                        help="measure ours only, even when torch is installed")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "jaxmed",
                        help="folder of the generated slides, reused (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="thin networks (width 8 / 4) and few tiles: a check of the script")
    return parser.parse_args(argv)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    if with_torch:
        import torch

        from benchmarks._torch_wsi import count_parameters
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          + (f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{args.torch_workers} loader workers" if with_torch
             else "PyTorch not measured (not installed, or --no-torch)"))
    rows, notes = [], []
    for name, plan in plans(args).items():
        slides = the_slides(plan, args)
        states = network_states(plan, args)
        tiles = fixed_batch(slides[0], plan)
        ours_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(states["low"].params))
        note = f"{name}: {len(slides)} slides, ours {ours_params} parameters per network"
        if with_torch:
            note += f", PyTorch {count_parameters(torch_networks(plan, states)['low'])}"
        notes.append(note)
        for dtype in args.dtypes:
            _progress(f"{name} {dtype}: ours ...")
            ours, profiles = measure_ours(plan, dtype, states, slides, tiles, args)
            theirs = None
            if with_torch:
                _progress(f"{name} {dtype}: PyTorch ...")
                theirs = measure_torch(plan, dtype, states, slides, profiles, tiles, args)
                notes.append(f"{name} {dtype}: slide features ours vs PyTorch, largest "
                             f"relative difference {feature_difference(ours, theirs):.2g}")
            notes.append(f"{name} {dtype}: ours' per-slide preparation (mask, grid, stain "
                         f"profile; inside its time) {ours.prepare_seconds:.2f} s in all")
            rows += rows_of(name, plan, dtype, ours, theirs)
    print()
    print_table(["configuration", "dtype", "implementation", "tiles", "tiles/s",
                 "input wait %", "ours/torch", "network tiles/s", "network images/s",
                 "network GFLOP/s", "MFU"], rows)
    print(peak_line())
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
