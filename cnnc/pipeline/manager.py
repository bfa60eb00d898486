"""Run passes in the user's order on a graphsurgeon graph, with the housekeeping around them, and report.

The manager canonicalizes first, then calls each pass (`requires` -> `run` -> `ensures`, see
`cnnc.pipeline.contract`) and tidies after it (and refreshes shapes when it changed the graph). A precondition
failure is a skip of the whole graph with its reason. The graph is snapshotted before each pass: if a pass raises
or breaks its postcondition, the snapshot is restored and the failure recorded against that pass (with
`strict=True`, as in the test-suite, the exception propagates instead): a bug in one rewrite must not cost the user
the others, and it must never leave a half-rewritten graph behind. Order constraints (`cnnc.pipeline.order`) that
the user's order violates become notes in the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from cnnc.pipeline.contract import Pass, PassResult, PreconditionError
from cnnc.pipeline.housekeeping import CANONICALIZE, CHECK_MODEL, REFRESH_SHAPES, TIDY, Housekeeping
from cnnc.pipeline.order import OrderConstraint, order_notes
from cnnc.pipeline.snapshot import Snapshot

# Called after each pass with (pass, graph); raises (e.g. EquivalenceError) to stop the pipeline.
VerifyHook = Callable[[Pass, gs.Graph], None]


@dataclass
class PassRecord:
    spec: str
    kind: str
    seconds: float
    result: PassResult
    error: str | None = None
    runs: int = 1

    def as_dict(self) -> dict:
        return {"pass": self.spec, "kind": self.kind, "exact": self.kind != "approximate",
                "seconds": round(self.seconds, 6), "error": self.error, **self.result.as_dict()}


@dataclass
class PipelineReport:
    """`records`: one per user pass, in order; `housekeeping`: one per housekeeping pass (runs and total seconds)."""

    records: list[PassRecord] = field(default_factory=list)
    housekeeping: dict[str, PassRecord] = field(default_factory=dict)
    order_notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(record.result.changed for record in self.records)

    @property
    def canonicalize_seconds(self) -> float:
        record = self.housekeeping.get(CANONICALIZE.name)
        return record.seconds if record else 0.0

    def count(self, pass_: Housekeeping, seconds: float, result: PassResult) -> None:
        """Add one run of a housekeeping pass to its record."""
        record = self.housekeeping.get(pass_.name)
        if record is None:
            self.housekeeping[pass_.name] = PassRecord(pass_.spec(), pass_.kind, seconds, result)
            return
        record.runs += 1
        record.seconds += seconds
        record.result.changed |= result.changed

    def as_dict(self) -> list[dict]:
        return [record.as_dict() for record in self.records]

    def housekeeping_as_dict(self) -> list[dict]:
        return [{**record.as_dict(), "runs": record.runs} for record in self.housekeeping.values()]


def _housekeep(report: PipelineReport, pass_: Housekeeping, graph: gs.Graph) -> None:
    start = time.perf_counter()
    result = pass_(graph)
    report.count(pass_, time.perf_counter() - start, result)


def check_model(model: onnx.ModelProto, report: PipelineReport) -> None:
    """The `check-model` housekeeping pass on an exported model (raises ModelError), counted in `report`."""
    start = time.perf_counter()
    CHECK_MODEL.check(model)
    report.count(CHECK_MODEL, time.perf_counter() - start, PassResult())


def run_pipeline(graph: gs.Graph, passes: list[Pass], verify: VerifyHook | None = None, strict: bool = False,
                 constraints: Iterable[OrderConstraint] = ()) -> tuple[gs.Graph, PipelineReport]:
    """Run `passes` in order on `graph`; returns the rewritten graph and a record per pass."""
    report = PipelineReport(order_notes=order_notes([p.name for p in passes], constraints))
    _housekeep(report, CANONICALIZE, graph)
    for pass_ in passes:
        # Object state, not a copy (cnnc.pipeline.snapshot): linear and cheap; passes never mutate constant arrays.
        snapshot = Snapshot(graph) if not strict else None
        start = time.perf_counter()
        error, seconds = None, None
        try:
            result = pass_(graph)
            seconds = time.perf_counter() - start  # the pass alone; housekeeping has its own records
            _housekeep(report, TIDY, graph)
            if result.changed:  # the next pass may need the ranks of tensors this one created
                _housekeep(report, REFRESH_SHAPES, graph)
        except PreconditionError as unmet:  # raised before run(): the graph is untouched
            result = PassResult()
            result.skip("whole graph", unmet.reason)
        except Exception as exc:
            if strict:
                raise
            graph = snapshot.restore()
            result = PassResult()
            result.skip("whole graph", f"pass failed and was rolled back: {type(exc).__name__}: {exc}")
            error = f"{type(exc).__name__}: {exc}"
        seconds = seconds if seconds is not None else time.perf_counter() - start
        report.records.append(PassRecord(pass_.spec(), pass_.kind, seconds, result, error))
        if verify is not None and result.changed:
            verify(pass_, graph)
    return graph, report
