"""Matplotlib set-up shared by the programs' PNG figures: no display, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Write `fig` to `path` (PNG) through a temporary file, so a figure is whole or absent,
    then close it. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(temporary, dpi=dpi)
    plt.close(fig)
    os.replace(temporary, path)
    return path
