"""The one topological sort of cnnc: Kahn's algorithm, smallest index first.

Taking the smallest ready index at each step returns an order that is already topological unchanged and otherwise
stays as close to the stored order as it can, which keeps reports and rewrites stable. Callers sort graphsurgeon
nodes (`topological_order`), the edges of a `cnnc.linear.hypergraph.Hypergraph`, or the nodes of an ONNX proto
(the validator), all through `topological_indices`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

import onnx_graphsurgeon as gs


class CycleError(ValueError):
    """The items could not all be ordered: `stuck` are the indices on a cycle or downstream of one."""

    def __init__(self, message: str, stuck: list[int]):
        super().__init__(message)
        self.stuck = stuck


def topological_indices(count: int, predecessors: Callable[[int], Iterable[int]]) -> list[int]:
    """range(count) ordered so that each index comes after its predecessors; raises CycleError on a cycle."""
    pending = [0] * count
    successors: list[list[int]] = [[] for _ in range(count)]
    for index in range(count):
        for predecessor in set(predecessors(index)):
            successors[predecessor].append(index)
            pending[index] += 1
    ready = [index for index, waiting in enumerate(pending) if waiting == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for successor in successors[index]:
            pending[successor] -= 1
            if pending[successor] == 0:
                heapq.heappush(ready, successor)
    if len(order) != count:
        stuck = [index for index, waiting in enumerate(pending) if waiting > 0]
        raise CycleError(f"a cycle through item(s) {stuck[:5]}", stuck)
    return order


def topological_order(nodes: list[gs.Node]) -> list[gs.Node]:
    """Nodes ordered so that each comes after the producers of its inputs (graph order breaks ties)."""
    produced_by = {t.name: i for i, node in enumerate(nodes) for t in node.outputs if t.name}

    def producers(index: int) -> list[int]:
        return [produced_by[t.name] for t in nodes[index].inputs if t.name in produced_by]

    try:
        return [nodes[i] for i in topological_indices(len(nodes), producers)]
    except CycleError as error:
        names = ", ".join(f"'{nodes[i].name}'" for i in error.stuck[:5])
        raise CycleError(f"the graph has a cycle through node(s) {names}", error.stuck) from None
