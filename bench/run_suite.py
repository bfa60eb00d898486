"""Benchmark the papers' models, original against compiled by cnnc, and write bench/results/<date>-<device>.*

    python bench/run_suite.py                      # the whole suite (<= 20 min on a 2-core CPU)
    python bench/run_suite.py --quick              # four small models, batch 1, short timings (~1 min)
    python bench/run_suite.py --models resnet18,vgg7-cifar --batches 1,8

For each model (bench/paper_models.py): build it in torch with seeded weights and calibrated BN statistics, export
it to ONNX (cnnc's torch frontend, or cnnc.homotopy's export at t = 0), compile it with `cnnc.compile` and the
default pipeline of the passes registered at run time (plus any extra variant the model lists, e.g. destride for
the all-conv LeNet), which proves the result equivalent on seeded inputs; then time original and compiled
interleaved (A B A B) with `cnnc.runtime.bench` at ORT_ENABLE_ALL, at each batch size. A compile that fails is
recorded and the suite goes on. Never mixes devices: one run, one provider, one file name.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # paper_models.py sits beside this script

import paper_models

import cnnc
from cnnc.errors import CnncError
from cnnc.passes import DEFAULT_PIPELINE, PASSES
from cnnc.runtime import bench, bench_report
from cnnc.runtime.environment import device_slug
from cnnc.runtime.equivalence import DEFAULT_ATOL
from cnnc.runtime.session import runnable_model

QUICK_MODELS = ("linear-resnet34", "skip3-linear", "allskip6-homotopy", "lenet-allconv")
# Seconds of interleaved timing per (model, batch), and warm-up rounds. Large batches of the 224×224 nets take
# seconds per call on a 2-core CPU: a few rounds each (MIN_ROUNDS still applies).
DURATION_S = {"small": 6.0, "big": 10.0}
QUICK_DURATION_S = 1.0
CHECK_ERROR_FACTOR = 4.0  # |compiled − original| <= |compiled − exact| + |exact − original|, each about the latter


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _pass_summary(report: dict) -> list[dict]:
    return [{"pass": r["pass"], "changed": r["changed"], "applied": len(r["applied"]), "skipped": len(r["skipped"]),
             "error": r["error"], "seconds": r["seconds"]} for r in report["passes"]]


def float32_error(module, original, spec, seed: int = 0) -> float:
    """Largest |original ONNX in float32 on onnxruntime (optimisations off) − the torch module in float64| on seeded
    uniform [0, 1) and N(0, 1) batches of 3: how far the original itself is from the function it stands for."""
    import numpy as np
    import torch

    from cnnc.runtime.session import make_session

    reference = copy.deepcopy(module).double().eval()
    session = make_session(original, "cpu", "disabled")
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    worst = 0.0
    for x in (rng.random((3, *spec.input_shape[1:])), rng.standard_normal((3, *spec.input_shape[1:]))):
        with torch.no_grad():
            exact = reference(torch.from_numpy(x)).numpy()
        got = session.run(None, {name: x.astype(np.float32)})[0]
        worst = max(worst, float(np.abs(got - exact).max()))
    return worst


def _compile(spec, original, passes: str | None, atol: float) -> tuple[object | None, dict]:
    started = time.perf_counter()
    try:
        result = cnnc.compile(original, passes=passes, atol=atol)
    except CnncError as error:  # an equivalence failure or a refused model: recorded, the suite goes on
        return None, {"passes": passes or ",".join(DEFAULT_PIPELINE), "failed": f"{type(error).__name__}: "
                                                                               f"{error}"}
    report = result.report
    return result.model, {
        "passes": passes or ",".join(DEFAULT_PIPELINE),
        "seconds": round(time.perf_counter() - started, 2),
        "equivalence": report["equivalence"]["summary"],
        "pass_records": _pass_summary(report),
        "before": {k: report["before"][k] for k in ("nodes", "ops", "parameters", "macs")},
        "after": {k: report["after"][k] for k in ("nodes", "ops", "parameters", "macs")},
    }


def run_model(spec, batches, provider, threads, duration, log) -> tuple[dict, list[dict], dict]:
    """Build, export, compile and time one model; returns (model record, comparisons, last bench report)."""
    started = time.perf_counter()
    module, example, exporter = paper_models.build(spec)
    record = {"name": spec.name, "source": spec.source, "input_shape": list(spec.input_shape),
              "linear": spec.linear, "paper_result": spec.paper_result,
              "subnormal_activations": paper_models.subnormal_fraction(module, example)}
    original = runnable_model(exporter(module, example))
    record["export_seconds"] = round(time.perf_counter() - started, 2)
    # The check's tolerance: the compiled model must agree with the original to within a few times the original's
    # own float32 error. A deep plain net of random weights is ill-conditioned enough that exact rewrites (BN
    # folding) move its float32 output by more than the default atol while staying as close to the float64 truth
    # as the original is (measured on the homotopy ResNet-34: 1.2e-4 and 1.4e-4 of max|y|).
    record["original_float32_error"] = float32_error(module, original, spec)
    atol = max(DEFAULT_ATOL, CHECK_ERROR_FACTOR * record["original_float32_error"])
    record["check_atol"] = atol
    variants = [("compiled", None), *spec.extra_variants]
    models, labels, record["variants"] = [original], ["original"], {}
    for label, passes in variants:
        missing = [p.split("{")[0] for p in (passes or "").split(",") if p and p.split("{")[0] not in
                   PASSES]
        if missing:
            record["variants"][label] = {"passes": passes, "failed": f"pass(es) not registered: {missing}"}
            continue
        compiled, info = _compile(spec, original, passes, atol)
        record["variants"][label] = info
        if compiled is not None:
            models.append(compiled)
            labels.append(label)
        log(f"  {label}: {info.get('equivalence') or info.get('failed')}")
    comparisons, last = [], None
    if len(models) < 2:
        return record, comparisons, last
    for batch in batches:
        big = spec.big and batch > 1
        warmup = 2 if big else 10
        seconds = duration if duration is not None else DURATION_S["big" if spec.big else "small"]
        last = bench.bench_models(models, labels, batch=batch, provider=provider, warmup=warmup,
                                  duration=seconds, threads=threads)
        for comparison in last["comparisons"]:
            comparison["title"] = f"{spec.name} @ {batch}"
            comparison["model"] = spec.name
            comparison["settings"] = {"warmup_rounds": warmup, "duration_s": seconds}
            comparisons.append(comparison)
            ratios = ", ".join(f"{m['label']} {m['ratio_to_first']['speedup']:.2f}x" for m in comparison["models"][1:]
                               if m["ratio_to_first"])
            log(f"  batch {batch}: original p50 {bench_report.format_ms(comparison['models'][0]['stats']['p50_ms'])}"
                f", speedup {ratios} ({comparison['rounds']} rounds)")
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record, comparisons, last


def summary_rows(report: dict) -> list[tuple[str, ...]]:
    records = {r["name"]: r for r in report["models"]}
    rows = []
    for comparison in report["comparisons"]:
        record = records[comparison["model"]]
        first = comparison["models"][0]
        for model in comparison["models"][1:]:
            info = record["variants"][model["label"]]
            ratio = model["ratio_to_first"]
            rows.append((
                record["name"], "x".join(map(str, record["input_shape"][1:])), str(comparison["batch"]),
                model["label"], info["passes"],
                f"{info['before']['nodes']} -> {info['after']['nodes']}",
                f"{info['before']['macs'] / 1e6:.4g}M -> {info['after']['macs'] / 1e6:.4g}M",
                bench_report.format_ms(first["stats"]["p50_ms"]), bench_report.format_ms(model["stats"]["p50_ms"]),
                f"{ratio['speedup']:.2f}x [{1 / ratio['ci95'][1]:.2f}-{1 / ratio['ci95'][0]:.2f}]" if ratio else "-",
                f"{first['stats']['min_ms'] / model['stats']['min_ms']:.2f}x" if ratio else "-",
            ))
    return rows


SUMMARY_HEADERS = ("model", "input", "batch", "variant", "passes", "nodes", "MACs/image", "original p50",
                   "compiled p50", "speedup p50 [95% CI]", "speedup min")


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# cnnc bench suite: {report['device_slug']}", "",
             (f"Command: `{report['command']}` (git {report['git_commit']}{' + local changes' if report['git_dirty'] else ''},"
             f" {report['wall_seconds'] / 60:.1f} min)"), "",
             *[f"- {line}" for line in bench_report.environment_lines(report)], "",
             ("Each row: the model as exported (original) against cnnc's compile of it, timed interleaved at "
             "ORT_ENABLE_ALL on the same provider; speedup p50 = p50(original) / p50(compiled), speedup min = the "
             "same for the fastest call of each (the least disturbed by other processes; where the two disagree, "
             "the machine was busy). onnxruntime already folds Conv+BN at ORT_ENABLE_ALL, so passes that only do "
             "that show about 1.00x."), "",
             bench_report.markdown_table(summary_rows(report), SUMMARY_HEADERS), "",
             "## Models", ""]
    for record in report["models"]:
        sub = record["subnormal_activations"]
        lines.append(f"- **{record['name']}** ({record['source']}, input {record['input_shape']}): "
                     f"subnormal activations {sub['fraction']:.2%} (smallest |x| > 0: {sub['smallest_nonzero']:.3g}); "
                     f"float32 error of the original {record['original_float32_error']:.2g}, check atol "
                     f"{record['check_atol']:.2g}"
                     + (f"; paper: {record['paper_result']}" if record["paper_result"] else ""))
        for label, info in record["variants"].items():
            if "failed" in info:
                lines.append(f"  - {label}: FAILED: {info['failed']}")
                continue
            applied = ", ".join(f"{p['pass']} {p['applied']} rewrite(s)" + (f" ERROR {p['error']}" if p["error"]
                                                                            else "")
                                for p in info["pass_records"])
            lines.append(f"  - {label}: {applied}; {info['equivalence']}; compiled in {info['seconds']} s")
    lines += ["", "## All statistics", "", bench_report.markdown_table(bench_report.table_rows(report)), ""]
    notes = bench_report.model_notes(report)
    if notes:
        lines += ["Notes:", "", *[f"- {note}" for note in notes], ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_MODELS)} at batch 1, briefly")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of: {', '.join(paper_models.MODELS)}")
    parser.add_argument("--batches", default=None, help="batch sizes (default 1,64; --quick: 1)")
    parser.add_argument("--provider", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of timing per model and batch")
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder (default bench/results)")
    args = parser.parse_args(argv)

    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else paper_models.MODELS)
    unknown = [n for n in names if n not in paper_models.MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(paper_models.MODELS)}")
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,64")).split(",")]
    duration = args.duration if args.duration is not None else (QUICK_DURATION_S if args.quick else None)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.perf_counter()
    records, comparisons, last = [], [], None
    load_start = [round(v, 2) for v in os.getloadavg()]
    for name in names:
        log(f"{name}:")
        record, found, report = run_model(paper_models.MODELS[name], batches, args.provider, args.threads,
                                          duration, log)
        records.append(record)
        comparisons += found
        last = report or last
    if last is None:
        log("nothing was timed")
        return 1
    command = "python bench/run_suite.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    report = {"tool": "bench/run_suite.py", "command": command, "git_commit": _git("rev-parse", "--short", "HEAD"),
              "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
              "environment": {**last["environment"], "loadavg_1_5_15": load_start,
                              "loadavg_1_5_15_end": [round(v, 2) for v in os.getloadavg()]},
              "settings": {**last["settings"], "warmup_rounds": "10 (2 for 224x224 at batch > 1)",
                           "duration_s": duration or f"{DURATION_S['small']} ({DURATION_S['big']} for 224x224)",
                           "devices_used": sorted({m["device"] for c in comparisons for m in c["models"]})},
              "default_passes": list(DEFAULT_PIPELINE), "notes": [], "models": records, "comparisons": comparisons,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    report["device_slug"] = device_slug(report)
    stem = f"{report['environment']['date_utc'][:10]}-{report['device_slug']}" + ("-quick" if args.quick else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench_report.write_json(report, out / f"{stem}.json")
    write_markdown(report, out / f"{stem}.md")
    try:
        bench_report.write_plot(report, out / f"{stem}.png", title="cnnc suite: original vs compiled")
    except CnncError as error:  # matplotlib missing: the JSON and Markdown are still written
        log(f"no plot: {error}")
    print(bench_report.markdown_table(summary_rows(report), SUMMARY_HEADERS))
    log(f"wrote {out / stem}.{{json,md,png}} in {report['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
