"""A cheap, restorable snapshot of a graphsurgeon graph, for the manager's rollback of a failing pass.

`graph.copy()` rebuilds every node and tensor (with graphsurgeon's synchronised input/output lists): ~0.1 ms per
node, paid before *every* pass although a rollback is rare; on a 100k-node chain the snapshots alone cost tens of
seconds. A pass rewrites the graph by reassigning Python state (node inputs/outputs and attributes, tensor names,
shapes and dtypes, `Variable.to_constant`, the graph's node and input/output lists), and never modifies a
constant's array in place (`cnnc.ir.make_constant`). So a snapshot of that state, object by object, is enough:

- each node and tensor's `__class__` and `__dict__` (shallow; a node's `attrs` and their lists copied), and the
  contents of its input and output lists, in order;
- the graph's `__dict__` with its node, input and output lists copied.

Restoring writes them back without graphsurgeon's list synchronisation (both sides of every edge are restored
from the snapshot, so synchronising would duplicate them). A graph with subgraphs (If, Loop, Scan) falls back to
`graph.copy()`: a pass may rewrite inside a subgraph, which this snapshot does not cover.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from cnnc import ir


class Snapshot:
    """The state of `graph` now; `restore()` returns the graph as it was (the same object, or the copy)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.copy = graph.copy() if any(ir.has_subgraph(n) for n in graph.nodes) else None
        if self.copy is not None:
            return
        self.graph_state = {**graph.__dict__, "nodes": list(graph.nodes), "inputs": list(graph.inputs),
                            "outputs": list(graph.outputs)}
        self.objects = [_state(node) for node in graph.nodes]
        self.objects += [_state(tensor) for tensor in graph.tensors().values()]

    def restore(self) -> gs.Graph:
        if self.copy is not None:
            return self.copy
        for obj, cls, state, inputs, outputs in self.objects:
            obj.__class__ = cls
            obj.__dict__.clear()
            obj.__dict__.update(state)
            if isinstance(obj, gs.Node):
                obj.__dict__["attrs"] = _attrs(state["attrs"])
            # The list objects themselves are the ones saved in `state`; refill them without synchronisation.
            list.clear(obj.inputs)
            list.extend(obj.inputs, inputs)
            list.clear(obj.outputs)
            list.extend(obj.outputs, outputs)
        self.graph.__dict__.clear()
        self.graph.__dict__.update({**self.graph_state, "nodes": list(self.graph_state["nodes"]),
                                    "inputs": list(self.graph_state["inputs"]),
                                    "outputs": list(self.graph_state["outputs"])})
        return self.graph


def _state(obj: gs.Node | gs.Tensor) -> tuple:
    state = dict(obj.__dict__)
    if isinstance(obj, gs.Node):
        state["attrs"] = _attrs(obj.attrs)
    return obj, obj.__class__, state, list(obj.inputs), list(obj.outputs)


def _attrs(attrs: dict) -> dict:
    """A copy of a node's attributes, list values included (a pass may edit `pads` or `kernel_shape` in place)."""
    copy = type(attrs)(attrs)  # (a plain copy first: most nodes have no list attribute, and this runs per node)
    for key, value in attrs.items():
        if isinstance(value, list):
            copy[key] = list(value)
    return copy
