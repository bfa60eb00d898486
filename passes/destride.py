"""destride: strided convolutions as stride-1 convolutions over polyphase (space-to-depth) maps (seed 004).

Maths, per spatial axis (axes are independent, so kernels, strides and inputs may be non-square). ONNX Conv is a
correlation y[o,i] = Σ_{c,u} W[o,c,u]·x̄[c, s·i+u−p], x̄ being x with zeros outside [0, L) and p the begin pad.
Hold y with factor G (G = 1 per conv): phase m of y is y_m[j] = y[G·j+m]; hold x with factor F = s·G:
x_r[q] = x̄[F·q+r]. Writing s·m + u − p = F·a + r (seed 004 Lemma 1: a sub-sampled convolutional tensor is the
convolutional tensor of the sub-sampled, zero-padded kernel),
    y_m[j] = Σ_{c,r,a} W̃[(o,m),(c,r),a]·x_r[c, j+a],    W̃[(o,m),(c,r),a] = W[o, c, F·a+r−s·m+p]  (0 outside [0,k)),
a stride-1 correlation over C·F input channels with taps a ∈ [⌊−p/F⌋, ⌊(s(G−1)+k−1−p)/F⌋]: kernel ⌈k/s⌉ for G = 1
and p ≡ 0 mod s (Theorem 1). Borders: x̄ is 0 at positions < 0, which are the polyphase rows q < 0, so the conv's
begin padding becomes ⌈p/F⌉ rows of zero padding. When F ∤ L the input is zero-extended to ⌈L/F⌉·F (positions in
[L, L+p_end) are the conv's own zero padding; positions beyond are never read by a non-zero tap, as the original
conv's last window ends at L+p_end−1) or, when even that has more rows than any window reads, cropped (Slice).
Every entry of W̃ is a copy of one weight or 0, so the weights are exact; only the summation order changes.

Channel order: phase-major q·C+c (ONNX SpaceToDepth and DepthToSpace DCR; a test checks it on onnxruntime) or
channel-major c·P+q (DepthToSpace CRD), with q the row-major phase index and P = ΠF. A grouped or depthwise conv
needs each group's channels contiguous, so it uses channel-major order (Reshape/Transpose/Reshape). Input channels
whose W̃ column is 0 for every output are not computed: phases r ≥ k when k < s (3 of 4 for a 1×1 stride-2 conv);
when a single phase is left it is read directly by a strided Slice. This is exact for finite inputs.

AveragePool equals a depthwise conv with weights 1/Πk when every window divides by Πk: no padding and no partial
ceil_mode window, or count_include_pad = 1. A strided ConvTranspose is the mirror image: the phases of its output are
y[s·j+r] = Σ_{c,b} x[c, j−(k'−1)+b]·W[c, o, s(k'−1−b)+r], k' = ⌈k/s⌉, a stride-1 conv with ΠS·O outputs and
pads k'−1, then DepthToSpace and a Slice of the pads. Whole-network mode (Theorem 2) keeps feature maps polyphase
across convs and elementwise ops (planned in cnnc/linear/polyphase.py) and re-assembles where they stop commuting.

Cost: MACs change by about Π(s·⌈k/s⌉/k) over the axes: ×16/9 for 3×3 stride 2, ×1 for 2×2 stride 2, ×1 for 1×1
stride 2 (×4 if the unused phases were kept). In network mode a conv with G > 1 multiplies the structural zeros of
its block-sparse W̃ too (each output phase reads only some input phases): ×1.81 over the seed's LeNet. The stats
record MACs and parameters per conv. On CPU single destrided convs measured slower, so the pass is exact but not in
the default pipeline. In conv mode each rewrite is priced by the cost model (`cnnc.cost`, as in collapse; weights grow
with the polyphase kernel) and recorded in `PassResult.candidates`; with `weigh=true` only those that pay (or close
calls named by `apply_close`) are applied, else all are (the pass was asked for by name; network mode is unpriced).

Preconditions (else left alone with the reason): constant float weights (and bias), dilation 1, static input
spatial lengths, spatial rank 1–3, opset ≥ 11, no negative begin pad from auto_pad SAME (kernel < stride; onnxruntime
crops there, the spec is silent); AveragePool as above; ConvTranspose also needs auto_pad NOTSET and no output_shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.cost import candidate_id, chosen, compare, roofline
from cnnc.cost.sketch import polyphase_conv_sketch, region_cost, replacement_cost
from cnnc.linear import polyphase as network
from cnnc.linear.polyphase import CHANNEL_MAJOR, PHASE_MAJOR, Builder, expand_channels, is_one
from cnnc.linear.polyphase_transpose import destride_conv_transpose
from cnnc.pipeline.contract import Candidate, Pass, PassResult


@dataclass(frozen=True)
class ConvSpec:
    """A Conv, or an AveragePool written as a depthwise Conv, with everything the rewrite needs resolved."""

    node: gs.Node
    weight: np.ndarray  # O × C/g × k…
    bias: np.ndarray | None
    group: int
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends, auto_pad resolved
    lengths: tuple[int, ...]  # input spatial lengths

    @property
    def channels(self) -> int:
        return self.weight.shape[1] * self.group


@dataclass(frozen=True)
class AxisPlan:
    """One spatial axis of a conv rewritten to read a factor-(s·G) map and write a factor-G map."""

    length: int
    kernel: int
    stride: int
    pad: int
    f_out: int
    out_length: int
    tap_min: int
    tap_max: int
    rows: int  # polyphase rows of the (zero-extended or cropped) input

    @property
    def f_in(self) -> int:
        return self.stride * self.f_out

    @property
    def taps(self) -> int:
        return self.tap_max - self.tap_min + 1

    @property
    def pads(self) -> tuple[int, int]:
        return -self.tap_min, self.out_length // self.f_out - 1 + self.tap_max - (self.rows - 1)

    @property
    def extension(self) -> int:
        return self.rows * self.f_in - self.length


def plan_axis(length: int, kernel: int, stride: int, pad: int, pad_end: int, f_out: int) -> AxisPlan | str:
    out_length = (length + pad + pad_end - kernel) // stride + 1
    if out_length < 1:
        return "the output is empty"
    if out_length % f_out:
        return f"output length {out_length} is not a multiple of the factor {f_out}"
    f_in = stride * f_out
    tap_min, tap_max = (-pad) // f_in, (stride * (f_out - 1) + kernel - 1 - pad) // f_in
    rows = -(-length // f_in)
    rows = min(rows, out_length // f_out + tap_max)  # trailing rows no window reads are cropped (end pad >= 0)
    if rows < 1:
        return "every window reads padding only"
    return AxisPlan(length, kernel, stride, pad, f_out, out_length, tap_min, tap_max, rows)


def polyphase_weight(weight: np.ndarray, plans: list[AxisPlan], layout: str) -> np.ndarray:
    """W̃ of the module docstring, O·ΠG × C/g·ΠF × taps…, in `layout` order on both channel axes."""
    d = len(plans)
    m, r, a, u = "DEF"[:d], "GHI"[:d], "JKL"[:d], "PQR"[:d]
    selections = []
    for plan in plans:  # S[m, r, a, u] = 1 where tap u of the kernel lands on phase r, offset a, for output phase m
        grid = np.ix_(np.arange(plan.f_out), np.arange(plan.f_in), np.arange(plan.tap_min, plan.tap_max + 1),
                      np.arange(plan.kernel))
        selections.append((grid[3] == plan.f_in * grid[2] + grid[1] - plan.stride * grid[0] + plan.pad) * 1.0)
    terms = ",".join(f"{m[i]}{r[i]}{a[i]}{u[i]}" for i in range(d))
    w = np.einsum(f"oc{u},{terms}->o{m}c{r}{a}", weight.astype(np.float64), *selections)
    outs, ins = [0, *range(1, d + 1)], [d + 1, *range(d + 2, 2 * d + 2)]
    if layout == PHASE_MAJOR:
        outs, ins = outs[1:] + outs[:1], ins[1:] + ins[:1]
    w = w.transpose(outs + ins + list(range(2 * d + 2, 3 * d + 2)))
    phases_out, phases_in = (int(np.prod([getattr(p, f) for p in plans])) for f in ("f_out", "f_in"))
    return w.reshape(weight.shape[0] * phases_out, weight.shape[1] * phases_in,
                     *(p.taps for p in plans)).astype(weight.dtype)


def _resolve_pads(geometry: ir.ConvGeometry, lengths) -> tuple[int, ...]:
    """Explicit pads; for SAME_* the split onnxruntime makes (C++ division, not clamped: a kernel smaller than the
    stride can give a negative total, i.e. rows cropped at the end, or at the start, which conv_spec refuses)."""
    if geometry.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        totals = [(-(-n // s) - 1) * s + k - n for n, k, s in zip(lengths, geometry.kernel_shape, geometry.strides)]
        lower = geometry.auto_pad == "SAME_LOWER"
        begins = [int((t + 1) / 2) if lower else int(t / 2) for t in totals]
        return tuple(begins + [t - b for t, b in zip(totals, begins)])
    return (0,) * (2 * len(lengths)) if geometry.auto_pad == "VALID" else geometry.pads


def conv_spec(node: gs.Node) -> tuple[ConvSpec | None, str]:
    """The ConvSpec of a Conv or AveragePool the pass can rewrite, or (None, reason)."""
    x = node.inputs[0]
    lengths = network.spatial_lengths(x)
    if node.op == "Conv":
        weight, _ = ir.float_constant(node, 1)
        bias, bias_why = ir.float_constant(node, 2)
        if weight is None or bias_why:
            return None, "weight or bias is not a float constant"
        geometry = ir.conv_geometry(node)
    else:
        geometry = ir.conv_geometry(node)
        if lengths is None or x.dtype is None or not np.issubdtype(np.dtype(x.dtype), np.floating):
            return None, "input shape or dtype unknown (the channel count and weight dtype come from it)"
        weight = np.full((x.shape[1], 1, *geometry.kernel_shape), 1.0 / np.prod(geometry.kernel_shape),
                         dtype=np.dtype(x.dtype))
        bias, geometry = None, ir.ConvGeometry(geometry.kernel_shape, geometry.strides, geometry.pads,
                                              geometry.dilations, x.shape[1], geometry.auto_pad)
    if any(d != 1 for d in geometry.dilations):
        return None, "dilation > 1: the taps of a dilated kernel are not a polyphase split of a dense kernel"
    if lengths is None:
        return None, "input spatial shape unknown: the polyphase grid is computed from it"
    if not 1 <= len(lengths) <= 3 or len(lengths) != geometry.spatial_rank:
        return None, f"spatial rank {len(lengths)} is not 1-3"
    pads = _resolve_pads(geometry, lengths)
    if any(p < 0 for p in pads[:len(lengths)]):
        return None, "auto_pad SAME with kernel < stride gives a negative begin pad (a crop the spec does not define)"
    if node.op == "AveragePool":
        if any(p < 0 for p in pads):
            return None, "auto_pad SAME with a negative pad (kernel < stride): onnxruntime rejects the pool itself"
        rank, floors = len(lengths), []
        for i, (n, k, s) in enumerate(zip(lengths, geometry.kernel_shape, geometry.strides)):
            floors.append((n + pads[i] + pads[rank + i] - k) % s == 0)
        if int(node.attrs.get("ceil_mode", 0)) and not all(floors):
            return None, "ceil_mode=1 adds a partial window whose divisor is its clipped size"
        if any(pads) and not int(node.attrs.get("count_include_pad", 0)):
            return None, "count_include_pad=0 with padding: border windows divide by fewer than Πk"
    spec = ConvSpec(node, weight, bias, geometry.group, geometry.strides, pads, lengths)
    for i in range(len(lengths)):
        plan = plan_axis(lengths[i], weight.shape[2 + i], spec.strides[i], pads[i], pads[len(lengths) + i], 1)
        if isinstance(plan, str):
            return None, plan
    return spec, ""


def emit_conv(builder: Builder, spec: ConvSpec, source: gs.Tensor, source_factor, out_factor, layout: str,
              target: gs.Variable) -> dict:
    """Write the stride-1 conv computing `spec` at output factor `out_factor` into `target`, reading `source`, which
    holds the conv's input either at factor s·G (network mode) or in the original layout. Returns its stats."""
    node, rank, cg = spec.node, len(spec.lengths), spec.weight.shape[1]
    label = node.name or target.name  # exporters may leave nodes unnamed
    plans = [plan_axis(spec.lengths[i], spec.weight.shape[2 + i], spec.strides[i], spec.pads[i],
                       spec.pads[rank + i], out_factor[i]) for i in range(rank)]
    if any(isinstance(plan, str) for plan in plans):  # the planner only asks for factors that divide the output
        raise ValueError(f"{node.op} '{node.name}' at factor {out_factor}: {plans}")
    f_in = [p.f_in for p in plans]
    weight = polyphase_weight(spec.weight, plans, layout)
    per_group, phases_in = weight.shape[1], int(np.prod(f_in))
    keep = np.flatnonzero(np.any(weight != 0, axis=tuple(i for i in range(weight.ndim) if i != 1)))
    keep = keep if keep.size else np.arange(1)  # an all-zero kernel still needs one input channel
    phase = keep % phases_in if layout == CHANNEL_MAJOR else keep // cg
    gathered = [g * per_group + int(k) for g in range(spec.group) for k in keep]
    hint, extra = label + "_destride", [0] * rank
    if not is_one(source_factor):  # already polyphase at s·G: the lengths divide, so nothing is extended
        assert all(p.extension == 0 for p in plans)
        x = source if keep.size == per_group else builder.take_channels(source, gathered, hint + "_phases")
    elif keep.size == cg and len(set(phase.tolist())) == 1:  # one phase of every channel: a strided Slice reads it
        r = np.unravel_index(int(phase[0]), f_in)
        axes = [i for i in range(rank) if f_in[i] > 1]
        x = builder.slice(source, [int(r[i]) for i in axes], [plans[i].rows * f_in[i] for i in axes],
                          [i + 2 for i in axes], [f_in[i] for i in axes], hint + "_phase")
        # Rows the slice cannot reach lie in the zero extension: the conv's end padding supplies them.
        extra = [p.rows - len(range(int(r[i]), min(p.length, p.rows * p.f_in), p.f_in)) for i, p in enumerate(plans)]
    else:
        x = builder.rearrange(source, spec.channels, spec.lengths, f_in, layout, [p.extension for p in plans],
                              hint + "_s2d")
        x = x if keep.size == per_group else builder.take_channels(x, gathered, hint + "_phases")
    phases_out = int(np.prod(out_factor))
    inputs = [x, builder.const(hint + "_W", weight[:, keep])]
    if spec.bias is not None:
        inputs.append(builder.const(hint + "_B", expand_channels(spec.bias, phases_out, layout).astype(spec.bias.dtype)))
    taps = [p.taps for p in plans]
    builder.op("Conv", inputs, hint, {"kernel_shape": taps, "strides": [1] * rank, "group": spec.group,
                                      "pads": [p.pads[0] for p in plans] + [p.pads[1] + e for p, e in
                                                                            zip(plans, extra)]}, out=target)
    positions, outs = int(np.prod([p.out_length for p in plans])), spec.weight.shape[0]
    bias_size = 0 if spec.bias is None else spec.bias.size
    return {"node": label, "op": node.op, "strides": list(spec.strides), "kernel": list(spec.weight.shape[2:]),
            "kernel_after": taps, "factor_in": f_in, "factor_out": list(out_factor),
            "macs_before": positions * outs * cg * int(np.prod(spec.weight.shape[2:])),
            "macs_after": positions * outs * int(keep.size) * int(np.prod(taps)),
            "params_before": spec.weight.size + bias_size,
            "params_after": int(weight.shape[0] * keep.size * np.prod(taps)) + bias_size * phases_out}


def _candidate(graph: gs.Graph, spec: ConvSpec, layout: str, provider: str, apply_close: str) -> Candidate:
    """The cost model's verdict on destriding `spec` alone (conv mode), priced before anything is built."""
    node, rank = spec.node, len(spec.lengths)
    plans = [plan_axis(spec.lengths[i], spec.weight.shape[2 + i], spec.strides[i], spec.pads[i], spec.pads[rank + i],
                       1) for i in range(rank)]
    kept = int(np.count_nonzero(np.any(polyphase_weight(spec.weight, plans, layout) != 0, axis=(0, *range(2, 2 + rank)))))
    one_phase = kept == spec.weight.shape[1]
    phases = [1, spec.channels * (1 if one_phase else int(np.prod([p.f_in for p in plans]))), *[p.rows for p in plans]]
    sketch = polyphase_conv_sketch(node.inputs[0], node.outputs[0], phases, [spec.weight.shape[0], kept,
                                   *[p.taps for p in plans]], "Slice" if one_phase else "Transpose", spec.weight.dtype)
    before, after = region_cost([node], node.outputs, graph.outputs), replacement_cost(*sketch, graph.outputs)
    verdict = compare(before, after, roofline(provider, measure=False), (1, 8))
    identifier = candidate_id([node.outputs[0].name])
    return Candidate(identifier, _where(node), verdict.kind, chosen(verdict, identifier, apply_close), verdict.reason,
                     {"before": before.as_dict(), "after": after.as_dict(), "ratio": round(verdict.ratio, 4)})


def _where(node: gs.Node) -> str:
    return f"{node.op} '{node.name or (node.outputs[0].name if node.outputs else '')}'"


def _describe(stats: dict) -> str:
    ratio = stats["macs_after"] / stats["macs_before"] if stats["macs_before"] else float("nan")
    return (f"{stats['op']} '{stats['node']}': stride {tuple(stats['strides'])} kernel {tuple(stats['kernel'])} -> "
            f"stride 1 kernel {tuple(stats['kernel_after'])}, factor {tuple(stats['factor_in'])} -> "
            f"{tuple(stats['factor_out'])}, MACs x{ratio:.2f}")


@dataclass(frozen=True)
class Destride(Pass):
    """Rewrite strided Conv / AveragePool / ConvTranspose as stride-1 convs over space-to-depth maps."""

    name = "destride"
    summary = ("strided convs as stride-1 convs over space-to-depth maps (seed 004); exact, but raises MACs by about "
               "(s·⌈k/s⌉/k)² and measured slower on CPU, so not run by default")
    mode: Literal["conv", "network"] = "conv"
    # Grouped and depthwise convs (and AveragePool, a depthwise conv) too. On onnxruntime's CPU provider a depthwise
    # 3×3 stride-2 conv became 16× slower: the rewritten conv has s² inputs per group and loses the depthwise kernel.
    grouped: bool = True
    weigh: bool = False  # apply only the rewrites the cost model says pay (conv mode); else all, priced and recorded
    provider: str = "cpu"  # whose roofline prices the rewrites
    apply_close: str = ""  # with weigh: "all" or candidate ids joined by "+" also applies those close calls

    def run(self, graph: gs.Graph) -> PassResult:
        result = PassResult(stats={"convs": []})
        if graph.opset < 11:
            result.skip("whole graph", f"opset {graph.opset} < 11: Pad and Slice take their pads as inputs from 11")
            return result
        specs, transposes = {}, []
        for node in list(graph.nodes):
            strided = any(int(s) > 1 for s in node.attrs.get("strides", []))
            if node.op in ("Conv", "AveragePool"):
                spec, why = conv_spec(node)
                if spec is not None and spec.group > 1 and not self.grouped:
                    spec, why = None, "grouped or depthwise, and grouped=false"
                if spec is not None:
                    specs[id(node)] = spec
                elif strided:
                    result.skip(_where(node), why)
            elif node.op == "ConvTranspose" and strided:
                if int(node.attrs.get("group", 1)) > 1 and not self.grouped:
                    result.skip(_where(node), "grouped, and grouped=false")
                else:
                    transposes.append(node)
        builder = Builder(graph)

        def emit(spec, source, source_factor, out_factor, layout, target):
            stats = emit_conv(builder, spec, source, source_factor, out_factor, layout, target)
            result.stats["convs"].append(stats)
            result.did(_describe(stats))

        if self.mode == "network":
            region, factors, operands = network.plan_network(graph, specs)
            grouped = any(specs[id(n)].group > 1 and not is_one(network.input_factor(
                specs, n, factors[id(n.outputs[0])])) for n in region if id(n) in specs)
            layout = CHANNEL_MAJOR if grouped else PHASE_MAJOR

            def layout_of(node):
                return layout
        else:
            region = [n for n in graph.nodes if id(n) in specs and not is_one(specs[id(n)].strides)]
            factors, operands = {}, {}

            def layout_of(node):  # a grouped conv needs each group's phases contiguous
                return CHANNEL_MAJOR if node is not None and specs[id(node)].group > 1 else PHASE_MAJOR

            for node in list(region):
                candidate = _candidate(graph, specs[id(node)], layout_of(node), self.provider, self.apply_close)
                candidate.applied = candidate.applied or not self.weigh
                result.candidates.append(candidate)
                if not candidate.applied:
                    region.remove(node)
                    result.skip(_where(node), f"{candidate.verdict} by the cost model (candidate {candidate.id}): "
                                              f"{candidate.reason}")
        polyphase = [n for n in region if id(n) not in specs and not is_one(factors[id(n.outputs[0])])]
        exits = network.rewrite_region(builder, region, specs, factors, operands, layout_of, emit)
        if polyphase:
            result.did(f"{len(polyphase)} elementwise ops run on polyphase maps ({layout}); {len(exits)} re-assembled")
            result.stats["reassembled"] = exits
        for node in transposes:
            outcome = destride_conv_transpose(builder, node)
            if isinstance(outcome, str):
                result.skip(_where(node), outcome)
            else:
                result.stats["convs"].append(outcome)
                result.did(_describe(outcome))
        convs = result.stats["convs"]
        before, after = sum(c["macs_before"] for c in convs), sum(c["macs_after"] for c in convs)
        result.stats.update(macs_before=before, macs_after=after, mac_ratio=round(after / before, 4) if before else None)
        return result
