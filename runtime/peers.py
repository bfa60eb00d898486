"""Peers for `cnnc bench --peers`: the first model as onnxsim and OnnxSlim simplify it, timed beside cnnc's output.

Both tools are optional (not dependencies of cnnc): each is imported when asked for, so that a missing or broken
one becomes a note in the report rather than an error, and the bench goes on without it.
"""

from __future__ import annotations

import onnx

from cnnc.runtime.session import first_line, runnable_model


def _copy_of(model: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)  # the tools may modify their input; the caller's model stays as it is
    return duplicate


def peer_models(model: onnx.ModelProto) -> tuple[list[tuple[str, onnx.ModelProto]], list[str]]:
    """`model` simplified by onnxsim and by OnnxSlim when they are installed (they are not dependencies of cnnc).
    Returns (label, model) pairs and notes on what was skipped or failed."""
    peers, notes = [], []
    try:
        import onnxsim  # optional dependency: imported at call time, its absence is a note
    except ImportError:
        notes.append("peer onnxsim skipped: not installed (pip install onnxsim)")
    else:
        try:
            simplified, check_ok = onnxsim.simplify(_copy_of(model))
            peers.append(("onnxsim", runnable_model(simplified)))
            if not check_ok:
                notes.append("onnxsim's own output check failed; its model is timed anyway")
        except Exception as error:  # noqa: BLE001 — a third-party tool: report whatever it raises, do not stop the bench
            notes.append(f"peer onnxsim failed: {type(error).__name__}: {first_line(error)}")
    try:
        import onnxslim  # optional dependency: imported at call time, its absence is a note
    except ImportError:
        notes.append("peer onnxslim skipped: not installed (pip install onnxslim)")
    else:
        try:
            peers.append(("onnxslim", runnable_model(onnxslim.slim(_copy_of(model)))))
        except Exception as error:  # noqa: BLE001 — a third-party tool: report whatever it raises, do not stop the bench
            notes.append(f"peer onnxslim failed: {type(error).__name__}: {first_line(error)}")
    return peers, notes
