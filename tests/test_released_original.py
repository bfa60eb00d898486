"""A compile from a file lets go of the original's weights once the compiled model is emitted (issue 16, "Memory").

From then on onnxruntime reads the reference from the file by path, the identity proof compares the digests taken
at load, and `result.original` reads the file again, unchanged, when asked for. These tests check that the proof is
still a proof (a changed weight is caught on both paths), that the original comes back whole, and that a file
changed after the compile is refused rather than taken for the original.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
from helpers import make_model

import cnnc
import cnnc.api
from cnnc.api import _file_state, _reference_path
from cnnc.errors import EquivalenceError, ModelError
from cnnc.io.frontend import load_onnx
from cnnc.ir.weightless import WEIGHTLESS_MIN_BYTES, serialized_size, valueless_copy, weightless_copy
from cnnc.passes import PASSES
from cnnc.pipeline.contract import Pass, PassResult
from cnnc.runtime.identity import same_model, tensor_digests


def _large_weight_model(rng) -> onnx.ModelProto:
    """y = reshape(x @ W): W just over the weightless threshold (released), the Reshape target small (kept)."""
    k = WEIGHTLESS_MIN_BYTES // (4 * 64) + 1
    inits = [("shape", np.array([-1, k], np.int64)), ("W", rng.standard_normal((64, k)).astype(np.float32))]
    nodes = [oh.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
             oh.make_node("Reshape", ["m", "shape"], ["y"], name="reshape")]
    return make_model(nodes, [("x", ["N", 64])], [("y", ["N", k])], inits)


@dataclass(frozen=True)
class NudgeSameName(Pass):
    """Replaces W by W·1.001 under the same name: the graph's structure is unchanged, only a weight's values differ."""

    name: ClassVar[str] = "test-nudge-same-name"
    summary: ClassVar[str] = "deliberately wrong (test only)"

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult()
        matmul = next(node for node in graph.nodes if node.op == "MatMul")
        matmul.inputs[1] = gs.Constant("W", np.asarray(matmul.inputs[1].values) * np.float32(1.001))
        result.did("nudged W")
        return result


@pytest.fixture
def nudge(monkeypatch):
    monkeypatch.setitem(PASSES, NudgeSameName.name, lambda: NudgeSameName)


def test_valueless_copy_reads_as_the_model_without_its_large_values(rng):
    model = _large_weight_model(rng)
    husk, released = valueless_copy(model)
    assert released == {"W"} and husk.ByteSize() < 4096
    assert [t.name for t in husk.graph.initializer] == ["shape", "W"]
    assert husk.graph.initializer[0] == model.graph.initializer[0]  # small ones keep their values
    assert weightless_copy(husk) == weightless_copy(model)
    assert serialized_size(husk) == serialized_size(model)
    digests = tensor_digests(model, released)
    same, changed = onnx.ModelProto(), onnx.ModelProto()
    same.CopyFrom(model)
    changed.CopyFrom(model)
    values = onnx.numpy_helper.to_array(changed.graph.initializer[1]).copy()
    values[0, 0] += 1
    changed.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(values, "W"))
    assert same_model(husk, same, digests) and not same_model(husk, changed, digests)


def test_an_initializer_that_is_an_input_keeps_its_values(rng):
    model = _large_weight_model(rng)
    model.graph.input.append(oh.make_tensor_value_info("W", onnx.TensorProto.FLOAT, list(model.graph.initializer[1].dims)))
    husk, released = valueless_copy(model)
    assert not released and husk == model


def test_a_compile_from_a_file_gives_the_original_back_whole(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(_large_weight_model(rng), path)
    result = cnnc.compile(str(path), passes=[])
    assert result.report["equivalence"]["unchanged"]  # proven by the digests taken at load
    assert result._original is None and result._released is not None  # the weights were let go of
    assert result.original.SerializeToString() == load_onnx(path).SerializeToString()
    assert result.original is result.original  # read once


def test_a_changed_weight_is_caught_after_the_original_was_let_go_of(tmp_path, rng, nudge):
    path = tmp_path / "m.onnx"
    onnx.save(_large_weight_model(rng), path)
    with pytest.raises(EquivalenceError, match="not equivalent") as caught:
        cnnc.compile(str(path), passes=["test-nudge-same-name"], rtol=1e-6, atol=0.0)
    assert caught.value.report["equivalence"]["outputs"][0]["max_rel"] > 1e-4  # the run happened: 0.1 % off


def test_the_original_of_a_file_changed_after_the_compile_is_refused(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(_large_weight_model(rng), path)
    result = cnnc.compile(str(path), passes=[])
    onnx.save(_large_weight_model(np.random.default_rng(1)), path)  # other weights, same structure
    with pytest.raises(ModelError, match="changed after it was compiled"):
        _ = result.original


def test_a_touched_but_identical_file_still_gives_the_original(tmp_path, rng):
    """touch, chmod or a new hard link change the stat, not the model: the content check decides."""
    path = tmp_path / "m.onnx"
    onnx.save(_large_weight_model(rng), path)
    before = path.read_bytes()
    result = cnnc.compile(str(path), passes=[])
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    os.chmod(path, 0o640)
    assert result.original.SerializeToString() == onnx.load(str(path)).SerializeToString()
    assert path.read_bytes() == before


def test_a_model_given_as_a_proto_is_kept_as_given(rng):
    model = _large_weight_model(rng)
    result = cnnc.compile(model, passes=[])
    assert result.original is model and result._released is None


def test_saving_over_the_input_file_reads_the_original_first(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(_large_weight_model(rng), path)
    before = load_onnx(path).SerializeToString()
    result = cnnc.compile(str(path), passes=[])
    result.save(path, external_data=True)  # the compiled model replaces its input
    assert result._released is None and result.original.SerializeToString() == before


def _small_tensor_rewritten(path, rng) -> None:
    """`path` rewritten in place, at the same size, with its small Reshape target changed ([-1, k] -> [1, -1]),
    then its mtime set back as `cp -p`, `rsync -t --inplace` or `touch -r` would."""
    before = path.stat()
    model = _large_weight_model(rng)
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "shape"))
    onnx.save(model, path)
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_same_size_rewrite_with_its_mtime_set_back_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_large_weight_model(np.random.default_rng(0)), path)
    result = cnnc.compile(str(path), passes=[])
    _small_tensor_rewritten(path, np.random.default_rng(0))  # the same large W: only its ctime tells
    with pytest.raises(ModelError, match="changed after it was compiled"):
        _ = result.original
    with pytest.raises(ModelError, match="changed after it was compiled"):
        result.export("onnx", tmp_path / "out.onnx")


@pytest.mark.parametrize("change", ["small tensor", "large weight"])
def test_a_file_whose_stat_hides_a_rewrite_is_still_refused(tmp_path, change):
    """The identity stat gives is a first filter; the content check alone refuses another model: the valueless
    copy (graph, attributes, small tensors) by its serialisation, the released weights by their digests."""
    path = tmp_path / "m.onnx"
    onnx.save(_large_weight_model(np.random.default_rng(0)), path)
    result = cnnc.compile(str(path), passes=[])
    if change == "small tensor":
        _small_tensor_rewritten(path, np.random.default_rng(0))
    else:
        onnx.save(_large_weight_model(np.random.default_rng(1)), path)
    source = result._released.source  # a file system whose stat does not show the rewrite
    result._released = replace(result._released, source=replace(source, identity=source.current()))
    with pytest.raises(ModelError, match="holds another model than the one compiled"):
        _ = result.original


def test_a_moved_input_file_says_how_to_keep_the_original(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(_large_weight_model(rng), path)
    result = cnnc.compile(str(path), passes=[])
    path.rename(tmp_path / "elsewhere.onnx")
    message = r"moved or deleted after the compile.*compile from a ModelProto \(cnnc\.compile\(onnx\.load\(path\)\)\)"
    with pytest.raises(ModelError, match=message):
        _ = result.original
    with pytest.raises(ModelError, match=message):
        result.export("onnx", tmp_path / "out.onnx")


def _external_data_model(tmp_path, rng):
    """`_large_weight_model` with an Identity the default passes remove (so the check runs), W in m.data."""
    model = _large_weight_model(rng)
    model.graph.node[0].output[0] = "pre"
    model.graph.node.insert(1, oh.make_node("Identity", ["pre"], ["m"], name="identity"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=1024)
    return path, tmp_path / "m.data"


def test_external_data_files_are_part_of_the_file_identity(tmp_path, rng):
    path, data = _external_data_model(tmp_path, rng)
    state, loaded = _file_state(str(path)), load_onnx(path)
    assert state.data_files == (str(data.resolve()),)
    assert _reference_path(state, loaded, loaded) == str(path)
    os.utime(data)  # only the weights' file was touched
    assert _reference_path(state, loaded, loaded) is None
    plain = tmp_path / "plain.onnx"
    onnx.save(_large_weight_model(rng), plain)
    assert _file_state(str(plain)).data_files == ()


@pytest.mark.parametrize("values", ["other", "same"])
def test_external_data_rewritten_during_the_check_fails_the_compile(tmp_path, rng, monkeypatch, values):
    """The check reads the reference from disk: weights rewritten meanwhile make it a check of another model, which
    must fail the compile whatever it found (with the same bytes written back, it would have passed)."""
    path, data = _external_data_model(tmp_path, rng)
    real = cnnc.api._equivalence

    def rewrite_then_check(*args, **kwargs):
        weights = np.fromfile(data, np.float32)
        (weights * 2 if values == "other" else weights).tofile(data)
        return real(*args, **kwargs)

    monkeypatch.setattr(cnnc.api, "_equivalence", rewrite_then_check)
    with pytest.raises(ModelError, match="changed while it was being compiled"):
        cnnc.compile(str(path))


def test_the_check_of_an_external_data_model_runs_and_gives_the_original_back(tmp_path, rng):
    path, _ = _external_data_model(tmp_path, rng)
    result = cnnc.compile(str(path))
    assert result.report["equivalence"]["passed"] and not result.report["equivalence"].get("unchanged")
    assert result._released is not None
    assert result.original.SerializeToString() == load_onnx(path).SerializeToString()
