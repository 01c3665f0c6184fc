"""Every benchmark script starts: it imports what it measures and builds its options.

Benchmarks are not run in CI (they take minutes to hours), so this is what notices when a
change to the library breaks one of them.
"""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("[!_]*.py"))


def test_the_readme_table_lists_exactly_the_benchmark_scripts():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    listed = sorted(re.findall(r"^\| `benchmarks/([\w.]+)` \|", table, flags=re.M))
    assert listed == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
