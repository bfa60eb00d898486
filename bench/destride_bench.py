"""Destride benchmarks (issue 5): per-conv and whole-network latency against the original, and the MAC change.

    python bench/destride_bench.py                 # CPU, ~3 min; on a GPU machine add --provider cuda

Cases: single strided convs (a 3-channel stem at 224×224, 7×7 and 3×3; 3×3, 1×1 and 2×2 stride-2 convs inside a
ResNet-like net; a depthwise 3×3 stride-2 conv), compiled with `--passes destride`, and seed 004's all-conv LeNet
(cnnc.zoo.paper) with `destride` (per conv) and `destride{mode=network}` (Theorem 2). Each is timed against
its original interleaved at ORT_ENABLE_ALL with cnnc.runtime.bench; the MAC change is the pass's own count.
Results: bench/results/destride-<date>-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch import nn

import cnnc
from cnnc.io.frontend import from_torch
from cnnc.runtime import bench
from cnnc.runtime.environment import device_slug
from cnnc.zoo.paper import LeNetAllConv

HERE = Path(__file__).resolve().parent

SINGLE_CONVS = [  # (label, in channels, out channels, kernel, stride, groups, input size)
    ("stem 3→32 3×3/2", 3, 32, 3, 2, 1, 224),
    ("stem 3→64 7×7/2", 3, 64, 7, 2, 1, 224),
    ("64→128 3×3/2", 64, 128, 3, 2, 1, 56),
    ("64→128 1×1/2", 64, 128, 1, 2, 1, 56),
    ("64→64 2×2/2", 64, 64, 2, 2, 1, 56),
    ("depthwise 32 3×3/2", 32, 32, 3, 2, 32, 112),
]


def _case(label, module, shape, passes, provider, batches, duration, log) -> dict:
    torch.manual_seed(0)
    original = from_torch(module.eval(), torch.randn(*shape))
    result = cnnc.compile(original, passes=passes)
    record = result.report["passes"][-1]
    stats = record["stats"]
    entry = {"case": label, "passes": passes, "input": list(shape[1:]),
             "macs_before": result.report["before"]["macs"], "macs_after": result.report["after"]["macs"],
             "ops_after": result.report["after"]["ops"], "applied": record["applied"],
             "skipped": record["skipped"], "mac_ratio": stats.get("mac_ratio"),
             "check": result.report["equivalence"]["summary"]}
    report = bench.bench_models([original, result.model], ["original", "destrided"], batch=batches,
                                provider=provider, duration=duration, log=log)
    entry["timing"] = [{"batch": c["batch"], "original_p50_ms": c["models"][0]["stats"]["p50_ms"],
                        "destrided_p50_ms": c["models"][1]["stats"]["p50_ms"],
                        "ratio": c["models"][1]["ratio_to_first"]} for c in report["comparisons"]]
    entry["environment"], entry["settings"] = report["environment"], report["settings"]
    log(f"{label} [{passes}]: MACs {entry['macs_before']} -> {entry['macs_after']}, "
        + ", ".join(f"batch {t['batch']}: {t['destrided_p50_ms'] / t['original_p50_ms']:.2f}× the time"
                    for t in entry["timing"]))
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    entries = []
    for label, cin, cout, kernel, stride, groups, size in SINGLE_CONVS:
        conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)
        entries.append(_case(label, nn.Sequential(conv, nn.ReLU()), (1, cin, size, size), "destride", args.provider,
                             [1], args.duration, log))
    lenet = LeNetAllConv()
    for passes in ("destride", "destride{mode=network}"):
        entries.append(_case("seed 004 all-conv LeNet", lenet, (1, 1, 28, 28), passes, args.provider, [1, 64],
                             args.duration, log))
    env = entries[0]["environment"]
    slug = device_slug({"environment": env, "settings": entries[0]["settings"]})
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"destride-{date}-{slug}"
    command = "python bench/destride_bench.py" + (f" --provider {args.provider}" if args.provider != "cpu" else "")
    Path(f"{stem}.json").write_text(json.dumps({"command": command, "entries": entries}, indent=2, default=str))
    lines = [f"# destride benchmarks, {date}, {slug}", "", f"Command: `{command}`", "",
             (f"Environment: {env['device']}, onnxruntime {env['onnxruntime']}, ORT_ENABLE_ALL, both models "
             f"interleaved; load average at start {env['loadavg_1_5_15']}."), "",
             "| case | passes | MACs before → after | batch | original p50 | destrided p50 | time ratio |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        for t in e["timing"]:
            lines.append(f"| {e['case']} | `{e['passes']}` | {e['macs_before'] / 1e6:.2f}M → "
                         f"{e['macs_after'] / 1e6:.2f}M ({e['macs_after'] / e['macs_before']:.2f}×) | {t['batch']} | "
                         f"{t['original_p50_ms']:.3f} ms | {t['destrided_p50_ms']:.3f} ms | "
                         f"{t['destrided_p50_ms'] / t['original_p50_ms']:.2f}× |")
    lines += ["", ("A time ratio above 1 means the destrided model is slower. Every compiled model passed cnnc's "
              "equivalence check (see the JSON).")]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
