"""Precision (issue 13, item 4): the tolerance follows each output's dtype, fp16 models compile and pass the check,
`to_fp16` keeps the ops that must stay float32, and `cnnc compile --precision fp16` verifies against the fp32
original (and refuses a graph float16 cannot hold)."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers import op_counts, text_model

import cnnc
from cnnc.cli import cli
from cnnc.errors import UsageError
from cnnc.io.precision import TOLERANCES, Tolerance, precision_tolerance, shape_computation_nodes, to_fp16
from cnnc.io.torch_module import from_torch
from cnnc.runtime.equivalence import check_equivalence, output_tolerance
from cnnc.zoo.batchnorm import calibrate_batchnorm
from cnnc.zoo.resnets import BasicBlock, ResNet

FLOAT16 = onnx.TensorProto.FLOAT16


def _scale(dtype: str, factor: float) -> onnx.ModelProto:
    """y = x * c, c = factor, in `dtype` (numpy's name) throughout."""
    text_type = {"float32": "float"}.get(dtype, dtype)  # ONNX text spells float32 `float`
    return text_model(f'''
        <ir_version: 8, opset_import: ["" : 17]>
        g ({text_type}[N, 64] x) => ({text_type}[N, 64] y) <{text_type}[1] c> {{
            y = Mul(x, c)
        }}''', c=np.array([factor], dtype=dtype))


def test_tolerance_per_dtype():
    assert precision_tolerance(np.float32) == Tolerance(1e-4, 1e-5, "float32")  # cnnc's original rule
    assert precision_tolerance("fp16") == precision_tolerance(np.float16) == Tolerance(2e-2, 2e-3, "float16")
    assert precision_tolerance(ml_dtypes.bfloat16).rtol == 5e-2
    assert precision_tolerance("float64").rtol < 1e-8
    for exact in (np.int64, np.int8, np.uint8, np.bool_):
        assert precision_tolerance(exact) == Tolerance(0.0, 0.0, np.dtype(exact).name)
    rtols = [TOLERANCES[name].rtol for name in ("float64", "float32", "float16", "bfloat16")]
    assert rtols == sorted(rtols)  # fewer mantissa bits, looser
    with pytest.raises(UsageError, match="give --rtol"):
        precision_tolerance(ml_dtypes.float8_e4m3fn)
    # The loosest dtype of reference, candidate and compute type decides; the user's values replace any of them.
    assert output_tolerance("float32", "float16").dtype == "float16"
    assert output_tolerance("float32", "float32", "float16").rtol == 2e-2
    assert output_tolerance("int64", "int64", "float16").rtol == 0.0  # integers stay exact
    assert output_tolerance("int64", "int64", rtol=0.5) == Tolerance(0.5, 0.0, "int64")
    assert output_tolerance("float16", "float16", rtol=1e-4, atol=1e-5) == Tolerance(1e-4, 1e-5, "float16")


def test_the_same_error_passes_in_float16_and_fails_in_float32():
    # A 0.5 % error (y = 1.005·x against y = x): a few float16 steps, fifty float32 tolerances.
    fp16 = check_equivalence(_scale("float16", 1.0), _scale("float16", 1.005))
    fp32 = check_equivalence(_scale("float32", 1.0), _scale("float32", 1.005))
    assert fp16.passed and not fp32.passed
    assert {out.dtype for out in fp16.outputs} == {"float16"} and fp16.outputs[0].rtol == 2e-2
    assert "(float16: rtol 0.02, atol 0.002)" in fp16.summary()
    assert "NOT equivalent" in fp32.summary() and "(float32: rtol 0.0001, atol 1e-05)" in fp32.summary()
    assert fp16.as_dict()["outputs"][0]["dtype"] == "float16" and fp16.as_dict()["tolerance"] == "per dtype"
    # The user's tolerance applies to every dtype: a float16 model at float32's rule fails.
    assert not check_equivalence(_scale("float16", 1.0), _scale("float16", 1.005), rtol=1e-4, atol=1e-5).passed
    # Twice the float16 tolerance fails in float16 too.
    assert not check_equivalence(_scale("float16", 1.0), _scale("float16", 1.05)).passed


def test_float16_inputs_are_drawn_in_float16_and_rounded_for_a_float32_reference():
    # rounding the input only; two models a user compares (`cnnc verify`) may differ in output type
    report = check_equivalence(_scale("float32", 1.0), _scale("float16", 1.0), dtype_change=True)
    assert report.passed and report.outputs[0].dtype == "float16"
    assert report.outputs[0].max_abs == 0.0  # both models saw the same (float16-rounded) values


def test_integer_outputs_are_compared_exactly():
    def argmax(op):
        return text_model(f'''
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N, 8] x) => (int64[N, 1] y) {{ y = {op} <axis = 1> (x) }}''')
    same = check_equivalence(argmax("ArgMax"), argmax("ArgMax"))
    assert same.passed and same.outputs[0].dtype == "int64" and same.outputs[0].rtol == 0
    assert not check_equivalence(argmax("ArgMax"), argmax("ArgMin")).passed


def _conv_net() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    return calibrate_batchnorm(net, (2, 3, 16, 16), seed=0, batches=1).eval(), torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def conv_net_path(tmp_path_factory):
    net, example = _conv_net()
    path = tmp_path_factory.mktemp("precision") / "net.onnx"
    onnx.save(from_torch(net, example), path)
    return path


def _elem_types(values) -> set[int]:
    return {value.type.tensor_type.elem_type for value in values}


def test_compile_precision_fp16_keeps_float32_io(conv_net_path, tmp_path):
    out, report_path = tmp_path / "fp16.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["compile", str(conv_net_path), "--precision", "fp16", "-o", str(out),
                                      "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    assert _elem_types(model.graph.input) == _elem_types(model.graph.output) == {onnx.TensorProto.FLOAT}
    assert {init.data_type for init in model.graph.initializer} == {FLOAT16}  # every weight, BN folded in float64
    assert op_counts(model) == {"Cast": 2, "Conv": 2, "Relu": 2, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    report = json.loads(report_path.read_text())
    equivalence = report["equivalence"]
    assert equivalence["passed"] and equivalence["compute_dtype"] == "float16"
    assert (equivalence["outputs"][0]["dtype"], equivalence["outputs"][0]["rtol"]) == ("float16", 2e-2)
    assert report["precision"] == {"precision": "fp16", "keep_io_types": True}
    assert "checked against the float32 original at float16's tolerance" in result.output
    assert "computed in float16" in result.output


def test_compile_precision_fp16_without_keep_io_types(conv_net_path):
    result = cnnc.compile(str(conv_net_path), precision="fp16", keep_io_types=False)
    model = result.model
    assert _elem_types(model.graph.input) == _elem_types(model.graph.output) == {FLOAT16}
    assert "Cast" not in op_counts(model) and op_counts(model)["Conv"] == 2
    assert result.report["equivalence"]["passed"] and result.report["after"]["size_bytes"] < \
        result.report["before"]["size_bytes"]
    with pytest.raises(UsageError, match="unknown precision"):
        cnnc.compile(str(conv_net_path), precision="int8")


@pytest.mark.parametrize("factor, flags, message", [
    (6e4, ["--no-keep-io-types"], "float16 holds no value beyond ±65504"),  # y = x·60000 overflows for |x| > 1.09
    (1e5, [], "initializer 'c' has values beyond float16's range ±65504: clamped"),  # a weight float16 cannot hold
], ids=["activation", "weight"])
def test_float16_overflow_is_refused_with_a_clear_message(tmp_path, factor, flags, message):
    path, out = tmp_path / "unsafe.onnx", tmp_path / "unsafe.fp16.onnx"
    onnx.save(_scale("float32", factor), path)
    result = CliRunner().invoke(cli, ["compile", str(path), "--passes", "fold-bn", "--precision", "fp16", *flags,
                                      "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "NOT equivalent" in result.output and message in result.output
    assert not out.exists()  # nothing written


def test_to_fp16_keeps_resize_reductions_and_shape_computations_in_float32():
    model = text_model('''
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2, 4, 4] x) => (float[1, 2, 8, 8] y, float[1, 2, 1, 1] m) <float[4] scales, float[1] two> {
            r = Resize <mode = "nearest"> (x, , scales)
            s = Shape(r)
            f = Cast <to = 1> (s)
            g2 = Mul(f, two)
            i = Cast <to = 7> (g2)
            big = Expand(r, s)
            y = Relu(big)
            m = ReduceMean <axes = [2, 3]> (x)
        }''', scales=np.array([1, 1, 2, 2], np.float32), two=np.array([2.0], np.float32))
    shape_nodes = {node.op_type for node in shape_computation_nodes(model.graph)}
    assert shape_nodes == {"Cast", "Mul"}  # the float arithmetic on a shape, not the Expand of activations
    converted = to_fp16(model)
    inits = {init.name: init.data_type for init in converted.graph.initializer}
    assert inits["scales"] == inits["two"] == onnx.TensorProto.FLOAT
    assert converted.ir_version == model.ir_version and converted.opset_import == model.opset_import
    before = op_counts(model)
    after = op_counts(converted)
    assert {op: n for op, n in after.items() if op != "Cast"} == {op: n for op, n in before.items() if op != "Cast"}
    report = check_equivalence(model, converted, compute_dtype="float16")
    assert report.passed, report.summary()
    notes: list[str] = []
    to_fp16(_scale("float32", 1e5), notes=notes)
    assert notes == ["initializer 'c' has values beyond float16's range ±65504: clamped"]


def test_fp16_resnet18_compiles_with_the_default_passes():
    # cnnc.zoo's ResNet-18 layout (2, 2, 2, 2 BasicBlocks), at a quarter of the width so that the test stays short.
    torch.manual_seed(0)
    net = calibrate_batchnorm(ResNet(BasicBlock, (2, 2, 2, 2), (16, 32, 64, 128), 3, 10), (2, 3, 32, 32), seed=0,
                              batches=1).eval()
    fp16 = to_fp16(from_torch(net, torch.randn(1, 3, 32, 32)), keep_io_types=False)
    assert _elem_types(fp16.graph.input) == {FLOAT16}
    result = cnnc.compile(fp16, strict=True)  # default passes; the check runs at float16's tolerance
    equivalence = result.report["equivalence"]
    assert equivalence["passed"] and equivalence["outputs"][0]["dtype"] == "float16", equivalence["summary"]
    assert result.report["before"]["ops"]["BatchNormalization"] == 20
    assert "BatchNormalization" not in op_counts(result.model)  # folded in float64, rounded once to float16
    floats = {init.data_type for init in result.model.graph.initializer} - {onnx.TensorProto.INT64}
    assert floats == {FLOAT16}  # fold-bn and collapse wrote the model's dtype, not float32
