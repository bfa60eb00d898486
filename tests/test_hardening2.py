"""Hardening, round two (issue 16, defects 1-6): one regression test per class of defect.

1. graph inputs shadowed by an initializer (IR >= 4) stay inputs with their default; IR < 4 keeps them constant;
2. the caller's ModelProto (and file) is read-only for every pass and the export;
3. OS errors on write are one `error: cannot write PATH: reason` line, exit 2, nothing left behind;
4. temporaries of a killed save are removed by the next save, which says so;
5. an input that fails the ONNX checker is blamed (by name) before any pass runs; input and output are checked
   at the same level;
6. a model newer than onnxruntime accepts is stamped down, and the report says so.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import TensorProto

import cnnc
from cnnc import ir
from cnnc.cli.app import cli
from cnnc.errors import ModelError
from cnnc.io import backend, jsonio, target
from cnnc.io.frontend import load_onnx
from cnnc.runtime.inputs import graph_inputs, make_input_batches
from cnnc.runtime.session import make_session


def _array(values, name: str) -> TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(values, np.float32), name)


def _model(nodes, inputs, outputs, initializers, ir_version=8, opset=17) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _info(name: str, shape, elem=TensorProto.FLOAT):
    return oh.make_tensor_value_info(name, elem, shape)


def _shadowed_model(rng, ir_version: int = 8) -> onnx.ModelProto:
    """y = Conv(x, W) + b, where `b` is a graph input whose initializer is only its default (IR >= 4)."""
    inputs = [_info("x", [1, 3, 8, 8]), _info("b", [1, 4, 1, 1])]
    initializers = [_array(rng.standard_normal((4, 3, 3, 3)), "W"), _array(np.full((1, 4, 1, 1), 0.5), "b")]
    if ir_version < 4:  # before IR 4 every initializer is listed among the inputs
        inputs.append(_info("W", [4, 3, 3, 3]))
    return _model([oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Add", ["c", "b"], ["y"])],
                  inputs, [_info("y", [1, 4, 8, 8])], initializers, ir_version=ir_version,
                  opset=17 if ir_version >= 4 else 9)


def _if_model(rng) -> onnx.ModelProto:
    """A constant-condition If whose taken branch is Conv+BN on outer-scope weights (graphsurgeon flattens it and
    renames the outer constants)."""
    then = oh.make_graph([oh.make_node("Conv", ["x", "c_W"], ["t1"], pads=[1, 1, 1, 1]),
                          oh.make_node("BatchNormalization", ["t1", "s", "bb", "mu", "var"], ["t_out"])],
                         "then", [], [_info("t_out", [1, 4, 8, 8])])
    other = oh.make_graph([oh.make_node("Conv", ["x", "c_W"], ["e_out"], pads=[1, 1, 1, 1])],
                          "else", [], [_info("e_out", [1, 4, 8, 8])])
    initializers = [onnx.numpy_helper.from_array(np.array(True), "cond"),
                    _array(rng.standard_normal((4, 3, 3, 3)), "c_W"), _array(rng.random(4) + 0.5, "s"),
                    _array(rng.random(4), "bb"), _array(rng.random(4), "mu"), _array(rng.random(4) + 0.5, "var")]
    return _model([oh.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                  [_info("x", [1, 3, 8, 8])], [_info("y", [1, 4, 8, 8])], initializers)


def _conv_bn_model(rng) -> onnx.ModelProto:
    initializers = [_array(rng.standard_normal((4, 3, 3, 3)), "W"), _array(rng.random(4) + 0.5, "s"),
                    _array(rng.random(4), "bb"), _array(rng.random(4), "mu"), _array(rng.random(4) + 0.5, "var")]
    return _model([oh.make_node("Conv", ["x", "W"], ["c"]),
                   oh.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["y"])],
                  [_info("x", [1, 3, 8, 8])], [_info("y", [1, 4, 6, 6])], initializers)


# 1. shadowed inputs ------------------------------------------------------------------------------------------------

def test_a_shadowed_input_stays_an_input_with_its_default(rng):
    model = _shadowed_model(rng)
    result = cnnc.compile(model)
    compiled = result.model
    assert [i.name for i in compiled.graph.input] == ["x", "b"]
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in compiled.graph.initializer}
    np.testing.assert_array_equal(defaults["b"], np.full((1, 4, 1, 1), 0.5, np.float32))
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    b = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    for feed in ({"x": x, "b": b}, {"x": x}):  # overridden, and the default
        want = make_session(model, "cpu", "disabled").run(None, feed)[0]
        got = make_session(compiled, "cpu", "disabled").run(None, feed)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_check_feeds_shadowed_inputs_random_values_and_their_default(rng):
    model = _shadowed_model(rng)
    specs = {spec.name: spec for spec in graph_inputs(model)}
    assert set(specs) == {"x", "b"} and specs["b"].has_default and not specs["x"].has_default
    feeds = make_input_batches(model, n=2)
    assert [sorted(feed) for feed in feeds] == [["b", "x"], ["b", "x"], ["x"]]


def test_before_ir4_initializers_listed_as_inputs_stay_constants(rng):
    model = _shadowed_model(rng, ir_version=3)
    assert [spec.name for spec in graph_inputs(model)] == ["x"]
    compiled = cnnc.compile(model).model
    assert [i.name for i in compiled.graph.input] == ["x"]
    assert [n.op_type for n in compiled.graph.node] == ["Conv"]  # the Add of a constant folded into the Conv


def test_a_shadowed_divisor_is_not_refused_as_a_constant_zero(rng):
    model = _model([oh.make_node("Div", ["x", "d"], ["y"])], [_info("x", [2, 3]), _info("d", [2, 3])],
                   [_info("y", [2, 3])], [_array(np.zeros((2, 3)), "d")])
    cnnc.compile(model)  # `d` is an input: 0 is only its default, never a constant a pass divides by


def test_import_model_makes_shadowed_initializers_variables(rng):
    graph = ir.import_model(_shadowed_model(rng))
    assert [t.name for t in graph.inputs] == ["x", "b"]
    assert isinstance(graph.inputs[1], gs.Variable) and ir.constant_value(graph.inputs[1]) is None


# 2. the caller's model is read-only --------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [_if_model, _shadowed_model, _conv_bn_model])
def test_compile_leaves_the_callers_proto_byte_identical(rng, build):
    model = build(rng)
    before = model.SerializeToString()
    result = cnnc.compile(model)
    assert result.report["equivalence"]["passed"]
    assert model.SerializeToString() == before


def test_the_constant_condition_if_around_conv_bn_compiles(rng):
    result = cnnc.compile(_if_model(rng))
    assert "If" not in {n.op_type for n in result.model.graph.node}
    assert "BatchNormalization" not in {n.op_type for n in result.model.graph.node}


def test_compile_leaves_a_model_with_external_data_untouched(tmp_path, rng):
    model = _if_model(rng)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=0)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    cnnc.compile(str(path)).save(tmp_path / "out.onnx")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in files} == files


def test_export_never_renames_the_imported_tensor_protos(rng):
    model = _conv_bn_model(rng)
    graph = gs.import_onnx(model)
    graph.tensors()["W"].name = "renamed"
    exported = backend.to_model(graph)
    assert "renamed" in {t.name for t in exported.graph.initializer}
    assert model.graph.initializer[0].name == "W"


# 3. OS errors on write ---------------------------------------------------------------------------------------------

def _compile_cli(source: Path, out: Path):
    return CliRunner().invoke(cli, ["compile", str(source), "-o", str(out)])


@pytest.fixture
def conv_file(tmp_path, rng) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(_conv_bn_model(rng), path)
    return path


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_an_os_error_on_save_is_one_line_exit_2_and_the_old_file_stays(tmp_path, conv_file, monkeypatch, code):
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    monkeypatch.setattr(backend, "_fsync_file", _fail_with(code))
    result = _compile_cli(conv_file, out)
    assert result.exit_code == 2, result.output
    assert _error_lines(result) == [f"error: cannot write {out}: {os.strerror(code)}"]
    assert out.read_bytes() == b"previous" and sorted(os.listdir(out.parent)) == ["model.onnx"]


def test_an_unwritable_folder_is_one_line_exit_2(tmp_path, conv_file, monkeypatch):
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    monkeypatch.setattr(os, "mkdir", _fail_with(errno.EACCES))  # root ignores chmod: refuse the staging folder
    result = _compile_cli(conv_file, out)
    assert result.exit_code == 2 and _error_lines(result) == [f"error: cannot write {out}: Permission denied"]
    assert os.listdir(out.parent) == []


def test_a_250_byte_name_is_written_and_a_256_byte_one_refused_cleanly(tmp_path, conv_file):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    long_ok = out_dir / ("a" * 245 + ".onnx")
    assert _compile_cli(conv_file, long_ok).exit_code == 0 and long_ok.is_file()
    too_long = out_dir / ("b" * 251 + ".onnx")
    result = _compile_cli(conv_file, too_long)
    assert result.exit_code == 2 and _error_lines(result) == [f"error: cannot write {too_long}: File name too long"]
    assert os.listdir(out_dir) == [long_ok.name]


def test_reports_use_the_same_short_temporary_name(tmp_path):
    target = tmp_path / ("r" * 250)
    jsonio.write_text(target, "hello")
    assert target.read_text() == "hello" and os.listdir(tmp_path) == [target.name]


# 4. stale temporaries ----------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_save_removes_temporaries_of_dead_processes_and_says_so(tmp_path, rng):
    dead = tmp_path / f".cnnc-{_dead_pid()}-0123abcd.tmp"
    dead.mkdir()
    (dead / "m.onnx").write_bytes(b"x" * 1000)
    live = tmp_path / f".cnnc-{os.getpid()}-89abcdef.tmp"  # this very process: a save in progress
    live.write_bytes(b"y")
    result = cnnc.compile(_conv_bn_model(rng))
    result.save(tmp_path / "m.onnx")
    assert not dead.exists() and live.exists()
    assert any(str(dead) in note and "removed" in note for note in result.report["notes"])


def test_the_cli_prints_the_removed_temporary(tmp_path, conv_file):
    dead = tmp_path / f".cnnc-{_dead_pid()}-0123abcd.tmp"
    dead.write_bytes(b"half a model")
    result = _compile_cli(conv_file, tmp_path / "out.onnx")
    assert result.exit_code == 0 and not dead.exists()
    assert f"note: removed {dead}" in result.output


# 5. blame the right file -------------------------------------------------------------------------------------------

def _bf16_conv(tmp_path) -> Path:
    weight = oh.make_tensor("W", TensorProto.BFLOAT16, [4, 3, 3, 3], np.zeros(108, np.uint16).tobytes(), raw=True)
    model = _model([oh.make_node("Conv", ["x", "W"], ["y"])], [_info("x", [1, 3, 8, 8], TensorProto.BFLOAT16)],
                   [_info("y", [1, 4, 6, 6], TensorProto.BFLOAT16)], [weight])
    path = tmp_path / "bf16.onnx"
    onnx.save(model, path)
    return path


def test_an_input_failing_the_checker_is_named_before_any_pass(tmp_path):
    path = _bf16_conv(tmp_path)
    with pytest.raises(ModelError, match=f"input model {path} fails the ONNX checker"):
        load_onnx(path)
    result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and "emitted" not in result.output
    assert _error_lines(result)[0].startswith(f"error: input model {path} fails the ONNX checker")


def test_an_output_is_checked_at_the_level_its_input_passes():
    """MeanVarianceNormalization's function body fails onnx's strict inference (an onnx limitation): the input
    passes the plain checker, and so must the untouched output."""
    model = _model([oh.make_node("MeanVarianceNormalization", ["x"], ["y"])], [_info("x", [3, 3, 3, 1])],
                   [_info("y", [3, 3, 3, 1])], [], ir_version=7, opset=13)
    assert cnnc.compile(model).report["equivalence"]["passed"]


# 6. newer IR version than onnxruntime accepts ----------------------------------------------------------------------

def test_a_too_new_ir_version_is_stamped_down_and_the_report_says_so(tmp_path):
    model = _model([oh.make_node("Relu", ["x"], ["y"])], [_info("x", [1, 3])], [_info("y", [1, 3])], [],
                   ir_version=target.max_ir_version() + 1)
    result = cnnc.compile(model)
    assert result.model.ir_version == target.max_ir_version()
    assert any(f"IR version {model.ir_version}" in note for note in result.report["notes"])
    path = tmp_path / "new.onnx"
    onnx.save(model, path)
    cli_result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "o.onnx")])
    assert cli_result.exit_code == 0 and f"note: the model's IR version {model.ir_version}" in cli_result.output
