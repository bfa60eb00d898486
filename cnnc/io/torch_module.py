"""A PyTorch `nn.Module` into a validated ONNX ModelProto, with torch's TorchScript exporter.

The module is exported in eval mode (and handed back in the mode it came in); the exporter's constant folding is
off, so that what cnnc rewrites (BN folding and the rest) shows in its report.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import onnx
import torch

from cnnc.errors import ModelError, UsageError
from cnnc.io.validate import validate_model

# Opset that the torch exporter is asked for: new enough for every op cnnc rewrites, old enough for any onnxruntime.
TORCH_EXPORT_OPSET = 17


def from_torch(module: Any, example_input: Any, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Export a torch `nn.Module` at `example_input` (a tensor or a tuple of tensors) with the TorchScript exporter.

    The batch dimension of every input and output stays symbolic unless `dynamic_batch` is False.
    """
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if example_input is None:
        raise UsageError("compiling a torch module needs example_input")
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    was_training = module.training
    module.eval()
    try:
        return _export_eval_module(module, args, dynamic_batch)
    finally:
        module.train(was_training)  # the caller's module keeps its mode (compile may run mid-training)


def _export_eval_module(module: torch.nn.Module, args: tuple, dynamic_batch: bool) -> onnx.ModelProto:
    try:
        with torch.no_grad():
            outputs = module(*args)
    except Exception as error:  # noqa: BLE001 - a wrong example shape (or a broken module) raises whatever torch raises
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"the torch module fails on its example input: {message}") from None
    n_outputs = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    input_names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    buffer = io.BytesIO()
    try:
        # The TorchScript exporter: the torch.export-based one needs onnxscript, which cnnc does not depend on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buffer, dynamo=False, opset_version=TORCH_EXPORT_OPSET,
                              do_constant_folding=False, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes)
    except Exception as error:  # the exporter raises many unrelated types
        raise ModelError(f"torch.onnx.export failed: {error}") from error
    model = onnx.load_model_from_string(buffer.getvalue())
    validate_model(model)
    return model
