"""Polyphase layouts and the region rewrite of `destride` (seed 004, Theorem 2); the conv maths is in passes/destride.py.

A tensor of spatial lengths L held with factor F (one per axis, F | L) is stored as C·ΠF channels of L/F: phase r of
channel c holds t[c, F·q + r], in phase-major (q·C + c, as SpaceToDepth) or channel-major (c·P + q) order.

Whole-network mode. Elementwise ops act on every position alike, so they commute with the rearrangement (the
paper's η in Eq. 23) when their other operands are rearranged alike: a tensor of the same shape takes the same
factor, a per-channel constant is repeated over the phases, a scalar is left alone. A conv with stride s that writes
its output at factor G reads its input at factor s·G. Factors are assigned backwards, as in the paper's induction
from the last layer: a tensor takes the factor its readers in the region ask for (the most common request it can
hold, i.e. that divides its lengths; factor 1 when none). A tensor read outside the region (Flatten, Gemm, a global
pool, anything unknown) or that is a graph output is re-assembled to the original layout at that edge; a reader
asking for another factor gets its own rearrangement. Graph inputs keep their layout and are rearranged at the edge
into the region, so the model's interface is unchanged. Per-conv mode is the same rewrite with every factor 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir

PHASE_MAJOR, CHANNEL_MAJOR = "phase-major", "channel-major"
UNARY_ELEMENTWISE = frozenset({  # act on each element alone (attributes, or scalar operands such as Clip's bounds)
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "Neg", "Abs", "Identity", "Clip", "Erf", "Exp", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round",
    "Sign", "Mish", "ThresholdedRelu"})
BINARY_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "PRelu", "Pow"})

Factor = tuple[int, ...]


def is_one(factor: Factor) -> bool:
    return all(f == 1 for f in factor)


def spatial_lengths(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The static spatial lengths of an N×C×L… tensor (static C too), or None."""
    shape = getattr(tensor, "shape", None)
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    return tuple(shape[2:])


def holds(tensor: gs.Tensor, factor: Factor) -> bool:
    lengths = spatial_lengths(tensor)
    return lengths is not None and len(lengths) == len(factor) and all(n % f == 0 for n, f in zip(lengths, factor))


def expand_channels(vector: np.ndarray, phases: int, layout: str) -> np.ndarray:
    """A per-output-channel vector repeated over `phases` phases in `layout` order."""
    return np.repeat(vector, phases) if layout == CHANNEL_MAJOR else np.tile(vector, phases)


def elementwise_operands(node: gs.Node) -> list[str] | None:
    """Per input of a commuting elementwise node: 'tensor' (same shape as the output: rearranged alike), 'channel'
    (a per-channel constant: repeated over phases) or 'scalar' (left alone); None when the node does not commute."""
    if len(node.outputs) != 1 or spatial_lengths(node.outputs[0]) is None:
        return None
    out = node.outputs[0]
    if node.op in UNARY_ELEMENTWISE:
        return ["tensor"] + ["scalar"] * (len(node.inputs) - 1)
    if node.op not in BINARY_ELEMENTWISE:
        return None
    kinds = []
    for tensor in node.inputs:
        value = ir.constant_value(tensor)
        if value is not None:
            shape = (1,) * (len(out.shape) - value.ndim) + value.shape
            if value.ndim > len(out.shape) or shape[0] != 1 or any(d != 1 for d in shape[2:]):
                return None  # varies over space: would need the same rearrangement, which is left to a later pass
            kinds.append("scalar" if value.size == 1 else "channel")
        elif list(getattr(tensor, "shape", None) or []) == list(out.shape):
            kinds.append("tensor")
        else:
            return None
    return kinds if "tensor" in kinds else None


def plan_network(graph: gs.Graph, specs: dict) -> tuple[list[gs.Node], dict[int, Factor], dict[int, list[str]]]:
    """The region (eligible convs and commuting elementwise ops, in topological order), the factor of each region
    output tensor (by id) and the operand kinds of each elementwise node. `specs` maps id(conv) -> destride.ConvSpec."""
    region, operands = [], {}
    for node in graph.nodes:
        kinds = None if id(node) in specs else elementwise_operands(node)
        if id(node) in specs or kinds is not None:
            region.append(node)
            if kinds is not None:
                operands[id(node)] = kinds
    in_region = {id(node) for node in region}
    factors: dict[int, Factor] = {}
    for node in reversed(region):
        out, requests = node.outputs[0], Counter()
        for reader in out.outputs:
            if id(reader) in in_region:
                wanted = input_factor(specs, reader, factors[id(reader.outputs[0])])
                if holds(out, wanted):
                    requests[wanted] += sum(1 for t in reader.inputs if t is out)
        ones = (1,) * (len(specs[id(node)].lengths) if id(node) in specs else len(out.shape) - 2)
        # The most common request; ties go to the larger factor (more of the work at stride 1).
        factors[id(out)] = max(requests.items(), key=lambda kv: (kv[1], int(np.prod(kv[0]))), default=(ones, 0))[0]
    return region, factors, operands


def input_factor(specs: dict, node: gs.Node, out_factor: Factor) -> Factor:
    spec = specs.get(id(node))
    return tuple(s * g for s, g in zip(spec.strides, out_factor)) if spec is not None else out_factor


class Builder:
    """Appends nodes to the graph; names derive from the node being replaced."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.issued: set[str] = set()  # names handed out for tensors not yet attached to the graph

    def name(self, hint: str) -> str:
        name, index = ir.unique_name(self.graph, hint), 0
        while name in self.issued:
            index += 1
            name = ir.unique_name(self.graph, f"{hint}_{index}")
        self.issued.add(name)
        return name

    def const(self, hint: str, value) -> gs.Constant:
        return gs.Constant(self.name(hint), np.ascontiguousarray(value))

    def op(self, op: str, inputs, hint: str, attrs=None, out: gs.Variable | None = None, dtype=None) -> gs.Variable:
        if out is None:
            out = gs.Variable(self.name(hint), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, self.name(hint), dict(attrs or {}), list(inputs), [out]))
        return out

    def slice(self, x: gs.Tensor, starts, ends, axes, steps, hint: str, out=None) -> gs.Variable:
        ints = [self.const(f"{hint}_{name}", np.array(v, np.int64))
                for name, v in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
        return self.op("Slice", [x, *ints], hint, out=out, dtype=x.dtype)

    def take_channels(self, x: gs.Tensor, indices, hint: str) -> gs.Variable:
        indices = [int(i) for i in indices]
        if indices == list(range(indices[0], indices[0] + len(indices))):
            return self.slice(x, [indices[0]], [indices[-1] + 1], [1], [1], hint)
        return self.op("Gather", [x, self.const(hint + "_indices", np.array(indices, np.int64))], hint,
                       {"axis": 1}, dtype=x.dtype)

    def rearrange(self, x: gs.Tensor, channels: int, lengths, factors, layout: str, extension, hint: str):
        """x (original layout) zero-extended (> 0) or cropped (< 0) at the end of each axis, at `factors`."""
        rank = len(lengths)
        if any(e > 0 for e in extension):
            pads = [0] * (rank + 2) + [0, 0] + [max(e, 0) for e in extension]
            x = self.op("Pad", [x, self.const(hint + "_pads", np.array(pads, np.int64))], hint + "_pad",
                        dtype=x.dtype)
        if any(e < 0 for e in extension):
            axes = [i for i, e in enumerate(extension) if e < 0]
            x = self.slice(x, [0] * len(axes), [lengths[i] + extension[i] for i in axes], [i + 2 for i in axes],
                           [1] * len(axes), hint + "_crop")
        lengths = [n + e for n, e in zip(lengths, extension)]
        if is_one(factors):
            return x
        if layout == PHASE_MAJOR and rank == 2 and factors[0] == factors[1]:
            return self.op("SpaceToDepth", [x], hint, {"blocksize": int(factors[0])}, dtype=x.dtype)
        split = [0, channels] + [v for n, f in zip(lengths, factors) for v in (n // f, f)]
        phases, rows = [3 + 2 * i for i in range(rank)], [2 + 2 * i for i in range(rank)]
        perm = [0] + phases + [1] + rows if layout == PHASE_MAJOR else [0, 1] + phases + rows
        x = self.op("Reshape", [x, self.const(hint + "_split", np.array(split, np.int64))], hint + "_split",
                    dtype=x.dtype)
        x = self.op("Transpose", [x], hint + "_perm", {"perm": perm}, dtype=x.dtype)
        merged = [0, channels * int(np.prod(factors))] + [n // f for n, f in zip(lengths, factors)]
        return self.op("Reshape", [x, self.const(hint + "_shape", np.array(merged, np.int64))], hint, dtype=x.dtype)

    def reassemble(self, y: gs.Tensor, channels: int, lengths, factors, layout: str, hint: str, out=None):
        """The inverse of `rearrange` without extension: factor-`factors` map -> original layout, into `out`."""
        rank = len(lengths)
        if rank == 2 and factors[0] == factors[1]:
            mode = "DCR" if layout == PHASE_MAJOR else "CRD"
            return self.op("DepthToSpace", [y], hint, {"blocksize": int(factors[0]), "mode": mode}, out, y.dtype)
        rows = [n // f for n, f in zip(lengths, factors)]
        if layout == PHASE_MAJOR:
            split, perm = [0, *factors, channels, *rows], [0, rank + 1]
            perm += [v for i in range(rank) for v in (rank + 2 + i, 1 + i)]
        else:
            split, perm = [0, channels, *factors, *rows], [0, 1]
            perm += [v for i in range(rank) for v in (rank + 2 + i, 2 + i)]
        y = self.op("Reshape", [y, self.const(hint + "_split", np.array(split, np.int64))], hint + "_split",
                    dtype=y.dtype)
        y = self.op("Transpose", [y], hint + "_perm", {"perm": perm}, dtype=y.dtype)
        shape = self.const(hint + "_shape", np.array([0, channels, *lengths], np.int64))
        return self.op("Reshape", [y, shape], hint, out=out, dtype=y.dtype)


def rewrite_region(builder: Builder, region: list[gs.Node], specs: dict, factors: dict[int, Factor],
                   operands: dict[int, list[str]], layout_of: Callable[[gs.Node], str], emit_conv) -> list[str]:
    """Rewrite `region` so that each output lives at its factor; returns the edges where maps were re-assembled.

    `emit_conv(spec, source, source_factor, out_factor, layout, target)` writes the stride-1 polyphase conv.
    """
    in_region = {id(node) for node in region}
    graph = builder.graph
    needed = {id(t) for node in region for t in node.outputs
              if ir.is_graph_output(graph, t) or any(id(c) not in in_region for c in t.outputs)}
    polyphase, assembled, rearranged, exits = {}, set(), {}, []

    def original(t: gs.Tensor) -> gs.Tensor:
        factor = factors.get(id(t))
        if factor is not None and not is_one(factor) and id(t) not in assembled:
            assembled.add(id(t))
            readers = sorted({c.op for c in t.outputs} | ({"graph output"} if ir.is_graph_output(graph, t) else set()))
            exits.append(f"'{t.name}' re-assembled from factor {factor} for {', '.join(readers) or 'a rearrangement'}")
            builder.reassemble(polyphase[id(t)], t.shape[1], t.shape[2:], factor, layout_of(None), t.name + "_d2s",
                               out=t)
        return t

    def at_factor(t: gs.Tensor, factor: Factor) -> gs.Tensor:
        if is_one(factor):
            return original(t)
        if factors.get(id(t)) == factor:
            return polyphase[id(t)]
        if (id(t), factor) not in rearranged:
            rearranged[id(t), factor] = builder.rearrange(original(t), t.shape[1], t.shape[2:], factor,
                                                          layout_of(None), (0,) * len(factor), t.name + "_s2d")
        return rearranged[id(t), factor]

    for node in region:
        out, spec = node.outputs[0], specs.get(id(node))
        out_factor = factors.get(id(out)) or (1,) * (len(spec.lengths) if spec is not None else len(out.shape) - 2)
        if is_one(input_factor(specs, node, out_factor)):  # stride 1 at factor 1: the node stays as it is
            for t in node.inputs:
                original(t)
            continue
        target = out
        if not is_one(out_factor):
            shape = [out.shape[0], out.shape[1] * int(np.prod(out_factor))] + [
                n // f for n, f in zip(out.shape[2:], out_factor)]
            target = gs.Variable(builder.name(out.name + "_poly"), dtype=out.dtype, shape=shape)
        inputs = list(node.inputs)
        node.inputs.clear()
        node.outputs.clear()
        if spec is not None:
            source, wanted = inputs[0], input_factor(specs, node, out_factor)
            if factors.get(id(source)) == wanted:
                emit_conv(spec, polyphase[id(source)], wanted, out_factor, layout_of(node), target)
            else:
                emit_conv(spec, original(source), (1,) * len(wanted), out_factor, layout_of(node), target)
        else:
            phases, new_inputs = int(np.prod(out_factor)), []
            for t, kind in zip(inputs, operands[id(node)]):
                if kind == "tensor":
                    t = at_factor(t, out_factor)
                elif kind == "channel":
                    value = ir.constant_value(t)
                    vector = expand_channels(value.reshape(-1), phases, layout_of(None))
                    t = builder.const(f"{node.name}_{t.name}_phases",
                                      vector.reshape((1, -1) + (1,) * (len(out.shape) - 2)).astype(value.dtype))
                new_inputs.append(t)
            builder.op(node.op, new_inputs, node.name, node.attrs, out=target)
        if target is not out:
            polyphase[id(out)] = target
            if id(out) in needed:
                original(out)
    return exits
