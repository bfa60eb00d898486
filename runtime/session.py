"""onnxruntime sessions: provider choice and graph-optimisation level in one place.

`provider`: "cpu", "cuda", or "auto" (CUDA when onnxruntime can create a CUDA session, else CPU). The providers a
session actually runs on are read back from the session, never assumed: onnxruntime-gpu silently falls back to the
CPU provider when its CUDA libraries do not load.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from cnnc import threads as thread_counts
from cnnc.errors import ModelError, UsageError
from cnnc.io import backend, target
from cnnc.io.onnx_file import load_onnx
from cnnc.ir.weightless import serialized_size
from cnnc.runtime.ort_errors import ort_reason

OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

SPINNING = "session.intra_op.allow_spinning"  # onnxruntime's config key; "1" (spin) is its default

# Larger models are written to a temporary folder with external data, tensor by tensor, and opened by path:
# `SerializeToString()` would make a full copy of the weights in Python (and fails past protobuf's 2 GB), and
# onnxruntime would parse that copy into one more before it builds its own tensors.
IN_MEMORY_LIMIT_BYTES = 64 << 20


@functools.cache
def cuda_available() -> bool:
    """True when onnxruntime can actually run a session on its CUDA provider.

    Asked of onnxruntime itself with a one-node model, not of torch: a CPU build of torch next to onnxruntime-gpu on
    a GPU machine would say no, and a CUDA torch next to a CUDA provider whose libraries do not load would say yes.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    probe = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "cuda_probe",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # A provider library that fails to load is reported as an error on the default logger, not the session's:
    # silence all but fatal messages for the probe (2, warnings, is onnxruntime's default level).
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CUDAExecutionProvider"])
        return "CUDAExecutionProvider" in session.get_providers()
    except Exception:  # noqa: BLE001 - onnxruntime raises its own hierarchy when no device answers
        return False
    finally:
        ort.set_default_logger_severity(2)


def resolve_provider(provider: str, cuda_options: dict | None = None) -> list:
    """onnxruntime's `providers` list; `cuda_options` add to (or override) the CUDA provider's options."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if not cuda_available():
            raise UsageError("--provider cuda: no CUDA device or CUDA provider available")
        options = {"cudnn_conv_algo_search": "EXHAUSTIVE", **(cuda_options or {})}
        return [("CUDAExecutionProvider", {k: str(v) for k, v in options.items()}), "CPUExecutionProvider"]
    if provider == "auto":
        return resolve_provider("cuda" if cuda_available() else "cpu", cuda_options)
    raise UsageError(f"unknown provider {provider!r}; use auto, cuda or cpu")


def make_session(model: onnx.ModelProto | str | Path, provider: str = "cpu", optimization: str = "disabled",
                 threads: int | None = None, extra_options: dict | None = None,
                 cuda_options: dict | None = None) -> ort.InferenceSession:
    """An InferenceSession on `provider` at graph-optimisation level `optimization`.

    `extra_options` are session config entries (e.g. `session.set_denormal_as_zero`); `cuda_options` are CUDA
    provider options (e.g. `enable_cuda_graph`), ignored when the session runs on the CPU. `threads` defaults to
    `cnnc.threads.session_threads()` (physical cores, or `CNNC_THREADS`), and intra-op spinning is off unless
    `extra_options` set it: spinning threads of a check session steal the cores under contention (cnnc.threads).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    # Fatal only: a failing kernel's error comes back as the exception (with the same text); logged as well, it
    # would print onnxruntime's C++ signatures on stderr.
    options.log_severity_level = 4
    options.intra_op_num_threads = threads or thread_counts.session_threads()
    entries = {SPINNING: "0", **(extra_options or {})}
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    providers = resolve_provider(provider, cuda_options)
    try:
        if isinstance(model, onnx.ModelProto):
            # serialized_size, not ByteSize: protobuf serializes the whole model to compute ByteSize.
            if serialized_size(model) > IN_MEMORY_LIMIT_BYTES:
                with tempfile.TemporaryDirectory(prefix="cnnc-session-") as folder:
                    path = os.path.join(folder, "model.onnx")
                    backend.save(model, path, external_data=True)  # tensor by tensor: no copy of the model
                    return ort.InferenceSession(path, options, providers=providers)
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        return ort.InferenceSession(str(model), options, providers=providers)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.NotImplemented,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as error:
        raise ModelError(f"onnxruntime cannot load the model: {ort_reason(error)}") from None


def runnable_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """A validated ModelProto stamped with an IR version the installed onnxruntime accepts (never in place)."""
    return target.runnable(model if isinstance(model, onnx.ModelProto) else load_onnx(model))


def first_line(error: Exception) -> str:
    """An exception's first line (at most 300 characters), for reports; onnxruntime's messages run over many."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
