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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.smoke", description=__doc__.split("\n\n")[0])
    training.add_training_args(parser, workdir="runs/smoke", steps=300,
                               batch_size=32, log_every=25, checkpoint_every=100,
                               eval_every=100, keep=2)
    model = parser.add_argument_group("smoke model and data")
    model.add_argument("--learning-rate", type=float, default=3e-3,
                       help="Adam step size (default: %(default)s)")
    model.add_argument("--num-train", type=int, default=2048,
                       help="synthetic training images (default: %(default)s)")
    model.add_argument("--num-val", type=int, default=256,
                       help="synthetic validation images (default: %(default)s)")
    model.add_argument("--load-delay", type=float, default=0.0,
                       help="seconds of simulated I/O per example; tests use it "
                       "to make steps slow enough to interrupt (default: %(default)s)")
    model.add_argument("--save-params", default=None,
                       help="write the final params and batch statistics to this "
                       ".npz (default: none)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- data ---

def synthetic_bars(n: int, seed: int) -> training.ArraySource:
    """`n` noisy 16x16 images, `images [n, 16, 16, 1]` float32, `labels [n]`."""
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
    return training.ArraySource(images=images[..., None], labels=labels.astype(np.int32))


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
    return {**example, "images": np.roll(example["images"], tuple(shift), axis=(0, 1))}


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
        rng = jax.random.PRNGKey(seed)
        variables = model.init(rng, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))
        return training.TrainState.create(params=variables["params"], tx=tx,
                                          batch_stats=variables["batch_stats"],
                                          rng=jax.random.fold_in(rng, 1))
    return init_state


# --------------------------------------------------------- update step ---

def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
    def train_step(state: training.TrainState, batch):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["images"],
                train=True, rngs={"dropout": state.step_key()}, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
            return loss.mean(), (logits, updates["batch_stats"])

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(tx, grads).replace(batch_stats=stats)
        accuracy = (logits.argmax(-1) == batch["labels"]).mean()
        return state, {"loss": loss, "accuracy": accuracy}
    return train_step


def make_eval_fn(model: nn.Module, val_batches, mesh):
    def eval_step(state, batch):
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             batch["images"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return {"val_loss": loss.mean(),
                "val_accuracy": (logits.argmax(-1) == batch["labels"]).mean()}
    return lambda state: training.evaluate(eval_step, state, val_batches, mesh)


# ---------------------------------------------------------------- main ---

def save_params(path: str, state: training.TrainState) -> None:
    """Final params and BatchNorm statistics as `.npz` (process 0 writes)."""
    tree = training.fetch({"params": state.params, "batch_stats": state.batch_stats})
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if jax.process_index() == 0:
        np.savez(path, **{jax.tree_util.keystr(k): v for k, v in flat})


def main(argv=None) -> None:
    args = parse_args(argv)
    training.init_distributed(args)
    mesh = training.make_mesh()
    train_source = synthetic_bars(args.num_train, seed=args.seed)
    if args.load_delay:
        train_source = SlowSource(train_source, args.load_delay)
    train_batches = training.make_batches(train_source, args.batch_size, seed=args.seed,
                                          transform=random_shift)
    val_batches = training.make_batches(synthetic_bars(args.num_val, seed=args.seed + 1),
                                        args.batch_size, seed=args.seed, shuffle=False,
                                        num_epochs=1)
    model, tx = SmallCNN(), optax.adam(args.learning_rate)
    result = training.fit(
        init_state=make_init_state(model, tx, args.seed),
        train_step=make_train_step(model, tx), train_data=train_batches,
        eval_fn=make_eval_fn(model, val_batches, mesh), best_metric="val_loss",
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
