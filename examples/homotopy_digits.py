"""Train skip connections away (seed 000 §4-5) on scikit-learn's digits, then compile them out with cnnc.

    python examples/homotopy_digits.py                 # ~4 min on 2 CPU cores; writes examples/results/
    python examples/homotopy_digits.py --sweep         # also the t0 sweep of the paper's Fig. 2

No data set can be downloaded here, so the MNIST of the paper is replaced by scikit-learn's 8x8 digits (1,797
images, shipped with scikit-learn), upsampled to 28x28 like MNIST. Two networks, as in the paper:

- a small ResNet written like torchvision's (BasicBlocks, `out += identity`, 1x1 projection shortcuts with stride 2),
  whose joins `cnnc.homotopy` finds by itself with torch.fx;
- the paper's 6-layer CNN with skips between all non-consecutive layers: layer i reads
  (1 - t)·x(i-1) + t·mean(x(1), ..., x(i-2)), built from explicit `HomotopyJoin`s.

Each is trained with t fixed at 0.5 (the usual residual network), with the paper's schedule from 0.9 and (ResNet)
the schedule from 0.5, over several seeds. The scheduled models end at t = 0, are exported with t baked in, and
`cnnc.compile(..., passes="fold-bn,remove-skip")` deletes every join and projection; the fixed-t model is exported at
its own t and keeps its joins (remove-skip is exact and says why). Latency is measured with onnxruntime at
ORT_ENABLE_ALL on the CPU, A and B interleaved, medians compared.

Needs scikit-learn (`pip install scikit-learn`) and matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import cnnc
from cnnc.homotopy import (
    PAPER_SCHEDULE_FROM_0_5,
    PAPER_SCHEDULE_FROM_0_9,
    HomotopyCallback,
    HomotopyJoin,
    ListSchedule,
    SkipHomotopy,
)
from cnnc.zoo.resnets import BasicBlock

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = {
    "fixed t=0.5": (0.5,),
    "schedule from 0.9": PAPER_SCHEDULE_FROM_0_9,
    "schedule from 0.5": PAPER_SCHEDULE_FROM_0_5,
}


# ------------------------------------------------------------------------------------------------------- data


def load_digits_28(seed: int = 0, validation: float = 0.2):
    """scikit-learn's digits, upsampled to 1x28x28, standardised; a fixed stratified train/validation split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("error: this example needs scikit-learn (pip install scikit-learn); it ships the digits data set")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == digit))
        cut = round(len(members) * validation)
        val_idx += members[:cut].tolist()
        train_idx += members[cut:].tolist()
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


# ----------------------------------------------------------------------------------------------------- models


class SmallResNet(nn.Module):
    """1x28x28 -> stem 16@14 -> 2 blocks 16@14 -> 32@7 (projection, stride 2) -> 64@4 (projection) -> 10 classes.

    The stem has stride 2: the digits carry 8x8 pixels of information, and it keeps training within a few minutes.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        # cnnc.zoo's BasicBlock is torchvision's: cnnc.homotopy finds `out += identity` with torch.fx.
        self.layers = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width),
                                    BasicBlock(width, 2 * width, 2, "projection"),
                                    BasicBlock(2 * width, 4 * width, 2, "projection"))
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DenseSkipCNN(nn.Module):
    """Seed 000 §5's 6-layer CNN with skips between all non-consecutive layers (one shared t).

    x(1) = relu(bn(conv1(x))) at stride 4 (7x7); for i = 2..6, x(i) = relu(bn(conv_i(in_i))) with
    in_i = (1 - t)·x(i-1) + t·mean(x(1..i-2)) when i ≥ 3 (in_2 = x(1)); the fully connected head reads in_7, formed
    the same way (Section 2's CNN: convolutions, then one fully connected layer).
    """

    def __init__(self, width: int = 16, layers: int = 6, t: torch.Tensor | None = None):
        super().__init__()
        self.t = t if t is not None else torch.tensor(0.5)
        self.first = nn.Sequential(nn.Conv2d(1, width, 5, 4, 2, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                                 nn.ReLU()) for _ in range(layers - 1))
        # in_i for i = 3..layers+1 (the last one feeds the head): one join each, all sharing t.
        self.joins = nn.ModuleList(HomotopyJoin(self.t) for _ in range(layers - 1))
        self.head = nn.Linear(width * 7 * 7, 10)

    def forward(self, x):
        outputs = [self.first(x)]
        for index, conv in enumerate(self.convs):
            outputs.append(conv(self._input(outputs, index)))
        return self.head(torch.flatten(self._input(outputs, len(self.convs)), 1))

    def _input(self, outputs, index):
        if len(outputs) < 2:
            return outputs[-1]
        earlier = outputs[:-1]
        skip = earlier[0]
        for extra in earlier[1:]:
            skip = skip + extra
        return self.joins[index - 1](outputs[-1], skip * (1.0 / len(earlier)))


def build(kind: str, seed: int, t0: float) -> SkipHomotopy:
    torch.manual_seed(seed)
    if kind == "resnet":
        return SkipHomotopy.wrap(SmallResNet(), t=t0, example_input=torch.zeros(1, 1, 28, 28))
    shared = torch.tensor(float(t0))
    model = DenseSkipCNN(t=shared)
    return SkipHomotopy(model, {f"joins.{i}": join for i, join in enumerate(model.joins)}, shared=True)


# ------------------------------------------------------------------------------------------------- training


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    images, labels = data
    return float((model(images).argmax(1) == labels).float().mean())


def train(kind: str, schedule: tuple, seed: int, train_data, val_data, epochs: int, batch: int = 32,
          lr: float = 2e-3) -> tuple[SkipHomotopy, list[float], list[float]]:
    homotopy = build(kind, seed, schedule[0])
    callback = HomotopyCallback(homotopy, ListSchedule(schedule))
    model = homotopy.model
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    # One learning-rate schedule for every run (cosine over the epochs): the final accuracies then compare trained
    # models rather than the noise of a last epoch at full learning rate.
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    generator = torch.Generator().manual_seed(seed)
    images, labels = train_data
    accuracies, ts = [], []
    for epoch in range(epochs):
        ts.append(callback.on_epoch_start(epoch))
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            index = order[start:start + batch]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimiser.step()
        lr_schedule.step()
        accuracies.append(accuracy(model, val_data))
        callback.on_validation_end(epoch, accuracies[-1])
    model.eval()
    return homotopy, accuracies, ts


# ------------------------------------------------------------------------------------------ compile, measure


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_accuracy(model: onnx.ModelProto, data) -> float:
    images, labels = data
    logits = session(model, 1).run(None, {"input": images.numpy()})[0]
    return float((logits.argmax(1) == labels.numpy()).mean())


def interleaved_latency(a: onnx.ModelProto, b: onnx.ModelProto, batch: int, rounds: int = 61,
                        block_seconds: float = 0.004) -> dict:
    """A and B timed in alternating order, in blocks of equal run count, in one process, on one thread.

    Two clocks: wall time, and the CPU time of the calling thread (with intra_op_num_threads=1 onnxruntime runs the
    model on the caller's thread, so thread CPU time leaves out the time the OS gave to other processes: on a shared
    machine it is the stable one). The speed-up is the median over rounds of the paired ratio B/A (each pair measured
    back to back, so slow drifts cancel); the per-run medians of A and B are reported beside it.
    """
    feeds = {"input": np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)}
    sessions = {"a": session(a, 1), "b": session(b, 1)}
    for s in sessions.values():  # warm-up
        for _ in range(5):
            s.run(None, feeds)
    start = time.perf_counter()
    sessions["a"].run(None, feeds)
    inner = max(1, int(block_seconds / max(time.perf_counter() - start, 1e-6)))
    clocks = {"wall": time.perf_counter, "thread_cpu": time.thread_time}
    times = {clock: {"a": [], "b": []} for clock in clocks}
    for round_index in range(rounds):
        for key in ("a", "b") if round_index % 2 == 0 else ("b", "a"):
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(inner):
                sessions[key].run(None, feeds)
            times["thread_cpu"][key].append((time.thread_time() - cpu) / inner)
            times["wall"][key].append((time.perf_counter() - wall) / inner)
    result = {"batch": batch, "threads": 1, "rounds": rounds, "runs_per_round": inner}
    for clock, measured in times.items():
        ratios = sorted(b_time / a_time for a_time, b_time in zip(measured["a"], measured["b"]) if a_time > 0)
        ratio = statistics.median(ratios)
        result[clock] = {"median_ms_a": 1e3 * statistics.median(measured["a"]),
                         "median_ms_b": 1e3 * statistics.median(measured["b"]),
                         "paired_ratio_b_over_a": ratio,
                         "ratio_quartiles": [ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]],
                         "speedup_percent": 100 * (1 - ratio)}
    return result


def compile_summary(result) -> dict:
    records = {r["pass"]: r for r in result.report["passes"]}
    remove = records.get("remove-skip", {})
    return {"ops_before": result.report["before"]["ops"], "ops_after": dict(Counter(
        n.op_type for n in result.model.graph.node)), "equivalence": result.report["equivalence"]["summary"],
        "remove_skip_applied": remove.get("applied", []), "remove_skip_skipped": remove.get("skipped", []),
        "remove_skip_removed_ops": remove.get("stats", {}).get("removed_ops", {})}


# --------------------------------------------------------------------------------------------------- report


def plot(results: dict, path: Path, sweep: dict | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    kinds = list(results)
    figure, axes = plt.subplots(1, len(kinds) + (1 if sweep else 0), figsize=(5.2 * (len(kinds) + bool(sweep)), 4))
    axes = np.atleast_1d(axes)
    for axis, kind in zip(axes, kinds):
        for label, run in results[kind].items():
            curves = np.array(run["accuracy_per_epoch"]) * 100
            epochs = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            axis.plot(epochs, mean, marker="o", label=f"{label} (final {mean[-1]:.1f} %)")
            axis.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15)
        axis.set_title(f"{kind}: validation accuracy, mean of {curves.shape[0]} seeds (band: min-max)", fontsize=9)
        axis.set_xlabel("epoch")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(max(0, axis.get_ylim()[0]), 100)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    if sweep:
        axis = axes[-1]
        t0s = sorted(float(k) for k in sweep["accuracy_after_2_epochs"])
        values = np.array([sweep["accuracy_after_2_epochs"][f"{t:g}"] for t in t0s]) * 100
        for column in range(values.shape[1]):
            axis.scatter(t0s, values[:, column], color="gray", s=10, alpha=0.5)
        axis.plot(t0s, values.mean(1), marker="o")
        axis.set_title("ResNet: accuracy after 2 epochs at fixed t0 (paper Fig. 2)", fontsize=9)
        axis.set_xlabel("t0")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="the paper's lists have 10 values")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training (1: on a shared 2-core machine more threads ran 4x slower)")
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--no-dense", action="store_true", help="skip the 6-layer dense-skip CNN")
    parser.add_argument("--sweep", action="store_true", help="also the t0 sweep of Fig. 2 (2 epochs per t0)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    train_data, val_data = load_digits_28()
    args.out.mkdir(parents=True, exist_ok=True)
    plans = {"resnet": list(SCHEDULES)}
    if not args.no_dense:
        plans["dense-skip 6-layer CNN"] = ["fixed t=0.5", "schedule from 0.9"]
    results: dict = {}
    trained: dict = {}
    for kind, labels in plans.items():
        results[kind] = {}
        for label in labels:
            run = {"t_per_epoch": None, "accuracy_per_epoch": []}
            for seed in range(args.seeds):
                homotopy, accs, ts = train("resnet" if kind == "resnet" else "dense", SCHEDULES[label], seed,
                                           train_data, val_data, args.epochs, batch=args.batch)
                run["accuracy_per_epoch"].append(accs)
                run["t_per_epoch"] = ts
                trained[(kind, label, seed)] = homotopy
                print(f"{kind:24s} {label:18s} seed {seed}: " + " ".join(f"{a * 100:5.1f}" for a in accs)
                      + f"  (t: {ts[0]:g} -> {ts[-1]:g})", flush=True)
            finals = [accs[-1] for accs in run["accuracy_per_epoch"]]
            run["final_accuracy_mean"] = float(np.mean(finals))
            run["final_accuracy_per_seed"] = finals
            results[kind][label] = run

    report: dict = {"command": "python examples/homotopy_digits.py " + " ".join(argv or sys.argv[1:]),
                    "data": "scikit-learn digits 8x8 upsampled to 28x28; 1437 train / 360 validation (stratified)",
                    "seeds": args.seeds, "epochs": args.epochs, "training": results, "compiled": {},
                    "latency": {}, "checks": {}}
    fixed = "fixed t=0.5"
    for kind, labels in plans.items():
        for label in labels:
            if label == fixed:
                continue
            gap = 100 * (results[kind][fixed]["final_accuracy_mean"] - results[kind][label]["final_accuracy_mean"])
            report["checks"][f"{kind}: {label} vs {fixed}"] = {
                "accuracy_gap_points": gap, "within_1_point": bool(gap <= 1.0)}

    example = torch.zeros(1, 1, 28, 28)
    for kind, labels in plans.items():
        scheduled = trained[(kind, labels[1], 0)]
        fixed_model = trained[(kind, fixed, 0)]
        at_zero = scheduled.export(example, t=0.0)
        compiled_zero = cnnc.compile(at_zero, passes="fold-bn,remove-skip")
        at_half = fixed_model.export(example, t=0.5)
        compiled_half = cnnc.compile(at_half, passes="fold-bn,remove-skip")
        fixed_model.set_t(0.0)  # what dropping the skips of the fixed-t model would do
        dropped_accuracy = accuracy(fixed_model.model, val_data)
        fixed_model.set_t(0.5)
        report["compiled"][kind] = {
            f"{labels[1]}, exported at t=0": {
                **compile_summary(compiled_zero),
                "validation_accuracy_torch": results[kind][labels[1]]["final_accuracy_per_seed"][0],
                "validation_accuracy_compiled_onnx": onnx_accuracy(compiled_zero.model, val_data)},
            f"{fixed}, exported at t=0.5": {
                **compile_summary(compiled_half),
                "validation_accuracy_compiled_onnx": onnx_accuracy(compiled_half.model, val_data),
                "validation_accuracy_if_its_skips_were_dropped": dropped_accuracy},
        }
        for batch in (1, 64):  # batch 64 is the paper's
            report["latency"][f"{kind}, batch {batch}"] = {
                "same weights: exported t=0 model (A) vs compiled fold-bn,remove-skip (B)":
                    interleaved_latency(at_zero, compiled_zero.model, batch),
                "with skips: fixed t=0.5 compiled fold-bn (A) vs skip-free t=0 compiled (B)":
                    interleaved_latency(compiled_half.model, compiled_zero.model, batch),
            }
        print(f"{kind}: compiled t=0 ops {report['compiled'][kind][f'{labels[1]}, exported at t=0']['ops_after']}")

    sweep = None
    if args.sweep:
        sweep = {"t0": [round(0.1 * i, 1) for i in range(11)], "epochs": 2, "accuracy_after_2_epochs": {}}
        for t0 in sweep["t0"]:
            sweep["accuracy_after_2_epochs"][f"{t0:g}"] = [
                train("resnet", (t0,), seed, train_data, val_data, 2, batch=args.batch)[1][-1]
                for seed in range(args.seeds)]
            print(f"sweep t0={t0:g}: {np.mean(sweep['accuracy_after_2_epochs'][f'{t0:g}']) * 100:.1f} %", flush=True)
        report["sweep"] = sweep

    report["environment"] = {"onnxruntime": ort.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                             "cnnc": cnnc.__version__, "python": platform.python_version(),
                             "cpu_count": os.cpu_count(), "machine": platform.machine(),
                             "provider": "CPUExecutionProvider", "graph_optimization": "ORT_ENABLE_ALL",
                             "latency_threads": 1, "training_threads": args.threads,
                             "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["process_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    report["latency_note"] = ("thread_cpu: CPU time of the one thread that runs the model (intra_op_num_threads=1); "
                              "it leaves out time given to other processes and is the stable clock on a shared "
                              "machine. wall: elapsed time; noisy when the machine is loaded (see load average).")
    (args.out / "homotopy_digits.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "homotopy_digits.png", sweep)
    speedups = {k: {kk: {clock: round(vv[clock]["speedup_percent"], 1) for clock in ("thread_cpu", "wall")}
                    for kk, vv in v.items()} for k, v in report["latency"].items()}
    print(json.dumps({"checks": report["checks"], "speedup_percent": speedups}, indent=2))
    print(f"wrote {args.out / 'homotopy_digits.json'} and {args.out / 'homotopy_digits.png'} "
          f"in {report['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
