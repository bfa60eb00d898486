"""`cnnc inspect MODEL --schedule [--json] [--plot levels.png]`: the hypergraph figures of a model (seed 002).

Levels, their widths and the critical path of the exporter's graph, and the peak of live activation bytes under
three execution orders: the exporter's (the order stored in the file), cnnc's (the least-peak order the schedule
pass would emit) and onnxruntime's default order (a reverse depth-first search from the outputs, which ignores the
stored order; onnxruntime follows the stored order only with ExecutionOrder.PRIORITY_BASED). Also what the schedule
pass would fuse. The plot draws the level structure; matplotlib is imported only when a plot is asked for.
"""

from __future__ import annotations

import itertools

import onnx
import onnx_graphsurgeon as gs

from cnnc.errors import ModelError, UsageError
from cnnc.linear.hypergraph import Hypergraph, min_peak_order, onnxruntime_default_order, schedule_figures
from cnnc.pipeline.manager import canonicalize

# Above this many tensors the drawing of the hypergraph is unreadable; the plot then shows only the level widths.
PLOT_TENSOR_LIMIT = 150


def _order_figures(view: Hypergraph, order) -> dict:
    profile = view.memory_profile(order)
    return {"peak_bytes": profile.peak,
            "peak_at": view.edges[profile.order[profile.peak_step]].name if profile.order else None}


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n} B"


def schedule_section(model: onnx.ModelProto, batch: int = 1, plot: str | None = None) -> tuple[dict, str]:
    """(figures for JSON, text for the terminal) of `model`; writes the level plot to `plot` when given."""
    import cnnc.passes  # noqa: F401  (registers the schedule pass)
    from cnnc.passes.schedule import Schedule

    try:
        graph = canonicalize(gs.import_onnx(model))  # folds exporter constants; keeps the stored order
    except Exception as error:  # noqa: BLE001 - graphsurgeon and shape inference raise assorted types
        raise ModelError(f"cannot build the hypergraph of the model: {error}") from None
    view = Hypergraph.from_graph(graph, batch, infer_shapes=False)
    figures = schedule_figures(view)
    cnnc_order, proven = min_peak_order(view)
    exporter = _order_figures(view, None)
    ours = _order_figures(view, cnnc_order)
    if ours["peak_bytes"] >= exporter["peak_bytes"]:  # the pass keeps the input order unless strictly better
        ours = dict(exporter)
    ours["proven_least"] = proven
    figures["peak_bytes"] = exporter["peak_bytes"]
    figures["orders"] = {"exporter": exporter, "cnnc": ours,
                         "onnxruntime_default": _order_figures(view, onnxruntime_default_order(view))}
    saved = exporter["peak_bytes"] - ours["peak_bytes"]
    figures["peak_reduction_bytes"] = saved
    figures["peak_reduction_percent"] = round(100.0 * saved / exporter["peak_bytes"], 2) if saved else 0.0
    figures["batch"] = batch
    fusion = Schedule(reorder=False, batch=batch).run(graph.copy())
    figures["fusions"] = list(fusion.applied)
    figures["fusions_declined"] = [{"where": w, "why": y} for w, y in fusion.skipped]
    figures["plot"] = plot
    if plot:
        plot_levels(view, plot)
    return figures, format_schedule(figures)


def format_schedule(figures: dict) -> str:
    widths = [level["width"] for level in figures["levels"]]
    lines = [(f"schedule (batch {figures['batch']}): {figures['ops']} ops on {figures['depth']} levels, widest level "
              f"{figures['max_width']} tensors, critical path {len(figures['critical_path'])} ops")]
    if figures["peak_is_lower_bound"]:
        lines.append(f"  (peaks are lower bounds: {len(figures['unsized_tensors'])} tensor(s) of unknown size, "
                     f"e.g. {next(iter(figures['unsized_tensors'].items()))})")
    rows = [("exporter (stored order)", figures["orders"]["exporter"]),
            ("cnnc (schedule pass)", figures["orders"]["cnnc"]),
            ("onnxruntime default order", figures["orders"]["onnxruntime_default"])]
    base = figures["orders"]["exporter"]["peak_bytes"]
    for label, order in rows:
        change = f" ({100.0 * (order['peak_bytes'] - base) / base:+.1f}%)" if base and label != rows[0][0] else ""
        note = ", least possible" if order.get("proven_least") else ""
        lines.append(f"  peak live activations, {label:26s} {_megabytes(order['peak_bytes'])}{change} "
                     f"at '{order['peak_at']}'{note}")
    lines.append(f"  level widths: {' '.join(map(str, widths[:60]))}{' ...' if len(widths) > 60 else ''}")
    path = figures["critical_path"]
    shown = path if len(path) <= 12 else path[:6] + ["..."] + path[-5:]
    lines.append(f"  critical path: {' -> '.join(shown)}")
    for line in figures["fusions"]:
        lines.append(f"  schedule would fuse: {line}")
    if figures["plot"]:
        lines.append(f"  wrote {figures['plot']}")
    return "\n".join(lines)


def _critical_links(view: Hypergraph) -> set[tuple[str, str]]:
    """(tensor, tensor) pairs along the critical path: the chain of tensors that joins its ops."""
    path = view.critical_path()
    if not path:
        return set()
    chain = [view.edges[path[-1]].outputs[0]] if view.edges[path[-1]].outputs else []
    for earlier, later in zip(path[-2::-1], path[:0:-1]):
        chain.append(next(s for s in view.edges[earlier].outputs if s in view.edges[later].inputs))
    first = view.edges[path[0]]
    chain += [s for s in first.inputs if view.depth().get(s, 0) == 0][:1]
    chain.reverse()
    return set(itertools.pairwise(chain))


def plot_levels(view: Hypergraph, path: str) -> None:
    """Level widths as bars; for small graphs also the hypergraph drawn by level (tensors as dots, ops as lines
    from each input to each output, the critical path in red)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install 'cnnc[plot]')") from None
    levels = view.levels()
    small = len(view.spaces) <= PLOT_TENSOR_LIMIT
    figure, axes = plt.subplots(2 if small else 1, 1, figsize=(min(40, max(7, 0.35 * len(levels))), 8 if small else 3),
                                squeeze=False, gridspec_kw={"height_ratios": [1, 3]} if small else None)
    bars = axes[0][0]
    bars.bar([lv.depth for lv in levels], [lv.width for lv in levels], color="#4477aa")
    bars.set_xlabel("depth (longest path from the inputs)")
    bars.set_ylabel("width (tensors)")
    bars.set_title("levels of the hypergraph")
    if small:
        drawing = axes[1][0]
        position, critical = {}, _critical_links(view)
        for level in levels:
            for row, space in enumerate(level.tensors):
                position[space] = (level.depth, row - (level.width - 1) / 2)
        for edge in view.edges:
            for source in edge.inputs:
                for target in edge.outputs:
                    (x0, y0), (x1, y1) = position[source], position[target]
                    red = (source, target) in critical
                    drawing.plot([x0, x1], [y0, y1], color="#cc3311" if red else "#999999",
                                 linewidth=1.6 if red else 0.8, zorder=1 + red)
        xs, ys = zip(*position.values()) if position else ((), ())
        drawing.scatter(xs, ys, s=18, color="#222222", zorder=3)
        if len(view.spaces) <= 40:
            for space, (x, y) in position.items():
                drawing.annotate(space, (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
        drawing.set_xlabel("depth")
        drawing.set_yticks([])
        drawing.set_title("tensors by level, ops as input-output lines, critical path red", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
