"""collapse: replace each linear machine by the cheapest exact equivalent, one Conv or one Gemm.

Maths. Seed 000's Theorem 3.1: a network built from linear layers, skip connections, paddings and resamplings is one
affine map f(X) = W·X + B with W = f_W(1) (its linear part) and B = f(0). Seed 002 reads the network as a machine whose
output is the resolvent (id − F)^-1 = Σ_{k≤depth} F^k; a linear machine is a block of it, and autograd's backward pass
accumulates exactly that sum level by level, in reverse topological order. Seed 003 computes such maps with the
adjoint (transposed) operators, which is what reverse mode does. Everything is evaluated in float64 and stored as
float32, so the collapsed network is closer to the exact function than the float32 original.

Strategies, tried per machine (`cnnc.linear.machines`) in this order, each priced by the cost model (`cnnc.cost`)
from the machine's geometry alone before any Jacobian is probed:
1. conv (`cnnc.linear.conv_equivalent`): one input, one output, and a single-conv form, i.e. parallel branches reading the
   same tensor with the same stride and summed (RepVGG / DBB / ACNet / MobileOne: k×k, 1×1, 1×k, k×1, identity, BN,
   average pool), or a chain whose inner convs do not pad. The kernel is read off the machine and proven on random
   inputs, border pixels included; chains with inner zero padding fail that proof and go to strategy 2 or stay.
2. gemm (`cnnc.linear.affine_map`): anything else, including a whole linear network: Flatten/Concat -> Gemm -> Split/Reshape,
   W computed by batched reverse mode (rows as VJPs) when the output is smaller than the input, forward mode
   otherwise, with a progress bar. The batch axis stays dynamic; input and output names, shapes and order are kept.
3. segments: a chain (`cnnc.linear.machines.conv_chain`: a path of three or more convs with per-channel ops between,
   one input, one output) that neither form replaces whole, e.g. MobileNetV2's expand -> dw -> project running on
   into the next block's expand conv (the linear bottleneck), is cut into consecutive segments by the dynamic
   programme shared with `cnnc.homotopy.plan` (`cnnc.cost.segments`) over estimated seconds at batches 1 and 8: a
   segment is one conv (allowed only when its inner convs do not pad and the cost model applies it) or its ops
   kept. Only the chosen segments are probed and proven, each through strategy 1; close segments are recorded.

Preconditions: every op of the machine is affine in its non-constant inputs and supported by the float64 evaluator;
non-batch dims are static; the machine treats batch elements independently (proven: the replacement must reproduce
the machine on a random batch to 1e-9 relative).

Cost. The machine is priced with the nodes onnxruntime would fuse into it (the sole reader of each output, e.g. the
ReLU after Conv+Add) and its replacement with copies of them: a Gemm behind a Reshape breaks a Conv+Add+ReLU fusion,
a merged conv keeps it. `cnnc.cost.compare` on the provider's roofline at batches 1 and 8 gives "pays" (applied),
"loses" (kept) or "close" (kept unless `apply_close` is "all" or names the candidate's id); every weighed rewrite is
recorded in `PassResult.candidates` with the id `cnnc.cost.candidate_id` of the tensors the machine writes (a conv
and a gemm form of one machine share it: `apply_close` applies the first close one). The roofline is the cached
measured one when `cnnc inspect --cost` wrote the cache, else built-in constants (`cnnc.cost.measure`), so a
compile is deterministic for a given cache. A dense W above `max_weight_mb` is refused; `conv=force` / `gemm=force`
skip the cost model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.cost import Cost, Roofline, Verdict, candidate_id, chosen, compare, nodes_cost, roofline
from cnnc.cost.segments import cheapest_segmentation
from cnnc.cost.sketch import conv_sketch, gemm_sketch, region_cost, replacement_cost
from cnnc.cost.verdict import REWRITE_BATCHES
from cnnc.eval import SubgraphFunction, unsupported_reason
from cnnc.linear.affine_map import dense_affine_map, verify_affine_map
from cnnc.linear.conv_equivalent import extract_conv, machine_window
from cnnc.linear.machines import (
    LinearMachine,
    conv_chain,
    cut_tensors,
    find_linear_machines,
    machine_from_nodes,
    split_at_outputs,
    split_at_tensor,
)
from cnnc.pipeline.contract import Candidate, Pass, PassResult, single_producers
from cnnc.pipeline.match import MatchResult, fail, first_match, success

ACTIVATION_BUDGET_BYTES = 4 << 30  # float64 activations kept for one batch of Jacobian probes
MAX_RELATIVE_DEVIATION = 1e-9  # a true affine replacement matches to float64 rounding
BATCHES = REWRITE_BATCHES  # a rewrite must pay at both: latency (batch 1) and throughput (batch 8)


def _per_sample_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    shape = tensor.shape
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    return tuple(shape[1:])


def _numel(shape) -> int:
    return math.prod(d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]) if shape else 0


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


@dataclass
class _Weigher:
    """The cost model as one run of collapse uses it: the roofline, the graph's outputs (always written) and where
    the candidates go."""

    roof: Roofline
    graph_outputs: list
    result: PassResult
    apply_close: str

    def price(self, machine: LinearMachine, sketch, produced) -> tuple[Cost, Cost, Verdict, str]:
        """`machine` and its replacement `sketch` priced with their followers, the verdict, the candidate's id."""
        before = region_cost(machine.nodes, machine.outputs, self.graph_outputs)
        after = replacement_cost(sketch, produced, self.graph_outputs)
        identifier = candidate_id(t.name for node in machine.nodes for t in node.outputs)
        return before, after, compare(before, after, self.roof, BATCHES), identifier

    def seconds(self, cost: Cost) -> float:
        """What a segmentation minimises: estimated seconds per sample, summed over the batches a rewrite must pay
        at."""
        return sum(self.roof.seconds(cost, batch) / batch for batch in BATCHES)

    def weigh(self, machine: LinearMachine, form: str, sketch, produced, force: bool) -> tuple[Candidate, bool]:
        """Price `machine` against its replacement `sketch`; record the candidate; (candidate, apply?)."""
        before, after, verdict, identifier = self.price(machine, sketch, produced)
        candidate = Candidate(identifier, f"{machine.describe()} as {form}", verdict.kind, False, verdict.reason,
                              {"before": before.as_dict(), "after": after.as_dict(), "ratio": round(verdict.ratio, 4),
                               "seconds_before": self.roof.seconds(before), "seconds_after": self.roof.seconds(after)})
        self.result.candidates.append(candidate)
        return candidate, force or chosen(verdict, identifier, self.apply_close)


def _pads(conv: gs.Node) -> bool:
    geometry = ir.conv_geometry(conv)
    return geometry.auto_pad not in ("NOTSET", "VALID") or (geometry.auto_pad == "NOTSET" and any(geometry.pads))


def _conv_sketch(machine: LinearMachine):
    """The one-conv replacement of a one-input, one-output machine priced from its geometry before any probe: the
    window gives the kernel; the group is at least the smallest group of the machine's convs (the probe may find a
    larger one, which only costs less). (sketch, produced), or why there is no conv form."""
    source, target = machine.inputs[0], machine.outputs[0]
    if _per_sample_shape(source) is None or _per_sample_shape(target) is None or len(source.shape) != 4:
        return "machine input or output is not a 4-D tensor of known size"
    windows, why = machine_window(machine.nodes, source)
    window = windows.get(id(target)) if windows is not None else None
    if window is None:
        return why or "machine output is not reached from its input"
    cin, cout = source.shape[1], target.shape[1]
    groups = [ir.conv_geometry(n).group for n in machine.nodes if n.op == "Conv"]
    group = math.gcd(min(groups), cin, cout) if groups else math.gcd(cin, cout)
    return conv_sketch(source, target, (cout, cin // group, *window.extent), source.dtype or np.float32)


def _refusal(candidate: Candidate) -> MatchResult:
    return fail(f"{candidate.verdict} by the cost model (candidate {candidate.id}): {candidate.reason}")


@dataclass(frozen=True)
class Collapse(Pass):
    """Each linear machine -> one Conv (branch merge / chain) or one Gemm, exactly, when the cost model says it pays."""

    name = "collapse"
    summary = "replace linear sub-networks by one Conv or one Gemm computed in float64 (seed 000 Thm 3.1)"
    conv: Literal["auto", "force", "off"] = "auto"  # force: ignore the cost model; off: never
    gemm: Literal["auto", "force", "off"] = "auto"
    max_weight_mb: float = 1024.0  # a dense W above this is refused
    provider: str = "cpu"  # whose roofline prices the rewrites
    apply_close: str = ""  # "" keeps every close call, "all" applies them, else candidate ids joined by "+"

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
        weigher = _Weigher(roofline(self.provider, measure=False), list(graph.outputs), result, self.apply_close)
        result.stats["roofline"] = weigher.roof.source
        machines = find_linear_machines(graph, supported=unsupported_reason)
        result.stats["machines"] = len(machines)
        for machine in machines:
            if len(machine.nodes) < 2 or not machine.has_arithmetic:
                continue  # a lone op or pure data movement: nothing to collapse
            why = self._replace_or_segment(graph, machine, weigher)
            if why is None:
                continue
            # No replacement for the whole machine: each output's own piece may still have one.
            pieces = [p for p in split_at_outputs(graph, machine) if len(p.nodes) > 1 and p.has_arithmetic]
            piece_reasons = [self._replace_or_segment(graph, piece, weigher) for piece in pieces]
            if not pieces or any(r is not None for r in piece_reasons):
                result.skip(machine.describe(), why)
        return result

    def _replace_or_segment(self, graph: gs.Graph, machine: LinearMachine, weigher: _Weigher) -> str | None:
        """`_replace`, and when the machine is a conv chain that stays whole, its cheapest segmentation."""
        why = self._replace(graph, machine, weigher)
        groups = conv_chain(machine) if why is not None and self.conv != "off" else None
        if groups is None or len(groups) < 3:  # two convs: the whole chain or each conv alone, both weighed
            return why
        merged = self._segment(graph, machine, groups, weigher)
        return None if merged else f"{why}; segments: none pays and proves exact (every conv kept)"

    def _segment(self, graph: gs.Graph, machine: LinearMachine, groups: list[list[gs.Node]],
                 weigher: _Weigher) -> int:
        """Split the chain `groups` into consecutive segments by the shared DP (`cnnc.cost.segments`) over the
        estimated seconds; a segment is one composed Conv (only when its inner convs do not pad and the cost model
        applies it) or its ops kept. Only the chosen segments are probed. Returns how many were composed."""
        force = self.conv == "force"
        span = {(i, j): [node for group in groups[i:j + 1] for node in group]
                for j in range(len(groups)) for i in range(j + 1)}

        def cost(i: int, j: int) -> float | None:
            if i == j:
                return weigher.seconds(nodes_cost(span[i, j]))
            if any(_pads(node) for group in groups[i + 1:j + 1] for node in group if node.op == "Conv"):
                return None  # an inner conv pads: border pixels differ from one conv (the DBB border bug)
            piece = machine_from_nodes(graph, span[i, j])
            sketched = _conv_sketch(piece) if piece is not None else "no boundary"
            if isinstance(sketched, str):
                return None
            before, after, verdict, identifier = weigher.price(piece, *sketched)
            if not (force or chosen(verdict, identifier, weigher.apply_close)):
                if verdict.kind == "close":  # recorded, so that --auto can measure it and name it in apply_close
                    weigher.result.candidates.append(Candidate(
                        identifier, f"{piece.describe()} as conv (a segment)", verdict.kind, False, verdict.reason,
                        {"before": before.as_dict(), "after": after.as_dict(), "ratio": round(verdict.ratio, 4)}))
                return None
            return weigher.seconds(nodes_cost(sketched[0].nodes))

        _, segments = cheapest_segmentation(len(groups), cost)
        merged = 0
        for i, j in segments:
            piece = machine_from_nodes(graph, span[i, j])
            outcome = self._attempt("conv", graph, piece, weigher)
            where = f"{piece.describe()} (convs {i}..{j} of a chain of {len(groups)})"
            if outcome:
                weigher.result.did(f"{where} -> {outcome.value}")
                merged += 1
            else:
                weigher.result.skip(where, outcome.reason)
        return merged

    def _replace(self, graph: gs.Graph, machine: LinearMachine, weigher: _Weigher) -> str | None:
        """Replace `machine` by the first strategy that applies (one Conv, else one Gemm); None on success, else
        why none did."""
        outcome = first_match((strategy, partial(self._attempt, strategy, graph, machine, weigher))
                              for strategy in ("conv", "gemm"))
        if outcome:
            weigher.result.did(f"{machine.describe()} -> {outcome.value}")
            return None
        return outcome.reasons(labelled=True)

    def _attempt(self, strategy: str, graph: gs.Graph, machine: LinearMachine, weigher: _Weigher) -> MatchResult:
        mode = getattr(self, strategy)
        if mode == "off":
            return fail("disabled")
        try:
            return getattr(self, f"_try_{strategy}")(graph, machine, weigher, force=mode == "force")
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

    def _try_conv(self, graph: gs.Graph, machine: LinearMachine, weigher: _Weigher, force: bool) -> MatchResult:
        if len(machine.inputs) != 1 or len(machine.outputs) != 1:
            return fail("needs one input and one output")
        source, target = machine.inputs[0], machine.outputs[0]
        if _per_sample_shape(source) is None or _per_sample_shape(target) is None or len(source.shape) != 4:
            return fail("machine input or output is not a 4-D tensor of known size")
        sketched = _conv_sketch(machine)
        if isinstance(sketched, str):
            return fail(sketched)
        dtype = source.dtype or np.float32
        candidate, apply = weigher.weigh(machine, "conv", *sketched, force=force)
        if not apply:
            return _refusal(candidate)
        function = SubgraphFunction(machine.nodes, machine.inputs, machine.outputs)
        chunk = max(1, ACTIVATION_BUDGET_BYTES // (2 * _activation_bytes(machine)))
        form, why = extract_conv(function, machine.nodes, source, target, chunk=chunk)
        if form is None:
            return fail(why)
        name = target.name + "_merged"
        weight = ir.make_constant(name + "_W", form.weight.astype(dtype), graph)
        bias = ir.make_constant(name + "_B", form.bias.astype(dtype), graph)
        _retire(machine)
        graph.nodes.append(gs.Node("Conv", ir.unique_name(graph, name), {
            "kernel_shape": list(form.weight.shape[2:]), "strides": list(form.strides), "pads": list(form.pads),
            "group": form.group}, inputs=[source, weight, bias], outputs=[target]))
        candidate.applied = True
        return success(f"one Conv {form.weight.shape[2]}×{form.weight.shape[3]}/{form.strides[0]} group {form.group} "
                       f"({candidate.verdict}: {candidate.reason})")

    def _try_gemm(self, graph: gs.Graph, machine: LinearMachine, weigher: _Weigher, force: bool) -> MatchResult:
        shapes = self._shapes(machine)
        if shapes is None:
            return fail("an input or output has unknown or symbolic non-batch dims")
        ins, outs = shapes
        n, m = sum(map(math.prod, ins)), sum(map(math.prod, outs))
        factored = self._try_factored_gemm(graph, machine, weigher, m, n, force)
        if factored is not None:
            return success(factored)
        weight_mb = m * n * 4 / 2**20
        if weight_mb > self.max_weight_mb:
            return fail(f"a dense {m}×{n} W needs {weight_mb:.0f} MB (max_weight_mb={self.max_weight_mb:g})")
        dtype = machine.inputs[0].dtype or np.float32
        candidate, apply = weigher.weigh(machine, "gemm", *gemm_sketch(machine.inputs, machine.outputs, (), dtype),
                                         force=force)
        if not apply:
            return _refusal(candidate)
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
        _emit_gemm(graph, machine, affine.weight, affine.bias, dtype)
        candidate.applied = True
        return success(f"one Gemm {m}×{n} (float64 deviation {deviation:.1g}; {candidate.verdict}: "
                       f"{candidate.reason})")

    def _try_factored_gemm(self, graph: gs.Graph, machine: LinearMachine, weigher: _Weigher, m: int, n: int,
                           force: bool) -> str | None:
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
            match = self._try_gemm(graph, piece, weigher, force)
            if not match:
                return None if not done else \
                    f"factored at {cut.name} (rank {rank}); {'; '.join(done)}; kept {match.reason}"
            done.append(match.value)
        return f"factored at {cut.name} (rank {rank}): " + "; ".join(done) if done else None
