"""cnnc's one home of model definitions, generated in code (nothing is downloaded), and the registry of the
built-in examples that `cnnc example` and `cnnc compile --example` build.

- `cnnc.zoo.resnets`: torchvision's BasicBlock, Bottleneck and ResNet (ResNet-18/34/50, linear and homotopy
  variants, seed 003's ResNet-20 as bench/ builds it);
- `cnnc.zoo.blocks`: the small residual blocks (the `resnet-bn` example's, seed 000's linear one, RepVGG's);
- `cnnc.zoo.paper`: the papers' small networks (SkipCNN3, AllSkipCNN6, LeNet all-conv, VGG7, explain's ResNet-20);
- `cnnc.zoo.builtin`: the models registered below;
- `cnnc.zoo.batchnorm`: realistic BatchNorm statistics, drawn or calibrated (see there why both exist);
- `cnnc.zoo.vision`: `ZOO`, the torchvision and timm networks people ship, with seeded weights and calibrated BN
  (torchvision and timm are the optional `zoo` extra, imported only when such a model is built);
- `cnnc.zoo.branch_damping`: their calibration (BN statistics measured in eval mode, residual branches damped);
- `cnnc.zoo.exports`: those networks exported to ONNX by torch's exporters (fp32 and fp16), cached on disk.

Each example is a torch module with seeded weights and drawn BatchNorm statistics (running means near 0, variances
near 1, scales near 1): random deep nets with default statistics drift towards denormals and zeros, which would
make both equivalence checks and timings meaningless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cnnc.errors import UsageError
from cnnc.zoo.batchnorm import calibrate_batchnorm, draw_batchnorm_statistics
from cnnc.zoo.builtin import ResNetBN, linear_resnet34
from cnnc.zoo.exports import EXPORTERS, export_zoo_model
from cnnc.zoo.vision import ZOO, ZooModel, build_zoo_model, timm_reparameterized, vision_libraries

__all__ = ["EXAMPLES", "EXPORTERS", "ZOO", "Example", "ZooModel", "build_example", "build_zoo_model",
           "calibrate_batchnorm", "draw_batchnorm_statistics", "export_zoo_model", "timm_reparameterized",
           "vision_libraries"]


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    input_shape: tuple[int, ...]
    build: Callable


EXAMPLES = {
    example.name: example for example in (
        Example("resnet-bn", "small ResNet with BN after every conv, ConvTranspose+BN, Linear+BatchNorm1d",
                (1, 3, 32, 40), ResNetBN),
        Example("linear-resnet34", "seed 000's linear ResNet-34 (no nonlinearity) at 1x28x28",
                (1, 1, 28, 28), linear_resnet34),
    )
}


def build_example(name: str, seed: int = 0):
    """(module, example_input) for a built-in example, with seeded weights and drawn BN statistics."""
    if name not in EXAMPLES:
        raise UsageError(f"unknown example '{name}'; choose one of {', '.join(EXAMPLES)}")
    example = EXAMPLES[name]
    torch.manual_seed(seed)
    module = example.build().eval()
    draw_batchnorm_statistics(module, seed)
    return module, torch.randn(*example.input_shape, generator=torch.Generator().manual_seed(seed))
