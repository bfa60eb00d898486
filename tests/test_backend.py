"""Backend: emitted IR version, the full checker, atomic writes, external data, and a kill in the middle of a save."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import pytest
from helpers import make_model, run_model

from cnnc.errors import ModelError
from cnnc.io import backend, target
from cnnc.io.frontend import load_onnx
from cnnc.runtime import session as session_module


def _conv_model(rng, cout: int = 8, ir_version: int = 8) -> onnx.ModelProto:
    weight = rng.standard_normal((cout, 4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    return make_model([oh.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                      [("x", ["N", 4, 5, 5])], [("y", None)], [("W", weight), ("B", bias)], ir_version=ir_version)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- emitted model -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ir_version", [3, 8, onnx.IR_VERSION])
def test_emitted_ir_version_is_the_newest_onnxruntime_accepts(rng, ir_version):
    model = _conv_model(rng, ir_version=ir_version)
    if ir_version < 4:  # IR 3 lists initializers among the graph inputs
        model.graph.input.extend(oh.make_tensor_value_info(i.name, i.data_type, i.dims)
                                 for i in model.graph.initializer)
    emitted = backend.to_model(gs.import_onnx(model), template=model)
    assert emitted.ir_version == target.max_ir_version() <= onnx.IR_VERSION
    import onnxruntime as ort  # the property that matters: the installed onnxruntime loads what cnnc emits

    ort.InferenceSession(emitted.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in emitted.graph.input] == ["x"]
    backend.check(emitted)  # full_check=True
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.ir_version = min(ir_version, target.max_ir_version())  # IR 14 itself cannot run on onnxruntime
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(run_model(emitted, {"x": x})[0], run_model(reference, {"x": x})[0])


def test_to_model_keeps_metadata_and_custom_opsets(rng):
    model = _conv_model(rng)
    model.producer_name, model.model_version, model.doc_string = "trainer", 7, "a conv"
    onnx.helper.set_model_props(model, {"licence": "MIT"})
    model.opset_import.append(oh.make_opsetid("com.example", 2))
    emitted = backend.to_model(gs.import_onnx(model), template=model)
    assert (emitted.producer_name, emitted.model_version, emitted.doc_string) == ("trainer", 7, "a conv")
    assert {p.key: p.value for p in emitted.metadata_props} == {"licence": "MIT"}
    assert {(o.domain, o.version) for o in emitted.opset_import} >= {("", 17), ("com.example", 2)}


def test_check_rejects_an_invalid_model(rng):
    model = _conv_model(rng)
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(ModelError, match="fails the ONNX checker"):
        backend.check(model)


# --- atomic save ---------------------------------------------------------------------------------------------------

def test_save_writes_one_file_and_no_temporary_files(tmp_path, rng):
    model = backend.to_model(gs.import_onnx(_conv_model(rng)))
    out = tmp_path / "model.onnx"
    assert backend.save(model, out) == [out]
    assert _listing(tmp_path) == ["model.onnx"]
    assert onnx.load(out) == model


def test_a_failing_save_leaves_the_previous_file_and_no_temporary_files(tmp_path, rng, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous contents")

    def fail(model, path):  # the disk fills up half way through the staged file
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(backend, "_write_inline", fail)
    with pytest.raises(ModelError, match=f"cannot write {out}: disk full"):  # the user's error, exit 2
        backend.save(_conv_model(rng), out)
    assert out.read_bytes() == b"previous contents"
    assert _listing(tmp_path) == ["model.onnx"]


def test_save_refuses_a_missing_folder_or_a_folder_as_output(tmp_path, rng):
    with pytest.raises(ModelError, match="does not exist"):
        backend.save(_conv_model(rng), tmp_path / "absent" / "model.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ModelError, match="is a folder"):
        backend.save(_conv_model(rng), tmp_path / "dir.onnx")


def test_forced_external_data_is_written_beside_and_reloads_identically(tmp_path, rng):
    model = backend.to_model(gs.import_onnx(_conv_model(rng)))
    out = tmp_path / "model.onnx"
    written = backend.save(model, out, external_data=True)
    assert written == [out, tmp_path / "model.onnx.data"]
    assert _listing(tmp_path) == ["model.onnx", "model.onnx.data"]
    # The weights are in the data file, not in the model file.
    assert out.stat().st_size < 1024 < (tmp_path / "model.onnx.data").stat().st_size
    for reloaded in (load_onnx(out), onnx.load(out)):
        weights = _weights(reloaded)
        assert weights.keys() == _weights(model).keys()
        for name, values in _weights(model).items():
            np.testing.assert_array_equal(weights[name], values)


def test_forced_external_data_moves_small_tensors_and_copes_with_none(tmp_path, rng):
    tiny = backend.to_model(gs.import_onnx(_conv_model(rng, cout=1)))  # 144 + 4 bytes of weights
    assert backend.save(tiny, tmp_path / "tiny.onnx", external_data=True) == [tmp_path / "tiny.onnx",
                                                                               tmp_path / "tiny.onnx.data"]
    np.testing.assert_array_equal(_weights(load_onnx(tmp_path / "tiny.onnx"))["W"], _weights(tiny)["W"])
    no_weights = make_model([oh.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])])
    assert backend.save(no_weights, tmp_path / "relu.onnx", external_data=True) == [tmp_path / "relu.onnx"]
    assert onnx.load(tmp_path / "relu.onnx") == no_weights
    assert not any(p.name.startswith(".cnnc-") for p in tmp_path.iterdir())


def test_external_data_is_chosen_automatically_above_the_threshold(tmp_path, rng, monkeypatch):
    model = backend.to_model(gs.import_onnx(_conv_model(rng)))
    monkeypatch.setattr(backend, "EXTERNAL_DATA_THRESHOLD_BYTES", model.ByteSize() - 1)
    out = tmp_path / "big.onnx"
    assert backend.save(model, out) == [out, tmp_path / "big.onnx.data"]
    np.testing.assert_array_equal(_weights(load_onnx(out))["W"], _weights(model)["W"])
    monkeypatch.setattr(backend, "EXTERNAL_DATA_THRESHOLD_BYTES", model.ByteSize() + 1)
    assert backend.save(model, tmp_path / "small.onnx") == [tmp_path / "small.onnx"]


def test_overwriting_a_model_with_external_data_removes_the_stale_data(tmp_path, rng):
    out = tmp_path / "model.onnx"
    first = backend.to_model(gs.import_onnx(_conv_model(np.random.default_rng(1))))
    second = backend.to_model(gs.import_onnx(_conv_model(np.random.default_rng(2), cout=6)))
    third = backend.to_model(gs.import_onnx(_conv_model(np.random.default_rng(3), cout=5)))
    backend.save(first, out, external_data=True)

    # The new data file gets a fresh name (the old model keeps pointing at intact data until the replace).
    written = backend.save(second, out, external_data=True)
    assert len(written) == 2 and written[1].name != "model.onnx.data"
    assert _listing(tmp_path) == sorted(["model.onnx", written[1].name])
    np.testing.assert_array_equal(_weights(load_onnx(out))["W"], _weights(second)["W"])

    assert backend.save(third, out) == [out]  # inline now: the previous data file is stale
    assert _listing(tmp_path) == ["model.onnx"]
    np.testing.assert_array_equal(_weights(load_onnx(out))["W"], _weights(third)["W"])


def test_overwriting_never_deletes_data_that_cnnc_did_not_name(tmp_path, rng):
    # A model at -o whose data file has some other name (shared with other models, say) keeps it.
    out = tmp_path / "model.onnx"
    model = _conv_model(rng)
    onnx.save_model(model, out, save_as_external_data=True, location="shared.bin", size_threshold=0)
    backend.save(backend.to_model(gs.import_onnx(_conv_model(rng))), out)
    assert _listing(tmp_path) == ["model.onnx", "shared.bin"]


# --- a kill during the save ----------------------------------------------------------------------------------------

SAVER = """
import pathlib, sys, time
import onnx
from cnnc.io import backend

def pause():  # the staged files are complete: tell the test, then wait to be killed
    pathlib.Path(sys.argv[4]).write_text("paused")
    while True:
        time.sleep(0.05)

backend._before_replace = pause
backend.save(onnx.load(sys.argv[1]), sys.argv[2], external_data=sys.argv[3] == "external")
"""


@pytest.mark.parametrize("layout", ["inline", "external"])
def test_a_kill_during_save_leaves_the_previous_model_intact(tmp_path, rng, layout):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.onnx"
    previous = backend.to_model(gs.import_onnx(_conv_model(np.random.default_rng(1))))
    backend.save(previous, out, external_data=layout == "external")
    before = {name: (out_dir / name).read_bytes() for name in _listing(out_dir)}

    source = tmp_path / "new.onnx"
    onnx.save(backend.to_model(gs.import_onnx(_conv_model(np.random.default_rng(2), cout=6))), source)
    marker = tmp_path / "paused"
    # cwd=tmp_path: `python -c` puts the current folder on sys.path; the installed cnnc is the one under test.
    process = subprocess.Popen([sys.executable, "-c", SAVER, str(source), str(out), layout, str(marker)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the saver never reached the pause"
            time.sleep(0.05)
        # The staged files exist now; the kill lands before anything is moved into place.
        staged = [p for p in out_dir.iterdir() if p.name.startswith(".cnnc-")]
        assert len(staged) == 1 and (staged[0] / "model.onnx").is_file()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    after = {name: (out_dir / name).read_bytes() for name in _listing(out_dir) if not name.startswith(".cnnc-")}
    assert after == before  # same files, same bytes: nothing partial at the final path
    reloaded = load_onnx(out)
    np.testing.assert_array_equal(_weights(reloaded)["W"], _weights(previous)["W"])


def test_a_model_opened_by_path_with_external_data_keeps_small_shape_tensors_inline(monkeypatch, tmp_path):
    # Sessions of large models are opened from a temporary folder with external data (runtime.session); onnxruntime
    # reads a Reshape's shape only from raw data, so small integer tensors stay inline, also when external data is
    # forced (`--external-data`).
    weight = onnx.numpy_helper.from_array(np.ones((4, 300), dtype=np.float32), "W")  # 4.8 KB: goes external
    shape = onnx.numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "s")
    graph = oh.make_graph([oh.make_node("Add", ["x", "W"], ["a"]), oh.make_node("Reshape", ["a", "s"], ["y"])],
                          "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 300])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1200])], [weight, shape])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    monkeypatch.setattr(session_module, "IN_MEMORY_LIMIT_BYTES", 0)
    out = session_module.make_session(model, "cpu", "disabled").run(None, {"x": np.zeros((4, 300), np.float32)})
    assert out[0].shape == (1, 1200) and float(out[0].max()) == 1.0
    written = backend.save(model, tmp_path / "m.onnx", external_data=True)
    assert len(written) == 2
    saved = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    kinds = {t.name: t.data_location for t in saved.graph.initializer}
    assert kinds == {"W": onnx.TensorProto.EXTERNAL, "s": onnx.TensorProto.DEFAULT}
