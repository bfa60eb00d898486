"""cnnc from Python, end to end: compile a torch module, check the proof, save, and time it.

    python examples/quickstart.py

A RepVGG-style block stack (cnnc.zoo.blocks.RepVGGBlock: 3×3+BN, 1×1+BN and identity-BN branches summed before
each ReLU) with a pooled linear head: fold-bn folds every BN, collapse merges each block's branches into one 3×3
conv (its cost model keeps the pooled head, which is already cheaper than a dense map), and the result is proven
equivalent on seeded inputs before anything is written.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

import cnnc
from cnnc.runtime.bench import bench_models
from cnnc.zoo.blocks import RepVGGBlock


def main() -> None:
    torch.manual_seed(0)
    blocks = [RepVGGBlock(3, 16, 2), RepVGGBlock(16, 16, 1), RepVGGBlock(16, 32, 2), RepVGGBlock(32, 32, 1)]
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    example = torch.randn(1, 3, 64, 48)

    result = cnnc.compile(model, passes="fold-bn,collapse", example_input=example)
    print("before:", result.report["before"]["ops"])
    print("after: ", result.report["after"]["ops"])
    print("check: ", result.report["equivalence"]["summary"])
    for record in result.report["passes"]:
        for line in record["applied"]:
            print(f"  {record['pass']}: {line}")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.cnnc.onnx"
        result.save(path)
        print("saved", path.stat().st_size, "bytes")

    timing = bench_models([result.original, result.model], ["original", "compiled"], batch=[1, 8], provider="auto",
                          duration=2.0)
    for comparison in timing["comparisons"]:
        original, compiled = comparison["models"]
        print(f"batch {comparison['batch']}: original p50 {original['stats']['p50_ms']:.3f} ms, compiled "
              f"{compiled['stats']['p50_ms']:.3f} ms on {compiled['provider']}")


if __name__ == "__main__":
    main()
