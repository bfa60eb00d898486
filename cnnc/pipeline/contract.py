"""The pass contract (after onnx-ir's `passes/_pass_infra.py`, xDSL's `ModulePass` and onnxscript's rewriters).

A pass is a frozen dataclass with a class-level `name`, its options as fields, and `run(graph) -> PassResult`, which
rewrites the graphsurgeon graph in place and records what it did and what it skipped *and why*. Exact passes keep
the function up to float rounding; approximate passes are opt-in by name and report their measured deviation;
housekeeping passes (`cnnc.pipeline.housekeeping`) are what the manager runs around them.

Calling a pass, `pass_(graph)`, runs `requires(graph)` -> `run(graph)` -> `ensures(graph, result)`. `requires`
raises `PreconditionError` when the whole graph is outside what the pass handles (the manager reports a skip of the
whole graph, nothing changed); `ensures` raises `PostconditionError` when the rewrite broke an invariant the pass
promises (a bug: the manager rolls the graph back and records an error). Per-node preconditions are not
`requires`: a node that fails one is skipped with its reason in the `PassResult` (see `cnnc.pipeline.match`).

The registry of passes by name is `cnnc.passes` (a dict of lazy loaders); pipelines are written as
`'destride{mode=network},collapse'` and parsed by `cnnc.pipeline.options`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_graphsurgeon as gs

from cnnc.ir.graph import forget_names


class PassContractError(Exception):
    """A pass's pre- or postcondition does not hold; `pass_name` and `reason` say which and why. Not a CnncError:
    the manager turns a precondition into a skip and a postcondition is a bug (exit code 3 if it escapes)."""

    def __init__(self, pass_name: str, reason: str):
        super().__init__(f"pass {pass_name}: {reason}")
        self.pass_name, self.reason = pass_name, reason


class PreconditionError(PassContractError):
    """The graph is outside what the pass handles: the whole graph is skipped with the reason (not a crash)."""


class PostconditionError(PassContractError):
    """The pass broke an invariant it promises: a bug; the manager rolls the graph back (strict mode raises)."""


@dataclass
class Candidate:
    """One rewrite a pass weighed with the cost model (`cnnc.cost`): `id` is stable across runs of the same pass on
    the same graph (e.g. the machine's output tensor names), so that `--auto` can name it in a pass option
    (`apply_close=...`); `verdict` is "pays", "loses" or "close"; `estimate` holds the cost model's figures
    (MACs, weight bytes, activation bytes, estimated seconds before/after); `applied` says what the pass did."""

    id: str
    where: str
    verdict: str
    applied: bool
    reason: str
    estimate: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    """What one run of a pass did: `changed`, a line per rewrite in `applied`, a (where, why) per skip, and the
    rewrites weighed by the cost model in `candidates`."""

    changed: bool = False
    applied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)

    def did(self, what: str) -> None:
        self.changed = True
        self.applied.append(what)

    def skip(self, where: str, why: str) -> None:
        self.skipped.append((where, why))

    def as_dict(self) -> dict:
        return {"changed": self.changed, "applied": list(self.applied),
                "skipped": [{"where": w, "why": y} for w, y in self.skipped], "stats": dict(self.stats),
                "candidates": [c.as_dict() for c in self.candidates]}


class Pass(ABC):
    """Base of every pass. Subclasses are `@dataclass(frozen=True)` and set `name`, `summary` and `exact`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    # "exact" or "approximate" (from `exact`), or "housekeeping" for the manager's own passes: its record's `kind`.
    kind: ClassVar[str] = "exact"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "exact" in cls.__dict__ and "kind" not in cls.__dict__:
            cls.kind = "exact" if cls.exact else "approximate"

    def requires(self, graph: gs.Graph) -> None:
        """Raise `PreconditionError` when the pass cannot run on this graph at all. Default: no condition."""

    @abstractmethod
    def run(self, graph: gs.Graph) -> PassResult:
        """Rewrite `graph` in place; record each rewrite with `did` and each refusal with `skip(where, why)`."""

    def ensures(self, graph: gs.Graph, result: PassResult) -> None:
        """Raise `PostconditionError` when the rewritten graph breaks a promise of the pass. Default: none."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        forget_names(graph)  # the names taken are collected afresh by the pass's first unique_name
        self.requires(graph)
        result = self.run(graph)
        self.ensures(graph, result)
        return result

    def precondition(self, reason: str) -> PreconditionError:
        return PreconditionError(self.spec(), reason)

    def postcondition(self, reason: str) -> PostconditionError:
        return PostconditionError(self.spec(), reason)

    def spec(self) -> str:
        """The pipeline syntax that recreates this pass with its options."""
        options = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(options) + "}" if options else "")


class ApproximatePass(Pass):
    """Base of the approximate passes: opt-in by name, never in the default pipeline, and each reports the output
    deviation it caused, measured on onnxruntime by `cnnc.runtime.deviation` (the one measure they share)."""

    exact: ClassVar[bool] = False
    kind: ClassVar[str] = "approximate"


def single_producers(graph: gs.Graph) -> str | None:
    """Why the graph's wiring is broken (a tensor written by two nodes, a graph output nobody writes), else None.
    The invariant every rewiring pass must keep; passes check it in `ensures`."""
    produced = set()
    for node in graph.nodes:
        for tensor in node.outputs:
            if id(tensor) in produced or len(tensor.inputs) > 1:
                return f"tensor '{tensor.name}' is written by {len(tensor.inputs)} nodes"
            produced.add(id(tensor))
    for tensor in graph.outputs:
        if isinstance(tensor, gs.Variable) and not tensor.inputs and not any(t is tensor for t in graph.inputs):
            return f"graph output '{tensor.name}' is written by no node"
    return None
