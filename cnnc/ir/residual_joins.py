"""Residual joins: which adds of a data-flow graph are x(l+1) = S(x) + F(x), decided once for every graph language.

Both users ask the same question of different graphs: `cnnc.homotopy` of a torch.fx graph (which adds to turn into
(1 − t)·F + t·S joins) and `cnnc.analysis` of an ONNX graph (which adds are residual blocks to measure). Each gives
its graph through a small adapter (`JoinGraph`: values in topological order, the values each one is computed from,
the op that writes it and that op's kind in ONNX's vocabulary, and the adds); `classify_joins` applies the rule.
Which op kinds are linear comes from the op table (`cnnc.ir.ops`); this module imports no torch.

The rule. A residual join is an add of two activations a + b, computed from the graph's inputs, of one shape where
the shapes are known:
- identity skip: one operand is an ancestor of the other. It is the skip x(l) (the block input), the other the
  branch F(x(l)) (seed 001, Eq. 1: x(l+1) = x(l) + F(x(l)));
- projection skip: neither is an ancestor of the other. Their latest common ancestor x (deepest, then last in
  topological order) is the block input; the operand reached from x through fewer ops is the skip S(x), the other
  the branch. S must be *linear* in x: every op on the skip's paths from x is in `LINEAR_OPS` (a 1×1 conv + BN,
  average pooling and zero padding, the resampling and padding matrices of seed 000 §3, or the t·x of a homotopy
  export). So a skip through a ReLU (or any other nonlinearity) is refused: seed 000's skips S(x) are identity or
  a linear projection, and seed 001's residual x(l+1) − x(l) is the branch only when x(l) = S(x) is the block input
  carried forward unchanged up to a linear map; an add of two nonlinear paths is an Inception-style sum.
Refused with a reason: x + x (a scaling), operands with no common ancestor (two independent inputs), two paths of
the same op count (no shorter skip: cannot tell branch from shortcut), a nonlinear skip path, operands of different
shapes, and (where the graph language has them) operands that are parameters, shapes or numbers.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from cnnc.ir.ops import MAY_BE_LINEAR_OPS

Value = TypeVar("Value", bound=Hashable)

# Op kinds (ONNX names) linear in their data input: they may sit on a projection shortcut. The op table's linear
# column, plus two kinds that are linear in their data input although collapse does not merge them (so the table
# leaves them out): Gather (a selection by indices) and Upsample (Resize before opset 10).
LINEAR_OPS = MAY_BE_LINEAR_OPS | {"Gather", "Upsample"}


@dataclass(frozen=True)
class Add(Generic[Value]):
    """One binary add of the graph: `where` names it in reports, `node` is the adapter's own handle."""

    where: str
    node: object
    a: Value
    b: Value


class JoinGraph(Protocol[Value]):
    """What the classifier needs to know about a graph (an fx graph, an ONNX graph, ...)."""

    def values(self) -> Sequence[Value]:
        """Every value (tensor) of the graph in topological order."""

    def parents(self, value: Value) -> Sequence[Value]:
        """The values the op writing `value` reads (parameters and constants are not values)."""

    def op(self, value: Value) -> Hashable:
        """The op that writes `value`: one identity for all outputs of a multi-output op."""

    def op_kind(self, value: Value) -> str:
        """The kind of the op writing `value`, in ONNX's names (`Conv`, `Relu`, ...)."""

    def is_activation(self, value: Value) -> bool:
        """Whether `value` is a tensor computed in the graph, not a parameter, a shape or a number."""

    def shape(self, value: Value) -> tuple[int, ...] | None:
        """The value's shape where known."""

    def label(self, value: Value) -> str:
        """The value's name in reports."""

    def adds(self) -> Iterable[Add[Value]]:
        """The binary adds whose two operands are values of the graph, in topological order."""


@dataclass(frozen=True)
class Join(Generic[Value]):
    """A residual join: the add's output is `skip` + `branch`; `skip` is operand number `skip_index` of the add."""

    add: Add[Value]
    skip: Value
    branch: Value
    skip_index: int
    kind: str  # "identity" or "projection"
    block_input: Value  # where the block starts (the skip itself for an identity skip)


class _DataFlow(Generic[Value]):
    """Ancestors, longest-path depths and topological positions of the values of a `JoinGraph`."""

    def __init__(self, graph: JoinGraph[Value]):
        self.graph = graph
        self.ancestors: dict[Value, frozenset[Value]] = {}
        self.depth: dict[Value, int] = {}
        self.position: dict[Value, int] = {}
        for index, value in enumerate(graph.values()):
            parents = [p for p in graph.parents(value) if p in self.ancestors]
            self.ancestors[value] = frozenset().union(*(self.ancestors[p] | {p} for p in parents))
            self.depth[value] = 1 + max((self.depth[p] for p in parents), default=-1)
            self.position[value] = index

    def path_ops(self, source: Value, operand: Value) -> list[Value]:
        """One value per op on the paths from `source` to `operand` (the operand's op included, the source's not)."""
        between = [v for v in self.ancestors[operand] | {operand}
                   if v != source and (v == operand or source in self.ancestors[v])]
        by_op: dict[Hashable, Value] = {}
        for value in sorted(between, key=self.position.__getitem__):
            by_op.setdefault(self.graph.op(value), value)
        return list(by_op.values())


def _classify(flow: _DataFlow[Value], add: Add[Value]) -> Join[Value] | str:
    """The join `add` is, or why it is not one."""
    graph, a, b = flow.graph, add.a, add.b
    if not (graph.is_activation(a) and graph.is_activation(b)):
        return "an operand is a parameter, a shape or a number, not an activation"
    if a == b:
        return "both operands are the same tensor (x + x is a scaling, not a residual)"
    shape_a, shape_b = graph.shape(a), graph.shape(b)
    if shape_a is not None and shape_b is not None and tuple(shape_a) != tuple(shape_b):
        return f"operand shapes differ ({tuple(shape_a)} vs {tuple(shape_b)})"
    ancestors = flow.ancestors
    if a in ancestors[b] or b in ancestors[a]:
        skip_index = 0 if a in ancestors[b] else 1
        skip = (a, b)[skip_index]
        return Join(add, skip, (a, b)[1 - skip_index], skip_index, "identity", skip)
    common = ancestors[a] & ancestors[b]
    if not common:
        return "its operands share no ancestor: two independent inputs, not a residual join"
    block_input = max(common, key=lambda v: (flow.depth[v], flow.position[v]))
    paths = [flow.path_ops(block_input, operand) for operand in (a, b)]
    lengths = [len(path) for path in paths]
    origin = graph.label(block_input)
    if lengths[0] == lengths[1]:
        return (f"both operands are {lengths[0]}-op branches from '{origin}': no shorter skip path, cannot tell "
                f"branch from shortcut (not a residual join)")
    skip_index = 0 if lengths[0] < lengths[1] else 1
    nonlinear = sorted({graph.op_kind(v) for v in paths[skip_index]} - LINEAR_OPS)
    if nonlinear:
        return (f"the shorter operand's path from '{origin}' has nonlinear {', '.join(nonlinear)}: not a projection "
                f"shortcut")
    return Join(add, (a, b)[skip_index], (a, b)[1 - skip_index], skip_index, "projection", block_input)


def classify_joins(graph: JoinGraph[Value]) -> tuple[list[Join[Value]], list[tuple[str, str]]]:
    """The residual joins among `graph.adds()` in their order, and (where, why) for every add that is not one."""
    flow = _DataFlow(graph)
    joins: list[Join[Value]] = []
    refused: list[tuple[str, str]] = []
    for add in graph.adds():
        decision = _classify(flow, add)
        if isinstance(decision, str):
            refused.append((add.where, decision))
        else:
            joins.append(decision)
    return joins, refused
