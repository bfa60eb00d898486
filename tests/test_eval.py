"""cnnc.eval: every supported op against onnxruntime over odd geometry, hypothesis geometry for the ops with the most
corner cases, exact Jacobians through torch.func, dynamic shapes, and a torch-exported ResNet; the op table
(cnnc.ir.ops) against the evaluator's handlers, the linearity it gives collapse, and the one topological sort.

The reference is onnxruntime's CPU provider with graph optimisations disabled, in float32; the evaluator runs in
float64 on the same float32 inputs, so agreement is to float32 rounding (relative 1e-5 of the output's magnitude).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
import torch
from helpers import make_model, run_model
from hypothesis import assume, given
from hypothesis import strategies as st

from cnnc.eval import SUPPORTED_OPS, SubgraphFunction, evaluate_graph, unsupported_reason
from cnnc.eval.registry import FAMILIES, HANDLERS, table_mismatches
from cnnc.io.frontend import from_torch
from cnnc.ir import ops
from cnnc.ir.order import CycleError, topological_order
from cnnc.zoo.blocks import ResidualBlock

RELATIVE_TOLERANCE = 1e-5
INT64_MAX = 2**63 - 1
_rng = np.random.default_rng(20261121)


def _x(*shape) -> np.ndarray:
    return _rng.standard_normal(shape).astype(np.float32)


def _ir_version(opset: int) -> int:
    return 10 if opset >= 21 else 9 if opset >= 19 else 8 if opset >= 13 else 7


@dataclasses.dataclass
class Case:
    name: str
    nodes: list
    feeds: dict
    outputs: list
    initializers: list
    opset: int

    def model(self) -> onnx.ModelProto:
        return make_model(self.nodes, [(k, list(v.shape)) for k, v in self.feeds.items()],
                          [(o, None) for o in self.outputs], self.initializers, opset=self.opset,
                          ir_version=_ir_version(self.opset))


CASES: list[Case] = []


def case(name, nodes, feeds, outputs=("y",), initializers=(), opset=17):
    nodes = nodes if isinstance(nodes, list) else [nodes]
    CASES.append(Case(name, nodes, dict(feeds), list(outputs), list(initializers), opset))


def assert_matches_onnxruntime(model: onnx.ModelProto, feeds: dict) -> dict:
    """evaluate_graph (float64) against onnxruntime (float32, CPU, optimisations off); returns our outputs."""
    expected = run_model(model, feeds)
    graph = gs.import_onnx(model)
    for node in graph.nodes:
        assert unsupported_reason(node) is None, (node.op, unsupported_reason(node))
    got = evaluate_graph(graph, feeds)
    for output, reference in zip(model.graph.output, expected):
        ours = got[output.name]
        assert ours.shape == reference.shape, (output.name, ours.shape, reference.shape)
        if reference.dtype.kind == "f":
            assert ours.dtype == np.float64
        scale = max(float(np.abs(reference).max()) if reference.size else 0.0, 1e-6)
        error = float(np.abs(ours - reference).max()) if reference.size else 0.0
        assert error <= RELATIVE_TOLERANCE * scale, (output.name, error, scale)
    return got


# ------------------------------------------------------------------------------------------------------------------
# Convolutions

for name, x_shape, w_shape, attrs, bias in [
    ("conv2d_asymmetric_pads_stride_dilation", (2, 3, 7, 9), (6, 3, 3, 2),
     {"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}, True),
    ("conv2d_depthwise_dilated", (3, 4, 6, 5), (8, 1, 3, 3),
     {"group": 4, "pads": [2, 1, 0, 3], "dilations": [2, 1]}, True),
    ("conv2d_two_groups_no_bias", (2, 4, 8, 7), (6, 2, 2, 3), {"group": 2, "strides": [2, 3]}, False),
    ("conv2d_same_upper", (2, 3, 7, 10), (4, 3, 3, 4), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, True),
    ("conv2d_same_lower", (2, 3, 8, 9), (4, 3, 2, 5), {"auto_pad": "SAME_LOWER", "strides": [3, 2]}, True),
    ("conv2d_same_stride_above_kernel", (2, 3, 8, 7), (4, 3, 1, 1),
     {"auto_pad": "SAME_UPPER", "strides": [3, 3]}, True),
    ("conv2d_valid_kernel_shape_attr", (2, 3, 7, 9), (4, 3, 3, 2),
     {"auto_pad": "VALID", "strides": [2, 3], "kernel_shape": [3, 2]}, True),
    ("conv1d", (2, 3, 17), (5, 3, 4), {"strides": [2], "dilations": [3], "pads": [3, 1]}, True),
    ("conv3d_groups", (2, 4, 5, 6, 7), (6, 2, 2, 3, 1),
     {"group": 2, "strides": [1, 2, 2], "pads": [1, 0, 1, 0, 2, 1]}, True),
]:
    inits = [("w", _x(*w_shape))] + ([("b", _x(w_shape[0]))] if bias else [])
    case(name, oh.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], **attrs), {"x": _x(*x_shape)},
         initializers=inits)

for name, x_shape, w_shape, attrs in [
    ("convtranspose2d_pads_output_padding", (2, 4, 5, 6), (4, 3, 3, 2),
     {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 2]}),
    ("convtranspose2d_groups_dilation", (2, 4, 5, 4), (4, 2, 3, 3),
     {"group": 2, "dilations": [2, 1], "pads": [2, 1, 1, 0], "strides": [1, 2]}),
    ("convtranspose2d_output_shape", (2, 4, 5, 6), (4, 3, 3, 2), {"strides": [2, 3], "output_shape": [9, 15]}),
    ("convtranspose2d_output_shape_even_total", (2, 4, 5, 6), (4, 3, 3, 2),
     {"strides": [2, 3], "output_shape": [8, 16]}),
    ("convtranspose2d_same_upper", (2, 4, 5, 6), (4, 3, 3, 2), {"strides": [2, 3], "auto_pad": "SAME_UPPER"}),
    ("convtranspose2d_same_lower", (2, 4, 5, 6), (4, 3, 3, 2), {"strides": [2, 3], "auto_pad": "SAME_LOWER"}),
    ("convtranspose2d_same_upper_output_shape", (2, 4, 5, 6), (4, 3, 3, 2),
     {"strides": [2, 3], "auto_pad": "SAME_UPPER", "output_shape": [10, 16]}),
    ("convtranspose2d_valid", (2, 4, 5, 6), (4, 3, 3, 2), {"strides": [2, 3], "auto_pad": "VALID"}),
    ("convtranspose1d", (3, 2, 7), (2, 3, 4), {"strides": [3], "output_padding": [2], "pads": [1, 2]}),
    ("convtranspose3d", (2, 2, 3, 4, 3), (2, 2, 2, 3, 2), {"strides": [2, 1, 2], "pads": [0, 1, 1, 1, 0, 0]}),
]:
    cout = w_shape[1] * attrs.get("group", 1)
    case(name, oh.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs), {"x": _x(*x_shape)},
         initializers=[("w", _x(*w_shape)), ("b", _x(cout))])

# ------------------------------------------------------------------------------------------------------------------
# Dense, normalisation and arithmetic

for name, a_shape, b_shape, c_shape, attrs in [
    ("gemm_transB_bias_vector", (3, 5), (4, 5), (4,), {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("gemm_transA_bias_matrix", (5, 3), (5, 4), (3, 4), {"transA": 1}),
    ("gemm_bias_column", (3, 5), (5, 4), (3, 1), {"beta": -1.5}),
    ("gemm_bias_row", (3, 5), (5, 4), (1, 4), {}),
    ("gemm_bias_scalar", (3, 5), (5, 4), (), {"alpha": 3.0}),
    ("gemm_without_bias", (3, 5), (4, 5), None, {"transB": 1}),
]:
    inputs = ["a", "w"] + (["c"] if c_shape is not None else [])
    inits = [("w", _x(*b_shape))] + ([("c", _x(*c_shape))] if c_shape is not None else [])
    case(name, oh.make_node("Gemm", inputs, ["y"], **attrs), {"a": _x(*a_shape)}, initializers=inits,
         opset=13)

case("matmul_constant_weight", oh.make_node("MatMul", ["x", "w"], ["y"]), {"x": _x(2, 3, 4, 5)},
     initializers=[("w", _x(5, 6))])
case("matmul_batched_two_inputs", oh.make_node("MatMul", ["x", "z"], ["y"]), {"x": _x(3, 4, 5), "z": _x(3, 5, 2)})
case("matmul_vector_left", oh.make_node("MatMul", ["x", "z"], ["y"]), {"x": _x(5), "z": _x(2, 5, 3)})
case("matmul_vector_right", oh.make_node("MatMul", ["x", "z"], ["y"]), {"x": _x(2, 3, 5), "z": _x(5)})


def _bn_inits(channels):
    return [("s", _x(channels)), ("bb", _x(channels)), ("m", _x(channels)),
            ("v", (0.5 + _rng.random(channels)).astype(np.float32))]


for name, shape, attrs in [("batchnorm4d_epsilon", (2, 3, 4, 5), {"epsilon": 1e-3}), ("batchnorm2d", (3, 4), {}),
                           ("batchnorm3d", (2, 3, 7), {}), ("batchnorm5d", (2, 3, 2, 3, 4), {})]:
    case(name, oh.make_node("BatchNormalization", ["x", "s", "bb", "m", "v"], ["y"], **attrs), {"x": _x(*shape)},
         initializers=_bn_inits(shape[1]), opset=15)

for op in ("Add", "Sub", "Mul", "Div"):
    constant = (np.abs(_x(3, 1, 1)) + 0.5) if op == "Div" else _x(3, 1, 1)
    case(f"{op.lower()}_broadcast_constant", oh.make_node(op, ["x", "c"], ["y"]), {"x": _x(2, 3, 4, 5)},
         initializers=[("c", constant)])
    other = (np.abs(_x(1, 4, 1)) + 0.5) if op == "Div" else _x(1, 4, 1)
    case(f"{op.lower()}_broadcast_two_inputs", oh.make_node(op, ["z", "x"], ["y"]), {"x": other, "z": _x(3, 1, 5)})
    case(f"{op.lower()}_scalar_first", oh.make_node(op, ["c", "x"], ["y"]),
         {"x": (np.abs(_x(2, 3)) + 0.5) if op == "Div" else _x(2, 3)},
         initializers=[("c", np.array(1.75, dtype=np.float32))])

# ------------------------------------------------------------------------------------------------------------------
# Padding and resampling

_pads_with_crop = np.array([0, 1, 2, -1, 1, 0, -2, 3])
for mode in ("constant", "reflect", "edge"):
    case(f"pad_{mode}_negative_pads", oh.make_node("Pad", ["x", "p", "v"], ["y"], mode=mode), {"x": _x(3, 4, 5, 6)},
         initializers=[("p", _pads_with_crop), ("v", np.array(1.5, dtype=np.float32))], opset=13)
    case(f"pad_{mode}_axes_input", oh.make_node("Pad", ["x", "p", "", "a"], ["y"], mode=mode), {"x": _x(2, 3, 5, 6)},
         initializers=[("p", np.array([2, 1, 0, 2])), ("a", np.array([-1, 1]))], opset=18)
    case(f"pad_{mode}_opset2_attributes", oh.make_node("Pad", ["x"], ["y"], mode=mode, pads=[0, 0, 1, 2, 0, 0, 3, 1],
                                                       value=-0.5), {"x": _x(2, 3, 5, 6)}, opset=2)
case("pad_constant_default_value", oh.make_node("Pad", ["x", "p"], ["y"]), {"x": _x(2, 3, 4)},
     initializers=[("p", np.array([1, 0, 2, 0, 2, 1]))], opset=11)

RESIZE_TRANSFORMS = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                     "half_pixel_symmetric"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
for transform in RESIZE_TRANSFORMS:
    for mode, nearest_mode in [("nearest", m) for m in NEAREST_MODES] + [("linear", "round_prefer_floor")]:
        attrs = {"mode": mode, "coordinate_transformation_mode": transform, "nearest_mode": nearest_mode}
        for label, scales in [("up_down", [1, 1, 1.7, 0.6]), ("down_up", [1, 1, 0.45, 2.5])]:
            case(f"resize_{mode}_{nearest_mode}_{transform}_scales_{label}",
                 oh.make_node("Resize", ["x", "", "s"], ["y"], **attrs), {"x": _x(2, 3, 7, 9)},
                 initializers=[("s", np.array(scales, dtype=np.float32))], opset=19)
        case(f"resize_{mode}_{nearest_mode}_{transform}_sizes",
             oh.make_node("Resize", ["x", "", "", "z"], ["y"], **attrs), {"x": _x(2, 3, 7, 4)},
             initializers=[("z", np.array([2, 3, 2, 11]))], opset=19)
case("resize_opset18_axes_scales", oh.make_node("Resize", ["x", "", "s"], ["y"], axes=[2, 3], mode="linear"),
     {"x": _x(2, 3, 5, 8)}, initializers=[("s", np.array([1.5, 0.75], dtype=np.float32))], opset=18)
case("resize_opset18_axes_sizes", oh.make_node("Resize", ["x", "", "", "z"], ["y"], axes=[-1]),
     {"x": _x(2, 3, 5, 8)}, initializers=[("z", np.array([13]))], opset=18)
for policy in ("not_larger", "not_smaller"):
    case(f"resize_keep_aspect_ratio_{policy}",
         oh.make_node("Resize", ["x", "", "", "z"], ["y"], axes=[2, 3], keep_aspect_ratio_policy=policy),
         {"x": _x(2, 3, 5, 8)}, initializers=[("z", np.array([9, 11]))], opset=18)
case("resize_trilinear_5d", oh.make_node("Resize", ["x", "", "s"], ["y"], mode="linear"), {"x": _x(1, 2, 3, 4, 5)},
     initializers=[("s", np.array([1, 1, 1.5, 2, 0.6], dtype=np.float32))], opset=13)
case("resize_nearest_channel_axis", oh.make_node("Resize", ["x", "", "s"], ["y"], nearest_mode="floor"),
     {"x": _x(2, 3, 4, 5)}, initializers=[("s", np.array([1, 1.5, 2, 1], dtype=np.float32))], opset=13)
case("resize_opset11_roi_ignored_empty_scales", oh.make_node("Resize", ["x", "r", "e", "z"], ["y"], mode="linear"),
     {"x": _x(2, 3, 4, 5)}, initializers=[("r", np.zeros(8, dtype=np.float32)), ("e", np.zeros(0, dtype=np.float32)),
                                          ("z", np.array([2, 3, 7, 3]))], opset=11)
for mode in ("nearest", "linear"):
    for label, scales in [("up", [1, 1, 2, 1.5]), ("down", [1, 1, 0.6, 0.5])]:
        case(f"resize_opset10_{mode}_{label}", oh.make_node("Resize", ["x", "s"], ["y"], mode=mode),
             {"x": _x(2, 3, 5, 7)}, initializers=[("s", np.array(scales, dtype=np.float32))], opset=10)
    case(f"upsample_opset9_{mode}", oh.make_node("Upsample", ["x", "s"], ["y"], mode=mode), {"x": _x(2, 3, 4, 5)},
         initializers=[("s", np.array([1, 1, 2, 2.5], dtype=np.float32))], opset=9)
    case(f"upsample_opset7_{mode}", oh.make_node("Upsample", ["x"], ["y"], mode=mode, scales=[1.0, 1.0, 3.0, 1.5]),
         {"x": _x(2, 3, 4, 5)}, opset=7)

# ------------------------------------------------------------------------------------------------------------------
# Pooling

for name, x_shape, attrs, opset in [
    ("averagepool_pads_exclude_pad", (2, 3, 7, 9),
     {"kernel_shape": [3, 2], "strides": [2, 3], "pads": [1, 0, 2, 1]}, 17),
    ("averagepool_pads_include_pad", (2, 3, 7, 9),
     {"kernel_shape": [3, 2], "strides": [2, 3], "pads": [1, 0, 2, 1], "count_include_pad": 1}, 17),
    ("averagepool_ceil_exclude_pad", (2, 3, 8, 9),
     {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 0], "ceil_mode": 1}, 17),
    ("averagepool_ceil_include_pad", (2, 3, 8, 9),
     {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 0], "ceil_mode": 1, "count_include_pad": 1}, 17),
    ("averagepool_ceil_window_starting_in_end_pad", (2, 1, 4, 6),
     {"kernel_shape": [2, 3], "strides": [2, 2], "pads": [0, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1}, 17),
    ("averagepool_same_upper", (2, 3, 7, 10),
     {"kernel_shape": [3, 4], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, 17),
    ("averagepool_same_lower_include_pad", (2, 3, 7, 10),
     {"kernel_shape": [2, 3], "strides": [3, 2], "auto_pad": "SAME_LOWER", "count_include_pad": 1}, 17),
    ("averagepool_valid", (2, 3, 7, 10), {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "VALID"}, 17),
    ("averagepool_dilations", (2, 3, 9, 8),
     {"kernel_shape": [3, 2], "strides": [2, 1], "dilations": [2, 3], "pads": [2, 1, 1, 1]}, 19),
    ("averagepool_dilations_ceil_include_pad", (2, 3, 9, 8),
     {"kernel_shape": [3, 2], "strides": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1,
          "count_include_pad": 1}, 19),
    ("averagepool1d", (3, 2, 11), {"kernel_shape": [4], "strides": [3], "pads": [2, 1], "ceil_mode": 1}, 17),
    ("averagepool3d", (2, 2, 5, 6, 4),
     {"kernel_shape": [2, 3, 2], "strides": [2, 2, 1], "pads": [1, 0, 1, 0, 1, 0]}, 17),
]:
    case(name, oh.make_node("AveragePool", ["x"], ["y"], **attrs), {"x": _x(*x_shape)}, opset=opset)

for name, x_shape, attrs in [
    ("maxpool_pads_strides", (2, 3, 7, 9), {"kernel_shape": [3, 2], "strides": [2, 3], "pads": [1, 0, 2, 1]}),
    ("maxpool_ceil_dilations", (2, 3, 9, 8),
     {"kernel_shape": [3, 2], "strides": [2, 2], "dilations": [2, 3], "pads": [1, 1, 1, 0], "ceil_mode": 1}),
    ("maxpool_same_upper", (2, 3, 7, 10), {"kernel_shape": [3, 3], "strides": [2, 3], "auto_pad": "SAME_UPPER"}),
    ("maxpool1d", (3, 2, 11), {"kernel_shape": [4], "strides": [3], "pads": [2, 1]}),
    ("maxpool3d", (2, 2, 5, 6, 4), {"kernel_shape": [2, 3, 2], "strides": [2, 2, 1], "pads": [1, 0, 1, 0, 1, 0]}),
]:
    case(name, oh.make_node("MaxPool", ["x"], ["y"], **attrs), {"x": _x(*x_shape)}, opset=12)

for shape in [(2, 3, 5, 7), (3, 4, 6), (2, 2, 3, 4, 5)]:
    case(f"globalaveragepool_{len(shape) - 2}d", oh.make_node("GlobalAveragePool", ["x"], ["y"]), {"x": _x(*shape)})

# ------------------------------------------------------------------------------------------------------------------
# Reductions and data movement

case("reducemean_axes_attribute_no_keepdims", oh.make_node("ReduceMean", ["x"], ["y"], axes=[1, -1], keepdims=0),
     {"x": _x(2, 3, 4, 5)}, opset=17)
case("reducemean_all_axes", oh.make_node("ReduceMean", ["x"], ["y"]), {"x": _x(2, 3, 4, 5)}, opset=17)
case("reducemean_axes_input", oh.make_node("ReduceMean", ["x", "a"], ["y"]), {"x": _x(2, 3, 4, 5)},
     initializers=[("a", np.array([-2]))], opset=18)
case("reducemean_noop_with_empty_axes", oh.make_node("ReduceMean", ["x"], ["y"], noop_with_empty_axes=1),
     {"x": _x(2, 3, 4)}, opset=18)
case("reducesum_axes_attribute", oh.make_node("ReduceSum", ["x"], ["y"], axes=[2]), {"x": _x(2, 3, 4, 5)}, opset=11)
case("reducesum_axes_input_no_keepdims", oh.make_node("ReduceSum", ["x", "a"], ["y"], keepdims=0),
     {"x": _x(2, 3, 4, 5)}, initializers=[("a", np.array([0, 3]))], opset=13)
case("reducesum_all_axes", oh.make_node("ReduceSum", ["x"], ["y"], keepdims=0), {"x": _x(2, 3, 4)}, opset=13)
case("reducesum_noop_with_empty_axes", oh.make_node("ReduceSum", ["x"], ["y"], noop_with_empty_axes=1),
     {"x": _x(2, 3, 4)}, opset=13)

case("concat_negative_axis", oh.make_node("Concat", ["x", "c", "z"], ["y"], axis=-1),
     {"x": _x(2, 3, 4), "z": _x(2, 3, 1)}, initializers=[("c", _x(2, 3, 2))])
case("concat_channels", oh.make_node("Concat", ["x", "z"], ["y"], axis=1), {"x": _x(2, 3, 4, 5), "z": _x(2, 1, 4, 5)})

case("split_attribute", oh.make_node("Split", ["x"], ["y0", "y1", "y2"], axis=-1, split=[2, 3, 1]),
     {"x": _x(2, 3, 6)}, outputs=["y0", "y1", "y2"], opset=11)
case("split_input", oh.make_node("Split", ["x", "s"], ["y0", "y1"], axis=1), {"x": _x(2, 5, 3)},
     outputs=["y0", "y1"], initializers=[("s", np.array([4, 1]))], opset=13)
case("split_equal", oh.make_node("Split", ["x"], ["y0", "y1", "y2"], axis=2), {"x": _x(2, 3, 6)},
     outputs=["y0", "y1", "y2"], opset=13)
case("split_num_outputs_uneven", oh.make_node("Split", ["x"], ["y0", "y1", "y2"], axis=1, num_outputs=3),
     {"x": _x(2, 7, 3)}, outputs=["y0", "y1", "y2"], opset=18)

for name, starts, ends, axes, steps in [
    ("slice_reverse_whole_axis", [-1], [-INT64_MAX], [2], [-1]),
    ("slice_negative_and_positive_steps", [4, 1], [0, 100], [-1, 1], [-2, 2]),
    ("slice_clamped_negative_step", [100, -2], [-100, -6], [3, 2], [-3, -1]),
    ("slice_empty_result", [3], [1], [1], [1]),
    ("slice_without_axes_and_steps", [1, 0, 2], [3, -1, INT64_MAX], None, None),
]:
    inputs = ["x", "st", "en"] + (["ax"] if axes is not None else []) + (["sp"] if steps is not None else [])
    inits = [("st", np.array(starts)), ("en", np.array(ends))]
    inits += ([("ax", np.array(axes))] if axes is not None else []) + ([("sp", np.array(steps))] if steps else [])
    case(name, oh.make_node("Slice", inputs, ["y"]), {"x": _x(3, 5, 6, 7)}, initializers=inits, opset=13)
case("slice_opset9_attributes", oh.make_node("Slice", ["x"], ["y"], starts=[1, 0], ends=[1000, -1], axes=[2, 3]),
     {"x": _x(2, 3, 5, 6)}, opset=9)

for name, shape, attrs in [("reshape_copy_and_infer", [0, -1], {}), ("reshape_zeros_kept", [0, 0, 3, -1], {}),
                           ("reshape_allowzero", [6, -1], {"allowzero": 1}), ("reshape_flat", [-1], {})]:
    case(name, oh.make_node("Reshape", ["x", "s"], ["y"], **attrs), {"x": _x(2, 3, 6, 2)},
         initializers=[("s", np.array(shape))], opset=14)
for axis in (0, 2, -1, None):
    attrs = {} if axis is None else {"axis": axis}
    case(f"flatten_axis_{axis}", oh.make_node("Flatten", ["x"], ["y"], **attrs), {"x": _x(2, 3, 4, 5)})
case("transpose_perm", oh.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1]), {"x": _x(2, 3, 4, 5)})
case("transpose_default_reverses", oh.make_node("Transpose", ["x"], ["y"]), {"x": _x(2, 3, 4)})
case("squeeze_axes_attribute", oh.make_node("Squeeze", ["x"], ["y"], axes=[1, -1]), {"x": _x(2, 1, 3, 1)}, opset=11)
case("squeeze_axes_input", oh.make_node("Squeeze", ["x", "a"], ["y"]), {"x": _x(1, 3, 1, 4)},
     initializers=[("a", np.array([0]))], opset=13)
case("squeeze_all", oh.make_node("Squeeze", ["x"], ["y"]), {"x": _x(1, 3, 1, 4)}, opset=13)
case("unsqueeze_axes_attribute", oh.make_node("Unsqueeze", ["x"], ["y"], axes=[0, -1]), {"x": _x(2, 3)}, opset=11)
case("unsqueeze_axes_input", oh.make_node("Unsqueeze", ["x", "a"], ["y"]), {"x": _x(2, 3, 4)},
     initializers=[("a", np.array([-1, 1, 3]))], opset=13)
case("spacetodepth", oh.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2), {"x": _x(2, 3, 6, 8)})
for mode in ("DCR", "CRD"):
    case(f"depthtospace_{mode}", oh.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode=mode),
         {"x": _x(2, 8, 3, 5)})
case("identity", oh.make_node("Identity", ["x"], ["y"]), {"x": _x(2, 3)})
case("dropout_inference_with_mask", [oh.make_node("Dropout", ["x", "r"], ["y", "mask"]),
                                     oh.make_node("Cast", ["mask"], ["mask_f"], to=onnx.TensorProto.FLOAT)],
     {"x": _x(2, 3, 4)}, outputs=["y", "mask_f"], initializers=[("r", np.array(0.3, dtype=np.float32))], opset=13)
case("dropout_training_mode_false", oh.make_node("Dropout", ["x", "r", "t"], ["y"]), {"x": _x(2, 3)},
     initializers=[("r", np.array(0.5, dtype=np.float32)), ("t", np.array(False))], opset=12)
case("dropout_opset7", oh.make_node("Dropout", ["x"], ["y"], ratio=0.2), {"x": _x(2, 3)}, opset=7)

# ------------------------------------------------------------------------------------------------------------------
# Nonlinear ops (for explain / analyze) and the exporters' shape ops

for op, attrs in [("Relu", {}), ("LeakyRelu", {}), ("LeakyRelu", {"alpha": 0.2}), ("Sigmoid", {}), ("Tanh", {})]:
    case(f"{op.lower()}_{attrs.get('alpha', 'default')}", oh.make_node(op, ["x"], ["y"], **attrs),
         {"x": _x(2, 3, 4, 5)})
case("clip_opset6_attributes", oh.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.7), {"x": _x(2, 3, 4)}, opset=6)
case("clip_min_only", oh.make_node("Clip", ["x", "lo"], ["y"]), {"x": _x(2, 3, 4)},
     initializers=[("lo", np.array(-0.3, dtype=np.float32))], opset=13)
case("clip_max_only", oh.make_node("Clip", ["x", "", "hi"], ["y"]), {"x": _x(2, 3, 4)},
     initializers=[("hi", np.array(0.1, dtype=np.float32))], opset=13)
case("clip_min_above_max", oh.make_node("Clip", ["x", "lo", "hi"], ["y"]), {"x": _x(2, 3, 4)},
     initializers=[("lo", np.array(0.5, dtype=np.float32)), ("hi", np.array(-0.5, dtype=np.float32))], opset=13)
for opset, attrs in [(11, {}), (11, {"axis": 2}), (13, {}), (13, {"axis": 1})]:
    case(f"softmax_opset{opset}_axis_{attrs.get('axis', 'default')}", oh.make_node("Softmax", ["x"], ["y"], **attrs),
         {"x": _x(2, 3, 4, 5)}, opset=opset)

# x.view(x.size(0), -1) as the TorchScript exporter writes it: Shape -> Gather -> Unsqueeze -> Concat -> Reshape.
case("shape_gather_concat_reshape", [
    oh.make_node("Shape", ["x"], ["shape"]),
    oh.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
    oh.make_node("Unsqueeze", ["batch", "axis0"], ["batch_1d"]),
    oh.make_node("Concat", ["batch_1d", "minus_one"], ["target"], axis=0),
    oh.make_node("Reshape", ["x", "target"], ["y"]),
], {"x": _x(3, 2, 4, 5)}, initializers=[("zero", np.array(0)), ("axis0", np.array([0])),
                                        ("minus_one", np.array([-1]))], opset=13)
case("shape_start_end_cast", [oh.make_node("Shape", ["x"], ["s"], start=1, end=-1),
                              oh.make_node("Cast", ["s"], ["y"], to=onnx.TensorProto.FLOAT)],
     {"x": _x(2, 3, 4, 5)}, opset=15)
case("gather_floats_negative_indices", oh.make_node("Gather", ["x", "i"], ["y"], axis=1), {"x": _x(2, 5, 3)},
     initializers=[("i", np.array([[0, -1], [2, 1]]))])
case("cast_float_int_float_truncates", [oh.make_node("Mul", ["x", "k"], ["scaled"]),
                                        oh.make_node("Cast", ["scaled"], ["i"], to=onnx.TensorProto.INT64),
                                        oh.make_node("Cast", ["i"], ["y"], to=onnx.TensorProto.FLOAT)],
     {"x": _x(2, 3, 4)}, initializers=[("k", np.array(3.0, dtype=np.float32))])
case("constantofshape_add", [oh.make_node("ConstantOfShape", ["shape"], ["c"],
                                          value=onnx.numpy_helper.from_array(np.array([2.5], dtype=np.float32))),
                             oh.make_node("Add", ["x", "c"], ["y"])],
     {"x": _x(2, 3)}, initializers=[("shape", np.array([2, 3]))])
case("constant_node", [oh.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(_x(3, 1))),
                       oh.make_node("Mul", ["x", "c"], ["y"])], {"x": _x(2, 3, 4)})


@pytest.mark.parametrize("example", CASES, ids=[c.name for c in CASES])
def test_op_matches_onnxruntime(example: Case):
    assert_matches_onnxruntime(example.model(), example.feeds)


def test_every_supported_op_has_a_case():
    covered = {node.op_type for example in CASES for node in example.model().graph.node}
    assert SUPPORTED_OPS <= covered, sorted(SUPPORTED_OPS - covered)


# ------------------------------------------------------------------------------------------------------------------
# What the evaluator refuses


def _v(name):
    return gs.Variable(name, dtype=np.float32)


REFUSED = [
    ("pad_wrap", gs.Node("Pad", attrs={"mode": "wrap"}, inputs=[_v("x"), gs.Constant("p", np.zeros(8, np.int64))],
                         outputs=[_v("y")]), "wrap"),
    ("resize_cubic", gs.Node("Resize", attrs={"mode": "cubic"},
                             inputs=[_v("x"), _v(""), gs.Constant("s", np.ones(4, np.float32))], outputs=[_v("y")]),
     "cubic"),
    ("resize_tf_crop_and_resize", gs.Node("Resize", attrs={"coordinate_transformation_mode": "tf_crop_and_resize"},
                                          inputs=[_v("x"), _v(""), gs.Constant("s", np.ones(4, np.float32))],
                                          outputs=[_v("y")]), "tf_crop_and_resize"),
    ("resize_linear_antialias", gs.Node("Resize", attrs={"mode": "linear", "antialias": 1},
                                        inputs=[_v("x"), _v(""), gs.Constant("s", np.ones(4, np.float32))],
                                        outputs=[_v("y")]), "antialias"),
    ("batchnorm_training", gs.Node("BatchNormalization", attrs={"training_mode": 1},
                                   inputs=[_v("x")] + [gs.Constant(n, np.ones(3, np.float32)) for n in "sbmv"],
                                   outputs=[_v("y"), _v("running_mean"), _v("running_var")]), "training"),
    ("maxpool_indices", gs.Node("MaxPool", attrs={"kernel_shape": [2, 2]}, inputs=[_v("x")],
                                outputs=[_v("y"), gs.Variable("indices", dtype=np.int64)]), "Indices"),
    ("conv_same_dilated", gs.Node("Conv", attrs={"auto_pad": "SAME_UPPER", "dilations": [2, 2]},
                                  inputs=[_v("x"), gs.Constant("w", np.ones((2, 2, 3, 3), np.float32))],
                                  outputs=[_v("y")]), "dilation"),
    ("conv_4d_kernel", gs.Node("Conv", inputs=[_v("x"), gs.Constant("w", np.ones((2, 2, 1, 1, 1, 1), np.float32))],
                               outputs=[_v("y")]), "4-D kernel"),
    ("dropout_training", gs.Node("Dropout", inputs=[_v("x"), gs.Constant("r", np.array(0.5, np.float32)),
                                                    gs.Constant("t", np.array(True))], outputs=[_v("y")]),
     "training mode"),
    ("dropout_unknown_training", gs.Node("Dropout", inputs=[_v("x"), gs.Constant("r", np.array(0.5, np.float32)),
                                                            gs.Variable("t", dtype=np.bool_)], outputs=[_v("y")]),
     "non-constant training_mode"),
    ("custom_domain", gs.Node("Conv", domain="com.example", inputs=[_v("x")], outputs=[_v("y")]), "custom domain"),
    ("unknown_op", gs.Node("Erf", inputs=[_v("x")], outputs=[_v("y")]), "not supported"),
    ("cast_to_string", gs.Node("Cast", attrs={"to": onnx.TensorProto.STRING}, inputs=[_v("x")], outputs=[_v("y")]),
     "STRING"),
]


@pytest.mark.parametrize("node, fragment", [(n, f) for _, n, f in REFUSED], ids=[name for name, _, _ in REFUSED])
def test_unsupported_reason_names_the_problem_and_the_constructor_refuses(node, fragment):
    reason = unsupported_reason(node)
    assert reason is not None and fragment in reason
    with pytest.raises(ValueError, match=node.op):
        SubgraphFunction([node], [node.inputs[0]], [node.outputs[0]])


def test_constructor_refuses_unwired_inputs_and_missing_outputs():
    x, z, y = _v("x"), _v("z"), _v("y")
    add = gs.Node("Add", inputs=[x, z], outputs=[y])
    with pytest.raises(ValueError, match="'z'"):
        SubgraphFunction([add], [x], [y])
    with pytest.raises(ValueError, match="'w'"):
        SubgraphFunction([add], [x, z], [_v("w")])


def test_call_time_refusals():
    # reflect padding beyond the axis: onnxruntime refuses it, so must we
    x = gs.Variable("x", dtype=np.float32)
    pad = gs.Node("Pad", attrs={"mode": "reflect"}, inputs=[x, gs.Constant("p", np.array([0, 3, 0, 0]))],
                  outputs=[_v("y")])
    with pytest.raises(ValueError, match="reflect"):
        SubgraphFunction([pad], [x], pad.outputs)(torch.zeros(2, 3))
    # Softmax without the opset: evaluated only where opsets 11 and 13 agree
    softmax = gs.Node("Softmax", inputs=[x], outputs=[_v("s")])
    function = SubgraphFunction([softmax], [x], softmax.outputs)
    rows = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(function(rows)[0], torch.softmax(rows, dim=1))
    with pytest.raises(ValueError, match="opset"):
        function(torch.randn(2, 3, 4))
    torch.testing.assert_close(SubgraphFunction([softmax], [x], softmax.outputs, opset=13)(rows.reshape(3, 2, 2))[0],
                               torch.softmax(rows.reshape(3, 2, 2), dim=-1))
    # an explicit output_shape larger than the transposed convolution produces
    convt = gs.Node("ConvTranspose", attrs={"output_shape": [9]},
                    inputs=[x, gs.Constant("w", np.ones((1, 1, 3), np.float32))], outputs=[_v("t")])
    with pytest.raises(ValueError, match="output_shape"):
        SubgraphFunction([convt], [x], convt.outputs)(torch.zeros(1, 1, 3))


# ------------------------------------------------------------------------------------------------------------------
# The op table (cnnc.ir.ops): one row per op, one handler per evaluated op, and the one topological sort


def test_op_table_and_handlers_agree_both_ways():
    assert table_mismatches() == []
    assert set(HANDLERS) == ops.EVALUATED_OPS == SUPPORTED_OPS
    for name, module in FAMILIES.items():
        assert set(module.HANDLERS) == {op for op, facts in ops.OPS.items() if facts.family == name}, name
        assert set(module.REASONS) <= set(module.HANDLERS), name


def test_an_op_added_to_the_table_without_its_handler_is_named(monkeypatch):
    monkeypatch.setitem(ops.OPS, "Neg", ops.OpFacts("arithmetic", ops.always, explain=ops.PIECEWISE_LINEAR))
    assert table_mismatches() == ["Neg: the op table routes it to cnnc/eval/arithmetic.py, which has no handler"]
    monkeypatch.delitem(ops.OPS, "Neg")
    monkeypatch.delitem(ops.OPS, "Tanh")
    assert table_mismatches() == ["Tanh: cnnc/eval/activations.py handles it, but the op table does not route it there"]


def test_linearity_comes_from_the_table():
    x, z, c = _v("x"), _v("z"), gs.Constant("c", np.ones(3, np.float32))

    def node(op, *inputs, **attrs):
        return gs.Node(op, attrs=attrs, inputs=list(inputs), outputs=[_v("y")])

    assert ops.linear_reason(node("Mul", x, c)) is None
    assert ops.linear_reason(node("Mul", x, z)) == "Mul of two non-constant values is bilinear"
    assert ops.linear_reason(node("Div", x, c)) is None
    assert ops.linear_reason(node("Div", c, x)) == "Div by a non-constant value is not linear"
    assert ops.linear_reason(node("Conv", x, z)) == "Conv has a non-constant weight, shape or parameter input"
    assert ops.linear_reason(node("Pad", x, c, mode="wrap")) == "Pad mode wrap is not supported"
    assert ops.linear_reason(node("Relu", x)) == "Relu is not linear"
    assert ops.linear_reason(node("NoSuchOp", x)) == "NoSuchOp is not linear"
    assert ops.facts("NoSuchOp") == ops.OpFacts()
    assert "Reshape" in ops.DATA_MOVEMENT_OPS and "Conv" not in ops.DATA_MOVEMENT_OPS
    assert ops.DATA_MOVEMENT_OPS <= ops.EVALUATED_OPS


def test_one_topological_sort_keeps_a_valid_order_and_names_a_cycle():
    x, a, b, c = _v("x"), _v("a"), _v("b"), _v("c")
    first = gs.Node("Relu", name="first", inputs=[x], outputs=[a])
    second = gs.Node("Relu", name="second", inputs=[a], outputs=[b])
    third = gs.Node("Add", name="third", inputs=[a, b], outputs=[c])
    assert topological_order([first, second, third]) == [first, second, third]
    assert [n.name for n in topological_order([third, second, first])] == ["first", "second", "third"]
    loop = gs.Node("Relu", name="loop", inputs=[c], outputs=[x])
    with pytest.raises(CycleError, match="'loop'"):
        topological_order([first, second, third, loop])


# ------------------------------------------------------------------------------------------------------------------
# Randomised geometry (hypothesis): odd sizes, asymmetric pads, groups, dilation, strides, batch 1-3

_sizes = st.integers(1, 9)


def _check_random_node(node_attrs_op, x_shape, initializers=(), inputs=("x",), opset=17):
    op, attrs = node_attrs_op
    node = oh.make_node(op, list(inputs), ["y"], **attrs)
    example = Case("random", [node], {"x": _x(*x_shape)}, ["y"], list(initializers), opset)
    assert_matches_onnxruntime(example.model(), example.feeds)


@given(data=st.data())
def test_random_conv_geometry(data):
    rank = data.draw(st.sampled_from([1, 2, 2, 3]))
    groups = data.draw(st.integers(1, 3))
    cin, cout = groups * data.draw(st.integers(1, 2)), groups * data.draw(st.integers(1, 2))
    kernel = [data.draw(st.integers(1, 4)) for _ in range(rank)]
    strides = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    auto_pad = data.draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    dilations = [1] * rank if auto_pad.startswith("SAME") else [data.draw(st.integers(1, 3)) for _ in range(rank)]
    pads = [data.draw(st.integers(0, 3)) for _ in range(2 * rank)] if auto_pad == "NOTSET" else [0] * (2 * rank)
    sizes = [data.draw(st.integers(2, 9 if rank < 3 else 5)) for _ in range(rank)]
    for i in range(rank):
        assume(sizes[i] + pads[i] + pads[rank + i] >= (kernel[i] - 1) * dilations[i] + 1)
    attrs = {"strides": strides, "dilations": dilations, "group": groups}
    attrs.update({"pads": pads} if auto_pad == "NOTSET" else {"auto_pad": auto_pad})
    bias = data.draw(st.booleans())
    inits = [("w", _x(cout, cin // groups, *kernel))] + ([("b", _x(cout))] if bias else [])
    _check_random_node(("Conv", attrs), [data.draw(st.integers(1, 3)), cin] + sizes, inits,
                       ["x", "w"] + (["b"] if bias else []))


@given(data=st.data())
def test_random_conv_transpose_geometry(data):
    rank = data.draw(st.sampled_from([1, 2, 2]))
    groups = data.draw(st.integers(1, 2))
    cin, cout = groups * data.draw(st.integers(1, 2)), groups * data.draw(st.integers(1, 2))
    kernel = [data.draw(st.integers(1, 4)) for _ in range(rank)]
    strides = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [data.draw(st.integers(1, 2)) for _ in range(rank)]
    output_padding = [data.draw(st.integers(0, s - 1)) for s in strides]
    sizes = [data.draw(st.integers(1, 6)) for _ in range(rank)]
    natural = [(sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + output_padding[i]
               for i in range(rank)]
    mode = data.draw(st.sampled_from(["pads", "pads", "output_shape", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs = {"strides": strides, "dilations": dilations, "group": groups, "output_padding": output_padding}
    if mode == "pads":
        pads = [data.draw(st.integers(0, 2)) for _ in range(2 * rank)]
        assume(all(natural[i] - pads[i] - pads[rank + i] >= 1 for i in range(rank)))
        attrs["pads"] = pads
    elif mode == "output_shape":
        attrs["output_shape"] = [data.draw(st.integers(max(1, n - 3), n)) for n in natural]
    else:
        attrs["auto_pad"] = mode
    inits = [("w", _x(cin, cout // groups, *kernel)), ("b", _x(cout))]
    _check_random_node(("ConvTranspose", attrs), [data.draw(st.integers(1, 3)), cin] + sizes, inits,
                       ["x", "w", "b"])


@given(data=st.data())
def test_random_pool_geometry(data):
    op = data.draw(st.sampled_from(["AveragePool", "AveragePool", "MaxPool"]))
    rank = data.draw(st.sampled_from([1, 2, 2, 3]))
    kernel = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [data.draw(st.integers(1, 2)) for _ in range(rank)]
    auto_pad = data.draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = ([data.draw(st.integers(0, k - 1)) for k in kernel] + [data.draw(st.integers(0, k - 1)) for k in kernel]
            if auto_pad == "NOTSET" else [0] * (2 * rank))  # onnxruntime: pads smaller than the kernel
    sizes = [data.draw(st.integers(2, 9 if rank < 3 else 5)) for _ in range(rank)]
    for i in range(rank):
        assume(sizes[i] + pads[i] + pads[rank + i] >= (kernel[i] - 1) * dilations[i] + 1)
        if auto_pad.startswith("SAME"):  # onnxruntime refuses the negative SAME padding of a stride above the kernel
            assume((-(-sizes[i] // strides[i]) - 1) * strides[i] + kernel[i] >= sizes[i])
    attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations,
             "ceil_mode": int(data.draw(st.booleans()))}
    attrs.update({"pads": pads} if auto_pad == "NOTSET" else {"auto_pad": auto_pad})
    if op == "AveragePool":
        attrs["count_include_pad"] = int(data.draw(st.booleans()))
    _check_random_node((op, attrs), [data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))] + sizes, opset=19)


@given(data=st.data())
def test_random_pad_geometry(data):
    mode = data.draw(st.sampled_from(["constant", "reflect", "edge"]))
    shape = [data.draw(st.integers(1, 5)) for _ in range(data.draw(st.integers(2, 4)))]
    rank = len(shape)
    axes = sorted(data.draw(st.sets(st.integers(0, rank - 1), min_size=1)))
    begins, ends = [], []
    for axis in axes:
        size = shape[axis]
        crop_begin, crop_end = data.draw(st.integers(-min(2, size - 1), 0)), data.draw(st.integers(-1, 0))
        kept = size + crop_begin + crop_end
        assume(kept >= 1)
        limit = 3 if mode != "reflect" else kept - 1  # reflect cannot pad beyond the (cropped) axis
        begin = crop_begin if data.draw(st.booleans()) else data.draw(st.integers(0, limit))
        end = crop_end if data.draw(st.booleans()) else data.draw(st.integers(0, limit))
        assume(size + begin + end >= 1 and (mode != "reflect" or size + min(begin, 0) + min(end, 0) >= 1))
        begins.append(begin)
        ends.append(end)
    value = np.array(data.draw(st.sampled_from([0.0, 1.5, -2.0])), dtype=np.float32)
    inits = [("p", np.array(begins + ends)), ("v", value), ("a", np.array(axes))]
    _check_random_node(("Pad", {"mode": mode}), shape, inits, ["x", "p", "v", "a"], opset=18)


_SCALES = [0.3, 0.45, 0.5, 0.6, 2 / 3, 0.75, 1.0, 1.25, 4 / 3, 1.5, 1.7, 2.0, 2.5, 3.0]


@given(data=st.data())
def test_random_resize_geometry(data):
    mode = data.draw(st.sampled_from(["nearest", "linear"]))
    attrs = {"mode": mode, "coordinate_transformation_mode": data.draw(st.sampled_from(RESIZE_TRANSFORMS)),
                 "nearest_mode": data.draw(st.sampled_from(NEAREST_MODES))}
    shape = [data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(_sizes), data.draw(_sizes)]
    if data.draw(st.booleans()):
        scales = [1.0, 1.0] + [data.draw(st.sampled_from(_SCALES)) for _ in range(2)]
        assume(all(int(np.float32(s) * np.float32(n)) >= 1 for s, n in zip(scales, shape)))
        inputs, inits = ["x", "", "s"], [("s", np.array(scales, dtype=np.float32))]
    else:
        sizes = shape[:2] + [data.draw(st.integers(1, 13)) for _ in range(2)]
        inputs, inits = ["x", "", "", "s"], [("s", np.array(sizes))]
    _check_random_node(("Resize", attrs), shape, inits, inputs, opset=19)


# ------------------------------------------------------------------------------------------------------------------
# Exact derivatives: the dense Jacobian of a linear chain from reverse and forward mode; finite differences


def _graph(nodes, inputs: dict, outputs, initializers=(), opset=17) -> gs.Graph:
    """A graph with symbolic batch (and optionally spatial) dims: inputs are name -> shape with str dims allowed."""
    model = make_model(nodes, list(inputs.items()), [(o, None) for o in outputs], initializers, opset=opset,
                       ir_version=_ir_version(opset))
    return gs.import_onnx(model)


def _linear_chain() -> gs.Graph:
    """Conv (asymmetric pads, stride) -> reflect Pad -> linear Resize -> AveragePool (ceil) -> ConvTranspose -> + c,
    with a second output read from the middle: an affine map with a non-trivial border everywhere."""
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 0, 0, 1], strides=[2, 1]),
        oh.make_node("Pad", ["c1", "p"], ["p1"], mode="reflect"),
        oh.make_node("Resize", ["p1", "", "s"], ["r1"], mode="linear"),
        oh.make_node("AveragePool", ["r1"], ["a1"], kernel_shape=[2, 2], strides=[1, 2], pads=[0, 1, 1, 0],
                     ceil_mode=1),
        oh.make_node("ConvTranspose", ["a1", "w2"], ["t1"], strides=[2, 1], group=1),
        oh.make_node("Add", ["t1", "c"], ["y"]),
        oh.make_node("GlobalAveragePool", ["c1"], ["g"]),
    ]
    inits = [("w1", _x(3, 2, 3, 2)), ("b1", _x(3)), ("p", np.array([0, 0, 1, 1, 0, 0, 1, 0])),
             ("s", np.array([1, 1, 1.5, 0.75], dtype=np.float32)), ("w2", _x(3, 2, 2, 3)), ("c", _x(1, 2, 1, 1))]
    return _graph(nodes, {"x": ["N", 2, 5, 6]}, ["y", "g"], inits)


def test_reverse_and_forward_mode_give_the_dense_jacobian_of_a_linear_chain():
    graph = _linear_chain()
    function = SubgraphFunction(graph.nodes, graph.inputs, graph.outputs)
    x0 = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    n = x0.numel()

    def flat(x):
        return torch.cat([out.reshape(out.shape[0], -1) for out in function(x)], dim=1)

    # The dense Jacobian by probing: W[:, j] = f(e_j) − f(0), all probes in one batch.
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *x0.shape[1:])
    bias = flat(torch.zeros_like(x0))
    jacobian = (flat(basis) - bias).T
    torch.testing.assert_close(flat(x0), x0.reshape(1, -1) @ jacobian.T + bias, rtol=1e-12, atol=1e-12)

    # Reverse mode: rows of W as a vmap of VJPs; forward mode: columns as a vmap of JVPs.
    outputs, vjp = torch.func.vjp(function, x0)
    m = sum(o.numel() for o in outputs)
    cotangents = torch.eye(m, dtype=torch.float64)
    split = [c.reshape(m, *o.shape) for c, o in zip(cotangents.split([o.numel() for o in outputs], dim=1), outputs)]
    rows = torch.func.vmap(vjp)(tuple(split))[0].reshape(m, n)
    torch.testing.assert_close(rows, jacobian, rtol=1e-12, atol=1e-12)

    def column(tangent):
        return torch.cat([o.reshape(-1) for o in torch.func.jvp(function, (x0,), (tangent.unsqueeze(0),))[1]])

    columns = torch.func.vmap(column)(basis)
    torch.testing.assert_close(columns.T, jacobian, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacrev(flat)(x0).reshape(m, n), jacobian, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(flat)(x0).reshape(m, n), jacobian, rtol=1e-12, atol=1e-12)


def test_gradients_of_nonlinear_ops_match_finite_differences():
    nodes = [
        oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 0, 1], group=1),
        oh.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
        oh.make_node("LeakyRelu", ["n"], ["l"], alpha=0.2),
        oh.make_node("MaxPool", ["l"], ["mp"], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1),
        oh.make_node("Sigmoid", ["mp"], ["sg"]),
        oh.make_node("Mul", ["sg", "z"], ["mz"]),
        oh.make_node("Resize", ["mz", "", "sc"], ["rs"], mode="nearest"),
        oh.make_node("Softmax", ["rs"], ["sm"], axis=1),
        oh.make_node("Flatten", ["sm"], ["f"]),
        oh.make_node("Gemm", ["f", "gw", "gb"], ["gm"], transB=1),
        oh.make_node("Tanh", ["gm"], ["th"]),
        oh.make_node("Relu", ["th"], ["rl"]),
        oh.make_node("Clip", ["gm", "lo", "hi"], ["y"]),
    ]
    inits = [("w", _x(3, 2, 3, 2)), ("b", _x(3)), *_bn_inits(3), ("sc", np.array([1, 1, 2, 1], dtype=np.float32)),
             ("gw", _x(4, 3 * 6 * 3)), ("gb", _x(4)), ("lo", np.array(-0.5, np.float32)),
             ("hi", np.array(0.5, np.float32))]
    graph = _graph(nodes, {"x": [2, 2, 6, 5], "z": [1, 3, 1, 1]}, ["y", "rl"], inits, opset=13)
    function = SubgraphFunction(graph.nodes, graph.inputs, graph.outputs, opset=13)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    z = torch.randn(1, 3, 1, 1, dtype=torch.float64, generator=generator, requires_grad=True)
    # fast_mode checks random projections of the Jacobian (reverse and forward mode) against finite differences;
    # check_batched_grad runs the backward pass under vmap.
    assert torch.autograd.gradcheck(function, (x, z), fast_mode=True, check_forward_ad=True, check_batched_grad=True)


# ------------------------------------------------------------------------------------------------------------------
# Dynamic shapes, batch independence, trace


def test_shapes_come_from_the_values_not_the_graph():
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 0, 2, 1], strides=[2, 1]),
        oh.make_node("Pad", ["c", "p"], ["p1"], mode="edge"),
        oh.make_node("Resize", ["p1", "", "s"], ["r"], mode="nearest"),
        oh.make_node("AveragePool", ["r"], ["a"], kernel_shape=[2, 3], strides=[2, 2], ceil_mode=1),
        oh.make_node("ReduceMean", ["a"], ["y"], axes=[3]),
    ]
    inits = [("w", _x(4, 3, 3, 2)), ("p", np.array([0, 0, 1, 0, 0, 0, 0, 2])),
             ("s", np.array([1, 1, 1.5, 0.5], dtype=np.float32))]
    model = make_model(nodes, [("x", ["N", 3, "H", "W"])], [("y", None)], inits)
    graph = gs.import_onnx(model)
    function = SubgraphFunction(graph.nodes, graph.inputs, graph.outputs)
    for shape in [(1, 3, 7, 9), (3, 3, 10, 6), (2, 3, 5, 13)]:
        x = _x(*shape)
        (expected,) = run_model(model, {"x": x})
        (ours,) = function(torch.from_numpy(x))
        assert tuple(ours.shape) == expected.shape
        np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=RELATIVE_TOLERANCE * np.abs(expected).max())
        # every batch element is computed independently: what collapse's batched probes rely on
        torch.testing.assert_close(ours[-1:], function(torch.from_numpy(x[-1:]))[0], rtol=0, atol=0)


def _tiny_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, 1), ResidualBlock(8, 8, 1), ResidualBlock(8, 16, 2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    for module in model.modules():  # non-trivial BN statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_torch_exported_resnet_and_its_intermediates_match_onnxruntime_and_torch():
    module = _tiny_resnet()
    model = from_torch(module, torch.randn(2, 3, 29, 26))
    x = _x(3, 3, 29, 26)  # another batch size than the export's: the batch dimension is dynamic
    (logits,) = assert_matches_onnxruntime(model, {"input": x}).values()
    with torch.no_grad():
        reference = module.double()(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(logits, reference, rtol=1e-10, atol=1e-10)  # float64 against float64

    # trace: every intermediate tensor, compared with onnxruntime asked to return all of them
    graph = gs.import_onnx(model)
    function = SubgraphFunction(graph.nodes, graph.inputs, graph.outputs, opset=graph.opset)
    trace = function.trace(torch.from_numpy(x))
    intermediates = [t.name for node in graph.nodes for t in node.outputs if node.op != "Constant"]
    assert set(intermediates) <= set(trace)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {info.name: info for info in inferred.graph.value_info}
    exposed.graph.output.extend(infos[name] for name in intermediates if name in infos)
    names = [o.name for o in exposed.graph.output]
    for name, value in zip(names, run_model(exposed, {"input": x})):
        ours = trace[name].detach().numpy()
        assert ours.shape == value.shape, name
        np.testing.assert_allclose(ours, value, rtol=0, atol=RELATIVE_TOLERANCE * max(np.abs(value).max(), 1e-6))
    assert len(names) > 20
