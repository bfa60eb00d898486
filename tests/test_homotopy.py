"""cnnc.homotopy: join detection (fx, torchvision-style blocks, Residual, untraceable models), the join formula,
shared and per-join t, schedules, the callback API, and export at t = 0 with the zero multiplier baked in."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from helpers import run_model
from torch import nn

from cnnc import ir
from cnnc.analysis.residual_blocks import find_residual_blocks
from cnnc.homotopy import (
    PAPER_SCHEDULE_FROM_0_5,
    PAPER_SCHEDULE_FROM_0_9,
    AccuracyStepSchedule,
    CosineSchedule,
    HomotopyCallback,
    HomotopyJoin,
    LinearSchedule,
    ListSchedule,
    Residual,
    SkipHomotopy,
)
from cnnc.io.frontend import from_torch
from cnnc.ir.canonicalize import canonicalize
from cnnc.zoo import draw_batchnorm_statistics
from cnnc.zoo.resnets import BasicBlock, Bottleneck, projection


# cnnc.zoo.resnets' BasicBlock and Bottleneck are torchvision's (same attributes, same join), plus `with_skip`, which a
# reference copy turns off to give the skip-free network the homotopy reaches at t = 0.
class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2, projection(8, 16, 2)))
        self.layer2 = nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 8, 2, projection(16, 32, 2)))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomise_bn(model):
    return draw_batchnorm_statistics(model, 0, affine=False)


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return _randomise_bn(TinyResNet()).eval(), torch.randn(2, 1, 11, 9)


def _without_skips(model):
    reference = copy.deepcopy(model)
    for block in reference.modules():
        if hasattr(block, "with_skip"):
            block.with_skip = False
    return reference


# ----------------------------------------------------------------------------------------------- detection


def test_fx_finds_torchvision_style_joins_and_tells_branch_from_shortcut(resnet):
    model, x = resnet
    homotopy = SkipHomotopy.wrap(model, t=0.5, example_input=x)
    assert len(homotopy.joins) == 4 and homotopy.skipped == []
    seen = []
    # Clones: the block's ReLU(inplace=True) overwrites the join's output right after the hook.
    hooks = [join.register_forward_hook(lambda m, args, out: seen.append(([a.clone() for a in args], out.clone())))
             for join in homotopy.joins.values()]
    with torch.no_grad():
        homotopy.model(x)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4
    for (branch, skip), out in seen:
        torch.testing.assert_close(out, 0.5 * branch + 0.5 * skip)
    # Which operand is the shortcut: at t = 1 every block passes only its shortcut (then its final Relu).
    homotopy.set_t(1.0)

    def shortcut_only(net, inp):
        h = net.stem(inp)
        for block in list(net.layer1) + list(net.layer2):
            h = torch.relu(h if block.downsample is None else block.downsample(h))
        return net.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))

    with torch.no_grad():
        torch.testing.assert_close(homotopy.model(x), shortcut_only(model, x))


def test_wrapping_with_an_example_input_leaves_batchnorm_statistics_alone(resnet):
    model, x = resnet
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    homotopy = SkipHomotopy.wrap(model, t=0.5, example_input=x * 10)
    assert homotopy.model.training and model.layer1[0].bn1.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_at_t_zero_the_wrapped_model_is_the_network_without_skips(resnet):
    model, x = resnet
    reference = _without_skips(model)
    homotopy = SkipHomotopy.wrap(model, t=0.0)
    with torch.no_grad():
        torch.testing.assert_close(homotopy.model(x), reference(x))
        homotopy.set_t(0.3)
        assert not torch.allclose(homotopy.model(x), reference(x))


def test_t_is_a_buffer_not_a_parameter_and_parameters_are_shared(resnet):
    model, _ = resnet
    homotopy = SkipHomotopy.wrap(model, t=0.5)
    names = [name for name, _ in homotopy.model.named_parameters()]
    assert not any(name.endswith(".t") or name == "t" for name in names)
    assert {id(p) for p in homotopy.model.parameters()} == {id(p) for p in model.parameters()}
    assert all(not join.t.requires_grad for join in homotopy.joins.values())


def test_functional_adds_in_both_orders_and_non_joins():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
            self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

        def forward(self, x):
            y = torch.add(x, torch.relu(self.a(x)))          # identity skip, input first
            z = y + self.bias                                  # a bias, not a join
            w = self.b(z) + self.c(z)                          # two branches of equal length: ambiguous
            return w + torch.relu(self.a(w)).sum() * 0 + w.size(1)  # arithmetic on numbers, not joins

    homotopy = SkipHomotopy.wrap(Net(), t=0.25, example_input=torch.randn(1, 3, 5, 5))
    assert len(homotopy.joins) == 1
    reasons = " | ".join(why for _, why in homotopy.skipped)
    assert "parameter" in reasons and "cannot tell branch from shortcut" in reasons


def test_cnnc_residual_module_is_wrapped_in_place_with_post_activation():
    branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    shortcut = nn.Conv2d(4, 4, 1)
    block = Residual(branch, shortcut, post=nn.ReLU())
    model = nn.Sequential(nn.Conv2d(2, 4, 1), block)
    x = torch.randn(2, 2, 6, 5)
    homotopy = SkipHomotopy.wrap(model, t=0.2)
    assert homotopy.model is model and list(homotopy.joins) == ["1.join"]
    assert isinstance(block.join, HomotopyJoin)
    with torch.no_grad():
        h = model[0](x)
        torch.testing.assert_close(model(x), torch.relu(0.8 * branch(h) + 0.2 * shortcut(h)))
    again = SkipHomotopy.wrap(model, t=0.5)  # already wrapped: nothing new
    assert again.joins == {}


def test_residual_with_raw_residual_add_inside_its_branch():
    inner = nn.Sequential(BasicBlock(4, 4), nn.Conv2d(4, 4, 1))
    model = nn.Sequential(Residual(inner))
    homotopy = SkipHomotopy.wrap(model, t=0.5)
    assert sorted(homotopy.joins) == ["0.branch.homotopy_join_0", "0.join"]


def test_untraceable_model_is_searched_child_by_child():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = BasicBlock(4, 4)
            self.second = nn.Sequential(BasicBlock(4, 8, 2, projection(4, 8, 2)), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this model as a whole
                x = -x
            return self.second(self.first(x))

    model = _randomise_bn(Untraceable()).eval()
    x = torch.randn(1, 4, 6, 6)
    homotopy = SkipHomotopy.wrap(model, t=0.0, shared=False)
    assert homotopy.model is model and sorted(homotopy.joins) == ["first.homotopy_join_0", "second.homotopy_join_0"]
    assert isinstance(model.second, torch.fx.GraphModule)  # the traceable child was traced and replaced
    with torch.no_grad():
        torch.testing.assert_close(model(x), _without_skips(model)(x))


# ------------------------------------------------------------------------------------------ reading and setting t


def test_shared_and_per_join_t(resnet):
    model, _ = resnet
    shared = SkipHomotopy.wrap(copy.deepcopy(model), t=0.7)
    assert shared.t == pytest.approx(0.7)
    assert len({id(join.t) for join in shared.joins.values()}) == 1
    shared.set_t(0.25)
    assert all(v == 0.25 for v in shared.t_per_join().values())
    with pytest.raises(ValueError, match="shares one t"):
        shared.set_t({name: i / 10 for i, name in enumerate(shared.joins)})
    per_join = SkipHomotopy.wrap(copy.deepcopy(model), t=0.5, shared=False)
    names = list(per_join.joins)
    per_join.set_t({names[0]: 0.0, names[1]: 0.125})
    assert per_join.t == {names[0]: 0.0, names[1]: 0.125, names[2]: 0.5, names[3]: 0.5}
    with pytest.raises(ValueError, match="outside"):
        per_join.set_t(1.5)
    with pytest.raises(KeyError):
        per_join.set_t({"nope": 0.1})


# ----------------------------------------------------------------------------------------------- schedules


def test_paper_schedules():
    assert PAPER_SCHEDULE_FROM_0_9 == (0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.025, 0.01, 0.0)
    assert PAPER_SCHEDULE_FROM_0_5 == (0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.025, 0.01, 0.005, 0.0)
    schedule = ListSchedule(PAPER_SCHEDULE_FROM_0_9)
    assert [schedule.at(e) for e in range(10)] == list(PAPER_SCHEDULE_FROM_0_9)
    assert schedule.at(25) == 0.0 and schedule.at(3, 0.9) == 0.3  # per epoch: the fraction is ignored
    for values in (PAPER_SCHEDULE_FROM_0_9, PAPER_SCHEDULE_FROM_0_5):
        assert all(a > b for a, b in itertools.pairwise(values))


def test_linear_and_cosine_schedules_reach_exactly_zero():
    linear, cosine = LinearSchedule(0.8, epochs=5), CosineSchedule(0.8, epochs=5)
    assert [linear.at(e) for e in range(5)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    assert linear.at(4) == 0.0 and cosine.at(4) == 0.0 and linear.at(9) == 0.0
    assert cosine.at(0) == pytest.approx(0.8) and cosine.at(2) == pytest.approx(0.4)
    assert cosine.at(1) == pytest.approx(0.4 * (1 + math.cos(math.pi / 4)))
    assert linear.at(1, 0.5) == pytest.approx(0.5)  # per step: halfway through epoch 1
    steps = [cosine.at(e, s / 7) for e in range(5) for s in range(7)]
    assert all(a >= b for a, b in itertools.pairwise(steps)) and steps[-1] == 0.0
    assert LinearSchedule(0.5, epochs=1).at(0) == 0.0


def test_accuracy_step_schedule():
    schedule = AccuracyStepSchedule(values=(0.9, 0.5, 0.1, 0.0), thresholds=(0.5, 0.8, 0.9), zero_from_epoch=6)
    seen = []
    for epoch, accuracy in enumerate([0.3, 0.95, 0.95, 0.7, 0.85, 0.99]):
        seen.append(schedule.at(epoch))
        schedule.observe(epoch, accuracy)
    # One step per epoch at most, only when the threshold of the current level is reached.
    assert seen == [0.9, 0.9, 0.5, 0.1, 0.1, 0.1] and schedule.level == 3
    stuck = AccuracyStepSchedule(values=(0.9, 0.5), thresholds=(0.99,), zero_from_epoch=6)
    stuck.observe(0, 0.5)
    assert stuck.at(5) == 0.9 and stuck.at(6) == 0.0  # the fixed budget still ends without skips
    with pytest.raises(ValueError):
        AccuracyStepSchedule(values=(0.9, 0.0), thresholds=(0.5, 0.6))


# ------------------------------------------------------------------------------------------------ callback


def test_callback_drives_any_training_loop(resnet):
    model, x = resnet
    homotopy = SkipHomotopy.wrap(model, t=0.9)
    callback = HomotopyCallback(homotopy, LinearSchedule(0.9, epochs=3))
    trained = homotopy.model.train()
    optimiser = torch.optim.SGD(trained.parameters(), lr=0.01)
    targets = torch.tensor([1, 3])
    for epoch in range(3):
        for step in range(2):
            t = callback.on_step(epoch, step, steps_per_epoch=2)
            assert float(next(iter(homotopy.joins.values())).t) == pytest.approx(t)
            optimiser.zero_grad()
            nn.functional.cross_entropy(trained(x), targets).backward()
            optimiser.step()
        callback.on_validation_end(epoch, accuracy=0.5)
    assert [round(t, 6) for _, _, t in callback.history] == [0.9, 0.675, 0.45, 0.225, 0.0, 0.0]
    assert callback.t == 0.0

    homotopy.set_t(0.5)
    accuracy_driven = HomotopyCallback(homotopy, AccuracyStepSchedule((0.5, 0.0), (0.8,)))
    assert accuracy_driven.on_epoch_start(0) == 0.5
    accuracy_driven.on_validation_end(0, accuracy=0.81)
    assert accuracy_driven.on_epoch_start(1) == 0.0 and homotopy.t == 0.0


# -------------------------------------------------------------------------------------------------- export


def _mul_by_zero_count(model) -> int:
    graph = canonicalize(gs.import_onnx(model))
    count = 0
    for node in graph.nodes:
        if node.op == "Mul":
            values = [ir.constant_value(t) for t in node.inputs]
            count += any(v is not None and v.size and not np.any(v) for v in values)
    return count


def test_export_at_zero_bakes_the_zero_multiplier_and_restores_t(resnet):
    model, x = resnet
    homotopy = SkipHomotopy.wrap(model, t=0.3)
    exported = homotopy.export(x, t=0.0)
    assert _mul_by_zero_count(exported) == 4  # one Mul(t=0, S) per join, t a constant, not an input
    assert [i.name for i in exported.graph.input] == ["input"]
    assert homotopy.t == pytest.approx(0.3)
    homotopy.set_t(0.0)
    with torch.no_grad():
        expected = homotopy.model(x).numpy()
    np.testing.assert_allclose(run_model(exported, {"input": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)
    at_small_t = homotopy.export(x, t=0.01)
    assert _mul_by_zero_count(at_small_t) == 0


# ------------------------------------------------------------------------------ one join rule for fx and ONNX


class _MixedJoins(nn.Module):
    """An identity join, a projection join (1x1 conv + BN), a skip through a ReLU and two equal branches."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.down = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1))
        self.projection = projection(4, 8, 2)
        self.relu_skip = nn.Conv2d(8, 8, 1)
        self.long = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.left, self.right = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.branch(x))                          # identity skip
        x = torch.relu(self.down(x) + self.projection(x))           # projection skip: conv + BN
        x = self.long(x) + torch.relu(self.relu_skip(x))            # the shorter path has a ReLU: not a join
        return self.left(x) + self.right(x)                         # equal branches: not a join


def test_fx_and_onnx_classify_the_same_joins_with_one_rule():
    torch.manual_seed(0)
    model = _randomise_bn(_MixedJoins()).eval()
    x = torch.randn(1, 1, 8, 8)
    onnx_model = from_torch(copy.deepcopy(model), x)
    homotopy = SkipHomotopy.wrap(model, t=0.5, example_input=x)
    blocks, refused = find_residual_blocks(gs.import_onnx(onnx_model))

    assert len(homotopy.joins) == len(blocks) == 2
    assert [b.kind for b in blocks] == ["identity", "projection"]
    fx_reasons, onnx_reasons = [why for _, why in homotopy.skipped], [why for _, why in refused]
    assert len(fx_reasons) == len(onnx_reasons) == 2
    for reasons in (fx_reasons, onnx_reasons):
        assert "nonlinear Relu" in reasons[0] and "not a projection shortcut" in reasons[0]
        assert "cannot tell branch from shortcut" in reasons[1]
