"""The tiny `python -m train.feature_atlas` runs the atlas's program and explorer tests share
(see tests/programs.py for how runs are shared between pytest processes)."""

import sys

TINY = ["--synthetic-images", "120", "--image-size", "32", "--filters", "4,8,8", "--hidden", "6",
        "--batch-size", "16", "--log-every", "1", "--checkpoint-every", "3",
        "--library-images", "60", "--window", "8", "--min-crops", "2", "--features", "3",
        "--generator-width", "4", "--generator-batch", "4", "--check-samples", "4",
        "--movie-frames", "5", "--no-progress"]
STEPS, GENERATOR_STEPS = 6, 4


def train_command(workdir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.feature_atlas", "--workdir", str(workdir), *TINY,
            "--steps", str(STEPS), "--generator-steps", str(GENERATOR_STEPS), *extra]


def stage(command: str, workdir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.feature_atlas", command, "--workdir", str(workdir),
            "--no-progress", "--log-every", "1", *extra]
