"""Residual networks as perturbations from identity (seed 001, Hauser): find the blocks, measure them, apply the
stopping rule.

A residual block computes x(l+1) = x(l) + f(x(l)) (Eq. 1). On N sample inputs, for each block l:
    absolute perturbation   ‖x(l+1) − x(l)‖₂             (Eq. 3, the distance the sample travels in the block)
    scaled perturbation     ‖x(l+1) − x(l)‖₂ / ‖x(l)‖₂   (Eq. 2 / Eq. 10, Δl; ≪ 1 means "a perturbation")
each averaged over the N samples (§2.1). A *section* is a run of consecutive blocks at one spatial resolution
(§2). Per section of L blocks: the computational distance d = Σ_l ‖x(l+1) − x(l)‖ (Eq. 4), the scaled distance
d_scaled = Σ_l Δl, the mean scaled perturbation d_scaled / L (Eq. 11), and the stopping rule
L_ε = ceil(d_scaled / ε) (§2.3): the number of blocks that would bring the mean Δl under ε.

Blocks are found by `cnnc.analysis.residual_blocks` (the rule shared with `cnnc.homotopy`); activations are read
with the float64 evaluator (`cnnc.eval`) through `cnnc.analysis.samples.evaluate_tensors`, in chunks of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from cnnc.analysis.residual_blocks import ResidualBlock, find_residual_blocks
from cnnc.analysis.samples import evaluate_tensors
from cnnc.errors import UsageError


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
    import matplotlib  # optional dependency (the `plot` extra): imported only when a plot is asked for

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
