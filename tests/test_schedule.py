"""schedule: fusion positives (op counts, rewiring), one negative per precondition, idempotence, equivalence on
onnxruntime, checker, hypothesis random DAGs (valid order, peak never above the input order's), onnxruntime's
execution order checked against its profiler, peak memory of ResNet-18 / DenseNet / U-Net, and the CLI."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from helpers import (
    assert_same_outputs,
    assert_unchanged,
    initializer,
    make_model,
    node_named,
    normal,
    op_counts,
    run_passes,
    text_model,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import cnnc
from cnnc import ir
from cnnc.cli import cli
from cnnc.linear.hypergraph import Hypergraph
from cnnc.linear.memory_order import onnxruntime_default_order
from cnnc.passes.schedule import Schedule

# For tests of the rewrite itself on tiny tensors: launches dominate the cost model and memory may grow.
ALWAYS_FUSE = {"launch_cost_bytes": 1 << 20, "max_peak_increase": 1.0}


def _conv(rng, name, src, cin, cout, kernel=(3, 3), bias=True, **attrs):
    pads = attrs.pop("pads", [kernel[0] // 2, kernel[1] // 2] * 2)
    inits = [(f"W_{name}", (0.3 * rng.standard_normal((cout, cin // attrs.get("group", 1), *kernel))).astype(
        np.float32))]
    if bias:
        inits.append((f"B_{name}", rng.standard_normal(cout).astype(np.float32)))
    node = oh.make_node("Conv", [src, f"W_{name}"] + ([f"B_{name}"] if bias else []), [name], name=name,
                        pads=pads, kernel_shape=list(kernel), **attrs)
    return node, inits


def _model(parts, inputs, outputs, extra_nodes=(), opset=17):
    nodes, inits = [], []
    for node, node_inits in parts:
        nodes.append(node)
        inits += node_inits
    return make_model(nodes + list(extra_nodes), inputs, outputs, inits, opset=opset)


def _x(rng, shape):
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def _inception(rng, channels=16, size=16):
    """Three 3×3 stride-1 convs and one 1×1 conv read x; different activations; a Concat joins them."""
    c = channels
    parts = [_conv(rng, "c3a", "x", c, c), _conv(rng, "c3b", "x", c, c), _conv(rng, "c3c", "x", c, c),
             _conv(rng, "c1", "x", c, c, kernel=(1, 1))]
    acts = [oh.make_node(op, [src], [f"h_{src}"], name=f"act_{src}")
            for op, src in (("Relu", "c3a"), ("Sigmoid", "c3b"), ("Tanh", "c3c"))]
    cat = oh.make_node("Concat", ["h_c3a", "h_c3b", "h_c3c", "c1"], ["y"], axis=1, name="cat")
    return _model(parts, [("x", ["N", c, size, size])], [("y", None)], acts + [cat])


def test_inception_block_fuses_the_three_3x3_convs_plus_split(rng):
    model = _inception(rng)
    result = cnnc.compile(model, passes="schedule", rtol=1e-5, atol=1e-5)
    compiled = result.model
    assert op_counts(compiled) == {"Conv": 2, "Split": 1, "Relu": 1, "Sigmoid": 1, "Tanh": 1, "Concat": 1}
    nodes = {n.name: n for n in compiled.graph.node}
    split = next(n for n in compiled.graph.node if n.op_type == "Split")
    fused = next(n for n in compiled.graph.node if n.op_type == "Conv" and n.output[0] == split.input[0])
    assert list(split.output) == ["c3a", "c3b", "c3c"]  # the original tensors: consumers are rewired untouched
    assert [nodes[f"act_{t}"].input[0] for t in ("c3a", "c3b", "c3c")] == ["c3a", "c3b", "c3c"]
    assert nodes["c1"].input[0] == "x" and fused.input[0] == "x"
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in compiled.graph.initializer}
    original = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(weights[fused.input[1]], np.concatenate(
        [original[f"W_{n}"] for n in ("c3a", "c3b", "c3c")]))
    assert list(weights[split.input[1]]) == [16, 16, 16]
    record = result.report["passes"][0]
    assert any("c1" in skip["where"] and "kernel_shape" in skip["why"] for skip in record["skipped"])
    assert record["stats"]["after"]["peak_bytes"] <= record["stats"]["before"]["peak_bytes"]
    assert result.report["equivalence"]["passed"]
    assert_same_outputs(model, compiled, _x(rng, (2, 16, 16, 16)))


def test_three_1x1_reductions_fuse_into_one_conv_plus_split(rng):
    # GoogLeNet's reductions: 1×1 convs read one tensor and feed a 3×3 conv, a 5×5 conv and the output.
    parts = [_conv(rng, "r3", "x", 32, 8, kernel=(1, 1)), _conv(rng, "r5", "x", 32, 4, kernel=(1, 1)),
             _conv(rng, "p1", "x", 32, 8, kernel=(1, 1)), _conv(rng, "b3", "r3", 8, 8),
             _conv(rng, "b5", "r5", 4, 8, kernel=(5, 5))]
    cat = oh.make_node("Concat", ["b3", "b5", "p1"], ["y"], axis=1)
    model = _model(parts, [("x", ["N", 32, 9, 7])], [("y", None)], [cat])
    compiled, result = run_passes(model, "schedule")
    assert op_counts(compiled) == {"Conv": 3, "Split": 1, "Concat": 1}
    split = next(n for n in compiled.graph.node if n.op_type == "Split")
    assert sorted(split.output) == ["p1", "r3", "r5"]
    assert "fused 3× Conv" in result.applied[0]
    assert_same_outputs(model, compiled, _x(rng, (3, 32, 9, 7)))


def test_convs_read_by_one_concat_need_no_split(rng):
    parts = [_conv(rng, "a", "x", 8, 3, kernel=(1, 1)), _conv(rng, "b", "x", 8, 5, kernel=(1, 1), bias=False),
             _conv(rng, "c", "x", 8, 2, kernel=(1, 1))]
    cat = oh.make_node("Concat", ["x", "b", "a", "c"], ["y"], axis=-3, name="cat")  # run order differs from nodes
    model = _model(parts, [("x", ["N", 8, 5, 6])], [("y", None)], [cat])
    compiled, result = run_passes(model, "schedule")
    assert op_counts(compiled) == {"Conv": 1, "Concat": 1}
    concat = next(n for n in compiled.graph.node if n.op_type == "Concat")
    conv = next(n for n in compiled.graph.node if n.op_type == "Conv")
    assert list(concat.input) == ["x", conv.output[0]]
    assert "read directly by Concat 'cat'" in result.applied[0]
    assert_same_outputs(model, compiled, _x(rng, (2, 8, 5, 6)))


def test_gemms_sharing_their_input_fuse(rng):
    inits = [("B0", rng.standard_normal((6, 5)).astype(np.float32)),  # transB=0: K × N
             ("B1", rng.standard_normal((3, 6)).astype(np.float32)),  # transB=1: N × K
             ("B2", rng.standard_normal((6, 4)).astype(np.float32)),
             ("C0", rng.standard_normal(5).astype(np.float32)), ("C1", rng.standard_normal((1, 3)).astype(np.float32))]
    nodes = [oh.make_node("Relu", ["x"], ["a"]),
             oh.make_node("Gemm", ["a", "B0", "C0"], ["g0"], beta=0.5, alpha=1.5),
             oh.make_node("Gemm", ["a", "B1", "C1"], ["g1"], transB=1, alpha=1.5),
             oh.make_node("Gemm", ["a", "B2"], ["g2"], alpha=1.5),
             oh.make_node("Exp", ["g0"], ["y0"]), oh.make_node("Neg", ["g1"], ["y1"]),
             oh.make_node("Abs", ["g2"], ["y2"])]
    model = make_model(nodes, [("x", ["N", 6])], [("y0", None), ("y1", None), ("y2", None)], inits)
    compiled, result = run_passes(model, Schedule(**ALWAYS_FUSE))
    assert "fused 3× Gemm" in result.applied[0]
    assert op_counts(compiled) == {"Relu": 1, "Gemm": 1, "Split": 1, "Exp": 1, "Neg": 1, "Abs": 1}
    gemm = next(n for n in compiled.graph.node if n.op_type == "Gemm")
    assert {a.name: oh.get_attribute_value(a) for a in gemm.attribute}["transB"] == 1
    assert_same_outputs(model, compiled, {"x": rng.standard_normal((4, 6)).astype(np.float32)})


def test_opset_11_split_takes_sizes_as_an_attribute(rng):
    parts = [_conv(rng, "a", "x", 4, 2), _conv(rng, "b", "x", 4, 3)]
    tail = [oh.make_node("MaxPool", ["a"], ["y0"], kernel_shape=[2, 2]), oh.make_node("Neg", ["b"], ["y1"])]
    model = _model(parts, [("x", ["N", 4, 6, 5])], [("y0", None), ("y1", None)], tail, opset=11)
    compiled, _ = run_passes(model, Schedule(**ALWAYS_FUSE))
    split = next(n for n in compiled.graph.node if n.op_type == "Split")
    assert len(split.input) == 1 and list(oh.get_attribute_value(split.attribute[1])) == [2, 3]
    assert_same_outputs(model, compiled, _x(rng, (2, 4, 6, 5)))


def test_member_that_is_a_graph_output_keeps_its_name(rng):
    parts = [_conv(rng, "a", "x", 4, 2), _conv(rng, "b", "x", 4, 3)]
    model = _model(parts, [("x", ["N", 4, 6, 5])], [("a", None), ("y", None)],
                   [oh.make_node("Neg", ["b"], ["y"])])
    compiled, _ = run_passes(model, Schedule(**ALWAYS_FUSE))
    assert op_counts(compiled) == {"Conv": 1, "Split": 1, "Neg": 1}
    assert [o.name for o in compiled.graph.output] == ["a", "y"]
    assert_same_outputs(model, compiled, _x(rng, (1, 4, 6, 5)))


# ---- negatives: one per precondition ------------------------------------------------------------------------------

def _pair(rng, second: dict, first: dict | None = None, cin=4, cout=(2, 3)):
    """Two convs reading x, each negated, stored branch by branch (already the least-peak order)."""
    (a, a_inits), (b, b_inits) = _conv(rng, "a", "x", cin, cout[0], **(first or {})), \
        _conv(rng, "b", "x", cin, cout[1], **second)
    nodes = [a, oh.make_node("Neg", ["a"], ["y0"]), b, oh.make_node("Neg", ["b"], ["y1"])]
    return make_model(nodes, [("x", ["N", cin, 8, 7])], [("y0", None), ("y1", None)], a_inits + b_inits)


@pytest.mark.parametrize("second, reason", [
    ({"strides": [2, 2]}, "strides (1, 1) vs (2, 2)"),
    ({"pads": [1, 0, 1, 2]}, "pads (1, 1, 1, 1) vs (1, 0, 1, 2)"),
    ({"dilations": [2, 1], "pads": [2, 1, 2, 1]}, "dilations"),
    ({"group": 2}, "group=2"),
])
def test_negative_geometry_and_groups(rng, second, reason):
    model = _pair(rng, second)
    compiled, result = run_passes(model, Schedule(reorder=False, **ALWAYS_FUSE))  # the order is another matter
    assert not result.changed and op_counts(compiled) == {"Conv": 2, "Neg": 2}
    assert any(reason in why for _, why in result.skipped), result.skipped


def test_negative_non_constant_weight(rng):
    model = _pair(rng, {})
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "W_b"))
    model.graph.input.append(oh.make_tensor_value_info("W_b", onnx.TensorProto.FLOAT, [3, 4, 3, 3]))
    compiled, result = run_passes(model, Schedule(reorder=False, **ALWAYS_FUSE))
    assert not result.changed and op_counts(compiled) == {"Conv": 2, "Neg": 2}
    assert any("'W_b') is not a float constant" in why for _, why in result.skipped)


def test_negative_declined_by_cost_when_split_dominates(rng):
    # Two 1×1 convs widen 2 channels to 64 each: the Split would copy 32× the bytes that fusion saves reading x.
    model = _pair(rng, {"kernel": (1, 1)}, {"kernel": (1, 1)}, cin=2, cout=(64, 64))
    compiled, result = run_passes(model, "schedule")
    assert not result.changed and op_counts(compiled) == {"Conv": 2, "Neg": 2}
    assert any("would not pay" in why for _, why in result.skipped)


def test_negative_fusion_gain_threshold_is_an_option(rng):
    model = _inception(rng)
    _, result = run_passes(model, Schedule(min_fusion_gain=0.9))
    assert not any("fused" in line for line in result.applied)
    assert any("needs a saving above 90%" in why for _, why in result.skipped)


def test_negative_declined_when_it_would_raise_peak_memory(rng):
    # Each branch widens x 16× and is reduced at once; stored branch by branch, one wide tensor lives at a time.
    # Fused, all three would, and their Split copies too. Huge launch costs make the fusion pay otherwise.
    nodes, inits = [], []
    for name in ("a", "b", "c"):
        conv, conv_inits = _conv(rng, name, "x", 2, 32)
        nodes += [conv, oh.make_node("GlobalAveragePool", [name], [f"y_{name}"])]
        inits += conv_inits
    model = make_model(nodes, [("x", ["N", 2, 8, 8])], [(f"y_{n}", None) for n in "abc"], inits)
    compiled, result = run_passes(model, Schedule(launch_cost_bytes=1 << 30))
    assert not result.changed and op_counts(compiled) == {"Conv": 3, "GlobalAveragePool": 3}
    assert any("would raise the least peak" in why for _, why in result.skipped), result.skipped
    compiled, result = run_passes(model, Schedule(launch_cost_bytes=1 << 30, max_peak_increase=10.0))
    assert op_counts(compiled) == {"Conv": 1, "Split": 1, "GlobalAveragePool": 3}
    assert_same_outputs(model, compiled, _x(rng, (2, 2, 8, 8)))


def test_idempotent(rng):
    compiled, first = run_passes(_inception(rng), "schedule")
    again, second = run_passes(compiled, "schedule")
    assert first.changed and not second.changed and op_counts(again) == op_counts(compiled)
    assert [n.name for n in again.graph.node] == [n.name for n in compiled.graph.node]


# ---- order ---------------------------------------------------------------------------------------------------------

def _expand_reduce_branches(rng, branches=3):
    """Branches that widen x 8× and reduce it, stored level by level: every wide tensor is alive at once."""
    parts = [_conv(rng, f"wide{i}", "x", 2, 16) for i in range(branches)]
    parts = [(node, inits) for node, inits in parts]
    reduce = [_conv(rng, f"narrow{i}", f"wide{i}", 16, 2, kernel=(1, 1)) for i in range(branches)]
    total = oh.make_node("Sum", [f"narrow{i}" for i in range(branches)], ["y"], name="sum")
    return _model(parts + reduce, [("x", ["N", 2, 6, 6])], [("y", None)], [total])


def _profile_order(model, execution_order=None) -> list[str]:
    """Node names in the order onnxruntime ran them, from its profiler (CPU, optimisations disabled)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    if execution_order is not None:
        options.execution_order = execution_order
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = session.get_inputs()[0]
        shape = [d if isinstance(d, int) else 2 for d in x.shape]
        session.run(None, {x.name: np.ones(shape, np.float32)})
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    return [e["name"][:-len("_kernel_time")] for e in events if e.get("cat") == "Node"
            and e["name"].endswith("_kernel_time")]


def test_reorder_lowers_peak_and_onnxruntime_follows_it_with_priority_order(rng):
    model = _expand_reduce_branches(rng)
    compiled, result = run_passes(model, Schedule(fuse=False))
    before, after = result.stats["before"]["peak_bytes"], result.stats["after"]["peak_bytes"]
    assert after < before and "reordered" in result.applied[0]
    names = [n.name for n in compiled.graph.node]
    assert names == ["wide0", "narrow0", "wide1", "narrow1", "wide2", "narrow2", "sum"]
    assert _profile_order(compiled, ort.ExecutionOrder.PRIORITY_BASED) == names
    view = Hypergraph.from_graph(gs.import_onnx(compiled))
    # onnxruntime's default order is its own depth-first search; here it also runs branch by branch.
    assert _profile_order(compiled) == [view.edges[i].name for i in onnxruntime_default_order(view)]
    assert_same_outputs(model, compiled, _x(rng, (2, 2, 6, 6)))


@st.composite
def random_networks(draw):
    """Random DAGs of convs (shared inputs, copied geometry: fusion candidates; groups, dilation, 1×3 kernels),
    activations, Adds and Concats on a non-square input, stored in a random topological order."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    channels = {"x": draw(st.integers(1, 4))}
    geometry_read = {}
    nodes, inits = [], []
    for index in range(draw(st.integers(2, 9))):
        out, names = f"t{index}", list(channels)
        kind = draw(st.sampled_from(["conv", "conv", "conv", "unary", "add", "concat"]))
        same_width = [(a, b) for a in names for b in names if a < b and channels[a] == channels[b]]
        if kind == "conv":
            shared = geometry_read and draw(st.booleans())  # read a tensor another conv reads, same geometry
            src = draw(st.sampled_from(sorted(geometry_read) if shared else names))
            if shared:
                geometry = geometry_read[src]
            else:
                kh, kw, dil = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2]))
                geometry = {"kernel_shape": [kh, kw], "pads": [dil * (kh // 2), dil * (kw // 2)] * 2,
                            "dilations": [dil, dil]}
            geometry_read.setdefault(src, geometry)
            group = draw(st.sampled_from([1, 1, 2])) if channels[src] % 2 == 0 else 1
            cout = group * draw(st.integers(1, 5))
            weight = (0.5 * rng.standard_normal((cout, channels[src] // group, *geometry["kernel_shape"])))
            inits.append((f"W{index}", weight.astype(np.float32)))
            inputs = [src, f"W{index}"]
            if draw(st.booleans()):
                inits.append((f"B{index}", rng.standard_normal(cout).astype(np.float32)))
                inputs.append(f"B{index}")
            nodes.append(oh.make_node("Conv", inputs, [out], name=f"n{index}", group=group, **geometry))
            channels[out] = cout
        elif kind == "add" and same_width:
            a, b = draw(st.sampled_from(same_width))
            nodes.append(oh.make_node("Add", [a, b], [out], name=f"n{index}"))
            channels[out] = channels[a]
        elif kind == "concat" and len(names) > 1:
            picked = draw(st.lists(st.sampled_from(names), min_size=2, max_size=3, unique=True))
            nodes.append(oh.make_node("Concat", picked, [out], axis=1, name=f"n{index}"))
            channels[out] = sum(channels[p] for p in picked)
        else:
            src = draw(st.sampled_from(names))
            nodes.append(oh.make_node(draw(st.sampled_from(["Relu", "Sigmoid", "Neg"])), [src], [out],
                                      name=f"n{index}"))
            channels[out] = channels[src]
    read = {i for n in nodes for i in n.input}
    outputs = [(t, None) for t in channels if t != "x" and t not in read]
    order, placed, pending = [], {"x"}, list(nodes)
    while pending:  # a random topological order
        ready = [n for n in pending if all(i in placed or i.startswith(("W", "B")) for i in n.input)]
        node = ready[int(rng.integers(len(ready)))]
        pending.remove(node)
        order.append(node)
        placed.update(node.output)
    height, width = draw(st.integers(3, 7)), draw(st.integers(3, 7))
    model = make_model(order, [("x", ["N", channels["x"], height, width])], outputs, inits)
    return model, (draw(st.integers(1, 3)), channels["x"], height, width)


@given(random_networks(), st.sampled_from([{}, {"launch_cost_bytes": 1 << 24}, ALWAYS_FUSE]))
def test_random_networks(network, options):
    model, shape = network
    compiled, result = run_passes(model, Schedule(**options))
    onnx.checker.check_model(compiled, full_check=True)  # also requires a topological node order
    assert ir.is_topologically_sorted(gs.import_onnx(compiled))
    if not options.get("max_peak_increase"):
        assert result.stats["after"]["peak_bytes"] <= result.stats["before"]["peak_bytes"]
    rng = np.random.default_rng(0)
    assert_same_outputs(model, compiled, _x(rng, shape), rtol=1e-4, atol=1e-5)
    _, again = run_passes(compiled, Schedule(**options))
    assert not again.changed


@settings(max_examples=15)
@given(random_networks())
def test_onnxruntime_execution_order_matches_the_model(network):
    """PRIORITY_BASED runs the stored order; the default runs cnnc.linear.memory_order.onnxruntime_default_order."""
    model, _ = network
    stored = [n.name for n in model.graph.node]
    assert _profile_order(model, ort.ExecutionOrder.PRIORITY_BASED) == stored
    view = Hypergraph.from_graph(gs.import_onnx(model))
    assert _profile_order(model) == [view.edges[i].name for i in onnxruntime_default_order(view)]


# ---- real architectures -------------------------------------------------------------------------------------------

def _resnet18(width=8):
    from torch import nn

    from cnnc.zoo.blocks import ResidualBlock as Basic

    layers, cin = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], width
    for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [Basic(cin, cout, 1 if stage == 0 else 2), Basic(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def _densenet(growth=6, layers=4):
    import torch
    from torch import nn

    class Dense(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                      nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, 1, 1))

        def forward(self, x):
            return torch.cat([x, self.body(x)], 1)

    modules, c = [nn.Conv2d(3, 2 * growth, 3, 1, 1)], 2 * growth
    for block in range(2):
        for _ in range(layers):
            modules.append(Dense(c))
            c += growth
        if block == 0:
            modules += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1), nn.AvgPool2d(2)]
            c //= 2
    return nn.Sequential(*modules, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def _unet(base=4, depth=3):
    import torch
    from torch import nn

    def double(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [base * 2**i for i in range(depth + 1)]
            self.down = nn.ModuleList([double(3 if i == 0 else widths[i - 1], widths[i]) for i in range(depth)])
            self.bottom = double(widths[depth - 1], widths[depth])
            self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, 2) for i in range(depth)])
            self.merge = nn.ModuleList([double(2 * widths[i], widths[i]) for i in range(depth)])
            self.head = nn.Conv2d(widths[0], 2, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2)
            x = self.bottom(x)
            for i in reversed(range(depth)):
                x = self.merge[i](torch.cat([skips[i], self.up[i](x)], 1))
            return self.head(x)

    return UNet()


@pytest.mark.parametrize("build, shape", [(_resnet18, (1, 3, 64, 48)), (_densenet, (1, 3, 16, 16)),
                                          (_unet, (1, 3, 32, 24))], ids=["resnet18", "densenet", "unet"])
def test_peak_of_cnnc_order_is_never_above_the_exporters(build, shape):
    import torch

    torch.manual_seed(0)
    module = build().eval()
    result = cnnc.compile(module, passes="fold-bn,schedule", example_input=torch.randn(*shape))
    stats = result.report["passes"][-1]["stats"]
    assert not stats["before"]["peak_is_lower_bound"]
    assert stats["after"]["peak_bytes"] <= stats["before"]["peak_bytes"]
    assert stats["after"]["depth"] == len(stats["after"]["level_widths"]) - 1 and stats["after"]["critical_path"]
    assert result.report["equivalence"]["passed"]


# ---- CLI ----------------------------------------------------------------------------------------------------------

def test_cli_inspect_schedule_json_and_plot(rng, tmp_path):
    path, plot = tmp_path / "block.onnx", tmp_path / "levels.png"
    onnx.save(_expand_reduce_branches(rng), path)
    runner = CliRunner()
    done = runner.invoke(cli, ["inspect", str(path), "--schedule", "--json"])
    assert done.exit_code == 0, done.output
    figures = json.loads(done.output)["schedule"]
    assert [level["width"] for level in figures["levels"]] == [1, 3, 3, 1]
    assert figures["orders"]["cnnc"]["peak_bytes"] < figures["orders"]["exporter"]["peak_bytes"] == \
        figures["peak_bytes"]
    assert figures["peak_reduction_bytes"] > 0 and figures["orders"]["cnnc"]["proven_least"]
    assert figures["critical_path"] == ["wide0", "narrow0", "sum"]
    done = runner.invoke(cli, ["inspect", str(path), "--schedule", "--plot", str(plot)])
    assert done.exit_code == 0, done.output
    assert "peak live activations, cnnc (schedule pass)" in done.output and "least possible" in done.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- models written as ONNX text (onnx.parser syntax, as onnxscript's rewriter tests) -------------------------------

ALWAYS_FUSE_SPEC = "launch_cost_bytes=1048576,max_peak_increase=1.0"  # ALWAYS_FUSE as pipeline text


def _text_pair(rng, second_strides):
    return text_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        pair (float[N, 4, 8, 8] x) => (float[N, 2, 8, 8] y0, float[N, 3, M, M] y1)
        <float[2, 4, 3, 3] Wa, float[3, 4, 3, 3] Wb> {{
            [a] a = Conv <pads = [1, 1, 1, 1]> (x, Wa)
            [neg_a] y0 = Neg (a)
            [b] b = Conv <pads = [1, 1, 1, 1], strides = {second_strides}> (x, Wb)
            [neg_b] y1 = Neg (b)
        }}""", Wa=normal(rng, 2, 4, 3, 3), Wb=normal(rng, 3, 4, 3, 3))


def test_text_two_convs_reading_one_tensor_fuse_into_conv_and_split(rng):
    model = _text_pair(rng, [1, 1])
    compiled, result = run_passes(model, f"schedule{{{ALWAYS_FUSE_SPEC}}}")
    assert op_counts(compiled) == {"Conv": 1, "Split": 1, "Neg": 2}
    conv = next(n for n in compiled.graph.node if n.op_type == "Conv")
    split = next(n for n in compiled.graph.node if n.op_type == "Split")
    assert conv.input[0] == "x" and split.input[0] == conv.output[0] and list(split.output) == ["a", "b"]
    assert initializer(compiled, conv.input[1]).shape == (5, 4, 3, 3)
    assert node_named(compiled, "neg_a").input == ["a"] and node_named(compiled, "neg_b").input == ["b"]
    assert "fused 2× Conv" in result.applied[0]
    assert_same_outputs(model, compiled, {"x": normal(rng, 2, 4, 8, 8)})


def test_text_negative_convs_with_different_strides_are_not_fused(rng):
    model = _text_pair(rng, [2, 2])
    run = run_passes(model, f"schedule{{reorder=false,{ALWAYS_FUSE_SPEC}}}")
    assert_unchanged(model, run)
    assert any("strides (1, 1) vs (2, 2)" in why for _, why in run.result.skipped), run.result.skipped
    assert_same_outputs(model, run.model, {"x": normal(rng, 2, 4, 8, 8)})
