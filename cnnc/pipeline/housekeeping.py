"""Housekeeping passes: what the manager runs around the user's passes, as named, reported passes.

- `canonicalize`: fold exporter constant sub-graphs, make Resize sizes constant, tidy, infer shapes; runs first.
- `tidy`: drop dead nodes and tensors, restore topological order only when the order is not valid; after each pass
  that changed the graph (one that changed nothing left nothing to tidy).
- `refresh-shapes`: ONNX shape inference onto the graph's tensors; after each pass that changed the graph (the next
  pass may need the ranks of tensors this one created).
- `check-model`: the full ONNX checker on the exported model (`cnnc.io.backend.check`); `cnnc.compile` runs it on
  the emitted model, after the pipeline.
They are exact (they never change what the graph computes), reachable by name from `cnnc.passes` like any pass,
and reported as one record each with `kind` "housekeeping", the number of runs and the total seconds.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.io import backend
from cnnc.ir.canonicalize import canonicalize
from cnnc.pipeline.contract import Pass, PassResult


class Housekeeping(Pass):
    """A pass the manager runs itself; its result says whether the node count changed."""

    kind = "housekeeping"

    def run(self, graph: gs.Graph) -> PassResult:
        before = len(graph.nodes)
        self.tend(graph)
        result = PassResult(changed=len(graph.nodes) != before)
        if result.changed:
            result.stats["nodes"] = len(graph.nodes) - before
        return result

    @abstractmethod
    def tend(self, graph: gs.Graph) -> None:
        """Do the housekeeping on `graph` in place."""


# Each `tend` works in place (graphsurgeon folds, cleans and sorts the graph it is given); the return is ignored.
@dataclass(frozen=True)
class Canonicalize(Housekeeping):
    name = "canonicalize"
    summary = "fold constant sub-graphs, make Resize sizes constant, tidy and infer shapes (runs first)"
    tend = staticmethod(canonicalize)


@dataclass(frozen=True)
class Tidy(Housekeeping):
    name = "tidy"
    summary = "drop dead nodes and tensors, restore topological order (after every pass that changed the graph)"
    tend = staticmethod(ir.tidy)


@dataclass(frozen=True)
class RefreshShapes(Housekeeping):
    name = "refresh-shapes"
    summary = "annotate tensors with the shapes of ONNX shape inference (after every pass that changed the graph)"
    tend = staticmethod(ir.refresh_shapes)


@dataclass(frozen=True)
class CheckModel(Housekeeping):
    name = "check-model"
    summary = "the full ONNX checker on the exported model (cnnc compile runs it on what it emits)"

    def tend(self, graph: gs.Graph) -> None:
        self.check(backend.to_model(graph))

    @staticmethod
    def check(model: onnx.ModelProto) -> None:
        """Raise ModelError when `model` fails the full checker (with strict shape inference)."""
        backend.check(model)


CANONICALIZE, TIDY, REFRESH_SHAPES, CHECK_MODEL = Canonicalize(), Tidy(), RefreshShapes(), CheckModel()
HOUSEKEEPING: tuple[type[Housekeeping], ...] = (Canonicalize, Tidy, RefreshShapes, CheckModel)
