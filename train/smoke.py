"""Smoke training run: a tiny CNN on synthetic bar images, on the shared machinery.

    python -m train.smoke [--workdir runs/smoke] [--steps 300] ...

Classifies 16x16 noisy images of a horizontal bar, a vertical bar, a diagonal
or a square (4 classes). Exercises everything a real program uses: the mesh
and shardings, BatchNorm statistics, dropout keys from `fold_in(rng, step)`,
grain batches with host-side augmentation, Orbax checkpoints (latest and best
by validation accuracy), automatic resume, SIGTERM handling, metrics.jsonl and
TensorBoard. The defaults finish in well under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import training

IMAGE_SIZE = 16
NUM_CLASSES = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.smoke", description=__doc__.split("\n\n")[0])
    training.add_training_args(parser, workdir="runs/smoke", steps=300,
                               batch_size=32, log_every=25, checkpoint_every=100,
                               eval_every=100, keep=2)
    model = parser.add_argument_group("smoke model and data")
    model.add_argument("--learning-rate", type=training.positive, default=3e-3,
                       help="Adam step size (default: %(default)s)")
    model.add_argument("--num-train", type=training.positive_int, default=2048,
                       help="synthetic training images (default: %(default)s)")
    model.add_argument("--num-val", type=training.positive_int, default=256,
                       help="synthetic validation images (default: %(default)s)")
    model.add_argument("--load-delay", type=training.non_negative, default=0.0,
                       help="seconds of simulated I/O per example; tests use it "
                       "to make steps slow enough to interrupt (default: %(default)s)")
    model.add_argument("--save-params", default=None,
                       help="write the final params and batch statistics to this "
                       ".npz (default: none)")
    return parser


# ---------------------------------------------------------------- data ---

def synthetic_bars(n: int, seed: int) -> training.ArraySource:
    """`n` noisy 16x16 images, `image [n, 16, 16, 1]` float32, `label [n]` (the batch keys of
    every supervised program)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = rng.normal(0.0, 0.3, (n, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    centre = rng.integers(5, IMAGE_SIZE - 5, (n, 2))
    eye = np.eye(IMAGE_SIZE, dtype=bool)
    for i, (label, (r, c)) in enumerate(zip(labels, centre)):
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
        if label == 0:
            mask[r, 2:-2] = True                     # horizontal bar
        elif label == 1:
            mask[2:-2, c] = True                     # vertical bar
        elif label == 2:
            mask = np.roll(eye, c - IMAGE_SIZE // 2, axis=1)  # diagonal
        else:
            mask[r - 2:r + 2, c - 2:c + 2] = True    # square
        images[i][mask] += 1.0
    return training.ArraySource(image=images[..., None], label=labels.astype(np.int32))


class SlowSource:
    """Wraps a source, sleeping `delay` seconds per example (simulated I/O)."""

    def __init__(self, source, delay: float):
        self.source, self.delay = source, delay

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        time.sleep(self.delay)
        return self.source[index]


def random_shift(example, rng: np.random.Generator):
    """Augmentation: roll the image by up to 2 pixels on each axis."""
    shift = rng.integers(-2, 3, size=2)
    return {**example, "image": np.roll(example["image"], tuple(shift), axis=(0, 1))}


# --------------------------------------------------------------- model ---

class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2, global average pool, dropout, dense.

    **Arguments:** `x` `[B, 16, 16, 1]`. **Returns:** logits `[B, 4]`.
    """

    @nn.compact
    def __call__(self, x, train: bool = False):
        for features in (8, 16):
            # No conv bias: the BatchNorm that follows has one.
            x = nn.Conv(features, (3, 3), use_bias=False)(x)  # x: [B, H, W, F]
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), (2, 2))       # x: [B, H/2, W/2, F]
        x = x.mean(axis=(1, 2))                               # x: [B, 16]
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(NUM_CLASSES)(x)                       # [B, 4]


def make_init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int):
    def init_state() -> training.TrainState:
        example = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1))
        return training.init_supervised_state(model, tx, example, seed)
    return init_state


# --------------------------------------------------------- update step ---

def classification_loss(logits, batch):
    """Softmax cross-entropy and accuracy: the `loss_fn` of the shared supervised step."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


@functools.cache
def make_eval_step(model: nn.Module):
    """`(state, batch) -> per-example loss and correctness`, for `training.evaluate`."""
    def eval_step(state, batch):
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"loss": loss, "correct": logits.argmax(-1) == batch["label"]}
    return eval_step


def make_eval_fn(model: nn.Module, source: training.ArraySource, batch_size: int, mesh):
    """`state -> {'val_loss', 'val_accuracy'}` over every validation image, each host
    evaluating its own share."""
    share = training.host_share(len(source))
    local = {k: v[share] for k, v in source.arrays.items()}

    def evaluate(state):
        outputs = training.evaluate(make_eval_step(model), state, local, count=len(source),
                                    batch_size=batch_size, mesh=mesh)
        return {"val_loss": float(outputs["loss"].mean()),
                "val_accuracy": float(outputs["correct"].mean())}
    return evaluate


# ---------------------------------------------------------------- main ---

def save_params(path: str, state: training.TrainState) -> None:
    """Final params and BatchNorm statistics as `.npz` (process 0 writes)."""
    tree = training.fetch({"params": state.params, "batch_stats": state.batch_stats})
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if jax.process_index() == 0:
        np.savez(path, **{jax.tree_util.keystr(k): v for k, v in flat})


def main(argv=None) -> None:
    training.program_main(argv, build_parser=build_parser, train=train, commands={})


def train(args: argparse.Namespace) -> None:
    mesh = training.make_mesh()
    train_source = synthetic_bars(args.num_train, seed=args.seed)
    if args.load_delay:
        train_source = SlowSource(train_source, args.load_delay)
    train_batches = training.make_batches(train_source, args.batch_size, seed=args.seed,
                                          transform=random_shift)
    val_source = synthetic_bars(args.num_val, seed=args.seed + 1)
    model, tx = SmallCNN(), optax.adam(args.learning_rate)
    result = training.fit(
        init_state=make_init_state(model, tx, args.seed),
        train_step=training.supervised_train_step(model, tx, classification_loss),
        train_data=train_batches,
        eval_fn=make_eval_fn(model, val_source, args.batch_size, mesh), best_metric="val_loss",
        best_mode="min",
        mesh=mesh, **training.fit_options(args))
    if args.save_params:
        save_params(args.save_params, result.state)
    if jax.process_index() == 0:
        final = {**result.metrics, **result.eval_metrics}
        print(f"final step {result.step}: " +
              ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))


if __name__ == "__main__":
    sys.exit(main())
