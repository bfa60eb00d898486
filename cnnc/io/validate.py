"""Structural validation of an input ModelProto before cnnc touches it.

cnnc checks what onnx's checker reports poorly (a cycle and a dangling input both read "not topologically sorted")
and what it does not check at all (versions newer than onnxruntime accepts, absurd ranks and sizes), then runs the
checker. Once the weights are in memory, `check_divisors` refuses NaN, Inf (or zero) in the constants that passes
divide by. Custom-domain ops are allowed: cnnc passes them through untouched.
"""

from __future__ import annotations

import re

import numpy as np
import onnx

from cnnc.errors import ModelError
from cnnc.io import target
from cnnc.ir.graph import shadowed_input_names
from cnnc.ir.order import CycleError, topological_indices
from cnnc.ir.weightless import weightless_copy

MAX_RANK = 32
MAX_SUBGRAPH_DEPTH = 8
# Elements of one declared tensor: 2^32 float32 are 16 GiB, beyond any single activation or weight of a CNN. Larger
# declarations are typos or attacks, and would surface later as an allocation failure, not as a clear refusal.
MAX_ELEMENTS = 2**32


def _check_versions(model: onnx.ModelProto) -> None:
    if model.ir_version <= 0:
        raise ModelError("model has no IR version; it is not a valid ONNX model")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(f"model IR version {model.ir_version} is newer than this onnx supports ({onnx.IR_VERSION})")
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > target.max_opset_without_probe():
            raise ModelError(f"model opset {opset.version} is newer than the installed onnxruntime supports "
                             f"({target.max_opset_without_probe()})")
    if not model.HasField("graph"):
        raise ModelError("model has no graph")


def _check_ranks(graph: onnx.GraphProto) -> None:
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            if len(dims) > MAX_RANK:
                raise ModelError(f"tensor '{info.name}' declares rank {len(dims)} (limit {MAX_RANK})")
            for dim in dims:
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    raise ModelError(f"tensor '{info.name}' declares a negative dimension {dim.dim_value}")
            _check_elements(f"tensor '{info.name}'", [d.dim_value for d in dims if d.HasField("dim_value")])
    for init in graph.initializer:
        if len(init.dims) > MAX_RANK:
            raise ModelError(f"initializer '{init.name}' has rank {len(init.dims)} (limit {MAX_RANK})")
        _check_elements(f"initializer '{init.name}'", list(init.dims))


def _check_elements(what: str, dims: list[int]) -> None:
    count = 1
    for dim in dims:  # Python integers: no overflow
        count *= max(dim, 0)
    if count > MAX_ELEMENTS:
        raise ModelError(f"{what} declares {count} elements (shape {dims}; limit {MAX_ELEMENTS})")


def _check_names_and_order(graph: onnx.GraphProto, outer_names: set[str], depth: int) -> None:
    if depth > MAX_SUBGRAPH_DEPTH:
        raise ModelError(f"subgraphs are nested deeper than {MAX_SUBGRAPH_DEPTH} levels")
    defined: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if not name:
            return
        if name in defined:
            raise ModelError(f"duplicate tensor name '{name}' ({defined[name]} and {what})")
        defined[name] = what

    for init in graph.initializer:
        define(init.name, "an initializer")
    for sparse in graph.sparse_initializer:
        define(sparse.values.name, "a sparse initializer")
    initializer_names = set(defined)
    for value in graph.input:
        if value.name not in initializer_names:  # IR < 4 lists initializers as inputs too
            define(value.name, "a graph input")
    for node in graph.node:
        for name in node.output:
            define(name, f"an output of node '{node.name or node.op_type}'")

    available = set(defined) | outer_names
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    for node in graph.node:
        for name in node.input:
            if name and name not in available:
                raise ModelError(f"node '{node.name or node.op_type}' reads '{name}', which nothing defines")
        for attr in node.attribute:
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subgraphs:
                _check_names_and_order(sub, available, depth + 1)
    for value in graph.output:
        if value.name not in available:
            raise ModelError(f"graph output '{value.name}' is not produced by any node")

    # Nodes that read only what earlier nodes write are in topological order, which has no cycle (the usual case:
    # only then is the sort, ~0.5 s of a 100k-node graph, skipped). Otherwise, whatever the sort cannot order sits
    # on a cycle (or downstream of one).
    if all(producer.get(name, -1) < index for index, node in enumerate(graph.node) for name in node.input):
        return
    try:
        topological_indices(len(graph.node), lambda i: [producer[n] for n in graph.node[i].input if n in producer])
    except CycleError as error:
        stuck = [graph.node[i].name or graph.node[i].op_type for i in error.stuck]
        raise ModelError(f"graph has a cycle through node(s) {', '.join(stuck[:5])}") from None


def validate_model(model: onnx.ModelProto, onnx_checker: bool = True) -> None:
    """Raise ModelError with a clear message if `model` is not something cnnc can safely work on.

    `onnx_checker=False` runs only cnnc's own structural checks: onnx's checker opens external-data files (relative
    to the current directory for an in-memory model), so a model with external data is checked only once
    `cnnc.io.external_data` has validated and inlined its tensors (see `check_with_onnx`).
    """
    _check_versions(model)
    _check_ranks(model.graph)
    _check_names_and_order(model.graph, set(), 0)
    if onnx_checker:
        check_divisors(model)
        check_with_onnx(model)


def _constants(graph: onnx.GraphProto, ir_version: int) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant outputs; an input with a default (IR >= 4) is an input, not a constant."""
    overridable = set(shadowed_input_names(graph, ir_version))
    found = {init.name: init for init in graph.initializer
             if init.data_location != onnx.TensorProto.EXTERNAL and init.name not in overridable}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    found[node.output[0]] = attr.t
    return found


def check_divisors(model: onnx.ModelProto) -> None:
    """Refuse NaN or Inf where a pass would divide by it: any BatchNormalization parameter (fold-bn divides by
    √(σ²+ε), so also σ²+ε ≤ 0), and a constant float divisor of Div (which must also not be 0). Such a model
    computes NaN or Inf itself; refusing it names the cause instead of carrying NaN into the rewritten weights."""
    constants = _constants(model.graph, model.ir_version)

    def value(name: str) -> np.ndarray | None:
        return onnx.numpy_helper.to_array(constants[name]) if name in constants else None

    for node in model.graph.node:
        where = f"{node.op_type} '{node.name or (node.output[0] if node.output else '')}'"
        if node.op_type == "BatchNormalization" and len(node.input) >= 5:
            params = dict(zip(("scale", "bias", "mean", "variance"), (value(n) for n in node.input[1:5])))
            for what, values in params.items():
                if values is not None and values.dtype.kind == "f" and not np.all(np.isfinite(values)):
                    raise ModelError(f"{where} has NaN or Inf in its {what}; passes divide by √(variance + ε)")
            epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            variance = params["variance"]
            if variance is not None and np.any(variance.astype(np.float64) + epsilon <= 0):
                raise ModelError(f"{where} has variance + ε ≤ 0: its scale γ/√(variance + ε) is not a number")
        elif node.op_type == "Div" and len(node.input) == 2:
            divisor = value(node.input[1])
            if divisor is not None and divisor.dtype.kind == "f" and not np.all(np.isfinite(divisor) & (divisor != 0)):
                raise ModelError(f"{where} divides by a constant that holds 0, NaN or Inf")


def check_with_onnx(model: onnx.ModelProto, what: str = "the input model") -> str:
    """onnx's checker on a weightless copy (any size, no copy of the weights); its first line as a ModelError that
    names `what` ("input model PATH", "emitted model"). Returns the level the model passed, "full" or "plain".

    The one rule for input and output alike: the full checker (strict shape and type inference), except where
    strict inference fails inside onnx's own expansion of a function op (`_fails_in_onnx_function`: e.g.
    MeanVarianceNormalization at opset 13, whose body onnx cannot infer) or of an op without a default-domain
    schema (a custom domain cnnc passes through): there the plain checker decides. So an output is never refused
    at a level its input was not held to, and a real type error (a bfloat16 Conv at opset 17) is refused as the
    input's, before any pass runs."""
    light = weightless_copy(model)
    try:
        onnx.checker.check_model(light, full_check=True)
        return "full"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        if not _fails_in_onnx_function(str(error), model):
            raise ModelError(f"{what} fails the ONNX checker: {_first_line(error)}") from None
    try:
        onnx.checker.check_model(light)
    except onnx.checker.ValidationError as error:
        raise ModelError(f"{what} fails the ONNX checker: {_first_line(error)}") from None
    return "plain"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _fails_in_onnx_function(message: str, model: onnx.ModelProto) -> bool:
    """Whether strict inference failed inside the body of a function op (the error names a node of the body after
    the op: onnx's own expansion, not the model, is at fault) or on an op without a default-domain schema."""
    ops = re.findall(r"\(op_type:([A-Za-z0-9_]+)", message)
    if not ops:
        return False
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return True
    try:
        schema = onnx.defs.get_schema(ops[0], opset, "")
    except onnx.defs.SchemaError:
        return True  # a custom-domain op: strict inference has no schema for it
    return len(ops) > 1 and (schema.has_function or schema.has_context_dependent_function)
