"""The default pipeline on a real-size ResNet-18 (3×224×224) and on a network of odd geometry is equivalent.

Both are torch modules exported by cnnc's frontend (dynamic batch), compiled with every default pass and
`strict=True` (a pass that raises fails the test instead of being rolled back), proven equivalent by `cnnc.compile`
itself (seeded uniform and normal inputs at batch 1 and 2, rtol 1e-4, atol 1e-5) and compared with torch. BN
statistics are calibrated on random data, as training would leave them, so that activations stay normalised
through the depth and folding BN is not a no-op (γ and β are not 1 and 0). Whether the compiled ResNet-18 is
faster is a timing question: bench/odd_geometry.py measures it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import op_counts, run_model
from torch import nn

import cnnc
from cnnc.passes import DEFAULT_PIPELINE
from cnnc.zoo import calibrate_batchnorm
from cnnc.zoo.resnets import BasicBlock, ResNet


def _calibrate(module: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """γ, β drawn, then running statistics measured on one random batch (cumulative average), then eval mode."""
    return calibrate_batchnorm(module, shape, seed, batches=1)


def _resnet18(classes: int = 1000) -> nn.Module:
    """torchvision's resnet18 layout (torchvision is not a dependency)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 3, classes)


class OddNet(nn.Module):
    """Depthwise stride 2, dilation, groups, ConvTranspose, asymmetric pads, ceil_mode pooling, non-square input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d((2, 1, 0, 3)), nn.Conv2d(3, 12, (3, 5), (2, 1)), nn.BatchNorm2d(12),
                                  nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(12, 12, 3, 2, 1, groups=12, bias=False), nn.BatchNorm2d(12),
                                       nn.ReLU())
        self.dilated = nn.Sequential(nn.Conv2d(12, 24, 3, 1, 2, dilation=2, groups=3), nn.BatchNorm2d(24),
                                     nn.LeakyReLU(0.1))
        self.residual = nn.Sequential(nn.Conv2d(24, 24, (1, 3), 1, (0, 1), groups=4, bias=False),
                                      nn.BatchNorm2d(24))
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.up = nn.Sequential(nn.ConvTranspose2d(24, 16, 4, 2, 1, groups=2), nn.BatchNorm2d(16), nn.Tanh())
        self.average = nn.AvgPool2d((3, 2), (2, 2), (1, 0), ceil_mode=True, count_include_pad=False)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        y = self.dilated(self.depthwise(self.stem(x)))
        y = torch.relu(y + self.residual(y))
        return self.head(self.average(self.up(self.pool(y))))


def _compile_and_compare(module: nn.Module, shape: tuple[int, ...], seed: int):
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    result = cnnc.compile(module, example_input=example, strict=True)  # default passes, checked by compile
    equivalence = result.report["equivalence"]
    assert equivalence["passed"] and equivalence["feeds"] == 4, equivalence["summary"]
    assert [r["pass"] for r in result.report["passes"]] == list(DEFAULT_PIPELINE)
    assert not any(r["error"] for r in result.report["passes"])
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        expected = module(x).numpy()
    got = run_model(result.model, {"input": x.numpy()})[0]
    assert got.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert float(np.max(np.abs(got - expected))) <= 1e-4 * scale
    return result


def test_default_pipeline_on_resnet18_at_224():
    module = _calibrate(_resnet18(), (2, 3, 224, 224), seed=0)
    result = _compile_and_compare(module, (1, 3, 224, 224), seed=10)
    assert result.report["before"]["ops"]["BatchNormalization"] == 20
    assert "BatchNormalization" not in op_counts(result.model)  # all folded: γ, β, μ, σ² were not trivial
    assert op_counts(result.model)["Conv"] == 20


def test_default_pipeline_on_odd_geometry():
    module = OddNet()
    with torch.no_grad():
        for conv in (m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))):
            conv.weight.mul_(1.5)  # a little more signal through the Tanh than the default init gives
    module = _calibrate(module, (2, 3, 37, 53), seed=1)
    result = _compile_and_compare(module, (1, 3, 37, 53), seed=20)
    before = result.report["before"]["ops"]
    assert before["ConvTranspose"] == 1 and before["MaxPool"] == 1 and before["AveragePool"] == 1
    assert "BatchNormalization" not in op_counts(result.model)
    conv_groups = {int(next((a.i for a in n.attribute if a.name == "group"), 1))
                   for n in result.original.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    assert {12, 3, 4, 2} <= conv_groups  # depthwise, grouped, and a grouped ConvTranspose went through
    assert result.report["after"]["outputs"]["output"][1:] == list(module(torch.zeros(1, 3, 37, 53)).shape[1:])


@pytest.mark.parametrize("height, width", [(37, 53), (64, 23)])
def test_odd_geometry_pooling_shapes_agree_between_torch_and_onnxruntime(height, width):
    """The ceil_mode pools sit where onnx's shape inference and onnxruntime agree (see test_fuzz.py), at both
    sizes; the compiled model's declared output shape is what onnxruntime computes."""
    module = _calibrate(OddNet(), (1, 3, height, width), seed=2)
    result = cnnc.compile(module, example_input=torch.zeros(1, 3, height, width), strict=True, check=False)
    x = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
    got = run_model(result.model, {"input": x})[0]
    declared = result.report["after"]["outputs"]["output"]
    assert list(got.shape[1:]) == declared[1:]
