"""The hypergraph view (seed 002): depth, levels, critical path and memory against brute force on random DAGs, the
resolvent of linear machines against (I − F)⁻¹ and direct composition, and the view of real ONNX graphs."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
from helpers import make_model
from hypothesis import given
from hypothesis import strategies as st

from cnnc.linear import memory_order
from cnnc.linear.hypergraph import Hyperedge, Hypergraph, schedule_figures
from cnnc.linear.memory_order import greedy_order, heuristic_order, min_peak_order, onnxruntime_default_order
from cnnc.linear.resolvent import LinearEdge, LinearHypergraph, resolvent


@st.composite
def dags(draw, max_edges=8):
    """A random hypergraph in a topological stored order: ops read 1-3 earlier spaces and write 1-2 new ones."""
    sources = [f"in{i}" for i in range(draw(st.integers(1, 2)))]
    spaces = list(sources)
    edges = []
    for index in range(draw(st.integers(1, max_edges))):
        reads = draw(st.lists(st.sampled_from(spaces), min_size=1, max_size=3, unique=True))
        writes = [f"t{index}_{k}" for k in range(draw(st.integers(1, 2)))]
        edges.append(Hyperedge(f"e{index}", "op", tuple(reads), tuple(writes)))
        spaces += writes
    read = {s for e in edges for s in e.inputs}
    sinks = [s for s in spaces if s not in read and s not in sources]
    sinks += [s for s in spaces if s not in sources and s not in sinks and draw(st.integers(0, 5)) == 0]
    sizes = {s: draw(st.integers(1, 64)) for s in spaces}
    return Hypergraph(edges, tuple(sources), tuple(sinks), sizes)


def brute_force_depth(graph: Hypergraph) -> dict:
    """Longest path by enumerating every path backwards from each space (no memoisation: exponential, tiny graphs)."""
    def longest(space):
        if space not in graph.producer:
            return 0
        edge = graph.edges[graph.producer[space]]
        return 1 + max((longest(s) for s in edge.inputs), default=0)
    return {space: longest(space) for space in graph.spaces}


def brute_force_live_bytes(graph: Hypergraph, order) -> list[int]:
    """A space is live from the step that writes it (sources: before the first) to its last reader's step; sources
    and sinks to the end; a space nobody reads dies at the step that writes it."""
    step = {index: position for position, index in enumerate(order)}
    end = len(order)
    born = {s: -1 for s in graph.sources}
    born.update({s: step[graph.producer[s]] for s in graph.producer})
    dies = {}
    for space in graph.spaces:
        readers = [step[r] for r in graph.readers.get(space, [])]
        if space in graph.sources or space in graph.sinks:
            dies[space] = end
        else:
            dies[space] = max(readers, default=born[space])
    return [sum(graph.sizes[s] for s in graph.spaces if born[s] <= t <= dies[s]) for t in range(end)]


def all_topological_orders(graph: Hypergraph):
    for order in itertools.permutations(range(len(graph.edges))):
        if graph.is_topological(order):
            yield order


@given(dags())
def test_depth_and_levels_match_brute_force(graph):
    depth = brute_force_depth(graph)
    assert graph.depth() == depth
    levels = graph.levels()
    assert [level.depth for level in levels] == list(range(max(depth.values()) + 1))
    for level in levels:
        assert sorted(level.tensors) == sorted(s for s, d in depth.items() if d == level.depth)
        assert level.width == len(level.tensors)
        # Tensors of one level are independent: no edge of the level reads a tensor of the same level.
        assert all(depth[s] < level.depth for i in level.edges for s in graph.edges[i].inputs)
    path = graph.critical_path()
    assert len(path) == max(depth.values())
    for earlier, later in itertools.pairwise(path):
        assert set(graph.edges[earlier].outputs) & set(graph.edges[later].inputs)


@given(dags(), st.randoms(use_true_random=False))
def test_topological_order_of_a_shuffled_graph(graph, random):
    permutation = list(range(len(graph.edges)))
    random.shuffle(permutation)
    shuffled = Hypergraph([graph.edges[i] for i in permutation], graph.sources, graph.sinks, graph.sizes)
    order = shuffled.topological_order()
    assert shuffled.is_topological(order)
    assert shuffled.depth() == graph.depth()  # depth does not depend on the stored order


@given(dags(max_edges=7))
def test_memory_profile_matches_brute_force(graph):
    for order in itertools.islice(all_topological_orders(graph), 20):
        assert list(graph.memory_profile(order).live_bytes) == brute_force_live_bytes(graph, order)


@given(dags(max_edges=6))
def test_min_peak_order_is_optimal_on_small_graphs(graph):
    order, proven = min_peak_order(graph)
    assert proven and graph.is_topological(order)
    optimum = min(max(brute_force_live_bytes(graph, o)) for o in all_topological_orders(graph))
    assert graph.peak_bytes(order) == optimum
    assert graph.peak_bytes(order) <= graph.peak_bytes()


@given(dags())
def test_fallback_orders_are_topological_and_bounded(graph):
    for order in (greedy_order(graph), onnxruntime_default_order(graph)):
        assert graph.is_topological(order)
    # With no room for the exact search the fallback is still a valid order, never worse than the stored one.
    order, proven = min_peak_order(graph, state_limit=0)
    assert graph.is_topological(order) and graph.peak_bytes(order) <= graph.peak_bytes()
    assert not proven or len(graph.edges) <= 1


def test_wide_graph_falls_back_to_heuristics():
    # 14 independent chains of two ops: 3^14 down-sets, far past the limit; greedy finishes chains one by one.
    edges = []
    for chain in range(14):
        edges.append(Hyperedge(f"a{chain}", "op", ("x",), (f"a{chain}",)))
    for chain in range(14):
        edges.append(Hyperedge(f"b{chain}", "op", (f"a{chain}",), (f"b{chain}",)))
    edges.append(Hyperedge("join", "op", tuple(f"b{c}" for c in range(14)), ("y",)))
    sizes = {"x": 1, "y": 1, **{f"a{c}": 100 for c in range(14)}, **{f"b{c}": 1 for c in range(14)}}
    graph = Hypergraph(edges, ("x",), ("y",), sizes)
    order, proven = min_peak_order(graph, state_limit=2000)
    assert not proven and graph.is_topological(order)
    # Level order keeps all 14 'a' tensors alive at once; running each chain to its end keeps one.
    assert graph.peak_bytes() >= 1400 and graph.peak_bytes(order) <= 1 + 100 + 14 + 1


def test_duplicate_writer_is_rejected():
    with pytest.raises(ValueError, match="written twice"):
        Hypergraph([Hyperedge("a", "op", ("x",), ("t",)), Hyperedge("b", "op", ("x",), ("t",))], ("x",), ("t",))


def test_cycle_is_reported():
    graph = Hypergraph([Hyperedge("a", "op", ("x", "u"), ("t",)), Hyperedge("b", "op", ("t",), ("u",))],
                       ("x",), ("u",))
    with pytest.raises(ValueError, match="cycle"):
        graph.topological_order()


# ---- resolvent ----------------------------------------------------------------------------------------------------

@st.composite
def linear_machines(draw):
    graph = draw(dags(max_edges=6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dims = {s: draw(st.integers(1, 4)) for s in graph.spaces}
    edges = tuple(LinearEdge(e.inputs, e.outputs, rng.standard_normal(
        (sum(dims[s] for s in e.outputs), sum(dims[s] for s in e.inputs)))) for e in graph.edges)
    outputs = tuple(graph.sinks) or (graph.edges[-1].outputs[0],)
    return LinearHypergraph(edges, dims, graph.sources, outputs)


def _block(matrix, offsets, rows, columns):
    return np.block([[matrix[offsets[r], offsets[c]] for c in columns] for r in rows])


@given(linear_machines())
def test_resolvent_equals_inverse_and_neumann_series(machine):
    result = resolvent(machine)
    operator, offsets = machine.global_operator()
    identity = np.eye(operator.shape[0])
    inverse = np.linalg.inv(identity - operator)
    np.testing.assert_allclose(result, _block(inverse, offsets, machine.outputs, machine.inputs), atol=1e-9)
    depth = len(machine.hypergraph().levels()) - 1
    # F is nilpotent of index depth + 1, so (I - F)^-1 is the finite sum of its powers up to the depth.
    assert np.allclose(np.linalg.matrix_power(operator, depth + 1), 0)
    series = sum(np.linalg.matrix_power(operator, k) for k in range(depth + 1))
    np.testing.assert_allclose(result, _block(series, offsets, machine.outputs, machine.inputs), atol=1e-9)


@given(linear_machines(), st.integers(0, 2**32 - 1))
def test_resolvent_equals_direct_composition(machine, seed):
    """Evaluate the machine op by op in its stored order on random inputs (forward substitution)."""
    rng = np.random.default_rng(seed)
    x0 = {s: rng.standard_normal(machine.dims[s]) for s in machine.inputs}
    values = dict(x0)
    for edge in machine.edges:
        stacked = np.concatenate([values[s] for s in edge.inputs])
        out = edge.linear_map @ stacked
        for space, part in zip(edge.outputs, np.split(out, np.cumsum([machine.dims[s] for s in edge.outputs])[:-1])):
            values[space] = part
    expected = np.concatenate([values[s] for s in machine.outputs])
    got = resolvent(machine) @ np.concatenate([x0[s] for s in machine.inputs])
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_resolvent_of_a_chain_is_the_matrix_product(rng):
    dims = {"x0": 3, "x1": 4, "x2": 2, "x3": 5}
    mats = [rng.standard_normal((dims[f"x{i + 1}"], dims[f"x{i}"])) for i in range(3)]
    edges = tuple(LinearEdge((f"x{i}",), (f"x{i + 1}",), mats[i]) for i in range(3))
    machine = LinearHypergraph(edges, dims, ("x0",), ("x3",))
    np.testing.assert_allclose(resolvent(machine), mats[2] @ mats[1] @ mats[0], atol=1e-12)


def test_resolvent_with_callable_maps_and_a_skip(rng):
    # y = A x + B (C x): a residual-style skip; one edge given as a function (as a conv would be).
    dims = {"x": 3, "h": 4, "y": 3}
    a, b, c = rng.standard_normal((3, 3)), rng.standard_normal((3, 4)), rng.standard_normal((4, 3))
    edges = (LinearEdge(("x",), ("h",), lambda values: [c @ values[0]]),
             LinearEdge(("x", "h"), ("y",), np.concatenate([a, b], axis=1)))
    machine = LinearHypergraph(edges, dims, ("x",), ("y", "h"))
    np.testing.assert_allclose(resolvent(machine), np.concatenate([a + b @ c, c]), atol=1e-12)


# ---- the view of an ONNX graph ------------------------------------------------------------------------------------

def test_graph_view_constants_batch_and_unsized(rng):
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [oh.make_node("Constant", [], ["k"], value_float=2.0),
             oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Mul", ["c", "k"], ["m"], name="scale"),
             oh.make_node("Relu", ["m"], ["y"], name="relu"),
             oh.make_node("Shape", ["x"], ["s"], name="shape"),
             oh.make_node("Reshape", ["y", "s2"], ["z"], name="reshape")]
    graph = oh.make_graph(nodes, "view", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 5, 6]),
                                          oh.make_tensor_value_info("s2", onnx.TensorProto.INT64, [2])],
                          [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None),
                           oh.make_tensor_value_info("s", onnx.TensorProto.INT64, None)],
                          initializer=[onnx.numpy_helper.from_array(w, "W")])
    graph = gs.import_onnx(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    view = Hypergraph.from_graph(graph, batch=3)
    assert [e.name for e in view.edges] == ["conv", "scale", "relu", "shape", "reshape"]
    assert "k" not in view.spaces and "W" not in view.spaces  # constants are parameters, not spaces
    assert view.edges[1].inputs == ("c",)
    assert view.sizes["x"] == 3 * 3 * 5 * 6 * 4 and view.sizes["c"] == 3 * 4 * 5 * 6 * 4
    assert view.sizes["s"] == 4 * 8  # int64 shape vector
    assert "z" in view.unsized  # Reshape to a runtime shape: its dims are unknown to inference
    figures = schedule_figures(view)
    assert figures["peak_is_lower_bound"] and "z" in figures["unsized_tensors"]
    assert figures["critical_path"] == ["conv", "scale", "relu", "reshape"]
    assert [level["width"] for level in figures["levels"]] == [2, 2, 1, 1, 1]


def test_machine_levels_from_a_node_subset(rng):
    # The view of a subset (one of collapse's linear machines) takes its own sources and sinks.
    w = rng.standard_normal((3, 3, 1, 1)).astype(np.float32)
    nodes = [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Conv", ["r", "W"], ["a"]),
             oh.make_node("Conv", ["r", "W"], ["b"]), oh.make_node("Add", ["a", "b"], ["y"])]
    graph = gs.import_onnx(make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", None)], [("W", w)]))
    view = Hypergraph.from_nodes(graph.nodes[1:])
    assert view.sources == ("r",) and view.sinks == ("y",)
    assert [level.width for level in view.levels()] == [1, 2, 1]


@given(dags())
def test_heuristic_order_is_the_best_of_its_three_candidates(graph):
    # The chain shortcut (a stored order in which each op reads the previous one has no alternative) must give what
    # the three linear-time candidates give.
    candidates = [list(range(len(graph.edges))), greedy_order(graph), onnxruntime_default_order(graph)]
    assert graph.peak_bytes(heuristic_order(graph)) == min(graph.peak_bytes(order) for order in candidates)


def test_a_chain_keeps_its_only_order_without_the_greedy_search(monkeypatch):
    edges = [Hyperedge(f"e{i}", "op", (f"t{i}",), (f"t{i + 1}",)) for i in range(50)]
    chain = Hypergraph(edges, ("t0",), ("t50",), {f"t{i}": 1 + i % 3 for i in range(51)})
    monkeypatch.setattr(memory_order, "greedy_order", lambda graph: pytest.fail("greedy search on a chain"))
    assert heuristic_order(chain) == list(range(50))
    # One op that does not read its predecessor (a second branch from the input): the other orders are searched.
    edges.insert(25, Hyperedge("side", "op", ("t0",), ("s",)))
    edges[-1] = Hyperedge("e49", "op", ("t49", "s"), ("t50",))
    branched = Hypergraph(edges, ("t0",), ("t50",), {"s": 100, **{f"t{i}": 1 for i in range(51)}})
    with pytest.raises(pytest.fail.Exception, match="greedy search"):
        heuristic_order(branched)
