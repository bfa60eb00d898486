"""Deployment formats (cnnc.export, `cnnc export`, `cnnc compile --format`): every export proven on its runtime,
nothing written on a mismatch or a missing runtime, Triton's config parsed into its own ModelConfig."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cnnc.cli.app import cli
from cnnc.errors import EquivalenceError
from cnnc.export import ExportOptions, export_model
from cnnc.export import triton as triton_export
from cnnc.io import backend
from cnnc.io.frontend import from_torch
from cnnc.runtime.bench import bench_models
from cnnc.runtime.equivalence import check_equivalence
from cnnc.zoo import build_example
from cnnc.zoo.exports import export_zoo_model

FORMATS_HERE = {"onnx": "m.onnx", "onnx-fp16": "m16.onnx", "openvino": "m.xml", "triton": "repo"}


@pytest.fixture(scope="module")
def linear_resnet34(tmp_path_factory) -> Path:
    module, example_input = build_example("linear-resnet34")
    path = tmp_path_factory.mktemp("lr34") / "lr34.onnx"
    backend.save(backend.target.runnable(from_torch(module, example_input)), path)
    return path


ZOO_SIZE = 16  # px: builds, exports and proofs cost less than at 32 px; the verdicts below hold at 16, 32 and 64 px


def _zoo(name: str) -> Path:
    return export_zoo_model(name, "torchscript17", ZOO_SIZE, "fp32")  # cached for the session (conftest)


def _export_all(source: Path, folder: Path, formats=tuple(FORMATS_HERE), n: int = 2) -> dict:
    results = {}
    for format_name in formats:
        results[format_name] = export_model(source, format_name, folder / FORMATS_HERE[format_name],
                                            ExportOptions(batches=(1, 8)), check={"n": n})
    return results


def _assert_proven(results: dict, folder: Path, name: str) -> None:
    for format_name, result in results.items():
        assert all(proof["passed"] for proof in result.report["proofs"].values()), format_name
        assert all(Path(p).is_file() for p in result.written), format_name
    if "onnx-fp16" not in results:
        return
    assert results["onnx-fp16"].report["proofs"]["onnxruntime CPU"]["compute_dtype"] == "float16"
    assert "OpenVINO CPU" in results["openvino"].report["proofs"]
    assert (folder / "m.bin").is_file()
    assert (folder / "repo" / name / "1" / "model.onnx").is_file()
    fp16 = onnx.load(folder / "m16.onnx")
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in fp16.graph.initializer)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep-io-types
    assert not [p for p in folder.rglob(".cnnc-*")]  # no staging folder left


def test_linear_resnet34_exports_to_every_format_here(linear_resnet34, tmp_path):
    results = _export_all(linear_resnet34, tmp_path)
    _assert_proven(results, tmp_path, "lr34")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobileone_s0"])
def test_zoo_models_export_to_every_format_here(name, tmp_path):
    # fp16 included: the zoo's calibration (cnnc.zoo.branch_damping) keeps these random nets conditioned like
    # trained ones (before it, MobileNetV2 and MobileOne-S0 drifted by 3-16 % in float16 and were refused). The
    # exports of their compiled forms are proven in bench/formats.py (compiling MobileOne-S0 costs ~10 s here).
    source = _zoo(name)
    results = _export_all(source, tmp_path, n=1)
    _assert_proven(results, tmp_path, source.name.split(".")[0])
    fp16_error = max(out["max_rel"] for out in results["onnx-fp16"].report["proofs"]["onnxruntime CPU"]["outputs"])
    assert 0 < fp16_error < 2e-2  # rounded to float16 (not the float32 model), within float16's tolerance


def _weights_rounded_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 model with every float32 initializer rounded to float16 and back: float32 compute."""
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for init in rounded.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            values = onnx.numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    return rounded


# y = x·1000.3 − x·1000: the two branches cancel to 0.3·x, but float16 holds 1000.3 as 1000.5 (its step is 0.5
# there), so the converted model computes 0.5·x: 67 % off, a network float16 cannot represent.
CANCELLING = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 1, 4, 4] x) => (float[N, 1, 4, 4] y)
<float[1, 1, 1, 1] w1 = {1000.3}, float[1, 1, 1, 1] w2 = {1000.0}>
{ a = Conv(x, w1)  b = Conv(x, w2)  y = Sub(a, b) }"""


def test_fp16_beyond_tolerance_is_refused(tmp_path):
    source = onnx.parser.parse_model(CANCELLING)
    with pytest.raises(EquivalenceError, match="nothing written") as refused:
        export_model(source, "onnx-fp16", tmp_path / "m16.onnx", check={"n": 1})
    assert list(tmp_path.iterdir()) == []
    converted_err = max(out["max_rel"] for out in refused.value.report["proofs"]["onnxruntime CPU"]["outputs"])
    assert converted_err == pytest.approx(0.2 / 0.3, rel=1e-2)
    # The drift is the weights' rounding, not the converter: the float32 model with only its weights rounded to
    # float16 (float32 compute) drifts as far.
    rounded = check_equivalence(source, _weights_rounded_to_fp16(source), n=1, compute_dtype="float16")
    assert not rounded.passed and max(out.max_rel for out in rounded.outputs) == pytest.approx(converted_err, rel=1e-2)
    # The same function without the cancellation (y = 0.3·x in one conv) exports.
    direct = onnx.parser.parse_model(CANCELLING.replace("{1000.3}", "{0.3}").replace(
        "a = Conv(x, w1)  b = Conv(x, w2)  y = Sub(a, b)", "y = Conv(x, w1)").replace(
        ", float[1, 1, 1, 1] w2 = {1000.0}", ""))
    assert export_model(direct, "onnx-fp16", tmp_path / "d16.onnx", check={"n": 1}).report["proofs"][
        "onnxruntime CPU"]["passed"]


def test_fp16_activations_beyond_range_are_noted(tmp_path):
    # onnxruntime's CPU provider runs Conv in float32 behind Casts, so the proof passes although 'u' (up to 9e4 on
    # U[0, 1) inputs, more on N(0, 1)) would be inf on a float16 runtime: the export says so.
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 1, 4, 4] x) => (float[N, 1, 4, 4] y)
    <float[1, 1, 1, 1] w1 = {300.0}, float[1, 1, 1, 1] w2 = {300.0}, float[1, 1, 1, 1] w3 = {0.001}>
    { t = Conv(x, w1)  u = Conv(t, w2)  y = Conv(u, w3) }"""
    model = onnx.parser.parse_model(text)
    result = export_model(model, "onnx-fp16", tmp_path / "m16.onnx")
    assert result.report["proofs"]["onnxruntime CPU"]["passed"]
    overflow = [note for note in result.report["notes"] if "exceed ±65504" in note]
    assert len(overflow) == 1 and "'u'" in overflow[0] and "1 float16 tensor(s)" in overflow[0]
    # Scaled down by 10, every tensor fits: no note.
    small = onnx.parser.parse_model(text.replace("{300.0}", "{30.0}"))
    assert not export_model(small, "onnx-fp16", tmp_path / "s16.onnx").report["notes"]


def test_triton_config_parses_into_model_config(linear_resnet34, tmp_path):
    export_model(linear_resnet34, "triton", tmp_path / "repo",
                 ExportOptions(name="lr", batches=(2, 8), tensorrt_fp16=True))
    config = triton_export.parse_config((tmp_path / "repo" / "lr" / "config.pbtxt").read_text())
    assert config.name == "lr" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [i.name for i in config.input] == ["input"] and list(config.input[0].dims) == [1, 28, 28]
    assert config.input[0].data_type == config.input[0].data_type.__class__(1) or config.input[0].data_type == 11
    assert [o.name for o in config.output] == ["output"] and list(config.output[0].dims) == [10]
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 8]
    assert config.instance_group[0].count == 1
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"


def test_triton_static_batch_lists_full_dims(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[1, 3] x) => (float[1, 3] y) { y = Relu(x) }"""
    model = onnx.parser.parse_model(text)
    config = triton_export.parse_config(triton_export.config_text(model, "static", [4]))
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 3]
    assert not config.HasField("dynamic_batching")


def test_bad_config_field_is_refused():
    with pytest.raises(Exception, match="ModelConfig"):
        triton_export.parse_config('name: "x"\nplatfrm: "onnxruntime_onnx"\n')


def _corrupting(real):
    def convert(*args, **kwargs):
        converted = real(*args, **kwargs)
        weight = max(converted.get_ops(), key=lambda op: op.get_output_size() if op.get_type_name() == "Constant"
                     else 0)
        values = weight.get_data()
        values[...] += 1.0  # a real conversion bug moves outputs by O(1)
        return converted
    return convert


def test_mismatching_openvino_export_exits_1_and_writes_nothing(linear_resnet34, tmp_path, monkeypatch):
    import openvino
    constants = []

    def corrupt(*args, **kwargs):
        converted = real(*args, **kwargs)
        for op in converted.get_ordered_ops():
            if op.get_type_name() == "Constant" and op.get_output_element_type(0).to_dtype() == np.float32:
                constants.append(op)
        big = max(constants, key=lambda op: int(np.prod(list(op.get_output_shape(0)))))
        replacement = openvino.opset13.constant(big.get_data() + 1.0)
        for target in list(big.output(0).get_target_inputs()):
            target.replace_source_output(replacement.output(0))
        return converted
    real = openvino.convert_model
    monkeypatch.setattr(openvino, "convert_model", corrupt)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(cli, ["export", str(linear_resnet34), "--format", "openvino", "-o",
                                      str(out / "bad.xml")])
    assert result.exit_code == 1, result.output
    assert "NOT equivalent" in result.output and "nothing written" in result.output
    assert list(out.iterdir()) == []


def test_mismatching_fp16_export_exits_1_and_writes_nothing(linear_resnet34, tmp_path, monkeypatch):
    from cnnc.export import onnx_formats
    real = onnx_formats.to_fp16

    def corrupt(model, **kwargs):
        converted = real(model, **kwargs)
        big = max(converted.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        values = onnx.numpy_helper.to_array(big) + np.float16(1.0)
        big.CopyFrom(onnx.numpy_helper.from_array(values.astype(values.dtype), big.name))
        return converted
    monkeypatch.setattr(onnx_formats, "to_fp16", corrupt)
    result = CliRunner().invoke(cli, ["export", str(linear_resnet34), "--format", "onnx-fp16", "-o",
                                      str(tmp_path / "bad.onnx")])
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("format_name, module, hint", [("openvino", "openvino", "cnnc[openvino]"),
                                                       ("triton", "tritonclient", "cnnc[triton]")])
def test_missing_runtime_exits_2_with_the_hint(linear_resnet34, tmp_path, monkeypatch, format_name, module, hint):
    real_import = builtins.__import__

    def no_module(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_module)
    out = tmp_path / ("m.xml" if format_name == "openvino" else "repo")
    result = CliRunner().invoke(cli, ["export", str(linear_resnet34), "--format", format_name, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert hint in result.output
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_refuses_cleanly_without_gpu(linear_resnet34, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is for machines without one (see test_tensorrt_engine)")
    result = CliRunner().invoke(cli, ["export", str(linear_resnet34), "--format", "tensorrt", "-o",
                                      str(tmp_path / "m.engine")])
    assert result.exit_code == 2 and "CUDA device" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_tensorrt_engine(linear_resnet34, tmp_path):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("tensorrt needs a CUDA device; none here")
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (pip install 'cnnc[tensorrt]')")
    result = export_model(linear_resnet34, "tensorrt", tmp_path / "m.engine", ExportOptions(batches=(1, 8)))
    assert result.report["proofs"]["TensorRT"]["passed"] and (tmp_path / "m.engine").stat().st_size > 0


def test_compile_format_and_bench_of_artefacts(linear_resnet34, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["compile", "--example", "linear-resnet34", "--passes", "fold-bn", "--format",
                                 "openvino", "-o", str(tmp_path / "lr.xml")])
    assert result.exit_code == 0, result.output
    assert "check (openvino on OpenVINO CPU): equivalent" in result.output
    result = runner.invoke(cli, ["export", str(linear_resnet34), "--format", "triton", "-o", str(tmp_path / "repo")])
    assert result.exit_code == 0 and "check (triton on onnxruntime CPU): equivalent" in result.output, result.output
    report = bench_models([str(tmp_path / "repo"), str(tmp_path / "lr.xml")], ["ort", "ov"], batch=[2], iters=3,
                          warmup=1, provider="cpu")
    rows = report["comparisons"][0]["models"]
    assert [row["provider"] for row in rows] == ["CPUExecutionProvider", "OpenVINO CPU"]
    assert rows[1]["inputs"]["input"]["shape"][0] == 2 and rows[1]["ratio_to_first"]["ratio"] > 0
