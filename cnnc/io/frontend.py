"""Frontends: an ONNX file, a PyTorch module, or a `.pt`/`.pth` state dict, into an ONNX ModelProto.

Untrusted files are the normal case. An ONNX file is parsed without following its external-data references, checked
(`cnnc.io.validate`), and only then are its external tensors read, through the checks of `cnnc.io.external_data`.
A `.pt` file is only ever read with `torch.load(weights_only=True)`, never retried otherwise.
"""

from __future__ import annotations

import io
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from cnnc.errors import ModelError, UsageError
from cnnc.io.external_data import has_external_data, load_external_data
from cnnc.io.validate import check_divisors, check_with_onnx, validate_model

# Opset that the torch exporter is asked for: new enough for every op cnnc rewrites, old enough for any onnxruntime.
TORCH_EXPORT_OPSET = 17


def _sniff(data: bytes, path: Path) -> None:
    if not data:
        raise ModelError(f"{path} is empty")
    if data[:1] == b"\x80" and len(data) > 1 and data[1] <= 5:
        raise ModelError(f"{path} is a Python pickle, not an ONNX model; cnnc never unpickles .onnx files")
    if data[:4] == b"PK\x03\x04":
        raise ModelError(f"{path} is a zip archive (a torch.save file?), not an ONNX model")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read, validate and return the ONNX model at `path` with its external data inlined."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist")
    if not path.is_file():
        raise ModelError(f"{path} is not a file")
    data = path.read_bytes()
    _sniff(data, path)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as error:
        raise ModelError(f"{path} is not a valid ONNX model (protobuf parse failed: {error})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelError(f"{path} is not a valid ONNX model (no graph or no IR version)")
    validate_model(model, onnx_checker=False)
    load_external_data(model, path.parent)
    check_divisors(model)  # needs the weights, external ones included
    check_with_onnx(model)  # only now: the checker would open external-data files itself, unchecked
    return model


def from_torch(module: Any, example_input: Any, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Export a torch `nn.Module` at `example_input` (a tensor or a tuple of tensors) with the TorchScript exporter.

    The batch dimension of every input and output stays symbolic unless `dynamic_batch` is False. The exporter's
    own constant folding is off, so that what cnnc rewrites (BN folding and the rest) shows in its report.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if example_input is None:
        raise UsageError("compiling a torch module needs example_input")
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    was_training = module.training
    module.eval()
    try:
        return _export_eval_module(torch, module, args, dynamic_batch)
    finally:
        module.train(was_training)  # the caller's module keeps its mode (compile may run mid-training)


def _export_eval_module(torch, module, args: tuple, dynamic_batch: bool) -> onnx.ModelProto:
    try:
        with torch.no_grad():
            outputs = module(*args)
    except Exception as error:  # a wrong example shape (or a broken module) raises whatever torch raises
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


def _torch_load_reason(error: Exception) -> str:
    """The informative part of a torch.load error, on one line without terminal colour codes.

    torch's weights_only refusal opens with advice to retry with weights_only=False (which cnnc never does) and
    names the offending class only in its `WeightsUnpickler error:` line.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    return lines[0] if lines else type(error).__name__


def load_state_dict(path: str | Path) -> dict:
    """Load a `.pt`/`.pth` state dict with `weights_only=True`. Pickled modules and TorchScript are refused."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist or is not a file")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path} is empty")
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist()):
                raise ModelError(f"{path} is a TorchScript archive; cnnc does not execute TorchScript files")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError...: all mean "not a safe state dict"
        raise ModelError(f"{path} cannot be read with weights_only=True: {_torch_load_reason(error)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return state


def apply_state_dict(module: Any, path: str | Path) -> None:
    """Load the state dict at `path` (weights_only) into the torch module `module`; mismatches are ModelErrors."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"state_dict= needs a torch.nn.Module to load into, got {type(module).__name__}")
    state = load_state_dict(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:  # missing or unexpected keys, shape mismatches: torch lists them over lines
        details = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ModelError(f"{path} does not fit the module: {details}") from None


def load_model(source: Any, example_input: Any = None) -> onnx.ModelProto:
    """Any supported source (ModelProto, ONNX path, torch module) into a validated ModelProto."""
    if isinstance(source, onnx.ModelProto):
        if has_external_data(source):
            # Its locations would be resolved against the current folder, not the model's: only a path can be
            # checked (cnnc.io.external_data) and read safely.
            raise ModelError("this ModelProto references external data; pass the model's file path instead")
        validate_model(source)
        return source
    if isinstance(source, (str, Path)):
        suffix = Path(source).suffix.lower()
        if suffix in (".pt", ".pth"):
            raise UsageError(f"{source} is a PyTorch file: pass the module and load it with state_dict=")
        return load_onnx(source)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(source, torch.nn.Module):
        return from_torch(source, example_input)
    raise UsageError(f"cannot compile a {type(source).__name__}: give an ONNX path, a ModelProto or an nn.Module")
