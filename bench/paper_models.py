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

Widths the papers do not give (seed 000's small CNNs) are 16 channels. Weights are seeded. BatchNorm statistics are
calibrated: the running mean and variance are measured on random N(0, 1) batches in training mode (cumulative
average), then scales and shifts are drawn near 1 and 0, so every BN normalises what actually reaches it, as in a
trained network. Random deep nets with default statistics shrink their activations layer after layer into
subnormal floats, which CPUs process 10-100× slower and which would distort the timings;
`subnormal_fraction` measures what fraction of all activations is subnormal (the suite records it per model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnc.homotopy import HomotopyJoin, SkipHomotopy


# ------------------------------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, activation: Callable, shortcut: str = "projection"):
        super().__init__()
        self.activation = activation
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(cin, width, stride, shortcut)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.activation(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity  # torchvision's join: cnnc.homotopy finds it by tracing
        return self.activation(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, activation: Callable, shortcut: str = "projection"):
        super().__init__()
        self.activation = activation
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = _shortcut(cin, width * 4, stride, shortcut)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.activation(self.bn1(self.conv1(x)))
        out = self.activation(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.activation(out)


class PadShortcut(nn.Module):
    """Seed 003's ResNet-20 shortcut: average pool of window 1 and stride 2, then zero channels appended."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(1, stride)
        self.extra = cout - cin

    def forward(self, x):
        return F.pad(self.pool(x), (0, 0, 0, 0, 0, self.extra))


def _shortcut(cin: int, cout: int, stride: int, kind: str) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    if kind == "pad":
        return PadShortcut(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    def __init__(self, block, layers, widths, in_channels: int, classes: int, stem: str = "imagenet",
                 activation: Callable = F.relu, shortcut: str = "projection"):
        super().__init__()
        self.activation = activation
        if stem == "imagenet":  # 7×7 stride 2, then 3×3 max-pool stride 2
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        else:  # CIFAR: one 3×3 conv at full resolution
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels, stages = widths[0], []
        for index, (width, count) in enumerate(zip(widths, layers)):
            blocks = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(channels, width, stride, activation, shortcut))
                channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.pool(self.activation(self.bn1(self.conv1(x))))
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _leaky_relu(x):
    return F.leaky_relu(x, 0.01)


# ------------------------------------------------------------------------------------------------- small CNNs


class SkipCNN3(nn.Module):
    """Seed 000: three linear 3×3 convolutions with a skip from the first layer's output to the third layer's
    input, then a fully connected layer. Linear, so Theorem 3.1 makes it one affine map."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1)
        self.conv3 = nn.Conv2d(width, width, 3, 1, 1)
        self.fc = nn.Linear(width * 28 * 28, classes)

    def forward(self, x):
        h1 = self.conv1(x)
        h3 = self.conv3(self.conv2(h1) + h1)
        return self.fc(torch.flatten(h3, 1))


class AllSkipCNN6(nn.Module):
    """Seed 000 §5.3: six 3×3 ReLU convolutions where every layer also receives the outputs of all earlier,
    non-consecutive layers, each sum a homotopy join (1 − t)·h_{k−1} + t·Σ_{i≤k−2} h_i, then a classifier."""

    def __init__(self, width: int = 16, layers: int = 6, classes: int = 10, t: float = 0.0):
        super().__init__()
        self.t = torch.tensor(float(t))
        self.convs = nn.ModuleList([nn.Conv2d(1, width, 3, 1, 1)] +
                                   [nn.Conv2d(width, width, 3, 1, 1) for _ in range(layers - 1)])
        self.joins = nn.ModuleList([HomotopyJoin(self.t) for _ in range(layers - 2)])
        self.fc = nn.Linear(width * 28 * 28, classes)

    def forward(self, x):
        outputs = [F.relu(self.convs[0](x))]
        for k, conv in enumerate(self.convs[1:], start=1):
            if k >= 2:
                skip = outputs[0]
                for earlier in outputs[1:k - 1]:
                    skip = skip + earlier
                z = self.joins[k - 2](outputs[k - 1], skip)
            else:
                z = outputs[0]
            outputs.append(F.relu(conv(z)))
        return self.fc(torch.flatten(outputs[-1], 1))


class LeNetAllConv(nn.Module):
    """Seed 004 Table 1 (non-unity stride): LeNet whose pooling layers are 2×2 stride-2 convolutions."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.Conv2d(20, 20, 2, 2), nn.ReLU(),
                                      nn.Conv2d(20, 50, 5), nn.ReLU(), nn.Conv2d(50, 50, 2, 2), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(), nn.Linear(500, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class VGG7(nn.Module):
    """Seed 003 Table A.1: six 3×3 conv + BN + ReLU (32, 32 | 64, 64 | 96, 96), average pools of window 3 and
    stride 2 between the pairs, and a fully connected classifier over the 96×8×8 map."""

    def __init__(self, classes: int = 10):
        super().__init__()
        layers, channels = [], 3
        for index, width in enumerate((32, 32, 64, 64, 96, 96)):
            if index in (2, 4):
                layers.append(nn.AvgPool2d(3, 2, 1))
            layers += [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(96 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


# ------------------------------------------------------------------------------------------------- realism


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, input_shape: tuple[int, ...], seed: int, batches: int = 2) -> None:
    """γ in [0.5, 1.5] and β ~ 0.1·N(0, 1), then running statistics measured on random N(0, 1) inputs (cumulative
    average): every BN sees, and normalises, the activations it actually gets. (Drawing γ after measuring would
    rescale every later BN's input away from its statistics, a mismatch that compounds with depth: ×100 at the
    output of a plain ResNet-34.)"""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    generator = torch.Generator().manual_seed(seed)
    for norm in norms:
        norm.weight.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(norm.num_features, generator=generator))
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average over the calibration batches
    module.train()
    for _ in range(batches):
        module(torch.randn(*input_shape, generator=generator))
    module.eval()
    for norm in norms:
        norm.momentum = 0.1


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
    from cnnc.zoo import build_example

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
               lambda: ResNet(BasicBlock, (3, 3, 3), (32, 64, 96), 3, 10, stem="cifar", activation=_leaky_relu,
                              shortcut="pad")),
    PaperModel("resnet18", "He et al. 2016", (1, 3, 224, 224), False,
               lambda: ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 3, 1000), big=True),
    PaperModel("resnet50", "He et al. 2016", (1, 3, 224, 224), False,
               lambda: ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 3, 1000), big=True),
)}


def build(spec: PaperModel, seed: int = 0):
    """(module to export, example input, exporter) with seeded weights and calibrated BN statistics. The exporter
    turns (module, example) into ONNX: cnnc.io.frontend.from_torch, or the homotopy's export at t = 0."""
    from cnnc.io.frontend import from_torch

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
