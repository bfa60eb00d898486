"""Residual networks as perturbations from identity (seed 001, Hauser): find the blocks, measure them, apply the
stopping rule.

A residual block computes x(l+1) = x(l) + f(x(l)) (Eq. 1). On N sample inputs, for each block l:
    absolute perturbation   ‖x(l+1) − x(l)‖₂             (Eq. 3, the distance the sample travels in the block)
    scaled perturbation     ‖x(l+1) − x(l)‖₂ / ‖x(l)‖₂   (Eq. 2 / Eq. 10, Δl; ≪ 1 means "a perturbation")
each averaged over the N samples (§2.1). A *section* is a run of consecutive blocks at one spatial resolution
(§2). Per section of L blocks: the computational distance d = Σ_l ‖x(l+1) − x(l)‖ (Eq. 4), the scaled distance
d_scaled = Σ_l Δl, the mean scaled perturbation d_scaled / L (Eq. 11), and the stopping rule
L_ε = ceil(d_scaled / ε) (§2.3): the number of blocks that would bring the mean Δl under ε.

Finding blocks in a graph. A join is an `Add` of two data tensors (tensors computed from the graph input).
- Identity skip: one operand a is an ancestor of the other operand b. Then x(l) = a (the block input), the branch
  is b = f(x(l)) and x(l+1) is the Add's output.
- Projection skip (the first block of a section: 1×1 conv or avg-pool + pad shortcut, or `t·x` of a homotopy
  export): neither operand is an ancestor of the other. Their nearest common ancestor x is the block input; the
  skip is the operand reached from x through fewer nodes, all of them linear, and the other is the branch. Then
  x(l) is the skip operand S(x), so that x(l+1) − x(l) is again exactly the branch. Equal lengths, or a skip
  path with a nonlinearity, is not a residual join (an Inception-style sum) and is reported as skipped.
With a post-activation block (ResNet v1, relu(x + f(x))) the measured quantity is ‖f(x)‖/‖x‖ at the join; the
ReLU after it is not part of the perturbation.

Activations are read with the float64 evaluator (`cnnc.eval`), in chunks of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import torch

from cnnc.errors import ModelError, UsageError
from cnnc.eval import SubgraphFunction, topological_order

# Ops that may sit on a projection shortcut: linear in their data input.
_LINEAR_OPS = frozenset({
    "Conv", "ConvTranspose", "BatchNormalization", "Mul", "Div", "Add", "Sub", "Pad", "AveragePool",
    "GlobalAveragePool", "Concat", "Slice", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
    "Dropout", "SpaceToDepth", "DepthToSpace", "Resize", "Upsample", "Gemm", "MatMul", "ReduceMean", "ReduceSum",
    "Split", "Gather",
})


@dataclass(frozen=True)
class ResidualBlock:
    """One residual join: x(l+1) = `output` = `skip` + `branch`, with x(l) = `skip`."""

    join: str  # name of the Add node
    skip: str  # tensor x(l): the block input (identity) or its projection S(x) (projection)
    branch: str  # tensor f(x(l))
    output: str  # tensor x(l+1)
    skip_index: int  # which input of the join is the skip operand (0 or 1)
    kind: str  # "identity" or "projection"
    block_input: str  # the tensor the block starts from (== skip for an identity block)

    def as_dict(self) -> dict:
        return {"join": self.join, "kind": self.kind, "block_input": self.block_input, "skip": self.skip,
                "branch": self.branch, "output": self.output}


def _data_flow(graph: gs.Graph):
    """Topologically ordered nodes, the set of data tensor names, their ancestor sets and longest-path depths."""
    nodes = topological_order(list(graph.nodes))
    data = {t.name for t in graph.inputs}
    ancestors: dict[str, frozenset[str]] = {name: frozenset() for name in data}
    depth = {name: 0 for name in data}
    for node in nodes:
        data_inputs = [t.name for t in node.inputs if t.name in data]
        if not data_inputs:
            continue
        inherited = frozenset().union(*(ancestors[n] | {n} for n in data_inputs))
        level = 1 + max(depth[n] for n in data_inputs)
        for out in node.outputs:
            if out.name:
                data.add(out.name)
                ancestors[out.name] = inherited
                depth[out.name] = level
    return nodes, data, ancestors, depth


def _path_nodes(operand: str, source: str, ancestors: dict, producer: dict) -> list[gs.Node]:
    """The nodes on paths from tensor `source` to tensor `operand` (the operand's producer included)."""
    names = [n for n in ancestors[operand] | {operand} if n == operand or source in ancestors.get(n, ())]
    nodes = {id(producer[n]): producer[n] for n in sorted(names) if n in producer and n != source}
    return list(nodes.values())  # a multi-output node (Split) counts once


def find_residual_blocks(graph: gs.Graph) -> tuple[list[ResidualBlock], list[tuple[str, str]]]:
    """The residual joins of `graph` in topological order, and (where, why) for every Add that is not one."""
    nodes, data, ancestors, depth = _data_flow(graph)
    producer = {t.name: node for node in nodes for t in node.outputs if t.name}
    blocks: list[ResidualBlock] = []
    skipped: list[tuple[str, str]] = []
    for node in nodes:
        if node.op != "Add" or len(node.inputs) != 2 or not node.outputs:
            continue
        a, b = (t.name for t in node.inputs)
        where = f"Add '{node.name}'"
        if a not in data or b not in data:
            continue  # a bias: not a join
        if a == b:
            skipped.append((where, "both operands are the same tensor (x + x is a scaling, not a residual)"))
            continue
        if a in ancestors[b] or b in ancestors[a]:
            skip_index = 0 if a in ancestors[b] else 1
            skip = (a, b)[skip_index]
            blocks.append(ResidualBlock(node.name, skip, (a, b)[1 - skip_index], node.outputs[0].name, skip_index,
                                        "identity", skip))
            continue
        common = (ancestors[a] & ancestors[b])
        if not common:
            skipped.append((where, "its operands share no ancestor: two independent inputs, not a residual join"))
            continue
        block_input = max(common, key=lambda name: (depth[name], name))
        paths = [_path_nodes(operand, block_input, ancestors, producer) for operand in (a, b)]
        lengths = [len(p) for p in paths]
        if lengths[0] == lengths[1]:
            skipped.append((where, (f"both operands are {lengths[0]}-node branches from '{block_input}': "
                                    "no shorter skip path (not a residual join)")))
            continue
        skip_index = 0 if lengths[0] < lengths[1] else 1
        nonlinear = sorted({n.op for n in paths[skip_index] if n.op not in _LINEAR_OPS})
        if nonlinear:
            skipped.append((where, (f"the shorter operand's path from '{block_input}' has nonlinear "
                                    f"{', '.join(nonlinear)}: not a projection shortcut")))
            continue
        blocks.append(ResidualBlock(node.name, (a, b)[skip_index], (a, b)[1 - skip_index], node.outputs[0].name,
                                    skip_index, "projection", block_input))
    return blocks, skipped


# ----------------------------------------------------------------------------------------------------------------
# Sample inputs


def single_float_input(graph: gs.Graph) -> gs.Variable:
    """The graph's one input; analysis tools read one image tensor."""
    if len(graph.inputs) != 1:
        raise UsageError(f"the model has {len(graph.inputs)} inputs; the analysis tools need exactly one")
    return graph.inputs[0]


def sample_inputs(graph: gs.Graph, n: int, seed: int = 0) -> np.ndarray:
    """`n` seeded uniform [0, 1) samples (the pixel range of the papers' data sets) for the graph's input."""
    tensor = single_float_input(graph)
    shape = list(tensor.shape or [])
    if not shape:
        raise UsageError(f"input '{tensor.name}' has no known shape; give sample inputs as a .npy file")
    for axis, dim in enumerate(shape[1:], start=1):
        if not isinstance(dim, int) or dim <= 0:
            raise UsageError(f"input '{tensor.name}' has symbolic dim {dim!r} at axis {axis}; give sample inputs "
                             f"as a .npy file")
    if n < 1:
        raise UsageError(f"need at least one random sample, got {n}")
    return np.random.default_rng(seed).random([n] + shape[1:]).astype(np.float32)


def load_samples(graph: gs.Graph, path: str | Path) -> np.ndarray:
    """Samples from a .npy file (never unpickled): a batch on axis 0, or one sample without the batch axis."""
    tensor = single_float_input(graph)
    try:
        array = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read sample inputs {path}: {error}") from None
    shape = list(tensor.shape or [])
    if shape and array.ndim == len(shape) - 1:
        array = array[None]
    if shape and array.ndim != len(shape):
        raise UsageError(f"{path} has shape {array.shape}; input '{tensor.name}' has rank {len(shape)}")
    for axis, (dim, got) in enumerate(zip(shape[1:], array.shape[1:]), start=1):
        if isinstance(dim, int) and dim > 0 and dim != got:
            raise UsageError(f"{path} has shape {array.shape}; input '{tensor.name}' needs {dim} at axis {axis}")
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
        raise UsageError(f"{path} must hold finite floating-point samples")
    if array.shape[0] < 1:
        raise UsageError(f"{path} holds no samples")
    return array


def evaluate_tensors(graph: gs.Graph, names: list[str], samples: np.ndarray, chunk: int = 16):
    """Yield (start, {name: float64 tensor}) for `names` over `samples` in chunks (no gradients)."""
    nodes = topological_order(list(graph.nodes))
    tensors = graph.tensors()
    opset = graph.opset if isinstance(graph.opset, int) else None
    try:
        function = SubgraphFunction(nodes, [single_float_input(graph)], [tensors[n] for n in names], opset=opset)
    except ValueError as error:  # an op or attribute the float64 evaluator does not reproduce exactly
        raise ModelError(f"cannot evaluate the model in float64: {error}") from None
    with torch.no_grad():
        for start in range(0, samples.shape[0], chunk):
            values = function(torch.from_numpy(np.ascontiguousarray(samples[start:start + chunk])))
            yield start, dict(zip(names, values))


# ----------------------------------------------------------------------------------------------------------------
# Measurement


@dataclass
class BlockMeasure:
    index: int
    block: ResidualBlock
    section: int
    resolution: tuple[int, ...]
    absolute: float  # mean over samples of ‖x(l+1) − x(l)‖
    scaled: float  # mean over samples of ‖x(l+1) − x(l)‖ / ‖x(l)‖
    scaled_min: float
    scaled_max: float
    zero_input_samples: int  # samples with ‖x(l)‖ = 0, left out of the scaled mean

    def as_dict(self) -> dict:
        return {"index": self.index, "section": self.section, "resolution": list(self.resolution),
                "absolute": self.absolute, "scaled": self.scaled, "scaled_min": self.scaled_min,
                "scaled_max": self.scaled_max, "zero_input_samples": self.zero_input_samples,
                **self.block.as_dict()}


@dataclass
class Section:
    index: int
    resolution: tuple[int, ...]
    blocks: list[int]  # block indices
    distance: float  # Eq. 4: Σ absolute
    scaled_distance: float  # Σ scaled
    mean_absolute: float
    mean_scaled: float  # Eq. 11: d_scaled / L
    stopping_depth: int  # ceil(d_scaled / ε)

    def as_dict(self) -> dict:
        return {"index": self.index, "resolution": list(self.resolution), "blocks": self.blocks,
                "num_blocks": len(self.blocks), "distance": self.distance, "scaled_distance": self.scaled_distance,
                "mean_absolute": self.mean_absolute, "mean_scaled": self.mean_scaled,
                "stopping_depth": self.stopping_depth}


@dataclass
class PerturbationReport:
    eps: float
    samples: int
    blocks: list[BlockMeasure]
    sections: list[Section]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_scaled_distance(self) -> float:
        return sum(s.scaled_distance for s in self.sections)

    def as_dict(self) -> dict:
        total_blocks = len(self.blocks)
        return {
            "eps": self.eps, "samples": self.samples, "num_blocks": total_blocks,
            "blocks": [b.as_dict() for b in self.blocks], "sections": [s.as_dict() for s in self.sections],
            "total": {"distance": sum(s.distance for s in self.sections),
                      "scaled_distance": self.total_scaled_distance,
                      "mean_scaled": self.total_scaled_distance / total_blocks if total_blocks else None,
                      "stopping_depth": sum(s.stopping_depth for s in self.sections)},
            "skipped": [{"where": w, "why": y} for w, y in self.skipped],
        }


def stopping_depth(scaled_distance: float, eps: float) -> int:
    """§2.3: L = ceil(d_scaled / ε), the blocks per section that make the mean scaled perturbation ≤ ε."""
    if eps <= 0:
        raise UsageError(f"eps must be positive, got {eps}")
    return math.ceil(scaled_distance / eps)


def measure_perturbations(graph: gs.Graph, samples: np.ndarray, eps: float = 0.1, chunk: int = 16,
                          blocks: list[ResidualBlock] | None = None) -> PerturbationReport:
    """Measure every residual block of `graph` on `samples` (batch on axis 0) and group them into sections."""
    skipped: list[tuple[str, str]] = []
    if blocks is None:
        blocks, skipped = find_residual_blocks(graph)
    if eps <= 0:
        raise UsageError(f"eps must be positive, got {eps}")
    names = sorted({n for b in blocks for n in (b.skip, b.output)})
    n = samples.shape[0]
    absolute = np.zeros((len(blocks), n))
    scaled = np.full((len(blocks), n), np.nan)
    resolutions: list[tuple[int, ...]] = [()] * len(blocks)
    broadcasting: set[int] = set()
    if blocks:
        for start, values in evaluate_tensors(graph, names, samples, chunk):
            for i, block in enumerate(blocks):
                before, after = values[block.skip], values[block.output]
                if before.shape != after.shape:  # x(l+1) − x(l) is not defined
                    broadcasting.add(i)
                    continue
                resolutions[i] = tuple(int(d) for d in after.shape[2:])
                diff = (after - before).reshape(after.shape[0], -1).norm(dim=1).numpy()
                base = before.reshape(before.shape[0], -1).norm(dim=1).numpy()
                stop = start + after.shape[0]
                absolute[i, start:stop] = diff
                with np.errstate(divide="ignore", invalid="ignore"):
                    scaled[i, start:stop] = np.where(base > 0, diff / np.where(base > 0, base, 1.0), np.nan)
    for i in sorted(broadcasting):
        skipped.append((f"Add '{blocks[i].join}'",
                        "its skip operand is broadcast to the output's shape: x(l+1) − x(l) is not defined"))
    keep = [i for i in range(len(blocks)) if i not in broadcasting]
    blocks, absolute, scaled = [blocks[i] for i in keep], absolute[keep], scaled[keep]
    resolutions = [resolutions[i] for i in keep]
    measures: list[BlockMeasure] = []
    sections: list[Section] = []
    for i, block in enumerate(blocks):
        if not sections or sections[-1].resolution != resolutions[i]:
            sections.append(Section(len(sections), resolutions[i], [], 0.0, 0.0, 0.0, 0.0, 0))
        valid = scaled[i][~np.isnan(scaled[i])]
        measures.append(BlockMeasure(
            i, block, sections[-1].index, resolutions[i], float(absolute[i].mean()),
            float(valid.mean()) if valid.size else float("nan"),
            float(valid.min()) if valid.size else float("nan"), float(valid.max()) if valid.size else float("nan"),
            int(n - valid.size)))
        sections[-1].blocks.append(i)
    for section in sections:
        members = [measures[i] for i in section.blocks]
        section.distance = float(sum(m.absolute for m in members))
        section.scaled_distance = float(sum(m.scaled for m in members))
        section.mean_absolute = section.distance / len(members)
        section.mean_scaled = section.scaled_distance / len(members)
        section.stopping_depth = stopping_depth(section.scaled_distance, eps) if math.isfinite(
            section.scaled_distance) else -1
    return PerturbationReport(eps, n, measures, sections, skipped)


# ----------------------------------------------------------------------------------------------------------------
# Reports


def format_report(report: PerturbationReport) -> str:
    """The per-block table, then the per-section distances and stopping-rule depths."""
    def table(rows, headers):
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
        lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
        return "\n".join(lines + ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows])

    if not report.blocks:
        return "no residual blocks found" + "".join(f"\n  - {w}: {y}" for w, y in report.skipped)
    block_rows = [(m.index, m.section, "x".join(map(str, m.resolution)) or "-", m.block.kind, m.block.join,
                   f"{m.absolute:.4g}", f"{m.scaled:.4g}") for m in report.blocks]
    text = [f"{len(report.blocks)} residual blocks in {len(report.sections)} sections, {report.samples} samples",
            "", table(block_rows, ("block", "section", "resolution", "skip", "join", "‖x(l+1)−x(l)‖",
                                   "‖x(l+1)−x(l)‖/‖x(l)‖"))]
    section_rows = [(s.index, "x".join(map(str, s.resolution)) or "-", len(s.blocks), f"{s.distance:.4g}",
                     f"{s.scaled_distance:.4g}", f"{s.mean_scaled:.4g}", s.stopping_depth) for s in report.sections]
    total = report.as_dict()["total"]
    section_rows.append(("all", "", len(report.blocks), f"{total['distance']:.4g}",
                         f"{total['scaled_distance']:.4g}", f"{total['mean_scaled']:.4g}", total["stopping_depth"]))
    text += ["", table(section_rows, ("section", "resolution", "L", "d (abs)", "d_scaled", "mean Δl",
                                      f"L=ceil(d_scaled/{report.eps:g})"))]
    text += [f"  - skipped {w}: {y}" for w, y in report.skipped]
    return "\n".join(text)


def plot_report(report: PerturbationReport, path: str | Path) -> None:
    """Seed 001's Figures 2 and 5: absolute (top) and scaled (bottom) perturbation against the depth through each
    section (scaled 0 to 1), one column per section; the dashed line is ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(len(report.sections), 1)
    figure, axes = plt.subplots(2, count, figsize=(3.6 * count, 5.6), squeeze=False, sharey="row")
    for column, section in enumerate(report.sections):
        members = [report.blocks[i] for i in section.blocks]
        depth = np.linspace(0, 1, len(members)) if len(members) > 1 else np.zeros(1)
        for row, (values, label) in enumerate(((([m.absolute for m in members]), "‖x(l+1) − x(l)‖"),
                                               (([m.scaled for m in members]), "‖x(l+1) − x(l)‖ / ‖x(l)‖"))):
            axis = axes[row][column]
            axis.plot(depth, values, marker="o")
            for d, v, m in zip(depth, values, members):
                axis.annotate(str(m.index), (d, v), textcoords="offset points", xytext=(0, 5), fontsize=7,
                              ha="center")
            if row == 1:
                axis.axhline(report.eps, linestyle="--", color="grey", linewidth=1)
                axis.set_xlabel("depth through the section")
            if column == 0:
                axis.set_ylabel(label)
            axis.grid(alpha=0.3)
        resolution = "x".join(map(str, section.resolution)) or "-"
        axes[0][column].set_title(f"section {section.index} ({resolution}, L={len(members)})\n"
                                  f"d={section.distance:.3g}, d_scaled={section.scaled_distance:.3g}, "
                                  f"L_eps={section.stopping_depth}", fontsize=9)
    figure.suptitle(f"perturbation from identity over {report.samples} samples (eps = {report.eps:g})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
