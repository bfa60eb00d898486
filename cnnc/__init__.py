"""cnnc: a model compiler for convolutional networks.

It reads a trained CNN (ONNX or PyTorch), rewrites it with exact algebraic passes, emits ONNX, proves the result
computes the same function on onnxruntime, and measures it.
"""

from cnnc.errors import CnncError, EquivalenceError, ModelError, UsageError

__version__ = "0.1.0"
__all__ = ["CnncError", "CompileResult", "EquivalenceError", "ModelError", "UsageError", "compile", "verify",
           "__version__"]


def __getattr__(name):
    # The API imports the passes and the runtime, which import the core; loading it lazily keeps `import cnnc.ir`
    # (done by every pass) free of that cycle.
    if name in ("compile", "verify", "CompileResult"):
        from cnnc import api

        return getattr(api, name)
    raise AttributeError(f"module 'cnnc' has no attribute {name!r}")
