"""fold-bn: positive graphs, one negative graph per precondition, idempotence, equivalence, checker, hypothesis."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
from helpers import (
    assert_same_outputs,
    assert_unchanged,
    bn_params,
    initializer,
    make_model,
    normal,
    op_counts,
    run_passes,
    text_model,
)
from hypothesis import given
from hypothesis import strategies as st

import cnnc
from cnnc import ir
from cnnc.eval import unsupported_reason
from cnnc.ir.ops import linear_reason


def _bn(x, y, prefix, **attrs):
    return oh.make_node("BatchNormalization", [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean",
                                               f"{prefix}_var"], [y], name=prefix, **attrs)


def _conv_bn_model(rng, groups=1, bias=True, pads=(1, 0, 2, 1), cin=4, cout=6, kernel=(3, 2)):
    w = rng.standard_normal((cout, cin // groups, *kernel)).astype(np.float32)
    inits = [("W", w)] + ([("B", rng.standard_normal(cout).astype(np.float32))] if bias else [])
    inits += bn_params(rng, cout, "bn")
    conv = oh.make_node("Conv", ["x", "W"] + (["B"] if bias else []), ["c"], name="conv", group=groups,
                        pads=list(pads), kernel_shape=list(kernel))
    return make_model([conv, _bn("c", "y", "bn")], [("x", ["N", cin, 7, 9])], [("y", None)], inits)


def _feeds(rng, shape):
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def test_conv_bn_folds_into_conv_and_keeps_output_name(rng):
    model = _conv_bn_model(rng)
    compiled, result = run_passes(model, "fold-bn")
    assert op_counts(compiled) == {"Conv": 1}
    assert result.changed and len(result.applied) == 1
    conv = compiled.graph.node[0]
    assert conv.input[0] == "x" and conv.output[0] == "y" == compiled.graph.output[0].name
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 7, 9)))


def test_conv_without_bias_gets_the_bn_shift_as_bias(rng):
    model = _conv_bn_model(rng, bias=False)
    compiled, _ = run_passes(model, "fold-bn")
    assert op_counts(compiled) == {"Conv": 1} and len(compiled.graph.node[0].input) == 3
    assert_same_outputs(model, compiled, _feeds(rng, (3, 4, 7, 9)))


def test_grouped_and_depthwise_conv(rng):
    for groups, cin, cout in ((2, 4, 6), (4, 4, 4), (4, 4, 8)):
        model = _conv_bn_model(rng, groups=groups, cin=cin, cout=cout)
        compiled, _ = run_passes(model, "fold-bn")
        assert op_counts(compiled) == {"Conv": 1}
        assert_same_outputs(model, compiled, _feeds(rng, (2, cin, 7, 9)))


def test_conv_transpose_bn_uses_the_transposed_weight_layout(rng):
    # W is Cin x Cout/g x k: a wrong layout would scale input channels instead of output channels.
    for groups in (1, 2):
        cin, cout = 4, 6
        w = rng.standard_normal((cin, cout // groups, 3, 2)).astype(np.float32)
        inits = [("W", w), ("B", rng.standard_normal(cout).astype(np.float32))] + bn_params(rng, cout, "bn")
        node = oh.make_node("ConvTranspose", ["x", "W", "B"], ["c"], group=groups, strides=[2, 1], pads=[1, 0, 0, 1])
        model = make_model([node, _bn("c", "y", "bn")], [("x", ["N", cin, 5, 6])], [("y", None)], inits)
        compiled, _ = run_passes(model, "fold-bn")
        assert op_counts(compiled) == {"ConvTranspose": 1}
        assert_same_outputs(model, compiled, _feeds(rng, (2, cin, 5, 6)))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5)])
def test_gemm_bn_both_transb(rng, trans_b, c_shape):
    w = rng.standard_normal((5, 8) if trans_b else (8, 5)).astype(np.float32)
    inits = [("W", w)] + bn_params(rng, 5, "bn")
    inputs = ["x", "W"]
    if c_shape:
        inits.append(("C", rng.standard_normal(c_shape).astype(np.float32)))
        inputs.append("C")
    gemm = oh.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3)
    model = make_model([gemm, _bn("g", "y", "bn")], [("x", ["N", 8])], [("y", None)], inits)
    compiled, _ = run_passes(model, "fold-bn")
    assert op_counts(compiled) == {"Gemm": 1}
    assert_same_outputs(model, compiled, _feeds(rng, (3, 8)))


def test_bn_before_pad_free_conv_folds_forward(rng):
    cin, cout = 4, 6
    inits = [("W", rng.standard_normal((cout, cin // 2, 3, 3)).astype(np.float32)),
             ("B", rng.standard_normal(cout).astype(np.float32))] + bn_params(rng, cin, "bn")
    conv = oh.make_node("Conv", ["b", "W", "B"], ["y"], group=2, strides=[2, 1], dilations=[1, 2])
    model = make_model([oh.make_node("Relu", ["x"], ["r"]), _bn("r", "b", "bn"), conv],
                       [("x", ["N", cin, 9, 11])], [("y", None)], inits)
    compiled, result = run_passes(model, "fold-bn")
    assert op_counts(compiled) == {"Relu": 1, "Conv": 1}
    assert "following Conv" in result.applied[0]
    assert_same_outputs(model, compiled, _feeds(rng, (2, cin, 9, 11)))


def test_bn_before_gemm_folds_forward(rng):
    inits = [("W", rng.standard_normal((6, 4)).astype(np.float32)),
             ("C", rng.standard_normal(6).astype(np.float32))] + bn_params(rng, 4, "bn")
    nodes = [oh.make_node("Relu", ["x"], ["r"]), _bn("r", "b", "bn"),
             oh.make_node("Gemm", ["b", "W", "C"], ["y"], transB=1, alpha=0.5, beta=2.0)]
    model = make_model(nodes, [("x", ["N", 4])], [("y", None)], inits)
    compiled, _ = run_passes(model, "fold-bn")
    assert op_counts(compiled) == {"Relu": 1, "Gemm": 1}
    assert_same_outputs(model, compiled, _feeds(rng, (3, 4)))


def test_bn_before_padded_conv_is_not_folded_forward(rng):
    # Zero padding would read 0 where BN gives t: the border would be wrong. The BN stays one kernel (Mul+Add does
    # not pay on onnxruntime), or becomes Mul+Add when forced.
    inits = [("W", rng.standard_normal((3, 4, 3, 3)).astype(np.float32))] + bn_params(rng, 4, "bn")
    nodes = [oh.make_node("Relu", ["x"], ["r"]), _bn("r", "b", "bn"),
             oh.make_node("Conv", ["b", "W"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", ["N", 4, 6, 5])], [("y", None)], inits)
    kept, result = run_passes(model, "fold-bn")
    assert not result.changed and op_counts(kept) == {"Relu": 1, "BatchNormalization": 1, "Conv": 1}
    assert "pads its input" in result.skipped[0][1] and "kept as one kernel" in result.skipped[0][1]
    compiled, result = run_passes(model, "fold-bn{force_mul_add=true}")
    assert op_counts(compiled) == {"Relu": 1, "Mul": 1, "Add": 1, "Conv": 1}
    assert "pads its input" in result.applied[0]
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 6, 5)))


def test_conv_output_with_second_consumer_keeps_conv_weights(rng):
    model = _conv_bn_model(rng)
    model.graph.node.append(oh.make_node("Relu", ["c"], ["side"]))
    model.graph.output.append(oh.make_tensor_value_info("side", onnx.TensorProto.FLOAT, None))
    kept, _ = run_passes(model, "fold-bn")
    assert op_counts(kept) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    compiled, result = run_passes(model, "fold-bn{force_mul_add=true}")
    assert op_counts(compiled) == {"Conv": 1, "Mul": 1, "Add": 1, "Relu": 1}
    original_w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    conv = next(n for n in compiled.graph.node if n.op_type == "Conv")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in compiled.graph.initializer}
    np.testing.assert_array_equal(weights[conv.input[1]], original_w)
    assert "another consumer" in result.applied[0]
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 7, 9)))


def test_shared_weight_is_cloned_not_modified(rng):
    # Two convs share W; only one is followed by BN. The other must still see the original W.
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    inits = [("W", w)] + bn_params(rng, 4, "bn")
    nodes = [oh.make_node("Conv", ["x", "W"], ["c1"], pads=[1, 1, 1, 1], name="c1"), _bn("c1", "y1", "bn"),
             oh.make_node("Conv", ["x", "W"], ["y2"], pads=[1, 1, 1, 1], name="c2")]
    model = make_model(nodes, [("x", ["N", 4, 6, 6])], [("y1", None), ("y2", None)], inits)
    compiled, _ = run_passes(model, "fold-bn")
    assert op_counts(compiled) == {"Conv": 2}
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in compiled.graph.initializer}
    second = next(n for n in compiled.graph.node if n.output[0] == "y2")
    np.testing.assert_array_equal(weights[second.input[1]], w)
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 6, 6)))


def test_lone_bn_stays_one_kernel_unless_forced(rng):
    # DenseNet's BNs after a Concat: onnxruntime fuses neither Mul nor Add there, so Mul+Add is two kernels and an
    # extra round trip of the activation; the cost model says it loses and the BN is kept, with the candidate.
    model = make_model([oh.make_node("Relu", ["x"], ["r"]), _bn("r", "y", "bn")],
                       [("x", ["N", 3, 4, 5])], [("y", None)], bn_params(rng, 3, "bn"))
    kept, result = run_passes(model, "fold-bn")
    assert not result.changed and op_counts(kept) == {"Relu": 1, "BatchNormalization": 1}
    (candidate,) = result.candidates
    assert candidate.verdict == "loses" and not candidate.applied and len(candidate.id) == 8
    assert candidate.estimate["before"]["kernels"] == 1 and candidate.estimate["after"]["kernels"] == 2
    # apply_close takes close calls only: a losing rewrite stays refused.
    _, close_applied = run_passes(model, "fold-bn{apply_close=all}")
    assert not close_applied.changed
    compiled, _ = run_passes(model, "fold-bn{force_mul_add=true}")
    assert op_counts(compiled) == {"Relu": 1, "Mul": 1, "Add": 1}
    assert compiled.graph.output[0].name == "y"
    assert_same_outputs(model, compiled, _feeds(rng, (2, 3, 4, 5)))


def test_negative_training_mode_is_skipped(rng):
    model = _conv_bn_model(rng)
    model.graph.node[1].attribute.append(oh.make_attribute("training_mode", 1))
    model.graph.node[1].output.extend(["running_mean", "running_var"])  # training form has three outputs
    compiled, result = run_passes(model, "fold-bn")
    assert not result.changed and "training_mode" in result.skipped[0][1]
    assert op_counts(compiled) == {"Conv": 1, "BatchNormalization": 1}


def test_negative_non_constant_bn_parameters_are_skipped(rng):
    model = _conv_bn_model(rng)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "bn_var"))
    model.graph.input.append(oh.make_tensor_value_info("bn_var", onnx.TensorProto.FLOAT, [6]))
    _, result = run_passes(model, "fold-bn")
    assert not result.changed and "not a constant" in result.skipped[0][1]


def test_negative_non_finite_scale_is_skipped(rng):
    model = _conv_bn_model(rng)
    var = next(i for i in model.graph.initializer if i.name == "bn_var")
    values = onnx.numpy_helper.to_array(var).copy()
    values[2] = -1.0  # σ² + ε < 0: √ is NaN
    var.CopyFrom(onnx.numpy_helper.from_array(values, "bn_var"))
    _, result = run_passes(model, "fold-bn")
    assert not result.changed and "not finite" in result.skipped[0][1]


def test_negative_non_constant_conv_weight_falls_back_to_mul_add(rng):
    model = _conv_bn_model(rng)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "W"))
    model.graph.input.append(oh.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [6, 4, 3, 2]))
    compiled, result = run_passes(model, "fold-bn{force_mul_add=true}")
    assert op_counts(compiled) == {"Conv": 1, "Mul": 1, "Add": 1}
    assert "not a float constant" in result.applied[0]


def test_negative_unknown_rank_lone_bn_is_skipped(rng):
    # A custom-domain op hides the rank of its output from shape inference; Mul+Add could not be shaped.
    nodes = [oh.make_node("Mystery", ["x"], ["r"], domain="test.custom"), _bn("r", "y", "bn"),
             oh.make_node("Mystery", ["y"], ["z"], domain="test.custom")]
    model = make_model(nodes, [("x", ["N", 3, 4, 5])], [("z", ["N", 3, 4, 5])], bn_params(rng, 3, "bn"))
    model.opset_import.append(oh.make_opsetid("test.custom", 1))
    compiled, result = run_passes(model, "fold-bn")
    assert not result.changed and "rank is unknown" in result.skipped[0][1]
    assert op_counts(compiled) == {"Mystery": 2, "BatchNormalization": 1}


def test_idempotent(rng):
    compiled, _ = run_passes(_conv_bn_model(rng), "fold-bn")
    again, result = run_passes(compiled, "fold-bn")
    assert not result.changed and op_counts(again) == op_counts(compiled)


def test_folding_is_more_exact_than_float32_reference(rng):
    """Folded in float64: the error against a float64 evaluation is no worse than float32 rounding."""
    model = _conv_bn_model(rng, pads=(0, 0, 0, 0))
    compiled, _ = run_passes(model, "fold-bn")
    feeds = _feeds(rng, (2, 4, 7, 9))
    from helpers import run_model

    a, b = run_model(model, feeds)[0], run_model(compiled, feeds)[0]
    assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(a))))


@given(data=st.data())
def test_random_conv_bn_graphs(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    groups = data.draw(st.sampled_from([1, 2, 3]))
    cin = groups * data.draw(st.integers(1, 3))
    cout = groups * data.draw(st.integers(1, 3))
    kernel = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    pads = tuple(data.draw(st.integers(0, 2)) for _ in range(4))
    strides = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    dilations = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    height = data.draw(st.integers(kernel[0] * dilations[0], 12))
    width = data.draw(st.integers(kernel[1] * dilations[1], 12))
    batch = data.draw(st.integers(1, 3))
    bias = data.draw(st.booleans())
    transpose = data.draw(st.booleans())
    bn_before = data.draw(st.booleans())
    if transpose:
        w = rng.standard_normal((cin, cout // groups, *kernel)).astype(np.float32)
    else:
        w = rng.standard_normal((cout, cin // groups, *kernel)).astype(np.float32)
    inits = [("W", w)] + ([("B", rng.standard_normal(cout).astype(np.float32))] if bias else [])
    inits += bn_params(rng, cout, "bn") + bn_params(rng, cin, "pre")
    op = "ConvTranspose" if transpose else "Conv"
    conv = oh.make_node(op, ["p" if bn_before else "x", "W"] + (["B"] if bias else []), ["c"], group=groups,
                        pads=list(pads), strides=list(strides), dilations=list(dilations))
    nodes = ([_bn("x", "p", "pre")] if bn_before else []) + [conv, _bn("c", "y", "bn")]
    model = make_model(nodes, [("x", ["N", cin, height, width])], [("y", None)], inits)
    compiled, result = run_passes(model, "fold-bn{force_mul_add=true}")  # a lone BN too: its maths is tested
    assert result.changed
    assert op_counts(compiled).get("BatchNormalization", 0) == 0
    onnx.checker.check_model(compiled, full_check=True)
    feeds = {"x": rng.standard_normal((batch, cin, height, width)).astype(np.float32)}
    assert_same_outputs(model, compiled, feeds, rtol=1e-4, atol=1e-5)
    _, second = run_passes(compiled, "fold-bn{force_mul_add=true}")
    assert not second.changed


def test_api_compile_torch_resnet_leaves_no_batchnorm():
    torch = pytest.importorskip("torch")
    from cnnc.zoo import build_example

    module, example_input = build_example("resnet-bn")
    result = cnnc.compile(module, passes="fold-bn", example_input=example_input, rtol=1e-4, atol=1e-5)
    assert "BatchNormalization" not in op_counts(result.model)
    assert result.report["before"]["ops"]["BatchNormalization"] == 8
    assert result.report["equivalence"]["passed"]
    with torch.no_grad():
        expected = module(example_input).numpy()
    from helpers import run_model

    got = run_model(result.model, {"input": example_input.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# --- models written as ONNX text (onnx.parser syntax, as onnxscript's rewriter tests) -------------------------------

CONV_BN = """
    <ir_version: 8, opset_import: ["" : 17]>
    conv_bn (float[N, 4, 7, 9] x) => (float[N, 6, 7, 9] y)
    <float[6, 4, 3, 3] W, float[6] B, float[6] gamma, float[6] beta, float[6] mean, float[6] var> {
        [conv] c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
        [bn] y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
    }"""


def _text_bn_weights(rng):
    gamma, beta, mean, var = (value for _, value in bn_params(rng, 6, "bn"))
    return {"W": normal(rng, 6, 4, 3, 3), "B": normal(rng, 6), "gamma": gamma, "beta": beta, "mean": mean, "var": var}


def test_text_conv_bn_folds_into_the_conv_in_float64(rng):
    weights = _text_bn_weights(rng)
    model = text_model(CONV_BN, **weights)
    compiled, result = run_passes(model, "fold-bn")
    assert result.changed and op_counts(compiled) == {"Conv": 1}
    conv = compiled.graph.node[0]
    assert list(conv.input[:1]) == ["x"] and list(conv.output) == ["y"]  # the BN's output name survives
    scale = weights["gamma"].astype(np.float64) / np.sqrt(weights["var"].astype(np.float64) + 1e-3)
    np.testing.assert_allclose(initializer(compiled, conv.input[1]), weights["W"] * scale[:, None, None, None],
                               rtol=1e-6)
    np.testing.assert_allclose(initializer(compiled, conv.input[2]),
                               (weights["B"] - weights["mean"]) * scale + weights["beta"], rtol=1e-6, atol=1e-7)
    assert_same_outputs(model, compiled, {"x": normal(rng, 2, 4, 7, 9)})


def test_text_negative_statistics_fed_at_run_time_are_not_folded(rng):
    weights = _text_bn_weights(rng)
    mean = weights.pop("mean")
    model = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        conv_bn (float[N, 4, 7, 9] x, float[6] mean) => (float[N, 6, 7, 9] y)
        <float[6, 4, 3, 3] W, float[6] B, float[6] gamma, float[6] beta, float[6] var> {
            [conv] c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
            [bn] y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
        }""", **weights)
    run = run_passes(model, "fold-bn")
    assert_unchanged(model, run)
    assert run.result.skipped == [("BatchNormalization 'bn'", "scale, bias, mean or variance is not a constant")]
    assert_same_outputs(model, run.model, {"x": normal(rng, 2, 4, 7, 9), "mean": mean})


@pytest.mark.parametrize("attrs, outputs, reason", [
    ({}, ["y"], None),
    ({"training_mode": 0}, ["y", "", ""], None),
    ({"training_mode": 1}, ["y"], "training_mode=1"),
    ({"is_test": 0}, ["y"], "is_test=0"),
    ({"is_test": 1}, ["y"], None),
    ({}, ["y", "mean_out", "var_out"], "running mean/variance outputs"),
])
def test_one_rule_says_when_a_batch_norm_is_in_training_form(attrs, outputs, reason):
    # The op table (collapse), the evaluator and fold-bn all ask cnnc.ir.batch_norm_training_reason.
    inputs = [gs.Variable("x")] + [gs.Constant(n, np.ones(2, np.float32)) for n in ("s", "b", "m", "v")]
    node = gs.Node("BatchNormalization", attrs=attrs, inputs=inputs,
                   outputs=[gs.Variable(name) for name in outputs])
    found = ir.batch_norm_training_reason(node)
    assert (found is None) if reason is None else (reason in found)
    assert (unsupported_reason(node) is None) == (reason is None)
    assert (linear_reason(node) is None) == (reason is None)
