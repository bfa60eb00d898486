"""What the installed onnxruntime accepts: the newest ONNX IR version and default-domain opset.

onnx writes the newest IR version it knows (onnx 1.23: IR 14) while onnxruntime lags behind (1.31 accepts IR <= 13),
so the backend stamps the smaller of the two. The limits of known onnxruntime releases come from `KNOWN_LIMITS`, so
that reading and validating a model opens no onnxruntime session. For a release not in the table they are probed
once, at the first emit (or first runnable copy), by asking onnxruntime to load one-node models; validation of an
input then checks the opset against onnx's own limit only, and onnxruntime names a too-new opset when it loads the
model. `tests/test_bad_inputs.py` checks that the table entry of the installed release matches the probe.
"""

from __future__ import annotations

import functools

import onnx
import onnx.helper as oh
import onnxruntime as ort

# onnxruntime release (major.minor) -> (newest IR version, newest default-domain opset) it loads, as `_probe_limits`
# measures them with an onnx that knows newer ones (onnx 1.23: IR 14, opset 28). Add a row when upgrading.
KNOWN_LIMITS: dict[str, tuple[int, int]] = {
    "1.31": (13, 26),
}


def _release(version: str) -> str:
    return ".".join(version.split(".")[:2])


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
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(_tiny_model(ir_version, opset), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - onnxruntime raises its own exception types for "unsupported"; any failure means no
        return False
    return True


def _probe_limits() -> tuple[int, int]:
    """(IR version, opset) found by loading one-node models into onnxruntime, newest first (a few sessions)."""
    ir_version = next((v for v in range(onnx.IR_VERSION, 2, -1) if _runtime_accepts(v, 13)), None)
    if ir_version is None:
        raise RuntimeError("onnxruntime accepts no ONNX IR version; is it installed correctly?")
    opset = next((o for o in range(onnx.defs.onnx_opset_version(), 6, -1) if _runtime_accepts(ir_version, o)), None)
    if opset is None:
        raise RuntimeError("onnxruntime accepts no default-domain opset; is it installed correctly?")
    return ir_version, opset


def _known_limits() -> tuple[int, int] | None:
    known = KNOWN_LIMITS.get(_release(ort.__version__))
    if known is None:
        return None
    return min(known[0], onnx.IR_VERSION), min(known[1], onnx.defs.onnx_opset_version())


@functools.cache
def _limits() -> tuple[int, int]:
    return _known_limits() or _probe_limits()


def max_ir_version() -> int:
    """The newest IR version both onnx and onnxruntime understand (probed once for an unknown onnxruntime)."""
    return _limits()[0]


def max_opset() -> int:
    """The newest default-domain opset both onnx and onnxruntime understand (probed once for an unknown one)."""
    return _limits()[1]


def max_opset_without_probe() -> int:
    """`max_opset()` where the table knows the installed onnxruntime, else onnx's own newest opset; never opens a
    session (what input validation uses: loading a model runs nothing)."""
    known = _known_limits()
    return known[1] if known is not None else onnx.defs.onnx_opset_version()


def runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy stamped with an IR version onnxruntime accepts (the given model is never modified)."""
    if model.ir_version <= max_ir_version():
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = max_ir_version()
    return copy


def stamp_notes(model: onnx.ModelProto) -> list[str]:
    """What `runnable` changes about `model`, in words for the report (empty when it changes nothing)."""
    if model.ir_version <= max_ir_version():
        return []
    return [(f"the model's IR version {model.ir_version} is newer than onnxruntime {ort.__version__} accepts; "
             f"it was stamped down to IR {max_ir_version()}, the newest it loads, and compiled (the checker and the "
             f"equivalence check saw the stamped copy)")]
