"""A toy featurizer for the extraction tests, and a command line that runs `extract_slides`
with it in a subprocess (to be killed, or as one of two `jax.distributed` processes).

    python -m tests.pathology.extract_worker OUTPUT SLIDE... [--hold STEM]
        [--coordinator ADDRESS --process-id I]
"""

import argparse
import time
import zlib

import jax
import jax.numpy as jnp

TILE = 64


@jax.jit
def _tile_means(tiles, offset):
    means = jnp.mean(tiles.astype(jnp.float32), axis=(1, 2))  # means: [B, 3]
    return {"mean": means + offset, "corner": tiles[:, 0, 0, :]}


class ToyFeaturizer:
    """Per tile: its mean RGB plus a per-slide offset (from `prepare`) and its top-left pixel;
    per slide: the mean of the tile means. `hold`: a slide stem whose preparation never ends
    (so a test can kill the run while that slide is in progress)."""

    tile_size = TILE

    def __init__(self, fingerprint: str = "toy-1", hold: str | None = None):
        self.fingerprint, self.hold = fingerprint, hold
        self.seen = []  # (shape, dtype, number of devices) of every batch given to apply

    def prepare(self, slide, grid):
        if self.hold is not None and slide.path.name.startswith(self.hold):
            while True:
                time.sleep(1)
        return slide_offset(slide.path.name)

    def apply(self, tiles, context):
        self.seen.append((tiles.shape, tiles.dtype, len(tiles.sharding.device_set)))
        return _tile_means(tiles, jnp.float32(context))

    def summarize(self, outputs):
        return {"slide_mean": outputs["mean"].mean(axis=0)}

    def attributes(self):
        return {"fingerprint": self.fingerprint, "widths": [8, 16], "ratio": 0.5}


def slide_offset(name: str) -> float:
    """A per-slide number that `prepare` hands to `apply`: shows the context arrives."""
    return float(zlib.crc32(name.encode()) % 7)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("slides", nargs="+")
    parser.add_argument("--hold")
    parser.add_argument("--coordinator")
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, 2, args.process_id)
    from jaxmed.pathology.extract import extract_slides

    featurizer = ToyFeaturizer(hold=args.hold)
    report = extract_slides(args.slides, args.output, featurizer, batch_size=4, readers=2,
                            prefetch_batches=2, progress=False)
    devices = sorted({seen[2] for seen in featurizer.seen})
    print("report", jax.process_index(), report.done, report.skipped, report.failed,
          report.tiles, str(devices).replace(" ", ""), jax.device_count(), flush=True)


if __name__ == "__main__":
    main()
