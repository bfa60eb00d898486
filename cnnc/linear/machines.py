"""Linear machines: the maximal connected sets of ops that are affine in their non-constant inputs.

Seed 002 reads a network as a machine f on X = X0 ⊕ … ⊕ Xn whose output is the resolvent (id − f)^-1(x0); seed 000's
Theorem 3.1 says a network made only of linear layers, skips, paddings and resamplings is one affine map
f(X) = W X + B. In a ReLU network the linear machines are the pieces between nonlinearities; a fully linear network
is one machine. `collapse` replaces each machine by the cheapest exact equivalent. Which ops are linear, and under
which condition, is the `linear` column of the op table (cnnc.ir.ops.linear_reason).

A machine must be *convex*: no path may leave it through an outside op and come back in, or replacing it by one op
would create a cycle. Components that are not convex are split at the re-entry point until they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.ir.ops import DATA_MOVEMENT_OPS, constant_or_absent, linear_reason


@dataclass
class LinearMachine:
    """A convex set of linear nodes with the tensors that enter and leave it."""

    nodes: list[gs.Node]
    inputs: list[gs.Tensor] = field(default_factory=list)
    outputs: list[gs.Tensor] = field(default_factory=list)

    @property
    def has_arithmetic(self) -> bool:
        return any(node.op not in DATA_MOVEMENT_OPS for node in self.nodes)

    def describe(self) -> str:
        ops: dict[str, int] = {}
        for node in self.nodes:
            ops[node.op] = ops.get(node.op, 0) + 1
        body = ", ".join(f"{count}×{op}" for op, count in sorted(ops.items()))
        return f"machine of {len(self.nodes)} ops ({body}) from {[t.name for t in self.inputs]} " \
               f"to {[t.name for t in self.outputs]}"


def _components(nodes: list[gs.Node]) -> list[list[gs.Node]]:
    """Connected components of `nodes`, connected through tensors one produces and another reads."""
    member = {id(n): n for n in nodes}
    parent = {id(n): id(n) for n in nodes}

    def find(key):
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for node in nodes:
        for tensor in node.outputs:
            for consumer in tensor.outputs:
                if id(consumer) in member:
                    parent[find(id(consumer))] = find(id(node))
    groups: dict[int, list[gs.Node]] = {}
    for node in nodes:  # graph order is topological order, and it is kept inside each group
        groups.setdefault(find(id(node)), []).append(node)
    return list(groups.values())


def _reenters(component: list[gs.Node], position: dict[int, int]) -> set[int]:
    """ids of component nodes reachable from the component through at least one outside node.

    `position` is each graph node's index in a topological order. A path into a component node at position p only
    passes through nodes before p, so the walk never goes past the component's last position: it stays within the
    component's span instead of running to the end of the graph (which made this quadratic on long chains: every
    Conv of a 100k-node Conv/Relu chain is a component, and each walk visited everything downstream)."""
    inside = {id(n) for n in component}
    last = max(position[id(n)] for n in component)
    frontier = [c for n in component for t in n.outputs for c in t.outputs
                if id(c) not in inside and position.get(id(c), -1) < last]
    seen: set[int] = set()
    hit: set[int] = set()
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for tensor in node.outputs:
            for consumer in tensor.outputs:
                if id(consumer) in inside:
                    hit.add(id(consumer))
                if position.get(id(consumer), -1) <= last:  # (a node not in the graph: walked, as before)
                    frontier.append(consumer)  # keep walking: everything downstream of a re-entry re-enters too
    return hit


def _convex_parts(component: list[gs.Node], position: dict[int, int]) -> list[list[gs.Node]]:
    downstream = _reenters(component, position)
    if not downstream:
        return [component]
    parts = []
    for piece in ([n for n in component if id(n) not in downstream], [n for n in component if id(n) in downstream]):
        for sub in _components(piece):
            parts.extend(_convex_parts(sub, position))
    return parts


def machine_from_nodes(graph: gs.Graph, nodes: list[gs.Node]) -> LinearMachine | None:
    """The machine formed by `nodes` (topologically ordered) with its boundary tensors, or None if it has none."""
    inside = {id(n) for n in nodes}
    produced = {id(t) for n in nodes for t in n.outputs}
    inputs, outputs, seen_in, seen_out = [], [], set(), set()
    for node in nodes:
        for tensor in node.inputs:
            if id(tensor) not in produced and not constant_or_absent(tensor) and id(tensor) not in seen_in:
                seen_in.add(id(tensor))
                inputs.append(tensor)
        for tensor in node.outputs:
            used_outside = any(id(c) not in inside for c in tensor.outputs)
            if (used_outside or ir.is_graph_output(graph, tensor)) and id(tensor) not in seen_out:
                seen_out.add(id(tensor))
                outputs.append(tensor)
    return LinearMachine(nodes, inputs, outputs) if inputs and outputs else None


def find_linear_machines(graph: gs.Graph, supported=None) -> list[LinearMachine]:
    """Maximal convex linear machines of `graph`, in topological order of their first node.

    `supported(node) -> str | None` can veto nodes further (e.g. ops the float64 evaluator cannot run).
    """
    if not ir.is_topologically_sorted(graph):  # keep an order that is already valid (e.g. schedule's)
        graph.toposort()
    linear = [n for n in graph.nodes if linear_reason(n) is None and (supported is None or supported(n) is None)]
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    machines = []
    for component in _components(linear):
        for part in _convex_parts(component, position):
            machine = machine_from_nodes(graph, part)
            if machine is not None:
                machines.append(machine)
    return machines


def split_at_outputs(graph: gs.Graph, machine: LinearMachine) -> list[LinearMachine]:
    """One sub-machine per output: the nodes it depends on, stopping at the machine's other outputs.

    A machine with several outputs (a residual sum that also feeds the next linear op) has no single-conv form as a
    whole, but each piece may. Pieces that would share a node are not returned (a node is replaced at most once).
    """
    if len(machine.outputs) < 2:
        return []
    inside = {id(n): n for n in machine.nodes}
    order = {id(n): i for i, n in enumerate(machine.nodes)}
    boundary = {id(t) for t in machine.outputs}
    cones, owner = [], {}
    for output in machine.outputs:
        cone, stack = {}, [output]
        while stack:
            tensor = stack.pop()
            for producer in tensor.inputs:
                if id(producer) in inside and id(producer) not in cone:
                    cone[id(producer)] = producer
                    stack.extend(t for t in producer.inputs if id(t) not in boundary)
        cones.append(cone)
        for key in cone:
            owner[key] = owner.get(key, 0) + 1
    pieces = []
    for cone in cones:
        if cone and all(owner[key] == 1 for key in cone):
            piece = machine_from_nodes(graph, sorted(cone.values(), key=lambda n: order[id(n)]))
            if piece is not None:
                pieces.append(piece)
    return pieces


def _reaches_without(machine: LinearMachine, source: gs.Tensor, target: gs.Tensor, cut: gs.Tensor) -> bool:
    inside = {id(n) for n in machine.nodes}
    stack, seen = [source], {id(source)}
    while stack:
        tensor = stack.pop()
        if tensor is target:
            return True
        for consumer in tensor.outputs:
            if id(consumer) in inside:
                for out in consumer.outputs:
                    if out is not cut and id(out) not in seen:
                        seen.add(id(out))
                        stack.append(out)
    return False


def cut_tensors(machine: LinearMachine) -> list[gs.Tensor]:
    """Tensors every path from the single input to the single output goes through (in topological order).

    At such a tensor t the machine factors, f = f2 ∘ f1 with f1: input -> t and f2: t -> output, so its dense map
    factors too, W = W2·W1: a narrow t (a pooled feature vector) makes two thin Gemms cheaper than one wide one.
    """
    if len(machine.inputs) != 1 or len(machine.outputs) != 1:
        return []
    source, target = machine.inputs[0], machine.outputs[0]
    candidates = [t for n in machine.nodes for t in n.outputs if t is not target]
    return [t for t in candidates if not _reaches_without(machine, source, target, t)]


def split_at_tensor(graph: gs.Graph, machine: LinearMachine, cut: gs.Tensor) -> tuple[LinearMachine, LinearMachine]:
    """The two machines before and after a cut tensor (see `cut_tensors`)."""
    before: dict[int, gs.Node] = {}
    stack = [cut]
    inside = {id(n) for n in machine.nodes}
    while stack:
        for producer in stack.pop().inputs:
            if id(producer) in inside and id(producer) not in before:
                before[id(producer)] = producer
                stack.extend(producer.inputs)
    first = [n for n in machine.nodes if id(n) in before]
    second = [n for n in machine.nodes if id(n) not in before]
    return machine_from_nodes(graph, first), machine_from_nodes(graph, second)


CHAIN_PASSENGERS = ("BatchNormalization", "Mul", "Add", "Sub", "Div", "Identity", "Dropout")


def conv_chain(machine: LinearMachine) -> list[list[gs.Node]] | None:
    """The machine as a path of convs, one group per Conv: the conv and the ops after it up to the next conv (ops
    before the first conv join the first group). None unless the machine has one input and one output and every node
    reads only the previous node's output (or the input) besides constants, and is a Conv or a per-channel/identity
    op (`CHAIN_PASSENGERS`; whether its constants are per channel is checked by the conv form's geometry).

    Consecutive groups i..j form a sub-machine with one input and one output: the segments `collapse` composes when
    the whole chain does not pay as one conv (`cnnc.cost.segments`)."""
    if len(machine.inputs) != 1 or len(machine.outputs) != 1:
        return None
    current, groups, leading = machine.inputs[0], [], []
    for node in machine.nodes:
        variables = [t for t in node.inputs if not constant_or_absent(t)]
        if len(node.outputs) != 1 or len(variables) != 1 or variables[0] is not current:
            return None
        if node.op == "Conv":
            groups.append(leading + [node])
            leading = []
        elif node.op in CHAIN_PASSENGERS:
            (groups[-1] if groups else leading).append(node)
        else:
            return None
        current = node.outputs[0]
    return groups if groups and current is machine.outputs[0] else None
