"""Shared test helpers: build small ONNX graphs by hand and compare models on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, ir_version=8) -> onnx.ModelProto:
    """A model from onnx.helper parts; `inputs`/`outputs` are (name, shape) pairs of float32 tensors."""
    graph = oh.make_graph(
        list(nodes), "test",
        [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs],
        [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in outputs],
        initializer=[onnx.numpy_helper.from_array(np.asarray(v), name) for name, v in initializers],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = ir_version
    if any(shape is None for _, shape in outputs):  # the checker requires output shapes: let inference give them
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
        for output in model.graph.output:
            if not output.type.tensor_type.HasField("shape") and inferred[output.name].type.tensor_type.HasField(
                    "shape"):
                output.type.CopyFrom(inferred[output.name].type)
    return model


def run_model(model: onnx.ModelProto, feeds: dict, optimization: str = "disabled") -> list[np.ndarray]:
    from cnnc.runtime.session import make_session

    session = make_session(model, "cpu", optimization)
    return session.run(None, feeds)


def op_counts(model: onnx.ModelProto) -> dict:
    counts: dict = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def assert_same_outputs(original: onnx.ModelProto, compiled: onnx.ModelProto, feeds: dict,
                        rtol: float = 1e-5, atol: float = 1e-6) -> None:
    expected = run_model(original, feeds)
    got = run_model(compiled, feeds)
    assert [o.name for o in original.graph.output] == [o.name for o in compiled.graph.output]
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)


def bn_params(rng: np.random.Generator, channels: int, prefix: str) -> list[tuple[str, np.ndarray]]:
    """Realistic BN parameters (scale near 1, variance in [0.5, 1.5])."""
    return [
        (f"{prefix}_scale", (0.5 + rng.random(channels)).astype(np.float32)),
        (f"{prefix}_bias", (0.1 * rng.standard_normal(channels)).astype(np.float32)),
        (f"{prefix}_mean", (0.1 * rng.standard_normal(channels)).astype(np.float32)),
        (f"{prefix}_var", (0.5 + rng.random(channels)).astype(np.float32)),
    ]
