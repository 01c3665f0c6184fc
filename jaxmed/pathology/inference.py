"""A trained whole-slide run: its networks, featurizer and slide classifier restored from the
work directory, slide metrics, and the classification of new slides (docs/pathology.md)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxmed.errors import InputDataError
from jaxmed.pathology.config import PROGRAM, WsiConfig
from jaxmed.pathology.data import stain_normalizer
from jaxmed.pathology.extract import extract_slides, read_features
from jaxmed.pathology.figures import attention_thumbnail
from jaxmed.pathology.fusion import attention_weights
from jaxmed.pathology.steps import (
    NETWORKS,
    SlideClassifier,
    WsiFeaturizer,
    build_classifier,
    build_network,
    slide_vector,
)
from jaxmed.training import TrainState, read_run_config, restore_trained

FEATURES_DIR = "features"
CLASSIFIER_DIR = "classifier"


def host_copy(tree: Any) -> Any:
    """`tree` with every array as a NumPy array on this host (a replicated global array's
    local shard), for use on this host's devices alone."""
    def local(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(local, tree)


class TrainedWsi(NamedTuple):
    """What `load_wsi` returns."""

    config: WsiConfig
    values: dict[str, Any]
    featurizer: WsiFeaturizer
    classifier: SlideClassifier | None
    classifier_state: TrainState | None


def load_featurizer(workdir: str | os.PathLike, values: Mapping[str, Any]) -> WsiFeaturizer:
    """The featurizer of a run: both networks restored from `workdir/low` and `workdir/high`
    (latest checkpoints) and the run's stain target."""
    config = WsiConfig.from_dict(dict(values))
    networks = {which: build_network(values, which) for which in NETWORKS}
    states = {which: restore_trained(Path(workdir) / which, networks[which].init_state,
                                     which="latest") for which in NETWORKS}
    return WsiFeaturizer(config, networks, states, stain_normalizer(config, workdir))


def load_wsi(workdir: str | os.PathLike, *, classifier: bool = True) -> TrainedWsi:
    """A trained run: configuration, featurizer and (if trained) the slide classifier."""
    values = read_run_config(workdir, PROGRAM)
    config = WsiConfig.from_dict(values)
    featurizer = load_featurizer(workdir, values)
    model = state = None
    if classifier:
        model = build_classifier(values)
        state = restore_trained(Path(workdir) / CLASSIFIER_DIR, model.init_state,
                                which="latest")
    return TrainedWsi(config, values, featurizer, model, state)


def slide_features(directory: str | os.PathLike, paths: Sequence[Path]
                   ) -> dict[Path, dict[str, np.ndarray]]:
    """The extracted arrays of each slide (`extract.read_features` of `<stem>.h5`); slides
    whose extraction failed are left out."""
    found = {}
    for path in paths:
        h5 = Path(directory) / f"{Path(path).stem}.h5"
        if h5.is_file():
            found[Path(path)] = read_features(h5)
    return found


def slide_metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
                  ) -> dict[str, float]:
    """Slide accuracy (%), accuracy per class (%) and the macro one-vs-rest ROC AUC (the mean
    over classes present with both positives and negatives; ties count one half)."""
    predicted = np.argmax(probabilities, axis=1)
    metrics = {"slide_accuracy": 100.0 * float(np.mean(predicted == labels))}
    aucs = []
    for k, name in enumerate(class_names):
        mine = labels == k
        if mine.any():
            metrics[f"accuracy_{name}"] = 100.0 * float(np.mean(predicted[mine] == k))
        if mine.any() and (~mine).any():
            positive, negative = probabilities[mine, k], probabilities[~mine, k]
            wins = (positive[:, None] > negative[None]).mean()
            ties = (positive[:, None] == negative[None]).mean()
            aucs.append(float(wins + 0.5 * ties))
    if aucs:
        metrics["macro_auc"] = float(np.mean(aucs))
    return metrics


def low_weights(features: Mapping[str, np.ndarray], config: WsiConfig) -> np.ndarray:
    """The normalised low-resolution attention weights `ŵ_L` of a slide's tiles."""
    return np.asarray(attention_weights(features["low_scores"], weighting=config.weighting,
                                        temperature=config.temperature))


def write_predictions(path: Path, names: Sequence[str], probabilities: np.ndarray,
                      class_names: Sequence[str], labels: Sequence[str] | None = None) -> Path:
    """`predictions.csv`: slide, predicted class, (true class), one probability per class."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "predicted"] + (["label"] if labels is not None else [])
                        + [f"p_{c}" for c in class_names])
        for i, name in enumerate(names):
            row = [name, class_names[int(np.argmax(probabilities[i]))]]
            row += [labels[i]] if labels is not None else []
            writer.writerow(row + [f"{p:.4f}" for p in probabilities[i]])
    os.replace(temporary, path)
    return path


def draw_attention(slide_path: Path, features: Mapping[str, np.ndarray], config: WsiConfig,
                   path: Path, title: str) -> Path:
    """The attention thumbnail of one slide from its extracted arrays."""
    from jaxmed.data.slide import open_slide

    with open_slide(slide_path) as slide:
        return attention_thumbnail(path, slide, features["coords"], config.tile_size,
                                   low_weights(features, config), title=title)


def classify_slides(workdir: str | os.PathLike, inputs: Sequence[str],
                    output: str | os.PathLike, *, batch_size: int = 16, readers: int = 4,
                    progress: bool = True) -> tuple[list[Path], int]:
    """Classify slides with a trained run: features extracted into `output/features`, then
    `output/predictions.csv` (class and probabilities per slide) and
    `output/<stem>_attention.png` for each slide.

    **Returns:** `(written paths, number of slides that failed)`.
    """
    run = load_wsi(workdir)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p).resolve() for p in inputs]
    report = extract_slides(paths, out / FEATURES_DIR, run.featurizer, batch_size=batch_size,
                            readers=readers, progress=progress)
    found = slide_features(out / FEATURES_DIR, paths)
    if not found:
        raise InputDataError(f"no slide could be read ({report.failed} failed; see "
                             f"{out / FEATURES_DIR / 'index.csv'})")
    names = run.values["class_names"]
    vectors = np.stack([slide_vector(found[p], run.config) for p in found])
    probabilities = np.asarray(run.classifier.probabilities(run.classifier_state, vectors))
    written = [write_predictions(out / "predictions.csv", [p.name for p in found],
                                 probabilities, names)]
    for i, (path, features) in enumerate(found.items()):
        k = int(np.argmax(probabilities[i]))
        written.append(draw_attention(path, features, run.config,
                                      out / f"{path.stem}_attention.png",
                                      f"{path.name}: {names[k]} ({probabilities[i, k]:.2f})"))
    return written, report.failed


def write_results(workdir: str | os.PathLike, metrics: Mapping[str, float]) -> Path:
    """`workdir/results.json`: the held-out slide metrics of the run."""
    path = Path(workdir) / "results.json"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(dict(metrics), indent=2))
    os.replace(temporary, path)
    return path
