"""Small residual blocks that are not torchvision's (those are in `cnnc.zoo.resnets`).

- `ResidualBlock`: conv+BN+ReLU, conv+BN, plus a shortcut (identity, or 1×1 conv + BN when the shape changes), then
  ReLU; the `resnet-bn` example's block, and the tests' small ResNets. Its attribute names (`shortcut`) are those
  the example's ONNX names carry.
- `LinearBlock`: the same without any nonlinearity (seed 000's linear ResNet-34): conv+BN, conv+BN, plus shortcut.
- `RepVGGBlock`: RepVGG's training-time block, 3×3 conv+BN + 1×1 conv+BN (+ BN on the identity when the shape
  allows), then ReLU: what `collapse` merges into one conv.
"""

from __future__ import annotations

import torch
from torch import nn


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class LinearBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.k1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if stride == 1 and cin == cout else None

    def forward(self, x):
        y = self.k3(x) + self.k1(x)
        return torch.relu(y + self.identity(x) if self.identity is not None else y)
