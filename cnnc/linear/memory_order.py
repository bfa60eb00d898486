"""Execution orders of a hypergraph and their peak live activation memory (seed 002: the ops of one level are
independent, so any topological order computes the same function; they differ in the bytes alive at once).

`min_peak_order` finds an order of least peak (exact bottleneck search, greedy past a state limit or above
`EXACT_LIMIT` ops);
`greedy_order` is its fallback; `onnxruntime_default_order` reproduces the order onnxruntime runs by default, to
report the peak a model really sees. Live bytes are counted by `Hypergraph.memory_profile`.
"""

from __future__ import annotations

import heapq
import math

from cnnc.linear.hypergraph import Hypergraph

# Above this many ops the exact least-peak search is not tried (its cost is quadratic in the ops; see min_peak_order).
EXACT_LIMIT = 5_000


def min_peak_order(hypergraph: Hypergraph, state_limit: int = 100_000,
                   exact_limit: int = EXACT_LIMIT) -> tuple[list[int], bool]:
    """An order of least peak live bytes: (order, proven_optimal).

    Exact search first. After running a set S of edges (a down-set of the dependency order) the live bytes depend on
    S alone, so the orders are the monotone paths ∅ → all edges in the lattice of down-sets, and the peak of an
    order is the largest step cost on its path: a bottleneck shortest path, solved by Dijkstra with max in place of
    +. It visits only down-sets cheaper than the optimum, which for chains with skips (ResNet, DenseNet, U-Net) and
    narrow branching blocks (Inception) is a few per op. Past `state_limit` down-sets it gives up and returns the
    best of the greedy orders below, the stored order and the onnxruntime order instead (not proven optimal).

    Cost. A down-set is a bitmask of `count` bits, so each step of the search costs O(count / 64) word operations and
    a chain of n ops costs O(n²/64) in all (52 s for a 100k-op chain). Above `exact_limit` ops the search is not
    tried and the linear-time heuristics below answer directly (`heuristic_order`); the caller says so.
    """
    count = len(hypergraph.edges)
    if count == 0:
        return [], True
    if count > exact_limit:
        return heuristic_order(hypergraph), False
    sizes = [sum(hypergraph.size(s) for s in e.outputs) for e in hypergraph.edges]
    pred_mask = [sum(1 << p for p in hypergraph.predecessors(i)) for i in range(count)]
    succ = [sorted(hypergraph.successors(i)) for i in range(count)]
    sinks = set(hypergraph.sinks) | set(hypergraph.sources)
    # Bytes freed when an edge runs, given the edges run after it: an input (or dead output) whose readers are all
    # done. reader_mask[space] is the set of its readers.
    reader_mask = {space: sum(1 << r for r in readers) for space, readers in hypergraph.readers.items()}
    freeable = [[(s, reader_mask.get(s, 0), hypergraph.size(s)) for s in dict.fromkeys((*e.inputs, *e.outputs))
                 if s not in sinks and s in hypergraph.producer] for e in hypergraph.edges]
    full = (1 << count) - 1
    start_live = sum(hypergraph.size(s) for s in hypergraph.sources)
    initial_ready = sum(1 << i for i in range(count) if pred_mask[i] == 0)
    best = {0: start_live}
    parent: dict[int, tuple[int, int]] = {}
    heap = [(start_live, 0, 0, 0, start_live, initial_ready)]
    serial = 0
    while heap:
        bottleneck, _, _, done, live, ready = heapq.heappop(heap)
        if done == full:
            order = []
            while done:
                done, index = parent[done]
                order.append(index)
            return order[::-1], True
        if bottleneck > best.get(done, math.inf):
            continue
        if len(best) > state_limit:
            break
        bits = ready
        while bits:
            low = bits & -bits
            bits ^= low
            index = low.bit_length() - 1
            after = done | low
            step = live + sizes[index]
            cost = max(bottleneck, step)
            if cost >= best.get(after, math.inf):
                continue
            freed = sum(size for _, readers, size in freeable[index] if readers & ~after == 0)
            next_ready = ready ^ low
            for successor in succ[index]:
                if pred_mask[successor] & ~after == 0:
                    next_ready |= 1 << successor
            best[after] = cost
            parent[after] = (done, index)
            serial += 1
            # Ties go to the larger down-set (finish first) and then to the stored order (stay close to it).
            heapq.heappush(heap, (cost, -after.bit_count(), serial, after, step - freed, next_ready))
    return heuristic_order(hypergraph), False


def heuristic_order(hypergraph: Hypergraph) -> list[int]:
    """The best, by peak, of the stored order (or its nearest topological order), `greedy_order` and onnxruntime's
    default order: each is computed and measured in time linear in the ops (greedy: times the ready-set width)."""
    count = len(hypergraph.edges)
    stored_is_topological = hypergraph.is_topological(range(count))
    if stored_is_topological and _each_reads_the_previous(hypergraph):
        return list(range(count))  # the graph's only topological order: what every heuristic below returns
    candidates = [list(range(count)) if stored_is_topological else hypergraph.topological_order(),
                  greedy_order(hypergraph), onnxruntime_default_order(hypergraph)]
    return min(candidates, key=hypergraph.peak_bytes)


def _each_reads_the_previous(hypergraph: Hypergraph) -> bool:
    """Whether every edge of the stored order reads an output of the edge just before it. Then, with the stored
    order topological, each edge must run right after its predecessor in any topological order: the stored order is
    the only one (a 100k-op chain's greedy order costs ~0.6 s to find it again)."""
    producer, edges = hypergraph.producer, hypergraph.edges
    return all(any(producer.get(space) == index - 1 for space in edges[index].inputs)
               for index in range(1, len(edges)))


def greedy_order(hypergraph: Hypergraph) -> list[int]:
    """Greedy: among the ready edges run the one that leaves the least live memory (allocates least net of what it
    frees), then the one with the smallest peak during its step, then the earliest in the stored order."""
    count = len(hypergraph.edges)
    pending = [len(hypergraph.predecessors(i)) for i in range(count)]
    remaining = {space: len(readers) for space, readers in hypergraph.readers.items()}
    protected = set(hypergraph.sinks) | set(hypergraph.sources)
    ready = {i for i in range(count) if pending[i] == 0}
    order = []

    def net_bytes(index: int) -> tuple[int, int, int]:
        edge = hypergraph.edges[index]
        written = sum(hypergraph.size(s) for s in edge.outputs)
        freed = sum(hypergraph.size(s) for s in set(edge.inputs) if remaining[s] == 1 and s not in protected
                    and s in hypergraph.producer)
        freed += sum(hypergraph.size(s) for s in edge.outputs if s not in remaining and s not in protected)
        return written - freed, written, index

    while ready:
        index = min(ready, key=net_bytes)
        ready.remove(index)
        order.append(index)
        for space in set(hypergraph.edges[index].inputs):
            remaining[space] -= 1
        for successor in hypergraph.successors(index):
            pending[successor] -= 1
            if pending[successor] == 0:
                ready.add(successor)
    return order


def onnxruntime_default_order(hypergraph: Hypergraph) -> list[int]:
    """The order onnxruntime runs a graph in with its default `ExecutionOrder.DEFAULT` (its GraphViewer): a reverse
    depth-first search from the leaf nodes (nodes whose outputs no node reads), the last leaf first and, at each
    node, the input node of highest index first; a node is emitted once all its input nodes are. Node indices are
    the positions in the stored order. It ignores the stored order except through these tie-breaks, which
    tests/test_schedule.py checks against onnxruntime's own profile of the nodes it ran."""
    known = hypergraph.orders.get("onnxruntime_default")
    if known is not None:  # (the schedule pass asks for it twice: for its choice and for its report)
        return list(known)
    count = len(hypergraph.edges)
    leaves = [i for i in range(count) if not hypergraph.successors(i)]
    stack = [(i, False) for i in leaves]
    visited = [False] * count
    order = []
    while stack:
        index, leaving = stack.pop()
        if leaving:
            order.append(index)
            continue
        if visited[index]:
            continue
        visited[index] = True
        stack.append((index, True))
        stack.extend((p, False) for p in sorted(hypergraph.predecessors(index)))
    hypergraph.orders["onnxruntime_default"] = order
    return list(order)
