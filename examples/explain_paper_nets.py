"""Seed 003's data-set experiment (Tables 3–4) on the networks of the issue, with nothing trained.

Builds three CIFAR/MNIST-size networks in torch with seeded weights (and realistic BatchNorm statistics), exports
them with `cnnc.io.frontend.from_torch`, and runs on each

    cnnc explain MODEL --dataset --random 200 --explicit-units 1 --md R.md --json R.json

which folds BN (Eq. 7), reconstructs every unit of every conv layer (RM2, before the conv's own bias), of every
hidden fully connected layer and of every output (RM0) on 200 seeded uniform [0, 1) inputs as
<x, H_I> + <x_b, H_b>, and additionally rebuilds one random unit per layer and input, and every output unit, from
explicit reverse-mode H. It also runs
`cnnc analyze` on the ResNet-20 (9 blocks in 3 sections) and writes its JSON and plot to examples/results/.

    python examples/explain_paper_nets.py --models /tmp/cnnc-nets --results bench/results

The networks (defined in cnnc.zoo.paper):
- lenet:    seed 004 Table 1 (non-unity stride): 5×5 conv 20, 2×2/2 conv 20, 5×5 conv 50, 2×2/2 conv 50, fc 500,
            fc 10, ReLU after every layer but the last; 1×28×28.
- vgg7:     seed 003 Table A.1: 3×3 convs 32, 32 | 64, 64 | 96, 96 with BN and ReLU, average pools of window 3 and
            stride 2 between the pairs, global pooling, FC 96→10 and the seventh ReLU after it; 3×32×32.
- resnet20: seed 003 Table A.3 (He et al.'s ResNet-20 layout): a 3×3 stem, 3 sections × 3 basic blocks of two
            3×3 convs with BN and LeakyReLU(0.1), avg-pool (window 1, stride 2) + zero-channel-pad shortcuts
            between sections, global pooling, FC →10 and a LeakyReLU after it; widths 16/32/64 (the paper uses
            32/64/96; the narrower net keeps the 200-input run within minutes on two CPU cores).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import onnx
import torch
from torch import nn

from cnnc.io.frontend import from_torch
from cnnc.zoo import draw_batchnorm_statistics
from cnnc.zoo.paper import VGG7, LeNetAllConv, ResNet20

NETWORKS = {"lenet": (LeNetAllConv, (1, 1, 28, 28)), "vgg7": (partial(VGG7, head="global-pool"), (1, 3, 32, 32)),
            "resnet20": (ResNet20, (1, 3, 32, 32))}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The network with seeded weights and drawn BN statistics near those of a trained net (means near 0, variances
    and scales near 1), so that activations neither vanish nor explode through the untrained layers."""
    factory, shape = NETWORKS[name]
    torch.manual_seed(seed)
    module = factory().eval()
    draw_batchnorm_statistics(module, seed)
    return module, shape


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="/tmp/cnnc-explain-nets", help="where the ONNX exports go")
    parser.add_argument("--results", default="bench/results", help="where explain-*.md / .json go")
    parser.add_argument("--analyze-results", default="examples/results", help="where analyze-*.json / .png go")
    parser.add_argument("--inputs", type=int, default=200)
    parser.add_argument("--nets", default=",".join(NETWORKS))
    args = parser.parse_args()
    cnnc = shutil.which("cnnc") or str(Path(sys.executable).with_name("cnnc"))
    models, results, analyze = Path(args.models), Path(args.results), Path(args.analyze_results)
    for folder in (models, results, analyze):
        folder.mkdir(parents=True, exist_ok=True)
    for name in args.nets.split(","):
        module, shape = build(name)
        path = models / f"{name}.onnx"
        onnx.save(from_torch(module, torch.zeros(shape)), path)
        run([cnnc, "explain", str(path), "--dataset", "--random", str(args.inputs), "--explicit-units", "1",
             "--md", str(results / f"explain-{name}.md"), "--json", str(results / f"explain-{name}.json")])
        if name == "resnet20":
            run([cnnc, "analyze", str(path), "--random", "32", "--eps", "0.1", "--json",
                 str(analyze / f"analyze-{name}.json"), "--plot", str(analyze / f"analyze-{name}.png")])


if __name__ == "__main__":
    main()
