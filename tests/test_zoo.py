"""The torchvision / timm zoo (cnnc.zoo.vision, cnnc.zoo.exports): the import shim, seeded models with calibrated
BatchNorm, exports by both of torch's exporters and in fp16, the cache, and cnnc's default passes on the exports.

torchvision and timm are the `zoo` extra. Without them these tests FAIL, saying how to install them, because CI
installs the extra (.ci/run) and a silently skipped zoo would hide a broken import. Set CNNC_ZOO_ABSENT=1 to declare
the extra deliberately absent: the tests that need it are then skipped, with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import onnx
import pytest
import torch

import cnnc
from cnnc.errors import UsageError
from cnnc.runtime.session import make_session
from cnnc.zoo import ZOO, build_zoo_model, export_zoo_model, exports, timm_reparameterized, vision, vision_libraries

ABSENT_ENV = "CNNC_ZOO_ABSENT"
SIZE = 32
SMALL_MODELS = ("squeezenet1_1", "mobilenet_v3_small", "repvgg_a0")  # cheap to build, export and compile


def require_zoo() -> None:
    """Import torchvision and timm through the shim; fail with instructions when they are missing, unless
    CNNC_ZOO_ABSENT=1 declares that the zoo extra is absent on purpose (then skip, saying so)."""
    try:
        vision_libraries()
    except UsageError as error:
        if os.environ.get(ABSENT_ENV) == "1":
            pytest.skip(f"the zoo extra is declared absent ({ABSENT_ENV}=1): {error}")
        pytest.fail(f"{error}\nThe zoo tests need torchvision and timm: pip install -e '.[zoo]' (CI installs the "
                    f"extra). To run the suite without them on purpose, set {ABSENT_ENV}=1.", pytrace=False)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    require_zoo()
    return tmp_path_factory.mktemp("zoo")


def _run(path, batch: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    session = make_session(onnx.load(str(path)), "cpu", "disabled")
    x = vision.example_input(SIZE, batch, seed=5).numpy().astype(dtype)
    return x, session.run(None, {session.get_inputs()[0].name: x})[0]


def test_the_zoo_lists_the_issue_s_networks():
    assert set(ZOO) == {"resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                        "regnet_y_400mf", "densenet121", "squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet0_5",
                        "convnext_tiny", "vgg11_bn", "googlenet", "repvgg_a0", "mobileone_s0", "ghostnet_100"}
    assert {n for n, m in ZOO.items() if m.reparameterizable} == {"repvgg_a0", "mobileone_s0"}


def test_missing_torchvision_is_a_usage_error_with_the_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchvision" else real_find_spec(name, *a))
    with pytest.raises(UsageError, match=r"pip install 'cnnc\[zoo\]'"):
        vision_libraries()


def test_unknown_names_are_usage_errors():
    with pytest.raises(UsageError, match="unknown zoo model"):
        build_zoo_model("resnet1000")
    with pytest.raises(UsageError, match="unknown exporter"):
        export_zoo_model("resnet18", exporter="tflite")
    with pytest.raises(UsageError, match="no train-time branches"):
        timm_reparameterized("resnet18")


def test_the_import_shim_imports_torchvision_and_timm(zoo_dir):
    torchvision, timm = vision_libraries()
    assert sys.modules["torchvision"] is torchvision and sys.modules["timm"] is timm
    assert callable(torchvision.models.resnet18) and callable(timm.create_model)
    # Either the compiled extension loaded, or the shim defined the schemas the fake-kernel registration needs.
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
    assert torchvision.extension._has_ops() or vision._schema_library is not None
    assert vision_libraries() == (torchvision, timm)  # a second call is a no-op


def _assert_calibrated(model: torch.nn.Module) -> None:
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        # measured statistics, not the defaults 0 / 1
        assert not torch.all(norm.running_mean == 0) and not torch.all(norm.running_var == 1)


def test_models_are_seeded_and_in_eval_mode(zoo_dir):
    model = build_zoo_model("mobilenet_v3_small", SIZE, seed=3)
    again = build_zoo_model("mobilenet_v3_small", SIZE, seed=3)
    assert not model.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    _assert_calibrated(model)
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), key
    other = build_zoo_model("mobilenet_v3_small", SIZE, seed=4)
    assert not torch.equal(next(other.parameters()), next(model.parameters()))


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_torchscript_export_runs_on_onnxruntime_and_compiles_equivalently(zoo_dir, name):
    path = export_zoo_model(name, "torchscript17", SIZE, directory=zoo_dir)
    model = onnx.load(str(path))
    assert model.ir_version <= 13 and {o.domain: o.version for o in model.opset_import}[""] == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x, y = _run(path, batch=3)
    module = build_zoo_model(name, SIZE)
    _assert_calibrated(module)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert y.shape == (3, 1000)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    result = cnnc.compile(str(path))
    assert result.report["equivalence"]["passed"]
    assert len(result.model.graph.node) <= len(model.graph.node)


def test_the_dynamo_export_keeps_a_dynamic_batch(zoo_dir):
    path = export_zoo_model("squeezenet1_1", "dynamo", SIZE, directory=zoo_dir)
    model = onnx.load(str(path))
    assert model.ir_version <= 13
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic
    x, y = _run(path, batch=3)
    with torch.no_grad():
        expected = build_zoo_model("squeezenet1_1", SIZE)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert cnnc.compile(str(path)).report["equivalence"]["passed"]


def test_the_fp16_variant_runs_on_the_cpu_provider(zoo_dir):
    path = export_zoo_model("squeezenet1_1", "torchscript17", SIZE, "fp16", directory=zoo_dir)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    x, y = _run(path, batch=2, dtype=np.float16)
    assert y.dtype == np.float16 and np.all(np.isfinite(y))
    with torch.no_grad():
        expected = build_zoo_model("squeezenet1_1", SIZE)(torch.from_numpy(x.astype(np.float32))).numpy()
    assert np.abs(y.astype(np.float32) - expected).max() <= 1e-2 * np.abs(expected).max()  # fp16: ~1e-3 per step
    assert '"dtype": "fp16"' in {p.key: p.value for p in model.metadata_props}["cnnc.zoo"]


def test_exports_are_cached_by_every_parameter(zoo_dir, monkeypatch):
    path = export_zoo_model("squeezenet1_1", "torchscript17", SIZE, directory=zoo_dir)
    stamp = path.stat().st_mtime_ns
    assert export_zoo_model("squeezenet1_1", "torchscript17", SIZE, directory=zoo_dir) == path
    assert path.stat().st_mtime_ns == stamp  # read from the cache, not exported again
    names = {exports.export_file_name("squeezenet1_1", e, s, d, seed, r)
             for e in ("torchscript17", "dynamo") for s in (32, 64) for d in ("fp32", "fp16") for seed in (0, 1)
             for r in (False, True)}
    assert len(names) == 32 and all(torch.__version__.replace("+", "_") in n for n in names)
    monkeypatch.setenv("CNNC_CACHE_DIR", str(zoo_dir / "elsewhere"))
    assert exports.cache_directory() == zoo_dir / "elsewhere" / "zoo"


def test_cache_names_change_with_what_the_weights_depend_on(monkeypatch):
    """A changed calibration constant or library version must never return an export of the old weights."""
    name = exports.export_file_name("resnet18", "torchscript17", SIZE, "fp32")
    monkeypatch.setattr(exports, "BRANCH_RATIO", 0.5)
    assert exports.export_file_name("resnet18", "torchscript17", SIZE, "fp32") != name
    monkeypatch.undo()
    monkeypatch.setattr(exports, "_installed", lambda distribution: "0.0-other")
    assert exports.export_file_name("resnet18", "torchscript17", SIZE, "fp32") != name


def test_timm_reparameterization_merges_the_branches_and_keeps_the_function(zoo_dir):
    trained = build_zoo_model("repvgg_a0", SIZE)
    merged = timm_reparameterized("repvgg_a0", SIZE)
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) for net in (trained, merged)]
    assert convs[1] < convs[0]
    x = vision.example_input(SIZE, 2, seed=1)
    with torch.no_grad():
        expected, got = trained(x), merged(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
