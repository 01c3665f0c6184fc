"""Every benchmark script starts: it imports what it measures and builds its options.

Benchmarks are not run in CI (they take minutes to hours), so this is what notices when a
change to the library breaks one of them.
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("[!_]*.py"))


def test_every_benchmark_is_listed():
    assert len(SCRIPTS) >= 7, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
