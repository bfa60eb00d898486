"""ONNX files and in-memory ModelProtos into validated models, without running anything.

Untrusted files are the normal case. An ONNX file is parsed without following its external-data references, checked
(`cnnc.io.validate`), and only then are its external tensors read, through the checks of `cnnc.io.external_data`.
Loading opens no onnxruntime session: the versions onnxruntime accepts come from `cnnc.io.target`'s table.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from cnnc.errors import ModelError
from cnnc.io.external_data import has_external_data, load_external_data
from cnnc.io.validate import check_divisors, check_with_onnx, validate_model


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
    check_with_onnx(model, f"input model {path}")  # only now: the checker would open external-data files itself, unchecked
    return model


def load_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    """Validate an in-memory ModelProto and return it (not copied)."""
    if has_external_data(model):
        # Its locations would be resolved against the current folder, not the model's: only a path can be
        # checked (cnnc.io.external_data) and read safely.
        raise ModelError("this ModelProto references external data; pass the model's file path instead")
    validate_model(model)
    return model
