"""Realistic BatchNorm statistics for untrained models, in the two ways the committed results were produced.

Random deep nets with default statistics (mean 0, variance 1, γ 1, β 0) shrink or blow up their activations layer
after layer, into subnormal floats or overflow: equivalence checks and timings on them would mean nothing. A trained
network's BN normalises what reaches it; two set-ups imitate that:

- `draw_batchnorm_statistics`: running mean, running variance, γ and β *drawn* from a seeded generator (means near
  0, variances and scales near 1). Cheap, no forward pass, independent of the input shape: what `cnnc example`,
  examples/explain_paper_nets.py and the tests use. Right for shallow nets; with depth the drawn statistics no
  longer match what each BN receives.
- `calibrate_batchnorm`: γ and β drawn, then the running statistics *measured* on random N(0, 1) batches in
  training mode. Every BN then normalises what actually reaches it, at any depth: what bench/ uses for the papers'
  networks (ResNet-18/34/50 at 224×224).

Both exist because committed results (bench/results, examples/results) were produced with each; one would change
the other's weights. The torchvision / timm zoo uses a third, `cnnc.zoo.branch_damping.calibrate_damped`: the
statistics measured in eval mode, layer after layer, and residual branches damped as in a trained network.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def draw_batchnorm_statistics(module: nn.Module, seed: int, spread: float = 0.1, affine: bool = True) -> nn.Module:
    """Per BN layer, in `module.modules()` order: running mean ~ spread·N(0, 1), running variance ~ U[0.5, 1.5),
    then (when `affine`) γ ~ U[0.5, 1.5) and β ~ spread·N(0, 1), all from one generator seeded with `seed`.
    `affine=False` draws the running statistics only (γ = 1, β = 0 stay). Returns `module` (mode unchanged)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            n = layer.num_features
            layer.running_mean.copy_(spread * torch.randn(n, generator=generator))
            layer.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            if affine:
                layer.weight.copy_(0.5 + torch.rand(n, generator=generator))
                layer.bias.copy_(spread * torch.randn(n, generator=generator))
    return module


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, input_shape: tuple[int, ...], seed: int, batches: int = 2) -> nn.Module:
    """γ in [0.5, 1.5) and β ~ 0.1·N(0, 1), then running statistics measured on `batches` random N(0, 1) inputs of
    `input_shape` (cumulative average): every BN sees, and normalises, the activations it actually gets. (Drawing γ
    after measuring would rescale every later BN's input away from its statistics, a mismatch that compounds with
    depth: ×100 at the output of a plain ResNet-34.) Returns `module` in eval mode."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return module.eval()
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
    return module
