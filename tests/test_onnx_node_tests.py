"""onnx's own conformance tests through cnnc (issue 16, items 7-8): a fixed sample of the backend node tests, and
the classes of defect they found, each as a small regression test.

The sample is generated as onnx's `generate-data` lays tests out (tests/onnx_node_cases.py) and each model goes
through `cnnc.compile` with the default passes: none may be wrong, crash or fail the equivalence check, and a
refusal must carry a reason from ALLOWED_REFUSALS. The full run is bench/onnx_node_tests.py.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest
from helpers import text_model
from onnx_node_cases import classify, generate_node_tests

import cnnc
from cnnc import ir
from cnnc.errors import ModelError, UsageError
from cnnc.ir.fold_shapes import fold_shape_reads
from cnnc.ir.library_log import routed_graphsurgeon_log
from cnnc.runtime.feeds import concrete_inputs, make_feeds
from cnnc.runtime.inputs import make_input_batches
from cnnc.runtime.ort_errors import ort_reason
from cnnc.runtime.session import make_session

SAMPLE = [
    "test_shape_start_1", "test_shape_end_negative_1", "test_shape_start_1_end_2", "test_shape_start_greater_than_end",
    "test_shape_clip_start", "test_reshape_reduced_dims", "test_reshape_negative_dim",
    "test_reshape_allowzero_reordered", "test_resize_upsample_scales_cubic",
    "test_resize_downsample_sizes_linear_pytorch_half_pixel", "test_slice", "test_slice_negative_axes",
    "test_slice_default_steps", "test_gather_0", "test_gather_negative_indices", "test_gather_elements_0",
    "test_gathernd_example_int32", "test_split_variable_parts_1d_opset18", "test_split_equal_parts_2d",
    "test_constant_pad", "test_constant_pad_axes", "test_edge_pad", "test_cumsum_1d", "test_cumsum_2d_axis_1",
    "test_if", "test_loop11", "test_dropout_default_mask", "test_dropout_default_mask_ratio", "test_mvn",
    "test_mvn_expanded", "test_group_normalization_example_expanded", "test_affine_grid_2d_expanded",
    "test_reduce_sum_keepdims_random", "test_squeeze", "test_unsqueeze_axis_0", "test_div_int8",
    "test_dropout_default", "test_tile", "test_expand_dim_changed", "test_top_k", "test_scatternd",
    "test_attention_3d_expanded", "test_batchnorm_example",
]
# The refusals a node test may get: inputs whose valid values cnnc cannot derive (asks for inputs=).
ALLOWED_REFUSALS = [r"^the original model fails on made-up values of input .* give valid ones with inputs= "]


@pytest.fixture(scope="session")
def node_tests(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-node-tests")
    written = generate_node_tests(folder, only=set(SAMPLE))
    assert sorted(written) == sorted(SAMPLE)  # every sampled name still exists in this onnx
    return folder / "node"


def test_a_sample_of_onnx_node_tests_compiles_equivalent_and_matches_the_expected_outputs(node_tests):
    verdicts = {name: classify(node_tests / name) for name in SAMPLE}
    assert {v.verdict for v in verdicts.values()} <= {"ok", "refused"}, \
        {n: (v.verdict, v.reason) for n, v in verdicts.items() if v.verdict not in ("ok", "refused")}
    refused = {n: v.reason for n, v in verdicts.items() if v.verdict == "refused"}
    assert all(any(re.search(p, r) for p in ALLOWED_REFUSALS) for r in refused.values()), refused
    assert set(refused) <= {"test_affine_grid_2d_expanded"}  # its 'size' input shapes a Split and a Reshape
    assert not [n for n, v in verdicts.items() if v.leaked], "a compile printed to stdout/stderr"
    # Shape with start/end is folded (the compiled model is proven, not unchanged) and matches onnx's expectations.
    assert verdicts["test_shape_start_1_end_2"].extra == {"equivalence": "proven"}


def _shape_model(start=None, end=None, dims=(2, 0, 4, 5)) -> onnx.ModelProto:
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    node = oh.make_node("Shape", ["x"], ["s"], **attrs)
    cast = oh.make_node("Cast", ["s"], ["y"], to=onnx.TensorProto.FLOAT)
    graph = oh.make_graph([node, cast], "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("start,end", [(None, None), (1, None), (-1, None), (None, -1), (1, 3), (3, 1), (-9, 9),
                                       (9, None)])
def test_shape_start_end_folds_to_what_onnxruntime_computes(start, end):
    model = _shape_model(start, end)
    graph = ir.import_model(model)
    assert fold_shape_reads(graph) == 1
    folded = graph.outputs[0].inputs[0].inputs[0]  # Cast's input is now a constant
    x = np.zeros((2, 0, 4, 5), np.float32)  # a zero-size dim is a real size
    expected = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(np.asarray(folded.values, np.float32), expected)


def test_gather_and_slice_of_a_partly_known_shape_fold_exactly():
    model = text_model('''
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 3, 5] x) => (int64[2] g, int64[3] s) <int64[2] idx = {-1, 1}, int64[1] b = {-1},
                                                           int64[1] e = {-100}, int64[1] st = {-1}> {
            shape = Shape <start = 0> (x)
            g = Gather (shape, idx)
            s = Slice (shape, b, e, b, st)
        }''')
    graph = ir.import_model(model)
    assert fold_shape_reads(graph) == 1  # Gather [5, 3] folds; the Slice reaches the symbolic N
    assert np.array_equal(graph.outputs[0].values, [5, 3])
    compiled = cnnc.compile(model).model
    x = np.zeros((2, 3, 5), np.float32)
    for a, b in zip(make_session(model).run(None, {"x": x}), make_session(compiled).run(None, {"x": x})):
        np.testing.assert_array_equal(a, b)


def _conv_with_parameter_input(body: str, extra_inputs: str, rank: int = 4) -> onnx.ModelProto:
    """Conv + BatchNormalization (fold-bn changes them, so a real check runs) into `body`, which reads parameter
    inputs and writes y (of rank `rank`)."""
    rng = np.random.default_rng(0)
    out = ", ".join(f"d{k}" for k in range(rank))
    return text_model(f'''
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[1, 2, 4, 4] x, {extra_inputs}) => (float[{out}] y) <float[3, 2, 1, 1] W, float[3] s, float[3] b,
                                                                      float[3] m, float[3] v> {{
            c = Conv (x, W)
            n = BatchNormalization (c, s, b, m, v)
            {body}
        }}''', W=rng.standard_normal((3, 2, 1, 1)).astype(np.float32), s=np.ones(3, np.float32),
        b=np.zeros(3, np.float32), m=np.zeros(3, np.float32), v=np.ones(3, np.float32))


@pytest.mark.parametrize("body,extra_inputs,rank", [
    ("y = Reshape (n, shape)", "int64[3] shape", 3),
    ("y = Gather <axis = 1> (n, idx)", "int64[5] idx", 4),
    ("y = ReduceSum (n, axes)", "int64[2] axes", 4),
    ("y = Squeeze (n, axes)", "int64[1] axes", 3),
    ("y = CumSum (n, axis)", "int32 axis", 4),
    ("y = Slice (n, starts, ends, axes, steps)", "int64[2] starts, int64[2] ends, int64[2] axes, int64[2] steps", 4),
    ("y = Resize <mode = \"cubic\"> (n, , scales)", "float[4] scales", 4),
    ("y = Expand (n, shape)", "int64[4] shape", 4),
    ("y = Tile (n, reps)", "int64[4] reps", 4),
])
def test_check_inputs_for_op_parameters_are_drawn_so_the_original_runs(body, extra_inputs, rank):
    model = _conv_with_parameter_input(body, extra_inputs, rank)
    result = cnnc.compile(model)  # before: "the original model fails on its check input"
    assert result.report["equivalence"]["passed"] and result.report["equivalence"]["feeds"] >= 2
    assert not result.report["equivalence"].get("unchanged")


def test_split_sizes_sum_to_the_dim_and_integer_divisors_are_never_zero():
    model = text_model('''
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2, 7] x, int64[3] parts, int32[4] a, int32[4] d) => (float[2, ?] p, float[2, ?] q, float[2, ?] r,
                                                                     int32[4] z) {
            p, q, r = Split <axis = 1> (x, parts)
            z = Div (a, d)
        }''')
    for feed in make_input_batches(model, n=4):
        assert feed["parts"].sum() == 7 and (feed["parts"] >= 0).all() and (feed["d"] != 0).all()
        make_session(model).run(None, feed)


def test_an_input_whose_values_cannot_be_derived_is_named_with_inputs_asked_for():
    model = _conv_with_parameter_input("shape2 = Add (k, k)\n            y = Reshape (n, shape2)", "int64[2] k", 2)
    with pytest.raises(ModelError) as refused:
        cnnc.compile(model)
    message = str(refused.value)
    assert "'k' (read by Add)" in message and "inputs=" in message and "Reshape: " in message
    assert "onnxruntime::" not in message and ".h:" not in message and "\n" not in message
    # With valid values given, it compiles.
    assert cnnc.compile(model, inputs={"x": np.ones((1, 2, 4, 4), np.float32),
                                       "k": np.array([3, 4])}).report["equivalence"]["passed"]


def test_ort_reason_keeps_the_op_and_the_first_meaningful_clause():
    message = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running If node. Name:'' Status "
               "Message: Non-zero status code returned while running Split node. Name:'' Status Message: /onnxruntime"
               "_src/onnxruntime/core/providers/common.h:31 int64_t onnxruntime::HandleNegativeAxis(int64_t, int64_t) "
               "IsAxisInRange(axis, tensor_rank) was false. axis 1 is not in valid range [-1,0]")
    assert ort_reason(message) == "Split: axis 1 is not in valid range [-1,0]"
    cubic = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Resize node. Name:'' "
             "Status Message: 'Cubic' mode only supports:\n  * 2-D inputs or\n  * 4-D inputs with the outermost 2 "
             "scale values being 1")
    assert ort_reason(cubic).startswith("Resize: 'Cubic' mode only supports: * 2-D inputs or * 4-D inputs")
    load = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 onnxruntime::Model::"
            "Model(onnx::ModelProto&&, const onnxruntime::PathString&) Unsupported model IR version: 14, max "
            "supported IR version: 13")
    assert ort_reason(load) == "Unsupported model IR version: 14, max supported IR version: 13"


def test_an_unchanged_model_is_proven_by_identity_without_a_run():
    model = text_model('''
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3] x, int64[2] shape) => (float[?, ?] y) {
            y = Reshape (x, shape)
        }''')
    equivalence = cnnc.compile(model).report["equivalence"]
    assert equivalence["unchanged"] and equivalence["passed"] and equivalence["feeds"] == 0
    assert equivalence["summary"].startswith("unchanged")


def test_zero_size_dims_are_real_sizes_and_0d_bool_inputs_are_arrays():
    model = text_model('''
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[0, 3] x, bool c) => (float[0, 3] y, bool d) {
            y = Relu (x)
            d = Not (c)
        }''')
    (feed,) = make_input_batches(model, n=1)
    assert feed["x"].shape == (0, 3)  # not batch 1: no second batch size either
    assert isinstance(feed["c"], np.ndarray) and feed["c"].shape == ()


def test_a_symbolic_dim_inside_the_api_names_input_shapes():
    model = text_model('''
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, H] x) => (float[N, H] y) <float[1] two = {2.0}> {
            h = Mul (x, two)
            y = Relu (h)
        }''')
    with pytest.raises(UsageError, match=r"input_shapes=\{'x': \(d0, d1, \.\.\.\)\}"):
        make_input_batches(model)


def test_graphsurgeon_warnings_do_not_reach_stdout(capfd, caplog):
    with caplog.at_level("DEBUG", logger="cnnc.ir"), routed_graphsurgeon_log():
        gs.logger.G_LOGGER.warning("a library warning")
    assert capfd.readouterr().out == "" and "a library warning" in caplog.text


def test_shape_reads_in_a_loop_body_are_not_folded():
    model = text_model('''
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3] x, int64 n) => (float[?, 3] y) <bool t = {1}> {
            y = Loop (n, t, x) <body = body (int64 i, bool c, float[2, 3] v) => (bool co, float[2, 3] w) {
                s = Shape <start = 1> (v)
                f = Cast <to = 1> (s)
                w = Add (v, f)
                co = Identity (c)
            }>
        }''')
    graph = ir.import_model(model)
    assert fold_shape_reads(graph) == 0


def test_bench_feeds_draw_op_parameters_valid_too():
    model = _conv_with_parameter_input("y = Reshape (n, shape)", "int64[3] shape", 3)
    feeds = make_feeds(concrete_inputs(model, None), seed=0, model=model)
    assert list(feeds["shape"]) == [1, 1, -1]
    make_session(model).run(None, feeds)
