"""remove-skip: delete the residual joins whose skip weight is zero (seed 000 §4), and what fed only them.

Maths. A homotopy join computes  y = (1 − t)·F(x) + t·S(x).  At t = 0 the skip term is 0·S(x) = 0, so
y = 1·F(x) = F(x): the Add, the Mul by 0 and the whole shortcut S (an identity read, or a projection conv + BN
that nothing else reads) can go. The scale (1 − t) that stays is 1 at t = 0 and is dropped; any other constant
scale c (a join written with another weight, or the approximate variant below) is folded into the op producing F:
Conv / ConvTranspose W' = c·W, b' = c·b; BatchNormalization γ' = c·γ, β' = c·β; Gemm α' = c·α, β' = c·β.
New weights are new constants (in float64, cast back); a constant shared with another node is never modified.

What counts as a skip weight of exactly 0: an Add (or Sum) operand produced by a chain of Mul by a constant,
Div by a constant, Neg, Identity or a float Cast, in which some constant factor is all zeros (a zero Constant, a
zero initializer, or a constant expression such as Sub(1, 1) that evaluates to zeros). That is what
`cnnc.homotopy` exports at t = 0: Mul(t, S) with the initializer t = 0 (and Mul(Sub(1, t), F) for the branch).

Preconditions (a join that fails one is left alone and the reason recorded):
- the zero factor is a constant, all of it exactly 0 (t ≠ 0 or a non-constant t keeps the join: the pass is exact);
- the join's output has the shape of the operand that stays (a zero operand that broadcasts the other to a larger
  shape is not a no-op), both known;
- one operand stays: if every operand is scaled by 0 the join is a constant 0 and is left for constant folding.
An operand with no constant factor (plain F(x) + x) is never removed. 0·S = 0 holds for finite S; a non-finite
S would make the original output NaN, which the rewritten graph does not reproduce.

remove-skip-approx{tolerance=τ} (approximate, opt-in): also drops skip operands whose constant factors multiply to
at most τ in absolute value (|t| ≤ τ), keeps and folds their (1 − t), measures the output deviation against the
graph before the pass with `cnnc.runtime.deviation` (onnxruntime, CPU, optimisations off, seeded uniform and normal
inputs at batch 1, and 3 when the batch is dynamic) and reports it in `stats`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.pipeline.contract import ApproximatePass, Pass, PassResult
from cnnc.runtime.deviation import output_deviation, random_float_feeds

_TRANSPARENT = ("Identity", "Neg")
_CONSTANT_OPS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _constant(tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
    """The value of a constant tensor, evaluating small constant expressions (Sub(1, t), Cast, Identity...)."""
    value = ir.constant_value(tensor)
    if value is not None or depth > 8:
        return value
    producer = ir.sole_producer(tensor)
    if producer is None:
        return None
    operands = [_constant(t, depth + 1) for t in producer.inputs]
    if any(v is None for v in operands):
        return None
    with np.errstate(all="ignore"):
        if producer.op in _CONSTANT_OPS and len(operands) == 2:
            return _CONSTANT_OPS[producer.op](operands[0], operands[1])
        if producer.op == "Neg" and len(operands) == 1:
            return -operands[0]
        if producer.op == "Identity" and len(operands) == 1:
            return operands[0]
        if producer.op == "Cast" and len(operands) == 1 and tensor.dtype is not None:
            return operands[0].astype(tensor.dtype)
    return None


@dataclass
class _Scaled:
    """operand = (product of `factors`) · base, through the nodes in `chain`."""

    base: gs.Tensor
    factors: list[np.ndarray]

    @property
    def is_exact_zero(self) -> bool:
        return any(f.size > 0 and not np.any(f) for f in self.factors)

    @property
    def bound(self) -> float:
        """max |product of factors| over all elements (an upper bound on the skip weight |t|)."""
        return float(np.prod([np.max(np.abs(f.astype(np.float64))) for f in self.factors])) if self.factors else 1.0


def _scaled(tensor: gs.Tensor) -> _Scaled:
    """Walk back from a join operand through Mul/Div by constants, Neg, Identity and float Casts."""
    factors: list[np.ndarray] = []
    seen = 0
    while seen < 32:
        seen += 1
        producer = ir.sole_producer(tensor)
        if producer is None:
            break
        if producer.op in ("Mul", "Div") and len(producer.inputs) == 2:
            values = [_constant(t) for t in producer.inputs]
            index = 1 if values[1] is not None else 0 if producer.op == "Mul" and values[0] is not None else None
            if index is None or not np.issubdtype(values[index].dtype, np.floating):
                break
            factor = values[index]
            if producer.op == "Div":
                with np.errstate(all="ignore"):
                    factor = np.float64(1.0) / factor.astype(np.float64)
                if not np.all(np.isfinite(factor)):
                    break
            factors.append(factor)
            tensor = producer.inputs[1 - index]
        elif producer.op in _TRANSPARENT and len(producer.inputs) == 1:
            if producer.op == "Neg":
                factors.append(np.asarray(-1.0))
            tensor = producer.inputs[0]
        elif producer.op == "Cast" and tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating):
            tensor = producer.inputs[0]
        else:
            break
    return _Scaled(tensor, factors)


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    shape_a = a.values.shape if isinstance(a, gs.Constant) else a.shape
    shape_b = b.values.shape if isinstance(b, gs.Constant) else b.shape
    return shape_a is not None and shape_b is not None and list(shape_a) == list(shape_b)


def _forward(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor, node: gs.Node) -> None:
    """Make `old` (the output of `node`) an alias of `new`; `node` becomes dead. A graph output keeps its name."""
    if ir.is_graph_output(graph, old) and (any(t is new for t in graph.inputs) or ir.is_graph_output(graph, new)):
        node.op, node.attrs = "Identity", {}  # renaming `new` would change the model's interface
        node.inputs.clear()
        node.inputs.append(new)
        return
    ir.replace_tensor(graph, old, new)
    node.outputs.clear()
    node.inputs.clear()


def _channel_vector(scale: np.ndarray, rank: int | None) -> np.ndarray | None:
    """The scale as a vector over axis 1 (size 1 for a scalar), or None when it varies along another axis."""
    if scale.size == 1:
        return scale.reshape(1)
    if rank is None or rank < 2 or scale.ndim > rank:
        return None
    padded = (1,) * (rank - scale.ndim) + scale.shape
    return scale.reshape(-1) if all(d == 1 for axis, d in enumerate(padded) if axis != 1) else None


def _fold_scale(graph: gs.Graph, mul: gs.Node, branch: gs.Tensor, scale: np.ndarray) -> str:
    """Fold `mul` = branch · scale into the producer of `branch`; returns what happened."""
    out = mul.outputs[0]
    if not _same_shape(out, branch):
        return "its scale broadcasts the branch to a new shape and stays a Mul"
    if np.all(scale == 1):
        _forward(graph, out, branch, mul)
        return "its scale (1 − t) = 1 was dropped"
    producer = ir.sole_producer(branch)
    if producer is None or ir.sole_consumer(graph, branch) is not mul:
        return "its scale stays a Mul (the branch has no sole producer or another reader)"
    channels = _channel_vector(scale.astype(np.float64), ir.tensor_rank(branch))
    scalar = channels is not None and channels.size == 1

    def replace(index: int, value: np.ndarray, like: np.ndarray) -> None:
        producer.inputs[index] = ir.make_constant(f"{producer.name}_skipscaled", value.astype(like.dtype), graph)

    params = [ir.constant_value(t) if not ir.is_empty_input(t) else None for t in producer.inputs[1:]]
    if producer.op in ("Conv", "ConvTranspose") and params and params[0] is not None and channels is not None:
        weight = params[0]
        group = int(producer.attrs.get("group", 1))
        out_channels = weight.shape[0] if producer.op == "Conv" else weight.shape[1] * group
        if not scalar and (producer.op == "ConvTranspose" or channels.size != out_channels):
            return f"its per-channel scale does not match {producer.op} '{producer.name}' and stays a Mul"
        bias = params[1] if len(params) > 1 else None
        if len(params) > 1 and bias is None and not ir.is_empty_input(producer.inputs[2]):
            return f"{producer.op} '{producer.name}' has a non-constant bias; the scale stays a Mul"
        shape = (-1,) + (1,) * (weight.ndim - 1)
        replace(1, weight.astype(np.float64) * (channels.reshape(shape) if not scalar else channels[0]), weight)
        if bias is not None:
            replace(2, bias.astype(np.float64) * channels, bias)
    elif producer.op == "BatchNormalization" and channels is not None and len(producer.outputs) == 1 and \
            params[0] is not None and params[1] is not None and channels.size in (1, params[0].size):
        replace(1, params[0].astype(np.float64) * channels, params[0])
        replace(2, params[1].astype(np.float64) * channels, params[1])
    elif producer.op == "Gemm" and scalar:
        producer.attrs["alpha"] = float(producer.attrs.get("alpha", 1.0)) * float(channels[0])
        producer.attrs["beta"] = float(producer.attrs.get("beta", 1.0)) * float(channels[0])
    else:
        return f"its scale stays a Mul (producer {producer.op} '{producer.name}' cannot absorb it)"
    producer.outputs = [out]  # the producer now writes the Mul's output tensor, name and all
    mul.outputs.clear()
    mul.inputs.clear()
    return f"its scale was folded into {producer.op} '{producer.name}'"


def _remove_joins(graph: gs.Graph, tolerance: float, result: PassResult) -> None:
    for join in [n for n in graph.nodes if n.op in ("Add", "Sum")]:
        where = f"{join.op} '{join.name}'"
        if not join.outputs or len(join.inputs) < 2:
            continue
        operands = [_scaled(t) for t in join.inputs]
        drop = [s.is_exact_zero or (tolerance > 0 and s.factors and s.bound <= tolerance) for s in operands]
        if not any(drop):
            scaled = [s for s in operands if s.factors]
            if scaled:
                smallest = min(s.bound for s in scaled)
                result.skip(where, f"no operand is scaled by exactly 0 (smallest constant weight {smallest:g}"
                                   + (f" > tolerance {tolerance:g})" if tolerance > 0 else "): the join stays"))
            continue
        if all(drop):
            result.skip(where, "every operand is scaled by (near) zero: no branch to keep")
            continue
        kept = [t for t, d in zip(join.inputs, drop) if not d]
        if len(kept) > 1:  # a Sum that keeps several operands: only the zero-weighted ones leave
            if not any(_same_shape(join.outputs[0], t) for t in kept):
                result.skip(where, "no operand that stays has the output shape (a dropped one broadcasts)")
                continue
            join.inputs.clear()
            join.inputs.extend(kept)
            result.did(f"{where}: {sum(drop)} zero-weighted operand(s) removed")
            continue
        stay = kept[0]
        if not _same_shape(join.outputs[0], stay):
            result.skip(where, "the output shape differs from (or is unknown for) the operand that stays")
            continue
        weights = ", ".join(f"{s.bound:g}" for s, d in zip(operands, drop) if d)
        branch = _scaled(stay)
        _forward(graph, join.outputs[0], stay, join)
        what = f"{where}: skip operand with weight {weights} removed"
        producer = ir.sole_producer(stay)
        if producer is not None and producer.op == "Mul" and len(branch.factors) >= 1:
            values = [_constant(t) for t in producer.inputs]
            index = 1 if values[1] is not None else 0 if values[0] is not None else None
            if index is not None:
                what += "; " + _fold_scale(graph, producer, producer.inputs[1 - index], values[index])
        result.did(what)


def _apply(graph: gs.Graph, tolerance: float) -> PassResult:
    result = PassResult()
    before = Counter(node.op for node in graph.nodes)
    _remove_joins(graph, tolerance, result)
    if result.changed:
        ir.tidy(graph)
        after = Counter(node.op for node in graph.nodes)
        result.stats["removed_ops"] = dict(before - after)
    return result


@dataclass(frozen=True)
class RemoveSkip(Pass):
    """Remove residual joins whose skip weight is exactly 0, with the shortcut that fed only them."""

    name = "remove-skip"
    summary = "delete skip connections with weight exactly 0 (cnnc.homotopy at t=0) and their projections"

    def run(self, graph: gs.Graph) -> PassResult:
        return _apply(graph, 0.0)


@dataclass(frozen=True)
class RemoveSkipApprox(ApproximatePass):
    """Approximate: also remove joins whose skip weight |t| ≤ tolerance, and report the measured deviation."""

    name = "remove-skip-approx"
    summary = "delete skip connections with |weight| <= tolerance (approximate; reports the output deviation)"
    tolerance: float = 0.01

    def run(self, graph: gs.Graph) -> PassResult:
        if not self.tolerance >= 0:
            raise ValueError(f"remove-skip-approx: tolerance must be >= 0, got {self.tolerance}")
        reference = graph.copy()
        result = _apply(graph, self.tolerance)
        if result.changed:
            try:
                feeds = random_float_feeds(reference)
                measured = output_deviation(reference, graph, feeds)
                result.stats.update({"max_abs_deviation": measured["max_abs"],
                                     "max_rel_deviation": measured["max_rel"],
                                     "inputs": f"{len(feeds)} seeded uniform and normal batches"})
            except Exception as error:  # noqa: BLE001 — onnxruntime cannot run it (custom ops, symbolic spatial sizes, ...)
                result.stats["deviation"] = f"not measured: {type(error).__name__}: {error}"
        return result
