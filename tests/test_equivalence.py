"""Equivalence checking (README, "Equivalence check"): the error report, non-finite values, shapes, and the inputs it checks on."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import pytest
from click.testing import CliRunner
from helpers import make_model, text_model

from cnnc.cli import cli
from cnnc.errors import EquivalenceError, ModelError, UsageError
from cnnc.runtime.deviation import output_deviation, random_float_feeds
from cnnc.runtime.equivalence import check_equivalence
from cnnc.runtime.identity import same_model
from cnnc.runtime.inputs import SECOND_BATCH, make_input_batches

X = np.array([[1.0, -2.0, 4.0, 0.5]], np.float32)


def _add(constant, shape=("N", 4), name="y"):
    """y = x + constant."""
    return make_model([oh.make_node("Add", ["x", "c"], [name])], [("x", list(shape))], [(name, list(shape))],
                      [("c", np.asarray(constant, np.float32))])


def _mul(constant, shape=("N", 4)):
    """y = x * constant."""
    return make_model([oh.make_node("Mul", ["x", "c"], ["y"])], [("x", list(shape))], [("y", list(shape))],
                      [("c", np.asarray(constant, np.float32))])


def test_identical_models_report_zero_error():
    report = check_equivalence(_add([0, 0, 0, 0]), _add([0, 0, 0, 0]))
    assert report.passed
    (out,) = report.as_dict()["outputs"]
    assert out == {"name": "y", "dtype": "float32", "rtol": 1e-4, "atol": 1e-5, "max_abs": 0.0, "mean_abs": 0.0,
                   "max_rel": 0.0, "needed_atol": 0.0, "nonfinite_mismatch": False, "passed": True}
    assert report.summary().startswith("equivalent on 4 input batch(es)")


def test_report_gives_max_mean_relative_error_and_the_atol_needed():
    # diff = |c| = [0, 0.25, 0, 0.5], exactly representable; reference = x, max |reference| = 4.
    reference, candidate = _add([0, 0, 0, 0]), _add([0, 0.25, 0, -0.5])
    report = check_equivalence(reference, candidate, rtol=1e-4, atol=1e-5, user_inputs={"x": X})
    assert not report.passed and report.feeds == 1
    (out,) = report.outputs
    assert out.max_abs == 0.5 and out.mean_abs == 0.1875 and out.max_rel == 0.125
    # The smallest atol with max|diff| <= atol + rtol·max|ref|: 0.5 − 1e-4·4.
    assert out.needed_atol == pytest.approx(0.5 - 1e-4 * 4, rel=1e-12)
    assert check_equivalence(reference, candidate, rtol=1e-4, atol=out.needed_atol, user_inputs={"x": X}).passed
    assert not check_equivalence(reference, candidate, rtol=1e-4, atol=out.needed_atol * 0.999,
                                 user_inputs={"x": X}).passed
    assert "NOT equivalent" in report.summary() and "max abs err 0.5" in report.summary()


def test_relative_tolerance_scales_with_the_reference():
    # A 1e-3 relative error passes at rtol 1e-2 and fails at rtol 1e-4 (with atol 0).
    reference, candidate = _mul([1, 1, 1, 1]), _mul([1.001, 1.001, 1.001, 1.001])
    assert check_equivalence(reference, candidate, rtol=1e-2, atol=0).passed
    assert not check_equivalence(reference, candidate, rtol=1e-4, atol=0).passed


def test_tolerance_is_relative_to_the_output_scale_not_to_each_element():
    # An error of 2e-4 on an element that is itself ~0, in an output whose scale is 4: float32 rounding in a deep
    # network looks like this. It passes at rtol 1e-4 (2e-4 <= 1e-5 + 1e-4·4) although it is 100 % of that element.
    x = np.array([[4.0, 0.0, 1.0, 2.0]], np.float32)
    reference, candidate = _add([0, 0, 0, 0]), _add([0, 2e-4, 0, 0])
    assert check_equivalence(reference, candidate, rtol=1e-4, atol=1e-5, user_inputs={"x": x}).passed
    assert not check_equivalence(reference, candidate, rtol=1e-5, atol=1e-5, user_inputs={"x": x}).passed


def test_mean_abs_is_the_mean_over_every_checked_value():
    reference, candidate = _mul([1, 1, 1, 1]), _mul([1.5, 1.5, 1.5, 1.5])  # |diff| = 0.5·|x|
    report = check_equivalence(reference, candidate, n=2, seed=7)
    feeds = make_input_batches(reference, n=2, seed=7)
    diffs = np.concatenate([0.5 * np.abs(feed["x"].astype(np.float64)).ravel() for feed in feeds])
    assert report.outputs[0].mean_abs == pytest.approx(diffs.mean(), rel=1e-6)
    assert report.outputs[0].max_abs == pytest.approx(diffs.max(), rel=1e-6)


def test_nan_in_the_same_places_passes_and_a_moved_nan_fails():
    x = np.array([[1.0, np.nan, 3.0, np.inf]], np.float32)
    assert check_equivalence(_add([0, 0, 0, 0]), _add([0, 0, 0, 0]), user_inputs={"x": x}).passed

    nan_weight = _mul([1, 1, np.nan, 1])  # a NaN where the reference has 3.0
    report = check_equivalence(_mul([1, 1, 1, 1]), nan_weight, user_inputs={"x": x})
    assert not report.passed and report.outputs[0].nonfinite_mismatch
    # The finite values agree: the failure is the non-finite placement alone.
    assert report.outputs[0].max_abs == 0.0


def test_an_infinity_of_the_other_sign_fails():
    x = np.array([[1.0, 2.0, 3.0, np.inf]], np.float32)
    report = check_equivalence(_mul([1, 1, 1, 1]), _mul([1, 1, 1, -1]), user_inputs={"x": x})
    assert not report.passed and report.outputs[0].nonfinite_mismatch


def test_a_shape_mismatch_raises():
    reference = make_model([oh.make_node("Identity", ["x"], ["y"])], [("x", ["N", 4])], [("y", None)])
    candidate = make_model([oh.make_node("Concat", ["x", "x"], ["y"], axis=1)], [("x", ["N", 4])], [("y", None)])
    with pytest.raises(EquivalenceError, match=r"shape \(1, 8\).*\(1, 4\)"):
        check_equivalence(reference, candidate)


def test_different_output_names_raise():
    with pytest.raises(EquivalenceError, match="outputs differ"):
        check_equivalence(_add([0, 0, 0, 0]), _add([0, 0, 0, 0], name="z"))


def test_a_candidate_that_fails_where_the_original_runs_is_not_equivalent():
    # A rewrite that hard-codes batch 1 runs at batch 1 and fails at the second batch size.
    reference = make_model([oh.make_node("Identity", ["x"], ["y"])], [("x", ["N", 4])], [("y", ["N", 4])])
    candidate = make_model([oh.make_node("Reshape", ["x", "shape"], ["y"])], [("x", ["N", 4])], [("y", ["N", 4])],
                           [("shape", np.array([1, 4], np.int64))])
    with pytest.raises(EquivalenceError, match="compiled model fails"):
        check_equivalence(reference, candidate)


def test_a_reference_that_fails_on_the_given_inputs_is_a_model_error():
    with pytest.raises(ModelError, match="original model fails"):
        check_equivalence(_add([0, 0, 0, 0]), _add([0, 0, 0, 0]), user_inputs={"x": np.ones((1, 5), np.float32)})


# --- the inputs checked --------------------------------------------------------------------------------------------

def test_dynamic_batch_is_checked_at_batch_1_and_3():
    assert SECOND_BATCH == 3
    report = check_equivalence(_add([0, 0, 0, 0]), _add([0, 0, 0, 0]), n=2)
    assert report.feeds == 4
    assert report.shapes == [{"x": [1, 4]}, {"x": [1, 4]}, {"x": [3, 4]}, {"x": [3, 4]}]


def test_fixed_batch_is_checked_at_its_own_size():
    report = check_equivalence(_add([0, 0, 0, 0], shape=(2, 4)), _add([0, 0, 0, 0], shape=(2, 4)), n=3)
    assert report.shapes == [{"x": [2, 4]}] * 3


def test_inputs_are_seeded_and_alternate_uniform_and_normal():
    model = _add([0, 0, 0, 0], shape=(64, 4))
    feeds = make_input_batches(model, n=2, seed=3)
    uniform, normal = feeds[0]["x"], feeds[1]["x"]
    assert uniform.dtype == np.float32 and 0 <= uniform.min() and uniform.max() < 1
    assert normal.min() < 0 < normal.max() and abs(normal.std() - 1) < 0.2
    again = make_input_batches(model, n=2, seed=3)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, again))
    assert not np.array_equal(make_input_batches(model, n=1, seed=4)[0]["x"], uniform)


def test_symbolic_non_batch_dims_need_an_input_shape():
    model = _add(np.zeros((1, 3, 1, 1)), shape=("N", 3, "H", "W"))
    with pytest.raises(UsageError, match="--input-shape x:"):
        check_equivalence(model, model)
    report = check_equivalence(model, model, n=1, input_shapes=["x:2,3,5,7"])
    assert report.passed and report.shapes == [{"x": [2, 3, 5, 7]}]


@pytest.mark.parametrize("bad", ["x:2,4,5,7", "x:2,3,5", "x:0,3,5,7", "x:a,b", "x2,3,5,7", "y:2,3,5,7"])
def test_bad_input_shapes_are_usage_errors(bad):
    model = _add(np.zeros((1, 3, 1, 1)), shape=("N", 3, "H", "W"))
    with pytest.raises(UsageError):
        check_equivalence(model, model, input_shapes=[bad])


def test_user_npy_inputs_replace_the_random_ones(tmp_path):
    np.save(tmp_path / "x.npy", X)
    report = check_equivalence(_add([0, 0, 0, 0]), _add([0, 0.25, 0, -0.5]), user_inputs=[f"x:{tmp_path}/x.npy"])
    assert report.feeds == 1 and report.shapes == [{"x": [1, 4]}] and report.outputs[0].max_abs == 0.5
    with pytest.raises(UsageError, match="no array for input"):
        check_equivalence(_add([0, 0, 0, 0]), _add([0, 0, 0, 0]), user_inputs={"other": X})
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="cannot read"):  # object arrays would need unpickling: refused
        check_equivalence(_add([0, 0, 0, 0]), _add([0, 0, 0, 0]), user_inputs=[f"x:{tmp_path}/obj.npy"])


def test_cli_verify_needs_input_shape_for_symbolic_dims(tmp_path):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(_add(np.zeros((1, 3, 1, 1)), shape=("N", 3, "H", "W")), path)
    result = CliRunner().invoke(cli, ["verify", str(path), str(path)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "--input-shape" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    result = CliRunner().invoke(cli, ["verify", str(path), str(path), "--input-shape", "x:1,3,4,6"])
    assert result.exit_code == 0, result.stderr


def test_output_deviation_is_measured_on_onnxruntime_relative_to_each_outputs_scale():
    """The one deviation measure of the approximate passes: per output, max |after − before| / max |before|."""
    def scaled(factor):
        return make_model([oh.make_node("Mul", ["x", "k"], ["y"])], [("x", ["N", 3])], [("y", ["N", 3])],
                          [("k", np.full(3, factor, np.float32))])

    feeds = random_float_feeds(scaled(1.0))
    assert [feed["x"].shape[0] for feed in feeds] == [1, 1, SECOND_BATCH, SECOND_BATCH]
    assert output_deviation(scaled(2.0), scaled(2.0), feeds) == {"max_abs": 0.0, "max_rel": 0.0}
    measured = output_deviation(scaled(2.0), scaled(2.2), feeds)
    largest = max(float(np.abs(feed["x"]).max()) for feed in feeds)
    assert measured["max_abs"] == pytest.approx(0.2 * largest, rel=1e-5)
    assert measured["max_rel"] == pytest.approx(0.1, rel=1e-5)


# --- the "unchanged" proof (runtime.identity.same_model): every change that can alter the function is seen ---------

_IDENTITY_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 5, 5] x) => (float[N, 3, 5, 5] y) <float[3, 2, 3, 3] W> {
    c = Conv <pads = [1, 1, 1, 1]> (x, W)
    y = LeakyRelu <alpha = 0.1> (c)
}"""


def _identity_model() -> onnx.ModelProto:
    weights = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    return text_model(_IDENTITY_MODEL, W=weights)


def _set_alpha(m):
    m.graph.node[1].attribute[0].f = 0.2


def _set_pads(m):
    m.graph.node[0].attribute[0].ints[:] = [0, 0, 0, 0]


def _set_opset(m):
    m.opset_import[0].version = 18


def _set_input_type(m):
    m.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE


def _set_op(m):
    m.graph.node[1].op_type = "Relu"
    del m.graph.node[1].attribute[:]


def _set_weight(m):
    values = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
    values[0, 0, 0, 0] += 1e-3
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(values, "W"))


def _rewire(m):
    m.graph.node[1].input[0] = "x"


@pytest.mark.parametrize("change", [_set_alpha, _set_pads, _set_opset, _set_input_type, _set_op, _set_weight,
                                    _rewire])
def test_same_model_sees_every_change_that_can_alter_the_function(change):
    reference, candidate = _identity_model(), _identity_model()
    assert same_model(reference, candidate)
    change(candidate)
    assert not same_model(reference, candidate)


def test_same_model_ignores_names_and_annotations():
    reference, candidate = _identity_model(), _identity_model()
    candidate.graph.node[0].name = "renamed"
    candidate.doc_string = "documented"
    candidate.ir_version = 9
    assert same_model(reference, candidate)


def test_an_output_whose_type_changed_is_not_equivalent():
    reference = _identity_model()
    candidate = _identity_model()
    cast = onnx.helper.make_node("Cast", ["y16"], ["y"], to=onnx.TensorProto.FLOAT16)
    candidate.graph.node[1].output[0] = "y16"
    candidate.graph.node.append(cast)
    candidate.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    with pytest.raises(EquivalenceError, match="float16 in the compiled model, float32 in the original"):
        check_equivalence(reference, candidate)
