"""Deployment formats: export a (compiled) ONNX model where it will run, and prove it there.

    export_model(model, "openvino", "out/model.xml")        # -> ExportResult(format, written, report)

Formats (`FORMATS`): onnx, onnx-fp16 (onnxruntime), openvino (OpenVINO CPU), triton (a model repository served by
Triton's onnxruntime backend), tensorrt (a serialized engine; needs a CUDA device). Each exporter builds the
artefact, runs it on its own runtime against `reference` (default: the model itself; `CompileResult.export`
passes the original the compile started from) on the same seeded inputs and per-dtype tolerances as `cnnc
compile` (`cnnc.runtime.equivalence`), and writes only a proven artefact, atomically (`staging`). A mismatch is
EquivalenceError (exit 1), a missing optional runtime a UsageError with its install hint (exit 2).

To add a format: one module with `export_<format>(model, reference, path, check, options, notes) -> (proofs,
written)` that calls `proof.require_proven` before writing, and an entry in `EXPORTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from cnnc.errors import UsageError
from cnnc.export.onnx_formats import export_onnx, export_onnx_fp16
from cnnc.export.openvino_ir import export_openvino
from cnnc.export.proof import proofs_as_dict
from cnnc.export.tensorrt_engine import export_tensorrt
from cnnc.export.triton import export_triton
from cnnc.io.frontend import load_model
from cnnc.io.target import runnable

EXPORTERS: dict[str, Callable] = {"onnx": export_onnx, "onnx-fp16": export_onnx_fp16, "openvino": export_openvino,
                                  "triton": export_triton, "tensorrt": export_tensorrt}
FORMATS = tuple(EXPORTERS)
INSTALL_HINTS = {"openvino": "pip install 'cnnc[openvino]'", "triton": "pip install 'cnnc[triton]'",
                 "tensorrt": "pip install 'cnnc[tensorrt]'"}


@dataclass(frozen=True)
class ExportOptions:
    """Format options: `external_data` (onnx, onnx-fp16, triton's model.onnx; None: above 2 GB), `keep_io_types`
    (onnx-fp16), `name` (triton's model name; default: the model file's stem), `batches` (triton's preferred batch
    sizes and max_batch_size; tensorrt's optimisation profile), `tensorrt_fp16` (triton's TensorRT accelerator in
    FP16; the tensorrt engine's FP16 flag)."""

    external_data: bool | None = None
    keep_io_types: bool = True
    name: str | None = None
    batches: tuple[int, ...] = ()
    tensorrt_fp16: bool = False


@dataclass
class ExportResult:
    format: str
    written: list[Path]
    report: dict = field(default_factory=dict)


def export_model(model, format: str, path: str | Path, options: ExportOptions | None = None,
                 reference=None, check: dict | None = None) -> ExportResult:
    """Export `model` (ONNX path or ModelProto) as `format` to `path`, proven against `reference` (default: the
    model) with `check` (check_equivalence's n, seed, rtol, atol, input_shapes, user_inputs)."""
    if format not in EXPORTERS:
        raise UsageError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    options = options or ExportOptions()
    path = Path(path)
    if format == "triton" and options.name is None:
        stem = Path(model).name.split(".")[0] if isinstance(model, (str, Path)) else model.graph.name
        options = ExportOptions(options.external_data, options.keep_io_types, stem or "model", options.batches,
                                options.tensorrt_fp16)
    loaded = runnable(load_model(model) if not isinstance(model, onnx.ModelProto) else model)
    reference = loaded if reference is None else runnable(load_model(reference) if not isinstance(
        reference, onnx.ModelProto) else reference)
    notes: list[str] = []
    proofs, written = EXPORTERS[format](loaded, reference, path, dict(check or {}), options, notes)
    report = {"format": format, "written": [str(p) for p in written], "proofs": proofs_as_dict(proofs),
              "notes": notes}
    return ExportResult(format, written, report)
