"""The zoo benchmark (issue 13, item 6): each zoo network x exporter x size x dtype, side by side in one run: the
original, cnnc's default pipeline, cnnc --auto, onnxsim, onnxslim, onnxruntime's offline optimisation and, for
RepVGG / MobileOne, timm's reparameterised export.

    python bench/zoo.py                                   # every zoo model, torchscript17 + dynamo, 64 px, fp32 + fp16
    python bench/zoo.py --sizes 64,224 --batches 1,8      # the issue's grid (224 px: pass --models for a subset)
    python bench/zoo.py --sizes 224 --no-timing --output bench/results/zoo-224-compile.json   # compile times only
    python bench/zoo.py --models squeezenet1_1,repvgg_a0 --quick      # a few minutes: proves the machinery works

Per row it records nodes, convs, file size, compile time (cnnc's with check=False; its equivalence check is timed
apart with `cnnc.verify`, as is every other tool's), equivalence to the original, and the latency speedup over the
original with its 95 % interval at each batch (ORT_ENABLE_ALL, CPU provider, interleaved: `cnnc.runtime.bench`;
four sessions per model take turns, and the intervals are Student's t over the session slots, so that they hold
the ~1 % offset between two sessions of one model),
then the issue's done-when criteria with each failure flagged (bench/zoo_report.py). A latency flag is a screen: the
row's flagged tools are timed again at once against their references (8 sessions, another seed) and, when the run is
done, a flag stands when that re-timing reproduces it (bench/zoo_report.py's docstring; --no-confirm skips the
re-timing and every flag stands). Rows are written as they finish
to bench/results/zoo-<date>.json (+ .md); a rerun skips the rows already there unless --force, so an interrupted
run resumes. The PNG (bench/zoo_plot.py) is drawn at the end. Exports are cached (cnnc.zoo.exports).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # zoo_tools.py, zoo_report.py and zoo_plot.py sit beside this script

import onnx
import zoo_report
import zoo_tools
from zoo_report import AA_CONTROL

import cnnc
from cnnc.errors import CnncError
from cnnc.io import jsonio
from cnnc.progress import progress
from cnnc.runtime import bench
from cnnc.runtime.environment import environment
from cnnc.runtime.session import first_line
from cnnc.runtime.stats import ratio_to_first
from cnnc.zoo import EXPORTERS, ZOO, export_zoo_model

TOOLS = ("cnnc", "cnnc-auto", "onnxsim", "onnxslim", "ort-offline", "timm-reparam")
DURATION_S, QUICK_DURATION_S = 12.0, 0.5
SESSIONS, QUICK_SESSIONS = 4, 1
CONFIRM_SESSIONS, CONFIRM_SEED_OFFSET = 8, 1000
QUICK_WARMUP = 3


def _list(text: str, kind=str) -> list:
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    parser.add_argument("--exporters", default="torchscript17,dynamo", help=f"of {', '.join(EXPORTERS)}")
    parser.add_argument("--sizes", default="64", help="input sizes in px, e.g. 64,224")
    parser.add_argument("--batches", default=None, help="batch sizes timed (default 1,8; --quick: 1)")
    parser.add_argument("--dtypes", default=None, help="fp32,fp16 (default both; --quick: fp32)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="tools beside the original")
    parser.add_argument("--duration", type=float, default=None, help=f"seconds of timing per batch ({DURATION_S})")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads when timing")
    parser.add_argument("--sessions", type=int, default=None,
                        help=f"onnxruntime sessions per model, taking turns ({SESSIONS}; --quick: {QUICK_SESSIONS})")
    parser.add_argument("--confirm-sessions", type=int, default=CONFIRM_SESSIONS,
                        help=f"sessions per model when a row's latency flags are timed again ({CONFIRM_SESSIONS})")
    parser.add_argument("--no-confirm", action="store_true",
                        help="do not time flagged rows again (their flags then stand unconfirmed)")
    parser.add_argument("--quick", action="store_true", help="short timings, batch 1, fp32")
    parser.add_argument("--no-timing", action="store_true",
                        help="compile, check and count only (e.g. the 224 px compile-time criterion); no latency")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs, the round order and the bootstrap")
    parser.add_argument("--force", action="store_true", help="recompute rows already in the JSON")
    parser.add_argument("--rescore", action="store_true",
                        help="only recompute the criteria (and the .md) of the rows already in the JSON; no timing")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/zoo-<date>.json)")
    parser.add_argument("--cache", default=None, help="export cache folder (default: cnnc.zoo.exports')")
    args = parser.parse_args(argv)
    args.models, args.exporters, args.tools = _list(args.models), _list(args.exporters), _list(args.tools)
    args.sizes = _list(args.sizes, int)
    args.batches = _list(args.batches or ("1" if args.quick else "1,8"), int)
    args.dtypes = _list(args.dtypes or ("fp32" if args.quick else "fp32,fp16"))
    args.duration = args.duration or (QUICK_DURATION_S if args.quick else DURATION_S)
    args.sessions = args.sessions or (QUICK_SESSIONS if args.quick else SESSIONS)
    if args.sessions < 1 or args.confirm_sessions < 2:
        parser.error("--sessions must be >= 1 and --confirm-sessions >= 2")
    for name in args.models:
        if name not in ZOO:
            parser.error(f"unknown model {name}; choose from {', '.join(ZOO)}")
    for tool in args.tools:
        if tool not in TOOLS:
            parser.error(f"unknown tool {tool}; choose from {', '.join(TOOLS)}")
    return args


def _versions() -> dict:
    found = {}
    for package in ("torch", "torchvision", "timm", "onnxscript", "onnxsim", "onnxslim", "onnx-graphsurgeon"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _verify(original: Path, entry: dict) -> None:
    """cnnc.verify of a tool's model against the original (the original's dtype sets the tolerance)."""
    started = time.perf_counter()
    try:
        result = cnnc.verify(str(original), entry["model"])
        entry["equivalent"], entry["equivalence"] = True, result["summary"]
    except CnncError as error:
        entry["equivalent"], entry["equivalence"] = False, first_line(error)
    except Exception as error:  # noqa: BLE001 - an output onnxruntime cannot run is a result
        entry["equivalent"], entry["equivalence"] = False, f"{type(error).__name__}: {first_line(error)}"
    entry["check_s"] = round(time.perf_counter() - started, 3)


def _time(original_model, entries: list[dict], args) -> None:
    """Time the original and every tool's model interleaved at each batch; store speedups with their intervals."""
    # The original again, on sessions of its own (an A/A control): what two runs of one identical model show.
    timed = [{"tool": AA_CONTROL, "model": original_model}] + [e for e in entries if "model" in e]
    report = bench.bench_models([original_model, *(e["model"] for e in timed)],
                                ["original", *(e["tool"] for e in timed)], batch=args.batches, provider="cpu",
                                duration=args.duration, threads=args.threads, sessions=args.sessions, seed=args.seed,
                                warmup=QUICK_WARMUP if args.quick else None)
    for entry in [None, *timed]:
        label = "original" if entry is None else entry["tool"]
        speedups = {}
        for comparison in report["comparisons"]:
            model = next(m for m in comparison["models"] if m["label"] == label)
            ratio = model["ratio_to_first"]  # candidate / original time: invert into a speedup
            speedups[str(comparison["batch"])] = {
                "p50_ms": round(model["stats"]["p50_ms"], 4), "rounds": comparison["rounds"],
                "speedup": round(1 / ratio["ratio"], 4) if ratio else None,
                "ci95": [round(1 / ratio["ci95"][1], 4), round(1 / ratio["ci95"][0], 4)] if ratio else None}
            if label in zoo_report.HELD_TO_PEERS:
                speedups[str(comparison["batch"])]["vs_peers"] = _against_peers(comparison, label, args.seed)
        if entry is None:
            entries.insert(0, {"tool": "original", "latency": speedups})
        else:
            entry["latency"] = speedups
    control = timed[0]
    del control["model"]
    entries.insert(1, control)
    entries[0]["timing_settings"] = report["settings"]


def _against_peers(comparison: dict, label: str, seed: int) -> dict:
    """`label`'s time over each peer's (> 1: behind), paired round by round, with the interval of
    `cnnc.runtime.stats.ratio_to_first` over the same session slots (so it holds the session offsets too)."""
    models = {m["label"]: m for m in comparison["models"]}
    result = {}
    for peer in zoo_report.PEERS:
        if peer in models and models[peer].get("ratio_to_first"):
            ratio = _paired(comparison, label, peer, seed)
            result[peer] = {"time_ratio": round(ratio["ratio"], 4), "ci95": [round(v, 4) for v in ratio["ci95"]]}
    return result


def _paired(comparison: dict, label: str, reference: str, seed: int) -> dict:
    """`label`'s time over `reference`'s in one comparison, paired round by round over the kept samples (every
    kept round of every model is the same round), Student's t over the session slots."""
    models = {m["label"]: m for m in comparison["models"]}
    own = models[label]
    sessions = comparison.get("sessions_per_model", 1)
    every = own["samples_kept_every"]  # the kept samples are rounds 0, every, 2 every, ... of every model alike
    groups = bench.session_slots(comparison["rounds"], sessions)[::every] if sessions > 1 else None
    return ratio_to_first(models[reference]["samples_ms"], own["samples_ms"], seed, groups=groups)


def _confirm(row: dict, original_model, entries: list[dict], args) -> None:
    """Time the row's screen-flagged tools again against their references, on new sessions with another seed (in this
    process), and store each pair's session-slot ratios: zoo_report.score keeps or clears each flag from them."""
    tools, batches = zoo_report.needed_for_confirmation(row)
    if not tools:
        return
    seed = args.seed + CONFIRM_SEED_OFFSET
    models = {e["tool"]: e["model"] for e in entries if "model" in e}
    labels = sorted(tools & models.keys())
    confirmation = {"seed": seed, "sessions": args.confirm_sessions, "duration_s": args.duration,
                    "tools": labels, "batches": sorted(batches, key=int)}
    try:
        report = bench.bench_models([original_model, *(models[t] for t in labels)], ["original", *labels],
                                    batch=[int(b) for b in confirmation["batches"]], provider="cpu",
                                    duration=args.duration, threads=args.threads, sessions=args.confirm_sessions,
                                    seed=seed)
        pairs: dict = {}
        for comparison in report["comparisons"]:
            for tool in labels:
                for reference in ["original", *labels]:
                    ratio = _paired(comparison, tool, reference, seed) if reference != tool else {}
                    if "slots" in ratio:  # a pair over fewer than two kept slots has none: not timed again
                        pairs.setdefault(zoo_report.pair_key(tool, reference), {})[str(comparison["batch"])] = {
                            "ratio": round(ratio["ratio"], 5), "slots": [round(v, 5) for v in ratio["slots"]]}
    except Exception as error:  # noqa: BLE001 - an untimed confirmation leaves the flags standing, with why
        confirmation["error"] = f"{type(error).__name__}: {first_line(error)}"
        row["confirmation"] = confirmation
        return
    confirmation["pairs"] = pairs
    confirmation["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    row["confirmation"] = confirmation


def run_row(name: str, exporter: str, size: int, dtype: str, args) -> dict:
    started = time.perf_counter()
    path = export_zoo_model(name, exporter, size, dtype, args.cache)
    row = {"model": name, "exporter": exporter, "size": size, "dtype": dtype,
           "export_s": round(time.perf_counter() - started, 3), "export": str(path)}
    original_model = onnx.load(str(path))
    entries = [zoo_tools.run_tool(tool, path, name=name, exporter=exporter, size=size, dtype=dtype,
                                  batches=args.batches, directory=args.cache) for tool in args.tools]
    for entry in entries:
        if "model" in entry:
            entry["identical_to_input"] = entry["model"].graph == original_model.graph
    for entry in entries:
        if "model" in entry:
            _verify(path, entry)
    if args.no_timing:
        entries.insert(0, {"tool": "original"})
        row["timing"] = "not timed (--no-timing)"
    else:
        try:
            _time(original_model, entries, args)
        except Exception as error:  # noqa: BLE001 - keep the row's other facts
            row["timing_error"] = f"{type(error).__name__}: {first_line(error)}"
            entries.insert(0, {"tool": "original"})
    entries[0].update(zoo_tools.measures(original_model))
    row["tools"] = entries
    if not args.no_timing and not args.no_confirm and "timing_error" not in row:
        _confirm(row, original_model, entries, args)
    for entry in entries:
        entry.pop("model", None)
    row["criteria"] = zoo_report.criteria(row)  # the screen; main() scores the run's flags as one family
    row["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output) if args.output else (
        HERE / "results" / f"zoo-{datetime.date.today().isoformat()}.json")
    report = jsonio.read_json(output) if output.is_file() else {"tool": "bench/zoo.py", "rows": {}}
    if args.rescore:
        zoo_report.score_report(report)
        jsonio.write_json(output, report, compact_numbers=True, make_parents=True)
        jsonio.write_text(output.with_suffix(".md"), zoo_report.markdown(report))
        print(f"rescored {len(report['rows'])} rows in {output}", file=sys.stderr)
        return 0
    report["command"] = " ".join(["python", "bench/zoo.py", *(argv if argv is not None else sys.argv[1:])])
    report["environment"] = {**environment("cpu"), "packages": _versions(), "cnnc_auto": zoo_tools.auto_available()}
    keys = [(m, e, s, d) for m in args.models for e in args.exporters for s in args.sizes for d in args.dtypes]
    with progress(len(keys), "zoo") as bar:
        for model, exporter, size, dtype in keys:
            key = f"{model}|{exporter}|{size}px|{dtype}"
            if key in report["rows"] and not args.force:
                bar.update(1)
                continue
            try:
                report["rows"][key] = run_row(model, exporter, size, dtype, args)
            except Exception as error:  # noqa: BLE001 - a failed export is a row too
                report["rows"][key] = {"model": model, "exporter": exporter, "size": size, "dtype": dtype,
                                       "error": f"{type(error).__name__}: {first_line(error)}"}
            print(zoo_report.row_line(key, report["rows"][key]), file=sys.stderr, flush=True)
            jsonio.write_json(output, report, compact_numbers=True, make_parents=True)
            jsonio.write_text(output.with_suffix(".md"), zoo_report.markdown(report))
            bar.update(1)
    zoo_report.score_report(report)
    jsonio.write_json(output, report, compact_numbers=True, make_parents=True)
    jsonio.write_text(output.with_suffix(".md"), zoo_report.markdown(report))
    try:
        import zoo_plot  # matplotlib is optional: without it the JSON and Markdown stand alone
        zoo_plot.plot(report, output.with_suffix(".png"))
    except ImportError as error:
        print(f"no PNG: {error}", file=sys.stderr)
    failures = sum(len(r.get("criteria", {}).get("failures", [])) for r in report["rows"].values())
    print(f"{len(report['rows'])} rows in {output}; {failures} criterion failures flagged", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
