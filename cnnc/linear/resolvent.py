"""The resolvent of a linear machine (seed 002, Vertechi & Bergomi, "Machines of finite depth").

A network is the machine equation x = f(x) + x₀ on X = X₀ ⊕ … ⊕ Xₙ, solved by the resolvent x = (id − f)⁻¹(x₀).
Independence: if f₁ does not depend on f₂ then R_{f₁+f₂} = R_{f₂} R_{f₁}. Writing f = Σ_d f_d with f_d the ops of
level d (`Hypergraph.levels`), f_d reads only levels < d, so R_f = R_{f_D} ⋯ R_{f_1}, and f_d ∘ f_d = 0 gives
R_{f_d} = id + f_d. For a *linear* machine F this is the finite Neumann series (id − F)⁻¹ = Σ_{k ≤ D} F^k (F is
nilpotent: F^{D+1} = 0), and `resolvent` evaluates it level by level: one pass over the levels, each op applied once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from cnnc.linear.hypergraph import Hyperedge, Hypergraph

# A hyperedge's linear map: a dense matrix from its stacked inputs to its stacked outputs, or a function that maps a
# list of (dim_in × k) arrays, one per input, to a list of (dim_out × k) arrays, one per output.
LinearMap = np.ndarray | Callable[[list], list]


@dataclass(frozen=True)
class LinearEdge:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    linear_map: LinearMap


@dataclass(frozen=True)
class LinearHypergraph:
    """A linear machine over named spaces of given dimensions: per-hyperedge linear maps, its input spaces (x₀) and
    the output spaces whose block of the resolvent is wanted."""

    edges: tuple[LinearEdge, ...]
    dims: Mapping[str, int]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def hypergraph(self) -> Hypergraph:
        edges = [Hyperedge(f"f{i}", "linear", tuple(e.inputs), tuple(e.outputs)) for i, e in enumerate(self.edges)]
        return Hypergraph(edges, tuple(self.inputs), tuple(self.outputs), dict(self.dims))

    def global_operator(self) -> tuple[np.ndarray, dict[str, slice]]:
        """F on X = ⊕ spaces as one dense matrix, with the slice of each space (for tests and small machines)."""
        spaces = self.hypergraph().spaces
        offsets, start = {}, 0
        for space in spaces:
            offsets[space] = slice(start, start + self.dims[space])
            start += self.dims[space]
        operator = np.zeros((start, start))
        for edge in self.edges:
            matrix = _dense(edge, self.dims)
            row = 0
            for out in edge.outputs:
                column = 0
                for inp in edge.inputs:
                    operator[offsets[out], offsets[inp]] += matrix[row:row + self.dims[out],
                                                                   column:column + self.dims[inp]]
                    column += self.dims[inp]
                row += self.dims[out]
        return operator, offsets


def _dense(edge: LinearEdge, dims: Mapping[str, int]) -> np.ndarray:
    if isinstance(edge.linear_map, np.ndarray):
        return edge.linear_map
    n = sum(dims[s] for s in edge.inputs)
    columns = np.eye(n)
    parts, start = [], 0
    for space in edge.inputs:
        parts.append(columns[start:start + dims[space]])
        start += dims[space]
    return np.concatenate(list(edge.linear_map(parts)), axis=0)


def _apply(edge: LinearEdge, values: list[np.ndarray], dims: Mapping[str, int]) -> list[np.ndarray]:
    if isinstance(edge.linear_map, np.ndarray):
        result = edge.linear_map @ np.concatenate(values, axis=0)
        return np.split(result, np.cumsum([dims[s] for s in edge.outputs])[:-1], axis=0)
    return list(edge.linear_map(values))


def resolvent(machine: LinearHypergraph) -> np.ndarray:
    """The block of (id − F)⁻¹ = Σ_{k ≤ D} F^k from the machine's inputs to its outputs, computed level by level.

    x₀ places the identity in each input space; then for d = 1..D the ops of level d apply R_{f_d} = id + f_d, each
    reading only finished lower levels. The result maps the stacked inputs to the stacked outputs.
    """
    graph = machine.hypergraph()
    n = sum(machine.dims[s] for s in machine.inputs)
    state: dict[str, np.ndarray] = {}
    start = 0
    for space in machine.inputs:
        state[space] = np.eye(n)[start:start + machine.dims[space]]
        start += machine.dims[space]
    for level in graph.levels()[1:]:
        for index in level.edges:
            edge = machine.edges[index]
            values = [state.get(s, np.zeros((machine.dims[s], n))) for s in edge.inputs]
            for space, value in zip(edge.outputs, _apply(edge, values, machine.dims)):
                state[space] = value
    return np.concatenate([state.get(s, np.zeros((machine.dims[s], n))) for s in machine.outputs], axis=0)
