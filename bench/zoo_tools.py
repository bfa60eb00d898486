"""The tools bench/zoo.py compares, each as `tool(original_path) -> (model, seconds, notes)`, and the measures of a
result (nodes, convs, bytes).

- `cnnc`: `cnnc.compile(path, check=False)` timed (the equivalence check is measured apart by bench/zoo.py with
  `cnnc.verify`, so that compile time is the passes' time);
- `cnnc-auto`: the same with `auto=True, batches=...` (measured rewrites); "not available" when the installed
  `cnnc.compile` has no `auto` keyword;
- `onnxsim`, `onnxslim`: the libraries' defaults (optional: their absence is a note);
- `ort-offline`: onnxruntime's own graph optimisation at ORT_ENABLE_EXTENDED, saved with `optimized_model_filepath`
  on the CPU provider (the offline model contains CPU-specific fused ops, e.g. com.microsoft FusedConv);
- `timm-reparam`: for RepVGG / MobileOne, timm's `reparameterize_model` exported by the same exporter, the
  reference cnnc's merge is held to.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort

import cnnc
from cnnc.runtime.session import first_line, runnable_model
from cnnc.zoo import ZOO, export_zoo_model

CONV_OPS = {"Conv", "FusedConv", "NhwcFusedConv", "QLinearConv"}


class NotAvailable(Exception):
    """A tool that cannot run here (not installed, or a keyword cnnc does not have yet): recorded, not an error."""


def measures(model: onnx.ModelProto) -> dict:
    """Top-level nodes, convolutions (fused forms included) and serialized bytes of `model`."""
    nodes = list(model.graph.node)
    return {"nodes": len(nodes), "convs": sum(n.op_type in CONV_OPS for n in nodes), "bytes": model.ByteSize()}


def auto_available() -> bool:
    return "auto" in inspect.signature(cnnc.compile).parameters


def run_cnnc(path: Path, batches: list[int], auto: bool = False) -> tuple[onnx.ModelProto, float, list[str]]:
    options = {}
    if auto:
        if not auto_available():
            raise NotAvailable("cnnc.compile has no `auto` keyword in this version")
        options = {"auto": True, "batches": tuple(batches)}
    started = time.perf_counter()
    result = cnnc.compile(str(path), check=False, **options)
    seconds = time.perf_counter() - started
    notes = [f"{p['pass']}: {len(p['applied'])} applied, {len(p['skipped'])} skipped"
             + (f", error {p['error']}" if p.get("error") else "") for p in result.report["passes"]]
    if "auto" in result.report:
        auto = result.report["auto"]
        notes.append(f"--auto emitted the {auto['emitted']}: {auto['why']}")
        notes.append(f"--auto final comparison: {auto.get('final_looks', 1)} look(s), {auto.get('final_stop', '')}")
        notes += [f"--auto {name} b{batch}: {record['ratio']:.3f} [{record['ci95'][0]:.3f}, {record['ci95'][1]:.3f}]"
                  for name, per_batch in (auto.get("final") or {}).items() if isinstance(per_batch, dict)
                  for batch, record in per_batch.items() if isinstance(record, dict) and "ci95" in record]
    return result.model, seconds, notes


def run_onnxsim(path: Path) -> tuple[onnx.ModelProto, float, list[str]]:
    try:
        import onnxsim  # optional dependency: a peer tool, absent -> not available
    except ImportError as error:
        raise NotAvailable(f"onnxsim not installed ({error})") from None
    model = onnx.load(str(path))
    started = time.perf_counter()
    simplified, check_ok = onnxsim.simplify(model)
    seconds = time.perf_counter() - started
    return runnable_model(simplified), seconds, [] if check_ok else ["onnxsim's own check failed"]


def run_onnxslim(path: Path) -> tuple[onnx.ModelProto, float, list[str]]:
    try:
        import onnxslim  # optional dependency: a peer tool, absent -> not available
    except ImportError as error:
        raise NotAvailable(f"onnxslim not installed ({error})") from None
    model = onnx.load(str(path))
    started = time.perf_counter()
    slimmed = onnxslim.slim(model)
    return runnable_model(slimmed), time.perf_counter() - started, []


def run_ort_offline(path: Path) -> tuple[onnx.ModelProto, float, list[str]]:
    with tempfile.TemporaryDirectory(prefix="cnnc-zoo-ort-") as folder:
        target = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3
        started = time.perf_counter()
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        seconds = time.perf_counter() - started
        return onnx.load(str(target)), seconds, ["CPU-provider specific (ORT_ENABLE_EXTENDED, saved offline)"]


def run_timm_reparameterized(name: str, exporter: str, size: int, dtype: str,
                             directory: Path | None) -> tuple[onnx.ModelProto, float, list[str]]:
    if not ZOO[name].reparameterizable:
        raise NotAvailable("no train-time branches")
    started = time.perf_counter()
    path = export_zoo_model(name, exporter, size, dtype, directory, reparameterized=True)
    seconds = time.perf_counter() - started
    return onnx.load(str(path)), seconds, [("timm.utils.reparameterize_model, then the same export (time: "
                                           "build + reparameterise + export, or a cache hit)")]


def run_tool(tool: str, path: Path, *, name: str, exporter: str, size: int, dtype: str, batches: list[int],
             directory: Path | None) -> dict:
    """One tool on one export: its model (under "model", not serialised), measures, seconds, notes; or an error /
    "not available" record."""
    try:
        if tool == "cnnc":
            model, seconds, notes = run_cnnc(path, batches)
        elif tool == "cnnc-auto":
            model, seconds, notes = run_cnnc(path, batches, auto=True)
        elif tool == "onnxsim":
            model, seconds, notes = run_onnxsim(path)
        elif tool == "onnxslim":
            model, seconds, notes = run_onnxslim(path)
        elif tool == "ort-offline":
            model, seconds, notes = run_ort_offline(path)
        elif tool == "timm-reparam":
            model, seconds, notes = run_timm_reparameterized(name, exporter, size, dtype, directory)
        else:
            raise ValueError(f"unknown tool {tool}")
    except NotAvailable as reason:
        return {"tool": tool, "available": False, "note": str(reason)}
    except Exception as error:  # noqa: BLE001 - a tool's failure is a result
        return {"tool": tool, "available": True, "error": f"{type(error).__name__}: {first_line(error)}"}
    return {"tool": tool, "available": True, "model": runnable_model(model), "compile_s": round(seconds, 3),
            "notes": notes, **measures(model)}
