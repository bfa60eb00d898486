"""Deployment formats side by side (issue 15): the original ONNX against the compiled model in each format that runs
on this machine, timed interleaved at batch 1 and 8.

    python bench/formats.py                       # ~1 s per model per batch size (the committed results)
    python bench/formats.py --duration 5 --models resnet18

Models: cnnc's built-in linear ResNet-34 (`cnnc.zoo.build_example("linear-resnet34")`, exported by torch's
TorchScript exporter) and the zoo's resnet18, mobilenet_v2 and mobileone_s0 (`cnnc.zoo.export_zoo_model`,
TorchScript opset 17, seeded random weights, calibrated BN) at `--size` px (default 64). For each model:

1. `cnnc.compile` with the default pipeline (proven against the original on onnxruntime CPU);
2. `CompileResult.export` as `onnx`, `onnx-fp16` and `openvino`: each export is proven on its own runtime against
   the original before it is written (float16's tolerance for onnx-fp16). An export that fails its proof is not
   timed: the report records the refusal and its measured error instead;
3. `cnnc.runtime.bench.bench_models` times, interleaved (A B C D A B C D ...), the original on onnxruntime CPU (the
   first model: every ratio is against it), the compiled model on onnxruntime CPU, the fp16 model on onnxruntime
   CPU and the OpenVINO IR on OpenVINO's CPU plugin, at each `--batch` size, for `--duration` seconds each.

Results: bench/results/formats-<date>-<device>.{json,md} (environment, command, per-model exports and proofs, the
latency table with bootstrap intervals of each ratio).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import onnx

import cnnc
from cnnc.errors import CnncError, EquivalenceError
from cnnc.io import backend
from cnnc.io.frontend import from_torch
from cnnc.io.jsonio import read_json, write_json, write_text
from cnnc.io.target import runnable
from cnnc.runtime.bench import bench_models
from cnnc.runtime.bench_report import environment_lines, markdown_table, model_notes, table_rows
from cnnc.runtime.environment import device_slug
from cnnc.runtime.session import first_line
from cnnc.zoo import EXAMPLES, build_example, export_zoo_model

HERE = Path(__file__).resolve().parent
MODELS = ("linear-resnet34", "resnet18", "mobilenet_v2", "mobileone_s0")
TIMED_FORMATS = {"onnx": "compiled.onnx", "onnx-fp16": "compiled-fp16.onnx", "openvino": "compiled.xml"}
LABELS = {"onnx": "compiled, ort CPU", "onnx-fp16": "compiled fp16, ort CPU", "openvino": "compiled, OpenVINO CPU"}


def original_model(name: str, size: int) -> onnx.ModelProto:
    if name in EXAMPLES:
        module, example_input = build_example(name)
        return runnable(from_torch(module, example_input))
    return onnx.load(export_zoo_model(name, "torchscript17", size, "fp32"))


def _worst_error(report: dict) -> float | None:
    errors = [output.get("max_rel") for proof in report.get("proofs", {}).values()
              for output in proof.get("outputs", [])]
    errors = [e for e in errors if e is not None]
    return max(errors) if errors else None


def measure_model(name: str, size: int, batches: list[int], duration: float, folder: Path) -> dict:
    original = original_model(name, size)
    original_path = folder / f"{name}.onnx"
    backend.save(original, original_path)
    started = time.perf_counter()
    result = cnnc.compile(original)
    entry = {"model": name, "size_px": None if name in EXAMPLES else size,
             "compile_s": round(time.perf_counter() - started, 2),
             "nodes": {"original": len(original.graph.node), "compiled": len(result.model.graph.node)},
             "exports": {}}
    timed = [(str(original_path), "original, ort CPU")]
    for format_name, file_name in TIMED_FORMATS.items():
        path = folder / f"{name}-{file_name}"
        started = time.perf_counter()
        try:
            export = result.export(format_name, path)
        except EquivalenceError as error:
            entry["exports"][format_name] = {"refused": first_line(error),
                                             "max_rel_err": _worst_error(error.report)}
            continue
        except CnncError as error:  # a runtime that does not run here: recorded, not timed
            entry["exports"][format_name] = {"unavailable": first_line(error)}
            continue
        entry["exports"][format_name] = {
            "seconds": round(time.perf_counter() - started, 2),
            "proofs": {runtime: {"passed": proof["passed"], "summary": proof["summary"]}
                       for runtime, proof in export.report["proofs"].items()}}
        timed.append((str(path), LABELS[format_name]))
    entry["bench"] = bench_models([p for p, _ in timed], [label for _, label in timed], batch=batches,
                                  provider="cpu", duration=duration, warmup=5)
    return entry


def markdown(results: dict) -> str:
    first = results["models"][0]["bench"]
    # The environment of the first model's run; the load average at the end is the last model's.
    environment = {**first, "environment": {**first["environment"], "loadavg_1_5_15_end":
                                            results["models"][-1]["bench"]["environment"]["loadavg_1_5_15_end"]}}
    lines = ["# Deployment formats: original vs compiled on onnxruntime CPU, fp16 and OpenVINO CPU", "",
             f"Command: `{results['command']}`", "", *[f"- {line}" for line in environment_lines(environment)], ""]
    for entry in results["models"]:
        size = f", {entry['size_px']} px" if entry["size_px"] else ""
        lines += [f"## {entry['model']}{size}", "",
                  (f"Nodes {entry['nodes']['original']} -> {entry['nodes']['compiled']} "
                   f"(compile {entry['compile_s']} s). Exports:"), ""]
        for format_name, export in entry["exports"].items():
            if "refused" in export:
                lines.append(f"- {format_name}: REFUSED, not timed (max rel err {export['max_rel_err']}): "
                             f"{export['refused']}")
            elif "unavailable" in export:
                lines.append(f"- {format_name}: not available here: {export['unavailable']}")
            else:
                proofs = "; ".join(f"{runtime}: {proof['summary']}" for runtime, proof in export["proofs"].items())
                lines.append(f"- {format_name}: proven ({proofs})")
        loads = ", ".join(f"batch {c['batch']}: {c['loadavg_1_5_15_after']}" for c in entry["bench"]["comparisons"])
        lines += ["", markdown_table(table_rows(entry["bench"])), "", f"Load average (1, 5, 15 min) after: {loads}.",
                  ""]
        lines += [f"- {note}" for note in model_notes(entry["bench"])]
        lines.append("")
    lines.append("ratio: p50 / p50 of the original on onnxruntime CPU at the same batch, timed interleaved with it, "
                 "with a 95 % bootstrap interval over rounds; speedup = 1 / ratio. Short runs on a shared 2-core "
                 "machine: read the intervals, not the third digit.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=64, help="zoo models' input size in px")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per model and batch size")
    parser.add_argument("--out", default=None, help="results stem (default bench/results/formats-<date>-<device>)")
    parser.add_argument("--markdown-from", default=None, metavar="JSON", help="only rewrite the Markdown of a result")
    args = parser.parse_args(argv)
    if args.markdown_from:
        source = Path(args.markdown_from)
        write_text(source.with_suffix(".md"), markdown(read_json(source)))
        return 0
    batches = [int(b) for b in args.batch.split(",")]
    results = {"tool": "bench/formats.py", "command": " ".join(["python bench/formats.py",
                                                                        *(sys.argv[1:] if argv is None else argv)]),
               "models": []}
    with tempfile.TemporaryDirectory(prefix="cnnc-formats-") as folder:
        for name in args.models.split(","):
            print(f"{name}: compile, export, bench", flush=True)
            results["models"].append(measure_model(name, args.size, batches, args.duration, Path(folder)))
    first = results["models"][0]["bench"]
    stem = args.out or str(HERE / "results" / f"formats-{datetime.date.today().isoformat()}-{device_slug(first)}")
    write_json(Path(stem + ".json"), results, compact_numbers=True, make_parents=True)
    text = markdown(results)
    write_text(Path(stem + ".md"), text, make_parents=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
