"""The zoo benchmark's PNG: speedup over the original per model and tool, with 95 % intervals, one panel per
(exporter, size, dtype, batch). Reads only the JSON report of bench/zoo.py, so it can be redrawn later:

    python bench/zoo_plot.py bench/results/zoo-<date>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from cnnc.io import jsonio


def _panels(report: dict) -> dict[tuple, dict[str, dict[str, tuple]]]:
    """(exporter, size, dtype, batch) -> model -> tool -> (speedup, low, high)."""
    panels: dict[tuple, dict[str, dict[str, tuple]]] = {}
    for row in report["rows"].values():
        for entry in row.get("tools", []):
            for batch, latency in (entry.get("latency") or {}).items():
                if entry["tool"] == "original" or latency.get("speedup") is None:
                    continue
                key = (row["exporter"], row["size"], row["dtype"], int(batch))
                panels.setdefault(key, {}).setdefault(row["model"], {})[entry["tool"]] = (
                    latency["speedup"], *latency["ci95"])
    return panels


def plot(report: dict, path: Path) -> Path:
    panels = _panels(report)
    if not panels:
        return path
    tools = sorted({tool for panel in panels.values() for model in panel.values() for tool in model})
    figure, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    width = 0.8 / len(tools)
    for axis, (key, panel) in zip(axes[:, 0], sorted(panels.items())):
        models = sorted(panel)
        for index, tool in enumerate(tools):
            xs, ys, errors = [], [], [[], []]
            for position, model in enumerate(models):
                if tool in panel[model]:
                    value, low, high = panel[model][tool]
                    xs.append(position + (index - (len(tools) - 1) / 2) * width)
                    ys.append(value)
                    errors[0].append(max(value - low, 0.0))
                    errors[1].append(max(high - value, 0.0))
            if xs:  # one colour per tool in every panel
                axis.bar(xs, ys, width, yerr=errors, capsize=2, label=tool, color=f"C{index}")
        axis.set_yscale("log")  # speedups: 2x and 0.5x equally far from 1
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(models)), models, rotation=20, fontsize=8)
        axis.set_ylabel("speedup vs original")
        exporter, size, dtype, batch = key
        axis.set_title(f"{exporter}, {size} px, {dtype}, batch {batch}", fontsize=9)
    handles = {label: handle for axis in axes[:, 0] for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), fontsize=7, ncol=len(tools), loc="upper center")
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


if __name__ == "__main__":
    source = Path(sys.argv[1])
    print(plot(jsonio.read_json(source), source.with_suffix(".png")))
