"""What the adjoint back-map (seed 003) holds through: which ops keep u = ⟨x,H_I⟩ + ⟨x_b,H_b⟩ exact, and
which constant inputs are biases (the entries of x_b).

Refused: smooth nonlinearities (Sigmoid, Tanh, GELU, Softmax, ...: the identity needs σ(c) = c·σ'(c), eq. A.14,
which holds only for piecewise-linear σ through 0), products of two activations (degree 2), Clip bounds other than
0 and nonzero pad values (constants that act like biases but are not biases), unfolded BatchNormalization, and
anything the evaluator does not reproduce exactly.
The op families come from the op table (`cnnc.ir.ops`, its `explain` column); this module checks the
conditions on attributes and operands that the table cannot state per op type.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from cnnc.eval import unsupported_reason
from cnnc.ir import constant_value, float_constant, is_empty_input
from cnnc.ir.ops import PIECEWISE_LINEAR_OPS, SMOOTH_OPS  # the op table's `explain` column


def _scalar(tensor: gs.Tensor | None) -> float | None:
    if tensor is None or is_empty_input(tensor):
        return None
    value = constant_value(tensor)
    return None if value is None or value.size != 1 else float(value.reshape(-1)[0])


def refusal_reason(node: gs.Node, data: set[str]) -> str | None:
    """Why the identity u = ⟨x,H_I⟩ + ⟨x_b,H_b⟩ would not hold through `node` (a node with a data input)."""
    op = node.op
    here = f"{op} '{node.name}'"
    if op in SMOOTH_OPS:
        return (f"{here} is a smooth nonlinearity: the back-map identity u = <x,H_I> + <x_b,H_b> holds only for "
                f"piecewise-linear activations (ReLU, LeakyReLU, MaxPool; seed 003 eq. A.14)")
    if op == "BatchNormalization":
        return f"{here} is not folded (training mode or non-constant statistics); explain needs BN folded (Eq. 7)"
    if op not in PIECEWISE_LINEAR_OPS:
        reason = unsupported_reason(node)
        return f"{here} is not piecewise linear and positively homogeneous" + (f" ({reason})" if reason else "")
    reason = unsupported_reason(node)
    if reason:
        return f"{here}: {reason}"
    inputs = [t for t in node.inputs if not is_empty_input(t)]
    data_inputs = [t for t in inputs if t.name in data]
    if op in ("Mul", "MatMul") and len(data_inputs) > 1:
        return f"{here} multiplies two activations (degree 2, not positively homogeneous)"
    if op == "Gemm" and len([t for t in inputs[:2] if t.name in data]) > 1:
        return f"{here} multiplies two activations (degree 2, not positively homogeneous)"
    if op == "Div" and len(inputs) > 1 and inputs[1].name in data:
        return f"{here} divides by an activation (not positively homogeneous)"
    if op in ("Conv", "ConvTranspose") and len(inputs) > 1 and inputs[1].name in data:
        return f"{here} has a computed (non-constant) weight"
    if op == "Clip":
        low = node.attrs.get("min") if "min" in node.attrs else _scalar(node.inputs[1] if len(node.inputs) > 1
                                                                         else None)
        high = node.attrs.get("max") if "max" in node.attrs else _scalar(node.inputs[2] if len(node.inputs) > 2
                                                                          else None)
        for bound, name in ((low, "min"), (high, "max")):
            present = (name == "min" and len(node.inputs) > 1 and not is_empty_input(node.inputs[1])) or (
                name == "max" and len(node.inputs) > 2 and not is_empty_input(node.inputs[2]))
            if (bound is None and present) or (bound is not None and bound != 0.0 and math.isfinite(bound)):
                return (f"{here} clips at {name}={bound}: a threshold other than 0 is a constant that is not a "
                        f"bias (ReLU6-style clipping breaks the identity where it saturates)")
    mode = node.attrs.get("mode", "constant")
    if op == "Pad" and (mode.decode() if isinstance(mode, bytes) else mode) == "constant":
        value = node.attrs.get("value") if "value" in node.attrs else _scalar(
            node.inputs[2] if len(node.inputs) > 2 else None)
        if (value is None and len(node.inputs) > 2 and not is_empty_input(node.inputs[2])) or (value or 0.0) != 0.0:
            return f"{here} pads with the constant {value}: a nonzero pad value acts like an unlisted bias"
    return None


def bias_slots(node: gs.Node, data: set[str]) -> list[int]:
    """Input indices of `node` that are biases (constants that enter additively)."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        return [2] if float_constant(node, 2)[0] is not None else []
    if node.op in ("Add", "Sub", "Concat"):
        return [i for i, t in enumerate(node.inputs) if t.name not in data and float_constant(node, i)[0] is not None]
    return []
