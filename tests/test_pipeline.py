"""The pass manager: requires/ensures, rollback, housekeeping records, order notes, and first_match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
from helpers import bn_params, make_model, op_counts

import cnnc
from cnnc.passes import PASSES
from cnnc.passes.fold_bn import FoldBatchNorm
from cnnc.pipeline.contract import Pass, PassResult, PostconditionError, PreconditionError, single_producers
from cnnc.pipeline.manager import run_pipeline
from cnnc.pipeline.match import fail, first_match, success


def _conv_bn(rng):
    inits = [("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))] + bn_params(rng, 4, "bn")
    nodes = [oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"], name="bn")]
    return make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", None)], inits)


@dataclass(frozen=True)
class NeedsGemm(Pass):
    name: ClassVar[str] = "test-needs-gemm"
    summary: ClassVar[str] = "requires a Gemm (test only)"

    def requires(self, graph):
        if not any(node.op == "Gemm" for node in graph.nodes):
            raise self.precondition("the graph has no Gemm")

    def run(self, graph):  # pragma: no cover - never reached on the test graph
        raise AssertionError("run() after a failed precondition")


@dataclass(frozen=True)
class DoublesAWriter(Pass):
    """Rewires a second node onto the graph output: the wiring postcondition catches it."""

    name: ClassVar[str] = "test-doubles-a-writer"
    summary: ClassVar[str] = "breaks single assignment (test only)"

    def run(self, graph):
        result = PassResult()
        graph.nodes.append(gs.Node("Identity", inputs=[graph.inputs[0]], outputs=[graph.outputs[0]]))
        result.did("second writer of the output")
        return result

    def ensures(self, graph, result):
        broken = single_producers(graph)
        if broken:
            raise self.postcondition(broken)


def test_call_runs_requires_run_ensures(rng):
    graph = gs.import_onnx(_conv_bn(rng))
    with pytest.raises(PreconditionError, match="test-needs-gemm: the graph has no Gemm"):
        NeedsGemm()(graph)
    with pytest.raises(PostconditionError, match="written by 2 nodes"):
        DoublesAWriter()(gs.import_onnx(_conv_bn(rng)))
    assert FoldBatchNorm()(graph).changed


@dataclass(frozen=True)
class RewritesSilently(Pass):
    name: ClassVar[str] = "test-rewrites-silently"
    summary: ClassVar[str] = "drops the last node but reports no change (test only)"

    def run(self, graph):
        graph.outputs = [graph.nodes[-1].inputs[0]]
        graph.nodes.pop()
        return PassResult()


def test_a_pass_that_rewrites_without_saying_so_fails_in_strict_mode(rng):
    """Unchanged passes get no tidy, shape refresh or new snapshot, so the manager holds passes to their word."""
    with pytest.raises(PostconditionError, match="reported no change but rewrote the graph"):
        run_pipeline(gs.import_onnx(_conv_bn(rng)), [RewritesSilently()], strict=True)
    _, report = run_pipeline(gs.import_onnx(_conv_bn(rng)), [FoldBatchNorm(), FoldBatchNorm()], strict=True)
    assert [r["changed"] for r in report.as_dict()] == [True, False]  # an honest no-change pass passes the check


def test_a_precondition_failure_is_a_skip_of_the_whole_graph(rng):
    _, report = run_pipeline(gs.import_onnx(_conv_bn(rng)), [NeedsGemm(), FoldBatchNorm()], strict=True)
    skipped, folded = report.as_dict()
    assert skipped["skipped"] == [{"where": "whole graph", "why": "the graph has no Gemm"}]
    assert not skipped["changed"] and skipped["error"] is None and folded["changed"]


def test_a_postcondition_failure_is_rolled_back_and_recorded(rng):
    graph, report = run_pipeline(gs.import_onnx(_conv_bn(rng)), [DoublesAWriter(), FoldBatchNorm()])
    broken, folded = report.as_dict()
    assert broken["error"].startswith("PostconditionError: pass test-doubles-a-writer")
    assert not broken["changed"] and folded["changed"]
    assert [node.op for node in graph.nodes] == ["Conv"]
    with pytest.raises(PostconditionError):
        run_pipeline(gs.import_onnx(_conv_bn(rng)), [DoublesAWriter()], strict=True)


def test_fold_bn_ensures_every_bn_is_folded_or_reported(rng):
    graph = gs.import_onnx(_conv_bn(rng))
    with pytest.raises(PostconditionError, match="1 BatchNormalization node"):
        FoldBatchNorm().ensures(graph, PassResult())  # nothing reported, the BN still there


def test_housekeeping_records_and_kinds(rng):
    result = cnnc.compile(_conv_bn(rng), passes="fold-bn,collapse")
    report = result.report
    assert [r["kind"] for r in report["passes"]] == ["exact", "exact"]
    housekeeping = {r["pass"]: r for r in report["housekeeping"]}
    assert list(housekeeping) == ["canonicalize", "tidy", "refresh-shapes", "check-model"]
    assert all(r["kind"] == "housekeeping" for r in housekeeping.values())
    assert housekeeping["canonicalize"]["runs"] == 1
    # only fold-bn changed the graph: a pass that changed nothing leaves nothing to tidy or refresh
    assert housekeeping["tidy"]["runs"] == housekeeping["refresh-shapes"]["runs"] == 1
    assert housekeeping["check-model"]["runs"] == 1
    assert report["canonicalize_seconds"] == round(housekeeping["canonicalize"]["seconds"], 6)
    assert report["order_notes"] == []
    assert op_counts(result.model) == {"Conv": 1}


def test_a_user_order_against_a_constraint_runs_with_a_note(rng):
    report = cnnc.compile(_conv_bn(rng), passes="collapse,fold-bn").report
    assert [r["pass"] for r in report["passes"]] == ["collapse", "fold-bn"]
    (note,) = report["order_notes"]
    assert note.startswith("collapse runs before fold-bn:")


def test_housekeeping_passes_run_by_name(rng, monkeypatch):
    monkeypatch.setitem(PASSES, NeedsGemm.name, lambda: NeedsGemm)
    report = cnnc.compile(_conv_bn(rng), passes="tidy,refresh-shapes,check-model,test-needs-gemm").report
    assert [r["kind"] for r in report["passes"]] == ["housekeeping"] * 3 + ["exact"]
    assert report["passes"][-1]["skipped"] == [{"where": "whole graph", "why": "the graph has no Gemm"}]


def test_first_match_returns_the_first_success_and_the_failures_before_it():
    tried = []

    def attempt(name, result):
        def run():
            tried.append(name)
            return result
        return name, run

    outcome = first_match([attempt("a", fail("W is not a constant")), attempt("b", success("done")),
                           attempt("c", success("never"))])
    assert outcome and outcome.strategy == "b" and outcome.value == "done" and tried == ["a", "b"]
    assert outcome.reasons() == "W is not a constant"
    outcome = first_match([attempt("conv", fail("x")), attempt("gemm", fail("y"))])
    assert not outcome and outcome.reasons(labelled=True) == "conv: x; gemm: y"
    assert not fail("why") and fail("why").reason == "why" and success(3).value == 3
