"""The models behind `cnnc example` / `cnnc compile --example` (registered in `cnnc.zoo`)."""

from __future__ import annotations

import torch
from torch import nn

from cnnc.zoo.blocks import LinearBlock, ResidualBlock


class ResNetBN(nn.Module):
    """A small ResNet: BN after every conv, a projection shortcut, a ConvTranspose+BN branch, Linear+BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stage1 = ResidualBlock(16, 16, 1)
        self.stage2 = ResidualBlock(16, 32, 2)
        self.up = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, 2), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        x = self.up(self.stage2(self.stage1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def linear_resnet34() -> nn.Sequential:
    """Seed 000's linear ResNet-34 at 1×28×28: ResNet-34's conv/BN/skip structure with no nonlinearity."""
    layers = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)]
    channels = 16
    for width, blocks, stride in ((16, 3, 1), (32, 4, 2), (64, 6, 2), (128, 3, 2)):
        for index in range(blocks):
            layers.append(LinearBlock(channels, width, stride if index == 0 else 1))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*layers)
