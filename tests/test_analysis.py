"""cnnc analyze (seed 001): block finding, perturbation numbers against a hand computation, sections, stopping rule,
report, plot and the CLI on a residual network with 9 blocks in 3 sections."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
import torch
from click.testing import CliRunner
from helpers import make_model
from torch import nn

from cnnc.analysis.perturbation import format_report, measure_perturbations, plot_report, stopping_depth
from cnnc.analysis.residual_blocks import find_residual_blocks
from cnnc.analysis.samples import load_samples, sample_inputs
from cnnc.cli import cli
from cnnc.cli.loading import load_graph
from cnnc.errors import UsageError
from cnnc.io.frontend import from_torch

C_PROJECTION = 0.375  # constants exact in float32, so that the hand computation in float64 is exact too


def _hand_model():
    """Four blocks with known perturbations on positive inputs (ReLU passes them unchanged):
    section 0 (4×4): y0 = x + relu(0.5·x), y1 = relu(0.25·y0) + y0 (operands swapped);
    section 1 (2×2): y2 = avgpool(y1) + relu(conv(y1)) with conv = 0.375·avgpool (projection skip),
                     y3 = y2 + relu(0.125·y2)."""
    conv_w = np.full((2, 1, 2, 2), 0.25 * C_PROJECTION, dtype=np.float32)
    nodes = [
        oh.make_node("Mul", ["x", "a0"], ["m0"]), oh.make_node("Relu", ["m0"], ["r0"]),
        oh.make_node("Add", ["x", "r0"], ["y0"], name="join0"),
        oh.make_node("Mul", ["y0", "a1"], ["m1"]), oh.make_node("Relu", ["m1"], ["r1"]),
        oh.make_node("Add", ["r1", "y0"], ["y1"], name="join1"),
        oh.make_node("AveragePool", ["y1"], ["s2"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["y1", "w2"], ["c2"], group=2, strides=[2, 2]), oh.make_node("Relu", ["c2"], ["r2"]),
        oh.make_node("Add", ["s2", "r2"], ["y2"], name="join2"),
        oh.make_node("Mul", ["y2", "a3"], ["m3"]), oh.make_node("Relu", ["m3"], ["r3"]),
        oh.make_node("Add", ["y2", "r3"], ["y3"], name="join3"),
    ]
    inits = [("a0", np.float32(0.5)), ("a1", np.float32(0.25)), ("w2", conv_w), ("a3", np.float32(0.125))]
    return make_model(nodes, [("x", ["N", 2, 4, 4])], [("y3", None)], inits)


def _graph(model):
    return load_graph(model, fold_bn=False)


def test_blocks_of_the_hand_model_are_found_in_order_with_their_skips():
    blocks, skipped = find_residual_blocks(_graph(_hand_model()))
    assert [(b.join, b.kind, b.skip, b.branch, b.output) for b in blocks] == [
        ("join0", "identity", "x", "r0", "y0"), ("join1", "identity", "y0", "r1", "y1"),
        ("join2", "projection", "s2", "r2", "y2"), ("join3", "identity", "y2", "r3", "y3")]
    assert blocks[1].skip_index == 1 and blocks[2].block_input == "y1" and skipped == []


def test_perturbation_numbers_match_a_hand_computation(rng):
    samples = rng.random((5, 2, 4, 4)) + 0.1  # positive: every ReLU passes its input
    report = measure_perturbations(_graph(_hand_model()), samples, eps=0.3)
    norm = np.linalg.norm(samples.reshape(5, -1), axis=1)
    y1 = 1.5 * 1.25 * samples
    pooled = y1.reshape(5, 2, 2, 2, 2, 2).mean(axis=(3, 5))  # 2×2 average pool
    pooled_norm = np.linalg.norm(pooled.reshape(5, -1), axis=1)
    expected_abs = [0.5 * norm, 0.25 * 1.5 * norm, C_PROJECTION * pooled_norm, 0.125 * (1 + C_PROJECTION) * pooled_norm]
    expected_scaled = [0.5, 0.25, C_PROJECTION, 0.125]
    for measure, absolute, scaled in zip(report.blocks, expected_abs, expected_scaled):
        assert measure.absolute == pytest.approx(absolute.mean(), rel=1e-12)
        assert measure.scaled == pytest.approx(scaled, rel=1e-12)
        assert measure.scaled_min == pytest.approx(scaled, rel=1e-12) == measure.scaled_max
    first, second = report.sections
    assert first.resolution == (4, 4) and first.blocks == [0, 1]
    assert second.resolution == (2, 2) and second.blocks == [2, 3]
    assert first.distance == pytest.approx(expected_abs[0].mean() + expected_abs[1].mean(), rel=1e-12)
    assert first.scaled_distance == pytest.approx(0.75, rel=1e-12) and first.mean_scaled == pytest.approx(0.375)
    assert second.scaled_distance == pytest.approx(0.5, rel=1e-12) and second.mean_scaled == pytest.approx(0.25)
    assert (first.stopping_depth, second.stopping_depth) == (3, 2)  # ceil(0.75/0.3), ceil(0.5/0.3)
    total = report.as_dict()["total"]
    assert total["scaled_distance"] == pytest.approx(1.25) and total["mean_scaled"] == pytest.approx(1.25 / 4)
    assert total["stopping_depth"] == 5


def test_stopping_rule_is_the_ceiling_and_refuses_a_nonpositive_eps():
    assert stopping_depth(4.11, 0.1) == 42 and stopping_depth(0.2, 0.1) == math.ceil(0.2 / 0.1)
    with pytest.raises(UsageError):
        stopping_depth(1.0, 0.0)


def test_adds_that_are_not_residual_joins_are_skipped_with_reasons():
    w = np.ones((2, 2, 1, 1), dtype=np.float32)
    nodes = [
        oh.make_node("Add", ["x", "bias"], ["b"], name="bias_add"),  # a constant operand: a bias, not a join
        oh.make_node("Add", ["b", "b"], ["d"], name="double"),  # x + x
        oh.make_node("Conv", ["d", "w"], ["p"]), oh.make_node("Relu", ["p"], ["p1"]),
        oh.make_node("Conv", ["d", "w"], ["q"]), oh.make_node("Relu", ["q"], ["q1"]),
        oh.make_node("Add", ["p1", "q1"], ["e"], name="inception"),  # two equal branches
        oh.make_node("Relu", ["e"], ["e1"]), oh.make_node("Conv", ["e1", "w"], ["f"]),
        oh.make_node("Add", ["e1", "f"], ["g"], name="nonlinear_skip_check"),
        oh.make_node("Add", ["g", "x2"], ["y"], name="two_inputs"),
    ]
    model = make_model(nodes, [("x", [1, 2, 3, 5]), ("x2", [1, 2, 3, 5])], [("y", None)],
                       [("bias", np.ones((1, 2, 1, 1), np.float32)), ("w", w)])
    blocks, skipped = find_residual_blocks(_graph(model))
    assert [b.join for b in blocks] == ["nonlinear_skip_check"]
    reasons = dict(skipped)
    assert "scaling" in reasons["Add 'double'"]
    assert "no shorter skip path" in reasons["Add 'inception'"]
    assert "share no ancestor" in reasons["Add 'two_inputs'"]
    assert "Add 'bias_add'" not in reasons


def test_a_skip_through_a_nonlinearity_is_not_a_projection():
    w = np.ones((2, 2, 1, 1), dtype=np.float32)
    nodes = [oh.make_node("Relu", ["x"], ["s"]),
             oh.make_node("Conv", ["x", "w"], ["c1"]), oh.make_node("Conv", ["c1", "w"], ["c2"]),
             oh.make_node("Add", ["s", "c2"], ["y"], name="join")]
    model = make_model(nodes, [("x", [1, 2, 3, 3])], [("y", None)], [("w", w)])
    blocks, skipped = find_residual_blocks(_graph(model))
    assert blocks == [] and "nonlinear Relu" in dict(skipped)["Add 'join'"]


class _PreActBlock(nn.Module):
    """Seed 001's Eq. 13 block: x + W2 * relu(BN2(W1 * relu(BN1(x)))), 1×1 stride-2 projection between sections."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        branch = self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))
        return branch + (x if self.shortcut is None else self.shortcut(x))


def _preact_resnet(blocks_per_section=3, widths=(4, 8, 8)):
    torch.manual_seed(0)
    layers, channels = [nn.Conv2d(3, widths[0], 3, 1, 1)], widths[0]
    for section, width in enumerate(widths):
        for index in range(blocks_per_section):
            layers.append(_PreActBlock(channels, width, 2 if section and index == 0 else 1))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return from_torch(nn.Sequential(*layers), torch.zeros(1, 3, 16, 12))


@pytest.fixture(scope="module")
def resnet_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("analyze") / "preact.onnx"
    onnx.save(_preact_resnet(), path)
    return path


def test_cli_analyze_on_nine_blocks_in_three_sections(resnet_path, tmp_path):
    report_path, plot_path = tmp_path / "r.json", tmp_path / "r.png"
    result = CliRunner().invoke(cli, ["analyze", str(resnet_path), "--random", "6", "--eps", "0.05", "--json",
                                      str(report_path), "--plot", str(plot_path)])
    assert result.exit_code == 0, result.output
    assert "9 residual blocks in 3 sections" in result.output and "L=ceil(d_scaled/0.05)" in result.output
    report = json.loads(report_path.read_text())
    assert report["num_blocks"] == 9 and len(report["sections"]) == 3 and report["samples"] == 6
    assert [s["resolution"] for s in report["sections"]] == [[16, 12], [8, 6], [4, 3]]
    assert [b["kind"] for b in report["blocks"]] == ["identity"] * 3 + (["projection"] + ["identity"] * 2) * 2
    for section in report["sections"]:
        members = [report["blocks"][i] for i in section["blocks"]]
        assert section["scaled_distance"] == pytest.approx(sum(b["scaled"] for b in members))
        assert section["distance"] == pytest.approx(sum(b["absolute"] for b in members))
        assert section["stopping_depth"] == math.ceil(section["scaled_distance"] / 0.05)
        assert all(b["scaled"] > 0 and b["absolute"] > 0 for b in members)
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_cli_analyze_reads_npy_samples_and_matches_the_api(resnet_path, tmp_path):
    graph = load_graph(onnx.load(resnet_path), fold_bn=False)
    samples = sample_inputs(graph, 3, seed=7)
    np.save(tmp_path / "x.npy", samples)
    result = CliRunner().invoke(cli, ["analyze", str(resnet_path), "--inputs", str(tmp_path / "x.npy"), "--json",
                                      str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    expected = measure_perturbations(graph, samples).as_dict()
    got = json.loads((tmp_path / "r.json").read_text())
    assert [b["scaled"] for b in got["blocks"]] == pytest.approx([b["scaled"] for b in expected["blocks"]])
    assert "section" in format_report(measure_perturbations(graph, samples))


@pytest.mark.parametrize("args, message", [
    (["--inputs", "X", "--random", "2"], "not both"),
    (["--inputs", "missing.npy"], "cannot read sample inputs"),
    (["--eps", "0"], "eps"),
])
def test_cli_analyze_bad_options_are_one_error_line(resnet_path, args, message):
    result = CliRunner().invoke(cli, ["analyze", str(resnet_path), *args])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and message in result.output


def test_samples_are_checked_against_the_input(tmp_path):
    graph = _graph(_hand_model())
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 4, 4), np.float32))
    np.save(tmp_path / "one.npy", np.ones((2, 4, 4), np.float32))
    with pytest.raises(UsageError, match="needs 2 at axis 1"):
        load_samples(graph, tmp_path / "wrong.npy")
    assert load_samples(graph, tmp_path / "one.npy").shape == (1, 2, 4, 4)
    assert sample_inputs(graph, 3).shape == (3, 2, 4, 4)


def test_a_network_without_blocks_reports_so_and_plots_nothing(tmp_path):
    model = make_model([oh.make_node("Relu", ["x"], ["y"])], [("x", [1, 2, 3, 3])], [("y", None)])
    report = measure_perturbations(_graph(model), np.ones((1, 2, 3, 3)))
    assert report.blocks == [] and format_report(report).startswith("no residual blocks")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(cli, ["analyze", str(path), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "no residual blocks to plot" in result.output


def test_plot_writes_one_column_per_section(tmp_path, rng):
    report = measure_perturbations(_graph(_hand_model()), rng.random((2, 2, 4, 4)) + 0.1, eps=0.3)
    plot_report(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_find_blocks_does_not_modify_the_graph():
    graph = gs.import_onnx(_hand_model())
    before = [(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes]
    find_residual_blocks(graph)
    measure_perturbations(graph, np.ones((1, 2, 4, 4)))
    assert before == [(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes]


def test_a_join_that_broadcasts_its_skip_is_reported_not_measured():
    w = np.ones((2, 2, 1, 1), dtype=np.float32)
    nodes = [oh.make_node("GlobalAveragePool", ["x"], ["g"]),
             oh.make_node("Conv", ["x", "w"], ["c"]), oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("Add", ["g", "r"], ["y"], name="join")]
    model = make_model(nodes, [("x", [1, 2, 3, 3])], [("y", None)], [("w", w)])
    report = measure_perturbations(_graph(model), np.ones((2, 2, 3, 3)))
    assert report.blocks == [] and "broadcast" in dict(report.skipped)["Add 'join'"]


def test_cli_analyze_on_an_op_the_evaluator_refuses_is_a_model_error(tmp_path):
    nodes = [oh.make_node("Elu", ["x"], ["e"]), oh.make_node("Add", ["x", "e"], ["y"])]
    path = tmp_path / "elu.onnx"
    onnx.save(make_model(nodes, [("x", [1, 2, 3, 3])], [("y", None)]), path)
    result = CliRunner().invoke(cli, ["analyze", str(path)])
    assert result.exit_code == 2 and "cannot evaluate the model in float64" in result.output
