"""Writers for `cnnc.runtime.bench` reports: table rows, JSON, a Markdown page, and a PNG plot.

Every writer takes the report dict that `bench_models` returns (or that a JSON file written here holds), so a plot or
a table can be remade later from the JSON alone. Times are shown in the unit that keeps three significant digits
readable (µs, ms or s); the ratio column is p50(model) / p50(first model) of the same comparison (over several
sessions per model: the geometric mean of the sessions' ratios), with its 95 % interval (`cnnc.runtime.stats`), and
`speedup` its inverse; the command line prints the rows with `cnnc.cli.table`. matplotlib is
imported only when a plot is asked for. Files are written atomically (`cnnc.io.jsonio`).
"""

from __future__ import annotations

from pathlib import Path

from cnnc.errors import UsageError
from cnnc.io import jsonio

TABLE_HEADERS = ("batch", "model", "provider", "p50", "p90", "p99", "mean ± std", "min", "items/s", "ratio",
                 "95% CI", "speedup", "session", "first run")


def format_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    # Thresholds at 999.5 of the smaller unit: three significant digits of 999.7 µs read "1 ms", not "1e+03 µs".
    if ms < 0.0009995:
        return f"{ms * 1e6:.3g} ns"
    if ms < 0.9995:
        return f"{ms * 1e3:.3g} µs"
    if ms < 999.5:
        return f"{ms:.3g} ms"
    return f"{ms / 1e3:.3g} s"


def _short_provider(name: str) -> str:
    return name.removesuffix("ExecutionProvider").lower() if name else "-"


def table_rows(report: dict) -> list[tuple[str, ...]]:
    rows = []
    for comparison in report["comparisons"]:
        for model in comparison["models"]:
            stats, ratio = model["stats"], model.get("ratio_to_first")
            provider = _short_provider(model.get("provider", ""))
            if model.get("cuda_graph"):
                provider += "+graph"
            # Suites compare many models: their comparisons name the model, shown before the variant's label.
            label = f"{comparison['model']}: {model['label']}" if comparison.get("model") else model["label"]
            rows.append((
                str(comparison["batch"]), label, provider, format_ms(stats["p50_ms"]),
                format_ms(stats["p90_ms"]), format_ms(stats["p99_ms"]),
                f"{format_ms(stats['mean_ms'])} ± {format_ms(stats['std_ms'])}", format_ms(stats["min_ms"]),
                f"{stats['throughput_per_s']:.4g}",
                f"{ratio['ratio']:.3f}" if ratio else "-",
                f"{ratio['ci95'][0]:.3f}-{ratio['ci95'][1]:.3f}" if ratio else "-",
                f"{ratio['speedup']:.2f}x" if ratio else "-",
                format_ms(model.get("session_create_ms")), format_ms(model.get("first_run_ms")),
            ))
    return rows


def markdown_table(rows, headers=TABLE_HEADERS) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_notes(report: dict) -> list[str]:
    """One line per model that fell back, could not use a CUDA graph, or has no ratio."""
    lines = []
    for comparison in report["comparisons"]:
        for model in comparison["models"]:
            messages = list(model.get("notes", []))
            if model.get("cuda_graph_note"):
                messages.append(f"CUDA graph: {model['cuda_graph_note']}")
            for message in messages:
                lines.append(f"batch {comparison['batch']}, {model['label']}: {message}")
    return lines


def environment_lines(report: dict) -> list[str]:
    env, settings = report["environment"], report["settings"]
    lines = [f"device: {env.get('device')} ({', '.join(settings.get('devices_used', [settings['device_kind']]))})",
             (f"onnxruntime {env.get('onnxruntime')} ({env.get('onnxruntime_package')}), onnx {env.get('onnx')}, "
              f"numpy {env.get('numpy')}, python {env.get('python')}, cnnc {env.get('cnnc')}")]
    if env.get("gpu") or env.get("cuda_runtime") or env.get("cudnn"):
        lines.append(f"GPU {env.get('gpu')}, CUDA runtime {env.get('cuda_runtime')}, driver {env.get('cuda_driver')},"
                     f" cuDNN {env.get('cudnn')}")
    lines.append(f"CPU {env.get('cpu')}, {env.get('cpus_usable')} usable of {env.get('cpu_count')}, load average "
                 f"{env.get('loadavg_1_5_15')} at start, {env.get('loadavg_1_5_15_end')} at end")
    timing = (f"{settings['iters']} rounds" if settings.get("iters") else f"{settings.get('duration_s')} s")
    lines.append(f"{settings['optimization']}, threads {settings['intra_op_num_threads']}, warm-up "
                 f"{settings['warmup_rounds']} rounds, then {timing} per batch size, {settings['interleaved']}; "
                 f"IOBinding, denormals as zero: {settings['denormal_as_zero']}, thread spinning: "
                 f"{settings['thread_spinning']}, sessions per model: {settings.get('sessions_per_model', 1)}")
    if settings.get("cuda_graph_requested") is not None and "cuda" in settings.get("devices_used", []):
        lines.append(f"CUDA graphs requested: {settings['cuda_graph_requested']}, cudnn_conv_algo_search "
                     f"{settings.get('cudnn_conv_algo_search')}")
    lines.append(f"date {env.get('date_utc')}, {env.get('platform')}")
    return lines


def write_json(report: dict, path: str | Path) -> Path:
    """The report as JSON (latency samples one list a line), written atomically; missing folders are made."""
    return jsonio.write_json(path, report, compact_numbers=True, make_parents=True)


def read_json(path: str | Path) -> dict:
    return jsonio.read_json(path)


def markdown(report: dict, title: str = "cnnc bench") -> str:
    parts = [f"# {title}", "", *[f"- {line}" for line in environment_lines(report)], "",
             markdown_table(table_rows(report)), "",
             ("p50/p90/p99: percentiles of per-call latency; ratio: p50 / p50 of the first model of the same batch "
              "(timed interleaved with it), with a 95 % interval: a bootstrap over rounds, or, with several sessions "
              "per model, Student's t over the session slots' ratios (the ratio is then their geometric mean); "
              "speedup = 1 / ratio; session and first run: session creation and the first call, not part of the "
              "statistics.")]
    notes = list(report.get("notes", [])) + model_notes(report)
    if notes:
        parts += ["", "Notes:", "", *[f"- {note}" for note in notes]]
    return "\n".join(parts) + "\n"


def write_markdown(report: dict, path: str | Path, title: str = "cnnc bench") -> Path:
    return jsonio.write_text(path, markdown(report, title), make_parents=True)


def write_plot(report: dict, path: str | Path, title: str = "cnnc bench") -> Path:
    """Two panels: the latency distribution of every model (box: quartiles, whiskers: p5-p95, log scale) grouped
    by comparison, and each model's speedup over the first model of its comparison with the 95 % interval."""
    try:  # matplotlib is optional (the `plot` extra): imported only when a plot is drawn
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'cnnc[plot]' (or pip install matplotlib)") from None
    comparisons = report["comparisons"]
    labels = []  # every label in order of first appearance: one colour each
    for comparison in comparisons:
        labels += [m["label"] for m in comparison["models"] if m["label"] not in labels]
    palette = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    colour = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    width = 0.8 / max(len(c["models"]) for c in comparisons)
    n_boxes = sum(len(c["models"]) for c in comparisons)
    figure = Figure(figsize=(max(8.0, 0.42 * n_boxes + 3.0), 8.0), layout="constrained")
    FigureCanvasAgg(figure)
    boxes_axis, ratio_axis = figure.subplots(2, 1, sharex=True)
    speedups: list[float] = []
    for index, comparison in enumerate(comparisons):
        models = comparison["models"]
        offsets = [(j - (len(models) - 1) / 2) * width for j in range(len(models))]
        for position, (offset, model) in enumerate(zip(offsets, models)):
            samples = model.get("samples_ms") or [model["stats"]["p50_ms"]]
            artist = boxes_axis.boxplot([samples], positions=[index + offset], widths=width * 0.85, whis=(5, 95),
                                        showfliers=False, patch_artist=True, medianprops={"color": "black"})
            for patch in artist["boxes"]:
                patch.set_facecolor(colour[model["label"]])
                patch.set_alpha(0.8)
            ratio = model.get("ratio_to_first")
            if ratio and position > 0:  # the first model is the reference: 1x by definition
                low, high = ratio["ci95"]
                speedup, err_low, err_high = ratio["speedup"], 1 / high, 1 / low
                speedups += [err_low, err_high]
                ratio_axis.errorbar(index + offset, speedup, fmt="o", color=colour[model["label"]], capsize=3,
                                    yerr=[[max(speedup - err_low, 0)], [max(err_high - speedup, 0)]])
                ratio_axis.annotate(f"{speedup:.2f}x", (index + offset, speedup), ha="left", va="bottom",
                                    fontsize=7, xytext=(3, 2), textcoords="offset points")
    boxes_axis.set_yscale("log")
    boxes_axis.set_ylabel("latency per call (ms, log)")
    boxes_axis.set_title(f"{title}: latency distribution (box: quartiles, whiskers: p5-p95)")
    boxes_axis.grid(axis="y", which="both", alpha=0.3)
    if speedups and max(speedups) / max(min(speedups), 1e-12) > 10:  # a 100x collapse next to a 1.05x fold
        ratio_axis.set_yscale("log")
    ratio_axis.axhline(1.0, color="black", linewidth=0.8)
    ratio_axis.set_ylabel("speedup vs first model (p50)")
    ratio_axis.set_title("speedup = p50(first) / p50(model), 95 % interval")
    ratio_axis.grid(axis="y", alpha=0.3)
    ratio_axis.set_xticks(range(len(comparisons)))
    ratio_axis.set_xticklabels([c["title"] for c in comparisons], rotation=30 if len(comparisons) > 4 else 0,
                               ha="right" if len(comparisons) > 4 else "center", fontsize=8)
    boxes_axis.legend(handles=[Patch(color=colour[label], label=label) for label in labels], fontsize=8,
                      loc="best")
    env = report["environment"]
    figure.suptitle(f"{env.get('device')} · onnxruntime {env.get('onnxruntime')} · "
                    f"{', '.join(report['settings'].get('devices_used', []))}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
