"""cnnc: a model compiler for convolutional networks.

It reads a trained CNN (ONNX or PyTorch), rewrites it with exact algebraic passes, emits ONNX, proves the result
computes the same function on onnxruntime, and measures it.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path


class _CheckoutPackages(importlib.abc.MetaPathFinder):
    """Run from a checkout: `cnnc.passes` and `cnnc.runtime` are the top-level folders passes/ and runtime/, which
    pyproject's package-dir maps in when cnnc is installed. When Python imports this package from the source tree
    instead (`python -c "import cnnc"` in the repository root shadows the installed copy), this finder maps exactly
    those two packages to their folders, as setuptools' editable finder does; nothing else of the checkout becomes
    part of `cnnc`."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "passes").is_dir() and (_CHECKOUT / "pyproject.toml").is_file() \
        and all((_CHECKOUT / name / "__init__.py").is_file() for name in ("passes", "runtime")):
    sys.meta_path.insert(0, _CheckoutPackages({f"cnnc.{name}": _CHECKOUT / name for name in ("passes", "runtime")}))

from cnnc.api import CompileResult, compile, verify
from cnnc.errors import CnncError, EquivalenceError, ModelError, UsageError

__version__ = "0.1.0"
__all__ = [
    "CnncError",
    "CompileResult",
    "EquivalenceError",
    "ModelError",
    "UsageError",
    "__version__",
    "compile",
    "verify",
]
