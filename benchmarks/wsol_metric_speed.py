"""Speed of MaxBoxAcc / MaxBoxAccV2 (jaxmed.metrics._wsol) against the per-image, per-threshold
OpenCV reference (benchmarks/_wsol_reference.py), on the same CAMs in the same run.

Data: `--n` seeded CAMs of `--size`² (default 1 000 of 224²), each a sum of 1–4 Gaussian blobs
plus pixel noise (`--noise` × the peak, default 0.02), with 1–3 ground-truth boxes around blobs
(±1.5 σ, jittered). Noise makes many small contours, which is what slows the reference most;
with `--noise 0` (maps as smooth as bicubic-upsampled CAMs) both are faster and the ratio is
smaller. Both implementations score V1 (largest contour, δ = 0.5, 0.7) and V2 (all contours,
δ = 0.3, 0.5, 0.7) at τ = 0, 0.001, …, 0.999; the script fails unless their curves (per δ and
τ) are identical. `time ratio` = time / the reference's time (below 1 = faster); wall-clock and
process CPU seconds are both shown because the machine may be shared.

    python benchmarks/wsol_metric_speed.py
    python benchmarks/wsol_metric_speed.py --n 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import print_table
from benchmarks._wsol_reference import reference_max_box_acc
from jaxmed.metrics import max_box_acc

VERSIONS = {
    "MaxBoxAcc (V1)": dict(multi_contour=False, iou_thresholds=(0.5, 0.7)),
    "MaxBoxAccV2": dict(multi_contour=True, iou_thresholds=(0.3, 0.5, 0.7)),
}


def blob_cams(n: int, size: int, noise: float, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """`(n, size, size)` float32 CAMs (sums of Gaussians + noise) and 1–3 boxes each."""
    rng = np.random.default_rng(seed)
    grid = np.arange(size, dtype=np.float32)
    cams = np.empty((n, size, size), np.float32)
    boxes = []
    for i in range(n):
        k = rng.integers(1, 5)
        centre = rng.uniform(0, size, (k, 2))
        sigma = rng.uniform(0.04, 0.2, k) * size
        height = rng.uniform(0.3, 1.0, k)
        # gy, gx: [k, size]
        gy = np.exp(-((grid[None, :] - centre[:, :1]) ** 2) / (2 * sigma[:, None] ** 2))
        gx = np.exp(-((grid[None, :] - centre[:, 1:]) ** 2) / (2 * sigma[:, None] ** 2))
        cams[i] = np.einsum("k,ky,kx->yx", height, gy, gx)
        cams[i] += noise * rng.standard_normal((size, size)) * cams[i].max()
        chosen = rng.choice(k, size=min(k, rng.integers(1, 4)), replace=False)
        half = 1.5 * sigma[chosen, None] * rng.uniform(0.7, 1.3, (chosen.size, 2))
        lo = np.clip(centre[chosen] - half, 0, size - 1).astype(int)  # (y, x)
        hi = np.clip(centre[chosen] + half, 0, size - 1).astype(int)
        boxes.append(np.stack([lo[:, 1], lo[:, 0], hi[:, 1], hi[:, 0]], axis=1))
    return cams, boxes


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of CAMs")
    parser.add_argument("--size", type=int, default=224, help="CAM height and width")
    parser.add_argument("--noise", type=float, default=0.02, help="pixel noise, × each CAM's peak")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cams, boxes = blob_cams(args.n, args.size, args.noise, args.seed)
    config = f"{args.n} × {args.size}²"
    rows, mismatches = [], []
    for name, kwargs in VERSIONS.items():
        ours, ours_wall, ours_cpu = timed(lambda: max_box_acc(cams, boxes, **kwargs))
        ref, ref_wall, ref_cpu = timed(lambda: reference_max_box_acc(cams, boxes, **kwargs))
        same = np.array_equal(ours.curve, ref.curve) and ours.accuracy == ref.accuracy
        if not same:
            mismatches.append(name)
        accuracy = ", ".join(f"{d:g}: {a:.2f}" for d, a in ours.accuracy.items())
        timings = (("reference (OpenCV)", ref_wall, ref_cpu), ("jaxmed", ours_wall, ours_cpu))
        for label, wall, cpu in timings:
            rows.append([name, label, config, wall, cpu, 1e3 * wall / args.n, wall / ref_wall,
                         "yes" if same else "NO", accuracy])
    print_table(["measurement", "implementation", "configuration", "wall s", "CPU s", "ms/CAM",
                 "time ratio", "identical", "accuracy % by δ"], rows)
    if mismatches:
        raise SystemExit(f"results differ from the reference for: {', '.join(mismatches)}")
    print("identical: curves (% correct per δ and τ), accuracies and best τ equal the "
          "reference's exactly")


if __name__ == "__main__":
    main()
