"""The `simplify` pass: a library's simplification, taken only when the interface, size and equivalence hold."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from helpers import assert_unchanged, normal, op_counts, run_model, run_passes, text_model

from cnnc.passes import DEFAULT_PIPELINE, ORDER_CONSTRAINTS, simplify
from cnnc.pipeline.order import order_notes

rng = np.random.default_rng(0)
C = normal(rng, 4, 6)

# What exporters leave: x.view(x.size(0), -1) as a shape sub-graph on the symbolic batch (canonicalize folds shape
# sub-graphs on static dims only), a Transpose pair, a Cast to the type x already has, one constant written twice,
# and a node nobody reads (the manager's tidy drops that one whatever the pass does).
EXPORTER_LEFTOVERS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 6] x) => (float[N, 24] y, float[N, 4, 6] z) <float[4, 6] C1, float[4, 6] C2> {
    s = Shape(x)
    i0 = Constant<value = int64 {0}>()
    b = Gather<axis = 0>(s, i0)
    ax = Constant<value = int64[1] {0}>()
    bu = Unsqueeze(b, ax)
    m1 = Constant<value = int64[1] {-1}>()
    shp = Concat<axis = 0>(bu, m1)
    t1 = Transpose<perm = [0, 2, 1]>(x)
    t2 = Transpose<perm = [0, 2, 1]>(t1)
    c1 = Cast<to = 1>(t2)
    a1 = Add(c1, C1)
    a2 = Add(c1, C2)
    r = Reshape(a1, shp)
    y = Relu(r)
    dead = Sigmoid(a2)
    z = Mul(a2, a1)
}"""


def leftovers() -> onnx.ModelProto:
    return text_model(EXPORTER_LEFTOVERS, C1=C, C2=C.copy())


def as_the_pass_sees_it(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` after the manager's housekeeping alone (canonicalize, tidy): what the pass is given."""
    return run_passes(model).model


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("backend", ["onnxslim", "onnxsim", "ort"])
def test_exporter_leftovers_are_simplified_keeping_names_and_symbolic_batch(backend):
    model = leftovers()
    given = as_the_pass_sees_it(model)
    assert op_counts(given) == {"Shape": 1, "Gather": 1, "Unsqueeze": 1, "Concat": 1, "Transpose": 2, "Cast": 1,
                                "Add": 2, "Reshape": 1, "Relu": 1, "Mul": 1}
    run = run_passes(model, f"simplify{{backend={backend},check=true}}")
    counts = op_counts(run.model)
    assert run.changed and len(run.model.graph.node) < len(given.graph.node)
    assert counts.get("Transpose", 0) == 0 and counts.get("Cast", 0) == 0
    assert [o.name for o in run.model.graph.output] == ["y", "z"]
    assert [i.name for i in run.model.graph.input] == ["x"]
    assert _dims(run.model.graph.input[0]) == ["N", 4, 6] and _dims(run.model.graph.output[0])[0] == "N"
    for batch in (1, 3):  # the symbolic batch was not specialised to the batch the library may have tried
        feeds = {"x": normal(rng, batch, 4, 6)}
        for got, expected in zip(run_model(run.model, feeds), run_model(model, feeds)):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert run.result.stats["check_seconds"] >= 0 and run.result.stats["nodes_after"] == len(run.model.graph.node)


def test_onnxslim_folds_the_batch_shape_subgraph_and_ties_the_duplicate_constant():
    run = run_passes(leftovers(), "simplify")
    # Reshape(x, Concat(Shape(x)[0], -1)) is Reshape(x, [0, -1]); a1 and a2 were one Add of one constant.
    assert op_counts(run.model) == {"Add": 1, "Reshape": 1, "Relu": 1, "Mul": 1}
    assert len(run.model.graph.initializer) == 2  # C1 (tied with C2) and the constant shape


def test_second_run_has_nothing_to_simplify():
    first = run_passes(leftovers(), "simplify")
    second = run_passes(first.model, "simplify")
    assert_unchanged(first.model, second)
    assert "nothing to simplify" in second.result.skipped[0][1]


def test_known_custom_domain_op_is_kept():
    model = text_model("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft": 1]>
        g (float[N, 8] x) => (float[N, 8] y) {
            t = Identity(x)
            g = com.microsoft.Gelu(t)
            y = Relu(g)
        }""")
    run = run_passes(model, "simplify")
    assert op_counts(run.model) == {"Gelu": 1, "Relu": 1}
    assert next(n for n in run.model.graph.node if n.op_type == "Gelu").domain == "com.microsoft"


UNKNOWN_DOMAIN = """
    <ir_version: 8, opset_import: ["" : 17, "my.ops": 1]>
    g (float[N, 8] x) => (float[N, 8] y) {
        t = Identity(x)
        g = my.ops.Swish(t)
        y = Relu(g)
    }"""


@pytest.mark.parametrize("backend", ["onnxslim", "onnxsim", "ort"])
def test_unknown_custom_domain_is_skipped_with_the_reason(backend):
    model = onnx.parser.parse_model(UNKNOWN_DOMAIN)
    run = run_passes(model, f"simplify{{backend={backend}}}", check=False)  # the checker knows no my.ops schema
    assert_unchanged(model, run)
    (where, why), = run.result.skipped
    assert where == "whole graph" and why  # onnxsim/ort raise; onnxslim's result cannot be run, so is unproven
    assert any(word in why for word in ("not proven", "failed")), why


def test_missing_library_is_a_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxslim", None)  # `import onnxslim` raises ImportError
    model = leftovers()
    run = run_passes(model, "simplify")
    assert_unchanged(as_the_pass_sees_it(model), run)
    assert run.result.skipped == [("whole graph", run.result.skipped[0][1])]
    assert "onnxslim is not installed" in run.result.skipped[0][1]


def test_library_that_raises_is_a_skip(monkeypatch):
    def broken(model):
        raise ValueError("cannot fold this")
    monkeypatch.setitem(simplify.RUNNERS, "onnxslim", broken)
    model = leftovers()
    run = run_passes(model, "simplify")
    assert_unchanged(as_the_pass_sees_it(model), run)
    assert run.result.skipped == [("whole graph", "onnxslim failed: ValueError: cannot fold this")]


def _with(change):
    """A fake library: onnxslim's result, then `change` applied to it (to break one condition of the pass)."""
    def fake(model):
        result = simplify.run_onnxslim(model)
        change(result)
        return result
    return fake


def _grow(model):  # more nodes than the input
    for index in range(20):
        node = model.graph.node[-1]
        model.graph.node.append(oh.make_node("Identity", [node.output[0]], [f"extra{index}"]))


def _specialise(model):  # the symbolic batch becomes 1
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1


def _rename_output(model):
    model.graph.node[-1].output[0] = "renamed"
    model.graph.output[-1].name = "renamed"


def _wrong(model):  # not the same function: y = Relu(r) becomes y = Sigmoid(r)
    next(n for n in model.graph.node if n.op_type == "Relu").op_type = "Sigmoid"


@pytest.mark.parametrize("change, reason", [
    (_grow, "nodes for"), (_specialise, "input 'x' changed"), (_rename_output, "graph outputs changed"),
    (_wrong, "not equivalent"),
])
def test_results_that_break_a_condition_are_refused(monkeypatch, change, reason):
    monkeypatch.setitem(simplify.RUNNERS, "onnxslim", _with(change))
    model = leftovers()
    run = run_passes(model, "simplify{check=true}")
    assert_unchanged(as_the_pass_sees_it(model), run)
    assert reason in run.result.skipped[0][1], run.result.skipped


def test_output_dims_stay_symbolic():
    before = leftovers()
    after = onnx.ModelProto()
    after.CopyFrom(before)
    after.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert "specialised" in simplify.interface_change(before, after)


def test_default_pipeline_starts_with_simplify():
    assert DEFAULT_PIPELINE[0] == "simplify"
    assert order_notes(DEFAULT_PIPELINE, ORDER_CONSTRAINTS) == []
    assert order_notes(["fold-bn", "simplify"], ORDER_CONSTRAINTS)  # a user's order after a rewrite gets a note


def test_constants_above_max_weight_mb_are_left_to_the_cnn_passes():
    # C1 and C2 are 96 bytes each: a limit of 1e-4 MB (~105 bytes) is below their sum.
    run = run_passes(leftovers(), "simplify{max_weight_mb=0.0001}")
    assert not run.result.changed
    assert any("max_weight_mb" in why for _, why in run.result.skipped)


def test_a_wrong_library_result_on_a_small_model_is_refused_without_check(monkeypatch):
    # Below prove_below_mb the pass proves the library's result itself: its mistake costs this pass, not the compile.
    monkeypatch.setitem(simplify.RUNNERS, "onnxslim", _with(_wrong))
    model = leftovers()
    run = run_passes(model, "simplify")
    assert_unchanged(as_the_pass_sees_it(model), run)
    assert "not equivalent" in run.result.skipped[0][1], run.result.skipped
