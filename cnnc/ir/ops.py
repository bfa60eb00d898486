"""The one table of facts per ONNX op that cnnc knows: `OPS[op_type] -> OpFacts`.

Every module that asks "what is this op?" reads it here:
- `family`: the module `cnnc/eval/<family>.py` whose `HANDLERS` evaluates the op in float64, or None when the
  evaluator refuses it. `cnnc.eval` builds its handler registry from this column and checks that the family module
  has the handler, and no handler that the table does not list (tests/test_eval.py proves both directions).
- `linear`: None when the op is never affine in its non-constant inputs, else a predicate `node -> reason | None`
  that says when it is (Mul only by a constant, Div only by a constant, Conv only with a constant weight...).
  `collapse` grows its linear machines (cnnc.linear.machines) from `linear_reason`.
- `data_movement`: the op moves or rearranges values without arithmetic, so a machine made only of such ops has
  nothing to collapse.
- `explain`: PIECEWISE_LINEAR when the adjoint back-map identity holds through it (positively homogeneous and
  piecewise linear once biases are leaves; cnnc.analysis.backmap_support checks the remaining conditions), SMOOTH for
  the smooth nonlinearities explain names as such, None otherwise.
- `macs`: how `cnnc.ir.stats.macs` counts the op's multiply-accumulates from ONNX shape inference, or None for the
  memory-bound ops, counted as zero as onnx-tool and Polygraphy do.

This module holds facts only and never imports torch: the handlers live in cnnc/eval. How to add an op is worked
through in ARCHITECTURE.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from cnnc.ir.graph import batch_norm_training_reason, constant_value, is_constant, is_empty_input

PIECEWISE_LINEAR = "piecewise-linear"
SMOOTH = "smooth"

LinearRule = Callable[[gs.Node], "str | None"]
MacCounter = Callable[[onnx.NodeProto, dict], int]


# ----------------------------------------------------------------------------------------------------------------
# When an op is affine in its non-constant inputs


def constant_or_absent(tensor: gs.Tensor) -> bool:
    """A constant, or an omitted optional input: either way not a variable the op could be linear in."""
    return is_empty_input(tensor) or is_constant(tensor)


def always(node: gs.Node) -> str | None:
    return None


def constant_parameters(node: gs.Node) -> str | None:
    """Affine in the first input when every other input (weight, shape, pads, scales, axes) is a constant."""
    if all(constant_or_absent(t) for t in node.inputs[1:]):
        return None
    return f"{node.op} has a non-constant weight, shape or parameter input"


def one_variable(node: gs.Node) -> str | None:
    """MatMul and Mul: linear in one variable, bilinear in two."""
    variables = [t for t in node.inputs if not constant_or_absent(t)]
    return None if len(variables) == 1 else f"{node.op} of two non-constant values is bilinear"


def constant_divisor(node: gs.Node) -> str | None:
    if constant_or_absent(node.inputs[1]) and not constant_or_absent(node.inputs[0]):
        return None
    return "Div by a non-constant value is not linear"


def _inference_batch_norm(node: gs.Node) -> str | None:
    reason = constant_parameters(node)
    if reason is None and batch_norm_training_reason(node) is not None:
        return "BatchNormalization in training mode"
    return reason


def _modes(default: str, *modes: str) -> LinearRule:
    """constant_parameters, and the `mode` attribute one of `modes`."""
    def rule(node: gs.Node) -> str | None:
        reason = constant_parameters(node)
        if reason is None and str(node.attrs.get("mode", default)) not in modes:
            return f"{node.op} mode {node.attrs.get('mode')} is not supported"
        return reason
    return rule


def _inference_dropout(node: gs.Node) -> str | None:
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None and not is_empty_input(training):
        value = constant_value(training)
        if value is None or bool(value):
            return "Dropout in training mode"
    return None if not any(out.outputs for out in node.outputs[1:]) else "Dropout mask is used"


# ----------------------------------------------------------------------------------------------------------------
# Multiply-accumulates at batch 1, from inferred shapes (a symbolic dim counts as 1)


def _numel(dims) -> int:
    # math.prod, not np.prod: called per node, where numpy's array round trip costs ~10 µs (1 s on 100k nodes)
    return math.prod(d if isinstance(d, int) and d > 0 else 1 for d in dims) if dims else 1


def _output_dims(node: onnx.NodeProto, shapes: dict):
    return shapes.get(node.output[0]) if node.output else None


def _conv_macs(node: onnx.NodeProto, shapes: dict) -> int:
    """Conv: each output element costs Cin/g·∏k MACs; ConvTranspose: each input element feeds Cout/g·∏k."""
    if len(node.input) < 2:
        return 0
    weight = shapes.get(node.input[1])
    source = _output_dims(node, shapes) if node.op_type == "Conv" else shapes.get(node.input[0])
    return _numel(source) * _numel(weight[1:]) if weight and source else 0


def _matmul_macs(node: onnx.NodeProto, shapes: dict) -> int:
    """Gemm / MatMul: K per output element."""
    if len(node.input) < 2:
        return 0
    a, out = shapes.get(node.input[0]), _output_dims(node, shapes)
    if not (a and out):
        return 0
    trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
    k = a[-2] if trans_a and len(a) >= 2 else a[-1]
    return _numel(out) * (k if isinstance(k, int) and k > 0 else 1)


# ----------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class OpFacts:
    family: str | None = None  # cnnc/eval/<family>.py evaluates it; None: the evaluator refuses it
    linear: LinearRule | None = None  # None: never affine; else when it is (None from the rule = affine)
    data_movement: bool = False
    explain: str | None = None  # PIECEWISE_LINEAR, SMOOTH or None
    macs: MacCounter | None = None


_PL = PIECEWISE_LINEAR
_MOVES = {"family": "tensor", "data_movement": True, "explain": _PL}

OPS: dict[str, OpFacts] = {
    # weighted ops
    "Conv": OpFacts("conv", constant_parameters, explain=_PL, macs=_conv_macs),
    "ConvTranspose": OpFacts("conv", constant_parameters, explain=_PL, macs=_conv_macs),
    "Gemm": OpFacts("arithmetic", constant_parameters, explain=_PL, macs=_matmul_macs),
    "MatMul": OpFacts("arithmetic", one_variable, explain=_PL, macs=_matmul_macs),
    "BatchNormalization": OpFacts("arithmetic", _inference_batch_norm),
    # elementwise arithmetic
    "Add": OpFacts("arithmetic", always, explain=_PL),
    "Sub": OpFacts("arithmetic", always, explain=_PL),
    "Mul": OpFacts("arithmetic", one_variable, explain=_PL),
    "Div": OpFacts("arithmetic", constant_divisor, explain=_PL),
    # padding and resampling
    "Pad": OpFacts("resize", _modes("constant", "constant", "reflect", "edge"), explain=_PL),
    "Resize": OpFacts("resize", _modes("nearest", "nearest", "linear"), explain=_PL),
    "Upsample": OpFacts("resize", explain=_PL),
    # pooling and reductions
    "AveragePool": OpFacts("pool", always, explain=_PL),
    "GlobalAveragePool": OpFacts("pool", always, explain=_PL),
    "MaxPool": OpFacts("pool", explain=_PL),
    "ReduceMean": OpFacts("pool", constant_parameters, explain=_PL),
    "ReduceSum": OpFacts("pool", constant_parameters, explain=_PL),
    # data movement: linear outright, or once the shape / axes / split / slice parameters are constants
    **{op: OpFacts(linear=always, **_MOVES)
       for op in ("Concat", "Flatten", "Transpose", "SpaceToDepth", "DepthToSpace", "Identity")},
    **{op: OpFacts(linear=constant_parameters, **_MOVES) for op in ("Split", "Slice", "Reshape", "Squeeze", "Unsqueeze")},
    "Dropout": OpFacts(linear=_inference_dropout, **_MOVES),
    # activations
    "Relu": OpFacts("activations", explain=_PL),
    "LeakyRelu": OpFacts("activations", explain=_PL),
    "Clip": OpFacts("activations", explain=_PL),
    "Sigmoid": OpFacts("activations", explain=SMOOTH),
    "Tanh": OpFacts("activations", explain=SMOOTH),
    "Softmax": OpFacts("activations", explain=SMOOTH),
    # shapes, indices and constants
    "Shape": OpFacts("shape"),
    "Gather": OpFacts("shape", explain=_PL),
    "Cast": OpFacts("shape", explain=_PL),
    "ConstantOfShape": OpFacts("shape"),
    "Constant": OpFacts("shape"),
    # smooth nonlinearities the evaluator does not run; explain names them
    **{op: OpFacts(explain=SMOOTH) for op in (
        "LogSoftmax", "Gelu", "Erf", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "HardSigmoid",
        "HardSwish", "Swish", "Exp", "Log", "Sqrt", "Pow", "Reciprocal", "Sin", "Cos", "Tan", "Atan", "Asin", "Acos",
        "Sinh", "Cosh", "Asinh", "Acosh", "Atanh")},
}

_NO_FACTS = OpFacts()


def facts(op: str) -> OpFacts:
    """The facts of `op`; an op the table does not know has none (not evaluated, not linear, zero MACs)."""
    return OPS.get(op, _NO_FACTS)


EVALUATED_OPS = frozenset(op for op, f in OPS.items() if f.family is not None)
DATA_MOVEMENT_OPS = frozenset(op for op, f in OPS.items() if f.data_movement)
# Op kinds that are linear in their data input when their rule holds (the rule reads the node, e.g. Mul by a constant).
MAY_BE_LINEAR_OPS = frozenset(op for op, f in OPS.items() if f.linear is not None)
PIECEWISE_LINEAR_OPS = frozenset(op for op, f in OPS.items() if f.explain == PIECEWISE_LINEAR)
SMOOTH_OPS = frozenset(op for op, f in OPS.items() if f.explain == SMOOTH)


def linear_reason(node: gs.Node) -> str | None:
    """None when `node` is affine in its non-constant inputs; otherwise why it is not."""
    rule = facts(node.op).linear
    return f"{node.op} is not linear" if rule is None else rule(node)
