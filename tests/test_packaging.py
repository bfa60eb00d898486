"""Packaging: the three packages are installed, runtime refuses a second name, a second copy of a pass module
cannot shadow a registered pass, and importing the registry loads no pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cnnc
import cnnc.passes
import cnnc.runtime

REPO = Path(__file__).resolve().parent.parent


def _python_in_checkout(code: str) -> subprocess.CompletedProcess:
    """Run `python -c code` with the repository root as the working directory (so `import cnnc` finds cnnc/ there)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)


def test_installed_wheel_is_what_the_tests_import():
    if not os.environ.get("CNNC_REQUIRE_INSTALLED"):
        pytest.skip("CNNC_REQUIRE_INSTALLED is not set: not running against a built wheel (CI sets it)")
    for module in (cnnc, cnnc.passes, cnnc.runtime):
        assert "site-packages" in module.__file__, f"{module.__name__} imported from {module.__file__}"


def test_runtime_refuses_a_second_name():
    result = _python_in_checkout("import runtime")
    assert result.returncode != 0
    assert "import this package as cnnc.runtime" in result.stderr


def test_a_second_import_under_another_name_cannot_shadow_a_pass():
    # From a checkout, `passes` is importable as a plain package too; the registry's loaders import
    # cnnc.passes.<module> by full name, so the second copy of FoldBatchNorm is never what "fold-bn" means.
    code = ("import passes.fold_bn, cnnc.passes\n"
            "cls = cnnc.passes.get_pass('fold-bn')\n"
            "assert cls is not passes.fold_bn.FoldBatchNorm, cls\n"
            "assert cls.__module__ == 'cnnc.passes.fold_bn', cls.__module__\n"
            "assert cnnc.passes.parse_pipeline('fold-bn')[0].__class__ is cls\n")
    result = _python_in_checkout(code)
    assert result.returncode == 0, result.stderr


def test_importing_the_passes_package_loads_no_pass():
    code = ("import sys, cnnc.passes\n"
            "loaded = [m for m in sys.modules if m.startswith('cnnc.passes.')]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_console_script_runs():
    result = subprocess.run([str(Path(sys.executable).parent / "cnnc"), "passes"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "fold-bn" in result.stdout


def test_python_run_from_the_repository_root_compiles():
    # From the root, `import cnnc` finds the source folder cnnc/ before the installed copy; cnnc.passes and
    # cnnc.runtime are the top-level folders there, which cnnc/__init__.py adds to the package's search path.
    code = ("import onnx, onnx.helper as oh, numpy as np, cnnc\n"
            "w = oh.make_tensor('w', onnx.TensorProto.FLOAT, [2, 3, 1, 1], np.ones(6, np.float32))\n"
            "graph = oh.make_graph([oh.make_node('Conv', ['x', 'w'], ['c']), oh.make_node('Relu', ['c'], ['y'])],\n"
            "    'g', [oh.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [1, 3, 4, 4])],\n"
            "    [oh.make_tensor_value_info('y', onnx.TensorProto.FLOAT, [1, 2, 4, 4])], [w])\n"
            "model = oh.make_model(graph, opset_imports=[oh.make_opsetid('', 17)])\n"
            "model.ir_version = 8\n"
            "result = cnnc.compile(model)\n"
            "assert result.report['equivalence']['passed']\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('cnnc.examples') is None  # only passes/ and runtime/ are mapped in\n"
            "print(cnnc.__file__, cnnc.passes.__file__)\n")
    result = _python_in_checkout(code)
    assert result.returncode == 0, result.stderr
    assert str(REPO / "cnnc" / "__init__.py") in result.stdout  # it ran the checkout's copy, not the installed one
