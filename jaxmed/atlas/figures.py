"""The atlas's PNG sheet per feature node: its best real crops, the same crops with their heat
map overlaid, and generated crops, titled with the node's library and check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxmed.atlas.library import Library, overlay
from jaxmed.plotting import plt, save_figure

COLUMNS = 8


def node_sheet(library: Library, generated: np.ndarray, row: dict, path: str | os.PathLike,
               columns: int = COLUMNS) -> Path:
    """Three rows of `columns` crops: the library's best crops (by score), their heat
    overlays, and generated crops (uint8 `[K, s, s, 3]`); the title says the library size,
    purity and feature when known, and the activation rates of the check (`row`, one row of
    `jaxmed.atlas.inference.write_report`)."""
    order = np.argsort(-np.asarray(library.score), kind="stable")[:columns]
    panels = [[library.crops[i] for i in order],
              [overlay(library.crops[i], library.heat[i]) for i in order],
              list(generated[:columns])]
    names = ("library crops", "heat", "generated")
    fig, axes = plt.subplots(3, columns, figsize=(1.2 * columns, 4.2), squeeze=False)
    for r, (name, pictures) in enumerate(zip(names, panels)):
        for c in range(columns):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(pictures):
                ax.imshow(pictures[c], interpolation="nearest")
        axes[r, 0].set_title(name, fontsize=7, loc="left")
    purity = (f", purity {100 * row['purity']:.0f} % ({row['feature']})"
              if "purity" in row else "")
    fig.suptitle(f"node {library.node}: {len(library)} crops{purity}\nactivates the node: "
                 f"generated {100 * row['generated_rate']:.0f} %, real "
                 f"{100 * row['real_rate']:.0f} %, random {100 * row['random_rate']:.0f} %",
                 fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
