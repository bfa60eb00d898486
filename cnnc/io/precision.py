"""Floating-point precision: the equivalence tolerance of each dtype, and float32 -> float16 conversion.

Tolerance. An output passes the equivalence check when max|candidate − reference| ≤ atol + rtol·max|reference|
(`cnnc.runtime.equivalence`). Rounding error grows with the step (machine epsilon) of the type a model computes
in, so rtol and atol follow the output's dtype (`precision_tolerance`):

    dtype      one step at 1    rtol    atol    why
    float64    2.2e-16 (2^-52)  1e-9    1e-11   collapse accepts a float64 deviation of 1e-9 of the output's scale
    float32    1.2e-7  (2^-23)  1e-4    1e-5    cnnc's original rule: two float32 evaluations of a ResNet-50
                                                differ by about 1e-4 of max|y|
    float16    9.8e-4  (2^-10)  2e-2    2e-3    measured below: deep fp16 nets drift by up to ~10 steps
    bfloat16   7.8e-3  (2^-7)   5e-2    5e-3    a guess, kept tight (not measured: onnxruntime's CPU provider
                                                runs almost no bfloat16 convolution); give --rtol when needed
    integers, bool              0       0       exact

onnxruntime's own kernel tests compare float16 element by element with an absolute threshold of 1e-3 (5e-3 on
CUDA and TensorRT), on values of order 1, one op at a time; a whole network drifts further. Measured here
(onnxruntime 1.31 CPU, calibrated BN, seeded N(0,1) and U[0,1) batches) on cnnc.zoo's ResNet-18 layout with fp16
weights and inputs: at widths 64-512 and 64×64 px the compiled fp16 model differs from the fp16 original by up to
2.4e-3 of max|y| and the fp16 model from the fp32 one by up to 3.7e-3 (the issue measured 7.9e-4 on another); at
widths 16-128 and 32×32 px by 7.9e-3 and 9.6e-3. Two fp16 evaluations of the same function are that far apart
before any rewrite, so rtol 2e-2 (about 20 steps of 2^-10) leaves a margin of 2 on the worst of them and still
refuses a real rewrite bug, which moves outputs by O(1). atol is rtol / 10 for every float type, as float32's
pair. A user's --rtol/--atol replace the table for all dtypes.

Not every network fits in that margin, and it should not: the margin is for rounding, not for a network that
amplifies it. cnnc.zoo's MobileNetV2 and MobileOne-S0 once drifted past it (max rel err 2.9e-2 and 1.6e-1 at 32 px),
and it was not a conversion gap: the float32 model with only its weights rounded to float16 drifted by the same
amount to three digits (onnxruntime's CPU provider has no float16 Conv on x86: it runs the converted graph in
float32 behind Casts, so there the drift *is* the weights' rounding), and torch's own `module.half()` as far. Their
random weights were chaotic (a rounding error grew ×1.3 per block), unlike a trained network; cnnc.zoo's
calibration now damps residual branches as trained networks have them (cnnc.zoo.branch_damping), and their fp16
exports pass at 64 px with 6.9e-3 and 5.8e-3 (ResNet-18 1.0e-3). Two zoo nets without residual sums,
ShuffleNetV2 and GoogLeNet, still drift past it on N(0, 1) inputs (2.4e-2, 3.2e-2): their export is refused (exit
1), as it should be; pass --rtol to accept a measured drift knowingly. A network float16 cannot represent (two
branches that cancel: x·1000.3 − x·1000 is 0.5·x with float16 weights) is refused the same way
(tests/test_export.py).

Conversion. `to_fp16` wraps onnxconverter-common's `convert_float_to_float16` (the converter onnxruntime's docs
recommend; onnxslim's fp16 option calls it too, but with its defaults, which clamp weights above 1e4 and leave no
block list). It is called with float16's real limits (max 65504, smallest subnormal 2^-24) so that only values
fp16 cannot hold are clamped, and with a block list of ops that stay float32 behind Casts:

- the converter's own list (Resize, Upsample, Range, TopK, NonMaxSuppression, RoiAlign, CumSum, Min, Max, ...);
- reductions that sum many values and overflow or lose the small terms: ReduceSum, ReduceMean, ReduceSumSquare,
  ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp, ReduceProd;
- shape computations: every node whose non-constant inputs all derive from Shape or Size (a size 4097 is not a
  float16), and every Cast to float32 (the converter would leave its float32 output where it now expects float16).

The result keeps the IR version and opsets and adds only Cast nodes; a converted model that breaks either, or
fails the ONNX checker, raises ModelError. Whether the fp16 model computes the same function is for the
equivalence check to prove (`cnnc compile --precision fp16` does, at the float16 tolerance).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnxconverter_common import float16 as fp16_converter

from cnnc.errors import ModelError, UsageError
from cnnc.io import backend

FLOAT16_MAX = 65504.0
FLOAT16_SMALLEST_SUBNORMAL = 2.0 ** -24


@dataclass(frozen=True)
class Tolerance:
    """max|a − b| ≤ atol + rtol·max|reference| passes; `dtype` names the row of the table it came from."""

    rtol: float
    atol: float
    dtype: str

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "rtol": self.rtol, "atol": self.atol}


TOLERANCES: dict[str, Tolerance] = {t.dtype: t for t in (
    Tolerance(1e-9, 1e-11, "float64"),
    Tolerance(1e-4, 1e-5, "float32"),
    Tolerance(2e-2, 2e-3, "float16"),
    Tolerance(5e-2, 5e-3, "bfloat16"),
)}
_ALIASES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
            "double": "float64", "float": "float32"}


def dtype_name(dtype) -> str:
    """'float16' for np.float16, np.dtype('float16'), 'fp16' or 'float16'; numpy's name for anything else."""
    if isinstance(dtype, str):
        return _ALIASES.get(dtype.lower(), dtype.lower())
    return np.dtype(dtype).name


def is_float(dtype) -> bool:
    """A floating-point type, numpy's or ml_dtypes' (bfloat16, float8 types: numpy kind 'V')."""
    name = dtype_name(dtype)
    return name in TOLERANCES or name.startswith(("float", "bfloat"))


def precision_tolerance(dtype) -> Tolerance:
    """The default tolerance of outputs of `dtype` (the table above); integers and bool are compared exactly."""
    name = dtype_name(dtype)
    if name in TOLERANCES:
        return TOLERANCES[name]
    if name == "bool" or name.startswith(("int", "uint")):
        return Tolerance(0.0, 0.0, name)
    raise UsageError(f"no default tolerance for tensor({name}) outputs: give --rtol and --atol")


def looser(*tolerances: Tolerance) -> Tolerance:
    """The most permissive of `tolerances`: what a model that rounds to each of their dtypes in turn needs."""
    return max(tolerances, key=lambda t: (t.rtol, t.atol))


# Sums over many values: float16 overflows past 65504 or drops the small terms. Resize, Range and the rest of the
# shape-like ops are already in the converter's own list.
REDUCTIONS = ("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceProd")
DEFAULT_BLOCK_OPS: tuple[str, ...] = tuple(fp16_converter.DEFAULT_OP_BLOCK_LIST) + REDUCTIONS
_SHAPE_SOURCES = ("Shape", "Size")


def shape_computation_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes whose non-constant inputs all derive from Shape/Size outputs (in graph order, which is topological),
    and the Casts to float32; both must stay float32."""
    constants = {init.name for init in graph.initializer}
    derived: set[str] = set()
    found = []
    for node in graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
            continue
        inputs = [name for name in node.input if name and name not in constants]
        from_shapes = node.op_type in _SHAPE_SOURCES or (inputs and all(name in derived for name in inputs))
        if from_shapes:
            derived.update(node.output)
        to_float32 = node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT
                                                    for a in node.attribute)
        if (from_shapes and node.op_type not in _SHAPE_SOURCES) or to_float32:
            found.append(node)
    return found


def _out_of_range(model: onnx.ModelProto, blocked_inputs: set[str]) -> list[str]:
    """Float32 initializers that float16 cannot hold (|v| > 65504): the converter clamps them."""
    names = []
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.name not in blocked_inputs:
            values = onnx.numpy_helper.to_array(init)
            if values.size and float(np.max(np.abs(values[np.isfinite(values)]), initial=0.0)) > FLOAT16_MAX:
                names.append(init.name)
    return names


def to_fp16(model: onnx.ModelProto, keep_io_types: bool = True,
            block_ops: tuple[str, ...] | list[str] = DEFAULT_BLOCK_OPS, notes: list[str] | None = None
            ) -> onnx.ModelProto:
    """A float16 copy of `model` (weights and activations; `keep_io_types`: float32 inputs and outputs, cast at the
    borders). Ops in `block_ops` and shape computations stay float32 behind Casts. `notes` (if given) receives a
    line per initializer clamped to ±65504. `model` is not modified."""
    work = copy.deepcopy(model)
    for index, node in enumerate(work.graph.node):  # the converter blocks nodes by name
        if not node.name:
            node.name = f"cnnc_fp16_node_{index}"
    block_nodes = [node.name for node in shape_computation_nodes(work.graph)]
    blocked_inputs = {name for node in work.graph.node if node.op_type in block_ops or node.name in block_nodes
                      for name in node.input}
    if notes is not None:
        notes.extend(f"initializer '{name}' has values beyond float16's range ±65504: clamped"
                     for name in _out_of_range(work, blocked_inputs))
    try:
        with warnings.catch_warnings():  # one warning per clamped tensor; the notes above say it once
            warnings.simplefilter("ignore")
            converted = fp16_converter.convert_float_to_float16(
                work, min_positive_val=FLOAT16_SMALLEST_SUBNORMAL, max_finite_val=FLOAT16_MAX,
                keep_io_types=keep_io_types, op_block_list=list(block_ops), node_block_list=block_nodes)
    except ValueError as error:  # "The model is already converted to float16"
        raise UsageError(f"cannot convert to float16: {str(error).splitlines()[0]}") from None
    _check_converted(model, converted)
    return converted


def _check_converted(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """Same IR version and opsets, no op but Cast added, and the full ONNX checker passes."""
    if converted.ir_version != original.ir_version:
        raise ModelError(f"float16 conversion changed the IR version {original.ir_version} -> {converted.ir_version}")
    opsets = {(o.domain, o.version) for o in original.opset_import}
    if {(o.domain, o.version) for o in converted.opset_import} != opsets:
        raise ModelError("float16 conversion changed the opset imports")
    added = {n.op_type for n in converted.graph.node} - {n.op_type for n in original.graph.node} - {"Cast"}
    if added:
        raise ModelError(f"float16 conversion added ops other than Cast: {sorted(added)}")
    backend.check(converted)
