"""Which activations to anneal away: the sites whose conv chains merge into cheaper convs, by cost and measurement.

Candidates. The links of `cnnc.homotopy.pad_once` (conv → BN → σ → conv, pad-once rewritable) grouped into chains
conv_0 → conv_1 → … → conv_m. Plan on the model the skip homotopy wrapped: a site whose output is also the shortcut
of a `HomotopyJoin` (the ResNet stem feeding an identity skip) is a link, because that read is gone at t = 0.
Annealing the sites of a contiguous *segment* conv_i..conv_j merges it, at t = 0, into one conv: kernel k_i + Σ_l
(k_l − 1)·d_l·Π s (per axis), stride Π s, channels in_i → out_j, groups kept only when every conv of the segment has
the same groups (a depthwise conv followed by a 1×1 becomes dense).

Cost. Each form is priced by the cost model (`cnnc.cost.Cost`: MACs, weight and activation bytes, kernels, at batch
1) on the provider's roofline (`cnnc.cost.roofline(provider, measure=False)`: cached measured figures, else
conservative built-in ones), and judged by `cnnc.cost.compare` at `cnnc.cost.verdict.REWRITE_BATCHES` (1 and 8) and
`batch`, exactly as `collapse` will judge the merge at compile time: "pays", "loses" or "close".

Measurement. When `measure` is given (a callable `(unmerged, merged) -> (seconds, seconds)` on two small ONNX
models, e.g. onnxruntime through `cnnc.runtime.bench` in the training script: this package does not run models), a
segment is timed when the cost model cannot settle it:
- it is "close", or
- it "loses" on MACs by at most `MEASURE_MAC_GROWTH` (2×) while removing kernels (every merge of n convs removes
  n − 1): at batch 1 on small maps a kernel's fixed cost can outweigh the extra MACs (two 3×3 → one 5×5, 25/18).
It is timed at every batch size of `batch` (an int or a tuple, e.g. (1, 64): the two models are built at that
batch), its ratio merged/apart is the worst of them, and its estimate is scaled by that ratio. A timed segment enters
the DP only when it measured faster at every batch by `MEASURE_MARGIN` (5 %: a merge that saves less than timing
noise on a shared CPU would cost an activation for nothing); a loss that was not timed (no `measure`, or MACs grow more than
2×) never does. Merges that pay by the cost model are not timed.

Choice: dynamic programming over each chain, as LayerMerge does (`cnnc.cost.segments`, shared with `collapse`).
best[j][m] is the cheapest cost of conv_0..conv_j using m annealed sites, over the last segment i..j: best[j][m] =
min_i best[i−1][m − (j − i)] + cost(i..j). Chains are independent, so a knapsack over the per-chain tables gives the
cheapest plan for every total number of sites. Then: `max_sites` → the cheapest plan with at most that many sites;
`target_speedup` → the fewest sites whose estimated speed-up of the convs reaches it (else the cheapest plan, saying
so); neither → the cheapest plan, fewest sites on ties. Only merges that pay, or that were measured faster
(above), enter the DP: a segment that costs more than its convs apart (two 3×3 at equal width → a 5×5 with 25/18 of
the MACs) is chosen only when measured faster, and a depthwise conv merged with a 1×1 (dense, more MACs, fewer
bytes) likewise. Chains run through residual joins and past projected shortcuts that the skip homotopy removes at
t = 0 (`pad_once`): a ResNet's stem and its blocks, up to the last block, can be one chain. Sites that are not chain links (after a residual join, before a pooling or the head) only save
an elementwise op and are not chosen; `all_sites` lists every activation, the budget at which the whole network
becomes linear (Theorem 3.1's end point, one Gemm after collapse).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import onnx
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from cnnc.cost import Cost, compare, roofline
from cnnc.cost.segments import best_segmentations
from cnnc.cost.verdict import REWRITE_BATCHES
from cnnc.homotopy.activations import activation_module, is_site_node, trace_model
from cnnc.homotopy.pad_once import ChainLink, find_links, run_paddings, runs
from cnnc.io.frontend import from_torch

FLOAT_BYTES = 4
MEASURE_MAC_GROWTH = 2.0  # a merge that loses on MACs by at most this factor is timed when `measure` is given
MEASURE_MARGIN = 0.05  # a timed merge must be this much faster (merged/apart <= 1/(1 + margin)) at every batch

Measure = Callable[[onnx.ModelProto, onnx.ModelProto], tuple[float, float]]


@dataclass
class Segment:
    """conv_i..conv_j of one chain merged into one conv, and what each form costs."""

    chain: int
    convs: list[str]
    sites: list[str]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    macs_apart: int
    macs_merged: int
    seconds_apart: float
    seconds_merged: float  # estimated, or scaled by the measured ratio
    verdict: str  # the cost model's: pays, loses or close
    verdict_reason: str
    measured_ratio: float | None = None  # merged / apart on the provider, the worst batch, when measured
    measured: dict[str, float] = field(default_factory=dict)  # "batch b" -> merged / apart at that batch
    densified: bool = False  # grouped (depthwise) convs became one dense conv

    @property
    def allowed(self) -> bool:
        """Pays by the cost model, or timed and faster by MEASURE_MARGIN at every batch."""
        return self.verdict == "pays" or (self.measured_ratio is not None
                                          and self.measured_ratio <= 1 / (1 + MEASURE_MARGIN))

    @property
    def gain(self) -> float:
        return self.seconds_apart - self.seconds_merged

    def describe(self) -> str:
        text = (f"{' + '.join(self.convs)} -> one {self.kernel[0]}x{self.kernel[1]}/{self.stride[0]} conv"
                f"{'' if self.groups == 1 else f' group {self.groups}'}: {self.macs_merged} MACs vs {self.macs_apart}"
                f" ({self.macs_merged / max(self.macs_apart, 1):.2f}x), {self.verdict}")
        if self.densified and self.macs_merged > self.macs_apart:
            text += " (grouped/depthwise convs become one dense conv: more MACs)"
        if self.measured:
            text += ", measured " + ", ".join(f"{r:.2f}x the time at {b}" for b, r in self.measured.items())
        return text


@dataclass
class Plan:
    method: str
    budget: str
    sites: list[str]  # the chosen sites: wrap these
    all_sites: list[str]  # every activation of the model (all of them: the network becomes linear)
    segments: list[dict]  # the chosen merges
    decisions: dict[str, str]  # site -> why (chosen or not)
    seconds_before: float  # the model's convs and linear layers, estimated
    seconds_after: float
    provider: str
    batch: int  # the batch the estimates are given at (the first asked for)
    roofline: dict = field(default_factory=dict)
    batches: tuple[int, ...] = ()  # every batch the cost model judged and `measure` timed at

    @property
    def estimated_speedup(self) -> float:
        return self.seconds_before / max(self.seconds_after, 1e-12)

    def as_dict(self) -> dict:
        return {**asdict(self), "estimated_speedup": self.estimated_speedup}

    def table(self) -> str:
        rows = [(site, "yes" if site in self.sites else "no", self.decisions.get(site, "")) for site in self.all_sites]
        width = max([len("site")] + [len(r[0]) for r in rows])
        lines = [f"{'site':{width}s}  chosen  why", "-" * (width + 60)]
        lines += [f"{site:{width}s}  {chosen:6s}  {why}" for site, chosen, why in rows]
        lines.append(f"{self.method}, {self.budget}: {len(self.sites)} of {len(self.all_sites)} sites, estimated "
                     f"{self.estimated_speedup:.2f}x on the convs ({self.provider}, batch {self.batch}; judged at "
                     f"{', '.join(map(str, self.batches or (self.batch,)))})")
        return "\n".join(lines)


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape[1:])


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def conv_cost(conv: nn.Conv2d, in_shape, out_shape) -> Cost:
    """One conv (BN and activation fused into it, as onnxruntime does) at batch 1."""
    weights = conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return Cost(macs=_numel(out_shape) // conv.out_channels * weights, weight_bytes=FLOAT_BYTES * weights,
                activation_bytes=FLOAT_BYTES * (_numel(in_shape) + _numel(out_shape)), kernels=1)


def merged_geometry(convs: list[nn.Conv2d]) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Kernel, stride and groups of one conv equal to the pad-free chain `convs`."""
    kernel, stride = list(convs[0].kernel_size), list(convs[0].stride)
    kernel = [(k - 1) * d + 1 for k, d in zip(kernel, convs[0].dilation)]
    for conv in convs[1:]:
        for a in range(2):
            kernel[a] += (conv.kernel_size[a] - 1) * conv.dilation[a] * stride[a]
            stride[a] *= conv.stride[a]
    groups = convs[0].groups if len({c.groups for c in convs}) == 1 and \
        len({c.in_channels == c.out_channels == c.groups for c in convs}) == 1 else 1
    return tuple(kernel), tuple(stride), groups


def _merged_conv(convs: list[nn.Conv2d]) -> nn.Conv2d:
    kernel, stride, groups = merged_geometry(convs)
    return nn.Conv2d(convs[0].in_channels, convs[-1].out_channels, kernel, stride, run_paddings(convs)[0],
                     groups=groups)


def _segment_onnx(convs: list[nn.Conv2d], in_shape, batch: int = 1) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The two forms as small ONNX models at `batch` (random weights: timing only); BN is folded away by then.
    The convs apart keep their own paddings: without the merge the network is not rewritten pad-once."""
    apart = [copy.deepcopy(c) for c in convs]
    example = torch.zeros((batch,) + tuple(in_shape[1:]))
    return (from_torch(nn.Sequential(*apart).eval(), example, dynamic_batch=False),
            from_torch(_merged_conv(convs).eval(), example, dynamic_batch=False))


def _worth_measuring(verdict: str, macs_apart: int, macs_merged: int) -> bool:
    """Close, or a loss on MACs small enough that the kernels it removes may pay for it (module docstring)."""
    return verdict == "close" or (verdict == "loses" and macs_merged <= MEASURE_MAC_GROWTH * macs_apart)


class _Chains:
    """The model's chains with their shapes and the roofline: prices segments (and measures close ones)."""

    def __init__(self, traced: fx.GraphModule, links: list[ChainLink], roof, batches: tuple[int, ...],
                 measure: Measure | None):
        self.traced, self.roof, self.batches, self.measure = traced, roof, batches, measure
        self.batch = batches[0]
        self.nodes = {n.target: n for n in traced.graph.nodes if n.op == "call_module"}
        self.chains = runs(links)
        self.cache: dict[tuple[int, int, int], Segment] = {}

    def convs(self, chain: int) -> list[str]:
        run = self.chains[chain]
        return [run[0].before] + [link.after for link in run]

    def seconds(self, cost: Cost) -> float:
        return self.roof.seconds(cost, self.batch)

    def apart(self, name: str) -> Cost:
        node = self.nodes[name]
        return conv_cost(self.traced.get_submodule(name), _shape(node.args[0]), _shape(node))

    def segment(self, chain: int, i: int, j: int) -> Segment:
        key = (chain, i, j)
        if key not in self.cache:
            names = self.convs(chain)[i:j + 1]
            convs = [self.traced.get_submodule(n) for n in names]
            apart = sum((self.apart(n) for n in names), Cost())
            kernel, stride, groups = merged_geometry(convs)
            in_shape, out_shape = _shape(self.nodes[names[0]].args[0]), _shape(self.nodes[names[-1]])
            weights = convs[-1].out_channels * convs[0].in_channels // groups * math.prod(kernel)
            merged = Cost(macs=_numel(out_shape) // convs[-1].out_channels * weights,
                          weight_bytes=FLOAT_BYTES * weights,
                          activation_bytes=FLOAT_BYTES * (_numel(in_shape) + _numel(out_shape)), kernels=1)
            verdict = compare(apart, merged, self.roof, batches=sorted({*REWRITE_BATCHES, *self.batches}))
            segment = Segment(chain, names, [link.site for link in self.chains[chain][i:j]], kernel, stride, groups,
                              apart.macs, merged.macs, self.seconds(apart), self.seconds(merged), verdict.kind,
                              verdict.reason, densified=groups == 1 and any(c.groups > 1 for c in convs))
            if self.measure is not None and _worth_measuring(verdict.kind, apart.macs, merged.macs):
                for batch in self.batches:
                    seconds_apart, seconds_merged = self.measure(*_segment_onnx(convs, in_shape, batch))
                    segment.measured[f"batch {batch}"] = seconds_merged / seconds_apart
                segment.measured_ratio = max(segment.measured.values())
                segment.seconds_merged = segment.seconds_apart * segment.measured_ratio
            self.cache[key] = segment
        return self.cache[key]

    def best(self, chain: int) -> dict[int, tuple[float, list[Segment]]]:
        """Sites used -> (cheapest cost of the chain, its merged segments): the shared DP (`cnnc.cost.segments`)."""
        names = self.convs(chain)

        def cost(i: int, j: int) -> float | None:
            if i == j:
                return self.seconds(self.apart(names[j]))
            segment = self.segment(chain, i, j)
            return segment.seconds_merged if segment.allowed else None

        return {m: (total, [self.segment(chain, i, j) for i, j in pairs])
                for m, (total, pairs) in best_segmentations(len(names), cost).items()}


def _knapsack(tables: list[dict[int, tuple[float, list[Segment]]]]) -> dict[int, tuple[float, list[Segment]]]:
    combined: dict[int, tuple[float, list[Segment]]] = {0: (0.0, [])}
    for table in tables:
        step: dict[int, tuple[float, list[Segment]]] = {}
        for m, (cost, segments) in combined.items():
            for k, (chain_cost, chain_segments) in table.items():
                total = cost + chain_cost
                if m + k not in step or total < step[m + k][0]:
                    step[m + k] = (total, segments + chain_segments)
        combined = step
    return combined


def _shaped_trace(model: nn.Module, example_input) -> fx.GraphModule:
    traced = trace_model(model)
    if traced is None:
        raise ValueError("plan needs a model that traces with torch.fx (wrap chosen sites by name otherwise)")
    modes = [(m, m.training) for m in traced.modules()]
    traced.eval()  # a training-mode forward would move the BatchNorm statistics
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    finally:
        for m, training in modes:
            m.training = training
    return traced


def plan(model: nn.Module, example_input, provider: str = "cpu", target_speedup: float | None = None,
         max_sites: int | None = None, measure: Measure | None = None, batch: int | tuple[int, ...] = 1) -> Plan:
    """Choose the activation sites whose anneal pays (module docstring); `model` is not changed.

    `batch`: one batch size or several; the cost model judges every one (and 1 and 8), `measure` times the close
    and the small losses at each, and a timed merge must be faster at all of them. Estimates are at the first."""
    batches = (batch,) if isinstance(batch, int) else tuple(batch)
    if target_speedup is not None and max_sites is not None:
        raise ValueError("give target_speedup or max_sites, not both")
    traced = _shaped_trace(model, example_input)
    is_activation = [n for n in traced.graph.nodes if activation_module(n, traced) is not None
                     or is_site_node(n, traced)]
    all_sites = [n.name for n in is_activation]
    links, refused = find_links(traced, lambda n: n in is_activation)
    roof = roofline(provider, measure=False)
    chains = _Chains(traced, links, roof, batches, measure)
    options = _knapsack([chains.best(c) for c in range(len(chains.chains))])
    baseline = sum(chains.seconds(conv_cost(traced.get_submodule(n.target), _shape(n.args[0]), _shape(n)))
                   for n in traced.graph.nodes if n.op == "call_module"
                   and isinstance(traced.get_submodule(n.target), nn.Conv2d))
    chain_baseline = options[0][0]
    cheapest = min(options, key=lambda m: (round(options[m][0], 15), m))
    if max_sites is not None:
        chosen = min((m for m in options if m <= max_sites), key=lambda m: (round(options[m][0], 15), m))
        budget = f"at most {max_sites} sites"
    elif target_speedup is not None:
        reaching = [m for m in options if baseline / max(baseline - chain_baseline + options[m][0], 1e-12)
                    >= target_speedup]
        chosen = min(reaching) if reaching else cheapest
        budget = f"target {target_speedup:g}x" + ("" if reaching else " (not reachable: the cheapest plan)")
    else:
        chosen, budget = cheapest, "cheapest plan"
    cost, segments = options[chosen]
    decisions = {site: why for site, why in refused}
    for c in range(len(chains.chains)):
        for index, link in enumerate(chains.chains[c]):
            alone = chains.segment(c, index, index + 1)
            why = "outside the budget" if alone.allowed else (
                f"not measured faster by {100 * MEASURE_MARGIN:g} % at every batch" if alone.measured_ratio is not None else "not timed: it loses by the cost model"
                if alone.verdict == "loses" else "close, not timed")
            decisions[link.site] = f"not chosen ({why}): alone, {alone.describe()}"
    for segment in segments:
        for site in segment.sites:
            decisions[site] = f"chosen: {segment.describe()}, saves {100 * segment.gain / segment.seconds_apart:.0f} %"
    return Plan("dynamic programming over conv chains (LayerMerge-style) + knapsack over chains", budget,
                [s for s in all_sites if any(s in seg.sites for seg in segments)], all_sites,
                [{**asdict(seg), "describe": seg.describe()} for seg in segments], decisions, baseline,
                baseline - chain_baseline + cost, provider, batches[0], roof.as_dict(), batches)
