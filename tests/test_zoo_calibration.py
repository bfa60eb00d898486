"""The zoo's calibration (cnnc.zoo.branch_damping): BN statistics measured in eval mode in topological order, and
residual branches damped to BRANCH_RATIO of their skip; sums that are not residual are left with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnc.zoo.branch_damping import BRANCH_RATIO, calibrate_damped

SHAPE = (16, 4, 6, 6)


class Residual(nn.Module):
    """x + BN(conv(relu(BN(conv(x))))), then a ReLU: a ResNet basic block."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class MultiBranch(nn.Module):
    """MobileOne's sum as timm writes it: `out = 0`, then += each conv branch, then + an identity BN (optional)."""

    def __init__(self, channels: int = 4, identity: bool = True):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(3))
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(3))
        self.identity = nn.BatchNorm2d(channels) if identity else None
        self.drop = nn.Identity()

    def forward(self, x):
        out = 0
        for conv, norm in zip(self.convs, self.norms):
            out += norm(conv(x))
        out = self.drop(out)
        if self.identity is not None:
            out = out + self.identity(x)
        return torch.relu(out)


class ActivatedBranch(nn.Module):
    """x + relu(BN(conv(x))): damping the BN would not scale the branch exactly (the bias moves the ReLU's kink)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


def _build(cls, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), cls(**kwargs), cls(**kwargs))


def _inputs_of(module: nn.Module, kinds, x: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    seen = {}
    # the hook returns None (`and None`): a forward hook that returns a value replaces the output
    hooks = [m.register_forward_hook(lambda m, i, o: seen.setdefault(m, (i[0], o)) and None) for m in module.modules()
             if isinstance(m, kinds)]
    with torch.no_grad():
        module(x)
    for hook in hooks:
        hook.remove()
    return seen


def _calibration_batch(module: nn.Module, seed: int = 0) -> torch.Tensor:
    """The batch calibrate_damped draws: after one rand and one randn of num_features per BN."""
    generator = torch.Generator().manual_seed(seed)
    for norm in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        torch.rand(norm.num_features, generator=generator)
        torch.randn(norm.num_features, generator=generator)
    return torch.randn(*SHAPE, generator=generator)


def test_every_bn_normalises_what_reaches_it_in_eval_mode():
    module = _build(Residual)
    decisions = calibrate_damped(module, SHAPE, seed=0)
    assert not module.training and len(decisions) == 2
    x = _calibration_batch(module)
    for norm, (_, out) in _inputs_of(module, nn.BatchNorm2d, x).items():
        # per channel: mean β and standard deviation |γ| on the calibration batch (population statistics)
        torch.testing.assert_close(out.mean((0, 2, 3)), norm.bias, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.std((0, 2, 3), unbiased=False), norm.weight.abs(), atol=1e-3, rtol=1e-3)


def test_residual_branches_enter_their_sum_at_the_branch_ratio():
    module = _build(Residual)
    drawn = _build(Residual)
    decisions = calibrate_damped(module, SHAPE, seed=0)
    assert [d.branches for d in decisions] == [("3.bn2",), ("4.bn2",)]
    assert all(d.scale is not None and 0 < d.scale < 1 for d in decisions)
    x = _calibration_batch(module)
    blocks = _inputs_of(module, Residual, x)
    branches = _inputs_of(module, nn.BatchNorm2d, x)
    for block, decision in zip((module[3], module[4]), decisions):
        skip = blocks[block][0]
        branch = branches[block.bn2][1]
        assert float(branch.std() / skip.std()) == pytest.approx(BRANCH_RATIO, rel=1e-4)
    # γ and β of the branch's last BN were scaled together; the first BN of each branch was not damped
    calibrate_damped(drawn, SHAPE, seed=0, ratio=1e9)  # same draws; a huge ratio scales by a different factor
    assert not torch.equal(module[3].bn2.weight, drawn[3].bn2.weight)
    torch.testing.assert_close(module[3].bn1.weight, drawn[3].bn1.weight)


def test_multi_branch_sums_damp_the_conv_branches_and_keep_the_identity_bn():
    module = _build(MultiBranch)
    decisions = calibrate_damped(module, SHAPE, seed=0)
    assert [d.branches for d in decisions] == [("3.norms.0", "3.norms.1", "3.norms.2"),
                                               ("4.norms.0", "4.norms.1", "4.norms.2")]
    x = _calibration_batch(module)
    outputs = _inputs_of(module, nn.BatchNorm2d, x)
    block = module[3]
    branch_sum = sum(outputs[norm][1] for norm in block.norms)
    assert float(branch_sum.std() / outputs[block.identity][1].std()) == pytest.approx(BRANCH_RATIO, rel=1e-4)


def test_sums_that_are_not_residual_are_left_with_the_reason():
    module = _build(MultiBranch, identity=False)
    decisions = calibrate_damped(module, SHAPE, seed=0)
    assert all(d.scale is None and "operands are 2-op paths" in d.why and "no skip" in d.why for d in decisions)
    module = _build(ActivatedBranch)
    decisions = calibrate_damped(module, SHAPE, seed=0)
    assert all(d.scale is None and "does not end in a BN" in d.why for d in decisions)


def test_calibration_is_seeded():
    first, again, other = _build(Residual), _build(Residual), _build(Residual)
    calibrate_damped(first, SHAPE, seed=3)
    calibrate_damped(again, SHAPE, seed=3)
    calibrate_damped(other, SHAPE, seed=4)
    for (key, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), key
    assert not torch.equal(first[3].bn2.weight, other[3].bn2.weight)


class Doubled(nn.Module):
    """h + h: one value read twice by one sum, then by a later sum as its skip."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(SHAPE[1], 4, 3, padding=1), nn.BatchNorm2d(4)
        self.branch, self.branch_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        doubled = h + h
        return doubled + self.branch_bn(self.branch(doubled))


def test_a_sum_that_reads_one_value_twice_is_calibrated():
    module = Doubled()
    decisions = calibrate_damped(module, SHAPE, seed=0)
    assert [d.scale is None for d in decisions] == [True, False]  # h + h has no skip; the later sum is residual
    assert "no skip" in decisions[0].why
