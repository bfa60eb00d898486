"""What the installed onnxruntime accepts: the newest ONNX IR version and default-domain opset.

onnx writes the newest IR version it knows (onnx 1.23: IR 14) while onnxruntime lags behind (1.31 accepts IR <= 13),
so the backend stamps the smaller of the two. Both limits are probed once by asking onnxruntime to load a one-node
model, rather than hard-coding a version table that goes stale with every release.
"""

from __future__ import annotations

import functools

import onnx
import onnx.helper as oh


def _tiny_model(ir_version: int, opset: int) -> bytes:
    graph = oh.make_graph(
        [oh.make_node("Identity", ["x"], ["y"])],
        "probe",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


def _runtime_accepts(ir_version: int, opset: int) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(_tiny_model(ir_version, opset), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own exception types for "unsupported"; any failure means no
        return False
    return True


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """The newest IR version both onnx and onnxruntime understand."""
    for version in range(onnx.IR_VERSION, 2, -1):
        if _runtime_accepts(version, 13):
            return version
    raise RuntimeError("onnxruntime accepts no ONNX IR version; is it installed correctly?")


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """The newest default-domain opset both onnx and onnxruntime understand."""
    ir_version = max_ir_version()
    for opset in range(onnx.defs.onnx_opset_version(), 6, -1):
        if _runtime_accepts(ir_version, opset):
            return opset
    raise RuntimeError("onnxruntime accepts no default-domain opset; is it installed correctly?")


def runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy stamped with an IR version onnxruntime accepts (the given model is never modified)."""
    if model.ir_version <= max_ir_version():
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = max_ir_version()
    return copy
