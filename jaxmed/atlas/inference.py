"""The atlas stages that read a trained classifier (docs/atlas.md): node values and the
activation rule, per-node heat maps and libraries, the distinct features, their generators,
the activation check and the outputs.

A run's atlas lives in `<workdir>/atlas`: `atlas.json` (the options, the candidate and chosen
nodes, their library sizes, purity and overlap), `libraries/` (the chosen nodes' crops and
`index.csv`), `generators/` (one resumable training run of all the chosen nodes' generators),
`sheets/<node>.png`, `movies/<node>.gif|.mp4` and `report.json` / `report.csv` (the activation
check). The libraries stage writes a new atlas beside the old one and swaps it in only when it
is complete, so a failed or interrupted stage leaves the previous atlas as it was.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.atlas import library as lib
from jaxmed.atlas.check import KINDS, NodeCheck, check_node, contexts, random_crops
from jaxmed.atlas.config import PROGRAM, AtlasOptions, node_name, parse_node
from jaxmed.atlas.data import AtlasData, backgrounds
from jaxmed.atlas.generators import GeneratorConfig, NodeGenerators
from jaxmed.atlas.movies import latent_walk, write_movie
from jaxmed.atlas.steps import AtlasClassifier, build_classifier
from jaxmed.errors import InputDataError
from jaxmed.explain import layer_outputs, node_heatmaps, node_values
from jaxmed.training import TrainState, load_run, read_run_config, restore_trained

ATLAS_DIR = "atlas"
LIBRARIES_DIR = "libraries"
GENERATORS_DIR = "generators"
ATLAS_JSON = "atlas.json"
CONTEXTS = 8  # images each checked crop is pasted into
CHUNK = 64  # images per heat-map call
MIN_CAM_SIDE = 8  # least positions per side of the default Grad-CAM / CAM conv layer


def load_classifier(workdir: str | os.PathLike) -> tuple[AtlasClassifier, TrainState, dict]:
    """The trained classifier of a run (its best checkpoint), its state and `config.json`."""
    run = load_run(workdir, build_classifier, program=PROGRAM)
    return run.system, run.state, run.config


class NodeReader:
    """Node values of a trained classifier, and whether a node counts as activated.

    `rule`: `'positive'` (value > 0), `'percentile'` (value > `thresholds`, the `percentile`
    of each node's values over the library images) or `'max'` (the largest value of the
    node's layer). A node's value is its pre-activation output, the maximum over positions
    for a conv layer (`jaxmed.explain.node_values`).
    """

    def __init__(self, classifier: AtlasClassifier, state: TrainState, nodes: Sequence[str],
                 rule: str, thresholds: np.ndarray | None = None):
        self.classifier, self.nodes, self.rule = classifier, list(nodes), rule
        self.thresholds = None if thresholds is None else np.asarray(thresholds, np.float32)
        self.variables = classifier.variables(state)
        pairs = [parse_node(n) for n in self.nodes]
        layers = sorted({layer for layer, _ in pairs})
        self.widths = layer_widths(classifier, self.variables, layers)
        _check_indices(pairs, self.widths)
        self.pairs = pairs
        everything = [(layer, i) for layer in layers for i in range(self.widths[layer])]
        column = {pair: k for k, pair in enumerate(everything)}
        self._own = np.array([column[p] for p in pairs])
        starts = np.cumsum([0] + [self.widths[layer] for layer in layers])
        span = {layer: (starts[k], starts[k + 1]) for k, layer in enumerate(layers)}
        self._spans = [span[layer] for layer, _ in pairs]
        model = classifier.model

        @jax.jit
        def read(variables, images):
            x = classifier.preprocess(images)
            every = node_values(model, variables, x, everything)  # [B, all nodes]
            layer_max = jnp.stack([jnp.max(every[:, a:b], axis=1) for a, b in self._spans],
                                  axis=1)
            return every[:, self._own], layer_max  # [B, n], [B, n]

        self._read = read

    def values(self, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """`(values, layer_max)` float32 `[B, n]` of uint8 images `[B, S, S, 3]`."""
        parts = [self._read(self.variables, jnp.asarray(images[i:i + batch]))
                 for i in range(0, len(images), batch)]
        return (np.concatenate([np.asarray(v) for v, _ in parts]),
                np.concatenate([np.asarray(m) for _, m in parts]))

    def decide(self, values: jax.Array, layer_max: jax.Array) -> jax.Array:
        """bool `[B, n]`: activated by the rule."""
        if self.rule == "positive":
            return values > 0
        if self.rule == "max":
            return values >= layer_max
        return values > jnp.asarray(self.thresholds)

    def activated(self, images: jax.Array, column: int) -> jax.Array:
        """bool `[B]`: whether node `column` is activated by each image (jit-able)."""
        values, layer_max = self._read(self.variables, images)
        return self.decide(values, layer_max)[:, column]


def candidate_nodes(options: AtlasOptions, widths: dict[str, int] | None = None) -> list[str]:
    """The candidate nodes: `--nodes`, or every node of `--layer` (`widths[layer]` nodes)."""
    if options.nodes:
        return list(dict.fromkeys(options.nodes))
    return [node_name(options.layer, i) for i in range(widths[options.layer])]


def layer_widths(classifier: AtlasClassifier, variables: Any, layers: Sequence[str]
                 ) -> dict[str, int]:
    """The number of nodes of each of `layers` (`variables` may be abstract, e.g. of
    `abstract_variables`; an unknown layer: `InputDataError` listing the layers)."""
    example = jax.ShapeDtypeStruct((1, classifier.image_size, classifier.image_size, 3),
                                   jnp.float32)
    try:
        shapes = jax.eval_shape(functools.partial(layer_outputs, classifier.model,
                                                  layers=list(layers)), variables, example)
    except ValueError as error:
        raise InputDataError(f"--layer/--nodes: {error}") from None
    return {layer: int(shapes[layer].shape[-1]) for layer in layers}


def abstract_variables(classifier: AtlasClassifier) -> Any:
    """The shapes of the classifier's variables, without initialising them."""
    example = jnp.zeros((1, classifier.image_size, classifier.image_size, 3), jnp.float32)
    return jax.eval_shape(classifier.model.init, jax.random.PRNGKey(0), example)


def check_nodes(classifier: AtlasClassifier, variables: Any, options: AtlasOptions) -> None:
    """Raise `InputDataError` when `--layer` or a layer of `--nodes` does not exist, or a node
    index is not below its layer's width (before anything is trained or written)."""
    pairs = [parse_node(n) for n in options.nodes]
    layers = sorted({layer for layer, _ in pairs}) if pairs else [options.layer]
    widths = layer_widths(classifier, variables, layers)
    _check_indices(pairs, widths)


def _check_indices(pairs: Sequence[tuple[str, int]], widths: dict[str, int]) -> None:
    for layer, index in pairs:
        if not 0 <= index < widths[layer]:
            raise InputDataError(f"--nodes: node {index} of layer {layer!r} does not exist "
                                 f"(the layer has {widths[layer]} nodes)")


def heat_conv_layer(classifier: AtlasClassifier, options: AtlasOptions,
                    nodes: Sequence[str]) -> str | None:
    """The conv layer the heat maps are drawn on: `--conv-layer`; by default, for Grad-CAM and
    guided Grad-CAM of nodes of fully-connected layers only, the deepest block's second conv
    whose output still has `MIN_CAM_SIDE` positions per side (block4_conv2 at 64 pixels,
    block5_conv2 at 256), since the last block's 4x4 output at 64 pixels is too coarse for
    16-pixel windows (docs/atlas.md); else `None`, `node_heatmaps`' default (a conv node's own
    layer; for CAM the conv output the Dense node reads)."""
    if options.conv_layer is not None or options.method not in ("grad-cam", "guided-grad-cam"):
        return options.conv_layer  # CAM: the default, the layer the Dense node reads
    if any(parse_node(n)[0].startswith("block") for n in nodes):
        return None
    sides = [classifier.image_size // 2 ** b for b in range(len(classifier.model.filters))]
    deepest = max(b for b, side in enumerate(sides) if side >= MIN_CAM_SIDE or b == 0)
    return f"block{deepest + 1}_conv2"


def merge(parts: list[lib.Library], offsets: list[int], limit: int) -> lib.Library:
    """One node's libraries of successive image chunks as one (sources shifted by each chunk's
    first image), keeping the `limit` best crops, in decreasing score order."""
    joined = lib.Library(
        node=parts[0].node, crops=np.concatenate([p.crops for p in parts]),
        heat=np.concatenate([p.heat for p in parts]),
        source=np.concatenate([p.source + o for p, o in zip(parts, offsets)]),
        source_name=[name for p in parts for name in p.source_name],
        **{name: np.concatenate([getattr(p, name) for p in parts])
           for name in ("y0", "x0", "size", "score", "activation")})
    order = np.argsort(-joined.score, kind="stable")[:limit]
    return joined.take(order)


def build_atlas_libraries(classifier: AtlasClassifier, state: TrainState, data: AtlasData,
                          options: AtlasOptions, *, progress: bool = False) -> dict[str, Any]:
    """Candidate nodes → values and activation → heat maps → libraries → distinct features.

    **Returns:** `{'libraries': chosen [Library], 'candidates': [{node, crops, ...}],
    'overlap': [k, k], 'thresholds': {node: value}, 'purity': [{...}] or None}`.

    **Raises:** `InputDataError` when the layer or a node does not exist, no candidate node is
    activated by any image, or no library has `--min-crops` crops.
    """
    widths = None if options.nodes else layer_widths(classifier, classifier.variables(state),
                                                     [options.layer])
    nodes = candidate_nodes(options, widths)
    images = np.asarray(data.images[:options.library_images])
    names = data.names[:len(images)]
    reader = NodeReader(classifier, state, nodes, "positive")
    values, layer_max = reader.values(images)
    thresholds = np.percentile(values, options.percentile, axis=0).astype(np.float32)
    reader = NodeReader(classifier, state, nodes, options.rule, thresholds)
    active = np.asarray(reader.decide(jnp.asarray(values), jnp.asarray(layer_max)))
    if not active.any():
        raise InputDataError(f"no candidate node ({', '.join(nodes[:4])}"
                             f"{', ...' if len(nodes) > 4 else ''}) is activated by any of "
                             f"the {len(images)} images under --rule {options.rule}; try "
                             "another --rule or --layer")

    pairs = [parse_node(n) for n in nodes]
    conv_layer = heat_conv_layer(classifier, options, nodes)
    heat_fn = jax.jit(functools.partial(node_heatmaps, classifier.model, nodes=pairs,
                                        method=options.method, conv_layer=conv_layer))
    parts, offsets = [], []
    for start in range(0, len(images), CHUNK):
        rows = slice(start, start + CHUNK)
        chunk = images[rows]
        try:
            heat = heat_fn(classifier.variables(state), classifier.preprocess(jnp.asarray(chunk)))
        except ValueError as error:
            raise InputDataError(f"--method {options.method}: {error}") from None
        parts.append(lib.build_libraries(
            chunk, np.asarray(heat), values[rows], active[rows], nodes, size=options.window,
            rule=options.window_rule, min_score=options.min_score,
            max_windows=options.windows_per_image, max_per_library=options.max_crops,
            image_names=names[rows]))
        offsets.append(start)
    libraries = [merge([p[k] for p in parts], offsets, options.max_crops)
                 for k in range(len(nodes))]
    candidates = [{"node": n, "crops": len(lb), "activated_images": int(active[:, k].sum()),
                   "threshold": float(thresholds[k])} for k, (n, lb) in
                  enumerate(zip(nodes, libraries))]
    usable = [k for k, lb in enumerate(libraries) if len(lb) >= options.min_crops]
    if not usable:
        largest = max(len(lb) for lb in libraries)
        raise InputDataError(f"no candidate node has a library of --min-crops "
                             f"{options.min_crops} crops (the largest has {largest}); lower "
                             "--min-score or --min-crops, or search more --library-images")
    picked = lib.choose_distinct([libraries[k] for k in usable], options.features)
    chosen = [libraries[usable[k]] for k in picked]
    result = {"libraries": chosen, "candidates": candidates, "conv_layer": conv_layer,
              "overlap": lib.overlap_matrix(chosen), "thresholds": {
                  n: float(t) for n, t in zip(nodes, thresholds)}, "purity": None}
    if data.features is not None:
        masks = data.features[:options.library_images]
        result["purity"] = []
        for library in chosen:
            purity, feature, _ = lib.library_purity(library, masks, data.feature_names)
            result["purity"].append({"node": library.node, "purity": float(purity),
                                     "feature": feature})
    return result


def write_atlas(atlas_dir: Path, built: dict[str, Any], options: AtlasOptions,
                classifier_step: int) -> None:
    """Write a complete new atlas (libraries and `atlas.json`) into `atlas_dir`: built in
    `<atlas_dir>.partial`, then swapped in, so the old atlas stays until the new one is whole.
    The old atlas's generators and outputs go with it."""
    partial = atlas_dir.with_name(atlas_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    lib.write_libraries(built["libraries"], partial / LIBRARIES_DIR)
    summary = {
        "program": PROGRAM, "classifier_step": classifier_step,
        "options": options.library_values(),
        "chosen": [lb.node for lb in built["libraries"]],
        "library_sizes": {lb.node: len(lb) for lb in built["libraries"]},
        "conv_layer": built["conv_layer"],
        "candidates": built["candidates"], "thresholds": built["thresholds"],
        "overlap": np.asarray(built["overlap"]).round(4).tolist(), "purity": built["purity"],
    }
    (partial / ATLAS_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    old = atlas_dir.with_name(atlas_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if atlas_dir.exists():
        atlas_dir.rename(old)
    partial.rename(atlas_dir)
    shutil.rmtree(old, ignore_errors=True)


def read_atlas(atlas_dir: Path) -> dict[str, Any]:
    """`atlas.json` of an atlas (`InputDataError` when there is none)."""
    path = atlas_dir / ATLAS_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputDataError(f"{path}: no atlas here; build one with {PROGRAM} libraries "
                             "--workdir RUN") from None
    except json.JSONDecodeError as error:
        raise InputDataError(f"{path}: not valid JSON ({error})") from None


def atlas_is_current(atlas_dir: Path, options: AtlasOptions, classifier_step: int) -> bool:
    """Whether `atlas_dir` holds libraries made with these options from this classifier."""
    path = atlas_dir / ATLAS_JSON
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return (saved.get("options") == options.library_values()
            and saved.get("classifier_step") == classifier_step)


def check_atlas(reader: NodeReader, libraries: Sequence[lib.Library], generated: np.ndarray,
                data: AtlasData, *, count: int, seed: int) -> list[NodeCheck]:
    """The activation check of every chosen node (`jaxmed.atlas.check`): `generated` uint8
    `[n, K, s, s, 3]` against `count` real and random crops in the same contexts."""
    rng = np.random.default_rng(seed)
    side = data.images.shape[1]
    grounds = backgrounds(CONTEXTS, side, seed)
    checks = []
    for column, library in enumerate(libraries):
        sources = np.asarray(data.images[np.asarray(library.source)])
        windows = np.stack([library.y0, library.x0], axis=1)
        where = contexts(sources, windows, grounds, CONTEXTS, rng)
        real = library.crops[rng.choice(len(library), size=count,
                                        replace=len(library) < count)]
        crops = {"generated": generated[column][:count], "real": real,
                 "random": random_crops(sources, library.crops.shape[1], count, rng)}
        activated = jax.jit(functools.partial(reader.activated, column=column))
        checks.append(check_node(library.node, activated, crops, where))
    return checks


def write_report(atlas_dir: Path, checks: Sequence[NodeCheck], summary: dict[str, Any]
                 ) -> list[dict]:
    """`report.json` and `report.csv`: per chosen node its library size, purity and feature
    (synthetic data) and the activation check; returns the rows."""
    purity = {p["node"]: p for p in summary.get("purity") or []}
    rows = []
    for check in checks:
        row = {"node": check.node, "crops": summary["library_sizes"][check.node]}
        if check.node in purity:
            row.update(purity=purity[check.node]["purity"], feature=purity[check.node]["feature"])
        row.update(check.row())
        rows.append(row)
    tmp = atlas_dir / "report.json.tmp"
    tmp.write_text(json.dumps({"nodes": rows, "overlap": summary["overlap"]}, indent=2) + "\n")
    tmp.replace(atlas_dir / "report.json")
    tmp = atlas_dir / "report.csv.tmp"
    with open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(atlas_dir / "report.csv")
    return rows


def report_lines(rows: Sequence[dict]) -> list[str]:
    """The printed lines: per node its library, purity and activation check."""
    lines = []
    for row in rows:
        purity = (f", purity {100 * row['purity']:.0f} % ({row['feature']})"
                  if "purity" in row else "")
        rates = ", ".join(f"{k} {100 * row[f'{k}_rate']:.0f} %" for k in KINDS)
        lines.append(f"{row['node']}: {row['crops']} crops{purity}; activates the node: "
                     f"{rates} (median real {100 * row['real_median_rate']:.0f} %) "
                     f"{'ok' if row['passes'] else 'BELOW the median real crop'}")
    return lines


def node_generators(values: dict[str, Any], crop_size: int, num_nodes: int, seed: int
                    ) -> NodeGenerators:
    """The chosen nodes' generators of `AtlasOptions.generator_values()` (or a generators
    run's `config.json`)."""
    return NodeGenerators(
        GeneratorConfig(kind=values["generator"], latent_dim=values["latent_dim"],
                        crop_size=crop_size, width=values["generator_width"], seed=seed),
        num_nodes=num_nodes)


def run_seed(workdir: str | os.PathLike) -> int:
    """The seed of a run's classifier (`config.json`), from which the atlas draws too."""
    return int(read_run_config(workdir, PROGRAM).get("seed", 0))


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedAtlas:
    """A run's finished atlas and what reads it (`load_atlas`): the classifier and its state,
    `atlas.json` (`summary`), the report rows, the chosen nodes' libraries, their generators
    and trained state, and a `NodeReader` of the chosen nodes with the atlas's rule."""

    workdir: Path
    classifier: AtlasClassifier
    state: TrainState
    summary: dict[str, Any]
    report: list[dict]
    libraries: list[lib.Library]
    generators: NodeGenerators
    generator_state: TrainState
    reader: NodeReader
    seed: int

    @property
    def atlas_dir(self) -> Path:
        return self.workdir / ATLAS_DIR

    @property
    def nodes(self) -> list[str]:
        return [library.node for library in self.libraries]

    def column(self, node: str) -> int:
        """The index of a chosen node (`InputDataError` for another node)."""
        if node not in self.nodes:
            raise InputDataError(f"node {node!r} is not a feature of this atlas (its features: "
                                 f"{', '.join(self.nodes)})")
        return self.nodes.index(node)


def load_atlas(workdir: str | os.PathLike) -> TrainedAtlas:
    """The finished atlas of a run: trained classifier, libraries, generators (their latest
    checkpoint) and report.

    **Raises:** `InputDataError` naming what is missing (no run, no atlas, no generators).
    """
    workdir = Path(workdir)
    classifier, state, _ = load_classifier(workdir)
    atlas_dir = workdir / ATLAS_DIR
    summary = read_atlas(atlas_dir)
    libraries = lib.read_libraries(atlas_dir / LIBRARIES_DIR)
    generator_dir = atlas_dir / GENERATORS_DIR
    try:
        values = json.loads((generator_dir / "config.json").read_text())
    except FileNotFoundError:
        raise InputDataError(f"{generator_dir}: no generators; train them with {PROGRAM} "
                             f"generators --workdir {workdir}") from None
    seed = run_seed(workdir)
    generators = node_generators(values, libraries[0].crops.shape[1], len(libraries), seed)
    generator_state = restore_trained(generator_dir, generators.init_state, which="latest")
    report_path = atlas_dir / "report.json"
    report = json.loads(report_path.read_text())["nodes"] if report_path.is_file() else []
    nodes = [library.node for library in libraries]
    thresholds = np.array([summary["thresholds"][n] for n in nodes], np.float32)
    reader = NodeReader(classifier, state, nodes, summary["options"]["rule"], thresholds)
    return TrainedAtlas(workdir=workdir, classifier=classifier, state=state, summary=summary,
                        report=report, libraries=libraries, generators=generators,
                        generator_state=generator_state, reader=reader, seed=seed)


def atlas_walk(atlas: TrainedAtlas, node: str, frames: int, *, step: float, seed: int,
               bound: float = 3.0) -> np.ndarray:
    """`[frames, latent_dim]` latents of a smooth random walk for `node` (`latent_walk`, key
    `fold_in(PRNGKey(seed), column)`), inside `± bound`."""
    column = atlas.column(node)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), column)
    return np.asarray(latent_walk(key, frames, atlas.generators.config.latent_dim, step=step,
                                  bound=bound))


def atlas_movie(atlas: TrainedAtlas, node: str, path: str | os.PathLike, *, frames: int,
                step: float, seed: int, fps: float = 12.0, bound: float = 3.0) -> Path:
    """Write the movie (GIF or MP4, by `path`'s suffix) of a random walk through `node`'s
    generator; its path."""
    walk = atlas_walk(atlas, node, frames, step=step, seed=seed, bound=bound)
    crops = atlas.generators.generate_node(atlas.generator_state, atlas.column(node),
                                           jnp.asarray(walk))
    return write_movie(np.asarray(crops), path, fps=fps)
