"""The layout ARCHITECTURE.md describes, checked on the source: layers, no hidden imports, file sizes, packaging.

The checks read the checkout's files (not the installed copy): they are about how the code is organised.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("cnnc", "passes", "runtime")
MAX_LINES = 400

# Which part of cnnc may import which (ARCHITECTURE.md, "Layers"). Dependencies point from the command line and the
# API down to the core; a part not listed under another may not import it. Every part may import cnnc.errors and
# cnnc.progress, the bottom layer.
ALLOWED = {
    "cnnc.ir": set(),
    "cnnc.threads": set(),  # bottom layer beside progress; raises cnnc.errors.UsageError
    "cnnc.cost": {"cnnc.ir"},  # the cost model: core, priced on graphsurgeon nodes, micro-benchmarks on onnxruntime
    "cnnc.eval": {"cnnc.ir"},
    "cnnc.io": {"cnnc.ir"},
    "cnnc.linear": {"cnnc.ir", "cnnc.eval"},
    "cnnc.analysis": {"cnnc.ir", "cnnc.eval", "cnnc.linear"},
    "cnnc.pipeline": {"cnnc.ir", "cnnc.io"},
    "cnnc.homotopy": {"cnnc.ir", "cnnc.io", "cnnc.cost"},  # plan prices merges with the cost model
    "cnnc.zoo": {"cnnc.homotopy", "cnnc.io"},  # cnnc.zoo.exports writes ONNX files through cnnc.io
    "cnnc.runtime": {"cnnc.ir", "cnnc.io"},
    "cnnc.passes": {"cnnc.ir", "cnnc.eval", "cnnc.io", "cnnc.linear", "cnnc.analysis", "cnnc.pipeline",
                    "cnnc.runtime", "cnnc.cost"},
    "cnnc.autotune": {"cnnc.ir", "cnnc.io", "cnnc.pipeline", "cnnc.passes", "cnnc.runtime"},
    "cnnc.export": {"cnnc.ir", "cnnc.io", "cnnc.runtime"},  # deployment formats, proven on their runtimes
    "cnnc.api": {"cnnc.ir", "cnnc.io", "cnnc.pipeline", "cnnc.passes", "cnnc.runtime", "cnnc.autotune",
                 "cnnc.export"},
    "cnnc.cli": {"cnnc.api", "cnnc.ir", "cnnc.eval", "cnnc.io", "cnnc.linear", "cnnc.analysis", "cnnc.pipeline",
                 "cnnc.homotopy", "cnnc.zoo", "cnnc.passes", "cnnc.runtime", "cnnc.cost",
                 "cnnc.export"},
    "cnnc": {"cnnc.api"},  # the package itself re-exports the API
}
BOTTOM = {"cnnc.errors", "cnnc.progress", "cnnc.threads"}
# Imports that may stay inside a function: optional dependencies (extras), loaded only when their feature is asked
# for, and the pass registry's lazy loaders (xDSL's get_all_passes(): loading a pass by name is the point).
LAZY_ALLOWED = ("matplotlib", "onnxsim", "onnxslim", "torchvision", "timm", "openvino", "tritonclient",
                "tensorrt")
LAZY_LOADER_FILE = Path("passes/__init__.py")


def _sources() -> list[Path]:
    return sorted(p for folder in SOURCE_FOLDERS for p in (REPO / folder).rglob("*.py"))


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] in ("passes", "runtime"):
        parts = ["cnnc", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """The architectural part a module belongs to: `cnnc.ir.graph` -> `cnnc.ir`, `cnnc.api` -> `cnnc.api`."""
    return ".".join(module.split(".")[:2])


def _imported_modules(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == "cnnc":  # `from cnnc import ir` imports the sub-module cnnc.ir
            return [f"cnnc.{alias.name}" for alias in node.names]
        return [node.module]
    return []


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in _sources():
        source = _part(_module(path))
        for node in ast.parse(path.read_text()).body:
            for module in _imported_modules(node):
                target = _part(module)
                if module.startswith("cnnc") and target != source and target in ALLOWED | dict.fromkeys(BOTTOM):
                    edges[source].add(target)
    return edges


def test_every_part_imports_only_the_layers_below_it():
    edges = _edges()
    assert set(edges) <= set(ALLOWED), f"parts missing from ALLOWED (and ARCHITECTURE.md): {set(edges) - set(ALLOWED)}"
    wrong = {part: sorted(targets - ALLOWED[part] - BOTTOM) for part, targets in edges.items()
             if targets - ALLOWED[part] - BOTTOM}
    assert not wrong, f"imports against the layering: {wrong}"


def test_the_allowed_layers_have_no_cycle():
    state: dict[str, int] = {}

    def visit(part: str, path: list[str]) -> None:
        if state.get(part) == 1:
            raise AssertionError(f"cycle: {' -> '.join(path + [part])}")
        if state.get(part) == 2:
            return
        state[part] = 1
        for target in ALLOWED.get(part, ()):
            visit(target, path + [part])
        state[part] = 2

    for part in ALLOWED:
        visit(part, [])


def test_no_import_hides_inside_a_function():
    hidden = []
    for path in _sources():
        relative = path.relative_to(REPO)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                for module in _imported_modules(inner) if isinstance(inner, (ast.Import, ast.ImportFrom)) else ():
                    if module.split(".")[0] in LAZY_ALLOWED:
                        continue
                    if relative == LAZY_LOADER_FILE and module.startswith(("cnnc.passes.", "cnnc.pipeline.")):
                        continue
                    hidden.append(f"{relative}:{inner.lineno} imports {module} inside {node.name}()")
    assert not hidden, "\n".join(hidden)


def test_no_module_getattr_and_no_import_module_to_hide_an_import():
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        found += [f"{path.relative_to(REPO)}: module __getattr__" for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"]
        found += [f"{path.relative_to(REPO)}:{node.lineno}: importlib.import_module" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr == "import_module"
                  and path.relative_to(REPO) != Path("cnnc/cli/compile.py")]  # the user's own --module factory
    assert not found, found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_source_file_is_over_the_size_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines; split it by concern"


def test_every_package_folder_is_in_the_wheel():
    configured = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {_module(init) for folder in SOURCE_FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert on_disk == configured, f"only on disk: {on_disk - configured}; only in pyproject: {configured - on_disk}"
