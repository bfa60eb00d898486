"""cnnc: a model compiler for convolutional networks.

It reads a trained CNN (ONNX or PyTorch), rewrites it with exact algebraic passes, emits ONNX, proves the result
computes the same function on onnxruntime, and measures it.
"""

from pathlib import Path

# Run from a checkout: `cnnc.passes` and `cnnc.runtime` are the top-level folders passes/ and runtime/, mapped in by
# pyproject's package-dir when installed. When Python imports this package from the source tree instead (e.g.
# `python -c "import cnnc"` in the repository root shadows the installed copy), look for them beside this folder too.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "passes").is_dir() and (_CHECKOUT / "passes" / "__init__.py").is_file() \
        and (_CHECKOUT / "runtime" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (a package's __path__ may be extended: the import system reads it)

from cnnc.api import CompileResult, compile, verify  # noqa: E402
from cnnc.errors import CnncError, EquivalenceError, ModelError, UsageError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CnncError", "CompileResult", "EquivalenceError", "ModelError", "UsageError", "compile", "verify",
           "__version__"]
