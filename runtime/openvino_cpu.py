"""OpenVINO's CPU plugin as a runtime beside onnxruntime: load an IR (`.xml` + `.bin`), run it on a feed, time it.

OpenVINO is an optional extra (`pip install 'cnnc[openvino]'`); it is imported inside `openvino_module()` only,
and its absence is the user's `UsageError` (exit 2) with the install hint.

Precision: on CPUs with bfloat16 or float16 units (AMX, AVX512-FP16) the CPU plugin computes float32 models in the
lower precision unless told otherwise (its `INFERENCE_PRECISION_HINT`). cnnc compiles the IR with the hint
`f32` for the proof and for `cnnc bench` alike, so that what is timed is what was proven; `precision_hint`
changes both together.

Inputs and outputs are matched by name: the IR keeps the ONNX tensor names (`openvino.convert_model` keeps them as
the ports' names), and `ir_outputs` reads them back in the IR's order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cnnc import threads as thread_counts
from cnnc.errors import ModelError, UsageError
from cnnc.ir.shapes import concrete_shape, is_fixed
from cnnc.runtime.equivalence import CandidateRunner
from cnnc.runtime.feeds import make_feeds
from cnnc.runtime.session import first_line

INSTALL_HINT = "pip install 'cnnc[openvino]'"
DEFAULT_PRECISION_HINT = "f32"


def openvino_module():
    """The `openvino` package, or a UsageError with the install hint."""
    try:
        import openvino  # optional: the openvino extra
    except ImportError:
        raise UsageError(f"the openvino format needs OpenVINO: {INSTALL_HINT}") from None
    return openvino


def compile_ir(model, threads: int | None = None, precision_hint: str = DEFAULT_PRECISION_HINT):
    """An OpenVINO CompiledModel on the CPU plugin: `model` is an `.xml` path or an `openvino.Model`."""
    ov = openvino_module()
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision_hint,
              "INFERENCE_NUM_THREADS": int(threads or thread_counts.session_threads())}
    try:
        return core.compile_model(str(model) if isinstance(model, (str, Path)) else model, "CPU", config)
    except RuntimeError as error:  # OpenVINO raises RuntimeError (its Exception) for unreadable or unsupported IR
        raise ModelError(f"OpenVINO cannot load the model: {first_line(error)}") from None


def _port_name(port) -> str:
    names = port.get_names()
    return port.get_any_name() if names else ""


def ir_outputs(compiled) -> list[str]:
    return [_port_name(port) for port in compiled.outputs]


def ir_input_types(compiled) -> dict[str, np.dtype]:
    return {_port_name(port): np.dtype(port.get_element_type().to_dtype()) for port in compiled.inputs}


def run_ir(compiled) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """A function feed -> outputs (in `ir_outputs` order) on one infer request of `compiled`."""
    request = compiled.create_infer_request()
    ports = list(compiled.outputs)

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = request.infer({name: np.ascontiguousarray(value) for name, value in feed.items()})
        return [np.array(results[port]) for port in ports]
    return run


def ir_candidate(compiled, expected_names: list[str] | None = None) -> CandidateRunner:
    """`compiled` as the candidate of `cnnc.runtime.equivalence.check_runner`. A port has a set of names (the
    converter may add its own, e.g. a Cast's output name beside the ONNX output's); with `expected_names` (the
    reference's outputs, in order) a port answers to the expected name when it carries it."""
    output_types = [np.dtype(port.get_element_type().to_dtype()).name for port in compiled.outputs]
    names = ir_outputs(compiled)
    if expected_names is not None and len(expected_names) == len(names):
        names = [wanted if wanted in port.get_names() else name
                 for wanted, name, port in zip(expected_names, names, compiled.outputs)]
    return CandidateRunner(run=run_ir(compiled), output_names=names,
                           input_types=ir_input_types(compiled), output_types=output_types)


def ir_feeds(compiled, batch: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) feeds (as `cnnc.runtime.feeds.make_feeds`) for the IR's inputs: a dynamic leading dim is the
    batch (default 1); a fixed one must equal `batch`."""
    shapes = {}
    for port in compiled.inputs:
        name = _port_name(port)
        dims = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        if dims and is_fixed(dims[0]) and batch is not None and dims[0] != batch:
            raise UsageError(f"input '{name}' has a fixed batch of {dims[0]}; it cannot run at batch {batch}")
        shapes[name] = (concrete_shape(name, dims, batch or 1, "OpenVINO IR inputs may have a dynamic batch only"),
                        np.dtype(port.get_element_type().to_dtype()))
    return make_feeds(shapes, seed)


def prepare_ir(xml: str | Path, label: str, batch: int | None, threads: int | None = None, seed: int = 0,
               timer: Callable[[], float] = time.perf_counter) -> tuple[Callable[[], object], dict, list]:
    """(run, info, keep_alive) for `cnnc bench`: the IR compiled on the CPU plugin, the seeded feeds set once on
    one infer request (as onnxruntime's IOBinding binds them once), one timed first call."""
    ov = openvino_module()
    started = timer()
    compiled = compile_ir(xml, threads)
    created = timer() - started
    feeds = ir_feeds(compiled, batch, seed)
    request = compiled.create_infer_request()
    for name, value in feeds.items():
        request.set_tensor(name, ov.Tensor(np.ascontiguousarray(value)))
    started = timer()
    request.infer()
    first = timer() - started
    info = {"label": label, "requested_provider": "openvino-cpu", "provider": "OpenVINO CPU",
            "providers": ["OpenVINO CPU"], "device": "cpu", "notes": [], "io_binding": True, "cuda_graph": False,
            "inputs": {name: {"shape": list(value.shape), "dtype": str(value.dtype)} for name, value in feeds.items()},
            "precision_hint": DEFAULT_PRECISION_HINT, "session_create_ms": created * 1e3, "first_run_ms": first * 1e3}
    return request.infer, info, [compiled, request, feeds]
