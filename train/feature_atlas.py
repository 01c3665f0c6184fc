"""Feature atlas (docs/atlas.md): what a classifier's feature nodes respond to. Trains the
classifier, finds for each candidate node (default: every node of the fully-connected layer
'fc') the image windows that activate it most, keeps the most distinct of these libraries,
trains a generator per kept node that makes new examples, checks that they still activate the
node, and writes the atlas: libraries, sheets, movies of latent random walks, a report.

    python -m train.feature_atlas                        # synthetic lesions, runs/feature_atlas
    python -m train.feature_atlas --data-dir DIR --image-size 256 --workdir RUN
    python -m train.feature_atlas libraries --workdir RUN --nodes fc:3,block5_conv2:7
    python -m train.feature_atlas generators --workdir RUN --generator vae
    python -m train.feature_atlas serve --workdir RUN [--port 8000]   # the explorer page
    python -m train.feature_atlas movie --workdir RUN --node fc:7 --output walk.mp4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from jaxmed.atlas import library as lib
from jaxmed.atlas.config import (
    CHECK,
    GENERATORS,
    LIBRARIES,
    NODES,
    PROGRAM,
    AtlasOptions,
    ClassifierConfig,
    atlas_options_check,
)
from jaxmed.atlas.data import load_data, split_data, train_batches
from jaxmed.atlas.figures import node_sheet
from jaxmed.atlas.generators import crop_batches
from jaxmed.atlas.inference import (
    ATLAS_DIR,
    GENERATORS_DIR,
    LIBRARIES_DIR,
    NodeReader,
    abstract_variables,
    atlas_is_current,
    atlas_movie,
    build_atlas_libraries,
    check_atlas,
    check_nodes,
    load_atlas,
    load_classifier,
    node_generators,
    read_atlas,
    report_lines,
    run_seed,
    write_atlas,
    write_report,
)
from jaxmed.atlas.movies import MOVIE_SUFFIXES, latent_walk, render_walk, write_movie
from jaxmed.atlas.steps import build_classifier, validation
from jaxmed.training import (
    RESUMABLE_OPTIONS,
    add_training_args,
    bounded,
    fit,
    fit_options,
    host_share,
    one_line_errors,
    positive_int,
    prepare_run_config,
    program_main,
    read_run_config,
)

BEST = "val_accuracy"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Re-run the atlas on a trained classifier: python -m train.feature_atlas "
               "libraries --help (nodes and libraries, then generators) or generators --help "
               "(generators only); explore the atlas: serve --help; one feature's movie: "
               "movie --help")
    ClassifierConfig.add_options(parser)
    AtlasOptions.add_options(parser)
    add_training_args(parser, workdir="runs/feature_atlas", steps=1200, batch_size=64,
                      log_every=50, checkpoint_every=300, eval_every=300, keep=2)
    return parser


def train(args: argparse.Namespace, config: ClassifierConfig) -> dict[str, float]:
    workdir = Path(args.workdir)
    options = atlas_options(args, config.image_size)

    # --- data ---
    data = load_data(config)
    train_set, held_out = split_data(data, config.val_fraction, config.seed)
    batches = train_batches(train_set, args.batch_size, seed=config.seed,
                            augment=config.augment)

    # --- classifier ---
    classifier = build_classifier({**config.to_dict(), "num_classes": len(data.class_names)})
    check_nodes(classifier, abstract_variables(classifier), options)  # before training
    prepare_run_config(workdir, {**config.to_dict(), "num_classes": len(data.class_names),
                                 "class_names": data.class_names, "best_metric": BEST,
                                 "best_mode": "max"},
                       resumable=config.resumable() | RESUMABLE_OPTIONS)
    share = host_share(len(held_out))
    validate = validation(classifier, {"image": np.asarray(held_out.images[share])},
                          held_out.labels)
    fit(init_state=classifier.init_state, train_step=classifier.train_step, train_data=batches,
        eval_fn=validate, best_metric=BEST, best_mode="max", **fit_options(args))
    classifier, state, _ = load_classifier(workdir)
    metrics = validate(state)
    print(f"classifier (best checkpoint): held-out accuracy {metrics['val_accuracy']:.1f} %")

    # --- the atlas ---
    run_atlas(workdir, classifier, state, data, options, rebuild=False,
              progress=args.progress, log_every=args.log_every)
    return metrics


def atlas_options(args: argparse.Namespace, image_size: int) -> AtlasOptions:
    """The atlas options of parsed arguments, checked against the classifier's image size
    (contradictions: a usage error, exit status 2)."""
    try:
        options = AtlasOptions.from_args(args)
        atlas_options_check(options, image_size)
    except ValueError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        sys.exit(2)
    return options


def run_atlas(workdir: Path, classifier, state, data, options: AtlasOptions, *,
              rebuild: bool, progress: bool, log_every: int,
              libraries_stage: bool = True) -> None:
    """The atlas stages on a trained classifier: libraries (unless current, or `rebuild`),
    generators (resumable), the activation check and the outputs."""
    atlas_dir = workdir / ATLAS_DIR
    step, seed = int(state.step), run_seed(workdir)
    if libraries_stage and (rebuild or not atlas_is_current(atlas_dir, options, step)):
        if jax.process_index() == 0:
            built = build_atlas_libraries(classifier, state, data, options, progress=progress)
            write_atlas(atlas_dir, built, options, step)
    summary = read_atlas(atlas_dir)
    libraries = lib.read_libraries(atlas_dir / LIBRARIES_DIR)
    nodes = [lb.node for lb in libraries]
    print(f"{len(nodes)} distinct features of {len(summary['candidates'])} candidate nodes: "
          f"{', '.join(nodes)}")

    # --- generators --- (all chosen nodes in one run: atlas/generators)
    generators = node_generators(options.generator_values(), libraries[0].crops.shape[1],
                                 len(libraries), seed)
    generator_dir = atlas_dir / GENERATORS_DIR
    prepare_run_config(generator_dir, {**options.generator_values(), "nodes": nodes},
                       resumable={"generator_steps"})
    batches = crop_batches([lb.crops for lb in libraries], options.generator_batch,
                           seed=seed,
                           critic_steps=generators.config.minibatches)
    result = fit(workdir=str(generator_dir), init_state=generators.init_state,
                 train_step=generators.train_step, train_data=batches,
                 num_steps=options.generator_steps, log_every=log_every,
                 checkpoint_every=max(1, options.generator_steps // 4), keep=2,
                 progress=progress)
    gen_state = jax.device_get(result.state)

    # --- activation check and outputs ---
    if jax.process_index() != 0:
        return
    thresholds = np.array([summary["thresholds"][n] for n in nodes], np.float32)
    reader = NodeReader(classifier, state, nodes, summary["options"]["rule"], thresholds)
    key = jax.random.PRNGKey(seed + 1)
    generated = np.asarray(generators.generate(
        gen_state, generators.sample_latents(key, options.check_samples)))
    checks = check_atlas(reader, libraries, generated, data, count=options.check_samples,
                         seed=seed)
    rows = write_report(atlas_dir, checks, summary)
    for column, library in enumerate(libraries):
        name = lib.node_folder(library.node)
        node_sheet(library, generated[column], rows[column], atlas_dir / "sheets" / f"{name}.png")
        if options.movie_frames:
            walk = latent_walk(jax.random.fold_in(key, column), options.movie_frames,
                               options.latent_dim, step=options.walk_step)
            frames = render_walk(generators, gen_state, column, walk)
            for suffix in MOVIE_SUFFIXES:
                write_movie(frames, atlas_dir / "movies" / f"{name}{suffix}")
    print("\n".join(report_lines(rows)))
    overlap = np.asarray(summary["overlap"])
    off = overlap[~np.eye(len(overlap), dtype=bool)]
    if off.size:
        print(f"overlap between the chosen libraries: mean {100 * off.mean():.1f} %, "
              f"max {100 * off.max():.1f} %")
    print(f"atlas written to {atlas_dir}")


def stage_parser(command: str, description: str, option_groups: tuple[str, ...]
                 ) -> argparse.ArgumentParser:
    parser = one_line_errors(argparse.ArgumentParser(prog=f"{PROGRAM} {command}",
                                                     description=description))
    parser.add_argument("--workdir", required=True, help="the trained run's work directory")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars (default: %(default)s)")
    parser.add_argument("--log-every", type=positive_int, default=50,
                        help="log the generators' metrics every N steps (default: %(default)s)")
    AtlasOptions.add_options(parser)
    for group in parser._action_groups:  # argparse has no public way to drop a group
        if group.title not in (*option_groups, "options", "optional arguments"):
            for action in list(group._group_actions):
                parser._remove_action(action)
                group._group_actions.remove(action)
    return parser


def stage_main(argv: list[str], command: str) -> None:
    groups = (NODES, LIBRARIES, GENERATORS, CHECK) if command == "libraries" else (
        GENERATORS, CHECK)
    description = (
        "Rebuild the atlas of a trained run with other nodes or library options (candidate "
        "nodes, heat maps, libraries, distinct features), then its generators, check and "
        "outputs; the classifier is not retrained, the previous atlas is replaced only when "
        "the new libraries are complete." if command == "libraries" else
        "Train the generators of a run's atlas again with other generator options (or "
        "continue them with more --generator-steps), then the check and outputs.")
    parser = stage_parser(command, description, groups)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    classifier, state, config = load_classifier(workdir)
    if command == "generators":
        saved = read_atlas(workdir / ATLAS_DIR)["options"]
        for name, value in saved.items():
            setattr(args, name, tuple(value) if isinstance(value, list) else value)
    options = atlas_options(args, classifier.image_size)
    data = load_data(ClassifierConfig.from_dict(config))
    if command == "generators":
        _restart_generators(workdir / ATLAS_DIR / GENERATORS_DIR, options)
    run_atlas(workdir, classifier, state, data, options, rebuild=command == "libraries",
              progress=args.progress, log_every=args.log_every,
              libraries_stage=command == "libraries")


def _restart_generators(generator_dir: Path, options: AtlasOptions) -> None:
    """Generator checkpoints made with other generator options are removed (the generators are
    trained again); the same options with more steps continue them."""
    path = generator_dir / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    values = options.generator_values()
    if any(saved.get(k) != v for k, v in values.items() if k != "generator_steps"):
        shutil.rmtree(generator_dir)


def serve_parser() -> argparse.ArgumentParser:
    parser = one_line_errors(argparse.ArgumentParser(
        prog=f"{PROGRAM} serve", description="Serve the explorer of a run's atlas, a local web "
        "page: the features' cards, a generated crop per feature with one slider per latent "
        "dimension (and the node's activation for it), random walks and movies, the "
        "libraries. Ctrl-C stops it."))
    parser.add_argument("--workdir", required=True, help="the run's work directory")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; "
                             "0.0.0.0 serves every network the machine is on)")
    parser.add_argument("--port", type=bounded(int, low=0, high=65535), default=8000,
                        help="port (default: %(default)s; 0: any free port)")
    parser.add_argument("--bound", type=bounded(float, low=0.0, low_open=True), default=3.0,
                        help="the sliders' range: ± this many prior standard deviations "
                             "(default: %(default)s)")
    return parser


def serve_main(argv: list[str]) -> None:
    import socket

    import uvicorn

    from jaxmed.atlas.explorer import Explorer, explorer_app, warm_up

    args = serve_parser().parse_args(argv)
    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    try:  # refuse a busy port before the slow start, with the option to change
        listener.bind((args.host, args.port))
    except OSError as error:
        print(f"{PROGRAM} serve: error: argument --port: cannot listen on {args.host}:"
              f"{args.port} ({error.strerror})", file=sys.stderr)
        sys.exit(2)
    atlas = load_atlas(args.workdir)
    config = read_run_config(args.workdir, PROGRAM)
    explorer = Explorer(atlas, load_data(ClassifierConfig.from_dict(config)), bound=args.bound)
    seconds = warm_up(explorer)
    server = uvicorn.Server(uvicorn.Config(explorer_app(explorer), log_level="warning"))
    listener.listen(128)  # connections wait in the queue until the server accepts them
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving the atlas of {args.workdir} ({len(atlas.nodes)} features; ready in "
          f"{seconds:.1f} s) at http://{shown}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn shuts down, then raises the signal again
        pass
    print("explorer stopped")


def movie_parser() -> argparse.ArgumentParser:
    parser = one_line_errors(argparse.ArgumentParser(
        prog=f"{PROGRAM} movie", description="Write the movie of a random walk through one "
        "feature's latent space (GIF or MP4, by the output's suffix)."))
    parser.add_argument("--workdir", required=True, help="the run's work directory")
    parser.add_argument("--node", required=True, help="a feature of the atlas, e.g. fc:7")
    parser.add_argument("--output", required=True, help="the movie file, .gif or .mp4")
    parser.add_argument("--frames", type=bounded(int, low=2), default=72,
                        help="frames (default: %(default)s)")
    parser.add_argument("--step", type=bounded(float, low=0.0, low_open=True), default=0.15,
                        help="one frame's step, in prior standard deviations (default: "
                             "%(default)s)")
    parser.add_argument("--fps", type=bounded(float, low=0.5, high=60.0), default=12.0,
                        help="frames per second (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the walk (default: 0)")
    return parser


def movie_main(argv: list[str]) -> None:
    args = movie_parser().parse_args(argv)
    if Path(args.output).suffix not in MOVIE_SUFFIXES:
        movie_parser().error(f"argument --output: {args.output} must end in "
                             f"{' or '.join(MOVIE_SUFFIXES)}")
    atlas = load_atlas(args.workdir)
    path = atlas_movie(atlas, args.node, args.output, frames=args.frames, step=args.step,
                       seed=args.seed, fps=args.fps)
    print(f"{args.frames} frames of {args.node} written to {path}")


def main(argv: list[str] | None = None) -> None:
    program_main(argv, build_parser=build_parser, train=train, config=ClassifierConfig,
                 commands={"libraries": lambda a: stage_main(a, "libraries"),
                           "generators": lambda a: stage_main(a, "generators"),
                           "serve": serve_main, "movie": movie_main})


if __name__ == "__main__":
    main()
