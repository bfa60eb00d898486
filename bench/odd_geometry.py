"""Is the compiled ResNet-18 (3×224×224) slower than the original at ORT_ENABLE_ALL? Timed interleaved.

    nice -n 10 python bench/odd_geometry.py                    # batch 1 and 8, CPU or CUDA (auto)
    python bench/odd_geometry.py --batches 1 --duration 5 --out /tmp/odd

ResNet-18 from bench/paper_models.py (seeded weights, BN statistics calibrated on random data), exported by cnnc's
torch frontend, compiled with the default passes (which cnnc.compile proves equivalent on seeded inputs), then the
original and the compiled model are timed A B A B with cnnc.runtime.bench.bench_models, both at ORT_ENABLE_ALL
(which already folds Conv+BN, so the baseline is not a straw man). Verdict per batch: "slower" only when the whole
95 % bootstrap interval of p50(compiled)/p50(original) lies above 1, "faster" when it lies below 1, else "not
slower (no difference resolved)". Writes bench/results/odd-geometry-<date>-<device>.{md,json}. The equivalence of
ResNet-18 and of the odd-geometry network is tested in tests/test_odd_geometry.py.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # paper_models.py sits beside this script

import paper_models

import cnnc
from cnnc.runtime import bench, bench_report
from cnnc.runtime.environment import device_slug


def verdict(ratio: dict) -> str:
    low, high = ratio["ci95"]
    if low > 1.0:
        return "slower"
    if high < 1.0:
        return "faster"
    return "not slower (no difference resolved)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of interleaved timing per batch")
    parser.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    module, example, exporter = paper_models.build(paper_models.MODELS["resnet18"], seed=0)
    original = exporter(module, example)
    result = cnnc.compile(original, strict=True)
    equivalence = result.report["equivalence"]["summary"]
    print(f"compiled: {equivalence}", file=sys.stderr)
    batches = [int(b) for b in args.batches.split(",")]
    report = bench.bench_models([original, result.model], ["original", "compiled"], batch=batches,
                                provider=args.provider, duration=args.duration, warmup=3,
                                log=lambda line: print(line, file=sys.stderr))
    passes = [r["pass"] for r in result.report["passes"]]
    before, after = result.report["before"], result.report["after"]
    lines = []
    for comparison in report["comparisons"]:
        compiled = comparison["models"][1]
        ratio = compiled["ratio_to_first"]
        comparison["verdict"] = verdict(ratio)
        lines.append(f"| {comparison['batch']} | {comparison['rounds']} | "
                     f"{bench_report.format_ms(comparison['models'][0]['stats']['p50_ms'])} | "
                     f"{bench_report.format_ms(compiled['stats']['p50_ms'])} | {ratio['ratio']:.3f} "
                     f"[{ratio['ci95'][0]:.3f}-{ratio['ci95'][1]:.3f}] | {comparison['verdict']} |")
    report["compile"] = {"passes": passes, "equivalence": equivalence, "nodes": [before["nodes"], after["nodes"]],
                         "ops_before": before["ops"], "ops_after": after["ops"]}
    stem = f"odd-geometry-{datetime.date.today().isoformat()}-{device_slug(report)}"
    args.out.mkdir(parents=True, exist_ok=True)
    bench_report.write_json(report, args.out / f"{stem}.json")
    text = ["# Compiled ResNet-18 against the original at ORT_ENABLE_ALL", "",
            f"Command: `{' '.join(['python bench/odd_geometry.py', *sys.argv[1:]])}`", "",
            *[f"- {line}" for line in bench_report.environment_lines(report)], "",
            (f"ResNet-18, 3×224×224, passes {','.join(passes)}: {before['nodes']} -> {after['nodes']} nodes; "
            f"{equivalence}."), "",
            "| batch | rounds | original p50 | compiled p50 | ratio p50 [95% CI] | verdict |",
            "|---:|---:|---:|---:|---|---|", *lines, "",
            ("ratio = p50(compiled) / p50(original), timed interleaved (A B A B) in one process; the interval is a "
            "bootstrap over rounds. Absolute times on a shared machine are noise; the ratio is the result."), "",
            "## All statistics", "", bench_report.markdown_table(bench_report.table_rows(report)), ""]
    (args.out / f"{stem}.md").write_text("\n".join(text))
    print("\n".join(lines))
    print(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
