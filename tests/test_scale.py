"""Compile speed at scale: thread counts (cnnc.threads), schedule's linear-time fallback above exact_limit,
canonicalize's skipped folding on large chains, and the manager's cheap snapshot (rollback restores the graph
exactly). Timing targets live in bench/scale.py, not here."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from helpers import make_model, run_passes
from onnx import helper as oh

import cnnc
from cnnc import ir
from cnnc import threads as cnnc_threads
from cnnc.errors import UsageError
from cnnc.ir.canonicalize import canonicalize, may_fold
from cnnc.linear.hypergraph import Hyperedge, Hypergraph
from cnnc.linear.memory_order import EXACT_LIMIT, min_peak_order
from cnnc.passes.schedule import Schedule
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
