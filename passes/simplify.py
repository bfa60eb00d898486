"""simplify: general graph simplification by a well-kept library, checked before the graph takes it.

Exporters leave work that no CNN-specific pass should redo by hand: shape sub-graphs (Shape→Gather→Unsqueeze→
Concat→Reshape) on static dims, Reshape/Transpose chains, Casts to the type a tensor already has, dead nodes, and
constants written twice. This pass hands the graph to one library and takes back what it returns, in place:

- `onnxslim` (default, a dependency of cnnc): pure Python over onnx; constant folding, dead-node and common
  sub-expression elimination, weight tying, and fusions (Conv+BN/Mul/Add, Gemm, Pad+Conv) into standard ops.
- `onnxsim` (optional extra): constant folding and onnx-optimizer passes; it refuses domains it has no schema for.
- `ort`: onnxruntime's offline optimisation (`SessionOptions.optimized_model_filepath`) at ORT_ENABLE_BASIC, the
  level whose rewrites stay in the standard ONNX domain; EXTENDED writes onnxruntime's own fused ops
  (com.microsoft FusedConv, ...), which other runtimes cannot load, so it is not offered here.
The choice of default is measured in bench/simplifiers.py (results in bench/results/simplifiers-*).

Why it is exact. The libraries' rewrites are meant to keep the function (up to float rounding: a Conv+BN fusion
rounds once more, as fold-bn does); this pass does not take that on trust. The library's model is taken only if

1. its graph inputs are the input's: names, order, element types and dims (a symbolic dim stays the same symbol:
   no shape is specialised; no input shape is ever given to the library);
2. its graph outputs keep their names, order and element types, and no output dim that was a named symbol became
   a number;
3. its default-domain opset is the input's, and it imports no domain the input did not (portability);
4. it has no more nodes than the input, its constants (initializers, Constant nodes) take at most the input's bytes
   + 1 % + 1 KiB, and it is smaller in one of the two (else there was nothing to simplify and the graph is left
   exactly as it was);
5. (`check=True`, a graph with custom-domain ops, which the library cannot see into, or constants up to
   `prove_below_mb`, 16 MB by default; above that `cnnc.compile` still proves the whole result, without two more
   copies of the weights here) onnxruntime runs both on the seeded inputs of `cnnc.runtime.equivalence` (batch 1 and 3 when the batch is
   symbolic) and every output agrees at the default tolerance.

Memory. The pass holds up to two further copies of the weights on top of the graph's: its export, which the library
may modify, and the library's result (the conditions read a copy without values). Models whose constants exceed
`max_weight_mb` (default 128: ResNet-50 and ConvNeXt-tiny are simplified, VGG-11 is not) are therefore left to the
CNN passes, with that reason, so that a compile stays within two copies of the weights plus 0.5 GB
(bench/memory.py, tests/test_big_models.py); a memory-bounded simplification (weights kept external throughout) is
open work.

Time. onnxslim takes about 0.7 ms a node on the 2-core bench machine, twice that while other jobs share it
(bench/scale.py: 6.9 s for a 10k-node chain; Python over its own onnx-graphsurgeon, three imports of the graph and
a symbolic shape inference), twice all of cnnc's own work on the graph (~0.3 ms a node). Above `max_nodes`
(default 15,000, where a compile with it passes 30 s on the shared machine; ten times the largest zoo export) the
pass skips with that reason; the CNN passes still run, and `simplify{max_nodes=N}` raises the limit. onnxslim's
Conv+BN fusion also rescans every tensor for each BN it fuses, about 2.5 µs a node per BN (a 3,000-node
Conv→BN→Relu chain: 7 s; 9,000 nodes: 70 s); above `max_fusion_work` (nodes × BNs, default 4,000,000, about 10 s)
the pass skips, and fold-bn folds the BNs in linear time.

Anything else — the library missing or raising, a model over protobuf's 2 GB (every library here works on an
in-memory ModelProto), constants above `max_weight_mb`, a custom-domain op that onnxruntime cannot run so that (5)
cannot be proven — leaves the graph untouched with one reason in the result.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from cnnc import ir
from cnnc.io import backend as emit
from cnnc.ir.weightless import copy_fields, serialized_size, tensor_nbytes, without_data
from cnnc.pipeline.contract import Pass, PassResult
from cnnc.runtime.equivalence import check_equivalence
from cnnc.runtime.session import first_line

BACKENDS = ("onnxslim", "onnxsim", "ort")
# The library's constants (initializers and Constant nodes) may grow by this fraction plus this many bytes (constant
# folding can write a folded tensor larger than the sub-graph that made it: a shape of a few int64s on a tiny
# graph); more and the input is kept. Value infos and names are not counted: libraries annotate freely.
SIZE_SLACK = 0.01
SIZE_SLACK_BYTES = 1024


# onnxslim's weight tying compares every pair of small constants of one shape (O(n²) tensor comparisons: 166 s for
# the 2,500 1x1 weights of a 5k-node chain, hours at 100k; bench/scale.py). Above this many constants of one shape it
# is skipped; its other rewrites still run.
WEIGHT_TYING_GROUP_LIMIT = 256
MAX_NODES = 15_000  # above this many nodes the pass skips (see "Time" in the module docstring)
MAX_FUSION_WORK = 4_000_000  # nodes x BatchNormalizations above which the pass skips (onnxslim: ~10 s)
_WEIGHT_TYING_MAX_ELEMENTS = 1000  # onnxslim ties only constants with fewer elements (its THRESHOLD default)


def _largest_small_constant_group(model: onnx.ModelProto) -> int:
    shapes: dict[tuple, int] = {}
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) < _WEIGHT_TYING_MAX_ELEMENTS:
            shapes[tuple(tensor.dims)] = shapes.get(tuple(tensor.dims), 0) + 1
    return max(shapes.values(), default=0)


def run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim  # optional at import time: a missing or broken install is a skip of this pass, not a crash
    # No input_shapes and no model_check: the first would specialise symbolic dims, the second is done below.
    if _largest_small_constant_group(model) > WEIGHT_TYING_GROUP_LIMIT:
        return onnxslim.slim(model, skip_optimizations=["weight_tying"])
    return onnxslim.slim(model)


def run_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim  # optional dependency (the `peers` extra): its absence is a skip of this pass
    # check_n=0: equivalence is proven here on onnxruntime; no overwrite_input_shapes: symbolic dims stay symbolic.
    simplified, _ = onnxsim.simplify(model, check_n=0)
    return simplified


def run_ort_basic(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's offline optimisation at ORT_ENABLE_BASIC on the CPU provider, read back from its file."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="cnnc-simplify-") as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load_model(options.optimized_model_filepath)


RUNNERS = {"onnxslim": run_onnxslim, "onnxsim": run_onnxsim, "ort": run_ort_basic}


def _dims(value: onnx.ValueInfoProto) -> list | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]


def _elem_type(value: onnx.ValueInfoProto) -> int:
    return value.type.tensor_type.elem_type


def interface_change(before: onnx.ModelProto, after: onnx.ModelProto) -> str | None:
    """Why `after` cannot stand in for `before` at the graph boundary and in its opsets (conditions 1-3), else
    None."""
    old_inputs, new_inputs = before.graph.input, after.graph.input
    if [v.name for v in old_inputs] != [v.name for v in new_inputs]:
        return (f"graph inputs changed from {[v.name for v in old_inputs]} to {[v.name for v in new_inputs]}")
    for old, new in zip(old_inputs, new_inputs):
        if _elem_type(old) != _elem_type(new) or _dims(old) != _dims(new):
            return f"input '{old.name}' changed from {_dims(old)} to {_dims(new)} (type {_elem_type(new)})"
    old_outputs, new_outputs = before.graph.output, after.graph.output
    if [v.name for v in old_outputs] != [v.name for v in new_outputs]:
        return (f"graph outputs changed from {[v.name for v in old_outputs]} to {[v.name for v in new_outputs]}")
    for old, new in zip(old_outputs, new_outputs):
        if _elem_type(old) != _elem_type(new):
            return f"output '{old.name}' changed element type {_elem_type(old)} -> {_elem_type(new)}"
        old_dims, new_dims = _dims(old) or [], _dims(new) or []
        if len(old_dims) == len(new_dims) and any(isinstance(a, str) and isinstance(b, int)
                                                  for a, b in zip(old_dims, new_dims)):
            return f"output '{old.name}' was specialised from {old_dims} to {new_dims}"
        if len(old_dims) == len(new_dims) and any(isinstance(a, int) and isinstance(b, int) and a != b
                                                  for a, b in zip(old_dims, new_dims)):
            # onnxslim's own shape inference can be wrong (Split-18 num_outputs: ⌊n/k⌋ chunks, fuzz seed 101)
            return f"output '{old.name}' changed shape from {old_dims} to {new_dims}"
    old_opsets = {o.domain or "ai.onnx": o.version for o in before.opset_import}
    new_opsets = {o.domain or "ai.onnx": o.version for o in after.opset_import}
    if new_opsets.get("ai.onnx") != old_opsets.get("ai.onnx"):
        return f"default-domain opset changed from {old_opsets.get('ai.onnx')} to {new_opsets.get('ai.onnx')}"
    used = {node.domain or "ai.onnx" for node in after.graph.node}
    foreign = sorted(used - set(old_opsets))
    if foreign:
        return f"the result uses op domain(s) {foreign} that the input does not import (not portable)"
    return None


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's constants: initializers and the `value` of Constant nodes (top-level graph)."""
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" and not n.domain
                 for a in n.attribute if a.name == "value"]
    return sum(tensor_nbytes(t) for t in [*model.graph.initializer, *constants])


def _constant_nbytes(constant: gs.Constant) -> int:
    """Bytes of a constant without loading it (graphsurgeon keeps an imported initializer lazy until read)."""
    values = constant._values
    return tensor_nbytes(values.tensor) if isinstance(values, gs.ir.tensor.LazyValues) else values.nbytes


def _without_values(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its initializers' values dropped (names, types and dims kept): the interface and the sizes."""
    light = onnx.ModelProto()
    copy_fields(model, light, skip=("graph",))
    copy_fields(model.graph, light.graph, skip=("initializer",))
    light.graph.initializer.extend(without_data(t) for t in model.graph.initializer)
    return light


def replace_graph(graph: gs.Graph, new: gs.Graph) -> None:
    """Make `graph` hold `new`'s nodes, boundary tensors, opsets and functions (the pass contract rewrites the
    graph object it is given; the manager and the API keep using that object)."""
    graph.nodes = new.nodes
    graph.inputs = new.inputs
    graph.outputs = new.outputs
    graph.opset = new.opset
    graph.import_domains = new.import_domains
    graph.functions = new.functions
    ir.forget_names(graph)  # another graph's names now


@dataclass(frozen=True)
class Simplify(Pass):
    """General simplification by onnxslim, onnxsim or onnxruntime (BASIC), taken only when checked; see the
    module docstring for the conditions."""

    name = "simplify"
    summary = ("general simplification by a library (shape sub-graphs, Reshape/Transpose chains, casts, dead and "
               "duplicated constants), checked on onnxruntime")
    backend: Literal["onnxslim", "onnxsim", "ort"] = "onnxslim"
    # Condition 5 inside the pass: always with `check`, else up to `prove_below_mb` of constants, where it costs a
    # fraction of a second. Proven here, a library's mistake costs only this pass (skipped, with the reason), not the
    # whole compile; above that size `cnnc.compile`'s own check still proves the result (and --verify-each names
    # this pass), without two more copies of the weights.
    check: bool = False
    prove_below_mb: float = 16.0
    max_weight_mb: float = 128.0  # above this many MB of constants the pass skips (see "Memory" above)
    max_nodes: int = MAX_NODES  # above this many nodes the pass skips (see "Time" above)
    max_fusion_work: int = MAX_FUSION_WORK  # nodes x BatchNormalizations above which the pass skips ("Time")

    def requires(self, graph: gs.Graph) -> None:
        if self.backend not in RUNNERS:
            raise self.precondition(f"unknown backend {self.backend!r} (one of {', '.join(BACKENDS)})")

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult()
        if len(graph.nodes) > self.max_nodes:
            result.skip("whole graph", f"{len(graph.nodes)} nodes, above the node limit max_nodes={self.max_nodes} "
                        f"(simplify{{max_nodes=N}} raises it): {self.backend} takes ~0.7 ms a node, twice all of "
                        "cnnc's own work on the graph")
            return result
        norms = sum(node.op == "BatchNormalization" for node in graph.nodes)
        if len(graph.nodes) * norms > self.max_fusion_work:
            result.skip("whole graph", f"{len(graph.nodes)} nodes x {norms} BatchNormalizations, above "
                        f"max_fusion_work={self.max_fusion_work} (simplify{{max_fusion_work=N}} raises it): "
                        f"{self.backend} rescans every tensor for each Conv+BN it fuses (~2.5 µs a node per BN; "
                        "fold-bn folds them in linear time instead)")
            return result
        weight_mb = sum(_constant_nbytes(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)) / 2**20
        if weight_mb > self.max_weight_mb:
            result.skip("whole graph", f"{weight_mb:.0f} MB of constants, above max_weight_mb={self.max_weight_mb:g}: "
                        f"{self.backend} would hold several copies of them at once")
            return result
        exported = emit.to_model(graph)
        size_before = serialized_size(exported)
        if size_before > emit.EXTERNAL_DATA_THRESHOLD_BYTES:
            result.skip("whole graph", f"model of {size_before / 2**30:.2f} GB: {self.backend} works on an "
                        "in-memory ModelProto, which protobuf limits to 2 GB")
            return result
        before = _without_values(exported)  # what conditions 1-4 read, without a second copy of the weights
        start = time.perf_counter()
        try:
            simplified = RUNNERS[self.backend](exported)  # the library may modify its input: it is not read again
        except ImportError as missing:
            result.skip("whole graph", f"{self.backend} is not installed ({first_line(missing)})")
            return result
        except Exception as error:  # noqa: BLE001 - a third-party library: whatever it raises is a skip
            result.skip("whole graph", f"{self.backend} failed: {type(error).__name__}: {first_line(error)}")
            return result
        finally:
            del exported
        result.stats["library_seconds"] = round(time.perf_counter() - start, 6)
        simplified.ir_version = before.ir_version  # what onnxruntime accepts (cnnc.io.target), as to_model stamps
        why_not = interface_change(before, simplified) or self._not_smaller(before, simplified, result)
        # A custom-domain op is opaque to the library: its rewrites around it are taken only when proven here.
        custom = any(n.domain not in ("", "ai.onnx") for n in before.graph.node)
        if why_not is None and (self.check or custom or weight_mb <= self.prove_below_mb):
            why_not = self._prove(emit.to_model(graph), simplified, result)  # the graph is still the input here
        if why_not is not None:
            result.skip("whole graph", why_not)
            return result
        replace_graph(graph, gs.import_onnx(simplified))
        stats = result.stats
        result.did(f"{self.backend}: {stats['nodes_before']} -> {stats['nodes_after']} nodes, constants "
                   f"{stats['tensor_bytes_before']} -> {stats['tensor_bytes_after']} bytes")
        return result

    def _not_smaller(self, before: onnx.ModelProto, after: onnx.ModelProto, result: PassResult) -> str | None:
        """Condition 4; records the counts in `result.stats`."""
        nodes_before, nodes_after = len(before.graph.node), len(after.graph.node)
        bytes_before, bytes_after = tensor_bytes(before), tensor_bytes(after)
        result.stats.update(nodes_before=nodes_before, nodes_after=nodes_after, tensor_bytes_before=bytes_before,
                            tensor_bytes_after=bytes_after)
        if nodes_after > nodes_before:
            return f"{self.backend} gave {nodes_after} nodes for {nodes_before}: the input is kept"
        if bytes_after > bytes_before * (1 + SIZE_SLACK) + SIZE_SLACK_BYTES:
            return (f"{self.backend} grew the constants from {bytes_before} to {bytes_after} bytes (constant "
                    "folding wrote tensors larger than the sub-graphs that made them): the input is kept")
        if nodes_after == nodes_before and bytes_after >= bytes_before:
            return f"nothing to simplify: {self.backend} removed no node and no constant byte"
        return None

    def _prove(self, before: onnx.ModelProto, after: onnx.ModelProto, result: PassResult) -> str | None:
        """Condition 5, on onnxruntime; its time is reported apart from the library's."""
        start = time.perf_counter()
        try:
            report = check_equivalence(before, after)
        except Exception as error:  # noqa: BLE001 - CnncError or onnxruntime's own types: not proven
            return f"not proven on onnxruntime, the input is kept: {first_line(error)}"
        finally:
            result.stats["check_seconds"] = round(time.perf_counter() - start, 6)
        if not report.passed:
            return f"{self.backend}'s result is not equivalent, the input is kept: {report.summary()}"
        return None
