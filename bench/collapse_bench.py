"""Collapse benchmarks (issue 3): what one Gemm / one Conv buys, and what computing them costs.

    python bench/collapse_bench.py                  # everything below (~10 min on a 2-core CPU, more with --big)
    python bench/collapse_bench.py --big            # also linear ResNet-34 at 3×224×224 with 1000 classes

1. Linear ResNet-34 at 1×28×28, 10 classes (seed 000 §5.2): compile time, error against a float64 evaluation of
   the original for the original float32 model and for the collapsed one, latency ratio at batch 1 and 64.
2. Collapse time against depth: linear ResNet-18/34/50/101 at 1×28×28 (cost should follow min(inputs, outputs)).
3. RepVGG-style ReLU network (3×3+BN, 1×1+BN, identity-BN branches summed before a ReLU) through fold-bn,collapse:
   one Conv per block, latency ratio.
4. (--big) linear ResNet-34 at 3×224×224, 1000 classes: compile time, peak memory, ratio.
Both models run at ORT_ENABLE_ALL, interleaved A B A B (cnnc.runtime.bench), so the ratios are side by side in one
run; absolute times are recorded with their environment. Results: bench/results/collapse-<date>-<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import cnnc
from cnnc.io.frontend import from_torch
from cnnc.runtime import bench
from cnnc.runtime.environment import device_slug
from cnnc.runtime.session import make_session
from cnnc.zoo import calibrate_batchnorm
from cnnc.zoo.blocks import RepVGGBlock
from cnnc.zoo.resnets import BasicBlock, Bottleneck, ResNet

HERE = Path(__file__).resolve().parent

DEPTHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
          "resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet101": (Bottleneck, (3, 4, 23, 3))}


def _identity(x):
    return x


def linear_resnet(depth: str, in_channels: int, classes: int, seed: int = 0) -> nn.Module:
    """A ResNet with every nonlinearity removed and the stem max-pool replaced by an average pool (seed 000 §5.2)."""
    torch.manual_seed(seed)
    block, layers = DEPTHS[depth]
    module = ResNet(block, layers, (64, 128, 256, 512), in_channels, classes, activation=_identity)
    module.pool = nn.AvgPool2d(3, 2, 1)
    calibrate_batchnorm(module.eval(), (8, in_channels, 28, 28), seed)
    return module.eval()


def repvgg_a0(classes: int = 1000) -> nn.Module:
    """RepVGG-A0's layout (1, 2, 4, 14, 1 blocks; widths 48, 48, 96, 192, 1280), training-time branches."""
    blocks, cin = [], 3
    for width, count in ((48, 1), (48, 2), (96, 4), (192, 14), (1280, 1)):
        for index in range(count):
            blocks.append(RepVGGBlock(cin, width, 2 if index == 0 else 1))
            cin = width
    module = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)).eval()
    calibrate_batchnorm(module, (4, 3, 112, 112), 0)
    return module


def float64_error(module: nn.Module, model, batch: int, shape) -> float:
    x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        exact = module.double()(x.double()).numpy()
    module.float()
    got = make_session(model, "cpu", "disabled").run(None, {model.graph.input[0].name: x.numpy()})[0]
    return float(np.abs(got - exact).max() / np.abs(exact).max())


def compile_and_time(name, module, shape, passes, batches, duration, log) -> dict:
    original = from_torch(module, torch.randn(*shape))
    start = time.perf_counter()
    result = cnnc.compile(original, passes=passes)
    seconds = time.perf_counter() - start
    entry = {"model": name, "input": list(shape[1:]), "passes": passes, "compile_s": round(seconds, 2),
             "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
             "ops_before": result.report["before"]["ops"], "ops_after": result.report["after"]["ops"],
             "macs_before": result.report["before"]["macs"], "macs_after": result.report["after"]["macs"],
             "check": result.report["equivalence"]["summary"], "applied": result.report["passes"][-1]["applied"]}
    if "Gemm" in entry["ops_after"] and shape[1] == 1:
        entry["rel_error_vs_float64"] = {"original": float64_error(module, original, 64, shape),
                                         "collapsed": float64_error(module, result.model, 64, shape)}
    if batches:
        report = bench.bench_models([original, result.model], ["original", "compiled"], batch=batches,
                                    provider="cpu", duration=duration, log=log)
        entry["timing"] = [{"batch": c["batch"], **{m["label"]: {"p50_ms": m["stats"]["p50_ms"],
                                                                  "paired": m["ratio_to_first"]}
                                                     for m in c["models"]}} for c in report["comparisons"]]
        entry["environment"], entry["settings"] = report["environment"], report["settings"]
    log(json.dumps({k: v for k, v in entry.items() if k not in ("environment", "settings", "applied")}, default=str))
    return entry


def write_markdown(results: dict, path: Path) -> None:
    lines = [f"# collapse benchmarks, {results['date']}", "", f"Command: `{results['command']}`", "",
             f"Environment: {results['environment_line']}", "",
             "| model | input | passes | compile s | ops after | batch | original p50 | compiled p50 | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in results["entries"]:
        ops = ", ".join(f"{v}×{k}" for k, v in sorted(entry["ops_after"].items()))
        for timing in entry.get("timing", [{}]):
            original, compiled = timing.get("original", {}), timing.get("compiled", {})
            speedup = f"{original['p50_ms'] / compiled['p50_ms']:.1f}×" if compiled.get("p50_ms") else "-"
            lines.append(f"| {entry['model']} | {'×'.join(map(str, entry['input']))} | {entry['passes']} | "
                         f"{entry['compile_s']} | {ops} | {timing.get('batch', '-')} | "
                         f"{original.get('p50_ms', 0):.3f} ms | {compiled.get('p50_ms', 0):.4f} ms | "
                         f"{speedup} |")
    errors = [e for e in results["entries"] if "rel_error_vs_float64" in e]
    if errors:
        lines += ["", "Error against a float64 evaluation of the original (max |y − y64| / max |y64|, batch 64):", ""]
        lines += [f"- {e['model']}: original float32 {e['rel_error_vs_float64']['original']:.2e}, collapsed "
                  f"{e['rel_error_vs_float64']['collapsed']:.2e}" for e in errors]
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = [e for e in results["entries"] if e["model"].startswith("linear-resnet") and e["input"] == [1, 28, 28]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([e["model"].removeprefix("linear-") for e in depth], [e["compile_s"] for e in depth])
    ax.set_ylabel("collapse compile time (s)")
    ax.set_title("collapse to one Gemm, 1×28×28 -> 10 classes (10 VJPs each)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="also the 3×224×224 linear ResNet-34 (minutes)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of interleaved timing per batch")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    entries = [compile_and_time("linear-resnet34", linear_resnet("resnet34", 1, 10), (1, 1, 28, 28), "collapse",
                                [1, 64], args.duration, log)]
    for depth in ("resnet18", "resnet50", "resnet101"):
        entries.append(compile_and_time(f"linear-{depth}", linear_resnet(depth, 1, 10), (1, 1, 28, 28), "collapse",
                                        [64], args.duration, log))
    entries.append(compile_and_time("repvgg-a0", repvgg_a0(), (1, 3, 112, 112), "fold-bn,collapse", [1, 8],
                                    args.duration, log))
    if args.big:
        entries.append(compile_and_time("linear-resnet34", linear_resnet("resnet34", 3, 1000), (1, 3, 224, 224),
                                        "collapse", [1, 16], args.duration, log))
    env = entries[0]["environment"]
    date = datetime.date.today().isoformat()
    results = {"date": date, "command": "python bench/collapse_bench.py" + (" --big" if args.big else ""),
               "environment_line": f"{env['cpu']} ({env['cpus_usable']} usable cores), onnxruntime "
                                   f"{env['onnxruntime']}, CPU provider, ORT_ENABLE_ALL, load average at start "
                                   f"{env['loadavg_1_5_15']}",
               "entries": entries}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"collapse-{date}-{device_slug({'environment': env, 'settings': entries[0]['settings']})}"
    Path(f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results, Path(f"{stem}.md"))
    write_plot(results, Path(f"{stem}.png"))
    log(f"wrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
