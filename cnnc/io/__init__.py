"""Reading models in (ONNX, torch modules, state dicts), validating untrusted input, and writing models out."""
