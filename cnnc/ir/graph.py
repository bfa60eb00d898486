"""Small typed helpers over onnx-graphsurgeon's `Graph`, the IR of cnnc.

graphsurgeon pitfalls this module exists to contain:
- `Node.__eq__` is structural, so node sets and dicts are keyed by `id(node)`;
- `tensor.inputs` are a tensor's producers and `tensor.outputs` its consumers;
- a rewrite must be followed by `graph.cleanup().toposort()`.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from cnnc.ir.fold_shapes import fold_shape_reads
from cnnc.ir.library_log import routed_graphsurgeon_log
from cnnc.ir.order import has_subgraph, is_topologically_sorted, tidy  # noqa: F401 - re-exported by cnnc.ir
from cnnc.ir.weightless import WEIGHTLESS_MIN_BYTES, tensor_nbytes

# Tensors larger than this are never materialised by constant folding (a folded Tile or Expand could be huge).
FOLD_SIZE_LIMIT_BYTES = 64 << 20
# forget_loaded_values runs the cycle collector when it dropped at least this many bytes of loaded weights.
GC_AFTER_BYTES = 64 << 20


@dataclass(frozen=True)
class ConvGeometry:
    """The attributes of a Conv / ConvTranspose / pooling node with ONNX defaults resolved."""

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: all begins, then all ends
    dilations: tuple[int, ...]
    group: int
    auto_pad: str

    @property
    def spatial_rank(self) -> int:
        return len(self.kernel_shape)

    @property
    def has_padding(self) -> bool:
        return self.auto_pad in ("SAME_UPPER", "SAME_LOWER") or any(p != 0 for p in self.pads)


def conv_geometry(node: gs.Node) -> ConvGeometry:
    """Resolve a conv-like node's attributes; the kernel shape comes from the weight when the attribute is absent."""
    attrs = node.attrs
    kernel = attrs.get("kernel_shape")
    if kernel is None:
        weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            raise ValueError(f"{node.op} '{node.name}' has no kernel_shape and a non-constant weight")
        kernel = weight.shape[2:]
    rank = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    return ConvGeometry(
        kernel_shape=tuple(int(k) for k in kernel),
        strides=tuple(int(s) for s in attrs.get("strides", [1] * rank)),
        pads=tuple(int(p) for p in attrs.get("pads", [0] * (2 * rank))),
        dilations=tuple(int(d) for d in attrs.get("dilations", [1] * rank)),
        group=int(attrs.get("group", 1)),
        auto_pad=auto_pad,
    )


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor that is a constant (an initializer or the output of a Constant node), else None. An
    unloaded imported weight is read into a fresh array, never cached in the constant (`.values` would keep that
    copy as long as the constant lives: in the rollback snapshot, for a whole pass even after a pass replaced it)."""
    if isinstance(tensor, gs.Constant):
        return _read(tensor)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        producer = tensor.inputs[0]
        attr = producer.attrs.get("value")
        if isinstance(attr, gs.Constant):
            return _read(attr)
        if isinstance(attr, np.ndarray):
            return attr
    return None


def _read(constant: gs.Constant) -> np.ndarray:
    return np.asarray(constant._values.load() if isinstance(constant._values, LazyValues) else constant.values)


def is_constant(tensor: gs.Tensor) -> bool:
    """Whether `constant_value(tensor)` is not None, without loading the value (graphsurgeon keeps an imported
    weight lazy until `.values` is read, and then holds a copy of it for good)."""
    if isinstance(tensor, gs.Constant):
        return True
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        return isinstance(tensor.inputs[0].attrs.get("value"), (gs.Constant, np.ndarray))
    return False


def float_constant(node: gs.Node, index: int) -> tuple[np.ndarray | None, str]:
    """Input `index` of `node` as a float constant (a weight or bias): (value, ""); (None, "") when the optional
    input is absent; (None, why) when it is there but not a float constant."""
    if len(node.inputs) <= index or is_empty_input(node.inputs[index]):
        return None, ""
    value = constant_value(node.inputs[index])
    if value is None or not np.issubdtype(value.dtype, np.floating):
        return None, f"input {index} ('{node.inputs[index].name}') is not a float constant"
    return value, ""


def is_empty_input(tensor: gs.Tensor) -> bool:
    """ONNX marks an omitted optional input with an empty name."""
    return isinstance(tensor, gs.Variable) and tensor.name == ""


def batch_norm_training_reason(node: gs.Node) -> str | None:
    """Why a BatchNormalization computes with batch statistics (training form), or None for the inference form.

    The one test of "BN in training mode", for the op table, the evaluator and fold-bn: `training_mode=1` (opset 14+),
    `is_test=0` (before opset 7), or running-mean/variance outputs that are present (only the training form writes
    them)."""
    if int(node.attrs.get("training_mode", 0)) != 0:
        return "training_mode=1: batch statistics are not constants"
    if "is_test" in node.attrs and int(node.attrs["is_test"]) == 0:
        return "is_test=0: batch statistics are not constants"
    if any(not is_empty_input(out) for out in node.outputs[1:]):
        return "running mean/variance outputs are used (training form)"
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading `tensor`, or None when it has several readers or is also a graph output."""
    if is_graph_output(graph, tensor) or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def sole_producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def make_constant(name_hint: str, values: np.ndarray, graph: gs.Graph) -> gs.Constant:
    """A new constant with a name unused in `graph` (never mutate a constant in place: it may be shared)."""
    return gs.Constant(unique_name(graph, name_hint), np.ascontiguousarray(values))


# The names taken in a graph, collected at the first `unique_name` of a pass and then kept up to date by it: one
# `graph.tensors()` per new name made passes quadratic (fold-bn on a 1,000-BN chain: 13 s). Exact because passes name
# every tensor and node they create through `unique_name` (or `make_constant`), and `Pass.__call__` forgets the set
# before each pass (`forget_names`); names that a pass removes stay in it, which only skips a free name.
# The set lives on the graph object (graphsurgeon's Graph is unhashable); a copy of the graph starts without it.
_TAKEN_NAMES = "_cnnc_taken_names"


def forget_names(graph: gs.Graph) -> None:
    """Drop `graph`'s cached name set (at the start of every pass, and whenever the graph is replaced)."""
    graph.__dict__.pop(_TAKEN_NAMES, None)


def unique_name(graph: gs.Graph, hint: str) -> str:
    """`hint`, or `hint_1`, `hint_2`, ...: the first name no tensor or node of `graph` has, nor any name this pass
    already handed out."""
    taken = graph.__dict__.get(_TAKEN_NAMES)
    if taken is None:
        taken = set(graph.tensors().keys()) | {node.name for node in graph.nodes}
        setattr(graph, _TAKEN_NAMES, taken)
    name, index = hint, 0
    while name in taken:
        index += 1
        name = f"{hint}_{index}"
    taken.add(name)
    return name


def replace_tensor(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every reader of `old` read `new` instead.

    When `old` is a graph output, `new` takes its place and its name, so that the model's interface is unchanged.
    """
    for consumer in list(old.outputs):
        consumer.inputs = [new if t is old else t for t in consumer.inputs]
    if is_graph_output(graph, old):
        graph.outputs = [new if t is old else t for t in graph.outputs]
        old_name = old.name
        old.name = unique_name(graph, old_name + "_replaced")
        new.name = old_name
        if isinstance(new, gs.Variable) and isinstance(old, gs.Variable):
            new.dtype = new.dtype or old.dtype
            new.shape = new.shape or old.shape


def shadowed_input_names(graph: onnx.GraphProto, ir_version: int) -> list[str]:
    """Graph inputs that also have an initializer, in input order: since IR 4 such an input is an input with a
    default value (the initializer), which a caller may override; it is never a constant. Before IR 4 every
    initializer had to be listed as an input too, and the pair is a constant: the result is then empty."""
    if ir_version < 4:
        return []
    initializers = {tensor.name for tensor in graph.initializer}
    return [value.name for value in graph.input if value.name in initializers]


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """`gs.import_onnx(model)`, except that inputs shadowed by an initializer (`shadowed_input_names`) stay graph
    inputs, as Variables: graphsurgeon drops them from the inputs and imports them as Constants, which every pass
    (and its constant folding) would then bake in. Their defaults are the template's business at export
    (`cnnc.io.backend.to_model`)."""
    with routed_graphsurgeon_log():  # e.g. "Model does not contain ONNX domain opset information!"
        graph = gs.import_onnx(model)
    shadowed = shadowed_input_names(model.graph, model.ir_version)
    if not shadowed:
        return graph
    declared = {value.name: value for value in model.graph.input}
    tensors = _tensors_in_every_scope(graph)  # an input read only inside an If branch is no tensor of the outer one
    variables: dict[int, gs.Variable] = {}
    inputs = []
    for value in model.graph.input:
        if value.name not in shadowed:
            inputs.append(tensors[value.name] if value.name in tensors else
                          next(t for t in graph.inputs if t.name == value.name))
            continue
        tensor_type = declared[value.name].type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim] \
            if tensor_type.HasField("shape") else None
        variable = gs.Variable(value.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type),
                               shape=shape)
        if value.name in tensors:
            variables[id(tensors[value.name])] = variable
        inputs.append(variable)
    _rewire(graph, variables)
    graph.outputs = [variables.get(id(t), t) for t in graph.outputs]
    graph.inputs = inputs
    return graph


def _rewire(graph: gs.Graph, replacements: dict[int, gs.Tensor]) -> None:
    """Every node of `graph` and of its subgraphs (which read outer tensors by reference) reads the replacement."""
    for node in graph.nodes:
        if any(id(t) in replacements for t in node.inputs):
            node.inputs = [replacements.get(id(t), t) for t in node.inputs]
        for subgraph in node.subgraphs():
            _rewire(subgraph, replacements)


def _tensors_in_every_scope(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """`graph.tensors()` and those of its subgraphs, by name (names are unique across scopes; the outer one wins)."""
    found = dict(graph.tensors())
    for node in graph.nodes:
        for subgraph in node.subgraphs():
            for name, tensor in _tensors_in_every_scope(subgraph).items():
                found.setdefault(name, tensor)
    return found


def fold_constant_subgraphs(graph: gs.Graph) -> gs.Graph:
    """Evaluate the constant sub-graphs that exporters emit (torch's F.pad gives ConstantOfShape/Concat/Slice/
    Reshape chains) so that passes see plain constants. graphsurgeon evaluates them with onnxruntime's CPU provider.

    Shape reads are folded by `cnnc.ir.fold_shapes` (graphsurgeon 0.6.1's own shape folds ignore Shape's start/end),
    never by graphsurgeon. A constant-condition If is inlined only when no branch holds a node with a subgraph:
    graphsurgeon leaves an inlined nested If out of topological order (onnx's affine_grid expansion).
    """
    fold_shape_reads(graph)
    with routed_graphsurgeon_log():
        graph.fold_constants(fold_shapes=False, error_ok=True, size_threshold=FOLD_SIZE_LIMIT_BYTES,
                             flatten_subgraphs=not _has_nested_subgraphs(graph))
    return tidy(graph)


def _has_nested_subgraphs(graph: gs.Graph) -> bool:
    """Whether a subgraph of `graph` (at any depth below the top) has a node with a subgraph of its own."""
    return any(any(True for _ in inner.subgraphs()) for node in graph.nodes for subgraph in node.subgraphs()
               for inner in subgraph.nodes)


def _plain_values(constant: gs.Constant) -> bool:
    """An imported tensor not read yet, or an array exported as its own dtype in the model (not sparse, no
    export dtype or data location of its own): what `backend.to_model` can write field by field."""
    values = constant._values
    if isinstance(values, np.ndarray):
        return constant._export_dtype is None and constant.data_location is None
    return type(values).__name__ == "LazyValues"


def export_weightless(graph: gs.Graph, do_type_check: bool = False) -> tuple[onnx.ModelProto, list[gs.Constant]]:
    """`graph` exported with its large constants declared as graph inputs, and those constants (which share their
    values with `graph`'s). Shape inference needs their types and shapes, not their values; exporting the values
    would copy every weight through protobuf's MergeFrom, which serializes it (see cnnc.ir.weightless)."""
    # Constant.copy() sets `_export_dtype` on every copy, so that no array would be plain: judge the originals.
    tensors = graph.tensors()
    plain = {name for name, t in tensors.items() if isinstance(t, gs.Constant) and _plain_values(t)}
    if not any(tensors[name]._values.nbytes >= WEIGHTLESS_MIN_BYTES and not is_graph_output(graph, tensors[name])
               for name in plain):
        # Nothing to declare: export `graph` itself (export reads it; the copy costs ~0.1 ms a node, 10 s at 100k).
        _detach_renamed_protos(graph, tensors)
        with routed_graphsurgeon_log():
            return gs.export_onnx(graph, do_type_check=do_type_check), []
    light = graph.copy()  # shares the constants' values, so the conversion below leaves `graph` alone
    large = []
    for tensor in list(light.tensors().values()):
        if isinstance(tensor, gs.Constant) and tensor._values.nbytes >= WEIGHTLESS_MIN_BYTES and \
                not is_graph_output(light, tensor) and tensor.name in plain:
            declared = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
            for consumer in list(tensor.outputs):
                consumer.inputs = [declared if t is tensor else t for t in consumer.inputs]
            light.inputs.append(declared)
            large.append(tensor)
    _detach_renamed_protos(light)  # after the large ones left: those are written field by field, never renamed
    with routed_graphsurgeon_log():
        return gs.export_onnx(light, do_type_check=do_type_check), large


def _detach_renamed_protos(graph: gs.Graph, tensors: dict[str, gs.Tensor] | None = None) -> None:
    """graphsurgeon exports an unread imported constant by writing the tensor's name into the imported TensorProto
    itself: the caller's model would be renamed behind its back. A constant whose name differs from its TensorProto's
    (renamed by a pass, or graphsurgeon's subgraph flattening) gets a copy of the proto for export to write into."""
    for tensor in _all_constants(graph, tensors):
        values = tensor._values
        source = getattr(values, "tensor", None)
        if isinstance(source, onnx.TensorProto) and source.name != tensor.name:
            detached = onnx.TensorProto()
            detached.CopyFrom(source)
            tensor._values = type(values)(detached)


def _all_constants(graph: gs.Graph, tensors: dict[str, gs.Tensor] | None = None):
    """The constants of `graph` (`tensors`: its `tensors()`, if known) and subgraphs, node attributes included."""
    yield from (t for t in (graph.tensors() if tensors is None else tensors).values() if isinstance(t, gs.Constant))
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Constant):
                yield attr
        for subgraph in node.subgraphs():
            yield from _all_constants(subgraph)


def refresh_shapes(graph: gs.Graph) -> gs.Graph:
    """Annotate the graph's variables, in place, with the shapes and dtypes of ONNX shape inference."""
    model, _ = export_weightless(graph)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    tensors = graph.tensors()
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = tensors.get(info.name)
        if not isinstance(tensor, gs.Variable) or not info.type.HasField("tensor_type"):
            continue
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                            for d in tensor_type.shape.dim]
        if tensor_type.elem_type and tensor.dtype is None:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    return graph


def unread_constants(graph: gs.Graph) -> list[tuple[weakref.ref, object]]:
    """The constants whose values graphsurgeon has not loaded yet, each (by weak reference: a constant that a pass
    replaced must not keep its loaded array alive) with its lazy loader, which holds the model's TensorProto. Taken
    right after import, for `forget_loaded_values` before export."""
    return [(weakref.ref(t), t._values) for t in graph.tensors().values()
            if isinstance(t, gs.Constant) and not isinstance(t._values, np.ndarray)]


def forget_loaded_values(graph: gs.Graph, unread: list[tuple[weakref.ref, object]]) -> None:
    """Give each constant that a pass read (`tensor.values` replaces the lazy loader with an array for good) its
    loader back, so that export reuses the model's TensorProto instead of copying the array into a new one (two
    copies of every weight a pass merely looked at). Passes never modify a constant's values (see make_constant);
    the values are compared with the loader's anyway, one tensor at a time, and kept if they differ."""
    imported_bytes = sum(tensor_nbytes(loader.tensor) for _, loader in unread
                         if isinstance(getattr(loader, "tensor", None), onnx.TensorProto))
    alive: set[int] = set()  # the ids of the graph's tensors: a pass over the whole graph, only once a value is loaded
    for reference, loader in unread:
        tensor = reference()
        if tensor is None:
            continue
        values = tensor._values
        source = getattr(loader, "tensor", None)
        if not isinstance(values, np.ndarray) or not isinstance(source, onnx.TensorProto):
            continue
        if id(tensor) not in (alive := alive or {id(t) for t in graph.tensors().values()}):
            continue
        original = onnx.numpy_helper.to_array(source)
        if original.dtype == values.dtype and np.array_equal(original, values):
            tensor._values = loader
        del values, original
    # Constants that passes replaced and graph copies they dropped hold loaded arrays in graphsurgeon's reference
    # cycles (a tensor and its readers' lists), which only the collector frees: 0.1 s, worth it for big weights.
    if imported_bytes >= GC_AFTER_BYTES:
        gc.collect()


def tensor_rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None  # a Constant's shape: from its loader, no load
