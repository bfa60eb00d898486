"""Compile speed at scale: thread counts (cnnc.threads), schedule's linear-time fallback above exact_limit,
canonicalize's skipped folding on large chains, the manager's cheap snapshot (rollback restores the graph exactly,
also when it is kept across passes that changed nothing), the linear-time helpers (collapse's bounded re-entry walk,
tidy's skipped cleanup, export without a copy, remembered memory profiles), simplify's node limit, the compile's
max_nodes limit, and deferred full garbage collections. Timing targets live in bench/scale.py, not here."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from click.testing import CliRunner
from helpers import make_model, run_passes
from onnx import helper as oh

import cnnc
from cnnc import ir
from cnnc import threads as cnnc_threads
from cnnc.cli.app import cli
from cnnc.errors import UsageError
from cnnc.ir import order
from cnnc.ir.canonicalize import canonicalize, may_fold
from cnnc.ir.stats import _mac_shapes_known, _Shapes, macs
from cnnc.linear import machines
from cnnc.linear.hypergraph import Hyperedge, Hypergraph
from cnnc.linear.memory_order import EXACT_LIMIT, min_peak_order
from cnnc.passes.schedule import Schedule
from cnnc.passes.simplify import Simplify
from cnnc.pipeline.collector import LARGE_GRAPH_NODES, deferred_full_collections
from cnnc.pipeline.contract import Pass, PassResult
from cnnc.pipeline.manager import run_pipeline
from cnnc.pipeline.snapshot import Snapshot
from cnnc.runtime.session import SPINNING, make_session


def _chain(pairs: int, channels: int = 2) -> onnx.ModelProto:
    """pairs × (Conv 1x1 -> Relu) on 1×C×4×4."""
    nodes, weights, previous = [], [], "x"
    rng = np.random.default_rng(0)
    for i in range(pairs):
        nodes += [oh.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                  oh.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        weights.append((f"w{i}", rng.standard_normal((channels, channels, 1, 1)).astype(np.float32)))
        previous = f"r{i}"
    shape = [1, channels, 4, 4]
    return make_model(nodes, [("x", shape)], [(previous, shape)], weights)


# ---- threads --------------------------------------------------------------------------------------------------------

def test_compile_threads_sets_and_restores_torch_threads(monkeypatch):
    monkeypatch.delenv(cnnc_threads.ENV, raising=False)
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with cnnc_threads.compile_threads(target) as count:
        assert count == target and torch.get_num_threads() == target
        assert cnnc_threads.session_threads() == target
    assert torch.get_num_threads() == before
    assert cnnc_threads.session_threads() == cnnc_threads.physical_cores()
    with pytest.raises(RuntimeError), cnnc_threads.compile_threads(target):
        raise RuntimeError("a failing compile restores the caller's threads too")
    assert torch.get_num_threads() == before


def test_cnnc_threads_env_overrides_and_is_validated(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(cnnc_threads.ENV, "1")
    assert cnnc_threads.thread_count() == 1
    with cnnc_threads.compile_threads():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(cnnc_threads.ENV, bad)
        with pytest.raises(UsageError, match="CNNC_THREADS"):
            cnnc_threads.thread_count()


def test_physical_cores_within_the_affinity_mask():
    assert 1 <= cnnc_threads.physical_cores() <= len(cnnc_threads.allowed_cpus())


def test_check_sessions_use_cnnc_threads_without_spinning(monkeypatch):
    monkeypatch.setenv(cnnc_threads.ENV, "1")
    model = make_model([oh.make_node("Relu", ["x"], ["y"])], [("x", [1, 3])], [("y", [1, 3])])
    options = make_session(model).get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry(SPINNING) == "0"
    spinning = make_session(model, threads=2, extra_options={SPINNING: "1"}).get_session_options()
    assert spinning.intra_op_num_threads == 2 and spinning.get_session_config_entry(SPINNING) == "1"


def test_compile_reports_threads_and_leaves_torch_alone(monkeypatch):
    monkeypatch.setenv(cnnc_threads.ENV, "1")
    before = torch.get_num_threads()
    result = cnnc.compile(_chain(3), passes="schedule", check=False)
    assert result.report["threads"] == 1 and torch.get_num_threads() == before


# ---- schedule's fallback -------------------------------------------------------------------------------------------

def _branchy_hypergraph(blocks: int) -> Hypergraph:
    """blocks × (a -> {wide (64 B), narrow (4 B)} -> join): the stored order runs the wide branch first."""
    edges, previous = [], "x"
    sizes = {"x": 16}
    for b in range(blocks):
        edges += [Hyperedge(f"wide{b}", "Conv", (previous,), (f"w{b}",)),
                  Hyperedge(f"narrow{b}", "Conv", (previous,), (f"n{b}",)),
                  Hyperedge(f"grow{b}", "Conv", (f"n{b}",), (f"g{b}",)),
                  Hyperedge(f"join{b}", "Add", (f"w{b}", f"g{b}"), (f"j{b}",))]
        sizes.update({f"w{b}": 64, f"n{b}": 4, f"g{b}": 64, f"j{b}": 16})
        previous = f"j{b}"
    return Hypergraph(edges, ("x",), (previous,), sizes)


def test_fallback_above_exact_limit_is_topological_and_never_worse():
    view = _branchy_hypergraph(EXACT_LIMIT // 4 + 500)  # 2,000 ops above the limit
    assert len(view.edges) > EXACT_LIMIT
    order, proven = min_peak_order(view)
    assert not proven and view.is_topological(order)
    assert view.peak_bytes(order) <= view.peak_bytes()


def test_schedule_pass_says_when_the_exact_search_is_skipped():
    model = _chain(40)
    run = run_passes(model, Schedule(exact_limit=10))
    assert any("exact_limit=10" in why for _, why in run.result.skipped)
    (candidate,) = run.result.candidates
    assert candidate.where == "node order" and candidate.verdict == "loses" and not candidate.applied
    assert candidate.estimate["peak_bytes_after"] == candidate.estimate["peak_bytes_before"]


def test_schedule_candidate_records_a_lower_peak():
    # x -> big (1x64) and x -> small (1x1); the stored order computes big first and keeps it alive: reordering pays.
    nodes = [oh.make_node("Tile", ["x", "reps"], ["big"], name="big"),
             oh.make_node("ReduceSum", ["big"], ["bsum"], name="bsum", keepdims=1),
             oh.make_node("Tile", ["x", "reps"], ["big2"], name="big2"),
             oh.make_node("ReduceSum", ["big2"], ["bsum2"], name="bsum2", keepdims=1),
             oh.make_node("Add", ["bsum", "bsum2"], ["y"], name="add")]
    model = make_model(nodes, [("x", [1, 1])], [("y", [1, 1])], [("reps", np.array([1, 64], np.int64))])
    model.graph.node.insert(1, model.graph.node.pop(2))  # big, big2, bsum, bsum2: both big tensors alive at once
    run = run_passes(model, "schedule")
    (candidate,) = run.result.candidates
    assert candidate.verdict == "pays" and candidate.applied and candidate.estimate["proven_least"]
    assert candidate.estimate["peak_bytes_after"] < candidate.estimate["peak_bytes_before"]


# ---- canonicalize on a long chain ----------------------------------------------------------------------------------

def test_canonicalize_on_a_10k_chain_keeps_ops_and_wiring():
    graph = ir.import_model(_chain(5_000))
    assert not may_fold(graph)
    graph = canonicalize(graph)
    ops = [node.op for node in graph.nodes]
    assert ops == ["Conv", "Relu"] * 5_000
    for conv, relu in zip(graph.nodes[0::2], graph.nodes[1::2]):
        assert relu.inputs[0] is conv.outputs[0] and relu.outputs[0].shape == [1, 2, 4, 4]
    assert all(b.inputs[0] is a.outputs[0] for a, b in zip(graph.nodes[1::2], graph.nodes[2::2]))


def test_canonicalize_still_folds_what_it_must():
    # Reshape's target computed from Shape(x): foldable although no node reads only constants.
    nodes = [oh.make_node("Shape", ["x"], ["s"]), oh.make_node("Reshape", ["x", "s"], ["r"]),
             oh.make_node("Relu", ["r"], ["y"])]
    graph = ir.import_model(make_model(nodes, [("x", [2, 3])], [("y", [2, 3])]))
    assert may_fold(graph)
    assert [n.op for n in canonicalize(graph).nodes] == ["Reshape", "Relu"]
    assert isinstance(graph.nodes[0].inputs[1], gs.Constant)


# ---- the manager's snapshot ----------------------------------------------------------------------------------------

def _exported(graph: gs.Graph) -> bytes:
    return gs.export_onnx(graph.copy()).SerializeToString()


def test_snapshot_restores_every_kind_of_edit():
    graph = ir.refresh_shapes(ir.import_model(_chain(4)))
    before = _exported(graph)
    snapshot = Snapshot(graph)
    conv, relu = graph.nodes[0], graph.nodes[1]
    conv.inputs[1] = gs.Constant("other", np.zeros((2, 2, 1, 1), np.float32))  # rewire a weight
    conv.attrs["pads"] = [0, 0, 0, 0]
    relu.op, relu.name = "Sigmoid", "renamed"
    relu.outputs[0].shape = None
    graph.nodes[2].outputs[0].to_constant(np.zeros((1, 2, 4, 4), np.float32))  # Variable -> Constant in place
    graph.nodes.append(gs.Node("Identity", inputs=[graph.outputs[0]], outputs=[gs.Variable("extra")]))
    graph.outputs = [graph.nodes[-1].outputs[0]]
    del graph.nodes[3]
    graph.cleanup()
    restored = snapshot.restore()
    assert restored is graph and _exported(restored) == before
    assert all(len(t.inputs) <= 1 for t in graph.tensors().values())
    assert [n.name for n in graph.nodes[0].inputs[0].outputs] == ["conv0"]



@dataclass(frozen=True)
class _Nothing(Pass):
    name = "nothing"

    def run(self, graph: gs.Graph) -> PassResult:
        return PassResult()


@dataclass(frozen=True)
class _Renames(Pass):
    name = "renames"

    def run(self, graph: gs.Graph) -> PassResult:
        graph.nodes[0].name = "renamed"
        result = PassResult()
        result.did("renamed conv0")
        return result


@dataclass(frozen=True)
class _Breaks(Pass):
    name = "breaks"

    def run(self, graph: gs.Graph) -> PassResult:
        graph.nodes[0].op = "Sigmoid"
        graph.nodes[0].name = "half-way"
        del graph.nodes[1:]
        raise RuntimeError("half-way")


def test_rollback_after_passes_that_changed_nothing_restores_the_graph():
    # The manager keeps one snapshot across passes that change nothing; a later failing pass still rolls back to it.
    graph = ir.refresh_shapes(ir.import_model(_chain(4)))
    before = _exported(graph)
    graph, report = run_pipeline(graph, [_Nothing(), _Nothing(), _Breaks(), _Nothing()])
    assert _exported(graph) == before
    assert [r.error is not None for r in report.records] == [False, False, True, False]
    assert "tidy" not in report.housekeeping  # no pass changed the graph: nothing to tidy


def test_rollback_after_a_change_restores_the_changed_graph():
    # A pass that changed the graph invalidates the snapshot: the rollback of the next one returns *its* result.
    graph = ir.refresh_shapes(ir.import_model(_chain(4)))
    graph, report = run_pipeline(graph, [_Renames(), _Breaks()])
    assert [n.name for n in graph.nodes][:2] == ["renamed", "relu0"] and len(graph.nodes) == 8
    assert [n.op for n in graph.nodes] == ["Conv", "Relu"] * 4
    assert report.records[1].error is not None and report.housekeeping["tidy"].runs == 1


# ---- linear-time helpers on long chains ----------------------------------------------------------------------------

def _reenters_brute_force(graph: gs.Graph, component: list[gs.Node]) -> set[int]:
    """Component nodes reachable from the component through an outside node, by an unbounded walk."""
    inside = {id(n) for n in component}
    frontier = [c for n in component for t in n.outputs for c in t.outputs if id(c) not in inside]
    seen, hit = set(), set()
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for tensor in node.outputs:
            for consumer in tensor.outputs:
                if id(consumer) in inside:
                    hit.add(id(consumer))
                frontier.append(consumer)
    return hit


def test_bounded_reentry_walk_matches_the_unbounded_one():
    # x -> Conv a -> Relu -> Add(b, relu) with b = Conv(a): {a, b, add} is one linear component that the Relu
    # re-enters (so `add` must be split off); plus random DAGs of Add/Relu/Conv for the general case.
    rng = np.random.default_rng(3)
    for trial in range(30):
        nodes, names = [], ["x"]
        for i in range(25):
            op = ["Conv", "Relu", "Add"][int(rng.integers(3))]
            picks = [names[int(rng.integers(max(0, len(names) - 4), len(names)))] for _ in range(2)]
            inputs = [picks[0], "w"] if op == "Conv" else picks[:2] if op == "Add" else picks[:1]
            nodes.append(oh.make_node(op, inputs, [f"t{i}"], name=f"n{i}"))
            names.append(f"t{i}")
        model = make_model(nodes, [("x", [1, 2, 4, 4])], [(names[-1], [1, 2, 4, 4])],
                           [("w", np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1))])
        graph = ir.tidy(ir.import_model(model))
        position = {id(n): i for i, n in enumerate(graph.nodes)}
        linear = [n for n in graph.nodes if n.op in ("Conv", "Add")]
        for component in machines._components(linear):
            assert machines._reenters(component, position) == _reenters_brute_force(graph, component), trial


def test_linear_machines_of_a_10k_chain():
    graph = ir.refresh_shapes(ir.import_model(_chain(5_000)))
    found = machines.find_linear_machines(graph)
    assert len(found) == 5_000 and all([n.op for n in m.nodes] == ["Conv"] for m in found)
    assert [m.nodes[0].name for m in found[:2]] == ["conv0", "conv1"]


def test_tidy_skips_cleanup_only_when_nothing_is_dead():
    graph = ir.import_model(_chain(50))
    assert not order._may_hold_dead_nodes(graph)
    assert ir.tidy(graph).nodes and len(graph.nodes) == 100
    dead = gs.Node("Relu", "dead", inputs=[graph.nodes[3].outputs[0]], outputs=[gs.Variable("unused")])
    graph.nodes.append(dead)
    assert order._may_hold_dead_nodes(graph)
    assert len(ir.tidy(graph).nodes) == 100 and all(n.name != "dead" for n in graph.nodes)


def test_schedule_on_a_10k_chain_keeps_a_valid_order_no_worse():
    graph = ir.refresh_shapes(ir.import_model(_chain(5_000)))
    names = [n.name for n in graph.nodes]
    result = Schedule()(graph)
    assert not result.changed and [n.name for n in graph.nodes] == names
    assert ir.is_topologically_sorted(graph)
    assert result.stats["after"]["peak_bytes"] == result.stats["before"]["peak_bytes"] == 3 * 2 * 4 * 4 * 4


def test_memory_profiles_are_remembered_per_order():
    view = _branchy_hypergraph(3)
    stored = view.memory_profile()
    assert view.memory_profile() is stored and view.peak_bytes(range(len(view.edges))) == stored.peak
    other = view.topological_order()[::-1]
    with pytest.raises(ValueError):
        view.memory_profile(other)  # not topological: still refused, not served from the cache


def test_simplify_skips_above_its_node_limit():
    model = _chain(20)
    run = run_passes(model, Simplify(max_nodes=10))
    assert not run.changed
    assert any("max_nodes=10" in why and "40 nodes" in why for _, why in run.result.skipped)


def test_simplify_skips_where_onnxslims_bn_fusion_would_be_quadratic(rng):
    """onnxslim rescans every tensor per Conv+BN it fuses; above max_fusion_work (nodes x BNs) the pass skips and
    fold-bn, which is linear, folds them."""
    nodes, weights, previous = [], [], "x"
    for i in range(4):
        weights.append(onnx.numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), f"w{i}"))
        for part, value in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0)):
            weights.append(onnx.numpy_helper.from_array(np.full(2, value, np.float32), f"{part}{i}"))
        nodes += [onnx.helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"]),
                  onnx.helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"])]
        previous = f"n{i}"
    graph = onnx.helper.make_graph(nodes, "bn", [onnx.helper.make_tensor_value_info("x", 1, [1, 2, 3, 3])],
                                   [onnx.helper.make_tensor_value_info(previous, 1, [1, 2, 3, 3])], weights)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    run = run_passes(model, Simplify(max_fusion_work=8 * 4 - 1))  # 8 nodes x 4 BNs
    assert not run.changed
    assert any("8 nodes x 4 BatchNormalizations" in why for _, why in run.result.skipped)
    assert run_passes(model, Simplify(max_fusion_work=8 * 4)).changed  # at the limit onnxslim runs and fuses


def test_export_without_large_constants_leaves_the_graph_and_matches_the_copying_export():
    graph = ir.refresh_shapes(ir.import_model(_chain(30)))
    before = _exported(graph)
    model, large = ir.export_weightless(graph)
    assert large == [] and _exported(graph) == before
    assert len(model.graph.node) == 60 and len(model.graph.initializer) == 30
    assert macs(model) == 30 * 2 * 2 * 4 * 4  # the exported model's annotations: no shape inference needed


def test_mac_count_without_annotations_still_infers_shapes():
    model = _chain(3)
    del model.graph.value_info[:]
    assert not _mac_shapes_known(model.graph) and macs(model) == 3 * 2 * 2 * 4 * 4


def test_mac_count_reads_constant_node_weights_and_the_last_declaration_of_a_tensor():
    weight = onnx.numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w")
    nodes = [oh.make_node("Constant", [], ["w"], value=weight), oh.make_node("Conv", ["x", "w"], ["y"]),
             oh.make_node("MatMul", ["y", "m"], ["z"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", 1, [1, 2, 4, 4])],
                          [oh.make_tensor_value_info("z", 1, [1, 3, 4, 5])],
                          [onnx.numpy_helper.from_array(np.ones((4, 5), np.float32), "m")],
                          value_info=[oh.make_tensor_value_info("y", 1, [1, 3, 4, 4])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    # The Constant's output has no declaration: inference runs, and each op counts from its own shapes.
    assert not _mac_shapes_known(model.graph) and macs(model) == 3 * 4 * 4 * 2 + 3 * 4 * 5 * 4
    model.graph.output.append(oh.make_tensor_value_info("y", 1, None))  # a later, shapeless declaration of 'y' wins
    shapes = _Shapes(model.graph)
    assert (shapes.get("w"), shapes.get("m"), shapes.get("x"), shapes.get("y"), shapes.get("v")) == \
        ([3, 2, 1, 1], [4, 5], [1, 2, 4, 4], [], None)


def test_a_model_above_max_nodes_is_refused_before_import():
    model = _chain(30)
    with pytest.raises(UsageError, match=r"60 nodes, above the limit of 50 .*--max-nodes"):
        cnnc.compile(model, passes="schedule", check=False, max_nodes=50)
    assert cnnc.compile(model, passes="schedule", check=False, max_nodes=60).report["after"]["nodes"] == 60
    assert cnnc.compile(model, passes="schedule", check=False, max_nodes=0).report["after"]["nodes"] == 60


def test_cli_max_nodes_is_one_error_line_and_exit_2(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(_chain(30), path)
    refused = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "out.onnx"), "--max-nodes", "10"])
    assert refused.exit_code == 2 and not (tmp_path / "out.onnx").exists()
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the model has 60 nodes") and "--max-nodes" in lines[0]


def test_full_collections_are_deferred_only_for_large_graphs_and_restored():
    before = gc.get_threshold()
    with deferred_full_collections(LARGE_GRAPH_NODES):
        assert gc.get_threshold() == before  # a graph of ordinary size: Python's defaults, memory as before
    with pytest.raises(RuntimeError), deferred_full_collections(LARGE_GRAPH_NODES + 1):
        young, middle, full = gc.get_threshold()
        assert (young, middle) == before[:2] and full > 1_000_000  # young collections still run
        raise RuntimeError("a failing compile restores them too")
    assert gc.get_threshold() == before


def test_unique_names_within_a_pass_never_repeat_and_are_collected_afresh_per_pass():
    """unique_name keeps the pass's taken names (one graph scan per pass, not one per name: fold-bn on a 1,000-BN
    chain went from 13 s to 0.5 s) and a new pass scans again."""
    x = gs.Variable("x", dtype=np.float32, shape=[1])
    y = gs.Variable("y", dtype=np.float32, shape=[1])
    graph = gs.Graph(nodes=[gs.Node("Relu", "relu", inputs=[x], outputs=[y])], inputs=[x], outputs=[y])
    names = [ir.unique_name(graph, "y") for _ in range(3)] + [ir.unique_name(graph, "relu")]
    assert names == ["y_1", "y_2", "y_3", "relu_1"]
    z = gs.Variable("z", dtype=np.float32, shape=[1])
    graph.nodes.append(gs.Node("Relu", "other", inputs=[y], outputs=[z]))  # named outside unique_name
    ir.forget_names(graph)  # as Pass.__call__ does before every pass
    assert ir.unique_name(graph, "z") == "z_1" and ir.unique_name(graph, "y") == "y_1"
