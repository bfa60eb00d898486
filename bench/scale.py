"""Compile time against node count (issue 16, "Performance and scale"; issue 13, compile speed).

    python bench/scale.py                               # 1k, 10k, 100k nodes, default pipeline (~5 min, 2 cores)
    python bench/scale.py --nodes 1000,10000 --passes schedule

The model is a chain of `Conv(1x1) -> Relu` pairs on a 1x2x4x4 tensor (2 channels: every tensor and weight is tiny,
so the time measured is the compiler's per-node work, not arithmetic), built with onnx.helper. For each size it
records the compile time with the equivalence check off (`cnnc.compile(check=False)`), the seconds of every pass and
housekeeping step from the report, and the equivalence check timed apart, as `cnnc.compile` runs it: a model that
no pass changed is proven by `runtime.identity.same_model` (no run), any other by `check_equivalence` on
onnxruntime (`--ort-check` times that run too: onnxruntime's session creation alone takes ~10 s per model at 100k
nodes, optimisations off). Near-linear scaling means that seconds per 1k nodes stay flat.
Results: bench/results/scale-<date>.{json,md}, with the environment (load average included: the machine is shared).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import cnnc
from cnnc.io.jsonio import write_json, write_text
from cnnc.pipeline.manager import MAX_NODES
from cnnc.runtime.environment import environment
from cnnc.runtime.equivalence import check_equivalence
from cnnc.runtime.identity import same_model
from cnnc.threads import thread_count

RESULTS = Path(__file__).parent / "results"


def chain_model(nodes: int, channels: int = 2, size: int = 4, seed: int = 0, bn: bool = False) -> onnx.ModelProto:
    """`nodes` ops: nodes // 2 pairs of Conv(1x1, seeded weights) -> Relu, at opset 17; with `bn`, nodes // 3
    triples Conv -> BatchNormalization (seeded statistics) -> Relu, a chain where fold-bn (or onnxslim) rewrites."""
    rng = np.random.default_rng(seed)
    graph_nodes, weights, previous = [], [], "x"
    for i in range(nodes // (3 if bn else 2)):
        weight = (rng.standard_normal((channels, channels, 1, 1)) / np.sqrt(channels)).astype(np.float32)
        weights.append(nh.from_array(weight, f"w{i}"))
        graph_nodes.append(oh.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        if bn:
            for part, value in (("s", 1 + 0.1 * rng.standard_normal(channels)), ("b", 0.1 * rng.standard_normal(channels)),
                                ("m", 0.1 * rng.standard_normal(channels)), ("v", 0.5 + rng.random(channels))):
                weights.append(nh.from_array(value.astype(np.float32), f"{part}{i}"))
            graph_nodes.append(oh.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"],
                                            [f"n{i}"], name=f"bn{i}"))
        graph_nodes.append(oh.make_node("Relu", [f"n{i}" if bn else f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        previous = f"r{i}"
    shape = [1, channels, size, size]
    graph = oh.make_graph(graph_nodes, f"chain{nodes}", [oh.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [oh.make_tensor_value_info(previous, TensorProto.FLOAT, shape)], weights)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def measure(nodes: int, passes: str | None, ort_check: bool = False, bn: bool = False) -> dict:
    model = chain_model(nodes, bn=bn)
    load = os.getloadavg()[0]  # other processes on the shared machine's cores, as this size starts
    start, cpu_start = time.perf_counter(), time.process_time()
    result = cnnc.compile(model, passes=passes, check=False, max_nodes=None)  # measured past the default limit
    compile_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # the process's CPU time: wall time inflates under load
    # The check as `cnnc.compile` runs it: a model no pass changed is proven by `same_model`, with no run; anything
    # else runs both models on onnxruntime.
    start = time.perf_counter()
    unchanged = same_model(result.original, result.model)
    equivalent = unchanged or check_equivalence(result.original, result.model).passed
    check_seconds = time.perf_counter() - start
    ort_seconds = None
    if ort_check:  # the onnxruntime run even when unchanged: session creation alone is ~10 s at 100k nodes
        start = time.perf_counter()
        equivalent = check_equivalence(result.original, result.model).passed and equivalent
        ort_seconds = round(time.perf_counter() - start, 3)
    report = result.report
    steps = {record["pass"]: record["seconds"] for record in report["passes"]}
    housekeeping = {record["pass"]: {"runs": record["runs"], "seconds": record["seconds"]}
                    for record in report["housekeeping"]}
    notes = [f"{record['pass']}: {skip['why']}" for record in report["passes"] for skip in record["skipped"]
             if "limit" in skip["why"]]
    return {"nodes": nodes, "nodes_after": report["after"]["nodes"], "compile_seconds": round(compile_seconds, 3),
            "compile_cpu_seconds": round(cpu_seconds, 3),
            "loadavg_1min": load, "refused_by_default": nodes > MAX_NODES,
            "seconds_per_1k_nodes": round(1000 * compile_seconds / nodes, 4),
            "check_seconds": round(check_seconds, 3), "check": "unchanged: same_model" if unchanged else "onnxruntime run",
            "onnxruntime_check_seconds": ort_seconds, "equivalent": equivalent, "passes": steps,
            "housekeeping": housekeeping, "threads": report.get("threads"), "limit_notes": notes}


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# Compile time against node count ({env['date_utc']})", "",
             f"`{payload['command']}`", "",
             (f"{env['cpu']}, {env['cpus_usable']} usable CPUs, cnnc threads {payload['threads']}, load average at "
             f"start {env['loadavg_1_5_15']} (a shared machine: other processes compete for the cores), onnxruntime "
             f"{env['onnxruntime']}, Python {env['python']}. Model: `Conv(1x1)->"
             f"{'BatchNormalization->' if payload.get('bn') else ''}Relu` chain, 1x2x4x4."), "",
             ("| nodes | load (1 min) | after | compile s (no check) | CPU s | s / 1k nodes | check s (proof) | "
              "equivalent | slowest steps (s) |"), "|---:|---:|---:|---:|---:|---:|---:|:--:|---|"]
    for row in payload["rows"]:
        steps = {**row["passes"], **{k: v["seconds"] for k, v in row["housekeeping"].items()}}
        slowest = ", ".join(f"{k} {v:.2f}" for k, v in sorted(steps.items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"| {row['nodes']} | {row.get('loadavg_1min', float('nan')):.2f} | {row['nodes_after']} | "
                     f"{row['compile_seconds']:.2f} | "
                     f"{row.get('compile_cpu_seconds', float('nan')):.2f} | "
                     f"{row['seconds_per_1k_nodes']:.3f} | {row['check_seconds']:.2f} ({row['check']}"
                     + (f"; onnxruntime run {row['onnxruntime_check_seconds']:.1f} s" if row.get(
                         "onnxruntime_check_seconds") is not None else "") + ") | "
                     f"{'yes' if row['equivalent'] else 'NO'} | {slowest} |")
    lines += ["", "Every pass and housekeeping step, seconds:", ""]
    names = list(dict.fromkeys(k for row in payload["rows"] for k in [*row["passes"], *row["housekeeping"]]))
    lines += ["| step | " + " | ".join(str(row["nodes"]) for row in payload["rows"]) + " |",
              "|---|" + "---:|" * len(payload["rows"])]
    for name in names:
        cells = [row["passes"].get(name, row["housekeeping"].get(name, {}).get("seconds")) for row in payload["rows"]]
        lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    notes = sorted({note for row in payload["rows"] for note in row["limit_notes"]})
    notes += [f"cnnc compile: {row['nodes']} nodes is above the default max_nodes={MAX_NODES} (about where a compile reaches "
              "30 s) and is refused with exit 2 unless --max-nodes raises it; measured here with the limit lifted"
              for row in payload["rows"] if row.get("refused_by_default")]
    if notes:
        lines += ["", "Limits that applied:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1000,10000,100000", help="comma-separated node counts")
    parser.add_argument("--passes", default=None, help="pipeline spec (default: cnnc's default pipeline)")
    parser.add_argument("--ort-check", action="store_true",
                        help="also time the onnxruntime check when no pass changed the model (compile skips it)")
    parser.add_argument("--bn", action="store_true", help="Conv -> BN -> Relu triples (passes rewrite them)")
    parser.add_argument("--out", default=None, help="results stem (default bench/results/scale-<date>)")
    args = parser.parse_args(argv)
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        row = measure(nodes, args.passes, args.ort_check, args.bn)
        print(f"{nodes} nodes: compile {row['compile_seconds']:.2f} s (CPU {row['compile_cpu_seconds']:.2f} s), check {row['check_seconds']:.2f} s, "
              f"{row['passes']}", flush=True)
        rows.append(row)
    payload = {"command": "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "environment": environment("cpu"), "threads": thread_count(), "passes": args.passes or "default",
               "bn": args.bn, "rows": rows}
    stem = Path(args.out) if args.out else RESULTS / f"scale-{datetime.date.today().isoformat()}"
    write_json(stem.with_suffix(".json"), payload)
    write_text(stem.with_suffix(".md"), markdown(payload))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
