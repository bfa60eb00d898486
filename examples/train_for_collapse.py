"""Train for collapse (issue 14): anneal skips and activations away where it pays, then compile exactly.

    python examples/train_for_collapse.py            # 3 seeds; writes examples/results/train_for_collapse.*
    python examples/train_for_collapse.py --quick    # 1 seed, 2 epochs, short timing: <= 3 min
    python examples/train_for_collapse.py --nets resnet   # rerun one net; the other's committed rows are kept

scikit-learn's digits upsampled to 28x28 (no data set can be downloaded here; `homotopy_digits.load_digits_28`).
Two networks: the small ResNet of `homotopy_digits.py` and a MobileNetV2-style inverted-residual net. Each is trained

1. as it is (original);
2. with the skip homotopy only (t: 0.5 -> 0, seed 000 §4);
3. with skip and activation homotopy (activations t: 1 -> 0) on the sites of `cnnc.homotopy.plan` (cost model,
   DP, at most 2, 4 and 6 sites; a budget whose plan repeats a smaller one's sites is not trained again) and on all
   sites. The plan is made once per net and budget, for batch 1 and 64, with `measure`: onnxruntime (this script's
   `OrtMeasure`, ORT_ENABLE_ALL, CPU, one thread) times the merges the cost model cannot settle (close, or losing
   on MACs by <= 2x while removing kernels), and a timed merge is kept only when faster at both batch sizes; where the network becomes linear and collapses to one Gemm (Theorem 3.1). The plan counts the stem's
   activation although an identity skip reads it (the skip homotopy removes that read at t = 0), and `collapse`
   merges each planned segment even when the linear chain runs on past it (MobileNetV2's linear bottleneck).

Every homotopy model is exported at t = 0 and compiled with the default passes (proven equivalent to its export);
the original is compiled too. Reported per variant: validation accuracy of the compiled ONNX model (mean and spread
over seeds), depth (longest conv path), MACs, nodes, and the latency ratio against the compiled original with
`cnnc.runtime.bench` (ORT_ENABLE_ALL, CPU, batch 1 and 64, interleaved; seed 0's models).
Needs scikit-learn, and matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from homotopy_digits import SmallResNet, load_digits_28, onnx_accuracy
from torch import nn

import cnnc
from cnnc.homotopy import ActivationHomotopy, HomotopyCallback, LinearSchedule, SkipHomotopy, plan
from cnnc.runtime.bench import bench_models

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE = torch.zeros(1, 1, 28, 28)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN (+ x)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 6):  # MobileNetV2's expansion t = 6
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class SmallMobileNetV2(nn.Module):
    """1x28x28 -> stem 16@14 -> IR 16@14, 24@7, 24@7, 32@4 -> 10 classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                    InvertedResidual(24, 24, 1), InvertedResidual(24, 32, 2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


NETS = {"resnet": SmallResNet, "mobilenetv2": SmallMobileNetV2}
VARIANTS = ("original", "skip", "skip+act plan<=2", "skip+act plan<=4", "skip+act plan<=6", "skip+act all")


BUDGETS = {"skip+act plan<=2": 2, "skip+act plan<=4": 4, "skip+act plan<=6": 6}
PLAN_BATCHES = (1, 64)  # the latency table's batch sizes: a timed merge must pay at both


class OrtMeasure:
    """plan's `measure`: median onnxruntime time of the unmerged and the merged segment, interleaved (CPU, one
    thread, ORT_ENABLE_ALL); cached by structure (the random timing weights differ between calls)."""

    def __init__(self, duration: float):
        self.duration, self.cache, self.timed = duration, {}, 0

    @staticmethod
    def _structure(model: onnx.ModelProto) -> tuple:
        graph = model.graph
        return (tuple((n.op_type, str(sorted((a.name, str(a)) for a in n.attribute))) for n in graph.node),
                tuple(tuple(i.dims) for i in graph.initializer), str(graph.input[0].type))

    def __call__(self, apart: onnx.ModelProto, merged: onnx.ModelProto) -> tuple[float, float]:
        key = (self._structure(apart), self._structure(merged))
        if key not in self.cache:
            report = bench_models([apart, merged], ["apart", "merged"], provider="cpu", duration=self.duration,
                                  threads=1)
            self.cache[key] = tuple(m["stats"]["p50_ms"] / 1e3 for m in report["comparisons"][0]["models"])
            self.timed += 1
        return self.cache[key]


def make_plans(net: str, measure) -> dict:
    """variant -> the plan at its budget (made once per net: it depends on the architecture, not the weights)."""
    torch.manual_seed(0)
    skips = SkipHomotopy.wrap(NETS[net](), t=0.5, example_input=EXAMPLE)
    return {variant: plan(skips.model, EXAMPLE, max_sites=budget, measure=measure, batch=PLAN_BATCHES)
            for variant, budget in BUDGETS.items()}


def build(net: str, variant: str, seed: int, plans: dict):
    """The model to train, the homotopies driving it (with one schedule each) and the plan used, if any."""
    torch.manual_seed(seed)
    model = NETS[net]()
    if variant == "original":
        return model, [], None
    skips = SkipHomotopy.wrap(model, t=0.5, example_input=EXAMPLE)
    if variant == "skip":
        return skips.model, [skips], None
    chosen = plans.get(variant)
    sites = chosen.sites if chosen is not None else None  # None: all sites
    if sites == []:
        return None, [], chosen  # the plan found no merge that pays: same as skip-only
    activations = ActivationHomotopy.wrap(skips.model, sites=sites, t=1.0)
    return activations.model, [skips, activations], chosen


def train(model: nn.Module, homotopies: list, data, epochs: int, seed: int, batch: int = 32, lr: float = 3e-3):
    schedules = [LinearSchedule(0.5, epochs), LinearSchedule(1.0, epochs)][:len(homotopies)]
    callback = HomotopyCallback(homotopies, schedules) if homotopies else None
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    generator = torch.Generator().manual_seed(seed)
    images, labels = data
    for epoch in range(epochs):
        if callback is not None:
            callback.on_epoch_start(epoch)
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            index = order[start:start + batch]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimiser.step()
        lr_schedule.step()
    return model.eval()


def export(model: nn.Module, homotopies: list):
    for homotopy in homotopies:
        homotopy.set_t(0.0)
    return cnnc.io.frontend.from_torch(model, EXAMPLE)


def latency(original, compiled: dict, duration: float) -> dict:
    labels = ["original"] + list(compiled)
    report = bench_models([original] + list(compiled.values()), labels, batch=[1, 64], provider="cpu",
                          duration=duration, threads=1)
    speedups = {f"batch {c['batch']}": {m["label"]: (m["ratio_to_first"] or {}).get("speedup") for m in c["models"]}
                for c in report["comparisons"]}
    # speed-up interval = the inverted 95 % interval of the time ratio (interleaved rounds, bootstrap)
    intervals = {f"batch {c['batch']}": {m["label"]: [1 / m["ratio_to_first"]["ci95"][1],
                                                      1 / m["ratio_to_first"]["ci95"][0]]
                                         for m in c["models"] if m["ratio_to_first"]}
                 for c in report["comparisons"]}
    load = {f"batch {c['batch']}": c.get("loadavg_1_5_15_after") for c in report["comparisons"]}
    return speedups, intervals, load


def _speedup(row: dict, batch: str) -> str:
    value = row.get("speedup", {}).get(batch) or 0
    interval = row.get("speedup_ci95", {}).get(batch)
    return f"{value:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib  # optional: the plot extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: the plot extra
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, batch in zip(axes, ("batch 1", "batch 64")):
        for net in NETS:
            points = [r for r in rows if r["net"] == net and r.get("speedup", {}).get(batch)]
            axis.errorbar([r["speedup"][batch] for r in points], [100 * r["accuracy_mean"] for r in points],
                          yerr=[100 * r["accuracy_spread"] / 2 for r in points], marker="o", linestyle="", label=net)
            for r in points:
                axis.annotate(r["variant"], (r["speedup"][batch], 100 * r["accuracy_mean"]), fontsize=7)
        axis.set_xscale("log")  # the all-linear end point is 2-3 decades beyond the planned budgets
        axis.set_xlabel(f"speed-up vs original ({batch}, onnxruntime CPU, log scale)")
        axis.set_ylabel("validation accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 0.3 s timing per batch size")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS),
                        help="nets to run; the rows and plans of the others are kept from the existing results")
    parser.add_argument("--no-measure", action="store_true", help="plan by the cost model alone (no timing)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 2
    torch.set_num_threads(1)
    started = time.perf_counter()
    train_data, val_data = load_digits_28()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "train_for_collapse_quick" if args.quick else "train_for_collapse"
    rows, plans, kept = [], {}, {}
    previous = args.out / f"{stem}.json"
    if set(args.nets) != set(NETS) and previous.exists():
        kept = json.loads(previous.read_text())
    measure = None if args.no_measure else OrtMeasure(0.1 if args.quick else 0.3)
    for net in NETS:
        if net not in args.nets:
            rows += [r for r in kept.get("rows", []) if r["net"] == net]
            plans.update({k: v for k, v in kept.get("plans", {}).items() if k.startswith(f"{net}, ")})
            continue
        compiled_seed0, planned = {}, {}
        net_plans = make_plans(net, measure)
        for variant in VARIANTS:
            accuracies, row = [], {"net": net, "variant": variant}
            for seed in range(args.seeds):
                model, homotopies, chosen = build(net, variant, seed, net_plans)
                if chosen is not None:
                    plans[f"{net}, {variant}"] = chosen.as_dict()
                    if seed == 0:
                        print(chosen.table())
                if model is None:
                    row["note"] = "the plan chose no site: identical to skip-only"
                    break
                if chosen is not None and tuple(chosen.sites) in planned:
                    row["note"] = f"the plan chose the same sites as {planned[tuple(chosen.sites)]}"
                    break
                if chosen is not None and seed == args.seeds - 1:
                    planned[tuple(chosen.sites)] = variant
                train(model, homotopies, train_data, args.epochs, seed)
                result = cnnc.compile(export(model, homotopies))
                accuracies.append(onnx_accuracy(result.model, val_data))
                if seed == 0:
                    compiled_seed0[variant] = result.model
                    row.update(equivalence=result.report["equivalence"]["summary"],
                               **{f"{k}_{when}": result.report[when][k] for k in ("depth", "macs", "nodes")
                                  for when in ("before", "after")},
                               sites=len(homotopies[-1].sites) if len(homotopies) == 2 else 0)
            if accuracies:
                row.update(accuracy_mean=float(np.mean(accuracies)), accuracy_spread=float(np.ptp(accuracies)),
                           accuracy_per_seed=accuracies)
                print(f"{net:12s} {variant:14s} accuracy {100 * row['accuracy_mean']:.1f} % "
                      f"(spread {100 * row['accuracy_spread']:.1f}), depth {row['depth_after']}, "
                      f"MACs {row['macs_after']}", flush=True)
            rows.append(row)
        speedups, intervals, load = latency(compiled_seed0.pop("original"), compiled_seed0,
                                            0.3 if args.quick else 2.0)
        print(f"{net}: load average (1, 5, 15 min) after timing: {load}", flush=True)
        for row in rows:
            if row["net"] == net and "accuracy_mean" in row:
                row["speedup"] = {batch: (values.get(row["variant"]) if row["variant"] != "original" else 1.0)
                                  for batch, values in speedups.items()}
                row["speedup_ci95"] = {batch: values.get(row["variant"], [1.0, 1.0])
                                       for batch, values in intervals.items()}
                row["load_average_after_timing"] = load  # 1, 5, 15 min, per batch size: the CPUs are shared
    environment = {"onnxruntime": ort.__version__, "torch": torch.__version__, "python": platform.python_version(),
                   "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()}
    command = "python examples/train_for_collapse.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "seeds": args.seeds, "epochs": args.epochs, "rows": rows, "plans": plans,
              "environment": environment, "wall_seconds": round(time.perf_counter() - started, 1),
              "segments_timed": measure.timed if measure is not None else 0}
    if kept:  # rows of nets not rerun: say which run they come from (the earliest, when kept twice)
        origin = kept.get("kept_from_previous_run") or kept
        if set(origin.get("nets", [])) != {n for n in NETS if n not in args.nets}:
            origin = kept
        report["kept_from_previous_run"] = {"nets": [n for n in NETS if n not in args.nets],
                                            "command": origin.get("command"), "environment": origin.get("environment"),
                                            "wall_seconds": origin.get("wall_seconds")}
        kept = report["kept_from_previous_run"]
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [("| net | variant | accuracy % (mean ± spread/2) | depth | MACs | nodes | speed-up b1 [95 % interval] "
             "| speed-up b64 [95 % interval] |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "accuracy_mean" not in r:
            lines.append(f"| {r['net']} | {r['variant']} | {r.get('note', '')} | | | | | |")
            continue
        lines.append(f"| {r['net']} | {r['variant']} | {100 * r['accuracy_mean']:.1f} ± "
                     f"{50 * r['accuracy_spread']:.1f} | {r['depth_after']} | {r['macs_after']} | {r['nodes_after']} "
                     f"| {_speedup(r, 'batch 1')} | {_speedup(r, 'batch 64')} |")
    for net in NETS:
        timed = next((r for r in rows if r["net"] == net and r.get("load_average_after_timing")), None)
        if timed is not None:
            lines.append(f"\n{net}: load average (1, 5, 15 min) after the interleaved timing on {os.cpu_count()} "
                         f"CPUs: {timed['load_average_after_timing']}")
        elif net not in args.nets and kept:
            lines.append(f"\n{net}: kept from `{kept.get('command')}`; load average (1, 5, 15 min) at its end: "
                         f"{[round(v, 2) for v in kept.get('environment', {}).get('load_average_at_end', [])]}")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / f"{stem}.png")
    print("\n".join(lines))
    print(f"wrote {args.out / stem}.json/.md/.png in {report['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
