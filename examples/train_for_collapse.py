"""Train for collapse (issue 14): anneal skips and activations away where it pays, then compile exactly.

    python examples/train_for_collapse.py            # 3 seeds; writes examples/results/train_for_collapse.*
    python examples/train_for_collapse.py --quick    # 1 seed, 2 epochs, short timing: <= 3 min

scikit-learn's digits upsampled to 28x28 (no data set can be downloaded here; `homotopy_digits.load_digits_28`).
Two networks: the small ResNet of `homotopy_digits.py` and a MobileNetV2-style inverted-residual net. Each is trained

1. as it is (original);
2. with the skip homotopy only (t: 0.5 -> 0, seed 000 §4);
3. with skip and activation homotopy (activations t: 1 -> 0) on the sites of `cnnc.homotopy.plan` (cost model,
   DP, at most 2, 4 and 6 sites; a budget whose plan repeats a smaller one's sites is not trained again) and on all
   sites, where the network becomes linear and collapses to one Gemm (Theorem 3.1). The plan counts the stem's
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


def build(net: str, variant: str, seed: int):
    """The model to train, the homotopies driving it (with one schedule each) and the plan used, if any."""
    torch.manual_seed(seed)
    model = NETS[net]()
    if variant == "original":
        return model, [], None
    skips = SkipHomotopy.wrap(model, t=0.5, example_input=EXAMPLE)
    if variant == "skip":
        return skips.model, [skips], None
    budget = {"skip+act plan<=2": 2, "skip+act plan<=4": 4, "skip+act plan<=6": 6}.get(variant)
    chosen = plan(skips.model, EXAMPLE, max_sites=budget) if budget is not None else None
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
    return {f"batch {c['batch']}": {m["label"]: (m["ratio_to_first"] or {}).get("speedup") for m in c["models"]}
            for c in report["comparisons"]}


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
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 2
    torch.set_num_threads(1)
    started = time.perf_counter()
    train_data, val_data = load_digits_28()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "train_for_collapse_quick" if args.quick else "train_for_collapse"
    rows, plans = [], {}
    for net in NETS:
        compiled_seed0, planned = {}, {}
        for variant in VARIANTS:
            accuracies, row = [], {"net": net, "variant": variant}
            for seed in range(args.seeds):
                model, homotopies, chosen = build(net, variant, seed)
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
        speedups = latency(compiled_seed0.pop("original"), compiled_seed0, 0.3 if args.quick else 2.0)
        for row in rows:
            if row["net"] == net and "accuracy_mean" in row:
                row["speedup"] = {batch: (values.get(row["variant"]) if row["variant"] != "original" else 1.0)
                                  for batch, values in speedups.items()}
    report = {"command": "python examples/train_for_collapse.py " + " ".join(argv or sys.argv[1:]),
              "seeds": args.seeds, "epochs": args.epochs, "rows": rows, "plans": plans,
              "environment": {"onnxruntime": ort.__version__, "torch": torch.__version__,
                              "python": platform.python_version(), "cpu_count": os.cpu_count(),
                              "load_average_at_end": os.getloadavg()},
              "wall_seconds": round(time.perf_counter() - started, 1)}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| net | variant | accuracy % (mean ± spread/2) | depth | MACs | nodes | speed-up b1 | speed-up b64 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "accuracy_mean" not in r:
            lines.append(f"| {r['net']} | {r['variant']} | {r.get('note', '')} | | | | | |")
            continue
        s = r.get("speedup", {})
        lines.append(f"| {r['net']} | {r['variant']} | {100 * r['accuracy_mean']:.1f} ± "
                     f"{50 * r['accuracy_spread']:.1f} | {r['depth_after']} | {r['macs_after']} | {r['nodes_after']} "
                     f"| {s.get('batch 1') or 0:.2f} | {s.get('batch 64') or 0:.2f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / f"{stem}.png")
    print("\n".join(lines))
    print(f"wrote {args.out / stem}.json/.md/.png in {report['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
