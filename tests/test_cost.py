"""The cost model: fusion-aware counts, verdicts, the roofline cache, `cnnc inspect --cost`, and the rewrites of
issue 13 it must refuse (ResNet-18's layer4 Gemm, DenseNet's Conv1×1 + AveragePool) or keep (RepVGG merges)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_same_outputs, bn_params, op_counts, run_passes, text_model
from torch import nn

from cnnc.cli.app import cli
from cnnc.cost import Cost, built_in, cache_path, candidate_id, compare, nodes_cost, roofline
from cnnc.cost import measure as roofline_module
from cnnc.errors import UsageError
from cnnc.io.frontend import from_torch
from cnnc.zoo import draw_batchnorm_statistics
from cnnc.zoo.blocks import RepVGGBlock

ROOF = built_in("cpu")


def _cost(model: onnx.ModelProto) -> Cost:
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    return nodes_cost(graph.nodes, graph.outputs)


def _weights(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_conv_bn_relu_is_one_kernel_with_one_round_trip(rng):
    model = text_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 8, 8] x) => (float[1, 6, 8, 8] y) <float[6, 4, 3, 3] W, float[6] s, float[6] b, float[6] m,
                                                           float[6] v> {
            c = Conv <pads = [1, 1, 1, 1]> (x, W)
            n = BatchNormalization (c, s, b, m, v)
            y = Relu (n)
        }""", W=_weights(rng, 6, 4, 3, 3), **{k.split("_")[1][0]: v for k, v in bn_params(rng, 6, "bn")})
    cost = _cost(model)
    assert cost.kernels == 1
    assert cost.activation_bytes == 4 * (4 * 64 + 6 * 64)  # x read once, y written once: c and n never exist
    assert cost.macs == 6 * 64 * 4 * 9 + 2 * 6 * 64  # the conv, and one per element for BN and Relu
    assert cost.weight_bytes == 4 * (6 * 4 * 9 + 4 * 6)


def test_conv_add_relu_fuses_but_a_second_reader_or_a_concat_stops_fusion(rng):
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 8, 8] x, float[1, 4, 8, 8] skip) => (float[1, 4, 8, 8] y{extra}) <float[4, 4, 3, 3] W> {{
            c = Conv <pads = [1, 1, 1, 1]> (x, W)
            a = Add (c, skip)
            y = Relu (a)
        }}"""
    fused = _cost(text_model(text.format(extra=""), W=_weights(rng, 4, 4, 3, 3)))
    assert fused.kernels == 1 and fused.activation_bytes == 4 * 3 * 256  # x and skip read, y written
    # `a` is also a graph output: it is written, so the Relu runs as its own kernel.
    split = _cost(text_model(text.format(extra=", float[1, 4, 8, 8] a"), W=_weights(rng, 4, 4, 3, 3)))
    assert split.kernels == 2 and split.activation_bytes == fused.activation_bytes + 2 * 4 * 256
    # A BN after a Concat has no anchor to fuse into: Concat and BN are two kernels.
    concat = _cost(text_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 4, 4] x, float[1, 2, 4, 4] z) => (float[1, 4, 4, 4] y) <float[4] s, float[4] b, float[4] m,
                                                                           float[4] v> {
            c = Concat <axis = 1> (x, z)
            y = BatchNormalization (c, s, b, m, v)
        }""", **{k.split("_")[1][0]: v for k, v in bn_params(rng, 4, "bn")}))
    assert concat.kernels == 2


def test_matmul_add_becomes_one_gemm_and_identity_is_free(rng):
    model = text_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8] x) => (float[1, 3] y) <float[8, 3] W, float[3] B> {
            i = Identity (x)
            m = MatMul (i, W)
            y = Add (m, B)
        }""", W=_weights(rng, 8, 3), B=_weights(rng, 3))
    cost = _cost(model)
    assert cost.kernels == 1 and cost.macs == 24 + 3 and cost.weight_bytes == 4 * 27


def test_verdicts_on_clear_cut_cases():
    base = Cost(macs=1_000_000, weight_bytes=4_000_000, activation_bytes=100_000, kernels=6)
    # A quarter of the weights and one kernel: pays at both batch sizes.
    pays = compare(base, Cost(1_000_000, 1_000_000, 100_000, 1), ROOF, (1, 8))
    assert pays.kind == "pays" and pays.ratio > 1.1 and "kernels 6 -> 1" in pays.reason
    # Fewer MACs but 30× the weights (ResNet-18's dense layer4 Gemm): loses.
    loses = compare(base, Cost(900_000, 30_000_000, 100_000, 5), ROOF, (1, 8))
    assert loses.kind == "loses" and loses.ratio < 0.5 and "slower" in loses.reason
    # The same figures: close (within the margin), never "pays".
    assert compare(base, base, ROOF).kind == "close"
    # Faster by 1.3× but weights grow 4×: close (a bigger file needs a measured gain) ...
    grows = compare(Cost(0, 100_000, 0, 40), Cost(0, 400_000, 0, 20), ROOF)
    assert grows.kind == "close" and "weights grow" in grows.reason and 1.1 < grows.ratio < 2
    # ... unless the gain is wide (a linear network collapsed into one small Gemm).
    assert compare(Cost(50_000_000, 100_000, 1_000_000, 80), Cost(30_000, 120_000, 100, 3), ROOF).kind == "pays"


def _layer4_join(rng) -> onnx.ModelProto:
    """ResNet-18's layer4 at 64 px: conv2 (3×3, 512 channels on a 2×2 map) + the identity skip, then ReLU."""
    return text_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 512, 2, 2] h, float[N, 512, 2, 2] skip) => (float[N, 512, 2, 2] y) <float[512, 512, 3, 3] W,
                                                                                         float[512] B> {
            c = Conv <pads = [1, 1, 1, 1]> (h, W, B)
            a = Add (c, skip)
            y = Relu (a)
        }""", W=_weights(rng, 512, 512, 3, 3) * 0.02, B=_weights(rng, 512))


def test_resnet18_layer4_join_does_not_become_a_dense_gemm(rng):
    model = _layer4_join(rng)
    compiled, result = run_passes(model, "collapse")
    assert not result.changed and op_counts(compiled) == {"Conv": 1, "Add": 1, "Relu": 1}
    (candidate,) = result.candidates
    assert candidate.verdict == "loses" and not candidate.applied
    before, after = candidate.estimate["before"], candidate.estimate["after"]
    assert after["macs"] < before["macs"]  # fewer MACs (8.4 M vs 9.4 M): the MAC-only check was fooled by this
    assert after["weight_bytes"] > 3 * before["weight_bytes"]  # 8.4 M parameters against 2.4 M
    assert before["kernels"] == 1  # onnxruntime runs Conv+Add+ReLU as one FusedConv
    assert "loses by the cost model" in result.skipped[0][1]


def test_densenet_transition_conv_and_pool_stay_apart_unless_close_calls_are_applied(rng):
    # DenseNet's transition: Conv1×1 (256 -> 128) then AveragePool 2×2/2; merged, a 2×2 conv with 4× the weights.
    model = text_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 256, 16, 16] x) => (float[N, 128, 8, 8] y) <float[128, 256, 1, 1] W> {
            r = Relu (x)
            c = Conv (r, W)
            y = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (c)
        }""", W=_weights(rng, 128, 256, 1, 1) * 0.05)
    kept, result = run_passes(model, "collapse")
    assert not result.changed and op_counts(kept) == {"Relu": 1, "Conv": 1, "AveragePool": 1}
    conv_form = next(c for c in result.candidates if c.where.endswith("as conv"))
    assert conv_form.verdict == "close" and not conv_form.applied and "within 10%" in conv_form.reason
    # Same MACs, one kernel and one round trip fewer, four times the weights: no clear gain either way.
    before, after = conv_form.estimate["before"], conv_form.estimate["after"]
    assert after["weight_bytes"] >= 4 * before["weight_bytes"] and after["kernels"] == before["kernels"] - 1
    assert conv_form.id == hashlib.sha1("\n".join(sorted(["c", "y"])).encode()).hexdigest()[:8]
    assert conv_form.id == candidate_id(["y", "c"])
    # The same close call, applied by its id (what --auto does after measuring), and by "all".
    for option in (conv_form.id, "all"):
        merged, result = run_passes(model, f"collapse{{apply_close={option}}}")
        assert op_counts(merged) == {"Relu": 1, "Conv": 1}, option
        assert [c.applied for c in result.candidates] == [True]
    feeds = {"x": rng.standard_normal((2, 256, 16, 16)).astype(np.float32)}
    assert_same_outputs(model, merged, feeds, rtol=1e-4, atol=1e-5)
    # Another id leaves it alone.
    _, other = run_passes(model, "collapse{apply_close=0000abcd}")
    assert not other.changed


def test_repvgg_branch_merge_pays_and_is_applied():
    torch.manual_seed(0)
    module = draw_batchnorm_statistics(nn.Sequential(RepVGGBlock(8, 8, 1), RepVGGBlock(8, 16, 2)), 3).eval()
    model = from_torch(module, torch.randn(1, 8, 16, 16))
    compiled, result = run_passes(model, "fold-bn", "collapse")
    assert op_counts(compiled) == {"Conv": 2, "Relu": 2}
    assert [(c.verdict, c.applied) for c in result.candidates] == [("pays", True), ("pays", True)]
    for candidate in result.candidates:  # fewer kernels, no more weights
        before, after = candidate.estimate["before"], candidate.estimate["after"]
        assert after["kernels"] < before["kernels"] and after["weight_bytes"] <= before["weight_bytes"]


def test_roofline_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    assert roofline("cpu", measure=False) == built_in("cpu")  # no cache: the built-in constants, nothing run
    assert not cache_path().exists()
    measured = roofline("cpu")
    assert measured.measured and cache_path() == tmp_path / "roofline.json" and cache_path().exists()
    assert measured.macs_per_s > 1e8 and measured.bytes_per_s > 1e8 and 0 < measured.kernel_overhead_s < 1e-3

    def no_measuring(provider):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(roofline_module, "_measure", no_measuring)
    for again in (roofline("cpu"), roofline("cpu", measure=False)):
        assert again.macs_per_s == measured.macs_per_s and "cached in" in again.source
    # The passes then price with the cached figures.
    _, result = run_passes(_layer4_join(np.random.default_rng(0)), "collapse")
    assert "cached in" in result.stats["roofline"] and "measured roofline" in result.candidates[0].reason


def test_inspect_cost_prints_the_roofline_and_a_table_per_op(tmp_path, monkeypatch, rng):
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(roofline_module, "_measure", lambda provider: built_in(provider))
    path = tmp_path / "join.onnx"
    onnx.save(_layer4_join(rng), path)
    result = CliRunner().invoke(cli, ["inspect", str(path), "--cost"])
    assert result.exit_code == 0, result.output
    assert "roofline (cpu)" in result.output and "kernels" in result.output and "est. ms" in result.output
    table = result.output.split("cost at batch 1")[1]
    conv_row = next(line for line in table.splitlines() if line.strip().startswith("Conv "))
    assert "9.437M" in conv_row  # weight bytes of the 512×512×3×3 kernel and its bias
    as_json = CliRunner().invoke(cli, ["inspect", str(path), "--cost", "--json", "--batch", "8"])
    figures = json.loads(as_json.output)["cost"]
    assert figures["batch"] == 8 and figures["total"]["kernels"] == 1
    assert figures["ops"]["Add"]["kernels"] == 0 and figures["ops"]["Relu"]["kernels"] == 0  # fused
    assert figures["roofline"]["provider"] == "cpu" and figures["total"]["seconds"] > 0


@pytest.mark.parametrize("provider", ["tpu"])
def test_unknown_provider_is_a_usage_error(provider):
    with pytest.raises(UsageError, match="unknown provider"):
        roofline(provider, measure=False)


def test_destride_prices_each_strided_conv_and_weigh_keeps_the_losers(rng):
    model = text_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16, 32, 32] x) => (float[N, 32, 16, 16] y) <float[32, 16, 3, 3] W> {
            y = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, W)
        }""", W=_weights(rng, 32, 16, 3, 3))
    # Asked for by name, destride rewrites; the candidate says what the cost model thinks (16/9 of the MACs).
    rewritten, result = run_passes(model, "destride")
    (candidate,) = result.candidates
    assert op_counts(rewritten) == {"SpaceToDepth": 1, "Conv": 1} and candidate.applied
    assert candidate.verdict == "loses" and candidate.id == candidate_id(["y"])
    assert candidate.estimate["after"]["macs"] * 9 == candidate.estimate["before"]["macs"] * 16
    kept, result = run_passes(model, "destride{weigh=true}")
    assert not result.changed and op_counts(kept) == {"Conv": 1} and not result.candidates[0].applied
    assert "loses by the cost model (candidate " + candidate.id in result.skipped[0][1]
