"""The cheapest proof of equivalence: the compiled model is the input model.

A model that no pass changed needs no run on random inputs (whose integer and shape-like values an op may reject):
two models whose graphs are the same after canonical serialisation compute the same function. The canonical form
keeps everything that can change what a model computes and drops what cannot:

- kept: the default-domain and other opset versions; graph inputs (names, types) and outputs (names, element
  types, fixed dims; a symbolic output dim's name is dropped);
  every node in order (op type, domain, inputs, outputs, attributes, a subgraph attribute in its own canonical
  form); every initializer (name, type, dims, values, or its external-data reference) and sparse initializer;
  the model's functions;
- dropped: node names, doc strings, value_info (shape annotations of intermediate tensors), producer fields,
  metadata, the IR version (cnnc stamps it; the ops and their semantics come from the opsets).

A difference anywhere is "changed" and the caller runs the real check; so a false "unchanged" is impossible unless
two graphs that serialise the same compute differently, which ONNX's semantics rule out, or two top-level
initializers of the same name, type and shape hold different values with the same SHA-256 (no such pair is known;
comparing digests keeps one weight's bytes in memory at a time, not two).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx


def same_model(reference: onnx.ModelProto, candidate: onnx.ModelProto,
               reference_digests: dict[str, tuple] | None = None) -> bool:
    """Whether `candidate` is `reference` in canonical form (see the module docstring). `reference_digests`
    (`tensor_digests` of the reference, taken before its weights were let go of) stand for the values of the
    reference's initializers they name."""
    if _opsets(reference) != _opsets(candidate):
        return False
    if [f.SerializeToString(deterministic=True) for f in reference.functions] != \
            [f.SerializeToString(deterministic=True) for f in candidate.functions]:
        return False
    if _canonical_graph(reference.graph, top=True) != _canonical_graph(candidate.graph, top=True):
        return False
    # The weights' values last, one tensor at a time and by SHA-256 of their canonical bytes: the bytes of every
    # weight at once would be two more copies of the weights in memory (cnnc.api's peak RSS), of one pair at once
    # two more copies of the largest weight.
    theirs = {t.name: t for t in candidate.graph.initializer}
    known = reference_digests or {}
    return all((known.get(tensor.name) or _tensor(tensor, digest=True)) == _tensor(theirs[tensor.name], digest=True)
               for tensor in reference.graph.initializer)


def tensor_digests(model: onnx.ModelProto, names: set[str] | None = None) -> dict[str, tuple]:
    """The identity `same_model` compares for each initializer of `model` (of those in `names`): name, type, dims
    and the SHA-256 of its values, read one tensor at a time."""
    return {t.name: _tensor(t, digest=True) for t in model.graph.initializer if names is None or t.name in names}


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}


def _canonical_graph(graph: onnx.GraphProto, top: bool = False) -> tuple:
    """`top`: the initializers without their values (`same_model` compares those apart)."""
    return (
        tuple(_value(v) for v in graph.input),
        tuple(_output(v) for v in graph.output),
        tuple(_node(n) for n in graph.node),
        tuple(sorted(_tensor(t, values=not top) for t in graph.initializer)),
        tuple(sorted(s.SerializeToString(deterministic=True) for s in graph.sparse_initializer)),
    )


def _value(value: onnx.ValueInfoProto) -> tuple:
    return value.name, value.type.SerializeToString(deterministic=True)


def _output(value: onnx.ValueInfoProto) -> tuple:
    """An output's name, element type and dims, a symbolic dim as None whatever its name: the declared shape of an
    output changes nothing that is computed (cnnc's export names unnamed dims)."""
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        return _value(value)
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim) \
        if tensor_type.HasField("shape") else None
    return value.name, tensor_type.elem_type, dims


def _tensor(tensor: onnx.TensorProto, values: bool = True, digest: bool = False) -> tuple:
    """A tensor's identity: its values as bytes in one layout, whichever field (raw_data or typed) holds them
    (without `values`: its name, type and dims only; with `digest`: the SHA-256 of those bytes)."""
    if not values:
        return tensor.name, tensor.data_type, tuple(tensor.dims)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        location = tuple((e.key, e.value) for e in tensor.external_data)
        return tensor.name, tensor.data_type, tuple(tensor.dims), b"external", repr(location).encode()
    array = onnx.numpy_helper.to_array(tensor)
    if array.dtype == object:  # strings: no pointers
        data = repr(array.tolist()).encode()
    else:
        data = memoryview(np.ascontiguousarray(array)).cast("B") if digest else array.tobytes()
    if digest:
        data = hashlib.sha256(data).digest()
    return tensor.name, tensor.data_type, tuple(tensor.dims), data, b""


def _node(node: onnx.NodeProto) -> tuple:
    return (node.op_type, node.domain if node.domain != "ai.onnx" else "", tuple(node.input), tuple(node.output),
            node.overload, tuple(sorted((a.name, _attribute(a)) for a in node.attribute)))


def _attribute(attr: onnx.AttributeProto):
    if attr.type == onnx.AttributeProto.GRAPH:
        return _canonical_graph(attr.g)
    if attr.type == onnx.AttributeProto.GRAPHS:
        return tuple(_canonical_graph(g) for g in attr.graphs)
    if attr.type == onnx.AttributeProto.TENSOR:
        return _tensor(attr.t)
    plain = onnx.AttributeProto()
    plain.CopyFrom(attr)
    plain.doc_string = ""
    return plain.SerializeToString(deterministic=True)
