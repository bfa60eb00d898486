"""collapse: whole linear networks to one Gemm, branch merges and pad-free chains to one Conv, mixed networks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
import torch
from helpers import (
    assert_same_outputs,
    assert_unchanged,
    bn_params,
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
from torch import nn

from cnnc.cost.segments import best_segmentations, cheapest_segmentation
from cnnc.io.frontend import from_torch
from cnnc.linear import conv_equivalent
from cnnc.zoo import draw_batchnorm_statistics
from cnnc.zoo.blocks import RepVGGBlock

SHAPE_OPS = {"Flatten", "Reshape", "Concat", "Split", "Identity"}


def _export(module, shape):
    torch.manual_seed(0)
    return from_torch(module.eval(), torch.randn(*shape))


def _realistic(module):
    return draw_batchnorm_statistics(module, 3)


def _feeds(model, batch, seed=0):
    shape = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {model.graph.input[0].name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_linear_resnet34_collapses_to_one_gemm():
    from cnnc.zoo import build_example

    module, example = build_example("linear-resnet34")
    model = from_torch(module, example)
    compiled, _result = run_passes(model, "collapse")
    counts = op_counts(compiled)
    assert counts.pop("Gemm") == 1 and set(counts) <= SHAPE_OPS, counts
    for batch in (1, 64):
        feeds = _feeds(model, batch)
        with torch.no_grad():
            exact = module.double()(torch.from_numpy(feeds["input"]).double()).numpy()
        module.float()
        got, original = run_model(compiled, feeds)[0], run_model(model, feeds)[0]
        scale = np.abs(exact).max()
        # More exact than the float32 original (both against a float64 evaluation), and within 1e-5 relative.
        assert np.abs(got - exact).max() / scale <= 1e-5
        assert np.abs(got - exact).max() <= np.abs(original - exact).max() * 1.01 + 1e-7


class _MixedLinear(nn.Module):
    """Concat skips, reflect/edge/constant Pad, nearest and linear Resize, AveragePools, constant Mul/Sub/Add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 3, (3, 2), dilation=(1, 2))
        self.conv3 = nn.Conv2d(3, 3, 3, groups=3)
        self.head = nn.Linear(3 * 5 * 8, 7)

    def forward(self, x):  # x: N×2×10×12
        a = self.conv1(nn.functional.pad(x, (1, 0, 2, 1), mode="reflect"))  # N×4×7×7
        b = nn.functional.interpolate(nn.functional.avg_pool2d(x, 2, ceil_mode=True), size=(7, 7), mode="nearest")
        y = torch.cat([a, b * 0.5 - 1.0], dim=1)  # N×6×7×7
        y = self.conv2(nn.functional.pad(y, (2, 1, 1, 1), mode="replicate")) + 0.25  # N×3×7×8
        y = nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)  # N×3×14×16
        y = nn.functional.avg_pool2d(y, 3, stride=2, padding=1, count_include_pad=False)  # N×3×7×8
        y = self.conv3(nn.functional.pad(y, (1, 1, 0, 0), value=0.3))  # N×3×5×8
        y = nn.functional.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=True)
        return self.head(torch.flatten(y, 1))


def test_mixed_linear_network_collapses_to_one_gemm():
    model = _export(_MixedLinear(), (1, 2, 10, 12))
    compiled, _result = run_passes(model, "collapse")
    counts = op_counts(compiled)
    assert counts.pop("Gemm") == 1 and set(counts) <= SHAPE_OPS, counts
    for batch in (1, 3):
        assert_same_outputs(model, compiled, _feeds(model, batch), rtol=1e-5, atol=1e-5)


def test_repvgg_blocks_merge_to_one_conv_each():
    blocks = [RepVGGBlock(3, 8, 2), RepVGGBlock(8, 8, 1), RepVGGBlock(8, 16, 2), RepVGGBlock(16, 16, 1)]
    module = _realistic(nn.Sequential(*blocks))
    model = _export(module, (1, 3, 17, 22))
    compiled, result = run_passes(model, "fold-bn, collapse")
    assert op_counts(compiled) == {"Conv": 4, "Relu": 4}
    assert len(result.applied) == 4
    for batch in (1, 2):
        assert_same_outputs(model, compiled, _feeds(model, batch), rtol=1e-4, atol=1e-5)


def _conv(name, x, y, w, b=None, **attrs):
    inputs = [x, name + "_W"] + ([name + "_B"] if b is not None else [])
    inits = [(name + "_W", w)] + ([(name + "_B", b)] if b is not None else [])
    return oh.make_node("Conv", inputs, [y], name=name, **attrs), inits


def _chain(rng, inner_pads):
    c1, i1 = _conv("c1", "x", "h", rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
                   rng.standard_normal(16).astype(np.float32), pads=[1, 1, 1, 1])
    c2, i2 = _conv("c2", "h", "y", rng.standard_normal((8, 16, 3, 3)).astype(np.float32),
                   rng.standard_normal(8).astype(np.float32), pads=inner_pads)
    return make_model([c1, c2, oh.make_node("Relu", ["y"], ["z"])], [("x", ["N", 3, 9, 11])],
                      [("z", None)], i1 + i2)


def test_chain_where_only_the_first_conv_pads_becomes_one_conv(rng):
    model = _chain(rng, [0, 0, 0, 0])
    compiled, _result = run_passes(model, "collapse{gemm=off}")
    assert op_counts(compiled) == {"Conv": 1, "Relu": 1}
    conv = next(n for n in compiled.graph.node if n.op_type == "Conv")
    assert next(a.ints for a in conv.attribute if a.name == "kernel_shape") == [5, 5]
    feeds = {"x": rng.standard_normal((2, 3, 9, 11)).astype(np.float32)}
    assert_same_outputs(model, compiled, feeds, rtol=1e-5, atol=1e-5)
    # Border pixels, explicitly: the first and last rows and columns match as well as the centre.
    got, expected = run_model(compiled, feeds)[0], run_model(model, feeds)[0]
    for edge in (got[..., 0, :] - expected[..., 0, :], got[..., -1] - expected[..., -1]):
        assert np.abs(edge).max() <= 1e-4


def test_chain_with_inner_zero_padding_is_not_one_conv(rng):
    model = _chain(rng, [1, 1, 1, 1])
    compiled, result = run_passes(model, "collapse{gemm=off}")
    assert op_counts(compiled) == {"Conv": 2, "Relu": 1}
    assert not result.changed
    assert "at the borders" in result.skipped[0][1]


def test_mixed_relu_network_changes_only_linear_machines():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b1 = nn.Conv2d(8, 8, 3, padding=1)
            self.b2 = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            s = self.b1(h) + self.b2(h) + h  # one machine: three branches of h summed
            return torch.relu(s), torch.sigmoid(self.c(s))  # s has two readers

    module = Net()
    model = _export(module, (1, 3, 12, 9))
    compiled, _result = run_passes(model, "collapse")
    assert op_counts(compiled) == {"Conv": 3, "Relu": 2, "Sigmoid": 1}
    assert [o.name for o in compiled.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, compiled, _feeds(model, 2), rtol=1e-5, atol=1e-5)


def test_narrow_cut_factors_the_dense_map_into_two_thin_gemms():
    # x (3×32×32 = 3072) -> convs -> global pool (8) -> 100 classes: W = W2·W1 through the 8 pooled features
    # costs 8·(3072 + 100) MACs instead of 100·3072.
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(8, 100))
    model = _export(module, (1, 3, 32, 32))
    # By default the cost model keeps it: the thin W1 (8×3072) has 30× the convs' weights for an estimated gain
    # too small to justify a bigger file, a close call that only `apply_close` (or --auto's measurement) takes.
    _, result = run_passes(model, "collapse")
    assert not result.changed and next(c.verdict for c in result.candidates if "factored" not in c.where) == "close"
    compiled, result = run_passes(model, "collapse{apply_close=all}")
    counts = op_counts(compiled)
    assert counts.pop("Gemm") == 2 and set(counts) <= SHAPE_OPS, counts
    assert "factored at" in result.applied[0] and "rank 8" in result.applied[0]
    gemms = [n for n in compiled.graph.node if n.op_type == "Gemm"]
    weights = {i.name: i.dims for i in compiled.graph.initializer}
    assert sorted(tuple(weights[g.input[1]]) for g in gemms) == [(8, 3072), (100, 8)]
    assert_same_outputs(model, compiled, _feeds(model, 2), rtol=1e-4, atol=1e-5)


def test_a_machine_the_evaluator_cannot_batch_is_kept_and_the_others_still_collapse(rng):
    # Reshape(x, [1, -1]) hard-codes batch 1: probing W with a batch of one-hot rows fails for that machine only.
    w1, w2 = rng.standard_normal((4, 4)).astype(np.float32), rng.standard_normal((2, 2, 1, 1)).astype(np.float32)
    nodes = [oh.make_node("Reshape", ["x", "shape"], ["flat"]), oh.make_node("Gemm", ["flat", "w1"], ["g"]),
             oh.make_node("Mul", ["g", "k"], ["y1"]),
             oh.make_node("Conv", ["z", "w2"], ["c"]), oh.make_node("Mul", ["c", "k"], ["y2"])]
    model = make_model(nodes, [("x", [1, 2, 2]), ("z", ["N", 2, 3, 3])], [("y1", [1, 4]), ("y2", None)],
                       [("shape", np.array([1, -1], np.int64)), ("w1", w1), ("w2", w2), ("k", np.float32(3.0))])
    compiled, result = run_passes(model, "collapse{gemm=force}")
    assert any("evaluation failed" in why for _, why in result.skipped)
    assert len(result.applied) == 1 and "Conv" in result.applied[0]
    assert op_counts(compiled)["Mul"] == 1  # the Reshape/Gemm/Mul machine is untouched
    feeds = {"x": rng.standard_normal((1, 2, 2)).astype(np.float32), "z": rng.standard_normal((2, 2, 3, 3)).astype(np.float32)}
    assert_same_outputs(model, compiled, feeds, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [11, 17])
def test_a_machine_with_two_outputs_becomes_one_gemm_and_a_split_at_any_opset(rng, opset):
    nodes = [oh.make_node("MatMul", ["x", "a"], ["h"]), oh.make_node("MatMul", ["h", "b"], ["y1"]),
             oh.make_node("Relu", ["h"], ["y2"])]
    model = make_model(nodes, [("x", ["N", 6])], [("y1", ["N", 3]), ("y2", ["N", 4])],
                       [("a", rng.standard_normal((6, 4)).astype(np.float32)),
                        ("b", rng.standard_normal((4, 3)).astype(np.float32))], opset=opset)
    compiled, _result = run_passes(model, "collapse{gemm=force}")
    assert op_counts(compiled) == {"Gemm": 1, "Split": 1, "Relu": 1}
    split = next(n for n in compiled.graph.node if n.op_type == "Split")
    assert list(split.output) == ["y1", "h"] or list(split.output) == ["h", "y1"]  # written directly, no copies
    assert_same_outputs(model, compiled, {"x": rng.standard_normal((3, 6)).astype(np.float32)}, rtol=1e-5, atol=1e-5)


def test_negative_machine_with_non_constant_weight_is_left_alone(rng):
    nodes = [oh.make_node("Conv", ["x", "w"], ["h"]), oh.make_node("Mul", ["h", "k"], ["y"])]
    model = make_model(nodes, [("x", ["N", 2, 5, 5]), ("w", [3, 2, 1, 1])], [("y", None)],
                       [("k", np.float32(2.0))])
    compiled, result = run_passes(model, "collapse")
    assert not result.changed and op_counts(compiled) == {"Conv": 1, "Mul": 1}


def test_negative_bilinear_mul_is_not_linear(rng):
    nodes = [oh.make_node("Add", ["x", "c"], ["a"]), oh.make_node("Mul", ["a", "x"], ["y"])]
    model = make_model(nodes, [("x", ["N", 4])], [("y", None)], [("c", np.ones(4, np.float32))])
    compiled, result = run_passes(model, "collapse")
    assert not result.changed and op_counts(compiled) == {"Add": 1, "Mul": 1}


def test_negative_cost_model_keeps_a_machine_whose_dense_map_is_larger(rng):
    # Two 3×3 convs with an inner pad on a 16×16 map: no conv form, and a dense W would be 2048×768.
    c1, i1 = _conv("c1", "x", "h", rng.standard_normal((8, 3, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1])
    c2, i2 = _conv("c2", "h", "y", rng.standard_normal((8, 8, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1])
    model = make_model([c1, c2], [("x", ["N", 3, 16, 16])], [("y", None)], i1 + i2)
    compiled, result = run_passes(model, "collapse")
    assert not result.changed and op_counts(compiled) == {"Conv": 2}
    assert "gemm: loses by the cost model" in result.skipped[0][1] and "MACs 202752 -> 1572864" in result.skipped[0][1]
    # The 5×5 conv form is priced first and would pay, but fails its proof at the borders; neither is applied.
    assert [(c.where.rsplit(" as ", 1)[1], c.verdict, c.applied) for c in result.candidates] == [
        ("conv", "pays", False), ("gemm", "loses", False)]
    forced, result = run_passes(model, "collapse{gemm=force}")
    assert result.changed and op_counts(forced).get("Gemm") == 1
    assert_same_outputs(model, forced, {"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)},
                        rtol=1e-4, atol=1e-4)


def test_strategies_can_be_forbidden(rng):
    model = _chain(rng, [0, 0, 0, 0])
    compiled, result = run_passes(model, "collapse{conv=off,gemm=off}")
    assert not result.changed and op_counts(compiled) == {"Conv": 2, "Relu": 1}
    assert "disabled" in result.skipped[0][1]


def test_idempotent():
    model = _export(_MixedLinear(), (1, 2, 10, 12))
    compiled, _ = run_passes(model, "collapse")
    again, result = run_passes(compiled, "collapse")
    assert not result.changed and op_counts(again) == op_counts(compiled)


@st.composite
def _linear_graphs(draw):
    """Random linear graphs: conv chains with pads/strides/dilations/groups, skips and concats, then Gemm."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    channels, height, width = draw(st.integers(1, 3)), draw(st.integers(6, 11)), draw(st.integers(6, 11))
    nodes, inits, tensors = [], [], [("x", channels, height, width)]
    for index in range(draw(st.integers(1, 4))):
        name, c, h, w = tensors[-1]
        kind = draw(st.sampled_from(["conv", "skip", "concat"]))
        out = f"t{index}"
        if kind == "conv":
            group = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
            cout = group * draw(st.integers(1, 2))
            k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
            pads = [draw(st.integers(0, 2)) for _ in range(4)]
            oh_, ow_ = (h + pads[0] + pads[2] - d * (k - 1) - 1) // s + 1, (w + pads[1] + pads[3] - d * (k - 1) - 1) // s + 1
            if oh_ < 1 or ow_ < 1:
                continue
            node, init = _conv(f"c{index}", name, out, rng.standard_normal((cout, c // group, k, k)).astype(np.float32),
                               rng.standard_normal(cout).astype(np.float32), pads=pads, strides=[s, s],
                               dilations=[d, d], group=group)
            nodes.append(node)
            inits += init
            tensors.append((out, cout, oh_, ow_))
        elif kind == "skip":
            node, init = _conv(f"c{index}", name, out + "_b", rng.standard_normal((c, c, 3, 3)).astype(np.float32),
                               None, pads=[1, 1, 1, 1])
            nodes += [node, oh.make_node("Add", [name, out + "_b"], [out])]
            inits += init
            tensors.append((out, c, h, w))
        else:
            node, init = _conv(f"c{index}", name, out + "_b", rng.standard_normal((2, c, 1, 1)).astype(np.float32))
            nodes += [node, oh.make_node("Concat", [name, out + "_b"], [out], axis=1)]
            inits += init
            tensors.append((out, c + 2, h, w))
    name, c, h, w = tensors[-1]
    nodes += [oh.make_node("Flatten", [name], ["flat"], axis=1), oh.make_node("Gemm", ["flat", "fc"], ["y"], transB=1)]
    inits.append(("fc", rng.standard_normal((3, c * h * w)).astype(np.float32)))
    batch = draw(st.integers(1, 3))
    return make_model(nodes, [("x", ["N", channels, height, width])], [("y", None)], inits), batch, rng


def _float64_reference(model, feeds):
    from cnnc.eval import evaluate_graph

    values = evaluate_graph(gs.import_onnx(model), feeds)
    return [values[o.name] for o in model.graph.output]


@given(_linear_graphs())
def test_random_linear_graphs_collapse_to_one_gemm(case):
    model, batch, rng = case
    compiled, _result = run_passes(model, "collapse{gemm=force}")
    counts = op_counts(compiled)
    assert counts.pop("Gemm") == 1 and set(counts) <= SHAPE_OPS, counts
    onnx.checker.check_model(compiled, full_check=True)
    shape = [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    # Random unnormalised weights make outputs large and cancel: judge both models against float64, not each other.
    exact = _float64_reference(model, feeds)[0]
    got, original = run_model(compiled, feeds)[0], run_model(model, feeds)[0]
    scale = max(1.0, float(np.abs(exact).max()))
    assert np.abs(got - exact).max() <= 1e-5 * scale
    assert np.abs(got - exact).max() <= 2 * np.abs(original - exact).max() + 1e-6 * scale


# --- models written as ONNX text (onnx.parser syntax, as onnxscript's rewriter tests) -------------------------------

# RepVGG's training-time block: a 3×3 and a 1×1 branch summed; one 3×3 conv computes it.
REPVGG = """
    <ir_version: 8, opset_import: ["" : 17]>
    repvgg (float[N, 4, 7, 9] x) => (float[N, 6, 7, 9] y) <float[6, 4, 3, 3] W3, float[6] B3, float[6, 4, 1, 1] W1> {
        [c3] a = Conv <pads = [1, 1, 1, 1]> (x, W3, B3)
        [c1] b = Conv (x, W1)
        [sum] y = Add (a, b)
    }"""


def test_text_parallel_branches_become_one_conv(rng):
    model = text_model(REPVGG, W3=normal(rng, 6, 4, 3, 3), B3=normal(rng, 6), W1=normal(rng, 6, 4, 1, 1))
    compiled, result = run_passes(model, "collapse")
    assert result.changed and op_counts(compiled) == {"Conv": 1}
    conv = compiled.graph.node[0]
    assert conv.input[0] == "x" and list(conv.output) == ["y"]
    assert initializer(compiled, conv.input[1]).shape == (6, 4, 3, 3)
    assert "-> one Conv 3×3/1 group 1" in result.applied[0]
    assert_same_outputs(model, compiled, {"x": normal(rng, 2, 4, 7, 9)}, atol=1e-5)


@pytest.mark.parametrize("height, width", [(1, 1), (2, 2), (1, 5)])
def test_parallel_branches_on_a_map_too_small_for_an_interior_pixel_still_merge(rng, height, width):
    # MobileOne/RepVGG's last stage runs on 2×2 (64 px input) or 1×1 (32 px) maps: no output pixel there has its
    # whole 3×3 window inside the input. The kernel is read on a larger probe map (the machine is translation-
    # invariant) and the form is proven at the real size, so the merge is kept at every input size.
    text = REPVGG.replace("float[N, 4, 7, 9] x", f"float[N, 4, {height}, {width}] x").replace(
        "float[N, 6, 7, 9] y", f"float[N, 6, {height}, {width}] y")
    model = text_model(text, W3=normal(rng, 6, 4, 3, 3), B3=normal(rng, 6), W1=normal(rng, 6, 4, 1, 1))
    compiled, result = run_passes(model, "collapse{gemm=off}")
    assert result.changed and op_counts(compiled) == {"Conv": 1}
    assert initializer(compiled, compiled.graph.node[0].input[1]).shape == (6, 4, 3, 3)
    assert_same_outputs(model, compiled, {"x": normal(rng, 3, 4, height, width)}, atol=1e-5)


def test_text_results_by_spec_after_fold_bn_then_collapse(rng):
    gamma, beta, mean, var = (value for _, value in bn_params(rng, 6, "bn"))
    model = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        conv_bn_conv (float[N, 4, 7, 9] x) => (float[N, 3, 7, 9] y)
        <float[6, 4, 3, 3] W, float[6] gamma, float[6] beta, float[6] mean, float[6] var, float[3, 6, 1, 1] V> {
            [conv] c = Conv <pads = [1, 1, 1, 1]> (x, W)
            [bn] b = BatchNormalization (c, gamma, beta, mean, var)
            [head] y = Conv (b, V)
        }""", W=normal(rng, 6, 4, 3, 3), gamma=gamma, beta=beta, mean=mean, var=var, V=normal(rng, 3, 6, 1, 1))
    run = run_passes(model, "fold-bn", "collapse{gemm=off}")
    assert run.specs == ("fold-bn", "collapse{gemm=off}")
    assert run["fold-bn"].applied and run["collapse{ gemm=off }"] is run.result
    assert op_counts(run.model) == {"Conv": 1} and list(run.model.graph.node[0].output) == ["y"]
    assert_same_outputs(model, run.model, {"x": normal(rng, 2, 4, 7, 9)}, atol=1e-5)


def test_text_negative_collapse_with_both_forms_off_keeps_the_machine(rng):
    model = text_model(REPVGG, W3=normal(rng, 6, 4, 3, 3), B3=normal(rng, 6), W1=normal(rng, 6, 4, 1, 1))
    run = run_passes(model, "collapse{conv=off,gemm=off}")
    assert_unchanged(model, run)
    assert run.result.skipped == [("machine of 3 ops (1×Add, 2×Conv) from ['x'] to ['y']", "conv: disabled; gemm: disabled")]


INVERTED_RESIDUAL_CHAIN = """
    <ir_version: 8, opset_import: ["" : 17]>
    expand_dw_project_expand (float[N, 16, 14, 14] x) => (float[N, 144, 7, 7] y)
    <float[96, 16, 1, 1] We, float[96, 1, 3, 3] Wd, float[96] gamma, float[96] beta, float[96] mean, float[96] var,
     float[24, 96, 1, 1] Wp, float[24] Bp, float[144, 24, 1, 1] Wn> {
        [expand] e = Conv <pads = [1, 1, 1, 1]> (x, We)
        [dw] d = Conv <group = 96, strides = [2, 2]> (e, Wd)
        [bn] b = BatchNormalization (d, gamma, beta, mean, var)
        [project] p = Conv (b, Wp, Bp)
        [next_expand] n = Conv (p, Wn)
        [relu] y = Relu (n)
    }"""


def _inverted_residual_weights(rng) -> dict:
    gamma, beta, mean, var = (value for _, value in bn_params(rng, 96, "bn"))
    return {"We": normal(rng, 96, 16, 1, 1, scale=0.25), "Wd": normal(rng, 96, 1, 3, 3, scale=0.25),
            "gamma": gamma, "beta": beta, "mean": mean, "var": var, "Wp": normal(rng, 24, 96, 1, 1, scale=0.25),
            "Bp": normal(rng, 24), "Wn": normal(rng, 144, 24, 1, 1, scale=0.25)}


def test_inverted_residual_chain_that_loses_whole_is_split_into_a_paying_segment(rng):
    # MobileNetV2 (expansion 6) at t = 0 with pad-once: the linear bottleneck runs on into the next block's expand
    # conv. As one 3x3/2 conv 16 -> 144 the chain loses (1.02M MACs against 0.72M); expand -> dw -> project as one
    # 3x3/2 conv 16 -> 24 pays (169k against 548k, and fewer weights), and the next expand is kept.
    model = text_model(INVERTED_RESIDUAL_CHAIN, **_inverted_residual_weights(rng))
    compiled, result = run_passes(model, "collapse")
    assert op_counts(compiled) == {"Conv": 2, "Relu": 1}
    merged, kept = (n for n in compiled.graph.node if n.op_type == "Conv")
    assert list(merged.input[:1]) == ["x"] and list(merged.output) == ["p"] and list(kept.input[:1]) == ["p"]
    assert initializer(compiled, merged.input[1]).shape == (24, 16, 3, 3)
    assert initializer(compiled, kept.input[1]).shape == (144, 24, 1, 1)
    whole = [c for c in result.candidates if "4×Conv" in c.where]
    segment = [c for c in result.candidates if "3×Conv" in c.where and c.where.endswith("as conv")]
    assert whole and all(c.verdict == "loses" and not c.applied for c in whole)
    assert len(segment) == 1 and segment[0].verdict == "pays" and segment[0].applied
    assert any("convs 0..2 of a chain of 4" in line for line in result.applied)
    feeds = {"x": normal(rng, 2, 16, 14, 14)}
    assert_same_outputs(model, compiled, feeds, rtol=1e-4, atol=1e-4)


def test_segments_never_span_an_inner_padded_conv(rng):
    # The same chain with the padding left on the depthwise conv (no pad-once): a segment through the dw conv would
    # read the expand conv's bias at the border, so it is never priced nor probed; dw -> project alone (dense 3x3,
    # more MACs) does not pay; every conv is kept and the reason says so.
    text = INVERTED_RESIDUAL_CHAIN.replace("<pads = [1, 1, 1, 1]> (x, We)", "(x, We)").replace(
        "<group = 96, strides = [2, 2]>", "<group = 96, strides = [2, 2], pads = [1, 1, 1, 1]>")
    model = text_model(text, **_inverted_residual_weights(rng))
    run = run_passes(model, "collapse")
    assert_unchanged(model, run)
    assert "segments: none pays" in run.result.skipped[0][1]
    assert not [c for c in run.result.candidates if "from ['x'] to ['p']" in c.where and c.where.endswith("conv")]


def test_shared_segmentation_dp_takes_a_merge_only_when_strictly_cheaper():
    # Items 0..3 cost 1 each kept; merging 0..2 costs 1.5 (pays), 1..3 is refused (None), 0..1 costs exactly 2 (a tie).
    merged = {(0, 2): 1.5, (0, 1): 2.0}
    cost = lambda i, j: 1.0 if i == j else merged.get((i, j))
    options = best_segmentations(4, cost)
    assert options[0] == (4.0, []) and options[2] == (2.5, [(0, 2)]) and options[1] == (4.0, [(0, 1)])
    assert cheapest_segmentation(4, cost) == (2.5, [(0, 2)])
    assert cheapest_segmentation(2, cost) == (2.0, [])  # a tie keeps the convs apart
    with pytest.raises(ValueError):
        best_segmentations(1, lambda i, j: None)


MOBILEONE_BLOCK = """
    <ir_version: 8, opset_import: ["" : 17]>
    mobileone (float[N, 4, 6, 7] x) => (float[N, 4, 6, 7] y)
    <float[4, 1, 3, 3] Wd, float[4] Bd, float[4, 1, 1, 1] Ws, float[1, 4, 1, 1] S,
     float[4] gamma, float[4] beta, float[4] mean, float[4] var> {
        [dw] a = Conv <group = 4, pads = [1, 1, 1, 1]> (x, Wd, Bd)
        [scale] b0 = Conv <group = 4> (x, Ws)
        [mul] b = Mul (b0, S)
        [bn] c = BatchNormalization (x, gamma, beta, mean, var)
        [s1] ab = Add (a, b)
        [s2] y = Add (ab, c)
    }"""


def test_parallel_branches_compose_from_their_weights_without_probing(rng, monkeypatch):
    # MobileOne's block: a depthwise 3×3, a depthwise 1×1 scale branch and an identity BN, summed. Its kernel is the
    # sum of the padded branch kernels (cnnc.linear.parallel_branches); with the VJP reader disabled the merge must
    # still happen, and it is still proven against the machine.
    def no_probing(*args, **kwargs):
        raise AssertionError("the kernel was probed")
    monkeypatch.setattr(conv_equivalent, "_read_kernel", no_probing)
    gamma, beta, mean, var = (value for _, value in bn_params(rng, 4, "bn"))
    model = text_model(MOBILEONE_BLOCK, Wd=normal(rng, 4, 1, 3, 3), Bd=normal(rng, 4), Ws=normal(rng, 4, 1, 1, 1),
                       S=normal(rng, 1, 4, 1, 1), gamma=gamma, beta=beta, mean=mean, var=var)
    compiled, result = run_passes(model, "collapse{gemm=off}")
    assert result.changed and op_counts(compiled) == {"Conv": 1}
    conv = compiled.graph.node[0]
    assert initializer(compiled, conv.input[1]).shape == (4, 1, 3, 3)  # still depthwise
    assert_same_outputs(model, compiled, {"x": normal(rng, 2, 4, 6, 7)}, atol=1e-5)
