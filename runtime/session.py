"""onnxruntime sessions: provider choice and graph-optimisation level in one place.

`provider`: "cpu", "cuda", or "auto" (CUDA when onnxruntime can create a CUDA session, else CPU). The providers a
session actually runs on are read back from the session, never assumed.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from cnnc.errors import ModelError, UsageError

OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Larger serialized models cannot go through an in-memory protobuf; they are written to a temporary folder.
_IN_MEMORY_LIMIT = 2**31 - 2**26


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when onnxruntime has the CUDA provider and a CUDA device answers."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def resolve_provider(provider: str) -> list:
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if not cuda_available():
            raise UsageError("--provider cuda: no CUDA device or CUDA provider available")
        return [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
    if provider == "auto":
        return resolve_provider("cuda" if cuda_available() else "cpu")
    raise UsageError(f"unknown provider {provider!r}; use auto, cuda or cpu")


def make_session(model: onnx.ModelProto | str | Path, provider: str = "cpu", optimization: str = "disabled",
                 threads: int | None = None, extra_options: dict | None = None) -> ort.InferenceSession:
    """An InferenceSession on `provider` at graph-optimisation level `optimization`."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (extra_options or {}).items():
        options.add_session_config_entry(key, value)
    providers = resolve_provider(provider)
    try:
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() > _IN_MEMORY_LIMIT:
                with tempfile.TemporaryDirectory(prefix="cnnc-session-") as folder:
                    path = os.path.join(folder, "model.onnx")
                    copy = onnx.ModelProto()
                    copy.CopyFrom(model)
                    onnx.save_model(copy, path, save_as_external_data=True, location="model.onnx.data")
                    return ort.InferenceSession(path, options, providers=providers)
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        return ort.InferenceSession(str(model), options, providers=providers)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.NotImplemented,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as error:
        raise ModelError(f"onnxruntime cannot load the model: {str(error).strip().splitlines()[0]}") from None
