"""Imports run one way: layers ← models ← systems ← programs, nothing pointing back.

Read from the source (the `import` statements of every module), so a lazy import inside a
function counts too.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYSTEMS = {"mapping_gan", "wsol", "segmentation", "pathology", "atlas"}
# What each library package of jaxmed may import from jaxmed besides itself.
ALLOWED = {
    "layers": set(),
    "models": {"layers"},
    "losses": set(),
    "metrics": {"explain", "errors"},
    "explain": {"layers"},
    "data": {"errors"},
    "training": {"errors"},
    "plotting": set(),
    "errors": set(),
    "weights": {"errors"},
}


def _jaxmed_imports(path: pathlib.Path) -> set[str]:
    """The top-level `jaxmed` sub-packages (or `train`) that a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "train":
                found.add("train")
            elif parts[0] == "jaxmed" and len(parts) > 1:
                found.add(parts[1])
    return found


def _package(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT / "jaxmed").with_suffix("").parts
    return parts[0]


MODULES = sorted(p for p in (ROOT / "jaxmed").rglob("*.py") if p.name != "__init__.py"
                 or p.parent != ROOT / "jaxmed")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_only(path):
    package = _package(path)
    imported = _jaxmed_imports(path) - {package}
    assert "train" not in imported, "the library must not import the programs"
    if package in SYSTEMS:
        others = imported & (SYSTEMS - {package})
        assert not others, f"a system imports another system: {sorted(others)}"
    else:
        allowed = ALLOWED[package]
        assert imported <= allowed, f"{package} may import {sorted(allowed)}, imports " \
                                    f"{sorted(imported - allowed)}"


def test_every_library_package_has_a_rule():
    packages = {_package(p) for p in MODULES} - SYSTEMS
    assert packages <= set(ALLOWED), sorted(packages - set(ALLOWED))
    assert SYSTEMS <= {_package(p) for p in MODULES}
