"""The Python API: cnnc.compile / cnnc.verify, CompileResult, typed errors, and pass-list parsing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
from helpers import bn_params, make_model, op_counts, run_model

import cnnc
import cnnc.passes
from cnnc import ir
from cnnc.api import CompileResult
from cnnc.errors import CnncError, EquivalenceError, ModelError, UsageError
from cnnc.io import target
from cnnc.passes import DEFAULT_PIPELINE, PASSES, parse_pipeline
from cnnc.passes.fold_bn import FoldBatchNorm
from cnnc.pipeline.contract import Pass, PassResult


def _conv_bn_model(rng) -> onnx.ModelProto:
    inits = [("W", rng.standard_normal((6, 3, 3, 3)).astype(np.float32))] + bn_params(rng, 6, "bn")
    nodes = [oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 0, 1, 0], name="conv"),
             oh.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"], name="bn")]
    return make_model(nodes, [("x", ["N", 3, 6, 5])], [("y", None)], inits)


# --- deliberately broken test-only passes (registered per test, removed afterwards) --------------------------------

@dataclass(frozen=True)
class BrokenScale(Pass):
    """Multiplies the first Conv's weight by 1.01: a rewrite that is silently wrong."""

    name: ClassVar[str] = "test-broken-scale"
    summary: ClassVar[str] = "deliberately broken (test only)"

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult()
        conv = next(node for node in graph.nodes if node.op == "Conv")
        conv.inputs[1] = ir.make_constant("scaled", ir.constant_value(conv.inputs[1]) * np.float32(1.01), graph)
        result.did(f"scaled {conv.name}")
        return result


@dataclass(frozen=True)
class BrokenShape(Pass):
    """Appends a Concat that doubles the output's channels: the output shape no longer matches."""

    name: ClassVar[str] = "test-broken-shape"
    summary: ClassVar[str] = "deliberately broken (test only)"

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult()
        output = graph.outputs[0]
        inner = gs.Variable(ir.unique_name(graph, "inner"), dtype=output.dtype)
        producer = output.inputs[0]
        producer.outputs = [inner if t is output else t for t in producer.outputs]
        graph.nodes.append(gs.Node("Concat", inputs=[inner, inner], outputs=[output], attrs={"axis": 1}))
        output.shape = None
        result.did("doubled the output channels")
        return result


@dataclass(frozen=True)
class Raises(Pass):
    name: ClassVar[str] = "test-raises"
    summary: ClassVar[str] = "raises halfway through (test only)"

    def run(self, graph: gs.Graph) -> PassResult:
        graph.nodes[0].inputs.clear()  # a half-done rewrite that must be rolled back
        raise RuntimeError("boom")


@pytest.fixture
def test_passes(monkeypatch):
    for cls in (BrokenScale, BrokenShape, Raises):
        monkeypatch.setitem(PASSES, cls.name, lambda cls=cls: cls)


# --- compile -------------------------------------------------------------------------------------------------------

def test_compile_returns_a_compile_result(tmp_path, rng):
    path = tmp_path / "m.onnx"
    original = _conv_bn_model(rng)
    onnx.save(original, path)
    result = cnnc.compile(str(path), passes=["fold-bn"])
    assert isinstance(result, CompileResult) and isinstance(result.model, onnx.ModelProto)
    assert op_counts(result.model) == {"Conv": 1} and result.model.ir_version == target.max_ir_version()
    onnx.checker.check_model(result.model, full_check=True)
    report = result.report
    assert {"passes", "before", "after", "equivalence", "seconds", "canonicalize_seconds"} <= set(report)
    assert report["passes"][0]["pass"] == "fold-bn" and report["passes"][0]["changed"]
    assert report["before"]["ops"] == {"BatchNormalization": 1, "Conv": 1} and report["after"]["ops"] == {"Conv": 1}
    assert report["equivalence"]["passed"] and report["equivalence"]["summary"].startswith("equivalent")
    assert "equivalence_per_pass" not in report

    out = tmp_path / "out.onnx"
    assert result.save(out) == [out] and report["written"] == [str(out)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]
    x = rng.standard_normal((3, 3, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(run_model(onnx.load(out), {"x": x})[0], run_model(original, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    written = result.save(tmp_path / "ext.onnx", external_data=True)
    assert [p.name for p in written] == ["ext.onnx", "ext.onnx.data"]


def test_compile_never_modifies_the_callers_model(rng):
    model = _conv_bn_model(rng)
    before = model.SerializeToString()
    cnnc.compile(model, passes="fold-bn")
    assert model.SerializeToString() == before


def test_compile_without_check_and_with_default_passes(rng):
    result = cnnc.compile(_conv_bn_model(rng), check=False)
    assert result.report["equivalence"] is None
    assert [r["pass"] for r in result.report["passes"]] == list(DEFAULT_PIPELINE)


def test_a_broken_pass_raises_a_typed_equivalence_error(rng, test_passes):
    model = _conv_bn_model(rng)
    with pytest.raises(EquivalenceError) as caught:
        cnnc.compile(model, passes=["fold-bn", "test-broken-scale"])
    error = caught.value
    assert isinstance(error, CnncError) and error.exit_code == 1
    assert "not equivalent" in str(error) and error.report["equivalence"]["passed"] is False
    assert error.report["equivalence"]["outputs"][0]["max_rel"] > 1e-3  # the 1 % shows in the report


def test_verify_each_names_the_pass_that_broke_it(rng, test_passes):
    with pytest.raises(EquivalenceError, match="pass test-broken-scale broke equivalence") as caught:
        cnnc.compile(_conv_bn_model(rng), passes="fold-bn,test-broken-scale,fold-bn", verify_each=True)
    assert caught.value.report["failed_pass"] == "test-broken-scale"
    assert caught.value.report["equivalence"]["passed"] is False


def test_verify_each_names_a_pass_that_changes_an_output_shape(rng, test_passes):
    with pytest.raises(EquivalenceError, match="pass test-broken-shape broke equivalence") as caught:
        cnnc.compile(_conv_bn_model(rng), passes="fold-bn,test-broken-shape", verify_each=True)
    assert caught.value.report["failed_pass"] == "test-broken-shape"
    with pytest.raises(EquivalenceError, match="shape"):
        cnnc.compile(_conv_bn_model(rng), passes="fold-bn,test-broken-shape")


def test_verify_each_records_every_pass_that_passed(rng):
    result = cnnc.compile(_conv_bn_model(rng), passes="fold-bn", verify_each=True)
    assert result.report["equivalence_per_pass"]["fold-bn"]["passed"]


def test_a_pass_that_raises_is_rolled_back_unless_strict(rng, test_passes):
    model = _conv_bn_model(rng)
    result = cnnc.compile(model, passes="test-raises,fold-bn")
    failed, folded = result.report["passes"]
    assert failed["error"] == "RuntimeError: boom" and not failed["changed"]
    assert "rolled back" in failed["skipped"][0]["why"]
    assert folded["changed"] and op_counts(result.model) == {"Conv": 1} and result.report["equivalence"]["passed"]
    with pytest.raises(RuntimeError, match="boom"):
        cnnc.compile(model, passes="test-raises,fold-bn", strict=True)


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"", "empty"),
                                              (b"\x80\x04K\x01.", "pickle"), (b"\x08\x07garbage", "not a valid")])
def test_bad_paths_raise_model_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        cnnc.compile(path)
    with pytest.raises(ModelError):
        cnnc.compile(tmp_path)  # a folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["bad.onnx"])


def test_usage_errors(rng, tmp_path):
    with pytest.raises(UsageError, match="unknown pass"):
        cnnc.compile(_conv_bn_model(rng), passes="fold-bn,nope")
    with pytest.raises(UsageError, match="PyTorch file"):
        cnnc.compile(tmp_path / "weights.pt")
    with pytest.raises(UsageError, match="cannot compile"):
        cnnc.compile(3.5)


def test_verify_api(rng):
    model = _conv_bn_model(rng)
    folded = cnnc.compile(model, passes="fold-bn").model
    report = cnnc.verify(model, folded)
    assert report["passed"] and report["feeds"] == 4
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    weight = broken.graph.initializer[0]
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * np.float32(1.01), weight.name))
    with pytest.raises(EquivalenceError, match="not equivalent") as caught:
        cnnc.verify(model, broken)
    assert caught.value.report["equivalence"]["passed"] is False
    assert cnnc.verify(model, broken, atol=1.0)["passed"]


# --- pass lists ----------------------------------------------------------------------------------------------------

def test_parse_pipeline_options():
    assert parse_pipeline("fold-bn{into_consumer=false}") == [FoldBatchNorm(into_consumer=False)]
    (parsed,) = parse_pipeline(" fold-bn { into_consumer = 0 , lone_to_mul_add=yes } ")
    assert parsed == FoldBatchNorm(into_consumer=False, lone_to_mul_add=True)
    assert parsed.spec() == "fold-bn{into_consumer=False}"
    assert parse_pipeline(parsed.spec()) == [parsed]  # spec() round-trips
    assert parse_pipeline("fold-bn,fold-bn{lone_to_mul_add=off}") == [FoldBatchNorm(),
                                                                       FoldBatchNorm(lone_to_mul_add=False)]
    mixed = parse_pipeline([FoldBatchNorm(into_consumer=False), "fold-bn"])
    assert mixed == [FoldBatchNorm(into_consumer=False), FoldBatchNorm()]
    assert parse_pipeline("") == [] and parse_pipeline([]) == []


@pytest.mark.parametrize("text, message", [
    ("fold-bn{nope=1}", "unknown option 'nope=1'"),
    ("fold-bn{into_consumer}", "unknown option"),
    ("fold-bn{into_consumer=maybe}", "bad value 'maybe'"),
    ("fold-bn{into_consumer=1", "cannot parse"),
    ("fold-bn;fold-bn", "cannot parse"),
    ("no-such-pass", "unknown pass 'no-such-pass'"),
])
def test_parse_pipeline_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_pipeline(text)


def test_registry_names_match_their_classes():
    # One dict cannot hold a name twice; each loader must return the class that carries that name.
    assert cnnc.passes.get_pass("fold-bn") is FoldBatchNorm
    assert all(load().name == name for name, load in cnnc.passes.get_all_passes().items())
