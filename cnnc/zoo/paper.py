"""The papers' small networks, built in code (nothing is downloaded). Widths the papers do not give (seed 000's
small CNNs) are 16 channels. The ResNets (ResNet-18/34/50, seed 003's ResNet-20 as bench/ builds it) are
`cnnc.zoo.resnets.ResNet`; `ResNet20` here is examples/explain_paper_nets.py's narrower variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnc.homotopy import HomotopyJoin


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
    """Seed 004 Table 1 (non-unity stride): LeNet whose pooling layers are 2×2 stride-2 convolutions: 5×5 conv 20,
    2×2/2 conv 20, 5×5 conv 50, 2×2/2 conv 50, fc 500, fc 10, ReLU after every layer but the last; 1×28×28."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.Conv2d(20, 20, 2, 2), nn.ReLU(),
                                      nn.Conv2d(20, 50, 5), nn.ReLU(), nn.Conv2d(50, 50, 2, 2), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(), nn.Linear(500, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class VGG7(nn.Module):
    """Seed 003 Table A.1: six 3×3 conv + BN + ReLU (32, 32 | 64, 64 | 96, 96), average pools of window 3 and
    stride 2 between the pairs, on 3×32×32. Two heads, both used by committed results:
    - "flatten" (bench/, model vgg7-cifar): a fully connected classifier over the 96×8×8 map;
    - "global-pool" (examples/explain_paper_nets.py, vgg7): global average pooling, FC 96→10 and the seventh ReLU."""

    def __init__(self, classes: int = 10, head: str = "flatten"):
        super().__init__()
        if head not in ("flatten", "global-pool"):
            raise ValueError(f"unknown VGG7 head {head!r}")
        self.head = head
        layers, channels = [], 3
        for index, width in enumerate((32, 32, 64, 64, 96, 96)):
            if index in (2, 4):
                layers.append(nn.AvgPool2d(3, 2, 1))
            layers += [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(96 * 8 * 8 if head == "flatten" else 96, classes)

    def forward(self, x):
        if self.head == "flatten":
            return self.fc(torch.flatten(self.features(x), 1))
        return torch.relu(self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)))


class PadBasicBlock(nn.Module):
    """ResNet-20's block with LeakyReLU and option-A shortcuts (subsample, then pad the new channels with zeros)."""

    def __init__(self, cin, cout, stride, slope=0.1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.stride, self.extra, self.slope = stride, cout - cin, slope

    def forward(self, x):
        y = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
        y = self.bn2(self.conv2(y))
        shortcut = x
        if self.stride != 1 or self.extra:
            shortcut = F.pad(F.avg_pool2d(x, 1, self.stride), (0, 0, 0, 0, 0, self.extra))
        return F.leaky_relu(y + shortcut, self.slope)


class ResNet20(nn.Module):
    """Seed 003 Table A.3 in He et al.'s ResNet-20 layout, as examples/explain_paper_nets.py builds it: a 3×3 stem,
    3 sections × 3 `PadBasicBlock`s, global pooling, FC →10 and a LeakyReLU after it. Widths 16/32/64 and slope
    0.1 by default (the paper: 32/64/96; bench/'s resnet20-cifar is `resnets.ResNet` with those, slope 0.01 and no
    activation after the FC). Its module names (stem, bn, blocks, fc) are those explain's committed tables show."""

    def __init__(self, widths=(16, 32, 64), slope=0.1):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        blocks, channels = [], widths[0]
        for section, width in enumerate(widths):
            for index in range(3):
                blocks.append(PadBasicBlock(channels, width, 2 if section and index == 0 else 1, slope))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, 10)
        self.slope = slope

    def forward(self, x):
        x = self.blocks(F.leaky_relu(self.bn(self.stem(x)), self.slope))
        return F.leaky_relu(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), self.slope)
