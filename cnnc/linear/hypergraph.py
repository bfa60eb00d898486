"""The hypergraph view of a network (seed 002, Vertechi & Bergomi, "Machines of finite depth"): spaces,
hyperedges, depth levels and live memory.

Seed 002 reads a network as a *machine*: on the global space X = X₀ ⊕ X₁ ⊕ … ⊕ Xₙ the network function is the sum
f = f₁ + … + fₘ of its layers, and the output solves the machine equation x = f(x) + x₀, i.e. x = (id − f)⁻¹(x₀),
the resolvent R_f applied to the input. Architectures with arbitrary shortcuts are hypergraphs: a layer (hyperedge)
reads many spaces and writes many. Here the spaces are the non-constant tensors of the IR and the hyperedges are its
ops; constants (initializers, Constant-op outputs) are parameters of an edge, not spaces.

Depth. A graph input has depth 0; a tensor written by an op has depth 1 + the largest depth among the op's
non-constant inputs (1 for an op that reads only constants). It is the longest path from the inputs. Tensors of equal
depth form a *level*: no tensor of a level depends on another of the same level, so a level can be computed in any
order or all at once. The *width* of a level is its number of tensors; the *critical path* is a longest chain of
ops, as long as the deepest tensor.

Memory. For an execution order the live activation bytes at each step are the bytes of the tensors alive while that
op runs: the graph inputs (owned by the caller, alive throughout), every tensor already written that a later op or
the caller (graph outputs) still reads, and the op's own outputs (its inputs are alive by the same rule). A tensor is
freed right after its last reader. Sizes come from ONNX shape inference; a symbolic dimension that is the batch axis
of a graph input counts as `batch`; any other symbolic or unknown dimension makes the tensor *unsized*: it counts as
0 bytes and is listed with the reason, so the peak is then a lower bound and says so.

Execution orders that minimise the peak live in `cnnc.linear.memory_order`; the resolvent of a linear machine,
evaluated level by level, in `cnnc.linear.resolvent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.ir.order import topological_indices


@dataclass(frozen=True)
class Hyperedge:
    """One op: the spaces it reads (non-constant inputs, each once, in order) and the spaces it writes."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Level:
    depth: int
    tensors: tuple[str, ...]
    edges: tuple[int, ...]  # indices of the hyperedges that write this level

    @property
    def width(self) -> int:
        return len(self.tensors)


@dataclass(frozen=True)
class MemoryProfile:
    """Live activation bytes while each op of `order` runs; `peak` is their maximum (a lower bound if `exact` is
    False, because some tensors have no known size)."""

    order: tuple[int, ...]
    live_bytes: tuple[int, ...]
    peak: int
    peak_step: int
    exact: bool


@dataclass
class Hypergraph:
    """Spaces (tensor names) and hyperedges (ops). `sources` are given from outside (graph inputs), `sinks` are read
    from outside (graph outputs); `sizes` maps a space to its bytes and `unsized` to why its size is unknown."""

    edges: list[Hyperedge]
    sources: tuple[str, ...]
    sinks: tuple[str, ...]
    sizes: dict[str, int] = field(default_factory=dict)
    unsized: dict[str, str] = field(default_factory=dict)
    # For a hypergraph built from an IR graph: edge index -> index of its node in graph.nodes.
    node_index: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[int]] = {}
        for index, edge in enumerate(self.edges):
            for space in edge.outputs:
                if space in self.producer or space in self.sources:
                    raise ValueError(f"space '{space}' is written twice (by '{edge.name}' and another)")
                self.producer[space] = index
            for space in edge.inputs:
                self.readers.setdefault(space, []).append(index)
        self._depth: dict[str, int] | None = None
        self._edge_depth: list[int] | None = None
        # Orders computed from the edges alone, by name (cnnc.linear.memory_order), for callers that ask twice.
        self.orders: dict[str, list[int]] = {}
        # Memory profiles by order: the schedule pass weighs the same orders several times (stored, greedy,
        # onnxruntime's, before and after), and each profile is a pass over the whole graph. Edges never change.
        self._profiles: dict[tuple[int, ...], MemoryProfile] = {}

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_graph(cls, graph: gs.Graph, batch: int = 1, infer_shapes: bool = True) -> Hypergraph:
        """The hypergraph of `graph` in its node order; Constant ops are parameters, not edges."""
        if infer_shapes:
            ir.refresh_shapes(graph)
        return cls.from_nodes(graph.nodes, inputs=graph.inputs, outputs=graph.outputs, batch=batch)

    @classmethod
    def from_nodes(cls, nodes: Sequence[gs.Node], inputs: Sequence[gs.Tensor] | None = None,
                   outputs: Sequence[gs.Tensor] | None = None, batch: int = 1) -> Hypergraph:
        """The hypergraph of a set of nodes (a whole graph, or one linear machine of `collapse`). Without `inputs`,
        the sources are the non-constant tensors read but not written by `nodes`; without `outputs`, the sinks are
        the tensors written by `nodes` and read by nothing among them."""
        edges, node_index, tensors = [], [], {}
        # A Constant op's value is a parameter of the ops that read it, whichever attribute holds it (onnxruntime
        # turns these ops into initializers as it loads a model).
        constants = {t.name for node in nodes if node.op == "Constant" for t in node.outputs}
        for position, node in enumerate(nodes):
            if node.op == "Constant":
                continue
            reads = []
            for tensor in node.inputs:
                if ir.is_empty_input(tensor) or tensor.name in constants or ir.is_constant(tensor) \
                        or tensor.name in reads:
                    continue
                reads.append(tensor.name)
                tensors[tensor.name] = tensor
            writes = [t.name for t in node.outputs if not ir.is_empty_input(t)]
            tensors.update((t.name, t) for t in node.outputs if not ir.is_empty_input(t))
            edges.append(Hyperedge(node.name or f"{node.op}#{position}", node.op, tuple(reads), tuple(writes)))
            node_index.append(position)
        written = {space for edge in edges for space in edge.outputs}
        read = {space for edge in edges for space in edge.inputs}
        if inputs is None:
            sources = [t.name for t in tensors.values() if t.name in read and t.name not in written]
        else:
            sources = [t.name for t in inputs if not ir.is_constant(t) and t.name not in constants]
            tensors.update((t.name, t) for t in inputs)
            # Tensors read but produced by no node and not declared inputs: still given from outside.
            sources += [s for s in dict.fromkeys(s for e in edges for s in e.inputs)
                        if s not in written and s not in sources]
        if outputs is None:
            sinks = [space for space in dict.fromkeys(s for e in edges for s in e.outputs) if space not in read]
        else:
            sinks = [t.name for t in outputs if not ir.is_constant(t) and t.name not in constants]
        batch_symbols = {tensors[s].shape[0] for s in sources if s in tensors and tensors[s].shape
                         and isinstance(tensors[s].shape[0], str)}
        sizes, unsized = {}, {}
        for name, tensor in tensors.items():
            size, why = tensor_bytes(tensor, batch, batch_symbols)
            if size is None:
                unsized[name] = why
            else:
                sizes[name] = size
        return cls(edges, tuple(sources), tuple(sinks), sizes, unsized, tuple(node_index))

    # ---- structure ----------------------------------------------------------------------------------------------

    @property
    def spaces(self) -> list[str]:
        return list(dict.fromkeys([*self.sources, *(s for e in self.edges for s in (*e.inputs, *e.outputs))]))

    def predecessors(self, index: int) -> set[int]:
        return {self.producer[s] for s in self.edges[index].inputs if s in self.producer}

    def successors(self, index: int) -> set[int]:
        return {r for s in self.edges[index].outputs for r in self.readers.get(s, ())}

    def depth(self) -> dict[str, int]:
        """Depth of every space: 0 for a source, else 1 + the deepest input of the op that writes it."""
        if self._depth is None:
            depth = {space: 0 for space in self.sources}
            stored = range(len(self.edges))  # usually topological already: no sort (2 s of a 100k-op graph)
            for index in stored if self._stored_order_is_topological() else self.topological_order():
                edge = self.edges[index]
                level = 1 + max((depth.get(s, 0) for s in edge.inputs), default=0)
                depth.update((space, level) for space in edge.outputs)
            self._depth = depth
        return self._depth

    def edge_depth(self, index: int) -> int:
        return self._edge_depths()[index]

    def _edge_depths(self) -> list[int]:
        """The depth of every edge (of its outputs; 1 + its deepest input for an edge that writes nothing), once."""
        if self._edge_depth is None:
            depth = self.depth()
            self._edge_depth = [depth[edge.outputs[0]] if edge.outputs else
                                1 + max((depth.get(s, 0) for s in edge.inputs), default=0) for edge in self.edges]
        return self._edge_depth

    def levels(self) -> list[Level]:
        """The levels 0..D; level 0 holds the sources and no edges."""
        depth = self.depth()
        by_depth: dict[int, list[str]] = {}
        for space in self.spaces:
            by_depth.setdefault(depth.get(space, 0), []).append(space)
        edges_by_depth: dict[int, list[int]] = {}
        for index, level in enumerate(self._edge_depths()):
            edges_by_depth.setdefault(level, []).append(index)
        top = max([*by_depth, *edges_by_depth], default=0)
        return [Level(d, tuple(by_depth.get(d, ())), tuple(edges_by_depth.get(d, ()))) for d in range(top + 1)]

    def critical_path(self) -> list[int]:
        """Indices of a longest chain of edges, from a graph input to the deepest tensor."""
        depth = self.depth()
        if not self.edges:
            return []
        edge_depths = self._edge_depths()
        deepest = max(range(len(self.edges)), key=lambda i: (edge_depths[i], -i))
        path = [deepest]
        while True:
            edge = self.edges[path[-1]]
            below = [s for s in edge.inputs if s in self.producer and depth[s] == edge_depths[path[-1]] - 1]
            if not below:
                break
            path.append(self.producer[below[0]])
        return path[::-1]

    def topological_order(self) -> list[int]:
        """Edge indices in a topological order, as close to the stored order as possible (Kahn, smallest index
        first); raises ValueError (cnnc.ir.order.CycleError) on a cycle."""
        return topological_indices(len(self.edges), self.predecessors)

    def is_topological(self, order: Sequence[int]) -> bool:
        """Whether `order` runs every edge exactly once and each after the writers of its inputs."""
        count = len(self.edges)
        if len(order) != count:
            return False
        position = [-1] * count
        for step, index in enumerate(order):
            if not 0 <= index < count or position[index] != -1:
                return False
            position[index] = step
        producer = self.producer
        return all(position[producer[s]] < position[i] for i, edge in enumerate(self.edges) for s in edge.inputs
                   if s in producer)

    def _stored_order_is_topological(self) -> bool:
        producer = self.producer
        return all(producer.get(s, -1) < i for i, edge in enumerate(self.edges) for s in edge.inputs)

    # ---- memory -------------------------------------------------------------------------------------------------

    def size(self, space: str) -> int:
        return self.sizes.get(space, 0)

    def memory_profile(self, order: Sequence[int] | None = None) -> MemoryProfile:
        """Live activation bytes per step of `order` (default: the stored order)."""
        order = tuple(range(len(self.edges)) if order is None else order)
        known = self._profiles.get(order)
        if known is not None:
            return known
        if not self.is_topological(order):
            raise ValueError("the order is not a topological order of the hypergraph")
        sinks = set(self.sinks)
        remaining = {space: len(readers) for space, readers in self.readers.items()}
        live = sum(self.size(s) for s in self.sources)
        steps = []
        for index in order:
            edge = self.edges[index]
            written = sum(self.size(s) for s in edge.outputs)
            steps.append(live + written)
            live += written
            for space in edge.inputs:
                remaining[space] -= 1
            for space in (*edge.inputs, *edge.outputs):
                if remaining.get(space, 0) == 0 and space not in sinks and space not in self.sources \
                        and space in self.producer:
                    live -= self.size(space)
                    remaining[space] = -1  # freed once
        peak = max(steps, default=live)
        profile = MemoryProfile(order, tuple(steps), peak, steps.index(peak) if steps else 0, not self.unsized)
        self._profiles[order] = profile
        return profile

    def peak_bytes(self, order: Sequence[int] | None = None) -> int:
        return self.memory_profile(order).peak


def tensor_bytes(tensor: gs.Tensor, batch: int, batch_symbols: set) -> tuple[int | None, str]:
    """(bytes, "") of a variable from its inferred shape and dtype, or (None, why)."""
    if tensor.dtype is None:
        return None, "dtype unknown"
    if tensor.shape is None:
        return None, "shape unknown to shape inference"
    numel = 1
    for dim in tensor.shape:
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            numel *= int(dim)
        elif isinstance(dim, str) and dim in batch_symbols:
            numel *= batch
        elif dim is None:
            return None, "a dimension is unknown to shape inference"
        else:
            return None, f"symbolic dimension {dim!r} is not the batch axis of a graph input"
    try:
        itemsize = np.dtype(tensor.dtype).itemsize
    except TypeError:
        return None, f"dtype {tensor.dtype} has no fixed size"
    return numel * itemsize, ""


# ---- a summary for reports ----------------------------------------------------------------------------------------

def schedule_figures(hypergraph: Hypergraph, order: Sequence[int] | None = None) -> dict:
    """Levels, widths, critical path and the peak of `order` (default: stored order), as plain data for reports."""
    levels = hypergraph.levels()
    profile = hypergraph.memory_profile(order)
    path = hypergraph.critical_path()
    return {
        "ops": len(hypergraph.edges),
        "depth": len(levels) - 1,
        "levels": [{"depth": level.depth, "width": level.width, "tensors": list(level.tensors),
                    "ops": [hypergraph.edges[i].name for i in level.edges]} for level in levels],
        "max_width": max((level.width for level in levels[1:]), default=0),
        "critical_path": [hypergraph.edges[i].name for i in path],
        "peak_bytes": profile.peak,
        "peak_at": hypergraph.edges[profile.order[profile.peak_step]].name if profile.order else None,
        "peak_is_lower_bound": not profile.exact,
        "unsized_tensors": dict(hypergraph.unsized),
    }
