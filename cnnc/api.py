"""The Python API: `cnnc.compile(...)` for CI pipelines, and `cnnc.verify(...)`.

    result = cnnc.compile("model.onnx", passes=["fold-bn"])          # or an nn.Module with example_input=
    result.report["equivalence"]["passed"]                             # proven on seeded inputs
    result.save("model.cnnc.onnx")                                     # atomic write

Failures raise `cnnc.ModelError` (bad input), `cnnc.UsageError` (bad options) or `cnnc.EquivalenceError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.errors import EquivalenceError, ModelError
from cnnc.io import backend
from cnnc.io.frontend import load_model
from cnnc.io.target import runnable
from cnnc.ir.stats import model_stats
from cnnc.passes import DEFAULT_PIPELINE, ORDER_CONSTRAINTS, parse_pipeline
from cnnc.pipeline.contract import Pass
from cnnc.pipeline.manager import check_model, run_pipeline
from cnnc.runtime.equivalence import DEFAULT_ATOL, DEFAULT_RTOL, check_equivalence


@dataclass
class CompileResult:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    original: onnx.ModelProto | None = None  # the input as cnnc read it (the torch export for a module)

    def save(self, path: str | Path, external_data: bool | None = None) -> list[Path]:
        """Write the compiled model atomically; `external_data=None` uses external data above 2 GB only."""
        written = backend.save(self.model, path, external_data=external_data)
        self.report["written"] = [str(p) for p in written]
        return written


def _equivalence(reference: onnx.ModelProto, candidate: onnx.ModelProto, check: dict) -> dict:
    report = check_equivalence(reference, candidate, **check)
    return {**report.as_dict(), "summary": report.summary()}


def compile(model: Any, passes: str | list | None = None, example_input: Any = None, *, check: bool = True,
            check_n: int = 2, seed: int = 0, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
            input_shapes=None, inputs=None, verify_each: bool = False, state_dict: str | Path | None = None,
            strict: bool = False) -> CompileResult:
    """Compile `model` (ONNX path, ModelProto or nn.Module) with `passes` (default: `DEFAULT_PIPELINE`).

    With `check` (the default) the result is proven equivalent to the original on seeded inputs (ARCHITECTURE.md) and
    `EquivalenceError` is raised otherwise; `verify_each` checks after every pass and names the pass that broke it.
    """
    started = time.perf_counter()
    original = runnable(load_model(model, example_input, state_dict=state_dict))
    pipeline: list[Pass] = parse_pipeline(passes if passes is not None else DEFAULT_PIPELINE)
    check_options = dict(n=check_n, seed=seed, rtol=rtol, atol=atol, input_shapes=input_shapes, user_inputs=inputs)
    per_pass: dict[str, dict] = {}

    def verify_after(pass_: Pass, graph: gs.Graph) -> None:
        candidate = backend.to_model(graph.copy(), template=original)
        try:
            result = _equivalence(original, candidate, check_options)
        except EquivalenceError as error:  # other output names or shapes, or a candidate that fails to run
            raise EquivalenceError(f"pass {pass_.spec()} broke equivalence: {error}",
                                   {"failed_pass": pass_.spec()}) from None
        per_pass[pass_.spec()] = result
        if not result["passed"]:
            raise EquivalenceError(f"pass {pass_.spec()} broke equivalence: {result['summary']}",
                                   {"equivalence": result, "failed_pass": pass_.spec()})

    try:
        graph = gs.import_onnx(original)
    except Exception as error:  # graphsurgeon raises assorted types on malformed graphs
        raise ModelError(f"cannot import the model into the IR: {error}") from None
    unread = ir.unread_constants(graph)
    graph, pipeline_report = run_pipeline(graph, pipeline, verify=verify_after if verify_each else None,
                                          strict=strict, constraints=ORDER_CONSTRAINTS)
    ir.forget_loaded_values(graph, unread)  # export then reuses the original tensors: no copy of what passes read
    compiled = backend.to_model(graph, template=original)
    check_model(compiled, pipeline_report)
    report: dict = {
        "passes": pipeline_report.as_dict(),
        "housekeeping": pipeline_report.housekeeping_as_dict(),  # canonicalize, tidy, refresh-shapes, check-model
        "order_notes": pipeline_report.order_notes,  # constraints of cnnc.passes.ORDER_CONSTRAINTS the order breaks
        "canonicalize_seconds": round(pipeline_report.canonicalize_seconds, 6),
        "before": model_stats(original),
        "after": model_stats(compiled),
    }
    if verify_each:
        report["equivalence_per_pass"] = per_pass
    if check:
        report["equivalence"] = _equivalence(original, compiled, check_options)
        if not report["equivalence"]["passed"]:
            raise EquivalenceError(f"compiled model is not equivalent: {report['equivalence']['summary']}", report)
    else:
        report["equivalence"] = None
    report["seconds"] = round(time.perf_counter() - started, 3)
    return CompileResult(compiled, report, original)


def verify(a: Any, b: Any, *, check_n: int = 2, seed: int = 0, rtol: float = DEFAULT_RTOL,
           atol: float = DEFAULT_ATOL, input_shapes=None, inputs=None) -> dict:
    """Equivalence of two models (paths or ModelProtos); returns the report, raises EquivalenceError on mismatch."""
    reference, candidate = runnable(load_model(a)), runnable(load_model(b))
    result = _equivalence(reference, candidate, dict(n=check_n, seed=seed, rtol=rtol, atol=atol,
                                                     input_shapes=input_shapes, user_inputs=inputs))
    if not result["passed"]:
        raise EquivalenceError(f"models are not equivalent: {result['summary']}", {"equivalence": result})
    return result
