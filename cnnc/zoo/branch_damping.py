"""The zoo's calibration: every BatchNorm normalises what reaches it in eval mode, and residual branches enter their
sums damped, as in a trained network.

Why. `calibrate_batchnorm` (γ, β drawn, running statistics measured in training mode) keeps activations of order 1
where each BN sits, but two things stay unlike a trained network, and together they make the zoo's random
MobileNetV2 and MobileOne-S0 too ill-conditioned for float16 (a relative weight rounding of 2^-11 moved their logits
by 3-16 %; ResNet-18 by 0.3 %):

1. Statistics measured in training mode are those of an upstream normalised by *batch* statistics; in eval mode
   every BN upstream uses the running ones instead, and the mismatch compounds with depth: MobileOne-S0's features
   grew to 1e4 on N(0, 1) inputs.
2. A residual sum s = skip + Σ BN_j(branch_j) whose branches are each normalised to unit variance (γ ~ 1) adds
   branches as large as the skip, so no block is near the identity. Such a random net is chaotic: a perturbation
   (a rounding error) grows by ~1.3 per MobileNetV2 block relative to the signal (measured: ×220 from the first
   block to the logits), because each BN's mean subtraction removes part of the signal but none of the noise
   (Yang et al. 2019, "A mean field theory of batch normalization": ×sqrt(π/(π−1)) per ReLU layer). Trained
   residual networks are near the identity per block: BN itself biases them so (De & Smith 2020, "Batch
   normalization biases residual blocks towards the identity function"), and their initialisations are built that
   way: timm's `zero_init_last` and torchvision's `zero_init_residual` (γ = 0 on a branch's last BN), Fixup,
   SkipInit, ConvNeXt's layer scale 1e-6, and NF-Nets' branch scale α = 0.2 (Brock et al. 2021).

The rule (`calibrate_damped`), one pass over the network's torch.fx graph on one seeded N(0, 1) calibration batch,
in topological order, the same for every network:

- γ ~ U[0.5, 1.5) and β ~ 0.1·N(0, 1) per BN, drawn as `calibrate_batchnorm` draws them;
- at each BN, its running mean and (population) variance are set to those of the input it receives in eval mode,
  all BNs upstream already calibrated (LSUV's data-driven, layer-sequential spirit: Mishkin & Matas 2016), so on
  the calibration batch each BN's output has per-channel mean β and standard deviation |γ| exactly (up to eps);
- at each sum (a tree of adds flattened into its operands o_1..o_n): the operands reached from the sum's source x
  (their latest common ancestor, or an operand that is an ancestor of all others) through the fewest ops are the
  skip; the others, if each ends in a BN of its own (a plain BN, or timm's BatchNormAct with no activation, used
  by nothing else), are the branches. The branches' γ and β are multiplied by one factor α > 0 so that
  std(α·Σ branches) = `BRANCH_RATIO` · std(Σ skips) on the calibration batch (NF-Nets' α = 0.2). BN being affine,
  this scales the branches' outputs by exactly α, and everything downstream is calibrated after it.

A sum is left as it is, with the reason recorded, when its operands tie for fewest ops (a multi-branch conv such
as MobileOne's stride-2 blocks, not a residual block), or a branch does not end in a dampable BN (ConvNeXt's
branches end in its layer scale, already 1e-6 at initialisation; GhostNet's in a BatchNorm with ReLU).

The effect on float16 (the drift before and after, per model and size) is in cnnc.zoo.vision's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

_BatchNorm = nn.modules.batchnorm._BatchNorm
BRANCH_RATIO = 0.2  # std of a sum's damped branches / std of its skip: NF-Nets' α (Brock et al. 2021)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # linear, identity in eval


@dataclass(frozen=True)
class SumDecision:
    """One sum of the network: `where` (its root add), the BNs that end its damped `branches` and the factor
    applied to their γ and β (`scale`), or `why` it was left as it is (`scale` is None then)."""

    where: str
    branches: tuple[str, ...] = ()
    scale: float | None = None
    why: str = ""


class _NormLeafTracer(fx.Tracer):
    """torch.fx tracer that keeps every BatchNorm (timm's BatchNormAct subclasses included) one module call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _BatchNorm) or super().is_leaf_module(module, qualified_name)


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and getattr(node.target, "__name__", "") in ("add", "iadd")) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def _is_sum(node: fx.Node) -> bool:
    """An add of two tensors computed in the network (not `x + 0`, not an add with `alpha`)."""
    return _is_add(node) and len(node.args) == 2 and not node.kwargs and all(
        isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args)


class _Calibration(fx.Interpreter):
    """Runs the traced network once on the calibration batch, calibrating BNs and damping sums as it goes."""

    def __init__(self, traced: fx.GraphModule, ratio: float):
        super().__init__(traced)
        self.ratio = ratio
        self.modules_by_name = dict(traced.named_modules())
        nodes = list(traced.graph.nodes)
        sums = [n for n in nodes if _is_sum(n)]
        # An add that only feeds another add is inside that add's sum: the sum is decided once, at its root.
        self.inner = {a for a in sums if self._feeds_a_sum(a)}
        self.roots = {a: self._operands(a) for a in sums if a not in self.inner}
        self.ancestors: dict[fx.Node, set[fx.Node]] = {}
        for node in nodes:
            self.ancestors[node] = set().union(*(self.ancestors[p] | {p} for p in node.all_input_nodes))
        self.order = {node: index for index, node in enumerate(nodes)}
        # The interpreter frees a value after its last use, an inner add's included: a sum's operands are kept.
        self.operand_nodes = {o for operands in self.roots.values() for o in operands}
        # Each kept value is dropped after the last sum that reads it (sums in topological order).
        self.last_root = {o: root for root in sorted(self.roots, key=self.order.__getitem__) for o in self.roots[root]}
        self.kept: dict[fx.Node, torch.Tensor] = {}
        self.decisions: list[SumDecision] = []

    def run_node(self, node: fx.Node):
        if node.op == "call_module" and isinstance(self.modules_by_name[node.target], _BatchNorm):
            self._measure(self.modules_by_name[node.target], self.env[node.args[0]])
        value = self._damp(node, self.roots[node]) if node in self.roots else super().run_node(node)
        if node in self.operand_nodes:
            self.kept[node] = value
        return value

    def _pass_through_input(self, node: fx.Node) -> fx.Node | None:
        """The input of `node` when `node` computes its input unchanged in eval mode (nn.Identity, Dropout,
        `x + 0`: timm's MobileOne starts its sum at 0), else None."""
        if node.op == "call_module" and isinstance(self.modules_by_name[node.target], _PASS_THROUGH):
            return node.args[0]
        if _is_add(node) and len(node.args) == 2 and not node.kwargs:
            numbers = [a for a in node.args if isinstance(a, (int, float)) and a == 0]
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            if len(numbers) == 1 and len(tensors) == 1:
                return tensors[0]
        return None

    def _source(self, node: fx.Node) -> fx.Node:
        """`node` with the pass-throughs in front of it skipped."""
        while (earlier := self._pass_through_input(node)) is not None:
            node = earlier
        return node

    def _feeds_a_sum(self, node: fx.Node) -> bool:
        """`node` is used once, through pass-throughs each used once, by a sum."""
        while len(node.users) == 1:
            node = next(iter(node.users))
            if _is_sum(node):
                return True
            if self._pass_through_input(node) is None:
                return False
        return False

    def _operands(self, root: fx.Node) -> list[fx.Node]:
        """The operands of the sum `root`, its inner adds flattened, pass-throughs skipped."""
        operands = []
        for arg in root.args:
            source = self._source(arg)
            operands.extend(self._operands(source) if source in self.inner else [source])
        return operands

    @staticmethod
    def _measure(norm: _BatchNorm, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        norm.running_mean.copy_(x.mean(dims))
        norm.running_var.copy_(x.var(dims, unbiased=False))

    def _ending_norm(self, operand: fx.Node) -> tuple[str, _BatchNorm] | None:
        """The BN that `operand` is, when damping it scales `operand` exactly and nothing else."""
        if operand.op != "call_module" or not self._feeds_a_sum(operand):
            return None
        module = self.modules_by_name[operand.target]
        activation = getattr(module, "act", nn.Identity())
        if not isinstance(module, _BatchNorm) or not module.affine or not isinstance(activation, nn.Identity):
            return None
        return operand.target, module

    def _path_ops(self, source: fx.Node | None, operand: fx.Node) -> int:
        """Ops from `source` to `operand` (the operand's own op counted; 0 when `operand` is the source)."""
        if operand is source:
            return 0
        return 1 + sum(1 for a in self.ancestors[operand] if source in self.ancestors[a] and a.op != "get_attr")

    def _skips(self, operands: list[fx.Node]) -> list[fx.Node] | str:
        carried = [o for o in operands if all(o is p or o in self.ancestors[p] for p in operands)]
        if carried:
            source = carried[0]
        else:
            common = set.intersection(*(self.ancestors[o] for o in operands))
            common = {c for c in common if c.op != "get_attr"}
            if not common:
                return "its operands share no source"
            source = max(common, key=self.order.__getitem__)
        lengths = [self._path_ops(source, o) for o in operands]
        if min(lengths) == max(lengths):
            return f"all {len(operands)} operands are {lengths[0]}-op paths from '{source.name}': no skip"
        return [o for o, n in zip(operands, lengths) if n == min(lengths)]

    def _damp(self, root: fx.Node, operands: list[fx.Node]) -> torch.Tensor:
        values = [self.kept[o] for o in operands]  # `h + h` reads one kept value twice
        for operand in set(operands):
            if self.last_root[operand] is root:
                del self.kept[operand]
        total = sum(values[1:], values[0])
        skips = self._skips(operands)
        if isinstance(skips, str):
            self.decisions.append(SumDecision(root.name, why=skips))
            return total
        branches = [o for o in operands if o not in skips]
        norms = [self._ending_norm(o) for o in branches]
        if any(n is None for n in norms):
            self.decisions.append(SumDecision(root.name, why="a branch does not end in a BN it alone uses, with "
                                                             "no activation"))
            return total
        skip_value = sum(values[operands.index(s)] for s in skips)
        branch_value = sum(values[operands.index(b)] for b in branches)
        branch_std, skip_std = float(branch_value.double().std()), float(skip_value.double().std())
        if branch_std == 0.0 or skip_std == 0.0:
            self.decisions.append(SumDecision(root.name, why="its branches or its skip are constant on the "
                                                             "calibration batch"))
            return total
        scale = self.ratio * skip_std / branch_std
        for _, norm in norms:
            norm.weight.mul_(scale)
            norm.bias.mul_(scale)
        self.decisions.append(SumDecision(root.name, tuple(name for name, _ in norms), scale))
        return skip_value + scale * branch_value


@torch.no_grad()
def calibrate_damped(module: nn.Module, input_shape: tuple[int, ...], seed: int,
                     ratio: float = BRANCH_RATIO) -> list[SumDecision]:
    """Draw γ, β; calibrate every BN's running statistics in eval mode, in topological order; damp each residual
    sum's branches to `ratio` of its skip (the module docstring), on one N(0, 1) batch of `input_shape` from a
    generator seeded with `seed`. `module` is changed in place and left in eval mode; returns every sum's decision."""
    generator = torch.Generator().manual_seed(seed)
    for norm in (m for m in module.modules() if isinstance(m, _BatchNorm) and m.affine):
        norm.weight.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(norm.num_features, generator=generator))
    module.eval()
    tracer = _NormLeafTracer()
    traced = fx.GraphModule(module, tracer.trace(module))  # shares module's parameters and buffers
    calibration = _Calibration(traced, ratio)
    calibration.run(torch.randn(*input_shape, generator=generator))
    return calibration.decisions
