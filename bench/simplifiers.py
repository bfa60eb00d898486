"""Which library the `simplify` pass wraps (issue 13, item 1), chosen by measurement.

    python bench/simplifiers.py                                   # built-in examples + 5 torchvision models, 64 px
    python bench/simplifiers.py --exporters torchscript17,dynamo  # both of torch's exporters

Each model is simplified by onnxslim, onnxsim, and onnxruntime's offline optimisation
(`SessionOptions.optimized_model_filepath`, CPU provider) at ORT_ENABLE_BASIC and ORT_ENABLE_EXTENDED, each on its
own copy of the model. Recorded per model and tool: nodes, serialized size, seconds to simplify, equivalence with
the original on onnxruntime (cnnc.runtime.equivalence, seeded inputs at batch 1 and 3, default tolerance), the op
domains the result uses that the input did not (EXTENDED writes onnxruntime's own fused ops, com.microsoft
FusedConv and the like: not portable to other runtimes), and whether the symbolic batch survived. Failures are
recorded with their first line. Models: cnnc's built-in examples (`cnnc example --list`) and the torchvision
resnet18, mobilenet_v2, shufflenet_v2_x1_0, densenet121 and convnext_tiny at 64 px with random weights and
calibrated BN statistics (cnnc.zoo, the `zoo` extra). Results: bench/results/simplifiers-<date>-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort

from cnnc.io.frontend import from_torch
from cnnc.io.jsonio import write_json, write_text
from cnnc.io.target import runnable
from cnnc.ir.weightless import serialized_size
from cnnc.passes.simplify import run_onnxsim, run_onnxslim
from cnnc.runtime.environment import device_slug, environment
from cnnc.runtime.equivalence import check_equivalence
from cnnc.runtime.session import first_line
from cnnc.zoo import EXAMPLES, build_example, export_zoo_model

HERE = Path(__file__).resolve().parent
VISION = ("resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "densenet121", "convnext_tiny")


def ort_offline(level: str):
    """onnxruntime's offline optimisation at `level` ("basic" or "extended"), read back from the file it writes."""
    def run(model: onnx.ModelProto) -> onnx.ModelProto:
        options = ort.SessionOptions()
        options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
        options.log_severity_level = 3
        with tempfile.TemporaryDirectory(prefix="cnnc-bench-") as folder:
            options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return onnx.load_model(options.optimized_model_filepath)
    return run


TOOLS = {"onnxslim": run_onnxslim, "onnxsim": run_onnxsim, "ort-basic": ort_offline("basic"),
         "ort-extended": ort_offline("extended")}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


def _batch_dim(model: onnx.ModelProto) -> str | int:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param if not dim.HasField("dim_value") else dim.dim_value


def measure(model: onnx.ModelProto, tool: str) -> dict:
    start = time.perf_counter()
    try:
        result = TOOLS[tool](_copy(model))
    except Exception as error:  # noqa: BLE001 - a third-party tool: record whatever it raises
        return {"failed": f"{type(error).__name__}: {first_line(error)}"}
    seconds = time.perf_counter() - start
    result = runnable(result)
    domains = {o.domain or "ai.onnx" for o in model.opset_import}
    entry = {"nodes": len(result.graph.node), "bytes": serialized_size(result), "seconds": round(seconds, 3),
             "new_domains": sorted({n.domain or "ai.onnx" for n in result.graph.node} - domains),
             "batch_dim": _batch_dim(result)}
    try:
        report = check_equivalence(model, result)
        entry["equivalent"], entry["check"] = report.passed, report.summary()
    except Exception as error:  # noqa: BLE001 - an output that does not run is recorded, not fatal
        entry["equivalent"], entry["check"] = False, f"{type(error).__name__}: {first_line(error)}"
    return entry


def models(exporters: list[str], size: int, folder: Path):
    for name in EXAMPLES:
        module, example = build_example(name)
        yield name, "torchscript", from_torch(module, example)
    for name in VISION:
        for exporter in exporters:
            yield name, exporter, onnx.load_model(export_zoo_model(name, exporter, size, directory=folder))


def markdown(results: dict) -> str:
    tools = list(TOOLS)
    env, versions = results["environment"], results["versions"]
    where = (f"Environment: {env['cpu']}, {env['cpus_usable']} usable CPUs, load {env['loadavg_1_5_15']}; "
             f"onnxruntime {versions['onnxruntime']}, onnxslim {versions['onnxslim']}, onnxsim {versions['onnxsim']}")
    legend = ("Cells: nodes / seconds to simplify / MB; `≠` not equivalent, `!` uses non-portable ops (a new "
              "domain), `F` failed.")
    lines = [f"# simplify backends, {results['date']}", "", f"Command: `{results['command']}`", "", where, "",
             legend, "",
             "| model | exporter | original nodes / MB | " + " | ".join(tools) + " |",
             "|---|---|---|" + "---|" * len(tools)]
    for row in results["models"]:
        cells = []
        for tool in tools:
            entry = row["tools"][tool]
            if "failed" in entry:
                cells.append("F")
                continue
            marks = ("" if entry["equivalent"] else " ≠") + (" !" if entry["new_domains"] else "")
            cells.append(f"{entry['nodes']} / {entry['seconds']:.2f} s / {entry['bytes'] / 1e6:.2f} MB{marks}")
        lines.append(f"| {row['model']} | {row['exporter']} | {row['nodes']} / {row['bytes'] / 1e6:.2f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Totals", "", "| tool | nodes (sum) | seconds (sum) | equivalent | portable | failed |",
              "|---|---|---|---|---|---|"]
    for tool, total in results["totals"].items():
        lines.append(f"| {tool} | {total['nodes']} | {total['seconds']:.2f} | {total['equivalent']}/{total['runs']} | "
                     f"{total['portable']}/{total['runs']} | {total['failed']} |")
    lines += ["", "Failures:", ""] + [f"- {row['model']} ({row['exporter']}) {tool}: {entry['failed']}"
                                      for row in results["models"] for tool, entry in row["tools"].items()
                                      if "failed" in entry]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporters", default="torchscript17", help="comma-separated: torchscript17,dynamo")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    import onnxsim  # optional dependency (the peers extra), imported for its version
    import onnxslim  # optional dependencies of cnnc, imported for their versions
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnc-simplifiers-") as folder:
        for name, exporter, model in models(args.exporters.split(","), args.size, Path(folder)):
            model = runnable(model)
            row = {"model": name, "exporter": exporter, "nodes": len(model.graph.node),
                   "bytes": serialized_size(model), "tools": {}}
            for tool in TOOLS:
                row["tools"][tool] = measure(model, tool)
                print(name, exporter, tool, row["tools"][tool], flush=True)
            rows.append(row)
    totals = {}
    for tool in TOOLS:
        done = [row["tools"][tool] for row in rows]
        ok = [e for e in done if "failed" not in e]
        totals[tool] = {"runs": len(done), "failed": len(done) - len(ok), "nodes": sum(e["nodes"] for e in ok),
                        "seconds": round(sum(e["seconds"] for e in ok), 3),
                        "equivalent": sum(bool(e["equivalent"]) for e in ok),
                        "portable": sum(not e["new_domains"] for e in ok)}
    env = environment("cpu")
    results = {"date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
               "environment": env, "versions": {"onnxruntime": ort.__version__,
                                                "onnxslim": onnxslim.__version__, "onnxsim": onnxsim.__version__},
               "models": rows, "totals": totals}
    stem = Path(args.out) / f"simplifiers-{results['date']}-{device_slug({'environment': env, 'settings': {'device_kind': 'cpu'}})}"
    write_json(stem.with_suffix(".json"), results)
    write_text(stem.with_suffix(".md"), markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
