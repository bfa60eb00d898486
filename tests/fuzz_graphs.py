"""Random CNN graphs for differential fuzzing, and the differential check itself.

`cnn_graphs()` is a hypothesis strategy; `random_case(seed)` builds the same kind of graph from a numpy seed (the long
profile, bench/fuzz.py, uses it: no shrinking, but every failure is reproducible from its seed). Both go through one
builder that draws every choice from a `Draw`, so hypothesis shrinks failing graphs towards fewer blocks and simpler
geometry (the first option of every choice is the simplest).

Graphs (onnx.helper-built, opset 17-21, float32 or float16, NCHW): Conv (kernel 1-7, stride 1-4, explicit pads
including asymmetric ones, auto_pad, dilation, groups and depthwise, bias or not), ConvTranspose, BatchNormalization,
Relu, LeakyRelu, Tanh, residual Add skips (plain, with a projection, or as homotopy joins (1-t)·F + t·S), parallel
branches summed or concatenated, convs sharing one weight (BN after only one of them), BN in front of a pad-free conv,
Pad (constant, reflect, edge), AveragePool and MaxPool (ceil_mode, count_include_pad, dilation), Resize (nearest and
linear, four coordinate modes; rarely cubic, which no pass rewrites), GlobalAveragePool, Flatten and Gemm heads, and
issue 16's forms from fuzz_forms.py: constant-condition If around conv sub-graphs, Reduce* with axes as an input,
Split with num_outputs, Pad with axes (opset >= 18), inputs with a default (shadowed by an initializer, fed a value
other than the default), and whole float16 graphs. Input sizes are non-square, the batch is static (1-3) or symbolic,
a graph may expose an inner tensor as a second output, and node names may be empty. Weights are scaled by 1/√fan_in so
that values stay O(1) through a few layers. ceil_mode pooling is generated only where onnx's shape inference and
onnxruntime agree (see
test_fuzz_regressions.py::test_ceil_mode_pool_where_onnx_and_onnxruntime_disagree_is_refused_cleanly).

The builder tracks shapes itself (onnxruntime's rules, including ceil_mode pooling); tests/test_fuzz.py checks them
against onnxruntime.

`check_pass(case, spec)` runs one pipeline spec (`strict=True`, so a pass that raises is a crash, not a silent
rollback), emits the model through the backend with the full checker, runs it on onnxruntime (CPU, optimisations off)
and compares with the original, after checking that the caller's ModelProto is unchanged and that the inputs (those
with a default included) are the original's. The verdict: max|got − ref| ≤ 1e-5·max(1, max|ref|) for float32, the
equivalence check's per-dtype tolerance otherwise (float16: 2e-3 + 2e-2·max|ref|). Where that fails and the float64
evaluator supports the graph, the float32 rounding of the original itself is measured against a float64 evaluation,
and the result passes when its own error against float64 is within that tolerance or at most `FLOAT64_ERROR_FACTOR`
times the original's (a rewrite may round differently, never worse than a few times).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import fuzz_forms
import numpy as np
import onnx
import onnx.helper as oh
from helpers import run_passes
from hypothesis import strategies as st

OPSET = 17
MAX_CHANNELS = 12
MAX_SIDE = 24
RELATIVE_TOLERANCE = 1e-5  # of max(1, max|reference|)
FLOAT64_ERROR_FACTOR = 4.0


# --- drawing -----------------------------------------------------------------------------------------------------

class Draw(Protocol):
    def integer(self, low: int, high: int) -> int: ...

    def choice(self, options: Sequence) -> Any: ...

    def flag(self, probability: float) -> bool: ...


class HypothesisDraw:
    """Choices through hypothesis: integers shrink to `low`, choices to the first option, flags to False."""

    def __init__(self, draw):
        self._draw = draw

    def integer(self, low: int, high: int) -> int:
        return self._draw(st.integers(low, high))

    def choice(self, options: Sequence) -> Any:
        return self._draw(st.sampled_from(list(options)))

    def flag(self, probability: float) -> bool:
        return self._draw(st.integers(0, 99)) >= round(100 * (1 - probability))


class RandomDraw:
    """The same choices from a numpy generator (the long profile)."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng

    def integer(self, low: int, high: int) -> int:
        return int(self._rng.integers(low, high + 1))

    def choice(self, options: Sequence) -> Any:
        options = list(options)
        return options[int(self._rng.integers(len(options)))]

    def flag(self, probability: float) -> bool:
        return bool(self._rng.random() < probability)


# --- geometry ------------------------------------------------------------------------------------------------------

def conv_out(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int = 1) -> int:
    return (size + begin + end - dilation * (kernel - 1) - 1) // stride + 1


def pool_out(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int, ceil_mode: bool,
             drop_last: bool = True) -> int:
    """onnxruntime's (and PyTorch's) rule: with ceil_mode a last window that would start in the end padding is
    dropped (`drop_last=False` gives onnx shape inference's rule, which keeps it)."""
    span = size + begin + end - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if drop_last and (out - 1) * stride >= size + begin:
        out -= 1
    return out


def conv_transpose_out(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int,
                       output_padding: int) -> int:
    return stride * (size - 1) + output_padding + dilation * (kernel - 1) + 1 - begin - end


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _every_window_reads_input(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int,
                              ceil_mode: bool) -> bool:
    """Whether each pooling window has a tap inside the input (with dilation one may fall wholly in the padding);
    with undilated windows and pads below the kernel, every one has."""
    count = pool_out(size, kernel, stride, begin, end, dilation, ceil_mode)
    return all(any(0 <= i * stride - begin + dilation * j < size for j in range(kernel)) for i in range(count))


# --- the builder ---------------------------------------------------------------------------------------------------

@dataclass
class FuzzCase:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    blocks: list[str] = field(default_factory=list)  # one line per block, for failure reports

    def describe(self) -> str:
        x = self.model.graph.input[0]
        dims = [d.dim_value or d.dim_param for d in x.type.tensor_type.shape.dim]
        feed = self.feeds[x.name].shape
        return f"input {dims} fed {list(feed)}; " + "; ".join(self.blocks)

    def op_types(self) -> Counter:
        return Counter(node.op_type for node in self.model.graph.node)


class GraphBuilder:
    def __init__(self, draw: Draw, rng: np.random.Generator, named: bool):
        self.draw, self.rng, self.named = draw, rng, named
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # per-sample shape (batch left out)
        self.blocks: list[str] = []
        self.opset = OPSET
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}{self._count}"

    def constant(self, hint: str, values: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(onnx.numpy_helper.from_array(np.ascontiguousarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> str:
        out = self.fresh(op.lower() + "_")
        self.nodes.append(oh.make_node(op, inputs, [out], name=self.fresh("n") if self.named else "", **attrs))
        self.shapes[out] = tuple(int(s) for s in shape)
        return out

    def weights(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        gain = self.rng.uniform(0.5, 1.5)
        return (gain * self.rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(np.float32)

    # --- single ops ---

    def conv(self, x: str, cout: int, group: int, kernel, strides, pads, dilations, bias: bool,
             auto_pad: str = "NOTSET") -> str:
        cin, h, w = self.shapes[x]
        weight = self.constant("W", self.weights((cout, cin // group, *kernel), cin // group * kernel[0] * kernel[1]))
        inputs = [x, weight] + ([self.constant("B", 0.3 * self.rng.standard_normal(cout).astype(np.float32))]
                                if bias else [])
        if auto_pad == "NOTSET":
            out = [conv_out(size, k, s, pads[i], pads[i + 2], d)
                   for i, (size, k, s, d) in enumerate(zip((h, w), kernel, strides, dilations))]
            attrs = {"pads": list(pads)}
        elif auto_pad == "VALID":
            out = [conv_out(size, k, s, 0, 0, d) for size, k, s, d in zip((h, w), kernel, strides, dilations)]
            attrs = {"auto_pad": auto_pad}
        else:
            out = [-(-size // s) for size, s in zip((h, w), strides)]
            attrs = {"auto_pad": auto_pad}
        attrs.update(kernel_shape=list(kernel), strides=list(strides), dilations=list(dilations))
        if group != 1 or self.draw.flag(0.5):
            attrs["group"] = group
        self.blocks.append(f"Conv {cin}->{cout} g{group} k{tuple(kernel)} s{tuple(strides)} "
                           f"p{tuple(pads) if auto_pad == 'NOTSET' else auto_pad} d{tuple(dilations)} "
                           f"bias={bias} on {(cin, h, w)}")
        return self.node("Conv", inputs, (cout, *out), **attrs)

    def batch_norm(self, x: str) -> str:
        c = self.shapes[x][0]
        params = [(0.5 + self.rng.random(c)), 0.1 * self.rng.standard_normal(c), 0.1 * self.rng.standard_normal(c),
                  0.5 + self.rng.random(c)]
        names = [self.constant(hint, p.astype(np.float32)) for hint, p in zip(("g", "beta", "mu", "var"), params)]
        self.blocks.append(f"BatchNormalization on {self.shapes[x]}")
        return self.node("BatchNormalization", [x] + names, self.shapes[x], epsilon=1e-5)

    def activation(self, x: str) -> str:
        op = self.draw.choice(["Relu", "LeakyRelu", "Tanh"])
        attrs = {"alpha": self.draw.choice([0.01, 0.1, 0.3])} if op == "LeakyRelu" else {}
        self.blocks.append(op)
        return self.node(op, [x], self.shapes[x], **attrs)

    def scale(self, x: str, factor: float) -> str:
        return self.node("Mul", [x, self.constant("t", np.array(factor, np.float32))], self.shapes[x])

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b], self.shapes[a])

    # --- geometry draws ---

    def same_size_conv(self, x: str, cout: int, stride: tuple[int, int], group: int | None = None) -> str:
        """A conv whose output side is ⌊(side − 1)/stride⌋ + 1 (pads sum to the dilated kernel minus one)."""
        cin = self.shapes[x][0]
        if group is None:
            common = [g for g in _divisors(cin) if cout % g == 0]
            group = self.draw.choice(common)
        kernel, pads, dilations = [], [0, 0, 0, 0], []
        for axis in range(2):
            k = self.draw.choice([1, 3, 2, 5, 4, 7])
            d = self.draw.choice([1, 2]) if k > 1 else 1
            total = d * (k - 1)
            begin = self.draw.integer(0, total)
            pads[axis], pads[axis + 2] = begin, total - begin
            kernel.append(k)
            dilations.append(d)
        return self.conv(x, cout, group, kernel, stride, pads, dilations, bias=self.draw.flag(0.5))

    def free_conv(self, x: str) -> str:
        cin, h, w = self.shapes[x]
        group = self.draw.choice([1] + [g for g in _divisors(cin) if g > 1])
        depthwise = group == cin and self.draw.flag(0.5)
        cout = cin * self.draw.integer(1, 2) if depthwise else group * self.draw.integer(1, max(1, 8 // group))
        kernel, strides, pads, dilations = [], [], [0, 0, 0, 0], []
        auto_pad = self.draw.choice(["NOTSET"] * 6 + ["SAME_UPPER", "SAME_LOWER", "VALID"])
        for axis, size in enumerate((h, w)):
            k = self.draw.integer(1, 7)
            s = self.draw.integer(1, 4)
            d = self.draw.choice([1, 1, 2, 3]) if auto_pad in ("NOTSET", "VALID") else 1
            begin, end = (self.draw.integer(0, 3), self.draw.integer(0, 3)) if auto_pad == "NOTSET" else (0, 0)
            if size + begin + end < d * (k - 1) + 1:
                d = 1
                k = min(k, size + begin + end)
            kernel.append(k)
            strides.append(s)
            dilations.append(d)
            pads[axis], pads[axis + 2] = begin, end
        return self.conv(x, cout, group, kernel, strides, pads, dilations, self.draw.flag(0.5), auto_pad)

    def conv_transpose(self, x: str) -> str:
        cin, h, w = self.shapes[x]
        group = self.draw.choice([1] + [g for g in _divisors(cin) if g > 1])
        cout = group * self.draw.integer(1, max(1, 6 // group))
        kernel, strides, pads, dilations, output_padding, out = [], [], [0, 0, 0, 0], [], [], []
        for axis, size in enumerate((h, w)):
            k, s, d = self.draw.integer(1, 4), self.draw.integer(1, 3), self.draw.choice([1, 1, 2])
            op = self.draw.integer(0, s - 1)
            full = conv_transpose_out(size, k, s, 0, 0, d, op)
            begin = min(self.draw.integer(0, 2), (full - 1) // 2)
            end = min(self.draw.integer(0, 2), full - 1 - begin)
            pads[axis], pads[axis + 2] = begin, end
            kernel.append(k)
            strides.append(s)
            dilations.append(d)
            output_padding.append(op)
            out.append(conv_transpose_out(size, k, s, begin, end, d, op))
        if max(out) > MAX_SIDE:
            return x
        weight = self.constant("W", self.weights((cin, cout // group, *kernel), cin // group))
        inputs = [x, weight] + ([self.constant("B", 0.3 * self.rng.standard_normal(cout).astype(np.float32))]
                                if self.draw.flag(0.5) else [])
        self.blocks.append(f"ConvTranspose {cin}->{cout} g{group} k{tuple(kernel)} s{tuple(strides)} p{tuple(pads)} "
                           f"d{tuple(dilations)} op{tuple(output_padding)} on {(cin, h, w)}")
        return self.node("ConvTranspose", inputs, (cout, *out), group=group, kernel_shape=kernel, strides=strides,
                         pads=pads, dilations=dilations, output_padding=output_padding)

    def pool(self, x: str, op: str | None = None, stride: tuple[int, int] | None = None) -> str:
        """A pooling op; with `stride`, one whose output side is ⌊(side − 1)/stride⌋ + 1 (for parallel branches)."""
        cin, h, w = self.shapes[x]
        op = op or self.draw.choice(["MaxPool", "AveragePool"])
        kernel, strides, pads, dilations = [], [], [0, 0, 0, 0], []
        ceil_mode = stride is None and self.draw.flag(0.4)
        for axis, size in enumerate((h, w)):
            if stride is not None:
                k = self.draw.choice([1, 3, 2])
                s, d, begin = stride[axis], 1, (k - 1) // 2
                end = k - 1 - begin
            else:
                k, s = self.draw.integer(1, 4), self.draw.integer(1, 3)
                d = self.draw.choice([1, 1, 2]) if op == "MaxPool" else 1
                begin, end = self.draw.integer(0, k - 1), self.draw.integer(0, k - 1)
                if size + begin + end < d * (k - 1) + 1:
                    d, k, begin, end = 1, min(k, size), min(begin, size - 1), min(end, size - 1)
                if d > 1 and not _every_window_reads_input(size, k, s, d, begin, end, ceil_mode):
                    d = 1  # a MaxPool window wholly in the padding gives -FLT_MAX (fuzz seed 3: NaN after GAP, Gemm)
            kernel.append(k)
            strides.append(s)
            dilations.append(d)
            pads[axis], pads[axis + 2] = begin, end
        sizes = (h, w)
        out = [pool_out(sizes[i], kernel[i], strides[i], pads[i], pads[i + 2], dilations[i], ceil_mode) for i in range(2)]
        if ceil_mode and out != [pool_out(sizes[i], kernel[i], strides[i], pads[i], pads[i + 2], dilations[i], True,
                                          drop_last=False) for i in range(2)]:
            # onnx's shape inference keeps a last window that starts in the end padding, onnxruntime drops it: the
            # two disagree on this geometry, and cnnc's emitted model would fail the full checker (see
            # test_fuzz_regressions.py::test_ceil_mode_pool_where_onnx_and_onnxruntime_disagree_is_refused_cleanly).
            ceil_mode = False
            out = [pool_out(sizes[i], kernel[i], strides[i], pads[i], pads[i + 2], dilations[i], False)
                   for i in range(2)]
        attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads}
        if ceil_mode:
            attrs["ceil_mode"] = 1
        if op == "MaxPool" and dilations != [1, 1]:
            attrs["dilations"] = dilations
        if op == "AveragePool":
            attrs["count_include_pad"] = int(self.draw.flag(0.5))
        self.blocks.append(f"{op} k{tuple(kernel)} s{tuple(strides)} p{tuple(pads)} d{tuple(dilations)} "
                           f"ceil={int(ceil_mode)}" + (f" cip={attrs['count_include_pad']}" if op == "AveragePool"
                                                        else "") + f" on {(cin, h, w)}")
        return self.node(op, [x], (cin, *out), **attrs)

    def pad(self, x: str) -> str:
        c, h, w = self.shapes[x]
        mode = self.draw.choice(["constant", "reflect", "edge"])
        limit = {"constant": 3, "edge": 3, "reflect": None}[mode]
        spatial = []
        for size in (h, w):
            high = min(3, size - 1) if limit is None else limit
            spatial.append((self.draw.integer(0, high), self.draw.integer(0, high)))
        channel = (self.draw.integer(0, 2), self.draw.integer(0, 2)) if mode == "constant" and self.draw.flag(
            0.2) else (0, 0)
        pads = [0, channel[0], spatial[0][0], spatial[1][0], 0, channel[1], spatial[0][1], spatial[1][1]]
        axes = None
        if self.opset >= 18 and channel == (0, 0) and self.draw.flag(0.5):  # Pad-18's axes: pads of those only
            axes = self.draw.choice([[2, 3], [-2, -1], [3, 2]])
            pads = [pads[a % 4] for a in axes] + [pads[a % 4 + 4] for a in axes]
        inputs = [x, self.constant("pads", np.array(pads, np.int64))]
        if mode == "constant" and self.draw.flag(0.5):
            inputs.append(self.constant("value", np.array(self.rng.choice([0.5, -1.0, 2.0]), np.float32)))
        if axes is not None:
            inputs += [""] * (3 - len(inputs)) + [self.constant("axes", np.array(axes, np.int64))]
        shape = (c + sum(channel), h + sum(spatial[0]), w + sum(spatial[1]))
        if shape[0] > MAX_CHANNELS or max(shape[1:]) > MAX_SIDE:
            return x
        self.blocks.append(f"Pad {mode} {pads}" + (f" axes={axes}" if axes else "") + f" on {(c, h, w)}")
        return self.node("Pad", inputs, shape, mode=mode)

    def resize(self, x: str) -> str:
        c, h, w = self.shapes[x]
        mode = self.draw.choice(["nearest", "linear"] * 6 + ["cubic"])
        transform = self.draw.choice(["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
        scales = [self.draw.choice([2.0, 1.0, 0.5, 1.5, 3.0, 0.75]) for _ in range(2)]
        out = [math.floor(size * scale) for size, scale in zip((h, w), scales)]
        if min(out) < 1 or max(out) > MAX_SIDE:
            return x
        attrs = {"mode": mode, "coordinate_transformation_mode": transform}
        if mode == "nearest":
            attrs["nearest_mode"] = self.draw.choice(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
        scale_name = self.constant("scales", np.array([1.0, 1.0, *scales], np.float32))
        self.blocks.append(f"Resize {mode} {transform} {attrs.get('nearest_mode', '')} scales {scales} on "
                           f"{(c, h, w)}")
        return self.node("Resize", [x, "", scale_name], (c, *out), **attrs)

    # --- blocks ---

    def tied_conv(self, conv_output: str, x: str) -> str:
        """Another Conv with the same weights (and bias) as the one writing `conv_output`, reading `x`."""
        source = next(node for node in self.nodes if node.output[0] == conv_output)
        node = onnx.NodeProto()
        node.CopyFrom(source)
        node.input[0] = x
        node.output[0] = self.fresh("conv_")
        node.name = self.fresh("n") if self.named else ""
        self.nodes.append(node)
        self.shapes[node.output[0]] = self.shapes[conv_output]
        self.blocks.append(f"Conv sharing the weights of {conv_output}")
        return node.output[0]

    def conv_block(self, x: str) -> str:
        if self.draw.flag(0.15):  # BN in front of a pad-free conv: fold-bn folds it into the conv that follows
            x = self.batch_norm(x)
            cin, h, w = self.shapes[x]
            kernel = (self.draw.integer(1, min(3, h)), self.draw.integer(1, min(3, w)))
            group = self.draw.choice([1] + [g for g in _divisors(cin) if g > 1])
            y = self.conv(x, group * self.draw.integer(1, 3), group, kernel, (self.draw.integer(1, 2), 1),
                          (0, 0, 0, 0), (1, 1), self.draw.flag(0.5))
        else:
            y = self.conv_transpose(x) if self.draw.flag(0.2) else self.free_conv(x)
        if self.draw.flag(0.5):
            y = self.batch_norm(y)
        if self.draw.flag(0.6):
            y = self.activation(y)
        return y

    def residual_block(self, x: str) -> str:
        cin = self.shapes[x][0]
        stride = (self.draw.choice([1, 2]), self.draw.choice([1, 2]))
        cout = self.draw.choice([cin, min(MAX_CHANNELS, 2 * cin), max(1, cin // 2)])
        body = self.same_size_conv(x, cout, stride)
        if self.draw.flag(0.5):
            body = self.batch_norm(body)
        if self.draw.flag(0.5):
            body = self.activation(body)
        if self.draw.flag(0.4):
            first = body
            body = self.same_size_conv(body, cout, (1, 1))
            if stride == (1, 1) and cout == cin and self.draw.flag(0.3):  # a third conv, tied to the second
                body = self.tied_conv(body, first)
            if self.draw.flag(0.5):
                body = self.batch_norm(body)
        skip = x
        if cout != cin or stride != (1, 1) or self.draw.flag(0.2):
            skip = self.conv(x, cout, 1, (1, 1), stride, (0, 0, 0, 0), (1, 1), bias=self.draw.flag(0.5))
            if self.draw.flag(0.5):
                skip = self.batch_norm(skip)
        join = self.draw.choice(["add", "add", "homotopy"])
        if join == "add":
            self.blocks.append("Add (residual)")
            y = self.add(body, skip) if self.draw.flag(0.5) else self.add(skip, body)
        else:
            t = self.draw.choice([0.0, 0.3, 1.0])
            self.blocks.append(f"homotopy join t={t}")
            y = self.add(self.scale(body, 1.0 - t), self.scale(skip, t))
        return self.activation(y) if self.draw.flag(0.5) else y

    def parallel_block(self, x: str) -> str:
        """Branches reading one tensor with one output size, summed (RepVGG shapes) or concatenated (Inception)."""
        cin = self.shapes[x][0]
        stride = (self.draw.choice([1, 2]), self.draw.choice([1, 2]))
        concat = self.draw.flag(0.5)
        cout = self.draw.integer(1, 4) if concat else self.draw.choice([cin, self.draw.integer(1, 6)])
        branches, convs = [], []
        for _ in range(self.draw.integer(2, 3)):
            kinds = ["conv", "conv_bn", "avg", "max", "tied"] + (["identity"] if stride == (1, 1) else [])
            kind = self.draw.choice(kinds)
            if kind in ("avg", "max", "identity") and not concat and cout != cin or kind == "tied" and not convs:
                kind = "conv"
            if kind == "tied":  # a branch computing what another computes, with BN on one of them only
                y = self.tied_conv(convs[-1], x)
                branches.append(self.batch_norm(y) if self.draw.flag(0.7) else y)
            elif kind == "identity":
                branches.append(x)
            elif kind in ("avg", "max"):
                branches.append(self.pool(x, "AveragePool" if kind == "avg" else "MaxPool", stride))
            else:
                y = self.same_size_conv(x, cout, stride)
                convs.append(y)
                branches.append(self.batch_norm(y) if kind == "conv_bn" else y)
        if concat:
            channels = sum(self.shapes[b][0] for b in branches)
            if channels > MAX_CHANNELS:
                branches = branches[:1]
            else:
                self.blocks.append(f"Concat of {len(branches)} branches")
                spatial = self.shapes[branches[0]][1:]
                return self.node("Concat", branches, (channels, *spatial), axis=1)
        y = branches[0]
        for other in branches[1:]:
            self.blocks.append("Add (parallel branches)")
            y = self.add(y, other)
        return y

    def head(self, x: str) -> str:
        if self.draw.flag(0.4):
            c = self.shapes[x][0]
            self.blocks.append("GlobalAveragePool")
            x = self.node("GlobalAveragePool", [x], (c, 1, 1))
        features = int(np.prod(self.shapes[x]))
        self.blocks.append(f"Flatten ({features} features)")
        y = self.node("Flatten", [x], (features,), axis=1)
        if self.draw.flag(0.3):
            y = self.batch_norm(y)
        for layer in range(self.draw.integer(1, 2)):
            if layer:
                y = self.activation(y)
            y = self.gemm(y)
            if self.draw.flag(0.3):
                y = self.batch_norm(y)
        return y

    def gemm(self, x: str) -> str:
        k = self.shapes[x][0]
        n = self.draw.integer(1, 10)
        trans_b = int(self.draw.flag(0.5))
        weight = self.weights((n, k) if trans_b else (k, n), k)
        inputs = [x, self.constant("Wg", weight)]
        c_shape = self.draw.choice([None, (n,), (1, n)])
        if c_shape is not None:
            inputs.append(self.constant("C", 0.3 * self.rng.standard_normal(c_shape).astype(np.float32)))
        attrs = {"transB": trans_b, "alpha": self.draw.choice([1.0, 0.5]), "beta": self.draw.choice([1.0, 2.0])}
        self.blocks.append(f"Gemm {k}->{n} transB={trans_b} C={c_shape} alpha={attrs['alpha']} beta={attrs['beta']}")
        return self.node("Gemm", inputs, (n,), **attrs)


BLOCKS = ("conv", "residual", "parallel", "pool", "pad", "resize", "bn", "activation", "if")
OPSET18_BLOCKS = ("reduce", "split")  # forms that need opset >= 18 (fuzz_forms.py)


def build_case(draw: Draw) -> FuzzCase:
    """One random graph and its input feed."""
    rng = np.random.default_rng(draw.integer(0, 2**32 - 1))
    builder = GraphBuilder(draw, rng, named=not draw.flag(0.2))
    cin, h, w = draw.integer(1, 4), draw.integer(1, 14), draw.integer(1, 14)
    symbolic_batch = draw.flag(0.5)
    batch = draw.integer(1, 3)
    builder.opset = opset = draw.choice(fuzz_forms.OPSETS)
    builder.shapes["x"] = (cin, h, w)
    current = "x"
    inner: list[str] = []
    kinds = BLOCKS + (OPSET18_BLOCKS if opset >= 18 else ())
    for _ in range(draw.integer(1, 5)):
        kind = draw.choice(kinds)
        if kind == "conv":
            current = builder.conv_block(current)
        elif kind == "residual":
            current = builder.residual_block(current)
        elif kind == "parallel":
            current = builder.parallel_block(current)
        elif kind == "pool":
            current = builder.pool(current)
        elif kind == "pad":
            current = builder.pad(current)
        elif kind == "resize":
            current = builder.resize(current)
        elif kind == "bn":
            current = builder.batch_norm(current)
        elif kind == "if":
            current = fuzz_forms.if_block(builder, current)
        elif kind == "reduce":
            current = fuzz_forms.reduce_gate(builder, current)
        elif kind == "split":
            current = fuzz_forms.split_block(builder, current)
        else:
            current = builder.activation(current)
        if current != "x":
            inner.append(current)
    if draw.flag(0.35) and int(np.prod(builder.shapes[current])) <= 2048:
        current = builder.head(current)
    if current == "x":  # every block declined (sizes out of range): keep the graph non-empty
        current = builder.activation(current)
    outputs = [current]
    earlier = [t for t in inner if t != current]
    if earlier and draw.flag(0.2):
        outputs.append(draw.choice(earlier))
    batch_dim: int | str = "N" if symbolic_batch else batch

    def info(name: str):
        return oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [batch_dim, *builder.shapes[name]])

    feeds = {"x": rng.standard_normal((batch, cin, h, w)).astype(np.float32)}
    shadowed, defaults_overridden = fuzz_forms.shadow_inputs(builder, rng) if draw.flag(0.15) else ([], {})
    feeds.update(defaults_overridden)
    graph = oh.make_graph(builder.nodes, "fuzz", [info("x"), *shadowed], [info(o) for o in outputs],
                          initializer=builder.initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], producer_name="cnnc-fuzz")
    model.ir_version = fuzz_forms.ir_version_for(opset)
    if draw.flag(0.15):
        fuzz_forms.to_float16(model, feeds)
        builder.blocks.append("float16")
    return FuzzCase(model, feeds, builder.blocks)


@st.composite
def cnn_graphs(draw) -> FuzzCase:
    return build_case(HypothesisDraw(draw))


def random_case(seed: int) -> FuzzCase:
    return build_case(RandomDraw(np.random.default_rng(seed)))


def case_forms(case: FuzzCase) -> list[str]:
    """The issue-16 forms a case holds, for the long profile's counts."""
    forms = [f"opset {case.model.opset_import[0].version}"]
    forms += ["float16"] * (case.feeds["x"].dtype == np.float16)
    forms += ["input with a default"] * (len(case.model.graph.input) > 1)
    ops = case.op_types()
    forms += [f"{op} ({why})" for op, why in (("If", "constant condition"), ("Split", "num_outputs"),
                                              ("ReduceMean", "axes input"), ("ReduceMax", "axes input"),
                                              ("ReduceSum", "axes input")) if ops[op]]
    forms += ["Pad (axes)"] * any(n.op_type == "Pad" and len(n.input) > 3 for n in case.model.graph.node)
    return forms


# --- the differential check ----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    spec: str
    status: str  # "ok", "mismatch" or "crash"
    changed: bool = False
    detail: str = ""
    max_abs: float = 0.0
    scale: float = 1.0
    seconds: float = 0.0
    float64_judged: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_on_onnxruntime(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    from cnnc.runtime.session import make_session

    return make_session(model, "cpu", "disabled").run(None, feeds)


def _float64_reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray] | None:
    from cnnc.eval import evaluate_graph, unsupported_reason
    from cnnc.ir import import_model

    graph = import_model(model)  # inputs with a default stay inputs: the feeds override them
    if any(unsupported_reason(node) for node in graph.nodes):
        return None
    values = evaluate_graph(graph, feeds)
    return [values[o.name] for o in model.graph.output]


def allowed_error(reference: np.ndarray) -> float:
    """The verdict's bound on max|got − reference|: float32 1e-5·max(1, max|ref|) (this fuzzer's own, tighter than
    the equivalence check's); other dtypes the equivalence check's per-dtype atol + rtol·max|ref|
    (`cnnc.io.precision`: float16 2e-3 + 2e-2·max|ref|)."""
    from cnnc.io.precision import precision_tolerance

    peak = float(np.max(np.abs(reference.astype(np.float64)), initial=0.0))
    if reference.dtype == np.float32:
        return RELATIVE_TOLERANCE * max(1.0, peak)
    tolerance = precision_tolerance(reference.dtype)
    return tolerance.atol + tolerance.rtol * peak


def check_pass(case: FuzzCase, spec: str, reference: list[np.ndarray] | None = None) -> Outcome:
    """Run pipeline `spec` on the case strictly and compare with the original on onnxruntime (see module doc)."""
    if reference is None:
        reference = run_on_onnxruntime(case.model, case.feeds)
    started = time.perf_counter()
    outcome = Outcome(spec, "ok")
    folder = tempfile.mkdtemp(prefix="cnnc-fuzz-") if "{feeds}" in spec else None
    try:
        if folder is not None:  # the case's input as a .npy, for passes that take sample inputs
            np.save(os.path.join(folder, "feeds.npy"), case.feeds["x"])
            spec = spec.replace("{feeds}", os.path.join(folder, "feeds.npy"))
        original = case.model.SerializeToString()
        run = run_passes(case.model, spec)
        outcome.changed, compiled = run.changed, run.model
        if case.model.SerializeToString() != original:  # the caller's model is read-only (issue 16, defect 2)
            case.model.ParseFromString(original)  # as it was, for the specs that follow
            raise AssertionError(f"{spec} modified the caller's ModelProto")
        got = run_on_onnxruntime(compiled, case.feeds)
    except Exception as error:  # noqa: BLE001 - whatever a pass or onnxruntime raises is a crash to report
        outcome.status = "crash"
        outcome.detail = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-6)}"
        outcome.seconds = time.perf_counter() - started
        return outcome
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    outcome.seconds = time.perf_counter() - started
    inputs = [i.name for i in case.model.graph.input]
    if [i.name for i in compiled.graph.input] != inputs:  # an input with a default (shadowed) must stay an input
        outcome.status, outcome.detail = "mismatch", f"inputs {[i.name for i in compiled.graph.input]} != {inputs}"
        return outcome
    names = [o.name for o in case.model.graph.output]
    if [o.name for o in compiled.graph.output] != names:
        outcome.status, outcome.detail = "mismatch", f"outputs {[o.name for o in compiled.graph.output]} != {names}"
        return outcome
    float64 = None
    for index, (ref, out) in enumerate(zip(reference, got)):
        if ref.shape != out.shape:
            outcome.status, outcome.detail = "mismatch", f"output {names[index]}: shape {out.shape} != {ref.shape}"
            return outcome
        scale = max(1.0, float(np.max(np.abs(ref), initial=0.0)))
        error = float(np.max(np.abs(out.astype(np.float64) - ref), initial=0.0))
        outcome.max_abs, outcome.scale = max(outcome.max_abs, error), max(outcome.scale, scale)
        allowed = allowed_error(ref)
        if error <= allowed:
            continue
        if float64 is None:
            float64 = _float64_reference(case.model, case.feeds) or []
        if float64:
            exact = float64[index].astype(np.float64)
            own = float(np.max(np.abs(out - exact)))
            original = float(np.max(np.abs(ref - exact)))
            outcome.float64_judged = True
            if own <= max(allowed, FLOAT64_ERROR_FACTOR * original):
                continue
            extra = f"; against float64: {own:.3g}, the original's own {ref.dtype} error {original:.3g}"
        else:
            extra = "; no float64 evaluation (unsupported op)"
        outcome.status = "mismatch"
        outcome.detail = f"output {names[index]}: max|diff| {error:.3g} > {allowed:.3g} ({ref.dtype})" + extra
        return outcome
    return outcome


# Approximate passes run only under a setting that makes them exact on these graphs; the reason is stated here.
APPROXIMATE_EXACT_SETTINGS = {
    # It drops skip operands whose weight t satisfies |t| ≤ tolerance; the generated homotopy joins use
    # t ∈ {0, 0.3, 1} (and 1 − t), so it drops exactly what remove-skip drops: t = 0, which is exact.
    "remove-skip-approx": "remove-skip-approx",
    # It drops residual blocks whose mean scaled perturbation ‖f(x)‖/‖x‖ on its sample inputs is below eps (which
    # must be positive). Measured on the very input the check compares on ({feeds}: check_pass writes it to a .npy),
    # eps = 1e-30 drops only blocks whose branch is zero on that input, which leaves those outputs as they were.
    # On its default uniform [0, 1) samples it is not exact: a branch behind a ReLU that is dead for positive
    # inputs measures 0 there and not on the check's N(0, 1) input (fuzz seed 1674).
    "drop-blocks": "drop-blocks{eps=1e-30,inputs={feeds}}",
}
# Option settings that take other code paths than the defaults.
EXTRA_VARIANTS = ("destride{mode=network}", "collapse{conv=force,gemm=force}")


def fuzzed_specs() -> tuple[list[str], dict[str, str]]:
    """The pipeline specs to fuzz (every registered pass, the extra variants, the default pipeline last), and the
    approximate passes left out with the reason."""
    from cnnc.passes import DEFAULT_PIPELINE, all_pass_classes

    specs, left_out = [], {}
    passes = all_pass_classes()
    for name, cls in sorted(passes.items()):
        if cls.kind == "housekeeping":
            continue  # the manager runs it around every pass of every spec below
        if cls.exact:
            specs.append(name)
        elif name in APPROXIMATE_EXACT_SETTINGS:
            specs.append(APPROXIMATE_EXACT_SETTINGS[name])
        else:
            left_out[name] = (f"approximate pass {name} has no setting known to be exact on random graphs: add one "
                              "to APPROXIMATE_EXACT_SETTINGS in tests/fuzz_graphs.py")
    specs += [spec for spec in EXTRA_VARIANTS if spec.split("{")[0] in passes]
    specs.append(",".join(DEFAULT_PIPELINE))
    return specs, left_out


def reproducer(case: FuzzCase, outcome: Outcome) -> str:
    """A failure report: the pass, what went wrong, the graph's blocks, and the model as printable text."""
    return (f"pass {outcome.spec}: {outcome.status}: {outcome.detail}\ncase: {case.describe()}\n"
            f"{onnx.printer.to_text(case.model.graph)[:6000]}")
