"""Shared test helpers: build small ONNX models (from onnx.helper parts or ONNX text), run passes on them exactly as
the pass manager does, and compare models on onnxruntime.

`run_passes` is the one way a pass test runs passes: import into the IR, the pass manager in strict mode (a pass that
raises fails the test instead of being rolled back), export, the full ONNX checker. Write the model as ONNX text
(`onnx.parser` syntax, as onnxscript's rewriter tests do) and attach weights from numpy with `text_model`:

    model = text_model('''
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 7, 9] x) => (float[N, 6, 7, 9] y) <float[6, 4, 3, 3] W> {
            y = Conv <pads = [1, 1, 1, 1]> (x, W)
        }''', W=rng.standard_normal((6, 4, 3, 3)).astype(np.float32))
    run = run_passes(model, "fold-bn")          # or a Pass object, or several: run_passes(model, "fold-bn", "collapse")
    assert not run.changed and op_counts(run.model) == {"Conv": 1}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx.helper as oh
import onnx.parser

from cnnc.io import backend
from cnnc.ir import import_model
from cnnc.passes import parse_pipeline
from cnnc.pipeline.contract import Pass, PassResult
from cnnc.pipeline.manager import run_pipeline
from cnnc.runtime.session import make_session

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


def text_model(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text, with `initializers` attached by name; the result passes the full ONNX checker.

    A weight may be declared in the graph's `<...>` list without a value (`<float[6, 4, 3, 3] W>`, onnxscript's
    style): the array given for it must then have that type and shape, which catches a typo in either place.
    """
    model = onnx.parser.parse_model(text)
    declared = {v.name: v for v in model.graph.value_info}
    for name, value in initializers.items():
        tensor = onnx.numpy_helper.from_array(np.asarray(value), name)
        if name in declared:
            expected = declared.pop(name).type.tensor_type
            got = (tensor.data_type, list(tensor.dims))
            want = (expected.elem_type, [d.dim_value for d in expected.shape.dim])
            assert got == want, f"initializer {name}: (type, shape) {got} where the text declares {want}"
        model.graph.initializer.append(tensor)
    assert not declared, f"declared without a value: {sorted(declared)}"
    kept = [v for v in model.graph.value_info if v.name not in initializers]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass(frozen=True)
class PassRun:
    """What `run_passes` gives back: the compiled model and each pass's result, in pipeline order.

    `run["collapse{gemm=off}"]` is the result of the pass written that way; `run.result` is the last pass's.
    It unpacks as `compiled, result = run_passes(...)` for tests of one pass.
    """

    model: onnx.ModelProto
    specs: tuple[str, ...]
    results: tuple[PassResult, ...]

    @property
    def result(self) -> PassResult:
        return self.results[-1]

    @property
    def changed(self) -> bool:
        return any(result.changed for result in self.results)

    def __getitem__(self, spec: str) -> PassResult:
        wanted = parse_pipeline(spec)[0].spec()  # "collapse{ gemm=off }" and "collapse{gemm=off}" are one spec
        return next(r for s, r in reversed(list(zip(self.specs, self.results))) if s == wanted)

    def __iter__(self):
        return iter((self.model, self.result))


def run_passes(model: onnx.ModelProto | str, *specs: str | Pass, check: bool = True) -> PassRun:
    """Run the passes `specs` (pipeline text such as "fold-bn,collapse{gemm=off}", or Pass objects) on `model`
    (a ModelProto or ONNX text) with the pass manager in strict mode; export, and run the full checker unless
    `check` is False."""
    if isinstance(model, str):
        model = text_model(model)
    passes = parse_pipeline(list(specs))
    graph, report = run_pipeline(import_model(model), passes, strict=True)  # as cnnc.compile: defaults stay inputs
    compiled = backend.to_model(graph, template=model)
    if check:
        backend.check(compiled)
    return PassRun(compiled, tuple(r.spec for r in report.records), tuple(r.result for r in report.records))


def assert_unchanged(original: onnx.ModelProto, run: PassRun) -> None:
    """The passes declined: nothing reported as changed, and the same nodes with the same wiring came out."""
    assert not run.changed, [result.applied for result in run.results]
    wiring = [(n.name, n.op_type, list(n.input), list(n.output)) for n in run.model.graph.node]
    assert wiring == [(n.name, n.op_type, list(n.input), list(n.output)) for n in original.graph.node]


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """Float32 N(0, scale²) samples: weights and inputs for small test models."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def run_model(model: onnx.ModelProto, feeds: dict, optimization: str = "disabled") -> list[np.ndarray]:
    session = make_session(model, "cpu", optimization)
    return session.run(None, feeds)


def op_counts(model: onnx.ModelProto) -> dict:
    counts: dict = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


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
