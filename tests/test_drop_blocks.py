"""drop-blocks (approximate): drops exactly the blocks below eps on nets where some blocks are exactly the identity;
op counts and rewiring, one negative per precondition, idempotence, onnxruntime equivalence (and the reported
deviation when it is not exact), checker, hypothesis over odd geometry."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from click.testing import CliRunner
from helpers import (
    assert_same_outputs,
    assert_unchanged,
    make_model,
    node_named,
    normal,
    op_counts,
    run_model,
    run_passes,
    text_model,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import cnnc
from cnnc.cli import cli
from cnnc.passes.drop_blocks import DropBlocks


def _residual_chain(rng, zero_blocks, n_blocks=4, channels=3, spatial=(5, 7), kernel=(3, 3), dilation=1,
                    begins=(1, 1), groups=1, head=True):
    """stem conv, then blocks y' = y + conv1x1(relu(conv(y))) named join0..; a block in `zero_blocks` has an
    all-zero last conv and bias, so it is exactly the identity. Every branch conv keeps the spatial size."""
    inits = [("stem_w", rng.standard_normal((channels, 2, 1, 1)).astype(np.float32)),
             ("stem_b", rng.standard_normal(channels).astype(np.float32))]
    nodes = [oh.make_node("Conv", ["x", "stem_w", "stem_b"], ["y_in"], name="stem")]
    previous = "y_in"
    totals = [dilation * (k - 1) for k in kernel]
    pads = list(begins) + [t - b for t, b in zip(totals, begins)]
    for index in range(n_blocks):
        zero = index in zero_blocks
        w = rng.standard_normal((channels, channels // groups, *kernel)).astype(np.float32)
        w2 = np.zeros((channels, channels, 1, 1), np.float32) if zero else rng.standard_normal(
            (channels, channels, 1, 1)).astype(np.float32)
        b2 = np.zeros(channels, np.float32) if zero else rng.standard_normal(channels).astype(np.float32)
        inits += [(f"w{index}", w), (f"b{index}", rng.standard_normal(channels).astype(np.float32)),
                  (f"v{index}", w2), (f"c{index}", b2)]
        nodes += [oh.make_node("Conv", [previous, f"w{index}", f"b{index}"], [f"h{index}"], name=f"conv{index}",
                               pads=pads, dilations=[dilation] * 2, group=groups),
                  oh.make_node("Relu", [f"h{index}"], [f"r{index}"]),
                  oh.make_node("Conv", [f"r{index}", f"v{index}", f"c{index}"], [f"f{index}"], name=f"proj{index}"),
                  oh.make_node("Add", [previous, f"f{index}"], [f"y{index}"], name=f"join{index}")]
        previous = f"y{index}"
    output = previous
    if head:
        inits.append(("fc", rng.standard_normal((4, channels)).astype(np.float32)))
        nodes += [oh.make_node("GlobalAveragePool", [previous], ["pooled"]),
                  oh.make_node("Flatten", ["pooled"], ["flat"]), oh.make_node("Gemm", ["flat", "fc"], ["logits"],
                                                                             transB=1)]
        output = "logits"
    return make_model(nodes, [("x", ["N", 2, *spatial])], [(output, None)], inits)


def _feeds(rng, shape):
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def test_drops_exactly_the_identity_blocks_and_rewires_to_their_skips(rng):
    model = _residual_chain(rng, zero_blocks={1, 3})
    compiled, result = run_passes(model, "drop-blocks{eps=0.01}")
    assert result.changed and result.stats["dropped"] == ["join1", "join3"]
    assert op_counts(compiled) == {"Conv": 5, "Relu": 2, "Add": 2, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    by_name = {node.name: node for node in compiled.graph.node}
    assert by_name["join2"].input[0] == "y0"  # join1's output was replaced by its skip y0
    assert by_name["conv2"].input[0] == "y0"
    pool = next(n for n in compiled.graph.node if n.op_type == "GlobalAveragePool")
    assert pool.input[0] == "y2"  # join3 dropped: the head reads join2's output
    assert result.stats["scaled"]["join1"] == 0.0 and result.stats["scaled"]["join0"] > 0.1
    assert result.stats["output_deviation"] == {"max_abs": 0.0, "max_rel": 0.0}
    assert any("measured output deviation on 16 samples" in line for line in result.applied)
    assert_same_outputs(model, compiled, _feeds(rng, (3, 2, 5, 7)), rtol=1e-6, atol=1e-6)


def test_second_run_changes_nothing(rng):
    compiled, _ = run_passes(_residual_chain(rng, zero_blocks={0, 2}), "drop-blocks{eps=0.01}")
    again, result = run_passes(compiled, "drop-blocks{eps=0.01}")
    assert not result.changed and op_counts(again) == op_counts(compiled)


def test_large_eps_drops_real_blocks_and_reports_the_deviation_onnxruntime_measures(rng, tmp_path):
    model = _residual_chain(rng, zero_blocks=set())
    samples = rng.random((6, 2, 5, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", samples)
    compiled, result = run_passes(model, DropBlocks(eps=1e6, inputs=str(tmp_path / "x.npy")))
    assert result.stats["dropped"] == [f"join{i}" for i in range(4)] and result.stats["samples"] == 6
    before, after = run_model(model, {"x": samples})[0], run_model(compiled, {"x": samples})[0]
    measured = float(np.abs(after - before).max())
    assert measured > 0 and result.stats["output_deviation"]["max_abs"] == pytest.approx(measured, rel=1e-4)
    assert result.stats["output_deviation"]["max_rel"] == pytest.approx(measured / np.abs(before).max(), rel=1e-4)


def test_labels_give_the_accuracy_change(rng, tmp_path):
    model = _residual_chain(rng, zero_blocks=set())
    samples = rng.random((8, 2, 5, 7)).astype(np.float32)
    labels = np.argmax(run_model(model, {"x": samples})[0], axis=1)  # the original is right on every sample
    np.save(tmp_path / "x.npy", samples)
    np.save(tmp_path / "y.npy", labels)
    _, result = run_passes(model, DropBlocks(eps=1e6, inputs=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy")))
    assert result.stats["accuracy_before"] == 1.0 and 0.0 <= result.stats["accuracy_after"] <= 1.0
    assert any("top-1 accuracy 1.0000 ->" in line for line in result.applied)


# --- one negative per precondition ---------------------------------------------------------------------------------


def test_samples_that_onnxruntime_cannot_run_leave_the_graph_alone(rng, tmp_path):
    # A fixed batch of 4 and 6 samples: the deviation could not be measured, so no block may be dropped unmeasured.
    model = _residual_chain(rng, zero_blocks={1, 3})
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    np.save(tmp_path / "x.npy", rng.random((6, 2, 5, 7)).astype(np.float32))
    compiled, result = run_passes(model, DropBlocks(eps=1e6, inputs=str(tmp_path / "x.npy")))
    assert not result.changed and op_counts(compiled) == op_counts(model)
    assert ("whole graph", ("cannot measure the output deviation on onnxruntime: ValueError: 6 samples do not split "
            "into batches of the input's fixed batch 4")) in result.skipped


def test_no_residual_blocks(rng):
    model = make_model([oh.make_node("Relu", ["x"], ["y"])], [("x", ["N", 2, 3, 3])], [("y", None)])
    _, result = run_passes(model, "drop-blocks")
    assert not result.changed and ("whole graph", "no residual blocks") in result.skipped


def test_blocks_at_or_above_eps_are_kept(rng):
    model = _residual_chain(rng, zero_blocks=set())
    compiled, result = run_passes(model, "drop-blocks{eps=0.01}")
    assert not result.changed and op_counts(compiled)["Add"] == 4
    assert sum("is not below eps=0.01" in why for _, why in result.skipped) == 4


def test_two_graph_inputs(rng):
    model = make_model([oh.make_node("Add", ["x", "z"], ["y"])], [("x", [1, 2]), ("z", [1, 2])], [("y", None)])
    _, result = run_passes(model, "drop-blocks")
    assert not result.changed and "2 graph inputs" in result.skipped[0][1]


def test_no_sample_inputs_for_symbolic_spatial_dims(rng):
    model = _residual_chain(rng, zero_blocks={0})
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    _, result = run_passes(model, "drop-blocks{eps=0.01}")
    assert not result.changed and any("no sample inputs" in why and "symbolic dim" in why for _, why in
                                      result.skipped)


def test_labels_that_do_not_match_the_samples(rng, tmp_path):
    np.save(tmp_path / "y.npy", np.zeros(3, np.int64))
    _, result = run_passes(_residual_chain(rng, zero_blocks={0}), DropBlocks(eps=0.01, labels=str(tmp_path / "y.npy")))
    assert not result.changed and "3 labels for 16 samples" in result.skipped[-1][1]


def test_a_block_from_graph_input_to_graph_output_is_kept(rng):
    nodes = [oh.make_node("Conv", ["x", "w"], ["f"]), oh.make_node("Add", ["x", "f"], ["y"], name="join")]
    model = make_model(nodes, [("x", ["N", 2, 3, 3])], [("y", None)], [("w", np.zeros((2, 2, 1, 1), np.float32))])
    _, result = run_passes(model, "drop-blocks{eps=0.01}")
    assert not result.changed and "would be renamed" in dict(result.skipped)["block 0 (Add 'join', identity)"]


# --- integration and randomised geometry -----------------------------------------------------------------------------


def test_registered_as_approximate_and_not_default():
    assert DropBlocks.exact is False
    assert "drop-blocks" not in cnnc.passes.DEFAULT_PIPELINE


def test_compile_with_drop_blocks_passes_the_equivalence_check(rng, tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(_residual_chain(rng, zero_blocks={1, 2}), path)
    result = CliRunner().invoke(cli, ["compile", str(path), "--passes", "drop-blocks{eps=0.01,random=4}", "-o",
                                      str(tmp_path / "out.onnx")])
    assert result.exit_code == 0, result.output
    assert "pass drop-blocks{random=4} (approximate): changed" in result.output  # eps=0.01 is the default
    assert "replaced by its skip 'y0'" in result.output and "measured output deviation on 4 samples" in result.output


@settings(max_examples=8)
@given(seed=st.integers(0, 2 ** 16), n_blocks=st.integers(1, 4), kernel=st.tuples(st.integers(1, 3),
       st.integers(1, 3)), dilation=st.integers(1, 2), groups=st.sampled_from([1, 3]),
       spatial=st.tuples(st.integers(4, 7), st.integers(3, 6)), mask=st.integers(0, 15), head=st.booleans())
def test_random_geometry_drops_exactly_the_zero_blocks(seed, n_blocks, kernel, dilation, groups, spatial, mask,
                                                       head):
    rng = np.random.default_rng(seed)
    zero_blocks = {i for i in range(n_blocks) if mask >> i & 1}
    begins = tuple(int(rng.integers(0, dilation * (k - 1) + 1)) for k in kernel)  # asymmetric pads
    model = _residual_chain(rng, zero_blocks, n_blocks=n_blocks, spatial=spatial, kernel=kernel, dilation=dilation,
                            begins=begins, groups=groups, head=head)
    compiled, result = run_passes(model, DropBlocks(eps=1e-3, random=3))
    assert result.stats.get("dropped", []) == [f"join{i}" for i in sorted(zero_blocks)]
    assert op_counts(compiled)["Add"] == n_blocks - len(zero_blocks) if len(zero_blocks) < n_blocks else \
        "Add" not in op_counts(compiled)
    assert_same_outputs(model, compiled, _feeds(rng, (2, 2, *spatial)), rtol=1e-6, atol=1e-6)


# --- models written as ONNX text (onnx.parser syntax, as onnxscript's rewriter tests) -------------------------------

RESIDUAL_BLOCK = """
    <ir_version: 8, opset_import: ["" : 17]>
    block (float[N, 2, 5, 6] x) => (float[N, 2, 5, 6] y) <float[2, 2, 3, 3] W> {
        [branch] f = Conv <pads = [1, 1, 1, 1]> (x, W)
        [join] a = Add (x, f)
        [out] y = Relu (a)
    }"""


def test_text_block_with_a_zero_branch_is_replaced_by_its_skip(rng):
    model = text_model(RESIDUAL_BLOCK, W=np.zeros((2, 2, 3, 3), np.float32))
    compiled, result = run_passes(model, "drop-blocks{eps=0.01}")
    assert result.changed and op_counts(compiled) == {"Relu": 1}
    assert list(node_named(compiled, "out").input) == ["x"]  # the join's reader now reads the skip
    assert result.applied[0].startswith("block 0 (Add 'join', identity): replaced by its skip 'x'")
    assert_same_outputs(model, compiled, {"x": normal(rng, 2, 2, 5, 6)})


def test_text_negative_block_whose_branch_matters_is_kept(rng):
    model = text_model(RESIDUAL_BLOCK, W=normal(rng, 2, 2, 3, 3))
    run = run_passes(model, "drop-blocks{eps=0.01}")
    assert_unchanged(model, run)
    assert "is not below eps=0.01" in dict(run.result.skipped)["block 0 (Add 'join', identity)"]
    assert_same_outputs(model, run.model, {"x": normal(rng, 2, 2, 5, 6)})
