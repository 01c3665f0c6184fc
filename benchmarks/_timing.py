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
    flops: float | None = None  # XLA's flop count of one call (`compiled_flops`), if known


def time_jitted(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 10) -> Timing:
    """Compiles `jax.jit(fn)` for `args` (timed separately), then times calls to the compiled
    function.

    Every call is followed by `jax.block_until_ready`, so the time covers the device work.
    `flops` is XLA's count for one call of the compiled function (`compiled_flops`).
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
    return Timing(compile_s=compile_s, median_s=statistics.median(times),
                  flops=compiled_flops(compiled))


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


# ----------------------------------------------------------------------------
# Achieved FLOP/s and MFU
# ----------------------------------------------------------------------------

_PEAK: dict[str, float] = {}


def compiled_flops(compiled: Any) -> float | None:
    """XLA's flop count of a compiled computation (`compiled.cost_analysis()['flops']`).

    `cost_analysis()` returns a dict in recent jax versions and a list of one dict per
    computation in older ones; None when the backend gives no estimate.
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def matmul_peak_flops(n: int | None = None, repeats: int = 10) -> float:
    """The default device's measured float32 matmul rate in FLOP/s: the best of `repeats` runs
    of a jitted `n x n @ n x n` product (2 n^3 FLOP), `n` = 2048 on CPU and 4096 on
    accelerators. Measured once per process (per device kind and `n`) and cached: the
    denominator of every benchmark's MFU column."""
    device = jax.devices()[0]
    n = n or (2048 if device.platform == "cpu" else 4096)
    key = f"{device.platform}:{device.device_kind}:{n}"
    if key not in _PEAK:
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
        matmul = jax.jit(jnp.matmul).lower(a, b).compile()
        jax.block_until_ready(matmul(a, b))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a, b))
            best = min(best, time.perf_counter() - start)
        _PEAK[key] = 2.0 * n**3 / best
    return _PEAK[key]


def achieved(flops: float | None, seconds: float) -> tuple[float | str, float | str]:
    """`(GFLOP/s, MFU)` of a call of `flops` FLOP taking `seconds`; MFU is the fraction of
    `matmul_peak_flops()`. Empty strings (table cells) when the flop count is unknown."""
    if flops is None or not seconds > 0:
        return "", ""
    rate = flops / seconds
    return rate / 1e9, rate / matmul_peak_flops()


def peak_line() -> str:
    """One line naming the measured matmul peak, to print under a table with an MFU column."""
    return (f"MFU = achieved FLOP/s (XLA cost analysis of the compiled call / time) over the "
            f"measured float32 matmul peak of {jax.devices()[0].platform}: "
            f"{matmul_peak_flops() / 1e9:.1f} GFLOP/s")
