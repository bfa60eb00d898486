"""Exported artefacts that `cnnc bench` times beside ONNX files: which runtime runs a path, and its model file.

- `*.xml`: an OpenVINO IR (its `.bin` beside it), timed on OpenVINO's CPU plugin (`cnnc.runtime.openvino_cpu`);
- a folder holding `config.pbtxt` (one Triton model) or a repository whose one sub-folder does: the model file of
  its newest numeric version, `<version>/model.onnx`, timed on onnxruntime (what Triton's onnxruntime backend runs);
- anything else: an ONNX file or ModelProto (`cnnc.runtime.session.runnable_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from cnnc.errors import ModelError
from cnnc.runtime.session import runnable_model

TRITON_CONFIG = "config.pbtxt"


@dataclass(frozen=True)
class OpenVinoIR:
    """An OpenVINO IR on disk (`path` is the `.xml`)."""

    path: Path


def triton_model_file(folder: Path) -> Path:
    """`<model>/<newest version>/model.onnx` of a Triton model folder, or of a repository with exactly one model."""
    if not (folder / TRITON_CONFIG).is_file():
        models = sorted(child for child in folder.iterdir() if (child / TRITON_CONFIG).is_file())
        if len(models) != 1:
            raise ModelError(f"{folder} is not a Triton model folder or a repository with one model "
                             f"({len(models)} folders hold a {TRITON_CONFIG})")
        folder = models[0]
    versions = sorted((child for child in folder.iterdir() if child.is_dir() and child.name.isdigit()),
                      key=lambda child: int(child.name))
    if not versions or not (versions[-1] / "model.onnx").is_file():
        raise ModelError(f"Triton model {folder} has no <version>/model.onnx")
    return versions[-1] / "model.onnx"


def load_artefact(model: onnx.ModelProto | str | Path) -> onnx.ModelProto | OpenVinoIR:
    """A ModelProto for onnxruntime, or an `OpenVinoIR` for OpenVINO's CPU plugin."""
    if isinstance(model, onnx.ModelProto):
        return runnable_model(model)
    path = Path(model)
    if path.suffix.lower() == ".xml":
        if not path.is_file():
            raise ModelError(f"{path} does not exist")
        return OpenVinoIR(path)
    if path.is_dir():
        return runnable_model(triton_model_file(path))
    return runnable_model(path)
