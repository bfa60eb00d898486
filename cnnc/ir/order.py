"""The one topological sort of cnnc: Kahn's algorithm, smallest index first.

Taking the smallest ready index at each step returns an order that is already topological unchanged and otherwise
stays as close to the stored order as it can, which keeps reports and rewrites stable. Callers sort graphsurgeon
nodes (`topological_order`), the edges of a `cnnc.linear.hypergraph.Hypergraph`, or the nodes of an ONNX proto
(the validator), all through `topological_indices`.

`tidy` (after every rewrite) and `is_topologically_sorted` keep a graph in topological order without regrouping it:
graphsurgeon's cleanup and toposort run only when a cheap linear check finds dead nodes or an order that is not
valid (on a 100k-node graph each costs seconds, and most passes change nothing).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

import onnx_graphsurgeon as gs

from cnnc.ir.library_log import routed_graphsurgeon_log


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


def tidy(graph: gs.Graph) -> gs.Graph:
    """Drop dead nodes and tensors and restore topological order; run after every rewrite.

    graphsurgeon's toposort regroups all nodes by depth level, so it is run only when the order is not already
    topological: an order that is valid (the exporter's, or the one the schedule pass chose for peak memory) is kept.
    """
    with routed_graphsurgeon_log():
        if _may_hold_dead_nodes(graph):  # graphsurgeon's cleanup: ~25 µs a node even when nothing is dead
            graph.cleanup(remove_unused_graph_inputs=False)
        return graph if is_topologically_sorted(graph) else graph.toposort()


def _may_hold_dead_nodes(graph: gs.Graph) -> bool:
    """False only when graphsurgeon's cleanup would change nothing: no local functions, no subgraphs, no graph input
    with a producer, and every node reached backwards from the graph outputs (what cleanup keeps)."""
    if graph.functions or any(tensor.inputs for tensor in graph.inputs):
        return True
    used: set[int] = set()
    stack = list(graph.outputs)
    while stack:
        for producer in stack.pop().inputs:
            if id(producer) not in used:
                used.add(id(producer))
                stack.extend(producer.inputs)
    return any(id(node) not in used or has_subgraph(node) for node in graph.nodes)


def has_subgraph(node: gs.Node) -> bool:
    """Whether `node` holds a subgraph (If, Loop, Scan): what `any(node.subgraphs())` says, without graphsurgeon's
    generator and visited set (~5 µs a node, paid on every node by each order check)."""
    return any(isinstance(value, gs.Graph) for value in node.attrs.values())


def is_topologically_sorted(graph: gs.Graph) -> bool:
    """Whether every node reads only graph inputs, constants and tensors written by earlier nodes. Nodes with
    subgraphs read outer tensors implicitly, so a graph that has any is reported unsorted (toposort handles them)."""
    available = {id(tensor) for tensor in graph.inputs}
    for node in graph.nodes:
        if has_subgraph(node):
            return False
        for tensor in node.inputs:
            if tensor.inputs and id(tensor) not in available:
                return False
        available.update(id(tensor) for tensor in node.outputs)
    return True
