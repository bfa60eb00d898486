"""Packaging: the three packages are installed, the mapped packages refuse a second name, the registry is unique."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import cnnc
import cnnc.passes
import cnnc.runtime
from cnnc.pipeline.contract import Pass, register, registered_passes

REPO = Path(__file__).resolve().parent.parent


def test_installed_wheel_is_what_the_tests_import():
    if not os.environ.get("CNNC_REQUIRE_INSTALLED"):
        pytest.skip("CNNC_REQUIRE_INSTALLED is not set: not running against a built wheel (CI sets it)")
    for module in (cnnc, cnnc.passes, cnnc.runtime):
        assert "site-packages" in module.__file__, f"{module.__name__} imported from {module.__file__}"


@pytest.mark.parametrize("name", ["passes", "runtime"])
def test_mapped_packages_refuse_a_second_name(name):
    result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"import this package as cnnc.{name}" in result.stderr


def test_registry_refuses_a_duplicate_name():
    @dataclass(frozen=True)
    class Impostor(Pass):
        name = "fold-bn"

    with pytest.raises(RuntimeError, match="registered twice"):
        register(Impostor)
    assert registered_passes()["fold-bn"].__module__ == "cnnc.passes.fold_bn"


def test_registry_refuses_a_mutable_pass():
    @dataclass
    class Mutable(Pass):
        name = "mutable-test-pass"

    with pytest.raises(TypeError, match="frozen dataclass"):
        register(Mutable)


def test_console_script_runs():
    result = subprocess.run([str(Path(sys.executable).parent / "cnnc"), "passes"], capture_output=True, text=True)
    assert result.returncode == 0 and "fold-bn" in result.stdout
