"""The feature atlas on synthetic lesions whose local features are known: how pure each chosen
node's library is, how much the chosen libraries overlap, and whether generated crops still
activate their node (WGAN-GP and VAE), over several seeds.

For each seed the program itself (`python -m train.feature_atlas`, its CPU defaults unless
options are given after `--`) trains the classifier and builds the atlas with WGAN-GP
generators in WORKDIR/seed<k>; then `python -m train.feature_atlas generators --generator vae`
trains VAEs on the same libraries in a copy of that run, WORKDIR/seed<k>-vae. Read from each
run's atlas/report.json and atlas.json:

- purity: the share of a library's crops that fall on its most frequent known feature (a crop
  falls on the feature with most mask pixels in its window when they cover >= 10 % of it);
- overlap: the share of two libraries' crops that have a counterpart in the other (same
  image, window IoU >= 0.5), over all pairs of chosen nodes;
- activation: the share of contexts (library images at library windows, and neutral
  backgrounds) in which a pasted crop activates its node, for generated, real library and
  random crops; `passes`: generated >= the median real crop.

Goals (docs/atlas.md): overlap < 20 %, and generated crops activate their node at least as
often as the median real crop.

    python benchmarks/atlas_quality.py                      # 3 seeds, the program's defaults
    python benchmarks/atlas_quality.py --seeds 0            # one seed
    python benchmarks/atlas_quality.py -- --generator-steps 500
    python benchmarks/atlas_quality.py --fresh              # retrain (runs are kept and resumed)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/atlas_quality.py` from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_WORKDIR = Path.home() / ".cache" / "jaxmed" / "atlas_quality"
GENERATORS = ("wgan-gp", "vae")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds, one dataset and run each "
                             "(default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="where the runs are kept (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete earlier runs first (else they are resumed or reused)")
    parser.add_argument("program_args", nargs="*",
                        help="options for every `python -m train.feature_atlas` run, after "
                             "`--`")
    return parser.parse_args(argv)


def run(command: list[str]) -> float:
    """Run one program command; returns its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return time.perf_counter() - start


def program(*args: str) -> list[str]:
    return [sys.executable, "-m", "train.feature_atlas", *args, "--no-progress"]


def run_seed(workdir: Path, seed: int, extra: list[str]) -> dict[str, float]:
    """Both generators' runs of one seed; returns their wall times."""
    gan = workdir / f"seed{seed}"
    seconds = {"wgan-gp": run(program("--workdir", str(gan), "--seed", str(seed), *extra))}
    vae = workdir / f"seed{seed}-vae"
    if not (vae / "atlas" / "report.json").is_file():
        shutil.rmtree(vae, ignore_errors=True)
        shutil.copytree(gan, vae, ignore=shutil.ignore_patterns("generators", "sheets",
                                                                 "movies", "report.*"))
    seconds["vae"] = run(program("generators", "--workdir", str(vae), "--generator", "vae",
                                 *[a for a in extra if a.startswith("--generator-")]))
    return seconds


def read_run(workdir: Path) -> dict[str, float]:
    """One run's summary: mean purity, overlap, activation rates, nodes passing."""
    report = json.loads((workdir / "atlas" / "report.json").read_text())
    nodes = report["nodes"]
    overlap = report["overlap"]
    pairs = [overlap[i][j] for i in range(len(overlap)) for j in range(len(overlap)) if i < j]
    summary = {
        "nodes": len(nodes),
        "purity": statistics.mean(n["purity"] for n in nodes) if "purity" in nodes[0] else 0.0,
        "overlap_mean": statistics.mean(pairs) if pairs else 0.0,
        "overlap_max": max(pairs) if pairs else 0.0,
        "passing": sum(n["passes"] for n in nodes) / len(nodes),
    }
    for kind in ("generated", "real", "random"):
        summary[kind] = statistics.mean(n[f"{kind}_rate"] for n in nodes)
    summary["real_median"] = statistics.mean(n["real_median_rate"] for n in nodes)
    summary["features"] = sorted({n.get("feature", "?") for n in nodes})
    return summary


def spread(values: list[float], scale: float = 100.0) -> str:
    mean = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:5.1f} ± {sd:4.1f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.fresh:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {g: [] for g in GENERATORS}
    for seed in seeds:
        seconds = run_seed(args.workdir, seed, args.program_args)
        for generator in GENERATORS:
            name = f"seed{seed}" + ("-vae" if generator == "vae" else "")
            results[generator].append(read_run(args.workdir / name))
            print(f"seed {seed} {generator}: {seconds[generator]:.0f} s, features "
                  f"{', '.join(results[generator][-1]['features'])}", flush=True)

    print(f"\nfeature atlas on synthetic lesions: {len(seeds)} seeds, mean ± sd over seeds "
          "(per seed: the mean over its chosen nodes), percent")
    header = ("generator", "nodes", "purity", "overlap mean", "overlap max", "generated",
              "real", "real median", "random", "nodes passing")
    print(" | ".join(header))
    for generator in GENERATORS:
        rows = results[generator]
        cells = [generator, f"{statistics.mean(r['nodes'] for r in rows):.1f}"]
        cells += [spread([r[k] for r in rows]) for k in
                  ("purity", "overlap_mean", "overlap_max", "generated", "real",
                   "real_median", "random", "passing")]
        print(" | ".join(cells))
    gan = results["wgan-gp"]
    overlap_ok = all(r["overlap_max"] < 0.2 for r in gan)
    print(f"\ngoal overlap < 20 % between every pair of chosen libraries: "
          f"{'met' if overlap_ok else 'NOT met'}")
    for generator in GENERATORS:
        met = statistics.mean(r["passing"] for r in results[generator])
        print(f"goal generated >= median real crop ({generator}): {100 * met:.0f} % of nodes")


if __name__ == "__main__":
    main()
