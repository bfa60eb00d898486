"""A compile from a file lets go of the original's weights once the compiled model is emitted (issue 16, "Memory").

From then on onnxruntime reads the reference from the file by path, the identity proof compares the digests taken
at load, and `result.original` reads the file again, unchanged, when asked for. These tests check that the proof is
still a proof (a changed weight is caught on both paths), that the original comes back whole, and that a file
changed after the compile is refused rather than taken for the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
from helpers import make_model

import cnnc
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
