"""Structural validation of an input ModelProto before cnnc touches it.

cnnc checks what onnx's checker reports poorly (a cycle and a dangling input both read "not topologically sorted")
and what it does not check at all (versions newer than onnxruntime accepts, absurd ranks), then runs the checker.
Custom-domain ops are allowed: cnnc passes them through untouched.
"""

from __future__ import annotations

import onnx

from cnnc import target
from cnnc.errors import ModelError
from cnnc.weightless import weightless_copy

MAX_RANK = 32
MAX_SUBGRAPH_DEPTH = 8


def _check_versions(model: onnx.ModelProto) -> None:
    if model.ir_version <= 0:
        raise ModelError("model has no IR version; it is not a valid ONNX model")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(f"model IR version {model.ir_version} is newer than this onnx supports ({onnx.IR_VERSION})")
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > target.max_opset():
            raise ModelError(
                f"model opset {opset.version} is newer than the installed onnxruntime supports ({target.max_opset()})")
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
    for init in graph.initializer:
        if len(init.dims) > MAX_RANK:
            raise ModelError(f"initializer '{init.name}' has rank {len(init.dims)} (limit {MAX_RANK})")


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

    # Kahn's algorithm over node-to-node edges: anything left over sits on a cycle.
    readers: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    pending = [0] * len(graph.node)
    for index, node in enumerate(graph.node):
        for name in set(node.input):
            if name in producer:
                readers[producer[name]].append(index)
                pending[index] += 1
    ready = [i for i, count in enumerate(pending) if count == 0]
    seen = 0
    while ready:
        index = ready.pop()
        seen += 1
        for reader in readers[index]:
            pending[reader] -= 1
            if pending[reader] == 0:
                ready.append(reader)
    if seen != len(graph.node):
        stuck = [graph.node[i].name or graph.node[i].op_type for i, c in enumerate(pending) if c > 0]
        raise ModelError(f"graph has a cycle through node(s) {', '.join(stuck[:5])}")


def validate_model(model: onnx.ModelProto, onnx_checker: bool = True) -> None:
    """Raise ModelError with a clear message if `model` is not something cnnc can safely work on.

    `onnx_checker=False` runs only cnnc's own structural checks: onnx's checker opens external-data files (relative
    to the current directory for an in-memory model), so a model with external data is checked only once
    `cnnc.external_data` has validated and inlined its tensors (see `check_with_onnx`).
    """
    _check_versions(model)
    _check_ranks(model.graph)
    _check_names_and_order(model.graph, set(), 0)
    if onnx_checker:
        check_with_onnx(model)


def check_with_onnx(model: onnx.ModelProto) -> None:
    """onnx's checker on a weightless copy (any size, no copy of the weights), its first line as a ModelError."""
    try:
        # Not full_check: strict shape inference rejects custom-domain ops, which cnnc passes through.
        onnx.checker.check_model(weightless_copy(model))
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"model fails the ONNX checker: {first_line}") from None
