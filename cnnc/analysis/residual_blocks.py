"""The residual blocks of an ONNX graph (seed 001): its Adds classified by `cnnc.ir.residual_joins`.

A block computes x(l+1) = x(l) + f(x(l)) (seed 001, Eq. 1). The rule that tells a residual join from any other Add
is the one `cnnc.homotopy` applies to torch.fx graphs (see `cnnc.ir.residual_joins`); this module is its
graphsurgeon adapter. The values are the *data* tensors (computed from the graph input); an Add with a constant
operand is a bias and is not considered at all. For an identity skip x(l) is the skip operand (the block input);
for a projection skip x(l) is the skip operand S(x), so that x(l+1) − x(l) is again exactly the branch. With a
post-activation block (ResNet v1, relu(x + f(x))) the measured quantity is ‖f(x)‖/‖x‖ at the join; the ReLU after
it is not part of the perturbation. Operand shapes are not compared here: the measurement sees the real values and
reports a broadcast skip itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from cnnc.eval import topological_order
from cnnc.ir.residual_joins import Add, classify_joins


@dataclass(frozen=True)
class ResidualBlock:
    """One residual join: x(l+1) = `output` = `skip` + `branch`, with x(l) = `skip`."""

    join: str  # name of the Add node
    skip: str  # tensor x(l): the block input (identity) or its projection S(x) (projection)
    branch: str  # tensor f(x(l))
    output: str  # tensor x(l+1)
    skip_index: int  # which input of the join is the skip operand (0 or 1)
    kind: str  # "identity" or "projection"
    block_input: str  # the tensor the block starts from (== skip for an identity block)

    def as_dict(self) -> dict:
        return {"join": self.join, "kind": self.kind, "block_input": self.block_input, "skip": self.skip,
                "branch": self.branch, "output": self.output}


class OnnxJoinGraph:
    """A graphsurgeon graph as a `cnnc.ir.residual_joins.JoinGraph`: values are the names of its data tensors."""

    def __init__(self, graph: gs.Graph):
        self.nodes = topological_order(list(graph.nodes))
        self.producer: dict[str, gs.Node] = {}
        self.reads: dict[str, list[str]] = {t.name: [] for t in graph.inputs}
        for node in self.nodes:
            data_inputs = [t.name for t in node.inputs if t.name in self.reads]
            if data_inputs:
                for out in node.outputs:
                    if out.name:
                        self.reads[out.name] = data_inputs
                        self.producer[out.name] = node

    def values(self) -> list[str]:
        return list(self.reads)

    def parents(self, value: str) -> list[str]:
        return self.reads[value]

    def op(self, value: str) -> int:
        return id(self.producer[value])

    def op_kind(self, value: str) -> str:
        return self.producer[value].op

    def is_activation(self, value: str) -> bool:
        return True  # every value is a data tensor

    def shape(self, value: str) -> None:
        return None

    def label(self, value: str) -> str:
        return value

    def adds(self) -> Iterator[Add[str]]:
        for node in self.nodes:
            if node.op != "Add" or len(node.inputs) != 2 or not node.outputs:
                continue
            a, b = (t.name for t in node.inputs)
            if a in self.reads and b in self.reads:
                yield Add(f"Add '{node.name}'", node, a, b)


def find_residual_blocks(graph: gs.Graph) -> tuple[list[ResidualBlock], list[tuple[str, str]]]:
    """The residual joins of `graph` in topological order, and (where, why) for every Add that is not one."""
    joins, skipped = classify_joins(OnnxJoinGraph(graph))
    blocks = [ResidualBlock(j.add.node.name, j.skip, j.branch, j.add.node.outputs[0].name, j.skip_index, j.kind,
                            j.block_input) for j in joins]
    return blocks, skipped
