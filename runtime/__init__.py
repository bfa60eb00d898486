"""cnnc's runtime side: onnxruntime sessions, equivalence checking and latency measurement.

Installed as `cnnc.runtime` (pyproject maps it from the top-level `runtime/` folder); importing it under another
name would create a second copy of its modules, so it refuses.
"""

if __name__ != "cnnc.runtime":
    raise ImportError(f"import this package as cnnc.runtime, not {__name__} (run from an installed cnnc)")
