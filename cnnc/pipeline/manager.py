"""Run passes in the user's order on a graphsurgeon graph, tidy after each, and optionally verify after each.

The pipeline snapshots the graph before each pass. If a pass raises, the snapshot is restored and the failure is
recorded against that pass (with `strict=True`, as in the test-suite, the exception propagates instead): a bug in
one rewrite must not cost the user the others, and it must never leave a half-rewritten graph behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.ir.canonicalize import canonicalize
from cnnc.pipeline.contract import Pass, PassResult

# Called after each pass with (pass, graph); raises (e.g. EquivalenceError) to stop the pipeline.
VerifyHook = Callable[[Pass, gs.Graph], None]


@dataclass
class PassRecord:
    spec: str
    exact: bool
    seconds: float
    result: PassResult
    error: str | None = None

    def as_dict(self) -> dict:
        return {"pass": self.spec, "exact": self.exact, "seconds": round(self.seconds, 6),
                "error": self.error, **self.result.as_dict()}


@dataclass
class PipelineReport:
    records: list[PassRecord] = field(default_factory=list)
    canonicalize_seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return any(record.result.changed for record in self.records)

    def as_dict(self) -> list[dict]:
        return [record.as_dict() for record in self.records]


def run_pipeline(graph: gs.Graph, passes: list[Pass], verify: VerifyHook | None = None,
                 strict: bool = False) -> tuple[gs.Graph, PipelineReport]:
    """Run `passes` in order on `graph`; returns the rewritten graph and a record per pass."""
    report = PipelineReport()
    start = time.perf_counter()
    graph = canonicalize(graph)
    report.canonicalize_seconds = time.perf_counter() - start
    for pass_ in passes:
        # graph.copy() shares constant arrays; passes never mutate those in place (see cnnc.ir.make_constant).
        snapshot = graph.copy() if not strict else None
        start = time.perf_counter()
        error = None
        try:
            result = pass_.run(graph)
            graph = ir.tidy(graph)
            if result.changed:  # the next pass may need the ranks of tensors this one created
                graph = ir.refresh_shapes(graph)
        except Exception as exc:
            if strict:
                raise
            graph = snapshot
            result = PassResult()
            result.skip("whole graph", f"pass failed and was rolled back: {type(exc).__name__}: {exc}")
            error = f"{type(exc).__name__}: {exc}"
        record = PassRecord(pass_.spec(), pass_.exact, time.perf_counter() - start, result, error)
        report.records.append(record)
        if verify is not None and result.changed:
            verify(pass_, graph)
    return graph, report
