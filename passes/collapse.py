"""collapse: replace each linear machine by the cheapest exact equivalent, one Conv or one Gemm.

Maths. Seed 000's Theorem 3.1: a network built from linear layers, skip connections, paddings and resamplings is one
affine map f(X) = W·X + B with W = f_W(1) (its linear part) and B = f(0). Seed 002 reads the network as a machine whose
output is the resolvent (id − F)^-1 = Σ_{k≤depth} F^k; a linear machine is a block of it, and autograd's backward pass
accumulates exactly that sum level by level, in reverse topological order. Seed 003 computes such maps with the
adjoint (transposed) operators, which is what reverse mode does. Everything is evaluated in float64 and stored as
float32, so the collapsed network is closer to the exact function than the float32 original.

Strategies, chosen per machine (`cnnc.linear.machines`) by a cost model over MACs and weight bytes:
1. conv (`cnnc.linear.conv_equivalent`): one input, one output, and a single-conv form, i.e. parallel branches reading the
   same tensor with the same stride and summed (RepVGG / DBB / ACNet / MobileOne: k×k, 1×1, 1×k, k×1, identity, BN,
   average pool), or a chain whose inner convs do not pad. The kernel is read off the machine and proven on random
   inputs, border pixels included; chains with inner zero padding fail that proof and go to strategy 2 or stay.
2. gemm (`cnnc.linear.affine_map`): anything else, including a whole linear network: Flatten/Concat -> Gemm -> Split/Reshape,
   W computed by batched reverse mode (rows as VJPs) when the output is smaller than the input, forward mode
   otherwise, with a progress bar. The batch axis stays dynamic; input and output names, shapes and order are kept.

Preconditions: every op of the machine is affine in its non-constant inputs and supported by the float64 evaluator;
non-batch dims are static; the machine treats batch elements independently (proven: the replacement must reproduce
the machine on a random batch to 1e-9 relative). A replacement with more MACs than the machine, or a dense W above
`max_weight_mb`, is refused by the cost model unless the strategy is forced; every kept machine is reported with why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.eval import SubgraphFunction, unsupported_reason
from cnnc.linear.affine_map import dense_affine_map, verify_affine_map
from cnnc.linear.conv_equivalent import extract_conv
from cnnc.linear.machines import (
    DATA_MOVEMENT_OPS,
    LinearMachine,
    cut_tensors,
    find_linear_machines,
    split_at_outputs,
    split_at_tensor,
)
from cnnc.pipeline.contract import Pass, PassResult, single_producers
from cnnc.pipeline.match import MatchResult, fail, first_match, success

ACTIVATION_BUDGET_BYTES = 4 << 30  # float64 activations kept for one batch of Jacobian probes
MAX_RELATIVE_DEVIATION = 1e-9  # a true affine replacement matches to float64 rounding


def _per_sample_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    shape = tensor.shape
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    return tuple(shape[1:])


def _numel(shape) -> int:
    return math.prod(d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]) if shape else 0


def machine_cost(machine: LinearMachine) -> int:
    """Per-sample MACs of the machine; elementwise ops count one per output element, data movement none."""
    total = 0
    for node in machine.nodes:
        if node.op in DATA_MOVEMENT_OPS:
            continue
        out = node.outputs[0].shape
        weight = ir.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if node.op == "Conv" and weight is not None:
            total += _numel(out) * math.prod(weight.shape[1:])
        elif node.op == "ConvTranspose" and weight is not None:
            total += _numel(node.inputs[0].shape) * math.prod(weight.shape[1:])
        elif node.op in ("Gemm", "MatMul") and node.inputs[0].shape:
            total += _numel(out) * int(node.inputs[0].shape[-1] if isinstance(node.inputs[0].shape[-1], int) else 1)
        elif node.op in ("AveragePool",):
            total += _numel(out) * math.prod(ir.conv_geometry(node).kernel_shape)
        elif node.op in ("GlobalAveragePool", "ReduceMean", "ReduceSum"):
            total += _numel(node.inputs[0].shape)  # a reduction reads every input element once
        else:
            total += _numel(out)
    return total


def _activation_bytes(machine: LinearMachine) -> int:
    return 8 * sum(_numel(t.shape) for n in machine.nodes for t in n.outputs) or 8


def _retire(machine: LinearMachine) -> None:
    for node in machine.nodes:
        node.inputs.clear()
        node.outputs.clear()


def _add(graph: gs.Graph, op: str, inputs, output_hint: str, dtype, attrs=None, output=None) -> gs.Variable:
    output = output if output is not None else gs.Variable(ir.unique_name(graph, output_hint), dtype=dtype)
    graph.nodes.append(gs.Node(op, ir.unique_name(graph, output_hint + "_" + op.lower()), attrs or {},
                               inputs=list(inputs), outputs=[output]))
    return output


def _emit_gemm(graph: gs.Graph, machine: LinearMachine, weight: np.ndarray, bias: np.ndarray, dtype) -> None:
    base = machine.outputs[0].name + "_collapsed"
    flats = []
    for tensor in machine.inputs:
        flats.append(tensor if len(tensor.shape) == 2 else _add(graph, "Flatten", [tensor], base + "_in", dtype,
                                                                 {"axis": 1}))
    x = flats[0] if len(flats) == 1 else _add(graph, "Concat", flats, base + "_cat", dtype, {"axis": 1})
    shapes = [_per_sample_shape(t) for t in machine.outputs]
    single_flat = len(machine.outputs) == 1 and len(shapes[0]) == 1
    y = _add(graph, "Gemm", [x, ir.make_constant(base + "_W", weight.astype(dtype), graph),
                             ir.make_constant(base + "_B", bias.astype(dtype), graph)], base, dtype,
             {"transB": 1}, output=machine.outputs[0] if single_flat else None)
    if single_flat:
        return
    parts = [y]
    if len(machine.outputs) > 1:
        split = [math.prod(s) for s in shapes]
        # A flat output is written by the Split itself; others get a Reshape below.
        parts = [tensor if len(shape) == 1 else gs.Variable(ir.unique_name(graph, f"{base}_part{i}"), dtype=dtype)
                 for i, (tensor, shape) in enumerate(zip(machine.outputs, shapes))]
        if (graph.opset or 13) >= 13:  # opset 13 moved `split` from an attribute to an input
            attrs, inputs = {"axis": 1}, [y, ir.make_constant(base + "_split", np.array(split, np.int64), graph)]
        else:
            attrs, inputs = {"axis": 1, "split": split}, [y]
        graph.nodes.append(gs.Node("Split", ir.unique_name(graph, base + "_split"), attrs, inputs=inputs,
                                   outputs=parts))
    for part, tensor, shape in zip(parts, machine.outputs, shapes):
        if len(shape) > 1:
            target = ir.make_constant(base + "_shape", np.array((-1,) + shape, np.int64), graph)
            _add(graph, "Reshape", [part, target], base, dtype, output=tensor)


@dataclass(frozen=True)
class Collapse(Pass):
    """Each linear machine -> one Conv (branch merge / chain) or one Gemm, exactly, by cost."""

    name = "collapse"
    summary = "replace linear sub-networks by one Conv or one Gemm computed in float64 (seed 000 Thm 3.1)"
    conv: Literal["auto", "force", "off"] = "auto"  # force: ignore the cost model; off: never
    gemm: Literal["auto", "force", "off"] = "auto"
    max_weight_mb: float = 1024.0  # a dense W above this is refused

    def requires(self, graph: gs.Graph) -> None:
        # A machine's boundary is read off who writes and who reads each tensor: one writer per tensor.
        broken = single_producers(graph)
        if broken is not None:
            raise self.precondition(f"the graph is not in single-assignment form: {broken}")

    def ensures(self, graph: gs.Graph, result: PassResult) -> None:
        # A replacement writes the machine's own output tensors, so every graph output keeps exactly one writer.
        broken = single_producers(graph)
        if broken is not None:
            raise self.postcondition(f"a replacement left the graph broken: {broken}")

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult()
        machines = find_linear_machines(graph, supported=unsupported_reason)
        result.stats["machines"] = len(machines)
        for machine in machines:
            if len(machine.nodes) < 2 or not machine.has_arithmetic:
                continue  # a lone op or pure data movement: nothing to collapse
            why = self._replace(graph, machine, result)
            if why is None:
                continue
            # No replacement for the whole machine: each output's own piece may still have one.
            pieces = [p for p in split_at_outputs(graph, machine) if len(p.nodes) > 1 and p.has_arithmetic]
            piece_reasons = [self._replace(graph, piece, result) for piece in pieces]
            if not pieces or any(r is not None for r in piece_reasons):
                result.skip(machine.describe(), why)
        return result

    def _replace(self, graph: gs.Graph, machine: LinearMachine, result: PassResult) -> str | None:
        """Replace `machine` by the first strategy that applies (one Conv, else one Gemm); None on success, else
        why none did."""
        outcome = first_match((strategy, partial(self._attempt, strategy, graph, machine))
                              for strategy in ("conv", "gemm"))
        if outcome:
            result.did(f"{machine.describe()} -> {outcome.value}")
            return None
        return outcome.reasons(labelled=True)

    def _attempt(self, strategy: str, graph: gs.Graph, machine: LinearMachine) -> MatchResult:
        mode = getattr(self, strategy)
        if mode == "off":
            return fail("disabled")
        try:
            return getattr(self, f"_try_{strategy}")(graph, machine, force=mode == "force")
        except (ValueError, RuntimeError, IndexError) as error:
            # The float64 evaluator or torch refuses the machine at the probe shapes (e.g. a Reshape that
            # hard-codes batch 1): this machine stays, the others are still collapsed.
            return fail(f"evaluation failed: {type(error).__name__}: {str(error).splitlines()[0]}")

    def _shapes(self, machine: LinearMachine):
        ins = [_per_sample_shape(t) for t in machine.inputs]
        outs = [_per_sample_shape(t) for t in machine.outputs]
        if None in ins or None in outs:
            return None
        return ins, outs

    def _try_conv(self, graph: gs.Graph, machine: LinearMachine, force: bool) -> MatchResult:
        if len(machine.inputs) != 1 or len(machine.outputs) != 1:
            return fail("needs one input and one output")
        source, target = machine.inputs[0], machine.outputs[0]
        function = SubgraphFunction(machine.nodes, machine.inputs, machine.outputs)
        chunk = max(1, ACTIVATION_BUDGET_BYTES // (2 * _activation_bytes(machine)))
        form, why = extract_conv(function, machine.nodes, source, target, chunk=chunk)
        if form is None:
            return fail(why)
        old, new = machine_cost(machine), _numel(target.shape) * math.prod(form.weight.shape[1:])
        if new > old and not force:
            return fail(f"one conv would cost {new} MACs per sample, the machine {old}")
        dtype = source.dtype or np.float32
        name = target.name + "_merged"
        weight = ir.make_constant(name + "_W", form.weight.astype(dtype), graph)
        bias = ir.make_constant(name + "_B", form.bias.astype(dtype), graph)
        _retire(machine)
        graph.nodes.append(gs.Node("Conv", ir.unique_name(graph, name), {
            "kernel_shape": list(form.weight.shape[2:]), "strides": list(form.strides), "pads": list(form.pads),
            "group": form.group}, inputs=[source, weight, bias], outputs=[target]))
        return success(f"one Conv {form.weight.shape[2]}×{form.weight.shape[3]}/{form.strides[0]} group {form.group} "
                       f"({new} MACs per sample, was {old})")

    def _try_gemm(self, graph: gs.Graph, machine: LinearMachine, force: bool) -> MatchResult:
        shapes = self._shapes(machine)
        if shapes is None:
            return fail("an input or output has unknown or symbolic non-batch dims")
        ins, outs = shapes
        n, m = sum(map(math.prod, ins)), sum(map(math.prod, outs))
        factored = self._try_factored_gemm(graph, machine, m, n, force)
        if factored is not None:
            return success(factored)
        old, weight_mb = machine_cost(machine), m * n * 4 / 2**20
        if not force and m * n >= old:
            return fail(f"a dense {m}×{n} W costs {m * n} MACs per sample, the machine {old}")
        if weight_mb > self.max_weight_mb:
            return fail(f"a dense {m}×{n} W needs {weight_mb:.0f} MB (max_weight_mb={self.max_weight_mb:g})")
        batch = machine.inputs[0].shape[0]
        if isinstance(batch, int) and batch != 1:
            return fail(f"the batch is fixed at {batch}; W is computed per sample")
        function = SubgraphFunction(machine.nodes, machine.inputs, machine.outputs)
        # Autograd keeps about one copy of the activations for the backward pass, plus the gradients in flight.
        chunk = max(1, min(256, ACTIVATION_BUDGET_BYTES // (2 * _activation_bytes(machine))))
        affine = dense_affine_map(function, ins, outs, chunk=chunk, label=f"collapse {machine.outputs[0].name}")
        deviation = verify_affine_map(function, affine)
        if not deviation <= MAX_RELATIVE_DEVIATION:
            return fail(f"not a per-sample affine map (deviation {deviation:.2g} on a random batch)")
        _retire(machine)
        _emit_gemm(graph, machine, affine.weight, affine.bias, machine.inputs[0].dtype or np.float32)
        return success(f"one Gemm {m}×{n} ({m * n} MACs per sample, was {old}; float64 deviation {deviation:.1g})")

    def _try_factored_gemm(self, graph: gs.Graph, machine: LinearMachine, m: int, n: int, force: bool) -> str | None:
        """W = W2·W1 through the narrowest cut tensor, when two thin Gemms cost less than one m×n Gemm."""
        sizes = [(math.prod(_per_sample_shape(t) or (m * n,)), t) for t in cut_tensors(machine)]
        if not sizes:
            return None
        rank, cut = min(sizes, key=lambda item: item[0])
        if rank * (m + n) >= m * n:
            return None
        first, second = split_at_tensor(graph, machine, cut)
        done = []
        for piece in (first, second):
            if piece is None or len(piece.nodes) < 2 or not piece.has_arithmetic:
                continue  # already a single op (typically the classifier's own Gemm)
            match = self._try_gemm(graph, piece, force)
            if not match:
                return None if not done else \
                    f"factored at {cut.name} (rank {rank}); {'; '.join(done)}; kept {match.reason}"
            done.append(match.value)
        return f"factored at {cut.name} (rank {rank}): " + "; ".join(done) if done else None
