"""cnnc.homotopy.plan's measurement rule (a merge the cost model cannot settle is timed, at every planned batch
size, and kept only when faster at all) and chains through residual joins and projected shortcuts (pad_once)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import torch
from helpers import run_model
from torch import nn

import cnnc
from cnnc.homotopy import ActivationHomotopy, SkipHomotopy, plan
from cnnc.homotopy.pad_once import crop_border, fit_to
from cnnc.zoo.resnets import BasicBlock


def _two_3x3(width: int = 32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 8 * 8, 10))
    return model.eval(), torch.randn(1, width, 8, 8)


class FakeMeasure:
    """(apart, merged) seconds from a fixed ratio per batch size; records the batch sizes it was asked about."""

    def __init__(self, ratios: dict[int, float]):
        self.ratios, self.batches = ratios, []

    def __call__(self, apart: onnx.ModelProto, merged: onnx.ModelProto) -> tuple[float, float]:
        batch = apart.graph.input[0].type.tensor_type.shape.dim[0].dim_value
        assert merged.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
        assert Counter(n.op_type for n in apart.graph.node)["Conv"] == 2
        assert Counter(n.op_type for n in merged.graph.node)["Conv"] == 1
        self.batches.append(batch)
        return 1.0, self.ratios[batch]


def test_a_mac_loss_that_measures_faster_is_chosen():
    model, x = _two_3x3()
    assert plan(model, x).sites == []  # 5x5 = 25/18 of the MACs: the cost model alone refuses it
    measure = FakeMeasure({1: 0.8, 64: 0.9})
    chosen = plan(model, x, measure=measure, batch=(1, 64))
    assert measure.batches == [1, 64]  # timed at each planned batch size, built at that batch
    assert chosen.sites == ["_2"]
    segment = chosen.segments[0]
    assert segment["verdict"] == "loses" and segment["measured"] == {"batch 1": 0.8, "batch 64": 0.9}
    assert segment["measured_ratio"] == 0.9  # the worst batch
    assert "measured 0.80x the time at batch 1" in chosen.decisions["_2"]
    assert chosen.estimated_speedup > 1.0


def test_a_mac_loss_that_measures_slower_at_one_batch_is_not_chosen():
    model, x = _two_3x3()
    chosen = plan(model, x, measure=FakeMeasure({1: 0.7, 64: 1.3}), batch=(1, 64))
    assert chosen.sites == []
    assert chosen.decisions["_2"].startswith("not chosen (not measured faster by 5 % at every batch)")
    assert plan(model, x, measure=FakeMeasure({1: 1.1})).sites == []
    assert plan(model, x, measure=FakeMeasure({1: 0.98})).sites == []  # within timing noise (MEASURE_MARGIN)


def test_a_large_mac_loss_is_not_timed():
    # depthwise 3x3 -> 1x1 becomes one dense 3x3: 5.8x the MACs, beyond MEASURE_MAC_GROWTH: never timed or chosen.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU(), nn.Conv2d(16, 16, 1)).eval()
    measure = FakeMeasure({1: 0.1})
    chosen = plan(model, torch.randn(1, 16, 8, 8), measure=measure)
    assert measure.batches == [] and chosen.sites == []
    assert "not timed: it loses by the cost model" in chosen.decisions["_1"]


class _TinyResNet(nn.Module):
    """stem, an identity block, a projection block (stride 2), head: the example's ResNet in small."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.layers = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2, downsample))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_chain_runs_through_joins_and_projected_shortcuts_and_compiles_exactly():
    torch.manual_seed(7)
    model = _TinyResNet().eval()
    x = torch.randn(2, 1, 12, 12)
    skips = SkipHomotopy.wrap(model, t=0.5, example_input=x)
    result = plan(skips.model, x, max_sites=0)
    # After the first block the ReLU reads the join (its branch at t = 0) and feeds the next block's conv1 and its
    # downsampling shortcut (gone at t = 0): both are chain links now, so the stem and both blocks are one chain.
    links = [s for s, why in result.decisions.items() if "not a pad-once chain site" not in why]
    assert links == ["stem_2", "layers_0_relu", "layers_0_relu_1", "layers_1_relu"]
    sites = ["stem_2", "layers_0_relu", "layers_0_relu_1"]
    activations = ActivationHomotopy.wrap(skips.model, sites=sites)
    fits = Counter(n.target.__name__ for n in activations.model.graph.nodes if n.target in (crop_border, fit_to))
    assert fits == {"crop_border": 1, "fit_to": 1}  # block 0's skip (stem output), block 1's projected skip
    assert activations.model(x).shape == (2, 10)  # training still runs with every skip fitted
    skips.set_t(0.0)
    activations.model.eval()
    compiled = cnnc.compile(activations.export(x, t=0.0))
    assert compiled.report["equivalence"]["passed"], compiled.report["equivalence"]["summary"]
    convs = [n for n in compiled.model.graph.node if n.op_type == "Conv"]
    kernels = [list(next(a.ints for a in c.attribute if a.name == "kernel_shape")) for c in convs]
    # stem + block 0 (two convs) + block 1's conv1 at stride 2 -> one 9x9/2 conv; block 1's conv2 stays.
    assert kernels == [[9, 9], [3, 3]] and compiled.report["after"]["depth"] == 3
    activations.set_t(0.0)
    with torch.no_grad():
        expected = activations.model(x).numpy()
    np.testing.assert_allclose(run_model(compiled.model, {"input": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_fit_to_crops_or_pads_to_the_centre():
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    assert torch.equal(fit_to(x, torch.zeros(1, 1, 4, 4)), x[..., 1:5, 1:5])
    assert fit_to(x, torch.zeros(1, 1, 5, 5)).shape == (1, 1, 5, 5)
    padded = fit_to(x, torch.zeros(1, 1, 8, 8))
    assert padded.shape == (1, 1, 8, 8) and torch.equal(padded[..., 1:7, 1:7], x) and padded[..., 0, :].abs().sum() == 0
    assert torch.equal(crop_border(x, (-1, -1)), padded)
