"""Mapping-GAN feature visualisation (SPEC.md S0): learn M(x) that turns a positive volume into
a plausible negative one, y = x + M(x); M(x) is the key feature map.

    python -m train.mapping_gan                      # synthetic 3-D study in runs/mapping_gan
    python -m train.mapping_gan --positive-dir P --negative-dir N --workdir RUN
    python -m train.mapping_gan apply --workdir RUN --input a.nii.gz --output OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data import nifti, synthetic_vagan
from jaxmed.mapping_gan import data
from jaxmed.mapping_gan.apply import apply_to_files
from jaxmed.mapping_gan.figures import key_feature_figure
from jaxmed.mapping_gan.steps import build_mapping_gan, chunked_validation
from jaxmed.training import (add_training_args, comma_ints, fit, fit_options, inference_parser,
                             init_distributed, make_mesh, program_main, replicate,
                             write_run_config)


def _norm(text: str) -> str | None:
    return None if text == "none" else text


def _unit_interval(*, include_one: bool):
    """An argparse type: a float in [0, 1] (or [0, 1) without `include_one`)."""

    def parse(text: str) -> float:
        value = float(text)
        if not (0.0 <= value <= 1.0 and (include_one or value < 1.0)):
            raise argparse.ArgumentTypeError(f"must be in [0, {'1]' if include_one else '1)'}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.mapping_gan", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Apply a trained model: python -m train.mapping_gan apply --help")
    d = parser.add_argument_group("data (default: a synthetic study generated into WORKDIR/data)")
    d.add_argument("--positive-dir", help="folder of positive-group NIfTI volumes (mapped by M)")
    d.add_argument("--negative-dir", help="folder of negative-group NIfTI volumes (the target group)")
    d.add_argument("--manifest", help="CSV with columns path,label[,effect_path] instead of the folders")
    d.add_argument("--normalisation", choices=("minmax", "percentile"), default="minmax",
                   help="per-volume mapping to [-1, 1] (default: %(default)s)")
    d.add_argument("--percentiles", type=float, nargs=2, default=(1.0, 99.0),
                   help="clipping percentiles for --normalisation percentile (default: %(default)s)")
    d.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction (default: %(default)s)")
    d.add_argument("--synthetic-dims", type=int, choices=(2, 3), default=3,
                   help="synthetic study: 3-D volumes or the 2-D VA-GAN protocol (default: %(default)s)")
    d.add_argument("--synthetic-size", type=int, default=32, help="synthetic edge length (default: %(default)s)")
    d.add_argument("--synthetic-subjects", type=int, default=400,
                   help="synthetic subjects, half positive (default: %(default)s)")
    m = parser.add_argument_group("model")
    m.add_argument("--generator-features", type=comma_ints, default=(8, 16, 32),
                   help="U-Net filters per level, comma-separated (VA-GAN: 16,32,64,128) (default: %(default)s)")
    m.add_argument("--generator-norm", type=_norm, default="batch", help="batch | layer | none (default: %(default)s)")
    m.add_argument("--critic", choices=("tt", "dense"), default="tt",
                   help="tensor-train critic or ordinary conv/dense layers of the same shapes (default: %(default)s)")
    m.add_argument("--critic-widths", type=comma_ints, default=(8, 16, 24), help="critic block widths (default: %(default)s)")
    m.add_argument("--critic-growth", type=int, default=8, help="dense-block growth rate (default: %(default)s)")
    m.add_argument("--critic-layers", type=int, default=2, help="layers per dense block (default: %(default)s)")
    m.add_argument("--critic-norm", type=_norm, default="layer",
                   help="layer | batch | none; batch is invalid with the gradient penalty (default: %(default)s)")
    m.add_argument("--critic-pooling-channels", type=int, default=8,
                   help="second-order pooling reduced channels (default: %(default)s)")
    m.add_argument("--critic-head", type=int, default=16, help="hidden width of the TT-FC head (default: %(default)s)")
    m.add_argument("--tt-rank", type=int, default=4, help="tensor-train rank (default: %(default)s)")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="computation dtype; parameters stay float32 (default: %(default)s)")
    g = parser.add_argument_group("GAN")
    g.add_argument("--l1-weight", type=float, default=100.0, help="λ of λ·mean|M(x)| (default: %(default)s)")
    g.add_argument("--lipschitz", choices=("gradient-penalty", "clip"), default="gradient-penalty",
                   help="critic Lipschitz constraint (default: %(default)s)")
    g.add_argument("--gp-weight", type=float, default=10.0, help="gradient-penalty weight (default: %(default)s)")
    g.add_argument("--clip", type=float, default=0.01,
                   help="weight-clipping bound, applied to every critic parameter; with --critic tt each TT "
                        "core is clipped, so kernels shrink like clip^(cores): use a larger bound (0.1-0.5) "
                        "there (default: %(default)s)")
    g.add_argument("--learning-rate", type=float, default=1e-3,
                   help="Adam lr of both networks, β1=0, β2=0.9 (VA-GAN paper: 1e-3; its code: 1e-4) "
                        "(default: %(default)s)")
    g.add_argument("--lr-decay", type=_unit_interval(include_one=True), default=0.5,
                   help="fraction of --steps at the end over which both learning rates fall linearly "
                        "to zero; 0 keeps them constant (default: %(default)s)")
    g.add_argument("--generator-ema", type=_unit_interval(include_one=False), default=0.99,
                   help="decay of the moving average of the generator's parameters used for validation, "
                        "figures and apply; 0 uses the live generator (default: %(default)s)")
    g.add_argument("--n-critic", type=int, default=5, help="critic updates per generator update (default: %(default)s)")
    g.add_argument("--n-critic-warmup", type=int, default=10,
                   help="critic updates in warm-up steps (VA-GAN: 100; on CPU each warm-up step beyond "
                        "--n-critic updates is slow, see MappingGan.unroll_critic) (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=5,
                   help="first generator steps with --n-critic-warmup (VA-GAN: 25) (default: %(default)s)")
    g.add_argument("--warmup-every", type=int, default=100,
                   help="also every this many generator steps (default: %(default)s)")
    o = parser.add_argument_group("outputs")
    o.add_argument("--figures", type=int, default=4, help="validation subjects drawn as PNG (default: %(default)s)")
    o.add_argument("--val-chunk", type=int, default=16, help="validation subjects per jitted call (default: %(default)s)")
    add_training_args(parser, workdir="runs/mapping_gan", steps=400, batch_size=4,
                      log_every=25, checkpoint_every=50, eval_every=50, keep=3)
    return parser


_MODEL_KEYS = ("generator_features", "generator_norm", "critic", "critic_widths", "critic_growth",
               "critic_layers", "critic_norm", "critic_pooling_channels", "critic_head", "tt_rank",
               "dtype", "l1_weight", "lipschitz", "gp_weight", "clip", "learning_rate", "generator_ema",
               "n_critic", "normalisation", "percentiles", "seed")


def _subjects(args) -> list[nifti.Subject]:
    if args.positive_dir or args.negative_dir or args.manifest:
        return data.find_subjects(args.positive_dir, args.negative_dir, args.manifest)
    manifest = synthetic_vagan.write_dataset(Path(args.workdir) / "data", dims=args.synthetic_dims,
                                             n_subjects=args.synthetic_subjects, seed=args.seed,
                                             size=args.synthetic_size)
    return nifti.read_manifest(manifest)


def train(args: argparse.Namespace) -> dict[str, float]:
    init_distributed(args)
    workdir = Path(args.workdir)
    config = {k: getattr(args, k) for k in _MODEL_KEYS}
    if args.lr_decay:
        config.update(lr_decay_start=args.steps - max(1, round(args.lr_decay * args.steps)),
                      lr_decay_end=args.steps)
    gan = build_mapping_gan(config)
    study = data.load_study(_subjects(args), downsampling=gan.generator.total_downsampling,
                            val_fraction=args.val_fraction, seed=args.seed,
                            normalisation=args.normalisation, percentiles=tuple(args.percentiles))
    has_truth = study.val.effects is not None
    best = dict(best_metric="val_ncc" if has_truth else "val_wasserstein",
                best_mode="max" if has_truth else "min")
    write_run_config(workdir, {**config, **best, "spatial_dims": study.spatial_dims,
                                           "channels": study.channels,
                                           "input_shape": list(study.train.images.shape[1:])})

    schedule = dict(n_critic=args.n_critic, n_critic_warmup=args.n_critic_warmup,
                    warmup_steps=args.warmup_steps, warmup_every=args.warmup_every)
    batches = data.step_batches(study.train, args.batch_size, args.seed, **schedule)
    val = replicate(data.validation_arrays(study.val), make_mesh())
    example = jnp.zeros((1, *study.train.images.shape[1:]), jnp.float32)
    result = fit(init_state=lambda: gan.init_state(example, args.seed), train_step=gan.train_step,
                 train_data=batches, eval_fn=chunked_validation(gan, val, study.crop, args.val_chunk),
                 **best, **fit_options(args))
    if jax.process_index() == 0:
        _validation_figures(gan, result.state, study, workdir / "figures", args.figures)
    metrics = result.eval_metrics
    summary = ", ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items()))
    print(f"validation after {result.step} steps: {summary}")
    return metrics


def _validation_figures(gan, state, study: data.Study, folder: Path, count: int) -> None:
    """PNG of M(x) for the first `count` validation positives (ground truth beside it if known)."""
    positives = np.flatnonzero(study.val.labels == nifti.POSITIVE)[:count]
    if not len(positives):
        return
    images = jnp.asarray(study.val.images[positives])
    maps = np.asarray(jax.jit(lambda s, x: gan.key_feature_map(s, x))(state, images), np.float32)
    names = data.subject_names([study.val.subjects[i] for i in positives])
    for i, name in zip(range(len(positives)), names):
        image = data.crop_spatial(study.val.images[positives[i]], study.crop)[..., 0]
        effect = None
        if study.val.effects is not None:
            effect = data.crop_spatial(study.val.effects[positives[i]], study.crop)[..., 0]
        m = data.crop_spatial(maps[i], study.crop).sum(-1)
        key_feature_figure(image, m, folder / f"{name}.png", title=f"{name}: key feature map M(x)", effect=effect)


def apply_main(argv: list[str]) -> None:
    parser = inference_parser(
        "python -m train.mapping_gan apply", "Write M(x) and y = x + M(x) as NIfTI (the input's "
        "affine and header, intensities in the normalised [-1, 1] units) and a PNG per input.",
        "NIfTI volumes to map")
    args = parser.parse_args(argv)
    for path in apply_to_files(args.workdir, args.input, args.output, args.checkpoint):
        print(path)


def main(argv: list[str] | None = None) -> None:
    program_main(argv, build_parser=build_parser, train=train, commands={"apply": apply_main})


if __name__ == "__main__":
    main()
