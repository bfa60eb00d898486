"""`triton` export: a Triton Inference Server model folder `OUT/<name>/` with `1/model.onnx` and `config.pbtxt`.

config.pbtxt (Triton's ModelConfig in protobuf text format):
- `platform: "onnxruntime_onnx"` (the onnxruntime backend runs model.onnx);
- `max_batch_size`: when every input and output has a symbolic leading dim, that dim is Triton's batch and
  max_batch_size is the largest of `batches` (its dims are then listed without the batch); otherwise 0, and the
  dims are listed whole (a symbolic dim is -1);
- `input` / `output`: ONNX names, `TYPE_*` dtypes and dims;
- `dynamic_batching { preferred_batch_size: batches }` when max_batch_size > 0;
- `instance_group [{ count: 1, kind: KIND_AUTO }]` (KIND_GPU with the TensorRT accelerator);
- with `tensorrt_fp16`: onnxruntime's TensorRT execution provider with precision_mode FP16 in
  `optimization.execution_accelerators.gpu_execution_accelerator`.

The text is parsed back into tritonclient's `model_config_pb2.ModelConfig` (`google.protobuf.text_format`): a
field or enum Triton does not know fails the export. The staged model.onnx is proven on onnxruntime's CPU provider
against the reference, then the whole model folder moves in as one unit (`staging.move_in`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
from google.protobuf import text_format  # protobuf: a dependency of onnx itself

from cnnc.errors import ModelError, UsageError
from cnnc.export.proof import require_proven
from cnnc.export.staging import move_in, staging_folder
from cnnc.io import backend
from cnnc.io.onnx_file import load_onnx
from cnnc.ir.shapes import is_fixed
from cnnc.runtime.equivalence import check_equivalence

INSTALL_HINT = "pip install 'cnnc[triton]'"
PLATFORM = "onnxruntime_onnx"
TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16", onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}


def model_config_class():
    """tritonclient's ModelConfig message, or a UsageError with the install hint."""
    try:
        from tritonclient.grpc import model_config_pb2  # optional: the triton extra (tritonclient[grpc])
    except (ImportError, RuntimeError):  # tritonclient without its grpc part raises RuntimeError
        raise UsageError(f"the triton format validates config.pbtxt with tritonclient: {INSTALL_HINT}") from None
    return model_config_pb2.ModelConfig


def model_name(name: str) -> str:
    """A Triton model name (a folder name): letters, digits, '_', '-', '.'; anything else becomes '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".")
    if not cleaned:
        raise UsageError(f"cannot make a Triton model name of {name!r}: give --triton-name")
    return cleaned


def _dims(value: onnx.ValueInfoProto) -> list:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise ModelError(f"tensor '{value.name}' has no shape: Triton's config needs its dims")
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]


def _tensor_block(value: onnx.ValueInfoProto, skip_batch: bool) -> str:
    elem = value.type.tensor_type.elem_type
    if elem not in TRITON_TYPES:
        raise ModelError(f"tensor '{value.name}' has a type Triton cannot serve ({onnx.TensorProto.DataType.Name(elem)})")
    dims = _dims(value)[1 if skip_batch else 0:]
    listed = ", ".join(str(d) if is_fixed(d) else "-1" for d in dims)
    return (f"  {{\n    name: {json.dumps(value.name)}\n    data_type: {TRITON_TYPES[elem]}\n"
            f"    dims: [ {listed} ]\n  }}")


def batch_dim_is_dynamic(model: onnx.ModelProto) -> bool:
    """Every input and output has a symbolic leading dim: Triton may batch on it."""
    values = list(model.graph.input) + list(model.graph.output)
    initializers = {init.name for init in model.graph.initializer}
    values = [v for v in values if v.name not in initializers]
    return bool(values) and all(_dims(v) and not is_fixed(_dims(v)[0]) for v in values)


def config_text(model: onnx.ModelProto, name: str, batches: list[int], tensorrt_fp16: bool = False) -> str:
    """config.pbtxt of `model` served as `name` (see the module docstring)."""
    dynamic = batch_dim_is_dynamic(model)
    max_batch = max(batches) if dynamic else 0
    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    lines = [f"name: {json.dumps(name)}", f'platform: "{PLATFORM}"', f"max_batch_size: {max_batch}",
             "input [\n" + ",\n".join(_tensor_block(v, dynamic) for v in inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor_block(v, dynamic) for v in model.graph.output) + "\n]"]
    if dynamic:
        lines.append("dynamic_batching {\n  preferred_batch_size: [ " + ", ".join(map(str, sorted(set(batches))))
                     + " ]\n}")
    lines.append("instance_group [\n  {\n    count: 1\n    kind: " + ("KIND_GPU" if tensorrt_fp16 else "KIND_AUTO")
                 + "\n  }\n]")
    if tensorrt_fp16:
        lines.append('optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n'
                     '        name: "tensorrt"\n        parameters { key: "precision_mode" value: "FP16" }\n'
                     '      }\n    ]\n  }\n}')
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """The text parsed into Triton's ModelConfig; a text Triton would refuse is a ModelError."""
    config = model_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ModelError(f"config.pbtxt does not parse as Triton's ModelConfig: {error}") from None
    return config


def export_triton(model: onnx.ModelProto, reference: onnx.ModelProto, path: Path, check: dict, options,
                  notes: list[str]) -> tuple[dict, list[Path]]:
    name = model_name(options.name or "model")
    batches = list(options.batches or [8])
    if any(b < 1 for b in batches):
        raise UsageError(f"batch sizes must be positive, got {batches}")
    text = config_text(model, name, batches, options.tensorrt_fp16)
    parse_config(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"a Triton model repository is a folder: {path} is a file")
    parent = path.parent if str(path.parent) else Path(".")
    with staging_folder(parent, notes) as staging:
        staged_model = staging / name
        (staged_model / "1").mkdir(parents=True)
        backend.save(model, staged_model / "1" / "model.onnx", options.external_data)
        (staged_model / "config.pbtxt").write_text(text, encoding="utf-8")
        proofs = {"onnxruntime CPU": check_equivalence(reference, load_onnx(staged_model / "1" / "model.onnx"),
                                                       **check)}
        require_proven("triton", proofs)
        if not path.is_dir():
            move_in(staging, path)  # a new repository: the whole staged folder (holding only <name>) is renamed
        else:
            move_in(staged_model, path / name)
    return proofs, [path / name / "config.pbtxt", path / name / "1" / "model.onnx"]
