"""cnnc explain (seed 003): the identity u = <x,H_I> + <x_b,H_b> for every reconstruction mode, against a hand
computation, the relations between the modes, the data-set table, refusals, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch
from click.testing import CliRunner
from helpers import make_model
from torch import nn

from cnnc.analysis.backmap import BackMap, relative_error
from cnnc.analysis.backmap_dataset import dataset_table
from cnnc.analysis.backmap_report import format_dataset_table, plot_hypersurface
from cnnc.analysis.explain import explain_unit, parse_unit
from cnnc.cli import cli
from cnnc.cli.loading import load_graph
from cnnc.errors import ModelError, UsageError
from cnnc.io.frontend import from_torch
from cnnc.ir import constant_value
from cnnc.zoo import draw_batchnorm_statistics

EXACT = 1e-11  # float64: the identity holds to rounding


def _realistic_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    return draw_batchnorm_statistics(module, seed).eval()


class _SmallNet(nn.Module):
    """Conv+BN+LeakyReLU, MaxPool, a grouped stride-2 conv with asymmetric geometry, a residual join, global
    average pooling and a Linear head: every kind of layer the back-map passes through, on a 3×9×10 input."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, (3, 2), 2, (1, 0), groups=2, bias=False), nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 6, 3, 1, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = nn.functional.max_pool2d(nn.functional.leaky_relu(self.bn1(self.conv1(x)), 0.1), 2, ceil_mode=True)
        y = torch.relu(self.bn2(self.conv2(x)))
        y = y + torch.relu(self.conv3(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = from_torch(_realistic_bn(_SmallNet()), torch.zeros(1, 3, 9, 10))
    backmap = BackMap(load_graph(model, fold_bn=True))
    sample = np.random.default_rng(3).random((1, 3, 9, 10))
    return model, backmap, sample


def _conv_tensor(backmap, index):
    return backmap.conv_layers()[index].outputs[0].name


def _reconstruct(explanation):
    return float((explanation.x * explanation.H_I.reshape((-1,) + explanation.x.shape)).sum()
                 + explanation.x_b @ explanation.H_b.reshape(-1, explanation.x_b.size).sum(0))


W1 = np.array([[1.0, -2.0], [0.5, 0.25], [-1.0, 1.0]], np.float32)
B1 = np.array([0.5, -0.25, 0.125], np.float32)
W2 = np.array([[2.0, -1.0, 3.0]], np.float32)
B2 = np.array([0.75], np.float32)


def _two_layer_model():
    nodes = [oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             oh.make_node("Relu", ["h"], ["r"]), oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, name="fc2")]
    return make_model(nodes, [("x", ["N", 2])], [("y", None)], [("w1", W1), ("b1", B1), ("w2", W2), ("b2", B2)])


def test_hand_computed_hypersurface_of_a_two_layer_relu_net():
    w1, b1, w2, b2 = W1, B1, W2, B2
    backmap = BackMap(load_graph(_two_layer_model(), fold_bn=True))
    x = np.array([1.0, 0.5])
    hidden = w1.astype(np.float64) @ x + b1  # [0.5, 0.375, -0.375]: the third unit is off
    mask = (hidden > 0).astype(np.float64)
    explanation = explain_unit(backmap, x[None], "output:0")
    assert explanation.unit.mode == "RM0"
    np.testing.assert_allclose(explanation.H_I, (w2[0] * mask) @ w1, rtol=0, atol=1e-15)
    assert [b.tensor for b in backmap.biases] == ["b1", "b2"]
    np.testing.assert_allclose(explanation.H_b, np.concatenate([w2[0] * mask, [1.0]]), rtol=0, atol=1e-15)
    true = float(w2[0] @ np.maximum(hidden, 0) + b2[0])
    assert explanation.true_value == pytest.approx(true, rel=1e-15)
    assert explanation.reconstructed_value == pytest.approx(true, rel=1e-15)


def test_a_network_without_biases_reports_a_zero_bias_term():
    nodes = [oh.make_node("Gemm", ["x", "w1"], ["h"], transB=1), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    model = make_model(nodes, [("x", ["N", 2])], [("y", None)], [("w1", W1), ("w2", W2)])
    explanation = explain_unit(BackMap(load_graph(model, fold_bn=True)), np.array([[1.0, 0.5]]), "output:0")
    payload = explanation.as_dict()  # raised ValueError on the empty bias vector before
    assert payload["bias_term"] == 0.0 and payload["x_b"] == []
    assert payload["input_term"] == pytest.approx(explanation.true_value, rel=1e-12)


@pytest.mark.parametrize("mode", ["RM0", "RM1", "RM2", "RM3", "RM4"])
def test_reconstruction_identity_holds_in_every_mode(small, mode):
    _, backmap, sample = small
    unit = "output:3" if mode == "RM0" else f"{_conv_tensor(backmap, 1)}:4,2,1"
    explanation = explain_unit(backmap, sample, unit, mode)
    assert explanation.unit.mode == mode
    assert explanation.relative_error <= EXACT
    assert explanation.reconstructed_value == pytest.approx(_reconstruct(explanation), rel=1e-12)
    assert explanation.H_b.shape[-1] == backmap.x_b.size
    if mode in ("RM3", "RM4"):  # one hypersurface per in-channel of the unit's group (conv2 has groups=2)
        assert explanation.H_I.shape == (2, 3, 9, 10) and [p["in_channel"] for p in explanation.parts] == [2, 3]
        assert all(p["relative_error"] <= EXACT for p in explanation.parts)
        assert sum(p["true_value"] for p in explanation.parts) == pytest.approx(explanation.true_value, rel=1e-12)
    else:
        assert explanation.H_I.shape == (3, 9, 10)


def test_modes_relate_as_the_paper_says(small):
    _, backmap, sample = small
    tensor = _conv_tensor(backmap, 2)
    rm0, rm1, rm2, rm3, rm4 = (explain_unit(backmap, sample, f"{tensor}:1,2,0", mode)
                               for mode in ("RM0", "RM1", "RM2", "RM3", "RM4"))
    # RM2 = Σ_j RM4 (Eq. 11) and RM1 = Σ_j RM3 (Eq. 12), hypersurfaces and values.
    np.testing.assert_allclose(rm4.H_I.sum(0), rm2.H_I, atol=1e-13)
    np.testing.assert_allclose(rm4.H_b.sum(0), rm2.H_b, atol=1e-13)
    np.testing.assert_allclose(rm3.H_I.sum(0), rm1.H_I, atol=1e-12)
    assert rm3.true_value == pytest.approx(rm1.true_value, rel=1e-12)
    # RM1 = Σ_s RM2 (Eq. 12): the sum over every stride position of the pre-bias conv unit.
    positions = [explain_unit(backmap, sample, f"{tensor}:1,{y},{x}", "RM2") for y in range(3) for x in range(2)]
    np.testing.assert_allclose(sum(p.H_I for p in positions), rm1.H_I, atol=1e-12)
    assert sum(p.true_value for p in positions) == pytest.approx(rm1.true_value, rel=1e-12)
    # RM0 of the conv output is the same unit with its own bias: same H_I, H_b differs by a 1 at that bias.
    conv = backmap.conv_layers()[2]
    bias = backmap.biases[[b.tensor for b in backmap.biases].index(conv.inputs[2].name)]
    np.testing.assert_allclose(rm0.H_I, rm2.H_I, atol=1e-14)
    difference = rm0.H_b - rm2.H_b
    assert difference[bias.offset + 1] == pytest.approx(1.0) and np.count_nonzero(np.abs(difference) > 1e-14) == 1
    bias_value = float(np.asarray(constant_value(conv.inputs[2])).reshape(-1)[1])
    assert rm0.true_value - rm2.true_value == pytest.approx(bias_value, rel=1e-12)


def test_loop_fallback_gives_the_vectorised_hypersurfaces(small):
    _, backmap, sample = small
    unit = f"{_conv_tensor(backmap, 1)}:5,1,0"
    vectorised = explain_unit(backmap, sample, unit, "RM4", vectorize=True)
    looped = explain_unit(backmap, sample, unit, "RM4", vectorize=False)
    np.testing.assert_allclose(looped.H_I, vectorised.H_I, atol=1e-14)
    np.testing.assert_allclose(looped.H_b, vectorised.H_b, atol=1e-14)


def test_dataset_table_reconstructs_every_unit_of_every_layer(small):
    _, backmap, _ = small
    samples = np.random.default_rng(0).random((4, 3, 9, 10))
    table = dataset_table(backmap, samples, chunk=3, explicit_units=2, explicit_outputs=True)
    layers = table["layers"]
    assert [row["kind"] for row in layers] == ["conv"] * 3 + ["FC"] and layers[0]["first_layer"]
    assert [row["units_per_input"] for row in layers] == [4 * 9 * 10, 6 * 3 * 2, 6 * 3 * 2, 5]
    for row in layers:
        assert row["units"] == 4 * row["units_per_input"]
        assert row["within_percent"] == 100.0 and row["max_relative_error"] <= 1e-9
        assert row["max_abs_error_over_max_abs_value"] <= 1e-13
        assert row["explicit_max_relative_error"] <= 1e-9
    assert layers[-1]["explicit_units"] == 4 * 5 and layers[1]["explicit_units"] == 4 * 2
    text = format_dataset_table(table, "small")
    assert "| ε3 (FC) |" in text and "100.0000 %" in text


def test_dataset_table_has_a_row_for_a_hidden_dense_layer():
    backmap = BackMap(load_graph(_two_layer_model(), fold_bn=True))
    table = dataset_table(backmap, np.random.default_rng(0).standard_normal((5, 2)), explicit_units=2,
                                  explicit_outputs=True)
    assert [(row["kind"], row["node"], row["units"]) for row in table["layers"]] == [("FC (hidden)", "fc1", 15),
                                                                                     ("FC", "fc2", 5)]
    assert "| ε0 (FC, hidden) (first layer) | fc1 |" in format_dataset_table(table)
    assert table["layers"][0]["explicit_units"] == 10 and table["layers"][1]["explicit_units"] == 5
    assert all(row["max_relative_error"] <= 1e-12 and row["explicit_max_relative_error"] <= 1e-12
               for row in table["layers"])


def test_relative_error_follows_eq_16():
    assert relative_error(1.5, 1.0) == pytest.approx(0.5)
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(1e-30, 0.0) > 1e7  # c = 0 is replaced by the smallest normal float32


class _Activation(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.conv, self.activation, self.fc = nn.Conv2d(1, 2, 3), activation, nn.Linear(2 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.activation(self.conv(x)), 1))


class _Product(nn.Module):
    def forward(self, x):
        return x * torch.relu(x)


@pytest.mark.parametrize("module, message", [
    (_Activation(nn.Sigmoid()), "Sigmoid .* smooth nonlinearity"),
    (_Activation(nn.Tanh()), "Tanh .* smooth nonlinearity"),
    (_Activation(nn.GELU()), "smooth nonlinearity"),
    (_Activation(nn.ReLU6()), "Clip .* threshold other than 0"),
    (_Product(), "multiplies two activations"),
])
def test_networks_where_the_identity_fails_are_refused(module, message):
    backmap = BackMap(load_graph(from_torch(module, torch.zeros(1, 1, 5, 5)), fold_bn=True))
    with pytest.raises(ModelError, match=message):
        explain_unit(backmap, np.ones((1, 1, 5, 5)), "output:0")
    with pytest.raises(ModelError, match=message):
        dataset_table(backmap, np.ones((1, 1, 5, 5)))


def test_a_unit_before_the_smooth_layer_is_still_explained():
    backmap = BackMap(load_graph(from_torch(_Activation(nn.Sigmoid()), torch.zeros(1, 1, 5, 5)), fold_bn=True))
    explanation = explain_unit(backmap, np.random.default_rng(0).random((1, 1, 5, 5)),
                                  f"{_conv_tensor(backmap, 0)}:1,1,1", "RM2")
    assert explanation.relative_error <= EXACT


def test_a_constant_that_is_both_bias_and_weight_is_refused():
    nodes = [oh.make_node("Add", ["x", "c"], ["a"]), oh.make_node("Mul", ["a", "c"], ["y"])]
    model = make_model(nodes, [("x", ["N", 2])], [("y", None)], [("c", np.array([2.0, 3.0], np.float32))])
    with pytest.raises(ModelError, match="constant 'c' is a bias of Add"):
        BackMap(load_graph(model, fold_bn=True))


def test_an_unfolded_batch_norm_is_refused():
    nodes = [oh.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", training_mode=1)]
    model = make_model(nodes, [("x", ["N", 2, 3, 3])], [("y", None)],
                       [(n, np.ones(2, np.float32)) for n in "sbmv"])
    with pytest.raises(ModelError, match="BatchNormalization 'bn'"):
        explain_unit(BackMap(load_graph(model, fold_bn=True)), np.ones((1, 2, 3, 3)), "y:0")


@pytest.mark.parametrize("unit, mode, message", [
    ("nothing:1", None, "no activation tensor named 'nothing'"),
    ("output:99", None, "out of range"),
    ("output", None, "bad --unit"),
    ("output:1", "RM2", "RM2 explains a convolution unit"),
    ("CONV:9,0,0", "RM2", "channel 9 out of range"),
    ("CONV:1,0", "RM2", "needs TENSOR:c,y,x"),
])
def test_bad_units_are_usage_errors(small, unit, mode, message):
    _, backmap, sample = small
    with pytest.raises(UsageError, match=message):
        explain_unit(backmap, sample, unit.replace("CONV", _conv_tensor(backmap, 1)), mode)


def test_parse_unit():
    assert parse_unit("output:3") == ("output", (3,))
    assert parse_unit("/a/b:c:1,2,3") == ("/a/b:c", (1, 2, 3))


@pytest.fixture(scope="module")
def small_path(small, tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "small.onnx"
    onnx.save(small[0], path)
    return path


def test_cli_explain_output_unit_json_and_heat_map(small_path, tmp_path):
    json_path, png_path = tmp_path / "e.json", tmp_path / "h.png"
    np.save(tmp_path / "x.npy", np.random.default_rng(1).random((3, 9, 10)).astype(np.float32))
    result = CliRunner().invoke(cli, ["explain", str(small_path), "--unit", "output:2", "--input",
                                      str(tmp_path / "x.npy"), "--json", str(json_path), "--png", str(png_path)])
    assert result.exit_code == 0, result.output
    payload = json.loads(json_path.read_text())
    assert payload["mode"] == "RM0" and payload["relative_error"] <= EXACT
    assert payload["reconstructed_value"] == pytest.approx(payload["true_value"], rel=1e-12)
    assert payload["input_term"] + payload["bias_term"] == pytest.approx(payload["true_value"], rel=1e-12)
    assert np.asarray(payload["H_I"]).shape == (3, 9, 10) and len(payload["H_b"]) == len(payload["x_b"])
    assert png_path.read_bytes()[:4] == b"\x89PNG" and "relative error" in result.output


def test_cli_explain_conv_unit_in_rm4_lists_in_channels(small, small_path, tmp_path):
    tensor = _conv_tensor(small[1], 2)
    result = CliRunner().invoke(cli, ["explain", str(small_path), "--unit", f"{tensor}:0,1,1", "--mode", "rm4",
                                      "--png", str(tmp_path / "h.png")])
    assert result.exit_code == 0, result.output
    assert result.output.count("in-channel") == 6 and "before its own bias" in result.output


def test_cli_explain_list_and_dataset(small, small_path, tmp_path):
    listing = CliRunner().invoke(cli, ["explain", str(small_path), "--list"])
    assert listing.exit_code == 0 and _conv_tensor(small[1], 1) in listing.output and "output" in listing.output
    result = CliRunner().invoke(cli, ["explain", str(small_path), "--dataset", "--random", "3", "--md",
                                      str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["inputs"] == 3 and all(row["within_percent"] == 100.0 for row in table["layers"])
    assert "| ε3 (FC) |" in (tmp_path / "t.md").read_text()


def test_cli_refuses_a_smooth_network_with_one_error_line(tmp_path):
    path = tmp_path / "tanh.onnx"
    onnx.save(from_torch(_Activation(nn.Tanh()), torch.zeros(1, 1, 5, 5)), path)
    result = CliRunner().invoke(cli, ["explain", str(path), "--unit", "output:0"])
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "smooth nonlinearity" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    ([], "give --unit"),
    (["--unit", "output:0", "--random", "3"], "belong to --dataset"),
    (["--dataset", "--unit", "output:0"], "--dataset takes"),
    (["--unit", "output:0", "--mode", "RM9"], "RM9"),
])
def test_cli_explain_usage_errors(small_path, args, message):
    result = CliRunner().invoke(cli, ["explain", str(small_path), *args])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and message in result.output


def test_heat_map_of_a_flat_input(tmp_path):
    nodes = [oh.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    model = make_model(nodes, [("x", ["N", 4])], [("y", None)], [("w", np.ones((2, 4), np.float32))])
    explanation = explain_unit(BackMap(load_graph(model, fold_bn=True)), np.ones((1, 4)), "y:1")
    assert explanation.relative_error == 0.0 and explanation.x_b.size == 0
    plot_hypersurface(explanation, tmp_path / "flat.png")
    assert (tmp_path / "flat.png").stat().st_size > 1000
