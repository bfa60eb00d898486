"""`cnnc inspect MODEL [--json] [--schedule [--batch N] [--plot levels.png]] [--cost [--provider cpu|cuda]]`.

Without --schedule: op counts, parameters, MACs, size, inputs and outputs (`cnnc.ir.stats`). With --schedule, the
hypergraph figures of seed 002: levels, their widths and the critical path of the exporter's graph, and the peak of
live activation bytes under three execution orders: the exporter's (the order stored in the file), cnnc's (the
least-peak order the schedule pass would emit) and onnxruntime's default order (a reverse depth-first search from
the outputs, which ignores the stored order; onnxruntime follows the stored order only with
ExecutionOrder.PRIORITY_BASED). Also what the schedule pass would fuse. --plot draws the level structure
(`cnnc.cli.levels_plot`), last, so the figures are printed even when matplotlib is missing.

With --cost, the cost model (`cnnc.cost`): the provider's roofline (read from the cache, else measured by its
micro-benchmarks and cached; its constants and where they come from), and per op type the MACs, weight bytes,
activation bytes and kernels of the model as onnxruntime runs it (fusions counted: a fused op has no kernel and
saves the round trip of its input), with the estimated seconds at --batch.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import click
import onnx

from cnnc import ir
from cnnc.cli.levels_plot import plot_levels
from cnnc.cli.outputs import Outputs
from cnnc.cli.table import human, stats_rows, table
from cnnc.cost import PROVIDERS, Cost, node_costs, roofline
from cnnc.errors import ModelError
from cnnc.io.frontend import load_onnx
from cnnc.ir.canonicalize import canonicalize
from cnnc.ir.stats import model_stats
from cnnc.linear.hypergraph import Hypergraph, schedule_figures
from cnnc.linear.memory_order import min_peak_order, onnxruntime_default_order
from cnnc.passes.schedule import Schedule


def _order_figures(view: Hypergraph, order) -> dict:
    profile = view.memory_profile(order)
    return {"peak_bytes": profile.peak,
            "peak_at": view.edges[profile.order[profile.peak_step]].name if profile.order else None}


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n} B"


def schedule_section(model: onnx.ModelProto, batch: int = 1) -> tuple[dict, Hypergraph]:
    """(figures for JSON and `format_schedule`, the hypergraph they describe, for `plot_levels`) of `model`."""
    try:
        graph = canonicalize(ir.import_model(model))  # folds exporter constants; keeps the stored order
    except (ValueError, TypeError, KeyError, RuntimeError, onnx.shape_inference.InferenceError) as error:
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
    return figures, view


def cost_section(model: onnx.ModelProto, provider: str, batch: int = 1) -> dict:
    """The roofline of `provider` (cached or measured now) and the model's cost per op type at `batch`."""
    roof = roofline(provider, measure=True)
    try:
        graph = ir.refresh_shapes(canonicalize(ir.import_model(model)))
    except (ValueError, TypeError, KeyError, RuntimeError, onnx.shape_inference.InferenceError) as error:
        raise ModelError(f"cannot price the model: {error}") from None
    by_op: dict[str, Cost] = {}
    for node, share in node_costs(graph.nodes, graph.outputs):
        by_op[node.op] = by_op.get(node.op, Cost()) + share
    total = sum(by_op.values(), Cost())
    rows = {op: {**cost.as_dict(), "seconds": roof.seconds(cost, batch)} for op, cost in sorted(by_op.items())}
    return {"roofline": roof.as_dict(), "batch": batch, "ops": rows,
            "total": {**total.as_dict(), "seconds": roof.seconds(total, batch)}}


def format_cost(figures: dict) -> str:
    roof = figures["roofline"]
    lines = [(f"roofline ({roof['provider']}): {human(roof['macs_per_s'])}MAC/s, {human(roof['bytes_per_s'])}B/s, "
              f"{roof['kernel_overhead_s'] * 1e6:.2f} µs per kernel; {roof['source']}"),
             f"cost at batch {figures['batch']} (fusions counted; per-op times are each op's own roofline estimate):"]
    rows = [(op, human(c["macs"]), human(c["weight_bytes"]), human(c["activation_bytes"]), c["kernels"],
             f"{c['seconds'] * 1e3:.4f}") for op, c in [*figures["ops"].items(), ("total", figures["total"])]]
    lines.append(textwrap.indent(table(rows, ("op", "MACs", "weight B", "activation B", "kernels", "est. ms")), "  "))
    return "\n".join(lines)


def format_schedule(figures: dict) -> str:
    widths = [level["width"] for level in figures["levels"]]
    lines = [(f"schedule (batch {figures['batch']}): {figures['ops']} ops on {figures['depth']} levels, widest level "
              f"{figures['max_width']} tensors, critical path {len(figures['critical_path'])} ops")]
    if figures["peak_is_lower_bound"]:
        lines.append(f"  (peaks are lower bounds: {len(figures['unsized_tensors'])} tensor(s) of unknown size, "
                     f"e.g. {next(iter(figures['unsized_tensors'].items()))})")
    orders = [("exporter (stored order)", figures["orders"]["exporter"]),
              ("cnnc (schedule pass)", figures["orders"]["cnnc"]),
              ("onnxruntime default order", figures["orders"]["onnxruntime_default"])]
    base = figures["orders"]["exporter"]["peak_bytes"]
    rows = []
    for label, order in orders:
        change = f" ({100.0 * (order['peak_bytes'] - base) / base:+.1f}%)" if base and label != orders[0][0] else ""
        note = ", least possible" if order.get("proven_least") else ""
        rows.append((f"peak live activations, {label}", f"{_megabytes(order['peak_bytes'])}{change}",
                     f"at '{order['peak_at']}'{note}"))
    lines.append(textwrap.indent(table(rows), "  "))
    lines.append(f"  level widths: {' '.join(map(str, widths[:60]))}{' ...' if len(widths) > 60 else ''}")
    path = figures["critical_path"]
    shown = path if len(path) <= 12 else path[:6] + ["..."] + path[-5:]
    lines.append(f"  critical path: {' -> '.join(shown)}")
    for line in figures["fusions"]:
        lines.append(f"  schedule would fuse: {line}")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--schedule", is_flag=True, help="levels, widths, critical path and peak activation memory of the "
              "exporter's node order against cnnc's")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="batch size for --schedule "
              "and --cost")
@click.option("--plot", default=None, metavar="PNG", help="with --schedule: draw the level structure to PNG")
@click.option("--cost", is_flag=True, help="the cost model: the provider's roofline (measured once, cached) and MACs, "
              "bytes, kernels and estimated time per op type")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(sorted(PROVIDERS)),
              help="with --cost: whose roofline")
def inspect_command(model, as_json, schedule, batch, plot, cost, provider):
    """Op counts, parameters, MACs, inputs and outputs of MODEL."""
    loaded = load_onnx(model)
    stats = model_stats(loaded)
    outputs = Outputs()
    if schedule or plot:
        stats["schedule"], view = schedule_section(loaded, batch=batch)
        stats["schedule"]["plot"] = plot
        outputs.plot("--plot", plot, lambda path: plot_levels(view, path))
    if cost:
        stats["cost"] = cost_section(loaded, provider, batch)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
    else:
        click.echo(table([row[:2] for row in stats_rows(stats, None)], ("", Path(model).name)))
        if "schedule" in stats:
            click.echo("\n" + format_schedule(stats["schedule"]))
        if "cost" in stats:
            click.echo("\n" + format_cost(stats["cost"]))
    outputs.finish()
    if plot and not as_json:
        click.echo(f"  wrote {plot}")
