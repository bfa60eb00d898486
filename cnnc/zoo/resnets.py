"""ResNets as torchvision writes them (torchvision is not a dependency): BasicBlock, Bottleneck and the ResNet
that stacks them, with the stems of ImageNet (7×7/2 conv, max-pool) and CIFAR (one 3×3 conv).

The blocks keep torchvision's attribute names and join (`out += identity`, then the activation), which is what
`cnnc.homotopy` finds by tracing, and add what the papers and tests need:

- `downsample` is a module, None, or a kind, "projection" (1×1 conv + BN, seed 000, He et al.) or "pad" (seed 003's
  ResNet-20: average pool of window 1, stride 2, then zero channels appended), built *after* the block's convs when
  the shape changes; the seeded weights of bench/ and examples/ depend on that creation order;
- `activation`: torchvision's `nn.ReLU(inplace=True)` by default, or a function (LeakyReLU for ResNet-20, the
  identity for seed 000's linear ResNets); `with_skip = False` drops the join (the network a homotopy reaches at
  t = 0, for reference copies in tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Seed 003's ResNet-20 shortcut: average pool of window 1 and stride 2, then zero channels appended."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(1, stride)
        self.extra = cout - cin

    def forward(self, x):
        return F.pad(self.pool(x), (0, 0, 0, 0, 0, self.extra))


def projection(cin: int, cout: int, stride: int) -> nn.Module:
    """The 1×1 conv + BN shortcut of He et al. (torchvision's `downsample`)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _downsample(downsample, cin: int, cout: int, stride: int) -> nn.Module | None:
    if not isinstance(downsample, str):
        return downsample
    if stride == 1 and cin == cout:
        return None
    return PadShortcut(cin, cout, stride) if downsample == "pad" else projection(cin, cout, stride)


class _Residual(nn.Module):
    """What both blocks share: the activation, the shortcut and the join."""

    def _finish(self, activation: Callable | None, downsample, cin: int, cout: int, stride: int) -> None:
        self.relu = nn.ReLU(inplace=True) if activation is None else activation
        self.downsample = _downsample(downsample, cin, cout, stride)
        self.with_skip = True

    def _shortcut(self, x):
        # Before the branch, not after as in torchvision: a traced copy (cnnc.homotopy) lists its BNs in the order
        # they run, and bench/'s calibrated BN statistics are drawn in that order.
        return x if self.downsample is None else self.downsample(x)

    def _join(self, out, identity):
        if self.with_skip:
            out += identity
        return self.relu(out)


class BasicBlock(_Residual):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, activation: Callable | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self._finish(activation, downsample, inplanes, planes, stride)

    def forward(self, x):
        identity = self._shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self._join(self.bn2(self.conv2(out)), identity)


class Bottleneck(_Residual):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, activation: Callable | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self._finish(activation, downsample, inplanes, planes * 4, stride)

    def forward(self, x):
        identity = self._shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._join(self.bn3(self.conv3(out)), identity)


class ResNet(nn.Module):
    """`layers[i]` blocks of width `widths[i]` per stage, stride 2 at the start of every stage but the first."""

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
                blocks.append(block(channels, width, stride, shortcut, activation))
                channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.pool(self.activation(self.bn1(self.conv1(x))))
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def leaky_relu(x):
    """Seed 003's activation (slope 0.01), as a named function so that exports and traces name it."""
    return F.leaky_relu(x, 0.01)
