"""Frontends (ONNX file, torch module, state dict) and the frontend -> IR -> backend round trip."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
import torch
import torch.nn.functional as F
from helpers import make_model, op_counts, run_model
from onnx import external_data_helper

import cnnc
from cnnc.errors import ModelError, UsageError
from cnnc.io import backend, target
from cnnc.io.frontend import from_torch, load_model, load_onnx
from cnnc.io.state_dict import load_state_dict
from cnnc.ir.canonicalize import canonicalize


class PadConvNet(torch.nn.Module):
    """F.pad with asymmetric pads (exported as a ConstantOfShape/Concat/Slice/Reshape chain), conv, BN, ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(F.pad(x, (1, 2, 0, 3)))))


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = PadConvNet().eval()
    with torch.no_grad():  # non-trivial BN statistics so that BN is not an identity
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    return net


def _input(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 2, 5, 6, generator=torch.Generator().manual_seed(seed))


# --- torch -> ONNX -------------------------------------------------------------------------------------------------

def test_torch_export_keeps_the_batch_dimension_dynamic():
    net = _net()
    model = from_torch(net, _input(1))
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    for value in (graph_input, graph_output):
        first = value.type.tensor_type.shape.dim[0]
        assert not first.HasField("dim_value") and first.dim_param, value
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]] == [2, 5, 6]
    for batch in (1, 3):
        x = _input(batch, seed=batch)
        (got,) = run_model(model, {graph_input.name: x.numpy()})
        with torch.no_grad():
            expected = net(x).numpy()
        assert got.shape == expected.shape == (batch, 3, 6, 7)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_torch_export_with_fixed_batch():
    model = from_torch(_net(), _input(2), dynamic_batch=False)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_torch_export_of_several_inputs_and_outputs():
    class TwoInTwoOut(torch.nn.Module):
        def forward(self, a, b):
            return a + b, a * b

    model = from_torch(TwoInTwoOut(), (torch.ones(1, 3), torch.ones(1, 3)))
    assert [i.name for i in model.graph.input] == ["input_0", "input_1"]
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"]
    total, product = run_model(model, {"input_0": np.full((4, 3), 2, np.float32),
                                       "input_1": np.full((4, 3), 3, np.float32)})
    np.testing.assert_array_equal(total, np.full((4, 3), 5, np.float32))
    np.testing.assert_array_equal(product, np.full((4, 3), 6, np.float32))


def test_torch_export_refusals():
    with pytest.raises(UsageError, match="example_input"):
        from_torch(_net(), None)
    with pytest.raises(UsageError, match="nn.Module"):
        from_torch(lambda x: x, _input(1))
    with pytest.raises(ModelError, match="fails on its example input"):
        from_torch(_net(), torch.randn(1, 7, 5, 6))  # wrong channel count: the forward pass itself fails


def test_pad_chain_is_folded_to_a_constant_pad_input():
    model = from_torch(_net(), _input(1))
    before = op_counts(model)
    assert before.get("ConstantOfShape", 0) >= 1 and before.get("Concat", 0) >= 1 and before.get("Slice", 0) >= 1
    pad_node = next(n for n in model.graph.node if n.op_type == "Pad")
    assert pad_node.input[1] not in {i.name for i in model.graph.initializer}  # computed by the chain

    graph = canonicalize(gs.import_onnx(model))
    assert sorted(node.op for node in graph.nodes) == ["BatchNormalization", "Conv", "Pad", "Relu"]
    (pad,) = [node for node in graph.nodes if node.op == "Pad"]
    assert isinstance(pad.inputs[1], gs.Constant)
    # ONNX pads are all begins then all ends over N, C, H, W; F.pad's (1, 2, 0, 3) is (W left, W right, H top,
    # H bottom).
    np.testing.assert_array_equal(pad.inputs[1].values, [0, 0, 0, 1, 0, 0, 3, 2])
    folded = backend.to_model(graph, template=model)
    backend.check(folded)
    x = _input(3, seed=5).numpy()
    np.testing.assert_allclose(run_model(folded, {"input": x})[0], run_model(model, {"input": x})[0],
                               rtol=0, atol=0)


# --- ONNX files with external data ---------------------------------------------------------------------------------

def _conv_model_with_weights(rng) -> onnx.ModelProto:
    weight = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    return make_model([oh.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                      [("x", ["N", 4, 5, 5])], [("y", None)], [("W", weight), ("B", bias)])


def test_external_data_written_by_onnx_loads_inline(tmp_path, rng):
    model = _conv_model_with_weights(rng)
    expected = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    to_save = onnx.ModelProto()
    to_save.CopyFrom(model)  # onnx.save_model rewrites the tensors it externalises in place
    onnx.save_model(to_save, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights/model.bin", size_threshold=0)
    assert (folder / "weights" / "model.bin").is_file()
    loaded = load_onnx(folder / "model.onnx")
    assert not any(external_data_helper.uses_external_data(t) for t in loaded.graph.initializer)
    for init in loaded.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(init), expected[init.name])
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(run_model(loaded, {"x": x})[0], run_model(model, {"x": x})[0])


def test_external_data_at_an_offset_written_by_hand_loads(tmp_path, rng):
    model = _conv_model_with_weights(rng)
    weight = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight)
    (tmp_path / "w.bin").write_bytes(b"\xff" * 12 + values.tobytes() + b"\xff" * 4)
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "12"), ("length", str(values.nbytes))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, tmp_path / "model.onnx")
    loaded = load_onnx(tmp_path / "model.onnx")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), values)
    assert loaded.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT


# --- state dicts ---------------------------------------------------------------------------------------------------

class _RunsCodeWhenUnpickled:
    """A pickle payload that would create `marker` if anything unpickled it without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_state_dict_loads_with_weights_only(tmp_path, monkeypatch):
    net = _net(seed=1)
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state = load_state_dict(path)
    assert calls == [True]
    assert state.keys() == net.state_dict().keys()
    for name, tensor in net.state_dict().items():
        assert torch.equal(state[name], tensor)


def test_state_dict_wrapped_in_a_checkpoint_dict(tmp_path):
    net = _net(seed=2)
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, path)
    assert load_state_dict(path).keys() == net.state_dict().keys()


def test_state_dict_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ModelError, match="weights_only"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [[torch.ones(2)], torch.ones(3), {1: torch.ones(2)}])
def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(ModelError, match="state dict"):
        load_state_dict(path)


def test_compile_a_module_with_its_state_dict(tmp_path):
    trained = _net(seed=3)
    path = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), path)
    fresh = _net(seed=4)
    result = cnnc.compile(fresh, passes=["fold-bn"], example_input=_input(1), state_dict=path)
    x = _input(3, seed=9)
    with torch.no_grad():
        expected = trained(x).numpy()
    np.testing.assert_allclose(run_model(result.model, {"input": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_a_state_dict_that_does_not_fit_the_module_is_a_model_error(tmp_path):
    path = tmp_path / "conv.pt"
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), path)
    with pytest.raises(ModelError, match="does not fit the module.*size mismatch for weight"):
        cnnc.compile(torch.nn.Conv2d(3, 5, 3), example_input=torch.zeros(1, 3, 5, 5), state_dict=path)
    with pytest.raises(ModelError, match="does not fit the module.*Missing key"):
        cnnc.compile(_net(), example_input=_input(1), state_dict=path)
    with pytest.raises(UsageError, match="needs a torch.nn.Module"):
        cnnc.compile(str(tmp_path / "m.onnx"), state_dict=path)


def test_load_model_dispatch(tmp_path):
    model = from_torch(_net(), _input(1))
    assert load_model(model) is model
    onnx.save(model, tmp_path / "m.onnx")
    assert load_model(tmp_path / "m.onnx").graph.node[-1].op_type == model.graph.node[-1].op_type
    assert load_model(_net(), _input(1)).graph.input[0].name == "input"
    with pytest.raises(UsageError, match="PyTorch file"):
        load_model(str(tmp_path / "weights.pt"))
    with pytest.raises(UsageError, match="cannot compile"):
        load_model(12)
    with pytest.raises(ModelError, match="is not a file"):
        load_onnx(tmp_path)


# --- round trip ----------------------------------------------------------------------------------------------------

def test_frontend_to_backend_round_trip(tmp_path):
    torch_path = tmp_path / "exported.onnx"
    buffer = io.BytesIO()
    onnx.save(from_torch(_net(seed=5), _input(1)), buffer)
    torch_path.write_bytes(buffer.getvalue())

    original = load_onnx(torch_path)
    graph = gs.import_onnx(original)
    emitted = backend.to_model(graph, template=original)
    out = tmp_path / "roundtrip.onnx"
    backend.save(emitted, out)
    reloaded = load_onnx(out)

    assert reloaded.ir_version <= 13 and reloaded.ir_version <= target.max_ir_version()
    onnx.checker.check_model(reloaded, full_check=True)
    assert op_counts(reloaded) == op_counts(original)
    assert [i.name for i in reloaded.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in reloaded.graph.output] == [o.name for o in original.graph.output]
    for batch in (1, 3):
        x = _input(batch, seed=10 + batch).numpy()
        np.testing.assert_array_equal(run_model(reloaded, {"input": x})[0], run_model(original, {"input": x})[0])


def test_export_restores_the_module_training_mode():
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).train()
    from_torch(module, torch.randn(1, 1, 5, 5))
    assert module.training and all(layer.training for layer in module)
