"""The `cnnc` command line through click's CliRunner, and the issue's fold-bn "done when" scenarios."""

from __future__ import annotations

import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
import torch
from click.testing import CliRunner
from helpers import bn_params, make_model, op_counts, run_model
from torch import nn

import cnnc
from cnnc import ir
from cnnc.cli import cli
from cnnc.passes import DEFAULT_PIPELINE, PASSES, all_pass_classes
from cnnc.pipeline.contract import Pass, PassResult
from cnnc.zoo import draw_batchnorm_statistics
from cnnc.zoo.blocks import ResidualBlock

RTOL, ATOL = 1e-4, 1e-5  # the acceptance tolerances (also the CLI defaults, passed explicitly below)


def _invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(*args: str):
    result = _invoke(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    return result


def _usage_error(*args: str, contains: str = "") -> str:
    result = _invoke(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and contains in line and "Traceback" not in result.stderr
    return line


# --- small hand-built models ---------------------------------------------------------------------------------------

def _conv_bn_model(rng, spatial=(5, 5)) -> onnx.ModelProto:
    """Conv(4->8, 3x3, pad 1) + BN + Relu; symbolic batch."""
    inits = [("W", rng.standard_normal((8, 4, 3, 3)).astype(np.float32)),
             ("B", rng.standard_normal(8).astype(np.float32))] + bn_params(rng, 8, "bn")
    nodes = [oh.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b"], name="bn"),
             oh.make_node("Relu", ["b"], ["y"], name="relu")]
    return make_model(nodes, [("x", ["N", 4, *spatial])], [("y", None)], inits)


@pytest.fixture
def conv_bn_path(tmp_path, rng) -> Path:
    path = tmp_path / "convbn.onnx"
    onnx.save(_conv_bn_model(rng), path)
    return path


# --- compile -------------------------------------------------------------------------------------------------------

def test_compile_with_the_default_passes(conv_bn_path, tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = _ok("compile", conv_bn_path, "-o", out, "--json", report_path)
    report = json.loads(report_path.read_text())
    assert [record["pass"] for record in report["passes"]] == list(DEFAULT_PIPELINE)
    assert "fold-bn" in DEFAULT_PIPELINE
    assert report["equivalence"]["passed"] is True
    assert "BatchNormalization" not in op_counts(onnx.load(out))
    assert f"wrote {out}" in result.stdout and "check: equivalent" in result.stdout


def test_compile_fold_bn_json_report(conv_bn_path, tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = _ok("compile", conv_bn_path, "--passes", "fold-bn", "-o", out, "--json", report_path)
    report = json.loads(report_path.read_text())
    assert report["before"]["ops"] == {"BatchNormalization": 1, "Conv": 1, "Relu": 1}
    assert report["after"]["ops"] == {"Conv": 1, "Relu": 1} == op_counts(onnx.load(out))
    assert report["before"]["parameters"] == 8 * 4 * 9 + 8 + 4 * 8 and report["after"]["parameters"] == 8 * 4 * 9 + 8
    assert report["before"]["macs"] == report["after"]["macs"] == 8 * 5 * 5 * 4 * 9
    assert report["after"]["inputs"] == {"x": ["N", 4, 5, 5]} and report["after"]["outputs"] == {"y": ["N", 8, 5, 5]}
    (record,) = report["passes"]
    assert record["pass"] == "fold-bn" and record["exact"] and record["changed"] and record["error"] is None
    assert len(record["applied"]) == 1 and "bn" in record["applied"][0] and record["skipped"] == []
    equivalence = report["equivalence"]
    assert equivalence["passed"] and equivalence["tolerance"] == "per dtype"  # no --rtol/--atol given
    assert equivalence["feeds"] == 4  # two random batches at batch 1 and two at batch 3
    (output,) = equivalence["outputs"]
    assert (output["dtype"], output["rtol"], output["atol"]) == ("float32", RTOL, ATOL)  # float32's row
    assert output["name"] == "y" and 0 <= output["max_abs"] < ATOL and output["max_abs"] >= output["mean_abs"]
    assert report["written"] == [str(out)]
    # The table on stdout has the same before/after figures.
    assert any(line.split() == ["BatchNormalization", "1", "0"] for line in result.stdout.splitlines())
    assert "pass fold-bn (exact): changed, 1 rewrite(s)" in result.stdout


def test_compile_reports_skips_with_their_reasons(tmp_path, rng):
    inits = bn_params(rng, 4, "bn")
    bn = oh.make_node("BatchNormalization", ["x", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                      ["y", "running_mean", "running_var"], name="bn", training_mode=1)
    path = tmp_path / "training_bn.onnx"
    onnx.save(make_model([bn], [("x", [2, 4, 3, 3])], [("y", [2, 4, 3, 3])], inits, opset=15), path)
    report_path = tmp_path / "r.json"
    result = _ok("compile", path, "--passes", "fold-bn", "--no-check", "-o", tmp_path / "o.onnx", "--json",
                 report_path)
    (record,) = json.loads(report_path.read_text())["passes"]
    assert not record["changed"] and record["skipped"][0]["where"] == "BatchNormalization 'bn'"
    assert "training_mode" in record["skipped"][0]["why"]
    assert "- skipped BatchNormalization 'bn': training_mode" in result.stdout
    assert "check: skipped (--no-check)" in result.stdout


def test_output_defaults_to_model_dot_cnnc_dot_onnx(conv_bn_path):
    result = _ok("compile", conv_bn_path, "--passes", "fold-bn")
    expected = conv_bn_path.parent / "convbn.cnnc.onnx"
    assert expected.is_file() and f"wrote {expected}" in result.stdout
    onnx.checker.check_model(onnx.load(expected), full_check=True)


def test_compile_builtin_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _ok("compile", "--example", "resnet-bn", "--rtol", RTOL, "--atol", ATOL)  # the default passes
    assert "check: equivalent" in result.stdout
    compiled = onnx.load(tmp_path / "resnet-bn.cnnc.onnx")
    assert "BatchNormalization" not in op_counts(compiled)
    _ok("example", "resnet-bn", "-o", tmp_path / "resnet.onnx")
    assert op_counts(onnx.load(tmp_path / "resnet.onnx"))["BatchNormalization"] >= 7
    listing = _ok("example").stdout
    assert "resnet-bn" in listing and "linear-resnet34" in listing
    _usage_error("compile", "--example", "nope", contains="unknown example")
    _usage_error("compile", contains="give either MODEL or --example")


def test_compile_in_place_over_a_model_with_external_data(tmp_path, rng):
    model = _conv_bn_model(rng)
    path = tmp_path / "m.onnx"
    to_save = onnx.ModelProto()
    to_save.CopyFrom(model)  # onnx.save_model rewrites the tensors it externalises in place
    onnx.save_model(to_save, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    _ok("compile", path, "-o", path, "--passes", "fold-bn", "--external-data")
    (data_file,) = set(_listing(tmp_path)) - {"m.onnx"}  # a fresh data file; the input's one is gone
    assert data_file != "m.onnx.data"
    _ok("compile", path, "-o", path, "--passes", "fold-bn")  # now inline: no data file is left behind
    assert _listing(tmp_path) == ["m.onnx"]
    compiled = onnx.load(path)
    assert op_counts(compiled) == {"Conv": 1, "Relu": 1}
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run_model(compiled, {"x": x})[0], run_model(model, {"x": x})[0],
                               rtol=RTOL, atol=ATOL)


def test_verify_each_checks_after_every_changing_pass(conv_bn_path, tmp_path):
    report_path = tmp_path / "r.json"
    _ok("compile", conv_bn_path, "--passes", "fold-bn", "--verify-each", "-o", tmp_path / "o.onnx", "--json",
        report_path)
    per_pass = json.loads(report_path.read_text())["equivalence_per_pass"]
    assert list(per_pass) == ["fold-bn"] and per_pass["fold-bn"]["passed"] is True


def test_pass_option_syntax(conv_bn_path, tmp_path):
    report_path = tmp_path / "r.json"
    _ok("compile", conv_bn_path, "--passes", "fold-bn{into_consumer=false}", "-o", tmp_path / "o.onnx",
        "--json", report_path)
    assert json.loads(report_path.read_text())["passes"][0]["pass"] == "fold-bn{into_consumer=False}"
    _usage_error("compile", conv_bn_path, "--passes", "no-such-pass", contains="unknown pass 'no-such-pass'")
    _usage_error("compile", conv_bn_path, "--passes", "fold-bn{nope=1}", contains="unknown option")
    _usage_error("compile", conv_bn_path, "--passes", "fold-bn{into_consumer=maybe}", contains="bad value")
    _usage_error("compile", conv_bn_path, "--passes", "fold-bn{into_consumer=1", contains="cannot parse")
    assert not (tmp_path / "convbn.cnnc.onnx").exists()


def test_input_shape_for_symbolic_dims(tmp_path, rng):
    model = _conv_bn_model(rng, spatial=("H", "W"))
    path = tmp_path / "symbolic.onnx"
    onnx.save(model, path)
    _usage_error("compile", path, "--passes", "fold-bn", "-o", tmp_path / "o.onnx", contains="--input-shape x:")
    assert not (tmp_path / "o.onnx").exists()
    report_path = tmp_path / "r.json"
    _ok("compile", path, "--passes", "fold-bn", "-o", tmp_path / "o.onnx", "--input-shape", "x:2,4,6,7",
        "--json", report_path)
    equivalence = json.loads(report_path.read_text())["equivalence"]
    assert equivalence["input_shapes"] == [{"x": [2, 4, 6, 7]}] * 2
    _usage_error("compile", path, "--input-shape", "x:2,5,6,7", contains="does not fit")
    _usage_error("compile", path, "--input-shape", "x=2,4,6,7", contains="bad --input-shape")


def test_inputs_from_npy_files(conv_bn_path, tmp_path, rng):
    x = rng.standard_normal((5, 4, 5, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    report_path = tmp_path / "r.json"
    _ok("compile", conv_bn_path, "--passes", "fold-bn", "-o", tmp_path / "o.onnx", "--inputs",
        f"x:{tmp_path / 'x.npy'}", "--json", report_path)
    equivalence = json.loads(report_path.read_text())["equivalence"]
    assert equivalence["feeds"] == 1 and equivalence["input_shapes"] == [{"x": [5, 4, 5, 5]}]
    _usage_error("compile", conv_bn_path, "--inputs", "x", contains="bad --inputs")


def test_json_into_a_missing_folder_is_a_usage_error(conv_bn_path, tmp_path):
    _usage_error("compile", conv_bn_path, "--passes", "fold-bn", "-o", tmp_path / "o.onnx", "--json",
                 tmp_path / "absent" / "r.json", contains="cannot write --json")
    _usage_error("verify", conv_bn_path, conv_bn_path, "--json", tmp_path / "absent" / "r.json",
                 contains="cannot write --json")


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    result = _invoke("--debug", "compile", path)
    assert result.exit_code == 2 and "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ")


# --- passes, inspect, verify ---------------------------------------------------------------------------------------

def test_passes_lists_every_registered_pass():
    lines = _ok("passes").stdout.splitlines()
    registry = all_pass_classes()
    assert len(lines) == len(registry)
    for line in lines:
        name, rest = line.split(maxsplit=1)
        assert rest.startswith(registry[name].kind)
    assert any(line.startswith("fold-bn") and "exact, default" in line for line in lines)
    kinds = {line.split()[0]: line.split()[1].rstrip(":,") for line in lines}
    assert kinds["tidy"] == kinds["canonicalize"] == kinds["check-model"] == "housekeeping"
    assert kinds["drop-blocks"] == "approximate" and kinds["destride"] == "exact"


def test_inspect_table_and_json(conv_bn_path):
    table = _ok("inspect", conv_bn_path).stdout
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:] if line.strip()}
    assert rows["nodes"] == ["3"] and rows["Conv"] == ["1"] and rows["BatchNormalization"] == ["1"]
    stats = json.loads(_ok("inspect", conv_bn_path, "--json").stdout)
    assert stats["ops"] == {"BatchNormalization": 1, "Conv": 1, "Relu": 1} and stats["nodes"] == 3
    assert stats["parameters"] == 8 * 4 * 9 + 8 + 4 * 8
    assert stats["macs"] == 8 * 5 * 5 * 4 * 9  # output elements × (Cin/g · kh · kw), at batch 1
    assert stats["inputs"] == {"x": ["N", 4, 5, 5]} and stats["outputs"] == {"y": ["N", 8, 5, 5]}
    assert stats["ir_version"] == 8 and stats["opsets"] == {"ai.onnx": 17}
    _usage_error("inspect", conv_bn_path.parent / "missing.onnx", contains="does not exist")


def test_inspect_counts_macs_of_conv_transpose_gemm_and_matmul(tmp_path):
    nodes = [oh.make_node("ConvTranspose", ["x", "Wt"], ["c"], strides=[2, 2]),
             oh.make_node("GlobalAveragePool", ["c"], ["p"]),
             oh.make_node("Flatten", ["p"], ["f"]),
             oh.make_node("Gemm", ["f", "G", "gb"], ["g"], transB=1),
             oh.make_node("MatMul", ["g", "M"], ["y"])]
    inits = [("Wt", np.zeros((4, 6, 3, 2), np.float32)), ("G", np.zeros((7, 6), np.float32)),
             ("gb", np.zeros(7, np.float32)), ("M", np.zeros((7, 3), np.float32))]
    path = tmp_path / "mixed.onnx"
    onnx.save(make_model(nodes, [("x", ["N", 4, 5, 4])], [("y", None)], inits), path)
    stats = json.loads(_ok("inspect", path, "--json").stdout)
    # ConvTranspose: every input element feeds Cout/g·kh·kw outputs; Gemm/MatMul: output elements × K.
    assert stats["macs"] == 4 * 5 * 4 * (6 * 3 * 2) + 7 * 6 + 3 * 7
    assert stats["parameters"] == 4 * 6 * 3 * 2 + 7 * 6 + 7 + 7 * 3
    assert stats["outputs"] == {"y": ["N", 3]}


def test_verify_equivalent_and_perturbed(conv_bn_path, tmp_path, rng):
    compiled = tmp_path / "compiled.onnx"
    _ok("compile", conv_bn_path, "--passes", "fold-bn", "-o", compiled)
    result = _ok("verify", conv_bn_path, compiled, "--rtol", RTOL, "--atol", ATOL)
    assert "equivalent on 4 input batch(es)" in result.stdout

    perturbed = onnx.load(compiled)
    weight = next(init for init in perturbed.graph.initializer if len(init.dims) == 4)
    values = onnx.numpy_helper.to_array(weight).copy()
    values[0, 0, 1, 1] += 0.05
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(perturbed, tmp_path / "perturbed.onnx")
    report_path = tmp_path / "r.json"
    result = _invoke("verify", conv_bn_path, tmp_path / "perturbed.onnx", "--json", report_path)
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: models are not equivalent") and "Traceback" not in result.stderr
    equivalence = json.loads(report_path.read_text())["equivalence"]
    assert equivalence["passed"] is False and equivalence["outputs"][0]["max_abs"] > 1e-3
    # A loose enough tolerance accepts the same pair: the exit code follows the tolerance, not the models.
    _ok("verify", conv_bn_path, tmp_path / "perturbed.onnx", "--atol", "10")


@dataclass(frozen=True)
class ScaleFirstConvWeight(Pass):
    """Test-only, deliberately wrong: multiplies the first Conv's weight by 1.01."""

    name: ClassVar[str] = "test-cli-broken-scale"
    summary: ClassVar[str] = "deliberately broken pass for the CLI tests"

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult()
        conv = next(node for node in graph.nodes if node.op == "Conv")
        weight = ir.constant_value(conv.inputs[1])
        conv.inputs[1] = ir.make_constant("scaled_weight", weight * np.float32(1.01), graph)
        result.did(f"scaled the weight of {conv.name} by 1.01")
        return result


@pytest.fixture
def broken_pass(monkeypatch):
    monkeypatch.setitem(PASSES, ScaleFirstConvWeight.name, lambda: ScaleFirstConvWeight)
    return ScaleFirstConvWeight.name


def test_compile_that_fails_the_check_exits_1_and_writes_nothing(conv_bn_path, tmp_path, broken_pass):
    out, report_path = tmp_path / "o.onnx", tmp_path / "r.json"
    result = _invoke("compile", conv_bn_path, "--passes", f"fold-bn,{broken_pass}", "-o", out, "--json",
                     report_path)
    assert result.exit_code == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: compiled model is not equivalent") and "Traceback" not in result.stderr
    assert not out.exists() and _listing(tmp_path) == ["convbn.onnx", "r.json"]
    assert json.loads(report_path.read_text())["equivalence"]["passed"] is False

    result = _invoke("compile", conv_bn_path, "--passes", f"fold-bn,{broken_pass}", "--verify-each", "-o", out,
                     "--json", report_path)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: pass {broken_pass} broke equivalence")
    assert json.loads(report_path.read_text())["failed_pass"] == broken_pass
    assert not out.exists()


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- the fold-bn acceptance scenarios ----------------------------------------------------------------------

def _realistic_bn(module: nn.Module, seed: int) -> nn.Module:
    return draw_batchnorm_statistics(module, seed, spread=0.2).eval()


class SmallResNet(nn.Module):
    """ResNet-style: BN after every conv (stem, both block convs, the projection shortcut), avg-pool, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(ResidualBlock(8, 8, 1), ResidualBlock(8, 16, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class ConvTransposeBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(3, 6, 3, 2, 1, output_padding=1), nn.BatchNorm2d(6), nn.ReLU())

    def forward(self, x):
        return self.up(x)


class LinearBN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 5, 12), nn.BatchNorm1d(12), nn.ReLU(),
                                  nn.Linear(12, 4))

    def forward(self, x):
        return self.head(x)


class ConvOutputWithTwoConsumers(nn.Module):
    """The conv output feeds the BN and, separately, a ReLU: its weights must not be scaled in place."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.relu(y)


SCENARIOS = {"resnet": SmallResNet, "convtranspose": ConvTransposeBN, "linear-bn1d": LinearBN1d,
             "two-consumers": ConvOutputWithTwoConsumers}


def _scenario(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _realistic_bn(SCENARIOS[name](), seed=1), torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(2))


def _export_without_constant_folding(module: nn.Module, example: torch.Tensor, path: Path) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    path.write_bytes(buffer.getvalue())
    return onnx.load(path)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fold_bn_on_torch_exports_leaves_no_batchnorm(tmp_path, name):
    module, example = _scenario(name)
    path, out, report_path = tmp_path / f"{name}.onnx", tmp_path / f"{name}.cnnc.onnx", tmp_path / "r.json"
    exported = _export_without_constant_folding(module, example, path)
    bn_before = op_counts(exported)["BatchNormalization"]
    assert bn_before == {"resnet": 6, "convtranspose": 1, "linear-bn1d": 1, "two-consumers": 1}[name]
    # force_mul_add: the conv with two readers leaves a lone BN, which fold-bn otherwise keeps as one kernel.
    _ok("compile", path, "--passes", "fold-bn{force_mul_add=true}", "--rtol", RTOL, "--atol", ATOL, "-o", out,
        "--json", report_path)
    compiled = onnx.load(out)
    assert "BatchNormalization" not in op_counts(compiled)
    report = json.loads(report_path.read_text())
    assert report["equivalence"]["passed"] and report["equivalence"]["rtol"] == RTOL
    assert report["equivalence"]["atol"] == ATOL
    assert len(report["passes"][0]["applied"]) == bn_before
    with torch.no_grad():
        expected = module(example).numpy()
    np.testing.assert_allclose(run_model(compiled, {"input": example.numpy()})[0], expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fold_bn_through_the_python_api_on_a_torch_module(name):
    module, example = _scenario(name)
    result = cnnc.compile(module, passes=["fold-bn{force_mul_add=true}"], example_input=example, rtol=RTOL, atol=ATOL)
    assert result.report["before"]["ops"]["BatchNormalization"] >= 1
    assert "BatchNormalization" not in op_counts(result.model)
    assert result.report["equivalence"]["passed"]
    with torch.no_grad():
        expected = module(example).numpy()
    np.testing.assert_allclose(run_model(result.model, {"input": example.numpy()})[0], expected,
                               rtol=RTOL, atol=ATOL)


# --- optional outputs: plots last, and a missing matplotlib never throws the other files away ----------------------

def _residual_model(rng) -> onnx.ModelProto:
    """x + Relu(Conv(x)): one residual block (for analyze), a ReLU unit with a bias (for explain)."""
    inits = [("W", (0.1 * rng.standard_normal((4, 4, 3, 3))).astype(np.float32)),
             ("B", rng.standard_normal(4).astype(np.float32))]
    nodes = [oh.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Relu", ["c"], ["r"], name="relu"),
             oh.make_node("Add", ["x", "r"], ["y"], name="add")]
    return make_model(nodes, [("x", [1, 4, 5, 5])], [("y", None)], inits)


# command line (after the model path), the other files it writes, the plot option and file
_PLOTTING = {
    "bench": (["bench", "{m}", "{m}", "--provider", "cpu", "--warmup", "0", "--iters", "2", "--json", "{d}/r.json",
               "--md", "{d}/r.md", "--plot", "{d}/r.png"], ["r.json", "r.md"], "--plot"),
    "analyze": (["analyze", "{m}", "--random", "2", "--json", "{d}/r.json", "--plot", "{d}/r.png"], ["r.json"],
                "--plot"),
    "explain": (["explain", "{m}", "--unit", "y:0,1,1", "--json", "{d}/r.json", "--png", "{d}/r.png"], ["r.json"],
                "--png"),
    "inspect": (["inspect", "{m}", "--schedule", "--plot", "{d}/r.png"], [], "--plot"),
}


def _plotting_command(command: str, tmp_path: Path, rng) -> list[str]:
    model = tmp_path / "residual.onnx"
    onnx.save(_residual_model(rng), model)
    return [arg.format(m=model, d=tmp_path) for arg in _PLOTTING[command][0]]


@pytest.mark.parametrize("command", list(_PLOTTING))
def test_without_matplotlib_everything_else_is_written_then_one_error(command, tmp_path, rng, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = _invoke(*_plotting_command(command, tmp_path, rng))
    _, others, option = _PLOTTING[command]
    assert result.exit_code == 2, (result.stdout, result.stderr)
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {option} needs matplotlib: pip install 'cnnc[plot]'"), line
    assert "Traceback" not in result.stderr and not (tmp_path / "r.png").exists()
    for name in others:
        assert (tmp_path / name).stat().st_size > 0 and str(tmp_path / name) in line
    if "r.json" in others:
        json.loads((tmp_path / "r.json").read_text())
    assert result.stdout.strip()  # the table / report was printed before the error


@pytest.mark.parametrize("command", list(_PLOTTING))
def test_with_matplotlib_every_plot_is_a_valid_png(command, tmp_path, rng):
    matplotlib_image = pytest.importorskip("matplotlib.image", reason="matplotlib is the optional 'plot' extra")
    result = _invoke(*_plotting_command(command, tmp_path, rng))
    assert result.exit_code == 0 and "error" not in result.stderr, (result.stdout, result.stderr)
    png = tmp_path / "r.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib_image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas
    for name in _PLOTTING[command][1]:
        assert (tmp_path / name).stat().st_size > 0


def test_cli_compile_of_a_model_no_pass_changes_is_proven_unchanged_without_a_run(tmp_path):
    # The API and the CLI take the same proof: the CLI's empty --inputs is no input, not "inputs given".
    model = oh.make_model(oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "g",
                                        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
                                        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])]),
                          opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "relu.onnx")
    result = CliRunner().invoke(cli, ["compile", str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "out.onnx"),
                                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    equivalence = json.loads((tmp_path / "r.json").read_text())["equivalence"]
    assert equivalence["passed"] and equivalence.get("unchanged") and equivalence["feeds"] == 0


def test_compile_format_triton_refuses_an_onnx_file_name_for_its_repository_folder(tmp_path):
    result = CliRunner().invoke(cli, ["compile", "--example", "linear-resnet34", "--format", "triton",
                                      "-o", str(tmp_path / "model.onnx")])
    assert result.exit_code == 2
    assert "writes a model repository folder: give -o a folder" in result.output
    assert not any(tmp_path.iterdir())
