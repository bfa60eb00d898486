"""fold-bn: fold inference-mode BatchNormalization into the neighbouring Conv, ConvTranspose or Gemm.

Maths. In inference form BN is a per-channel affine map on channel axis 1:
    BN(y) = γ·(y − μ)/√(σ² + ε) + β = s·y + t,   s = γ/√(σ² + ε),   t = β − μ·s.
All of it is computed in float64 and cast back to the weight's dtype.
- BN after Conv (W: Cout × Cin/g × k…):       W'[o] = s[o]·W[o],   b' = s·b + t = (b − μ)·s + β.
  This is seed 003's Eq. 7 (w' = γw/√(σ²+ε), b' = β − γμ/√(σ²+ε)) generalised to a conv that has a bias b;
  the two agree when b = 0.
- BN after ConvTranspose (W: Cin × Cout/g × k…): output channel o = g_idx·Cout/g + j, so W'[i, j] = s[o]·W[i, j].
- BN after Gemm  Y = α·A·op(B) + β_g·C:  column n of op(B) times s[n];  C' = s·(β_g·C) + t,  β_g' = 1.
- BN before a Conv without padding:  conv(s·x + t) = conv_{W·s}(x) + Σ_{i,k} W[o,i,k]·t[c(o,i)], where c(o,i) is the
  input channel that weight column i of output o reads (groups respected). Zero padding would read 0 where the BN
  output is t, so a padded conv is never folded this way.
- BN before a Gemm (transA = 0, channels on the K axis): row k of op(B) times s[k];  C' = β_g·C + α·t·op(B).
- A lone BN (no neighbour to fold into, e.g. after a Concat) could become Mul(s) + Add(t) broadcast on axis 1, but
  onnxruntime runs BatchNormalization as one kernel and fuses neither Mul nor Add there: two kernels and an extra
  round trip of the activation (DenseNet-121's 62 BNs after a Concat measured 0.82×). So that rewrite is weighed by
  the cost model (`cnnc.cost`, as in collapse) and applied only when it pays, or when it is close and `apply_close`
  names it ("all" or candidate ids joined by "+"); `force_mul_add` applies it always (for a runtime without
  BatchNormalization). Each weighed BN is a `Candidate` in the result with the id of its output tensor's name.

Preconditions (a BN that fails one is left alone and the reason recorded): inference mode (training_mode = 0 and
only the Y output used), spatial BN, constant γ, β, μ, σ², a finite scale s, and constant weights in the op it folds
into. Folding into a producer needs the BN to be the producer's only reader; a conv whose output also feeds another
consumer keeps its weights and the BN becomes Mul + Add. New weights are always new constants, so a weight shared
with another node is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.cost import candidate_id, chosen, compare, roofline
from cnnc.cost.sketch import Sketch, region_cost, replacement_cost
from cnnc.pipeline.contract import Candidate, Pass, PassResult, single_producers
from cnnc.pipeline.match import MatchResult, fail, first_match, success


def _bn_affine(bn: gs.Node) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """(s, t) in float64 for an inference-mode BN, or (None, reason)."""
    if (training := ir.batch_norm_training_reason(bn)) is not None:
        return None, training
    if int(bn.attrs.get("spatial", 1)) != 1:
        return None, "spatial=0 (per-activation statistics) is not supported"
    params = [ir.constant_value(t) for t in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return None, "scale, bias, mean or variance is not a constant"
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
    if not (gamma.ndim == beta.ndim == mean.ndim == var.ndim == 1) or len({p.size for p in params}) != 1:
        return None, "parameters are not 1-D vectors of one length"
    eps = float(bn.attrs.get("epsilon", 1e-5))
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return None, "scale γ/√(σ²+ε) or shift is not finite (NaN/Inf or negative variance)"
    return (scale, shift), ""


def _axis1(vector: np.ndarray, rank: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast on axis 1 of a rank-`rank` tensor."""
    return vector.reshape((-1,) + (1,) * max(rank - 2, 0))


def _set_input(graph: gs.Graph, node: gs.Node, index: int, hint: str, value: np.ndarray) -> None:
    constant = ir.make_constant(hint, value, graph)
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = constant


def _fold_into_producer(graph: gs.Graph, bn: gs.Node, s: np.ndarray, t: np.ndarray) -> MatchResult:
    """Fold BN into the Conv/ConvTranspose/Gemm that produces its input, else fail with the reason."""
    x = bn.inputs[0]
    producer = ir.sole_producer(x)
    if producer is None or producer.op not in ("Conv", "ConvTranspose", "Gemm"):
        return fail(f"input is produced by {producer.op if producer else 'no node'}, not Conv/ConvTranspose/Gemm")
    if ir.sole_consumer(graph, x) is not bn:
        return fail(f"{producer.op} '{producer.name}' output has another consumer")
    weight = ir.float_constant(producer, 1)[0]
    if weight is None:
        return fail(f"{producer.op} '{producer.name}' weight is not a float constant")
    n = s.size
    if producer.op == "Gemm":
        if not (len(producer.inputs) < 3 or ir.is_empty_input(producer.inputs[2])
                or ir.float_constant(producer, 2)[0] is not None):
            return fail(f"Gemm '{producer.name}' C is not a constant")
        trans_b = int(producer.attrs.get("transB", 0))
        out_features = weight.shape[0] if trans_b else weight.shape[1]
        if weight.ndim != 2 or out_features != n:
            return fail(f"Gemm '{producer.name}' has {out_features} outputs, BN has {n} channels")
        new_w = weight.astype(np.float64) * (s[:, None] if trans_b else s[None, :])
        c = ir.float_constant(producer, 2)[0]
        c_eff = float(producer.attrs.get("beta", 1.0)) * (c.astype(np.float64) if c is not None else np.zeros(n))
        if c_eff.ndim == 0 or (c_eff.ndim == 2 and c_eff.shape[0] == 1):
            c_eff = np.broadcast_to(c_eff, (n,)) if c_eff.ndim == 0 else c_eff[0]  # a row vector: keep it 1-D
        new_c = c_eff * s + t
        producer.attrs["beta"] = 1.0
        bias_dtype = c.dtype if c is not None else weight.dtype
        _set_input(graph, producer, 1, producer.name + "_B_bnfold", new_w.astype(weight.dtype))
        _set_input(graph, producer, 2, producer.name + "_C_bnfold", new_c.astype(bias_dtype))
    else:
        group = int(producer.attrs.get("group", 1))
        if producer.op == "Conv":
            out_channels = weight.shape[0]
            scaled = None
            if out_channels == n:
                scaled = weight.astype(np.float64) * s.reshape((-1,) + (1,) * (weight.ndim - 1))
        else:  # ConvTranspose: W is Cin × Cout/g × k…, output channel o = g_idx·Cout/g + j
            out_channels = weight.shape[1] * group
            scaled = None
            if out_channels == n:
                grouped = weight.astype(np.float64).reshape((group, weight.shape[0] // group) + weight.shape[1:])
                scaled = (grouped * s.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
                          ).reshape(weight.shape)
        if scaled is None:
            return fail(f"{producer.op} '{producer.name}' has {out_channels} output channels, BN has {n}")
        bias = ir.float_constant(producer, 2)[0]
        if len(producer.inputs) > 2 and not ir.is_empty_input(producer.inputs[2]) and bias is None:
            return fail(f"{producer.op} '{producer.name}' bias is not a float constant")
        new_b = (bias.astype(np.float64) if bias is not None else np.zeros(n)) * s + t
        _set_input(graph, producer, 1, producer.name + "_W_bnfold", scaled.astype(weight.dtype))
        _set_input(graph, producer, 2, producer.name + "_B_bnfold", new_b.astype(weight.dtype))
    producer.outputs = list(bn.outputs[:1])  # the producer now writes the BN's output tensor, name and all
    bn.outputs.clear()
    bn.inputs.clear()
    return success(f"folded into {producer.op} '{producer.name}'")


def _fold_into_consumer(graph: gs.Graph, bn: gs.Node, s: np.ndarray, t: np.ndarray) -> MatchResult:
    """Fold BN into the pad-free Conv or Gemm that is its only reader, else fail with the reason."""
    y = bn.outputs[0]
    consumer = ir.sole_consumer(graph, y)
    if consumer is None or consumer.op not in ("Conv", "Gemm") or consumer.inputs[0] is not y:
        return fail("output is not read by exactly one Conv/Gemm data input")
    weight = ir.float_constant(consumer, 1)[0]
    if weight is None:
        return fail(f"{consumer.op} '{consumer.name}' weight is not a float constant")
    n = s.size
    bias = ir.float_constant(consumer, 2)[0]
    if len(consumer.inputs) > 2 and not ir.is_empty_input(consumer.inputs[2]) and bias is None:
        return fail(f"{consumer.op} '{consumer.name}' bias is not a float constant")
    w64 = weight.astype(np.float64)
    if consumer.op == "Conv":
        geometry = ir.conv_geometry(consumer)
        if geometry.has_padding:
            return fail(f"Conv '{consumer.name}' pads its input: the border would read 0 where BN gives t")
        out_channels, in_per_group = weight.shape[:2]
        group = geometry.group
        if in_per_group * group != n:
            return fail(f"Conv '{consumer.name}' reads {in_per_group * group} channels, BN has {n}")
        # channel[o, i]: the input channel that weight column i of output channel o reads.
        channel = (np.arange(out_channels)[:, None] // (out_channels // group)) * in_per_group + \
            np.arange(in_per_group)[None, :]
        spatial = (1,) * (weight.ndim - 2)
        new_w = w64 * s[channel].reshape(channel.shape + spatial)
        shift = (w64.reshape(out_channels, in_per_group, -1).sum(axis=2) * t[channel]).sum(axis=1)
        new_b = (bias.astype(np.float64) if bias is not None else 0.0) + shift
        bias_index, bias_dtype = 2, weight.dtype
    else:
        if int(consumer.attrs.get("transA", 0)) != 0:
            return fail(f"Gemm '{consumer.name}' has transA=1: BN channels are not its K axis")
        trans_b = int(consumer.attrs.get("transB", 0))
        op_b = w64.T if trans_b else w64  # K × N
        if op_b.shape[0] != n:
            return fail(f"Gemm '{consumer.name}' has K={op_b.shape[0]}, BN has {n} channels")
        new_op_b = op_b * s[:, None]
        new_w = new_op_b.T if trans_b else new_op_b
        beta = float(consumer.attrs.get("beta", 1.0))
        alpha = float(consumer.attrs.get("alpha", 1.0))
        new_b = (beta * bias.astype(np.float64) if bias is not None else 0.0) + alpha * (t @ op_b)
        consumer.attrs["beta"] = 1.0
        bias_index, bias_dtype = 2, bias.dtype if bias is not None else weight.dtype
    _set_input(graph, consumer, 1, consumer.name + "_W_bnfold", new_w.astype(weight.dtype))
    _set_input(graph, consumer, bias_index, consumer.name + "_B_bnfold", np.asarray(new_b).astype(bias_dtype))
    consumer.inputs[0] = bn.inputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    return success(f"folded into the following {consumer.op} '{consumer.name}'")


def _mul_add_candidate(graph: gs.Graph, bn: gs.Node, roof, apply_close: str) -> Candidate:
    """The cost model's verdict on rewriting the lone `bn` as Mul + Add (priced with the node that reads it)."""
    x, y = bn.inputs[0], bn.outputs[0]
    sketch = Sketch(x.dtype or np.float32)
    shape = [1, *(x.shape or y.shape or [1, 1])[1:]]
    constant = [1, shape[1] if len(shape) > 1 else 1] + [1] * max(len(shape) - 2, 0)
    scaled = sketch.op("Mul", [sketch.tensor(shape), sketch.weight(constant)], shape)
    shifted = sketch.op("Add", [scaled, sketch.weight(constant)], shape)
    before = region_cost([bn], [y], graph.outputs)
    after = replacement_cost(sketch, {id(y): (y, shifted)}, graph.outputs)
    verdict = compare(before, after, roof, (1, 8))
    identifier = candidate_id([y.name])
    return Candidate(identifier, f"BatchNormalization '{bn.name}' as Mul+Add", verdict.kind,
                     chosen(verdict, identifier, apply_close), verdict.reason,
                     {"before": before.as_dict(), "after": after.as_dict(), "ratio": round(verdict.ratio, 4)})


def _to_mul_add(graph: gs.Graph, bn: gs.Node, s: np.ndarray, t: np.ndarray, candidate: Candidate | None = None
                ) -> MatchResult:
    """Rewrite `bn` as Mul + Add unless the cost model's `candidate` (None: forced) keeps it."""
    x, y = bn.inputs[0], bn.outputs[0]
    rank = ir.tensor_rank(x) or ir.tensor_rank(y)
    if rank is None or rank < 2:
        return fail("input rank is unknown, so the per-channel constants cannot be shaped")
    if candidate is not None and not candidate.applied:
        return fail(f"kept as one kernel: Mul+Add {candidate.verdict} by the cost model (candidate {candidate.id}): "
                    f"{candidate.reason}")
    dtype = x.dtype or y.dtype or ir.constant_value(bn.inputs[1]).dtype
    scaled = gs.Variable(ir.unique_name(graph, bn.name + "_scaled"), dtype=dtype, shape=x.shape)
    scale = ir.make_constant(bn.name + "_scale", _axis1(s, rank).astype(dtype), graph)
    graph.nodes.append(gs.Node("Mul", ir.unique_name(graph, bn.name + "_mul"), inputs=[x, scale], outputs=[scaled]))
    shift = ir.make_constant(bn.name + "_shift", _axis1(t, rank).astype(dtype), graph)
    add = gs.Node("Add", ir.unique_name(graph, bn.name + "_add"), inputs=[scaled, shift], outputs=list(bn.outputs[:1]))
    graph.nodes.append(add)
    bn.outputs.clear()
    bn.inputs.clear()
    return success("rewritten as Mul+Add")


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into Conv / ConvTranspose / Gemm; a lone BN stays unless Mul + Add pays."""

    name = "fold-bn"
    summary = ("fold inference BatchNormalization into the adjacent Conv/ConvTranspose/Gemm (a lone BN stays one "
               "kernel unless Mul+Add pays)")
    into_consumer: bool = True  # also fold a BN into the pad-free Conv/Gemm that follows it
    lone_to_mul_add: bool = True  # weigh Mul + Add for a BN with no foldable neighbour (applied when it pays)
    force_mul_add: bool = False  # rewrite every such BN as Mul + Add whatever the cost model says
    provider: str = "cpu"  # whose roofline prices the Mul + Add rewrite
    apply_close: str = ""  # "" keeps every close call, "all" applies them, else candidate ids joined by "+"

    def requires(self, graph: gs.Graph) -> None:
        # Folding moves the BN's output tensor onto its producer: with two writers of one tensor it would pick one.
        broken = single_producers(graph)
        if broken is not None:
            raise self.precondition(f"the graph is not in single-assignment form: {broken}")

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult()
        roof = roofline(self.provider, measure=False)
        for bn in [node for node in graph.nodes if node.op == "BatchNormalization"]:
            where = f"BatchNormalization '{bn.name}'"
            affine, why = _bn_affine(bn)
            if affine is None:
                result.skip(where, why)
                continue
            s, t = affine
            strategies = [("producer", partial(_fold_into_producer, graph, bn, s, t))]
            if self.into_consumer:
                strategies.append(("consumer", partial(_fold_into_consumer, graph, bn, s, t)))
            if self.lone_to_mul_add or self.force_mul_add:
                strategies.append(("mul-add", partial(self._mul_add, graph, bn, s, t, roof, result)))
            outcome = first_match(strategies)
            if not outcome:
                result.skip(where, outcome.reasons())
            elif outcome.strategy == "mul-add":  # say why neither neighbour could take it
                result.did(f"{where} {outcome.value} ({outcome.reasons()})")
            else:
                result.did(f"{where} {outcome.value}")
        return result

    def _mul_add(self, graph, bn, s, t, roof, result: PassResult) -> MatchResult:
        if self.force_mul_add:
            return _to_mul_add(graph, bn, s, t)
        candidate = _mul_add_candidate(graph, bn, roof, self.apply_close)
        result.candidates.append(candidate)
        return _to_mul_add(graph, bn, s, t, candidate)

    def ensures(self, graph: gs.Graph, result: PassResult) -> None:
        broken = single_producers(graph)
        if broken is not None:
            raise self.postcondition(f"rewiring left the graph broken: {broken}")
        # Every BN is either rewritten (and detached) or reported as skipped with its reason.
        left = sum(1 for node in graph.nodes if node.op == "BatchNormalization" and node.outputs)
        if left != len(result.skipped):
            raise self.postcondition(f"{left} BatchNormalization node(s) remain, {len(result.skipped)} reported")
