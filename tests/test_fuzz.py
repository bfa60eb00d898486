"""Differential fuzzing, fast profile: every registered pass and the default pipeline on random CNN graphs.

Each case is a random graph from tests/fuzz_graphs.py (with issue 16's forms from fuzz_forms.py: constant-condition
If, inputs with a default, float16, opset 18-21 Reduce/Split/Pad); each pass runs on it with `strict=True` (a pass
that raises is a crash, not a silent rollback), the result goes through the backend and the full ONNX checker, and
onnxruntime (CPU, optimisations off) must give the original's outputs: max|diff| ≤ 1e-5·max(1, max|ref|) (float16:
the equivalence check's 2e-3 + 2e-2·max|ref|), or, where rounding alone exceeds that, no more than a few times the
original's own error against a float64 evaluation.
Zero mismatches, zero crashes. The long profile is `python bench/fuzz.py --graphs 2000` (or this file with
CNNC_FUZZ_EXAMPLES=2000); every failure either finds is kept as a plain test in tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from fuzz_graphs import check_pass, cnn_graphs, fuzzed_specs, random_case, reproducer, run_on_onnxruntime
from hypothesis import given, settings

EXAMPLES = int(os.environ.get("CNNC_FUZZ_EXAMPLES", "25"))


def _pytest_specs() -> list:
    specs, left_out = fuzzed_specs()
    return specs + [pytest.param(name, marks=pytest.mark.skip(reason=why)) for name, why in left_out.items()]


SPECS = _pytest_specs()


def _quiet_run(model, feeds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_on_onnxruntime(model, feeds)


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=EXAMPLES)
@given(case=cnn_graphs())
def test_pass_is_exact_on_random_graphs(spec, case):
    outcome = check_pass(case, spec, _quiet_run(case.model, case.feeds))
    assert outcome.ok, reproducer(case, outcome)


def test_every_pass_rewrites_some_seeded_graphs():
    """The fuzzing is not vacuous: on seeded graphs each exact spec changes at least one and breaks none."""
    looking = {spec for spec in SPECS if isinstance(spec, str) and not spec.startswith("drop-blocks")}
    changed: Counter = Counter()
    for seed in range(40):
        if not looking:
            break
        case = random_case(seed)
        reference = _quiet_run(case.model, case.feeds)
        for spec in sorted(looking):
            outcome = check_pass(case, spec, reference)
            assert outcome.ok, reproducer(case, outcome)
            if outcome.changed:
                changed[spec] += 1
                looking.discard(spec)
    assert not looking, f"never changed a seeded graph: {sorted(looking)}"


def test_generated_graphs_are_valid_and_cover_every_op():
    """The generator's shapes are onnxruntime's, its models pass the full checker, and it emits every op kind."""
    ops: Counter = Counter()
    features: Counter = Counter()
    for seed in range(150):
        case = random_case(seed)
        onnx.checker.check_model(case.model, full_check=True)
        outputs = _quiet_run(case.model, case.feeds)
        for value, info in zip(outputs, case.model.graph.output):
            declared = [d.dim_value for d in info.type.tensor_type.shape.dim[1:]]
            assert list(value.shape[1:]) == declared, case.describe()
            assert value.shape[0] == case.feeds["x"].shape[0]
            assert np.all(np.isfinite(value))
            assert value.dtype == case.feeds["x"].dtype  # float16 graphs are float16 end to end
        ops.update(case.op_types())
        x = case.feeds["x"]
        features["batch > 1"] += x.shape[0] > 1
        features["non-square"] += x.shape[2] != x.shape[3]
        features["symbolic batch"] += bool(case.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param)
        features["two outputs"] += len(case.model.graph.output) > 1
        features["unnamed nodes"] += any(not node.name for node in case.model.graph.node)
        features["input with a default"] += len(case.model.graph.input) > 1
        features["float16"] += x.dtype == np.float16
        features["opset 18-21"] += case.model.opset_import[0].version >= 18
        for node in case.model.graph.node:
            attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Conv":
                pads = attrs.get("pads", [0] * 4)
                features["asymmetric pads"] += pads[:2] != pads[2:]
                features["groups"] += attrs.get("group", 1) > 1
                features["dilation"] += max(attrs.get("dilations", [1])) > 1
                features["stride 3-4"] += max(attrs.get("strides", [1])) > 2
                features["kernel 6-7"] += max(attrs.get("kernel_shape", [1])) > 5
                features["auto_pad"] += "auto_pad" in attrs
                features["no bias"] += len(node.input) == 2
            if node.op_type in ("MaxPool", "AveragePool"):
                features["ceil_mode"] += attrs.get("ceil_mode", 0)
            if node.op_type == "Pad":
                features[f"pad {attrs['mode'].decode()}"] += 1
                features["pad axes"] += len(node.input) > 3
            if node.op_type.startswith("Reduce"):
                features["reduce axes input"] += len(node.input) > 1
            if node.op_type == "Split":
                features["split num_outputs"] += "num_outputs" in attrs
            if node.op_type == "If":
                features["If"] += 1
                features["If weights outside"] += not attrs["then_branch"].initializer
            if node.op_type == "Resize":
                features[f"resize {attrs['mode'].decode()}"] += 1
    wanted = {"Conv", "ConvTranspose", "BatchNormalization", "Relu", "LeakyRelu", "Tanh", "Add", "Mul", "Concat",
              "Pad", "AveragePool", "MaxPool", "GlobalAveragePool", "Resize", "Flatten", "Gemm", "If", "Split",
              "ReduceMean", "ReduceMax", "ReduceSum"}
    assert wanted <= set(ops), wanted - set(ops)
    missing = [f for f in ("batch > 1", "non-square", "symbolic batch", "two outputs", "unnamed nodes",
                           "asymmetric pads", "groups", "dilation", "stride 3-4", "kernel 6-7", "auto_pad", "no bias",
                           "ceil_mode", "pad constant", "pad reflect", "pad edge", "resize nearest", "resize linear",
                           "input with a default", "float16", "opset 18-21", "pad axes", "reduce axes input",
                           "split num_outputs", "If", "If weights outside")
               if not features[f]]
    assert not missing, missing
