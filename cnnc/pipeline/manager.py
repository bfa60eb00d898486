"""Run passes in the user's order on a graphsurgeon graph, with the housekeeping around them, and report.

The manager canonicalizes first, then calls each pass (`requires` -> `run` -> `ensures`, see
`cnnc.pipeline.contract`) and, when it changed the graph, tidies and refreshes shapes after it. A pass that
reports no change left the graph as it was (the contract of `PassResult.changed`, which shape refreshing and
`verify` already rely on), so there is nothing to tidy. A precondition failure is a skip of the whole graph with
its reason. The graph is snapshotted before a pass: if the pass raises or breaks its postcondition, the snapshot is
restored and the failure recorded against that pass (with `strict=True`, as in the test-suite, the exception
propagates instead): a bug in one rewrite must not cost the user the others, and it must never leave a
half-rewritten graph behind. A snapshot still describes the graph after passes that changed nothing, so it is
taken again only after a change or a rollback: housekeeping and snapshots are linear in the nodes, and on a
100k-node chain that no pass changes each one cost seconds (bench/scale.py). Order constraints
(`cnnc.pipeline.order`) that the user's order violates become notes in the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from cnnc.errors import UsageError
from cnnc.pipeline.contract import Pass, PassResult, PostconditionError, PreconditionError
from cnnc.pipeline.housekeeping import CANONICALIZE, CHECK_MODEL, REFRESH_SHAPES, TIDY, Housekeeping
from cnnc.pipeline.order import OrderConstraint, order_notes
from cnnc.pipeline.snapshot import Snapshot

# Graphs above this many nodes are refused before import (`check_node_limit`): bench/scale.py measured the default
# pipeline at ~0.26 ms a node past simplify's own limit (25.9 s for a 100k-node chain that no pass changes, on the
# 2-core machine, load 1.2; bench/results/scale-2026-11-30-fast.md), so a compile reaches ~28.5 s here and 30 s
# near 115k. Graphs the passes rewrite cost more a node (0.40 ms on the Conv-BN-Relu chain at 30k nodes).
# `max_nodes` (API) / `--max-nodes` (CLI) raises it, 0 lifts it.
MAX_NODES = 110_000

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


def check_node_limit(nodes: int, max_nodes: int | None) -> None:
    """Raise UsageError (exit 2) when a model of `nodes` nodes is above `max_nodes` (None or 0: no limit)."""
    if max_nodes and nodes > max_nodes:
        raise UsageError(f"the model has {nodes} nodes, above the limit of {max_nodes} (the default, {MAX_NODES}, is "
                         "about where a compile of a graph no pass rewrites reaches 30 s; raise it with --max-nodes N, or max_nodes=N in the API, 0 for "
                         "no limit)")


def _structure(graph: gs.Graph) -> tuple:
    """What a rewrite changes: the nodes (identity, op, attributes' keys) and the tensors they read and write, and
    the graph's inputs and outputs. Linear in nodes; computed only in strict mode (tests, the fuzzer)."""
    return (tuple((id(node), node.op, tuple(node.attrs), tuple(map(id, node.inputs)), tuple(map(id, node.outputs)))
                  for node in graph.nodes),
            tuple(map(id, graph.inputs)), tuple(map(id, graph.outputs)))


def run_pipeline(graph: gs.Graph, passes: list[Pass], verify: VerifyHook | None = None, strict: bool = False,
                 constraints: Iterable[OrderConstraint] = ()) -> tuple[gs.Graph, PipelineReport]:
    """Run `passes` in order on `graph`; returns the rewritten graph and a record per pass."""
    report = PipelineReport(order_notes=order_notes([p.name for p in passes], constraints))
    _housekeep(report, CANONICALIZE, graph)
    snapshot = None
    for pass_ in passes:
        # Object state, not a copy (cnnc.pipeline.snapshot): linear and cheap; passes never mutate constant arrays.
        if snapshot is None and not strict:
            snapshot = Snapshot(graph)
        before = _structure(graph) if strict else None
        start = time.perf_counter()
        error, seconds = None, None
        try:
            result = pass_(graph)
            seconds = time.perf_counter() - start  # the pass alone; housekeeping has its own records
            if before is not None and not result.changed and _structure(graph) != before:
                # Unchanged passes get no tidy, shape refresh or new snapshot: a pass must say when it rewrites.
                raise PostconditionError(pass_.name, "the pass reported no change but rewrote the graph")
            if result.changed:  # dead nodes to drop; the next pass may need the ranks of tensors this one created
                _housekeep(report, TIDY, graph)
                _housekeep(report, REFRESH_SHAPES, graph)
                snapshot = None  # (kept until here: a failing housekeeping step rolls back to it too)
        except PreconditionError as unmet:  # raised before run(): the graph is untouched
            result = PassResult()
            result.skip("whole graph", unmet.reason)
        except Exception as exc:
            if strict:
                raise
            graph, snapshot = snapshot.restore(), None
            result = PassResult()
            result.skip("whole graph", f"pass failed and was rolled back: {type(exc).__name__}: {exc}")
            error = f"{type(exc).__name__}: {exc}"
        seconds = seconds if seconds is not None else time.perf_counter() - start
        report.records.append(PassRecord(pass_.spec(), pass_.kind, seconds, result, error))
        if verify is not None and result.changed:
            verify(pass_, graph)
    return graph, report
