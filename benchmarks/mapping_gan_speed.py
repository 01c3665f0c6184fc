"""Training speed of the mapping GAN (train/mapping_gan.py): one generator step = k critic
updates + 1 generator update, on random volumes of the program's input shapes.

Every comparison is measured in the same run against the program's default configuration (3-D
32^3, batch 4, k = 5, TT critic, float32, fused step); `time ratio` is step time / that
baseline's step time (below 1 = faster), `D param ratio` the same for the critic's parameter
count. Compile time is reported apart from the step time (median of `--repeats` timed steps
after `--warmup` untimed ones). `volumes/s` counts every volume a step processes: per critic
update B negatives and B positives, per generator update B positives, so B (2k + 1) per step.

- `config`: the default configuration and a larger one: 48^3 with the VA-GAN generator's
  features 16,32,64,128 (`--large-size`, `--large-features`).
- `critic`: TT critic against the dense critic of the same layer shapes (`--critic dense`).
- `fusion`: the fused step (one jitted call: the k critic updates in a `lax.scan`, then the
  generator update) against an unfused Python loop of separately jitted critic and generator
  updates (k + 1 dispatches per step, same maths and random numbers; the line under the table
  checks that both give the same parameters).
- `dtype`: float32 against bfloat16 computation (parameters stay float32).

`GFLOP/s` is XLA's flop count of the compiled step (`cost_analysis()`; unfused: k critic
updates + 1 generator update) over the step time, `MFU` that over the float32 matmul rate of the
device measured in the same run (`benchmarks._timing.matmul_peak_flops`, printed under the
table).

    python benchmarks/mapping_gan_speed.py
    python benchmarks/mapping_gan_speed.py --size 16 --repeats 2 --only critic,fusion
"""

from __future__ import annotations

import argparse
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

from benchmarks._timing import achieved, compiled_flops, peak_line, print_table
from jaxmed import losses
from jaxmed.mapping_gan.config import MappingGanConfig
from jaxmed.mapping_gan.steps import MappingGan, build_mapping_gan
from jaxmed.models.mapping_gan import mapped
from jaxmed.training import comma_ints
from train import mapping_gan as program

COMPARISONS = ("config", "critic", "fusion", "dtype")


@dataclass(frozen=True)
class Variant:
    """One measured training set-up: the program's config dict, input size and step kind."""

    name: str
    config: dict
    size: int
    fused: bool = True


def program_defaults() -> tuple[dict, argparse.Namespace]:
    """The model config dict and arguments that `python -m train.mapping_gan` would use."""
    args = program.build_parser().parse_args([])
    return MappingGanConfig.from_args(args).to_dict(), args


def build(config: dict, size: int, args: argparse.Namespace) -> MappingGan:
    """The GAN of `config` for one-channel inputs of edge `size` in `args.dims` dimensions."""
    return build_mapping_gan({**config, "input_shape": (*(size,) * args.dims, 1),
                              "seed": args.seed})


# ------------------------------------------------------------------ data and state


def random_batch(key: jax.Array, batch: int, k: int,
                 spatial: tuple[int, ...]) -> dict[str, jax.Array]:
    """A step's batch `{'negative': (B, k, *S, 1), 'positive': (B, k + 1, *S, 1)}` in
    [-1, 1]."""
    neg_key, pos_key = jax.random.split(key)
    return {"negative": jax.random.uniform(neg_key, (batch, k, *spatial, 1), minval=-1.0,
                                           maxval=1.0),
            "positive": jax.random.uniform(pos_key, (batch, k + 1, *spatial, 1), minval=-1.0,
                                           maxval=1.0)}


def count_params(tree: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


# ------------------------------------------------------------------ unfused step


def unfused_updates(gan: MappingGan, k: int):
    """`(critic_update, generator_update)`: the fused `train_step`'s two halves as separate
    functions.

    `critic_update(state, negative, positive, i)` is critic update `i` of the step (same random
    key as the fused step's scan iteration `i`); `generator_update(state, positive)` the
    generator update.
    """

    def critic_update(state, negative, positive, i):
        tx = gan.config.optimizer(state.step)
        key = jax.random.split(state.step_key(), k)[i]
        m, _ = gan.key_feature_map(state, positive, train=True)  # m: [B, *S, C]
        fake = jax.lax.stop_gradient(mapped(positive, m))
        grads, _ = jax.grad(gan._critic_loss, has_aux=True)(
            state.params["critic"], state.batch_stats["critic"], negative, fake, key)
        state = state.apply_gradients(tx, grads, network="critic")
        if gan.config.lipschitz == "clip":
            clipped = losses.clip_weights(state.params["critic"], gan.config.clip)
            state = state.replace(params={**state.params, "critic": clipped})
        return state

    def generator_update(state, positive):
        tx = gan.config.optimizer(state.step)
        objective = jax.value_and_grad(gan._generator_loss, has_aux=True)
        (loss, (_, stats)), grads = objective(state.params["generator"], state, positive)
        state = state.apply_gradients(tx, grads, network="generator")
        state = state.replace(batch_stats={**state.batch_stats, "generator": stats})
        return gan.average_generator(state), loss

    return critic_update, generator_update


def unfused_step(gan: MappingGan, state, batch: dict[str, jax.Array]):
    """`(step_fn, compile_s, flops)`: `step_fn()` runs one unfused generator step from `state` on
    `batch` as a Python loop of k + 1 compiled calls (minibatches sliced beforehand, outside the
    timing)."""
    k = batch["negative"].shape[1]
    negatives = [batch["negative"][:, i] for i in range(k)]  # each [B, *S, C]
    positives = [batch["positive"][:, i] for i in range(k + 1)]
    indices = [jnp.asarray(i, jnp.int32) for i in range(k)]
    critic_update, generator_update = unfused_updates(gan, k)
    start = time.perf_counter()
    critic = jax.jit(critic_update).lower(state, negatives[0], positives[0],
                                          indices[0]).compile()
    generator = jax.jit(generator_update).lower(state, positives[k]).compile()
    compile_s = time.perf_counter() - start
    parts = [compiled_flops(critic), compiled_flops(generator)]
    flops = None if None in parts else k * parts[0] + parts[1]

    def step_fn():
        s = state
        for i in range(k):
            s = critic(s, negatives[i], positives[i], indices[i])
        return generator(s, positives[k])[0]

    return step_fn, compile_s, flops


def time_calls(fn, warmup: int, repeats: int) -> float:
    """Median seconds of `fn()` (blocked until ready) after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def update_difference(start, a, b) -> float:
    """`||a - b|| / ||a - start||` over all parameters: how far two steps from `start` disagree,
    relative to the step's own update (Adam turns rounding noise in a zero gradient into an
    O(learning-rate) update, so a maximum over single parameters would overstate it)."""
    def sq_norm(x, y):
        pairs = zip(jax.tree.leaves(x), jax.tree.leaves(y))
        return sum(float(jnp.sum(jnp.square(u - v))) for u, v in pairs)

    return (sq_norm(a.params, b.params) / sq_norm(a.params, start.params)) ** 0.5


# ------------------------------------------------------------------ measurement


def initial_state(variant: Variant, args: argparse.Namespace, states: dict):
    """The step-0 state of `variant`, shared (through `states`) by variants of the same networks.

    Parameters are float32 whatever the computation dtype, so the float32 networks initialise
    the bfloat16 variant too (initialisation compiles the whole forward pass: slow on CPU).
    """
    config = {**variant.config, "dtype": "float32"}
    key = (_config_key(config), variant.size)
    if key not in states:
        states[key] = jax.jit(build(config, variant.size, args).init_state)()
    return states[key]


def _config_key(config: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in config.items()))


def measure(variant: Variant, args: argparse.Namespace, states: dict) -> dict[str, Any]:
    """Compile and step times, parameter counts and a `run()` that repeats one step (for checks)."""
    gan = build(variant.config, variant.size, args)
    spatial = (variant.size,) * args.dims
    batch = random_batch(jax.random.key(args.seed), args.batch, args.n_critic, spatial)
    state = initial_state(variant, args, states)
    if variant.fused:
        start = time.perf_counter()
        compiled = jax.jit(gan.train_step).lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        run = lambda: compiled(state, batch)[0]  # noqa: E731
        flops = compiled_flops(compiled)
    else:
        run, compile_s, flops = unfused_step(gan, state, batch)
    step_s = time_calls(run, args.warmup, args.repeats)
    return dict(compile_s=compile_s, step_s=step_s, run=run, state=state, flops=flops,
                g_params=count_params(state.params["generator"]),
                d_params=count_params(state.params["critic"]))


def comparisons(base: dict, args: argparse.Namespace) -> dict[str, list[Variant]]:
    """Each comparison's variants, the first being its baseline (the program's defaults)."""
    large = {**base, "generator_features": args.large_features}
    return {
        "config": [Variant("default", base, args.size), Variant("large", large, args.large_size)],
        "critic": [Variant("tt critic", base, args.size),
                   Variant("dense critic", {**base, "critic": "dense"}, args.size)],
        "fusion": [Variant("fused", base, args.size),
                   Variant("unfused", base, args.size, fused=False)],
        "dtype": [Variant("float32", base, args.size),
                  Variant("bfloat16", {**base, "dtype": "bfloat16"}, args.size)],
    }


def run_comparisons(chosen: list[str], base: dict, args: argparse.Namespace):
    """Measures every variant once (the shared baseline too) and builds the table rows."""
    cache: dict[tuple, dict] = {}
    states: dict[tuple, Any] = {}
    rows = []
    for name in chosen:
        variants = comparisons(base, args)[name]
        results = []
        for v in variants:
            key = (_config_key(v.config), v.size, v.fused)
            if key not in cache:
                print(f"measuring {name}: {v.name} ...", file=sys.stderr, flush=True)
                cache[key] = r = measure(v, args, states)
                print(f"  compile {r['compile_s']:.1f} s, step {r['step_s']:.3g} s",
                      file=sys.stderr, flush=True)
            results.append(cache[key])
        ref = results[0]
        for v, r in zip(variants, results):
            volumes = args.batch * (2 * args.n_critic + 1)
            rows.append([name, v.name, _describe(v, args), r["g_params"], r["d_params"],
                         r["compile_s"], r["step_s"] * 1e3, 1.0 / r["step_s"],
                         volumes / r["step_s"], *achieved(r["flops"], r["step_s"]),
                         r["step_s"] / ref["step_s"] if r is not ref else "",
                         r["d_params"] / ref["d_params"] if r is not ref else ""])
        if name == "fusion":
            fusion = results
    check = None
    if "fusion" in chosen:
        check = update_difference(fusion[0]["state"], fusion[0]["run"](), fusion[1]["run"]())
    return rows, check


def _describe(v: Variant, args: argparse.Namespace) -> str:
    features = ",".join(map(str, v.config["generator_features"]))
    return (f"{args.batch}x{v.size}^{args.dims} G {features} {v.config['critic']} "
            f"{v.config['dtype']}")


# ------------------------------------------------------------------ command line


def build_parser(defaults: argparse.Namespace) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=defaults.synthetic_dims,
                        help="spatial dimensions (default: %(default)s)")
    parser.add_argument("--size", type=int, default=defaults.synthetic_size,
                        help="edge length of the default configuration (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=defaults.batch_size,
                        help="batch size (default: %(default)s)")
    parser.add_argument("--n-critic", type=int, default=defaults.n_critic,
                        help="critic updates per generator step, k (default: %(default)s)")
    parser.add_argument("--large-size", type=int, default=48,
                        help="edge length of the large configuration (default: %(default)s)")
    parser.add_argument("--large-features", type=comma_ints, default="16,32,64,128",
                        help="generator features of the large configuration (VA-GAN: 16,32,64,128) "
                             "(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps after compilation (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed steps; the median is reported (default: %(default)s)")
    parser.add_argument("--only", default=",".join(COMPARISONS),
                        help=f"comma-separated comparisons to run, of {', '.join(COMPARISONS)} "
                        "(default: all)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="data and init seed (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    base, defaults = program_defaults()
    args = build_parser(defaults).parse_args(argv)
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(COMPARISONS))
    if unknown:
        sys.exit(f"error: unknown comparison(s) {unknown}; choose from "
                 f"{', '.join(COMPARISONS)}")
    rows, check = run_comparisons(chosen, base, args)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"batch {args.batch}, k = {args.n_critic} critic updates per step, "
          f"{args.batch * (2 * args.n_critic + 1)} volumes per step, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print_table(["comparison", "variant", "setup", "G params", "D params", "compile s",
                 "step ms", "steps/s", "volumes/s", "GFLOP/s", "MFU", "time ratio",
                 "D param ratio"], rows)
    print(peak_line())
    if check is not None:
        print("fused vs unfused, one step: ||difference|| / ||update|| of all parameters = "
              f"{check:.3g}")


if __name__ == "__main__":
    main()
