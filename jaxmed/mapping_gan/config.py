"""The mapping GAN's configuration: its model, GAN and preprocessing options, and `config.json`.

`MappingGanConfig` is the single source of `python -m train.mapping_gan`'s model options and of
the run's `config.json` (with the values derived from the data: shapes, the best-checkpoint
metric and the learning-rate decay window). The formulas and the defaults' reasons are in
`docs/mapping_gan.md`.
"""

from __future__ import annotations

import argparse
import dataclasses

from jaxmed.data import synthetic_vagan
from jaxmed.training import (
    Config,
    bounded,
    comma_ints,
    fraction,
    non_negative,
    non_negative_int,
    option,
    positive,
    positive_int,
    unit_interval,
)

DATA_GROUP = "data (default: a synthetic study generated into WORKDIR/data)"
NORMS = ("batch", "layer", "none")
# Derived from --steps and --lr-decay; they follow --steps when a resumed run changes it.
DECAY_KEYS = frozenset({"lr_decay_start", "lr_decay_end"})


def synthetic_size(text: str) -> int:
    """An option type: an edge length that the synthetic protocol's two boxes fit into."""
    size = positive_int(text)
    try:
        synthetic_vagan.protocol(size)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return size


@dataclasses.dataclass(frozen=True)
class MappingGanConfig(Config):
    """The data, the networks, the GAN's losses and schedule of a mapping-GAN run."""

    # ----------------------------------------------------------------------------- data
    # The data a run trains on is part of its configuration, so a resume with other data is
    # refused instead of silently mixing two studies in one set of checkpoints.
    positive_dir: str | None = option(None, "folder of positive-group NIfTI volumes (mapped by "
                                      "M)", group=DATA_GROUP)
    negative_dir: str | None = option(None, "folder of negative-group NIfTI volumes (the target "
                                      "group)", group=DATA_GROUP)
    manifest: str | None = option(None, "CSV with columns path,label[,effect_path] instead of "
                                  "the folders", group=DATA_GROUP)
    normalisation: str = option("minmax", "per-volume mapping to [-1, 1]", group=DATA_GROUP,
                                choices=("minmax", "percentile"))
    percentiles: tuple[float, float] = option(
        (1.0, 99.0), "clipping percentiles for --normalisation percentile", cli=False)
    val_fraction: float = option(0.2, "held-out fraction", group=DATA_GROUP, type=fraction)
    synthetic_dims: int = option(3, "synthetic study: 3-D volumes or the 2-D VA-GAN protocol",
                                 group=DATA_GROUP, type=int, choices=(2, 3))
    synthetic_size: int = option(32, "synthetic edge length", group=DATA_GROUP,
                                 type=synthetic_size)
    synthetic_subjects: int = option(400, "synthetic subjects, half positive", group=DATA_GROUP,
                                     type=bounded(int, low=4))

    # ---------------------------------------------------------------------------- model
    generator_features: tuple[int, ...] = option(
        (8, 16, 32), "U-Net filters per level, comma-separated (VA-GAN: 16,32,64,128)",
        type=comma_ints)
    generator_norm: str = option("batch", "generator normalisation", choices=NORMS)
    critic: str = option("tt", "tensor-train critic or ordinary conv/dense layers of the same "
                         "shapes", choices=("tt", "dense"))
    critic_widths: tuple[int, ...] = option((8, 16, 24), "critic block widths", type=comma_ints)
    critic_growth: int = option(8, "dense-block growth rate", type=positive_int)
    critic_layers: int = option(2, "layers per dense block", type=positive_int)
    critic_norm: str = option("layer", "critic normalisation; batch is invalid with the gradient "
                              "penalty", choices=NORMS)
    critic_pooling_channels: int = option(8, "second-order pooling reduced channels",
                                          type=positive_int)
    critic_head: int = option(16, "hidden width of the TT-FC head", type=positive_int)
    tt_rank: int = option(4, "tensor-train rank", type=positive_int)
    dtype: str = option("float32", "computation dtype; parameters stay float32",
                        choices=("float32", "bfloat16"))

    # ------------------------------------------------------------------------------ GAN
    l1_weight: float = option(100.0, "λ of λ·mean|M(x)|", group="GAN", type=non_negative)
    lipschitz: str = option("gradient-penalty", "critic Lipschitz constraint", group="GAN",
                            choices=("gradient-penalty", "clip"))
    gp_weight: float = option(10.0, "gradient-penalty weight", group="GAN", type=non_negative)
    clip: float = option(
        0.01, "weight-clipping bound, applied to every critic parameter; with --critic tt each "
        "TT core is clipped, so kernels shrink like clip^(cores): use a larger bound (0.1-0.5) "
        "there", group="GAN", type=positive)
    learning_rate: float = option(
        1e-3, "Adam lr of both networks, β1=0, β2=0.9 (VA-GAN paper: 1e-3; its code: 1e-4)",
        group="GAN", type=positive)
    lr_decay: float = option(
        0.5, "fraction of --steps at the end over which both learning rates fall linearly to "
        "zero; 0 keeps them constant (a resumed run with another --steps decays over the new "
        "end)", group="GAN", type=unit_interval)
    generator_ema: float = option(
        0.99, "decay of the moving average of the generator's parameters used for validation, "
        "figures and apply; 0 uses the live generator", group="GAN", type=fraction)
    n_critic: int = option(5, "critic updates per generator update", group="GAN",
                           type=positive_int)
    n_critic_warmup: int = option(
        10, "critic updates in warm-up steps (VA-GAN: 100; on CPU each warm-up step beyond "
        "--n-critic updates is slow, see MappingGan.unroll_critic)", group="GAN",
        type=positive_int)
    warmup_steps: int = option(5, "first generator steps with --n-critic-warmup (VA-GAN: 25)",
                               group="GAN", type=non_negative_int)
    warmup_every: int = option(100, "also every this many generator steps; 0 = never",
                               group="GAN", type=non_negative_int)

    # ----------------------------------------------- from the common training options
    steps: int = option(400, "total training steps", cli=False, resumable=True)
    seed: int = option(0, "seed of initialisation, data order and split", cli=False)

    def check(self) -> None:
        if self.manifest and (self.positive_dir or self.negative_dir):
            raise ValueError("argument --manifest: give either a manifest or --positive-dir and "
                             "--negative-dir, not both")
        if bool(self.positive_dir) != bool(self.negative_dir):
            raise ValueError("argument --positive-dir/--negative-dir: give both folders (or "
                             "--manifest, or neither for the synthetic study)")
        if self.critic_norm == "batch" and self.lipschitz == "gradient-penalty":
            raise ValueError(
                "argument --critic-norm: batch is invalid with --lipschitz gradient-penalty (the "
                "penalty needs each score to depend on its own volume alone); use "
                "--critic-norm layer or none, or --lipschitz clip")
        low, high = self.percentiles
        if not low < high:
            raise ValueError(f"argument --percentiles: need low < high, got {low:g} {high:g}")

    def decay_window(self) -> dict[str, int]:
        """`lr_decay_start`, `lr_decay_end`: the generator steps over which both learning
        rates fall linearly to zero (the last `lr_decay` of `steps`); empty without decay."""
        if not self.lr_decay:
            return {}
        return dict(lr_decay_start=self.steps - max(1, round(self.lr_decay * self.steps)),
                    lr_decay_end=self.steps)

    def critic_schedule(self) -> dict[str, int]:
        """The keyword arguments of `jaxmed.mapping_gan.data.critic_updates`."""
        return dict(n_critic=self.n_critic, n_critic_warmup=self.n_critic_warmup,
                    warmup_steps=self.warmup_steps, warmup_every=self.warmup_every)
