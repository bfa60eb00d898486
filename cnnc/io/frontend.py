"""Frontends: any source cnnc compiles (an ONNX path, a ModelProto, a torch module, optionally with a `.pt` state
dict) into a validated ONNX ModelProto.

One module per kind of source: `cnnc.io.onnx_file` (files and protos; never imports torch, never runs onnxruntime),
`cnnc.io.torch_module` (the exporter) and `cnnc.io.state_dict` (weights_only loading). `load_model` picks one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch

from cnnc.errors import UsageError
from cnnc.io.onnx_file import load_onnx, load_proto
from cnnc.io.state_dict import apply_state_dict
from cnnc.io.torch_module import from_torch

__all__ = ["from_torch", "load_model", "load_onnx"]


def load_model(source: Any, example_input: Any = None, state_dict: str | Path | None = None) -> onnx.ModelProto:
    """Any supported source (ModelProto, ONNX path, torch module) into a validated ModelProto.

    `state_dict`: a `.pt`/`.pth` file loaded (weights_only) into the torch module `source` before it is exported.
    """
    if state_dict is not None:
        apply_state_dict(source, state_dict)
    if isinstance(source, onnx.ModelProto):
        return load_proto(source)
    if isinstance(source, (str, Path)):
        suffix = Path(source).suffix.lower()
        if suffix in (".pt", ".pth"):
            raise UsageError(f"{source} is a PyTorch file: pass the module and load it with state_dict=")
        return load_onnx(source)
    if isinstance(source, torch.nn.Module):
        return from_torch(source, example_input)
    raise UsageError(f"cannot compile a {type(source).__name__}: give an ONNX path, a ModelProto or an nn.Module")
