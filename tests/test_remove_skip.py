"""remove-skip: positive graphs, one negative graph per precondition, idempotence, equivalence, checker, hypothesis,
the approximate variant, and the homotopy export end to end (the pass-test recipe in ARCHITECTURE.md)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from helpers import (
    assert_same_outputs,
    assert_unchanged,
    bn_params,
    initializer,
    make_model,
    node_named,
    normal,
    op_counts,
    run_model,
    run_passes,
    text_model,
)
from hypothesis import given
from hypothesis import strategies as st

import cnnc
from cnnc.errors import UsageError
from cnnc.passes import DEFAULT_PIPELINE, get_pass, parse_pipeline
from cnnc.passes.remove_skip import RemoveSkip, RemoveSkipApprox


def _feeds(rng, shape):
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def _f32(value):
    return np.asarray(value, dtype=np.float32)


def _homotopy_block(rng, t=0.0, t_as="initializer", cin=4, cout=6, stride=2, height=7, width=9,
                    branch_scale=None):
    """The join cnnc.homotopy exports: Relu(Mul(Sub(1, t), F) + Mul(t, S)), F two convs, S a 1x1 conv + BN."""
    inits = [("W1", _f32(rng.standard_normal((cout, cin, 3, 3)))), ("B1", _f32(rng.standard_normal(cout))),
             ("W2", _f32(rng.standard_normal((cout, cout, 3, 3)))), ("B2", _f32(rng.standard_normal(cout))),
             ("Wp", _f32(rng.standard_normal((cout, cin, 1, 1))))] + bn_params(rng, cout, "bnp")
    nodes = [oh.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[stride] * 2),
             oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "W2", "B2"], ["F"], name="conv2", pads=[1, 1, 1, 1]),
             oh.make_node("Conv", ["x", "Wp"], ["p"], name="proj", strides=[stride] * 2),
             oh.make_node("BatchNormalization", ["p", "bnp_scale", "bnp_bias", "bnp_mean", "bnp_var"], ["S"],
                          name="proj_bn")]
    inputs = [("x", ["N", cin, height, width])]
    if t_as == "initializer":
        inits.append(("t", _f32(t)))
    elif t_as == "constant":
        nodes.insert(0, oh.make_node("Constant", [], ["t"], value=onnx.numpy_helper.from_array(_f32(t))))
    else:  # a graph input: t is not a constant
        inputs.append(("t", []))
    if branch_scale is None:
        inits.append(("one", _f32(1.0)))
        nodes += [oh.make_node("Sub", ["one", "t"], ["one_minus_t"], name="one_minus_t"),
                  oh.make_node("Mul", ["one_minus_t", "F"], ["Fs"], name="scale_branch")]
    else:
        inits.append(("c", _f32(branch_scale)))
        nodes.append(oh.make_node("Mul", ["F", "c"], ["Fs"], name="scale_branch"))
    nodes += [oh.make_node("Mul", ["t", "S"], ["Ss"], name="scale_skip"),
              oh.make_node("Add", ["Fs", "Ss"], ["y"], name="join"),
              oh.make_node("Relu", ["y"], ["out"], name="relu_out")]
    return make_model(nodes, inputs, [("out", None)], inits)


# ------------------------------------------------------------------------------------------------- positive


@pytest.mark.parametrize("t_as", ["initializer", "constant"])
def test_zero_weight_join_loses_skip_and_projection(rng, t_as):
    model = _homotopy_block(rng, t_as=t_as)
    compiled, result = run_passes(model, "remove-skip")
    assert op_counts(compiled) == {"Conv": 2, "Relu": 2}
    assert result.changed and len(result.applied) == 1 and "(1 − t) = 1 was dropped" in result.applied[0]
    assert result.stats["removed_ops"] == {"Conv": 1, "BatchNormalization": 1, "Mul": 2, "Add": 1}
    # Rewiring: the output Relu reads the branch's last conv directly; the projection conv is gone.
    assert node_named(compiled, "relu_out").input[0] == node_named(compiled, "conv2").output[0]
    assert {n.name for n in compiled.graph.node} == {"conv1", "relu1", "conv2", "relu_out"}
    assert compiled.graph.output[0].name == "out"
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 7, 9)))


def test_chain_that_multiplies_by_zero(rng):
    # Skip operand = Div(Mul(Mul(S, 0.5), t), 3) with t = 0: the zero sits inside a chain of constant scalings.
    model = _homotopy_block(rng)
    model.graph.initializer.extend([onnx.numpy_helper.from_array(_f32(0.5), "half"),
                                    onnx.numpy_helper.from_array(_f32(3.0), "three")])
    skip = node_named(model, "scale_skip")
    skip.input[:] = ["S_half", "t"]
    skip.output[0] = "Ss_raw"
    position = list(model.graph.node).index(skip)
    model.graph.node.insert(position, oh.make_node("Mul", ["S", "half"], ["S_half"], name="halve"))
    model.graph.node.insert(position + 2, oh.make_node("Div", ["Ss_raw", "three"], ["Ss"], name="third"))
    compiled, result = run_passes(model, "remove-skip")
    assert op_counts(compiled) == {"Conv": 2, "Relu": 2}
    assert result.stats["removed_ops"]["Mul"] == 3 and result.stats["removed_ops"]["Div"] == 1
    assert_same_outputs(model, compiled, _feeds(rng, (1, 4, 7, 9)))


def test_identity_skip_only_loses_the_multiplier(rng):
    # S = x itself: x also feeds the branch, so only Mul(t, x) and the Add die.
    model = _homotopy_block(rng, cin=6, stride=1)
    proj_bn = node_named(model, "proj_bn")
    model.graph.node.remove(node_named(model, "proj"))
    model.graph.node.remove(proj_bn)
    node_named(model, "scale_skip").input[1] = "x"
    compiled, _ = run_passes(model, "remove-skip")
    assert op_counts(compiled) == {"Conv": 2, "Relu": 2}
    assert node_named(compiled, "conv1").input[0] == "x"
    assert_same_outputs(model, compiled, _feeds(rng, (2, 6, 7, 9)))


@pytest.mark.parametrize("scale_shape", [(), (1, 6, 1, 1), (6, 1, 1)])
def test_remaining_scale_folds_into_the_conv_as_new_constants(rng, scale_shape):
    scale = (0.5 + rng.random(scale_shape)).astype(np.float32)
    model = _homotopy_block(rng, branch_scale=scale)
    compiled, result = run_passes(model, "remove-skip")
    assert op_counts(compiled) == {"Conv": 2, "Relu": 2}
    assert "folded into Conv 'conv2'" in result.applied[0]
    conv2 = node_named(compiled, "conv2")
    assert conv2.input[1] != "W2" and conv2.input[2] != "B2"  # new constants, the originals untouched
    channels = np.broadcast_to(scale.reshape(-1), (6,))
    np.testing.assert_allclose(initializer(compiled, conv2.input[1]),
                               initializer(model, "W2") * channels[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(initializer(compiled, conv2.input[2]), initializer(model, "B2") * channels,
                               rtol=1e-6)
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 7, 9)))


def test_scale_folds_into_batchnorm_before_fold_bn(rng):
    # remove-skip first, then fold-bn: the scale goes into the BN's γ and β, which fold-bn then folds into the conv.
    model = _homotopy_block(rng, branch_scale=0.75)
    inits = bn_params(rng, 6, "bnb")
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, n) for n, v in inits)
    node_named(model, "conv2").output[0] = "F_conv"
    position = list(model.graph.node).index(node_named(model, "conv2")) + 1
    model.graph.node.insert(position, oh.make_node("BatchNormalization", ["F_conv"] + [n for n, _ in inits], ["F"],
                                                   name="branch_bn"))
    compiled, result = run_passes(model, "remove-skip")
    assert "folded into BatchNormalization 'branch_bn'" in result.applied[0]
    assert op_counts(compiled) == {"Conv": 2, "Relu": 2, "BatchNormalization": 1}
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 7, 9)))
    both = cnnc.compile(model, passes="remove-skip,fold-bn")
    assert op_counts(both.model) == {"Conv": 2, "Relu": 2}


def test_scale_that_cannot_fold_stays_a_mul(rng):
    # The branch ends in a Relu: nothing linear to absorb 0.75, so Mul(F, 0.75) stays and the join still goes.
    model = _homotopy_block(rng, branch_scale=0.75)
    node_named(model, "conv2").output[0] = "F_conv"
    position = list(model.graph.node).index(node_named(model, "conv2")) + 1
    model.graph.node.insert(position, oh.make_node("Relu", ["F_conv"], ["F"], name="branch_relu"))
    compiled, result = run_passes(model, "remove-skip")
    assert op_counts(compiled) == {"Conv": 2, "Relu": 3, "Mul": 1}
    assert "stays a Mul" in result.applied[0]
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 7, 9)))


def test_join_at_graph_output_keeps_the_output_name(rng):
    model = _homotopy_block(rng)
    model.graph.node.remove(node_named(model, "relu_out"))
    model.graph.output[0].name = "y"
    compiled, _ = run_passes(model, "remove-skip")
    assert op_counts(compiled) == {"Conv": 2, "Relu": 1}
    assert compiled.graph.output[0].name == "y" and node_named(compiled, "conv2").output[0] == "y"
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 7, 9)))


def test_sum_drops_only_its_zero_operands(rng):
    # The dense-skip join of seed 000 §5: Sum(F, 0·S1, 0·S2) -> F; Sum(F, G, 0·S) -> Sum(F, G).
    nodes = [oh.make_node("Relu", ["x"], ["a"]), oh.make_node("Sigmoid", ["x"], ["b"]),
             oh.make_node("Tanh", ["x"], ["c"]), oh.make_node("Mul", ["b", "zero"], ["b0"]),
             oh.make_node("Mul", ["zero", "c"], ["c0"]),
             oh.make_node("Sum", ["a", "b0", "c0"], ["y1"], name="sum_all"),
             oh.make_node("Sum", ["a", "b", "c0"], ["y2"], name="sum_two")]
    model = make_model(nodes, [("x", ["N", 3, 4, 5])], [("y1", None), ("y2", None)], [("zero", _f32(0.0))])
    compiled, _ = run_passes(model, "remove-skip")
    assert op_counts(compiled) == {"Relu": 1, "Sigmoid": 1, "Sum": 1}  # Tanh fed only zero-weighted operands
    assert len(node_named(compiled, "sum_two").input) == 2
    assert_same_outputs(model, compiled, _feeds(rng, (2, 3, 4, 5)))


def test_input_forwarded_to_output_becomes_identity(rng):
    # y = x + 0·S with x a graph input and y a graph output: renaming x would change the interface.
    nodes = [oh.make_node("Sigmoid", ["x"], ["s"]), oh.make_node("Mul", ["s", "zero"], ["s0"]),
             oh.make_node("Add", ["x", "s0"], ["y"], name="join")]
    model = make_model(nodes, [("x", ["N", 3])], [("y", None)], [("zero", _f32(0.0))])
    compiled, result = run_passes(model, "remove-skip")
    assert op_counts(compiled) == {"Identity": 1} and result.changed
    assert compiled.graph.input[0].name == "x" and compiled.graph.output[0].name == "y"
    assert_same_outputs(model, compiled, _feeds(rng, (2, 3)))


def test_scalar_scale_folds_into_gemm_alpha_beta(rng):
    nodes = [oh.make_node("Gemm", ["x", "W", "C"], ["F"], name="gemm", transB=1, alpha=0.5, beta=2.0),
             oh.make_node("Mul", ["F", "c"], ["Fs"]), oh.make_node("MatMul", ["x", "P"], ["S"]),
             oh.make_node("Mul", ["S", "zero"], ["Ss"]), oh.make_node("Add", ["Fs", "Ss"], ["y"], name="join")]
    inits = [("W", _f32(rng.standard_normal((5, 4)))), ("C", _f32(rng.standard_normal(5))),
             ("P", _f32(rng.standard_normal((4, 5)))), ("c", _f32(0.75)), ("zero", _f32(0.0))]
    model = make_model(nodes, [("x", ["N", 4])], [("y", None)], inits)
    compiled, result = run_passes(model, "remove-skip")
    assert op_counts(compiled) == {"Gemm": 1} and "folded into Gemm 'gemm'" in result.applied[0]
    assert_same_outputs(model, compiled, _feeds(rng, (3, 4)))


# ------------------------------------------------------------------------------------------------- negative


@pytest.mark.parametrize("t", [0.01, 0.5, 1e-30])
def test_negative_nonzero_t_keeps_the_join(rng, t):
    model = _homotopy_block(rng, t=t)
    compiled, result = run_passes(model, "remove-skip")
    assert not result.changed and "no operand is scaled by exactly 0" in result.skipped[0][1]
    assert op_counts(compiled) == {"Conv": 3, "BatchNormalization": 1, "Relu": 2, "Mul": 2, "Add": 1}


def test_negative_plain_residual_is_never_touched(rng):
    nodes = [oh.make_node("Conv", ["x", "W"], ["F"], pads=[1, 1, 1, 1]), oh.make_node("Add", ["F", "x"], ["y"])]
    model = make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", None)], [("W", _f32(rng.standard_normal((3, 3, 3, 3))))])
    for pass_ in (RemoveSkip(), RemoveSkipApprox(tolerance=0.99)):
        compiled, result = run_passes(model, pass_)
        assert not result.changed and result.skipped == []
        assert op_counts(compiled) == {"Conv": 1, "Add": 1}


def test_negative_non_constant_t_keeps_the_join(rng):
    model = _homotopy_block(rng, t_as="input")
    compiled, result = run_passes(model, "remove-skip")
    assert not result.changed
    assert op_counts(compiled)["Add"] == 1 and op_counts(compiled)["Conv"] == 3


def test_negative_partly_zero_weight_keeps_the_join(rng):
    # A per-channel weight with one non-zero channel is not a zero skip.
    model = _homotopy_block(rng)
    weights = np.zeros((1, 6, 1, 1), np.float32)
    weights[0, 3] = 0.25
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "t"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(weights, "t"))
    node_named(model, "one_minus_t").input[1] = "zero_scalar"
    model.graph.initializer.append(onnx.numpy_helper.from_array(_f32(0.0), "zero_scalar"))
    _, result = run_passes(model, "remove-skip")
    assert not result.changed


def test_negative_zero_operand_that_broadcasts_keeps_the_join(rng):
    # F is [N,C,1,1] (pooled), 0·S is [N,C,H,W]: F + 0·S broadcasts F, so dropping 0·S would change the shape.
    nodes = [oh.make_node("GlobalAveragePool", ["x"], ["F"]), oh.make_node("Mul", ["x", "zero"], ["S0"]),
             oh.make_node("Add", ["F", "S0"], ["y"], name="join")]
    model = make_model(nodes, [("x", ["N", 3, 4, 5])], [("y", None)], [("zero", _f32(0.0))])
    compiled, result = run_passes(model, "remove-skip")
    assert not result.changed and "shape" in result.skipped[0][1]
    assert_same_outputs(model, compiled, _feeds(rng, (2, 3, 4, 5)))


def test_negative_every_operand_zero_is_left_alone(rng):
    nodes = [oh.make_node("Mul", ["x", "zero"], ["a"]), oh.make_node("Mul", ["x", "zero"], ["b"]),
             oh.make_node("Add", ["a", "b"], ["y"], name="join")]
    model = make_model(nodes, [("x", ["N", 3])], [("y", None)], [("zero", _f32(0.0))])
    _, result = run_passes(model, "remove-skip")
    assert not result.changed and "every operand" in result.skipped[0][1]


def test_shared_weight_of_the_folded_conv_is_not_modified(rng):
    # conv2's weight W2 is shared with another conv: folding the scale must write a new constant.
    model = _homotopy_block(rng, branch_scale=0.5)
    model.graph.node.append(oh.make_node("Conv", ["F", "W2"], ["other"], name="other", pads=[1, 1, 1, 1]))
    model.graph.output.append(oh.make_tensor_value_info("other", onnx.TensorProto.FLOAT, None))
    compiled, result = run_passes(model, "remove-skip")
    assert "stays a Mul" in result.applied[0]  # F has another reader: conv2 keeps its output and weights
    np.testing.assert_array_equal(initializer(compiled, node_named(compiled, "other").input[1]), initializer(model, "W2"))
    assert_same_outputs(model, compiled, _feeds(rng, (2, 4, 7, 9)))


# ------------------------------------------------------------------------------- idempotence, registry, approx


def test_idempotent(rng):
    compiled, _ = run_passes(_homotopy_block(rng, branch_scale=0.5), "remove-skip")
    again, result = run_passes(compiled, "remove-skip")
    assert not result.changed and op_counts(again) == op_counts(compiled)


def test_registered_exact_and_approximate_variants():
    assert get_pass("remove-skip").exact and "remove-skip" in DEFAULT_PIPELINE
    assert not get_pass("remove-skip-approx").exact and "remove-skip-approx" not in DEFAULT_PIPELINE
    assert parse_pipeline("remove-skip-approx{tolerance=0.05}")[0].tolerance == 0.05
    with pytest.raises(UsageError, match="unknown option"):
        parse_pipeline("remove-skip{tolerance=0.05}")  # the exact pass has no tolerance: it would not be exact


def test_approximate_drops_small_t_and_reports_the_measured_deviation(rng):
    model = _homotopy_block(rng, t=0.01)
    compiled, result = run_passes(model, RemoveSkipApprox(tolerance=0.02))
    assert op_counts(compiled) == {"Conv": 2, "Relu": 2}
    assert "folded into Conv 'conv2'" in result.applied[0]  # (1 − t) = 0.99 stays, inside conv2
    feeds = _feeds(rng, (1, 4, 7, 9))
    expected, got = run_model(model, feeds)[0], run_model(compiled, feeds)[0]
    actual = float(np.max(np.abs(expected - got)))
    assert actual > 1e-4  # it is approximate: the 0.01·S term is really gone
    assert 0 < result.stats["max_abs_deviation"] and result.stats["max_rel_deviation"] < 0.1
    # The reported deviation is measured, of the same magnitude as the one seen here on other inputs.
    assert 0.1 < result.stats["max_abs_deviation"] / actual < 10
    _, kept = run_passes(model, RemoveSkipApprox(tolerance=0.005))
    assert not kept.changed and "> tolerance 0.005" in kept.skipped[0][1]


def test_approximate_says_when_it_cannot_measure_the_deviation():
    # An integer graph input gets no random float inputs: the deviation is reported as not measured, not invented.
    nodes = [oh.make_node("Cast", ["x"], ["xf"], to=onnx.TensorProto.FLOAT), oh.make_node("Relu", ["xf"], ["F"]),
             oh.make_node("Sigmoid", ["xf"], ["S"]), oh.make_node("Mul", ["S", "small"], ["Ss"]),
             oh.make_node("Add", ["F", "Ss"], ["y"], name="join")]
    graph = oh.make_graph(nodes, "int_input", [oh.make_tensor_value_info("x", onnx.TensorProto.INT64, ["N", 3])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
                          initializer=[onnx.numpy_helper.from_array(_f32(0.001), "small")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    compiled, result = run_passes(model, RemoveSkipApprox(tolerance=0.01))
    assert result.changed and op_counts(compiled) == {"Cast": 1, "Relu": 1}
    assert result.stats["deviation"].startswith("not measured: TypeError: input x is tensor(int64)")


# --------------------------------------------------------------------------------------------------- hypothesis


def _random_block(data, rng, name, x, cin, height, width):
    """One homotopy block of random geometry; returns (nodes, initializers, output, cout, height, width)."""
    stride = data.draw(st.sampled_from([1, 2]), label="stride")
    cout = data.draw(st.integers(1, 5), label="cout")
    projection = stride != 1 or cout != cin or data.draw(st.booleans(), label="projection")
    kh, kw = data.draw(st.integers(1, 4), label="kh"), data.draw(st.integers(1, 4), label="kw")
    top, left = data.draw(st.integers(0, kh - 1), label="top"), data.draw(st.integers(0, kw - 1), label="left")
    pads = [top, left, kh - 1 - top, kw - 1 - left]  # same output size as the 1x1 projection, asymmetric
    with_bn = data.draw(st.booleans(), label="bn")
    n = name
    inits = [(f"{n}_W1", _f32(rng.standard_normal((cout, cin, kh, kw)))),
             (f"{n}_W2", _f32(rng.standard_normal((cout, cout, 3, 1)))), (f"{n}_B2", _f32(rng.standard_normal(cout)))]
    nodes = [oh.make_node("Conv", [x, f"{n}_W1"], [f"{n}_c1"], pads=pads, strides=[stride, stride]),
             oh.make_node("Relu", [f"{n}_c1"], [f"{n}_r1"]),
             oh.make_node("Conv", [f"{n}_r1", f"{n}_W2", f"{n}_B2"], [f"{n}_F"], pads=[1, 0, 1, 0])]
    skip = x
    if projection:
        inits.append((f"{n}_Wp", _f32(rng.standard_normal((cout, cin, 1, 1)))))
        nodes.append(oh.make_node("Conv", [x, f"{n}_Wp"], [f"{n}_p"], strides=[stride, stride]))
        skip = f"{n}_p"
        if with_bn:
            inits += bn_params(rng, cout, f"{n}_bn")
            nodes.append(oh.make_node("BatchNormalization", [skip] + [f"{n}_bn_{k}" for k in
                                                                       ("scale", "bias", "mean", "var")],
                                      [f"{n}_S"]))
            skip = f"{n}_S"
    t = data.draw(st.sampled_from([0.0, 0.0, 0.01, 0.5]), label="t")
    inits += [(f"{n}_t", _f32(t)), (f"{n}_one", _f32(1.0))]
    nodes += [oh.make_node("Sub", [f"{n}_one", f"{n}_t"], [f"{n}_omt"]),
              oh.make_node("Mul", [f"{n}_omt", f"{n}_F"], [f"{n}_Fs"]),
              oh.make_node("Mul", [f"{n}_t", skip], [f"{n}_Ss"]),
              oh.make_node("Add", [f"{n}_Fs", f"{n}_Ss"], [f"{n}_y"]),
              oh.make_node("Relu", [f"{n}_y"], [f"{n}_out"])]
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    return nodes, inits, f"{n}_out", cout, out_h, out_w, t, projection


@given(data=st.data())
def test_random_homotopy_blocks(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    cin = data.draw(st.integers(1, 4), label="cin")
    height, width = data.draw(st.integers(3, 11), label="height"), data.draw(st.integers(3, 11), label="width")
    batch = data.draw(st.integers(1, 3), label="batch")
    nodes, inits, x, channels, h, w, ts, projections = [], [], "x", cin, height, width, [], []
    for index in range(data.draw(st.integers(1, 3), label="blocks")):
        block = _random_block(data, rng, f"b{index}", x, channels, h, w)
        nodes += block[0]
        inits += block[1]
        x, channels, h, w = block[2:6]
        ts.append(block[6])
        projections.append(block[7])
    model = make_model(nodes, [("x", ["N", cin, height, width])], [(x, None)], inits)
    compiled, result = run_passes(model, "remove-skip")
    onnx.checker.check_model(compiled, full_check=True)
    zero = [t == 0.0 for t in ts]
    counts = op_counts(compiled)
    assert counts.get("Add", 0) == len(ts) - sum(zero)
    assert counts.get("Conv", 0) == 2 * len(ts) + sum(p and not z for p, z in zip(projections, zero))
    assert result.changed == any(zero) and len(result.applied) == sum(zero)
    feeds = {"x": rng.standard_normal((batch, cin, height, width)).astype(np.float32)}
    assert_same_outputs(model, compiled, feeds, rtol=1e-5, atol=1e-5)
    again, second = run_passes(compiled, "remove-skip")
    assert not second.changed and op_counts(again) == counts


# ------------------------------------------------------------------------------------ homotopy export end to end


def _homotopy_resnet():
    torch = pytest.importorskip("torch")
    from torch import nn

    from cnnc.homotopy import SkipHomotopy
    from cnnc.zoo import draw_batchnorm_statistics
    from cnnc.zoo.resnets import BasicBlock

    def block(cin, cout, stride):  # torchvision's, joined by `out += identity`
        return BasicBlock(cin, cout, stride, "projection", torch.relu)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), block(8, 8, 1), block(8, 16, 2), block(16, 16, 1),
                          block(16, 24, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    draw_batchnorm_statistics(model, 0)
    example = torch.randn(2, 1, 12, 10)
    return SkipHomotopy.wrap(model, t=0.5, example_input=example), example


def test_homotopy_export_at_zero_compiles_to_a_plain_network():
    homotopy, example = _homotopy_resnet()
    assert len(homotopy.joins) == 4
    result = cnnc.compile(homotopy.export(example, t=0.0), passes="fold-bn,remove-skip", rtol=1e-5, atol=1e-6)
    counts = op_counts(result.model)
    assert "Add" not in counts and "Mul" not in counts and "BatchNormalization" not in counts
    assert counts["Conv"] == 1 + 2 * 4  # stem + two per block: both projection convs are gone
    assert result.report["equivalence"]["passed"]
    assert result.report["before"]["ops"]["Conv"] == 1 + 2 * 4 + 2


def test_homotopy_export_at_small_t_keeps_every_join():
    homotopy, example = _homotopy_resnet()
    result = cnnc.compile(homotopy.export(example, t=0.01), passes="fold-bn,remove-skip", rtol=1e-5, atol=1e-6)
    counts = op_counts(result.model)
    assert counts["Add"] == 4 and counts["Conv"] == 1 + 2 * 4 + 2
    assert result.report["equivalence"]["passed"]
    assert all(not record["changed"] for record in result.report["passes"] if record["pass"] == "remove-skip")


# --- models written as ONNX text (onnx.parser syntax, as onnxscript's rewriter tests) -------------------------------

# cnnc.homotopy's join y = (1 - t)·F(x) + t·S(x), the skip S a 1×1 projection conv; (1 - t) is written as a
# constant, as the pipeline's canonicalisation leaves it (it folds Sub(1, t) before any pass runs).
HOMOTOPY_JOIN = """
    <ir_version: 8, opset_import: ["" : 17]>
    join (float[N, 4, 7, 9] x) => (float[N, 6, 7, 9] y)
    <float[6, 4, 3, 3] W, float[6, 4, 1, 1] P, float one_minus_t, float t> {
        [branch] f = Conv <pads = [1, 1, 1, 1]> (x, W)
        [proj] s = Conv (x, P)
        [scale_branch] fs = Mul (one_minus_t, f)
        [scale_skip] ss = Mul (t, s)
        [join] y = Add (fs, ss)
    }"""


def _text_join(rng, t):
    return text_model(HOMOTOPY_JOIN, W=normal(rng, 6, 4, 3, 3), P=normal(rng, 6, 4, 1, 1), one_minus_t=np.float32(1 - t),
                      t=np.float32(t))


def test_text_join_at_t_0_becomes_its_branch_conv(rng):
    model = _text_join(rng, 0.0)
    compiled, result = run_passes(model, "remove-skip")
    assert result.changed and op_counts(compiled) == {"Conv": 1}
    branch = node_named(compiled, "branch")
    assert list(branch.input) == ["x", "W"] and list(branch.output) == ["y"]  # rewired to the graph output
    assert "P" not in {i.name for i in compiled.graph.initializer}  # the projection that fed only the join is gone
    assert "(1 − t) = 1 was dropped" in result.applied[0]
    assert_same_outputs(model, compiled, {"x": normal(rng, 2, 4, 7, 9)})


def test_text_negative_join_at_t_not_0_is_kept(rng):
    model = _text_join(rng, 0.25)
    run = run_passes(model, "remove-skip")
    assert_unchanged(model, run)
    assert run.result.skipped[0][0] == "Add 'join'"
    assert "no operand is scaled by exactly 0" in run.result.skipped[0][1]
    assert_same_outputs(model, run.model, {"x": normal(rng, 2, 4, 7, 9)})
