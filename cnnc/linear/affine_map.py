"""The dense matrix of an affine machine, f(X) = W·X + B (seed 000 Theorem 3.1: W = f_W(1), B = f(0)).

f is evaluated in float64 by `cnnc.eval`. B = f(0). The rows or columns of W come in batches:
- reverse mode (the adjoint of seed 003; rows of W as vector-Jacobian products) when the output is smaller than the
  input: a batch of c zero inputs, one one-hot cotangent per batch element, one backward pass -> c rows;
- forward mode when the input is smaller: a batch of c one-hot inputs, f(e_j) − f(0) -> c columns.
Both use the batch axis to carry the c probes, which is valid only when the machine treats batch elements
independently; `verify_affine_map` proves that afterwards on random batched inputs, so a machine that mixes batch
elements is caught, never silently miscompiled. Cost grows with min(inputs, outputs) evaluations, not their product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cnnc.progress import progress

# Probes per batch: bounded by the activation memory of one evaluation, estimated by the caller.
DEFAULT_CHUNK = 64


@dataclass(frozen=True)
class AffineMap:
    weight: np.ndarray  # m × n, float64: output-major, so row i is ∂(flat output i)/∂(flat input)
    bias: np.ndarray  # m, float64
    input_shapes: tuple  # per-sample shapes (without the batch axis)
    output_shapes: tuple


def _flat(tensors, batch: int) -> torch.Tensor:
    return torch.cat([t.reshape(batch, -1) for t in tensors], dim=1)


def _split(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [part.reshape((flat.shape[0],) + tuple(s)) for part, s in zip(flat.split(sizes, dim=1), shapes)]


def dense_affine_map(function, input_shapes, output_shapes, chunk: int = DEFAULT_CHUNK,
                     label: str = "collapse") -> AffineMap:
    """W and B of `function` (list of batched float64 tensors -> tuple of batched tensors), per-sample shapes given."""
    input_shapes = tuple(tuple(s) for s in input_shapes)
    output_shapes = tuple(tuple(s) for s in output_shapes)
    n = sum(math.prod(s) for s in input_shapes)
    m = sum(math.prod(s) for s in output_shapes)

    def flat_function(x_flat: torch.Tensor) -> torch.Tensor:
        return _flat(function(*_split(x_flat, input_shapes)), x_flat.shape[0])

    with torch.no_grad():
        bias = flat_function(torch.zeros(1, n, dtype=torch.float64))[0]
    weight = torch.empty(m, n, dtype=torch.float64)
    reverse = m <= n
    total = m if reverse else n
    with progress(total, f"{label}: {'rows' if reverse else 'columns'} of W ({m}×{n})") as bar:
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            count = stop - start
            probes = torch.zeros(count, total, dtype=torch.float64)
            probes[torch.arange(count), torch.arange(start, stop)] = 1.0
            if reverse:
                x = torch.zeros(count, n, dtype=torch.float64, requires_grad=True)
                (grad,) = torch.autograd.grad(flat_function(x), x, grad_outputs=probes)
                weight[start:stop] = grad
            else:
                with torch.no_grad():
                    weight[:, start:stop] = (flat_function(probes) - bias).T
            bar.update(count)
    return AffineMap(weight.numpy(), bias.numpy(), input_shapes, output_shapes)


def verify_affine_map(function, affine: AffineMap, batch: int = 3, seed: int = 0) -> float:
    """Max |f(X) − (W·X + B)| / max(1, max|f(X)|) on a random batch: ~1e-15 for a true per-sample affine map."""
    generator = torch.Generator().manual_seed(seed)
    n = affine.weight.shape[1]
    x = torch.randn(batch, n, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        expected = _flat(function(*_split(x, affine.input_shapes)), batch)
    predicted = x @ torch.from_numpy(affine.weight).T + torch.from_numpy(affine.bias)
    scale = max(1.0, float(expected.abs().max()))
    return float((expected - predicted).abs().max()) / scale
