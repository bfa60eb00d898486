"""onnx's own conformance tests through cnnc: every backend node test that onnxruntime runs correctly, compiled.

    nice -n 10 python bench/onnx_node_tests.py                   # writes bench/results/onnx-node-tests-<date>.*
    python bench/onnx_node_tests.py --only 'test_(shape|reshape)' --out /tmp/nt   # a quick look, elsewhere
    python bench/onnx_node_tests.py --data /tmp/node-data        # reuse (or keep) the generated test data

The node tests (about 1,900 single-op models with expected outputs) are written as onnx's `generate-data` lays them
out (tests/onnx_node_cases.py: `generate_node_tests`), then each goes through `classify`: onnxruntime against the
expected outputs first (a model it fails or gets wrong is out of scope), then `cnnc.compile` with the default
passes and the compiled model against the expected outputs. Verdicts: ok, wrong, equivalence-failure, refused
(grouped by reason), crash; `leaked` counts compiles that wrote to stdout/stderr. Exit code 1 on any wrong,
equivalence failure or crash.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the harness lives beside the test that samples it

import onnx
import onnxruntime
from onnx_node_cases import VERDICTS, classify, generate_node_tests, reason_group

BAD = ("wrong", "equivalence-failure", "crash")


def run(data: Path, only: str | None) -> dict:
    started = time.perf_counter()
    if not (data / "node").is_dir():
        generate_node_tests(data)
    folders = sorted(p for p in (data / "node").iterdir() if (p / "model.onnx").is_file())
    if only:
        folders = [p for p in folders if re.search(only, p.name)]
    verdicts = []
    for index, folder in enumerate(folders, 1):
        verdict = classify(folder)
        verdicts.append(verdict)
        if verdict.verdict in BAD + ("refused",):
            print(f"{folder.name}: {verdict.verdict}: {verdict.reason[:200]}", file=sys.stderr, flush=True)
        if index % 100 == 0:
            print(f"{index}/{len(folders)} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    counts = Counter(v.verdict for v in verdicts)
    groups: dict[str, list[str]] = defaultdict(list)
    examples: dict[str, str] = {}
    for v in verdicts:
        if v.verdict == "refused":
            key = reason_group(v.reason)
            groups[key].append(v.name)
            examples.setdefault(key, v.reason)
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python bench/onnx_node_tests.py", *sys.argv[1:]]),
        "seconds": round(time.perf_counter() - started, 1),
        "models": len(verdicts),
        "counts": {name: counts.get(name, 0) for name in VERDICTS},
        "ort_runs_correctly": sum(counts.get(name, 0) for name in ("ok", "wrong", "equivalence-failure",
                                                                     "refused", "crash")),
        "unchanged": sum(1 for v in verdicts if v.extra.get("equivalence") == "unchanged"),
        "stamped": sum(1 for v in verdicts if v.extra.get("stamped")),
        "leaked": [v.name for v in verdicts if v.leaked],
        "refusal_groups": [{"reason": examples[key], "count": len(names), "models": names}
                           for key, names in sorted(groups.items(), key=lambda kv: -len(kv[1]))],
        "verdicts": [v.as_dict() for v in verdicts],
        "environment": {"python": platform.python_version(), "onnx": onnx.__version__,
                        "onnxruntime": onnxruntime.__version__, "machine": platform.machine()},
    }


def markdown(result: dict) -> str:
    c = result["counts"]
    lines = [f"# onnx backend node tests through cnnc, {result['date']}", "",
             (f"`{result['command']}`: {result['models']} node-test models (onnx {result['environment']['onnx']}, "
             f"onnxruntime {result['environment']['onnxruntime']}), {result['seconds']:.0f} s."), "",
             (f"onnxruntime runs {result['ort_runs_correctly']} of them correctly ({result['stamped']} once stamped "
             f"down to the IR version it loads, as cnnc does; it fails {c['ort-fails']}, gets {c['ort-wrong']} wrong, "
             f"and {c['non-tensor']} have non-tensor inputs or outputs). Of those, through `cnnc.compile` "
             "(default passes):"),
             "", "| verdict | models |", "|---|---:|"]
    for name in ("ok", "refused", "wrong", "equivalence-failure", "crash"):
        lines.append(f"| {name} | {c[name]} |")
    lines += ["", (f"{result['unchanged']} of the ok models are unchanged by cnnc (proof: nothing changed); "
              f"compiles that wrote to stdout/stderr: {len(result['leaked'])}."), "", "## Refusals by reason", ""]
    for group in result["refusal_groups"]:
        lines.append(f"- {group['count']}× {group['reason']} ({', '.join(group['models'][:6])}"
                     f"{', …' if group['count'] > 6 else ''})")
    bad = [v for v in result["verdicts"] if v["verdict"] in BAD]
    if bad:
        lines += ["", "## Wrong, equivalence failures, crashes", ""]
        lines += [f"- `{v['name']}`: {v['verdict']}: {v.get('reason', '')[:300]}" for v in bad]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder for the generated tests (default: a temp)")
    parser.add_argument("--only", default=None, help="a regular expression on the test names")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnnc-node-tests-") as scratch:
        result = run(args.data or Path(scratch), args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"onnx-node-tests-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 1 if any(result["counts"][name] for name in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
