"""cnnc.homotopy's activation homotopy: sites, t, export at t = 0 without the activation, pad-once chains that
collapse into one conv (stride 2, depthwise → 1×1), composition with SkipHomotopy, and the plan."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_model
from torch import nn

import cnnc
from cnnc.homotopy import (
    ActivationHomotopy,
    HomotopyCallback,
    LinearSchedule,
    ListSchedule,
    SkipHomotopy,
    plan,
)
from cnnc.homotopy.pad_once import crop_border
from cnnc.io.frontend import from_torch
from cnnc.ir.stats import model_stats
from cnnc.zoo.resnets import BasicBlock

ACTIVATION_OPS = {"Relu", "Clip", "LeakyRelu", "Gelu", "Sigmoid", "HardSwish", "Erf", "Mul", "Div", "Tanh", "Pow"}


def _ops(model) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def _three_convs(activation=nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), activation(),
                          nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), activation(), nn.Conv2d(16, 4, 3, 1, 1))
    for module in model.modules():  # non-trivial BN statistics, so that folding them is tested
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def _compiled_ops(homotopy, x, passes=None):
    exported = homotopy.export(x, t=0.0)
    result = cnnc.compile(exported, passes=passes) if passes else cnnc.compile(exported)
    assert result.report["equivalence"]["passed"], result.report["equivalence"]["summary"]
    return exported, result


def test_three_conv_chain_wrapped_everywhere_compiles_to_one_conv():
    model, x = _three_convs(), torch.randn(2, 3, 12, 12)
    homotopy = ActivationHomotopy.wrap(model)
    assert len(homotopy.sites) == 2 and homotopy.t == 1.0
    # Pad-once: the first conv pads 1 + 1 + 1, the inner convs 0; the output keeps its size.
    assert [(c.old, c.new) for c in homotopy.pad_changes] == [((1, 1), (3, 3)), ((1, 1), (0, 0)), ((1, 1), (0, 0))]
    assert homotopy.model(x).shape == (2, 4, 12, 12)
    exported, result = _compiled_ops(homotopy, x)
    assert not set(_ops(exported)) & ACTIVATION_OPS  # t = 0: nothing left where the activations were
    assert _ops(result.model) == {"Conv": 1}
    conv = result.model.graph.node[0]
    assert next(a.ints for a in conv.attribute if a.name == "kernel_shape") == [7, 7]
    assert result.report["before"]["depth"] == 3 and result.report["after"]["depth"] == 1
    with torch.no_grad():  # the compiled conv is the trained model at t = 0
        homotopy.set_t(0.0)
        expected = homotopy.model(x).numpy()
    got = run_model(result.model, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.ReLU6, lambda: nn.LeakyReLU(0.2), nn.GELU, nn.SiLU,
                                        nn.Hardswish, lambda: nn.ReLU(inplace=True)])
def test_every_activation_module_is_a_site(activation):
    model, x = _three_convs(activation), torch.randn(1, 3, 8, 8)
    homotopy = ActivationHomotopy.wrap(model, pad_once=False)
    assert len(homotopy.sites) == 2
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(homotopy.model(x), reference)  # t = 1 is the model as written
        homotopy.set_t(0.0)
        linear = homotopy.model(x)
        homotopy.set_t(0.25)
        mixed = homotopy.model(x)
    assert not torch.allclose(linear, reference) and not torch.allclose(mixed, reference)
    assert not set(_ops(homotopy.export(x, t=0.0))) & ACTIVATION_OPS
    assert homotopy.t == 0.25  # export restores t


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(7))

    def forward(self, x):
        x = F.relu(self.convs[0](x))
        x = torch.relu(self.convs[1](x))
        x = self.convs[2](x).relu()
        x = F.relu6(self.convs[3](x))
        x = F.leaky_relu(self.convs[4](x), 0.3)
        x = F.gelu(self.convs[5](x), approximate="tanh")
        return F.hardswish(F.silu(self.convs[6](x)))


def test_functional_activations_are_sites_and_a_wrap_at_t_1_is_exact():
    model, x = _Functional().eval(), torch.randn(2, 4, 5, 5)
    homotopy = ActivationHomotopy.wrap(model, t=1.0)
    assert len(homotopy.sites) == 8
    with torch.no_grad():
        assert torch.allclose(homotopy.model(x), model(x), atol=1e-6)
    assert _ops(homotopy.export(x, t=0.0)) == {"Conv": 7}


def test_set_t_sites_and_per_site_t():
    model = _three_convs()
    homotopy = ActivationHomotopy.wrap(model, sites=["_5"], shared=False)
    assert homotopy.sites == ["_5"] and len(homotopy.links) == 1
    assert [c.conv for c in homotopy.pad_changes] == ["3", "6"]  # only the wrapped link's convs
    homotopy.set_t({"_5": 0.5})
    assert homotopy.t == 0.5
    with pytest.raises(KeyError):
        homotopy.set_t({"nope": 0.1})
    with pytest.raises(ValueError, match="outside"):
        homotopy.set_t(1.5)
    with pytest.raises(KeyError, match="no such activation sites"):
        ActivationHomotopy.wrap(_three_convs(), sites=["missing"])
    shared = ActivationHomotopy.wrap(_three_convs())
    with pytest.raises(ValueError, match="shares one t"):
        shared.set_t({"_2": 0.0, "_5": 0.5})


def test_stride_2_chain_composes_into_one_conv():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 8, 3, 1, 1)).eval()
    x = torch.randn(1, 3, 13, 13)
    homotopy = ActivationHomotopy.wrap(model)
    assert [(c.old, c.new) for c in homotopy.pad_changes] == [((1, 1), (3, 3)), ((1, 1), (0, 0))]  # p1 + s1·p2
    _, result = _compiled_ops(homotopy, x)
    assert _ops(result.model) == {"Conv": 1}
    attributes = {a.name: list(a.ints) for a in result.model.graph.node[0].attribute if a.ints}
    assert attributes["kernel_shape"] == [7, 7] and attributes["strides"] == [2, 2]  # k1 + (k2 − 1)·s1


def test_depthwise_then_1x1_composes_into_a_dense_conv_and_says_it_costs_more():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.Hardswish(),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 8, 10, 10)
    decision = plan(model, x).decisions["_2"]
    assert decision.startswith("not chosen") and "dense conv: more MACs" in decision
    homotopy = ActivationHomotopy.wrap(model)
    _, kept = _compiled_ops(homotopy, x)  # the default pipeline keeps the cheaper pair
    assert _ops(kept.model) == {"Conv": 2}
    _, forced = _compiled_ops(homotopy, x, passes="fold-bn,collapse{conv=force}")
    assert _ops(forced.model) == {"Conv": 1}
    group = next(a.i for a in forced.model.graph.node[0].attribute if a.name == "group")
    assert group == 1


def test_inverted_residual_chain_merges_and_is_chosen():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 48, 1), nn.BatchNorm2d(48), nn.ReLU6(), nn.Conv2d(48, 48, 3, 1, 1, groups=48),
                          nn.BatchNorm2d(48), nn.ReLU6(), nn.Conv2d(48, 8, 1)).eval()
    x = torch.randn(1, 8, 10, 10)
    chosen = plan(model, x)
    assert chosen.sites == ["_2", "_5"] and chosen.estimated_speedup > 1.5
    _, result = _compiled_ops(ActivationHomotopy.wrap(model, sites=chosen.sites), x)
    assert _ops(result.model) == {"Conv": 1}


def test_plan_refuses_two_3x3_at_equal_width_and_is_json():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
    x = torch.randn(1, 32, 8, 8)
    result = plan(model, x)
    assert result.sites == [] and result.all_sites == ["_2", "_4"]
    assert "5x5" in result.decisions["_2"] and "loses" in result.decisions["_2"]
    assert "not a pad-once chain site" in result.decisions["_4"]
    restored = json.loads(json.dumps(result.as_dict()))
    assert restored["sites"] == [] and restored["estimated_speedup"] == pytest.approx(1.0)
    assert "_2" in result.table()
    # A loss on MACs (25/18) that removes a kernel is timed when a measure is given (tests/test_plan.py): slower, kept
    assert plan(model, x, measure=lambda a, b: (1.0, 1.2)).sites == []
    with pytest.raises(ValueError):
        plan(model, x, max_sites=1, target_speedup=2.0)


def test_plan_budgets_max_sites_and_target():
    model, x = _three_convs(), torch.randn(1, 3, 12, 12)
    assert len(plan(model, x, max_sites=0).sites) == 0
    assert len(plan(model, x).sites) == 2
    assert plan(model, x, target_speedup=100.0).budget.endswith("(not reachable: the cheapest plan)")


def test_composes_with_skip_homotopy_under_one_callback():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), BasicBlock(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    x = torch.randn(2, 3, 8, 8)
    skips = SkipHomotopy.wrap(model, t=0.5, example_input=x)
    activations = ActivationHomotopy.wrap(skips.model)
    assert len(skips.joins) == 1 and len(activations.sites) == 2  # BasicBlock calls one ReLU twice: two sites
    again = SkipHomotopy.wrap(activations.model, t=0.5)  # sites are opaque to the join finder and vice versa
    assert len(again.joins) == 0
    callback = HomotopyCallback([skips, activations], [ListSchedule((0.5, 0.0)), LinearSchedule(1.0, epochs=3)])
    assert callback.on_epoch_start(0) == (0.5, 1.0)
    assert callback.on_epoch_start(2) == (0.0, 0.0) and callback.t == [0.0, 0.0]
    with pytest.raises(ValueError, match="schedules"):
        HomotopyCallback([skips, activations], [ListSchedule((0.0,))])
    activations.model.eval()
    result = cnnc.compile(activations.export(x, t=0.0))
    assert result.report["equivalence"]["passed"]
    # No skip, no activation: the whole network is linear and collapses (Theorem 3.1's end point).
    assert set(_ops(result.model)) <= {"Gemm", "Flatten", "Conv", "Reshape"} and result.report["after"]["depth"] <= 2


def test_depth_counts_the_longest_conv_path():
    stats = model_stats(from_torch(_three_convs(), torch.randn(1, 3, 8, 8)))
    assert stats["depth"] == 3


def test_a_stem_read_by_an_identity_skip_is_a_link_when_the_skip_goes():
    # The ResNet stem's activation feeds the first block's conv and its identity skip. The skip homotopy removes that
    # read at t = 0, so the plan counts the link; pad-once gives the skip a centre crop of the padded stem output.
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), BasicBlock(8, 8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.randn(2, 1, 10, 10)
    skips = SkipHomotopy.wrap(model, t=0.5, example_input=x)
    chosen = plan(skips.model, x)
    assert chosen.sites == ["_2", "_3_relu"] and "7x7/1 conv" in chosen.decisions["_2"]
    activations = ActivationHomotopy.wrap(skips.model, sites=chosen.sites)
    assert [(c.conv, c.new) for c in activations.pad_changes] == [("0", (3, 3)), ("3.conv1", (0, 0)),
                                                                   ("3.conv2", (0, 0))]
    crops = [n for n in activations.model.graph.nodes if n.target is crop_border]
    assert len(crops) == 1 and crops[0].args[1] == (2, 2)  # e_0 = s_2·e_2 + p_2 + ... = 1 + 1
    assert activations.model(x).shape == (2, 10)  # the skip still reads a 10x10 map
    # The crop is exact: the centre of the padded conv output is the old conv output.
    weight = torch.randn(8, 1, 3, 3)
    np.testing.assert_allclose(crop_border(F.conv2d(x, weight, padding=3), (2, 2)), F.conv2d(x, weight, padding=1),
                               rtol=1e-6, atol=1e-6)
    skips.set_t(0.0)
    activations.model.eval()
    _, result = _compiled_ops(activations, x)
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 and next(a.ints for a in convs[0].attribute if a.name == "kernel_shape") == [7, 7]
    assert result.report["after"]["depth"] == 2  # the merged conv and the head


def test_plan_without_the_skip_homotopy_refuses_the_stem_read_twice():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), BasicBlock(8, 8)).eval()
    result = plan(model, torch.randn(1, 1, 10, 10))
    assert "_2" not in result.sites and "read 2 times" in result.decisions["_2"]
