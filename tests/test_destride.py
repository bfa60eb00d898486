"""destride: layout conventions on onnxruntime, positive graphs, one negative graph per precondition, idempotence,
equivalence, checker, hypothesis; whole-network mode on an all-conv net, the seed-004 LeNet and a mixed network."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
from helpers import (
    assert_same_outputs,
    assert_unchanged,
    initializer,
    make_model,
    normal,
    op_counts,
    run_model,
    run_passes,
    text_model,
)
from hypothesis import given
from hypothesis import strategies as st

import cnnc
from cnnc.linear.polyphase import CHANNEL_MAJOR, PHASE_MAJOR, Builder
from cnnc.passes.destride import Destride, plan_axis, polyphase_weight

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _weights(rng, *shape):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _conv_model(rng, cin=3, cout=4, kernel=(3, 3), strides=(2, 2), pads=None, group=1, size=(9, 10), op="Conv",
                batch="N", bias=True, **attrs):
    """One conv-like node reading x (batch × cin × size) and writing y."""
    inits = []
    inputs = ["x"]
    if op in ("Conv", "ConvTranspose"):
        shape = (cout, cin // group, *kernel) if op == "Conv" else (cin, cout // group, *kernel)
        inits.append(("W", _weights(rng, *shape)))
        inputs.append("W")
        if bias:
            inits.append(("B", rng.standard_normal(cout).astype(np.float32)))
            inputs.append("B")
        attrs["group"] = group
    if pads is not None:
        attrs["pads"] = list(pads)
    node = oh.make_node(op, inputs, ["y"], name="conv", kernel_shape=list(kernel), strides=list(strides), **attrs)
    return make_model([node], [("x", [batch, cin, *size])], [("y", None)], inits)


def _feeds(rng, model, batch=3):
    shape = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {model.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)}


def _strided_convs(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "AveragePool")
            and any(a.name == "strides" and any(s > 1 for s in a.ints) for a in n.attribute)]


def _layout_model(builder_call, shape):
    """A model whose only computation is one Builder call on input x."""
    graph = gs.Graph(opset=17)
    x = gs.Variable("x", dtype=np.float32, shape=list(shape))
    graph.inputs = [x]
    y = builder_call(Builder(graph), x)
    y.dtype = np.float32
    graph.outputs = [y]
    model = gs.export_onnx(graph)
    model.ir_version = 8
    return model


# --- the channel orders, checked on onnxruntime -------------------------------------------------------------------


def test_space_to_depth_is_phase_major_and_depth_to_space_modes_invert_both_orders():
    """ONNX SpaceToDepth output channel = (by·b + bx)·C + c: the phase-major order the weights are built in."""
    x = np.arange(2 * 3 * 4 * 6, dtype=np.float32).reshape(2, 3, 4, 6)
    phase_major = x.reshape(2, 3, 2, 2, 3, 2).transpose(0, 3, 5, 1, 2, 4).reshape(2, 12, 2, 3)
    channel_major = x.reshape(2, 3, 2, 2, 3, 2).transpose(0, 1, 3, 5, 2, 4).reshape(2, 12, 2, 3)
    s2d = make_model([oh.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2)], [("x", [2, 3, 4, 6])], [("y", None)])
    np.testing.assert_array_equal(run_model(s2d, {"x": x})[0], phase_major)
    for mode, source in (("DCR", phase_major), ("CRD", channel_major)):
        d2s = make_model([oh.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode=mode)],
                         [("x", [2, 12, 2, 3])], [("y", None)])
        np.testing.assert_array_equal(run_model(d2s, {"x": source})[0], x)


@pytest.mark.parametrize("layout", [PHASE_MAJOR, CHANNEL_MAJOR])
@pytest.mark.parametrize("factors,size", [((2, 3), (4, 9)), ((2, 2), (4, 6)), ((3,), (9,)), ((2, 1, 2), (4, 3, 2))])
def test_builder_rearrange_and_reassemble_follow_the_orders(layout, factors, size):
    rank = len(size)
    x = np.arange(2 * 3 * int(np.prod(size)), dtype=np.float32).reshape(2, 3, *size)
    model = _layout_model(lambda b, t: b.rearrange(t, 3, size, factors, layout, (0,) * rank, "r"), ["N", 3, *size])
    split = x.reshape(2, 3, *[v for n, f in zip(size, factors) for v in (n // f, f)])
    phases, rows = [3 + 2 * i for i in range(rank)], [2 + 2 * i for i in range(rank)]
    perm = [0] + phases + [1] + rows if layout == PHASE_MAJOR else [0, 1] + phases + rows
    expected = split.transpose(perm).reshape(2, 3 * int(np.prod(factors)), *[n // f for n, f in zip(size, factors)])
    np.testing.assert_array_equal(run_model(model, {"x": x})[0], expected)
    back = _layout_model(lambda b, t: b.reassemble(t, 3, size, factors, layout, "a"), ["N", *expected.shape[1:]])
    np.testing.assert_array_equal(run_model(back, {"x": expected})[0], x)


def test_polyphase_weight_is_an_exact_permutation_of_the_kernel(rng):
    """With G = 1 every weight lands in exactly one place of W̃, every other entry is 0: no arithmetic at all."""
    weight = _weights(rng, 4, 3, 5, 3)
    plans = [plan_axis(11, 5, 2, 1, 2, 1), plan_axis(10, 3, 3, 0, 1, 1)]
    for layout in (PHASE_MAJOR, CHANNEL_MAJOR):
        w = polyphase_weight(weight, plans, layout)
        assert w.shape == (4, 3 * 6, plans[0].taps, plans[1].taps) and w.dtype == weight.dtype
        np.testing.assert_array_equal(np.sort(w[w != 0]), np.sort(weight.ravel()))


# --- per-conv mode: positive graphs --------------------------------------------------------------------------------


def test_3x3_stride_2_becomes_space_to_depth_and_2x2_conv(rng):
    model = _conv_model(rng, pads=(1, 1, 1, 1), size=(8, 10))
    compiled, result = run_passes(model, "destride")
    assert op_counts(compiled) == {"SpaceToDepth": 1, "Conv": 1}  # even sizes: the conv's own pads suffice
    s2d, conv = compiled.graph.node
    assert s2d.input[0] == "x" and conv.input[0] == s2d.output[0] and conv.output[0] == "y"
    attrs = {a.name: list(a.ints) for a in conv.attribute if a.ints}
    assert attrs["kernel_shape"] == [2, 2] and attrs["strides"] == [1, 1] and attrs["pads"] == [1, 1, 0, 0]
    assert initializer(compiled, conv.input[1]).shape == (4, 12, 2, 2)
    stats = result.stats["convs"][0]
    assert stats["macs_after"] * 9 == stats["macs_before"] * 16  # (s·⌈k/s⌉/k)² = 16/9
    assert stats["params_before"] == 4 * 3 * 9 + 4 and stats["params_after"] == 4 * 12 * 4 + 4
    assert result.stats["mac_ratio"] == round(16 / 9, 4)
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


def test_1x1_stride_2_reads_one_phase_with_a_strided_slice(rng):
    model = _conv_model(rng, kernel=(1, 1), size=(7, 9))  # odd sizes: the last row and column are read too
    compiled, result = run_passes(model, "destride")
    assert op_counts(compiled) == {"Slice": 1, "Conv": 1}
    conv = next(n for n in compiled.graph.node if n.op_type == "Conv")
    assert initializer(compiled, conv.input[1]).shape == (4, 3, 1, 1)  # 3 of 4 phases dropped
    assert result.stats["mac_ratio"] == 1.0
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("stride", [2, 3])
def test_square_kernels_and_strides(rng, kernel, stride):
    model = _conv_model(rng, kernel=(kernel, kernel), strides=(stride, stride), pads=(kernel // 2,) * 4,
                        size=(kernel + 8, kernel + 11))
    compiled, result = run_passes(model, "destride")
    assert result.changed and not _strided_convs(compiled) and not result.skipped
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


def test_kernel_smaller_than_stride_gathers_the_used_phases(rng):
    model = _conv_model(rng, kernel=(2, 2), strides=(3, 3), size=(9, 12))
    compiled, _ = run_passes(model, "destride")
    assert op_counts(compiled) == {"SpaceToDepth": 1, "Gather": 1, "Conv": 1}
    conv = next(n for n in compiled.graph.node if n.op_type == "Conv")
    assert initializer(compiled, conv.input[1]).shape == (4, 3 * 4, 1, 1)  # 4 of 9 phases
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


def test_non_square_kernel_strides_and_asymmetric_pads(rng):
    for strides in ((2, 3), (2, 1), (1, 3)):
        model = _conv_model(rng, kernel=(3, 5), strides=strides, pads=(0, 2, 1, 1), size=(11, 13))
        compiled, result = run_passes(model, "destride")
        assert result.changed and not result.skipped
        assert "SpaceToDepth" not in op_counts(compiled) and not _strided_convs(compiled)
        assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET"])
def test_every_auto_pad_mode(rng, auto_pad):
    model = _conv_model(rng, kernel=(4, 3), strides=(3, 2), size=(10, 11), auto_pad=auto_pad)
    compiled, result = run_passes(model, "destride")
    assert result.changed and not _strided_convs(compiled)
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


@pytest.mark.parametrize("group,cin,cout", [(2, 4, 6), (4, 4, 4), (3, 3, 6)])
def test_grouped_and_depthwise_use_channel_major_order(rng, group, cin, cout):
    model = _conv_model(rng, cin=cin, cout=cout, group=group, pads=(1, 0, 1, 2), size=(9, 8))
    compiled, _ = run_passes(model, "destride")
    assert op_counts(compiled).get("Transpose") == 1 and "SpaceToDepth" not in op_counts(compiled)
    assert not _strided_convs(compiled)
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


def test_1d_and_3d_convs(rng):
    for kernel, strides, size in (((5,), (2,), (17,)), ((3, 2, 3), (2, 2, 3), (7, 6, 8))):
        model = _conv_model(rng, kernel=kernel, strides=strides, pads=(1,) * (2 * len(kernel)), size=size)
        compiled, _ = run_passes(model, "destride")
        assert not _strided_convs(compiled)
        assert_same_outputs(model, compiled, _feeds(rng, model, batch=2), **TOL)


def test_dynamic_and_fixed_batch(rng):
    model = _conv_model(rng, kernel=(3, 3), pads=(1, 1, 1, 1), size=(9, 7))
    compiled, _ = run_passes(model, "destride")
    for batch in (1, 3):
        assert_same_outputs(model, compiled, _feeds(rng, model, batch=batch), **TOL)
    fixed = _conv_model(rng, kernel=(5, 5), strides=(3, 2), batch=3, size=(12, 9), group=3, cin=3, cout=3)
    compiled, _ = run_passes(fixed, "destride")
    assert_same_outputs(fixed, compiled, _feeds(rng, fixed), **TOL)


def test_same_upper_with_kernel_smaller_than_stride(rng):
    # 1×1 stride 2 SAME_UPPER on an even size (TensorFlow exports): the total pad is −1, a crop at the end only.
    model = _conv_model(rng, kernel=(1, 1), size=(8, 6), auto_pad="SAME_UPPER")
    compiled, result = run_passes(model, "destride")
    assert result.changed and op_counts(compiled) == {"Slice": 1, "Conv": 1}
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)
    # k = 1, s = 4, n = 4: total −3, onnxruntime starts the window at row 1. Undefined by the spec: left alone.
    _assert_left_alone(_conv_model(rng, kernel=(1, 1), strides=(4, 4), size=(4, 4), auto_pad="SAME_UPPER"),
                       "negative begin pad")


def test_conv_without_bias(rng):
    model = _conv_model(rng, bias=False, pads=(2, 1, 0, 1))
    compiled, _ = run_passes(model, "destride")
    assert len(next(n for n in compiled.graph.node if n.op_type == "Conv").input) == 2
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


@pytest.mark.parametrize("kernel,strides,pads,attrs", [
    ((2, 2), (2, 2), (0, 0, 0, 0), {}),
    ((3, 3), (2, 2), (1, 1, 1, 1), {"count_include_pad": 1}),
    ((3, 2), (2, 2), (0, 0, 0, 0), {"ceil_mode": 1}),  # 9 − 3 and 10 − 2 are even: ceil adds no window
])
def test_strided_average_pool_becomes_a_depthwise_conv(rng, kernel, strides, pads, attrs):
    model = _conv_model(rng, op="AveragePool", kernel=kernel, strides=strides, pads=pads, size=(9, 10), **attrs)
    compiled, result = run_passes(model, "destride")
    assert "AveragePool" not in op_counts(compiled) and not _strided_convs(compiled)
    assert result.stats["convs"][0]["op"] == "AveragePool"
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


@pytest.mark.parametrize("kernel,strides,pads,output_padding,group", [
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ((4, 4), (2, 2), (1, 1, 1, 1), (0, 0), 1),
    ((3, 5), (2, 3), (0, 2, 1, 0), (1, 2), 2),
    ((2, 2), (3, 3), (0, 0, 0, 0), (0, 0), 1),  # k < s: output rows no tap reaches are bias only
])
def test_strided_conv_transpose_becomes_conv_and_depth_to_space(rng, kernel, strides, pads, output_padding, group):
    model = _conv_model(rng, op="ConvTranspose", cin=4, cout=6, kernel=kernel, strides=strides, pads=pads,
                        group=group, size=(5, 6), output_padding=list(output_padding))
    compiled, result = run_passes(model, "destride")
    counts = op_counts(compiled)
    assert result.stats["convs"][0]["factor_out"] == list(strides)
    assert "ConvTranspose" not in counts and counts["Conv"] == 1 and not _strided_convs(compiled)
    assert ("DepthToSpace" in counts) == (strides[0] == strides[1])
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


# --- per-conv mode: negative graphs (unchanged, with the reason) ----------------------------------------------------


def _assert_left_alone(model, reason, **options):
    compiled, result = run_passes(model, Destride(**options))
    assert not result.changed and op_counts(compiled) == op_counts(model)
    assert any(reason in why for _, why in result.skipped), result.skipped


def test_negative_dilation(rng):
    _assert_left_alone(_conv_model(rng, dilations=[2, 1], size=(11, 11)), "dilation > 1")


def test_negative_unknown_spatial_shape(rng):
    model = _conv_model(rng)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    _assert_left_alone(model, "spatial shape unknown")


def test_negative_non_constant_weight(rng):
    model = _conv_model(rng)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "W"))
    model.graph.input.append(oh.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [4, 3, 3, 3]))
    _assert_left_alone(model, "not a float constant")


def test_negative_average_pool_whose_divisor_is_not_the_window_size(rng):
    _assert_left_alone(_conv_model(rng, op="AveragePool", pads=(1, 1, 1, 1), size=(9, 9)), "count_include_pad=0")
    _assert_left_alone(_conv_model(rng, op="AveragePool", size=(10, 10), ceil_mode=1), "ceil_mode=1")
    _assert_left_alone(_conv_model(rng, op="AveragePool", kernel=(1, 1), size=(8, 8), auto_pad="SAME_UPPER",
                                   count_include_pad=1), "negative pad")


def test_negative_conv_transpose_with_output_shape_or_dilation(rng):
    model = _conv_model(rng, op="ConvTranspose", cin=4, cout=4, size=(5, 5), output_shape=[11, 11])
    _assert_left_alone(model, "output_shape")
    _assert_left_alone(_conv_model(rng, op="ConvTranspose", cin=4, cout=4, dilations=[2, 2]), "dilation > 1")


def test_negative_old_opset(rng):
    model = _conv_model(rng)
    model.opset_import[0].version = 10
    _assert_left_alone(model, "opset 10")


def test_grouped_false_leaves_grouped_convs_alone(rng):
    _assert_left_alone(_conv_model(rng, cin=4, cout=4, group=4), "grouped=false", grouped=False)
    _assert_left_alone(_conv_model(rng, op="AveragePool"), "grouped=false", grouped=False)
    _assert_left_alone(_conv_model(rng, op="ConvTranspose", cin=4, cout=4, group=2), "grouped=false", grouped=False)
    compiled, result = run_passes(_conv_model(rng), Destride(grouped=False))
    assert result.changed and not _strided_convs(compiled)


def test_stride_1_conv_is_not_touched(rng):
    compiled, result = run_passes(_conv_model(rng, strides=(1, 1), pads=(1, 1, 1, 1)), "destride")
    assert not result.changed and op_counts(compiled) == {"Conv": 1} and not result.skipped


@pytest.mark.parametrize("mode", ["conv", "network"])
def test_idempotent(rng, mode):
    model = _conv_model(rng, pads=(1, 1, 1, 1), size=(12, 8))
    compiled, _ = run_passes(model, Destride(mode=mode))
    again, result = run_passes(compiled, Destride(mode=mode))
    assert not result.changed and op_counts(again) == op_counts(compiled)


# --- whole-network mode ---------------------------------------------------------------------------------------------


def _lenet(rng):
    """The all-convolutional LeNet of seed 004, Table 1 (ReLUs after every layer but the last)."""
    inits = [("W1", _weights(rng, 20, 1, 5, 5)), ("B1", _weights(rng, 20)), ("W2", _weights(rng, 20, 20, 2, 2)),
             ("B2", _weights(rng, 20)), ("W3", _weights(rng, 50, 20, 5, 5)), ("B3", _weights(rng, 50)),
             ("W4", _weights(rng, 50, 50, 2, 2)), ("B4", _weights(rng, 50)), ("F1", _weights(rng, 500, 800)),
             ("G1", _weights(rng, 500)), ("F2", _weights(rng, 10, 500)), ("G2", _weights(rng, 10))]
    nodes = []
    previous = "x"
    for i, stride in enumerate((1, 2, 1, 2), start=1):
        nodes += [oh.make_node("Conv", [previous, f"W{i}", f"B{i}"], [f"c{i}"], name=f"conv{i}",
                               strides=[stride, stride]), oh.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        previous = f"r{i}"
    nodes += [oh.make_node("Flatten", ["r4"], ["f"]), oh.make_node("Gemm", ["f", "F1", "G1"], ["g"], transB=1),
              oh.make_node("Relu", ["g"], ["h"]), oh.make_node("Gemm", ["h", "F2", "G2"], ["y"], transB=1)]
    return make_model(nodes, [("x", ["N", 1, 28, 28])], [("y", None)], inits)


def _conv_shapes(model):
    """(output shape without batch, weight shape) of every Conv, via ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:] for v in inferred.graph.value_info}
    return [(shapes[n.output[0]], list(initializer(model, n.input[1]).shape))
            for n in model.graph.node if n.op_type == "Conv"]


def test_lenet_per_conv_has_no_strided_conv_and_is_equivalent(rng):
    model = _lenet(rng)
    compiled, result = run_passes(model, "destride")
    assert not _strided_convs(compiled) and op_counts(compiled)["SpaceToDepth"] == 2
    assert result.stats["mac_ratio"] == 1.0  # 2×2 stride 2: s·⌈k/s⌉/k = 1
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


def test_lenet_network_mode_reproduces_table_2(rng):
    model = _lenet(rng)
    compiled, result = run_passes(model, "destride{mode=network}")
    assert [n.op_type for n in compiled.graph.node][:1] == ["SpaceToDepth"]
    s2d = compiled.graph.node[0]
    assert s2d.input[0] == "x" and next(a.i for a in s2d.attribute if a.name == "blocksize") == 4  # 1×28×28 -> 16×7×7
    assert _conv_shapes(compiled) == [([320, 6, 6], [320, 16, 2, 2]), ([80, 6, 6], [80, 320, 1, 1]),
                                      ([200, 4, 4], [200, 80, 3, 3]), ([50, 4, 4], [50, 200, 1, 1])]
    assert not _strided_convs(compiled) and "DepthToSpace" not in op_counts(compiled)  # factor 1 at the Flatten
    assert [c["factor_in"] for c in result.stats["convs"]] == [[4, 4], [4, 4], [2, 2], [2, 2]]
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


def _all_conv_net(rng, size=(16, 16), group=1):
    """Stem conv s2, a residual block with a strided 3x3 main path and a 1x1 stride-2 shortcut, per-channel Mul/Add,
    PRelu and Clip; the stem activation is also a graph output; then global pooling and a MatMul."""
    c = 4
    inits = [("W0", _weights(rng, c, 3, 3, 3)), ("W1", _weights(rng, 2 * c, c // group, 3, 3)),
             ("W2", _weights(rng, 2 * c, 2 * c // group, 3, 3)), ("Ws", _weights(rng, 2 * c, c, 1, 1)),
             ("scale", (1 + 0.1 * rng.standard_normal((2 * c, 1, 1))).astype(np.float32)),
             ("shift", rng.standard_normal((1, 2 * c, 1, 1)).astype(np.float32)),
             ("slope", (0.1 * rng.random((c, 1, 1))).astype(np.float32)), ("two", np.float32(2.0)),
             ("Fc", _weights(rng, 2 * c, 5))]
    nodes = [oh.make_node("Conv", ["x", "W0"], ["c0"], strides=[2, 2], pads=[1, 1, 1, 1], name="stem"),
             oh.make_node("PRelu", ["c0", "slope"], ["a0"]),
             oh.make_node("Conv", ["a0", "W1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], group=group, name="main1"),
             oh.make_node("Relu", ["c1"], ["a1"]),
             oh.make_node("Conv", ["a1", "W2"], ["c2"], pads=[1, 1, 1, 1], group=group, name="main2"),
             oh.make_node("Conv", ["a0", "Ws"], ["sc"], strides=[2, 2], name="shortcut"),
             oh.make_node("Mul", ["c2", "scale"], ["m"]), oh.make_node("Add", ["m", "shift"], ["b"]),
             oh.make_node("Add", ["b", "sc"], ["sum"]), oh.make_node("Clip", ["sum", "", "two"], ["feat"]),
             oh.make_node("GlobalAveragePool", ["feat"], ["gap"]), oh.make_node("Flatten", ["gap"], ["flat"]),
             oh.make_node("MatMul", ["flat", "Fc"], ["y"])]
    return make_model(nodes, [("x", ["N", 3, *size])], [("y", None), ("a0", None)], inits)


@pytest.mark.parametrize("group", [1, 2])
def test_network_mode_on_a_residual_all_conv_net(rng, group):
    model = _all_conv_net(rng, group=group)
    compiled, result = run_passes(model, "destride{mode=network}")
    counts = op_counts(compiled)
    assert not _strided_convs(compiled)
    assert [o.name for o in compiled.graph.output] == ["y", "a0"]
    # One rearrangement at the input (factor 4, Transpose in channel-major order), none inside; the stem activation
    # is re-assembled for the graph output only; the block output is back at factor 1 for the global pool.
    assert counts.get("SpaceToDepth", 0) + counts.get("Transpose", 0) == 1 and counts["DepthToSpace"] == 1
    assert counts.get("Transpose", 0) == (group > 1)
    assert {c["node"]: c["factor_in"] for c in result.stats["convs"]} == {
        "stem": [4, 4], "main1": [2, 2], "shortcut": [2, 2]}  # main2 is stride 1 at factor 1: untouched
    assert len(result.stats["reassembled"]) == 1 and "graph output" in result.stats["reassembled"][0]
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)
    assert_same_outputs(model, compiled, _feeds(rng, model, batch=1), **TOL)


def test_network_mode_with_readers_that_ask_for_different_factors(rng):
    """r is read by a stride-2 conv (wants factor 2), a stride-1 conv (wants 1) and is a graph output: it is held at
    factor 2 and re-assembled once for the stride-1 conv and the output."""
    inits = [("W0", _weights(rng, 3, 2, 3, 3)), ("W1", _weights(rng, 4, 3, 3, 3)), ("W2", _weights(rng, 2, 3, 1, 1))]
    nodes = [oh.make_node("Conv", ["x", "W0"], ["c"], pads=[1, 1, 1, 1], name="first"),
             oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("Conv", ["r", "W1"], ["y1"], strides=[2, 2], pads=[1, 1, 1, 1], name="strided"),
             oh.make_node("Conv", ["r", "W2"], ["y2"], name="pointwise")]
    model = make_model(nodes, [("x", ["N", 2, 10, 6])], [("y1", None), ("y2", None), ("r", None)], inits)
    compiled, result = run_passes(model, "destride{mode=network}")
    assert op_counts(compiled)["SpaceToDepth"] == 1 and op_counts(compiled)["DepthToSpace"] == 1
    assert {c["node"]: c["factor_out"] for c in result.stats["convs"]} == {"first": [2, 2], "strided": [1, 1]}
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


def test_network_mode_stops_at_sizes_the_factor_does_not_divide(rng):
    model = _all_conv_net(rng, size=(18, 14))  # stem output 9×7: the main path cannot stay polyphase
    compiled, result = run_passes(model, "destride{mode=network}")
    assert not _strided_convs(compiled) and "DepthToSpace" not in op_counts(compiled)
    assert all(c["factor_out"] == [1, 1] for c in result.stats["convs"])  # per-conv rewrites, padded onto the grid
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


def _mixed_net(rng):
    """Non-square 37×53 input; depthwise stride-2, dilated, grouped strided, asymmetric padding, a ceil_mode
    pooling with a partial window, a strided ConvTranspose."""
    inits = [("Wd", _weights(rng, 4, 1, 3, 3)), ("Wdil", _weights(rng, 4, 4, 3, 3)), ("Wg", _weights(rng, 6, 2, 3, 5)),
             ("Wt", _weights(rng, 6, 1, 4, 4)), ("Bt", _weights(rng, 3)), ("Wa", _weights(rng, 3, 3, 2, 3))]
    nodes = [oh.make_node("Conv", ["x", "Wd"], ["d"], strides=[2, 2], pads=[1, 0, 2, 1], group=4, name="depthwise"),
             oh.make_node("Relu", ["d"], ["d1"]),
             oh.make_node("Conv", ["d1", "Wdil"], ["e"], dilations=[2, 2], strides=[2, 1], name="dilated"),
             oh.make_node("Conv", ["e", "Wg"], ["g"], strides=[1, 2], pads=[0, 2, 1, 1], group=2, name="grouped"),
             oh.make_node("LeakyRelu", ["g"], ["g1"], alpha=0.2),
             oh.make_node("AveragePool", ["g1"], ["p"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, name="pool"),
             oh.make_node("ConvTranspose", ["p", "Wt", "Bt"], ["t"], strides=[2, 2], pads=[1, 0, 0, 1],
                          output_padding=[1, 0], group=3, name="up"),
             oh.make_node("Conv", ["t", "Wa"], ["y"], strides=[3, 2], auto_pad="SAME_UPPER", name="head")]
    return make_model(nodes, [("x", ["N", 4, 37, 53])], [("y", None)], inits)


@pytest.mark.parametrize("mode", ["conv", "network"])
def test_mixed_network_is_equivalent_and_reports_what_it_left(rng, mode):
    model = _mixed_net(rng)
    compiled, result = run_passes(model, Destride(mode=mode))
    reasons = dict(result.skipped)
    assert set(_strided_convs(compiled)) == {"dilated", "pool"}
    assert "dilation > 1" in reasons["Conv 'dilated'"] and "ceil_mode" in reasons["AveragePool 'pool'"]
    assert {c["node"] for c in result.stats["convs"]} >= {"depthwise", "grouped", "up", "head"}
    assert_same_outputs(model, compiled, _feeds(rng, model, batch=2), **TOL)


def test_network_mode_without_strides_changes_nothing(rng):
    model = _conv_model(rng, strides=(1, 1), pads=(1, 1, 1, 1))
    compiled, result = run_passes(model, "destride{mode=network}")
    assert not result.changed and op_counts(compiled) == {"Conv": 1}


def test_pipeline_spec_and_api(rng):
    result = cnnc.compile(_lenet(rng), passes="destride{mode=network}", rtol=1e-5, atol=1e-5)
    assert result.report["equivalence"]["passed"] and "destride" not in cnnc.passes.DEFAULT_PIPELINE
    record = result.report["passes"][0]
    assert record["pass"] == "destride{mode=network}" and record["stats"]["macs_after"] > record["stats"]["macs_before"]


# --- randomised geometry --------------------------------------------------------------------------------------------


@given(data=st.data())
def test_random_single_convs(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    group = data.draw(st.sampled_from([1, 2, 3]))
    cin, cout = group * data.draw(st.integers(1, 2)), group * data.draw(st.integers(1, 2))
    kernel = tuple(data.draw(st.integers(1, 7)) for _ in range(2))
    strides = tuple(data.draw(st.integers(1, 4)) for _ in range(2))
    if strides == (1, 1):
        strides = (2, data.draw(st.integers(2, 4)))
    auto_pad = data.draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = tuple(data.draw(st.integers(0, k - 1)) for k in kernel * 2) if auto_pad == "NOTSET" else None
    size = tuple(data.draw(st.integers(k, k + 10)) for k in kernel)
    op = data.draw(st.sampled_from(["Conv", "Conv", "Conv", "AveragePool"]))
    attrs = {"auto_pad": auto_pad} if auto_pad != "NOTSET" else {}
    if op == "AveragePool":
        attrs["count_include_pad"] = 1
        cin = cout
    model = _conv_model(rng, cin=cin, cout=cout, kernel=kernel, strides=strides, pads=pads, group=group, size=size,
                        op=op, bias=data.draw(st.booleans()), **attrs)
    compiled, result = run_passes(model, "destride")
    if auto_pad.startswith("SAME"):  # a kernel smaller than the stride can make onnxruntime's SAME pads negative
        totals = [(-(-n // s) - 1) * s + k - n for n, k, s in zip(size, kernel, strides)]
        heads = [int((t + 1) / 2) if auto_pad == "SAME_LOWER" else int(t / 2) for t in totals]
        if min(heads) < 0 or (op == "AveragePool" and min(totals) < 0):
            assert not result.changed and "negative" in result.skipped[0][1]
            return
    assert result.changed and not _strided_convs(compiled), result.skipped
    assert_same_outputs(model, compiled, _feeds(rng, model, batch=data.draw(st.integers(1, 3))), **TOL)
    _, again = run_passes(compiled, "destride")
    assert not again.changed


@given(data=st.data())
def test_random_conv_chains_in_network_mode(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    depth = data.draw(st.integers(1, 3))
    group = data.draw(st.sampled_from([1, 1, 2]))  # 2: channel-major layout for the whole region
    channels = [group * data.draw(st.integers(1, 2)) for _ in range(depth + 1)]
    size = input_size = [data.draw(st.integers(8, 20)), data.draw(st.integers(8, 20))]
    nodes, inits, previous = [], [], "x"
    for i in range(depth):
        kernel = [data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))]
        strides = [data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))]
        pads = [data.draw(st.integers(0, k - 1)) for k in kernel * 2]
        out = [(n + pads[a] + pads[a + 2] - kernel[a]) // strides[a] + 1 for a, n in enumerate(size)]
        if min(out) < 1:
            break
        inits += [(f"W{i}", _weights(rng, channels[i + 1], channels[i] // group, *kernel)),
                  (f"B{i}", rng.standard_normal(channels[i + 1]).astype(np.float32)),
                  (f"S{i}", rng.standard_normal((channels[i + 1], 1, 1)).astype(np.float32))]
        nodes += [oh.make_node("Conv", [previous, f"W{i}", f"B{i}"], [f"c{i}"], kernel_shape=kernel, strides=strides,
                               pads=pads, group=group),
                  oh.make_node(data.draw(st.sampled_from(["Relu", "Sigmoid"])), [f"c{i}"], [f"m{i}"]),
                  oh.make_node("Mul", [f"m{i}", f"S{i}"], [f"a{i}"])]
        previous, size = f"a{i}", out
    if not nodes:
        return
    model = make_model(nodes, [("x", ["N", channels[0], *input_size])], [(previous, None)], inits)
    compiled, _ = run_passes(model, "destride{mode=network}")
    assert not _strided_convs(compiled)
    assert_same_outputs(model, compiled, _feeds(rng, model, batch=2), **TOL)


@pytest.mark.parametrize("order", ["destride,collapse{gemm=force}", "collapse,destride",
                                   "destride{mode=network},collapse{gemm=force}"])
def test_destride_and_collapse_in_either_order_stay_exact(rng, order):
    """destride's Pad/Slice/SpaceToDepth/Conv are all linear, so collapse may take them into its machines (as a
    Gemm: SpaceToDepth has no single-conv form; forced, since the cost model would keep the convs). Collapse first
    merges a conv chain into one strided conv, which destride then rewrites; both orders are exact, they differ in
    what is left."""
    inits = [("W1", _weights(rng, 8, 3, 3, 3)), ("B1", _weights(rng, 8)), ("W2", _weights(rng, 8, 8, 3, 3)),
             ("W3", _weights(rng, 4, 8, 1, 1))]
    nodes = [oh.make_node("Conv", ["x", "W1", "B1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c1"], ["r1"]), oh.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
             oh.make_node("Conv", ["c2", "W3"], ["y"], strides=[2, 2])]
    model = make_model(nodes, [("x", ["N", 3, 16, 16])], [("y", None)], inits)
    run = run_passes(model, order)
    assert all(result.changed for result in run.results)
    compiled = run.model
    assert_same_outputs(model, compiled, _feeds(rng, model), **TOL)


@given(data=st.data())
def test_random_conv_transposes(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    group = data.draw(st.sampled_from([1, 2]))
    cin, cout = group * data.draw(st.integers(1, 2)), group * data.draw(st.integers(1, 2))
    kernel = tuple(data.draw(st.integers(1, 7)) for _ in range(2))
    strides = (data.draw(st.integers(2, 4)), data.draw(st.integers(1, 4)))
    pads = tuple(data.draw(st.integers(0, k - 1)) for k in kernel * 2)
    output_padding = [data.draw(st.integers(0, s - 1)) for s in strides]
    size = tuple(data.draw(st.integers(1, 6)) for _ in range(2))
    if any(s * (n - 1) + e + k - pads[i] - pads[i + 2] < 1
           for i, (n, s, e, k) in enumerate(zip(size, strides, output_padding, kernel))):
        return  # an empty output: not a valid model
    model = _conv_model(rng, op="ConvTranspose", cin=cin, cout=cout, kernel=kernel, strides=strides, pads=pads,
                        group=group, size=size, bias=data.draw(st.booleans()), output_padding=output_padding)
    compiled, result = run_passes(model, "destride")
    assert result.changed and not _strided_convs(compiled)
    assert_same_outputs(model, compiled, _feeds(rng, model, batch=data.draw(st.integers(1, 3))), **TOL)


# --- models written as ONNX text (onnx.parser syntax, as onnxscript's rewriter tests) -------------------------------


def _text_strided_conv(rng, dilation):
    out = 5 if dilation == 1 else 4  # 11×12 input, 3×3 kernel of reach 2·dilation + 1, stride 2
    return text_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        strided (float[N, 3, 11, 12] x) => (float[N, 4, {out}, {out}] y) <float[4, 3, 3, 3] W, float[4] B> {{
            [conv] y = Conv <strides = [2, 2], dilations = [{dilation}, {dilation}]> (x, W, B)
        }}""", W=normal(rng, 4, 3, 3, 3, scale=0.2), B=normal(rng, 4))


def test_text_stride_2_conv_becomes_space_to_depth_and_a_stride_1_conv(rng):
    model = _text_strided_conv(rng, 1)
    compiled, result = run_passes(model, "destride")
    assert result.changed and not result.skipped and not _strided_convs(compiled)
    assert op_counts(compiled) == {"Pad": 1, "SpaceToDepth": 1, "Conv": 1}
    pad, space_to_depth, conv = compiled.graph.node
    assert pad.input[0] == "x" and space_to_depth.input == pad.output and conv.input[0] == space_to_depth.output[0]
    assert list(conv.output) == ["y"] and initializer(compiled, conv.input[1]).shape == (4, 12, 2, 2)
    assert "stride (2, 2) kernel (3, 3) -> stride 1 kernel (2, 2)" in result.applied[0]
    assert_same_outputs(model, compiled, {"x": normal(rng, 2, 3, 11, 12)}, **TOL)


def test_text_negative_dilated_conv_is_left_alone(rng):
    model = _text_strided_conv(rng, 2)
    run = run_passes(model, "destride")
    assert_unchanged(model, run)
    assert run.result.skipped[0][0] == "Conv 'conv'" and "dilation > 1" in run.result.skipped[0][1]
    assert_same_outputs(model, run.model, {"x": normal(rng, 2, 3, 11, 12)}, **TOL)
