"""Peak memory of this process, for the benchmarks and the memory tests (imports no JAX, so
it does not add to what it measures)."""

import resource
import sys


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started this program: Linux's `VmHWM`,
    which `exec` resets (`ru_maxrss` keeps the forking parent's peak, e.g. a large pytest
    worker's, across `exec`); `ru_maxrss` elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
