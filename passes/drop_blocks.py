"""drop-blocks (approximate, opt-in): replace residual blocks that barely perturb their input by their skip.

Maths (seed 001). A residual block computes x(l+1) = x(l) + f(x(l)); its scaled perturbation
Δl = ‖x(l+1) − x(l)‖ / ‖x(l)‖, averaged over sample inputs, says how far the block moves the data relative to
where it is. When Δl < eps the block is close to the identity (a projection block: to its shortcut S(x)), and
replacing x(l+1) by x(l) removes the whole branch f at a relative cost of about Δl at that point. The error after
the rest of the network is not bounded by eps (later layers can amplify it), so the pass measures it: it runs the
original and the rewritten graph on the same samples on onnxruntime (`cnnc.runtime.deviation`, the measure that
remove-skip-approx reports too) and reports the largest output deviation, absolute and relative to the largest
|output|, and with labels the top-1 accuracy before and after. The Δl themselves come from the float64 evaluator.

Which blocks: those that `cnnc.analysis.residual_blocks.find_residual_blocks` finds (an Add whose operands are a
skip and a branch of it), measured once on the original graph. Blocks are dropped together: each one's Δl is its own, measured
with every other block in place, which is what `cnnc analyze` reports.

Sample inputs: `inputs` (a .npy file, batch on axis 0), else `random` seeded uniform [0, 1) samples of the graph
input's shape (every dim but the batch must be static). `labels`: a .npy of integer class labels, one per sample,
compared with the argmax over axis 1 of the first output.

Preconditions (a block that fails one is kept, with the reason): its mean Δl is below eps and finite; its skip
operand is not a graph input or output that would be renamed when the block's output is a graph output. The graph
needs exactly one input, the float64 evaluator must run it, and onnxruntime must run the original on the samples
(in batches of the input's batch when that is fixed); otherwise nothing changes and the reason is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.analysis.perturbation import measure_perturbations
from cnnc.analysis.residual_blocks import find_residual_blocks
from cnnc.analysis.samples import load_samples, sample_inputs
from cnnc.errors import CnncError
from cnnc.ir.shapes import is_fixed
from cnnc.pipeline.contract import ApproximatePass, PassResult
from cnnc.runtime.deviation import deviation, run_outputs


def _sample_feeds(graph: gs.Graph, samples: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The samples as onnxruntime feeds: in the input's dtype, in chunks of its batch when that is fixed."""
    tensor = graph.inputs[0]
    declared = (tensor.shape or [None])[0]
    step = int(declared) if is_fixed(declared) else samples.shape[0]
    if step and samples.shape[0] % step:
        raise ValueError(f"{samples.shape[0]} samples do not split into batches of the input's fixed batch {step}")
    values = samples.astype(np.dtype(tensor.dtype) if tensor.dtype is not None else samples.dtype, copy=False)
    return [{tensor.name: values[start:start + step]} for start in range(0, values.shape[0], step)]


def _stacked(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([run[name] for run in runs]) for name in runs[0]}


def _accuracy(outputs: dict, first: str, labels: np.ndarray) -> float:
    logits = outputs[first].reshape(outputs[first].shape[0], -1) if outputs[first].ndim > 2 else outputs[first]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


@dataclass(frozen=True)
class DropBlocks(ApproximatePass):
    """Approximate: drop residual blocks whose mean scaled perturbation on sample inputs is below eps."""

    name = "drop-blocks"
    summary = "replace residual blocks with mean ‖x(l+1)−x(l)‖/‖x(l)‖ < eps by their skip (seed 001)"
    eps: float = 0.01
    inputs: str = ""  # .npy sample inputs; empty: `random` seeded uniform [0, 1) samples
    random: int = 16
    seed: int = 0
    labels: str = ""  # .npy integer labels, one per sample, for the accuracy change

    def _samples(self, graph: gs.Graph) -> np.ndarray:
        return load_samples(graph, self.inputs) if self.inputs else sample_inputs(graph, self.random, self.seed)

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult()
        if len(graph.inputs) != 1:
            result.skip("whole graph", f"{len(graph.inputs)} graph inputs; drop-blocks measures one input")
            return result
        blocks, not_blocks = find_residual_blocks(graph)
        for where, why in not_blocks:
            result.skip(where, why)
        if not blocks:
            result.skip("whole graph", "no residual blocks")
            return result
        try:
            samples = self._samples(graph)
            labels = np.load(self.labels, allow_pickle=False).reshape(-1) if self.labels else None
        except (CnncError, OSError, ValueError) as error:
            result.skip("whole graph", f"no sample inputs: {error}")
            return result
        if labels is not None and labels.shape[0] != samples.shape[0]:
            result.skip("whole graph", f"{labels.shape[0]} labels for {samples.shape[0]} samples")
            return result
        try:
            report = measure_perturbations(graph, samples, eps=self.eps, blocks=blocks)
        except (CnncError, ValueError) as error:  # an op the float64 evaluator does not reproduce exactly
            result.skip("whole graph", f"cannot measure the blocks: {error}")
            return result
        for where, why in report.skipped:
            result.skip(where, why)
        result.stats.update({"eps": self.eps, "samples": int(samples.shape[0]), "blocks": len(blocks),
                             "scaled": {m.block.join: m.scaled for m in report.blocks}})
        try:  # the original must run on onnxruntime, or no deviation could be reported: then nothing is dropped
            feeds = _sample_feeds(graph, samples)
            reference_runs = run_outputs(graph, feeds)
        except Exception as error:  # noqa: BLE001 — custom ops, a batch onnxruntime refuses, samples that do not split ...
            result.skip("whole graph", f"cannot measure the output deviation on onnxruntime: "
                                       f"{type(error).__name__}: {error}")
            return result
        outputs = {t.name for t in graph.outputs}
        dropped = []
        # By output tensor, which ONNX makes unique: node names may be empty or repeated.
        joins = {node.outputs[0].name: node for node in graph.nodes if node.op == "Add" and node.outputs}
        for measure in report.blocks:
            block = measure.block
            where = f"block {measure.index} (Add '{block.join}', {block.kind})"
            if not measure.scaled < self.eps:  # NaN (all-zero inputs) is never below eps
                result.skip(where, f"mean scaled perturbation {measure.scaled:.4g} is not below eps={self.eps:g}")
                continue
            join = joins[block.output]
            skip = join.inputs[block.skip_index]  # as rewired by earlier drops in the chain
            if block.output in outputs and (skip in graph.inputs or skip.name in outputs):
                result.skip(where, f"its output is a graph output and its skip '{skip.name}' is a graph "
                                   "input or output (it would be renamed)")
                continue
            ir.replace_tensor(graph, join.outputs[0], skip)
            join.outputs.clear()
            dropped.append(block.join)
            result.did(f"{where}: replaced by its skip '{skip.name}' (mean scaled perturbation "
                       f"{measure.scaled:.4g} < {self.eps:g})")
        if not dropped:
            return result
        ir.tidy(graph)
        result.stats["dropped"] = dropped
        # The original ran; the rewritten graph failing to run would be a bug, which the pass manager rolls back.
        runs = reference_runs, run_outputs(graph, feeds)
        before, after = (_stacked(run) for run in runs)
        result.stats["output_deviation"] = deviation(*runs)
        if labels is not None:
            first = graph.outputs[0].name
            result.stats["accuracy_before"] = _accuracy(before, first, labels)
            result.stats["accuracy_after"] = _accuracy(after, first, labels)
        measured = result.stats["output_deviation"]
        result.applied.append(f"measured output deviation on {samples.shape[0]} samples: max abs "
                              f"{measured['max_abs']:.3g}, relative to max |y| {measured['max_rel']:.3g}"
                              + (f"; top-1 accuracy {result.stats['accuracy_before']:.4f} -> "
                                 f"{result.stats['accuracy_after']:.4f}" if labels is not None else ""))
        return result
