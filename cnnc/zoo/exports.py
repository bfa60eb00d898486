"""Zoo models as ONNX files, exported the way a user would export them, and cached on disk.

`export_zoo_model(name, exporter, size, dtype)` builds `cnnc.zoo.vision.build_zoo_model(name, size)` and exports it
with one of torch's exporters, with the exporter's own defaults otherwise (constant folding on), as a new user would:

- `torchscript17` / `torchscript13`: `torch.onnx.export(..., dynamo=False, opset_version=17 / 13)`;
- `dynamo`: `torch.onnx.export(..., dynamo=True)` at the exporter's default opset (needs onnxscript, in the zoo
  extra), with `dynamic_shapes` for the batch.

The batch dimension of the input `input` and the output `logits` is symbolic ("batch"); the example used for
tracing has batch 2, because torch.export specialises a dimension whose example size is 1. The file is stamped with
an IR version the installed onnxruntime accepts (`cnnc.io.target.runnable`: onnx 1.23 writes IR 14, onnxruntime 1.31
reads ≤ 13).

fp16: the torch module itself is converted to half precision (`module.half()`, weights and input) after its BN
statistics were calibrated in fp32, and then exported by the same exporter. This is how fp16 models usually reach
ONNX, and it runs on onnxruntime's CPU provider (a converted fp32 export would depend on the converter's choices
instead). The variant is recorded in the model's metadata (`cnnc.zoo`).

Cache: one file per (name, reparameterised or not, size, exporter, dtype, seed, calibration rule
(`cnnc.zoo.vision.CALIBRATION`: files of an older rule hold other weights and are never reused), torch version, and a
short digest of everything else the weights depend on: the rule's constants, the model's constructor options, the
torchvision and timm versions, whose default initialisations draw the weights, and the onnx and onnxscript versions,
on which the dynamo exporter's output depends) in
`directory`, by default `$CNNC_CACHE_DIR/zoo` or else `~/.cache/cnnc/zoo`; written atomically
(`cnnc.io.backend.save`), so an interrupted export never leaves a truncated file behind that a later run would trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from importlib import metadata
from pathlib import Path

import onnx
import torch
from torch import nn

from cnnc.errors import UsageError
from cnnc.io import backend
from cnnc.io.target import runnable
from cnnc.threads import compile_threads
from cnnc.zoo.branch_damping import BRANCH_RATIO
from cnnc.zoo.vision import CALIBRATION, CALIBRATION_BATCH, ZOO, build_zoo_model, example_input, timm_reparameterized

EXPORTERS = ("torchscript17", "torchscript13", "dynamo")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
CACHE_ENV = "CNNC_CACHE_DIR"
TRACE_BATCH = 2  # torch.export specialises a dimension whose example size is 1: trace at 2 to keep it dynamic
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def cache_directory() -> Path:
    """Where exports are cached: `$CNNC_CACHE_DIR/zoo`, else `~/.cache/cnnc/zoo`."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "cnnc") / "zoo"


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def build_inputs(name: str) -> dict:
    """What a zoo model's weights depend on beyond the file name's parameters (recorded in its metadata)."""
    model = ZOO.get(name)
    return {"calibration": CALIBRATION, "branch_ratio": BRANCH_RATIO, "calibration_batch": CALIBRATION_BATCH,
            "options": model.options if model else None,
            "torchvision": _installed("torchvision"), "timm": _installed("timm"),
            "onnx": _installed("onnx"), "onnxscript": _installed("onnxscript")}  # the dynamo exporter's output


def export_file_name(name: str, exporter: str, size: int, dtype: str, seed: int = 0,
                     reparameterized: bool = False) -> str:
    """The cache file name: every parameter the file depends on, the torch version included, and a digest of
    `build_inputs` (so a changed rule constant or library version never returns a stale export)."""
    variant = "-reparameterized" if reparameterized else ""
    version = torch.__version__.replace("+", "_")
    digest = hashlib.sha256(json.dumps(build_inputs(name), sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}{variant}-{size}px-{exporter}-{dtype}-seed{seed}-{CALIBRATION}-{digest}-torch{version}.onnx"


def _check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise UsageError(f"unknown {kind} '{value}'; choose one of {', '.join(choices)}")


def export_module(module: nn.Module, example: torch.Tensor, exporter: str) -> onnx.ModelProto:
    """`module` (eval mode) exported by `exporter` at `example`, batch axis symbolic, IR version runnable."""
    _check_choice("exporter", exporter, EXPORTERS)
    with warnings.catch_warnings(), torch.no_grad(), compile_threads():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer warnings
        if exporter == "dynamo":
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            model = program.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=int(exporter[-2:]),
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            model = onnx.load_model_from_string(buffer.getvalue())
    return runnable(model)


def export_zoo_model(name: str, exporter: str = "torchscript17", size: int = 64, dtype: str = "fp32",
                     directory: str | Path | None = None, *, reparameterized: bool = False, seed: int = 0,
                     force: bool = False) -> Path:
    """The path of zoo model `name` exported by `exporter` at `size` px in `dtype` ("fp32" or "fp16"); built and
    exported on the first call, read from the cache afterwards (`force` re-exports). `reparameterized` exports timm's
    reparameterised form (`timm_reparameterized`) of a RepVGG / MobileOne model instead of its train-time form."""
    _check_choice("exporter", exporter, EXPORTERS)
    _check_choice("dtype", dtype, DTYPES)
    folder = Path(directory) if directory is not None else cache_directory()
    path = folder / export_file_name(name, exporter, size, dtype, seed, reparameterized)
    if path.is_file() and not force:
        return path
    module = timm_reparameterized(name, size, seed) if reparameterized else build_zoo_model(name, size, seed)
    example = example_input(size, TRACE_BATCH, seed)
    if dtype == "fp16":
        module = module.half()
        example = example.half()
    model = export_module(module, example, exporter)
    record = {"name": name, "reparameterized": reparameterized, "size": size, "exporter": exporter, "dtype": dtype,
              "seed": seed, **build_inputs(name), "torch": torch.__version__,
              "fp16": "torch module.half() exported" if dtype == "fp16" else None}
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        "cnnc.zoo": json.dumps(record, sort_keys=True)})
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(model, path)
    return path
