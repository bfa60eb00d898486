"""The papers' networks, built in code (nothing is downloaded; torchvision is not needed), for bench/run_suite.py.

| name              | source                      | input     | what it is                                                   |
|-------------------|-----------------------------|-----------|--------------------------------------------------------------|
| linear-resnet34   | seed 000 §5.2               | 1×28×28   | ResNet-34 without nonlinearities (cnnc.zoo)             |
| skip3-linear      | seed 000 §3, §5.2           | 1×28×28   | 3 linear 3×3 convs, a skip from layer 1 to layer 3, then FC  |
| allskip6-homotopy | seed 000 §5.3               | 1×28×28   | 6 ReLU convs, skips between all non-consecutive layers as    |
|                   |                             |           | homotopy joins, exported at t = 0                            |
| resnet34-homotopy | seed 000 §4, §5.3           | 1×28×28   | ResNet-34 (ReLU, BN) wrapped by cnnc.homotopy, t = 0         |
| lenet-allconv     | seed 004 Tables 1–2         | 1×28×28   | LeNet with pooling replaced by 2×2 stride-2 convs            |
| vgg7-cifar        | seed 003 Table A.1          | 3×32×32   | VGG7: six 3×3 conv+BN+ReLU (32, 32, 64, 64, 96, 96), avg-pools|
| resnet20-cifar    | seed 003 Table A.3          | 3×32×32   | ResNet-20, widths 32/64/96, LeakyReLU, avg-pool+pad shortcuts |
| resnet18          | He et al. (torchvision)     | 3×224×224 | ResNet-18                                                    |
| resnet50          | He et al. (torchvision)     | 3×224×224 | ResNet-50 (bottlenecks)                                      |

The definitions live in cnnc.zoo (cnnc.zoo.paper, cnnc.zoo.resnets); this file is the list the suite runs. Widths
the papers do not give (seed 000's small CNNs) are 16 channels. Weights are seeded. BatchNorm statistics are
calibrated (cnnc.zoo.calibrate_batchnorm): scales and shifts are drawn near 1 and 0, then the running mean and
variance are measured on random N(0, 1) batches in training mode (cumulative average), so every BN normalises what
actually reaches it, as in a trained network. Random deep nets with default statistics shrink their activations
layer after layer into subnormal floats, which CPUs process 10-100× slower and which would distort the timings;
`subnormal_fraction` measures what fraction of all activations is subnormal (the suite records it per model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnc.homotopy import SkipHomotopy
from cnnc.io.frontend import from_torch
from cnnc.zoo import build_example, calibrate_batchnorm
from cnnc.zoo.paper import VGG7, AllSkipCNN6, LeNetAllConv, SkipCNN3
from cnnc.zoo.resnets import BasicBlock, Bottleneck, ResNet, leaky_relu

# ------------------------------------------------------------------------------------------------- realism


@torch.no_grad()
def subnormal_fraction(module: nn.Module, example: torch.Tensor) -> dict:
    """Fraction of subnormal values over the outputs of every leaf module on `example`, and the smallest non-zero
    magnitude seen."""
    tiny = torch.finfo(torch.float32).tiny
    totals = {"values": 0, "subnormal": 0, "smallest_nonzero": float("inf")}

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            magnitude = output.detach().abs()
            nonzero = magnitude[magnitude > 0]
            totals["values"] += magnitude.numel()
            totals["subnormal"] += int((nonzero < tiny).sum())
            if nonzero.numel():
                totals["smallest_nonzero"] = min(totals["smallest_nonzero"], float(nonzero.min()))

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        module.eval()
        module(example)
    finally:
        for handle in handles:
            handle.remove()
    return {"fraction": totals["subnormal"] / max(totals["values"], 1), "values": totals["values"],
            "smallest_nonzero": totals["smallest_nonzero"]}


# ------------------------------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class PaperModel:
    name: str
    source: str
    input_shape: tuple[int, ...]  # batch 1
    linear: bool
    build: Callable[[], nn.Module]
    homotopy: str = ""  # "wrap": cnnc.homotopy wraps the joins; "builtin": the module has its own joins at t
    paper_result: str = ""  # what the paper measured, for context (never compared: other hardware)
    extra_variants: tuple[tuple[str, str], ...] = ()  # (label, pass list) timed next to the default compile
    big: bool = False  # 224×224: fewer warm-up rounds at large batch


def _linear_resnet34() -> nn.Module:
    module, _ = build_example("linear-resnet34")
    return module


MODELS = {m.name: m for m in (
    PaperModel("linear-resnet34", "seed 000 §5.2", (1, 1, 28, 28), True, _linear_resnet34,
               paper_result="104.91 µs -> 2.06 µs per image, collapsed (RTX 2060, batch 64)"),
    PaperModel("skip3-linear", "seed 000 §5.2", (1, 1, 28, 28), True, SkipCNN3,
               paper_result="12.05 µs -> 2.06 µs per image, collapsed (RTX 2060, batch 64)"),
    PaperModel("allskip6-homotopy", "seed 000 §5.3", (1, 1, 28, 28), False, AllSkipCNN6, homotopy="builtin",
               paper_result="30.72 µs -> 16.44 µs per image, skips removed (46 %, RTX 2060, batch 64)"),
    PaperModel("resnet34-homotopy", "seed 000 §5.3", (1, 1, 28, 28), False,
               lambda: ResNet(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), 1, 10), homotopy="wrap",
               paper_result="106.83 µs -> 83.1 µs per image, skips removed (22 %, RTX 2060, batch 64)"),
    PaperModel("lenet-allconv", "seed 004 Tables 1-2", (1, 1, 28, 28), False, LeNetAllConv,
               extra_variants=(("destride", "destride{mode=network}"),),
               paper_result="training time 451.91 s strided vs 680.97 s stride-free (no inference timing)"),
    PaperModel("vgg7-cifar", "seed 003 Table A.1", (1, 3, 32, 32), False, VGG7),
    PaperModel("resnet20-cifar", "seed 003 Table A.3", (1, 3, 32, 32), False,
               lambda: ResNet(BasicBlock, (3, 3, 3), (32, 64, 96), 3, 10, stem="cifar", activation=leaky_relu,
                              shortcut="pad")),
    PaperModel("resnet18", "He et al. 2016", (1, 3, 224, 224), False,
               lambda: ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 3, 1000), big=True),
    PaperModel("resnet50", "He et al. 2016", (1, 3, 224, 224), False,
               lambda: ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 3, 1000), big=True),
)}


def build(spec: PaperModel, seed: int = 0):
    """(module to export, example input, exporter) with seeded weights and calibrated BN statistics. The exporter
    turns (module, example) into ONNX: cnnc.io.frontend.from_torch, or the homotopy's export at t = 0."""
    torch.manual_seed(seed)
    module = spec.build().eval()
    example = torch.randn(*spec.input_shape, generator=torch.Generator().manual_seed(seed))
    calibration_shape = (4 if spec.big else 16, *spec.input_shape[1:])
    if spec.homotopy == "wrap":
        homotopy = SkipHomotopy.wrap(module, t=0.0, example_input=example)
        if not homotopy.joins:
            raise RuntimeError(f"cnnc.homotopy found no residual join in {spec.name}: {homotopy.skipped}")
        calibrate_batchnorm(homotopy.model, calibration_shape, seed)
        return homotopy.model.eval(), example, lambda _module, x: homotopy.export(x, t=0.0)
    calibrate_batchnorm(module, calibration_shape, seed)
    return module, example, from_torch
