"""Long differential-fuzzing profile: every registered pass and the default pipeline on N random CNN graphs each.

    nice -n 10 python bench/fuzz.py --graphs 2000              # writes bench/results/fuzz-<date>.{md,json}
    python bench/fuzz.py --graphs 2000 --budget-min 30         # stop starting graphs after 30 minutes
    python bench/fuzz.py --graphs 20 --out /tmp/fuzz-check     # a quick look, elsewhere

Graph i is `random_case(seed + i)` from tests/fuzz_graphs.py (the generator the CI profile, tests/test_fuzz.py,
drives through hypothesis), and every spec runs on every graph, so the count per pass is the number of graphs run.
A pass runs with `strict=True` (an exception is a crash), its result goes through the backend and the full ONNX
checker and runs on onnxruntime (CPU, optimisations off) against the original: see `check_pass` for the verdict.
A failure is reproduced with `check_pass(random_case(seed), spec)`. Exit code 1 if any mismatch or crash.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the generator lives beside the tests that use it

import numpy as np
import onnx
import onnxruntime
import torch
from fuzz_graphs import case_forms, check_pass, fuzzed_specs, random_case, reproducer, run_on_onnxruntime

MAX_FAILURES_KEPT = 20


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(graphs: int, seed: int, budget_s: float | None, progress_every: int) -> dict:
    specs, left_out = fuzzed_specs()
    stats = {spec: Counter() for spec in specs}
    seconds = dict.fromkeys(specs, 0.0)
    failures: list[dict] = []
    ops: Counter = Counter()
    forms: Counter = Counter()  # issue 16's forms: opsets, float16, inputs with a default, If, Split, Reduce*, Pad
    invalid: list[dict] = []
    commit = _git_commit()  # the code this run imported: a long run must not name a later commit
    started = time.perf_counter()
    ran = 0
    for index in range(graphs):
        if budget_s is not None and time.perf_counter() - started > budget_s:
            break
        case = random_case(seed + index)
        ops.update(case.op_types())
        forms.update(case_forms(case))
        try:
            reference = run_on_onnxruntime(case.model, case.feeds)
        except Exception as error:  # noqa: BLE001 - any refusal of a generated graph is recorded as invalid
            invalid.append({"seed": seed + index, "error": f"{type(error).__name__}: {error}"[:500]})
            continue
        ran += 1
        for spec in specs:
            outcome = check_pass(case, spec, reference)
            seconds[spec] += outcome.seconds
            counter = stats[spec]
            counter["tried"] += 1
            counter["changed"] += outcome.changed
            counter["float64_judged"] += outcome.float64_judged
            if outcome.status != "ok":
                counter["mismatches" if outcome.status == "mismatch" else "crashes"] += 1
                if len(failures) < MAX_FAILURES_KEPT:
                    failures.append({"seed": seed + index, "spec": spec, "status": outcome.status,
                                     "reproducer": reproducer(case, outcome)})
                print(f"seed {seed + index}: {spec}: {outcome.status}: {outcome.detail.splitlines()[0]}",
                      file=sys.stderr, flush=True)
        if progress_every and ran % progress_every == 0:
            elapsed = time.perf_counter() - started
            bad = sum(c["mismatches"] + c["crashes"] for c in stats.values())
            print(f"{ran} graphs in {elapsed:.0f} s, {bad} failures", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    per_spec = {}
    for spec in specs:
        counter = stats[spec]
        per_spec[spec] = {"graphs": counter["tried"], "changed": counter["changed"],
                          "mismatches": counter["mismatches"], "crashes": counter["crashes"],
                          "float64_judged": counter["float64_judged"], "seconds": round(seconds[spec], 2),
                          "ms_per_graph": round(1000 * seconds[spec] / max(counter["tried"], 1), 1)}
    return {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/fuzz.py " + " ".join(sys.argv[1:]),
        "graphs_requested": graphs,
        "graphs_run": ran,
        "stopped_by_budget": ran + len(invalid) < graphs,
        "seed": seed,
        "seconds": round(elapsed, 1),
        "specs": per_spec,
        "left_out": left_out,
        "invalid_graphs": invalid,
        "failures": failures,
        "ops_generated": dict(ops.most_common()),
        "forms_generated": dict(sorted(forms.items())),
        "environment": {"cnnc_commit": commit, "python": platform.python_version(), "onnx": onnx.__version__,
                        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "numpy": np.__version__,
                        "cpu_count": os.cpu_count(), "machine": platform.machine()},
    }


def markdown(result: dict) -> str:
    lines = [f"# Differential fuzzing, {result['date']}", "",
             (f"`{result['command']}`: {result['graphs_run']} random CNN graphs (of {result['graphs_requested']} "
             f"requested{', stopped by the time budget' if result['stopped_by_budget'] else ''}), seeds "
             f"{result['seed']}..{result['seed'] + result['graphs_run'] - 1}, every spec on every graph, "
             f"{result['seconds']:.0f} s in all on {result['environment']['cpu_count']} shared CPU cores "
             f"(cnnc {result['environment']['cnnc_commit']}, onnxruntime {result['environment']['onnxruntime']})."),
             "", ("Each result is compared with the original on onnxruntime (CPU, optimisations off): "
                  "max|diff| ≤ 1e-5·max(1, max|ref|) for float32 outputs (float16: 2e-3 + 2e-2·max|ref|), else "
                  "judged against a float64 evaluation (column float64); a pass that changes the caller's "
                  "ModelProto or the graph inputs (inputs with a default included) fails too."),
             "",
             "| pass / pipeline | graphs | changed | mismatches | crashes | float64 | seconds | ms per graph |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for spec, row in result["specs"].items():
        lines.append(f"| `{spec}` | {row['graphs']} | {row['changed']} | {row['mismatches']} | {row['crashes']} | "
                     f"{row['float64_judged']} | {row['seconds']:.1f} | {row['ms_per_graph']:.1f} |")
    for name, why in result["left_out"].items():
        lines.append(f"| `{name}` | not run: {why} | | | | | | |")
    ops = ", ".join(f"{op} {n}" for op, n in result["ops_generated"].items())
    lines += ["", f"Invalid generated graphs (onnxruntime refused the original): {len(result['invalid_graphs'])}.",
              "", f"Ops generated: {ops}."]
    if result.get("forms_generated"):
        lines += ["", "Graphs holding each issue-16 form: "
                  + ", ".join(f"{form} {n}" for form, n in result["forms_generated"].items()) + "."]
    if result["failures"]:
        lines += ["", "## Failures", ""]
        for failure in result["failures"]:
            lines += [f"### seed {failure['seed']}, `{failure['spec']}`: {failure['status']}", "", "```",
                      failure["reproducer"], "```", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", type=int, default=2000, help="random graphs; every spec runs on each")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first graph")
    parser.add_argument("--budget-min", type=float, default=None, help="start no graph after this many minutes")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for fuzz-<date>.{md,json}")
    parser.add_argument("--progress", type=int, default=100, help="a progress line every N graphs (0: none)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    result = run(args.graphs, args.seed, args.budget_min * 60 if args.budget_min else None, args.progress)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"fuzz-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    failures = sum(row["mismatches"] + row["crashes"] for row in result["specs"].values())
    print(f"{result['graphs_run']} graphs, {len(result['specs'])} specs, {failures} failures; wrote "
          f"{stem}.md and {stem}.json")
    return 1 if failures or result["invalid_graphs"] else 0


if __name__ == "__main__":
    sys.exit(main())
