"""Bad input (README, "Untrusted models") through the CLI: one `error:` line on stderr, exit code 2, no traceback, nothing at -o.

Each case is a file a user (or an attacker) could hand to `cnnc compile`. Every test also checks the error line
names the actual reason, so that a case cannot pass because of an unrelated failure (a broken fixture, say).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime
import pytest
from click.testing import CliRunner
from helpers import make_model, run_model

from cnnc.cli import cli
from cnnc.errors import ModelError
from cnnc.io import target
from cnnc.io.frontend import load_onnx

WEIGHT = np.arange(6, dtype=np.float32).reshape(2, 3) / 7.0


def _matmul_model(ir_version: int = 8, opset: int = 17) -> onnx.ModelProto:
    """y = x @ W: the smallest model with one initializer, for the external-data cases."""
    return make_model([oh.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], [("x", ["N", 2])],
                      [("y", ["N", 3])], [("W", WEIGHT)], opset=opset, ir_version=ir_version)


def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    return make_model([oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                       oh.make_node("Relu", ["c"], ["y"], name="relu")],
                      [("x", ["N", 3, 6, 5])], [("y", None)], [("W", w)])


def _folder_listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _assert_refused(tmp_path: Path, model_path: Path, *extra: str, reason: str | None = None,
                    exit_code: int = 2) -> str:
    """Compile `model_path` into an empty folder; assert the bad-input contract and return the error line."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "compiled.onnx"
    before = _folder_listing(out_dir)
    result = CliRunner().invoke(cli, ["compile", str(model_path), "-o", str(out), *extra])
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert not out.exists()
    assert _folder_listing(out_dir) == before, "temporary files left in the output folder"
    if reason is not None:
        assert reason in lines[0], lines[0]
    return lines[0]


def test_the_valid_fixture_models_compile(tmp_path):
    # Guards the negative tests below: their base models are fine, so a refusal is due to the one defect added.
    for name, model in (("matmul.onnx", _matmul_model()), ("conv.onnx", _conv_model())):
        onnx.save(model, tmp_path / name)
        result = CliRunner().invoke(cli, ["compile", str(tmp_path / name), "-o", str(tmp_path / f"out_{name}")])
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / f"out_{name}").is_file()


# --- unreadable files ----------------------------------------------------------------------------------------------

def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _assert_refused(tmp_path, path, reason="empty")


def test_truncated_model(tmp_path):
    data = _conv_model().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    _assert_refused(tmp_path, path, reason="not a valid ONNX model")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path, seed):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_refused(tmp_path, path)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_named_onnx(tmp_path, protocol):
    # A pickle that would run code if unpickled: cnnc must refuse it without ever calling pickle.
    path = tmp_path / "evil.onnx"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0], "note": "not a model"}, protocol=protocol))
    _assert_refused(tmp_path, path)


def test_zip_named_onnx(tmp_path):
    path = tmp_path / "archive.onnx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    _assert_refused(tmp_path, path, reason="zip")


def test_missing_file(tmp_path):
    _assert_refused(tmp_path, tmp_path / "nope.onnx", reason="does not exist")


# --- malformed graphs ----------------------------------------------------------------------------------------------

def test_graph_with_a_cycle(tmp_path):
    nodes = [oh.make_node("Add", ["x", "b"], ["a"], name="add"), oh.make_node("Relu", ["a"], ["b"], name="relu")]
    model = make_model(nodes, [("x", [1, 4])], [("b", [1, 4])])
    path = tmp_path / "cycle.onnx"
    onnx.save(model, path)
    _assert_refused(tmp_path, path, reason="cycle")


def test_dangling_input_name(tmp_path):
    model = make_model([oh.make_node("Add", ["x", "nowhere"], ["y"], name="add")], [("x", [1, 4])], [("y", [1, 4])])
    path = tmp_path / "dangling.onnx"
    onnx.save(model, path)
    _assert_refused(tmp_path, path, reason="nowhere")


@pytest.mark.parametrize("where", ["two node outputs", "initializer and node output"])
def test_duplicate_tensor_name(tmp_path, where):
    if where == "two node outputs":
        nodes = [oh.make_node("Relu", ["x"], ["t"], name="r1"), oh.make_node("Neg", ["x"], ["t"], name="r2"),
                 oh.make_node("Identity", ["t"], ["y"], name="id")]
        inits = []
    else:
        nodes = [oh.make_node("Relu", ["x"], ["t"], name="r1"), oh.make_node("Identity", ["t"], ["y"], name="id")]
        inits = [("t", np.ones((1, 4), np.float32))]
    model = make_model(nodes, [("x", [1, 4])], [("y", [1, 4])], inits)
    path = tmp_path / "duplicate.onnx"
    onnx.save(model, path)
    _assert_refused(tmp_path, path, reason="duplicate tensor name 't'")


def test_ir_version_newer_than_onnx_supports(tmp_path):
    path = tmp_path / "future_ir.onnx"
    onnx.save(_matmul_model(ir_version=onnx.IR_VERSION + 1), path)
    _assert_refused(tmp_path, path, reason="IR version")


def test_opset_newer_than_onnxruntime_supports(tmp_path):
    path = tmp_path / "future_opset.onnx"
    onnx.save(_matmul_model(ir_version=target.max_ir_version(), opset=target.max_opset() + 1), path)
    _assert_refused(tmp_path, path, reason="opset")


def test_loading_a_model_opens_no_onnxruntime_session(tmp_path, monkeypatch):
    """Reading and validating a file runs nothing: the versions onnxruntime accepts come from target's table."""
    path, future = tmp_path / "m.onnx", tmp_path / "future.onnx"
    onnx.save(_conv_model(), path)
    onnx.save(_matmul_model(opset=target.max_opset_without_probe() + 1), future)

    def refuse(*args, **kwargs):
        raise AssertionError("loading a model created an onnxruntime.InferenceSession")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    target._limits.cache_clear()
    try:
        assert load_onnx(path).graph.node[0].op_type == "Conv"
        with pytest.raises(ModelError, match="opset"):
            load_onnx(future)
    finally:
        target._limits.cache_clear()


def test_the_version_table_matches_what_onnxruntime_accepts():
    """The table row of the installed onnxruntime (if any) is what the probe measures: a stale row fails here."""
    if target._known_limits() is None:
        pytest.skip(f"onnxruntime {onnxruntime.__version__} is not in target.KNOWN_LIMITS: the probe is used")
    assert target._known_limits() == target._probe_limits()


# --- external data -------------------------------------------------------------------------------------------------

def _external_model(folder: Path, location: str, **entries: str) -> Path:
    """Save the MatMul model into `folder` with W pointing at external data `location` (entries as given)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = _matmul_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path


def _weight_file(path: Path, prefix: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(prefix + WEIGHT.tobytes())
    return path


def test_valid_external_data_fixture_compiles(tmp_path):
    folder = tmp_path / "model"
    _weight_file(folder / "weights" / "w.bin", prefix=b"\0" * 8)
    path = _external_model(folder, "weights/w.bin", offset="8", length=str(WEIGHT.nbytes))
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(onnx.load(out).graph.initializer[0]), WEIGHT)


def test_external_data_absolute_location(tmp_path):
    folder = tmp_path / "model"
    data = _weight_file(folder / "w.bin")  # even inside the folder, an absolute location is refused
    _assert_refused(tmp_path, _external_model(folder, str(data.resolve())), reason="absolute")


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../w.bin", "..\\secret.bin"])
def test_external_data_location_with_dotdot(tmp_path, location):
    folder = tmp_path / "model"
    _weight_file(tmp_path / "secret.bin")
    _weight_file(folder / "w.bin")
    (folder / "sub").mkdir()
    _assert_refused(tmp_path, _external_model(folder, location), reason="'..'")


def test_external_data_symlink_out_of_the_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = _weight_file(tmp_path / "secret.bin")
    (folder / "w.bin").symlink_to(secret)
    _assert_refused(tmp_path, _external_model(folder, "w.bin"), reason="symlink")


def test_external_data_symlink_whose_name_has_a_backslash(tmp_path):
    # On POSIX `a\\w.bin` is one file name; splitting it at the backslash would check `a/w.bin` instead.
    folder = tmp_path / "model"
    _weight_file(folder / "real.bin")
    (folder / "a\\w.bin").symlink_to("real.bin")
    _assert_refused(tmp_path, _external_model(folder, "a\\w.bin"), reason="symlink")


def test_external_data_under_a_symlinked_parent_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    _weight_file(tmp_path / "elsewhere" / "w.bin")
    (folder / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _assert_refused(tmp_path, _external_model(folder, "sub/w.bin"), reason="symlink")


def test_external_data_hardlink(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = _weight_file(tmp_path / "secret.bin")
    os.link(secret, folder / "w.bin")
    _assert_refused(tmp_path, _external_model(folder, "w.bin"), reason="hardlink")


@pytest.mark.parametrize("entries, reason", [
    ({"offset": "-4"}, "negative"),
    ({"length": "-24"}, "negative"),
    ({"offset": "abc"}, "not an integer"),
    ({"offset": "1e2"}, "not an integer"),
    ({"length": "twenty"}, "not an integer"),
    ({"offset": "32", "length": "24"}, "past the end"),
    ({"offset": "16", "length": "24"}, "past the end"),
    ({"offset": "0", "length": "40"}, "past the end"),
    ({"length": "8"}, "does not match"),
    ({"length": "28"}, "does not match"),
    ({"sha1": "deadbeef"}, "unknown keys"),
])
def test_external_data_bad_offset_length_or_key(tmp_path, entries, reason):
    folder = tmp_path / "model"
    _weight_file(folder / "w.bin", prefix=b"\0" * 4)  # 28 bytes: 4 of padding, then the 24 of W
    _assert_refused(tmp_path, _external_model(folder, "w.bin", **entries), reason=reason)


def test_external_data_file_missing(tmp_path):
    _assert_refused(tmp_path, _external_model(tmp_path / "model", "absent.bin"), reason="does not exist")


# --- PyTorch files -------------------------------------------------------------------------------------------------

FACTORY_SOURCE = '''
import torch


def build():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
'''


@pytest.fixture
def net_factory(tmp_path, monkeypatch):
    """A `--module` factory importable by the CLI, written for this test only."""
    folder = tmp_path / "factory"
    folder.mkdir()
    (folder / "cnnc_bad_input_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    return "cnnc_bad_input_factory:build"


def test_state_dict_fixture_compiles(tmp_path, net_factory):
    import cnnc_bad_input_factory
    import torch

    path = tmp_path / "weights.pt"
    torch.save(cnnc_bad_input_factory.build().state_dict(), path)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(cli, ["compile", str(path), "--module", net_factory, "--input-shape",
                                      "input:1,3,6,5", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert out.is_file()


def test_pickled_module_pt_is_refused(tmp_path, net_factory):
    import cnnc_bad_input_factory
    import torch

    path = tmp_path / "module.pt"
    torch.save(cnnc_bad_input_factory.build(), path)  # the whole module: only loadable by full unpickling
    line = _assert_refused(tmp_path, path, "--module", net_factory, "--input-shape", "input:1,3,6,5",
                           reason="weights_only")
    # torch's message names the class it refused; its colour codes and retry-unsafely advice are dropped.
    assert "Sequential" in line and "\x1b" not in line and "weights_only=False" not in line


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # scripting is how such a file is made
def test_torchscript_archive_is_refused(tmp_path, net_factory):
    import cnnc_bad_input_factory
    import torch

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(cnnc_bad_input_factory.build().eval()), str(path))
    _assert_refused(tmp_path, path, "--module", net_factory, "--input-shape", "input:1,3,6,5",
                    reason="TorchScript")


def test_state_dict_of_another_network_is_refused(tmp_path, net_factory):
    import torch

    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    _assert_refused(tmp_path, path, "--module", net_factory, "--input-shape", "input:1,3,6,5",
                    reason="does not fit the module")


def test_state_dict_without_module_is_a_usage_error(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"irrelevant")
    _assert_refused(tmp_path, path, reason="--module")


# --- pass-through and in-place output ------------------------------------------------------------------------------

def test_custom_domain_op_passes_through_untouched(tmp_path):
    nodes = [oh.make_node("Relu", ["x"], ["r"], name="relu"),
             oh.make_node("MyOp", ["r"], ["y"], name="custom", domain="com.example", alpha=2.5, mode="fast")]
    model = make_model(nodes, [("x", [1, 4])], [("y", [1, 4])])
    model.opset_import.append(oh.make_opsetid("com.example", 3))
    path, out = tmp_path / "custom.onnx", tmp_path / "custom_out.onnx"
    onnx.save(model, path)
    # onnxruntime cannot run an unknown op, so the check is skipped; the default passes still run over the graph.
    result = CliRunner().invoke(cli, ["compile", str(path), "--no-check", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    compiled = onnx.load(out)
    custom = [node for node in compiled.graph.node if node.domain == "com.example"]
    assert len(custom) == 1
    assert custom[0] == model.graph.node[1]  # op, domain, inputs, outputs, name and attributes all unchanged
    assert {(o.domain, o.version) for o in compiled.opset_import} >= {("com.example", 3)}


def test_output_equal_to_a_bad_input_leaves_it_intact(tmp_path):
    nodes = [oh.make_node("Add", ["x", "b"], ["a"], name="add"), oh.make_node("Relu", ["a"], ["b"], name="relu")]
    path = tmp_path / "cycle.onnx"
    onnx.save(make_model(nodes, [("x", [1, 4])], [("b", [1, 4])]), path)
    original = path.read_bytes()
    result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(path)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert path.read_bytes() == original
    assert _folder_listing(tmp_path) == ["cycle.onnx"]


def test_output_equal_to_input_is_intact_when_the_run_fails_later(tmp_path):
    # The model loads fine; the failure (an unreadable --inputs file) comes after loading, before writing.
    path = tmp_path / "model.onnx"
    onnx.save(_conv_model(), path)
    original = path.read_bytes()
    result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(path), "--inputs",
                                      f"x:{tmp_path / 'missing.npy'}"])
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert path.read_bytes() == original
    assert _folder_listing(tmp_path) == ["model.onnx"]


def test_output_equal_to_input_is_replaced_on_success(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_conv_model(), path)
    result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(path)])
    assert result.exit_code == 0, result.stderr
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert _folder_listing(tmp_path) == ["model.onnx"]


# --- structure limits ----------------------------------------------------------------------------------------------

def _nested_if_model(depth: int) -> onnx.ModelProto:
    """`depth` Ifs nested in each other's then-branch; the innermost branch reads the outer `x`."""
    def branch(level: int, name: str) -> onnx.GraphProto:
        out = f"{name}_out"
        if level == 0:
            nodes = [oh.make_node("Identity", ["x"], [out])]
        else:
            nodes = [oh.make_node("If", ["cond"], [out], then_branch=branch(level - 1, name + "t"),
                                  else_branch=branch(0, name + "e"))]
        return oh.make_graph(nodes, name, [], [oh.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [1, 4])])

    root = oh.make_node("If", ["cond"], ["y"], then_branch=branch(depth - 1, "b"), else_branch=branch(0, "e"))
    graph = oh.make_graph([root], "nested", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
                                             oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_subgraphs_nested_deeper_than_the_limit(tmp_path):
    from cnnc.io.validate import MAX_SUBGRAPH_DEPTH, validate_model

    validate_model(_nested_if_model(MAX_SUBGRAPH_DEPTH))  # at the limit: accepted
    path = tmp_path / "nested.onnx"
    onnx.save(_nested_if_model(MAX_SUBGRAPH_DEPTH + 1), path)
    _assert_refused(tmp_path, path, reason="nested deeper")


def _huge_initializer_model() -> onnx.ModelProto:
    # 10^12 declared elements, 16 bytes of data: the declaration alone must be refused.
    weight = onnx.TensorProto(name="W", data_type=onnx.TensorProto.FLOAT, dims=[10**6, 10**6], raw_data=b"\0" * 16)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], "huge",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 10**6])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10**6])], initializer=[weight])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("case, reason", [
    ("rank 40", "rank 40"),
    ("dims 10^12 x 10^12", "elements"),
    ("dim 2^62", "elements"),
    ("initializer of 10^12 elements", "elements"),
])
def test_huge_declared_ranks_or_dims(tmp_path, case, reason):
    relu = [oh.make_node("Relu", ["x"], ["y"], name="relu")]
    shape = {"rank 40": [1] * 40, "dims 10^12 x 10^12": [1, 3, 10**12, 10**12], "dim 2^62": ["N", 3, 2**62, 8]}
    model = _huge_initializer_model() if case.startswith("initializer") else make_model(
        relu, [("x", shape[case])], [("y", shape[case])])
    path = tmp_path / "huge.onnx"
    onnx.save(model, path)
    _assert_refused(tmp_path, path, reason=reason)


# --- numbers a pass would divide by --------------------------------------------------------------------------------

def _conv_bn_model(parameter: str, value: float) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    params = {"scale": np.ones(4), "bias": np.zeros(4), "mean": np.zeros(4), "var": np.ones(4)}
    params[parameter] = params[parameter].copy()
    params[parameter][1] = value
    inits = [("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))] + [
        (f"bn_{k}", v.astype(np.float32)) for k, v in params.items()]
    nodes = [oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"], name="bn")]
    return make_model(nodes, [("x", ["N", 3, 6, 5])], [("y", None)], inits)


@pytest.mark.parametrize("parameter, value, reason", [
    ("scale", np.nan, "NaN or Inf in its scale"),
    ("mean", np.inf, "NaN or Inf in its mean"),
    ("var", -np.inf, "NaN or Inf in its variance"),
    ("var", -1.0, "variance + ε ≤ 0"),
])
def test_nan_or_inf_in_batchnorm_parameters(tmp_path, parameter, value, reason):
    path = tmp_path / "bn.onnx"
    onnx.save(_conv_bn_model(parameter, value), path)
    _assert_refused(tmp_path, path, reason=reason)


def test_finite_batchnorm_parameters_compile(tmp_path):
    path = tmp_path / "bn.onnx"
    onnx.save(_conv_bn_model("var", 0.25), path)
    result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("divisor", [0.0, np.nan, np.inf])
def test_division_by_a_constant_zero_nan_or_inf(tmp_path, divisor):
    d = np.array([2.0, divisor, 4.0, 8.0], np.float32)
    model = make_model([oh.make_node("Div", ["x", "d"], ["y"], name="div")], [("x", [1, 4])], [("y", [1, 4])],
                       [("d", d)])
    path = tmp_path / "div.onnx"
    onnx.save(model, path)
    _assert_refused(tmp_path, path, reason="divides by a constant that holds 0, NaN or Inf")


def test_nan_in_external_data_is_refused_once_read(tmp_path):
    folder = tmp_path / "model"
    model = _conv_bn_model("var", np.nan)
    variance = next(t for t in model.graph.initializer if t.name == "bn_var")
    values = onnx.numpy_helper.to_array(variance)
    folder.mkdir()
    (folder / "var.bin").write_bytes(values.tobytes())
    variance.ClearField("raw_data")
    variance.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "var.bin"), ("length", str(values.nbytes))):
        entry = variance.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, folder / "model.onnx")
    _assert_refused(tmp_path, folder / "model.onnx", reason="NaN or Inf in its variance")


# --- where cnnc writes ---------------------------------------------------------------------------------------------

def test_an_existing_data_file_at_the_target_is_never_appended_to(tmp_path):
    source = tmp_path / "conv.onnx"
    onnx.save(_conv_model(), source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "compiled.onnx.data").write_bytes(b"someone else's data")
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"not yours")
    (out_dir / "compiled.onnx.1.data").symlink_to(victim)  # the next name cnnc would try, pointing elsewhere
    result = CliRunner().invoke(cli, ["compile", str(source), "-o", str(out_dir / "compiled.onnx"),
                                      "--external-data"])
    assert result.exit_code == 0, result.stderr
    assert (out_dir / "compiled.onnx.data").read_bytes() == b"someone else's data"
    assert victim.read_bytes() == b"not yours"
    written = set(_folder_listing(out_dir)) - {"compiled.onnx", "compiled.onnx.data", "compiled.onnx.1.data"}
    assert written == {"compiled.onnx.2.data"}
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(run_model(load_onnx(out_dir / "compiled.onnx"), {"x": x})[0],
                               run_model(_conv_model(), {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_the_inputs_external_data_location_never_decides_where_cnnc_writes(tmp_path):
    folder = tmp_path / "model"
    _weight_file(folder / "weights" / "w.bin")
    source = _external_model(folder, "weights/w.bin")
    before = _folder_listing(folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = CliRunner().invoke(cli, ["compile", str(source), "-o", str(out_dir / "m.onnx"), "--external-data"])
    assert result.exit_code == 0, result.stderr
    assert _folder_listing(folder) == before  # nothing written beside the input
    assert _folder_listing(out_dir) == ["m.onnx", "m.onnx.data"]  # no weights/ folder, no w.bin
    stored = onnx.load(out_dir / "m.onnx", load_external_data=False)
    assert {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"} == {
        "m.onnx.data"}


def test_a_refused_pt_file_is_never_retried_without_weights_only(tmp_path, net_factory, monkeypatch):
    import cnnc_bad_input_factory
    import torch

    path = tmp_path / "module.pt"
    torch.save(cnnc_bad_input_factory.build(), path)  # loadable only by full unpickling
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    _assert_refused(tmp_path, path, "--module", net_factory, "--input-shape", "input:1,3,6,5", reason="weights_only")
    assert calls == [True]


def test_sparse_constant_with_an_absolute_external_location_is_refused(tmp_path):
    # onnx's own tensor walker skips sparse tensors; cnnc walks every TensorProto, sparse values included.
    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    values = onnx.numpy_helper.from_array(np.zeros(2, np.float32), "sparse_values")
    values.ClearField("raw_data")
    values.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", str(tmp_path / "secret.bin")), ("offset", "0"), ("length", "8")):
        entry = values.external_data.add()
        entry.key, entry.value = key, value
    indices = onnx.numpy_helper.from_array(np.array([0, 2], np.int64), "sparse_indices")
    sparse = oh.make_sparse_tensor(values, indices, [3])
    model = make_model([oh.make_node("Constant", [], ["c"], sparse_value=sparse), oh.make_node("Add", ["x", "c"], ["y"])],
                       [("x", [3])], [("y", [3])])
    path = tmp_path / "sparse.onnx"
    path.write_bytes(model.SerializeToString())
    _assert_refused(tmp_path, path, reason="absolute location")


def test_a_modelproto_with_external_data_is_refused_by_the_api(tmp_path):
    import cnnc

    model = _matmul_model()
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    unresolved = onnx.load_model(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(cnnc.ModelError, match="pass the model's file path"):
        cnnc.compile(unresolved, passes="fold-bn")
    assert cnnc.compile(str(tmp_path / "m.onnx"), passes="fold-bn").report["equivalence"]["passed"]
