"""Timing helpers shared by the benchmark scripts: compile time apart, median of repeats after
warm-up."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax


@dataclass(frozen=True)
class Timing:
    compile_s: float
    median_s: float


def time_jitted(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 10) -> Timing:
    """Compiles `jax.jit(fn)` for `args` (timed separately), then times calls to the compiled
    function.

    Every call is followed by `jax.block_until_ready`, so the time covers the device work.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(compile_s=compile_s, median_s=statistics.median(times))


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Prints a plain-text table with right-aligned columns (floats with 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
