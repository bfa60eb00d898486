"""schedule: fuse same-level Convs/Gemms that read one tensor, and emit the nodes in an order of least peak memory.

Maths (seed 002). On the hypergraph of the network (cnnc.linear.hypergraph: tensors are spaces, ops are hyperedges) two ops
that read only the same tensor X and constants sit on the same level, depth(X) + 1, and neither depends on the other,
so the resolvent factors either way round: they may run in any order or as one op.
- Horizontal fusion. Convs reading X with identical kernel, strides, pads, dilations and auto_pad, group = 1 and
  constant weights compute conv(X, W_i) + b_i; stacking the weights along the output axis gives one conv whose output
  channels are [Y_1; …; Y_n] exactly: each output channel is computed from the same inputs with the same weights.
  Gemms reading A with the same transA and alpha and constant B_i concatenate op(B_i) along N, with C_i' = β_i·C_i.
  A Split on axis 1 then restores Y_1 … Y_n, unless the Y_i are read only by one Concat on axis 1 as a contiguous
  run, which then reads the fused output directly. Split takes its sizes as an input from opset 13 on, as an
  attribute before.
- Order. A topological order whose peak of live activation bytes is least (cnnc.linear.memory_order.min_peak_order: exact
  bottleneck search over the down-sets of the dependency order, greedy past a state limit); it replaces the input
  order only when its peak is strictly lower, so a second run changes nothing. The exact search costs O(ops²/64)
  (bitmask down-sets): above `exact_limit` ops (default 5,000) the best of the linear-time orders (stored, greedy,
  onnxruntime's) is used instead, never worse than the input order, and the report says so. The decision is
  recorded as a `Candidate` with the peak bytes before and after: a new order runs the same kernels on the same
  bytes, so it costs nothing at run time and is applied whenever it lowers the peak.

Cost model, per fusion group, in bytes of memory traffic (MACs are the same either way): n separate ops cost
Σ (launch + reads + |Y_i|), the fused op launch + reads + Σ|Y_i|, plus launch + 2·Σ|Y_i| for the Split and
launch + 2·|Y_i| for each activation that onnxruntime would have fused into a member (Conv/Gemm + Relu, …) but can
no longer reach through the Split. `reads` is |X|·∏kernel for a conv (the im2col lowering reads X once per tap) and
|X| for a Gemm; `launch` (`launch_cost_bytes`) is the fixed cost of one kernel in bytes (4 KiB: on onnxruntime's
CPU provider, one thread, three fused 3×3 convs ran 0.78-1.04× the time of the separate ones and three 1×1 convs +
Split 1.16-1.31×, which this default reproduces; a GPU, with costlier launches, wants more). A fusion must save more than
`min_fusion_gain` of the separate cost, and the best order after it must keep the peak at or below the input
order's peak (times 1 + `max_peak_increase`); otherwise it is declined and the figures recorded.

Preconditions: constant float weights (and bias / C), group = 1, identical geometry; a graph with subgraph ops is
not reordered (their implicit reads of outer tensors are not edges of the hypergraph). Unknown tensor sizes make the
peak a lower bound (reported); a fusion whose sizes are unknown is declined.

onnxruntime runs nodes in the stored order only with SessionOptions.execution_order = PRIORITY_BASED; its default
order is a reverse depth-first search from the outputs that ignores the stored order except for tie-breaks
(tests/test_schedule.py checks both against onnxruntime's profiler). The report gives the peak under both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.cost import candidate_id
from cnnc.linear.hypergraph import Hypergraph
from cnnc.linear.memory_order import EXACT_LIMIT, min_peak_order, onnxruntime_default_order
from cnnc.pipeline.contract import Candidate, Pass, PassResult

# Activations onnxruntime folds into a preceding Conv (FusedConv) or Gemm; a fusion puts a Split between them.
RUNTIME_FUSED_ACTIVATIONS = frozenset({"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid"})
GEOMETRY_FIELDS = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


def _fusion_key(node: gs.Node) -> tuple[tuple | None, str]:
    """What must be equal for two readers of one tensor to fuse, or (None, why this node cannot fuse)."""
    weight, why = ir.float_constant(node, 1)
    if weight is None:
        return None, why or "weight input is missing"
    _, why = ir.float_constant(node, 2)
    if why:
        return None, why
    if node.op == "Conv":
        geometry = ir.conv_geometry(node)
        if geometry.group != 1:
            return None, f"group={geometry.group}: grouped output channels are not a plain concatenation"
        return ("Conv", weight.dtype.str, weight.shape[1:],
                tuple(getattr(geometry, f) for f in GEOMETRY_FIELDS)), ""
    if weight.ndim != 2:
        return None, "B is not a matrix"
    c = ir.constant_value(node.inputs[2]) if len(node.inputs) > 2 and not ir.is_empty_input(node.inputs[2]) else None
    n = weight.shape[0] if int(node.attrs.get("transB", 0)) else weight.shape[1]
    if c is not None and c.shape not in ((), (1,), (n,), (1, n)):
        return None, f"C of shape {c.shape} is not a per-column vector"
    k = weight.shape[1] if int(node.attrs.get("transB", 0)) else weight.shape[0]
    return ("Gemm", weight.dtype.str, k, int(node.attrs.get("transA", 0)), float(node.attrs.get("alpha", 1.0))), ""


def _difference(key: tuple, other: tuple) -> str:
    if key[0] == "Conv" and key[3] != other[3]:
        return ", ".join(f"{f} {a} vs {b}" for f, a, b in zip(GEOMETRY_FIELDS, key[3], other[3]) if a != b)
    names = ("op", "dtype", "weight shape", "transA", "alpha")
    return ", ".join(f"{n} {a} vs {b}" for n, a, b in zip(names, key, other) if a != b)


def _candidates(graph: gs.Graph, result: PassResult) -> list[list[gs.Node]]:
    """Groups of ≥ 2 Convs (or Gemms) reading one tensor as data input with equal keys; skips recorded."""
    groups = []
    for tensor in graph.tensors().values():
        if len(tensor.outputs) < 2 or ir.is_constant(tensor):  # a group needs two readers (most tensors have one)
            continue
        for op in ("Conv", "Gemm"):
            readers = [n for n in tensor.outputs if n.op == op and n.inputs[0] is tensor]
            readers = list({id(n): n for n in readers}.values())
            if len(readers) < 2:
                continue
            keyed: dict[tuple, list[gs.Node]] = {}
            for node in readers:
                key, why = _fusion_key(node)
                if key is None:
                    result.skip(f"{op} '{node.name}'", f"not fused with the other readers of '{tensor.name}': {why}")
                else:
                    keyed.setdefault(key, []).append(node)
            for key, members in keyed.items():
                if len(members) > 1:
                    groups.append(members)
                    continue
                others = [k for k in keyed if k != key]
                if others:
                    result.skip(f"{op} '{members[0].name}'", f"no other reader of '{tensor.name}' has its geometry "
                                f"({_difference(key, others[0])})")
    return groups


def _concat_run(graph: gs.Graph, members: list[gs.Node]) -> tuple[gs.Node, int, list[gs.Node]] | None:
    """(Concat, start, members in run order) when the members' outputs feed only one Concat on axis 1, in a row."""
    outputs = [m.outputs[0] for m in members]
    if any(ir.sole_consumer(graph, out) is None for out in outputs):
        return None
    concat = outputs[0].outputs[0]
    rank = ir.tensor_rank(outputs[0])
    if concat.op != "Concat" or any(out.outputs[0] is not concat for out in outputs) or rank is None:
        return None
    if int(concat.attrs.get("axis", 0)) % rank != 1:
        return None
    positions = sorted(i for i, t in enumerate(concat.inputs) if any(t is out for out in outputs))
    if len(positions) != len(members) or positions[-1] - positions[0] != len(members) - 1:
        return None
    by_output = {id(m.outputs[0]): m for m in members}
    return concat, positions[0], [by_output[id(concat.inputs[p])] for p in positions]


def _traffic(members: list[gs.Node], sizes: dict, launch: int, split: bool, graph: gs.Graph) -> tuple | None:
    """(separate, fused) modelled bytes of memory traffic, or None when a size is unknown."""
    x, outs = members[0].inputs[0].name, [m.outputs[0].name for m in members]
    if x not in sizes or any(o not in sizes for o in outs):
        return None
    taps = math.prod(ir.conv_geometry(members[0]).kernel_shape) if members[0].op == "Conv" else 1
    reads = sizes[x] * taps
    separate = sum(launch + reads + sizes[o] for o in outs)
    fused = launch + reads + sum(sizes[o] for o in outs)
    if split:
        fused += launch + 2 * sum(sizes[o] for o in outs)
        for member, out in zip(members, outs):
            consumer = ir.sole_consumer(graph, member.outputs[0])
            if consumer is not None and consumer.op in RUNTIME_FUSED_ACTIVATIONS:
                fused += launch + 2 * sizes[out]
    return separate, fused


def _fused_weights(members: list[gs.Node]) -> tuple[dict, list[np.ndarray], list[int]]:
    """Attributes, constant inputs and per-member output channels of the fused op."""
    weights = [ir.constant_value(m.inputs[1]) for m in members]
    biases = [ir.float_constant(m, 2)[0] for m in members]
    if members[0].op == "Conv":
        channels = [w.shape[0] for w in weights]
        inputs = [np.concatenate(weights, axis=0)]
        if any(b is not None for b in biases):
            inputs.append(np.concatenate([b if b is not None else np.zeros(c, w.dtype)
                                          for b, c, w in zip(biases, channels, weights)]).astype(weights[0].dtype))
        return dict(members[0].attrs), inputs, channels
    trans = [int(m.attrs.get("transB", 0)) for m in members]
    channels = [w.shape[0] if t else w.shape[1] for w, t in zip(weights, trans)]
    attrs = {"alpha": float(members[0].attrs.get("alpha", 1.0)), "transA": int(members[0].attrs.get("transA", 0))}
    if all(t == 0 for t in trans):
        attrs["transB"], inputs = 0, [np.concatenate(weights, axis=1)]
    else:  # store op(B)ᵀ (N × K) for every member: transB = 1, the layout of torch's Linear
        attrs["transB"] = 1
        inputs = [np.concatenate([w if t else w.T for w, t in zip(weights, trans)], axis=0)]
    if any(b is not None for b in biases):
        attrs["beta"] = 1.0
        columns = [np.zeros(c) if b is None else np.broadcast_to(
            float(m.attrs.get("beta", 1.0)) * b.astype(np.float64).reshape(-1), (c,)) for b, c, m in
            zip(biases, channels, members)]
        inputs.append(np.concatenate(columns).astype(weights[0].dtype))
    return attrs, inputs, channels


def _fuse(graph: gs.Graph, members: list[gs.Node]) -> str:
    """Replace `members` by one op (+ Split), inserted where the first of them was: the order stays topological."""
    run = _concat_run(graph, members)
    if run is not None:
        members = run[2]
    first, x = members[0], members[0].inputs[0]
    attrs, constants, channels = _fused_weights(members)
    shape = members[0].outputs[0].shape
    if shape is not None and all(m.outputs[0].shape is not None for m in members):
        shape = list(shape[:1]) + [sum(channels)] + list(shape[2:])
    dtype = first.outputs[0].dtype or constants[0].dtype
    fused_out = gs.Variable(ir.unique_name(graph, first.name + "_fused"), dtype=dtype, shape=shape)
    inputs = [x] + [ir.make_constant(f"{first.name}_fused_{k}", c, graph) for k, c in zip("WB", constants)]
    fused = gs.Node(first.op, ir.unique_name(graph, first.name + "_fused"), attrs, inputs, [fused_out])
    new_nodes = [fused]
    outputs = [m.outputs[0] for m in members]
    position = min(i for i, n in enumerate(graph.nodes) if any(n is m for m in members))
    for member in members:
        member.outputs.clear()
        member.inputs.clear()
    if run is not None:
        concat, start, _ = run
        concat.inputs = list(concat.inputs[:start]) + [fused_out] + list(concat.inputs[start + len(members):])
        tail = f"read directly by Concat '{concat.name}'"
    else:
        sizes = np.asarray(channels, dtype=np.int64)
        if graph.opset >= 13:
            split = gs.Node("Split", ir.unique_name(graph, first.name + "_split"), {"axis": 1},
                            [fused_out, ir.make_constant(first.name + "_split_sizes", sizes, graph)], outputs)
        else:
            split = gs.Node("Split", ir.unique_name(graph, first.name + "_split"),
                            {"axis": 1, "split": sizes.tolist()}, [fused_out], outputs)
        new_nodes.append(split)
        tail = f"+ Split '{split.name}'"
    gone = {id(m) for m in members}
    kept = [n for n in graph.nodes if id(n) not in gone]
    graph.nodes = kept[:position] + new_nodes + kept[position:]  # `position` nodes before it are all kept
    return f"fused {len(members)}× {first.op} reading '{x.name}' into '{fused.name}' ({sum(channels)} outputs) {tail}"


def _emit(graph: gs.Graph, view: Hypergraph, order: list[int]) -> None:
    """Store the nodes in `order`; each Constant op goes just before its first reader."""
    nodes = list(graph.nodes)
    constant_producer = {id(t): n for n in nodes if n.op == "Constant" for t in n.outputs}
    placed, emitted = set(), []
    for index in order:
        node = nodes[view.node_index[index]]
        for tensor in node.inputs:
            producer = constant_producer.get(id(tensor))
            if producer is not None and id(producer) not in placed:
                placed.add(id(producer))
                emitted.append(producer)
        emitted.append(node)
    graph.nodes = [n for n in nodes if n.op == "Constant" and id(n) not in placed] + emitted


def _shapes_missing(graph: gs.Graph) -> bool:
    """Whether some non-constant tensor has no inferred shape or dtype (then shape inference must run first)."""
    return any(isinstance(t, gs.Variable) and (t.shape is None or t.dtype is None)
               for node in graph.nodes for t in (*node.inputs, *node.outputs) if not ir.is_empty_input(t))


def _figures(view: Hypergraph) -> dict:
    levels = view.levels()
    return {"ops": len(view.edges), "depth": len(levels) - 1, "level_widths": [lv.width for lv in levels],
            "max_width": max((lv.width for lv in levels[1:]), default=0),
            "critical_path": [view.edges[i].name for i in view.critical_path()],
            "peak_bytes": view.peak_bytes(),
            "peak_bytes_onnxruntime_default_order": view.peak_bytes(onnxruntime_default_order(view)),
            "peak_is_lower_bound": bool(view.unsized)}


@dataclass(frozen=True)
class Schedule(Pass):
    """Fuse same-level Convs/Gemms that read one tensor; emit the nodes in an order of least peak memory."""

    name = "schedule"
    summary = "fuse same-level Convs/Gemms reading one tensor (+Split); order nodes for least peak activation memory"
    fuse: bool = True
    reorder: bool = True
    batch: int = 1  # batch size for symbolic batch dimensions in the memory figures
    launch_cost_bytes: int = 4096  # fixed cost of one kernel launch, in bytes of memory traffic (CPU-calibrated)
    min_fusion_gain: float = 0.0  # a fusion must save more than this fraction of the separate ops' modelled traffic
    state_limit: int = 100_000  # down-sets the exact order search may visit before it falls back to greedy
    exact_limit: int = EXACT_LIMIT  # above this many ops, linear-time orders only (the exact search is quadratic)
    max_peak_increase: float = 0.0  # a fusion may raise the peak by this fraction of the input order's peak

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult()
        if not ir.is_topologically_sorted(graph):
            graph.toposort()
        if _shapes_missing(graph):  # the manager refreshes after every change; a direct call may not have
            ir.refresh_shapes(graph)
        view = Hypergraph.from_graph(graph, self.batch, infer_shapes=False)
        bound = view.peak_bytes()
        result.stats["before"] = before = _figures(view)
        if self.fuse:
            for members in _candidates(graph, result):
                self._try_fusion(graph, members, view.sizes, bound, result)
        if result.changed:  # (each view is a pass over the whole graph: rebuilt only when a fusion rewired it)
            view = Hypergraph.from_graph(graph, self.batch, infer_shapes=False)
        if self.reorder:
            if any(ir.has_subgraph(n) for n in graph.nodes):
                result.skip("node order", "the graph has ops with subgraphs, whose implicit inputs are not modelled")
            else:
                view = self._reorder(graph, view, result)
        result.stats["after"] = _figures(view) if result.changed else dict(before)
        return result

    def _reorder(self, graph: gs.Graph, view: Hypergraph, result: PassResult) -> Hypergraph:
        """Emit the least-peak order found when it beats the stored one; record the decision as a Candidate."""
        order, proven = min_peak_order(view, self.state_limit, self.exact_limit)
        current, best = view.peak_bytes(), view.peak_bytes(order)
        if proven:
            kind = "least possible"
        elif len(view.edges) > self.exact_limit:
            kind = (f"best linear-time order (the exact search is skipped above exact_limit={self.exact_limit} ops; "
                    f"this graph has {len(view.edges)})")
        else:
            kind = f"best found (search limit of {self.state_limit} states reached)"
        saves = best < current
        reason = (f"peak live activations {current} -> {best} bytes ({kind}); the same kernels run on the same "
                  "bytes, so a new order is free at run time" if saves else
                  f"the input order's peak of {current} bytes is already the {kind}")
        result.candidates.append(Candidate(
            candidate_id(["schedule:node-order", *view.sinks]), "node order", "pays" if saves else "loses", saves,
            reason, {"peak_bytes_before": current, "peak_bytes_after": best, "ops": len(view.edges),
                     "proven_least": proven, "peak_is_lower_bound": bool(view.unsized)}))
        if not saves:
            result.skip("node order", reason)
            return view
        _emit(graph, view, order)
        result.did(f"reordered {len(order)} ops: peak live activations {current} -> {best} bytes ({kind})")
        return Hypergraph.from_graph(graph, self.batch, infer_shapes=False)

    def _try_fusion(self, graph: gs.Graph, members: list[gs.Node], sizes: dict, bound: int,
                    result: PassResult) -> None:
        where = f"{members[0].op}s {', '.join(repr(m.name) for m in members)}"
        traffic = _traffic(members, sizes, self.launch_cost_bytes, _concat_run(graph, members) is None, graph)
        if traffic is None:
            result.skip(where, "a tensor size is unknown, so the fusion cannot be costed")
            return
        separate, fused = traffic
        if separate - fused <= self.min_fusion_gain * separate:
            result.skip(where, f"fusion would not pay: modelled traffic {separate} -> {fused} bytes "
                               f"(needs a saving above {self.min_fusion_gain:.0%}; launch_cost_bytes="
                               f"{self.launch_cost_bytes})")
            return
        trial = graph.copy()  # same node order: members are found by position
        position = {id(n): i for i, n in enumerate(graph.nodes)}
        _fuse(trial, [trial.nodes[position[id(m)]] for m in members])
        view = Hypergraph.from_graph(trial, self.batch, infer_shapes=False)
        order, _ = min_peak_order(view, self.state_limit, self.exact_limit)
        peak = min(view.peak_bytes(order), view.peak_bytes())
        if peak > bound * (1 + self.max_peak_increase):
            result.skip(where, f"fusion would raise the least peak live activations to {peak} bytes, above the "
                               f"input order's {bound} (max_peak_increase={self.max_peak_increase:g})")
            return
        result.did(_fuse(graph, members) + f": modelled traffic {separate} -> {fused} bytes")
