"""Built-in example models, generated in code (nothing is downloaded), for the README's first command and tests.

Each example is a torch module with seeded weights and realistic BatchNorm statistics (running means near 0,
variances near 1, scales near 1): random deep nets with default statistics drift towards denormals and zeros, which
would make both equivalence checks and timings meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    input_shape: tuple[int, ...]
    build: Callable


def _realistic_batchnorm(module, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            n = layer.num_features
            with torch.no_grad():
                layer.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                layer.weight.copy_(0.5 + torch.rand(n, generator=generator))
                layer.bias.copy_(0.1 * torch.randn(n, generator=generator))


def _resnet_bn():
    """A small ResNet: BN after every conv, a projection shortcut, a ConvTranspose+BN branch, Linear+BatchNorm1d."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class ResNetBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.stage1 = Block(16, 16, 1)
            self.stage2 = Block(16, 32, 2)
            self.up = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, 2), nn.BatchNorm2d(16), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x):
            x = self.up(self.stage2(self.stage1(self.stem(x))))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ResNetBN()


def _linear_resnet34():
    """Seed 000's linear ResNet-34 at 1×28×28: ResNet-34's conv/BN/skip structure with no nonlinearity."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return self.body(x) + self.shortcut(x)

    layers = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)]
    channels = 16
    for width, blocks, stride in ((16, 3, 1), (32, 4, 2), (64, 6, 2), (128, 3, 2)):
        for index in range(blocks):
            layers.append(Block(channels, width, stride if index == 0 else 1))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return torch.nn.Sequential(*layers)


EXAMPLES = {
    example.name: example for example in (
        Example("resnet-bn", "small ResNet with BN after every conv, ConvTranspose+BN, Linear+BatchNorm1d",
                (1, 3, 32, 40), _resnet_bn),
        Example("linear-resnet34", "seed 000's linear ResNet-34 (no nonlinearity) at 1x28x28",
                (1, 1, 28, 28), _linear_resnet34),
    )
}


def build_example(name: str, seed: int = 0):
    """(module, example_input) for a built-in example, with seeded weights and realistic BN statistics."""
    import torch

    from cnnc.errors import UsageError

    if name not in EXAMPLES:
        raise UsageError(f"unknown example '{name}'; choose one of {', '.join(EXAMPLES)}")
    example = EXAMPLES[name]
    torch.manual_seed(seed)
    module = example.build().eval()
    _realistic_batchnorm(module, seed)
    return module, torch.randn(*example.input_shape, generator=torch.Generator().manual_seed(seed))
